"""`python -m benchmarks.report FOLDER`: FOLDER/results.json -> FOLDER/report.md (+ PNG plots).

Plots need matplotlib (`pip install matplotlib`, or the "bench" extra); without it the markdown is
still written and the script says so. Every table keeps the device column: CPU smoke numbers never
read as GPU results.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import common
from .common import fmt, status_text

MB = common.MB


# --------------------------------------------------------------------------------- formatting
def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |")
    return "\n".join(out)


def pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


# ------------------------------------------------------------------------------------ sections
def header(data: dict) -> str:
    env = data.get("env", {})
    lines = ["# fpt_fast benchmark report", ""]
    keys = ["device", "gpu", "driver", "gpu_memory_gib", "capability", "sm_count", "torch", "cuda_runtime", "triton",
            "timm", "peft", "matplotlib", "fpt_fast", "git_commit", "python", "platform", "cpu_count",
            "triton_interpret"]
    lines.append(table(["", "value"], [[k, env[k]] for k in keys if env.get(k) is not None]))
    peaks = data.get("peaks", {})
    if peaks:
        lines += ["", "Measured device peaks (the ceilings every TFLOP/s and GB/s below is compared with):", ""]
        lines.append(table(["device", "matmul", "TFLOP/s", "copy GB/s (read+write)"],
                           [[p["device"], p["matmul"], fmt(p["peak_tflops"], ".1f"), fmt(p["peak_gbps"], ".0f")]
                            for p in peaks.values()]))
    runs = data.get("runs", {})
    if runs:
        lines += ["", table(["script", "wall s", "finished (UTC)"],
                            [[k, fmt(v.get("wall_s")), v.get("finished", "")] for k, v in runs.items()])]
    return "\n".join(lines)


def memory_section(rows: List[dict]) -> str:
    acc = [r for r in rows if r["op"] == "train_memory"]
    if not acc:
        return ""
    lines = ["## Device-independent training memory per step", "",
             "Saved = tensors autograd keeps for backward (unique storages; parameters and inputs "
             "excluded); params = parameters resident on the device during a step (the frozen backbone "
             "too unless features are preloaded); AdamW = optimiser state; inputs = the batch (images or "
             "preloaded features); frozen = peak of live tensors in the online no-grad frozen forward; "
             "estimate = params + grads + AdamW + inputs + max(saved, frozen). fp32 throughout "
             "(the frozen branch too), unless the heading names another feature storage dtype."]
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in acc:
        groups[(r["shape"], r["device"], r["dtype"])].append(r)
    for (shape, device, dtype), group in groups.items():
        backend = next((r.get("fusion_backend") for r in group if r.get("fusion_backend")), None)
        frozen = next((r.get("frozen_attention") for r in group if r.get("frozen_attention")), None)
        measured = next((r.get("measured_batches") for r in group if r.get("measured_batches")), None)
        lines += ["", f"### {shape}, {dtype}, computed on {device}", "",
                  f"Measured at batches {measured}, extrapolated linearly to the batch above"
                  + (f"; fpt_fast's fusion ran its '{backend}' backend" if backend else "")
                  + (f", its online frozen branch the '{frozen}' attention (op-internal workspaces are not "
                     "seen by the live-tensor count)" if frozen else "") + ".", ""]
        body = []
        for r in group:
            if r["status"] != "ok":
                body.append([r["provider"], status_text(r)] + [""] * 10)
                continue
            body.append([r["provider"], fmt(r["saved_bytes"] / MB, ".1f"), fmt(r["param_bytes"] / MB, ".1f"),
                         fmt(r["grad_bytes"] / MB, ".1f"), fmt(r["optimizer_bytes"] / MB, ".1f"),
                         fmt(r["input_bytes"] / MB, ".1f"), fmt(r["frozen_transient_bytes"] / MB, ".1f"),
                         fmt(r["estimate_bytes"] / MB, ".1f"), pct(r.get("ratio_vs_full_ft")),
                         pct(r.get("saved_ratio_vs_full_ft")), pct(r.get("learnable_share")),
                         fmt(r.get("ppe")) + " / " + fmt(r.get("pme"))])
        lines.append(table(["method", "saved MiB", "params MiB", "grads MiB", "AdamW MiB", "inputs MiB",
                            "frozen MiB", "estimate MiB", "estimate vs full FT", "saved vs full FT",
                            "learnable", "PPE / PME"], body))
        by = {r["provider"]: r for r in group if r["status"] == "ok"}
        checks = []
        for name, limit in (("fpt+_preloaded", 0.02), ("fpt_preloaded", 0.05), ("fpt", 0.05)):
            r = by.get(name)
            if r is None or r.get("ratio_vs_full_ft") is None:
                continue
            ratio = r["ratio_vs_full_ft"]
            checks.append(f"- {name}: {pct(ratio)} of full fine-tuning (target <= {100 * limit:.0f}%): "
                          f"{'met' if ratio <= limit else 'NOT met'}")
        if checks:
            lines += ["", "Issue targets (stated for ViT-B/16 at 512 px, batch 16; estimate vs full "
                          "fine-tuning):", ""] + checks
    return "\n".join(lines)


def training_section(rows: List[dict]) -> str:
    steps = [r for r in rows if r["op"] == "train_step"]
    if not steps:
        return ""
    steps.sort(key=lambda r: (r["params"].get("model", ""), r["params"].get("resolution", 0),
                              r["provider"], r["params"].get("batch", 0)))
    body = [[r["provider"], r["params"].get("model"), r["params"].get("resolution"), r["params"].get("batch"),
             r["dtype"], r["device"], fmt(r["median_ms"], ".1f"), fmt(r.get("images_per_s"), ".1f"),
             fmt(r.get("peak_mb"), ".0f"), fmt(r.get("speedup_vs_reference")), fmt(r.get("memory_vs_reference"), ".3f"),
             pct(r.get("learnable_share")), fmt(r.get("ppe")), fmt(r.get("pme")), status_text(r)] for r in steps]
    scored = next((r.get("auc") for r in steps if r.get("auc") is not None), None)
    note = ("PPE / PME use the scores passed with --auc (run_all passes the papers' published mean AUCs, "
            "docs/method.md, section 9: not scores measured here); PME is against full fine-tuning's peak at "
            "the same shape." if scored is not None else "")
    return "\n".join(["## Training step (forward, backward, clip, AdamW)", "", note,
                      table(["method", "model", "res", "batch", "dtype", "device", "ms", "img/s", "peak MB",
                             "x reference speed", "memory vs reference", "learnable", "PPE", "PME", "status"], body)])


def extraction_section(rows: List[dict]) -> str:
    ext = [r for r in rows if r["op"] == "extract"]
    search = [r for r in rows if r["op"] == "max_resolution"]
    live = [r for r in rows if r["op"] == "extract_memory"]
    if not (ext or search or live):
        return ""
    lines = ["## Frozen-branch extraction", ""]
    if ext:
        body = [[r["provider"], r["shape"], r["dtype"], r["device"], fmt(r["median_ms"]), fmt(r.get("images_per_s"), ".1f"),
                 fmt(r.get("throughput_vs_timm")), fmt(r.get("peak_extra_mb"), ".0f"), fmt(r.get("memory_vs_reference"), ".3f"),
                 status_text(r)] for r in ext]
        lines.append(table(["provider", "shape", "dtype", "device", "ms", "img/s", "img/s vs timm SDPA (target >= 0.8)",
                            "peak extra MB", "memory vs reference", "status"], body))
    if search:
        body = [[r["provider"], r["shape"], r["device"], fmt(r.get("max_fit_px")), fmt(r.get("first_oom_px")),
                 fmt(r.get("max_fit_vs_reference")), " ".join(f"{s}{'ok' if ok else 'x'}" for s, ok in r.get("tried") or []),
                 status_text(r)] for r in search]
        lines += ["", "Largest square input that fits (multiple of 16; doubling then bisection; `x` = OOM):", "",
                  table(["provider", "shape", "device", "max fit px", "first OOM px", "vs reference", "tried", "status"],
                        body)]
    if live:
        body = [[r["provider"], r["shape"], r["device"], fmt(r.get("peak_extra_mb"), ".1f"),
                 fmt(r.get("memory_vs_reference"), ".3f")] for r in live]
        lines += ["", "Device-independent peak of live tensors during extraction (fp32; fpt_fast on its CPU "
                  "'torch' backend):", "", table(["provider", "shape", "device", "live peak MiB", "vs reference"], body)]
    return "\n".join(lines)


def _other_ratios(r: dict) -> str:
    """speedup_vs_<b> fields other than the reference's: "topk_gather 2.10x, eager 4.00x"."""
    return ", ".join(f"{k[len('speedup_vs_'):]} {v:.2f}x" for k, v in r.items()
                     if k.startswith("speedup_vs_") and k != "speedup_vs_reference" and v is not None)


