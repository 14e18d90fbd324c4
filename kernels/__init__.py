"""fpt_fast.kernels: Triton kernels, one file per fused op (kernels first, then launchers).

Launchers take tensors already validated by fpt_fast.ops; call the ops, not these, from user code.
"""
