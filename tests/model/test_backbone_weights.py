"""Backbone weights in the layouts their authors publish (fpt_fast/model/backbone_weights.py): each
layout is written here from a random tiny model and loads with no weight missing and every value
kept; files that do not fit are errors naming the weights, files that are not checkpoints errors
naming the file."""
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from fpt_fast import FPTConfig, FrozenBranch
from helpers import (dinov2_teacher_layout, dinov3_layout, openclip_layout, retfound_mae_layout,
                     timm_layout)

VIT = dict(depth=4, embed_dim=64, num_heads=2)
# DINOv2 with registers as timm builds it (vit_*_reg4_dinov2): registers outside the position embeddings.
DINOV2 = dict(VIT, reg_tokens=4, no_embed_class=True, init_values=1e-5)
DINOV3 = dict(depth=4, embed_dim=64, num_heads=2)


def source_model(backbone, kwargs, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model(backbone, num_classes=0, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # layer scales and biases off their initial values too
    return model


LAYOUTS = {  # name: (backbone, kwargs, layout, file suffix)
    "timm_pth": ("vit_tiny_patch16_224", VIT, timm_layout, ".pth"),
    "timm_safetensors": ("vit_tiny_patch16_224", VIT, timm_layout, ".safetensors"),
    "retfound_mae": ("vit_tiny_patch16_224", VIT, retfound_mae_layout, ".pth"),
    "dinov2_teacher": ("vit_tiny_patch16_224", DINOV2, dinov2_teacher_layout, ".pth"),
    "openclip_trunk": ("vit_tiny_patch16_224", VIT, openclip_layout, ".bin"),
    "dinov3": ("vit_small_patch16_dinov3_qkvb", DINOV3, dinov3_layout, ".pth"),
}


def write(path, contents):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in contents.items()}, str(path))
    else:
        torch.save(contents, path)
    return str(path)


def config_with(path, backbone, kwargs, **overrides):
    # 224 px: the stored grid, so that position embeddings are compared untouched.
    return FPTConfig.preset("fpt", backbone=backbone, backbone_kwargs=kwargs, num_classes=2, image_size=224,
                            side_input_size=32, checkpoint_path=path, **overrides)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_published_layouts_load_every_weight(layout, tmp_path):
    backbone, kwargs, make, suffix = LAYOUTS[layout]
    source = source_model(backbone, kwargs)
    path = write(tmp_path / f"weights{suffix}", make(source))
    loaded = FrozenBranch(config_with(path, backbone, kwargs)).backbone.state_dict()
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith(("norm.", "fc_norm."))}
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_weights_of_blocks_after_the_last_extracted_one_are_not_needed(tmp_path):
    source = source_model("vit_tiny_patch16_224", VIT)
    path = write(tmp_path / "weights.pth", source.state_dict())
    frozen = FrozenBranch(config_with(path, "vit_tiny_patch16_224", VIT, extracted_layers=[1]))
    assert len(frozen.backbone.blocks) == 2
    assert torch.equal(frozen.backbone.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_weights_that_do_not_fit_are_named(tmp_path):
    state = source_model("vit_tiny_patch16_224", VIT).state_dict()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "blocks.2.attn.qkv.weight"},
                    r"missing weights \[blocks.2.attn.qkv.weight\]"),
        "unexpected": (dict(state, **{"blocks.0.attn.extra_bias": torch.zeros(64)}),
                       r"unexpected weights \[blocks.0.attn.extra_bias\]"),
        "shapes": (dict(state, **{"blocks.1.mlp.fc1.weight": torch.zeros(128, 64)}),
                   r"shapes that differ: \[blocks.1.mlp.fc1.weight: file \(128, 64\), model \(256, 64\)\]"),
        # Another architecture's weights (issue 13: this was a raw RuntimeError inside timm).
        "other_model": ({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)},
                        r"missing weights \[cls_token, pos_embed, patch_embed.proj.weight, .*\] and \d+ more; "
                        r"unexpected weights "
                        r"\[conv1.weight, fc.weight\]"),
    }
    for name, (contents, message) in cases.items():
        path = write(tmp_path / f"{name}.pth", contents)
        with pytest.raises(ValueError, match=f"checkpoint_path '.*{name}.pth' does not fit the backbone "
                                             f"\\(VisionTransformer\\): .*{message}"):
            FrozenBranch(config_with(path, "vit_tiny_patch16_224", VIT))


class NotWeights:
    pass


def test_files_that_are_not_checkpoints_are_named(tmp_path):
    (tmp_path / "notes.pth").write_text("not weights")
    with open(tmp_path / "object.pth", "wb") as f:
        pickle.dump({"model": NotWeights()}, f, protocol=2)
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "empty.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    state = source_model("vit_tiny_patch16_224", VIT).state_dict()
    torch.save({"student": {f"student.{k}": v for k, v in state.items()},
                "teacher_copy": {f"copy.{k}": v for k, v in state.items()}}, tmp_path / "two.pth")
    torch.save({**{f"a.{k}": v for k, v in state.items()}, **{f"b.{k}": v for k, v in state.items()}},
               tmp_path / "ambiguous.pth")
    for name, message in [("notes.pth", "cannot be read as a checkpoint of weights"),
                          ("object.pth", "cannot be read as a checkpoint of weights"),
                          ("list.pth", "holds a list, not a dict of weights"),
                          ("empty.pth", "no tensors found"),
                          ("bad.safetensors", "cannot be read as a safetensors file"),
                          ("ambiguous.pth", r"several patch embeddings \['a.patch_embed.proj.weight', "
                                            r"'b.patch_embed.proj.weight'\]")]:
        with pytest.raises(ValueError, match=f"'.*{name}'.*{message}"):
            FrozenBranch(config_with(str(tmp_path / name), "vit_tiny_patch16_224", VIT))
