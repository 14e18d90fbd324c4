"""The GPU check suite of the fused ops (benchmarks/run_all runs it with `-m "cuda or gpu_suite"`).

Every kernel and backend as fpt_fast.ops runs them: token importance ("global" and "class_token",
with and without a given LSE), attention_with_importance (the own flash forward and every PyTorch
forward it can take its LSE from), select_tokens (Triton and its launch variants, the native CPU/CUDA
select, "torch"), prompt attention forward and backward (shared and per-image q, with and without K/V
gradients, the launch variants the benchmark compares against the defaults), in float32, float16 and
bfloat16.

Shapes: the odd ones of the ops' own CPU tests, then ViT-B/16 (H = 12) and ViT-L/16 (H = 16) heads,
d = 64, at 512, 1024 and 2048 px (N = 1025, 4097, 16385). The same test bodies run on the CPU, under
Triton's interpreter, for the first odd shapes of each list (CPU_TWINS) and the first backend named;
the other odd shapes, backends and the realistic sizes carry the `cuda` marker. Truth is float64
(query rows in blocks: never N x N).
Accuracy follows the project's convention: low-precision results may be at most twice as far from
the float64 truth as PyTorch's own computation in the same dtype, plus one rounding step.
"""
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

import fpt_fast.ops.triton_backend as triton_backend
from fpt_fast import ops, reference
from fpt_fast.kernels import prompt_attention as prompt_kernel
from fpt_fast.kernels import select_tokens as select_kernel
from fpt_fast.kernels import token_importance as importance_kernel
from helpers import eager_prompt_attention, value_and_grads

pytestmark = pytest.mark.gpu_suite

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"  # tests/conftest.py runs Triton under its interpreter without a GPU
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IMPORTANCE = ["global", "class_token"]
# Odd shapes that run on the CPU too; the rest of each odd list runs on a GPU only.
CPU_TWINS = 2
# ViT heads at 512, 1024 and 2048 px (patch 16 + class token).
VIT_HEADS = {"ViT-B/16": 12, "ViT-L/16": 16}
VIT_TOKENS = {512: 1025, 1024: 4097, 2048: 16385}


def _cases(odd, realistic, twins=CPU_TWINS):
    """pytest params: the first ``twins`` odd cases everywhere, the rest with the cuda marker."""
    params = [pytest.param(c, id=_id(c)) for c in odd[:twins]]
    params += [pytest.param(c, id=_id(c), marks=pytest.mark.cuda) for c in odd[twins:]]
    params += [pytest.param(c, id=label, marks=pytest.mark.cuda) for label, c in realistic]
    return params


def _backends(*names):
    """pytest params of backends: the first runs on the CPU too (the others' CPU paths have their
    own tests), the rest with the cuda marker."""
    return [pytest.param(names[0])] + [pytest.param(name, marks=pytest.mark.cuda) for name in names[1:]]


def _id(case):
    return "x".join(str(x) for x in case)


def _seed(*parts) -> int:
    # Fresh inputs per case, the same in every run and xdist worker (str hashes are salted).
    return zlib.crc32(repr(parts).encode())


def _skip_unless_runs(backend, op, dtype, d, importance=None):
    reasons = ops.unsupported_reasons(backend, op, DEVICE, dtype, d, importance)
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")


def _randn(shape, dtype, seed, scale=1.0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=DEVICE) * scale).to(dtype)


def _error(got, truth) -> float:
    assert torch.isfinite(got).all(), "non-finite values"
    return (got.double() - truth).abs().max().item()


# Floors of the accuracy check, relative to the largest true value: a few float32 roundings, one
# rounding of a 16-bit result; importance scores are float32 sums over up to 16385 query rows, so
# they get the error of such a sum (the torch backend's cascaded sums are the yardstick there).
FLOOR = {torch.float32: 16 * torch.finfo(torch.float32).eps, torch.float16: torch.finfo(torch.float16).eps,
         torch.bfloat16: torch.finfo(torch.bfloat16).eps, "scores": 1e-5}


