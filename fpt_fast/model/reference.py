"""Reference twins of the model pieces: the frozen branch through timm's own eager forward (with
hooks), the fusion module and the side network written out, on the parameters of an fpt_fast.FPT, so
that fast and reference can be compared on identical weights. The method is docs/method.md."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.reference import prompt_attention, select_tokens, token_importance
from .fpt import resize_images


def extract_features(backbone, images: Tensor, layers: Sequence[int], n: int, importance: str = "global",
                     return_scores: bool = False) -> Tuple[Tensor, ...]:
    """Selected keys and values of a frozen timm ViT or Eva, from timm's own eager forward.

    A forward pre-hook on each extracted block's attention captures what the block feeds it (its
    normalised tokens and the rotary embeddings the model passes); the blocks themselves run
    unchanged with materialised attention. q, k, v are then computed from the captured input by
    the block's math written out (attention_inputs). images: (B, 3, h, w). Returns keys, values:
    (L, B, H, n, d), and with return_scores also the importance scores (L, B, H, N) float32 and the
    kept token indices (L, B, H, n) int64, in descending-score order (the order of the keys and
    values here).
    """
    captured = {}
    handles = []
    fused = []
    for i in layers:
        attn = backbone.blocks[i].attn
        fused.append(attn.fused_attn)
        attn.fused_attn = False

        def save(module, args, kwargs, i=i):
            captured[i] = (args[0], kwargs.get("rope"))

        handles.append(attn.register_forward_pre_hook(save, with_kwargs=True))
    try:
        with torch.no_grad():
            backbone.forward_intermediates(images, indices=list(layers), stop_early=True,
                                           intermediates_only=True)
    finally:
        for h in handles:
            h.remove()
        for i, f in zip(layers, fused):
            backbone.blocks[i].attn.fused_attn = f

    extracted = []
    for i in layers:
        q, k, v = attention_inputs(backbone.blocks[i].attn, *captured[i])
        scores = token_importance(q, k, importance)
        k_sel, v_sel, indices = select_tokens(scores, k, v, n, return_indices=True)
        extracted.append((k_sel, v_sel, scores, indices) if return_scores else (k_sel, v_sel))
    return tuple(torch.stack(field) for field in zip(*extracted))


def attention_inputs(attn, h: Tensor, rope: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B, H, N, d) of a timm attention module (Attention, AttentionRope, EvaAttention) on
    its input h (B, N, C), from its weights: the projections h W^T + b (fused qkv rows q; k; v, or
    separate q/k/v projections; Eva's bias is [q_bias, 0, v_bias]), split into H heads of d, the
    per-head q/k norms, then the rotary embedding (rotate) of the tokens after the prefix tokens."""
    H, d = attn.num_heads, attn.head_dim
    if attn.qkv is not None:
        bias = attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:
            bias = torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias))
        qkv = h @ attn.qkv.weight.T + (0 if bias is None else bias)
        q, k, v = qkv.split(H * d, dim=-1)
    else:
        q, k, v = (h @ proj.weight.T + (0 if proj.bias is None else proj.bias)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k, v = (t.unflatten(-1, (H, d)).transpose(1, 2) for t in (q, k, v))
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        p, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :p], rotate(q[:, :, p:], rope, half)], dim=2)
        k = torch.cat([k[:, :, :p], rotate(k[:, :, p:], rope, half)], dim=2)
    return q.to(v.dtype), k.to(v.dtype), v


