"""The frozen branch: a timm ViT read at high resolution, stopped after the last extracted block,
returning the selected keys and values of every extracted block (docs/method.md, section 2).

The backbone (fpt_fast.model.backbones: timm VisionTransformer and Eva models) is built at the grid
its weights were stored at, cut after the last extracted block, given its weights
(fpt_fast.model.backbone_weights) and fixed once to config.image_size: absolute position embeddings
are resampled by config.pos_embed_resampling (docs/method.md, section 3); rotary embeddings follow
the grid by the model's own rule.

The blocks are timm's own modules. Non-extracted blocks run unchanged (timm's fused attention;
its eager N x N attention with config.backend "reference"), with the rotary embeddings the model
passes them. Extracted blocks are run through the same submodules (norm1; the attention's
projections, q/k norms and rotary embedding; its output norm, gate and proj; the layer scales
ls1/ls2 or gamma_1/gamma_2; norm2, mlp, drop paths), with the attention core replaced by
fpt_fast.ops.attention_with_importance: the selected keys are the keys the block attends with
(after its q/k norm and rotary embedding), the block output is the block's own, and the LSE of its
attention is reused for the importance scores. Both ops of an extracted block run on
config.backend, chosen by fpt_fast.ops' dispatcher.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .backbone_weights import backbone_state, load_backbone_weights, published_weights, read_weights_file, stored_grid
from .backbones import create_timm_model
from .config import DTYPES, POS_EMBED_RESAMPLING, FPTConfig, num_selected_tokens


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
    """The backbone the frozen branch runs, with its weights: the timm model of config.backbone,
    built at the grid its weights were stored at (so that neither timm nor its checkpoint filter
    resamples the position embeddings), cut after the last extracted block (no final norm, no
    head), given its weights (config.checkpoint_path, else with config.pretrained the published
    ones; a ValueError names missing or unexpected weights), then fixed to config.image_size by
    set_fixed_input_size with the rule config.pos_embed_resampling; its LayerNorms get
    config.layer_norm_eps when set."""
    state, what = None, None
    if config.checkpoint_path is not None:
        what = f"FPTConfig.checkpoint_path {str(config.checkpoint_path)!r}"
        state = backbone_state(read_weights_file(config.checkpoint_path, what), what)
    elif config.pretrained:
        state, what = published_weights(config.backbone)
    kwargs = dict(num_classes=0)
    if state is not None and "img_size" not in config.backbone_kwargs:
        info = config.backbone_info  # the same model's shape, read on the meta device
        ph, pw = info.patch_size
        grid = stored_grid(state, info, (config.image_size[0] // ph, config.image_size[1] // pw), what)
        if grid is not None:
            kwargs["img_size"] = (grid[0] * ph, grid[1] * pw)
    # Weights timm publishes only at a URL: timm downloads and loads them itself.
    timm_loads = config.pretrained and config.checkpoint_path is None and state is None
    backbone = create_timm_model(config.backbone, config.backbone_kwargs, pretrained=timm_loads, **kwargs)
    backbone.prune_intermediate_layers(list(config.layers), prune_norm=True, prune_head=True)
    if state is not None:
        load_backbone_weights(backbone, state, what)
    set_fixed_input_size(backbone, config.image_size, config.pos_embed_resampling)
    if config.layer_norm_eps is not None:
        for module in backbone.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = float(config.layer_norm_eps)
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
    """Fixes a timm ViT or Eva built at its stored grid to inputs of image_size (h, w): the patch
    embedding takes that size, the absolute position embeddings (if it has them) are resampled once
    by resample_position_embeddings with rule, and rotary embeddings computed for a fixed grid
    (if it has them) are recomputed for the new grid by the model's own rule (models built for
    any input size compute theirs from each input's grid). In place."""
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
    rope = getattr(backbone, "rope", None)
    if rope is not None and hasattr(rope, "update_feat_shape"):
        rope.update_feat_shape(list(grid))


