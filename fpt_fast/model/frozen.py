"""The frozen branch: a timm ViT read at high resolution, stopped after the last extracted block,
returning the selected keys and values of every extracted block (docs/method.md, section 2).

The blocks are timm's own modules. Non-extracted blocks run unchanged (timm's fused attention;
its eager N x N attention with config.backend "reference"). Extracted blocks are run through the
same submodules (norm1, attn.qkv, q_norm/k_norm, attn.proj, ls1, drop_path1, norm2, mlp, ls2,
drop_path2), with the attention core replaced by fpt_fast.ops.attention_with_importance, so the
block output is the block's own and the LSE of its attention is reused for the importance scores.
Both ops of an extracted block run on config.backend, chosen by fpt_fast.ops' dispatcher.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import List, NamedTuple, Tuple, Union

import torch
from torch import Tensor, nn

from .. import ops
from .config import DTYPES, FPTConfig, num_selected_tokens

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
    """The timm model named by config.backbone, with position embeddings resampled to
    config.image_size (and to any other input size at run time: dynamic_img_size)."""
    import timm

    kwargs = dict(config.backbone_kwargs, num_classes=0, img_size=config.image_size, dynamic_img_size=True)
    if config.checkpoint_path is not None:
        # timm's pretrained loader reads the local file and adapts it (position-embedding resampling).
        return timm.create_model(config.backbone, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(config.checkpoint_path)), **kwargs)
    return timm.create_model(config.backbone, pretrained=config.pretrained, **kwargs)


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

