"""Backbones beyond the plain ViT (fpt_fast/model/backbones.py, frozen.py, reference.py): tiny random
versions of each family extract the reference's keys and values and train; the reference's keys
are the keys timm's blocks attend with; names (tags, hub:, local-dir:) and class-valued arguments
resolve, and what is not supported says what it lacks."""
import json
import time

import pytest
import torch
import yaml

from fpt_fast import FPT, FPTConfig, FrozenBranch
from fpt_fast.model import reference
from fpt_fast.model.backbones import read_backbone_info
from helpers import assert_same_rows

# Depth-reduced random versions of each family; the ViT's arguments are written as in a YAML file.
FAMILIES = {
    # Virchow2-style: register tokens, SwiGLU, layer scale, head size 80.
    "vit_registers_swiglu": dict(
        backbone="vit_tiny_patch16_224", image_size=(64, 48), side_input_size=32,
        backbone_kwargs=yaml.safe_load("{depth: 3, embed_dim: 160, num_heads: 2, reg_tokens: 4, mlp_ratio: 2.5, "
                                       "mlp_layer: SwiGLUPacked, act_layer: silu, init_values: 0.5, "
                                       "no_embed_class: true}")),
    # DINOv3: Eva, rotate-half RoPE computed for each input's grid, no absolute position
    # embeddings, 4 registers, q/v biases, gamma layer scale.
    "dinov3": dict(backbone="vit_small_patch16_dinov3_qkvb", image_size=(64, 48), side_input_size=32,
                   backbone_kwargs=dict(depth=3, embed_dim=128, num_heads=2, init_values=0.5)),
    # EVA02: Eva, interleaved RoPE for a fixed grid, absolute position embeddings too, separate q/k/v
    # projections, SwiGLU with an inner norm.
    "eva02": dict(backbone="eva02_tiny_patch14_224", image_size=(56, 42), side_input_size=28,
                  backbone_kwargs=dict(depth=3, embed_dim=64, num_heads=2)),
    "no_class_token": dict(backbone="vit_tiny_patch16_224", image_size=(64, 48), side_input_size=32,
                           backbone_kwargs=dict(depth=3, embed_dim=64, num_heads=2, class_token=False,
                                                global_pool="avg")),
}
PREFIX_TOKENS = {"vit_registers_swiglu": 5, "dinov3": 5, "eva02": 1, "no_class_token": 0}
# (rotary, absolute) position embeddings of each family.
POSITION_EMBEDDINGS = {"vit_registers_swiglu": (False, True), "dinov3": (True, False), "eva02": (True, True),
                       "no_class_token": (False, True)}


def family_config(family, **overrides):
    return FPTConfig.preset("fpt", num_classes=3, **{**FAMILIES[family], **overrides})


