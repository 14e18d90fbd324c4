"""Loader and Python face of the native extension fpt_fast.ops._C (sources in csrc/).

The extension registers its kernels as ordinary torch ops in the namespace ``fpt_fast_native``
(``torch.ops.fpt_fast_native.*``): C++ CPU kernels for every op, and on CUDA a fused radix-select
+ gather for ``select_tokens``. ``fpt_fast.ops`` reaches them as backend "native".

How it is found, in order, on first use (``unavailable_reason()``, ``load()`` or any op below):
1. ``FPT_FAST_NATIVE=0`` disables it (no build, no warning).
2. ``import fpt_fast.ops._C``: built ahead of time by ``FPT_FAST_BUILD_EXT=1 pip install .``
   (skipped with ``FPT_FAST_NATIVE=jit``).
3. A just-in-time build with ninja (torch.utils.cpp_extension.load), cached per torch version,
   Python version and variant under ``$FPT_FAST_EXTENSIONS_DIR``, else ``$TORCH_EXTENSIONS_DIR/fpt_fast``,
   else ``~/.cache/fpt_fast``. The CUDA source is added only where torch has CUDA, nvcc is found and a
   GPU is present; if that build fails, a CPU-only build is tried. The first build takes about a
   minute on two cores; later processes only re-check the cache (ninja, about a second).
If nothing works (no compiler, no ninja...), one warning is issued, ``unavailable_reason()`` says
why, and fpt_fast keeps working with its other backends.

Limits: inputs float32/float16/bfloat16 (computed in float32), any head size; CUDA: only
select_tokens. ``prompt_attention`` is differentiable through a torch.autograd.Function whose
backward is the native kernel ``prompt_attention_backward`` (probabilities recomputed from the
saved row LSE); importance scores and selected rows carry no gradient, as in ``fpt_fast.ops``.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor

NAMESPACE = "fpt_fast_native"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_SOURCES = ("registration.cpp", "cpu_math.cpp", "cpu_attention.cpp", "cpu_select.cpp")
CUDA_SOURCES = ("cuda_select.cu",)
# -ffp-contract=fast lets the vector bodies use FMA (-std=c++17 alone turns contraction off);
# -Wno-psabi silences GCC's notes about passing vector types between inlined helpers.
CXX_FLAGS = ["-O3", "-ffp-contract=fast", "-Wno-psabi"]
NVCC_FLAGS = ["-O3", "--use_fast_math"]

logger = logging.getLogger(__name__)


class NativeUnavailableWarning(RuntimeWarning):
    """The native extension could not be loaded or built; other backends are used."""


_lock = threading.Lock()
_state = {"tried": False, "reason": None, "cuda_reason": "not loaded", "source": None, "build_seconds": None}


# --------------------------------------------------------------------------------- locating
def source_dir() -> Optional[Path]:
    """csrc/ next to the package (installed package data) or at the repository root (editable)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if all((candidate / name).is_file() for name in CPU_SOURCES):
            return candidate
    return None


def build_dir(with_cuda: bool) -> Path:
    """Where the JIT build lives: one folder per torch version, Python version and variant."""
    base = os.environ.get("FPT_FAST_EXTENSIONS_DIR")
    if base:
        root = Path(base)
    elif os.environ.get("TORCH_EXTENSIONS_DIR"):
        root = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "fpt_fast"
    else:
        root = Path.home() / ".cache" / "fpt_fast"
    variant = f"cuda{torch.version.cuda}" if with_cuda else "cpu"
    tag = f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{variant}"
    return root / tag.replace("+", "_")


def _cuda_build_reason() -> Optional[str]:
    """Why the CUDA source is left out of a JIT build, or None to include it."""
    if torch.version.cuda is None:
        return "torch is built without CUDA"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None or shutil.which("nvcc") is None and not Path(
            cpp_extension.CUDA_HOME, "bin", "nvcc").is_file():
        return "nvcc (CUDA_HOME) was not found"
    if not torch.cuda.is_available():
        return "no CUDA device is present"
    return None


def _has_cuda_kernel() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::select_tokens", "CUDA")
    except (AttributeError, RuntimeError):
        return False


