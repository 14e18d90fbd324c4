"""Shared benchmark machinery: rows, results files, environment, device peaks, timing, memory.

Rows are plain dicts keyed by KEY = (op, provider, mode, shape, dtype, device). Every script merges
its rows into ``<out>/results.json`` (a later row with the same key replaces an earlier one), so one
folder holds one run. ``device`` is always a label naming the device the number was taken on: a CPU
timing can never be mistaken for a GPU one.

Device-independent memory (``SavedBytes``, ``LiveBytes``) counts tensor storages, not allocator
pools: it is what a caching allocator would need at best, without fragmentation or workspaces
that an op allocates and frees internally.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor

KEY = ("op", "provider", "mode", "shape", "dtype", "device")
# Fields every row carries (None where they do not apply), so a report never guesses a column.
ROW_FIELDS = KEY + ("status", "reason", "median_ms", "speedup_vs_reference", "peak_extra_mb",
                    "tflops", "gbps", "pct_peak_flops", "pct_peak_bw", "params")
RESULTS_FILE = "results.json"
SCHEMA = 1
MB = 2 ** 20
GB = 2 ** 30


# ----------------------------------------------------------------------------------- rows
def device_label(device) -> str:
    """'cuda: NVIDIA H100 80GB HBM3' or 'cpu': the device half of every row's key."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return device.type


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else str(dtype)


def row(op: str, provider: str, mode: str, shape: str, dtype, device: str, **fields) -> dict:
    """A result row with every standard field present; extra fields are kept as given."""
    r = {name: None for name in ROW_FIELDS}
    r.update(op=op, provider=provider, mode=mode, shape=shape, dtype=dtype_name(dtype), device=device,
             status="ok", params={})
    r.update(fields)
    return r


def row_key(r: dict) -> tuple:
    return tuple(r[k] for k in KEY)


# --------------------------------------------------------------------------- results files
def load_results(out: Path) -> dict:
    path = Path(out) / RESULTS_FILE
    if path.exists():
        with open(path) as f:
            return json.load(f)
    return {"schema": SCHEMA, "env": {}, "peaks": {}, "runs": {}, "rows": []}