def assert_accurate(name, got, truth, yardstick, kind):
    """got at most twice as far from the float64 truth as PyTorch's own result (yardstick: the same
    computation in the same dtype), plus FLOOR[kind] times the largest true value."""
    floor = FLOOR[kind] * truth.abs().max().item()
    err, base = _error(got, truth), _error(yardstick, truth)
    assert err <= 2 * base + floor, f"{name}: error {err:.3g} vs PyTorch's {base:.3g} (floor {floor:.3g})"


# ------------------------------------------------------------------- token importance, attention
ATTENTION_ODD = [(2, 3, 7, 80), (1, 3, 70, 64), (1, 2, 1, 16), (2, 1, 33, 96), (1, 2, 65, 128), (3, 2, 64, 32)]
ATTENTION_REALISTIC = [(f"{model}@{px}", (2 if N < 10000 else 1, H, N, 64))
                       for model, H in VIT_HEADS.items() for px, N in VIT_TOKENS.items()]
ATTENTION_CASES = _cases(ATTENTION_ODD, ATTENTION_REALISTIC)


def _qkv(shape, dtype, seed):
    """q, k, v as the strided views of one (B, N, 3, H, d) tensor, as a ViT block splits its qkv;
    logits of a few units, so softmax rows are neither flat nor one-hot."""
    B, H, N, d = shape
    qkv = _randn((B, N, 3, H, d), dtype, seed, scale=1.5)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def attention64(q, k, v=None, rows=512):
    """float64 out (or None), row LSE, "global" and "class_token" scores, query rows in blocks."""
    B, H, N, d = q.shape
    q64, kt = q.double(), k.double().transpose(-1, -2)
    v64 = None if v is None else v.double()
    out = None if v is None else q64.new_empty(B, H, N, d)
    lse, column_sums = q64.new_empty(B, H, N), q64.new_zeros(B, H, N)
    class_row = None
    for start in range(0, N, rows):
        logits = q64[:, :, start:start + rows] @ kt * d ** -0.5
        row_lse = logits.logsumexp(dim=-1)
        probs = (logits - row_lse[..., None]).exp()
        lse[:, :, start:start + rows] = row_lse
        column_sums += probs.sum(dim=2)
        if class_row is None:
            class_row = probs[:, :, 0].clone()
        if v is not None:
            out[:, :, start:start + rows] = probs @ v64
        del logits, probs
    return out, lse, column_sums / N, class_row


def _torch_scores(q, k, importance):
    """The "torch" backend's scores: float32 math on the same inputs, the yardstick of scores."""
    return ops.token_importance(q, k, importance, backend="torch")


