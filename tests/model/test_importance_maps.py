"""Importance maps: token layout of a real model (register tokens, non-square input), placement of
a planted score on its patch's pixels, the layer/head aggregates and the kept-token fractions."""
import pytest
import torch

from fpt_fast import FrozenBranch
from fpt_fast.model.importance_maps import (TokenLayout, importance_map, kept_fraction, kept_mask, split_prefix,
                                            to_pixels, token_layout)
from helpers import tiny_config

# DINOv2-style: a class token and 4 registers; patch 14; 42 x 28 px -> a 3 x 2 grid.
REGISTERS = dict(backbone="vit_small_patch14_reg4_dinov2", image_size=(42, 28), side_input_size=28,
                 backbone_kwargs=dict(depth=2, embed_dim=64, num_heads=2))


def test_layout_of_a_register_model_on_a_non_square_input():
    cfg = tiny_config("fpt", **REGISTERS)
    layout = token_layout(cfg)
    assert layout == TokenLayout(5, (3, 2), (14, 14))
    assert layout.num_tokens == cfg.num_tokens == 11 and layout.covered_size == (42, 28)
    torch.manual_seed(0)
    extracted = FrozenBranch(cfg)(torch.randn(1, 3, 42, 28), return_scores=True)
    assert extracted.scores.shape[-1] == layout.num_tokens
    # Another input size at run time: the grid follows it (floor, as the strided patch embedding).
    assert token_layout(cfg, (70, 29)).grid == (5, 2)


def test_a_planted_score_lands_on_its_patch_pixels():
    layout = TokenLayout(5, (3, 2), (14, 14))
    L, B, H = 2, 2, 3
    scores = torch.zeros(L, B, H, layout.num_tokens)
    scores[..., :5] = 0.05                                   # prefix tokens: split off, never drawn
    row, col = 2, 1                                          # the last patch row, right column
    scores[:, 1, :, 5 + row * 2 + col] = 1.0                 # image 1 only
    heat = importance_map(scores, layout)
    assert heat.shape == (B, 3, 2)
    pixels = to_pixels(heat, layout)
    assert pixels.shape == (B, 42, 28)
    expected = torch.zeros(42, 28)
    expected[row * 14:(row + 1) * 14, col * 14:(col + 1) * 14] = 1.0
    assert torch.equal(pixels[1], expected) and torch.equal(pixels[0], torch.zeros(42, 28))
    prefix, patches = split_prefix(scores, layout)
    assert prefix.shape == (L, B, H, 5) and patches.shape == (L, B, H, 3, 2)
    assert bool((prefix == 0.05).all())


def test_aggregates_are_means_over_layers_and_heads():
    layout = TokenLayout(1, (2, 3), (4, 4))
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 2, 4, 7, generator=g).softmax(-1)
    per_head = importance_map(scores, layout, layers=[0, 2], per_head=True)
    assert per_head.shape == (2, 4, 2, 3)
    torch.testing.assert_close(per_head, (scores[0] + scores[2])[..., 1:].reshape(2, 4, 2, 3) / 2)
    torch.testing.assert_close(importance_map(scores, layout, layers=[0, 2]), per_head.mean(dim=1))
    # Each row of scores sums to 1, so a map and the mean prefix share sum to 1 too.
    total = importance_map(scores, layout).sum(dim=(-2, -1)) + scores[..., :1].mean(dim=(0, 2)).sum(-1)
    torch.testing.assert_close(total, torch.ones(2))


def test_kept_fraction_counts_heads_and_layers():
    layout = TokenLayout(1, (2, 2), (2, 2))
    # L = 2 layers, B = 1, H = 2 heads, n = 2 kept tokens each; token 0 is the class token.
    indices = torch.tensor([[[[0, 1], [1, 4]]], [[[1, 2], [3, 4]]]])
    assert torch.equal(kept_mask(indices[0, 0], layout),
                       torch.tensor([[True, True, False, False, False], [False, True, False, False, True]]))
    per_head = kept_fraction(indices, layout, per_head=True)[0]      # (H, 2, 2)
    assert torch.equal(per_head, torch.tensor([[[1.0, 0.5], [0.0, 0.0]], [[0.5, 0.0], [0.5, 1.0]]]))
    both = kept_fraction(indices, layout)[0]
    assert torch.equal(both, torch.tensor([[0.75, 0.25], [0.25, 0.5]]))
    assert torch.equal(kept_fraction(indices, layout, layers=[1])[0], torch.full((2, 2), 0.5))


def test_bad_inputs_are_named():
    layout = TokenLayout(1, (2, 2), (2, 2))
    with pytest.raises(ValueError, match="N = 5 tokens"):
        importance_map(torch.rand(1, 1, 1, 6), layout)
    with pytest.raises(ValueError, match=r"\(L, B, H, tokens\)"):
        importance_map(torch.rand(1, 1, 5), layout)
    with pytest.raises(ValueError, match="layers=\\[3\\]"):
        importance_map(torch.rand(2, 1, 1, 5), layout, layers=[3])
    with pytest.raises(ValueError, match="in \\[0, 5\\)"):
        kept_mask(torch.tensor([[0, 5]]), layout)
    with pytest.raises(TypeError, match="int32/int64"):
        kept_mask(torch.tensor([[0.0, 1.0]]), layout)
    with pytest.raises(ValueError, match="grid"):
        to_pixels(torch.rand(3, 2), layout)