def randomize(module, seed=0):
    """Every parameter moved off its initial value (norm weights, biases, layer scales included),
    so that no part of a block is a no-op the comparisons could not see."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    return module


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("family", FAMILIES)
def test_extraction_matches_the_reference(family, backend):
    cfg = family_config(family, backend=backend)
    assert cfg.backbone_info.num_prefix_tokens == PREFIX_TOKENS[family]
    assert (cfg.backbone_info.rotary, cfg.backbone_info.abs_pos_embed) == POSITION_EMBEDDINGS[family]
    torch.manual_seed(0)
    frozen = randomize(FrozenBranch(cfg))
    x = torch.randn(2, 3, *cfg.image_size)
    fast = frozen(x, return_scores=True)
    keys, values, scores, indices = reference.extract_features(frozen.backbone, x, cfg.layers, cfg.num_selected,
                                                               cfg.importance, return_scores=True)
    H, d = cfg.backbone_info.num_heads, cfg.backbone_info.head_dim
    assert fast.keys.shape == (3, 2, H, cfg.num_selected, d) and fast.scores.shape == (3, 2, H, cfg.num_tokens)
    # float32 rounding relative to the randomised weights' scale (values of a few units)
    assert_same_rows(fast.keys, keys, atol=2e-5 * keys.abs().max().item())
    assert_same_rows(fast.values, values, atol=2e-5 * values.abs().max().item())
    torch.testing.assert_close(fast.scores, scores, atol=1e-6, rtol=1e-4)
    assert torch.equal(fast.indices.sort(-1).values, indices.sort(-1).values)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_reference_keys_are_the_keys_the_block_attends_with(family):
    """Softmax attention over the reference's q, k, v, through the attention's own output norm and
    projection, gives the output of timm's attention module on the same input (with its rotary
    embedding): the keys are those after the q/k norm and the rotation."""
    cfg = family_config(family)
    torch.manual_seed(0)
    backbone = randomize(FrozenBranch(cfg)).backbone
    attn = backbone.blocks[1].attn
    seen = {}
    handle = attn.register_forward_pre_hook(lambda m, args, kwargs: seen.update(h=args[0], rope=kwargs.get("rope")),
                                            with_kwargs=True)
    with torch.no_grad():
        backbone.forward_intermediates(torch.randn(2, 3, *cfg.image_size), indices=[1], stop_early=True)
        handle.remove()
        h, rope = seen["h"], seen["rope"]
        assert (rope is not None) == (family in ("dinov3", "eva02"))
        timm_out = attn(h) if rope is None else attn(h, rope=rope)
        q, k, v = reference.attention_inputs(attn, h, rope)
        probs = (q @ k.transpose(-1, -2) * attn.head_dim ** -0.5).softmax(dim=-1)
        out = attn.proj(attn.norm((probs @ v).transpose(1, 2).flatten(2)))
    torch.testing.assert_close(out, timm_out, atol=1e-5, rtol=1e-4)
    if rope is not None:  # without the rotation the output differs: the test can tell
        q0, k0, v0 = reference.attention_inputs(attn, h, None)
        unrotated = attn.proj(attn.norm(((q0 @ k0.transpose(-1, -2) * attn.head_dim ** -0.5).softmax(-1) @ v0)
                                        .transpose(1, 2).flatten(2)))
        assert (unrotated - timm_out).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_the_reference_and_one_step_trains(family):
    cfg = family_config(family)
    torch.manual_seed(0)
    model = FPT(cfg)
    randomize(model.frozen)
    with torch.no_grad():
        model.fusion.prompts.normal_()  # prompts that change the side network's output
    model.eval()
    x = torch.randn(2, 3, *cfg.image_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.fpt_forward(model, x), atol=1e-5, rtol=1e-4)
    model.train()
    frozen_before = {k: v.clone() for k, v in model.frozen.state_dict().items()}
    learnable_before = {k: v.clone() for k, v in model.learnable.state_dict().items()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 2]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(torch.equal(v, model.frozen.state_dict()[k]) for k, v in frozen_before.items())
    changed = [k for k, v in model.learnable.state_dict().items() if not torch.equal(v, learnable_before[k])]
    assert any(k.startswith("fusion.") for k in changed) and any(k.startswith("side.") for k in changed)


def test_rotary_embeddings_follow_the_input_grid_by_the_models_own_rule():
    """EVA02 computes its rotary embeddings for a fixed grid: at image_size they are those timm
    computes for a model built at that size."""
    import timm

    cfg = family_config("eva02")
    backbone = FrozenBranch(cfg).backbone
    built_there = timm.create_model(cfg.backbone, img_size=cfg.image_size, **cfg.backbone_kwargs)
    assert tuple(backbone.rope.feat_shape) == (4, 3) != (16, 16)
    torch.testing.assert_close(backbone.rope.get_embed(), built_there.rope.get_embed())


def test_class_token_importance_needs_a_class_token():
    with pytest.raises(ValueError, match="importance='class_token' is invalid: expected 'global': .* has no class token"):
        family_config("no_class_token", importance="class_token")
    assert family_config("dinov3", importance="class_token").backbone_info.has_class_token


@pytest.mark.parametrize("backbone, kwargs, lacks", [
    ("samvit_base_patch16", {}, "global self-attention .*windows of 14 x 14 tokens.*relative-position"),
    ("vit_tiny_patch16_224", {"block_fn": "timm.models.vision_transformer.ParallelScalingBlock"},
     "pre-norm block .*ParallelScalingBlock"),
    ("vit_tiny_patch16_224", {"attn_layer": "diff"}, "multi-head self-attention .*DiffAttention"),
    ("vit_pe_core_tiny_patch16_384", {"num_kv_heads": 1, "qkv_fused": False}, "grouped-query attention"),
    ("eva02_tiny_patch14_224", {"use_post_norm": True}, "pre-norm block .*EvaBlockPostNorm"),
])
def test_unsupported_architectures_name_what_they_lack(backbone, kwargs, lacks):
    with pytest.raises(ValueError, match=f"is not supported: block 0 lacks .*{lacks}"):
        FPTConfig(backbone=backbone, backbone_kwargs=kwargs, image_size=1024, side_input_size=256)


def test_class_valued_arguments_are_names_kept_as_written():
    import timm

    cfg = family_config("vit_registers_swiglu")
    assert json.loads(json.dumps(cfg.to_dict()))["backbone_kwargs"]["mlp_layer"] == "SwiGLUPacked"
    mlp = FrozenBranch(cfg).backbone.blocks[0].mlp
    assert isinstance(mlp, timm.layers.GluMlp) and isinstance(mlp.act, torch.nn.SiLU)
    dotted = dict(FAMILIES["vit_registers_swiglu"]["backbone_kwargs"], act_layer="torch.nn.GELU")
    assert isinstance(FrozenBranch(family_config("vit_registers_swiglu", backbone_kwargs=dotted))
                      .backbone.blocks[0].mlp.act, torch.nn.GELU)
    with pytest.raises(ValueError, match=r"backbone_kwargs\['mlp_layer'\]=<class .*is not a JSON value"):
        family_config("vit_registers_swiglu", backbone_kwargs=dict(dotted, mlp_layer=timm.layers.GluMlp))
    for key, spelling in [("mlp_layer", "SwiGluPacked"), ("act_layer", "sillu"), ("norm_layer", "no.such.Norm")]:
        with pytest.raises(ValueError, match=rf"backbone_kwargs\['{key}'\]='{spelling}' does not name a layer"):
            family_config("vit_registers_swiglu", backbone_kwargs=dict(dotted, **{key: spelling}))


def test_numbers_yaml_reads_as_text_are_pointed_out():
    kwargs = yaml.safe_load("{depth: 2, init_values: 1e-5}")
    assert kwargs["init_values"] == "1e-5"
    with pytest.raises(ValueError, match=r"not accepted by .*write 1.0e-5 for \['init_values'\]"):
        read_backbone_info("vit_tiny_patch16_224", kwargs)


def test_names_resolve_through_timm():
    info = read_backbone_info("vit_large_patch14_dinov2.lvd142m")
    assert (info.embed_dim, info.num_heads, info.head_dim, info.patch_size, info.stored_grid) == \
        (1024, 16, 64, (14, 14), (37, 37))
    with pytest.raises(ValueError, match="no pretrained tag 'no_such_tag' .*vit_large_patch14_dinov2.lvd142m"):
        read_backbone_info("vit_large_patch14_dinov2.no_such_tag")
    with pytest.raises(ValueError, match="unknown timm model 'no_such_vit'"):
        read_backbone_info("no_such_vit")
    with pytest.raises(ValueError, match="is not a folder holding config.json"):
        read_backbone_info("local-dir:/no/such/folder")


def write_model_folder(folder, model_args, seed=0):
    """A timm model folder as timm saves one for the hub: config.json and model.safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **model_args)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "num_classes": 0, "num_features": model_args["embed_dim"],
        "pretrained_cfg": {"input_size": [3, 224, 224], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "model_args": model_args}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return model


