"""`python -m benchmarks.kernels`: every fpt_fast op against its reference twin and the obvious
torch alternative, over sizes named after the model and resolution they come from.

Ops and providers (fpt_fast backends run through fpt_fast.ops with backend=...):
    token_importance            triton, native, torch | reference
    attention_with_importance   triton, native, torch | reference, eager (N x N in the input dtype),
                                sdpa (attention only, no importance: a lower bound);
                                triton:kernels (the own forward + importance kernel, no custom op) and
                                triton:lse=<flash|efficient|cudnn> (the row LSE from one of PyTorch's
                                fused forwards, then the same importance kernel): the LSE-source choice
    select_tokens               triton, native, torch | reference (stable sort), topk_gather;
                                triton:<variant> for every kernels/select_tokens.VARIANTS entry (its
                                launcher called directly: "triton:split" and "triton:rowwise" are the
                                two paths forced, whichever the default picks for the size)
    prompt_attention fwd, fwd+bwd (grad into the prompts only: K_sel / V_sel are constants in FPT)
                                triton, native, torch | reference, eager; at the first size of each
                                dtype also triton:<variant> for every launch variant of
                                kernels/prompt_attention.TUNING_CANDIDATES (kernel launchers called
                                directly, so "triton:default" is the same launch without the op)
Each row: median ms (triton.testing.do_bench on CUDA), speedups against the case's baselines
measured in the same run (speedup_vs_<provider>: the reference, and topk_gather / eager / torch /
triton where a target or a choice compares with them), peak extra memory (max_memory_allocated
minus the inputs) and its ratio to the reference, achieved TFLOP/s and GB/s against the device's
measured peaks, with the bytes model of each op: the fewest bytes any implementation must move
(every input read once, every output written once; fwd+bwd: the two passes autograd makes).
Cases run in priority order (the targets of issue 16 first, then the variants), so a spent
--budget-s cuts the least important rows; every row is written to results.json as it is measured.
"""
from __future__ import annotations

import math
import sys
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fpt_fast import ops, reference
from fpt_fast.kernels import prompt_attention as prompt_kernel
from fpt_fast.kernels import select_tokens as select_kernel
from fpt_fast.kernels import token_importance as importance_kernel

from . import common

FPT_BACKENDS = ("triton", "native", "torch")
OPS = ("token_importance", "attention_with_importance", "select_tokens", "prompt_attention")
# (label, N, resolution) of ViT-B/16: N = 1 class token + (resolution / 16)^2 patches. The smoke
# sizes stand for the first two (benchmarks.targets maps them).
VIT_B16_SIZES = [("ViT-B/16@512", 1025, 512), ("ViT-B/16@1024", 4097, 1024), ("ViT-B/16@2048", 16385, 2048)]
SMOKE_SIZES = [("tiny@64", 17, 64), ("tiny@128", 65, 128)]
# Batches per size: importance ops (B, with H = 12 heads) and select_tokens (its "few rows" at
# 2048 px: B x H = 96, where it lost to torch.topk on an H100).
IMPORTANCE_BATCH = {1025: 8, 4097: 8, 16385: 2}
SELECT_BATCH = {1025: 32, 4097: 32, 16385: 8}
# (label, L, B, H, P, n, d): FPT's fusion (L extracted layers, 16 prompts, n = floor(0.2 N)).
PROMPT_SHAPES = [("ViT-B/16@512", 12, 64, 12, 16, 205, 64), ("ViT-B/16@1024", 12, 32, 12, 16, 819, 64),
                 ("ViT-L/16@512", 24, 32, 16, 16, 205, 64)]
SMOKE_PROMPT_SHAPES = [("tiny@64", 2, 4, 2, 4, 13, 32)]


