"""SideViT against the written-out reference side network."""
import pytest
import torch

from fpt_fast import SideViT, reference


def make(depth=3, dim=16, heads=2, classes=4, size=(32, 48)):
    torch.manual_seed(0)
    return SideViT(img_size=size, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, num_classes=classes).eval()


@pytest.mark.parametrize("size", [(32, 48), (64, 64)])
def test_matches_reference(size):
    side = make()
    x = torch.randn(2, 3, *size)
    prompts = torch.randn(3, 2, 5, 16, requires_grad=True)
    out = side(x, prompts)
    assert out.shape == (2, 4)
    ref = reference.side_forward(side, x, prompts)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g, = torch.autograd.grad(out.sum(), prompts)
    r, = torch.autograd.grad(ref.sum(), prompts)
    torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_prompts_reach_every_block():
    side = make()
    x = torch.randn(1, 3, 32, 48)
    prompts = torch.zeros(3, 1, 2, 16, requires_grad=True)
    side(x, prompts).sum().backward()
    assert all(prompts.grad[l].abs().sum() > 0 for l in range(3))


def test_bad_prompts():
    side = make()
    with pytest.raises(ValueError, match="prompts"):
        side(torch.randn(1, 3, 32, 48), torch.randn(2, 1, 5, 16))


def test_without_prompts_it_is_a_timm_vit_of_the_same_weights():
    from timm.models.vision_transformer import VisionTransformer

    side = make()
    plain = VisionTransformer(img_size=(32, 48), patch_size=16, embed_dim=16, depth=3, num_heads=2, num_classes=4,
                              dynamic_img_size=True).eval()
    plain.load_state_dict(side.state_dict())
    for size in ((32, 48), (64, 64)):
        x = torch.randn(2, 3, *size)
        torch.testing.assert_close(side(x), plain(x), atol=0, rtol=0)