MODEL_ARGS = dict(depth=2, embed_dim=64, num_heads=2, reg_tokens=2)


def test_a_local_dir_folder_loads_with_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved = write_model_folder(tmp_path / "model", MODEL_ARGS)
    cfg = FPTConfig.preset("fpt+", backbone=f"local-dir:{tmp_path / 'model'}", pretrained=True, num_classes=2,
                           image_size=224, side_input_size=32)
    assert (cfg.backbone_info.depth, cfg.backbone_info.num_register_tokens) == (2, 2)  # from its config.json
    loaded = FrozenBranch(cfg).backbone.state_dict()
    assert loaded.keys() == {k for k in saved.state_dict() if not k.startswith("norm.")}
    assert all(torch.equal(loaded[k], saved.state_dict()[k]) for k in loaded)


def hub_cache(root, repo_id, files):
    """A Hugging Face cache holding files of repo_id at revision main, laid out as huggingface_hub
    lays it out."""
    folder = root / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for source in files:
        (snapshot / source.name).write_bytes(source.read_bytes())


def test_hub_names_read_the_cache_and_fail_fast_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    saved = write_model_folder(tmp_path / "model", MODEL_ARGS, seed=1)
    hub_cache(tmp_path / "cache", "fpt-fast-tests/tiny-vit", [tmp_path / "model" / "config.json",
                                                              tmp_path / "model" / "model.safetensors"])
    cfg = FPTConfig.preset("fpt+", backbone="hf-hub:fpt-fast-tests/tiny-vit", pretrained=True, num_classes=2,
                           image_size=224, side_input_size=32)
    loaded = FrozenBranch(cfg).backbone
    assert torch.equal(loaded.blocks[1].attn.qkv.weight, saved.blocks[1].attn.qkv.weight)

    start = time.monotonic()
    with pytest.raises(ValueError, match="'hf-hub:fpt-fast-tests/not-cached'.*not in the local Hugging Face cache "
                                         "and the hub is offline.*local-dir:.*checkpoint_path"):
        FPTConfig(backbone="hf-hub:fpt-fast-tests/not-cached")
    cfg = FPTConfig.preset("fpt+", backbone="vit_tiny_patch16_224.augreg_in21k", pretrained=True, num_classes=2,
                           backbone_kwargs=dict(depth=2))
    with pytest.raises(ValueError, match="the weights of hub model 'timm/vit_tiny_patch16_224.augreg_in21k' "
                                         "is not in the local Hugging Face cache"):
        FrozenBranch(cfg)
    assert time.monotonic() - start < 5