def kernels_section(rows: List[dict]) -> str:
    ker = [r for r in rows if r["op"] in ("token_importance", "attention_with_importance", "select_tokens",
                                          "prompt_attention", "xformers_probe")]
    if not ker:
        return ""
    body = [[r["op"], r["mode"], r["shape"], r["dtype"], r["device"], r["provider"], fmt(r["median_ms"], ".3f"),
             fmt(r["speedup_vs_reference"]), _other_ratios(r), fmt(r["peak_extra_mb"], ".1f"),
             fmt(r.get("tflops"), ".1f") + (f" ({r['pct_peak_flops']:.0f}%)" if r.get("pct_peak_flops") else ""),
             fmt(r.get("gbps"), ".0f") + (f" ({r['pct_peak_bw']:.0f}%)" if r.get("pct_peak_bw") else ""),
             fmt(r.get("pct_of_floor"), ".0f"), status_text(r)] for r in ker]
    return "\n".join(["## Kernels", "",
                      "Speedup = the other provider's median / this provider's, same run. GB/s count the fewest "
                      "bytes the op must move (each input read once, each output written once); % of floor = "
                      "max(FLOPs / peak, bytes / bandwidth) over the measured time. triton:<variant> rows call "
                      "the kernel launchers directly (kernels/prompt_attention.TUNING_CANDIDATES; "
                      "triton:lse=<source>: the row LSE from one of PyTorch's fused forwards).", "",
                      table(["op", "mode", "shape", "dtype", "device", "provider", "median ms", "x reference",
                             "other ratios", "peak extra MB", "TFLOP/s (% peak)", "GB/s (% peak)", "% of floor",
                             "status"], body)])