def save_results(out, script: str, rows: Sequence[dict], *, env: dict, meta: dict,
                 peaks: Optional[dict] = None, extra: Optional[dict] = None) -> Path:
    """Merges ``rows`` into <out>/results.json and records the script's run (args, wall time)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_results(out)
    data["schema"] = SCHEMA
    data["env"].update(env)
    if peaks:
        data["peaks"][peaks["device"]] = peaks
    data["runs"][script] = meta
    if extra:
        data.setdefault("extra", {}).update(extra)
    merged = {row_key(r): r for r in data["rows"]}
    for r in rows:
        merged[row_key(r)] = r
    data["rows"] = list(merged.values())
    path = out / RESULTS_FILE
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=_json_default)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated results file
    return path


class Saver:
    """Rows of one script, written to <out>/results.json after every add: a script stopped by a
    hard time limit keeps what it measured."""

    def __init__(self, out, script: str, args, budget: "Budget", device, peaks: Optional[dict] = None):
        self.out, self.script, self.args, self.budget, self.peaks = out, script, args, budget, peaks
        self.env = environment(device)
        self._rows: Dict[tuple, dict] = {}

    @property
    def rows(self) -> List[dict]:
        return list(self._rows.values())

    def add(self, rows: Sequence[dict], extra: Optional[dict] = None) -> Path:
        for r in rows:
            self._rows[row_key(r)] = r
        return save_results(self.out, self.script, rows, env=self.env, meta=run_meta(self.args, self.budget),
                            peaks=self.peaks, extra=extra)


def _json_default(x):
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# ----------------------------------------------------------------------------- environment
def _version(distribution: str) -> Optional[str]:
    # Package metadata, not an import: importing peft pulls in transformers (seconds of budget).
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _driver_version() -> Optional[str]:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def _git_commit() -> Optional[str]:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def environment(device) -> dict:
    """Versions and device facts recorded with every results file."""
    import fpt_fast

    device = torch.device(device)
    env = {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "triton": _version("triton"), "timm": _version("timm"), "peft": _version("peft"),
        "matplotlib": _version("matplotlib"), "numpy": _version("numpy"),
        "fpt_fast": fpt_fast.__version__, "git_commit": _git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "cpu_count": os.cpu_count(), "device": device_label(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GB, 2),
                   sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   driver=_driver_version())
    return env


# ------------------------------------------------------------------------------ devices
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def clear(device) -> None:
    """Drops garbage and cached blocks so the next measurement starts from the same state.

    CUDA only: on the CPU nothing is measured through the allocator, and a full collection of a
    process that imported torch costs ~0.2 s."""
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def total_bytes(device) -> Optional[int]:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


# -------------------------------------------------------------------------------- timing
def _cpu_median_ms(fn: Callable, warmup_ms: float, rep_ms: float, max_reps: int = 50) -> float:
    start = time.perf_counter()
    fn()  # first call: warm-up (allocations, lazy init) outside the numbers
    while (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
    times = []
    begin = time.perf_counter()
    while len(times) < 3 or ((time.perf_counter() - begin) * 1e3 < rep_ms and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _cuda_event_times_ms(fn: Callable, reps: int, grad_to_none: Sequence[Tensor] = ()) -> List[float]:
    """Per-call times from CUDA events around each call."""
    times = []
    for _ in range(reps):
        for t in grad_to_none:
            t.grad = None
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return times


def _cuda_event_median_ms(fn: Callable, reps: int, grad_to_none: Sequence[Tensor] = ()) -> float:
    return statistics.median(_cuda_event_times_ms(fn, reps, grad_to_none))


def time_ms(fn: Callable, device, *, warmup_ms: float = 25, rep_ms: float = 100,
            grad_to_none: Sequence[Tensor] = (), slow_ms: float = 200) -> float:
    """Median time of fn() in milliseconds.

    CUDA: one untimed call (compilation, autotuning), then triton.testing.do_bench's median when a
    call is fast; a call slower than ``slow_ms`` is timed with CUDA events over 3 calls instead, since
    do_bench would spend seconds estimating it (over 5x slow_ms: 2 timed calls, no second warm-up).
    CPU: a host timer (smoke mode only; labelled cpu).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return _cpu_median_ms(fn, warmup_ms, rep_ms)
    for t in grad_to_none:
        t.grad = None
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    first_ms = (time.perf_counter() - t0) * 1e3
    if first_ms > 5 * slow_ms:
        return _cuda_event_median_ms(fn, 2, grad_to_none)  # seconds per call: the budget matters more
    if first_ms > slow_ms:
        # Might still include compilation: one more untimed call, then events.
        fn()
        return _cuda_event_median_ms(fn, 3, grad_to_none)
    try:
        from triton.testing import do_bench
    except ImportError:
        return _cuda_event_median_ms(fn, 20, grad_to_none)
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none) or None,
                          return_mode="median"))