def rotate(x: Tensor, rope: Tensor, half: bool) -> Tensor:
    """Rotary position embedding as a complex rotation (RoFormer): the channel pairs of x (..., N, d)
    are complex numbers, each turned by its angle. rope (..., N, 2d) holds the angles' sines then
    cosines, one per channel: pairs are (2i, 2i + 1) when half is False (timm's interleaved layout,
    each angle repeated twice), (i, i + d/2) when half is True (the rotate-half layout, the angles
    repeated as two halves). Computed in float32, returned in x's dtype."""
    d = x.shape[-1]
    sin, cos = rope.float().chunk(2, dim=-1)
    if half:
        pairs = torch.stack((x[..., :d // 2], x[..., d // 2:]), dim=-1)
        angle = torch.complex(cos[..., :d // 2], sin[..., :d // 2])
    else:
        pairs = x.unflatten(-1, (d // 2, 2))
        angle = torch.complex(cos[..., 0::2], sin[..., 0::2])
    turned = torch.view_as_real(torch.view_as_complex(pairs.float().contiguous()) * angle)
    out = torch.cat((turned[..., 0], turned[..., 1]), dim=-1) if half else turned.flatten(-2)
    return out.to(x.dtype)


# ------------------------------------------------------------------------- fusion and side
def fusion_forward(fusion, keys: Tensor, values: Tensor) -> Tensor:
    """The fine-grained fusion module (docs/method.md, section 4) with an eager cross-attention.

    fusion: an fpt_fast.FineGrainedFusion (its parameters are used). keys, values: (L, B, H, n, d).
    Returns (L, B, P, out_dim).
    """
    E = fusion.prompts                                               # (L, 1, P, dp)
    L, _, P, dp = E.shape
    q = fusion.layer_norm(E[:, 0]) if fusion.layer_norm is not None else E[:, 0]
    q = fusion.prompt_proj(q) if fusion.prompt_proj is not None else q  # (L, P, D)
    H = keys.shape[2]
    d = q.shape[-1] // H
    q = q.reshape(L, P, H, d).transpose(1, 2)                         # (L, H, P, d)
    c = prompt_attention(q, keys.to(q.dtype), values.to(q.dtype))     # (L, B, P, D)
    if dp == c.shape[-1]:
        fused = fusion.out_proj(c + E)
    else:
        fused = fusion.out_proj(c) + E
    return F.dropout(fused, fusion.p_dropout, fusion.training)


def _side_block(block, x: Tensor) -> Tensor:
    """A pre-norm ViT block written out: x + attn(norm1(x)); x + mlp(norm2(x)). x: (B, T, C) -> (B, T, C)."""
    attn = block.attn
    B, T, C = x.shape
    H = attn.num_heads
    h = block.norm1(x)
    qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).reshape(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    probs = (q @ k.transpose(-1, -2) * (C // H) ** -0.5).softmax(dim=-1)
    a = (probs @ v).transpose(1, 2).reshape(B, T, C)
    x = x + F.linear(a, attn.proj.weight, attn.proj.bias)
    mlp = block.mlp
    h = F.gelu(F.linear(block.norm2(x), mlp.fc1.weight, mlp.fc1.bias))
    return x + F.linear(h, mlp.fc2.weight, mlp.fc2.bias)


def side_forward(side, x_lo: Tensor, prompts: Tensor) -> Tensor:
    """The side network (docs/method.md, section 5): prompts appended after the image tokens, dropped after
    each block. side: an fpt_fast.SideViT. x_lo: (B, 3, h, w); prompts: (L, B, P, Ds). Returns logits
    (B, num_classes)."""
    from timm.layers import resample_abs_pos_embed

    x = side.patch_embed(x_lo)                                       # (B, gh, gw, Ds) or (B, T, Ds)
    if x.dim() == 4:
        B, gh, gw, C = x.shape
        x = x.reshape(B, gh * gw, C)
    else:
        B, _, C = x.shape
        gh, gw = x_lo.shape[-2] // side.patch_embed.patch_size[0], x_lo.shape[-1] // side.patch_embed.patch_size[1]
    pos = resample_abs_pos_embed(side.pos_embed, (gh, gw), old_size=side.patch_embed.grid_size,
                                 num_prefix_tokens=1)
    x = torch.cat([side.cls_token.expand(B, -1, -1), x], dim=1) + pos
    P = prompts.shape[2]
    for block, p in zip(side.blocks, prompts):
        x = _side_block(block, torch.cat([x, p], dim=1))[:, :-P]
    x = side.norm(x)
    return side.head(x[:, 0])


def fpt_forward(model, x_hi: Tensor, x_lo: Optional[Tensor] = None) -> Tensor:
    """The whole FPT forward with reference parts, on an fpt_fast.FPT's weights. x_hi (B, 3, *image_size),
    x_lo (B, 3, h, w) or None (x_hi resized, as FPT.forward does). Returns logits (B, num_classes)."""
    cfg = model.config
    if x_lo is None:
        x_lo = resize_images(x_hi, cfg.side_input_size)
    keys, values = extract_features(model.frozen.backbone, x_hi, cfg.layers, cfg.num_selected, cfg.importance)
    return side_forward(model.side, x_lo, fusion_forward(model.fusion, keys, values))
