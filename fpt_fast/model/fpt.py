"""FPT: frozen branch -> selected keys/values -> fine-grained fusion -> side network -> logits."""
from __future__ import annotations

from typing import Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.validation import describe
from .config import FPTConfig
from .frozen import FeaturesWithScores, FrozenBranch, FrozenFeatures
from .fusion import FineGrainedFusion
from .side import SideViT


def resize_images(images: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear antialiased resize of (C, H, W) or (B, C, H, W) images to size (h, w). FPT makes the
    side input from the frozen one this way when no side input is given."""
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

    forward(x_hi, x_lo=None): x_hi (B, 3, *config.image_size) for the frozen branch, x_lo
    (B, 3, h, w) for the side network -> logits (B, num_classes). The official side input is a
    separate resize (or augmentation) of the original image: make both with fpt_fast.FPTTransforms.
    Without x_lo, x_hi resized to config.side_input_size (resize_images, on the normalised tensor)
    stands in: an approximation of the official side input, whose logits differ from the official
    model's (docs/parity.md).
    extract(x_hi) -> FrozenFeatures(keys, values), each (L, B, H, n, d); storable ("preloading").
    extract(x_hi, return_scores=True) -> FeaturesWithScores: also the importance scores (L, B, H, N)
    and kept token indices (L, B, H, n) of every extracted layer (fpt_fast.model.importance_maps).
    forward_from_features(x_lo, features) -> logits, without running the frozen branch.

    Two children: ``frozen`` (FrozenBranch, never trains) and ``learnable`` (LearnableBranch: the
    fusion module and the side network, also reachable as ``fusion`` and ``side``). What trains is
    handled through trainable_parameters, trainable_module, trainable_state_dict and
    load_trainable_state_dict; side_only=True selects the side network alone (the ablation that
    trains it without prompts and without the frozen branch).

    The three entry points check their inputs first (a TypeError/ValueError naming x_hi, x_lo or
    features, with its shape, dtype and device, and what was expected): a tensor of rank 4 with 3
    channels, of config.image_size (x_hi; the stored features depend on it) or of any multiple of
    the patch size (x_lo; the side network resamples its position embeddings), with the same batch
    size, on the device of the weights that read it, in their dtype (under autocast on a GPU,
    float32, bfloat16 or float16). Images are float (normalised), never uint8.
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
        state = dict(state)
        FineGrainedFusion.upgrade_state_dict(state, "fusion.")  # prompts of earlier versions: (L, P, dp)
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

    # --------------------------------------------------------------------- inputs
    def _check_images(self, name: str, x, size: Optional[Tuple[int, int]], reader: nn.Module,
                      internal_autocast: bool, batch: Optional[int] = None) -> None:
        """x: images (B, 3, *size) (size None: any multiple of the patch) for ``reader`` (the module
        whose weights read them first)."""
        if not isinstance(x, Tensor):
            shape = getattr(x, "shape", None)
            raise TypeError(f"{name} must be a torch.Tensor (B, 3, height, width), got {type(x).__name__}"
                            + (f" of shape {tuple(shape)}" if shape is not None else "")
                            + (": convert it with torch.from_numpy" if type(x).__module__ == "numpy" else ""))
        where = f"{name} ({describe(x)})"
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[0] == 0:
            raise ValueError(f"{where} must be a non-empty batch of RGB images (B, 3, height, width)")
        patch = self.config.backbone_info.patch_size
        if size is not None and tuple(x.shape[2:]) != tuple(size):
            raise ValueError(f"{where} must have the configured size {tuple(size)} (config.image_size, multiples "
                             f"of the patch {patch}): resize the images (fpt_fast.model.resize_images) or build "
                             f"the model for this size")
        if x.shape[2] % patch[0] or x.shape[3] % patch[1]:
            raise ValueError(f"{where} must have a height and width divisible by the patch {patch}")
        if batch is not None and x.shape[0] != batch:
            raise ValueError(f"{where} must have the batch size of x_hi ({batch})")
        weight = next(reader.parameters())
        if x.device != weight.device:
            raise ValueError(f"{where} must be on {weight.device}, where the weights that read it are")
        if not x.is_floating_point():
            raise TypeError(f"{where} must be a float tensor of normalised images ({weight.dtype}), not "
                            f"{x.dtype}: convert and normalise it first")
        autocast = x.device.type == "cuda" and (internal_autocast or torch.is_autocast_enabled("cuda"))
        allowed = {weight.dtype} | ({torch.float32, torch.bfloat16, torch.float16} if autocast else set())
        if x.dtype not in allowed:
            raise TypeError(f"{where} must be {' or '.join(sorted(str(d) for d in allowed))}, the dtype of the "
                            f"model's weights" + ("" if autocast else " (half precision only under autocast on a GPU)"))

    def _check_x_hi(self, x_hi) -> None:
        device = x_hi.device if isinstance(x_hi, Tensor) else torch.device("cpu")
        self._check_images("x_hi", x_hi, self.config.image_size, self.frozen,
                           self.frozen.compute_dtype(device) != torch.float32)

    def _check_x_lo(self, x_lo, batch: Optional[int] = None) -> None:
        self._check_images("x_lo", x_lo, None, self.side, False, batch)

    def _check_features(self, features, x_lo: Tensor) -> None:
        config, info = self.config, self.config.backbone_info
        expected = (len(config.layers), x_lo.shape[0], info.num_heads, config.num_selected, info.head_dim)
        if not (isinstance(features, (tuple, list)) and len(features) == 2):
            raise TypeError(f"features must be FrozenFeatures or (keys, values), got {type(features).__name__}")
        for name, t in zip(("features.keys", "features.values"), features):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor {expected}, got {type(t).__name__}")
            if tuple(t.shape) != expected or not t.is_floating_point() or t.device != x_lo.device:
                raise ValueError(f"{name} ({describe(t)}) must be a float tensor "
                                 f"(L, B, H, n, d) = {expected} on {x_lo.device} (as extract gives for a batch of "
                                 f"x_lo's size)")

    # --------------------------------------------------------------------- forward
    def extract(self, x_hi: Tensor, return_scores: bool = False) -> Union[FrozenFeatures, FeaturesWithScores]:
        """Selected keys and values of the frozen branch: each (L, B, H, n, d), no autograd graph.
        return_scores: a FeaturesWithScores, adding the importance scores (L, B, H, N) float32 and
        kept token indices (L, B, H, n) int64 the extraction computed (its .features are the former)."""
        self._check_x_hi(x_hi)
        return self.frozen(x_hi, return_scores)

    def forward_from_features(self, x_lo: Tensor, features: Optional[Tuple[Tensor, Tensor]]) -> Tensor:
        """Logits (B, num_classes) from the side input x_lo (B, 3, h, w) and features extracted
        before (FrozenFeatures or (keys, values), each (L, B, H, n, d)). features None is only for
        the side-network-alone ablation: the side network then runs without prompts."""
        self._check_x_lo(x_lo)
        if features is not None:
            self._check_features(features, x_lo)
        return self.learnable(x_lo, features)

    def forward(self, x_hi: Tensor, x_lo: Optional[Tensor] = None) -> Tensor:
        """Logits (B, num_classes). x_lo None: x_hi resized to config.side_input_size, an
        approximation of the official side input (see the class docstring)."""
        self._check_x_hi(x_hi)
        if x_lo is None:
            # The side input is x_hi resized: x_hi must suit the side network's weights as well.
            self._check_images("x_hi", x_hi, self.config.image_size, self.side, False)
            x_lo = resize_images(x_hi, self.config.side_input_size)
        else:
            self._check_x_lo(x_lo, batch=x_hi.shape[0])
        return self.learnable(x_lo, self.frozen(x_hi))  # the inputs are checked: no second check

