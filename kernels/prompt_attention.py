"""Prompt cross-attention of the fine-grained fusion module (docs/method.md, section 4), fused.

For every extracted layer l, image b and head h, P prompt queries attend over the n selected keys:

    S = Q K^T * scale,  scale = d ** -0.5        (P x n, never stored)
    O = softmax(S) V                              (P x d), written at out[l, b, :, h*d:(h+1)*d]
    lse = logsumexp(S) per row                    (P,), float32, natural log; kept for backward

Backward recomputes the probabilities from lse (flash-attention style):

    Pr = exp(S - lse),  delta = rowsum(dO * O)
    dV = Pr^T dO,  dP = dO V^T,  dS = Pr * (dP - delta),  dQ = dS K * scale,  dK = dS^T Q * scale

Q is either shared by the batch, (L, H, P, d) read with a batch stride of 0, or per image,
(L, B, H, P, d). For the shared Q its gradient is the sum over the batch: every program sums the
images of one batch chunk in a fixed order in fp32, and a second small kernel adds the chunks in
order. No atomics anywhere, so forward and backward are bitwise reproducible.

Layout and limits:
- Every input is read through its strides (no copies); out (L, B, P, H*d) and lse (L, B, H, P) are
  allocated contiguous, dq/dk/dv with their inputs' strides (empty_like, as the fake impl in
  fpt_fast.ops promises). Offsets of the (l, b, h) base are computed in int64.
- d is padded to BLOCK_D = next power of two >= max(d, 16) (d <= 128 is what fpt_fast.ops lets
  through); P to a power of two >= 16, at most MAX_BLOCK_P rows per program. Larger P is split:
  forward over a second grid axis, backward over several launches that accumulate dK/dV in fp32.
- Keys are processed in blocks of BLOCK_N; full blocks run unmasked, the last partial one masked.
- fp32 dots follow the package's one policy (_common.dot_precision): "tf32x3" on GPUs with TF32
  (sm_80+), "ieee" elsewhere and under the interpreter. fp16/bf16 use tensor-core dots with fp32
  accumulation, the probabilities / dS rounded to the input dtype before their products. Under the
  interpreter, bf16 dots are done in fp32 instead (UPCAST_DOT: its bf16 tl.dot is broken).

Performance (the bytes model of benchmarks/kernels.py: the fewest bytes a pass moves). Training
reads K_sel / V_sel as constants, so the backward that matters computes dq alone: the forward reads
q, K, V and writes out and the LSE; the backward reads q, K, V, out, dout and the LSE and writes dq.
K and V dominate (at L=12, B=64, H=12, n=205, d=64 bf16: 484 MB per pass; about 0.11 ms at an
H200's 4.3 TB/s), so both passes should run at memory speed. The backward launches one program
per (l, h, chunk of images): K and V are read once per image, dq is summed over a chunk in
registers, and chunks are reduced in order by _sum_chunks_kernel. The default chunk (TARGET_PROGRAMS)
gives 4 images per program there, a grid of 2304 programs each walking 16 dependent key blocks:
about 2 waves of too little memory parallelism, which is the likely reason the backward ran at a
fifth of the forward's speed on an H100. batch_chunk=1 gives the forward's grid (one program per
(l, b, h)) for 37.7 MB of fp32 partials written and read back by the reduction (+16 % bytes).
dK/dV stay in the same kernel: with P <= 64 prompts all rows of a (l, b, h) sit in one program, so
splitting dQ from dK/dV would only read K and V twice; delta = rowsum(dout * out) is P x d per (l, b, h), fused for the same reason. P = 16 rows
make m16 tensor-core tiles (mma.sync, not Hopper's 64-row wgmma); computing S^T = K q^T would give
64-row tiles, untried since the passes are memory-bound. TUNING_CANDIDATES lists the launch
variants (batch chunk, key block, warps, stages, float32 dot precision) that benchmarks/kernels.py
times against the default in one run and tests/ops/test_gpu_checks.py checks, so a GPU run can
make the fastest the default; the float32 path's "tf32x3" can fall back to "ieee" the same way.
Launch shapes are fitted to the GPU's shared memory per program (_fit_shared_memory).

Caution: tested under TRITON_INTERPRET=1 on the CPU (Triton 3.8) and once on one H100 (Triton 3.6,
torch 2.11; tests/ops/test_prompt_attention.py passed there, realistic sizes included); no other GPU
yet. Measured there at L=12, B=64, H=12, P=16, n=205, d=64, bf16: forward 185 us (2.6 TB/s of K/V),
forward + backward through autograd about 1.1 ms. The fp32 path was measured with IEEE dots (slower
than PyTorch's SDPA); it now takes "tf32x3" on sm_80+ GPUs, not yet measured for this kernel. The
stride-preserving gradient buffers, the tiled dQ chunk reduction, the launch overrides and the
shared-memory fitting have run only under the interpreter.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (INTERPRETED, LN2_JIT, LOG2E, LOG2E_JIT, block_d, device_guard, dot, dot_precision,
                      load_tile, store_tile, upcast_dot)

# Largest prompt block one program holds; more prompts are split (see the header).
MAX_BLOCK_P = 64
# Shared-q backward: aim for about this many programs, batching images per program above it.
TARGET_PROGRAMS = 2048
# Launch variants that benchmarks/kernels.py times against the defaults in the same run (and
# tests/ops/test_gpu_checks.py checks, so that a GPU run may make any of them the default):
# keyword arguments of prompt_attention_forward / _backward; {} is the default launch.
TUNING_CANDIDATES = (
    {},
    {"backward": {"batch_chunk": 1}},
    {"backward": {"batch_chunk": 2}},
    {"backward": {"batch_chunk": 1, "config": {"num_warps": 2}}},
    {"backward": {"batch_chunk": 1, "config": {"BLOCK_N": 32}}},
    {"backward": {"batch_chunk": 1, "config": {"num_stages": 3}}},
    {"forward": {"config": {"num_warps": 2}}},
    {"forward": {"config": {"BLOCK_N": 32}}},
    {"forward": {"config": {"BLOCK_N": 128}}},
    {"forward": {"config": {"num_stages": 3}}},
    {"forward": {"precision": "ieee"}, "backward": {"precision": "ieee"}},
)


def variant_name(candidate: dict) -> str:
    """A short label of a TUNING_CANDIDATES entry: "default", or e.g. "bwd:batch_chunk=1,num_warps=2"."""
    parts = []
    for side, short in (("forward", "fwd"), ("backward", "bwd")):
        kwargs = dict(candidate.get(side, {}))
        config = kwargs.pop("config", {})
        items = [f"{k}={v}" for k, v in {**kwargs, **config}.items()]
        if items:
            parts.append(f"{short}:{','.join(items)}")
    return " ".join(parts) or "default"


# ------------------------------------------------------------------------------------ kernels
@triton.jit
def _key_block(q, k_base, v_base, start, N, qk_scale, offs_n, offs_d, d_ok, stride_kn, stride_kd, stride_vn,
               stride_vd, MASK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
               UPCAST_DOT: tl.constexpr):
    """Keys [start, start + BLOCK_N): their indices, which are inside, the (BLOCK_N, BLOCK_D) tiles of
    K and V (masked where needed) and the logits q K^T * qk_scale in log2 units, -inf past N."""
    keys = start + offs_n
    k_ok = keys < N
    k = load_tile(k_base + keys[:, None] * stride_kn + offs_d[None, :] * stride_kd, k_ok, d_ok,
                  MASK_N, not EVEN_D)
    v = load_tile(v_base + keys[:, None] * stride_vn + offs_d[None, :] * stride_vd, k_ok, d_ok,
                  MASK_N, not EVEN_D)
    s = dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale
    if MASK_N:
        # Padded keys load as zeros: their logits must not count in the forward's softmax, nor
        # overflow exp(0 - lse) into 0 * inf in the backward.
        s = tl.where(k_ok[None, :], s, float("-inf"))
    return keys, k_ok, k, v, s


@triton.jit
def _fwd_key_block(acc, m_i, l_i, q, k_base, v_base, start, N, qk_scale,
                   stride_kn, stride_kd, stride_vn, stride_vd, offs_n, offs_d, d_ok,
                   MASK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   UPCAST_DOT: tl.constexpr):
    """One online-softmax step over keys [start, start + BLOCK_N); scores in log2 units.

    acc (BLOCK_P, BLOCK_D) fp32, m_i / l_i (BLOCK_P,) running max and sum; q (BLOCK_P, BLOCK_D).
    """
    _, _, k, v, s = _key_block(q, k_base, v_base, start, N, qk_scale, offs_n, offs_d, d_ok, stride_kn, stride_kd,
                               stride_vn, stride_vd, MASK_N, EVEN_D, DOT_PRECISION, UPCAST_DOT)
    # Every processed block holds at least one real key, so m_new is finite and alpha never NaN.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
    return acc, m_new, l_i


@triton.jit
def _prompt_attention_fwd_kernel(
    Q, K, V, O, LSE,
    stride_ql, stride_qb, stride_qh, stride_qp, stride_qd,
    stride_kl, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vl, stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ol, stride_ob, stride_op, stride_od,
    stride_sl, stride_sb, stride_sh, stride_sp,
    B, H, P, N, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_P: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """out = softmax(Q K^T * scale) V and its row logsumexp, for one (l, b, h) and prompt block.

    Q (L, B, H, P, d) through strides (stride_qb = 0 for a shared Q); K, V (L, B, H, n, d);
    O (L, B, P, H*d), columns h*d..h*d+d-1 written; LSE (L, B, H, P) fp32, natural log.
    qk_scale = d ** -0.5 * log2(e). Grid: (L*B*H, cdiv(P, BLOCK_P)).
    """
    pid = tl.program_id(0)
    # Neighbouring programs are neighbouring heads: their output columns are adjacent in memory.
    h = (pid % H).to(tl.int64)
    b = ((pid // H) % B).to(tl.int64)
    l = (pid // (H * B)).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = offs_p < P
    d_ok = offs_d < HEAD_DIM

    q_base = Q + l * stride_ql + b * stride_qb + h * stride_qh
    q = load_tile(q_base + offs_p[:, None] * stride_qp + offs_d[None, :] * stride_qd, p_ok, d_ok,
                  not EVEN_P, not EVEN_D)
    k_base = K + l * stride_kl + b * stride_kb + h * stride_kh
    v_base = V + l * stride_vl + b * stride_vb + h * stride_vh

    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_P,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_P,), dtype=tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_key_block(acc, m_i, l_i, q, k_base, v_base, start, N, qk_scale,
                                       stride_kn, stride_kd, stride_vn, stride_vd, offs_n, offs_d,
                                       d_ok, False, EVEN_D, DOT_PRECISION, UPCAST_DOT)
    if n_full < N:
        acc, m_i, l_i = _fwd_key_block(acc, m_i, l_i, q, k_base, v_base, n_full, N, qk_scale,
                                       stride_kn, stride_kd, stride_vn, stride_vd, offs_n, offs_d,
                                       d_ok, True, EVEN_D, DOT_PRECISION, UPCAST_DOT)

    out = acc / l_i[:, None]
    o_ptrs = (O + l * stride_ol + b * stride_ob + offs_p[:, None] * stride_op
              + (h * HEAD_DIM + offs_d[None, :]) * stride_od)
    store_tile(o_ptrs, out.to(O.dtype.element_ty), p_ok, d_ok, not EVEN_P, not EVEN_D)
    lse = (m_i + tl.log2(l_i)) * LN2_JIT  # log2 units back to natural log
    lse_ptrs = LSE + l * stride_sl + b * stride_sb + h * stride_sh + offs_p * stride_sp
    if EVEN_P:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=p_ok)


@triton.jit
def _bwd_key_block(dq_acc, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, start, N,
                   qk_scale, sm_scale,
                   stride_kn, stride_kd, stride_vn, stride_vd,
                   stride_dkn, stride_dkd, stride_dvn, stride_dvd, offs_n, offs_d, d_ok,
                   MASK_N: tl.constexpr, EVEN_D: tl.constexpr, NEED_KV: tl.constexpr,
                   ACC_KV: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Gradients through keys [start, start + BLOCK_N): returns dq_acc += dS K (unscaled); when
    NEED_KV also writes dV = Pr^T dO and dK = dS^T Q * scale for these keys (added to what is
    there, in fp32, when ACC_KV). lse2 = lse * log2(e); delta = rowsum(dO * O)."""
    keys, k_ok, k, v, s = _key_block(q, k_base, v_base, start, N, qk_scale, offs_n, offs_d, d_ok, stride_kn,
                                     stride_kd, stride_vn, stride_vd, MASK_N, EVEN_D, DOT_PRECISION, UPCAST_DOT)
    p = tl.exp2(s - lse2[:, None])
    dp = dot(do, tl.trans(v), DOT_PRECISION, UPCAST_DOT)
    ds = p * (dp - delta[:, None])
    dq_acc += dot(ds.to(k.dtype), k, DOT_PRECISION, UPCAST_DOT)
    if NEED_KV:
        dv = dot(tl.trans(p.to(do.dtype)), do, DOT_PRECISION, UPCAST_DOT)
        dk = dot(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION, UPCAST_DOT) * sm_scale
        dk_ptrs = dk_base + keys[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
        dv_ptrs = dv_base + keys[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
        if ACC_KV:
            dk += load_tile(dk_ptrs, k_ok, d_ok, MASK_N, not EVEN_D)
            dv += load_tile(dv_ptrs, k_ok, d_ok, MASK_N, not EVEN_D)
        store_tile(dk_ptrs, dk.to(dk_base.dtype.element_ty), k_ok, d_ok, MASK_N, not EVEN_D)
        store_tile(dv_ptrs, dv.to(dv_base.dtype.element_ty), k_ok, d_ok, MASK_N, not EVEN_D)
    return dq_acc


@triton.jit
def _prompt_attention_bwd_kernel(
    Q, K, V, O, DO, LSE, DQ, DK, DV,
    stride_ql, stride_qb, stride_qh, stride_qp, stride_qd,
    stride_kl, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vl, stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ol, stride_ob, stride_op, stride_od,
    stride_gl, stride_gb, stride_gp, stride_gd,
    stride_sl, stride_sb, stride_sh, stride_sp,
    stride_dql, stride_dqc, stride_dqh, stride_dqp, stride_dqd,
    stride_dkl, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvl, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    B, H, P, N, B_CHUNK, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_P: tl.constexpr, EVEN_D: tl.constexpr, NEED_KV: tl.constexpr, ACC_KV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """dQ, dK, dV of out = softmax(Q K^T * scale) V for one (l, h) and a chunk of B_CHUNK images.

    Q (L, B, H, P, d) through strides; K, V, DK, DV (L, B, H, n, d); O, DO (L, B, P, H*d);
    LSE (L, B, H, P) fp32. DQ (L, C, H, P, d) with C = cdiv(B, B_CHUNK): the program's dQ summed in
    order over its images (B_CHUNK = 1 for a per-image Q, then C = B). All P rows sit in one block.
    Grid: (L*H*C,).
    """
    pid = tl.program_id(0)
    C = tl.cdiv(B, B_CHUNK)
    c = (pid % C).to(tl.int64)  # int64 so that the image loop below runs over int64 b
    h = ((pid // C) % H).to(tl.int64)
    l = (pid // (C * H)).to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = offs_p < P
    d_ok = offs_d < HEAD_DIM
    n_full = (N // BLOCK_N) * BLOCK_N

    dq_acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    b_start = c * B_CHUNK
    b_stop = tl.minimum(b_start + B_CHUNK, B)
    for b in range(b_start, b_stop):
        q = load_tile(Q + l * stride_ql + b * stride_qb + h * stride_qh
                      + offs_p[:, None] * stride_qp + offs_d[None, :] * stride_qd,
                      p_ok, d_ok, not EVEN_P, not EVEN_D)
        cols = h * HEAD_DIM + offs_d[None, :]
        do = load_tile(DO + l * stride_gl + b * stride_gb + offs_p[:, None] * stride_gp
                       + cols * stride_gd, p_ok, d_ok, not EVEN_P, not EVEN_D)
        o = load_tile(O + l * stride_ol + b * stride_ob + offs_p[:, None] * stride_op
                      + cols * stride_od, p_ok, d_ok, not EVEN_P, not EVEN_D)
        # The delta pre-pass is fused: P x d per (l, b, h) is too small to earn its own launch.
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        # Padded prompt rows get lse = +inf, so their probabilities are exactly 0.
        lse = tl.load(LSE + l * stride_sl + b * stride_sb + h * stride_sh + offs_p * stride_sp,
                      mask=p_ok, other=float("inf"))
        lse2 = lse * LOG2E_JIT

        k_base = K + l * stride_kl + b * stride_kb + h * stride_kh
        v_base = V + l * stride_vl + b * stride_vb + h * stride_vh
        dk_base = DK + l * stride_dkl + b * stride_dkb + h * stride_dkh
        dv_base = DV + l * stride_dvl + b * stride_dvb + h * stride_dvh
        for start in range(0, n_full, BLOCK_N):
            dq_acc = _bwd_key_block(dq_acc, q, do, lse2, delta, k_base, v_base, dk_base, dv_base,
                                    start, N, qk_scale, sm_scale, stride_kn, stride_kd, stride_vn,
                                    stride_vd, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                                    offs_n, offs_d, d_ok, False, EVEN_D, NEED_KV, ACC_KV,
                                    DOT_PRECISION, UPCAST_DOT)
        if n_full < N:
            dq_acc = _bwd_key_block(dq_acc, q, do, lse2, delta, k_base, v_base, dk_base, dv_base,
                                    n_full, N, qk_scale, sm_scale, stride_kn, stride_kd, stride_vn,
                                    stride_vd, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                                    offs_n, offs_d, d_ok, True, EVEN_D, NEED_KV, ACC_KV,
                                    DOT_PRECISION, UPCAST_DOT)

    dq = dq_acc * sm_scale
    dq_ptrs = (DQ + l * stride_dql + c * stride_dqc + h * stride_dqh
               + offs_p[:, None] * stride_dqp + offs_d[None, :] * stride_dqd)
    store_tile(dq_ptrs, dq.to(DQ.dtype.element_ty), p_ok, d_ok, not EVEN_P, not EVEN_D)


@triton.jit
def _sum_chunks_kernel(X, Y, C, P,
                       stride_xl, stride_xc, stride_xh, stride_xp,
                       stride_yl, stride_yh, stride_yp, stride_yd, H,
                       HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Y[l, h] = sum over c = 0..C-1, in that order, of X[l, c, h]: one (BLOCK_P, BLOCK_D) tile.

    X fp32 (L, C, H, P, d), d contiguous; Y (L, H, P, d) through strides, in the output dtype.
    Grid: (L*H, cdiv(P, BLOCK_P)).
    """
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    l = (pid // H).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_p < P)[:, None] & (offs_d < HEAD_DIM)[None, :]
    x_ptrs = X + l * stride_xl + h * stride_xh + offs_p[:, None] * stride_xp + offs_d[None, :]
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for c in range(0, C):
        acc += tl.load(x_ptrs + c * stride_xc, mask=ok, other=0.0)
    y_ptrs = (Y + l * stride_yl + h * stride_yh + offs_p[:, None] * stride_yp
              + offs_d[None, :] * stride_yd)
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------- launchers
CONFIG_KEYS = ("BLOCK_N", "num_warps", "num_stages")
PRECISIONS = ("ieee", "tf32", "tf32x3")


def _block_p(P: int) -> int:
    return min(max(16, triton.next_power_of_2(P)), MAX_BLOCK_P)


def _shared_memory_limit(t: Tensor) -> Optional[int]:
    """Bytes of shared memory one program may use on t's GPU (None on the CPU / interpreter)."""
    if not t.is_cuda or INTERPRETED:
        return None
    props = torch.cuda.get_device_properties(t.device)
    return getattr(props, "shared_memory_per_block_optin", None) or getattr(props, "shared_memory_per_block", None)


def _fit_shared_memory(config: dict, t: Tensor, d: int, tiles: int) -> dict:
    """Halves BLOCK_N (down to 16), then drops pipeline stages, until the ``tiles`` (BLOCK_N, BLOCK_D)
    tiles of every stage fit in about 3/4 of the GPU's shared memory per program (the rest is left to
    Triton's own layout conversions). H100s never shrink at the default sizes; GPUs with about 100 KB
    (sm_86/89) do for float32 with large heads."""
    limit = _shared_memory_limit(t)
    if limit is None:
        return config
    config = dict(config)

    def need() -> int:
        return config["num_stages"] * tiles * config["BLOCK_N"] * block_d(d) * t.element_size()

    while need() > 0.75 * limit and config["BLOCK_N"] > 16:
        config["BLOCK_N"] //= 2
    while need() > 0.75 * limit and config["num_stages"] > 1:
        config["num_stages"] -= 1
    return config


def _launch_config(default: dict, override: Optional[dict], q: Tensor, d: int) -> dict:
    """The default launch shape with the keys of ``override`` (CONFIG_KEYS) replaced, then fitted
    to the GPU's shared memory (the K and V tiles of every pipeline stage live there)."""
    override = override or {}
    unknown = set(override) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"config keys {sorted(unknown)} are unknown: expected some of {CONFIG_KEYS}")
    merged = dict(default, **override)
    if merged["BLOCK_N"] < 16 or merged["BLOCK_N"] & (merged["BLOCK_N"] - 1):
        raise ValueError(f"config BLOCK_N={merged['BLOCK_N']} must be a power of two >= 16")
    return _fit_shared_memory(merged, q, d, tiles=2)


def _fwd_config(q: Tensor, n: int, d: int, override: Optional[dict] = None) -> dict:
    """Key block and launch shape of the forward kernel."""
    # 64 keys per step covers n = 205 in 4 steps; small n use one bucketed block.
    default = dict(BLOCK_N=min(64, max(16, triton.next_power_of_2(n))), num_warps=4, num_stages=2)
    return _launch_config(default, override, q, d)


def _bwd_config(q: Tensor, n: int, d: int, override: Optional[dict] = None) -> dict:
    """Key block and launch shape of the backward kernel."""
    # Large heads halve the key block to keep the K/V and dK/dV tiles in registers.
    cap = 64 if d <= 64 else 32
    default = dict(BLOCK_N=min(cap, max(16, triton.next_power_of_2(n))), num_warps=4, num_stages=2)
    return _launch_config(default, override, q, d)


def _precision(q: Tensor, precision: Optional[str]) -> str:
    """input_precision of the dots: the package policy (_common.dot_precision), or for float32
    inputs the one asked for ("ieee", the fallback should "tf32x3" ever lose on a GPU; the
    interpreter accepts every value and multiplies in float32 whatever it is)."""
    if precision is None or q.dtype != torch.float32:
        return dot_precision(q)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is unknown: expected one of {PRECISIONS}")
    return precision


def _q_strides(q: Tensor) -> Tuple[int, int, int, int, int]:
    """(l, b, h, p, d) strides; a shared q (L, H, P, d) gets batch stride 0 (never expanded)."""
    if q.dim() == 4:
        return q.stride(0), 0, q.stride(1), q.stride(2), q.stride(3)
    return tuple(q.stride())


def prompt_attention_forward(q: Tensor, k: Tensor, v: Tensor, *, config: Optional[dict] = None,
                             precision: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """q (L, H, P, d) or (L, B, H, P, d); k, v (L, B, H, n, d), one float dtype, any strides.

    Returns out (L, B, P, H*d) in q's dtype and lse (L, B, H, P) float32. config overrides the
    launch shape (CONFIG_KEYS), precision the float32 dot precision (PRECISIONS): both for
    benchmarks comparing variants; the defaults are what fpt_fast.ops runs.
    """
    L, B, H, n, d = k.shape
    P = q.shape[-2]
    out = torch.empty((L, B, P, H * d), device=q.device, dtype=q.dtype)
    lse = torch.empty((L, B, H, P), device=q.device, dtype=torch.float32)
    block_p, bd = _block_p(P), block_d(d)
    grid = (L * B * H, triton.cdiv(P, block_p))
    with device_guard(q):
        _prompt_attention_fwd_kernel[grid](
            q, k, v, out, lse,
            *_q_strides(q), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
            B, H, P, n, d ** -0.5 * LOG2E,
            HEAD_DIM=d, BLOCK_P=block_p, BLOCK_D=bd,
            EVEN_P=P % block_p == 0, EVEN_D=d == bd, DOT_PRECISION=_precision(q, precision),
            UPCAST_DOT=upcast_dot(q.dtype), **_fwd_config(q, n, d, config),
        )
    return out, lse


def _batch_chunk(q: Tensor, L: int, B: int, H: int) -> int:
    """Images summed per backward program: 1 for a per-image q; for a shared q, enough to bring
    the grid near TARGET_PROGRAMS (fewer fp32 partials to reduce, still a full GPU)."""
    if q.dim() == 5:
        return 1
    return max(1, min(B, (L * B * H) // TARGET_PROGRAMS))


def prompt_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                              lse: Tensor, need_kv_grad: bool, *, config: Optional[dict] = None,
                              batch_chunk: Optional[int] = None, precision: Optional[str] = None
                              ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """grad_out, out (L, B, P, H*d); q, k, v as in forward; lse (L, B, H, P) float32.

    Returns dq (q's shape and dtype; summed over the batch for a shared q) and, when need_kv_grad,
    dk, dv (k's / v's shapes and dtypes), else None, None. config and precision as in the forward;
    batch_chunk (shared q only) overrides the images one program sums (_batch_chunk): 1 gives one
    program per (l, b, h), as in the forward, at the price of B fp32 partials of dq to reduce.
    """
    L, B, H, n, d = k.shape
    P = q.shape[-2]
    dtype = q.dtype
    block_p, bd = _block_p(P), block_d(d)
    launch = _bwd_config(q, n, d, config)
    shared = q.dim() == 4
    if batch_chunk is not None and (isinstance(batch_chunk, bool) or not isinstance(batch_chunk, int)
                                    or batch_chunk < 1):
        raise ValueError(f"batch_chunk={batch_chunk!r} must be an int >= 1")
    chunk = _batch_chunk(q, L, B, H) if batch_chunk is None or not shared else min(batch_chunk, B)
    C = triton.cdiv(B, chunk)

    # Gradients are allocated like their inputs (empty_like keeps dense strides), which is what the
    # fake implementation in fpt_fast.ops promises torch.compile; the kernels write through strides.
    dq = torch.empty_like(q)
    if shared and C > 1:  # a shared q summed over several chunks: fp32 partials, reduced below
        dq_buf = torch.empty((L, C, H, P, d), device=q.device, dtype=torch.float32)
    else:
        dq_buf = dq[:, None] if shared else dq
    # Several prompt blocks add their dK/dV in fp32; one block writes the output dtype directly.
    kv_dtype = dtype if triton.cdiv(P, block_p) == 1 else torch.float32
    if need_kv_grad:
        dk = torch.empty_like(k, dtype=kv_dtype)
        dv = torch.empty_like(v, dtype=kv_dtype)
    else:
        dk, dv = k, v  # placeholders with valid pointers; NEED_KV=False compiles their use away

    with device_guard(q):
        for i, p0 in enumerate(range(0, P, block_p)):
            p1 = min(P, p0 + block_p)
            q_i = q[..., p0:p1, :]
            dq_i = dq_buf[..., p0:p1, :]
            _prompt_attention_bwd_kernel[(L * H * C,)](
                q_i, k, v, out[:, :, p0:p1], grad_out[:, :, p0:p1], lse[..., p0:p1], dq_i, dk, dv,
                *_q_strides(q_i), *k.stride(), *v.stride(), *out[:, :, p0:p1].stride(),
                *grad_out[:, :, p0:p1].stride(), *lse[..., p0:p1].stride(), *dq_i.stride(),
                *dk.stride(), *dv.stride(),
                B, H, p1 - p0, n, chunk, d ** -0.5 * LOG2E, d ** -0.5,
                HEAD_DIM=d, BLOCK_P=block_p, BLOCK_D=bd,
                EVEN_P=(p1 - p0) == block_p, EVEN_D=d == bd, NEED_KV=bool(need_kv_grad),
                ACC_KV=i > 0, DOT_PRECISION=_precision(q, precision),
                UPCAST_DOT=upcast_dot(dtype), **launch,
            )

        if shared and C > 1:
            _sum_chunks_kernel[(L * H, triton.cdiv(P, block_p))](
                dq_buf, dq, C, P, *dq_buf.stride()[:4], *dq.stride(), H,
                HEAD_DIM=d, BLOCK_P=block_p, BLOCK_D=bd,
            )
    if not need_kv_grad:
        return dq, None, None
    if kv_dtype != dtype:
        dk, dv = dk.to(dtype), dv.to(dtype)
    return dq, dk, dv
