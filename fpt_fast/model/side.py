"""The side network: a small trainable ViT on the low-resolution image, with the fused prompts of
layer l appended to the input of block l and dropped after it (docs/method.md, section 5)."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor


class SideViT(VisionTransformer):
    """timm VisionTransformer (class token, learned position embeddings resampled to the input grid,
    pre-norm blocks, MLP ratio 4 with exact GELU, final LayerNorm, linear head on the class token,
    no dropout) whose forward takes the fused prompts.

    forward(x, prompts=None): x (B, 3, h, w), prompts (depth, B, P, embed_dim) -> logits
    (B, num_classes). Without prompts it is the plain ViT: the "side network alone" ablation.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]], patch_size: Union[int, Tuple[int, int]],
                 embed_dim: int, depth: int, num_heads: int, num_classes: int):
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=num_classes,
                         class_token=True, global_pool="token", dynamic_img_size=True)

    def forward(self, x: Tensor, prompts: Optional[Tensor] = None) -> Tensor:
        if prompts is None:
            return super().forward(x)
        if prompts.dim() != 4 or prompts.shape[0] != len(self.blocks) or prompts.shape[-1] != self.embed_dim:
            raise ValueError(f"prompts (shape {tuple(prompts.shape)}) must be (depth={len(self.blocks)}, B, P, "
                             f"{self.embed_dim})")
        x = self.norm_pre(self._pos_embed(self.patch_embed(x)))
        num_prompts = prompts.shape[2]
        for block, layer_prompts in zip(self.blocks, prompts):
            x = block(torch.cat([x, layer_prompts.to(x.dtype)], dim=1))[:, :-num_prompts]
        return self.head(self.norm(x)[:, 0])
