"""Fused top-n selection and gather of the frozen branch's keys and values (docs/method.md, section 2).

For every (b, h) row: keep the n tokens with the highest score, and copy their K and V rows, in
ascending token index, into (B, H, n, d) outputs of the requested dtype. No sort and no index tensor
of the whole row in memory (top-k then gather is three passes and two launches); when asked
(return_indices), the gather also stores each kept token's index into a (B, H, n) int64 output, from
the slots it computes anyway.

Algorithm, per row:
1. Keys. Each score, widened to fp32, becomes a monotone uint32 key: -0.0 is first made +0.0 (they
   compare equal in torch), then negatives have all bits flipped and non-negatives their sign bit,
   so that unsigned key order is float order. Every NaN gets the largest key, 0xFFFFFFFF.
2. Threshold (_nth_key). T = the n-th largest key = the largest t with #(key >= t) >= n, built
   greedily from the top bit down, each step counting the keys >= (prefix | bit) with one reduction
   over the row. The smallest rejected candidate is T + 1, so c_gt = #(key > T) is the largest count
   seen among rejected candidates: no extra pass. A candidate whose count is exactly n ends the search
   (every key >= it is kept): on distinct scores (torch.rand / randn rows, n = floor(0.2 N), counted
   here on the CPU) 16-21 of the 32 steps on average at N = 1025 to 16385. Rows of up to
   MAX_RESIDENT tokens keep their keys in registers, as two blocks of whole chunks (a power of two of
   chunks, then the rest rounded up to a power of two: 16385 tokens take 16512 slots, not 32768);
   longer rows are re-read from L1/L2 for every step.
3. Gather (_gather_tile), in chunks of BLOCK_G tokens: keep key > T, and key == T while the running
   count of ties is <= n - c_gt. A kept token's output slot is the count of kept tokens before it;
   its K and V rows are loaded (masked: dropped rows cost no memory traffic) and stored to that slot,
   cast to the output dtype.

Two paths run these steps (select_tokens_forward picks by shape; both are launch VARIANTS):
- "split" (rows of SPLIT_MIN_TILES chunks or more): two launches. _plan_kernel, one program per row,
  finds (T, ties_to_keep) and, in one more pass over the row, every chunk's kept_before and
  ties_before (per-chunk counts, tl.cumsum across chunks) into a small int32 plan (B * H, chunks + 1,
  2). _gather_kernel then runs one program per (row, chunk): its slots start at kept_before, its tie
  ranks at ties_before, so no program waits on another and the copy has B * H * chunks programs in
  flight (12384 at N = 16385, B * H = 96) instead of one serial walk per row.
- "rowwise": one launch, one program per row: the threshold, then the row's chunks in token order
  with running counts (the structure of the previous version of this file, with its threshold search
  replaced by the one above). One launch fewer; used for rows of one chunk.

Ties at the n-th score go to the lower token index; on distinct scores the kept set is torch.topk's.
NaN (either sign) ranks above +inf, and NaNs tie with each other (the lower index wins among them):
the reference's stable descending sort keeps the same set on the CPU (torch's CUDA sort ranks NaNs
with the sign bit set last). No gradient (the selected rows are constants).

Why bisection and not a radix select with histograms: tl.histogram lowers (Triton's
HistogramOpToLLVM) to one warp ballot per bit of the bin index and one popcount per bin a lane owns,
roughly 100 instructions per element for 256 bins, so 4 passes of 8 bits cost some 400 per element;
a bisection step over held keys compiles to about 4 per key (compare, select, add: sm_90 SASS
compiled here), some 80 for a whole search, plus one block reduction per step. The time of the
previous version went to the gather: one program per row walked its chunks one after another (at
N = 16385 with 96 rows, fewer programs than SMs, 129 dependent chunk iterations per program).

Blocks: BLOCK_G * BLOCK_D ~ GATHER_TILE elements per gather tile, BLOCK_D = next power of two of d
(for d = 64: 128 tokens); tiles of 4096 elements or more take 8 warps, else 4. The threshold search
takes 4 to 16 warps (about KEYS_PER_THREAD held keys per thread) and may use a whole SM's registers
(maxnreg). Compiled here for sm_90 without a GPU (Triton 3.8, its ptxas), bf16 k/v at d = 64:
_plan_kernel 40 / 95 / 77 registers at N = 1025 / 4097 / 16385 (4 / 4 / 16 warps), _gather_kernel 48
(8 warps, 16-byte loads and stores), no spills; without maxnreg ptxas held 16 warps to 64 registers
and spilled, and without _opaque it kept 3 registers per held key.

Limits: d <= 128 (fpt_fast.ops enforces it); scores float32/float16/bfloat16; k and v of one dtype,
read through their strides (no copy for views of a fused qkv tensor); outputs contiguous. Rows
longer than MAX_RESIDENT tokens (N > 32768, beyond 2896 px at patch 16) re-read their scores for
every bisection step (correct, slower).

Caution: the previous version (one program per row, 32 full bisection passes) was tested on one H100
(Triton 3.6, torch 2.11) and measured there (bf16 k, v, fp32 scores, d = 64, n = floor(0.2 N)):
B = 32, H = 12, N = 1025: 37 us, N = 4097: 117 us, and B = 8, N = 16385: 324 us, against 80, 241 and
233 us for torch.topk + two gathers. THIS version (both paths, the early end of the search, the held
two-block keys, _opaque, maxnreg) has run only under TRITON_INTERPRET=1 on the CPU (Triton 3.8:
tests/ops/test_select_tokens.py forces each path, small tiles and the re-reading search) and been
compiled for sm_90 here; it is unmeasured on a GPU: benchmarks/kernels.py times the default, every
VARIANTS entry and topk + gather in one run ("triton:<variant>" rows of select_tokens). The
interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even (as torch does), so CPU tests
of bf16 outputs use values exact in bf16.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRETED, block_d, device_guard

# Tokens of one row whose keys the threshold search holds in registers (16 warps: 64 per thread);
# longer rows are re-read in blocks of REREAD_TOKENS for each bisection step.
MAX_RESIDENT = 32768
REREAD_TOKENS = 8192
# Held keys per thread the threshold search aims at, and tokens per step of the plan's counts
# (sm_90 code compiled here for N = 16385: 16 warps, 77 registers, no spills).
KEYS_PER_THREAD = 32
PLAN_TOKENS = 4096
# Elements of one (BLOCK_G, BLOCK_D) gather tile.
GATHER_TILE = 8192
# Rows of at least this many gather tiles take the split path.
SPLIT_MIN_TILES = 2
PATHS = ("split", "rowwise")
# Launch variants (keyword arguments of select_tokens_forward) that benchmarks/kernels.py times
# against the default choice in the same run and tests/ops/test_gpu_checks.py checks.
VARIANTS = {
    "split": {"path": "split"},
    "rowwise": {"path": "rowwise"},
    "split:gather_warps=4": {"path": "split", "gather_warps": 4},
    "split:half_tile": {"path": "split", "tile_scale": 0.5},
}

_INT32_MIN = tl.constexpr(-2**31)
_FLOAT_ABS = tl.constexpr(0x7FFFFFFF)
_FLOAT_INF = tl.constexpr(0x7F800000)
# Inline PTX runs on NVIDIA GPUs only (not under the interpreter, not on ROCm).
_PTX = tl.constexpr(not INTERPRETED and torch.version.hip is None)


@triton.jit
def _score_keys(row_ptr, tok, N, stride_sn):
    """Monotone uint32 keys of the scores at positions tok (any shape) of one row.

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
def _opaque(keys):
    """keys, unchanged, but opaque to the compiler on NVIDIA GPUs. Without it LLVM folds the NaN and
    padding selects of _score_keys into every comparison of the bisection loop and keeps each held
    key's raw bits and token position alive with it: 3 registers per key and about 1.5x the
    instructions per step (seen in sm_90 SASS compiled here; ptxas spilled at N = 16385)."""
    if _PTX:
        keys = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [keys], dtype=tl.uint32, is_pure=True,
                                         pack=1)
    return keys