def step_times_ms(fn: Callable, device, *, warmup: int = 2, reps: int = 5) -> List[float]:
    """Per-call times of a long-running fn (a training step): events on CUDA, host timer on CPU."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        return _cuda_event_times_ms(fn, reps)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def peak_extra_bytes(fn: Callable, device) -> Optional[int]:
    """max_memory_allocated during one fn() minus what was allocated before it (the inputs).

    None on the CPU, where torch keeps no allocator statistics.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    clear(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


# ------------------------------------------------------------------------- device peaks
def measure_peaks(device, smoke: bool = False) -> dict:
    """The two ceilings a kernel is measured against: a large bf16 matmul (TFLOP/s) and a large
    device-to-device copy (GB/s, bytes read + written). Random data, never zeros."""
    device = torch.device(device)
    label = device_label(device)
    if device.type == "cuda":
        n, dtype, copy_bytes = 8192, torch.bfloat16, 2 * GB
    else:
        n, dtype, copy_bytes = (256 if smoke else 1024), torch.float32, (16 if smoke else 256) * MB
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    mm_ms = time_ms(lambda: torch.mm(a, b), device, warmup_ms=10 if smoke else 100,
                    rep_ms=20 if smoke else 300)
    del a, b
    src = torch.randn(copy_bytes // 4, device=device, generator=gen)
    dst = torch.empty_like(src)
    cp_ms = time_ms(lambda: dst.copy_(src), device, warmup_ms=10 if smoke else 100,
                    rep_ms=20 if smoke else 300)
    del src, dst
    clear(device)
    return {
        "device": label,
        "matmul": f"{n}x{n}x{n} {dtype_name(dtype)}",
        "matmul_ms": mm_ms,
        "peak_tflops": 2 * n ** 3 / (mm_ms * 1e-3) / 1e12,
        "copy_bytes": 2 * copy_bytes,
        "copy_ms": cp_ms,
        "peak_gbps": 2 * copy_bytes / (cp_ms * 1e-3) / 1e9,
    }


def peaks_for(out, device, smoke: bool) -> dict:
    """The device's peaks, measured once per run: reused from <out>/results.json when present."""
    label = device_label(device)
    existing = load_results(Path(out)).get("peaks", {}).get(label)
    if existing and existing.get("smoke", False) == smoke:
        return existing
    peaks = measure_peaks(device, smoke)
    peaks["smoke"] = smoke
    return peaks


def throughput_fields(ms: Optional[float], flops: Optional[float], nbytes: Optional[float],
                      peaks: dict) -> dict:
    """Achieved TFLOP/s and GB/s, their share of the measured peaks, and the floor time
    max(flops / peak, bytes / bandwidth) the call cannot beat."""
    fields = {"flops": flops, "bytes": nbytes}
    if not ms or ms <= 0:
        return fields
    seconds = ms * 1e-3
    floor = 0.0
    if flops:
        fields["tflops"] = flops / seconds / 1e12
        fields["pct_peak_flops"] = 100 * fields["tflops"] / peaks["peak_tflops"]
        floor = max(floor, flops / (peaks["peak_tflops"] * 1e12))
    if nbytes:
        fields["gbps"] = nbytes / seconds / 1e9
        fields["pct_peak_bw"] = 100 * fields["gbps"] / peaks["peak_gbps"]
        floor = max(floor, nbytes / (peaks["peak_gbps"] * 1e9))
    if floor:
        fields["floor_ms"] = floor * 1e3
        fields["pct_of_floor"] = 100 * floor * 1e3 / ms
    return fields


# ------------------------------------------------------------------------------- budget
class Budget:
    """Wall-clock budget of one script: sweeps stop (with a recorded reason) once it is spent."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def expired(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds

    @property
    def reason(self) -> str:
        return f"time budget of {self.seconds:.0f} s (--budget-s) spent"


# ------------------------------------------------------------------ device-independent memory
def _storage(t: Tensor):
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError):  # sparse, meta or opaque tensors have no storage
        return None


class SavedBytes:
    """Bytes autograd saves for backward inside the ``with`` block, each storage counted once.

    Storages of ``exclude`` tensors (parameters, the batch's inputs) are left out: they are counted
    as resident memory elsewhere. Views of one storage count the whole storage once, which is what
    keeps memory alive.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()):
        self.excluded = {s[0] for s in (_storage(t) for t in exclude) if s is not None}
        self.storages: Dict[int, int] = {}
        self._hooks = None

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def _pack(self, t: Tensor):
        s = _storage(t)
        if s is not None and s[0] not in self.excluded and s[0] != 0:
            self.storages.setdefault(s[0], s[1])
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class LiveBytes:
    """Peak bytes of tensor storages created inside the ``with`` block and alive at once.

    A TorchDispatchMode sees every op's outputs; a storage is live from its first output until the
    last tensor seen on it is freed. Only for code run without autograd (the frozen branch): the
    shallow copies autograd keeps of saved outputs are invisible here. Storages that an op
    allocates and frees inside itself (workspaces) are not seen.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.current = 0
        self.peak = 0
        self._live: Dict[int, list] = {}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {s[0] for s in (_storage(t) for t in tree_flatten((args, kwargs))[0]
                                         if isinstance(t, Tensor)) if s is not None}
                for t in tree_flatten(out)[0]:
                    if isinstance(t, Tensor):
                        tracker._track(t, inputs)
                return out

        self._mode = _Mode()
        self._flatten = tree_flatten

    def _track(self, t: Tensor, input_ptrs: set) -> None:
        s = _storage(t)
        if s is None or s[0] == 0:
            return
        ptr, nbytes = s
        entry = self._live.get(ptr)
        if entry is None:
            if ptr in input_ptrs:
                return  # a view or in-place result on memory that existed before the block
            entry = self._live[ptr] = [nbytes, 0]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self._live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[ptr]

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


# ------------------------------------------------------------------------------- text
def fmt(x, spec: str = ".2f", none: str = "-") -> str:
    """A number for a table: floats with spec, None as none."""
    if x is None:
        return none
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def status_text(r: dict, limit: int = 120) -> str:
    """A row's status, with its reason cut to limit characters."""
    if r["status"] == "ok":
        return "ok" + (f" ({r['reason'][:limit]})" if r.get("reason") else "")
    return f"{r['status']}: {(r.get('reason') or '')[:limit]}"


def text_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    """A terminal table of rows: columns (title, alignment and width such as "<24", the row's text
    as a function of the row), then each row's status."""
    lines = [" ".join(format(title, spec) for title, spec, _ in columns) + "  status"]
    for r in rows:
        lines.append(" ".join(format(text(r), spec) for _, spec, text in columns) + "  " + status_text(r, 60))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- arguments
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default="benchmarks/results/latest",
                   help="output folder; rows are merged into OUT/results.json")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes on the CPU (or the given device) in seconds: keeps the harness alive")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop sweeps after this many seconds (the rest recorded as skipped)")
    p.add_argument("--seed", type=int, default=0)
    return p


