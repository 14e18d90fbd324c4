"""The native extension (csrc/, fpt_fast/ops/native_backend.py): every op against its fpt_fast.reference twin.

CPU tests build the extension just in time on first use (about 20 s on two cores with a fresh
cache) and skip with the loader's reason where it cannot be built. Selected sets are compared as
sets: the reference keeps descending-score order, the native kernels ascending token index; k
carries each token's index in its first column (exact in float32) so that sets compare exactly.
Also here: bitwise determinism across thread counts, that the build runs at::parallel_for on more
than one thread (OpenMP), every CPU instruction-set path (in
subprocesses), the C++ argument checks, the build cache's key, the no-compiler fallback (a
subprocess with a missing compiler and a fresh cache), a compile-only nvcc test of the CUDA source,
and on a GPU the CUDA select against the CPU one.
"""
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fpt_fast import ops, reference
from fpt_fast.ops import native_backend as native
from fpt_fast.ops import native_build

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (dtype, atol, rtol) for outputs stored in that dtype: one rounding of an fp32 result.
OUT_TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}
SIZES_N = [1, 7, 33, 257]
HEAD_DIMS = [16, 32, 80, 96, 128]


@pytest.fixture(scope="module")
def lib():
    start = time.perf_counter()
    reason = native.unavailable_reason()
    if reason is not None:
        pytest.skip(f"native extension unavailable: {reason}")
    print(f"native extension ready in {time.perf_counter() - start:.1f} s ({native.extension_status()})")
    return torch.ops.fpt_fast_native


def _qkv(B, H, N, d, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, H, N, d, generator=g) * scale).to(dtype) for _ in range(3)]


# ------------------------------------------------------------------------ importance / attention
@pytest.mark.parametrize("N", SIZES_N)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_token_importance_fp32(lib, N, d):
    q, k, _ = _qkv(2, 3, N, d, torch.float32, seed=N * 1000 + d, scale=2.0)
    got = native.token_importance(q, k)
    want = reference.token_importance(q, k, "global")
    assert got.dtype == torch.float32 and got.shape == (2, 3, N)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d", [(33, 80), (257, 64), (100, 128)])