@triton.jit
def _chunk_tokens(first_chunk, CHUNKS: tl.constexpr, CHUNK: tl.constexpr):
    """Token positions (CHUNKS, CHUNK) of CHUNKS consecutive chunks from chunk first_chunk."""
    return (first_chunk + tl.arange(0, CHUNKS))[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]


@triton.jit
def _nth_key(s_row, N, n, stride_sn,
             CHUNK: tl.constexpr, CHUNKS_A: tl.constexpr, CHUNKS_B: tl.constexpr, RESIDENT: tl.constexpr):
    """(T, ties_to_keep) of one row: keep the keys > T and the first ties_to_keep keys == T in token
    order, and exactly n tokens are kept (the n highest scores, ties to the lower index).

    Bisection over the 32 key bits, MSB first: T is the largest t with #(key >= t) >= n. RESIDENT:
    the row's keys stay in registers as blocks A (CHUNKS_A, CHUNK) and B (CHUNKS_B, CHUNK; none if
    CHUNKS_B == 0) covering the row; otherwise every step re-reads the row in blocks of A's shape.
    A candidate with #(key >= t) == n exactly ends the search early (then every key >= t is kept).
    """
    tok_a = _chunk_tokens(0, CHUNKS_A, CHUNK)
    if RESIDENT:
        keys_a = _opaque(_score_keys(s_row, tok_a, N, stride_sn))
        if CHUNKS_B > 0:
            keys_b = _opaque(_score_keys(s_row, _chunk_tokens(CHUNKS_A, CHUNKS_B, CHUNK), N, stride_sn))
    thr = tl.full([], 0, tl.uint32)
    step = tl.full([], 1, tl.uint32) << 31
    c_gt = tl.full([], 0, tl.int32)
    while step != 0:
        cand = thr | step
        if RESIDENT:
            count = tl.sum((keys_a >= cand).to(tl.int32))
            if CHUNKS_B > 0:
                count += tl.sum((keys_b >= cand).to(tl.int32))
        else:
            count = tl.full([], 0, tl.int32)
            for start in range(0, N, CHUNKS_A * CHUNK):
                count += tl.sum((_score_keys(s_row, start + tok_a, N, stride_sn) >= cand).to(tl.int32))
        take = count >= n
        thr = tl.where(take, cand, thr)
        # Rejected candidates are all > the final T; without an early end, T + 1 is one of them, so
        # the largest count seen among them is #(key > T). After an early end it is at most
        # #(key > T), and n minus it covers every tie.
        c_gt = tl.where(take, c_gt, tl.maximum(c_gt, count))
        step = tl.where(count == n, tl.full([], 0, tl.uint32), step >> 1)
    return thr, n - c_gt


