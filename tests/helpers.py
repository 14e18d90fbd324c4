"""Shared test utilities: tiny random backbones, set comparisons of selected rows, the official
position-embedding rule written out as an oracle (docs/method.md, section 3), and PyTorch's own
prompt attention in the inputs' dtype (the low-precision yardstick) and its gradients."""
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
