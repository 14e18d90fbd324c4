"""`python -m benchmarks.targets FOLDER`: the targets of issue 16, each computed from the rows of
FOLDER/results.json measured in one run, with the choices a GPU run decides (the fastest PyTorch
LSE source, the fastest prompt-attention launch variant) and the run's steps (FOLDER/steps.tsv,
FOLDER/pytest.xml as benchmarks/run_all writes them). Prints them as plain lines (run_all's last
output: a device reply keeps only the end) and writes FOLDER/targets.json.

Every target names the rows it reads, so a smoke run (tiny sizes on the CPU, every row labelled
cpu) computes every line from its own rows: its sizes stand for the full run's (Scale.smoke).
fpt_fast's figure is that of the backend fpt_fast.ops picks on the device ("auto": the first of
fpt_fast.ops.dispatch.PRIORITY with a measured row), named on its line.
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import common


@dataclass(frozen=True)
class Scale:
    """The sizes the targets are stated at, in a full run and what a smoke run has instead."""

    kernel_res: Tuple[int, int, int]     # the kernels' sizes: ViT-B/16 at 512, 1024, 2048 px
    kernel_dtype: str
    prompt_res: int                      # prompt attention's first shape
    extract_batch: int
    max_res: int                         # "extracts at 2048 px at batch 8"
    train_res: int
    train_batch: int

    @staticmethod
    def full() -> "Scale":
        return Scale((512, 1024, 2048), "bfloat16", 512, 8, 2048, 1024, 16)

    @staticmethod
    def smoke() -> "Scale":
        return Scale((64, 128, 128), "float32", 64, 2, 96, 64, 2)


@dataclass
class Line:
    """One target: its statement, measured value (None: not measured), goal, verdict, and where."""

    target: str
    value: Optional[float]
    goal: float
    higher_is_better: bool
    unit: str
    where: str

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        met = self.value >= self.goal if self.higher_is_better else self.value <= self.goal
        return "met" if met else "MISSED"

    def text(self) -> str:
        value = "-" if self.value is None else f"{self.value:.4g}{self.unit}"
        goal = f"{'>=' if self.higher_is_better else '<='} {self.goal:g}{self.unit}"
        return f"{self.target:<52} {value:>10} {goal:>10}  {self.verdict:<12} {self.where}"


def is_smoke(data: dict) -> bool:
    return any(run.get("args", {}).get("smoke") for run in data.get("runs", {}).values())


def fpt_providers(rows: Sequence[dict]) -> Tuple[str, ...]:
    """fpt_fast's backends in the order "auto" takes them on the rows' device."""
    from fpt_fast.ops.dispatch import PRIORITY

    on_cuda = any(r["device"].startswith("cuda") for r in rows)
    return PRIORITY["cuda" if on_cuda else "cpu"]


def _select(rows, **where) -> List[dict]:
    out = []
    for r in rows:
        if all((r.get(k) if k in r else r["params"].get(k)) == v for k, v in where.items()):
            out.append(r)
    return out


def _fpt_row(rows: Sequence[dict], providers: Sequence[str]) -> Tuple[Optional[dict], str]:
    """The measured row of the first of providers, else None and why not."""
    for p in providers:
        r = next((x for x in rows if x["provider"] == p), None)
        if r is not None and r["status"] == "ok":
            return r, ""
    tried = [x for x in rows if x["provider"] in providers]
    if not tried:
        return None, "no row"
    return None, "; ".join(f"{x['provider']} {common.status_text(x, 60)}" for x in tried)


def _ratio_line(target, goal, rows, field, providers) -> Line:
    r, why = _fpt_row(rows, providers)
    if r is None or r.get(field) is None:
        reason = why or f"{field.replace('speedup_vs_', '')} not measured in this run"
        return Line(target, None, goal, True, "x", reason)
    return Line(target, r[field], goal, True, "x", f"{r['provider']}, {r['shape']}, {r['dtype']}")


def kernel_lines(rows: List[dict], s: Scale, providers) -> List[Line]:
    lines = []
    for res, tokens, goal in zip(s.kernel_res[:2], (1025, 4097), (5, 20)):
        lines.append(_ratio_line(f"token importance vs reference @ N={tokens}", goal,
                                 _select(rows, op="token_importance", dtype=s.kernel_dtype, resolution=res),
                                 "speedup_vs_reference", providers))
    select = _select(rows, op="select_tokens", dtype=s.kernel_dtype)
    for res, tokens in zip(s.kernel_res, (1025, 4097, 16385)):
        lines.append(_ratio_line(f"select_tokens vs topk + 2 gathers @ N={tokens}", 2,
                                 _select(select, resolution=res), "speedup_vs_topk_gather", providers))
    prompt = _select(rows, op="prompt_attention", mode="fwd+bwd", resolution=s.prompt_res)
    lines.append(_ratio_line(f"prompt attention fwd+bwd vs eager ({s.kernel_dtype})", 3,
                             [r for r in prompt if r["dtype"] == s.kernel_dtype], "speedup_vs_eager", providers))
    lines.append(_ratio_line("prompt attention fwd+bwd float32 vs torch backend", 1,
                             [r for r in prompt if r["dtype"] == "float32"], "speedup_vs_torch", providers))
    return lines


def extraction_lines(rows: List[dict], s: Scale) -> List[Line]:
    lines = []
    ext = [r for r in _select(rows, op="extract") if r["provider"] in ("fpt_fast_fpt", "fpt_fast_fpt+")]
    ok = [r for r in ext if r["status"] == "ok" and r.get("throughput_vs_timm") is not None]
    target = "extraction img/s vs plain timm SDPA forward"
    if ok:
        worst = min(ok, key=lambda r: r["throughput_vs_timm"])
        lines.append(Line(target, worst["throughput_vs_timm"], 0.8, True, "x",
                          f"worst of {len(ok)}: {worst['provider']}, {worst['shape']}"))
    else:
        lines.append(Line(target, None, 0.8, True, "x", "no extraction row with timm measured"))
    target = f"fpt_fast extracts at {s.max_res} px, batch {s.extract_batch}"
    search = next((r for r in _select(rows, op="max_resolution", provider="fpt_fast_fpt")
                   if r["params"].get("batch") == s.extract_batch and r.get("max_fit_px")), None)
    direct = next((r for r in _select(rows, op="extract", provider="fpt_fast_fpt", resolution=s.max_res,
                                      batch=s.extract_batch)), None)
    if search is not None:
        lines.append(Line(target, float(search["max_fit_px"]), s.max_res, True, " px",
                          f"largest fitting size found, {search['shape']}"))
    elif direct is not None and direct["status"] == "ok":
        lines.append(Line(target, float(s.max_res), s.max_res, True, " px", f"ran: {direct['shape']}"))
    else:
        why = common.status_text(direct, 60) if direct is not None else "no row"
        lines.append(Line(target, None, s.max_res, True, " px", why))
    return lines


def training_lines(rows: List[dict], s: Scale) -> List[Line]:
    steps = _select(rows, op="train_step", resolution=s.train_res, batch=s.train_batch)
    by = {r["provider"]: r for r in steps}
    ref, fast = by.get("reference_fpt"), by.get("fpt")
    at = f"@{s.train_res} px B={s.train_batch}"
    lines = []
    for target, field, goal, higher in (("FPT step peak memory vs reference, no preload", "peak_mb", 0.25, False),
                                        ("FPT step throughput vs reference, no preload", "images_per_s", 2, True)):
        if ref is None or fast is None or ref["status"] != "ok" or fast["status"] != "ok":
            missing = [f"{name} {common.status_text(r, 50) if r else 'no row'}" for name, r in
                       (("reference_fpt", ref), ("fpt", fast)) if r is None or r["status"] != "ok"]
            lines.append(Line(target, None, goal, higher, "x", f"{at}: " + "; ".join(missing)))
        elif not ref.get(field) or fast.get(field) is None:
            lines.append(Line(target, None, goal, higher, "x", f"{at}: {field} not recorded on {fast['device']}"))
        else:
            lines.append(Line(target, fast[field] / ref[field], goal, higher, "x", f"fpt vs reference_fpt {at}"))
    pre = [r for r in _select(rows, op="train_step", provider="fpt+_preloaded", resolution=s.train_res)
           if r["status"] == "ok"]
    target = "FPT+ step with preloaded features, img/s"
    if pre:
        best = max(pre, key=lambda r: r["images_per_s"])
        lines.append(Line(target, best["images_per_s"], 3000, True, "", f"best batch: {best['shape']}"))
    else:
        lines.append(Line(target, None, 3000, True, "", f"no fpt+_preloaded step measured @{s.train_res} px"))
    return lines


def evaluate(data: dict) -> List[Line]:
    rows = data.get("rows", [])
    s = Scale.smoke() if is_smoke(data) else Scale.full()
    providers = fpt_providers(rows)
    return kernel_lines(rows, s, providers) + extraction_lines(rows, s) + training_lines(rows, s)


# ---------------------------------------------------------------------------------- choices
def _fastest(rows: Sequence[dict], prefix: str, default: str) -> Optional[str]:
    """"fastest <provider> <ms> vs <default> <ms> (<ratio>x)" among the ok rows whose provider
    starts with prefix, or None."""
    ok = [r for r in rows if r["status"] == "ok" and r["provider"].startswith(prefix)]
    base = next((r for r in ok if r["provider"] == default), None)
    if not ok or base is None:
        return None
    best = min(ok, key=lambda r: r["median_ms"])
    return (f"fastest {best['provider']} {best['median_ms']:.3f} ms vs {default} {base['median_ms']:.3f} ms "
            f"({base['median_ms'] / best['median_ms']:.2f}x)"
            + (f", {best['gbps']:.0f} GB/s" if best.get("gbps") else ""))


def choices(rows: List[dict]) -> List[str]:
    """What the run decides: per size the fastest LSE source of attention_with_importance, per
    (mode, dtype) the fastest prompt-attention launch variant, per size the fastest select_tokens
    launch (a forced path or variant against "triton", the default the launcher picks), and what
    bounds preloading."""
    lines = []
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        if r["op"] in ("attention_with_importance", "prompt_attention", "select_tokens"):
            groups.setdefault((r["op"], r["mode"], r["shape"], r["dtype"]), []).append(r)
    for (op, mode, shape, dtype), group in sorted(groups.items()):
        if op == "attention_with_importance":
            text = _fastest(group, "triton:", "triton:kernels")
            name = "LSE source"
        elif op == "select_tokens":
            text = _fastest(group, "triton", "triton")
            name = "launch"
        else:
            text = _fastest(group, "triton:", "triton:default")
            name = "launch variant"
        if text:
            lines.append(f"{op} {mode} {name} @ {shape} {dtype}: {text}")
    for r in rows:
        if r["op"] == "preload" and r["provider"] == "gpu_decode" and r.get("levels_vs_pil_max") is not None:
            lines.append(f"preload.decode gpu @ {r['shape']}: frozen inputs up to {r['levels_vs_pil_max']:.1f} "
                         f"levels of 255 from PIL's, {r['share_off_vs_pil']:.1%} of the values off")
        if r["op"] == "preload" and r["provider"] == "pil_loader+frozen" and r["status"] == "ok":
            gpu_decode = (f"; with preload.decode gpu {r['gpu_decode_vs_pil']:.2f}x this pipeline"
                          if r.get("gpu_decode_vs_pil") else "")
            lines.append(f"preload @ {r['shape']}: {r['images_per_s']:.0f} img/s, bound by "
                         f"{r.get('bound', 'unknown')}{gpu_decode}")
    return lines


# ------------------------------------------------------------------------------------ steps
def steps_lines(folder: Path) -> List[str]:
    """run_all's steps (name, seconds, exit code) and the pytest counts and failures."""
    lines = []
    path = folder / "steps.tsv"
    if path.exists():
        parts = []
        for line in path.read_text().splitlines():
            name, seconds, rc = (line.split("\t") + ["", ""])[:3]
            parts.append(f"{name} {seconds}s" + ("" if rc == "0" else f" (exit {rc})"))
        lines.append("steps: " + ", ".join(parts))
    xml = folder / "pytest.xml"
    if xml.exists():
        try:
            root = ElementTree.parse(xml).getroot()
        except ElementTree.ParseError as e:
            return lines + [f"pytest: {xml.name} unreadable ({e}): the run was cut short"]
        suites = [root] if root.tag == "testsuite" else list(root)
        count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        seconds = sum(float(s.get("time", 0)) for s in suites)
        passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
        lines.append(f"pytest: {passed} passed, {count['failures']} failed, {count['errors']} errors, "
                     f"{count['skipped']} skipped in {seconds:.0f} s")
        failed = [f"{case.get('classname', '')}::{case.get('name', '')}" for case in root.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
        lines += [f"  FAILED {name}" for name in failed[:15]]
        if len(failed) > 15:
            lines.append(f"  ... and {len(failed) - 15} more (pytest.xml)")
    return lines


def render_text(folder: Path, data: dict) -> str:
    lines = evaluate(data)
    device = next((r["device"] for r in data.get("rows", [])), "?")
    out = steps_lines(folder) + choices(data.get("rows", []))
    out += ["", f"Targets (ratios in one run; {device}{', SMOKE sizes' if is_smoke(data) else ''}):",
            f"{'target':<52} {'measured':>10} {'goal':>10}  {'verdict':<12} where"]
    out += [line.text() for line in lines]
    met = sum(line.verdict == "met" for line in lines)
    out.append(f"{met} of {len(lines)} targets met; {sum(line.value is None for line in lines)} not measured")
    return "\n".join(out)


def markdown(data: dict) -> str:
    """The targets as a markdown section of report.md."""
    from .report import table

    lines = evaluate(data)
    if not lines:
        return ""
    body = [[line.target, "-" if line.value is None else f"{line.value:.4g}{line.unit}",
             f"{'>=' if line.higher_is_better else '<='} {line.goal:g}{line.unit}", line.verdict, line.where]
            for line in lines]
    picked = choices(data.get("rows", []))
    return "\n".join(["## Targets of issue 16 (ratios measured in this run)", "",
                      table(["target", "measured", "goal", "verdict", "where"], body)]
                     + (["", "Choices this run decides:", ""] + [f"- {c}" for c in picked] if picked else []))


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="a folder holding results.json")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    folder = Path(args.folder)
    data = common.load_results(folder)
    text = render_text(folder, data)
    payload = [dict(asdict(line), verdict=line.verdict) for line in evaluate(data)]
    (folder / "targets.json").write_text(json.dumps({"targets": payload, "choices": choices(data.get("rows", []))},
                                                    indent=1) + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