@triton.jit
def _plan_chunks(s_row, plan_row, first_chunk, N, S, stride_sn, thr, ties_to_keep, gt_seen, ties_seen,
                 CHUNK: tl.constexpr, CHUNKS: tl.constexpr):
    """Stores (kept_before, ties_before) of CHUNKS chunks from first_chunk: the kept tokens and the
    keys == thr in the row before each chunk, given gt_seen / ties_seen, the keys > thr and == thr
    before first_chunk. Returns those two counts after the CHUNKS chunks."""
    key = _score_keys(s_row, _chunk_tokens(first_chunk, CHUNKS, CHUNK), N, stride_sn)
    gt = tl.sum((key > thr).to(tl.int32), axis=1)
    tie = tl.sum((key == thr).to(tl.int32), axis=1)
    gt_before = gt_seen + tl.cumsum(gt, axis=0) - gt
    ties_before = ties_seen + tl.cumsum(tie, axis=0) - tie
    chunk = first_chunk + tl.arange(0, CHUNKS)
    inside = chunk < S
    tl.store(plan_row + 2 + 2 * chunk, gt_before + tl.minimum(ties_before, ties_to_keep), mask=inside)
    tl.store(plan_row + 3 + 2 * chunk, ties_before, mask=inside)
    return gt_seen + tl.sum(gt, axis=0), ties_seen + tl.sum(tie, axis=0)