def _ops_registered() -> bool:
    try:
        return hasattr(torch.ops, NAMESPACE) and hasattr(getattr(torch.ops, NAMESPACE), "select_tokens")
    except (AttributeError, RuntimeError):
        return False


def _jit_build(with_cuda: bool) -> None:
    from torch.utils import cpp_extension

    src = source_dir()
    if src is None:
        raise FileNotFoundError("the C++ sources (csrc/) are not installed with this copy of fpt_fast")
    # Checked up front: a clear reason beats ninja's "subcommand failed" (torch reads CXX too).
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise FileNotFoundError(f"no C++ compiler: {compiler!r} is not on PATH (set CXX or install g++)")
    if not cpp_extension.is_ninja_available():
        raise FileNotFoundError("ninja is not installed (pip install ninja)")
    sources = [str(src / name) for name in CPU_SOURCES]
    if with_cuda:
        sources += [str(src / name) for name in CUDA_SOURCES]
    directory = build_dir(with_cuda)
    directory.mkdir(parents=True, exist_ok=True)
    fresh = not any(directory.glob("*.so"))
    if fresh:
        logger.warning("fpt_fast: building the native extension in %s (first use: about a minute)", directory)
    start = time.perf_counter()
    cpp_extension.load(
        name=f"fpt_fast_native_{'cuda' if with_cuda else 'cpu'}",
        sources=sources,
        extra_cflags=list(CXX_FLAGS),
        extra_cuda_cflags=list(NVCC_FLAGS),
        extra_include_paths=[str(src)],
        build_directory=str(directory),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("FPT_FAST_VERBOSE_BUILD", "0") == "1",
    )
    _state["build_seconds"] = time.perf_counter() - start
    _state["source"] = f"JIT build in {directory}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:400]


def _try_load() -> Optional[str]:
    """Loads the ops once; returns None or why not. Must be called with _lock held."""
    mode = os.environ.get("FPT_FAST_NATIVE", "1").lower()
    if mode in ("0", "off", "false", "no"):
        return "disabled by FPT_FAST_NATIVE=0"
    problems: List[str] = []
    if mode != "jit":
        try:
            from . import _C  # noqa: F401  (loading the library registers the ops)

            _state["source"] = "prebuilt fpt_fast.ops._C"
        except ImportError as error:  # absent, or built for another torch
            if "No module named" not in str(error):
                problems.append(f"prebuilt fpt_fast.ops._C did not load ({_first_line(error)})")
        except OSError as error:
            problems.append(f"prebuilt fpt_fast.ops._C did not load ({_first_line(error)})")
    if not _ops_registered():
        cuda_reason = _cuda_build_reason()
        attempts = [True, False] if cuda_reason is None else [False]
        for with_cuda in attempts:
            try:
                _jit_build(with_cuda)
                break
            except Exception as error:  # a missing compiler shows up as many exception types
                problems.append(f"the {'CUDA' if with_cuda else 'CPU'} JIT build failed ({_first_line(error)})")
    if not _ops_registered():
        return "; ".join(problems) or "the native ops did not register"
    _state["cuda_reason"] = None if _has_cuda_kernel() else (
        _cuda_build_reason() or "the extension was built without its CUDA kernel")
    _register_fakes()
    return None


def load() -> bool:
    """Loads (building if needed) the extension once per process; True when its ops are usable."""
    with _lock:
        if not _state["tried"]:
            _state["reason"] = _try_load()
            _state["tried"] = True
            if _state["reason"] is not None and not _state["reason"].startswith("disabled"):
                warnings.warn(f"fpt_fast: the native extension is unavailable, using the torch/triton backends: "
                              f"{_state['reason']}", NativeUnavailableWarning, stacklevel=3)
    return _state["reason"] is None


def unavailable_reason() -> Optional[str]:
    """None when the extension is loaded (building it on first call), else why it is not."""
    load()
    return _state["reason"]


def info() -> dict:
    """Where the extension came from, how long the build took, and what it lacks."""
    load()
    isa = getattr(torch.ops, NAMESPACE).cpu_isa() if _state["reason"] is None else None
    return {"reason": _state["reason"], "source": _state["source"], "cpu_isa": isa,
            "cuda_reason": _state["cuda_reason"], "build_seconds": _state["build_seconds"]}


