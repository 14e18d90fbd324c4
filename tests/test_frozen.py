"""The frozen branch: extraction equals the reference's, early exit, chunking, no autograd."""
import pytest
import torch

from fpt_fast import FPTConfig, FrozenBranch, reference
from helpers import TINY, assert_same_rows, tiny_config


def extract_both(cfg, x):
    torch.manual_seed(0)
    frozen = FrozenBranch(cfg)
    fast = frozen(x)
    ref = reference.extract_features(frozen.backbone, x, cfg.layers, cfg.num_selected, cfg.importance)
    return frozen, fast, ref


@pytest.mark.parametrize("importance", ["global", "class_token"])
@pytest.mark.parametrize("size", [(64, 48), (32, 80)])
def test_extraction_matches_reference(importance, size):
    cfg = tiny_config("fpt", image_size=size, importance=importance)
    x = torch.randn(2, 3, *size)
    _, fast, (ref_k, ref_v) = extract_both(cfg, x)
    assert fast.keys.shape == ref_k.shape == (3, 2, 2, cfg.num_selected, 32)
    assert_same_rows(fast.keys, ref_k)
    assert_same_rows(fast.values, ref_v)


def test_selected_tokens_are_per_head_and_ascending():
    cfg = tiny_config("fpt", token_ratio=0.5)
    x = torch.randn(1, 3, *cfg.image_size)
    frozen, fast, _ = extract_both(cfg, x)
    # Recover the token indices by matching the selected keys against all keys of block 0.
    captured = {}
    handle = frozen.backbone.blocks[0].attn.k_norm.register_forward_hook(lambda m, i, o: captured.update(k=o))
    frozen(x)
    handle.remove()
    k_all = captured["k"][0]                                   # (H, N, d)
    index = torch.cdist(fast.keys[0, 0], k_all).argmin(-1)     # (H, n)
    assert torch.all(index[:, 1:] > index[:, :-1])             # ascending token index
    assert not torch.equal(index[0], index[1])                 # each head chooses its own tokens


def test_early_exit_drops_later_blocks_norm_and_head():
    cfg = tiny_config("fpt", extracted_layers=[0, 1])
    frozen = FrozenBranch(cfg)
    assert len(frozen.backbone.blocks) == 2
    assert isinstance(frozen.backbone.norm, torch.nn.Identity)


def test_chunked_equals_unchunked_bitwise():
    cfg = tiny_config("fpt+")
    x = torch.randn(5, 3, *cfg.image_size)
    torch.manual_seed(0)
    whole = FrozenBranch(cfg)(x)
    torch.manual_seed(0)
    chunked = FrozenBranch(tiny_config("fpt+", frozen_chunk_size=2))(x)
    assert torch.equal(whole.keys, chunked.keys) and torch.equal(whole.values, chunked.values)


def test_no_autograd_graph_and_no_gradients():
    frozen = FrozenBranch(tiny_config("fpt"))
    x = torch.randn(1, 3, 64, 48, requires_grad=True)
    with torch.enable_grad():
        out = frozen(x)
    assert out.keys.grad_fn is None and out.values.grad_fn is None
    assert all(not p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.training


def test_feature_dtype():
    frozen = FrozenBranch(tiny_config("fpt", feature_dtype="bfloat16"))
    out = frozen(torch.randn(1, 3, 64, 48))
    assert out.keys.dtype == out.values.dtype == torch.bfloat16


def test_unsupported_architecture_is_named():
    with pytest.raises(ValueError, match="backbone"):
        FPTConfig(backbone="resnet18")


def test_bad_images():
    frozen = FrozenBranch(tiny_config("fpt"))
    with pytest.raises(ValueError, match="images"):
        frozen(torch.randn(3, 64, 48))
    with pytest.raises(ValueError, match="images"):
        frozen(torch.randn(0, 3, 64, 48))


def test_local_checkpoint_is_loaded(tmp_path):
    cfg = tiny_config("fpt")
    torch.manual_seed(0)
    source = FrozenBranch(cfg).backbone
    import timm
    full = timm.create_model(cfg.backbone, num_classes=0, img_size=cfg.image_size, **TINY["backbone_kwargs"])
    path = tmp_path / "backbone.pth"
    torch.save(full.state_dict(), path)
    loaded = FrozenBranch(tiny_config("fpt", checkpoint_path=str(path))).backbone
    torch.testing.assert_close(loaded.blocks[0].attn.qkv.weight, full.blocks[0].attn.qkv.weight)
    assert not torch.equal(loaded.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