@triton.jit
def _gather_tile(tok, key, thr, ties_to_keep, ties_before, kept_before,
                 k_row, v_row, k_out_row, v_out_row, index_out_row, d,
                 stride_kn, stride_kd, stride_vn, stride_vd, BLOCK_D: tl.constexpr, WRITE_INDEX: tl.constexpr):
    """Copies the kept rows among tokens tok (BLOCK,) (keys key) to their output slots: key > thr,
    or key == thr while the ties up to it (ties_before + running count) are <= ties_to_keep; a kept
    token's slot is kept_before + the kept tokens before it in the tile. Rows are loaded masked
    (dropped rows cost no memory traffic) and cast to the output dtype. Returns the tile's counts
    of ties and of kept tokens."""
    tie = (key == thr).to(tl.int32)
    keep = (key > thr) | ((tie != 0) & (ties_before + tl.cumsum(tie, axis=0) <= ties_to_keep))
    keep_i = keep.to(tl.int32)
    slot = kept_before + tl.cumsum(keep_i, axis=0) - 1
    cols = tl.arange(0, BLOCK_D)
    tok64 = tok.to(tl.int64)  # token * stride can pass 2**31 for long rows of a fused qkv
    mask = keep[:, None] & (cols < d)[None, :]
    k_rows = tl.load(k_row + tok64[:, None] * stride_kn + cols[None, :] * stride_kd, mask=mask)
    v_rows = tl.load(v_row + tok64[:, None] * stride_vn + cols[None, :] * stride_vd, mask=mask)
    dst = slot[:, None] * d + cols[None, :]
    tl.store(k_out_row + dst, k_rows.to(k_out_row.dtype.element_ty), mask=mask)
    tl.store(v_out_row + dst, v_rows.to(v_out_row.dtype.element_ty), mask=mask)
    if WRITE_INDEX:
        tl.store(index_out_row + slot, tok64, mask=keep)
    return tl.sum(tie, axis=0), tl.sum(keep_i, axis=0)


@triton.jit
def _rowwise_kernel(
    scores_ptr, k_ptr, v_ptr, k_out_ptr, v_out_ptr, index_out_ptr,
    H, N, n, d,
    stride_sb, stride_sh, stride_sn,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    CHUNK: tl.constexpr, CHUNKS_A: tl.constexpr, CHUNKS_B: tl.constexpr, RESIDENT: tl.constexpr,
    BLOCK_D: tl.constexpr, WRITE_INDEX: tl.constexpr,
):
    """One program per (b, h) row: the row's threshold, then its kept rows tile by tile in token order.

    k_out[b, h, i] = k[b, h, j_i], v_out[b, h, i] = v[b, h, j_i], with j_0 < ... < j_{n-1} the n tokens
    of the highest scores[b, h, :] (ties at the n-th score: lowest indices first). scores (B, H, N);
    k, v (B, H, N, d) through strides; k_out, v_out (B, H, n, d) contiguous. WRITE_INDEX:
    index_out[b, h, i] = j_i too ((B, H, n) int64 contiguous; never touched otherwise). Grid (B * H,).
    """
    row = tl.program_id(0).to(tl.int64)
    b, h = row // H, row % H
    s_row = scores_ptr + b * stride_sb + h * stride_sh
    thr, ties_to_keep = _nth_key(s_row, N, n, stride_sn, CHUNK, CHUNKS_A, CHUNKS_B, RESIDENT)
    ties_seen = tl.full([], 0, tl.int32)
    kept = tl.full([], 0, tl.int32)
    offs = tl.arange(0, CHUNK)
    for start in range(0, N, CHUNK):
        tok = start + offs
        ties, kept_here = _gather_tile(
            tok, _score_keys(s_row, tok, N, stride_sn), thr, ties_to_keep, ties_seen, kept,
            k_ptr + b * stride_kb + h * stride_kh, v_ptr + b * stride_vb + h * stride_vh,
            k_out_ptr + row * n * d, v_out_ptr + row * n * d, index_out_ptr + row * n, d,
            stride_kn, stride_kd, stride_vn, stride_vd, BLOCK_D, WRITE_INDEX)
        ties_seen += ties
        kept += kept_here


