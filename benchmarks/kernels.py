"""`python -m benchmarks.kernels`: every fpt_fast op against its reference twin and the obvious
torch alternative, over sizes named after the model and resolution they come from.

Ops and providers (fpt_fast backends run through fpt_fast.ops with backend=...):
    token_importance            triton, native, torch | reference
    attention_with_importance   triton, native, torch | reference, eager (bf16 N x N), sdpa (attention
                                only, no importance: a lower bound)
    select_tokens               triton, native, torch | reference (stable sort), topk_gather
    prompt_attention fwd, fwd+bwd (grad into the prompts only: K_sel / V_sel are constants)
                                triton, native, torch | reference, eager
Each row: median ms (triton.testing.do_bench on CUDA), speedup vs the reference in the same run,
peak extra memory (max_memory_allocated minus the inputs), achieved TFLOP/s and GB/s against the
device's measured peaks. Sizes whose provider cannot fit are recorded as skipped/oom, not crashes.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fpt_fast import ops, reference
from fpt_fast.model.config import num_selected_tokens

from . import common

FPT_BACKENDS = ("triton", "native", "torch")
# (label, N) for ViT-B/16: N = 1 class token + (resolution / 16)^2 patches.
VIT_B16_SIZES = [("ViT-B/16@384", 577), ("ViT-B/16@512", 1025), ("ViT-B/16@768", 2305),
                 ("ViT-B/16@1024", 4097), ("ViT-B/16@2048", 16385)]
SMOKE_SIZES = [("tiny@64", 17), ("tiny@128", 65)]
OPS = ("token_importance", "attention_with_importance", "select_tokens", "prompt_attention")


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


# ----------------------------------------------------------------------------------- cases
class Case:
    """One (op, mode, shape, dtype) point: inputs, the callables per provider, work counts."""

    def __init__(self, op: str, mode: str, shape: str, dtype: torch.dtype, params: dict,
                 providers: Dict[str, Callable], flops: Dict[str, float], nbytes: Dict[str, float],
                 estimate: Dict[str, float], grad_to_none=()):
        self.op, self.mode, self.shape, self.dtype, self.params = op, mode, shape, dtype, params
        self.providers, self.flops, self.nbytes, self.estimate = providers, flops, nbytes, estimate
        self.grad_to_none = grad_to_none


def _qkv(B, H, N, d, dtype, device, gen):
    # One (B, N, 3, H, d) buffer split like a ViT's qkv projection: q, k, v are strided views.
    qkv = torch.randn(B, N, 3, H, d, device=device, dtype=dtype, generator=gen)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def attention_cases(label: str, B: int, H: int, N: int, d: int, dtype, device, gen) -> List[Case]:
    q, k, v = _qkv(B, H, N, d, dtype, device, gen)
    es = torch.finfo(dtype).bits // 8
    shape = f"{label} B={B} H={H} N={N} d={d}"
    params = dict(model=label, B=B, H=H, N=N, d=d)
    nn_fp32 = B * H * N * N * 4  # one N x N fp32 tensor: the reference's unit of memory
    cases = []

    ti = {b: (lambda b=b: ops.token_importance(q, k, "global", backend=b)) for b in FPT_BACKENDS}
    ti["reference"] = lambda: reference.token_importance(q, k, "global")
    ti_flops = attention_flops(B, H, N, d, 2)  # an LSE pass and a column-sum pass over QK^T
    ti_bytes = 2 * B * H * N * d * es + B * H * N * 4
    cases.append(Case("token_importance", "fwd", shape, dtype, params, ti,
                      flops={p: ti_flops for p in ti}, nbytes={p: ti_bytes for p in ti},
                      estimate={"reference": 3 * nn_fp32}))

    awi = {b: (lambda b=b: ops.attention_with_importance(q, k, v, "global", backend=b)) for b in FPT_BACKENDS}
    awi["reference"] = lambda: reference.attention_with_importance(q, k, v, "global")
    awi["eager"] = lambda: eager_attention_importance(q, k, v)
    awi["sdpa"] = lambda: sdpa_attention(q, k, v)
    awi_bytes = 4 * B * H * N * d * es + B * H * N * 4
    flops = {p: attention_flops(B, H, N, d, 3) for p in awi}
    flops["sdpa"] = attention_flops(B, H, N, d, 2)  # sdpa computes attention only
    nbytes = {p: awi_bytes for p in awi}
    nbytes["sdpa"] = 4 * B * H * N * d * es
    cases.append(Case("attention_with_importance", "fwd", shape, dtype, params, awi, flops=flops,
                      nbytes=nbytes, estimate={"reference": 3 * nn_fp32, "eager": 3 * nn_fp32 * es / 4 + nn_fp32}))

    n = num_selected_tokens(N, 0.2)
    scores = torch.rand(B, H, N, device=device, dtype=torch.float32, generator=gen)
    sel = {b: (lambda b=b: ops.select_tokens(scores, k, v, n, backend=b)) for b in FPT_BACKENDS}
    sel["reference"] = lambda: reference.select_tokens(scores, k, v, n)
    sel["topk_gather"] = lambda: topk_gather(scores, k, v, n)
    # The least any method moves: the scores once, the n kept rows of k and v read and written.
    sel_bytes = B * H * N * 4 + 4 * B * H * n * d * es
    cases.append(Case("select_tokens", "fwd", f"{shape} n={n}", dtype, dict(params, n=n), sel,
                      flops={}, nbytes={p: sel_bytes for p in sel}, estimate={}))
    return cases


def prompt_cases(label: str, L: int, B: int, H: int, P: int, n: int, d: int, dtype, device, gen) -> List[Case]:
    q = torch.randn(L, H, P, d, device=device, dtype=dtype, generator=gen)
    k = torch.randn(L, B, H, n, d, device=device, dtype=dtype, generator=gen)
    v = torch.randn(L, B, H, n, d, device=device, dtype=dtype, generator=gen)
    es = torch.finfo(dtype).bits // 8
    shape = f"{label} L={L} B={B} H={H} P={P} n={n} d={d}"
    params = dict(model=label, L=L, B=B, H=H, P=P, n=n, d=d)
    kv_bytes = 2 * L * B * H * n * d * es
    io_bytes = L * H * P * d * es + L * B * P * H * d * es
    fwd_flops = 4.0 * L * B * H * P * n * d
    probs_fp32 = L * B * H * P * n * 4

    fwd = {b: (lambda b=b: ops.prompt_attention(q, k, v, backend=b)) for b in FPT_BACKENDS}
    fwd["reference"] = lambda: reference.prompt_attention(q, k, v)
    fwd["eager"] = lambda: eager_prompt_attention(q, k, v)
    cases = [Case("prompt_attention", "fwd", shape, dtype, params, fwd,
                  flops={p: fwd_flops for p in fwd}, nbytes={p: kv_bytes + io_bytes for p in fwd},
                  estimate={"reference": 3 * probs_fp32 + kv_bytes * 4 // es})]

    qg = q.detach().clone().requires_grad_(True)
    grad = torch.randn(L, B, P, H * d, device=device, dtype=dtype, generator=gen)

    def fwd_bwd(fn):
        return lambda: fn(qg, k, v).backward(grad)

    both = {b: fwd_bwd(lambda q_, k_, v_, b=b: ops.prompt_attention(q_, k_, v_, backend=b)) for b in FPT_BACKENDS}
    both["reference"] = fwd_bwd(reference.prompt_attention)
    both["eager"] = fwd_bwd(eager_prompt_attention)
    # Backward for dq only: recompute QK^T, dP = dO V^T, dQ = dS K: 3 more products; k, v read again.
    cases.append(Case("prompt_attention", "fwd+bwd", shape, dtype, params, both,
                      flops={p: 2.5 * fwd_flops for p in both},
                      nbytes={p: 2 * kv_bytes + 2 * io_bytes for p in both},
                      estimate={"reference": 5 * probs_fp32 + kv_bytes * 4 // es}, grad_to_none=(qg,)))
    return cases


# -------------------------------------------------------------------------------- running
def provider_reason(provider: str, case: Case, device, explicit: bool = False) -> Optional[str]:
    """Why a provider cannot run here (None if it can)."""
    if provider in FPT_BACKENDS:
        reasons = ops.unsupported_reasons(provider, case.op, device, case.dtype, case.params["d"])
        reason = "; ".join(reasons) or None
        if reason is None and provider == "triton" and torch.device(device).type == "cpu" and not explicit:
            return "Triton under the CPU interpreter: timings would be meaningless (name it in --providers to run it anyway)"
        return reason
    return None


def run_case(case: Case, device, peaks: dict, args, budget: common.Budget) -> List[dict]:
    label = common.device_label(device)
    rows = []
    total = common.total_bytes(device)
    for provider, fn in case.providers.items():
        r = common.row(case.op, provider, case.mode, case.shape, case.dtype, label, params=case.params)
        reason = provider_reason(provider, case, device, bool(args.providers) and provider in args.providers)
        if reason is None and args.providers and provider not in args.providers:
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
    ref = common.ok_row(rows, "reference")
    for x in rows:
        if ref is not None and x["status"] == "ok":
            x["speedup_vs_reference"] = ref["median_ms"] / x["median_ms"]
            if ref["peak_extra_mb"] and x["peak_extra_mb"] is not None:
                x["memory_vs_reference"] = x["peak_extra_mb"] / ref["peak_extra_mb"]
        elif ref is None:
            x["reference_note"] = "reference not measured at this size (see its row)"
    return rows


def parse_args(argv):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--ops", type=common.str_list, default=list(OPS), help="comma-separated subset of " + ",".join(OPS))
    p.add_argument("--providers", type=common.str_list, default=None, help="comma-separated subset (default: all)")
    p.add_argument("--dtypes", type=common.str_list, default=None,
                   help="bfloat16,float16,float32 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--sizes", type=common.str_list, default=None,
                   help="subset of size labels' resolutions, e.g. 512,1024 (default: all)")
    p.add_argument("--batch", type=int, default=None, help="B of the self-attention ops (default 8)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None)
    return p.parse_args(argv)


def main(argv=None) -> List[dict]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device, budget, gen, saver = common.start_run(args, "kernels", peaks=True)
    if args.smoke:
        sizes, B, H, d = SMOKE_SIZES, args.batch or 2, 2, 32
        prompt = ("tiny@64", 2, 4, 2, 4, 13, 32)
        args.warmup_ms = args.warmup_ms or 1
        args.rep_ms = args.rep_ms or 5
    else:
        sizes, B, H, d = VIT_B16_SIZES, args.batch or 8, args.heads, args.head_dim
        # ViT-B/16 at 512 px: N = 1025, n = 205; the fusion's L x B x H cross-attentions of a step.
        prompt = ("ViT-B/16@512", 12, 64, 12, 16, 205, 64)
        args.warmup_ms = args.warmup_ms or 25
        args.rep_ms = args.rep_ms or 100
    if args.sizes:
        sizes = [s for s in sizes if s[0].split("@")[1] in args.sizes]
    dtypes = args.dtypes or (["bfloat16"] if torch.device(device).type == "cuda" else ["float32"])
    for dtype_text in dtypes:
        dtype = getattr(torch, dtype_text)
        if "prompt_attention" in args.ops:
            for case in prompt_cases(*prompt, dtype=dtype, device=device, gen=gen):
                saver.add(run_case(case, device, saver.peaks, args, budget))
        for label, N in sizes:
            for case in attention_cases(label, B, H, N, d, dtype, device, gen):
                if case.op in args.ops:
                    saver.add(run_case(case, device, saver.peaks, args, budget))
            common.clear(device)
    path = saver.add([])
    rows = saver.rows
    print(summary(rows))
    print(f"wrote {len(rows)} rows to {path}")
    return rows


def summary(rows: List[dict]) -> str:
    return common.text_table(rows, [
        ("op", "<26", lambda r: r["op"]), ("mode", "<8", lambda r: r["mode"]),
        ("shape", "<44", lambda r: r["shape"][:44]), ("provider", "<12", lambda r: r["provider"]),
        ("ms", ">9", lambda r: common.fmt(r["median_ms"], ".3f")),
        ("x ref", ">7", lambda r: common.fmt(r["speedup_vs_reference"])),
        ("MB", ">9", lambda r: common.fmt(r["peak_extra_mb"], ".1f"))])


if __name__ == "__main__":
    main()
