"""FPT: frozen branch -> selected keys/values -> fine-grained fusion -> side network -> logits."""
from __future__ import annotations

from typing import Dict, Iterator, Mapping, Optional, Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .config import FPTConfig
from .frozen import FeaturesWithScores, FrozenBranch, FrozenFeatures
from .fusion import FineGrainedFusion
from .side import SideViT

# What resize_images does, in the words the feature store's fingerprint records.
RESIZE_METHOD = "bilinear-antialias"


def resize_images(images: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear antialiased resize of (C, H, W) or (B, C, H, W) images to size (h, w). FPT makes the
    side input from the frozen one this way, and fpt_fast.app's transforms resize with it."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    batched = images if images.dim() == 4 else images[None]
    out = F.interpolate(batched, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return out if images.dim() == 4 else out[0]


class LearnableBranch(nn.Module):
    """Everything of an FPT that learns: the fusion module and the side network. Its state_dict
    keys are therefore "fusion.*" and "side.*", the layout of fpt_fast checkpoints.

    forward(x_lo, features=None): x_lo (B, 3, h, w), features FrozenFeatures or (keys, values),
    each (L, B, H, n, d) -> logits (B, num_classes). features None runs the side network alone,
    without prompts (the ablation baseline).
    """

    def __init__(self, fusion: FineGrainedFusion, side: SideViT):
        super().__init__()
        self.fusion = fusion
        self.side = side

    def forward(self, x_lo: Tensor, features: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        if features is None:
            return self.side(x_lo)
        keys, values = features
        return self.side(x_lo, self.fusion(keys, values))


class FPT(nn.Module):
    """Fine-grained Prompt Tuning (FPT / FPT+, by config).

    forward(x_hi, x_lo=None): x_hi (B, 3, H_hi, W_hi) for the frozen branch, x_lo (B, 3, h, w) for
    the side network (default: x_hi resized to config.side_input_size) -> logits (B, num_classes).
    extract(x_hi) -> FrozenFeatures(keys, values), each (L, B, H, n, d); storable ("preloading").
    extract(x_hi, return_scores=True) -> FeaturesWithScores: also the importance scores (L, B, H, N)
    and kept token indices (L, B, H, n) of every extracted layer (fpt_fast.model.importance_maps).
    forward_from_features(x_lo, features) -> logits, without running the frozen branch.

    Two children: ``frozen`` (FrozenBranch, never trains) and ``learnable`` (LearnableBranch: the
    fusion module and the side network, also reachable as ``fusion`` and ``side``). What trains is
    handled through trainable_parameters, trainable_module, trainable_state_dict and
    load_trainable_state_dict; side_only=True selects the side network alone (the ablation that
    trains it without prompts and without the frozen branch).
    """

    def __init__(self, config: FPTConfig):
        super().__init__()
        self.config = config
        info = config.backbone_info
        self.frozen = FrozenBranch(config)
        fusion = FineGrainedFusion(
            num_layers=len(config.layers), in_dim=info.embed_dim, out_dim=config.side_dim,
            num_heads=info.num_heads, num_prompts=config.num_prompts, prompt_dim=config.prompt_dim,
            prompt_norm=config.prompt_norm, prompt_proj=config.prompt_proj, p_dropout=config.dropout,
            backend=config.backend)
        side = SideViT(img_size=config.side_input_size, patch_size=info.patch_size,
                       embed_dim=config.side_dim, depth=len(config.layers), num_heads=info.num_heads,
                       num_classes=config.num_classes)
        self.learnable = LearnableBranch(fusion, side)

    @property
    def fusion(self) -> FineGrainedFusion:
        return self.learnable.fusion

    @property
    def side(self) -> SideViT:
        return self.learnable.side

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()  # the frozen branch never trains (no dropout, no statistics)
        return self

    # ------------------------------------------------------------------ what trains
    def trainable_module(self, side_only: bool = False) -> nn.Module:
        """The module that holds (and runs) what trains, to hand to DistributedDataParallel: the
        learnable branch, called as module(x_lo, features), or with side_only the side network
        alone, called as module(x_lo). Either way no parameter of it goes unused in a step, and
        the frozen branch stays outside (it may stay on another device)."""
        return self.side if side_only else self.learnable

    def trainable_parameters(self, side_only: bool = False) -> Iterator[nn.Parameter]:
        """The parameters an optimiser updates: the fusion module's and the side network's (with
        side_only, the side network's alone)."""
        return self.trainable_module(side_only).parameters()

    def trainable_state_dict(self) -> Dict[str, Tensor]:
        """The learnable branch's weights, keys "fusion.*" and "side.*" (the frozen backbone is
        rebuilt from the config), as a plain dict."""
        return dict(self.learnable.state_dict())

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Loads trainable_state_dict() output. ValueError naming the missing and unexpected keys,
        or the tensors whose shapes differ, before anything is loaded."""
        expected = self.learnable.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"the trainable state does not fit this FPT: missing keys {missing}, "
                             f"unexpected keys {unexpected}")
        wrong = [f"{k}: given {tuple(state[k].shape)}, model {tuple(v.shape)}"
                 for k, v in expected.items() if state[k].shape != v.shape]
        if wrong:
            raise ValueError("the trainable state's shapes do not fit this FPT: " + "; ".join(wrong))
        self.learnable.load_state_dict(state)

    def learnable_share(self, side_only: bool = False) -> float:
        """Learnable parameters / all parameters (frozen backbone + the learnable ones)."""
        learnable = sum(p.numel() for p in self.trainable_parameters(side_only))
        return learnable / (learnable + sum(p.numel() for p in self.frozen.parameters()))

    # --------------------------------------------------------------------- forward
    def extract(self, x_hi: Tensor, return_scores: bool = False) -> Union[FrozenFeatures, FeaturesWithScores]:
        """Selected keys and values of the frozen branch: each (L, B, H, n, d), no autograd graph.
        return_scores: a FeaturesWithScores, adding the importance scores (L, B, H, N) float32 and
        kept token indices (L, B, H, n) int64 the extraction computed (its .features are the former)."""
        return self.frozen(x_hi, return_scores)

    def forward_from_features(self, x_lo: Tensor, features: Optional[Tuple[Tensor, Tensor]]) -> Tensor:
        """Logits (B, num_classes) from the side input x_lo (B, 3, h, w) and features extracted
        before (FrozenFeatures or (keys, values), each (L, B, H, n, d)). features None is only for
        the side-network-alone ablation: the side network then runs without prompts."""
        return self.learnable(x_lo, features)

    def forward(self, x_hi: Tensor, x_lo: Optional[Tensor] = None) -> Tensor:
        if x_lo is None:
            x_lo = resize_images(x_hi, self.config.side_input_size)
        return self.forward_from_features(x_lo, self.extract(x_hi))

