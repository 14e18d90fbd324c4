"""Shared test utilities: tiny random backbones and set comparisons of selected rows."""
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
