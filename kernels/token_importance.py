"""Token importance without N x N memory: a flash-attention forward that keeps the row LSE, a
column-sum kernel that turns (q, k, LSE) into FPT's "global" importance, and a class-token kernel
(docs/method.md, sections 2 and 10).

Math, per batch b and head h, with scale = d ** -0.5 and i, j running over the N tokens:
    LSE_i = log sum_j exp(q_i . k_j * scale)                    natural log, float32
    out_i = sum_j exp(q_i . k_j * scale - LSE_i) v_j            softmax(q k^T * scale) v
    s_j   = (1 / N) sum_i exp(q_i . k_j * scale - LSE_i)        "global": mean over queries of column j
    c_j   = exp(q_0 . k_j * scale - LSE_0)                      "class_token": row 0 of the softmax
The forward is the usual online softmax over key blocks. The importance kernel holds one block of
key columns and streams every query block past it, recomputing the q.k tile and summing
exp(s - LSE) down the columns in float32 registers: it never writes an N x N or an N x block tile,
and it uses no atomics, so its result is bitwise reproducible. Exponentials are exp2 with log2(e)
folded into the scale.

Limits: float32, float16 and bfloat16 inputs (q, k, v of one dtype); head size d <= 128, padded to
a power of two >= 16 and masked (so 80 and 96 work); any N >= 1, with a masked tail block that
compiles away when N divides the block sizes (EVEN_M / EVEN_N); any strides (q, k, v are read
through their strides, so a view of a ViT's fused qkv needs no copy). Accumulation is float32.
float16/bfloat16 dots run on the tensor cores, and the probabilities are rounded to v's dtype
before the p @ v product, as in flash attention. float32 dots follow _common.dot_precision
("tf32x3" on GPUs with TF32, "ieee" elsewhere and under the interpreter), so float32 results track
an eager float32 reference to rounding. Offsets of a (b, h) slice are 64-bit, so tensors above
2**31 elements are fine; offsets inside one slice are 32-bit. Under TRITON_INTERPRET=1 bfloat16
dot operands are widened to float32 first (UPCAST_DOT: the interpreter's bfloat16 dot is wrong).
The class-token kernel reads row 0 of q once and multiplies it into each key block in float32
registers (a matrix-vector product: no tl.dot, so no precision setting); given the forward's LSE it
runs one program per key block, else one program per (b, h) that first computes LSE_0 (an online
log-sum-exp over the key blocks) and then writes the scores.

The row LSE can also come from PyTorch's fused attention forwards (attention_forward_from: the
flash, memory-efficient and cuDNN kernels return the natural-log logsumexp with their output; cuDNN's
with a trailing axis of 1, the memory-efficient one padded to a multiple of 32 rows, both read as
(B, H, N) views), then the same importance kernel. fpt_fast.ops.triton_backend.ATTENTION_LSE_SOURCE
picks the source of attention_with_importance; it stays "own" until benchmarks/kernels.py (rows
triton:lse=<source>, checked against the own LSE before they are timed) shows one faster on a GPU.

Caution: tested on one GPU model only, an NVIDIA H100 (Triton 3.6, PyTorch 2.11), and under
TRITON_INTERPRET=1 on the CPU (Triton 3.8). tests/ops/test_token_importance.py passed on both with
float32 dots in "ieee"; the "tf32x3" float32 path now used on GPUs, and its float32 block sizes,
were checked on the H100 only by a benchmark script against a float64 reference (ViT-B sizes and
odd shapes, d = 16..128), not yet by the test file. Block sizes come from a small sweep on that
H100 at ViT-B sizes, not from autotuning; other GPUs (Ampere, consumer cards with less shared
memory) are untested and may need smaller blocks. The class-token kernel has run only under the
interpreter so far; its GPU block size (64 keys, 4 warps) is an untuned guess.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (INTERPRETED, LN2_JIT, LOG2E, LOG2E_JIT, block_d, device_guard, dot, dot_precision,
                      load_tile, store_tile, upcast_dot)


# ---------------------------------------------------------------------------------- kernels
@triton.jit
def _program_coords(num_inner, H):
    """A flat grid of (B * H) x num_inner programs, the inner index fastest: (inner index, b * H + h,
    b, h), b and h in int64 for the base offsets."""
    pid = tl.program_id(0)
    pid_bh = pid // num_inner
    return pid % num_inner, pid_bh, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


@triton.jit
def _tile_ptrs(X, off_b, off_h, stride_b, stride_h, rows, stride_row, cols, stride_col):
    """Pointers of the (rows, cols) tile of slice (b, h) of a 4-D tensor read through its strides;
    rows and cols index its own axes (tokens and head dims in either order: K is read transposed)."""
    return X + off_b * stride_b + off_h * stride_h + rows[:, None] * stride_row + cols[None, :] * stride_col


@triton.jit
def _attention_step(acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_n, offs_d, N, qk_scale,
                    HEAD_DIM: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr,
                    HAS_V: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax. offs_n are the block's key indices; the logits are in
    log2 units (qk_scale = scale * log2(e)); m_i is the running row max, l_i the running row sum."""
    kt = load_tile(k_ptrs, offs_d < HEAD_DIM, offs_n < N, not EVEN_D, MASK_N)      # (BLOCK_D, BLOCK_N)
    s = dot(q, kt, DOT_PRECISION, UPCAST_DOT) * qk_scale              # (BLOCK_M, BLOCK_N)
    if MASK_N:
        s = tl.where(offs_n[None, :] < N, s, float("-inf"))
    # Every block holds at least one real key, so m_new is finite and no row sees (-inf) - (-inf).
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_V:
        v = load_tile(v_ptrs, offs_n < N, offs_d < HEAD_DIM, MASK_N, not EVEN_D)   # (BLOCK_N, BLOCK_D)
        # p is rounded to v's dtype, as the tensor cores take it.
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
    return acc, m_new, l_i


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, num_m_blocks, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_V: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Flash-attention forward for one (b, h) and one block of BLOCK_M query rows.

    Q, K, V: (B, H, N, HEAD_DIM) read through strides. Out: (B, H, N, HEAD_DIM) in Q's dtype,
    softmax(Q K^T * scale) V, written only if HAS_V. Lse: (B, H, N) float32 contiguous,
    LSE_i = log sum_j exp(q_i . k_j * scale). qk_scale = scale * log2(e). UPCAST_DOT: dot operands
    go through float32 (_common.upcast_dot).
    """
    # One flat grid, query blocks fastest: programs of one head run side by side and share K, V in
    # L2, and B * H is not bound by the 65535 limit of the grid's second axis.
    pid_m, pid_bh, off_b, off_h = _program_coords(num_m_blocks, H)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = _tile_ptrs(Q, off_b, off_h, stride_qb, stride_qh, offs_m, stride_qn, offs_d, stride_qd)
    # K is read transposed, (BLOCK_D, BLOCK_N), so the logits are a plain q @ kt.
    k_ptrs = _tile_ptrs(K, off_b, off_h, stride_kb, stride_kh, offs_d, stride_kd, offs_n, stride_kn)
    v_ptrs = _tile_ptrs(V, off_b, off_h, stride_vb, stride_vh, offs_n, stride_vn, offs_d, stride_vd)

    # Padded query rows load as 0: their logits are 0, finite, and they are never stored.
    q = load_tile(q_ptrs, offs_m < N, offs_d < HEAD_DIM, not EVEN_M, not EVEN_D)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    # Full key blocks without masks, then at most one masked tail block.
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _attention_step(acc, m_i, l_i, q, k_ptrs + start_n * stride_kn,
                                        v_ptrs + start_n * stride_vn, start_n + offs_n, offs_d, N,
                                        qk_scale, HEAD_DIM, False, EVEN_D, HAS_V, UPCAST_DOT, DOT_PRECISION)
    if not EVEN_N:
        acc, m_i, l_i = _attention_step(acc, m_i, l_i, q, k_ptrs + n_full * stride_kn,
                                        v_ptrs + n_full * stride_vn, n_full + offs_n, offs_d, N,
                                        qk_scale, HEAD_DIM, True, EVEN_D, HAS_V, UPCAST_DOT, DOT_PRECISION)

    lse = (m_i + tl.log2(l_i)) * LN2_JIT
    lse_ptrs = Lse + pid_bh.to(tl.int64) * N + offs_m
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=offs_m < N)
    if HAS_V:
        out = (acc / l_i[:, None]).to(Out.dtype.element_ty)
        o_ptrs = _tile_ptrs(Out, off_b, off_h, stride_ob, stride_oh, offs_m, stride_on, offs_d, stride_od)
        store_tile(o_ptrs, out, offs_m < N, offs_d < HEAD_DIM, not EVEN_M, not EVEN_D)


@triton.jit
def _importance_step(acc, kt, q_ptrs, lse_ptrs, offs_m, offs_d, N, qk_scale,
                     HEAD_DIM: tl.constexpr, MASK_M: tl.constexpr, EVEN_D: tl.constexpr,
                     UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Adds exp(q_i . k_j * scale - LSE_i) of one query block to the (BLOCK_M, BLOCK_N) running sums.
    Padded query rows read LSE = +inf, so they add exp2(-inf) = 0 without a select."""
    q = load_tile(q_ptrs, offs_m < N, offs_d < HEAD_DIM, MASK_M, not EVEN_D)      # (BLOCK_M, BLOCK_D)
    if MASK_M:
        lse = tl.load(lse_ptrs, mask=offs_m < N, other=float("inf"))
    else:
        lse = tl.load(lse_ptrs)
    s = dot(q, kt, DOT_PRECISION, UPCAST_DOT)                         # (BLOCK_M, BLOCK_N)
    return acc + tl.exp2(s * qk_scale - (lse * LOG2E_JIT)[:, None])


