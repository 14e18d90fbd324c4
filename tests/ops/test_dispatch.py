"""The dispatcher (fpt_fast/ops/dispatch.py): declared limits become reasons, "auto" walks the
priority list, a named backend runs or raises with its reasons, probing is lazy (the native build
is never triggered for another backend), aliases map onto backends, and every backend traces under
torch.compile(fullgraph=True)."""
import dataclasses

import pytest
import torch

from fpt_fast import ops, reference
from fpt_fast.ops import dispatch, native_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def fresh_reasons():
    """Empties the reason cache before and after, so a test sees its own probes."""
    dispatch._reasons.cache_clear()
    yield
    dispatch._reasons.cache_clear()


def _qkv(B=1, H=2, N=9, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, d, generator=g).to(DEVICE) for _ in range(3)]


def test_declared_limits_are_reasons():
    assert ops.unsupported_reasons("torch", "token_importance", "cpu") == ()
    assert ops.unsupported_reasons("reference", "select_tokens", "meta") == ()
    assert ops.unsupported_reasons("triton", "token_importance", "cpu", head_dim=136) == ("head size 136 > 128",)
    assert ops.unsupported_reasons("triton", "select_tokens", "meta") == ("device type 'meta' is not supported",)
    assert ops.unsupported_reasons("torch", "prompt_attention", "cpu", torch.float64) == (
        "dtype torch.float64 is not supported",)
    with pytest.raises(ValueError, match="op='softmax' is unknown"):
        ops.unsupported_reasons("torch", "softmax", "cpu")
    with pytest.raises(ValueError, match="name a backend"):
        ops.unsupported_reasons("auto", "select_tokens", "cpu")


def test_named_backend_that_cannot_run_names_itself_and_its_reasons():
    q = torch.randn(1, 1, 3, 136, device=DEVICE)
    with pytest.raises(ValueError, match=r"token_importance: backend 'triton' cannot run .*head size 136 > 128"):
        ops.token_importance(q, q, backend="triton")


def test_nothing_fits_lists_every_backend():
    with pytest.raises(ValueError) as error:
        dispatch.resolve("select_tokens", "auto", "cpu", torch.float64, 64)
    text = str(error.value)
    for name in dispatch.PRIORITY["cpu"]:
        assert f"{name}: " in text
    assert "no backend can run cpu torch.float64 with head size 64" in text


def test_auto_walks_the_priority_list():
    assert dispatch.PRIORITY["cpu"] == ("native", "torch")
    want = next(b for b in dispatch.PRIORITY["cpu"] if not ops.unsupported_reasons(b, "select_tokens", "cpu"))
    assert dispatch.resolve("select_tokens", "auto", "cpu", torch.float32, 64) == want
    assert dispatch.resolve("select_tokens", "auto", "meta", torch.float32, 64) == "torch"
    # On CUDA, head sizes above Triton's limit go to the next backend that runs the op.
    assert dispatch.resolve("prompt_attention", "auto", "cuda", torch.float32, 136) == "torch"


def test_process_wide_choice():
    q, k, v = _qkv()
    assert ops.get_backend() == "auto"
    with ops.use_backend("reference"):
        assert ops.get_backend() == "reference"
        k_sel, _ = ops.select_tokens(torch.arange(9.0, device=DEVICE).expand(1, 2, 9), k, v, 3)
        # Only the reference keeps descending-score order.
        assert torch.equal(k_sel[0, 0], k[0, 0, [8, 7, 6]])
    assert ops.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown"):
        ops.set_backend("cuda")


def test_aliases_and_the_unimplemented_name():
    assert ops.ALIASES == {"sdpa": "torch", "math": "reference"}
    assert ops.canonical_backend("sdpa") == "torch" and ops.canonical_backend("math") == "reference"
    q, k, v = _qkv()
    out, scores = ops.attention_with_importance(q, k, v, backend="math")
    want_out, want_scores = reference.attention_with_importance(q, k, v)
    assert torch.equal(out, want_out) and torch.equal(scores, want_scores)
    with pytest.raises(ValueError, match="'xformers' is not implemented in this version"):
        ops.select_tokens(scores, k, v, 2, backend="xformers")
    with pytest.raises(TypeError, match="backend must be a str"):
        ops.canonical_backend(None)


