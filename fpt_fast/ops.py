"""The front door of fpt_fast's fused ops: validation, backend dispatch, autograd, custom ops.

Ops (each has a twin with the same signature in ``fpt_fast.reference``):
    token_importance(q, k, mode, lse)            -> scores (B, H, N) float32
    attention_with_importance(q, k, v, mode)     -> (out (B, H, N, d), scores (B, H, N) float32)
    select_tokens(scores, k, v, n, out_dtype)    -> (k_sel, v_sel), each (B, H, n, d)
    prompt_attention(q, k, v)                    -> (L, B, P, H * d)

Backends (pick per call with ``backend=`` or globally with ``set_backend`` / ``use_backend``):
    "triton"    fused Triton kernels (kernels/); default for CUDA tensors. On the CPU only under
                Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported).
    "native"    the C++/CUDA extension fpt_fast._C (csrc/), built on first use; default on the CPU.
    "torch"     memory-efficient pure PyTorch (query-chunked, never N x N); default on the CPU when
                the native extension cannot be built.
    "reference" fpt_fast.reference: materialises everything; for testing.
"auto" walks ``PRIORITY`` for the tensors' device and takes the first backend that supports the
call; under torch.compile it skips "native", whose ops cannot be traced. Naming a backend that cannot run the call raises a ValueError with its reason; when nothing
fits, the error lists every backend's reason.

Contracts: inputs may be non-contiguous (kernels read through strides or the launcher copies);
the order of the n kept tokens is ascending token index for "triton", "native" and "torch", and
descending score for "reference" (attention downstream does not depend on it). The selected
keys/values and the importance scores carry no gradient (they are constants of the frozen branch);
prompt_attention is differentiable in q, k and v.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference

BACKENDS = ("triton", "native", "torch", "reference")
# "native" first on the CPU: 3-65x faster than "torch" there (benchmarks/native_cpu.py). Its first use
# builds it (about 30 s, cached); without a compiler it says why once and "torch" is taken.
PRIORITY = {"cuda": ("triton", "native", "torch"), "cpu": ("native", "torch")}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("global", "class_token")
MAX_TRITON_HEAD_DIM = 128
# Query rows per chunk of the "torch" backend are chosen so that one chunk's logits stay under this.
TORCH_CHUNK_BYTES = 64 * 2**20

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
        from . import native

        return native.unavailable_reason() or native.unsupported_reason(op, device, dtype, head_dim)
    raise ValueError(f"backend={backend!r} is unknown: expected 'auto' or one of {BACKENDS}")


def _resolve(op: str, backend: Optional[str], t: Tensor, head_dim: int) -> str:
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


# ------------------------------------------------------------------------------- validation
def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype} on {t.device}"


def _check_float(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} ({_describe(t)}) must be float32, float16 or bfloat16")


def _check_same(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != first.dtype:
            raise TypeError(f"{name} ({_describe(t)}) and {first_name} ({_describe(first)}) must have the same dtype")
        if t.device != first.device:
            raise ValueError(f"{name} ({_describe(t)}) and {first_name} ({_describe(first)}) must be on the same device")


def _check_qkv(q: Tensor, k: Tensor, v: Optional[Tensor]) -> None:
    names, tensors = ["q", "k"], [q, k]
    if v is not None:
        names.append("v")
        tensors.append(v)
    for name, t in zip(names, tensors):
        _check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} ({_describe(t)}) must be 4-D (B, H, N, d)")
    for name, t in zip(names[1:], tensors[1:]):
        if t.shape != q.shape:
            raise ValueError(f"{name} ({_describe(t)}) must have the shape of q ({tuple(q.shape)})")
    _check_same(names, tensors)
    if q.numel() == 0:
        raise ValueError(f"q ({_describe(q)}) is empty: B, H, N and d must all be >= 1")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown: expected one of {MODES}")


# -------------------------------------------------------------------------- "torch" backend
def _chunk_rows(q: Tensor, num_keys: int) -> int:
    B, H = q.shape[0], q.shape[1]
    return max(1, TORCH_CHUNK_BYTES // (B * H * num_keys * 4))


def _class_token_scores(q: Tensor, k: Tensor) -> Tensor:
    """softmax_j(q_0 . k_j / sqrt(d)): a matrix-vector product per (b, h); reads only q[..., 0, :]."""
    logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(), k.float()) * q.shape[-1] ** -0.5
    return logits.softmax(dim=-1)


def _torch_attention_importance(q: Tensor, k: Tensor, v: Optional[Tensor], mode: str,
                                lse: Optional[Tensor]) -> Tuple[Optional[Tensor], Tensor]:
    """Query-chunked attention: one pass computes each chunk's logits against all keys, its row
    LSE, its output rows and its contribution to the column sums. Peak extra memory is one chunk of
    logits (TORCH_CHUNK_BYTES), never N x N. Deterministic: the chunks are summed in order."""
    B, H, N, d = q.shape
    scale = d ** -0.5
    kt = k.float().transpose(-1, -2)
    vf = v.float() if v is not None else None
    out = torch.empty_like(q) if v is not None else None
    global_mode = mode == "global"
    scores = torch.zeros(B, H, N, device=q.device, dtype=torch.float32) if global_mode else None
    if not global_mode and v is None:
        return None, _class_token_scores(q, k)
    rows = _chunk_rows(q, N)
    for start in range(0, N, rows):
        stop = min(N, start + rows)
        logits = torch.matmul(q[:, :, start:stop].float(), kt).mul_(scale)
        row_lse = logits.logsumexp(dim=-1, keepdim=True) if lse is None else lse[:, :, start:stop, None].float()
        probs = logits.sub_(row_lse).exp_()
        if global_mode:
            scores += probs.sum(dim=2)
        if v is not None:
            out[:, :, start:stop] = torch.matmul(probs, vf).to(q.dtype)
    if global_mode:
        scores /= N
    else:
        scores = _class_token_scores(q, k)
    return out, scores


def _torch_select_tokens(scores: Tensor, k: Tensor, v: Tensor, n: int,
                         out_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor]:
    """Threshold = the n-th largest score (topk values are exact whatever the tie order); keep all
    scores above it and the lowest-index ties at it; emit the kept tokens in ascending index."""
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
    index = index[..., None].expand(*index.shape, k.shape[-1])
    dtype = out_dtype or k.dtype
    return k.gather(2, index).to(dtype), v.gather(2, index).to(dtype)


def _torch_prompt_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    L, B, H, n, d = k.shape
    if q.dim() == 4:
        q = q[:, None].expand(L, B, *q.shape[1:])
    out = F.scaled_dot_product_attention(q, k, v)                 # (L, B, H, P, d)
    return out.permute(0, 1, 3, 2, 4).reshape(L, B, q.shape[3], H * d)


# ------------------------------------------------------------------ "triton" custom ops
@torch.library.custom_op("fpt_fast::attention_importance", mutates_args=())
def _triton_attention_importance(q: Tensor, k: Tensor, v: Tensor, class_token: bool) -> Tuple[Tensor, Tensor]:
    from .kernels import token_importance as kernel

    out, lse = kernel.attention_forward(q, k, v)
    scores = _class_token_scores(q, k) if class_token else kernel.token_importance_forward(q, k, lse)
    return out, scores


@_triton_attention_importance.register_fake
def _(q, k, v, class_token):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fpt_fast::token_importance", mutates_args=())
def _triton_token_importance(q: Tensor, k: Tensor, lse: Optional[Tensor]) -> Tensor:
    from .kernels import token_importance as kernel

    if lse is None:
        lse = kernel.attention_forward(q, k, None)[1]
    return kernel.token_importance_forward(q, k, lse)


@_triton_token_importance.register_fake
def _(q, k, lse):
    return q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fpt_fast::select_tokens", mutates_args=())
def _triton_select_tokens(scores: Tensor, k: Tensor, v: Tensor, n: int,
                          out_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor]:
    from .kernels import select_tokens as kernel

    return kernel.select_tokens_forward(scores, k, v, n, out_dtype or k.dtype)


@_triton_select_tokens.register_fake
def _(scores, k, v, n, out_dtype):
    shape = (*k.shape[:2], n, k.shape[-1])
    dtype = out_dtype or k.dtype
    return k.new_empty(shape, dtype=dtype), v.new_empty(shape, dtype=dtype)


@torch.library.custom_op("fpt_fast::prompt_attention", mutates_args=())
def _triton_prompt_attention(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    from .kernels import prompt_attention as kernel

    return kernel.prompt_attention_forward(q, k, v)


@_triton_prompt_attention.register_fake
def _(q, k, v):
    L, B, H, n, d = k.shape
    P = q.shape[-2]
    return q.new_empty((L, B, P, H * d)), q.new_empty((L, B, H, P), dtype=torch.float32)


@torch.library.custom_op("fpt_fast::prompt_attention_backward", mutates_args=())
def _triton_prompt_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                      lse: Tensor, need_kv_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from .kernels import prompt_attention as kernel

    dq, dk, dv = kernel.prompt_attention_backward(grad_out, q, k, v, out, lse, need_kv_grad)
    if not need_kv_grad:  # custom ops cannot return None: empty placeholders, mapped back below
        dk, dv = k.new_empty(0), v.new_empty(0)
    return dq, dk, dv


@_triton_prompt_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, need_kv_grad):
    if need_kv_grad:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    return torch.empty_like(q), k.new_empty(0), v.new_empty(0)


def _prompt_attention_setup(ctx, inputs, output):
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.need_kv_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]


def _prompt_attention_grad(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _triton_prompt_attention_backward(grad_out, q, k, v, out, lse, ctx.need_kv_grad)
    if not ctx.need_kv_grad:
        dk = dv = None
    return dq, dk, dv


_triton_prompt_attention.register_autograd(_prompt_attention_grad, setup_context=_prompt_attention_setup)


# ------------------------------------------------------------------------------- public ops
def token_importance(q: Tensor, k: Tensor, mode: str = "global", lse: Optional[Tensor] = None, *,
                     backend: Optional[str] = None) -> Tensor:
    """Importance of every key token per (batch, head): (B, H, N) float32.

    q, k: (B, H, N, d), float32/float16/bfloat16. mode "global": s_j = mean_i softmax_j(q_i.k_j/sqrt(d));
    "class_token": s_j = softmax_j(q_0.k_j/sqrt(d)). lse: optional (B, H, N) row log-sum-exp of
    q.k/sqrt(d) (e.g. from the attention forward), float32. Never materialises N x N.
    """
    _check_qkv(q, k, None)
    _check_mode(mode)
    if lse is not None:
        if not isinstance(lse, Tensor):
            raise TypeError(f"lse must be a torch.Tensor or None, got {type(lse).__name__}")
        if lse.shape != q.shape[:3] or lse.dtype != torch.float32 or lse.device != q.device:
            raise ValueError(f"lse ({_describe(lse)}) must be float32 of shape {tuple(q.shape[:3])} on {q.device}")
    name = _resolve("token_importance", backend, q, q.shape[-1])
    if name == "reference":
        return reference.token_importance(q, k, mode, lse)
    if mode == "class_token":
        return _class_token_scores(q, k)
    if name == "triton":
        return _triton_token_importance(q, k, lse)
    if name == "native":
        from . import native

        return native.token_importance(q, k, lse)
    return _torch_attention_importance(q, k, None, mode, lse)[1]


def attention_with_importance(q: Tensor, k: Tensor, v: Tensor, mode: str = "global", *,
                              backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Self-attention output and token importance in one call, with flash-attention memory.

    q, k, v: (B, H, N, d). Returns out (B, H, N, d) in q's dtype and scores (B, H, N) float32.
    Only the row LSE (B, H, N) is kept between the two passes, never the probabilities.
    """
    _check_qkv(q, k, v)
    _check_mode(mode)
    name = _resolve("attention_with_importance", backend, q, q.shape[-1])
    if name == "reference":
        return reference.attention_with_importance(q, k, v, mode)
    if name == "triton":
        return _triton_attention_importance(q, k, v, mode == "class_token")
    if name == "native":
        from . import native

        return native.attention_with_importance(q, k, v, mode)
    return _torch_attention_importance(q, k, v, mode, None)


