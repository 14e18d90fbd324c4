"""Tests of kernels/token_importance.py through the public ops (fpt_fast.ops.token_importance and
fpt_fast.ops.attention_with_importance), against the eager twins in fpt_fast.reference.

Without a GPU the Triton kernels run under Triton's interpreter (tests/conftest.py), so the CPU
shapes stay small; the launchers pick small blocks there, so N in {33, 64, 65, 70} still crosses
several blocks, full and tail. With a GPU every test here runs compiled kernels, plus the
`cuda`-marked tests at ViT sizes.
"""
import math
import zlib

import pytest
import torch

from fpt_fast import ops, reference
from fpt_fast.kernels import token_importance as kernel

BACKENDS = ["triton", "torch"]
IMPORTANCE = ["global", "class_token"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, H, N, d): N = 1, odd N, N a multiple of every interpreter block (64), head sizes that are
# not powers of two (80, 96) and the largest one (128). B * H <= 6 keeps the interpreter fast.
SHAPES = [(1, 2, 1, 16), (2, 3, 7, 80), (2, 1, 33, 96), (1, 2, 65, 128), (3, 2, 64, 32), (1, 3, 70, 64)]
# Importance scores are float32 sums of float32 probabilities whatever the input dtype: tight.
SCORE_TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (2e-6, 1e-4), torch.bfloat16: (2e-6, 1e-4)}
# Attention outputs are rounded to the input dtype; low precision is also judged against PyTorch's
# own low-precision error below.
OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def _inputs(shape, dtype, device, seed, count=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(count)]


def _seed(*parts) -> int:
    # A different seed for every parametrisation, the same in every run (str hashes are salted).
    return zlib.crc32(repr(parts).encode())


def _fp32_lse(q, k):
    return torch.logsumexp(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)


def _lowp_attention(q, k, v):
    """PyTorch's own attention, computed entirely in q's dtype: the error yardstick."""
    return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v


def _check_out(out, ref, q, k, v):
    assert out.shape == q.shape and out.dtype == q.dtype
    atol, rtol = OUT_TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    if q.dtype != torch.float32:
        # Within 2x PyTorch's own low-precision error, plus one rounding step of the output.
        err = (out.float() - ref.float()).abs().max().item()
        torch_err = (_lowp_attention(q, k, v).float() - ref.float()).abs().max().item()
        floor = torch.finfo(q.dtype).eps * ref.float().abs().max().item()
        assert err <= 2 * torch_err + floor, (err, torch_err, floor)


def _check_scores(scores, ref, dtype):
    assert scores.dtype == torch.float32 and scores.shape == ref.shape
    atol, rtol = SCORE_TOL[dtype]
    torch.testing.assert_close(scores, ref, atol=atol, rtol=rtol)