@triton.jit
def _importance_kernel(
    Q, K, Lse, Scores,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_lb, stride_lh, stride_ln,
    H, N, num_n_blocks, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Global token importance for one (b, h) and one block of BLOCK_N key columns.

    Q, K: (B, H, N, HEAD_DIM) and Lse: (B, H, N) float32, all read through strides.
    Scores: (B, H, N) float32 contiguous, s_j = (1/N) sum_i exp(q_i . k_j * scale - LSE_i).
    qk_scale = scale * log2(e). Loops over every query block in a fixed order: deterministic.
    UPCAST_DOT as in _attention_fwd_kernel.
    """
    pid_n, pid_bh, off_b, off_h = _program_coords(num_n_blocks, H)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptrs = _tile_ptrs(K, off_b, off_h, stride_kb, stride_kh, offs_d, stride_kd, offs_n, stride_kn)
    q_ptrs = _tile_ptrs(Q, off_b, off_h, stride_qb, stride_qh, offs_m, stride_qn, offs_d, stride_qd)
    lse_ptrs = Lse + off_b * stride_lb + off_h * stride_lh + offs_m * stride_ln

    # This program's keys stay resident; padded key columns load as 0 and are never stored.
    kt = load_tile(k_ptrs, offs_d < HEAD_DIM, offs_n < N, not EVEN_D, not EVEN_N)  # (BLOCK_D, BLOCK_N)
    # Sums stay 2-D until the end: adding tiles is thread-local, while a column reduction per
    # query block would cross warps every iteration.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    m_full = (N // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        acc = _importance_step(acc, kt, q_ptrs + start_m * stride_qn, lse_ptrs + start_m * stride_ln,
                               start_m + offs_m, offs_d, N, qk_scale, HEAD_DIM, False, EVEN_D, UPCAST_DOT,
                               DOT_PRECISION)
    if not EVEN_M:
        acc = _importance_step(acc, kt, q_ptrs + m_full * stride_qn, lse_ptrs + m_full * stride_ln,
                               m_full + offs_m, offs_d, N, qk_scale, HEAD_DIM, True, EVEN_D, UPCAST_DOT,
                               DOT_PRECISION)

    scores = tl.sum(acc, 0) / N
    s_ptrs = Scores + pid_bh.to(tl.int64) * N + offs_n
    if EVEN_N:
        tl.store(s_ptrs, scores)
    else:
        tl.store(s_ptrs, scores, mask=offs_n < N)


@triton.jit
def _class_logits(q0, k_ptrs, keys, offs_d, N, qk_scale, HEAD_DIM: tl.constexpr, MASK_N: tl.constexpr,
                  EVEN_D: tl.constexpr):
    """q_0 . k_j * scale * log2(e) for the keys of one block, (BLOCK_N,) float32; -inf past N."""
    k = load_tile(k_ptrs, keys < N, offs_d < HEAD_DIM, MASK_N, not EVEN_D).to(tl.float32)
    s = tl.sum(k * q0[None, :], 1) * qk_scale
    if MASK_N:
        s = tl.where(keys < N, s, float("-inf"))
    return s


@triton.jit
def _class_token_kernel(
    Q, K, Lse, Scores,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_lb, stride_lh,
    H, N, keys_per_program, num_programs_per_head, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_N: tl.constexpr,
    EVEN_D: tl.constexpr, HAS_LSE: tl.constexpr,
):
    """Class-token importance c_j = exp(q_0 . k_j * scale - LSE_0) for one (b, h) and the keys
    [pid_n * keys_per_program, (pid_n + 1) * keys_per_program) (a multiple of BLOCK_N).

    Q: only row 0 of (B, H, N, HEAD_DIM) is read; K (B, H, N, HEAD_DIM); Lse (B, H, N) float32, only
    LSE_0 read, when HAS_LSE; all through strides. Without HAS_LSE the program owns all N keys and
    computes LSE_0 first, an online log-sum-exp over the key blocks. Scores: (B, H, N) float32
    contiguous. qk_scale = scale * log2(e). Grid: (B * H * num_programs_per_head,).
    """
    pid_n, pid_bh, off_b, off_h = _program_coords(num_programs_per_head, H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        q0 = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_d * stride_qd)
    else:
        q0 = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_d * stride_qd, mask=offs_d < HEAD_DIM,
                     other=0.0)
    q0 = q0.to(tl.float32)
    k_ptrs = _tile_ptrs(K, off_b, off_h, stride_kb, stride_kh, offs_n, stride_kn, offs_d, stride_kd)

    if HAS_LSE:
        lse2 = tl.load(Lse + off_b * stride_lb + off_h * stride_lh) * LOG2E_JIT
    else:
        # Every block holds at least one real key, so m stays finite after the first block.
        m = tl.full([], float("-inf"), dtype=tl.float32)
        total = tl.full([], 0.0, dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            s = _class_logits(q0, k_ptrs + start * stride_kn, start + offs_n, offs_d, N, qk_scale,
                              HEAD_DIM, not EVEN_N, EVEN_D)
            m_new = tl.maximum(m, tl.max(s, 0))
            total = total * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new), 0)
            m = m_new
        lse2 = m + tl.log2(total)

    first = pid_n * keys_per_program
    last = tl.minimum(N, first + keys_per_program)
    s_row = Scores + pid_bh.to(tl.int64) * N
    for start in range(first, last, BLOCK_N):
        keys = start + offs_n
        s = _class_logits(q0, k_ptrs + start * stride_kn, keys, offs_d, N, qk_scale, HEAD_DIM, not EVEN_N,
                          EVEN_D)
        if EVEN_N:
            tl.store(s_row + keys, tl.exp2(s - lse2))
        else:
            tl.store(s_row + keys, tl.exp2(s - lse2), mask=keys < N)


# -------------------------------------------------------------------------------- launchers
def _attention_config(t: Tensor, block_d: int, has_v: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward, from a sweep on an H100 at ViT-B
    sizes (B=4, H=12, N=4097)."""
    if INTERPRETED:
        # Small blocks, so that tests with N < 70 cross several blocks and tails.
        return 32, 16, 4, 1
    if t.dtype == torch.float32:
        if dot_precision(t) == "ieee" or block_d > 64:
            # CUDA-core dots: larger tiles ran up to 6x slower; d > 64: larger float32 tiles
            # overflow the 227 KB of shared memory.
            return 64, 32, 4, 2
        return (128, 64, 8, 3) if has_v else (64, 64, 4, 3)
    if not has_v:
        return 128, 64, 4, 3
    if block_d <= 64:
        return 128, 64, 8, 3
    return 128, 128, 8, 3


def _importance_config(t: Tensor, block_d: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M query rows streamed, BLOCK_N key columns held, num_warps, num_stages)."""
    if INTERPRETED:
        return 16, 32, 4, 1
    if t.dtype == torch.float32 and (dot_precision(t) == "ieee" or block_d > 64):
        return 32, 128, 4, 2
    if block_d <= 64 or t.dtype == torch.float32:
        return 64, 128, 4, 3
    return 64, 128, 8, 3


def attention_forward(q: Tensor, k: Tensor, v: Optional[Tensor], *, block_m: Optional[int] = None,
                      block_n: Optional[int] = None) -> Tuple[Optional[Tensor], Tensor]:
    """q, k, v: (B, H, N, d), any strides; v may be None. Returns out (B, H, N, d) in q's dtype
    (laid out like q when q is dense, else contiguous; None when v is None) and lse (B, H, N)
    float32 contiguous. block_m / block_n override the block sizes (powers of two >= 16)."""
    B, H, N, d = q.shape
    bd = block_d(d)
    has_v = v is not None
    bm, bn, num_warps, num_stages = _attention_config(q, bd, has_v)
    bm, bn = block_m or bm, block_n or bn
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    out = torch.empty_like(q) if has_v else None
    # Without v the V and Out arguments are never read (HAS_V compiles their code away).
    v_arg, o_arg = (v, out) if has_v else (k, lse)
    v_strides = v.stride() if has_v else (0, 0, 0, 0)
    o_strides = out.stride() if has_v else (0, 0, 0, 0)
    num_m_blocks = triton.cdiv(N, bm)
    with device_guard(q):
        _attention_fwd_kernel[(num_m_blocks * B * H,)](
            q, k, v_arg, o_arg, lse,
            *q.stride(), *k.stride(), *v_strides, *o_strides,
            H, N, num_m_blocks, d ** -0.5 * LOG2E,
            HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
            EVEN_M=N % bm == 0, EVEN_N=N % bn == 0, EVEN_D=d == bd, HAS_V=has_v,
            UPCAST_DOT=upcast_dot(q.dtype), DOT_PRECISION=dot_precision(q),
            num_warps=num_warps, num_stages=num_stages,
        )
    return out, lse


def token_importance_forward(q: Tensor, k: Tensor, lse: Tensor, *, block_m: Optional[int] = None,
                             block_n: Optional[int] = None) -> Tensor:
    """q, k: (B, H, N, d), any strides; lse: (B, H, N) float32, any strides.
    Returns the global importance scores (B, H, N) float32 contiguous.
    block_m (query rows streamed) / block_n (key columns held) override the block sizes."""
    B, H, N, d = q.shape
    bd = block_d(d)
    bm, bn, num_warps, num_stages = _importance_config(q, bd)
    bm, bn = block_m or bm, block_n or bn
    scores = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    num_n_blocks = triton.cdiv(N, bn)
    with device_guard(q):
        _importance_kernel[(num_n_blocks * B * H,)](
            q, k, lse, scores,
            *q.stride(), *k.stride(), *lse.stride(),
            H, N, num_n_blocks, d ** -0.5 * LOG2E,
            HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
            EVEN_M=N % bm == 0, EVEN_N=N % bn == 0, EVEN_D=d == bd, UPCAST_DOT=upcast_dot(q.dtype),
            DOT_PRECISION=dot_precision(q), num_warps=num_warps, num_stages=num_stages,
        )
    return scores


def class_token_importance_forward(q: Tensor, k: Tensor, lse: Optional[Tensor], *,
                                   block_n: Optional[int] = None) -> Tensor:
    """q, k: (B, H, N, d), any strides (only row 0 of q is read); lse: None or (B, H, N) float32,
    any strides (only LSE_0 is read). Returns c_j = softmax_j(q_0 . k_j / sqrt(d)), (B, H, N) float32
    contiguous. Given lse, one program per key block; else one per (b, h), which computes LSE_0.
    block_n (keys per block, a power of two) overrides the block size."""
    B, H, N, d = q.shape
    bd = block_d(d)
    bn = block_n or (16 if INTERPRETED else 64)
    scores = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    has_lse = lse is not None
    num_blocks = triton.cdiv(N, bn)
    per_head = num_blocks if has_lse else 1
    lse_arg, lse_strides = (lse, lse.stride()[:2]) if has_lse else (scores, (0, 0))
    with device_guard(q):
        _class_token_kernel[(B * H * per_head,)](
            q, k, lse_arg, scores,
            q.stride(0), q.stride(1), q.stride(3), *k.stride(), *lse_strides,
            H, N, bn if has_lse else num_blocks * bn, per_head, d ** -0.5 * LOG2E,
            HEAD_DIM=d, BLOCK_N=bn, BLOCK_D=bd, EVEN_N=N % bn == 0, EVEN_D=d == bd, HAS_LSE=has_lse,
            num_warps=4,
        )
    return scores


# ------------------------------------------------------------------- LSE from PyTorch's forwards
# Where the attention output and the row LSE can come from before the importance kernel: "own" is
# attention_forward above; the others are PyTorch's fused attention forwards, which return the row
# logsumexp with the output (the flash forward has a CPU twin, used under the interpreter in tests).
LSE_SOURCES = ("own", "flash", "efficient", "cudnn")


def lse_source_reason(source: str, q: Tensor) -> Optional[str]:
    """Why ``source`` cannot give (out, lse) for q, k, v like q (B, H, N, d): None when it can."""
    if source not in LSE_SOURCES:
        raise ValueError(f"LSE source {source!r} is unknown: expected one of {LSE_SOURCES}")
    if source == "own":
        return None
    d = q.shape[-1]
    if q.stride(-1) != 1:
        return "needs a unit stride along the head dimension"
    if not q.is_cuda:
        # PyTorch has a CPU twin of the flash forward only, whose float16/bfloat16 LSE is about
        # 3e-5 off (logits in reduced precision): too coarse for the scores.
        if source != "flash":
            return f"{source} has no CPU kernel"
        return None if q.dtype == torch.float32 else "the CPU flash forward's 16-bit LSE is too coarse"
    if source in ("flash", "cudnn") and q.dtype == torch.float32:
        return f"{source} takes float16/bfloat16 only"
    if d % 8:
        return f"head size {d} is not a multiple of 8"
    if source == "cudnn" and (d > 128 or torch.cuda.get_device_capability(q.device)[0] < 8):
        return "cudnn needs head size <= 128 and an sm_80+ GPU"
    return None


def _lse_rows(lse: Tensor, q: Tensor, source: str) -> Tensor:
    """The (B, H, N) float32 view of a PyTorch forward's logsumexp: cuDNN's carries a trailing axis
    of 1, the memory-efficient kernel pads N to a multiple of 32. Anything else is an error."""
    B, H, N = q.shape[:3]
    if lse.dim() == 4 and lse.shape[-1] == 1:
        lse = lse[..., 0]
    if lse.dim() != 3 or tuple(lse.shape[:2]) != (B, H) or lse.shape[2] < N or lse.dtype != torch.float32:
        raise RuntimeError(f"the {source} attention forward returned a logsumexp of shape "
                           f"{tuple(lse.shape)} ({lse.dtype}); expected float32 (B, H, >= N) = ({B}, {H}, {N})")
    return lse[..., :N]


def attention_forward_from(source: str, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """(out (B, H, N, d) in q's dtype, lse (B, H, N) float32 natural log, any strides) from
    ``source`` (LSE_SOURCES); lse_source_reason(source, q) must be None. "own" is attention_forward."""
    reason = lse_source_reason(source, q)
    if reason is not None:
        raise ValueError(f"LSE source {source!r} cannot run q ({tuple(q.shape)}, {q.dtype} on {q.device}): {reason}")
    if source == "own":
        return attention_forward(q, k, v)
    aten = torch.ops.aten
    if source == "flash":
        flash = aten._scaled_dot_product_flash_attention if q.is_cuda else aten._scaled_dot_product_flash_attention_for_cpu
        result = flash(q, k, v)
    elif source == "efficient":
        result = aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
    else:
        result = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)
    return result[0], _lse_rows(result[1], q, source)


__all__ = ["attention_forward", "token_importance_forward", "class_token_importance_forward", "LSE_SOURCES",
           "lse_source_reason", "attention_forward_from"]
