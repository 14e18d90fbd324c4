"""The fine-grained fusion module: learnable prompts cross-attend to the frozen branch's selected
keys/values, one set of prompts per extracted layer (docs/method.md, section 4)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops


class FineGrainedFusion(nn.Module):
    """Drop-in for the official fusion module: same constructor keyword arguments, and the same
    state_dict keys and shapes (prompts (L, 1, P, dp): the 1 broadcasts over the batch), so the
    official module's state_dict loads with strict=True. state_dicts of earlier fpt_fast versions,
    with prompts (L, P, dp), load too.

    Args:
        num_layers: L, number of extracted layers.
        in_dim: D, width of the frozen backbone.
        out_dim: Ds, width of the side network.
        num_heads: H, heads of the frozen backbone (its keys are split into H heads of size D / H).
        num_prompts: P, prompts per layer.
        prompt_dim: dp, prompt width (default D). If dp != D, prompt_proj must be True and dp == Ds.
        prompt_norm: LayerNorm(dp) on the prompts before they query.
        prompt_proj: Linear(dp -> D) on the prompts before they query.
        p_dropout: dropout on the fused prompts.
        backend: backend of fpt_fast.ops.prompt_attention (None = the process-wide default).

    forward(keys, values): keys, values (L, B, H, n, D / H) -> fused prompts (L, B, P, Ds).
    """

    def __init__(self, num_layers: int, in_dim: int, out_dim: int, num_heads: int, num_prompts: int,
                 prompt_dim: Optional[int] = None, prompt_norm: bool = True, prompt_proj: bool = False,
                 p_dropout: float = 0.5, backend: Optional[str] = None):
        super().__init__()
        prompt_dim = in_dim if prompt_dim is None else prompt_dim
        if in_dim % num_heads:
            raise ValueError(f"in_dim={in_dim} must be divisible by num_heads={num_heads}")
        if prompt_dim != in_dim and not prompt_proj:
            raise ValueError(f"prompt_dim={prompt_dim} differs from in_dim={in_dim}: prompt_proj=True is required")
        if prompt_dim != in_dim and prompt_dim != out_dim:
            raise ValueError(f"prompt_dim={prompt_dim} must equal in_dim={in_dim} or out_dim={out_dim} "
                             f"(the raw prompts are added before or after out_proj)")
        self.num_heads = num_heads
        self.p_dropout = p_dropout
        self.backend = backend
        # N(0, 1e-6^2): the prompts start as (almost) nothing, so the side network starts as a plain ViT.
        self.prompts = nn.Parameter(torch.randn(num_layers, 1, num_prompts, prompt_dim) * 1e-6)
        self.layer_norm = nn.LayerNorm(prompt_dim) if prompt_norm else None
        self.prompt_proj = nn.Linear(prompt_dim, in_dim) if prompt_proj else None
        self.out_proj = nn.Linear(in_dim, out_dim)
        self.dropout = nn.Dropout(p_dropout)
        self._register_load_state_dict_pre_hook(self._upgrade_state_dict)

    @staticmethod
    def upgrade_state_dict(state_dict, prefix: str = "") -> None:
        """Reshapes, in place, prompts of the earlier fpt_fast layout (L, P, dp) under prefix to
        today's (L, 1, P, dp)."""
        key = prefix + "prompts"
        prompts = state_dict.get(key)
        if isinstance(prompts, Tensor) and prompts.dim() == 3:
            state_dict[key] = prompts[:, None]

    def _upgrade_state_dict(self, state_dict, prefix, *args) -> None:
        self.upgrade_state_dict(state_dict, prefix)

    def queries(self) -> Tensor:
        """The prompts as attention queries: (L, H, P, D / H)."""
        x = self.prompts[:, 0]
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        if self.prompt_proj is not None:
            x = self.prompt_proj(x)
        L, P, D = x.shape
        return x.reshape(L, P, self.num_heads, D // self.num_heads).transpose(1, 2)

    def forward(self, keys: Tensor, values: Tensor) -> Tensor:
        q = self.queries()
        # Attend in the narrower dtype: up-casting stored bf16 features would copy the step's largest
        # tensors and keep the copies for backward; the kernels accumulate in fp32 anyway.
        dtype = keys.dtype if keys.element_size() < q.element_size() else q.dtype
        context = ops.prompt_attention(q.to(dtype), keys.to(dtype), values.to(dtype),
                                       backend=self.backend).to(q.dtype)
        raw = self.prompts                                               # (L, 1, P, dp)
        if raw.shape[-1] == context.shape[-1]:
            fused = self.out_proj(context + raw.to(context.dtype))
        else:
            fused = self.out_proj(context) + raw
        return self.dropout(fused)
