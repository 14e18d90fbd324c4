"""`python -m benchmarks.explain_overhead`: what returning the importance scores and kept indices costs.

Two levels, per backend, the same inputs with and without the extra outputs:
- select: ops.select_tokens(..., return_indices=False / True), the one kernel that changes;
- extract: FrozenBranch(x) / FrozenBranch(x, return_scores=True) (FPT preset: every block is
  extracted, the most scores to keep; the select kernels write their indices, and the scores and
  indices are stacked).
Each pair is timed interleaved (plain, scored, plain, scored, ...) so that load from elsewhere hits
both alike; a row gives both medians and the overhead of the scored call: the median over the
pairs of scored / plain - 1, with the interquartile range of those ratios as its spread (an
overhead inside the spread is not distinguishable from noise).
Shapes: "tiny" (ViT-Ti/16 with 2 blocks, 224 px, batch 8: N = 197) and "vit_b" (ViT-B/16, 512 px,
batch 1: N = 1025); random weights (timing does not depend on them). Rows merge into
<out>/results.json like every benchmark's; CPU rows are labelled cpu.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, List, Tuple

import torch

from fpt_fast import FPTConfig, FrozenBranch, ops
from fpt_fast.model.config import num_selected_tokens

from . import common

# name: (timm backbone, backbone kwargs, image size, batch)
SHAPES = {
    "tiny": ("vit_tiny_patch16_224", {"depth": 2}, 224, 8),
    "vit_b": ("vit_base_patch16_384", {}, 512, 1),
}
SMOKE_SHAPES = {"tiny": ("vit_tiny_patch16_224", {"depth": 2, "embed_dim": 64, "num_heads": 2}, 64, 2)}
COLUMNS = [("op", "<8", lambda r: r["op"]), ("backend", "<8", lambda r: r["provider"]),
           ("shape", "<44", lambda r: r["shape"]),
           ("plain ms", ">10", lambda r: common.fmt(r.get("plain_ms"), ".3f")),
           ("scored ms", ">10", lambda r: common.fmt(r.get("median_ms"), ".3f")),
           ("overhead", ">9", lambda r: common.fmt(r.get("overhead_pct"), "+.1f") + "%"),
           ("spread", ">7", lambda r: common.fmt(r.get("spread_pct"), ".1f") + "%")]


def interleaved_ms(plain: Callable, scored: Callable, reps: int, device) -> Tuple[List[float], List[float]]:
    """Times of reps calls of each, alternating, after one untimed call of each. The device is
    synchronised before and after every call: a CUDA call returns once its kernels are queued, so
    the host clock alone would time the launches, not the work."""
    plain(), scored()
    times = ([], [])
    for _ in range(reps):
        for fn, out in ((plain, times[0]), (scored, times[1])):
            common.sync(device)
            t0 = time.perf_counter()
            fn()
            common.sync(device)
            out.append((time.perf_counter() - t0) * 1e3)
    return times


def pair_row(op: str, backend: str, shape: str, device, plain: Callable, scored: Callable, reps: int) -> dict:
    plain_ms, scored_ms = interleaved_ms(plain, scored, reps, device)
    ratios = [s / p - 1 for p, s in zip(plain_ms, scored_ms)]
    quartiles = statistics.quantiles(ratios, n=4)
    return common.row(op, backend, "forward", shape, torch.float32, common.device_label(device),
                      median_ms=statistics.median(scored_ms), plain_ms=statistics.median(plain_ms),
                      overhead_pct=100 * statistics.median(ratios), spread_pct=100 * (quartiles[2] - quartiles[0]),
                      params={"reps": reps})


def bench_shape(name: str, spec: tuple, backend: str, device, reps: int, gen: torch.Generator) -> List[dict]:
    backbone, kwargs, size, batch = spec
    cfg = FPTConfig.preset("fpt", backbone=backbone, backbone_kwargs=dict(kwargs), image_size=size,
                           pretrained=False, backend=backend)
    with torch.device(device):
        frozen = FrozenBranch(cfg)
    info = cfg.backbone_info
    N, H, d = cfg.num_tokens, info.num_heads, info.head_dim
    n = num_selected_tokens(N, cfg.token_ratio)
    scores = torch.rand(batch, H, N, generator=gen, device=device)
    k, v = (torch.randn(batch, H, N, d, generator=gen, device=device) for _ in range(2))
    x = torch.randn(batch, 3, size, size, generator=gen, device=device)
    select_shape = f"{name}: B={batch} H={H} N={N} n={n} d={d}"
    extract_shape = f"{name}: {info.name} {size}px B={batch} L={len(cfg.layers)}"
    return [
        pair_row("select", backend, select_shape, device,
                 lambda: ops.select_tokens(scores, k, v, n, backend=backend),
                 lambda: ops.select_tokens(scores, k, v, n, return_indices=True, backend=backend), reps * 10),
        pair_row("extract", backend, extract_shape, device, lambda: frozen(x),
                 lambda: frozen(x, return_scores=True), reps),
    ]


def parse_args(argv):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--backends", type=common.str_list, default=None,
                   help="comma-separated (default: native,torch on the CPU, triton,native,torch on CUDA)")
    p.add_argument("--shapes", type=common.str_list, default=list(SHAPES), help=f"of {list(SHAPES)}")
    p.add_argument("--reps", type=int, default=15, help="timed pairs per extraction row (x10 for select rows)")
    return p.parse_args(argv)


def main(argv=None) -> List[dict]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device, budget, gen, saver = common.start_run(args, "explain_overhead")
    backends = args.backends or (["triton", "native", "torch"] if device.type == "cuda" else ["native", "torch"])
    shapes = SMOKE_SHAPES if args.smoke else {s: SHAPES[s] for s in args.shapes}
    reps = 3 if args.smoke else args.reps
    for name, spec in shapes.items():
        for backend in backends:
            reasons = ops.unsupported_reasons(backend, "select_tokens", device)
            if budget.expired():
                reasons = (budget.reason,)
            if reasons:
                saver.add([common.row("select", backend, "forward", name, torch.float32, common.device_label(device),
                                      status="skipped", reason="; ".join(reasons))])
                continue
            with torch.no_grad():
                saver.add(bench_shape(name, spec, backend, device, reps, gen))
    print(common.text_table(saver.rows, COLUMNS))
    return saver.rows


if __name__ == "__main__":
    main()