def test_token_importance_dtypes_and_lse(lib, dtype, N, d):
    q, k, _ = _qkv(1, 2, N, d, dtype, seed=7)
    lse = torch.logsumexp(torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) * d ** -0.5, dim=-1)
    for importance in ("global", "class_token"):
        want = reference.token_importance(q, k, importance)
        torch.testing.assert_close(native.token_importance(q, k, importance), want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(native.token_importance(q, k, importance, lse),
                                   reference.token_importance(q, k, importance, lse), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("importance", ["global", "class_token"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d", [(1, 16), (7, 32), (33, 80), (257, 96), (130, 128)])
def test_attention_with_importance(lib, importance, dtype, N, d):
    q, k, v = _qkv(2, 2, N, d, dtype, seed=N + d)
    out, scores = native.attention_with_importance(q, k, v, importance)
    out_ref, scores_ref = reference.attention_with_importance(q, k, v, importance)
    assert out.dtype == dtype and out.shape == q.shape
    atol, rtol = OUT_TOL[dtype]
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(scores, scores_ref, atol=1e-6, rtol=1e-5)


def test_strided_inputs(lib):
    """Views of a fused qkv tensor (B, N, 3, H, d) -> (B, H, N, d): read through strides, no copy needed."""
    B, N, H, d = 2, 45, 3, 32
    qkv = torch.randn(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    assert not q.is_contiguous()
    out, scores = native.attention_with_importance(q, k, v)
    out_ref, scores_ref = reference.attention_with_importance(q, k, v)
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(scores, scores_ref, atol=1e-6, rtol=1e-5)
    # A non-unit last stride is copied first, with the same result.
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    torch.testing.assert_close(native.token_importance(qt[..., ::1], k), scores_ref, atol=1e-6, rtol=1e-5)
    kk = torch.randn(B, H, N, 2 * d)[..., ::2]
    torch.testing.assert_close(native.token_importance(q, kk), reference.token_importance(q, kk), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------ select
def _index_rows(B, H, N, d, dtype=torch.float32):
    """k whose column 0 holds the token index (exact), v = -k: gathered rows identify their token."""
    k = torch.randn(B, H, N, d)
    k[..., 0] = torch.arange(N, dtype=torch.float32)
    return k.to(dtype), (-k).to(dtype)


def _reference_sets(scores, n):
    return torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[..., :n].sort(dim=-1).values


def _check_select(scores, k, v, n, out_dtype=None):
    k_sel, v_sel = native.select_tokens(scores, k, v, n, out_dtype)
    index = k_sel[..., 0].float().long()
    # Ascending token index, and the same set as the reference (ties to the lower index).
    assert torch.equal(index, _reference_sets(scores, n))
    k_ref, v_ref = reference.select_tokens(scores, k, v, n, out_dtype)
    order = k_ref[..., 0].float().argsort(dim=-1)[..., None].expand_as(k_ref)
    assert torch.equal(k_sel, k_ref.gather(2, order))  # bitwise: the same rows, the same casts
    assert torch.equal(v_sel, v_ref.gather(2, order))
    return k_sel, v_sel


@pytest.mark.parametrize("N", SIZES_N + [1100])
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_select_random(lib, N, d):
    torch.manual_seed(N + d)
    k, v = _index_rows(2, 3, N, d)
    scores = torch.rand(2, 3, N)
    for n in sorted({1, max(1, N // 5), max(1, N - 1), N}):
        _check_select(scores, k, v, n)


@pytest.mark.parametrize("N", [7, 33, 257, 1100])
def test_select_heavy_ties(lib, N):
    torch.manual_seed(N)
    k, v = _index_rows(2, 2, N, 16)
    few_values = torch.randint(0, 3, (2, 2, N)).float()
    all_equal = torch.full((2, 2, N), 0.25)
    signed_zeros = torch.where(torch.rand(2, 2, N) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1.0, float("nan")])
    special = specials[torch.randint(0, len(specials), (2, 2, N))]
    for scores in (few_values, all_equal, signed_zeros, special):
        for n in sorted({1, max(1, N // 3), N}):
            _check_select(scores, k, v, n)


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES + [None])
@pytest.mark.parametrize("score_dtype", DTYPES)
def test_select_dtypes(lib, in_dtype, out_dtype, score_dtype):
    torch.manual_seed(3)
    N = 129  # indices up to 128: exact in every dtype
    k, v = _index_rows(2, 2, N, 80, in_dtype)
    scores = torch.randint(0, 20, (2, 2, N)).to(score_dtype)
    k_sel, v_sel = _check_select(scores, k, v, 26, out_dtype)
    assert k_sel.dtype == (out_dtype or in_dtype) and v_sel.dtype == k_sel.dtype


def test_select_strided(lib):
    B, N, H, d = 2, 65, 3, 32
    qkv = torch.randn(B, N, 3, H, d)
    qkv[..., 0] = torch.arange(N, dtype=torch.float32)[None, :, None, None]
    view = qkv.permute(2, 0, 3, 1, 4)
    scores = torch.rand(B, H, 2 * N)[..., ::2]  # strided scores too
    _check_select(scores, view[1], view[2], 13)


# ------------------------------------------------------------------------------- prompt attention
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P,n,d", [(1, 1, 16), (5, 7, 32), (16, 33, 80), (3, 257, 96), (17, 20, 128)])
def test_prompt_attention(lib, shared, dtype, P, n, d):
    L, B, H = 2, 3, 2
    g = torch.Generator().manual_seed(P * 31 + n + d)
    q = torch.randn(*((L, H, P, d) if shared else (L, B, H, P, d)), generator=g).to(dtype).requires_grad_()
    k = torch.randn(L, B, H, n, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(L, B, H, n, d, generator=g).to(dtype).requires_grad_()
    out = native.prompt_attention(q, k, v)
    ref = reference.prompt_attention(q, k, v)
    assert out.shape == (L, B, P, H * d) and out.dtype == dtype
    atol, rtol = OUT_TOL[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    got = torch.autograd.grad(out, (q, k, v), grad)
    # Gradients against an fp32 reference of the same inputs: low precision only rounds the result.
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(reference.prompt_attention(q32, k32, v32), (q32, k32, v32), grad.float())
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype, name
        scale = b.abs().max().item() + 1e-6
        torch.testing.assert_close(a.float(), b, atol=atol * max(1.0, scale), rtol=rtol, msg=f"d{name}")


def test_prompt_attention_grad_q_only(lib):
    """k, v constants (the FPT case): the backward skips dk, dv and dq is unchanged."""
    L, B, H, P, n, d = 2, 4, 3, 16, 41, 64
    q = torch.randn(L, H, P, d, requires_grad=True)
    k, v = torch.randn(L, B, H, n, d), torch.randn(L, B, H, n, d)
    (dq,) = torch.autograd.grad(native.prompt_attention(q, k, v).square().sum(), (q,))
    q2 = q.detach().clone().requires_grad_()
    (dq_ref,) = torch.autograd.grad(reference.prompt_attention(q2, k, v).square().sum(), (q2,))
    torch.testing.assert_close(dq, dq_ref, atol=1e-5, rtol=1e-4)
    lse = torch.zeros(L, B, H, P)
    dq2, dk, dv = lib.prompt_attention_backward(torch.ones(L, B, P, H * d), q, k, v, lse, False)
    assert dk.numel() == 0 and dv.numel() == 0 and dq2.shape == q.shape


# ------------------------------------------------------------------------------------ determinism
def test_bitwise_deterministic_across_thread_counts(lib):
    B, H, N, d = 1, 3, 700, 64  # several query-row groups per head
    q, k, v = _qkv(B, H, N, d, torch.float32, seed=11)
    L, P, n = 2, 16, 57
    pq = torch.randn(L, H, P, d, requires_grad=True)
    pk, pv = torch.randn(L, 4, H, n, d, requires_grad=True), torch.randn(L, 4, H, n, d, requires_grad=True)

    def run():
        imp = native.token_importance(q, k)
        out, scores = native.attention_with_importance(q, k, v)
        ks, vs = native.select_tokens(scores, k, v, 140)
        o = native.prompt_attention(pq, pk, pv)
        grads = torch.autograd.grad(o, (pq, pk, pv), torch.ones_like(o))
        return [imp, out, scores, ks, vs, o.detach(), *grads]

    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_instruction_set_paths(lib, isa, tmp_path):
    """The narrower vector paths (picked at load time) give the reference's results too."""
    if not sys.platform.startswith("linux") or os.uname().machine not in ("x86_64", "AMD64"):
        pytest.skip("the ISA switch exists on x86-64 only")
    script = textwrap.dedent("""
        import torch
        from fpt_fast import reference
        from fpt_fast.ops import native_backend as native
        assert native.unavailable_reason() is None, native.unavailable_reason()
        print(native.extension_status()["cpu_isa"])
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 3, 77, 80) for _ in range(3))
        out, s = native.attention_with_importance(q, k, v)
        out_r, s_r = reference.attention_with_importance(q, k, v)
        torch.testing.assert_close(out, out_r, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(s, s_r, atol=1e-6, rtol=1e-5)
        pq = torch.randn(2, 3, 5, 80, requires_grad=True)
        pk, pv = torch.randn(2, 2, 3, 19, 80), torch.randn(2, 2, 3, 19, 80)
        o = native.prompt_attention(pq, pk, pv)
        torch.testing.assert_close(o, reference.prompt_attention(pq, pk, pv), atol=2e-5, rtol=1e-5)
        print("ok")
    """)
    env = dict(os.environ, FPT_FAST_NATIVE_ISA=isa)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    if native.extension_status()["cpu_isa"] != "baseline":  # a CPU without AVX2 runs baseline whatever is asked
        assert result.stdout.split()[0] == isa


# ------------------------------------------------------------------------------------ bad inputs
def test_cpp_checks_raise(lib):
    """Direct torch.ops calls: the C++ TORCH_CHECKs raise RuntimeError before any memory is touched."""
    q = torch.randn(2, 3, 9, 16)
    cases = [
        (lambda: lib.token_importance(q[0], q[0], None, False), "4-D"),
        (lambda: lib.token_importance(q, q[:, :2], None, False), "shape of q"),
        (lambda: lib.token_importance(q, q.half(), None, False), "same dtype"),
        (lambda: lib.token_importance(q.double(), q.double(), None, False), "float32, float16 or bfloat16"),
        (lambda: lib.token_importance(q.int(), q.int(), None, False), "float32, float16 or bfloat16"),
        (lambda: lib.token_importance(q, q, torch.zeros(2, 3, 8), False), "lse"),
        (lambda: lib.token_importance(q, q, torch.zeros(2, 3, 9).half(), False), "lse must be float32"),
        (lambda: lib.token_importance(q[:, :, :0], q[:, :, :0], None, False), "empty"),
        (lambda: lib.attention_with_importance(q, q, q[..., :8], False), "v"),
        (lambda: lib.select_tokens(torch.rand(2, 3, 9), q, q, 0, None), "out of range"),
        (lambda: lib.select_tokens(torch.rand(2, 3, 9), q, q, 10, None), "out of range"),
        (lambda: lib.select_tokens(torch.rand(2, 3, 9), q, q, -5, None), "out of range"),
        (lambda: lib.select_tokens(torch.rand(2, 3, 8), q, q, 2, None), "scores"),
        (lambda: lib.select_tokens(torch.rand(2, 3, 9), q, q.half(), 2, None), "same dtype"),
        (lambda: lib.select_tokens(torch.rand(2, 3, 9), q, q, 2, torch.int32), "out_dtype"),
        (lambda: lib.select_tokens(torch.rand(2, 3, 9).long(), q, q, 2, None), "scores"),
        (lambda: lib.prompt_attention(torch.randn(2, 3, 4, 16), torch.randn(2, 1, 3, 5, 8),
                                      torch.randn(2, 1, 3, 5, 8)), "to match k"),
        (lambda: lib.prompt_attention(torch.randn(2, 3, 4, 16), torch.randn(2, 1, 3, 5, 16),
                                      torch.randn(2, 1, 3, 6, 16)), "shape of k"),
        (lambda: lib.prompt_attention(torch.randn(2, 2, 3, 4, 16), torch.randn(2, 1, 3, 5, 16),
                                      torch.randn(2, 1, 3, 5, 16)), "to match k"),
        (lambda: lib.prompt_attention(torch.randn(3, 4, 16), torch.randn(2, 1, 3, 5, 16),
                                      torch.randn(2, 1, 3, 5, 16)), "(L, H, P, d) or"),
        (lambda: lib.prompt_attention_backward(torch.randn(2, 1, 4, 47), torch.randn(2, 3, 4, 16),
                                               torch.randn(2, 1, 3, 5, 16), torch.randn(2, 1, 3, 5, 16),
                                               torch.zeros(2, 1, 3, 4), True), "grad_out"),
        (lambda: lib.prompt_attention_backward(torch.randn(2, 1, 4, 48), torch.randn(2, 3, 4, 16),
                                               torch.randn(2, 1, 3, 5, 16), torch.randn(2, 1, 3, 5, 16),
                                               torch.zeros(2, 1, 3, 5), True), "lse"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()


def test_front_door_validation_and_dispatch(lib):
    q, k, v = _qkv(2, 3, 40, 32, torch.float32, seed=5)
    with pytest.raises(ValueError, match="n=0"):
        ops.select_tokens(torch.rand(2, 3, 40), k, v, 0, backend="native")
    with pytest.raises(TypeError, match="float32"):
        ops.token_importance(q.double(), k.double(), backend="native")
    with pytest.raises(ValueError, match="shape of q"):
        ops.attention_with_importance(q, k[:, :1], v, backend="native")
    # Every op through the front door, against the torch backend.
    for importance in ("global", "class_token"):
        torch.testing.assert_close(ops.token_importance(q, k, importance, backend="native"),
                                   ops.token_importance(q, k, importance, backend="torch"), atol=1e-6, rtol=1e-5)
        for a, b in zip(ops.attention_with_importance(q, k, v, importance, backend="native"),
                        ops.attention_with_importance(q, k, v, importance, backend="torch")):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    scores = torch.randint(0, 4, (2, 3, 40)).float()
    for a, b in zip(ops.select_tokens(scores, k, v, 9, torch.bfloat16, backend="native"),
                    ops.select_tokens(scores, k, v, 9, torch.bfloat16, backend="torch")):
        assert torch.equal(a, b)  # both ascending token index, same tie rule
    pq = torch.randn(2, 3, 4, 32)
    pk, pv = torch.randn(2, 5, 3, 11, 32), torch.randn(2, 5, 3, 11, 32)
    torch.testing.assert_close(ops.prompt_attention(pq, pk, pv, backend="native"),
                               ops.prompt_attention(pq, pk, pv, backend="torch"), atol=2e-5, rtol=1e-5)
    assert ops.unsupported_reasons("native", "token_importance", "cpu", torch.float64)
    assert ops.unsupported_reasons("native", "token_importance", "meta")
    assert ops.unsupported_reasons("native", "prompt_attention", "cuda") == (
        "prompt_attention has no cuda kernel (there: select_tokens)",)


def test_torch_compile_fake(lib):
    """The registered fakes give shapes without running the kernels (what torch.compile traces)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 10, 16)
        ks, vs = lib.select_tokens(torch.empty(2, 3, 10), q, q, 4, torch.float16)
        assert ks.shape == (2, 3, 4, 16) and ks.dtype == torch.float16
        out, lse = lib.prompt_attention(torch.empty(2, 3, 5, 16), torch.empty(2, 4, 3, 7, 16), torch.empty(2, 4, 3, 7, 16))
        assert out.shape == (2, 4, 5, 48) and lse.shape == (2, 4, 3, 5)


def test_parallel_for_runs_on_several_threads(lib):
    """The build runs at::parallel_for on every thread torch has (-fopenmp at compile and link time);
    without OpenMP the loop runs on one. The chunks of parallel_for are fixed by the thread count,
    so a busy machine does not change the answer."""
    threads = torch.get_num_threads()
    if (os.cpu_count() or 1) < 2 or threads < 2:
        pytest.skip(f"one core or one torch thread here ({os.cpu_count()} cores, {threads} threads)")
    assert lib.parallel_for_threads(threads) == threads
    assert lib.parallel_for_threads(1) == 1
    # One OpenMP runtime with torch's: torch.set_num_threads bounds the extension's loops too.
    try:
        torch.set_num_threads(1)
        assert lib.parallel_for_threads(threads) == 1
    finally:
        torch.set_num_threads(threads)


def test_build_cache_key(tmp_path):
    """The JIT cache folder is named by the sources' contents, the include paths and the versions."""
    src = native.source_dir()
    assert src is not None
    copy = tmp_path / "csrc"
    shutil.copytree(src, copy)
    key = native_build.cache_key(copy, False, ["/a/include"], ["torch-x", "py-y"])
    assert len(key) == 16 and int(key, 16) >= 0
    assert key == native_build.cache_key(copy, False, ["/a/include"], ["torch-x", "py-y"])
    assert key != native_build.cache_key(copy, False, ["/other-env/include"], ["torch-x", "py-y"])
    assert key != native_build.cache_key(copy, False, ["/a/include"], ["torch-z", "py-y"])
    assert key != native_build.cache_key(copy, True, ["/a/include"], ["torch-x", "py-y"])
    header = copy / native_build.HEADERS[0]
    header.write_text(header.read_text() + "\n// edited\n")
    assert key != native_build.cache_key(copy, False, ["/a/include"], ["torch-x", "py-y"])
    # Another checkout of the same sources (another include path) builds in its own folder.
    assert native.build_dir(copy, False).parent == native.build_dir(src, False).parent
    assert native.build_dir(copy, False) != native.build_dir(src, False)


# --------------------------------------------------------------------------- build and fallback
def test_no_compiler_fallback(tmp_path):
    """Without a compiler: the package imports, one warning, a clear reason, "auto" still works."""
    script = textwrap.dedent("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            from fpt_fast import ops
            from fpt_fast.ops import native_backend as native
            reason = native.unavailable_reason()
            native.unavailable_reason()  # asked twice, warned once
            q = torch.randn(1, 2, 9, 16)
            scores = ops.token_importance(q, q, backend="auto")
            k_sel, _ = ops.select_tokens(scores, q, q, 3, backend="auto")
            try:
                ops.select_tokens(scores, q, q, 3, backend="native")
                raise SystemExit("backend='native' should have raised")
            except ValueError as error:
                assert "no C++ compiler" in str(error), error
        ours = [w for w in caught if issubclass(w.category, native.NativeUnavailableWarning)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert "no C++ compiler" in reason and "/nonexistent/c++" in reason, reason
        assert scores.shape == (1, 2, 9) and k_sel.shape == (1, 2, 3, 16)
        print("ok:", reason)
    """)
    env = dict(os.environ, CXX="/nonexistent/c++", FPT_FAST_NATIVE="jit", FPT_FAST_EXTENSIONS_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok:" in result.stdout, result.stdout + result.stderr[-3000:]


def test_disabled_by_env():
    script = ("from fpt_fast import ops; from fpt_fast.ops import native_backend as native; import torch; "
              "assert native.unavailable_reason() == 'disabled by FPT_FAST_NATIVE=0'; "
              "print(ops.backend_table('cpu')['native']['select_tokens'])")
    env = dict(os.environ, FPT_FAST_NATIVE="0")
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", script], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "disabled" in result.stdout, result.stderr[-3000:]


def _nvcc_command(out: Path):
    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    if nvcc is None and cpp_extension.CUDA_HOME and Path(cpp_extension.CUDA_HOME, "bin", "nvcc").is_file():
        nvcc = str(Path(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    if nvcc is None or torch.version.cuda is None:
        return None
    import sysconfig

    includes = cpp_extension.include_paths("cuda") + [sysconfig.get_paths()["include"], str(ROOT / "csrc")]
    std = "-std=c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 10) else "-std=c++17"
    # One architecture keeps this under a minute; the JIT build picks the GPU's own.
    return [nvcc, "-c", str(ROOT / "csrc" / "cuda_select.cu"), "-o", str(out), std, "-O3", "-arch=sm_80",
            "-Xcompiler", "-fPIC", *native_build.NVCC_FLAGS, "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
            "--expt-relaxed-constexpr", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *[arg for path in includes for arg in ("-isystem", path)]]


def test_cuda_source_compiles(tmp_path):
    """Compile-only (nvcc -c, sm_80) with torch's headers: about 25 s here; no GPU needed."""
    command = _nvcc_command(tmp_path / "cuda_select.o")
    if command is None:
        pytest.skip("nvcc or a CUDA build of torch is not present")
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "cuda_select.o").stat().st_size > 0
    print(f"nvcc -c cuda_select.cu: {time.perf_counter() - start:.1f} s")


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16])
def test_cuda_select_matches_cpu(lib, in_dtype, out_dtype):
    reasons = ops.unsupported_reasons("native", "select_tokens", "cuda", in_dtype)
    if reasons:
        pytest.skip("; ".join(reasons))
    torch.manual_seed(0)
    for N, d, n in [(1, 16, 1), (7, 80, 3), (257, 64, 51), (1025, 64, 205), (4097, 96, 819), (300, 17, 300)]:
        k, v = _index_rows(3, 5, N, d, in_dtype)
        for scores in (torch.rand(3, 5, N), torch.randint(0, 3, (3, 5, N)).float(),
                       torch.tensor([float("nan"), -0.0, 0.0, float("inf"), 1.0])[torch.randint(0, 5, (3, 5, N))]):
            cpu = native.select_tokens(scores, k, v, n, out_dtype)
            gpu = native.select_tokens(scores.cuda(), k.cuda(), v.cuda(), n, out_dtype)
            for a, b in zip(cpu, gpu):
                assert torch.equal(a, b.cpu()), (N, d, n)


@pytest.mark.cuda
def test_cuda_select_unaligned_and_strided(lib):
    if ops.unsupported_reasons("native", "select_tokens", "cuda"):
        pytest.skip("no native CUDA kernel")
    torch.manual_seed(1)
    B, N, H, d = 2, 333, 3, 40
    qkv = torch.randn(B, N, 3, H, d)
    qkv[..., 0] = torch.arange(N, dtype=torch.float32)[None, :, None, None]
    flat = torch.randn(B * H * N * 33 + 1)
    flat[1:].view(B, H, N, 33)[..., 0] = torch.arange(N, dtype=torch.float32)
    scores = torch.rand(B, H, N)
    # The views are taken on each device: .cuda() of a view would copy it to a dense, aligned tensor.
    pairs = []
    for base, base_flat in ((qkv, flat), (qkv.cuda(), flat.cuda())):
        view = base.permute(2, 0, 3, 1, 4)
        unaligned = base_flat[1:].view(B, H, N, 33)  # rows 4-byte, not 16-byte, aligned
        pairs.append([(view[1], view[2]), (unaligned, unaligned)])
    for (k, v), (kc, vc) in zip(*pairs):
        assert not kc.is_contiguous() or kc.data_ptr() % 16 != 0
        cpu = native.select_tokens(scores, k, v, 77, torch.float16)
        gpu = native.select_tokens(scores.cuda(), kc, vc, 77, torch.float16)
        assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
        same = native.select_tokens(scores.cuda(), kc, vc, 77)
        assert torch.equal(native.select_tokens(scores, k, v, 77)[0], same[0].cpu())
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.fpt_fast_native.select_tokens(scores.cuda(), kc, vc, N + 1, None)