def select_tokens(scores: Tensor, k: Tensor, v: Tensor, n: int, out_dtype: Optional[torch.dtype] = None, *,
                  backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """The n highest-scoring tokens of every (batch, head) row, gathered from k and v.

    scores: (B, H, N) float; k, v: (B, H, N, d). Returns k_sel, v_sel (B, H, n, d) in out_dtype
    (default: k's dtype). Ties at the n-th score go to the lower token index.
    """
    _check_float("scores", scores)
    _check_qkv(k, v, None)
    if scores.dim() != 3 or scores.shape != k.shape[:3]:
        raise ValueError(f"scores ({_describe(scores)}) must be (B, H, N) = {tuple(k.shape[:3])}, matching k")
    if scores.device != k.device:
        raise ValueError(f"scores ({_describe(scores)}) and k ({_describe(k)}) must be on the same device")
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    N = k.shape[2]
    if not 1 <= n <= N:
        raise ValueError(f"n={n} is out of range: expected 1 <= n <= N={N}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype={out_dtype} must be None, torch.float32, torch.float16 or torch.bfloat16")
    name = _resolve("select_tokens", backend, k, k.shape[-1])
    if name == "reference":
        return reference.select_tokens(scores, k, v, n, out_dtype)
    if name == "triton":
        return _triton_select_tokens(scores, k, v, n, out_dtype)
    if name == "native":
        from . import native

        return native.select_tokens(scores, k, v, n, out_dtype)
    return _torch_select_tokens(scores, k, v, n, out_dtype)


def prompt_attention(q: Tensor, k: Tensor, v: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Prompts cross-attending to selected tokens, heads merged: (L, B, P, H * d) in q's dtype.

    q: (L, H, P, d) shared by the batch, or (L, B, H, P, d); k, v: (L, B, H, n, d).
    Differentiable in q, k and v. The Triton backend stores only the row LSE for backward.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t)
    if k.dim() != 5:
        raise ValueError(f"k ({_describe(k)}) must be 5-D (L, B, H, n, d)")
    if v.shape != k.shape:
        raise ValueError(f"v ({_describe(v)}) must have the shape of k ({tuple(k.shape)})")
    L, B, H, n, d = k.shape
    if q.dim() == 4:
        expected = (L, H, q.shape[2], d)
    elif q.dim() == 5:
        expected = (L, B, H, q.shape[3], d)
    else:
        raise ValueError(f"q ({_describe(q)}) must be (L, H, P, d) or (L, B, H, P, d)")
    if tuple(q.shape) != expected:
        raise ValueError(f"q ({_describe(q)}) does not match k ({tuple(k.shape)}): expected {expected}")
    _check_same(["q", "k", "v"], [q, k, v])
    if k.numel() == 0 or q.numel() == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}; every size must be >= 1")
    name = _resolve("prompt_attention", backend, q, d)
    if name == "reference":
        return reference.prompt_attention(q, k, v)
    if name == "triton":
        return _triton_prompt_attention(q, k, v)[0]
    if name == "native":
        from . import native

        return native.prompt_attention(q, k, v)
    return _torch_prompt_attention(q, k, v)
