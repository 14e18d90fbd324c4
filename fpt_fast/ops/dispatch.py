"""Which backend runs an op call: one declaration per backend, one priority list per device type.

Every backend declares what it runs (ops per device type, dtypes, largest head size, importance
modes) and how to find out whether it is installed / built; ``unsupported_reasons`` turns that into
the reasons a backend cannot run a call, an empty tuple when it can. ``auto`` takes the first
backend of ``PRIORITY[device type]`` with no reason; a backend named explicitly runs the call or
raises a ValueError with its reasons, it is never replaced by another; when nothing fits, the error
lists every backend's reasons.

Reasons are computed lazily, cheapest first, and cached: a backend's declared limits are checked
before its installation is probed, and only the backends actually asked are probed, so naming
"triton", "torch" or "reference", or ``auto`` stopping at an earlier backend, never builds the
native extension. Under torch.compile the choice is made once, at trace time
(torch.compiler.assume_constant_result), and every backend traces: "triton" and "native" register
fake implementations of their ops, "torch" and "reference" are plain PyTorch.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Dict, Iterator, Mapping, NamedTuple, Optional, Tuple

import torch

from . import native_backend, reference, torch_backend, triton_backend
from .validation import FLOAT_DTYPES, IMPORTANCE_MODES

OPS = ("token_importance", "attention_with_importance", "select_tokens", "prompt_attention")
# Ops whose call carries an importance mode ("global" / "class_token").
IMPORTANCE_OPS = ("token_importance", "attention_with_importance")
# "native" first on the CPU: faster than "torch" on every op there (benchmarks/native_cpu.py); its
# first use builds it (about 20 s, cached), and without a compiler it says why once and "torch" is taken.
PRIORITY = {"cuda": ("triton", "native", "torch"), "cpu": ("native", "torch")}
# Other device types: only plain PyTorch runs there.
OTHER_DEVICES_PRIORITY = ("torch",)
# The values of the former FPTConfig.attention_backend, mapped onto the backends that run the same.
ALIASES = {"sdpa": "torch", "math": "reference"}
NOT_IMPLEMENTED = {"xformers": "is not implemented in this version ('torch' and 'triton' run the same "
                               "memory-efficient attention)"}


class Call(NamedTuple):
    """What a backend is asked to run: the op, the inputs' device type, dtype and head size, and the
    importance mode (None for ops without one)."""

    op: str
    device_type: str
    dtype: torch.dtype
    head_dim: int
    importance: Optional[str] = None

    def describe(self) -> str:
        text = f"{self.device_type} {self.dtype} with head size {self.head_dim}"
        return text + (f" and importance {self.importance!r}" if self.importance else "")


def _nothing_missing() -> Optional[str]:
    return None


def _every_device_ready(device_type: str) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Backend:
    """One backend's declaration. ``module`` implements OPS with the signatures of
    fpt_fast.ops.reference. ``ops`` maps a device type to the ops it runs there ("*": any device
    type not listed). ``missing()`` says why it is not installed or built (None if it is) and may
    be expensive the first time (a build): it is asked only after a call passed the declared limits,
    once per distinct call (_reasons caches by call), so it keeps its own answer (lru_cache, the
    native loader's state) and is cheap after that. ``device_missing(device_type)`` says what it
    lacks on that device type once installed."""

    name: str
    module: ModuleType
    ops: Mapping[str, Tuple[str, ...]]
    dtypes: Tuple[torch.dtype, ...] = FLOAT_DTYPES
    max_head_dim: Optional[int] = None
    importance: Tuple[str, ...] = IMPORTANCE_MODES
    missing: Callable[[], Optional[str]] = field(default=_nothing_missing, compare=False)
    device_missing: Callable[[str], Optional[str]] = field(default=_every_device_ready, compare=False)

    def declared_limits(self, call: Call) -> Tuple[str, ...]:
        """Reasons from the declaration alone (no probing)."""
        reasons = []
        ops = self.ops.get(call.device_type, self.ops.get("*"))
        if ops is None:
            reasons.append(f"device type {call.device_type!r} is not supported")
        elif call.op not in ops:
            reasons.append(f"{call.op} has no {call.device_type} kernel (there: {', '.join(ops)})")
        if call.dtype not in self.dtypes:
            reasons.append(f"dtype {call.dtype} is not supported")
        if self.max_head_dim is not None and call.head_dim > self.max_head_dim:
            reasons.append(f"head size {call.head_dim} > {self.max_head_dim}")
        if call.importance is not None and call.importance not in self.importance:
            reasons.append(f"importance {call.importance!r} is not implemented")
        return tuple(reasons)


# ------------------------------------------------------------------------------ the backends
@functools.lru_cache(maxsize=None)
def _triton_missing() -> Optional[str]:
    return None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def _triton_interpreted() -> bool:
    # Triton reads TRITON_INTERPRET when a kernel is decorated: once fpt_fast.kernels is imported
    # its answer is final; before, the environment says what it will be.
    common = sys.modules.get("fpt_fast.kernels._common")
    if common is not None:
        return common.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_device_missing(device_type: str) -> Optional[str]:
    if device_type == "cpu" and not _triton_interpreted():
        return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before importing triton)"
    return None


def _native_device_missing(device_type: str) -> Optional[str]:
    if device_type == "cuda":
        reason = native_backend.cuda_kernel_reason()
        return None if reason is None else f"no CUDA kernel: {reason}"
    return None


DECLARATIONS: Dict[str, Backend] = {b.name: b for b in (
    Backend("triton", triton_backend, ops={"cuda": OPS, "cpu": OPS}, max_head_dim=128,
            missing=_triton_missing, device_missing=_triton_device_missing),
    Backend("native", native_backend, ops={"cpu": OPS, "cuda": ("select_tokens",)},
            missing=native_backend.unavailable_reason, device_missing=_native_device_missing),
    Backend("torch", torch_backend, ops={"*": OPS}),
    Backend("reference", reference, ops={"*": OPS}),
)}
BACKENDS = tuple(DECLARATIONS)

_default_backend = "auto"


# ----------------------------------------------------------------------------------- names
def canonical_backend(name: str) -> str:
    """"auto" or one of BACKENDS, with ALIASES mapped; a ValueError for anything else."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name in NOT_IMPLEMENTED:
        raise ValueError(f"backend={name!r} {NOT_IMPLEMENTED[name]}")
    name = ALIASES.get(name, name)
    if name != "auto" and name not in DECLARATIONS:
        raise ValueError(f"backend={name!r} is unknown: expected 'auto', one of {BACKENDS} "
                         f"or an alias {tuple(ALIASES)}")
    return name


def set_backend(name: str) -> None:
    """Sets the backend of every op call that names none: "auto" (the default) or one of BACKENDS."""
    global _default_backend
    _default_backend = canonical_backend(name)


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


# --------------------------------------------------------------------------------- reasons
@functools.lru_cache(maxsize=None)
def _reasons(name: str, call: Call) -> Tuple[str, ...]:
    backend = DECLARATIONS[name]
    reasons = backend.declared_limits(call)
    if reasons:
        return reasons
    missing = backend.missing()
    if missing is not None:
        return (missing,)
    missing = backend.device_missing(call.device_type)
    return () if missing is None else (missing,)


def unsupported_reasons(backend: str, op: str, device, dtype: torch.dtype = torch.float32, head_dim: int = 64,
                        importance: Optional[str] = None) -> Tuple[str, ...]:
    """Why ``backend`` cannot run ``op`` on these inputs: an empty tuple when it can."""
    name = canonical_backend(backend)
    if name == "auto":
        raise ValueError("unsupported_reasons: name a backend, not 'auto'")
    if op not in OPS:
        raise ValueError(f"op={op!r} is unknown: expected one of {OPS}")
    if op in IMPORTANCE_OPS and importance is None:
        importance = "global"
    return _reasons(name, Call(op, torch.device(device).type, dtype, head_dim, importance))


@torch.compiler.assume_constant_result
def resolve(op: str, backend: str, device_type: str, dtype: torch.dtype, head_dim: int,
            importance: Optional[str] = None) -> str:
    """The backend that runs this call: ``backend`` itself if it can (else a ValueError with its
    reasons), or for "auto" the first of the device type's priority list that can."""
    name = canonical_backend(backend)
    call = Call(op, device_type, dtype, head_dim, importance)
    if name != "auto":
        reasons = _reasons(name, call)
        if reasons:
            raise ValueError(f"{op}: backend {name!r} cannot run {call.describe()}: {'; '.join(reasons)}")
        return name
    tried = []
    for candidate in PRIORITY.get(device_type, OTHER_DEVICES_PRIORITY):
        reasons = _reasons(candidate, call)
        if not reasons:
            return candidate
        tried.append(f"{candidate}: {'; '.join(reasons)}")
    raise ValueError(f"{op}: no backend can run {call.describe()} ({' | '.join(tried)})")


def implementation(op: str, backend: Optional[str], t: torch.Tensor, head_dim: int,
                   importance: Optional[str] = None) -> Callable:
    """The function of the chosen backend's module that runs ``op`` for inputs like ``t``
    (backend None: the process-wide choice of set_backend)."""
    name = resolve(op, _default_backend if backend is None else backend, t.device.type, t.dtype, head_dim,
                   importance)
    return getattr(DECLARATIONS[name].module, op)


# ----------------------------------------------------------------------------------- tables
def backend_table(device) -> Dict[str, Dict[str, Tuple[str, ...]]]:
    """{backend: {op: reasons}} for a float32 call with head size 64 and "global" importance on
    ``device``: an empty tuple where the backend runs the op. Probes every backend (the native
    extension is built if it is not yet)."""
    device_type = torch.device(device).type
    return {name: {op: unsupported_reasons(name, op, device_type) for op in OPS} for name in BACKENDS}


def auto_choices(device) -> Dict[str, str]:
    """{op: the backend "auto" picks} for the calls of backend_table, or the error's text."""
    device_type = torch.device(device).type
    choices = {}
    for op in OPS:
        try:
            choices[op] = resolve(op, "auto", device_type, torch.float32, 64,
                                  "global" if op in IMPORTANCE_OPS else None)
        except ValueError as error:
            choices[op] = f"none ({error})"
    return choices
