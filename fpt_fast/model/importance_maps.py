"""Importance maps: what the frozen branch looked at, laid out on the image grid.

The extraction computes, per extracted layer, image and head, the importance of every token (the
attention it receives, docs/method.md, section 2) and keeps the n most important ones;
``FPT.extract(x, return_scores=True)`` returns both (FeaturesWithScores.scores (L, B, H, N) and
.indices (L, B, H, n)). This module turns them into maps on the patch grid; drawing them is
fpt_fast.app.explain's job. Pure tensor math, any device.

Token order of a timm ViT: the prefix tokens first (class token, then register tokens), then the
patches row by row, grid_h rows of grid_w. The grid is the input size divided by the patch size
(rounded down, as the strided patch embedding does; FPTConfig requires divisible sizes anyway), so
non-square inputs give non-square grids.

Aggregates, by design:
- Heads and layers are combined by the arithmetic mean of the scores. Each (layer, image, head)
  row of scores is a distribution over the N tokens (it sums to 1), so the mean is one too: a map
  says which share of the attention each patch received, on average over the chosen heads and
  layers. The prefix tokens' share is split off (``split_prefix``), not spread over the patches.
- The selection is summarised as the fraction of (layer, head) pairs that kept each patch: 1 means
  every chosen head of every chosen layer kept it, 0 that none did. Per head (per_head=True) it is
  the plain 0/1 mask.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .config import FPTConfig


class TokenLayout(NamedTuple):
    """Where the N tokens of an input sit: num_prefix_tokens prefix tokens, then a grid of
    grid = (grid_h, grid_w) patches of patch_size = (patch_h, patch_w) pixels, row by row."""

    num_prefix_tokens: int
    grid: Tuple[int, int]
    patch_size: Tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid[0] * self.grid[1]

    @property
    def covered_size(self) -> Tuple[int, int]:
        """(height, width) in pixels of the image area the patches cover, from the top left."""
        return self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1]


def token_layout(config: FPTConfig, image_size: Optional[Sequence[int]] = None) -> TokenLayout:
    """The layout of the frozen branch's tokens for an input of image_size (height, width)
    (default: config.image_size)."""
    h, w = (int(s) for s in (image_size if image_size is not None else config.image_size))
    info = config.backbone_info
    ph, pw = info.patch_size
    if h < ph or w < pw:
        raise ValueError(f"image_size {(h, w)} is smaller than one patch {info.patch_size}")
    return TokenLayout(info.num_prefix_tokens, (h // ph, w // pw), (ph, pw))


def _check_tokens(name: str, t: Tensor, layout: TokenLayout) -> None:
    if not isinstance(t, Tensor) or t.dim() < 1 or t.shape[-1] != layout.num_tokens:
        raise ValueError(f"{name} ({getattr(t, 'shape', type(t).__name__)}) must end in the N = "
                         f"{layout.num_tokens} tokens of {layout} ({layout.num_prefix_tokens} prefix tokens + "
                         f"{layout.grid[0]} x {layout.grid[1]} patches)")


def split_prefix(tokens: Tensor, layout: TokenLayout) -> Tuple[Tensor, Tensor]:
    """(prefix (..., num_prefix_tokens), patches (..., grid_h, grid_w)) of any per-token tensor
    (..., N): scores, masks."""
    _check_tokens("tokens", tokens, layout)
    P = layout.num_prefix_tokens
    return tokens[..., :P], tokens[..., P:].reshape(*tokens.shape[:-1], *layout.grid)


def kept_mask(indices: Tensor, layout: TokenLayout) -> Tensor:
    """(..., N) bool: True at the kept tokens. indices: (..., n) integer token indices in [0, N)."""
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.int32, torch.int64) or indices.dim() < 1:
        raise TypeError(f"indices must be an int32/int64 tensor (..., n), got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    N = layout.num_tokens
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= N):
        raise ValueError(f"indices must lie in [0, {N}) for {layout}, got [{int(indices.min())}, {int(indices.max())}]")
    mask = torch.zeros(*indices.shape[:-1], N, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, indices.long(), True)


def _pick_layers(t: Tensor, name: str, layers: Optional[Sequence[int]]) -> Tensor:
    """t (L, B, H, ...) restricted to the positions ``layers`` along L (None: all)."""
    if t.dim() != 4:
        raise ValueError(f"{name} ({tuple(t.shape)}) must be (L, B, H, tokens)")
    if layers is None:
        return t
    positions = list(layers)
    if not positions or any(not 0 <= p < t.shape[0] for p in positions):
        raise ValueError(f"layers={positions} must be positions along the {t.shape[0]} extracted layers of {name}")
    return t[positions]


def importance_map(scores: Tensor, layout: TokenLayout, layers: Optional[Sequence[int]] = None,
                   per_head: bool = False) -> Tensor:
    """Patch importance on the grid: the mean of scores over the chosen layers and (unless per_head)
    the heads.

    scores: (L, B, H, N) float (FeaturesWithScores.scores). layers: positions along L (indices into
    config.layers, not block numbers); None = all. Returns (B, grid_h, grid_w), or with per_head
    (B, H, grid_h, grid_w), float32. A map and the mean prefix share (split_prefix) sum to 1.
    """
    picked = _pick_layers(scores, "scores", layers).float().mean(dim=0)
    if not per_head:
        picked = picked.mean(dim=1)
    return split_prefix(picked, layout)[1]


def kept_fraction(indices: Tensor, layout: TokenLayout, layers: Optional[Sequence[int]] = None,
                  per_head: bool = False) -> Tensor:
    """The share of (chosen layer, head) pairs that kept each patch, on the grid.

    indices: (L, B, H, n) (FeaturesWithScores.indices). layers: positions along L; None = all.
    Returns (B, grid_h, grid_w), or with per_head (B, H, grid_h, grid_w), float32 in [0, 1].
    """
    picked = kept_mask(_pick_layers(indices, "indices", layers), layout).float().mean(dim=0)
    if not per_head:
        picked = picked.mean(dim=1)
    return split_prefix(picked, layout)[1]


def to_pixels(patch_map: Tensor, layout: TokenLayout) -> Tensor:
    """(..., grid_h, grid_w) -> (..., grid_h * patch_h, grid_w * patch_w): each patch's value on
    each of its pixels (nearest, no smoothing: the maps are exactly as coarse as the tokens)."""
    if patch_map.dim() < 2 or tuple(patch_map.shape[-2:]) != tuple(layout.grid):
        raise ValueError(f"patch_map ({tuple(patch_map.shape)}) must end in the grid {layout.grid}")
    ph, pw = layout.patch_size
    return patch_map.repeat_interleave(ph, dim=-2).repeat_interleave(pw, dim=-1)