def frozen_compute_dtype(frozen_dtype: Optional[str], device) -> torch.dtype:
    """The dtype the frozen branch computes in on device: FPTConfig.frozen_dtype when set, else
    bfloat16 on GPUs that support it and float32 elsewhere."""
    if frozen_dtype is not None:
        return DTYPES[frozen_dtype]
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class FrozenBranch(nn.Module):
    """The frozen large pre-trained model. Always in eval mode, never trainable, never recorded by
    autograd. ``forward(images)`` (B, 3, h, w) -> FrozenFeatures, each (L, B, H, n, d);
    ``forward(images, return_scores=True)`` -> FeaturesWithScores (the same keys and values, and the
    importance scores and kept indices the extraction computed: no extra pass)."""

    def __init__(self, config: FPTConfig):
        super().__init__()
        self.config = config
        self.layers: List[int] = list(config.layers)
        # Early exit: blocks after the last extracted one, the final norm and the head are dropped.
        backbone = create_backbone(config)
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
        """The dtype the frozen blocks compute in on device (frozen_compute_dtype of config.frozen_dtype)."""
        return frozen_compute_dtype(self.config.frozen_dtype, device)

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
            x, rope = embed_tokens(bb, images)
            last = self.layers[-1]
            for i, block in enumerate(bb.blocks[:last + 1]):
                # Eva models with per-block rotary embeddings (rope_mixed) hold one per block.
                block_rope = rope[i] if rope is not None and getattr(bb, "rope_mixed", False) else rope
                if i in self.layers:
                    x, outputs = self._extracted_block(block, x, block_rope, feature_dtype, return_scores)
                    extracted.append(outputs)
                else:
                    x = block(x) if block_rope is None else block(x, rope=block_rope)
        stacked = (torch.stack(field) for field in zip(*extracted))
        return FeaturesWithScores(*stacked) if return_scores else FrozenFeatures(*stacked)

    def _extracted_block(self, block: nn.Module, x: Tensor, rope: Optional[Tensor], feature_dtype: torch.dtype,
                         return_scores: bool) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """(block output, (k_sel, v_sel)) or with return_scores (block output, (k_sel, v_sel, scores, indices))."""
        attn = block.attn
        B, N, _ = x.shape
        h = block.norm1(x)
        q, k, v = attention_inputs(attn, h, rope)
        backend = self.config.backend
        out, scores = ops.attention_with_importance(q, k, v, self.config.importance, backend=backend)
        n = num_selected_tokens(N, self.config.token_ratio)
        if return_scores:
            k_sel, v_sel, indices = ops.select_tokens(scores, k, v, n, feature_dtype, return_indices=True,
                                                      backend=backend)
            outputs = (k_sel, v_sel, scores, indices)
        else:
            outputs = ops.select_tokens(scores, k, v, n, feature_dtype, backend=backend)
        a = attn.norm(out.transpose(1, 2).reshape(B, N, -1))
        if getattr(attn, "gate", None) is not None:
            a = a * attn.gate(h).sigmoid()
        x = x + block.drop_path1(_layer_scale(block, 1, attn.proj_drop(attn.proj(a))))
        x = x + block.drop_path2(_layer_scale(block, 2, block.mlp(block.norm2(x))))
        return x, outputs


def embed_tokens(backbone: nn.Module, images: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """The tokens (B, N, D) the first block reads, and the rotary embeddings the model passes its
    blocks (None without them), as timm's forward computes them: patch embedding, prefix tokens and
    position embeddings, patch dropout, pre-norm."""
    tokens = backbone._pos_embed(backbone.patch_embed(images))
    if isinstance(tokens, tuple):  # Eva: (tokens, rotary embeddings), its patch dropout applied inside
        x, rope = tokens
    else:
        x, rope = backbone.patch_drop(tokens), None
    return backbone.norm_pre(x), rope


def attention_inputs(attn: nn.Module, h: Tensor, rope: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B, H, N, d) of a timm attention module (Attention, AttentionRope, EvaAttention) on
    its input h (B, N, C), exactly as its forward computes them before the attention core: the fused
    or separate projections (Eva's q/v biases with its zero k bias), the q/k norms, then the rotary
    embedding on the tokens after the prefix tokens. q and k come in v's dtype."""
    B, N, _ = h.shape
    if attn.qkv is None:
        q, k, v = (proj(h).reshape(B, N, -1, attn.head_dim).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    else:
        if getattr(attn, "q_bias", None) is None:
            qkv = attn.qkv(h)
        else:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(h) + bias if attn.qkv_bias_separate else F.linear(h, attn.qkv.weight, bias)
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        from timm.layers import apply_rot_embed_cat

        p, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], dim=2)
    # Under autocast the q/k norms return float32 while v stays in the autocast dtype.
    return q.to(v.dtype), k.to(v.dtype), v


def _layer_scale(block: nn.Module, index: int, t: Tensor) -> Tensor:
    """t scaled by the block's layer scale `index` (1: attention, 2: MLP): timm's LayerScale
    modules ls1/ls2 (VisionTransformer) or the gamma_1/gamma_2 vectors (Eva; None without)."""
    scale = getattr(block, f"ls{index}", None)
    if scale is not None:
        return scale(t)
    gamma = getattr(block, f"gamma_{index}")
    return t if gamma is None else gamma * t
