"""Input checks of the public ops: a TypeError/ValueError naming the argument, its shape and dtype,
and what was expected, before any kernel is launched."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IMPORTANCE_MODES = ("global", "class_token")


def describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype} on {t.device}"


def check_float(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} ({describe(t)}) must be float32, float16 or bfloat16")


def check_same(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != first.dtype:
            raise TypeError(f"{name} ({describe(t)}) and {first_name} ({describe(first)}) must have the same dtype")
        if t.device != first.device:
            raise ValueError(f"{name} ({describe(t)}) and {first_name} ({describe(first)}) must be on the same device")


def check_qkv(q: Tensor, k: Tensor, v: Optional[Tensor], names: Sequence[str] = ("q", "k", "v")) -> None:
    """q, k and v (unless None): float tensors of one 4-D (B, H, N, d) shape, dtype and device, not
    empty. ``names``: the arguments as the errors name them (select_tokens checks its k, v here)."""
    tensors = [t for t in (q, k, v) if t is not None]
    names = list(names[:len(tensors)])
    for name, t in zip(names, tensors):
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} ({describe(t)}) must be 4-D (B, H, N, d)")
    for name, t in zip(names[1:], tensors[1:]):
        if t.shape != q.shape:
            raise ValueError(f"{name} ({describe(t)}) must have the shape of {names[0]} ({tuple(q.shape)})")
    check_same(names, tensors)
    if q.numel() == 0:
        raise ValueError(f"{names[0]} ({describe(q)}) is empty: B, H, N and d must all be >= 1")


def check_importance(importance: str) -> None:
    if importance not in IMPORTANCE_MODES:
        raise ValueError(f"importance={importance!r} is unknown: expected one of {IMPORTANCE_MODES}")

