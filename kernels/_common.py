"""What the kernel files share: masked tile loads and stores, head-dim padding, interpreter
detection, the one float32 dot-precision policy, the bfloat16 workaround of the interpreter, log2
constants and the CUDA device guard every launcher runs under.

Jit helpers here are called from the kernels of the other files (Triton resolves jit functions
and tl.constexpr globals across modules, compiled and interpreted alike).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
LN2 = 0.6931471805599453    # log(x) = log2(x) * ln(2)
# Compiled kernels may read only tl.constexpr globals (the interpreter does not enforce this).
LOG2E_JIT = tl.constexpr(LOG2E)
LN2_JIT = tl.constexpr(LN2)


@triton.jit
def _interpreter_probe():
    pass


# triton.jit returns an InterpretedFunction under TRITON_INTERPRET=1, read when triton is imported;
# every kernel of this package is decorated in the same process state.
INTERPRETED = type(_interpreter_probe).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------------------------- jit helpers
@triton.jit
def load_tile(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Loads a 2-D tile, masking (with 0) only the axes that can run past the tensor.
    row_ok (R,), col_ok (C,): which rows / columns are inside; ignored when their MASK_ is False."""
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def store_tile(ptrs, x, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Stores a 2-D tile, masking only the axes that can run past the tensor."""
    if MASK_ROWS:
        if MASK_COLS:
            tl.store(ptrs, x, mask=row_ok[:, None] & col_ok[None, :])
        else:
            tl.store(ptrs, x, mask=row_ok[:, None])
    else:
        if MASK_COLS:
            tl.store(ptrs, x, mask=col_ok[None, :])
        else:
            tl.store(ptrs, x)


@triton.jit
def dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """a @ b accumulated in float32. UPCAST_DOT (see upcast_dot) multiplies in float32 instead:
    products of bfloat16 values are exact in float32, so only the summation order changes."""
    if UPCAST_DOT:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PRECISION)
    return c


# --------------------------------------------------------------------------------- host helpers
def block_d(d: int) -> int:
    """The head size padded for tl.arange and tl.dot: a power of two >= 16 (masked above d)."""
    return max(16, triton.next_power_of_2(d))


def dot_precision(t: Tensor) -> str:
    """input_precision of every tl.dot; it matters only for float32 operands. On GPUs with TF32
    (sm_80+), "tf32x3" splits each float32 operand into a TF32 high part and a TF32 remainder and
    sums three tensor-core products: float32-level error (measured on an H100 at ViT-B sizes for
    token importance: as close to a float64 reference as "ieee") at 5 to 8 times its speed.
    "ieee" elsewhere: older GPUs and the interpreter."""
    if (t.dtype == torch.float32 and t.is_cuda and not INTERPRETED
            and torch.cuda.get_device_capability(t.device)[0] >= 8):
        return "tf32x3"
    return "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """UPCAST_DOT of the kernels: bfloat16 under the interpreter, whose tl.dot multiplies the raw
    bfloat16 bit patterns (triton-lang/triton#11584; its docs: cast bfloat16 to float32 first)."""
    return INTERPRETED and dtype == torch.bfloat16


def device_guard(t: Tensor):
    """Triton launches on the current CUDA device: every launcher runs under this guard, which makes
    it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