@pytest.mark.parametrize("backend", _backends("triton", "torch", "native"))
@pytest.mark.parametrize("importance", IMPORTANCE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTENTION_CASES)
def test_attention_with_importance(shape, dtype, importance, backend):
    _skip_unless_runs(backend, "attention_with_importance", dtype, shape[-1], importance)
    q, k, v = _qkv(shape, dtype, seed=_seed(shape, str(dtype), importance))
    out, scores = ops.attention_with_importance(q, k, v, importance, backend=backend)
    out64, _, global64, class64 = attention64(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    assert scores.shape == q.shape[:3] and scores.dtype == torch.float32
    assert_accurate("out", out, out64, F.scaled_dot_product_attention(q, k, v), dtype)
    truth = global64 if importance == "global" else class64
    assert_accurate("scores", scores, truth, _torch_scores(q, k, importance), "scores")


@pytest.mark.parametrize("backend", _backends("triton", "torch", "native"))
@pytest.mark.parametrize("with_lse", [False, True], ids=["own_lse", "given_lse"])
@pytest.mark.parametrize("importance", IMPORTANCE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTENTION_CASES)
def test_token_importance(shape, dtype, importance, with_lse, backend):
    _skip_unless_runs(backend, "token_importance", dtype, shape[-1], importance)
    q, k, _ = _qkv(shape, dtype, seed=_seed(shape, str(dtype), importance, with_lse))
    _, lse64, global64, class64 = attention64(q, k)
    lse = lse64.float() if with_lse else None
    scores = ops.token_importance(q, k, importance, lse, backend=backend)
    truth = global64 if importance == "global" else class64
    yardstick = ops.token_importance(q, k, importance, lse, backend="torch")
    assert_accurate("scores", scores, truth, yardstick, "scores")
    # Each softmax row sums to 1, and so does their mean.
    torch.testing.assert_close(scores.sum(-1).double(), torch.ones_like(truth[..., 0]), atol=1e-4, rtol=0)


LSE_CASES = _cases([(2, 3, 7, 80), (1, 3, 70, 64), (2, 1, 33, 96)],
                   [(f"{model}@{px}", (1, H, VIT_TOKENS[px], 64)) for model, H in VIT_HEADS.items()
                    for px in (1024, 2048)])


@pytest.mark.parametrize("source", [s for s in importance_kernel.LSE_SOURCES if s != "own"])
@pytest.mark.parametrize("importance", IMPORTANCE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LSE_CASES)
def test_attention_with_importance_lse_sources(shape, dtype, importance, source, monkeypatch):
    """The triton backend taking its output and row LSE from PyTorch's fused forwards (the option
    benchmarks/kernels.py measures against the own forward): same accuracy, and the op's output
    keeps the layout its fake implementation promises."""
    _skip_unless_runs("triton", "attention_with_importance", dtype, shape[-1], importance)
    q, k, v = _qkv(shape, dtype, seed=_seed(shape, str(dtype), source))
    reason = importance_kernel.lse_source_reason(source, q)
    if reason is not None:
        pytest.skip(f"{source}: {reason}")
    out_src, lse_src = importance_kernel.attention_forward_from(source, q, k, v)
    out64, lse64, global64, class64 = attention64(q, k, v)
    assert lse_src.shape == q.shape[:3] and lse_src.dtype == torch.float32
    # Natural-log units, the right rows, and as exact as the own forward's (the scores inherit it).
    _, own_lse = importance_kernel.attention_forward(q, k, v)
    assert_accurate("lse", lse_src, lse64, own_lse, torch.float32)
    monkeypatch.setattr(triton_backend, "ATTENTION_LSE_SOURCE", source)
    out, scores = ops.attention_with_importance(q, k, v, importance, backend="triton")
    assert out.stride() == torch.empty_like(q).stride()
    assert_accurate("out", out, out64, F.scaled_dot_product_attention(q, k, v), dtype)
    truth = global64 if importance == "global" else class64
    assert_accurate("scores", scores, truth, _torch_scores(q, k, importance), "scores")


def test_lse_source_reasons_and_unknown_names():
    q = torch.randn(1, 2, 9, 20, device=DEVICE)
    assert importance_kernel.lse_source_reason("own", q) is None
    with pytest.raises(ValueError, match="unknown"):
        importance_kernel.lse_source_reason("xformers", q)
    with pytest.raises(ValueError, match="cannot run"):
        importance_kernel.attention_forward_from("flash", q.transpose(-1, -2).contiguous().transpose(-1, -2),
                                                 q, q)


# -------------------------------------------------------------------------------- select_tokens
# (B, H, N, n): the CPU tests' odd (N, n), then n = floor(0.2 N) at ViT sizes, few rows at 2048 px.
SELECT_ODD = [(2, 2, 33, 6), (1, 2, 257, 51), (2, 2, 1, 1), (2, 2, 5, 4), (1, 2, 1100, 220), (1, 3, 257, 256)]
SELECT_REALISTIC = [(f"{model}@{px}", (8 if N < 10000 else 2, H, N, math.floor(0.2 * N)))
                    for model, H in VIT_HEADS.items() for px, N in VIT_TOKENS.items()]
SELECT_CASES = _cases(SELECT_ODD, SELECT_REALISTIC)


def _check_select(case, dtype, ties, select):
    """The reference's kept set (ties to the lower index), in ascending token order, rows copied
    bit for bit, or rounded once to bfloat16; select(scores, k, v, n, out_dtype) -> (k_sel, v_sel)."""
    B, H, N, n = case
    d = 64
    seed = _seed(case, str(dtype), ties)
    scores = _randn((B, H, N), torch.float32, seed)
    if ties:
        scores = scores.mul(2).round()
    k, v = (_randn((B, H, N, d), dtype, seed + i) for i in (1, 2))
    if INTERPRETED:
        # Triton's interpreter truncates to bfloat16 where GPUs (and torch) round: values on a
        # grid every dtype holds exactly.
        k, v = ((t.float() * 32).round().clamp(-128, 127).div(32).to(dtype) for t in (k, v))
    # The reference twin on the token indices (exact in float32) gives its kept set.
    index = torch.arange(N, device=DEVICE, dtype=torch.float32).expand(B, H, N)[..., None]
    kept = reference.select_tokens(scores, index, index, n)[0][..., 0].long().sort(dim=-1).values
    rows = kept[..., None].expand(-1, -1, -1, d)
    for out_dtype in (None, torch.bfloat16):
        k_sel, v_sel = select(scores, k, v, n, out_dtype)[:2]
        want = out_dtype or dtype
        assert k_sel.shape == v_sel.shape == (B, H, n, d) and k_sel.dtype == v_sel.dtype == want
        assert torch.equal(k_sel, k.gather(2, rows).to(want)) and torch.equal(v_sel, v.gather(2, rows).to(want))


@pytest.mark.parametrize("backend", _backends("triton", "native", "torch"))
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SELECT_CASES)
def test_select_tokens(case, dtype, ties, backend):
    _skip_unless_runs(backend, "select_tokens", dtype, 64)
    _check_select(case, dtype, ties, lambda *args: ops.select_tokens(*args, backend=backend))