# ------------------------------------------------------------------------ matches reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("importance", IMPORTANCE)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_with_importance(backend, importance, shape, dtype, device):
    q, k, v = _inputs(shape, dtype, device, _seed("awi", shape, dtype, importance))
    out, scores = ops.attention_with_importance(q, k, v, importance, backend=backend)
    ref_out, ref_scores = reference.attention_with_importance(q, k, v, importance)
    _check_out(out, ref_out, q, k, v)
    _check_scores(scores, ref_scores, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_lse", [False, True], ids=["no_lse", "lse"])
@pytest.mark.parametrize("importance", IMPORTANCE)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_importance(backend, with_lse, importance, shape, dtype, device):
    q, k = _inputs(shape, dtype, device, _seed("ti", shape, dtype, importance, with_lse), count=2)
    lse = _fp32_lse(q, k) if with_lse else None
    scores = ops.token_importance(q, k, importance, lse, backend=backend)
    _check_scores(scores, reference.token_importance(q, k, importance, lse), dtype)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_seeds_and_scales(seed, device):
    """Fresh inputs per seed with a spread of logit scales (peaked and flat softmax rows)."""
    q, k, v = _inputs((2, 2, 45, 48), torch.float32, device, 1000 + seed)
    q = q * (0.25, 1.0, 3.0, 6.0)[seed]
    out, scores = ops.attention_with_importance(q, k, v, backend="triton")
    ref_out, ref_scores = reference.attention_with_importance(q, k, v)
    _check_out(out, ref_out, q, k, v)
    _check_scores(scores, ref_scores, q.dtype)


def test_lse_is_used(device):
    """A given LSE is taken as is, not recomputed: shifting it by log 2 halves every score."""
    q, k = _inputs((1, 2, 37, 32), torch.float32, device, 7, count=2)
    lse = _fp32_lse(q, k)
    full = ops.token_importance(q, k, lse=lse, backend="triton")
    half = ops.token_importance(q, k, lse=lse + math.log(2.0), backend="triton")
    torch.testing.assert_close(half, full / 2, atol=1e-7, rtol=1e-5)
    # A non-contiguous LSE is read through its strides.
    lse_t = torch.empty(*lse.shape[:2], 2 * lse.shape[2], device=device)[..., ::2].copy_(lse)
    assert not lse_t.is_contiguous()
    torch.testing.assert_close(ops.token_importance(q, k, lse=lse_t, backend="triton"), full,
                               atol=0, rtol=0)


# --------------------------------------------------------------------- class-token kernel
CLASS_TOKEN_SHAPES = [(B, H, N, d) for N in (1, 7, 33, 65) for d in (16, 80) for B, H in [(2, 3)]]


@pytest.mark.parametrize("shape", CLASS_TOKEN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_class_token_kernel(shape, dtype, device):
    """Fresh inputs per case: the kernel computing LSE_0 itself, and taking the forward's LSE."""
    q, k = _inputs(shape, dtype, device, _seed("class_token", shape, dtype), count=2)
    q = q * 2.0  # peaked rows
    want = reference.token_importance(q, k, "class_token")
    _check_scores(kernel.class_token_importance_forward(q, k, None), want, dtype)
    _, lse = kernel.attention_forward(q, k, None)
    _check_scores(kernel.class_token_importance_forward(q, k, lse), want, dtype)


@pytest.mark.parametrize("N", [16, 48, 50])
@pytest.mark.parametrize("block_n", [16, 32, 64])
def test_class_token_kernel_block_sizes(N, block_n, device):
    """One key block and many, N a multiple of the block or not, with and without a given LSE."""
    q, k = _inputs((1, 2, N, 40), torch.float32, device, _seed("class_token_blocks", N, block_n), count=2)
    want = reference.token_importance(q, k, "class_token")
    lse = _fp32_lse(q, k)
    for given in (None, lse):
        _check_scores(kernel.class_token_importance_forward(q, k, given, block_n=block_n), want, q.dtype)


def test_class_token_reads_lse_of_row_zero_only(device):
    """Given an LSE, only LSE_0 is used: shifting it by log 2 halves every score; other rows are ignored."""
    q, k = _inputs((2, 2, 29, 32), torch.float32, device, 4, count=2)
    lse = _fp32_lse(q, k)
    full = ops.token_importance(q, k, "class_token", lse, backend="triton")
    shifted = lse.clone()
    shifted[:, :, 0] += math.log(2.0)
    shifted[:, :, 1:] = float("nan")
    half = ops.token_importance(q, k, "class_token", shifted, backend="triton")
    torch.testing.assert_close(half, full / 2, atol=1e-7, rtol=1e-5)


def test_named_triton_runs_the_class_token_kernel(device, monkeypatch):
    """backend="triton" with "class_token" runs the Triton kernel, never a PyTorch stand-in."""
    calls = []
    original = kernel.class_token_importance_forward

    def counted(*args, **kwargs):
        calls.append(args[2] is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel, "class_token_importance_forward", counted)
    monkeypatch.setattr(torch, "einsum", lambda *a, **k: pytest.fail("torch.einsum ran for the triton backend"))
    q, k, v = _inputs((1, 2, 21, 16), torch.float32, device, 6)
    ops.attention_with_importance(q, k, v, "class_token", backend="triton")
    ops.token_importance(q, k, "class_token", backend="triton")
    assert calls == [True, False]  # the forward's LSE, then the kernel's own LSE_0


# ---------------------------------------------------------------------------- block coverage
@pytest.mark.parametrize("N", [16, 48, 50])
@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16), (64, 64)])
def test_launcher_block_sizes(N, blocks, device):
    """Launchers with explicit blocks: even and uneven N on either side, one block and many."""
    q, k, v = _inputs((1, 2, N, 40), torch.float16, device, N)
    ref_out, ref_scores = reference.attention_with_importance(q, k, v)
    out, lse = kernel.attention_forward(q, k, v, block_m=blocks[0], block_n=blocks[1])
    _, lse_only = kernel.attention_forward(q, k, None, block_m=blocks[0], block_n=blocks[1])
    scores = kernel.token_importance_forward(q, k, lse, block_m=blocks[1], block_n=blocks[0])
    _check_out(out, ref_out, q, k, v)
    torch.testing.assert_close(lse, _fp32_lse(q, k), atol=1e-5, rtol=1e-5)
    assert torch.equal(lse, lse_only)
    _check_scores(scores, ref_scores, q.dtype)