def unsupported_reason(op: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why the (loaded) extension cannot run ``op`` on these inputs, or None if it can."""
    if dtype not in FLOAT_DTYPES:
        return f"dtype {dtype} is not supported"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if _state["cuda_reason"] is not None:
            return f"no CUDA kernels: {_state['cuda_reason']}"
        if op not in ("select_tokens", "any"):
            return f"{op} has no CUDA kernel (only select_tokens does)"
        return None
    return f"device type {device.type!r} is not supported"


def _ops():
    if not load():
        raise RuntimeError(f"fpt_fast native extension is unavailable: {_state['reason']}")
    return getattr(torch.ops, NAMESPACE)


# ------------------------------------------------------------------------------------- ops
def token_importance(q: Tensor, k: Tensor, lse: Optional[Tensor] = None) -> Tensor:
    """Global token importance (B, H, N) float32; q, k (B, H, N, d); lse optional (B, H, N) float32."""
    with torch.no_grad():
        return _ops().token_importance(q, k, lse)


def attention_with_importance(q: Tensor, k: Tensor, v: Tensor, mode: str = "global") -> Tuple[Tensor, Tensor]:
    """(out (B, H, N, d) in q's dtype, scores (B, H, N) float32); mode "global" or "class_token"."""
    if mode not in ("global", "class_token"):
        raise ValueError(f"mode={mode!r} is unknown: expected 'global' or 'class_token'")
    with torch.no_grad():
        return tuple(_ops().attention_with_importance(q, k, v, mode == "class_token"))


def select_tokens(scores: Tensor, k: Tensor, v: Tensor, n: int,
                  out_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """The n best tokens per (b, h) in ascending token index: k_sel, v_sel (B, H, n, d)."""
    with torch.no_grad():
        return tuple(_ops().select_tokens(scores, k, v, n, out_dtype))


class _PromptAttention(torch.autograd.Function):
    """Native forward (out, row LSE); native backward recomputes the probabilities from the LSE."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out, lse = _ops().prompt_attention(q, k, v)
        ctx.save_for_backward(q, k, v, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, lse = ctx.saved_tensors
        need_kv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dq, dk, dv = _ops().prompt_attention_backward(grad_out, q, k, v, lse, need_kv)
        if not need_kv:
            dk = dv = None
        return dq, dk, dv


def prompt_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q (L, H, P, d) or (L, B, H, P, d); k, v (L, B, H, n, d) -> (L, B, P, H * d) in q's dtype."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _PromptAttention.apply(q, k, v)
    return _ops().prompt_attention(q, k, v)[0]


# ------------------------------------------------------------------------ torch.compile fakes
def _register_fakes() -> None:
    """Shape-only versions of the ops, so that torch.compile can trace through them."""
    register = getattr(torch.library, "register_fake", None)
    if register is None:
        return

    def importance(q, k, lse):
        return q.new_empty(q.shape[:3], dtype=torch.float32)

    def attention(q, k, v, class_token):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)

    def select(scores, k, v, n, out_dtype):
        shape = (*k.shape[:2], n, k.shape[-1])
        dtype = out_dtype or k.dtype
        return k.new_empty(shape, dtype=dtype), k.new_empty(shape, dtype=dtype)

    def prompt(q, k, v):
        L, B, H, n, d = k.shape
        P = q.shape[-2]
        return q.new_empty((L, B, P, H * d)), q.new_empty((L, B, H, P), dtype=torch.float32)

    def prompt_backward(grad_out, q, k, v, lse, need_kv_grad):
        if need_kv_grad:
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        return torch.empty_like(q), k.new_empty(0), v.new_empty(0)

    for name, fn in (("token_importance", importance), ("attention_with_importance", attention),
                     ("select_tokens", select), ("prompt_attention", prompt),
                     ("prompt_attention_backward", prompt_backward)):
        try:
            register(f"{NAMESPACE}::{name}")(fn)
        except (RuntimeError, ValueError, TypeError) as error:  # e.g. registered twice, older torch
            logger.debug("fpt_fast: no fake for %s: %s", name, error)
