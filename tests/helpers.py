"""Shared test utilities: tiny random backbones, set comparisons of selected rows, the official
position-embedding rule written out as an oracle (docs/method.md, section 3), PyTorch's own
prompt attention in the inputs' dtype (the low-precision yardstick) and its gradients, and the
layouts in which backbone weights are published, written from a timm model."""
import argparse
import math

import numpy as np
import torch

from fpt_fast import FPTConfig

# A 3-block, 2-head (d = 32) ViT with patch 16: random weights, fast on the CPU.
TINY = dict(backbone="vit_tiny_patch16_224", backbone_kwargs=dict(depth=3, embed_dim=64, num_heads=2))


def tiny_config(preset="fpt", **overrides):
    values = dict(TINY, num_classes=3, image_size=(64, 48), side_input_size=32)
    values.update(overrides)
    return FPTConfig.preset(preset, **values)


def assert_same_rows(fast, ref, atol=1e-5):
    """fast and ref (..., n, d) hold the same set of n rows in each leading index, in any order."""
    assert fast.shape == ref.shape, (fast.shape, ref.shape)
    f = fast.float().reshape(-1, *fast.shape[-2:])
    r = ref.float().reshape(-1, *ref.shape[-2:])
    # Exact distances: cdist's matrix-product shortcut (n > 25) loses ~1e-3 to cancellation.
    dist = torch.cdist(f, r, compute_mode="donot_use_mm_for_euclid_dist")   # (rows, n, n)
    match = dist.argmin(dim=-1)
    assert torch.all(dist.amin(dim=-1) <= atol), f"rows differ: max distance {dist.amin(-1).max():.3g}"
    sorted_match = match.sort(dim=-1).values
    assert torch.equal(sorted_match, torch.arange(f.shape[1]).expand_as(sorted_match)), "not a permutation"


# ---------------------------------------------------------------- the official resampling, written out
def cubic_convolution(t, a=-0.75):
    """Keys' cubic convolution kernel (PyTorch's bicubic uses a = -0.75)."""
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a if t < 2 else 0.0


def official_axis(stored, target):
    """(target, stored) float64 matrix of the official rule along one axis: output i samples the
    input at (i + 0.5) * g0 / (g + 0.1) - 0.5 (align_corners=False with the given scale factor
    (g + 0.1) / g0), four cubic taps, border indices clamped."""
    matrix = np.zeros((target, stored))
    for i in range(target):
        source = (i + 0.5) * stored / (target + 0.1) - 0.5
        base = math.floor(source)
        for tap in range(-1, 3):
            matrix[i, min(max(base + tap, 0), stored - 1)] += cubic_convolution(source - (base + tap))
    return matrix


def official_resampling(pos_embed, num_prefix, stored, grid):
    """The official rule on (1, prefix + gh0 * gw0, D), in float64 numpy; untouched at the stored grid."""
    if tuple(grid) == tuple(stored):
        return pos_embed
    values = pos_embed[0].double().numpy()
    patches = values[num_prefix:].reshape(*stored, -1)
    resampled = np.einsum("ia,jb,abd->ijd", official_axis(stored[0], grid[0]), official_axis(stored[1], grid[1]),
                          patches).reshape(grid[0] * grid[1], -1)
    return torch.from_numpy(np.concatenate([values[:num_prefix], resampled]))[None].float()


def eager_prompt_attention(q, k, v):
    """Prompt attention in plain PyTorch, computed in the inputs' own dtype: the yardstick of
    low-precision results. q (L, H, P, d) or (L, B, H, P, d); k, v (L, B, H, n, d) -> (L, B, P, H*d)."""
    if q.dim() == 4:
        q = q[:, None]
    probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
    out = probs @ v
    L, B, H, P, d = out.shape
    return out.permute(0, 1, 3, 2, 4).reshape(L, B, P, H * d)


def value_and_grads(fn, q, k, v, grad):
    """[out, dq, dk, dv] of out = fn(q, k, v): the gradients of <out, grad> for the inputs that
    require them, None for the others."""
    out = fn(q, k, v)
    wrt = [t for t in (q, k, v) if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wrt, grad))
    return [out.detach()] + [next(grads) if t.requires_grad else None for t in (q, k, v)]


# ---------------------------------------------------------------- published layouts of backbone weights
def timm_layout(model):
    return model.state_dict()


def retfound_mae_layout(model):
    """MAE's checkpoint: {"model": encoder + decoder + mask token, ...} with its training arguments."""
    state = dict(model.state_dict())
    D = model.embed_dim
    state.update({"mask_token": torch.randn(1, 1, D), "decoder_embed.weight": torch.randn(32, D),
                  "decoder_pos_embed": torch.randn(1, 17, 32), "decoder_blocks.0.norm1.weight": torch.ones(32),
                  "decoder_norm.weight": torch.ones(32), "decoder_pred.weight": torch.randn(768, 32)})
    return {"model": state, "epoch": 799, "args": argparse.Namespace(model="mae_vit_large_patch16", mask_ratio=0.75)}


def dinov2_teacher_layout(model):
    """A DINOv2 training checkpoint: {"teacher": {"backbone.*" in DINOv2's own layout (with
    registers: class token and registers apart, the class token's position embedding folded out of
    it; a mask token), blocks in FSDP chunks of two, the DINO and iBOT heads}, "iteration": ...}."""
    state = model.state_dict()
    D = model.embed_dim
    backbone = {"mask_token": torch.randn(1, D)}
    if "reg_token" in state:  # timm keeps the registers and the class token outside pos_embed
        position_of_class = torch.randn(1, 1, D)
        backbone.update({"cls_token": state["cls_token"] - position_of_class,
                         "pos_embed": torch.cat([position_of_class, state["pos_embed"]], dim=1),
                         "register_tokens": state["reg_token"]})
    for key, value in state.items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // 2}.{key[len('blocks.'):]}"  # chunk c holds blocks 2c and 2c + 1
        backbone.setdefault(key, value)
    teacher = {f"backbone.{k}": v for k, v in backbone.items()}
    teacher.update({"dino_head.mlp.0.weight": torch.randn(16, D), "ibot_head.last_layer.weight_g": torch.ones(8)})
    return {"teacher": teacher, "iteration": 1000}


def openclip_layout(model):
    """An OpenCLIP model with a timm vision tower (CONCH, BiomedCLIP): visual.trunk.* plus the
    visual projection and the text tower."""
    state = {f"visual.trunk.{k}": v for k, v in model.state_dict().items()}
    state.update({"visual.head.proj.weight": torch.randn(32, model.embed_dim), "logit_scale": torch.tensor(4.6),
                  "text.transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32)})
    return state


def dinov3_layout(model):
    """DINOv3's own layout: storage tokens, ls1/ls2 gammas, one qkv bias (q, zero k, v), the
    rope periods and the mask token."""
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        if key.endswith("attn.q_bias"):
            v_bias = model.state_dict()[key.replace("q_bias", "v_bias")]
            state[key.replace("q_bias", "qkv.bias")] = torch.cat([value, torch.zeros_like(value), v_bias])
        elif not key.endswith("attn.v_bias"):
            state[key] = value
    state.update({"rope_embed.periods": torch.ones(8), "mask_token": torch.randn(1, model.embed_dim)})
    return state
