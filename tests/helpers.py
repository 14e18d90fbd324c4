"""Shared test utilities: tiny random backbones, set comparisons of selected rows, and PyTorch's
own prompt attention in the inputs' dtype (the low-precision yardstick) and its gradients."""
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
    dist = torch.cdist(f, r)                                   # (rows, n, n)
    match = dist.argmin(dim=-1)
    assert torch.all(dist.amin(dim=-1) <= atol), f"rows differ: max distance {dist.amin(-1).max():.3g}"
    sorted_match = match.sort(dim=-1).values
    assert torch.equal(sorted_match, torch.arange(f.shape[1]).expand_as(sorted_match)), "not a permutation"


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
