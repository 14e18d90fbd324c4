"""Fused top-n selection and gather of the frozen branch's keys and values (docs/method.md, section 2).

For every (b, h) row: keep the n tokens with the highest score, and copy their K and V rows, in
ascending token index, into (B, H, n, d) outputs of the requested dtype. One launch, one program per
row, no sort and no index tensor in memory (top-k then gather is three passes and two launches);
when asked (return_indices), the gather also stores each kept token's index into a (B, H, n) int64
output, from the slots it computes anyway.

Algorithm, per row:
1. Keys. Each score, widened to fp32, becomes a monotone uint32 key: -0.0 is first made +0.0 (they
   compare equal in torch), then negatives have all bits flipped and non-negatives their sign bit,
   so that unsigned key order is float order. Every NaN gets the largest key, 0xFFFFFFFF.
2. Threshold. T = the n-th largest key = the largest t with #(key >= t) >= n, built greedily from
   the top bit down: 32 steps, each counting the keys >= (prefix | bit) with one reduction over the
   row. The smallest rejected candidate is T + 1, so c_gt = #(key > T) is the largest count seen
   among rejected candidates (0 if none was rejected): no extra pass.
3. Gather. In index order, chunk by chunk: keep key > T, and key == T while the running count of
   ties (tl.cumsum carried across chunks) is <= n - c_gt. A kept token's output slot is the running
   count of kept tokens before it; its K and V rows are loaded (masked: dropped rows cost no memory
   traffic) and stored to that slot, cast to the output dtype.

Ties at the n-th score go to the lower token index; on distinct scores the kept set is torch.topk's.
NaN (either sign) ranks above +inf, and NaNs tie with each other (the lower index wins among them):
the reference's stable descending sort keeps the same set on the CPU (torch's CUDA sort ranks NaNs
with the sign bit set last). No gradient (the selected rows are constants).

Block sizes: rows of N <= MAX_BLOCK_N tokens are held whole in registers for step 2 (a constexpr
single-chunk path); longer rows are re-read in chunks of MAX_BLOCK_N for each of the 32 steps (from
L1/L2: a row of scores is N * 4 bytes at most). Step 3 walks the row in chunks of BLOCK_G tokens,
BLOCK_G * BLOCK_D ~ GATHER_TILE elements, BLOCK_D = next power of two of d; 8 warps when a block
holds 4096 elements or more, else 4 (on an H100, 4 and 8 warps were within 3% for N <= 4097, and 8
were 16% faster for N = 16385; halving or doubling the gather tile cost 20-60%).

Limits: d <= 128 (fpt_fast.ops enforces it); scores float32/float16/bfloat16; k and v of one dtype,
read through their strides (no copy for views of a fused qkv tensor); outputs contiguous.

Caution: tested under TRITON_INTERPRET=1 on the CPU (Triton 3.8) and on one H100 (Triton 3.6,
torch 2.11: tests/ops/test_select_tokens.py, all passing), no other GPU. The interpreter truncates
fp32 -> bf16 where a GPU rounds to nearest even (as torch does), so CPU tests of bf16 outputs use
values exact in bf16. Measured on the H100 (bf16 k, v, fp32 scores, d = 64, n = floor(0.2 N)):
B = 32, H = 12, N = 1025: 37 us, N = 4097: 117 us (1.4 TB/s effective; torch.topk + two gathers:
80 and 241 us). Rows longer than MAX_BLOCK_N pay 32 passes over the scores: N = 16385 with only
B * H = 96 rows (fewer programs than SMs) took 324 us against 233 us for topk + gather.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import block_d, device_guard

# Rows up to this many tokens take the single-chunk path; longer rows loop over chunks of it
# (16384 was slower on an H100: register pressure of the whole row).
MAX_BLOCK_N = 8192
# Elements of one (BLOCK_G, BLOCK_D) gather tile: 32 per thread with 8 warps.
GATHER_TILE = 8192

_INT32_MIN = tl.constexpr(-2**31)
_FLOAT_ABS = tl.constexpr(0x7FFFFFFF)
_FLOAT_INF = tl.constexpr(0x7F800000)


@triton.jit
def _score_keys(row_ptr, tok, N, stride_sn):
    """Monotone uint32 keys of the scores at positions tok (BLOCK,) of one row.

    key(a) < key(b) iff a < b as floats, -0.0 and +0.0 share one key, every NaN maps to 0xFFFFFFFF.
    Positions >= N get key 0, below every real key (-inf maps to 0x007FFFFF), so they are never
    counted nor kept.
    """
    inside = tok < N
    s = tl.load(row_ptr + tok * stride_sn, mask=inside, other=0.0).to(tl.float32)
    bits = s.to(tl.int32, bitcast=True)
    # Bit tests rather than float ones: immune to fast-math folding of x + 0.0 or x != x.
    bits = tl.where(bits == _INT32_MIN, 0, bits)
    is_nan = (bits & _FLOAT_ABS) > _FLOAT_INF
    # bits >> 31 is arithmetic: all ones for negatives (flip everything), 0 otherwise (flip sign).
    key = bits ^ ((bits >> 31) | _INT32_MIN)
    key = tl.where(is_nan, -1, key)
    key = tl.where(inside, key, 0)
    return key.to(tl.uint32, bitcast=True)


@triton.jit
def _select_tokens_kernel(
    scores_ptr, k_ptr, v_ptr, k_out_ptr, v_out_ptr, index_out_ptr,
    H, N, n, d,
    stride_sb, stride_sh, stride_sn,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
    WRITE_INDEX: tl.constexpr,
):
    """k_out[b, h, i] = k[b, h, j_i], v_out[b, h, i] = v[b, h, j_i], with j_0 < ... < j_{n-1} the
    n tokens of the highest scores[b, h, :] (ties at the n-th score: lowest indices first).

    scores (B, H, N); k, v (B, H, N, d) through strides; k_out, v_out (B, H, n, d) contiguous.
    WRITE_INDEX: index_out[b, h, i] = j_i too ((B, H, n) int64 contiguous; never touched otherwise).
    Grid: (B * H,), one program per row. SINGLE_CHUNK: N <= BLOCK_N, the row's keys stay in registers.
    """
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    s_row = scores_ptr + b * stride_sb + h * stride_sh
    k_row = k_ptr + b * stride_kb + h * stride_kh
    v_row = v_ptr + b * stride_vb + h * stride_vh
    out_offset = pid.to(tl.int64) * n * d
    k_out_row = k_out_ptr + out_offset
    v_out_row = v_out_ptr + out_offset

    # ---- threshold: the n-th largest key, by bisection over the 32 key bits (MSB first)
    offs = tl.arange(0, BLOCK_N)
    if SINGLE_CHUNK:
        keys = _score_keys(s_row, offs, N, stride_sn)
    thr = tl.full([], 0, tl.uint32)
    step = tl.full([], 1, tl.uint32) << 31
    c_gt = tl.full([], 0, tl.int32)
    for _ in range(32):
        cand = thr | step
        if SINGLE_CHUNK:
            count = tl.sum((keys >= cand).to(tl.int32), axis=0)
        else:
            count = tl.full([], 0, tl.int32)
            for start in range(0, N, BLOCK_N):
                chunk = _score_keys(s_row, start + offs, N, stride_sn)
                count += tl.sum((chunk >= cand).to(tl.int32), axis=0)
        take = count >= n
        thr = tl.where(take, cand, thr)
        # Rejected candidates are all > T and T + 1 is one of them: the largest count is #(key > T).
        c_gt = tl.where(take, c_gt, tl.maximum(c_gt, count))
        step = step >> 1

    # ---- gather: kept tokens in index order, each to its slot (running count of kept tokens)
    ties_to_keep = n - c_gt
    ties_seen = tl.full([], 0, tl.int32)
    kept = tl.full([], 0, tl.int32)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < d
    offs_g = tl.arange(0, BLOCK_G)
    for start in range(0, N, BLOCK_G):
        tok = start + offs_g
        key = _score_keys(s_row, tok, N, stride_sn)
        tie = (key == thr).to(tl.int32)
        keep = (key > thr) | ((tie != 0) & (ties_seen + tl.cumsum(tie, axis=0) <= ties_to_keep))
        keep_i = keep.to(tl.int32)
        slot = kept + tl.cumsum(keep_i, axis=0) - 1
        tok64 = tok.to(tl.int64)  # token * stride can pass 2**31 for long rows of a fused qkv
        mask = keep[:, None] & col_ok[None, :]
        k_rows = tl.load(k_row + tok64[:, None] * stride_kn + cols[None, :] * stride_kd, mask=mask)
        v_rows = tl.load(v_row + tok64[:, None] * stride_vn + cols[None, :] * stride_vd, mask=mask)
        dst = slot[:, None] * d + cols[None, :]
        tl.store(k_out_row + dst, k_rows.to(k_out_ptr.dtype.element_ty), mask=mask)
        tl.store(v_out_row + dst, v_rows.to(v_out_ptr.dtype.element_ty), mask=mask)
        if WRITE_INDEX:
            tl.store(index_out_ptr + pid.to(tl.int64) * n + slot, tok64, mask=keep)
        ties_seen += tl.sum(tie, axis=0)
        kept += tl.sum(keep_i, axis=0)


def select_tokens_forward(scores: Tensor, k: Tensor, v: Tensor, n: int, out_dtype: torch.dtype, *,
                          return_indices: bool = False, block_n: Optional[int] = None,
                          block_g: Optional[int] = None) -> Tuple[Tensor, ...]:
    """scores (B, H, N); k, v (B, H, N, d) -> k_sel, v_sel (B, H, n, d) contiguous in out_dtype,
    ascending token index, and with return_indices the kept token indices (B, H, n) int64.
    block_n / block_g (powers of two) override the chunk sizes (for tests)."""
    B, H, N, d = k.shape
    k_sel = torch.empty((B, H, n, d), device=k.device, dtype=out_dtype)
    v_sel = torch.empty((B, H, n, d), device=v.device, dtype=out_dtype)
    # Without indices the kernel gets k_sel in their place and never writes through it (WRITE_INDEX).
    index = torch.empty((B, H, n), device=k.device, dtype=torch.int64) if return_indices else k_sel
    BLOCK_D = block_d(d)
    BLOCK_N = block_n or min(MAX_BLOCK_N, max(16, triton.next_power_of_2(N)))
    BLOCK_G = block_g or min(max(16, triton.next_power_of_2(N)), max(16, GATHER_TILE // BLOCK_D))
    num_warps = 8 if max(BLOCK_N, BLOCK_G * BLOCK_D) >= 4096 else 4
    with device_guard(k):
        _select_tokens_kernel[(B * H,)](
            scores, k, v, k_sel, v_sel, index,
            H, N, n, d,
            *scores.stride(), *k.stride(), *v.stride(),
            BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, SINGLE_CHUNK=N <= BLOCK_N,
            WRITE_INDEX=return_indices, num_warps=num_warps,
        )
    return (k_sel, v_sel, index) if return_indices else (k_sel, v_sel)
