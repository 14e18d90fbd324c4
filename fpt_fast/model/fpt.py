"""FPT: frozen branch -> selected keys/values -> fine-grained fusion -> side network -> logits."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .config import FPTConfig
from .frozen import FrozenBranch, FrozenFeatures
from .fusion import FineGrainedFusion
from .side import SideViT


def resize_for_side(x_hi: Tensor, size: Tuple[int, int]) -> Tensor:
    """The side network's input made from the frozen branch's: antialiased bilinear resize."""
    if tuple(x_hi.shape[-2:]) == tuple(size):
        return x_hi
    return F.interpolate(x_hi, size=size, mode="bilinear", align_corners=False, antialias=True)


class FPT(nn.Module):
    """Fine-grained Prompt Tuning (FPT / FPT+, by config).

    forward(x_hi, x_lo=None): x_hi (B, 3, H_hi, W_hi) for the frozen branch, x_lo (B, 3, h, w) for
    the side network (default: x_hi resized to config.side_input_size) -> logits (B, num_classes).
    extract(x_hi) -> FrozenFeatures(keys, values), each (L, B, H, n, d); storable ("preloading").
    forward_from_features(x_lo, features) -> logits, without running the frozen branch.
    Only the fusion module and the side network learn (trainable_parameters()).
    """

    def __init__(self, config: FPTConfig):
        super().__init__()
        self.config = config
        info = config.backbone_info
        self.frozen = FrozenBranch(config)
        self.fusion = FineGrainedFusion(
            num_layers=len(config.layers), in_dim=info.embed_dim, out_dim=config.side_dim,
            num_heads=info.num_heads, num_prompts=config.num_prompts, prompt_dim=config.prompt_dim,
            prompt_norm=config.prompt_norm, prompt_proj=config.prompt_proj, p_dropout=config.dropout,
            backend=config.backend)
        self.side = SideViT(img_size=config.side_input_size, patch_size=info.patch_size,
                            embed_dim=config.side_dim, depth=len(config.layers), num_heads=info.num_heads,
                            num_classes=config.num_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()  # the frozen branch never trains (no dropout, no statistics)
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The learnable parameters: the fusion module's and the side network's."""
        yield from self.fusion.parameters()
        yield from self.side.parameters()

    def trainable_state_dict(self) -> dict:
        """state_dict of the learnable parts only (the frozen backbone is rebuilt from config)."""
        return {f"fusion.{k}": v for k, v in self.fusion.state_dict().items()} | {
            f"side.{k}": v for k, v in self.side.state_dict().items()}

    def learnable_share(self) -> float:
        """Learnable parameters / all parameters (frozen backbone + fusion + side)."""
        learnable = sum(p.numel() for p in self.trainable_parameters())
        return learnable / (learnable + sum(p.numel() for p in self.frozen.parameters()))

    def extract(self, x_hi: Tensor) -> FrozenFeatures:
        """Selected keys and values of the frozen branch: each (L, B, H, n, d), no autograd graph."""
        return self.frozen(x_hi)

    def forward_from_features(self, x_lo: Tensor, features: FrozenFeatures) -> Tensor:
        keys, values = features
        return self.side(x_lo, self.fusion(keys, values))

    def forward(self, x_hi: Tensor, x_lo: Optional[Tensor] = None) -> Tensor:
        if x_lo is None:
            x_lo = resize_for_side(x_hi, self.config.side_input_size)
        return self.forward_from_features(x_lo, self.extract(x_hi))


def build(preset: str = "fpt+", **overrides) -> FPT:
    """FPT(FPTConfig.preset(preset, **overrides))."""
    return FPT(FPTConfig.preset(preset, **overrides))

