"""`python -m benchmarks.extraction`: the frozen branch alone (what preloading runs once per image).

Providers, same backbone weights, same input:
    timm_sdpa        a plain timm inference forward (forward_features) with fused SDPA attention:
                     the speed a frozen branch should approach (target: fpt_fast >= 0.8x its img/s)
    fpt_fast_fpt     fpt_fast.FrozenBranch, FPT preset (all 12 layers extracted)
    fpt_fast_fpt+    fpt_fast.FrozenBranch, FPT+ preset (layers 6-11 extracted)
    reference_fpt    fpt_fast.reference.extract_features (eager N x N attention, sort), FPT layers
    reference_fpt+   the same, FPT+ layers
Rows: img/s, peak extra memory (max_memory_allocated minus the inputs and weights), the ratio to
timm's img/s and to the reference's memory; then the largest resolution (multiple of 16) that fits
at --search-batch for reference and fpt_fast (doubling, then bisection, stopping at OOM); and on
the CPU a device-independent peak of live tensors (LiveBytes) for fpt_fast vs the reference.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, List, Optional, Tuple

import torch

from fpt_fast import FPTConfig, FrozenBranch, reference

from . import common
from .training import BACKBONES

PROVIDERS = ("timm_sdpa", "fpt_fast_fpt", "fpt_fast_fpt+", "reference_fpt", "reference_fpt+")


class Extractors:
    """The providers' callables over one set of frozen weights (FPT and FPT+ branches share them).
    A frozen branch takes one input size (its position embeddings are resampled once, for it), so
    the branches are built for the size of the input at hand, from the same seed (same weights),
    and only the latest size's are kept (the resolution search visits many)."""

    def __init__(self, spec: tuple, device, base_res: int):
        self.name, self.label, self.kwargs = spec
        self.device = torch.device(device)
        self._size, self._branches = None, None
        self.dtype = self.branches(base_res)[0].compute_dtype(self.device)

    def branches(self, size) -> Tuple[FrozenBranch, FrozenBranch]:
        """(FPT branch, FPT+ branch) for inputs of size (h, w) or size x size."""
        size = (size, size) if isinstance(size, int) else tuple(size)
        if size != self._size:
            self._branches = None  # free the previous size's models first
            with torch.random.fork_rng(devices=[]), torch.device(self.device):
                torch.manual_seed(0)
                fpt, fpt_plus = (FrozenBranch(FPTConfig.preset(preset, backbone=self.name, image_size=size,
                                                               backbone_kwargs=dict(self.kwargs)))
                                 for preset in ("fpt", "fpt+"))
            # Same weights in both branches, so every provider reads the same model.
            fpt_plus.backbone.load_state_dict(fpt.backbone.state_dict(), strict=False)
            self._size, self._branches = size, (fpt, fpt_plus)
        return self._branches

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def fn(self, provider: str, x: torch.Tensor) -> Callable[[], object]:
        fpt, fpt_plus = self.branches(x.shape[-2:])
        if provider == "timm_sdpa":
            bb = fpt.backbone

            def timm_forward():
                with torch.no_grad(), self._autocast():
                    return bb.forward_features(x)
            return timm_forward
        branch = fpt_plus if provider.endswith("+") else fpt
        if provider.startswith("fpt_fast"):
            return lambda: branch(x)
        cfg = branch.config

        def reference_forward():
            n = num_selected(cfg, x.shape[-2:])
            with torch.no_grad(), self._autocast():
                return reference.extract_features(branch.backbone, x, cfg.layers, n, cfg.importance)
        return reference_forward


