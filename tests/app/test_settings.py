"""Run settings: layers (preset < dataset template < YAML < --set), checking, round trips."""
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from fpt_fast import FrozenBranch
from fpt_fast.model.backbones import create_timm_model
from fpt_fast.model.config import PRESETS, FPTConfig
from fpt_fast.app.settings import DATASETS, Settings, load_settings, model_schema, parse_override
from helpers import dinov2_teacher_layout, retfound_mae_layout, timm_layout


def write_yaml(tmp_path, tree, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


def test_defaults_are_the_official_fpt_plus():
    settings = load_settings()
    for key, value in PRESETS["fpt+"].items():
        assert settings.model[key] == value, key
    assert settings.model["pretrained"] is True and settings.model["num_classes"] is None
    assert (settings.train.epochs, settings.train.batch_size, settings.train.lr) == (20, 16, 2e-4)
    assert settings.train.clip_grad_norm == 1.0 and settings.train.selection_metric == "auc"
    assert settings.train.warmup_epochs == 0  # the official schedule: cosine from the first step
    assert settings.model["pos_embed_resampling"] == "official"
    assert settings.preload.dtype == "bfloat16"


def test_preset_template_file_and_overrides_layer_in_order(tmp_path):
    path = write_yaml(tmp_path, {"model": {"preset": "fpt"}, "data": {"dataset": "isic2018"},
                                 "train": {"lr": 3e-4, "epochs": 7}})
    settings = load_settings(path, ["train.epochs=9", "data.num_workers=0"])
    assert settings.model["prompt_reduction_ratio"] == PRESETS["fpt"]["prompt_reduction_ratio"]  # preset
    assert settings.model["num_classes"] == 7 and settings.data.mean == DATASETS["isic2018"]["data"]["mean"]
    assert settings.train.lr == 3e-4          # the file beats the template's 1e-4
    assert settings.train.epochs == 9         # --set beats the file
    assert settings.data.num_workers == 0


# The official configs/dataset/*.yaml: classes, learning rate and the red channel's mean.
@pytest.mark.parametrize("dataset,classes,lr,red_mean", [
    ("messidor2", 5, 2e-4, 0.48436370491981506), ("ddr", 5, 5e-4, 0.423737496137619),
    ("isic2016", 2, 5e-3, 0.7243882417678833), ("isic2018", 7, 1e-4, 0.7635627388954163),
    ("ddsm", 3, 1e-3, 0.2026701271533966), ("cmmd", 2, 5e-5, 0.16735267639160156),
    ("covid", 3, 1e-4, 0.498341828584671), ("chncxr", 2, 5e-4, 0.6105489)])
def test_dataset_templates(dataset, classes, lr, red_mean):
    settings = load_settings(None, [f"data.dataset={dataset}"])
    assert settings.model["num_classes"] == classes and settings.train.lr == lr
    assert settings.model["image_size"] == 512 and settings.data.mean[0] == red_mean
    assert len(settings.data.mean) == len(settings.data.std) == 3


def test_override_values_are_read_as_yaml():
    assert parse_override("train.lr=1e-4") == ("train", "lr", "1e-4")  # PyYAML 1.1 keeps this as text ...
    settings = load_settings(None, ["train.lr=1e-4", "model.extracted_layers=[3, 4]", "train.val_split=null",
                                    "model.backbone_kwargs={depth: 5}", "data.mean=[0.5, 0.5, 0.5]"])
    assert settings.train.lr == 1e-4                                   # ... the float setting reads it
    assert settings.model["extracted_layers"] == [3, 4] and settings.train.val_split is None
    assert settings.model["backbone_kwargs"] == {"depth": 5} and settings.data.mean == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("override,error,match", [
    ("train.learning_rate=1e-4", ValueError, r"unknown setting 'train.learning_rate'; did you mean train.lr\?"),
    ("train.epoch=3", ValueError, r"unknown setting 'train.epoch'; did you mean train.epochs\?"),
    ("trian.lr=1", ValueError, "unknown setting 'trian'"),
    ("train.epochs=ten", TypeError, "setting train.epochs: expected an integer, got 'ten'"),
    ("train.epochs=2.5", TypeError, "setting train.epochs"),
    ("model.prompt_norm=3", TypeError, "setting model.prompt_norm: expected true/false"),
    ("data.mean=[0.5, 0.5]", TypeError, "setting data.mean"),
    ("preload.dtype=int8", ValueError, "setting preload.dtype: expected 'bfloat16' or 'float16' or 'float32'"),
    ("model.preset=vpt", ValueError, "setting model.preset"),
    ("preload.decode=nvjpeg", ValueError, "setting preload.decode: expected 'pil' or 'gpu'"),
    ("train.lr", ValueError, "expected SECTION.KEY=VALUE"),
    ("lr=1", ValueError, "SECTION.KEY"),
])
def test_bad_overrides_name_the_key(override, error, match):
    with pytest.raises(error, match=match):
        load_settings(None, [override])


def test_bad_keys_in_the_file_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown setting 'data.rooot'; did you mean data.root"):
        load_settings(write_yaml(tmp_path, {"data": {"rooot": "/x"}}))
    with pytest.raises(TypeError, match="setting train.batch_size"):
        load_settings(write_yaml(tmp_path, {"train": {"batch_size": "16"}}))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_settings(bad)


OUT_OF_RANGE = [
    # A negative clip once flipped the gradient (the model trained backwards); epochs 0, a negative
    # warm-up and a probability of 2 ran silently; eval_batch_size 0 failed after a whole epoch.
    ("train.clip_grad_norm=-1", "train.clip_grad_norm=-1.0 is out of range: expected a number > 0, or null"),
    ("train.clip_grad_norm=0", "train.clip_grad_norm=0.0 is out of range"),
    ("train.epochs=0", "train.epochs=0 is out of range: expected an integer >= 1"),
    ("train.warmup_epochs=-1", "train.warmup_epochs=-1.0 is out of range: expected a number of epochs >= 0"),
    ("data.hflip_prob=2", r"data.hflip_prob=2.0 is out of range: expected a probability in \[0, 1\]"),
    ("train.eval_batch_size=0", "train.eval_batch_size=0 is out of range: expected an integer >= 1"),
    ("train.batch_size=0", "train.batch_size=0 is out of range"),
    ("preload.batch_size=0", "preload.batch_size=0 is out of range: expected an integer >= 1"),
    ("train.lr=.nan", "train.lr=nan is out of range: expected a number > 0"),
    ("data.crop_scale=[0.9, 0.5]", r"data.crop_scale=\[0.9, 0.5\] is out of range"),
    ("data.std=[0.2, 0, 0.2]", "data.std=.* is out of range: expected 'auto' or three numbers > 0"),
    ("train.class_weights=[0, 0, 0]", "train.class_weights=.* is out of range"),
]


def test_gpu_decode_on_the_cpu_is_refused_when_the_settings_load():
    with pytest.raises(ValueError, match="setting preload.decode='gpu' decodes images on a CUDA GPU, but "
                                         "preload.device='cpu'"):
        load_settings(None, ["preload.decode=gpu", "preload.device=cpu", "model.pretrained=false"])
    assert load_settings(None, ["preload.decode=gpu", "model.pretrained=false"]).preload.decode == "gpu"
    assert load_settings(None, ["model.pretrained=false"]).preload.decode == "pil"  # the official path


@pytest.mark.parametrize("override,match", OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_values_out_of_range_name_the_key_and_the_range_when_the_settings_load(override, match):
    with pytest.raises(ValueError, match="setting " + match):
        load_settings(None, [override, "model.pretrained=false"])


def test_the_backbone_file_is_checked_when_the_settings_load(tmp_path):
    """A missing file once gave an empty message, a text file a raw traceback."""
    with pytest.raises(FileNotFoundError, match="model.checkpoint_path='.*missing.pth': no such file"):
        load_settings(None, [f"model.checkpoint_path={tmp_path / 'missing.pth'}"])
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(ValueError, match="model.checkpoint_path '.*notes.pth' cannot be read"):
        load_settings(None, [f"model.checkpoint_path={tmp_path / 'notes.pth'}"])
    torch.save({"cls_token": torch.zeros(1, 1, 768)}, tmp_path / "vit.pth")
    settings = load_settings(None, [f"model.checkpoint_path={tmp_path / 'vit.pth'}"])
    assert settings.model["checkpoint_path"] == str(tmp_path / "vit.pth")
    # MAE checkpoints (RETFound-MAE) keep their training arguments as an argparse.Namespace.
    import argparse
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 768)}, "args": argparse.Namespace(lr=1e-3)},
               tmp_path / "mae.pth")
    load_settings(None, [f"model.checkpoint_path={tmp_path / 'mae.pth'}"])