# ------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vit_qkv_views(dtype, device):
    """q, k, v as views of one (B, N, 3, H, d) tensor, exactly how a ViT block splits its qkv."""
    B, N, H, d = 2, 29, 3, 32
    (qkv,) = _inputs((B, N, 3, H, d), dtype, device, 11, count=1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out, scores = ops.attention_with_importance(q, k, v, backend="triton")
    ref_out, ref_scores = reference.attention_with_importance(q, k, v)
    _check_out(out, ref_out, q, k, v)
    _check_scores(scores, ref_scores, dtype)
    torch.testing.assert_close(ops.token_importance(q, k, backend="triton"), ref_scores,
                               atol=SCORE_TOL[dtype][0], rtol=SCORE_TOL[dtype][1])
    # The views must give what contiguous copies give, bit for bit.
    out_c, scores_c = ops.attention_with_importance(q.contiguous(), k.contiguous(), v.contiguous(),
                                                    backend="triton")
    assert torch.equal(out, out_c) and torch.equal(scores, scores_c)


def test_strided_head_dim(device):
    """Head-dim stride != 1 (k stored (B, H, d, N) and transposed) and a sliced, gapped q."""
    B, H, N, d = 1, 2, 21, 80
    q_big, k_t, v = _inputs((B, H, N, 2 * d), torch.float32, device, 5)
    q = q_big[..., ::2]
    k = k_t[..., :d].transpose(-1, -2).contiguous().transpose(-1, -2)
    v = v[..., d:]
    assert k.stride(-1) != 1 and q.stride(-1) == 2
    out, scores = ops.attention_with_importance(q, k, v, backend="triton")
    ref_out, ref_scores = reference.attention_with_importance(q, k, v)
    _check_out(out, ref_out, q, k, v)
    _check_scores(scores, ref_scores, q.dtype)


# ---------------------------------------------------------------------------- properties
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic(dtype, device):
    """No atomics and a fixed loop order: two runs are bitwise equal."""
    q, k, v = _inputs((1, 3, 67, 64), dtype, device, 3)
    out1, s1 = ops.attention_with_importance(q, k, v, backend="triton")
    out2, s2 = ops.attention_with_importance(q, k, v, backend="triton")
    assert torch.equal(out1, out2) and torch.equal(s1, s2)
    t1 = ops.token_importance(q, k, backend="triton")
    t2 = ops.token_importance(q, k, backend="triton")
    assert torch.equal(t1, t2) and torch.equal(t1, s1)


@pytest.mark.parametrize("importance", IMPORTANCE)
@pytest.mark.parametrize("N", [1, 7, 66])
def test_scores_sum_to_one(importance, N, device):
    """Each softmax row sums to 1, so the mean of the rows does too: sum_j s_j = 1 per (b, h)."""
    q, k, v = _inputs((2, 3, N, 16), torch.float16, device, N)
    _, scores = ops.attention_with_importance(q, k, v, importance, backend="triton")
    torch.testing.assert_close(scores.sum(-1), torch.ones(2, 3, device=device), atol=1e-5, rtol=0)
    assert (scores >= 0).all()


def test_large_logits_stay_finite(device):
    """Logits of several hundred (a far key direction): the online softmax must not overflow."""
    q, k, v = _inputs((1, 2, 40, 32), torch.float32, device, 9)
    q = q * 40.0
    out, scores = ops.attention_with_importance(q, k, v, backend="triton")
    assert torch.isfinite(out).all() and torch.isfinite(scores).all()
    ref_out, ref_scores = reference.attention_with_importance(q, k, v)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-4)


def test_end_to_end_import():
    """The package imports and the Triton op runs without any explicit kernel import."""
    import fpt_fast

    q, k, v = _inputs((1, 2, 9, 16), torch.float32, "cuda" if torch.cuda.is_available() else "cpu", 1)
    out, scores = fpt_fast.ops.attention_with_importance(q, k, v, backend="triton")
    assert out.shape == q.shape and scores.shape == q.shape[:3]