def num_selected(cfg: FPTConfig, size) -> int:
    from fpt_fast.model.config import num_selected_tokens

    ph, pw = cfg.backbone_info.patch_size
    return num_selected_tokens(cfg.backbone_info.num_prefix_tokens + (size[0] // ph) * (size[1] // pw), cfg.token_ratio)


# --------------------------------------------------------------------------- throughput
def bench_throughput(ex: Extractors, res: int, batch: int, args, budget, gen) -> List[dict]:
    device = ex.device
    label = common.device_label(device)
    dtype_text = "bf16-autocast" if ex.dtype == torch.bfloat16 else common.dtype_name(ex.dtype)
    shape = f"{ex.label}@{res} B={batch}"
    rows = []
    x = torch.randn(batch, 3, res, res, device=device, generator=gen)
    for provider in args.providers:
        r = common.row("extract", provider, "fwd", shape, dtype_text, label,
                       params=dict(model=ex.label, resolution=res, batch=batch))
        rows.append(r)
        if budget.expired():
            r.update(status="skipped", reason=budget.reason)
            continue
        fn = ex.fn(provider, x)
        try:
            ms = common.time_ms(fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
            peak = common.peak_extra_bytes(fn, device)
        except Exception as exc:
            r.update(common.failure_fields(exc))
            del exc
            fn = None
            common.clear(device)
            continue
        r.update(median_ms=ms, images_per_s=batch / (ms * 1e-3),
                 peak_extra_mb=None if peak is None else peak / common.MB)
        fn = None
        common.clear(device)
    by = {r["provider"]: r for r in rows if r["status"] == "ok"}
    timm_row = by.get("timm_sdpa")
    for r in rows:
        if r["status"] != "ok":
            continue
        if timm_row is not None:
            r["throughput_vs_timm"] = r["images_per_s"] / timm_row["images_per_s"]
        ref = by.get("reference_fpt+" if r["provider"].endswith("+") else "reference_fpt")
        if ref is not None:
            r["speedup_vs_reference"] = ref["median_ms"] / r["median_ms"]
            if ref["peak_extra_mb"] and r["peak_extra_mb"] is not None:
                r["memory_vs_reference"] = r["peak_extra_mb"] / ref["peak_extra_mb"]
    return rows


# ------------------------------------------------------------------ largest resolution search
def search_max_resolution(fits: Callable[[int], bool], start: int, cap: int, multiple: int = 16,
                          granularity: int = 64, should_stop: Callable[[int], Optional[str]] = lambda s: None
                          ) -> dict:
    """Largest size (a multiple of ``multiple``, at most ``cap``) for which fits(size) is True,
    assuming fits is monotone: doubling from ``start`` until the first failure, then bisection
    down to ``granularity``. Halves downwards when ``start`` itself fails.

    Returns {max_fit, first_fail, tried: [[size, ok], ...], stopped}; max_fit None if nothing fit,
    first_fail None if nothing up to ``cap`` failed.
    """
    def snap(size: int) -> int:
        return max(multiple, size // multiple * multiple)

    tried: List[list] = []
    lo: Optional[int] = None
    hi: Optional[int] = None
    stopped = None

    def probe(size: int) -> Optional[bool]:
        nonlocal stopped
        stopped = should_stop(size)
        if stopped:
            return None
        ok = bool(fits(size))
        tried.append([size, ok])
        return ok

    size = snap(min(start, cap))
    while True:  # grow (or shrink) until the boundary is bracketed
        ok = probe(size)
        if ok is None:
            break
        if ok:
            lo = size
            nxt = snap(min(size * 2, cap))
            if nxt <= size or hi is not None:  # at the cap, or the failure above is known
                break
            size = nxt
        else:
            hi = size
            if lo is not None or size <= multiple:
                break
            size = snap(size // 2)
    while stopped is None and lo is not None and hi is not None and hi - lo > granularity:
        mid = snap((lo + hi) // 2)
        if mid <= lo or mid >= hi:
            break
        ok = probe(mid)
        if ok is None:
            break
        if ok:
            lo = mid
        else:
            hi = mid
    return {"max_fit": lo, "first_fail": hi, "tried": tried, "stopped": stopped}


def max_resolution_rows(ex: Extractors, args, budget, gen) -> List[dict]:
    device = ex.device
    label = common.device_label(device)
    rows = []
    for provider in args.search_providers:
        r = common.row("max_resolution", provider, "fwd", f"{ex.label} B={args.search_batch}",
                       "bf16-autocast" if ex.dtype == torch.bfloat16 else common.dtype_name(ex.dtype), label,
                       params=dict(model=ex.label, batch=args.search_batch))
        rows.append(r)
        last = {}

        def fits(size: int) -> bool:
            x = torch.randn(args.search_batch, 3, size, size, device=device, generator=gen)
            fn = ex.fn(provider, x)
            t0 = time.perf_counter()
            try:
                fn()
                common.sync(device)
                ok = True
            except Exception as exc:
                if not common.is_oom(exc):
                    raise
                ok = False
                del exc
            last[size] = time.perf_counter() - t0
            fn = x = None
            common.clear(device)
            return ok

        def should_stop(size: int) -> Optional[str]:
            if budget.expired():
                return budget.reason
            if last and args.budget_s is not None:
                prev = max(last)
                # Self-attention cost grows with N^2, i.e. (size / prev)^4 in pixels.
                predicted = last[prev] * (size / prev) ** 4
                if predicted > args.budget_s - budget.elapsed():
                    return f"{size} px predicted to take {predicted:.0f} s > remaining budget"
            return None

        try:
            found = search_max_resolution(fits, args.search_start, args.search_cap, granularity=args.search_step,
                                          should_stop=should_stop)
        except Exception as exc:  # a non-OOM failure: recorded, the other provider still runs
            r.update(common.failure_fields(exc))
            continue
        r.update(found, max_fit_px=found["max_fit"], first_oom_px=found["first_fail"],
                 cap_px=args.search_cap, seconds_per_try={str(k): v for k, v in last.items()})
        if found["stopped"]:
            r["reason"] = f"search stopped early: {found['stopped']}"
        elif found["first_fail"] is None:
            r["reason"] = f"no OOM up to the cap ({args.search_cap} px): the true limit is higher"
    by = {r["provider"]: r for r in rows}
    for r in rows:
        ref = by.get("reference_fpt+" if r["provider"].endswith("+") else "reference_fpt")
        if ref is not None and ref.get("max_fit_px") and r.get("max_fit_px"):
            r["max_fit_vs_reference"] = r["max_fit_px"] / ref["max_fit_px"]
    return rows


# ---------------------------------------------------------------- device-independent memory
def live_peak_rows(spec: tuple, res: int, batch: int, providers, seed: int) -> List[dict]:
    """Peak live tensor bytes of each extraction on the CPU (fp32). fpt_fast runs its CPU backend
    ("torch": query-chunked, never N x N) here, not the Triton kernels."""
    ex = Extractors(spec, "cpu", res)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, res, res, generator=gen)
    rows = []
    for provider in providers:
        r = common.row("extract_memory", provider, "live_peak", f"{ex.label}@{res} B={batch}", "float32",
                       "cpu (device-independent)", params=dict(model=ex.label, resolution=res, batch=batch))
        fn = ex.fn(provider, x)
        with torch.no_grad(), common.LiveBytes() as live:
            out = fn()
            del out
        r.update(live_peak_bytes=live.peak, peak_extra_mb=live.peak / common.MB)
        rows.append(r)
    by = {r["provider"]: r for r in rows}
    for r in rows:
        ref = by.get("reference_fpt+" if r["provider"].endswith("+") else "reference_fpt")
        if ref is not None:
            r["memory_vs_reference"] = r["live_peak_bytes"] / ref["live_peak_bytes"]
    return rows


# --------------------------------------------------------------------------------- main
def parse_args(argv):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--backbones", type=common.str_list, default=None, help="vit_b16 (default), vit_l16")
    p.add_argument("--providers", type=common.str_list, default=list(PROVIDERS))
    p.add_argument("--resolutions", type=common.int_list, default=None, help="default 512,1024,2048")
    p.add_argument("--batch", type=int, default=None, help="default 8")
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None)
    p.add_argument("--no-throughput", action="store_true", help="skip the img/s and peak-memory rows")
    p.add_argument("--no-search", action="store_true", help="skip the largest-resolution search")
    p.add_argument("--search-providers", type=common.str_list, default=["reference_fpt", "fpt_fast_fpt"])
    p.add_argument("--search-batch", type=int, default=8)
    p.add_argument("--search-start", type=int, default=None, help="default 512")
    p.add_argument("--search-cap", type=int, default=None, help="largest size tried (default 4096)")
    p.add_argument("--search-step", type=int, default=None, help="bisection stops at this gap (default 128 px)")
    p.add_argument("--no-live-peak", action="store_true", help="skip the CPU live-tensor peak")
    p.add_argument("--live-res", type=int, default=None, help="default 512 (ViT-B/16, batch 1)")
    args = p.parse_args(argv)
    if args.smoke:
        args.backbones = args.backbones or ["tiny"]
        args.resolutions = args.resolutions or [64, 96]
        args.batch = args.batch or 2
        args.search_batch = 2
        args.search_start, args.search_cap, args.search_step = args.search_start or 32, args.search_cap or 128, 16
        args.warmup_ms, args.rep_ms = args.warmup_ms or 1, args.rep_ms or 5
        args.live_res = args.live_res or 64
    args.backbones = args.backbones or ["vit_b16"]
    args.resolutions = args.resolutions or [512, 1024, 2048]
    args.batch = args.batch or 8
    args.search_start = args.search_start or 512
    args.search_cap = args.search_cap or 4096
    args.search_step = args.search_step or 128
    args.warmup_ms, args.rep_ms = args.warmup_ms or 25, args.rep_ms or 200
    args.live_res = args.live_res or 512
    for name in args.providers + args.search_providers:
        if name not in PROVIDERS:
            p.error(f"unknown provider {name!r}; expected some of {PROVIDERS}")
    return args


def main(argv=None) -> List[dict]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device, budget, gen, saver = common.start_run(args, "extraction", peaks=True)
    for bb in args.backbones if not (args.no_throughput and args.no_search) else []:
        spec = BACKBONES[bb]
        ex = Extractors(spec, device, args.resolutions[0])
        for res in args.resolutions if not args.no_throughput else []:
            saver.add(bench_throughput(ex, res, args.batch, args, budget, gen))
        if not args.no_search:
            saver.add(max_resolution_rows(ex, args, budget, gen))
        del ex
        common.clear(device)
    if not args.no_live_peak:
        # Device-independent: the CPU, ViT-B/16 (or the smoke backbone), batch 1.
        saver.add(live_peak_rows(BACKBONES[args.backbones[0]], args.live_res, 1,
                                 [p for p in args.providers if p != "timm_sdpa"] + ["timm_sdpa"], args.seed))
    path = saver.add([])
    print(summary(saver.rows))
    print(f"wrote {len(saver.rows)} rows to {path}")
    return saver.rows


def summary(rows: List[dict]) -> str:
    def pixels(x):
        return "-" if x is None else f"{x} px"

    return common.text_table(rows, [
        ("op", "<15", lambda r: r["op"]), ("provider", "<16", lambda r: r["provider"]),
        ("shape", "<24", lambda r: r["shape"]), ("ms", ">9", lambda r: common.fmt(r["median_ms"])),
        ("img/s", ">9", lambda r: common.fmt(r.get("images_per_s"), ".1f")),
        ("MB", ">9", lambda r: common.fmt(r.get("peak_extra_mb"), ".1f")),
        ("vs timm", ">8", lambda r: common.fmt(r.get("throughput_vs_timm"))),
        ("max fit", ">8", lambda r: pixels(r.get("max_fit_px"))),
        ("first OOM", ">9", lambda r: pixels(r.get("first_oom_px")))])

if __name__ == "__main__":
    main()