@pytest.mark.parametrize("variant", list(select_kernel.VARIANTS))
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("case", _cases(SELECT_ODD[:1], SELECT_REALISTIC, twins=1))
def test_select_tokens_launch_variants(case, ties, variant):
    """Every launch variant benchmarks/kernels.py times against the default (each path, the gather's
    warps and tile) selects the same rows, so that a GPU run may make any of them the default."""
    _skip_unless_runs("triton", "select_tokens", torch.bfloat16, 64)
    launch = select_kernel.VARIANTS[variant]
    def select(scores, k, v, n, out_dtype):
        return select_kernel.select_tokens_forward(scores, k, v, n, out_dtype or k.dtype, **launch)

    _check_select(case, torch.bfloat16, ties, select)


# ------------------------------------------------------------------------------ prompt attention
# (L, B, H, P, n, d, shared q): the CPU tests' odd shapes, then the fusion of FPT on ViT-B/16 (12
# layers) and ViT-L/16 (24 layers), 16 prompts, n = floor(0.2 N) selected tokens.
PROMPT_ODD = [(1, 3, 3, 17, 7, 16, False), (2, 1, 2, 16, 33, 32, True), (1, 1, 1, 1, 1, 16, True),
              (2, 3, 2, 5, 70, 80, True), (1, 3, 3, 17, 33, 96, True), (1, 3, 1, 16, 70, 128, True),
              (2, 3, 2, 5, 70, 80, False), (1, 1, 2, 16, 33, 128, False)]
PROMPT_REALISTIC = [(f"{model}@{px}-{'shared' if shared else 'perimg'}",
                     (12 if H == 12 else 24, 8 if N < 10000 else 2, H, 16, math.floor(0.2 * N), 64, shared))
                    for model, H in VIT_HEADS.items() for px, N in VIT_TOKENS.items() for shared in (True, False)]
PROMPT_CASES = _cases(PROMPT_ODD, PROMPT_REALISTIC)


