"""The public fused ops: validation, then the one backend fpt_fast.ops.dispatch chooses."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .dispatch import implementation
from .validation import FLOAT_DTYPES, check_float, check_importance, check_qkv, check_same, describe


def token_importance(q: Tensor, k: Tensor, importance: str = "global", lse: Optional[Tensor] = None, *,
                     backend: Optional[str] = None) -> Tensor:
    """Importance of every key token per (batch, head): (B, H, N) float32.

    q, k: (B, H, N, d), float32/float16/bfloat16. importance "global":
    s_j = mean_i softmax_j(q_i.k_j/sqrt(d)); "class_token": s_j = softmax_j(q_0.k_j/sqrt(d)).
    lse: optional (B, H, N) row log-sum-exp of q.k/sqrt(d) (e.g. from the attention forward),
    float32. Never materialises N x N.
    """
    check_qkv(q, k, None)
    check_importance(importance)
    if lse is not None:
        if not isinstance(lse, Tensor):
            raise TypeError(f"lse must be a torch.Tensor or None, got {type(lse).__name__}")
        if lse.shape != q.shape[:3] or lse.dtype != torch.float32 or lse.device != q.device:
            raise ValueError(f"lse ({describe(lse)}) must be float32 of shape {tuple(q.shape[:3])} on {q.device}")
    run = implementation("token_importance", backend, q, q.shape[-1], importance)
    return run(q, k, importance, lse)


def attention_with_importance(q: Tensor, k: Tensor, v: Tensor, importance: str = "global", *,
                              backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Self-attention output and token importance in one call, with flash-attention memory.

    q, k, v: (B, H, N, d). Returns out (B, H, N, d) in q's dtype and scores (B, H, N) float32.
    Only the row LSE (B, H, N) is kept between the two passes, never the probabilities.
    """
    check_qkv(q, k, v)
    check_importance(importance)
    run = implementation("attention_with_importance", backend, q, q.shape[-1], importance)
    return run(q, k, v, importance)


def select_tokens(scores: Tensor, k: Tensor, v: Tensor, n: int, out_dtype: Optional[torch.dtype] = None, *,
                  return_indices: bool = False, backend: Optional[str] = None) -> Tuple[Tensor, ...]:
    """The n highest-scoring tokens of every (batch, head) row, gathered from k and v.

    scores: (B, H, N) float; k, v: (B, H, N, d). Returns k_sel, v_sel (B, H, n, d) in out_dtype
    (default: k's dtype). Ties at the n-th score go to the lower token index. return_indices=True
    adds a third output, the kept token indices (B, H, n) int64 in the order of the kept rows
    (ascending for the fast backends, descending score for "reference"), written by the same
    kernel as the rows; without it no index tensor is made.
    """
    check_float("scores", scores)
    check_qkv(k, v, None, names=("k", "v"))
    if scores.dim() != 3 or scores.shape != k.shape[:3]:
        raise ValueError(f"scores ({describe(scores)}) must be (B, H, N) = {tuple(k.shape[:3])}, matching k")
    if scores.device != k.device:
        raise ValueError(f"scores ({describe(scores)}) and k ({describe(k)}) must be on the same device")
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    N = k.shape[2]
    if not 1 <= n <= N:
        raise ValueError(f"n={n} is out of range: expected 1 <= n <= N={N}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype={out_dtype} must be None, torch.float32, torch.float16 or torch.bfloat16")
    if not isinstance(return_indices, bool):
        raise TypeError(f"return_indices must be a bool, got {type(return_indices).__name__}")
    run = implementation("select_tokens", backend, k, k.shape[-1])
    return run(scores, k, v, n, out_dtype, return_indices)


def prompt_attention(q: Tensor, k: Tensor, v: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Prompts cross-attending to selected tokens, heads merged: (L, B, P, H * d) in q's dtype.

    q: (L, H, P, d) shared by the batch, or (L, B, H, P, d); k, v: (L, B, H, n, d).
    Differentiable in q, k and v. The Triton and native backends store only the row LSE for backward.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
    if k.dim() != 5:
        raise ValueError(f"k ({describe(k)}) must be 5-D (L, B, H, n, d)")
    if v.shape != k.shape:
        raise ValueError(f"v ({describe(v)}) must have the shape of k ({tuple(k.shape)})")
    L, B, H, n, d = k.shape
    if q.dim() == 4:
        expected = (L, H, q.shape[2], d)
    elif q.dim() == 5:
        expected = (L, B, H, q.shape[3], d)
    else:
        raise ValueError(f"q ({describe(q)}) must be (L, H, P, d) or (L, B, H, P, d)")
    if tuple(q.shape) != expected:
        raise ValueError(f"q ({describe(q)}) does not match k ({tuple(k.shape)}): expected {expected}")
    check_same(["q", "k", "v"], [q, k, v])
    if k.numel() == 0 or q.numel() == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}; every size must be >= 1")
    run = implementation("prompt_attention", backend, q, d)
    return run(q, k, v)
