"""The front door of fpt_fast's fused ops: validation, backend dispatch, autograd, custom ops.

Ops (each has a twin with the same signature in ``fpt_fast.reference``):
    token_importance(q, k, importance, lse)            -> scores (B, H, N) float32
    attention_with_importance(q, k, v, importance)     -> (out (B, H, N, d), scores (B, H, N) float32)
    select_tokens(scores, k, v, n, out_dtype)          -> (k_sel, v_sel), each (B, H, n, d)
        return_indices=True                            -> (k_sel, v_sel, indices (B, H, n) int64)
    prompt_attention(q, k, v)                          -> (L, B, P, H * d)
importance: "global" (mean attention over all queries) or "class_token" (the class token's row).

Backends (pick per call with ``backend=``, or for the calls that name none with ``set_backend`` /
``use_backend``; fpt_fast.ops.dispatch declares what each runs):
    "triton"    fused Triton kernels (kernels/), head size <= 128; first for CUDA tensors. On the CPU
                only under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported).
    "native"    the C++/CUDA extension (csrc/), built on first use; first on the CPU. On CUDA only
                select_tokens.
    "torch"     memory-efficient pure PyTorch (query-chunked, never N x N); runs everywhere.
    "reference" fpt_fast.reference: materialises everything; for testing.
"auto" walks ``PRIORITY`` for the tensors' device type and takes the first backend that can run
the call. Naming a backend that cannot run the call raises a ValueError with its reasons; when
nothing fits, the error lists every backend's reasons. ``backend_table(device)`` and
``python -m fpt_fast.info`` show what runs where. "sdpa" and "math", the former attention-backend
names, are accepted as aliases of "torch" and "reference" (``ALIASES``).

Contracts: inputs may be non-contiguous (kernels read through strides or the launcher copies);
the order of the n kept tokens is ascending token index for "triton", "native" and "torch", and
descending score for "reference" (attention downstream does not depend on it). The selected
keys/values and the importance scores carry no gradient (they are constants of the frozen branch);
prompt_attention is differentiable in q, k and v. Every backend traces under
torch.compile(fullgraph=True).
"""
from .api import attention_with_importance, prompt_attention, select_tokens, token_importance
from .dispatch import (ALIASES, BACKENDS, OPS, PRIORITY, auto_choices, backend_table, canonical_backend, get_backend,
                       set_backend, unsupported_reasons, use_backend)
from .validation import FLOAT_DTYPES, IMPORTANCE_MODES

__all__ = ["token_importance", "attention_with_importance", "select_tokens", "prompt_attention", "ALIASES",
           "BACKENDS", "OPS", "PRIORITY", "FLOAT_DTYPES", "IMPORTANCE_MODES", "auto_choices", "backend_table",
           "canonical_backend", "get_backend", "set_backend", "unsupported_reasons", "use_backend"]
