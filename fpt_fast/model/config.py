"""FPTConfig: every setting that defines an FPT / FPT+ model, validated on construction.

The presets follow the official configurations (FPT paper, MICCAI 2024; FPT+ paper, IEEE TNNLS
2025); see ``FPTConfig.preset``.
"""
from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple, Union

import torch

from ..ops import IMPORTANCE_MODES, canonical_backend
from .backbones import BackboneInfo, read_backbone_info

Size = Union[int, Tuple[int, int]]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Rules for resampling the frozen backbone's position embeddings (FPTConfig.pos_embed_resampling).
POS_EMBED_RESAMPLING = ("official", "timm")
# LayerNorm eps of the official code's HuggingFace ViTs (google/vit-base-patch16-384's config); timm's is 1e-6.
HF_LAYER_NORM_EPS = 1e-12
# The official LPM: google/vit-base-patch16-384 (ImageNet-21k, fine-tuned on ImageNet-1k at 384 px),
# a HuggingFace ViT whose LayerNorms use HF_LAYER_NORM_EPS; timm's name for the same weights.
OFFICIAL_BACKBONE = "vit_base_patch16_384.orig_in21k_ft_in1k"


def size_pair(size: Size) -> Tuple[int, int]:
    """(height, width) of a size given as one integer (square) or two."""
    if isinstance(size, int):
        return (int(size), int(size))
    return (int(size[0]), int(size[1]))


