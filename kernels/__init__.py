"""fpt_fast.kernels: Triton kernels, one file per fused op (kernels first, then launchers), and
_common.py with what they share (masked tile loads/stores, head-dim padding, interpreter detection,
the float32 dot-precision policy, log2 constants, the CUDA device guard of every launcher).

    token_importance.py   flash-attention forward keeping the row LSE; global and class-token importance
    select_tokens.py      sort-free top-n select + gather (a per-row plan, then a split copy for long rows)
    prompt_attention.py   prompt cross-attention forward and backward

Limits shared by all: float32/float16/bfloat16 inputs, head size <= 128 (fpt_fast.ops enforces it),
float32 accumulation. Tested under TRITON_INTERPRET=1 on the CPU and on one NVIDIA H100 (Triton 3.6);
each file's header says what of it ran where. Launchers take tensors already validated by
fpt_fast.ops; call the ops, not these, from user code.
"""
