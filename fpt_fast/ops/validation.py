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


def check_qkv(q: Tensor, k: Tensor, v: Optional[Tensor]) -> None:
    names, tensors = ["q", "k"], [q, k]
    if v is not None:
        names.append("v")
        tensors.append(v)
    for name, t in zip(names, tensors):
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} ({describe(t)}) must be 4-D (B, H, N, d)")
    for name, t in zip(names[1:], tensors[1:]):
        if t.shape != q.shape:
            raise ValueError(f"{name} ({describe(t)}) must have the shape of q ({tuple(q.shape)})")
    check_same(names, tensors)
    if q.numel() == 0:
        raise ValueError(f"q ({describe(q)}) is empty: B, H, N and d must all be >= 1")


def check_importance(importance: str) -> None:
    if importance not in IMPORTANCE_MODES:
        raise ValueError(f"importance={importance!r} is unknown: expected one of {IMPORTANCE_MODES}")