# ------------------------------------------------------------------------ torch alternatives
def eager_attention_importance(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """What one writes without fpt_fast: N x N probabilities in the input dtype, averaged."""
    probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return probs @ v, probs.float().mean(dim=2)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def topk_gather(scores: Tensor, k: Tensor, v: Tensor, n: int) -> Tuple[Tensor, Tensor]:
    """torch.topk then two gathers: three passes over memory, two launches."""
    index = scores.topk(n, dim=-1, sorted=False).indices[..., None].expand(-1, -1, -1, k.shape[-1])
    return k.gather(2, index), v.gather(2, index)


def eager_prompt_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Cross-attention in the input dtype with the P x n probabilities stored for backward."""
    L, B, H, n, d = k.shape
    probs = torch.softmax(q[:, None] @ k.transpose(-1, -2) * d ** -0.5, dim=-1)   # (L, B, H, P, n)
    return (probs @ v).permute(0, 1, 3, 2, 4).reshape(L, B, q.shape[-2], H * d)


# ------------------------------------------------------------------------------- work counts
def attention_flops(B, H, N, d, passes: int) -> float:
    """passes=2: QK^T and PV (attention); each extra pass recomputes QK^T for the column sums."""
    return 2.0 * B * H * N * N * d * passes


def prompt_attention_bytes(L, B, H, P, n, d, es, shared: bool, mode: str) -> float:
    """The fewest bytes prompt attention moves: forward reads q, K, V and writes out and the row LSE;
    the backward of dq alone reads q, K, V, out, dout and the LSE and writes dq. fwd+bwd is both
    passes (autograd runs them as two)."""
    q_bytes = L * (1 if shared else B) * H * P * d * es
    kv_bytes = 2 * L * B * H * n * d * es
    out_bytes = L * B * P * H * d * es
    lse_bytes = L * B * H * P * 4
    forward = q_bytes + kv_bytes + out_bytes + lse_bytes
    backward = 2 * q_bytes + kv_bytes + 2 * out_bytes + lse_bytes
    return forward if mode == "fwd" else forward + backward


# ----------------------------------------------------------------------------------- cases
class Case:
    """One (op, mode, shape, dtype) point: the callables per provider, work counts, the baselines
    whose ratios every row gets, checks run once before timing (a provider whose check returns a
    message is recorded as an error)."""

    def __init__(self, op: str, mode: str, shape: str, dtype: torch.dtype, params: dict,
                 providers: Dict[str, Callable], flops: Dict[str, float], nbytes: Dict[str, float],
                 estimate: Dict[str, float], grad_to_none=(), baselines: Sequence[str] = ("reference",),
                 reasons: Optional[Dict[str, str]] = None,
                 checks: Optional[Dict[str, Callable[[], Optional[str]]]] = None):
        self.op, self.mode, self.shape, self.dtype, self.params = op, mode, shape, dtype, params
        self.providers, self.flops, self.nbytes, self.estimate = providers, flops, nbytes, estimate
        self.grad_to_none, self.baselines = grad_to_none, tuple(baselines)
        self.reasons, self.checks = reasons or {}, checks or {}


def _qkv(B, H, N, d, dtype, device, gen):
    # One (B, N, 3, H, d) buffer split like a ViT's qkv projection: q, k, v are strided views.
    qkv = torch.randn(B, N, 3, H, d, device=device, dtype=dtype, generator=gen)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def shape_label(label, **dims) -> str:
    return f"{label} " + " ".join(f"{k}={v}" for k, v in dims.items())


def token_importance_case(label, res, B, H, N, d, dtype, device, gen) -> Case:
    q, k, _ = _qkv(B, H, N, d, dtype, device, gen)
    es = torch.finfo(dtype).bits // 8
    ti = {b: (lambda b=b: ops.token_importance(q, k, "global", backend=b)) for b in FPT_BACKENDS}
    ti["reference"] = lambda: reference.token_importance(q, k, "global")
    flops = attention_flops(B, H, N, d, 2)  # an LSE pass and a column-sum pass over QK^T
    nbytes = 2 * B * H * N * d * es + B * H * N * 4
    return Case("token_importance", "fwd", shape_label(label, B=B, H=H, N=N, d=d), dtype,
                dict(model=label, resolution=res, B=B, H=H, N=N, d=d), ti,
                flops={p: flops for p in ti}, nbytes={p: nbytes for p in ti},
                estimate={"reference": 3 * B * H * N * N * 4})


def _lse_source_fn(source: str, q, k, v) -> Callable:
    def run():
        _, lse = importance_kernel.attention_forward_from(source, q, k, v)
        return importance_kernel.token_importance_forward(q, k, lse)
    return run


def _lse_check(source: str, q, k, v) -> Callable[[], Optional[str]]:
    """The source's LSE against the own forward's on the benchmarked inputs: a unit or layout slip
    (log2 units, padded rows) becomes an error row, never a fast wrong number."""
    def check() -> Optional[str]:
        _, own = importance_kernel.attention_forward(q, k, v)
        _, got = importance_kernel.attention_forward_from(source, q, k, v)
        diff = (got - own).abs().max().item()
        if not math.isfinite(diff) or diff > 1e-3 * max(1.0, own.abs().max().item()):
            return f"its LSE differs from the own forward's by {diff:.3g}"
        return None
    return check


def attention_with_importance_case(label, res, B, H, N, d, dtype, device, gen) -> Case:
    q, k, v = _qkv(B, H, N, d, dtype, device, gen)
    es = torch.finfo(dtype).bits // 8
    nn_fp32 = B * H * N * N * 4  # one N x N fp32 tensor: the reference's unit of memory
    awi = {b: (lambda b=b: ops.attention_with_importance(q, k, v, "global", backend=b)) for b in FPT_BACKENDS}
    awi["reference"] = lambda: reference.attention_with_importance(q, k, v, "global")
    awi["eager"] = lambda: eager_attention_importance(q, k, v)
    awi["sdpa"] = lambda: sdpa_attention(q, k, v)
    reasons, checks = {}, {}
    for source in importance_kernel.LSE_SOURCES:
        name = "triton:kernels" if source == "own" else f"triton:lse={source}"
        awi[name] = _lse_source_fn(source, q, k, v)
        reason = importance_kernel.lse_source_reason(source, q)
        if reason is not None:
            reasons[name] = reason
        elif source != "own":
            checks[name] = _lse_check(source, q, k, v)
    flops = {p: attention_flops(B, H, N, d, 3) for p in awi}
    flops["sdpa"] = attention_flops(B, H, N, d, 2)  # sdpa computes attention only
    nbytes = {p: 4 * B * H * N * d * es + B * H * N * 4 for p in awi}
    nbytes["sdpa"] = 4 * B * H * N * d * es
    return Case("attention_with_importance", "fwd", shape_label(label, B=B, H=H, N=N, d=d), dtype,
                dict(model=label, resolution=res, B=B, H=H, N=N, d=d), awi, flops=flops, nbytes=nbytes,
                estimate={"reference": 3 * nn_fp32, "eager": 3 * nn_fp32 * es / 4 + nn_fp32},
                baselines=("reference", "triton", "sdpa"), reasons=reasons, checks=checks)


def select_case(label, res, B, H, N, d, dtype, device, gen) -> Case:
    from fpt_fast.model.config import num_selected_tokens

    _, k, v = _qkv(B, H, N, d, dtype, device, gen)
    es = torch.finfo(dtype).bits // 8
    n = num_selected_tokens(N, 0.2)
    scores = torch.rand(B, H, N, device=device, dtype=torch.float32, generator=gen)
    sel = {b: (lambda b=b: ops.select_tokens(scores, k, v, n, backend=b)) for b in FPT_BACKENDS}
    sel["reference"] = lambda: reference.select_tokens(scores, k, v, n)
    sel["topk_gather"] = lambda: topk_gather(scores, k, v, n)
    for name, launch in select_kernel.VARIANTS.items():
        sel[f"triton:{name}"] = lambda launch=launch: select_kernel.select_tokens_forward(scores, k, v, n, k.dtype,
                                                                                          **launch)
    # The least any method moves: the scores once, the n kept rows of k and v read and written.
    nbytes = B * H * N * 4 + 4 * B * H * n * d * es
    return Case("select_tokens", "fwd", shape_label(label, B=B, H=H, N=N, d=d, n=n), dtype,
                dict(model=label, resolution=res, B=B, H=H, N=N, d=d, n=n), sel,
                flops={}, nbytes={p: nbytes for p in sel}, estimate={},
                baselines=("reference", "topk_gather", "triton"))


def _variant_fns(q, k, v, grad, mode: str) -> Dict[str, Callable]:
    """triton:<variant> providers: the launchers called directly with each TUNING_CANDIDATES entry
    (leaving out those that launch what another does: backward-only variants in the forward, the
    float32 dot precision in 16-bit)."""
    fns = {}
    for candidate in prompt_kernel.TUNING_CANDIDATES:
        fwd_kw, bwd_kw = candidate.get("forward", {}), candidate.get("backward", {})
        if mode == "fwd" and not fwd_kw and candidate:
            continue
        if q.dtype != torch.float32 and {"precision"} >= {key for kw in (fwd_kw, bwd_kw) for key in kw} and candidate:
            continue

        def run(fwd_kw=fwd_kw, bwd_kw=bwd_kw):
            out, lse = prompt_kernel.prompt_attention_forward(q, k, v, **fwd_kw)
            if mode == "fwd":
                return out
            return prompt_kernel.prompt_attention_backward(grad, q, k, v, out, lse, False, **bwd_kw)
        fns[f"triton:{prompt_kernel.variant_name(candidate)}"] = run
    return fns


def prompt_cases(label, L, B, H, P, n, d, dtype, device, gen, variants: bool) -> List[Case]:
    q = torch.randn(L, H, P, d, device=device, dtype=dtype, generator=gen)
    k = torch.randn(L, B, H, n, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(L, B, H, n, d, device=device, dtype=dtype, generator=gen)
    grad = torch.randn(L, B, P, H * d, device=device, dtype=dtype, generator=gen)
    es = torch.finfo(dtype).bits // 8
    shape = shape_label(label, L=L, B=B, H=H, P=P, n=n, d=d)
    params = dict(model=label, resolution=int(label.split("@")[1]), L=L, B=B, H=H, P=P, n=n, d=d)
    fwd_flops = 4.0 * L * B * H * P * n * d
    probs_fp32 = L * B * H * P * n * 4
    kv_fp32 = 2 * L * B * H * n * d * 4
    baselines = ("reference", "eager", "torch", "triton")

    fwd = {b: (lambda b=b: ops.prompt_attention(q, k, v, backend=b)) for b in FPT_BACKENDS}
    fwd["reference"] = lambda: reference.prompt_attention(q, k, v)
    fwd["eager"] = lambda: eager_prompt_attention(q, k, v)
    if variants:
        fwd.update(_variant_fns(q, k, v, grad, "fwd"))
    fwd_bytes = prompt_attention_bytes(L, B, H, P, n, d, es, True, "fwd")
    cases = [Case("prompt_attention", "fwd", shape, dtype, params, fwd,
                  flops={p: fwd_flops for p in fwd}, nbytes={p: fwd_bytes for p in fwd},
                  estimate={"reference": 3 * probs_fp32 + kv_fp32}, baselines=baselines)]

    qg = q.detach().clone().requires_grad_(True)

    def fwd_bwd(fn):
        return lambda: fn(qg, k, v).backward(grad)

    both = {b: fwd_bwd(lambda q_, k_, v_, b=b: ops.prompt_attention(q_, k_, v_, backend=b)) for b in FPT_BACKENDS}
    both["reference"] = fwd_bwd(reference.prompt_attention)
    both["eager"] = fwd_bwd(eager_prompt_attention)
    if variants:
        both.update(_variant_fns(q, k, v, grad, "fwd+bwd"))
    # Backward for dq only: recompute QK^T, dP = dO V^T, dQ = dS K: 3 more products.
    both_bytes = prompt_attention_bytes(L, B, H, P, n, d, es, True, "fwd+bwd")
    cases.append(Case("prompt_attention", "fwd+bwd", shape, dtype, params, both,
                      flops={p: 2.5 * fwd_flops for p in both}, nbytes={p: both_bytes for p in both},
                      estimate={"reference": 5 * probs_fp32 + kv_fp32}, grad_to_none=(qg,), baselines=baselines))
    return cases


# ------------------------------------------------------------------------------- the plan
def plan(args, device, gen) -> Iterator[Case]:
    """Cases in priority order: the issue's targets (bf16 on a GPU), then what decides a choice
    (LSE sources, prompt-attention variants, float32 prompt attention), then the other sizes.
    Inputs are made as each case starts, so a spent budget allocates nothing more."""
    gpu = torch.device(device).type == "cuda"
    sizes = SMOKE_SIZES if args.smoke else VIT_B16_SIZES
    if args.sizes:
        sizes = [s for s in sizes if str(s[2]) in args.sizes]
    H, d = (2, 32) if args.smoke else (args.heads, args.head_dim)
    prompt_shapes = SMOKE_PROMPT_SHAPES if args.smoke else PROMPT_SHAPES
    dtypes = [getattr(torch, t) for t in (args.dtypes or (["bfloat16"] if gpu else ["float32"]))]
    main_dtype = dtypes[0]
    prompt_dtypes = dtypes if args.dtypes or not gpu else [main_dtype, torch.float32]

    def batch(table, N):
        return args.batch or table.get(N, 2)

    for dtype in dtypes:
        if "token_importance" in args.ops:
            for label, N, res in sizes[:2]:
                yield token_importance_case(label, res, batch(IMPORTANCE_BATCH, N), H, N, d, dtype, device, gen)
        if "select_tokens" in args.ops:
            for label, N, res in sizes:
                yield select_case(label, res, batch(SELECT_BATCH, N), H, N, d, dtype, device, gen)
    if "prompt_attention" in args.ops:
        for dtype in prompt_dtypes:
            yield from prompt_cases(*prompt_shapes[0], dtype=dtype, device=device, gen=gen, variants=True)
    for dtype in dtypes:
        if "attention_with_importance" in args.ops:
            for label, N, res in sizes:
                yield attention_with_importance_case(label, res, batch(IMPORTANCE_BATCH, N), H, N, d, dtype,
                                                     device, gen)
        if "token_importance" in args.ops:
            for label, N, res in sizes[2:]:
                yield token_importance_case(label, res, batch(IMPORTANCE_BATCH, N), H, N, d, dtype, device, gen)
    if "prompt_attention" in args.ops:
        for shape in prompt_shapes[1:]:
            yield from prompt_cases(*shape, dtype=main_dtype, device=device, gen=gen, variants=False)


# -------------------------------------------------------------------------------- running
def provider_reason(provider: str, case: Case, device, explicit: bool = False) -> Optional[str]:
    """Why a provider cannot run here (None if it can). "triton:..." variants share the triton
    backend's limits."""
    if provider in case.reasons:
        return case.reasons[provider]
    base = provider.split(":")[0]
    if base in FPT_BACKENDS:
        reasons = ops.unsupported_reasons(base, case.op, device, case.dtype, case.params["d"])
        reason = "; ".join(reasons) or None
        if reason is None and base == "triton" and torch.device(device).type == "cpu" and not explicit:
            return "Triton under the CPU interpreter: timings would be meaningless (name it in --providers to run it anyway)"
        return reason
    return None


def add_ratios(rows: List[dict], baselines: Sequence[str]) -> None:
    """speedup_vs_<b> = b's median / the row's, for every baseline b measured; speedup_vs_reference
    and memory_vs_reference as the report's columns."""
    measured = {r["provider"]: r for r in rows if r["status"] == "ok"}
    ref = measured.get("reference")
    for x in rows:
        if x["status"] != "ok":
            continue
        for b in baselines:
            if b in measured:
                x[f"speedup_vs_{b}"] = measured[b]["median_ms"] / x["median_ms"]
        if ref is not None and ref["peak_extra_mb"] and x["peak_extra_mb"] is not None:
            x["memory_vs_reference"] = x["peak_extra_mb"] / ref["peak_extra_mb"]
        if ref is None:
            x["reference_note"] = "reference not measured at this size (see its row)"


def run_case(case: Case, device, peaks: dict, args, budget: common.Budget) -> List[dict]:
    label = common.device_label(device)
    rows = []
    total = common.total_bytes(device)
    for provider, fn in case.providers.items():
        r = common.row(case.op, provider, case.mode, case.shape, case.dtype, label, params=case.params)
        named = bool(args.providers) and (provider in args.providers or provider.split(":")[0] in args.providers)
        reason = provider_reason(provider, case, device, named)
        if reason is None and args.providers and not named:
            reason = "not in --providers"
        need = case.estimate.get(provider)
        if reason is None and need and total and need > 1.5 * total:
            reason = f"estimated {need / common.GB:.0f} GiB > device memory {total / common.GB:.0f} GiB"
        if reason is None and budget.expired():
            reason = budget.reason
        if reason is not None:
            r.update(status="skipped", reason=reason)
            rows.append(r)
            continue
        try:
            problem = case.checks[provider]() if provider in case.checks else None
            if problem is not None:
                r.update(status="error", reason=problem)
                rows.append(r)
                continue
            ms = common.time_ms(fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                                grad_to_none=case.grad_to_none)
            peak = common.peak_extra_bytes(fn, device)
        except Exception as exc:  # an op failing at one size must not end the sweep
            r.update(common.failure_fields(exc))
            rows.append(r)
            del exc
            common.clear(device)
            continue
        r.update(median_ms=ms, peak_extra_mb=None if peak is None else peak / common.MB)
        r.update(common.throughput_fields(ms, case.flops.get(provider), case.nbytes.get(provider), peaks))
        rows.append(r)
        common.clear(device)
    add_ratios(rows, case.baselines)
    return rows


def parse_args(argv):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--ops", type=common.str_list, default=list(OPS), help="comma-separated subset of " + ",".join(OPS))
    p.add_argument("--providers", type=common.str_list, default=None,
                   help="comma-separated subset (default: all); 'triton' also names its triton:* variants")
    p.add_argument("--dtypes", type=common.str_list, default=None,
                   help="bfloat16,float16,float32 (default: bfloat16 on CUDA, plus float32 for prompt "
                        "attention; float32 on CPU)")
    p.add_argument("--sizes", type=common.str_list, default=None,
                   help="subset of the sizes' resolutions, e.g. 512,1024 (default: all)")
    p.add_argument("--batch", type=int, default=None, help="B of the self-attention ops (default: per size)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None)
    args = p.parse_args(argv)
    args.warmup_ms = args.warmup_ms or (1 if args.smoke else 25)
    args.rep_ms = args.rep_ms or (5 if args.smoke else 100)
    return args


def main(argv=None) -> List[dict]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device, budget, gen, saver = common.start_run(args, "kernels", peaks=True)
    for case in plan(args, device, gen):
        if budget.expired():
            saver.add([common.row(case.op, p, case.mode, case.shape, case.dtype, common.device_label(device),
                                  params=case.params, status="skipped", reason=budget.reason)
                       for p in case.providers])
        else:
            saver.add(run_case(case, device, saver.peaks, args, budget))
        del case
        common.clear(device)
    path = saver.add([])
    rows = saver.rows
    print(summary(rows))
    print(f"wrote {len(rows)} rows to {path}")
    return rows


def summary(rows: List[dict]) -> str:
    return common.text_table(rows, [
        ("op", "<26", lambda r: r["op"]), ("mode", "<8", lambda r: r["mode"]),
        ("shape", "<44", lambda r: r["shape"][:44]), ("provider", "<22", lambda r: r["provider"][:22]),
        ("ms", ">9", lambda r: common.fmt(r["median_ms"], ".3f")),
        ("x ref", ">7", lambda r: common.fmt(r["speedup_vs_reference"])),
        ("MB", ">9", lambda r: common.fmt(r["peak_extra_mb"], ".1f"))])


if __name__ == "__main__":
    main()