def _prompt_inputs(case, dtype, kv_grad, seed):
    L, B, H, P, n, d, shared = case
    q = _randn((L, H, P, d) if shared else (L, B, H, P, d), dtype, seed).requires_grad_()
    k = _randn((L, B, H, n, d), dtype, seed + 1).requires_grad_(kv_grad)
    v = _randn((L, B, H, n, d), dtype, seed + 2).requires_grad_(kv_grad)
    grad = _randn((L, B, P, H * d), dtype, seed + 3)
    return q, k, v, grad


def _prompt_truth_and_yardstick(q, k, v, grad):
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in (q, k, v)]
    truth = value_and_grads(reference.prompt_attention, *leaves, grad.double())
    yardstick = value_and_grads(eager_prompt_attention, q, k, v, grad)
    return truth, yardstick


def _assert_prompt_results(got, truth, yardstick, dtype, q, k):
    for name, a, t, y, like in zip(("out", "dq", "dk", "dv"), got, truth, yardstick, (None, q, k, k)):
        assert (a is None) == (t is None), name
        if a is None:
            continue
        if like is not None:
            assert a.shape == like.shape and a.dtype == dtype, name
        assert_accurate(name, a, t, y, dtype)


@pytest.mark.parametrize("backend", _backends("triton", "torch", "native"))
@pytest.mark.parametrize("kv_grad", [False, True], ids=["dq_only", "dq_dk_dv"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PROMPT_CASES)
def test_prompt_attention(case, dtype, kv_grad, backend):
    """Output and every gradient; dq_only is what FPT trains (its selected K/V are constants)."""
    _skip_unless_runs(backend, "prompt_attention", dtype, case[5])
    q, k, v, grad = _prompt_inputs(case, dtype, kv_grad, seed=_seed(case, str(dtype), kv_grad))
    got = value_and_grads(lambda *a: ops.prompt_attention(*a, backend=backend), q, k, v, grad)
    truth, yardstick = _prompt_truth_and_yardstick(q, k, v, grad)
    _assert_prompt_results(got, truth, yardstick, dtype, q, k)


PROMPT_VARIANT_CASES = _cases([(1, 3, 2, 5, 33, 32, True), (2, 3, 2, 5, 70, 80, True), (1, 3, 3, 17, 33, 32, False)],
                              [("ViT-B/16@512-shared", (12, 8, 12, 16, 205, 64, True)),
                               ("ViT-L/16@1024-shared", (24, 4, 16, 16, 819, 64, True))], twins=1)


@pytest.mark.parametrize("variant", range(len(prompt_kernel.TUNING_CANDIDATES)),
                         ids=[prompt_kernel.variant_name(v) for v in prompt_kernel.TUNING_CANDIDATES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PROMPT_VARIANT_CASES)
def test_prompt_attention_launch_variants(case, dtype, variant):
    """Every launch variant benchmarks/kernels.py times against the default computes the same
    function, so that a GPU run may make any of them the default."""
    _skip_unless_runs("triton", "prompt_attention", dtype, case[5])
    if INTERPRETED and dtype != torch.float32:
        pytest.skip("under the interpreter the variants run in float32 (test_prompt_attention covers 16-bit)")
    candidate = prompt_kernel.TUNING_CANDIDATES[variant]
    q, k, v, grad = _prompt_inputs(case, dtype, True, seed=_seed(case, str(dtype), variant))
    q_, k_, v_ = (t.detach() for t in (q, k, v))
    out, lse = prompt_kernel.prompt_attention_forward(q_, k_, v_, **candidate.get("forward", {}))
    got = [out, *prompt_kernel.prompt_attention_backward(grad, q_, k_, v_, out, lse, True,
                                                         **candidate.get("backward", {}))]
    truth, yardstick = _prompt_truth_and_yardstick(q, k, v, grad)
    _assert_prompt_results(got, truth, yardstick, dtype, q, k)