def resolve_device(args) -> torch.device:
    if args.device:
        return torch.device(args.device)
    if args.smoke:
        return torch.device("cpu")  # smoke mode is a CPU harness check unless told otherwise
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def int_list(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> List[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def run_meta(args, budget: Budget) -> dict:
    return {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "argv": sys.argv, "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "wall_s": round(budget.elapsed(), 2)}


def warn_cpu_timings(device) -> None:
    if torch.device(device).type != "cuda":
        print("note: timings below are CPU timings (smoke/harness check), not GPU results", file=sys.stderr)


def start_run(args, script: str, peaks: bool = False):
    """What every benchmark's main() starts with: (device, budget, seeded generator on the device,
    the Saver of the script's rows). peaks: measure the device's peaks (or reuse those in --out),
    then in saver.peaks."""
    device = resolve_device(args)
    budget = Budget(args.budget_s)
    warn_cpu_timings(device)
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    measured = peaks_for(args.out, device, args.smoke) if peaks else None
    return device, budget, gen, Saver(args.out, script, args, budget, device, measured)


def ok_row(rows: Sequence[dict], provider: str) -> Optional[dict]:
    """The row of provider that measured something, or None."""
    return next((r for r in rows if r["provider"] == provider and r["status"] == "ok"), None)


def failure_fields(exc: BaseException) -> dict:
    """status ("oom" or "error") and reason of a row whose measurement raised exc."""
    return {"status": "oom" if is_oom(exc) else "error", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