# ------------------------------------------------------------------------------ bad inputs
def _bad_cases(device):
    x = torch.randn(1, 2, 5, 16, device=device)
    lse = torch.zeros(1, 2, 5, device=device)
    ti, awi = ops.token_importance, ops.attention_with_importance
    return [
        ("rank3_q", ValueError, lambda: ti(x[0], x[0], backend="triton")),
        ("rank5_v", ValueError, lambda: awi(x, x, x[None], backend="triton")),
        ("shape_mismatch_k", ValueError, lambda: ti(x, x[:, :, :4], backend="triton")),
        ("shape_mismatch_v", ValueError, lambda: awi(x, x, x[..., :8], backend="triton")),
        ("mixed_dtypes", TypeError, lambda: ti(x, x.half(), backend="triton")),
        ("mixed_dtypes_v", TypeError, lambda: awi(x, x, x.bfloat16(), backend="triton")),
        ("int_tensor", TypeError, lambda: ti(x.int(), x.int(), backend="triton")),
        ("float64", TypeError, lambda: awi(x.double(), x.double(), x.double(), backend="triton")),
        ("not_a_tensor", TypeError, lambda: ti(x.tolist(), x, backend="triton")),
        ("empty_batch", ValueError, lambda: awi(x[:0], x[:0], x[:0], backend="triton")),
        ("empty_tokens", ValueError, lambda: ti(x[:, :, :0], x[:, :, :0], backend="triton")),
        ("bad_importance", ValueError, lambda: ti(x, x, "mean", backend="triton")),
        ("bad_importance_awi", ValueError, lambda: awi(x, x, x, "cls", backend="triton")),
        ("lse_shape", ValueError, lambda: ti(x, x, lse=lse[:, :, :4], backend="triton")),
        ("lse_rank", ValueError, lambda: ti(x, x, lse=lse[..., None], backend="triton")),
        ("lse_dtype", ValueError, lambda: ti(x, x, lse=lse.half(), backend="triton")),
        ("lse_not_tensor", TypeError, lambda: ti(x, x, lse=lse.tolist(), backend="triton")),
        ("head_dim_too_big", ValueError,
         lambda: ti(torch.randn(1, 1, 3, 136, device=device), torch.randn(1, 1, 3, 136, device=device),
                    backend="triton")),
        ("bad_backend", ValueError, lambda: ti(x, x, backend="cuda")),
    ]


@pytest.mark.parametrize("case", range(19))
def test_bad_inputs_raise_before_launch(case, device, monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched for an invalid call")

    monkeypatch.setattr(kernel, "attention_forward", launched)
    monkeypatch.setattr(kernel, "token_importance_forward", launched)
    monkeypatch.setattr(kernel, "class_token_importance_forward", launched)
    cases = _bad_cases(device)
    assert len(cases) == 19
    name, error, call = cases[case]
    with pytest.raises(error):
        call()


# ------------------------------------------------------------------------- GPU, ViT sizes
@pytest.mark.cuda
@pytest.mark.parametrize("B", [2, 4])
@pytest.mark.parametrize("N", [1025, 4097])
def test_cuda_vit_sizes(B, N):
    """ViT-B heads at 512 and 1024 px (patch 16, class token), bf16: triton against torch."""
    (qkv,) = _inputs((B, N, 3, 12, 64), torch.bfloat16, "cuda", N + B, count=1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out, scores = ops.attention_with_importance(q, k, v, backend="triton")
    ref_out, ref_scores = ops.attention_with_importance(q, k, v, backend="torch")
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(scores, ref_scores, atol=1e-7, rtol=1e-3)
    torch.testing.assert_close(scores.sum(-1), torch.ones(B, 12, device="cuda"), atol=1e-4, rtol=0)
    again = ops.token_importance(q, k, backend="triton")
    assert torch.equal(again, scores)
    out2, scores2 = ops.attention_with_importance(q, k, v, backend="triton")
    assert torch.equal(out2, out) and torch.equal(scores2, scores)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_vit_sizes_vs_reference(dtype):
    """ViT-B heads at 512 px against the materialising reference; float32 takes the tf32x3 path."""
    B, N, H, d = 2, 1025, 12, 64
    (qkv,) = _inputs((B, N, 3, H, d), dtype, "cuda", 17, count=1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out, scores = ops.attention_with_importance(q, k, v, backend="triton")
    ref_out, ref_scores = reference.attention_with_importance(q, k, v)
    atol, rtol = OUT_TOL[dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(scores, ref_scores, atol=1e-8, rtol=1e-4)
    torch.testing.assert_close(ops.token_importance(q, k, backend="triton"), ref_scores, atol=1e-8, rtol=1e-4)
