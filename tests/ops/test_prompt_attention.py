"""Tests of fpt_fast.ops.prompt_attention and its Triton kernels (kernels/prompt_attention.py).

Without a GPU the Triton kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1),
so sizes are small and odd: 1 and 17 prompts, 7 and 70 keys, head sizes 80 and 96, batches of 3.
Every case compares the output and every gradient (dq for a shared and a per-image q, dk, dv) with
fpt_fast.reference.prompt_attention differentiated by autograd in float64.
"""
import shutil

import pytest
import torch

import fpt_fast.kernels.prompt_attention as kernel
from fpt_fast import ops, reference
from helpers import eager_prompt_attention, value_and_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_REASON = "; ".join(ops.unsupported_reasons("triton", "prompt_attention", DEVICE)) or None
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend: {TRITON_REASON}")
BACKENDS = ["triton", "torch"]

# (dtype, atol, rtol) against the float64 reference. Low precision is also held to at most twice the
# error of PyTorch's own eager attention in that dtype (see _check_low_precision).
TOLERANCES = [
    (torch.float32, 2e-5, 1e-5),
    (torch.float16, 5e-3, 5e-3),
    (torch.bfloat16, 5e-2, 2e-2),
]
TOL = {dtype: (atol, rtol) for dtype, atol, rtol in TOLERANCES}

# (L, B, H, P, n, d, shared q): the odd sizes the interpreter can afford.
SHAPES = [
    (1, 1, 1, 1, 1, 16, True),
    (2, 3, 2, 5, 70, 80, True),
    (1, 3, 3, 17, 33, 96, True),
    (2, 1, 2, 16, 7, 32, True),
    (1, 3, 1, 16, 70, 128, True),
    (2, 3, 2, 5, 70, 80, False),
    (1, 3, 3, 17, 7, 16, False),
    (1, 1, 2, 16, 33, 128, False),
]


def _skip_unless_runs(backend):
    if backend == "triton" and TRITON_REASON is not None:
        pytest.skip(f"triton backend: {TRITON_REASON}")


def _inputs(L, B, H, P, n, d, shared, dtype=torch.float32, seed=0, kv_grad=True):
    g = torch.Generator().manual_seed(seed)
    q_shape = (L, H, P, d) if shared else (L, B, H, P, d)
    q = torch.randn(q_shape, generator=g)
    k = torch.randn(L, B, H, n, d, generator=g)
    v = torch.randn(L, B, H, n, d, generator=g)
    grad = torch.randn(L, B, P, H * d, generator=g)
    q = q.to(DEVICE, dtype).requires_grad_()
    k = k.to(DEVICE, dtype).requires_grad_(kv_grad)
    v = v.to(DEVICE, dtype).requires_grad_(kv_grad)
    return q, k, v, grad.to(DEVICE, dtype)


def _reference64(q, k, v, grad):
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in (q, k, v)]
    return value_and_grads(reference.prompt_attention, *leaves, grad.double())


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


NAMES = ("out", "dq", "dk", "dv")


def _assert_close_all(got, want, dtype):
    atol, rtol = TOL[dtype]
    for name, a, b in zip(NAMES, got, want):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.shape == b.shape and a.dtype == dtype, (name, a.shape, b.shape, a.dtype)
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------ correctness
def _shape_id(s):
    return "L{}B{}H{}P{}n{}d{}".format(*s[:6]) + ("shared" if s[6] else "perimg")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_fp32_output_and_gradients(backend, shape):
    _skip_unless_runs(backend)
    for seed in (0, 1):
        q, k, v, grad = _inputs(*shape, seed=seed)
        got = value_and_grads(lambda *a: ops.prompt_attention(*a, backend=backend), q, k, v, grad)
        _assert_close_all(got, _reference64(q, k, v, grad), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 2, 17, 70, 80, True), (1, 3, 2, 16, 33, 64, False)],
                         ids=["shared", "perimg"])
def test_low_precision_output_and_gradients(backend, dtype, shape):
    _skip_unless_runs(backend)
    q, k, v, grad = _inputs(*shape, dtype=dtype, seed=2)
    want = _reference64(q, k, v, grad)
    got = value_and_grads(lambda *a: ops.prompt_attention(*a, backend=backend), q, k, v, grad)
    _assert_close_all(got, want, dtype)
    # PyTorch's own error in this dtype on the same inputs: the kernels may be at most twice as far
    # from the float64 truth (plus a floor for entries where the eager run happens to be exact).
    eager = value_and_grads(eager_prompt_attention, q, k, v, grad)
    floor = TOL[dtype][0] / 5
    for name, a, e, w in zip(NAMES, got, eager, want):
        err, base = _max_err(a, w), _max_err(e, w)
        assert err <= 2 * base + floor, f"{name}: error {err:.3g} vs PyTorch {dtype} error {base:.3g}"


