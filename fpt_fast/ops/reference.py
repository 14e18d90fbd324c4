"""Reference twins of the fused ops: the same signatures as fpt_fast.ops, written for clarity, not
speed (attention probabilities are materialised, selection sorts whole rows). Every fast backend is
tested against these."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def token_importance(q: Tensor, k: Tensor, importance: str = "global", lse: Optional[Tensor] = None) -> Tensor:
    """Importance s_j of every key token, per (batch, head).

    q, k: (B, H, N, d). Returns (B, H, N) float32.
    global: s_j = mean_i softmax_j(q_i . k_j / sqrt(d)); class_token: s_j = softmax_j(q_0 . k_j / sqrt(d)).
    If ``lse`` (B, H, N) is given, p_ij = exp(q_i . k_j / sqrt(d) - lse_i) is used instead of a softmax.
    """
    scale = q.shape[-1] ** -0.5
    logits = torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) * scale
    if lse is None:
        probs = logits.softmax(dim=-1)
    else:
        probs = torch.exp(logits - lse.float()[..., None])
    if importance == "class_token":
        return probs[:, :, 0, :]
    return probs.mean(dim=2)


def attention_with_importance(q: Tensor, k: Tensor, v: Tensor, importance: str = "global") -> Tuple[Tensor, Tensor]:
    """Attention output (B, H, N, d) in q's dtype and token importance (B, H, N) float32."""
    scale = q.shape[-1] ** -0.5
    probs = (torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) * scale).softmax(dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", probs, v.float()).to(q.dtype)
    scores = probs[:, :, 0, :] if importance == "class_token" else probs.mean(dim=2)
    return out, scores


def select_tokens(scores: Tensor, k: Tensor, v: Tensor, n: int, out_dtype: Optional[torch.dtype] = None,
                  return_indices: bool = False) -> Tuple[Tensor, ...]:
    """Keeps the n highest-scoring tokens of every (batch, head) row.

    scores: (B, H, N); k, v: (B, H, N, d). Returns k_sel, v_sel: (B, H, n, d) in descending-score
    order; ties go to the lower token index (a stable sort). With return_indices, also the kept
    token indices (B, H, n) int64, in the same (descending-score) order.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n]
    index = order[..., None].expand(*order.shape, k.shape[-1])
    k_sel, v_sel = k.gather(2, index), v.gather(2, index)
    if out_dtype is not None:
        k_sel, v_sel = k_sel.to(out_dtype), v_sel.to(out_dtype)
    return (k_sel, v_sel, order) if return_indices else (k_sel, v_sel)


def prompt_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Cross-attention of prompts over selected tokens, heads merged.

    q: (L, H, P, d) shared by the batch, or (L, B, H, P, d); k, v: (L, B, H, n, d).
    Returns (L, B, P, H * d) in q's dtype.
    """
    if q.dim() == 4:
        q = q[:, None]
    scale = q.shape[-1] ** -0.5
    probs = (torch.einsum("lbhpd,lbhnd->lbhpn", q.float(), k.float()) * scale).softmax(dim=-1)
    out = torch.einsum("lbhpn,lbhnd->lbhpd", probs, v.float())
    L, B, H, P, d = out.shape
    return out.permute(0, 1, 3, 2, 4).reshape(L, B, P, H * d).to(q.dtype)