def test_invalid_model_values_are_reported_when_the_settings_load():
    with pytest.raises(ValueError, match="invalid model settings: FPTConfig.token_ratio=1.5"):
        load_settings(None, ["model.token_ratio=1.5", "model.pretrained=false"])


def test_num_classes_comes_from_the_data_or_must_agree():
    settings = load_settings(None, ["model.pretrained=false"])
    with pytest.raises(ValueError, match="model.num_classes is null"):
        settings.fpt_config()
    assert settings.fpt_config(4).num_classes == 4
    with pytest.raises(ValueError, match="model.num_classes=5 but the dataset has 3"):
        load_settings(None, ["data.dataset=messidor2", "model.pretrained=false"]).fpt_config(3)


def test_model_section_covers_every_fpt_config_field():
    fields = {f.name for f in dataclasses.fields(FPTConfig) if f.init}
    assert fields <= set(model_schema())


def test_printed_settings_load_back_identically(tmp_path):
    settings = load_settings(None, ["data.dataset=ddsm", "train.epochs=3", "model.image_size=[384, 256]"])
    path = tmp_path / "printed.yaml"
    path.write_text(settings.to_yaml())
    again = load_settings(path)
    assert again.to_dict() == settings.to_dict()
    assert Settings.from_tree(settings.to_dict()).to_dict() == settings.to_dict()


