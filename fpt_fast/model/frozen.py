"""The frozen branch: a timm ViT read at high resolution, stopped after the last extracted block,
returning the selected keys and values of every extracted block (docs/method.md, section 2).

The backbone is built at the grid its weights were stored at and fixed once to config.image_size:
its position embeddings are resampled by config.pos_embed_resampling (docs/method.md, section 3).

The blocks are timm's own modules. Non-extracted blocks run unchanged (timm's fused attention;
its eager N x N attention with config.backend "reference"). Extracted blocks are run through the
same submodules (norm1, attn.qkv, q_norm/k_norm, attn.proj, ls1, drop_path1, norm2, mlp, ls2,
drop_path2), with the attention core replaced by fpt_fast.ops.attention_with_importance, so the
block output is the block's own and the LSE of its attention is reused for the importance scores.
Both ops of an extracted block run on config.backend, chosen by fpt_fast.ops' dispatcher.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .config import DTYPES, POS_EMBED_RESAMPLING, FPTConfig, num_selected_tokens

BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
ATTENTION_PARTS = ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "proj", "proj_drop")


class FrozenFeatures(NamedTuple):
    """Selected keys and values of the extracted layers, each (L, B, H, n, d)."""

    keys: Tensor
    values: Tensor


class FeaturesWithScores(NamedTuple):
    """What the frozen branch computed on the way to FrozenFeatures, for explaining it:

    keys, values: (L, B, H, n, d), as in FrozenFeatures.
    scores: (L, B, H, N) float32, the importance of every token (class/register tokens first, then
        the patches row by row) per extracted layer and head; each (layer, image, head) row sums to 1
        (up to rounding).
    indices: (L, B, H, n) int64, the kept tokens of each row, in the order of the kept keys/values
        (ascending token index; descending score for backend "reference").
    """

    keys: Tensor
    values: Tensor
    scores: Tensor
    indices: Tensor

    @property
    def features(self) -> FrozenFeatures:
        """The keys and values alone, as the fusion module takes them."""
        return FrozenFeatures(self.keys, self.values)


def create_backbone(config: FPTConfig) -> nn.Module:
    """The timm model named by config.backbone with its weights, built at the grid they were stored
    at (so that neither timm's creation nor its checkpoint loading resamples the position
    embeddings), then fixed to config.image_size by set_fixed_input_size with the rule
    config.pos_embed_resampling; its LayerNorms get config.frozen_layer_norm_eps when set."""
    import timm

    kwargs = dict(config.backbone_kwargs, num_classes=0)
    if config.checkpoint_path is not None:
        grid = stored_checkpoint_grid(config.checkpoint_path, config)
        if grid is not None and "img_size" not in kwargs:
            ph, pw = config.backbone_info.patch_size
            kwargs["img_size"] = (grid[0] * ph, grid[1] * pw)
        # timm's pretrained loader reads the local file and adapts its format to the model.
        backbone = timm.create_model(config.backbone, pretrained=True,
                                     pretrained_cfg_overlay=dict(file=str(config.checkpoint_path)), **kwargs)
    else:
        backbone = timm.create_model(config.backbone, pretrained=config.pretrained, **kwargs)
    set_fixed_input_size(backbone, config.image_size, config.pos_embed_resampling)
    if config.frozen_layer_norm_eps is not None:
        for module in backbone.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = float(config.frozen_layer_norm_eps)
    return backbone


def resample_position_embeddings(pos_embed: Tensor, stored_grid: Tuple[int, int], grid: Tuple[int, int],
                                 num_prefix_tokens: int, rule: str) -> Tensor:
    """Absolute position embeddings of the patch grid stored_grid (gh0, gw0) resampled for the grid
    (gh, gw): (1, num_prefix_tokens + gh0 * gw0, D) -> (1, num_prefix_tokens + gh * gw, D), same dtype.
    The prefix embeddings (class and register tokens) are kept as they are.

    rule "official" (the official FPT code's, DINO's convention; docs/method.md, section 3):
    bicubic, align_corners=False, no antialiasing, with the scale factor (g + 0.1) / g0 per axis:
    the sampling positions follow that factor, not g / g0. Untouched at the stored grid (the
    official code assumes a square stored grid; a non-square one is scaled per axis alike).
    rule "timm": timm's resample_abs_pos_embed (antialiased bicubic resize to (gh, gw)).
    """
    stored_grid, grid = tuple(int(g) for g in stored_grid), tuple(int(g) for g in grid)
    if rule == "timm":
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(pos_embed, list(grid), old_size=list(stored_grid),
                                      num_prefix_tokens=num_prefix_tokens)
    if rule != "official":
        raise ValueError(f"rule={rule!r} is invalid: expected one of {POS_EMBED_RESAMPLING}")
    if grid == stored_grid:
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    image = patches.float().reshape(1, *stored_grid, dim).permute(0, 3, 1, 2)
    scale = tuple((g + 0.1) / g0 for g, g0 in zip(grid, stored_grid))
    image = F.interpolate(image, scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(image.shape[-2:]) != grid:  # floor(g0 * (g + 0.1) / g0) is g; say so if it is not
        raise ValueError(f"official position-embedding resampling of grid {stored_grid} gave "
                         f"{tuple(image.shape[-2:])}, not {grid}")
    patches = image.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def set_fixed_input_size(backbone: nn.Module, image_size: Tuple[int, int], rule: str) -> None:
    """Fixes a timm ViT built at its stored grid to inputs of image_size (h, w): the patch embedding
    takes that size, and the position embeddings (if it has absolute ones) are resampled once by
    resample_position_embeddings with rule. In place."""
    patch_embed = backbone.patch_embed
    ph, pw = patch_embed.patch_size
    stored_grid = tuple(patch_embed.grid_size)
    grid = (int(image_size[0]) // ph, int(image_size[1]) // pw)
    patch_embed.img_size = (int(image_size[0]), int(image_size[1]))
    patch_embed.grid_size = grid
    patch_embed.num_patches = grid[0] * grid[1]
    pos_embed = getattr(backbone, "pos_embed", None)
    if pos_embed is not None:
        num_prefix = 0 if getattr(backbone, "no_embed_class", False) else backbone.num_prefix_tokens
        with torch.no_grad():
            resampled = resample_position_embeddings(pos_embed.data, stored_grid, grid, num_prefix, rule)
        backbone.pos_embed = nn.Parameter(resampled, requires_grad=pos_embed.requires_grad)


def stored_checkpoint_grid(path, config: FPTConfig) -> Optional[Tuple[int, int]]:
    """The patch grid of the position embeddings in a timm-style checkpoint file (a key "pos_embed"
    or ending in ".pos_embed"; .safetensors or torch.save): the first of the model's default grid,
    the grid of config.image_size and a square grid whose size fits the stored token count. None
    when the file holds no such key or no grid fits (timm's loader then adapts the file itself)."""
    import timm

    shape = _stored_pos_embed_shape(str(path))
    if shape is None or len(shape) != 3:
        return None
    with torch.device("meta"):
        probe = timm.create_model(config.backbone, pretrained=False, num_classes=0, **config.backbone_kwargs)
    if getattr(probe, "pos_embed", None) is None:
        return None
    num_prefix = 0 if getattr(probe, "no_embed_class", False) else probe.num_prefix_tokens
    patches = shape[1] - num_prefix
    ph, pw = config.backbone_info.patch_size
    side = math.isqrt(max(patches, 0))
    candidates = (tuple(probe.patch_embed.grid_size), (config.image_size[0] // ph, config.image_size[1] // pw),
                  (side, side))
    return next((grid for grid in candidates if grid[0] * grid[1] == patches), None)


def _stored_pos_embed_shape(path: str) -> Optional[Tuple[int, ...]]:
    """Shape of the position embeddings stored in the file, read without loading the other tensors
    where the format allows (safetensors header, memory-mapped torch zip files)."""
    def pick(names):
        return next((n for n in names if n == "pos_embed" or n.endswith(".pos_embed")), None)

    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            name = pick(list(f.keys()))
            return tuple(f.get_slice(name).get_shape()) if name else None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip file (legacy torch.save format): no memory map
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    name = pick(list(state)) if isinstance(state, dict) else None
    return tuple(state[name].shape) if name else None


def check_architecture(backbone: nn.Module, layers) -> None:
    """Raises a ValueError naming what an extracted block lacks for FPT to read its keys."""
    for i in layers:
        block = backbone.blocks[i]
        missing = [p for p in BLOCK_PARTS if not hasattr(block, p)]
        attn = getattr(block, "attn", None)
        if attn is not None:
            missing += [f"attn.{p}" for p in ATTENTION_PARTS if not hasattr(attn, p)]
        if missing:
            raise ValueError(f"unsupported architecture: block {i} ({type(block).__name__}) of "
                             f"{type(backbone).__name__} lacks {missing}; fpt_fast supports timm "
                             f"VisionTransformer-style blocks with a fused qkv projection")


class FrozenBranch(nn.Module):
    """The frozen large pre-trained model. Always in eval mode, never trainable, never recorded by
    autograd. ``forward(images)`` (B, 3, h, w) -> FrozenFeatures, each (L, B, H, n, d);
    ``forward(images, return_scores=True)`` -> FeaturesWithScores (the same keys and values, and the
    importance scores and kept indices the extraction computed: no extra pass)."""

    def __init__(self, config: FPTConfig):
        super().__init__()
        self.config = config
        self.layers: List[int] = list(config.layers)
        backbone = create_backbone(config)
        check_architecture(backbone, self.layers)
        # Early exit: blocks after the last extracted one, the final norm and the head are dropped.
        backbone.prune_intermediate_layers(self.layers, prune_norm=True, prune_head=True)
        backbone.requires_grad_(False)
        self.backbone = backbone.eval()
        # Non-extracted blocks run timm's own attention: fused SDPA, or eager N x N for "reference".
        reference = config.backend == "reference"
        for block in backbone.blocks:
            block.attn.fused_attn = not reference
        if reference:
            warnings.warn("backend='reference' materialises the N x N attention of every block", stacklevel=2)

    def train(self, mode: bool = True):
        return super().train(False)

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        if self.config.frozen_dtype is not None:
            return DTYPES[self.config.frozen_dtype]
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32

    @torch.no_grad()
    def forward(self, images: Tensor, return_scores: bool = False) -> Union[FrozenFeatures, FeaturesWithScores]:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"images must be a non-empty (B, C, h, w) tensor, got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        if tuple(images.shape[-2:]) != tuple(self.config.image_size):
            # The position embeddings were resampled once, for config.image_size.
            raise ValueError(f"images of size {tuple(images.shape[-2:])} given; the frozen branch takes "
                             f"config.image_size {tuple(self.config.image_size)}")
        chunk = self.config.frozen_chunk_size or images.shape[0]
        parts = [self._extract(images[i:i + chunk], return_scores) for i in range(0, images.shape[0], chunk)]
        if len(parts) == 1:
            return parts[0]
        return type(parts[0])(*(torch.cat(field, dim=1) for field in zip(*parts)))

    def _extract(self, images: Tensor, return_scores: bool) -> Union[FrozenFeatures, FeaturesWithScores]:
        device = images.device
        dtype = self.compute_dtype(device)
        feature_dtype = DTYPES[self.config.feature_dtype] if self.config.feature_dtype else dtype
        autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                    else contextlib.nullcontext())
        bb = self.backbone
        extracted = []  # per extracted block: (k_sel, v_sel), with return_scores (k_sel, v_sel, scores, indices)
        with autocast:
            x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(images))))
            last = self.layers[-1]
            for i, block in enumerate(bb.blocks[:last + 1]):
                if i in self.layers:
                    x, outputs = self._extracted_block(block, x, feature_dtype, return_scores)
                    extracted.append(outputs)
                else:
                    x = block(x)
        stacked = (torch.stack(field) for field in zip(*extracted))
        return FeaturesWithScores(*stacked) if return_scores else FrozenFeatures(*stacked)

    def _extracted_block(self, block: nn.Module, x: Tensor, feature_dtype: torch.dtype,
                         return_scores: bool) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """(block output, (k_sel, v_sel)) or with return_scores (block output, (k_sel, v_sel, scores, indices))."""
        attn = block.attn
        B, N, _ = x.shape
        h = block.norm1(x)
        qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        # Under autocast the q/k norms return float32 while v stays in the autocast dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)
        backend = self.config.backend
        out, scores = ops.attention_with_importance(q, k, v, self.config.importance, backend=backend)
        n = num_selected_tokens(N, self.config.token_ratio)
        if return_scores:
            k_sel, v_sel, indices = ops.select_tokens(scores, k, v, n, feature_dtype, return_indices=True,
                                                      backend=backend)
            outputs = (k_sel, v_sel, scores, indices)
        else:
            outputs = ops.select_tokens(scores, k, v, n, feature_dtype, backend=backend)
        a = out.transpose(1, 2).reshape(B, N, -1)
        if getattr(attn, "norm", None) is not None:
            a = attn.norm(a)
        if getattr(attn, "gate", None) is not None:
            a = a * attn.gate(h).sigmoid()
        x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(a))))
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x, outputs

