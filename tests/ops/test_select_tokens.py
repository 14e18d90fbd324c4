"""select_tokens: the fused Triton top-n select + gather (kernels/select_tokens.py) and the "torch"
backend, against fpt_fast.reference.select_tokens; the kept indices (return_indices) of every
backend that runs here, "native" included.

The Triton tests run the kernel as fpt_fast.ops launches it ("triton": the path picked by shape)
and with each path forced ("triton:split", "triton:rowwise", FORCED): 16-token tiles so that even
small rows have several, and for the split path a threshold search that re-reads rows longer than
64 tokens instead of holding them.

The reference keeps descending-score order, the fast paths ascending token index, so rows are
matched by the token index that k carries in its first two columns (j // 64, j % 64: small integers,
exact in every float dtype). On the CPU the kernel runs under Triton's interpreter (conftest).
"""
import functools
import math
from unittest import mock

import pytest
import torch

from fpt_fast import ops, reference
from fpt_fast.kernels import select_tokens as kernel

FORCED = {"triton:split": dict(path="split", block_g=16),
          "triton:rowwise": dict(path="rowwise", block_g=16)}
BACKENDS = ["triton", *FORCED, "torch"]


def _cases(backends, cases, forced_too=lambda *case: True):
    """(case..., backend) parameters; the FORCED launches only where forced_too(*case) (the
    interpreter runs 16-token tiles slowly: the long rows are left to the default launch)."""
    return [(*case, b) for case in cases for b in backends if b not in FORCED or forced_too(*case)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [16, 32, 80, 96, 128]
# (N, n): odd N with n in {1, N // 5, N - 1, N} where valid.
SIZES = sorted({(N, n) for N in (1, 5, 33, 257, 1100) for n in (1, N // 5, N - 1, N) if 1 <= n <= N})
# Triton's interpreter truncates fp32 -> bf16 where a GPU (and torch) rounds to nearest even.
INTERPRETED = not torch.cuda.is_available()


def _inputs(B, H, N, d, device, seed, *, kv_dtype=torch.float32, score_dtype=torch.float32,
            scores=None, exact=False):
    """Random scores (B, H, N) and k, v (B, H, N, d); k[..., :2] encodes the token index.
    exact: values on a coarse grid, representable in every float dtype (for casts to bf16 that the
    interpreter would truncate)."""
    g = torch.Generator().manual_seed(seed)
    if exact:
        k, v = (torch.randint(-128, 128, (B, H, N, d), generator=g) / 32 for _ in range(2))
    else:
        k, v = (torch.randn(B, H, N, d, generator=g) for _ in range(2))
    j = torch.arange(N)
    k[..., 0], k[..., 1] = (j // 64).float(), (j % 64).float()
    if scores is None:
        scores = torch.randn(B, H, N, generator=g)
    return scores.to(device, score_dtype), k.to(device, kv_dtype), v.to(device, kv_dtype)


def select(scores, k, v, n, out_dtype=None, *, backend, return_indices=False):
    """ops.select_tokens; a FORCED name runs the "triton" backend with that launch of the kernel."""
    if backend not in FORCED:
        return ops.select_tokens(scores, k, v, n, out_dtype, return_indices=return_indices, backend=backend)
    forced = functools.partial(kernel.select_tokens_forward, **FORCED[backend])
    with mock.patch.object(kernel, "select_tokens_forward", forced):
        return ops.select_tokens(scores, k, v, n, out_dtype, return_indices=return_indices, backend="triton")


def _token_index(k_sel):
    return (k_sel[..., 0].float() * 64 + k_sel[..., 1].float()).round().long()


def _rows(t, index):
    return t.gather(2, index[..., None].expand(*index.shape, t.shape[-1]))


def _check(scores, k, v, n, out_dtype=None, backend="triton", result=None):
    """Runs (or takes) the fast path and checks it against the reference; returns kept indices."""
    k_sel, v_sel = result if result is not None else select(scores, k, v, n, out_dtype, backend=backend)
    B, H, N, d = k.shape
    dtype = out_dtype or k.dtype
    for t in (k_sel, v_sel):
        assert t.shape == (B, H, n, d) and t.dtype == dtype and t.is_contiguous()
    index = _token_index(k_sel)
    assert bool((index.diff(dim=-1) > 0).all()), "kept tokens are not in ascending index order"
    k_ref, v_ref = reference.select_tokens(scores, k, v, n, out_dtype)
    ref_index = _token_index(k_ref)
    assert torch.equal(index, ref_index.sort(dim=-1).values), "kept set differs from the reference"
    assert torch.equal(k_sel, _rows(k, index).to(dtype)) and torch.equal(v_sel, _rows(v, index).to(dtype))
    order = ref_index.argsort(dim=-1)
    assert torch.equal(k_sel, _rows(k_ref, order)) and torch.equal(v_sel, _rows(v_ref, order))
    return index


# ---------------------------------------------------------------------------------- values
@pytest.mark.parametrize("case, backend", _cases(BACKENDS, [(c,) for c in range(len(SIZES))],
                                                 lambda c: SIZES[c][0] <= 257))
def test_matches_reference(case, backend, device):
    N, n = SIZES[case]
    d = HEAD_DIMS[case % len(HEAD_DIMS)]
    B, H = (1, 2) if N > 300 else (2, 2)
    _check(*_inputs(B, H, N, d, device, seed=case), n, backend=backend)


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_head_dims(d, device):
    _check(*_inputs(1, 3, 257, d, device, seed=d), 51)


@pytest.mark.parametrize("kv_dtype, out_dtype, score_dtype, backend", _cases(BACKENDS, [
    (kv, out, score) for score in DTYPES for kv, out in [
        (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16), (torch.float16, None)]],
    lambda kv, out, score: score == torch.float32))
def test_dtypes(kv_dtype, out_dtype, score_dtype, backend, device):
    exact = out_dtype == torch.bfloat16 and INTERPRETED
    inputs = _inputs(2, 2, 33, 32, device, seed=3, kv_dtype=kv_dtype, score_dtype=score_dtype, exact=exact)
    _check(*inputs, 6, out_dtype, backend=backend)


@pytest.mark.skipif(INTERPRETED, reason="Triton's interpreter truncates fp32 -> bf16 instead of rounding")
def test_bf16_cast_rounds_to_nearest_even(device):
    scores, k, v = _inputs(2, 3, 257, 64, device, seed=5)
    k[..., 2:] = k[..., 2:] * (1 + 2.0 ** -9)          # mantissa bits below bf16's: rounding matters
    _check(scores, k, v, 51, torch.bfloat16)


# --------------------------------------------------------------------------------- indices
@pytest.mark.parametrize("N, backend", _cases(["triton", *FORCED, "native", "torch"], [(1,), (7,), (33,), (65,)],
                                              lambda N: N in (7, 33)))
def test_indices_every_n(N, backend, device):
    """return_indices: the kept token indices (B, H, n) int64 in ascending order, the same set as the
    reference's (which lists them by descending score), naming exactly the rows gathered; and the
    rows are those of the call without indices. One row with heavy ties, one with distinct scores."""
    reasons = ops.unsupported_reasons(backend.split(":")[0], "select_tokens", device)
    if reasons:
        pytest.skip("; ".join(reasons))
    g = torch.Generator().manual_seed(N)
    scores = torch.stack([torch.randint(0, 3, (N,), generator=g).float(), torch.randn(N, generator=g)])[None]
    inputs = _inputs(1, 2, N, 16, device, seed=N, scores=scores)
    for n in range(1, N + 1):
        k_sel, v_sel, index = select(*inputs, n, return_indices=True, backend=backend)
        assert index.dtype == torch.int64 and index.shape == (1, 2, n) and index.device == k_sel.device
        assert torch.equal(index, _check(*inputs, n, result=(k_sel, v_sel)))
        k_ref, _, ref_index = reference.select_tokens(*inputs, n, return_indices=True)
        assert torch.equal(ref_index, _token_index(k_ref))
        assert torch.equal(index, ref_index.sort(dim=-1).values)
        if n in (1, N // 2 + 1, N):
            plain = select(*inputs, n, backend=backend)
            assert len(plain) == 2 and torch.equal(plain[0], k_sel) and torch.equal(plain[1], v_sel)


def test_index_outputs_trace_with_fake_tensors():
    """The fakes of the indexed ops (what torch.compile traces) give the kernels' shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    backends = [b for b in ("triton", "native") if not ops.unsupported_reasons(b, "select_tokens", "cpu")]
    with FakeTensorMode():
        scores, k = torch.empty(2, 3, 10), torch.empty(2, 3, 10, 16)
        for backend in backends:
            k_sel, v_sel, index = ops.select_tokens(scores, k, k, 4, torch.float16, return_indices=True,
                                                    backend=backend)
            assert k_sel.shape == v_sel.shape == (2, 3, 4, 16) and k_sel.dtype == torch.float16
            assert index.shape == (2, 3, 4) and index.dtype == torch.int64


# ------------------------------------------------------------------------------------ ties
@pytest.mark.parametrize("N, n, score_dtype, backend", _cases(
    BACKENDS, [(N, n, dtype) for N, n in [(257, 51), (1100, 220)] for dtype in DTYPES], lambda N, n, dtype: N == 257))
def test_heavy_ties(N, n, score_dtype, backend, device):
    g = torch.Generator().manual_seed(N)
    scores = torch.randint(0, 3, (1, 2, N), generator=g).float()
    _check(*_inputs(1, 2, N, 16, device, seed=1, scores=scores, score_dtype=score_dtype), n, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_equal_keeps_the_lowest_indices(backend, device):
    scores = torch.full((2, 2, 33), 0.25)
    index = _check(*_inputs(2, 2, 33, 16, device, seed=0, scores=scores), 6, backend=backend)
    assert torch.equal(index.cpu(), torch.arange(6).expand(2, 2, 6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_signed_zeros_tie(backend, device):
    # -0.0 and +0.0 compare equal in torch: they tie, and the lower indices win whatever the sign.
    g = torch.Generator().manual_seed(7)
    scores = torch.tensor([-1.0, -0.0, 0.0, 1.0])[torch.randint(0, 4, (2, 2, 257), generator=g)]
    ones = int((scores == 1).sum(-1).max())
    index = _check(*_inputs(2, 2, 257, 16, device, seed=2, scores=scores), ones + 10, backend=backend)
    zero = (scores == 0).to(device)
    for row, kept in zip(zero.reshape(-1, 257), index.reshape(4, -1)):
        zeros = row.nonzero().flatten()
        kept_zeros = kept[row[kept]]
        assert torch.equal(kept_zeros, zeros[:kept_zeros.numel()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_scores(backend, device):
    g = torch.Generator().manual_seed(11)
    scores = -torch.rand(2, 2, 257, generator=g) * 1e3 - 1e-3
    _check(*_inputs(2, 2, 257, 32, device, seed=4, scores=scores), 51, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_values_every_n(backend, device):
    # The key mapping must order infinities, subnormals, signed zeros and huge values like floats.
    values = torch.tensor([-math.inf, -3e38, -1.0, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 1.0, 3e38, math.inf,
                           -2.5, 2.5, 1.0, -1e-40, 7.0, -math.inf])
    g = torch.Generator().manual_seed(13)
    scores = values[torch.randperm(values.numel(), generator=g)].expand(1, 2, -1).clone()
    scores[0, 1] = scores[0, 1].flip(0)
    inputs = _inputs(1, 2, values.numel(), 16, device, seed=6, scores=scores)
    for n in range(1, values.numel() + 1):
        _check(*inputs, n, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_ranks_above_everything(device, backend):
    # Documented behaviour: NaN > +inf, NaNs tie (lower index first), as in the reference's
    # stable descending sort.
    nan = math.nan
    scores = torch.tensor([[[1.0, nan, 3.0, -1.0, math.inf, 2.0, nan, -0.0, 0.0, -math.inf]]])
    inputs = _inputs(1, 1, 10, 16, device, seed=0, scores=scores)
    for n in range(1, 11):
        index = _check(*inputs, n, backend=backend)
        if n <= 2:
            assert index.flatten().tolist() == [1, 6][:n]


@pytest.mark.parametrize("backend", ["triton", *FORCED])
def test_nan_sign_is_ignored(backend, device):
    # A NaN with its sign bit set (x86's default NaN) ranks like any NaN. Not compared with the
    # reference: torch.sort orders such NaNs differently on the CPU and on CUDA.
    scores = torch.tensor([[[1.0, math.nan, 3.0, -math.nan, math.inf, 2.0]]])
    assert scores.view(torch.int32)[0, 0, 3] < 0
    scores, k, v = _inputs(1, 1, 6, 16, device, seed=0, scores=scores)
    for n, expected in [(1, [1]), (2, [1, 3]), (3, [1, 3, 4]), (4, [1, 2, 3, 4])]:
        k_sel, v_sel = select(scores, k, v, n, backend=backend)
        assert _token_index(k_sel).flatten().tolist() == expected


# ------------------------------------------------------------------------- layout and paths
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    B, H, N, d = 2, 3, 257, 32
    g = torch.Generator().manual_seed(17)
    qkv = torch.randn(B, N, 3, H, d, generator=g)
    qkv[:, :, 1, :, 0] = (torch.arange(N) // 64).float()[None, :, None]
    qkv[:, :, 1, :, 1] = (torch.arange(N) % 64).float()[None, :, None]
    qkv = qkv.to(device).permute(2, 0, 3, 1, 4)                     # (3, B, H, N, d) view
    scores = torch.randn(B, N, H, generator=g).to(device).transpose(1, 2)
    k, v = qkv[1], qkv[2]
    assert not k.is_contiguous() and not scores.is_contiguous()
    _check(scores, k, v, 51, backend=backend)


# Launches of the kernel with small tiles: held threshold blocks (A, and B when the chunks are not a
# power of two) and the re-reading search, in both paths; the VARIANTS the GPU benchmark times.
LAUNCHES = [
    (257, 51, False, dict(path="split", block_g=16, max_resident=16)),      # re-read, 1-chunk blocks
    (257, 256, True, dict(path="split", block_g=32)),                        # held: 8 + 1 chunks
    (257, 1, True, dict(path="rowwise", block_g=16, max_resident=32)),       # re-read, 2-chunk blocks
    (1100, 220, True, dict(path="split", block_g=64, max_resident=256)),
    (1100, 220, False, dict(path="rowwise", block_g=64)),                    # held: 16 + 2 chunks
    (1100, 1100, True, dict(path="split", block_g=256)),
    (300, 60, True, dict(path="split", block_g=16, gather_warps=2)),
] + [(300, 60, True, launch) for launch in kernel.VARIANTS.values()]


@pytest.mark.parametrize("N, n, ties, launch", LAUNCHES)
def test_launches(N, n, ties, launch, device):
    """Each path and launch override through the launcher, k and v with unusual strides; the indices
    written tile by tile name the gathered rows."""
    g = torch.Generator().manual_seed(N + n)
    scores = torch.randint(0, 3, (1, 2, N), generator=g).float() if ties else None
    scores, k, v = _inputs(1, 2, N, 16, device, seed=8, scores=scores)
    k = k.transpose(2, 3).contiguous().transpose(2, 3)              # token stride 1, column stride N
    v = torch.cat([v, -v], dim=-1)[..., ::2]                         # column stride 2
    k_sel, v_sel, index = kernel.select_tokens_forward(scores, k, v, n, torch.float32, return_indices=True,
                                                       **launch)
    assert torch.equal(index, _check(scores, k, v, n, result=(k_sel, v_sel)))


@pytest.mark.parametrize("N", [1, 2, 15, 16, 17, 128, 129, 1025, 4097, 16385, 32768, 32769, 65537])
@pytest.mark.parametrize("d", [16, 64, 128])
def test_layout_covers_the_row(N, d):
    """Held blocks: a power of two of chunks, then fewer (a power of two, or none), covering the row
    within MAX_RESIDENT slots; rows that do not fit are re-read in blocks of at most REREAD_TOKENS."""
    lay = kernel.layout(N, d)
    assert lay.chunks * lay.chunk >= N > (lay.chunks - 1) * lay.chunk
    assert lay.chunks_a & (lay.chunks_a - 1) == 0 and lay.chunks_b & (lay.chunks_b - 1) == 0
    if N <= kernel.MAX_RESIDENT // 2:
        assert lay.resident
    if lay.resident:
        assert lay.chunks_a <= lay.chunks <= lay.chunks_a + lay.chunks_b and lay.chunks_b < lay.chunks_a
        assert (lay.chunks_a + lay.chunks_b) * lay.chunk <= kernel.MAX_RESIDENT
    else:
        assert lay.chunks_b == 0 and lay.chunks_a * lay.chunk <= kernel.REREAD_TOKENS
    assert 4 <= lay.threshold_warps <= 16 and lay.threshold_warps * 32 * lay.threshold_registers <= 65536


# Subnormals are left to test_extreme_values_every_n (float32 scores): Triton 3.8's interpreter turns
# bfloat16 subnormals into zeros when it widens them to float32 (a GPU shifts the bits, exactly).
SPECIAL = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1.0, -1.0, 3e38, -1e-30]


@pytest.mark.parametrize("N, backend", [(N, b) for N in (1, 7, 33, 65, 300) for b in ("triton", *FORCED)
                                        if N < 300 or b != "triton:rowwise"])
def test_odd_sizes_and_special_values(N, backend, device):
    """Rows mixing NaN, +-inf, -0.0 and +0.0, ties and random values; n = 1, N and sampled between;
    every score dtype and every output dtype (k, v of another dtype)."""
    g = torch.Generator().manual_seed(N)
    special = torch.tensor(SPECIAL)[torch.randint(0, len(SPECIAL), (2, 2, N), generator=g)]
    scores = torch.where(torch.rand(2, 2, N, generator=g) < 0.5, special, torch.randn(2, 2, N, generator=g))
    ns = sorted({1, N, *torch.randint(1, N + 1, (2,), generator=g).tolist()})
    for i, n in enumerate(ns):
        score_dtype, kv_dtype, out_dtype = DTYPES[i % 3], DTYPES[(i + 1) % 3], DTYPES[(i + 2) % 3]
        inputs = _inputs(2, 2, N, 16, device, seed=i, scores=scores, score_dtype=score_dtype,
                         kv_dtype=kv_dtype, exact=True)
        _check(*inputs, n, out_dtype, backend=backend)


def test_deterministic(device):
    inputs = _inputs(2, 2, 1100, 32, device, seed=9)
    first = ops.select_tokens(*inputs, 220, backend="triton")
    second = ops.select_tokens(*inputs, 220, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------------------- bad inputs
def _bad_cases(device):
    scores, k, v = _inputs(2, 2, 9, 16, device, seed=0)
    return [
        ((scores, k, v, 0, None), ValueError),
        ((scores, k, v, -1, None), ValueError),
        ((scores, k, v, 10, None), ValueError),
        ((scores, k, v, 2.0, None), TypeError),
        ((scores, k, v, True, None), TypeError),
        ((scores, k, v, torch.tensor(2), None), TypeError),
        ((scores[..., :8], k, v, 2, None), ValueError),                   # N mismatch
        ((scores[:1], k, v, 2, None), ValueError),                        # B mismatch
        ((scores[..., None], k, v, 2, None), ValueError),                 # rank of scores
        ((scores, k[..., 0], v[..., 0], 2, None), ValueError),            # rank of k, v
        ((scores, k, v[..., :8], 2, None), ValueError),                   # v shape
        ((scores, k, v.half(), 2, None), TypeError),                      # mixed k/v dtypes
        ((scores, k.long(), v.long(), 2, None), TypeError),
        ((scores.long(), k, v, 2, None), TypeError),
        ((scores.double(), k, v, 2, None), TypeError),
        ((scores.tolist(), k, v, 2, None), TypeError),
        ((scores.to("meta"), k, v, 2, None), ValueError),                 # devices
        ((scores, k, v.to("meta"), 2, None), ValueError),
        ((scores[:0], k[:0], v[:0], 1, None), ValueError),                # empty batch
        ((scores, k, v, 2, torch.float64), TypeError),
        ((scores, k, v, 2, torch.int32), TypeError),
        ((scores, k, v, 2, "bfloat16"), TypeError),
        ((scores, k, v, 2, None, "yes"), TypeError),                     # return_indices
    ]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_inputs_raise_before_launch(backend, device, monkeypatch):
    launches = []
    monkeypatch.setattr(kernel, "select_tokens_forward", lambda *a, **kw: launches.append(a))
    for args, error in _bad_cases(device):
        with pytest.raises(error):
            ops.select_tokens(*args[:5], return_indices=args[5] if len(args) > 5 else False, backend=backend)
    assert not launches


def test_bad_k_v_errors_name_k_and_v(device):
    """The errors about k and v name them as the caller does (not as the q, k of the attention ops)."""
    scores, k, v = _inputs(2, 2, 9, 16, device, seed=0)
    with pytest.raises(ValueError, match=r"^v \(shape \(2, 2, 9, 8\).*must have the shape of k \(\(2, 2, 9, 16\)\)"):
        ops.select_tokens(scores, k, v[..., :8], 2, backend="torch")
    with pytest.raises(TypeError, match=r"^v \(.*torch.float16.*\) and k \(.*\) must have the same dtype"):
        ops.select_tokens(scores, k, v.half(), 2, backend="torch")
    with pytest.raises(ValueError, match=r"^k \(shape \(2, 2, 9\).*must be 4-D"):
        ops.select_tokens(scores, k[..., 0], v, 2, backend="torch")


# -------------------------------------------------------------------------- realistic, GPU
@pytest.mark.cuda
@pytest.mark.parametrize("B, N", [(32, 1025), (32, 4097), (2, 16385)])
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", kernel.PATHS)
def test_realistic_sizes_cuda(B, N, score_dtype, path):
    H, d = 12, 64
    n = math.floor(0.2 * N)
    scores, k, v = _inputs(B, H, N, d, "cuda", seed=N, kv_dtype=torch.bfloat16, score_dtype=score_dtype)
    fast = kernel.select_tokens_forward(scores, k, v, n, torch.bfloat16, path=path)
    slow = ops.select_tokens(scores, k, v, n, torch.bfloat16, backend="torch")
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    _check(scores, k, v, n, torch.bfloat16, result=fast)
