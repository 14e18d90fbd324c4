"""The "triton" backend: the kernels of fpt_fast.kernels registered as torch custom ops, with fake
implementations (fpt_fast.ops.fake_outputs, so torch.compile traces them) and autograd for prompt attention. The module-level
functions at the end have the signatures of fpt_fast.ops.reference."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import fake_outputs


# Where attention_with_importance takes the attention output and row LSE that its importance kernel
# reads: "own" (the Triton flash forward) or one of PyTorch's fused forwards ("flash", "efficient",
# "cudnn": kernels.token_importance.LSE_SOURCES). "own" until a GPU run of benchmarks/kernels.py
# (op attention_lse_source) shows one of PyTorch's faster on the device; calls a source cannot run
# (float32 for flash/cudnn, head sizes that are not multiples of 8) take "own".
ATTENTION_LSE_SOURCE = "own"


@torch.library.custom_op("fpt_fast::attention_with_importance", mutates_args=())
def _attention_with_importance(q: Tensor, k: Tensor, v: Tensor, class_token: bool) -> Tuple[Tensor, Tensor]:
    from ..kernels import token_importance as kernel

    source = ATTENTION_LSE_SOURCE if kernel.lse_source_reason(ATTENTION_LSE_SOURCE, q) is None else "own"
    out, lse = kernel.attention_forward_from(source, q, k, v)
    if source != "own":
        # PyTorch's forwards lay their output out their own way; the fake implementation promises
        # empty_like(q)'s layout, which the own forward writes.
        like = torch.empty_like(q)
        if out.stride() != like.stride():
            out = like.copy_(out)
    if class_token:
        return out, kernel.class_token_importance_forward(q, k, lse)
    return out, kernel.token_importance_forward(q, k, lse)


_attention_with_importance.register_fake(fake_outputs.attention_with_importance)


@torch.library.custom_op("fpt_fast::token_importance", mutates_args=())
def _token_importance(q: Tensor, k: Tensor, lse: Optional[Tensor], class_token: bool) -> Tensor:
    from ..kernels import token_importance as kernel

    if class_token:  # computes LSE_0 itself when lse is None: no attention pass
        return kernel.class_token_importance_forward(q, k, lse)
    if lse is None:
        lse = kernel.attention_forward(q, k, None)[1]
    return kernel.token_importance_forward(q, k, lse)


_token_importance.register_fake(fake_outputs.importance)


@torch.library.custom_op("fpt_fast::select_tokens", mutates_args=())
def _select_tokens(scores: Tensor, k: Tensor, v: Tensor, n: int,
                   out_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor]:
    from ..kernels import select_tokens as kernel

    return kernel.select_tokens_forward(scores, k, v, n, out_dtype or k.dtype)


_select_tokens.register_fake(fake_outputs.selected)


@torch.library.custom_op("fpt_fast::select_tokens_with_indices", mutates_args=())
def _select_tokens_with_indices(scores: Tensor, k: Tensor, v: Tensor, n: int,
                                out_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor]:
    from ..kernels import select_tokens as kernel

    return kernel.select_tokens_forward(scores, k, v, n, out_dtype or k.dtype, return_indices=True)


_select_tokens_with_indices.register_fake(fake_outputs.selected_with_indices)


@torch.library.custom_op("fpt_fast::prompt_attention", mutates_args=())
def _prompt_attention(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    from ..kernels import prompt_attention as kernel

    return kernel.prompt_attention_forward(q, k, v)


_prompt_attention.register_fake(fake_outputs.prompt_attention)


@torch.library.custom_op("fpt_fast::prompt_attention_backward", mutates_args=())
def _prompt_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                               lse: Tensor, need_kv_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from ..kernels import prompt_attention as kernel

    dq, dk, dv = kernel.prompt_attention_backward(grad_out, q, k, v, out, lse, need_kv_grad)
    if not need_kv_grad:  # custom ops cannot return None: empty placeholders, mapped back below
        dk, dv = k.new_empty(0), v.new_empty(0)
    return dq, dk, dv


@_prompt_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, need_kv_grad):
    return fake_outputs.prompt_attention_grads(q, k, v, need_kv_grad)


def _prompt_attention_setup(ctx, inputs, output):
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.need_kv_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]


def _prompt_attention_grad(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _prompt_attention_backward(grad_out, q, k, v, out, lse, ctx.need_kv_grad)
    if not ctx.need_kv_grad:
        dk = dv = None
    return dq, dk, dv


_prompt_attention.register_autograd(_prompt_attention_grad, setup_context=_prompt_attention_setup)


# ------------------------------------------------- ops (the signatures of fpt_fast.ops.reference)
def token_importance(q: Tensor, k: Tensor, importance: str = "global", lse: Optional[Tensor] = None) -> Tensor:
    return _token_importance(q, k, lse, importance == "class_token")


def attention_with_importance(q: Tensor, k: Tensor, v: Tensor, importance: str = "global") -> Tuple[Tensor, Tensor]:
    return _attention_with_importance(q, k, v, importance == "class_token")


def select_tokens(scores: Tensor, k: Tensor, v: Tensor, n: int, out_dtype: Optional[torch.dtype] = None,
                  return_indices: bool = False) -> Tuple[Tensor, ...]:
    if return_indices:
        return _select_tokens_with_indices(scores, k, v, n, out_dtype)
    return _select_tokens(scores, k, v, n, out_dtype)


def prompt_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _prompt_attention(q, k, v)[0]