def preload_section(rows: List[dict]) -> str:
    pre = [r for r in rows if r["op"] == "preload"]
    if not pre:
        return ""
    body = [[r["mode"], r["provider"], r["shape"], r["dtype"], r["device"], r["params"].get("workers"),
             fmt(r.get("images_per_s"), ".1f"), fmt(r.get("startup_s"), ".1f"), r.get("bound") or "",
             status_text(r)] for r in pre]
    return "\n".join(["## Preloading: input pipeline against the frozen forward", "",
                      "JPEG files generated in the run; loader figures are steady state (from the first batch "
                      "delivered); gpu_decode = the option preload.decode: gpu (the GPU decodes and resizes the JPEG "
                      "files; not bit-identical to the PIL pipeline).", "",
                      table(["mode", "provider", "shape", "dtype", "device", "workers", "img/s", "start-up s",
                             "bound", "status"], body)])


# ---------------------------------------------------------------------------------------- plots
def _lines(ax, series: Dict, label=str, log_x: bool = False) -> None:
    """One line with markers per entry of series ({key: [(x, y), ...]}), sorted by x; log-scaled y
    (and x with log_x, base 2), a grid and a legend."""
    for key, points in sorted(series.items()):
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label(key))
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)


def _save(fig, folder: Path, name: str, written: List[str]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(folder / name, dpi=120)
    plt.close(fig)
    written.append(name)


def plots(rows: List[dict], folder: Path) -> List[str]:
    """Writes the PNGs; returns their file names. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    written: List[str] = []
    steps = [r for r in rows if r["op"] == "train_step" and r["status"] == "ok"]

    # Peak memory vs resolution per method, at one batch size shared by as many points as possible.
    mem = [r for r in steps if r.get("peak_mb")]
    if mem:
        counts = defaultdict(int)
        for r in mem:
            counts[r["params"]["batch"]] += 1
        batch = 16 if counts.get(16) else max(counts, key=lambda b: (counts[b], -b))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series = defaultdict(list)
        for r in mem:
            if r["params"]["batch"] == batch:
                series[r["provider"]].append((r["params"]["resolution"], r["peak_mb"]))
        _lines(ax, series)
        ax.set(xlabel="input resolution (px)", ylabel="peak memory (MB, max_memory_allocated)",
               title=f"Training-step peak memory, batch {batch} ({mem[0]['device']})")
        ax.legend(fontsize=7)
        _save(fig, folder, "memory_vs_resolution.png", written)

    if steps:
        resolutions = sorted({r["params"]["resolution"] for r in steps})
        fig, axes = plt.subplots(1, len(resolutions), figsize=(4.5 * len(resolutions), 4), squeeze=False)
        for ax, res in zip(axes[0], resolutions):
            series = defaultdict(list)
            for r in steps:
                if r["params"]["resolution"] == res:
                    series[r["provider"]].append((r["params"]["batch"], r["images_per_s"]))
            _lines(ax, series, log_x=True)
            ax.set(xlabel="batch", ylabel="images / s", title=f"{res} px")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"Training throughput vs batch ({steps[0]['device']})")
        _save(fig, folder, "throughput_vs_batch.png", written)

    ker = [r for r in rows if r["op"] in ("token_importance", "attention_with_importance", "select_tokens")
           and r["status"] == "ok" and r.get("speedup_vs_reference") and r["provider"] != "reference"]
    if ker:
        panels = sorted({(r["op"], r["mode"], r["dtype"]) for r in ker})
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
        for ax, (op, mode, dtype) in zip(axes[0], panels):
            series = defaultdict(list)
            for r in ker:
                if (r["op"], r["mode"], r["dtype"]) == (op, mode, dtype):
                    series[r["provider"]].append((r["params"]["N"], r["speedup_vs_reference"]))
            _lines(ax, series, log_x=True)
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set(xlabel="tokens N", ylabel="speedup vs reference", title=f"{op} {mode} {dtype}")
            ax.legend(fontsize=7)
        fig.suptitle(f"Kernel speedups vs size ({ker[0]['device']})")
        _save(fig, folder, "kernel_speedup_vs_size.png", written)

    acc = [r for r in rows if r["op"] == "train_memory" and r["status"] == "ok" and r.get("estimate_bytes")]
    if acc:
        shape, device, dtype = acc[0]["shape"], acc[0]["device"], acc[0]["dtype"]
        group = sorted((r for r in acc if (r["shape"], r["device"], r["dtype"]) == (shape, device, dtype)),
                       key=lambda r: r["estimate_bytes"])
        fig, ax = plt.subplots(figsize=(8.5, 0.45 * len(group) + 1.8))
        names = [r["provider"] for r in group]
        values = [r["estimate_bytes"] / MB for r in group]
        ax.barh(names, values, color="tab:blue")
        for y, r in enumerate(group):
            ratio = r.get("ratio_vs_full_ft")
            if ratio is not None:
                ax.text(r["estimate_bytes"] / MB, y, f" {100 * ratio:.2f}%", va="center", fontsize=8)
        ax.set(xlabel="MiB per step: params + grads + AdamW + inputs + max(saved, frozen)",
               title=f"Training memory per step, {shape}, {dtype}\n(percent of full fine-tuning; "
                     f"computed on {device})")
        ax.set_xlim(min(values) / 2, max(values) * 3)  # room for the labels
        ax.set_xscale("log")
        ax.grid(True, axis="x", alpha=0.3)
        _save(fig, folder, "memory_account.png", written)

    ext = [r for r in rows if r["op"] == "extract" and r["status"] == "ok"]
    if ext:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series = defaultdict(list)
        for r in ext:
            series[(r["provider"], r["params"]["model"])].append((r["params"]["resolution"], r["images_per_s"]))
        _lines(ax, series, label=" ".join)
        ax.set(xlabel="input resolution (px)", ylabel="images / s",
               title=f"Frozen-branch extraction throughput ({ext[0]['device']})")
        ax.legend(fontsize=7)
        _save(fig, folder, "extraction_throughput.png", written)
    return written


# ------------------------------------------------------------------------------------------ main
def render(folder) -> Path:
    folder = Path(folder)
    path = folder / common.RESULTS_FILE
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run the benchmarks with --out {folder} first")
    data = common.load_results(folder)
    rows = data.get("rows", [])
    from .targets import markdown as targets_markdown

    sections = [header(data), targets_markdown(data), memory_section(rows), extraction_section(rows),
                training_section(rows), preload_section(rows), kernels_section(rows)]
    try:
        images = plots(rows, folder)
    except ImportError:
        images = []
        msg = ("matplotlib is not installed: plots skipped (pip install matplotlib, or "
               "pip install -e '.[bench]'); the markdown report is complete without them")
        print(msg, file=sys.stderr)
        sections.append(f"_{msg}_")
    if images:
        sections.append("## Plots\n\n" + "\n\n".join(f"![{name}]({name})" for name in images))
    out = folder / "report.md"
    out.write_text("\n\n".join(s for s in sections if s) + "\n")
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="a folder holding results.json")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = render(args.folder)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