def test_undeclared_importance_is_an_error_or_the_next_backend(monkeypatch, fresh_reasons):
    """A backend declaring only "global": named with "class_token" it raises, "auto" passes it by."""
    only_global = dataclasses.replace(dispatch.DECLARATIONS["native"], importance=("global",))
    monkeypatch.setitem(dispatch.DECLARATIONS, "native", only_global)
    with pytest.raises(ValueError, match="backend 'native' cannot run .*importance 'class_token' is not implemented"):
        dispatch.resolve("token_importance", "native", "cpu", torch.float32, 64, "class_token")
    assert dispatch.resolve("token_importance", "auto", "cpu", torch.float32, 64, "class_token") == "torch"


def test_naming_another_backend_never_builds_native(monkeypatch, fresh_reasons):
    """The native loader raises if called: naming triton/torch/reference, "auto" stopping at triton
    (CUDA), and the reasons of the other backends never reach it; naming native does."""
    def no_build():
        raise AssertionError("the native extension's loader was called")

    monkeypatch.setattr(native_backend, "load", no_build)
    q, k, v = _qkv()
    triton = () if ops.unsupported_reasons("triton", "token_importance", DEVICE) else ("triton",)
    for name in ("torch", "reference") + triton:
        ops.attention_with_importance(q, k, v, "class_token", backend=name)
        ops.token_importance(q, k, backend=name)
    for op in ops.OPS:
        assert dispatch.resolve(op, "auto", "cuda", torch.float16, 64, None) == "triton"
        for name in ("triton", "torch", "reference"):
            ops.unsupported_reasons(name, op, "cpu")
    # The probe is lazy, not absent: naming native asks the loader (and declared limits come first).
    assert ops.unsupported_reasons("native", "prompt_attention", "cuda") == (
        "prompt_attention has no cuda kernel (there: select_tokens)",)
    with pytest.raises(AssertionError, match="loader was called"):
        ops.select_tokens(q[:, :, :, 0], k, v, 2, backend="native")


def test_backend_table():
    table = ops.backend_table("cpu")
    assert list(table) == list(ops.BACKENDS)
    for name in ("torch", "reference"):
        assert all(reasons == () for reasons in table[name].values())
    choices = ops.auto_choices("cpu")
    assert set(choices) == set(ops.OPS)
    for op, choice in choices.items():
        assert table[choice][op] == ()


@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_every_backend_traces_under_torch_compile(backend):
    """All four ops, and prompt attention's backward, in one fullgraph trace (aot_eager: tracing and
    autograd, no code generation), equal to the eager result. Native included: its ops have fakes
    and a registered autograd formula."""
    reasons = ops.unsupported_reasons(backend, "prompt_attention", DEVICE)  # may build native
    if reasons:
        pytest.skip("; ".join(reasons))
    def run(q, k, v, pq):
        out, scores = ops.attention_with_importance(q, k, v, backend=backend)
        cls = ops.token_importance(q, k, "class_token", backend=backend)
        k_sel, v_sel = ops.select_tokens(scores + cls, k, v, 5, backend=backend)
        return out.sum() + ops.prompt_attention(pq, k_sel[None], v_sel[None], backend=backend).sum()

    q, k, v = _qkv(2, 3, 17, 16, seed=3)
    pq = torch.randn(1, 3, 4, 16, device=DEVICE, requires_grad=True)
    want = run(q, k, v, pq)
    (want_grad,) = torch.autograd.grad(want, pq)
    torch._dynamo.reset()
    got = torch.compile(run, fullgraph=True, backend="aot_eager")(q, k, v, pq)
    (got_grad,) = torch.autograd.grad(got, pq)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
