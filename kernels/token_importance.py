"""Token importance without N x N memory: a flash-attention forward that keeps the row LSE, and a
column-sum kernel that turns (q, k, LSE) into FPT's "global" importance (docs/method.md, sections 2 and 10).

Math, per batch b and head h, with scale = d ** -0.5 and i, j running over the N tokens:
    LSE_i = log sum_j exp(q_i . k_j * scale)                    natural log, float32
    out_i = sum_j exp(q_i . k_j * scale - LSE_i) v_j            softmax(q k^T * scale) v
    s_j   = (1 / N) sum_i exp(q_i . k_j * scale - LSE_i)        mean over queries of column j
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
before the p @ v product, as in flash attention. float32 dots use input_precision="tf32x3" on
GPUs with TF32 (float32-level error, see _dot_precision) and "ieee" elsewhere and under the
interpreter, so float32 results track an eager float32 reference to rounding. Offsets of a (b, h)
slice are 64-bit, so tensors above 2**31 elements are fine; offsets inside one slice are 32-bit.
Under TRITON_INTERPRET=1 bfloat16 dot operands are widened to float32 first (F32_DOT: the
interpreter's bfloat16 dot is wrong).

Caution: tested on one GPU model only, an NVIDIA H100 (Triton 3.6, PyTorch 2.11), and under
TRITON_INTERPRET=1 on the CPU (Triton 3.8). tests/ops/test_token_importance.py passed on both with
float32 dots in "ieee"; the "tf32x3" float32 path now used on GPUs, and its float32 block sizes,
were checked on the H100 only by a benchmark script against a float64 reference (ViT-B sizes and
odd shapes, d = 16..128), not yet by the test file. Block sizes come from a small sweep on that
H100 at ViT-B sizes, not from autotuning; other GPUs (Ampere, consumer cards with less shared
memory) are untested and may need smaller blocks.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
LN2 = 0.6931471805599453    # log(x) = log2(x) * ln(2)
# Compiled kernels may read only constexpr globals (the interpreter does not enforce this).
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)


# ---------------------------------------------------------------------------------- kernels
@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Loads a 2-D tile, masking (with 0) only the dimensions that can run past the tensor."""
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _attention_step(acc, m_i, l_i, q, k_ptrs, v_ptrs, offs_n, offs_d, N, qk_scale,
                    HEAD_DIM: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr,
                    HAS_V: tl.constexpr, F32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax. offs_n are the block's key indices; the logits are in
    log2 units (qk_scale = scale * log2(e)); m_i is the running row max, l_i the running row sum."""
    kt = _load_tile(k_ptrs, offs_d, HEAD_DIM, offs_n, N, not EVEN_D, MASK_N)       # (BLOCK_D, BLOCK_N)
    if F32_DOT:
        kt = kt.to(tl.float32)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale     # (BLOCK_M, BLOCK_N)
    if MASK_N:
        s = tl.where(offs_n[None, :] < N, s, float("-inf"))
    # Every block holds at least one real key, so m_new is finite and no row sees (-inf) - (-inf).
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_V:
        v = _load_tile(v_ptrs, offs_n, N, offs_d, HEAD_DIM, MASK_N, not EVEN_D)    # (BLOCK_N, BLOCK_D)
        p = p.to(v.dtype)  # rounded to v's dtype, as the tensor cores take it
        if F32_DOT:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
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
    F32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Flash-attention forward for one (b, h) and one block of BLOCK_M query rows.

    Q, K, V: (B, H, N, HEAD_DIM) read through strides. Out: (B, H, N, HEAD_DIM) in Q's dtype,
    softmax(Q K^T * scale) V, written only if HAS_V. Lse: (B, H, N) float32 contiguous,
    LSE_i = log sum_j exp(q_i . k_j * scale). qk_scale = scale * log2(e). F32_DOT: dot operands
    go through float32 (the interpreter, whose bfloat16 dot is wrong; see _f32_dot).
    """
    # One flat grid, query blocks fastest: programs of one head run side by side and share K, V in
    # L2, and B * H is not bound by the 65535 limit of the grid's second axis.
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    pid_bh = pid // num_m_blocks
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh
              + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd)
    # K is read transposed, (BLOCK_D, BLOCK_N), so the logits are a plain q @ kt.
    k_ptrs = (K + off_b * stride_kb + off_h * stride_kh
              + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn)
    v_ptrs = (V + off_b * stride_vb + off_h * stride_vh
              + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)

    # Padded query rows load as 0: their logits are 0, finite, and they are never stored.
    q = _load_tile(q_ptrs, offs_m, N, offs_d, HEAD_DIM, not EVEN_M, not EVEN_D)
    if F32_DOT:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    # Full key blocks without masks, then at most one masked tail block.
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _attention_step(acc, m_i, l_i, q, k_ptrs + start_n * stride_kn,
                                        v_ptrs + start_n * stride_vn, start_n + offs_n, offs_d, N,
                                        qk_scale, HEAD_DIM, False, EVEN_D, HAS_V, F32_DOT, DOT_PRECISION)
    if not EVEN_N:
        acc, m_i, l_i = _attention_step(acc, m_i, l_i, q, k_ptrs + n_full * stride_kn,
                                        v_ptrs + n_full * stride_vn, n_full + offs_n, offs_d, N,
                                        qk_scale, HEAD_DIM, True, EVEN_D, HAS_V, F32_DOT, DOT_PRECISION)

    lse = (m_i + tl.log2(l_i)) * _LN2
    lse_ptrs = Lse + pid_bh.to(tl.int64) * N + offs_m
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=offs_m < N)
    if HAS_V:
        out = (acc / l_i[:, None]).to(Out.dtype.element_ty)
        o_ptrs = (Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on
                  + offs_d[None, :] * stride_od)
        if EVEN_M:
            if EVEN_D:
                tl.store(o_ptrs, out)
            else:
                tl.store(o_ptrs, out, mask=offs_d[None, :] < HEAD_DIM)
        else:
            if EVEN_D:
                tl.store(o_ptrs, out, mask=offs_m[:, None] < N)
            else:
                tl.store(o_ptrs, out, mask=(offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _importance_step(acc, kt, q_ptrs, lse_ptrs, offs_m, offs_d, N, qk_scale,
                     HEAD_DIM: tl.constexpr, MASK_M: tl.constexpr, EVEN_D: tl.constexpr,
                     F32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Adds exp(q_i . k_j * scale - LSE_i) of one query block to the (BLOCK_M, BLOCK_N) running sums.
    Padded query rows read LSE = +inf, so they add exp2(-inf) = 0 without a select."""
    q = _load_tile(q_ptrs, offs_m, N, offs_d, HEAD_DIM, MASK_M, not EVEN_D)        # (BLOCK_M, BLOCK_D)
    if F32_DOT:
        q = q.to(tl.float32)
    if MASK_M:
        lse = tl.load(lse_ptrs, mask=offs_m < N, other=float("inf"))
    else:
        lse = tl.load(lse_ptrs)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION)                # (BLOCK_M, BLOCK_N)
    return acc + tl.exp2(s * qk_scale - (lse * _LOG2E)[:, None])


@triton.jit
def _importance_kernel(
    Q, K, Lse, Scores,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_lb, stride_lh, stride_ln,
    H, N, num_n_blocks, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, F32_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Global token importance for one (b, h) and one block of BLOCK_N key columns.

    Q, K: (B, H, N, HEAD_DIM) and Lse: (B, H, N) float32, all read through strides.
    Scores: (B, H, N) float32 contiguous, s_j = (1/N) sum_i exp(q_i . k_j * scale - LSE_i).
    qk_scale = scale * log2(e). Loops over every query block in a fixed order: deterministic.
    F32_DOT as in _attention_fwd_kernel.
    """
    pid = tl.program_id(0)
    pid_n = pid % num_n_blocks
    pid_bh = pid // num_n_blocks
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptrs = (K + off_b * stride_kb + off_h * stride_kh
              + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn)
    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh
              + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd)
    lse_ptrs = Lse + off_b * stride_lb + off_h * stride_lh + offs_m * stride_ln

    # This program's keys stay resident; padded key columns load as 0 and are never stored.
    kt = _load_tile(k_ptrs, offs_d, HEAD_DIM, offs_n, N, not EVEN_D, not EVEN_N)   # (BLOCK_D, BLOCK_N)
    if F32_DOT:
        kt = kt.to(tl.float32)
    # Sums stay 2-D until the end: adding tiles is thread-local, while a column reduction per
    # query block would cross warps every iteration.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    m_full = (N // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        acc = _importance_step(acc, kt, q_ptrs + start_m * stride_qn, lse_ptrs + start_m * stride_ln,
                               start_m + offs_m, offs_d, N, qk_scale, HEAD_DIM, False, EVEN_D, F32_DOT,
                               DOT_PRECISION)
    if not EVEN_M:
        acc = _importance_step(acc, kt, q_ptrs + m_full * stride_qn, lse_ptrs + m_full * stride_ln,
                               m_full + offs_m, offs_d, N, qk_scale, HEAD_DIM, True, EVEN_D, F32_DOT,
                               DOT_PRECISION)

    scores = tl.sum(acc, 0) / N
    s_ptrs = Scores + pid_bh.to(tl.int64) * N + offs_n
    if EVEN_N:
        tl.store(s_ptrs, scores)
    else:
        tl.store(s_ptrs, scores, mask=offs_n < N)


# -------------------------------------------------------------------------------- launchers
def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _f32_dot(t: Tensor) -> bool:
    # Triton's interpreter keeps bfloat16 as raw uint16 bits and its tl.dot multiplies those bits
    # (triton-lang/triton#11584; its docs: cast bfloat16 to float32 first). Products of bfloat16
    # values are exact in float32, so this changes only the summation order, not the precision.
    return not t.is_cuda and t.dtype == torch.bfloat16


def _dot_precision(t: Tensor) -> str:
    """input_precision of every tl.dot; it matters only for float32 operands. On GPUs with TF32
    (sm_80+), "tf32x3" splits each float32 operand into a TF32 high part and a TF32 remainder and
    sums three tensor-core products: float32-level error (measured on an H100 at ViT-B sizes: as
    close to a float64 reference as "ieee") at 5 to 8 times its speed."""
    if t.is_cuda and t.dtype == torch.float32 and torch.cuda.get_device_capability(t.device)[0] >= 8:
        return "tf32x3"
    return "ieee"


def _device_guard(t: Tensor):
    # Triton launches on the current CUDA device; make it the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _attention_config(t: Tensor, block_d: int, has_v: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward, from a sweep on an H100 at ViT-B
    sizes (B=4, H=12, N=4097)."""
    if not t.is_cuda:
        # The interpreter: small blocks, so that tests with N < 70 cross several blocks and tails.
        return 32, 16, 4, 1
    if t.dtype == torch.float32:
        if _dot_precision(t) == "ieee" or block_d > 64:
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
    if not t.is_cuda:
        return 16, 32, 4, 1
    if t.dtype == torch.float32 and (_dot_precision(t) == "ieee" or block_d > 64):
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
    block_d = _block_d(d)
    has_v = v is not None
    bm, bn, num_warps, num_stages = _attention_config(q, block_d, has_v)
    bm, bn = block_m or bm, block_n or bn
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    out = torch.empty_like(q) if has_v else None
    # Without v the V and Out arguments are never read (HAS_V compiles their code away).
    v_arg, o_arg = (v, out) if has_v else (k, lse)
    v_strides = v.stride() if has_v else (0, 0, 0, 0)
    o_strides = out.stride() if has_v else (0, 0, 0, 0)
    num_m_blocks = triton.cdiv(N, bm)
    with _device_guard(q):
        _attention_fwd_kernel[(num_m_blocks * B * H,)](
            q, k, v_arg, o_arg, lse,
            *q.stride(), *k.stride(), *v_strides, *o_strides,
            H, N, num_m_blocks, d ** -0.5 * LOG2E,
            HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
            EVEN_M=N % bm == 0, EVEN_N=N % bn == 0, EVEN_D=d == block_d, HAS_V=has_v,
            F32_DOT=_f32_dot(q), DOT_PRECISION=_dot_precision(q),
            num_warps=num_warps, num_stages=num_stages,
        )
    return out, lse


def token_importance_forward(q: Tensor, k: Tensor, lse: Tensor, *, block_m: Optional[int] = None,
                             block_n: Optional[int] = None) -> Tensor:
    """q, k: (B, H, N, d), any strides; lse: (B, H, N) float32, any strides.
    Returns the global importance scores (B, H, N) float32 contiguous.
    block_m (query rows streamed) / block_n (key columns held) override the block sizes."""
    B, H, N, d = q.shape
    block_d = _block_d(d)
    bm, bn, num_warps, num_stages = _importance_config(q, block_d)
    bm, bn = block_m or bm, block_n or bn
    scores = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    num_n_blocks = triton.cdiv(N, bn)
    with _device_guard(q):
        _importance_kernel[(num_n_blocks * B * H,)](
            q, k, lse, scores,
            *q.stride(), *k.stride(), *lse.stride(),
            H, N, num_n_blocks, d ** -0.5 * LOG2E,
            HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
            EVEN_M=N % bm == 0, EVEN_N=N % bn == 0, EVEN_D=d == block_d, F32_DOT=_f32_dot(q),
            DOT_PRECISION=_dot_precision(q), num_warps=num_warps, num_stages=num_stages,
        )
    return scores


__all__ = ["attention_forward", "token_importance_forward"]
