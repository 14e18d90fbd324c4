import pytest
import torch

from fpt_fast import FPT, FPTConfig
from helpers import TINY, tiny_config


def test_presets_follow_the_spec():
    fpt = FPTConfig.preset("fpt")
    plus = FPTConfig.preset("fpt+")
    assert fpt.layers == tuple(range(12)) and plus.layers == tuple(range(6, 12))
    assert (fpt.num_prompts, fpt.side_reduction_ratio, fpt.prompt_reduction_ratio) == (16, 8, 8)
    assert (plus.num_prompts, plus.side_reduction_ratio, plus.prompt_reduction_ratio) == (16, 8, 1)
    assert (fpt.prompt_norm, fpt.prompt_proj, plus.prompt_norm, plus.prompt_proj) == (False, True, True, False)
    assert fpt.side_input_size == (224, 224) and plus.side_input_size == (128, 128)
    assert fpt.image_size == plus.image_size == (512, 512)
    assert fpt.token_ratio == plus.token_ratio == 0.2 and fpt.importance == plus.importance == "global"
    # ViT-B/16 at 512: N = 1 + 32 * 32 = 1025, n = int(1025 * 0.2) = 205
    assert fpt.num_tokens == 1025 and fpt.num_selected == 205
    assert fpt.pos_embed_resampling == plus.pos_embed_resampling == "official"
    # The official LPM gets the official (HuggingFace) eps; any other backbone keeps its own.
    assert fpt.frozen_layer_norm_eps == plus.frozen_layer_norm_eps == "official"
    assert fpt.layer_norm_eps == plus.layer_norm_eps == 1e-12
    assert FPTConfig.preset("fpt+", backbone="vit_base_patch16_384.augreg_in21k_ft_in1k").layer_norm_eps is None
    # The official LPM, google/vit-base-patch16-384, is the default backbone.
    assert FPTConfig().backbone == "vit_base_patch16_384.orig_in21k_ft_in1k"


# (N, ratio, n): n is the float64 product N * ratio truncated (the official int(N * token_ratio)),
# written here as exact rational arithmetic on the double the product rounds to.
@pytest.mark.parametrize("num_tokens, ratio", [(180, 0.35), (1025, 0.2), (577, 0.2), (145, 0.2), (100, 0.07),
                                               (1000, 0.29), (65, 0.3), (2049, 0.1), (13, 1.0), (4097, 0.15)])
def test_num_selected_truncates_the_float_product_as_the_official_code(num_tokens, ratio):
    from fractions import Fraction

    from fpt_fast.model.config import num_selected_tokens

    product = Fraction(num_tokens * ratio)  # the double N * ratio, exactly
    expected = product.numerator // product.denominator
    assert num_selected_tokens(num_tokens, ratio) == expected
    if (num_tokens, ratio) == (180, 0.35):
        assert expected == 62  # 62.99999999999999: one fewer than floor(N * r + 1e-9)


def test_overrides_and_non_square():
    cfg = FPTConfig.preset("fpt+", image_size=(512, 256), extracted_layers=[11, 3])
    assert cfg.image_size == (512, 256) and cfg.layers == (3, 11)
    assert cfg.num_tokens == 1 + 32 * 16


@pytest.mark.parametrize("preset, target", [("fpt", 1.81), ("fpt+", 1.03)])
def test_learnable_share_matches_the_papers(preset, target):
    with torch.device("meta"):  # no memory, no weights
        model = FPT(FPTConfig.preset(preset, backbone="vit_base_patch16_384", num_classes=5))
    assert abs(model.learnable_share() * 100 - target) <= 0.2


BAD = [
    (dict(token_ratio=0.0), "token_ratio"),
    (dict(token_ratio=1.5), "token_ratio"),
    (dict(token_ratio=0.01), "token_ratio"),                 # n = floor(13 * 0.01) = 0
    (dict(extracted_layers=[0, 3]), "extracted_layers"),     # 3 blocks only
    (dict(extracted_layers=[-1]), "extracted_layers"),
    (dict(extracted_layers=[1, 1]), "extracted_layers"),
    (dict(image_size=(64, 50)), "image_size"),
    (dict(side_input_size=30), "side_input_size"),
    (dict(prompt_reduction_ratio=8, prompt_proj=False), "prompt_reduction_ratio"),
    (dict(prompt_reduction_ratio=4, prompt_proj=True), "prompt_reduction_ratio"),  # 16: neither 64 nor 8
    (dict(importance="cls"), "importance"),
    (dict(importance="class_token", backbone_kwargs=dict(TINY["backbone_kwargs"], class_token=False,
                                                         global_pool="avg")), "importance"),
    (dict(backbone="not_a_model"), "backbone"),
    (dict(num_classes=0), "num_classes"),
    (dict(side_reduction_ratio=3), "side_reduction_ratio"),
    (dict(backend="fast"), "backend"),
    (dict(backend="xformers"), "backend"),
    (dict(frozen_dtype="float64"), "frozen_dtype"),
    (dict(frozen_chunk_size=0), "frozen_chunk_size"),
    (dict(dropout=1.0), "dropout"),
    # Wrong types once became other values: "64" -> (6, 4), block 1.7 -> 1, True -> 1.
    (dict(image_size="64"), "image_size"),
    (dict(image_size=(64,)), "image_size"),
    (dict(side_input_size=32.0), "side_input_size"),
    (dict(image_size=(True, 48)), "image_size"),
    (dict(extracted_layers=[1.7]), "extracted_layers"),
    (dict(num_prompts=True), "num_prompts"),
    (dict(token_ratio=True), "token_ratio"),
    (dict(prompt_norm=1), "prompt_norm"),
    (dict(checkpoint_path="no/such/file.pth"), "checkpoint_path"),
    (dict(pos_embed_resampling="bilinear"), "pos_embed_resampling"),
    (dict(frozen_layer_norm_eps=0.0), "frozen_layer_norm_eps"),
]


@pytest.mark.parametrize("overrides, field", BAD, ids=[f for _, f in BAD])
def test_bad_configuration_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"FPTConfig\.{field}"):
        tiny_config("fpt", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        FPTConfig.preset("lora")


def test_round_trip_through_dict():
    cfg = tiny_config("fpt+")
    again = FPTConfig(**cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_one_backend_field_with_the_former_attention_backend_names():
    assert tiny_config("fpt").backend == "auto"
    assert tiny_config("fpt", backend="sdpa").backend == "torch"
    assert tiny_config("fpt", backend="math").backend == "reference"
    assert tiny_config("fpt", backend="native").to_dict()["backend"] == "native"
    with pytest.raises(ValueError, match="'xformers' is not implemented in this version"):
        tiny_config("fpt", backend="xformers")
    with pytest.raises(TypeError):
        tiny_config("fpt", attention_backend="sdpa")  # the former field is gone, not ignored


def test_backbone_info():
    info = tiny_config("fpt").backbone_info
    assert (info.embed_dim, info.num_heads, info.depth, info.head_dim) == (64, 2, 3, 32)
    assert info.patch_size == (16, 16) and info.num_prefix_tokens == 1 and info.has_class_token
