"""Loading weights of the official FPT implementation (HuggingFace-style side ViT + FusionModule)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fpt_fast import FPT, load_official_checkpoint
from fpt_fast.model.official import convert_official_state_dict, official_state_dict
from helpers import tiny_config


def trained_like(preset, seed=0):
    torch.manual_seed(seed)
    model = FPT(tiny_config(preset)).eval()
    with torch.no_grad():  # move every weight off its init so a wrong mapping shows
        for p in list(model.fusion.parameters()) + list(model.side.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs(model, seed=1):
    torch.manual_seed(seed)
    cfg = model.config
    x_hi = torch.randn(2, 3, *cfg.image_size)
    return model.extract(x_hi), torch.randn(2, 3, *cfg.side_input_size)


def hf_reference_logits(official, keys, values, x_lo, num_heads, patch, eps=1e-12):
    """The official forward written from the official key names alone (HuggingFace ViT semantics:
    separate query/key/value, layernorm_before/after, exact GELU, classifier on token 0)."""
    def linear(x, name):
        return F.linear(x, official[f"{name}.weight"], official[f"{name}.bias"])

    def layer_norm(x, name, eps=eps):
        return F.layer_norm(x, x.shape[-1:], official[f"{name}.weight"], official[f"{name}.bias"], eps)

    # FusionModule (official): prompts (L, 1, P, dp) shared by the batch.
    prompts = official["fusion_module.prompts"].expand(-1, keys.shape[1], -1, -1)
    q = prompts
    if "fusion_module.layer_norm.weight" in official:
        q = layer_norm(q, "fusion_module.layer_norm", eps=1e-5)
    if "fusion_module.prompt_proj.weight" in official:
        q = linear(q, "fusion_module.prompt_proj")
    L, B, P, D = q.shape
    d = D // num_heads
    q = q.view(L, B, P, num_heads, d).permute(0, 1, 3, 2, 4)
    context = (q @ keys.transpose(-1, -2) / math.sqrt(d)).softmax(-1) @ values
    context = context.permute(0, 1, 3, 2, 4).reshape(L, B, P, D)
    if prompts.shape[-1] == D:
        fused = linear(context + prompts, "fusion_module.out_proj")
    else:
        fused = linear(context, "fusion_module.out_proj") + prompts

    side = "side_encoder.vit."
    x = F.conv2d(x_lo, official[f"{side}embeddings.patch_embeddings.projection.weight"],
                 official[f"{side}embeddings.patch_embeddings.projection.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([official[f"{side}embeddings.cls_token"].expand(B, -1, -1), x], 1)
    x = x + official[f"{side}embeddings.position_embeddings"]
    for i in range(L):
        base = f"{side}encoder.layer.{i}."
        h = torch.cat([x, fused[i]], 1)
        n = layer_norm(h, base + "layernorm_before")
        T, C = h.shape[1], h.shape[2]
        heads = [linear(n, base + f"attention.attention.{name}").view(B, T, num_heads, C // num_heads).transpose(1, 2)
                 for name in ("query", "key", "value")]
        a = (heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(C // num_heads)).softmax(-1) @ heads[2]
        h = h + linear(a.transpose(1, 2).reshape(B, T, C), base + "attention.output.dense")
        h = h + linear(F.gelu(linear(layer_norm(h, base + "layernorm_after"), base + "intermediate.dense")),
                       base + "output.dense")
        x = h[:, :-P]
    x = layer_norm(x, f"{side}layernorm")
    return linear(x[:, 0], "side_encoder.classifier")


@pytest.mark.parametrize("preset", ["fpt", "fpt+"])
def test_round_trip_gives_identical_logits(preset, tmp_path):
    model = trained_like(preset)
    path = tmp_path / "official.pth"
    torch.save(official_state_dict(model), path)
    loaded = load_official_checkpoint(path, model.config, layer_norm_eps=1e-6)  # timm's eps: exact
    features, x_lo = inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded.forward_from_features(x_lo, features), model.forward_from_features(x_lo, features))


@pytest.mark.parametrize("preset", ["fpt", "fpt+"])
def test_logits_match_an_independent_official_style_forward(preset):
    model = trained_like(preset, seed=3)
    official = official_state_dict(model)
    loaded = load_official_checkpoint(official, model.config)  # HuggingFace's eps 1e-12
    features, x_lo = inputs(loaded)
    with torch.no_grad():
        ours = loaded.forward_from_features(x_lo, features)
        theirs = hf_reference_logits(official, features.keys, features.values, x_lo,
                                     model.config.backbone_info.num_heads, model.config.backbone_info.patch_size)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_key_variants_and_file_formats(tmp_path):
    from safetensors.torch import load_file, save_file

    model = trained_like("fpt+")
    plain = official_state_dict(model, vit_prefix=False)
    assert "side_encoder.embeddings.patch_embeddings.projection.weight" in plain
    wrapped = {f"module.{k}": v for k, v in official_state_dict(model).items()}  # DataParallel
    save_file({k: v.contiguous() for k, v in plain.items()}, tmp_path / "official.safetensors")
    reference = convert_official_state_dict(official_state_dict(model))
    for source in (wrapped, tmp_path / "official.safetensors"):
        converted = convert_official_state_dict(source if isinstance(source, dict) else load_file(source))
        assert converted.keys() == reference.keys()
        assert all(torch.equal(converted[k], reference[k]) for k in reference)
    assert load_official_checkpoint(tmp_path / "official.safetensors", model.config) is not None


def test_mismatches_are_named():
    model = trained_like("fpt+")
    official = official_state_dict(model)
    with pytest.raises(ValueError, match="keys this loader does not know.*frozen_encoder.blocks.0.weight"):
        convert_official_state_dict({**official, "frozen_encoder.blocks.0.weight": torch.zeros(1)})
    broken = dict(official)
    del broken["side_encoder.vit.encoder.layer.0.attention.attention.key.bias"]
    with pytest.raises(ValueError, match=r"layer 0 lacks attention.attention.\['key'\].bias"):
        convert_official_state_dict(broken)
    with pytest.raises(ValueError, match="missing.*fusion.prompt_proj.weight"):  # an FPT+ file for an FPT model
        load_official_checkpoint(official, tiny_config("fpt"))
    with pytest.raises(ValueError, match="shapes do not fit.*side.head.weight"):
        load_official_checkpoint(official, tiny_config("fpt+", num_classes=5))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_official_checkpoint("nowhere.pth", model.config)


def test_files_that_are_not_checkpoints_are_named(tmp_path):
    config = trained_like("fpt+").config
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 cut short")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    for name, message in [("cut.pth", "cannot be read as a checkpoint of weights"),
                          ("bad.safetensors", "cannot be read as a safetensors file"),
                          ("list.pth", "holds a list, not a dict of weights")]:
        with pytest.raises(ValueError, match=f"official checkpoint '.*{name}' {message}"):
            load_official_checkpoint(tmp_path / name, config)
