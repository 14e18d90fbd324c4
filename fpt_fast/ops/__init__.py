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
from .api import attention_with_importance, prompt_attention, select_tokens, token_importance
from .dispatch import BACKENDS, PRIORITY, backends, get_backend, set_backend, unsupported_reason, use_backend
from .validation import FLOAT_DTYPES, MODES

__all__ = ["token_importance", "attention_with_importance", "select_tokens", "prompt_attention", "BACKENDS",
           "PRIORITY", "FLOAT_DTYPES", "MODES", "backends", "get_backend", "set_backend", "unsupported_reason",
           "use_backend"]
