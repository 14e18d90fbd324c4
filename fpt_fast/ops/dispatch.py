"""Which backend runs an op: the process-wide choice, the per-device priority list, and why a
backend cannot run a call (see fpt_fast.ops for the backends)."""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Dict, Iterator, Optional

import torch
from torch import Tensor

BACKENDS = ("triton", "native", "torch", "reference")
# "native" first on the CPU: 3-65x faster than "torch" there (benchmarks/native_cpu.py). Its first use
# builds it (about 30 s, cached); without a compiler it says why once and "torch" is taken.
PRIORITY = {"cuda": ("triton", "native", "torch"), "cpu": ("native", "torch")}
MAX_TRITON_HEAD_DIM = 128

# Read once: Triton reads TRITON_INTERPRET when it is imported, so later changes have no effect.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_default_backend = "auto"


# ------------------------------------------------------------------------ backend selection
def set_backend(name: str) -> None:
    """Sets the process-wide backend for every op: "auto" or one of BACKENDS."""
    global _default_backend
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend={name!r} is unknown: expected 'auto' or one of {BACKENDS}")
    _default_backend = name


def get_backend() -> str:
    return _default_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of set_backend."""
    previous = _default_backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def unsupported_reason(backend: str, op: str, device: torch.device, dtype: torch.dtype,
                       head_dim: int) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on these inputs, or None if it can."""
    if backend in ("torch", "reference"):
        return None
    if backend == "triton":
        if not _TRITON_FOUND:
            return "triton is not installed"
        if device.type == "cpu" and not _TRITON_INTERPRET:
            return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before importing triton)"
        if device.type not in ("cuda", "cpu"):
            return f"device type {device.type!r} is not supported"
        if head_dim > MAX_TRITON_HEAD_DIM:
            return f"head size {head_dim} > {MAX_TRITON_HEAD_DIM}"
        return None
    if backend == "native":
        from . import native_backend

        return (native_backend.unavailable_reason()
                or native_backend.unsupported_reason(op, device, dtype, head_dim))
    raise ValueError(f"backend={backend!r} is unknown: expected 'auto' or one of {BACKENDS}")


def resolve(op: str, backend: Optional[str], t: Tensor, head_dim: int) -> str:
    name = _default_backend if backend is None else backend
    compiling = torch.compiler.is_compiling()
    if compiling and name == "native":
        raise ValueError(f"{op}: backend 'native' cannot be traced by torch.compile (its ops have no fake "
                         f"implementations); use 'triton' or 'torch'")
    if name == "auto":
        reasons = []
        candidates = PRIORITY.get(t.device.type, ("torch",))
        if compiling:  # only backends with fake implementations (or plain torch code) can be traced
            candidates = tuple(c for c in candidates if c != "native")
        for candidate in candidates:
            reason = unsupported_reason(candidate, op, t.device, t.dtype, head_dim)
            if reason is None:
                return candidate
            reasons.append(f"{candidate}: {reason}")
        raise ValueError(f"{op}: no backend supports {t.device.type} {t.dtype} with head size "
                         f"{head_dim}: " + "; ".join(reasons))
    reason = unsupported_reason(name, op, t.device, t.dtype, head_dim)
    if reason is not None:
        raise ValueError(f"{op}: backend {name!r} cannot run this call: {reason}")
    return name


def backends(device: Optional[str] = None) -> Dict[str, Optional[str]]:
    """{backend: None if usable, else the reason} for a float32 call with head size 64."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return {b: unsupported_reason(b, "any", dev, torch.float32, 64) for b in BACKENDS}