@needs_triton
def test_lse_is_natural_logsumexp():
    q, k, v, _ = _inputs(2, 3, 2, 17, 70, 80, True)
    out, lse = torch.ops.fpt_fast.prompt_attention(q.detach(), k.detach(), v.detach())
    logits = torch.einsum("lhpd,lbhnd->lbhpn", q.double(), k.double()) * 80 ** -0.5
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 2, 17)
    torch.testing.assert_close(lse.double(), logits.logsumexp(-1), atol=1e-5, rtol=1e-6)
    assert out.shape == (2, 3, 17, 2 * 80) and out.dtype == q.dtype


@needs_triton
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "perimg"])
def test_only_dq_when_kv_need_no_grad(shared, monkeypatch):
    calls = []
    backward = kernel.prompt_attention_backward

    def spy(*args):
        result = backward(*args)
        calls.append((args[-1], result[1], result[2]))
        return result

    monkeypatch.setattr(kernel, "prompt_attention_backward", spy)
    q, k, v, grad = _inputs(2, 3, 2, 5, 70, 32, shared, kv_grad=False)
    got = value_and_grads(lambda *a: ops.prompt_attention(*a, backend="triton"), q, k, v, grad)
    assert calls == [(False, None, None)]
    _assert_close_all(got, _reference64(q, k, v, grad), torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("P", [17, 40])
def test_prompts_split_over_blocks(dtype, P, monkeypatch):
    """More prompts than one block holds: the forward grid's second axis, several backward launches
    adding dK/dV in fp32 (forced here with 16-row blocks)."""
    monkeypatch.setattr(kernel, "MAX_BLOCK_P", 16)
    for shared in (True, False):
        q, k, v, grad = _inputs(1, 3, 2, P, 33, 32, shared, dtype=dtype, seed=3)
        got = value_and_grads(lambda *a: ops.prompt_attention(*a, backend="triton"), q, k, v, grad)
        _assert_close_all(got, _reference64(q, k, v, grad), dtype)


@needs_triton
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_shared_dq_summed_over_batch_chunks(chunk, monkeypatch):
    """The shared q's gradient summed over images in chunks of 1, 2 (3 = 2 + 1) and 3 (no partials)."""
    L, B, H = 2, 3, 2
    monkeypatch.setattr(kernel, "TARGET_PROGRAMS", L * B * H // chunk)
    assert kernel._batch_chunk(torch.empty(L, H, 5, 16), L, B, H) == chunk
    q, k, v, grad = _inputs(L, B, H, 5, 33, 48, True, seed=4)
    got = value_and_grads(lambda *a: ops.prompt_attention(*a, backend="triton"), q, k, v, grad)
    _assert_close_all(got, _reference64(q, k, v, grad), torch.float32)


# ------------------------------------------------------------------------ layout, determinism
def _strided_like(t, layout):
    """The same values in a non-contiguous tensor."""
    if layout == "permuted":  # (.., H, n, d) stored as (.., n, H, d)
        dims = list(range(t.dim()))
        dims[-3], dims[-2] = dims[-2], dims[-3]
        return t.detach().permute(dims).contiguous().permute(dims)
    if layout == "strided_d":  # every other element of a wider last dim: stride 2 along d
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t.detach()
        return wide[..., ::2]
    raise ValueError(layout)


@needs_triton
@pytest.mark.parametrize("layout", ["permuted", "strided_d"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "perimg"])
def test_non_contiguous_inputs(layout, shared):
    q, k, v, grad = _inputs(2, 3, 2, 5, 33, 32, shared, seed=5)
    fn = lambda *a: ops.prompt_attention(*a, backend="triton")
    want = value_and_grads(fn, q, k, v, grad)
    strided = [_strided_like(t, layout).requires_grad_() for t in (q, k, v)]
    assert not any(t.is_contiguous() for t in strided)
    grad_t = grad.transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous incoming gradient
    got = value_and_grads(fn, *strided, grad_t)
    for name, a, b in zip(NAMES, got, want):
        # Same arithmetic in the same order, only the addresses differ: bitwise equal.
        assert torch.equal(a, b), name


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "perimg"])
def test_deterministic(dtype, shared, monkeypatch):
    monkeypatch.setattr(kernel, "TARGET_PROGRAMS", 6)  # shared q: 2 batch chunks plus the reduction
    q, k, v, grad = _inputs(2, 3, 2, 17, 70, 32, shared, dtype=dtype, seed=6)
    fn = lambda *a: ops.prompt_attention(*a, backend="triton")
    first, second = value_and_grads(fn, q, k, v, grad), value_and_grads(fn, q, k, v, grad)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------- torch.library, compile
