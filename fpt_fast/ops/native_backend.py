"""The "native" backend: loader and Python face of the C++/CUDA extension (sources in csrc/).

The extension registers its kernels as ordinary torch ops in the namespace ``fpt_fast_native``
(``torch.ops.fpt_fast_native.*``): C++ CPU kernels for every op, and on CUDA a fused radix-select
+ gather for ``select_tokens`` (and ``select_tokens_with_indices``, which also returns the kept
token indices). Once loaded, this module adds what the C++ side does not: fake
implementations (shapes only, so torch.compile traces the ops) and the autograd formula of
``prompt_attention`` (its backward is the native kernel ``prompt_attention_backward``, which
recomputes the probabilities from the saved row LSE).

How it is found, in order, on first use (``unavailable_reason()``, ``extension_status()`` or any op
below), never at import:
1. ``FPT_FAST_NATIVE=0`` disables it (no build, no warning).
2. ``import fpt_fast.ops._C``: built ahead of time by ``FPT_FAST_BUILD_EXT=1 pip install .``
   (skipped with ``FPT_FAST_NATIVE=jit``).
3. A just-in-time build with ninja (torch.utils.cpp_extension.load) of the sources and flags listed
   in fpt_fast.ops.native_build, under ``$FPT_FAST_EXTENSIONS_DIR``, else
   ``$TORCH_EXTENSIONS_DIR/fpt_fast``, else ``~/.cache/fpt_fast``, in a folder named by a hash of the
   sources, flags, include paths and versions (native_build.cache_key): two environments never
   share, and so never rebuild, one folder. The CUDA source is added only where torch has CUDA,
   nvcc is found and a GPU is present; if that build fails, a CPU-only build is tried. A fresh
   CPU build takes about 20 s on two cores; later processes only re-check the cache (ninja, about
   a second).
If nothing works (no compiler, no ninja...), one warning is issued, ``unavailable_reason()`` says
why, and fpt_fast keeps working with its other backends.

Limits: inputs float32/float16/bfloat16 (computed in float32), any head size; CUDA: only
select_tokens (the dispatcher, fpt_fast.ops.dispatch, declares this). Importance scores and
selected rows carry no gradient, as in ``fpt_fast.ops``.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import sysconfig
import threading
import time
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import fake_outputs, native_build

NAMESPACE = "fpt_fast_native"

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
        if all((candidate / name).is_file() for name in native_build.CPU_SOURCES + native_build.HEADERS):
            return candidate
    return None


def _cache_root() -> Path:
    base = os.environ.get("FPT_FAST_EXTENSIONS_DIR")
    if base:
        return Path(base)
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "fpt_fast"
    return Path.home() / ".cache" / "fpt_fast"


def build_dir(src: Path, with_cuda: bool) -> Path:
    """Where the JIT build of these sources lives: a folder per variant and cache key (see the header)."""
    from torch.utils import cpp_extension

    include_paths = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(src)]
    if with_cuda:
        include_paths.append(str(cpp_extension.CUDA_HOME))
    versions = [torch.__version__, sys.version, str(torch.version.cuda), os.environ.get("CXX", "c++")]
    key = native_build.cache_key(src, with_cuda, include_paths, versions)
    variant = f"cuda{torch.version.cuda}" if with_cuda else "cpu"
    tag = f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{variant}-{key}"
    return _cache_root() / tag.replace("+", "_")


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
    directory = build_dir(src, with_cuda)
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob("*.so")):
        logger.warning("fpt_fast: building the native extension in %s (first use: about 20 s on two cores)",
                       directory)
    start = time.perf_counter()
    cpp_extension.load(
        name=f"fpt_fast_native_{'cuda' if with_cuda else 'cpu'}",
        sources=[str(src / name) for name in native_build.sources(with_cuda)],
        extra_cflags=list(native_build.CXX_FLAGS),
        extra_ldflags=list(native_build.LINK_FLAGS),
        extra_cuda_cflags=list(native_build.NVCC_FLAGS),
        extra_include_paths=[str(src)],
        build_directory=str(directory),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("FPT_FAST_VERBOSE_BUILD", "0") == "1",
    )
    _state["build_seconds"] = time.perf_counter() - start
    _state["source"] = f"JIT build in {directory}"


def _last_line(error: BaseException) -> str:
    """The error's type and the last line of its message (a failed build's log ends with its summary)."""
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
                problems.append(f"prebuilt fpt_fast.ops._C did not load ({_last_line(error)})")
        except OSError as error:
            problems.append(f"prebuilt fpt_fast.ops._C did not load ({_last_line(error)})")
    if not _ops_registered():
        cuda_reason = _cuda_build_reason()
        attempts = [True, False] if cuda_reason is None else [False]
        for with_cuda in attempts:
            try:
                _jit_build(with_cuda)
                break
            except Exception as error:  # a missing compiler shows up as many exception types
                problems.append(f"the {'CUDA' if with_cuda else 'CPU'} JIT build failed ({_last_line(error)})")
    if not _ops_registered():
        return "; ".join(problems) or "the native ops did not register"
    _state["cuda_reason"] = None if _has_cuda_kernel() else (
        _cuda_build_reason() or "the extension was built without its CUDA kernel")
    _register_python_side()
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


def cuda_kernel_reason() -> Optional[str]:
    """None when the loaded extension has its CUDA kernel (select_tokens), else why it has not."""
    load()
    return _state["reason"] or _state["cuda_reason"]


def extension_status() -> dict:
    """Where the extension came from, how long its build took here, its CPU vector path, and what it
    lacks: {"reason", "source", "cpu_isa", "cuda_reason", "build_seconds"}."""
    load()
    isa = getattr(torch.ops, NAMESPACE).cpu_isa() if _state["reason"] is None else None
    return {"reason": _state["reason"], "source": _state["source"], "cpu_isa": isa,
            "cuda_reason": _state["cuda_reason"], "build_seconds": _state["build_seconds"]}


def _ops():
    # load() has run already when the dispatcher chose this backend: the check is a dict read,
    # which torch.compile traces without a graph break.
    if not _state["tried"]:
        load()
    if _state["reason"] is not None:
        raise RuntimeError(f"fpt_fast native extension is unavailable: {_state['reason']}")
    return getattr(torch.ops, NAMESPACE)


# ------------------------------------------------- ops (the signatures of fpt_fast.ops.reference)
def token_importance(q: Tensor, k: Tensor, importance: str = "global", lse: Optional[Tensor] = None) -> Tensor:
    """Token importance (B, H, N) float32; q, k (B, H, N, d); lse optional (B, H, N) float32."""
    with torch.no_grad():
        return _ops().token_importance(q, k, lse, importance == "class_token")


def attention_with_importance(q: Tensor, k: Tensor, v: Tensor, importance: str = "global") -> Tuple[Tensor, Tensor]:
    """(out (B, H, N, d) in q's dtype, scores (B, H, N) float32); importance "global" or "class_token"."""
    with torch.no_grad():
        return tuple(_ops().attention_with_importance(q, k, v, importance == "class_token"))


def select_tokens(scores: Tensor, k: Tensor, v: Tensor, n: int, out_dtype: Optional[torch.dtype] = None,
                  return_indices: bool = False) -> Tuple[Tensor, ...]:
    """The n best tokens per (b, h) in ascending token index: k_sel, v_sel (B, H, n, d), and with
    return_indices their token indices (B, H, n) int64, written by the same kernel."""
    native = _ops()
    op = native.select_tokens_with_indices if return_indices else native.select_tokens
    with torch.no_grad():
        return tuple(op(scores, k, v, n, out_dtype))


def prompt_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q (L, H, P, d) or (L, B, H, P, d); k, v (L, B, H, n, d) -> (L, B, P, H * d) in q's dtype.
    Differentiable in q, k and v (the autograd formula is registered at load)."""
    return _ops().prompt_attention(q, k, v)[0]


# -------------------------------------------------- what the C++ side does not register itself
def _register_python_side() -> None:
    """Fake implementations of every op (fpt_fast.ops.fake_outputs: shapes only, for torch.compile)
    and the autograd formula of prompt_attention."""
    def prompt_backward(grad_out, q, k, v, lse, need_kv_grad):
        return fake_outputs.prompt_attention_grads(q, k, v, need_kv_grad)

    for name, fn in (("token_importance", fake_outputs.importance),
                     ("attention_with_importance", fake_outputs.attention_with_importance),
                     ("select_tokens", fake_outputs.selected),
                     ("select_tokens_with_indices", fake_outputs.selected_with_indices),
                     ("prompt_attention", fake_outputs.prompt_attention),
                     ("prompt_attention_backward", prompt_backward)):
        try:
            torch.library.register_fake(f"{NAMESPACE}::{name}")(fn)
        except (RuntimeError, ValueError, TypeError) as error:  # e.g. registered twice
            logger.debug("fpt_fast: no fake for %s: %s", name, error)
    try:
        torch.library.register_autograd(f"{NAMESPACE}::prompt_attention", _prompt_attention_grad,
                                        setup_context=_prompt_attention_setup)
    except (RuntimeError, ValueError, TypeError) as error:
        logger.debug("fpt_fast: no autograd formula for prompt_attention: %s", error)


def _prompt_attention_setup(ctx, inputs, output):
    q, k, v = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.need_kv_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]


def _prompt_attention_grad(ctx, grad_out, grad_lse):
    q, k, v, lse = ctx.saved_tensors
    dq, dk, dv = getattr(torch.ops, NAMESPACE).prompt_attention_backward(grad_out, q, k, v, lse, ctx.need_kv_grad)
    if not ctx.need_kv_grad:
        dk = dv = None
    return dq, dk, dv
