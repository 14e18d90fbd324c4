"""The output shapes and dtypes of the fused ops, for torch.compile's fake tensors: one home for the
"triton" and "native" backends, which register these as the fake implementations of their ops
(their argument lists are the ops' schemas: tensors first, then n / out_dtype / flags).

    importance      (B, H, N) float32                      from q (B, H, N, d)
    attention       (out like q, importance)
    selected        k_sel, v_sel (B, H, n, d) in out_dtype (default k's dtype)
    selected + indices (B, H, n) int64
    prompt          out (L, B, P, H * d) in q's dtype, lse (L, B, H, P) float32
    prompt grads    dq, dk, dv like q, k, v; empty dk, dv without need_kv_grad
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def importance(q: Tensor, k: Tensor, lse: Optional[Tensor], class_token: bool) -> Tensor:
    return q.new_empty(q.shape[:3], dtype=torch.float32)


def attention_with_importance(q: Tensor, k: Tensor, v: Tensor, class_token: bool) -> Tuple[Tensor, Tensor]:
    return torch.empty_like(q), importance(q, k, None, class_token)


def selected(scores: Tensor, k: Tensor, v: Tensor, n: int, out_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor]:
    shape = (*k.shape[:2], n, k.shape[-1])
    dtype = out_dtype or k.dtype
    return k.new_empty(shape, dtype=dtype), v.new_empty(shape, dtype=dtype)


def selected_with_indices(scores: Tensor, k: Tensor, v: Tensor, n: int,
                          out_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor]:
    return (*selected(scores, k, v, n, out_dtype), k.new_empty((*k.shape[:2], n), dtype=torch.long))


def prompt_attention(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    L, B, H, n, d = k.shape
    P = q.shape[-2]
    return q.new_empty((L, B, P, H * d)), q.new_empty((L, B, H, P), dtype=torch.float32)


def prompt_attention_grads(q: Tensor, k: Tensor, v: Tensor, need_kv_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    if need_kv_grad:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    return torch.empty_like(q), k.new_empty(0), v.new_empty(0)