@triton.jit
def _plan_kernel(
    scores_ptr, plan_ptr, H, N, n, S,
    stride_sb, stride_sh, stride_sn,
    CHUNK: tl.constexpr, CHUNKS_A: tl.constexpr, CHUNKS_B: tl.constexpr, RESIDENT: tl.constexpr,
    PLAN_CHUNKS: tl.constexpr,
):
    """Split path, first launch: one program per (b, h) row writes the row's plan, plan[row] (int32,
    2 * (S + 1)): [T (uint32 bits), ties_to_keep, then per chunk of CHUNK tokens: kept_before,
    ties_before]. The counting pass re-reads the row PLAN_CHUNKS chunks at a time (from L1/L2).
    Grid (B * H,)."""
    row = tl.program_id(0).to(tl.int64)
    s_row = scores_ptr + (row // H) * stride_sb + (row % H) * stride_sh
    plan_row = plan_ptr + row * (2 * S + 2)
    thr, ties_to_keep = _nth_key(s_row, N, n, stride_sn, CHUNK, CHUNKS_A, CHUNKS_B, RESIDENT)
    tl.store(plan_row, thr.to(tl.int32, bitcast=True))
    tl.store(plan_row + 1, ties_to_keep)
    gt_seen = tl.full([], 0, tl.int32)
    ties_seen = tl.full([], 0, tl.int32)
    for first in range(0, S, PLAN_CHUNKS):
        gt_seen, ties_seen = _plan_chunks(s_row, plan_row, first, N, S, stride_sn, thr, ties_to_keep,
                                          gt_seen, ties_seen, CHUNK, PLAN_CHUNKS)


@triton.jit
def _gather_kernel(
    scores_ptr, plan_ptr, k_ptr, v_ptr, k_out_ptr, v_out_ptr, index_out_ptr,
    H, N, n, d, S,
    stride_sb, stride_sh, stride_sn,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_INDEX: tl.constexpr,
):
    """Split path, second launch: one program per (row, chunk of CHUNK tokens) copies the chunk's
    kept rows to their slots, from the row's plan (_plan_kernel). Outputs as _rowwise_kernel's.
    Grid (B * H * S,)."""
    pid = tl.program_id(0)
    row = (pid // S).to(tl.int64)
    chunk = pid % S
    b, h = row // H, row % H
    s_row = scores_ptr + b * stride_sb + h * stride_sh
    plan_row = plan_ptr + row * (2 * S + 2)
    thr = tl.load(plan_row).to(tl.uint32, bitcast=True)
    tok = chunk * CHUNK + tl.arange(0, CHUNK)
    _gather_tile(tok, _score_keys(s_row, tok, N, stride_sn), thr, tl.load(plan_row + 1),
                 tl.load(plan_row + 3 + 2 * chunk), tl.load(plan_row + 2 + 2 * chunk),
                 k_ptr + b * stride_kb + h * stride_kh, v_ptr + b * stride_vb + h * stride_vh,
                 k_out_ptr + row * n * d, v_out_ptr + row * n * d, index_out_ptr + row * n, d,
                 stride_kn, stride_kd, stride_vn, stride_vd, BLOCK_D, WRITE_INDEX)


# ------------------------------------------------------------------------------------ launcher
def _whole_sm_registers(warps: int) -> int:
    """maxnreg of a program running a threshold search: a whole SM's 65536 registers for one program
    of ``warps`` warps, at most 255 per thread (ptxas otherwise caps 16 warps at 64 registers per
    thread and spills)."""
    return min(255, 65536 // (32 * warps))


class Layout(NamedTuple):
    """How a row of N tokens is cut: chunks of `chunk` tokens (the gather tile and the split path's
    unit), `chunks` of them; the threshold search's blocks A and B of chunks_a and chunks_b chunks
    (resident: held in registers, covering the row; otherwise A's shape re-read along the row)."""

    chunk: int
    chunks: int
    chunks_a: int
    chunks_b: int
    resident: bool

    @property
    def threshold_warps(self) -> int:
        """Warps of the threshold search: about KEYS_PER_THREAD keys of block A per thread, 4 to 16."""
        return min(16, max(4, self.chunks_a * self.chunk // (32 * KEYS_PER_THREAD)))

    @property
    def threshold_registers(self) -> int:
        """maxnreg of the threshold search (_whole_sm_registers)."""
        return _whole_sm_registers(self.threshold_warps)

    @property
    def plan_chunks(self) -> int:
        """Chunks per step of the split path's counting pass (about PLAN_TOKENS tokens)."""
        return max(1, min(self.chunks_a, PLAN_TOKENS // self.chunk))


def layout(N: int, d: int, block_g: Optional[int] = None, max_resident: Optional[int] = None) -> Layout:
    """The Layout of rows of N tokens and head size d; block_g (tokens per gather tile) and
    max_resident (tokens the threshold search may hold), powers of two, override the defaults."""
    chunk = block_g or min(max(16, triton.next_power_of_2(N)), max(16, GATHER_TILE // block_d(d)))
    chunks = triton.cdiv(N, chunk)
    limit = max_resident or MAX_RESIDENT
    chunks_a = 1 << (chunks.bit_length() - 1)              # the largest power of two <= chunks
    chunks_b = triton.next_power_of_2(chunks - chunks_a) if chunks > chunks_a else 0
    if (chunks_a + chunks_b) * chunk <= limit:
        return Layout(chunk, chunks, chunks_a, chunks_b, True)
    return Layout(chunk, chunks, max(1, min(limit, REREAD_TOKENS) // chunk), 0, False)


def select_tokens_forward(scores: Tensor, k: Tensor, v: Tensor, n: int, out_dtype: torch.dtype, *,
                          return_indices: bool = False, path: Optional[str] = None,
                          block_g: Optional[int] = None, tile_scale: float = 1.0,
                          max_resident: Optional[int] = None,
                          gather_warps: Optional[int] = None) -> Tuple[Tensor, ...]:
    """scores (B, H, N); k, v (B, H, N, d) -> k_sel, v_sel (B, H, n, d) contiguous in out_dtype,
    ascending token index, and with return_indices the kept token indices (B, H, n) int64.

    path: "split" or "rowwise" (default: "split" for rows of SPLIT_MIN_TILES gather tiles or more).
    Launch overrides (VARIANTS; tests force small tiles and the re-reading threshold search with
    them): block_g, tokens per gather tile (a power of two), or tile_scale, a power of two times the
    default tile; max_resident, tokens the threshold search may hold (a power of two); gather_warps,
    warps of the split path's gather programs."""
    B, H, N, d = k.shape
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if block_g is None and tile_scale != 1.0:
        block_g = max(1, int(layout(N, d).chunk * tile_scale))
    lay = layout(N, d, block_g, max_resident)
    path = path or ("split" if lay.chunks >= SPLIT_MIN_TILES else "rowwise")
    k_sel = torch.empty((B, H, n, d), device=k.device, dtype=out_dtype)
    v_sel = torch.empty((B, H, n, d), device=v.device, dtype=out_dtype)
    # Without indices the kernels get k_sel in their place and never write through it (WRITE_INDEX).
    index = torch.empty((B, H, n), device=k.device, dtype=torch.int64) if return_indices else k_sel
    BLOCK_D = block_d(d)
    tile_warps = 8 if lay.chunk * BLOCK_D >= 4096 else 4
    threshold = dict(CHUNK=lay.chunk, CHUNKS_A=lay.chunks_a, CHUNKS_B=lay.chunks_b, RESIDENT=lay.resident)
    with device_guard(k):
        if path == "rowwise":
            warps = max(lay.threshold_warps, tile_warps)
            _rowwise_kernel[(B * H,)](
                scores, k, v, k_sel, v_sel, index, H, N, n, d,
                *scores.stride(), *k.stride(), *v.stride(),
                **threshold, BLOCK_D=BLOCK_D, WRITE_INDEX=return_indices,
                num_warps=warps, maxnreg=_whole_sm_registers(warps),
            )
        else:
            plan = torch.empty((B * H, lay.chunks + 1, 2), device=k.device, dtype=torch.int32)
            _plan_kernel[(B * H,)](
                scores, plan, H, N, n, lay.chunks, *scores.stride(),
                **threshold, PLAN_CHUNKS=lay.plan_chunks, num_warps=lay.threshold_warps,
                maxnreg=lay.threshold_registers,
            )
            _gather_kernel[(B * H * lay.chunks,)](
                scores, plan, k, v, k_sel, v_sel, index, H, N, n, d, lay.chunks,
                *scores.stride(), *k.stride(), *v.stride(),
                CHUNK=lay.chunk, BLOCK_D=BLOCK_D, WRITE_INDEX=return_indices,
                num_warps=gather_warps or tile_warps,
            )
    return (k_sel, v_sel, index) if return_indices else (k_sel, v_sel)
