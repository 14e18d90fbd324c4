"""The "torch" backend: memory-efficient pure PyTorch (query-chunked, never N x N), with the
signatures of fpt_fast.ops.reference."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Query rows per chunk of the "torch" backend are chosen so that one chunk's logits stay under this.
TORCH_CHUNK_BYTES = 64 * 2**20


def _chunk_rows(q: Tensor, num_keys: int) -> int:
    B, H = q.shape[0], q.shape[1]
    return max(1, TORCH_CHUNK_BYTES // (B * H * num_keys * 4))


def _class_token_scores(q: Tensor, k: Tensor, lse: Optional[Tensor]) -> Tensor:
    """softmax_j(q_0 . k_j / sqrt(d)), or exp(q_0 . k_j / sqrt(d) - lse_0) given the row LSE:
    a matrix-vector product per (b, h); reads only q[..., 0, :]."""
    logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(), k.float()) * q.shape[-1] ** -0.5
    if lse is None:
        return logits.softmax(dim=-1)
    return (logits - lse[:, :, :1].float()).exp()


def _chunked_attention(q: Tensor, k: Tensor, v: Optional[Tensor], lse: Optional[Tensor],
                       column_sums: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Query-chunked attention: one pass computes each chunk's logits against all keys, its row
    LSE (or takes lse's), its output rows (when v is given) and its contribution to the column
    sums (when column_sums: the global importance). Peak extra memory is one chunk of logits
    (TORCH_CHUNK_BYTES), never N x N. Deterministic: the chunks are summed in order."""
    B, H, N, d = q.shape
    kt = k.float().transpose(-1, -2)
    vf = v.float() if v is not None else None
    out = torch.empty_like(q) if v is not None else None
    scores = torch.zeros(B, H, N, device=q.device, dtype=torch.float32) if column_sums else None
    rows = _chunk_rows(q, N)
    for start in range(0, N, rows):
        stop = min(N, start + rows)
        logits = torch.matmul(q[:, :, start:stop].float(), kt).mul_(d ** -0.5)
        row_lse = logits.logsumexp(dim=-1, keepdim=True) if lse is None else lse[:, :, start:stop, None].float()
        probs = logits.sub_(row_lse).exp_()
        if column_sums:
            scores += probs.sum(dim=2)
        if v is not None:
            out[:, :, start:stop] = torch.matmul(probs, vf).to(q.dtype)
    if column_sums:
        scores /= N
    return out, scores


def token_importance(q: Tensor, k: Tensor, importance: str = "global", lse: Optional[Tensor] = None) -> Tensor:
    """(B, H, N) float32; "class_token" reads only query row 0."""
    if importance == "class_token":
        return _class_token_scores(q, k, lse)
    return _chunked_attention(q, k, None, lse, column_sums=True)[1]


def attention_with_importance(q: Tensor, k: Tensor, v: Tensor, importance: str = "global") -> Tuple[Tensor, Tensor]:
    """(out (B, H, N, d) in q's dtype, scores (B, H, N) float32)."""
    global_importance = importance == "global"
    out, scores = _chunked_attention(q, k, v, None, column_sums=global_importance)
    return out, scores if global_importance else _class_token_scores(q, k, None)


def select_tokens(scores: Tensor, k: Tensor, v: Tensor, n: int, out_dtype: Optional[torch.dtype] = None,
                  return_indices: bool = False) -> Tuple[Tensor, ...]:
    """Threshold = the n-th largest score (topk values are exact whatever the tie order); keep all
    scores above it and the lowest-index ties at it; emit the kept tokens in ascending index (and
    with return_indices that index, (B, H, n) int64)."""
    N = scores.shape[-1]
    # NaN ranks above +inf, as in the reference's sort and the Triton kernel: in float64, +-inf become
    # +-max and NaN becomes +inf, an order-preserving map of every fp32/fp16/bf16 score.
    scores = scores.double().nan_to_num(nan=float("inf"))
    threshold = scores.topk(n, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    above = scores > threshold
    tied = scores == threshold
    missing = n - above.sum(dim=-1, keepdim=True)
    keep = above | (tied & (tied.cumsum(dim=-1) <= missing))
    # Kept token j gets key N - j (distinct, > 0), dropped ones 0: the top n keys are exactly the kept
    # tokens, and topk's descending order lists them by ascending index.
    key = keep * torch.arange(N, 0, -1, device=scores.device)
    index = key.topk(n, dim=-1, sorted=True).indices
    rows = index[..., None].expand(*index.shape, k.shape[-1])
    dtype = out_dtype or k.dtype
    selected = k.gather(2, rows).to(dtype), v.gather(2, rows).to(dtype)
    return (*selected, index) if return_indices else selected


def prompt_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q (L, H, P, d) or (L, B, H, P, d); k, v (L, B, H, n, d) -> (L, B, P, H * d) through SDPA."""
    L, B, H, n, d = k.shape
    if q.dim() == 4:
        q = q[:, None].expand(L, B, *q.shape[1:])
    out = F.scaled_dot_product_attention(q, k, v)                 # (L, B, H, P, d)
    return out.permute(0, 1, 3, 2, 4).reshape(L, B, q.shape[3], H * d)