@needs_triton
@pytest.mark.parametrize("layout", ["contiguous", "permuted_split"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "perimg"])
def test_opcheck(shared, layout, monkeypatch):
    """Schema, fake tensors (shapes and strides of every output), autograd registration and
    AOT dispatch of both custom ops. "permuted_split": non-contiguous inputs, whose gradients must
    keep the strides the fake implementation promises, with prompts split over two blocks and the
    shared q reduced over batch chunks."""
    q, k, v, grad = _inputs(1, 2, 2, 17 if layout != "contiguous" else 5, 7, 16, shared, seed=7)
    if layout != "contiguous":
        monkeypatch.setattr(kernel, "MAX_BLOCK_P", 16)
        monkeypatch.setattr(kernel, "TARGET_PROGRAMS", 10**9)  # one image per program: C = B
        q, k, v = [_strided_like(t, "permuted").requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.fpt_fast.prompt_attention.default, (q, k, v))
    out, lse = torch.ops.fpt_fast.prompt_attention(q.detach(), k.detach(), v.detach())
    for need_kv_grad in (True, False):
        args = (grad, q.detach(), k.detach(), v.detach(), out, lse, need_kv_grad)
        torch.library.opcheck(torch.ops.fpt_fast.prompt_attention_backward.default, args)


@needs_triton
def test_torch_compile_fullgraph():
    if DEVICE == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        pytest.skip("inductor needs a C++ compiler to compile on the CPU and none is on PATH")

    def loss(q, k, v, w):
        return (ops.prompt_attention(q, k, v, backend="triton") * w).sum()

    q, k, v, grad = _inputs(1, 2, 2, 5, 7, 16, True, seed=8)
    want = value_and_grads(lambda *a: ops.prompt_attention(*a, backend="triton"), q, k, v, grad)
    torch._dynamo.reset()
    value = torch.compile(loss, fullgraph=True)(q, k, v, grad)
    grads = torch.autograd.grad(value, (q, k, v))
    torch.testing.assert_close(value, (want[0] * grad).sum())
    for name, a, b in zip(NAMES[1:], grads, want[1:]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------ bad inputs
def _bad_calls():
    f32 = dict(device=DEVICE, dtype=torch.float32)
    q4, q5 = torch.randn(2, 3, 5, 16, **f32), torch.randn(2, 4, 3, 5, 16, **f32)
    k = torch.randn(2, 4, 3, 7, 16, **f32)
    return {
        "k rank 4": (ValueError, (q4, k[0], k[0])),
        "q rank 3": (ValueError, (q4[0], k, k)),
        "q rank 6": (ValueError, (q5[None], k, k)),
        "q L mismatch": (ValueError, (q4[:1], k, k)),
        "q H mismatch": (ValueError, (q4[:, :2], k, k)),
        "q d mismatch": (ValueError, (q4[..., :8], k, k)),
        "q B mismatch": (ValueError, (q5[:, :3], k, k)),
        "v shape": (ValueError, (q4, k, k[:, :, :, :6])),
        "mixed dtypes": (TypeError, (q4, k.half(), k.half())),
        "v dtype": (TypeError, (q4, k, k.double())),
        "int tensors": (TypeError, (q4.long(), k.long(), k.long())),
        "not a tensor": (TypeError, (q4.tolist(), k, k)),
        "empty n": (ValueError, (q4, k[:, :, :, :0], k[:, :, :, :0])),
        "empty P": (ValueError, (q4[:, :, :0], k, k)),
        "empty B": (ValueError, (q4, k[:, :0], k[:, :0])),
        "empty d": (ValueError, (q4[..., :0], k[..., :0], k[..., :0])),
    }


@pytest.mark.parametrize("backend", BACKENDS + [None])
@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_inputs_raise_before_launch(case, backend, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(kernel, "prompt_attention_forward", no_launch)
    monkeypatch.setattr(kernel, "prompt_attention_backward", no_launch)
    error, args = _bad_calls()[case]
    with pytest.raises(error):
        ops.prompt_attention(*args, backend=backend)


# ----------------------------------------------------------------------- realistic, on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "perimg"])
def test_realistic_sizes_vs_torch_backend(dtype, shared):
    """FPT on ViT-B at 512 px: 12 layers, 12 heads, 16 prompts, 205 selected tokens, d = 64."""
    q, k, v, grad = _inputs(12, 32, 12, 16, 205, 64, shared, dtype=dtype, seed=9)
    got = value_and_grads(lambda *a: ops.prompt_attention(*a, backend="triton"), q, k, v, grad)
    want = value_and_grads(lambda *a: ops.prompt_attention(*a, backend="torch"), q, k, v, grad)
    truth = _reference64(q, k, v, grad)
    atol, rtol = TOL[dtype]
    for name, a, b, t in zip(NAMES, got, want, truth):
        torch.testing.assert_close(a.double(), t, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        if dtype != torch.float32:
            assert _max_err(a, t) <= 2 * _max_err(b, t) + atol / 5, name
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