def _is_integer(value) -> bool:
    """An integer, and not a bool (True is an int to Python, never a size or a count here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


PRESETS = {
    # docs/method.md, section 7. extracted_layers=None resolves to all blocks (FPT) or the second half (FPT+).
    "fpt": dict(num_prompts=16, side_reduction_ratio=8, prompt_reduction_ratio=8, prompt_norm=False,
                prompt_proj=True, token_ratio=0.2, importance="global", side_input_size=224,
                image_size=512, layer_selection="all", pos_embed_resampling="official",
                frozen_layer_norm_eps="official"),
    "fpt+": dict(num_prompts=16, side_reduction_ratio=8, prompt_reduction_ratio=1, prompt_norm=True,
                 prompt_proj=False, token_ratio=0.2, importance="global", side_input_size=128,
                 image_size=512, layer_selection="second_half", pos_embed_resampling="official",
                 frozen_layer_norm_eps="official"),
}


@dataclass
class FPTConfig:
    """Configuration of an FPT / FPT+ model.

    Args:
        backbone: the frozen large pre-trained model: a timm VisionTransformer or Eva name,
            optionally with a pretrained tag ("vit_large_patch14_dinov2.lvd142m"), a Hugging Face
            Hub name "hf-hub:org/name" or a local timm model folder "local-dir:/path" (config.json and
            weights). See fpt_fast.model.backbones.
        backbone_kwargs: extra keyword arguments for timm.create_model (e.g. depth, reg_tokens), JSON
            values only: class-valued arguments by name (mlp_layer: "SwiGLUPacked", act_layer:
            "silu", or "package.module.Name"), resolved when the model is built.
        num_classes: number of output classes.
        image_size: input size of the frozen branch, int or (height, width); divisible by the patch.
        side_input_size: input size of the side network, int or (height, width).
        extracted_layers: block indices whose keys/values are selected; None = the preset's rule.
        layer_selection: rule used when extracted_layers is None: "all" or "second_half".
        num_prompts: prompts per extracted layer (P).
        side_reduction_ratio: side width = backbone width / this.
        prompt_reduction_ratio: prompt width = backbone width / this.
        prompt_norm: LayerNorm on the prompts before the cross-attention.
        prompt_proj: Linear(prompt width -> backbone width) on the prompts.
        token_ratio: n = int(N * token_ratio) tokens kept per (image, head, layer).
        importance: "global" (mean attention over all queries) or "class_token".
        dropout: dropout probability on the fused prompts.
        pretrained: load the backbone's published weights: timm's for a registry name (from the
            Hugging Face cache or hub), the repository's for "hf-hub:", the folder's for "local-dir:".
        checkpoint_path: load the backbone's weights from this local file instead, in any layout
            fpt_fast.model.backbone_weights reads (timm, RETFound-MAE, DINOv2 teacher, OpenCLIP,
            safetensors); missing or unexpected weights are an error.
        pos_embed_resampling: how the backbone's position embeddings go from the grid its weights
            were stored at to the grid of image_size (once, when the backbone is built):
            "official" (the official FPT code's rule, docs/method.md section 3: bicubic,
            align_corners=False, no antialiasing, scale factor (g + 0.1) / g0 per axis; untouched
            at the stored grid) or "timm" (timm's antialiased bicubic resize to the grid: the rule a
            timm model applies itself). Rotary position embeddings (Eva models: DINOv3, EVA02) have
            nothing stored to resample: they follow the grid by the model's own rule.
        frozen_layer_norm_eps: eps of every LayerNorm of the frozen backbone: None keeps the
            backbone's own (timm ViTs: 1e-6); a number sets it; "official" (the presets) gives the
            official LPM (OFFICIAL_BACKBONE, a HuggingFace ViT) its HuggingFace eps 1e-12, as the
            official code runs it, and leaves every other backbone its own. layer_norm_eps is
            the eps that results.
        frozen_dtype: dtype the frozen branch computes in: None = bfloat16 on GPUs that support it,
            float32 otherwise.
        feature_dtype: dtype of the selected keys/values: None = the fusion's compute dtype.
        frozen_chunk_size: split the frozen forward into micro-batches of this many images.
        backend: the fpt_fast.ops backend of every op the model runs (the extracted blocks'
            attention, importance and selection, and the fusion's prompt attention): "auto"
            (fpt_fast.ops.PRIORITY), "triton", "native", "torch" or "reference"; the former
            attention-backend names "sdpa" and "math" are read as "torch" and "reference". The
            other frozen blocks run timm's fused SDPA attention, except with "reference", where
            every block materialises its N x N attention. See fpt_fast.backend_table().
    """

    # The official LPM: google/vit-base-patch16-384 (ImageNet-21k, fine-tuned on ImageNet-1k at 384 px).
    backbone: str = OFFICIAL_BACKBONE
    backbone_kwargs: dict = field(default_factory=dict)
    num_classes: int = 2
    image_size: Size = 512
    side_input_size: Size = 224
    extracted_layers: Optional[Tuple[int, ...]] = None
    layer_selection: str = "all"
    num_prompts: int = 16
    side_reduction_ratio: int = 8
    prompt_reduction_ratio: int = 8
    prompt_norm: bool = False
    prompt_proj: bool = True
    token_ratio: float = 0.2
    importance: str = "global"
    dropout: float = 0.5
    pretrained: bool = False
    checkpoint_path: Optional[str] = None
    pos_embed_resampling: str = "official"
    frozen_layer_norm_eps: Union[None, float, Literal["official"]] = None
    frozen_dtype: Optional[str] = None
    feature_dtype: Optional[str] = None
    frozen_chunk_size: Optional[int] = None
    backend: str = "auto"
    _backbone_info: BackboneInfo = field(init=False, repr=False, compare=False)

    @classmethod
    def preset(cls, name: str, **overrides) -> "FPTConfig":
        """The official configuration "fpt" or "fpt+" (docs/method.md, section 7), with overrides applied."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"FPTConfig.preset: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    def __post_init__(self):
        if not isinstance(self.backbone_kwargs, dict):
            raise ValueError(f"FPTConfig.backbone_kwargs={self.backbone_kwargs!r} is invalid: expected a dict")
        # Types first: "64" would otherwise become (6, 4), and 1.7 block 1.
        for name in ("image_size", "side_input_size"):
            size = getattr(self, name)
            if not (_is_integer(size) or (isinstance(size, (tuple, list)) and len(size) == 2
                                          and all(_is_integer(s) for s in size))):
                raise ValueError(f"FPTConfig.{name}={size!r} is invalid: expected an integer or two integers "
                                 f"(height, width)")
            if _is_integer(size):
                setattr(self, name, int(size))  # numpy integers included
        layers = self.extracted_layers
        if layers is not None and not (isinstance(layers, (tuple, list)) and all(_is_integer(i) for i in layers)):
            raise ValueError(f"FPTConfig.extracted_layers={layers!r} is invalid: expected None or a list of integer "
                             f"block indices")
        for name in ("prompt_norm", "prompt_proj", "pretrained"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FPTConfig.{name}={getattr(self, name)!r} is invalid: expected True or False")
        self._backbone_info = read_backbone_info(self.backbone, self.backbone_kwargs)
        self.image_size = size_pair(self.image_size)
        self.side_input_size = size_pair(self.side_input_size)
        if self.extracted_layers is not None:
            self.extracted_layers = tuple(int(i) for i in self.extracted_layers)
        try:  # the former attention-backend names become the backends that run the same
            self.backend = canonical_backend(self.backend)
        except (TypeError, ValueError) as error:
            raise ValueError(f"FPTConfig.backend={self.backend!r} is invalid: {error}") from None
        self.validate()

    # ---------------------------------------------------------------- derived quantities
    @property
    def backbone_info(self) -> BackboneInfo:
        """The backbone's shape: width, heads, depth, patch size, prefix tokens."""
        return self._backbone_info

    @property
    def layers(self) -> Tuple[int, ...]:
        """Extracted block indices, sorted ascending."""
        if self.extracted_layers is not None:
            return tuple(sorted(self.extracted_layers))
        depth = self._backbone_info.depth
        return tuple(range(depth)) if self.layer_selection == "all" else tuple(range(depth // 2, depth))

    @property
    def num_tokens(self) -> int:
        """N: prefix tokens + patches of the frozen branch's input."""
        ph, pw = self._backbone_info.patch_size
        return self._backbone_info.num_prefix_tokens + (self.image_size[0] // ph) * (self.image_size[1] // pw)

    @property
    def num_selected(self) -> int:
        """n = int(N * token_ratio)."""
        return num_selected_tokens(self.num_tokens, self.token_ratio)

    @property
    def layer_norm_eps(self) -> Optional[float]:
        """The eps the frozen backbone's LayerNorms get (None: the backbone's own), from
        frozen_layer_norm_eps."""
        if self.frozen_layer_norm_eps == "official":
            return HF_LAYER_NORM_EPS if self.backbone == OFFICIAL_BACKBONE else None
        return self.frozen_layer_norm_eps

    @property
    def side_dim(self) -> int:
        """Ds: the side network's width, backbone width / side_reduction_ratio."""
        return self._backbone_info.embed_dim // self.side_reduction_ratio

    @property
    def prompt_dim(self) -> int:
        """dp: the prompts' width, backbone width / prompt_reduction_ratio."""
        return self._backbone_info.embed_dim // self.prompt_reduction_ratio

    def to_dict(self) -> dict:
        """The constructor arguments as JSON values (sizes and layers as lists): FPTConfig(**to_dict())
        is an equal config."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d["backbone_kwargs"] = dict(self.backbone_kwargs)
        d["image_size"] = list(self.image_size)
        d["side_input_size"] = list(self.side_input_size)
        if d["extracted_layers"] is not None:
            d["extracted_layers"] = list(d["extracted_layers"])
        return d

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        info = self._backbone_info
        D, H = info.embed_dim, info.num_heads

        def bad(name, value, expected):
            raise ValueError(f"FPTConfig.{name}={value!r} is invalid: expected {expected}")

        if not _is_integer(self.num_classes) or self.num_classes < 1:
            bad("num_classes", self.num_classes, "a positive integer")
        if self.layer_selection not in ("all", "second_half"):
            bad("layer_selection", self.layer_selection, "'all' or 'second_half'")
        for name in ("image_size", "side_input_size"):
            h, w = getattr(self, name)
            ph, pw = info.patch_size
            if h < 1 or w < 1 or h % ph or w % pw:
                bad(name, (h, w), f"positive sizes divisible by the backbone's patch size {info.patch_size}")
        layers = self.layers
        if not layers:
            bad("extracted_layers", self.extracted_layers, "at least one block index")
        if len(set(layers)) != len(layers):
            bad("extracted_layers", self.extracted_layers, "distinct block indices")
        for i in layers:
            if not 0 <= i < info.depth:
                bad("extracted_layers", self.extracted_layers,
                    f"block indices in [0, {info.depth - 1}] ({info.name} has {info.depth} blocks)")
        if not _is_integer(self.num_prompts) or self.num_prompts < 1:
            bad("num_prompts", self.num_prompts, "a positive integer")
        for name in ("side_reduction_ratio", "prompt_reduction_ratio"):
            r = getattr(self, name)
            if not _is_integer(r) or r < 1 or D % r:
                bad(name, r, f"a positive integer dividing the backbone width {D}")
        if self.side_dim % H:
            bad("side_reduction_ratio", self.side_reduction_ratio,
                f"a ratio giving a side width ({self.side_dim}) divisible by the {H} heads")
        if not (_is_number(self.token_ratio) and 0.0 < self.token_ratio <= 1.0):
            bad("token_ratio", self.token_ratio, "a number in (0, 1]")
        if self.num_selected < 1:
            bad("token_ratio", self.token_ratio,
                f"a ratio keeping n >= 1 of the N={self.num_tokens} tokens (n = int(N * token_ratio) "
                f"= {self.num_selected})")
        if self.pos_embed_resampling not in POS_EMBED_RESAMPLING:
            bad("pos_embed_resampling", self.pos_embed_resampling, f"one of {POS_EMBED_RESAMPLING}")
        eps = self.frozen_layer_norm_eps
        if eps is not None and eps != "official" and (not _is_number(eps) or not 0 < eps < 1):
            bad("frozen_layer_norm_eps", eps, "None, 'official' or a number in (0, 1)")
        if self.importance not in IMPORTANCE_MODES:
            bad("importance", self.importance, f"one of {IMPORTANCE_MODES}")
        if self.importance == "class_token" and not info.has_class_token:
            bad("importance", self.importance, f"'global': {info.name} has no class token")
        if self.prompt_dim != D and not self.prompt_proj:
            bad("prompt_reduction_ratio", self.prompt_reduction_ratio,
                f"1 (prompt width = backbone width {D}) unless prompt_proj=True "
                f"(prompt width {self.prompt_dim} cannot query keys of width {D})")
        if self.prompt_dim not in (D, self.side_dim):
            bad("prompt_reduction_ratio", self.prompt_reduction_ratio,
                f"a ratio giving a prompt width equal to the backbone width {D} or the side width "
                f"{self.side_dim} (got {self.prompt_dim})")
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            bad("dropout", self.dropout, "a probability in [0, 1)")
        for name in ("frozen_dtype", "feature_dtype"):
            v = getattr(self, name)
            if v is not None and v not in DTYPES:
                bad(name, v, f"None or one of {tuple(DTYPES)}")
        if self.frozen_chunk_size is not None and (not _is_integer(self.frozen_chunk_size)
                                                   or self.frozen_chunk_size < 1):
            bad("frozen_chunk_size", self.frozen_chunk_size, "None or a positive integer")
        path = self.checkpoint_path
        if path is not None and not (isinstance(path, (str, os.PathLike)) and os.path.isfile(path)):
            bad("checkpoint_path", path, "None or an existing file of the backbone's weights")


def num_selected_tokens(num_tokens: int, token_ratio: float) -> int:
    """n = int(N * token_ratio): the float64 product truncated, as the official code computes it
    (so N = 180 at 0.35 keeps 62: the product is 62.99999999999999)."""
    return int(num_tokens * token_ratio)