def test_replace_checks_like_overrides():
    settings = load_settings()
    assert settings.replace("train", epochs=3).train.epochs == 3
    with pytest.raises(TypeError, match="setting train.epochs"):
        settings.replace("train", epochs="3")


CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    settings = load_settings(path)
    if path.stem in DATASETS:
        assert settings.data.dataset == path.stem and settings.model["num_classes"] is not None
    if path.stem == "customized":  # documents every key at its default
        assert settings.to_dict() == load_settings().to_dict()
        written = yaml.safe_load(path.read_text())
        assert {s: set(v) for s, v in written.items()} == {s: set(v) for s, v in settings.to_dict().items()}


BACKBONE_TEMPLATES = sorted((Path(__file__).resolve().parents[2] / "configs" / "backbones").glob("*.yaml"))
# Per template, from the model's card or paper: (width, heads, head size, depth, patch, prefix
# tokens, MLP inner width), and the layout its weights are published in.
TEMPLATE_FACTS = {
    "retfound_mae": ((1024, 16, 64, 24, (16, 16), 1, 4096), retfound_mae_layout),
    "dinov2_large": ((1024, 16, 64, 24, (14, 14), 1, 4096), dinov2_teacher_layout),
    "uni": ((1024, 16, 64, 24, (16, 16), 1, 4096), timm_layout),
    # SwiGLU packed: fc1 1280 -> 2 x 3416 (mlp_ratio 5.3375), 4 registers, head size 80.
    "virchow2": ((1280, 16, 80, 32, (14, 14), 5, 6832), timm_layout),
}


@pytest.mark.parametrize("path", BACKBONE_TEMPLATES, ids=[p.stem for p in BACKBONE_TEMPLATES])
def test_backbone_templates_resolve_and_read_their_published_layout(path, tmp_path):
    """Each template's model section resolves on the meta device to the published architecture; a
    depth-2 model of that architecture (same head size), with random weights in the layout its
    authors publish, loads through the template with every weight and extracts at its input size."""
    facts, layout = TEMPLATE_FACTS[path.stem]
    settings = load_settings(path, ["model.checkpoint_path=null"])
    info = settings.fpt_config(2).backbone_info
    assert (info.embed_dim, info.num_heads, info.head_dim, info.depth, info.patch_size, info.num_prefix_tokens,
            info.mlp_width) == facts
    assert settings.model["frozen_layer_norm_eps"] is None and settings.model["preset"] == "fpt+"

    kwargs = dict(settings.model["backbone_kwargs"], depth=2, num_heads=2, embed_dim=2 * info.head_dim)
    torch.manual_seed(0)
    source = create_timm_model(settings.model["backbone"], kwargs, num_classes=0)
    weights = tmp_path / "weights.pth"
    torch.save(layout(source), weights)
    config = settings.replace("model", backbone_kwargs=kwargs, checkpoint_path=str(weights)).fpt_config(2)
    frozen = FrozenBranch(config)
    assert torch.equal(frozen.backbone.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    features = frozen(torch.randn(1, 3, *config.image_size))
    N = info.num_prefix_tokens + (config.image_size[0] // info.patch_size[0]) ** 2
    assert features.keys.shape == (1, 1, 2, int(N * 0.2), info.head_dim)


def test_saved_settings_of_the_former_backend_keys_are_upgraded():
    from fpt_fast.app.settings import upgrade_saved_settings

    # Saved before model.pos_embed_resampling existed: timm's rule resampled the backbone then.
    earlier = {"pos_embed_resampling": "timm", "frozen_layer_norm_eps": None}
    saved = {"model": {"attention_backend": "sdpa", "op_backend": "triton", "num_classes": 3}, "train": {}}
    assert upgrade_saved_settings(saved)["model"] == {"backend": "sdpa", "num_classes": 3, **earlier}
    saved = {"model": {"attention_backend": "auto", "op_backend": "torch"}}
    assert upgrade_saved_settings(saved)["model"] == {"backend": "torch", **earlier}
    assert upgrade_saved_settings({"model": {"backend": "native"}}) == {"model": {"backend": "native", **earlier}}
    today = {"model": {"backend": "native", "pos_embed_resampling": "official", "frozen_layer_norm_eps": 1e-12}}
    assert upgrade_saved_settings(today) == today


def test_a_former_backend_key_in_a_file_names_its_successor():
    with pytest.raises(ValueError, match="now model.backend"):
        load_settings(None, ["model.attention_backend=sdpa"])
