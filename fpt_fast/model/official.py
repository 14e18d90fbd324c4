"""Weights of the official FPT / FPT+ implementation (github.com/YijinHuang/FPT) in fpt_fast.FPT.

The official code saves the state_dict of its ``FineGrainedPromptTuning`` module: a side encoder
that is a HuggingFace-transformers ``ViTForImageClassification`` (with the fine-grained prompts
appended inside each layer) and a ``FusionModule``. The frozen backbone is not part of it; here it
comes from the FPTConfig (model.backbone / pretrained / checkpoint_path) as always.

Assumed key names (official -> fpt_fast), after an optional "module." prefix (DataParallel) and an
optional "vit." inside the side encoder:

    fusion_module.prompts (L, 1, P, dp)                        fusion.prompts (L, 1, P, dp)
    fusion_module.layer_norm.{weight,bias}                     fusion.layer_norm.*        (FPT+)
    fusion_module.prompt_proj.{weight,bias}                    fusion.prompt_proj.*       (FPT)
    fusion_module.out_proj.{weight,bias}                       fusion.out_proj.*
    side_encoder.embeddings.cls_token                          side.cls_token
    side_encoder.embeddings.position_embeddings                side.pos_embed
    side_encoder.embeddings.patch_embeddings.projection.*      side.patch_embed.proj.*
    side_encoder.encoder.layer.{i}.layernorm_before.*          side.blocks.{i}.norm1.*
    side_encoder.encoder.layer.{i}.attention.attention.{query,key,value}.*
                                                               side.blocks.{i}.attn.qkv.* (rows q; k; v)
    side_encoder.encoder.layer.{i}.attention.output.dense.*    side.blocks.{i}.attn.proj.*
    side_encoder.encoder.layer.{i}.layernorm_after.*           side.blocks.{i}.norm2.*
    side_encoder.encoder.layer.{i}.intermediate.dense.*        side.blocks.{i}.mlp.fc1.*
    side_encoder.encoder.layer.{i}.output.dense.*              side.blocks.{i}.mlp.fc2.*
    side_encoder.layernorm.*                                   side.norm.*
    side_encoder.classifier.*                                  side.head.*

HuggingFace's ViT normalises with LayerNorm eps 1e-12 (google/vit-base-patch16-384's config),
timm with 1e-6: the side network's LayerNorms get the official eps so logits match. No official
checkpoint file was available when this was written: the mapping is tested by exporting an
fpt_fast model to this layout (official_state_dict) and by an independent HuggingFace-style
forward written from these keys.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .backbone_weights import read_weights_file
from .config import HF_LAYER_NORM_EPS, FPTConfig
from .fpt import FPT

# Parts of an official encoder layer -> the timm Block submodule holding the same weights.
LAYER_PARTS = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
SIDE_PARTS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
FUSION_PARTS = ("prompts", "layer_norm.weight", "layer_norm.bias", "prompt_proj.weight", "prompt_proj.bias",
                "out_proj.weight", "out_proj.bias")
LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
QKV = ("query", "key", "value")


def _read(source: Union[str, Path, Mapping[str, Tensor]]) -> Dict[str, Tensor]:
    """The official state_dict of a mapping or a file (read_weights_file: a file that is not one of
    weights is a ValueError naming it), unwrapped from a "state_dict" entry where it has one."""
    if isinstance(source, Mapping):
        return dict(source)
    state = read_weights_file(source, "official checkpoint")
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def convert_official_state_dict(official: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The official FineGrainedPromptTuning state_dict as fpt_fast.FPT trainable keys
    (fusion.*, side.*). ValueError naming the keys it does not know."""
    converted: Dict[str, Tensor] = {}
    qkv: Dict[tuple, Tensor] = {}
    unknown = []
    for raw_key, value in official.items():
        key = raw_key[len("module."):] if raw_key.startswith("module.") else raw_key
        if key.startswith("fusion_module."):
            part = key[len("fusion_module."):]
            if part not in FUSION_PARTS:
                unknown.append(raw_key)
            else:
                converted[f"fusion.{part}"] = value
            continue
        if not key.startswith("side_encoder."):
            unknown.append(raw_key)
            continue
        part = key[len("side_encoder."):]
        part = part[len("vit."):] if part.startswith("vit.") else part
        if part in SIDE_PARTS:
            converted[f"side.{SIDE_PARTS[part]}"] = value
            continue
        match = LAYER_KEY.match(part)
        if match is None:
            unknown.append(raw_key)
            continue
        layer, module, kind = int(match.group(1)), match.group(2), match.group(3)
        if module.startswith("attention.attention.") and module.split(".")[-1] in QKV:
            qkv[(layer, module.split(".")[-1], kind)] = value
        elif module in LAYER_PARTS:
            converted[f"side.blocks.{layer}.{LAYER_PARTS[module]}.{kind}"] = value
        else:
            unknown.append(raw_key)
    if unknown:
        raise ValueError(f"official checkpoint has keys this loader does not know: {sorted(unknown)[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''} (expected side_encoder.* and fusion_module.* of "
                         f"the official FineGrainedPromptTuning; see fpt_fast.model.official)")
    for layer, _, kind in sorted({(l, None, k) for l, _, k in qkv}):
        parts = [qkv.get((layer, name, kind)) for name in QKV]
        if any(p is None for p in parts):
            missing = [name for name, p in zip(QKV, parts) if p is None]
            raise ValueError(f"official checkpoint: layer {layer} lacks attention.attention.{missing}.{kind}")
        # timm's fused qkv Linear stacks the q, k and v projections along the output rows.
        converted[f"side.blocks.{layer}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return converted


def load_official_checkpoint(source: Union[str, Path, Mapping[str, Tensor]], config: FPTConfig,
                             layer_norm_eps: Optional[float] = HF_LAYER_NORM_EPS) -> FPT:
    """An fpt_fast.FPT holding the weights of an official FPT / FPT+ checkpoint.

    Args:
        source: path of the official state_dict (.pth/.pt via torch.load(weights_only=True), or
            .safetensors), or the state_dict itself.
        config: the FPTConfig matching the official run (preset, backbone, num_classes, sizes);
            the frozen backbone is built from it. The presets resample its position embeddings by
            the official rule and give it the official LayerNorm eps, as the official model did.
        layer_norm_eps: eps given to the side network's LayerNorms (HuggingFace ViT: 1e-12);
            None keeps timm's 1e-6.

    Returns the model in eval mode. ValueError naming keys or shapes that do not fit.
    """
    converted = convert_official_state_dict(_read(source))
    model = FPT(config)
    pos_key = "side.pos_embed"
    theirs, ours = converted.get(pos_key), model.side.pos_embed
    if theirs is not None and theirs.shape != ours.shape and theirs.shape[-1] == ours.shape[-1]:
        from timm.layers import resample_abs_pos_embed  # same width, another grid: resample

        grid = model.side.patch_embed.grid_size
        warnings.warn(f"official side position embeddings {tuple(theirs.shape)} resampled to the side grid "
                      f"{tuple(grid)}: logits match the official ones only approximately", stacklevel=2)
        converted[pos_key] = resample_abs_pos_embed(theirs, list(grid), num_prefix_tokens=1)
    try:
        model.load_trainable_state_dict(converted)
    except ValueError as e:
        raise ValueError(f"official checkpoint does not fit this FPTConfig ({e}); check the preset "
                         f"(prompt_norm / prompt_proj), the number of layers and num_classes") from None
    if layer_norm_eps is not None:
        for module in model.side.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = layer_norm_eps
    return model.eval()


def official_state_dict(model: FPT, vit_prefix: bool = True) -> Dict[str, Tensor]:
    """The inverse mapping: an fpt_fast.FPT's learnable weights in the official layout (q/k/v
    split from timm's fused qkv), e.g. for the official evaluation code."""
    side = "side_encoder.vit." if vit_prefix else "side_encoder."
    out: Dict[str, Tensor] = {}
    inverse_side = {ours: theirs for theirs, ours in SIDE_PARTS.items()}
    inverse_layer = {ours: theirs for theirs, ours in LAYER_PARTS.items()}
    for name, value in model.trainable_state_dict().items():
        part, key = name.split(".", 1)  # "fusion" or "side", then the key inside that module
        if part == "fusion":
            out[f"fusion_module.{key}"] = value.clone()
            continue
        if key in inverse_side:
            theirs = inverse_side[key]
            prefix = "side_encoder." if theirs.startswith("classifier.") else side
            out[prefix + theirs] = value.clone()
            continue
        match = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if match is None:
            raise ValueError(f"official_state_dict: no official name for side network key {key!r}")
        layer, module, kind = match.groups()
        base = f"{side}encoder.layer.{layer}."
        if module == "attn.qkv":
            for projection, chunk in zip(QKV, value.chunk(3, dim=0)):
                out[f"{base}attention.attention.{projection}.{kind}"] = chunk.clone()
        else:
            out[f"{base}{inverse_layer[module]}.{kind}"] = value.clone()
    return out
