"""The frozen backbone before it has weights: what its name stands for, its constructor arguments,
whether fpt_fast can read its attention, and its shape (read on the meta device: no memory, no
weights, no network for local names).

Names (FPTConfig.backbone), resolved through timm's own functions:
- a timm architecture, optionally with a pretrained tag: "vit_large_patch14_dinov2.lvd142m";
- "hf-hub:org/name[@revision]": a Hugging Face Hub repository holding a timm config.json and weights;
- "local-dir:/path/to/folder": a folder holding config.json and a weights file, as timm writes them
  (model.safetensors, pytorch_model.bin, ...).
A hub name's config.json is read from the local Hugging Face cache when it is there (no network).
When it is not, and the hub is not to be used (HF_HUB_OFFLINE set) or cannot be reached within
HUB_TIMEOUT_S, the name fails at once (huggingface_hub would otherwise retry for about half a
minute) with a message saying how to load the model from local files. The same holds for
pretrained weights fetched from the hub (hub_weights_file).

Constructor arguments (FPTConfig.backbone_kwargs) are JSON values, so that the config, the feature
store's manifest and checkpoints hold them as written. The arguments timm takes as classes
(LAYER_ARGUMENTS: act_layer, norm_layer, mlp_layer, ...) are spelled as names and resolved when the
model is built (resolve_backbone_kwargs): timm's activation / norm names ("silu", "layernorm"), a
class or factory of timm.layers ("SwiGLUPacked", "GluMlp"), or a dotted path "package.module.Name"
(imported).

Architectures (check_architecture): timm VisionTransformer and Eva models (DINOv3, EVA02, EVA) whose
blocks are pre-norm blocks with global multi-head self-attention: timm's vision_transformer.Block or
eva.EvaBlock around timm's Attention, AttentionRope or EvaAttention (fused or separate q/k/v
projections, q/k norms, rotary embeddings, layer scale as ls1/ls2 or gamma_1/gamma_2, any MLP),
with or without class token and register tokens. Other blocks are refused with a message naming
what they lack (windowed attention, relative position terms, post-norm, parallel branches,
grouped-query attention).
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import socket
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

import torch
from torch import nn

# Seconds a hub name may spend finding out that the hub cannot be reached.
HUB_TIMEOUT_S = 3.0
# Constructor arguments timm takes as classes or factories, spelled as names in backbone_kwargs.
LAYER_ARGUMENTS = ("act_layer", "norm_layer", "embed_norm_layer", "mlp_layer", "block_fn", "embed_layer")
# Weight files of a hub repository, in the order timm's hub loader looks for them.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class BackboneSource:
    """What a backbone name stands for. architecture: the timm registry name to build (with its
    pretrained tag for registry names); model_args: the constructor arguments of the name's
    config.json (hub and local-dir names; user arguments override them); kind: "timm", "hf-hub" or
    "local-dir"; location: the hub repository id (with @revision) or the folder; weight_files: the
    names of a hub repository's weights file, in the order they are looked for."""

    name: str
    architecture: str
    kind: str
    location: str = ""
    model_args: Dict[str, Any] = field(default_factory=dict, compare=False)
    weight_files: Tuple[str, ...] = HUB_WEIGHT_FILES


def _offline_hint(repo: str) -> str:
    return (f"load it from local files instead: download the repository once where the hub can be reached "
            f"(`huggingface-cli download {repo}`) and name the folder as backbone 'local-dir:/path/to/folder' "
            f"(its config.json and weights), or name its timm architecture (the \"architecture\" of its "
            f"config.json) with checkpoint_path set to the weights file")


def hub_offline() -> bool:
    """True when the Hugging Face hub is not to be used (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(str(f).strip().lower() in ("1", "true", "yes", "on")
                                                 for f in flags if f)


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub's endpoint (or the HTTPS proxy in the environment)
    opens within timeout seconds: one quick try, no retries."""
    from huggingface_hub import constants

    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), None)
    target = urlsplit(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else constants.ENDPOINT)
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((target.hostname, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def hub_file(name: str, repo: str, filenames: Tuple[str, ...], what: str) -> str:
    """Local path of the first of filenames of hub repository repo ("org/name[@revision]"): from the
    Hugging Face cache, else downloaded. A ValueError naming the model, fast, when it is not cached
    and the hub is offline or unreachable, or when the repository has none of the files."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    revision = revision or None
    for filename in filenames:
        cached = try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(cached, str):
            return cached
    if hub_offline():
        why = "is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE)"
    elif not hub_reachable():
        why = f"is not in the local Hugging Face cache and the hub cannot be reached (within {HUB_TIMEOUT_S:g} s)"
    else:
        errors = []
        for filename in filenames:
            try:
                return hf_hub_download(repo_id, filename, revision=revision, etag_timeout=HUB_TIMEOUT_S)
            except Exception as error:  # EntryNotFound, RepositoryNotFound, HTTP errors: say which
                errors.append(f"{filename}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        why = f"could not be downloaded ({'; '.join(errors)})"
    raise ValueError(f"FPTConfig.backbone={name!r}: the {what} of hub model {repo!r} {why}; "
                     + _offline_hint(repo_id))


@functools.lru_cache(maxsize=64)
def resolve_backbone_name(name: str) -> BackboneSource:
    """The BackboneSource of a backbone name (see the module docstring). ValueError naming the
    name: not a timm model, an unknown pretrained tag, a folder without config.json, a hub model
    that cannot be read."""
    import timm
    from timm.models import parse_model_name, split_model_name_tag
    from timm.models._hub import load_model_config_from_path

    try:
        kind, model_id = parse_model_name(name)
    except (ValueError, AssertionError) as error:
        raise ValueError(f"FPTConfig.backbone={name!r}: {error}") from None
    if kind is None:
        architecture, tag = split_model_name_tag(model_id)
        if not timm.is_model(architecture):
            raise ValueError(f"FPTConfig.backbone={name!r}: unknown timm model {architecture!r}; expected a timm "
                             f"VisionTransformer or Eva name such as 'vit_base_patch16_384' (timm.list_models"
                             f"('vit_*')), 'hf-hub:org/name' or 'local-dir:/path/to/folder'")
        if tag and model_id not in timm.list_pretrained(f"{architecture}.*"):
            raise ValueError(f"FPTConfig.backbone={name!r}: timm has no pretrained tag {tag!r} for {architecture!r} "
                             f"(it has {timm.list_pretrained(f'{architecture}.*') or 'none'})")
        return BackboneSource(name, model_id, "timm")
    if kind == "local-dir":
        folder = model_id
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(f"FPTConfig.backbone={name!r}: {folder!r} is not a folder holding config.json (a timm "
                             f"model folder: config.json and a weights file)")
    else:
        folder = os.path.dirname(hub_file(name, model_id, ("config.json",), "config.json"))
    try:
        pretrained_cfg, architecture, model_args = load_model_config_from_path(folder)
    except (KeyError, ValueError, OSError) as error:
        raise ValueError(f"FPTConfig.backbone={name!r}: its config.json is not a timm model config "
                         f"({type(error).__name__}: {error})") from None
    if not timm.is_model(architecture):
        raise ValueError(f"FPTConfig.backbone={name!r}: its config.json names architecture {architecture!r}, "
                         f"which this timm ({timm.__version__}) does not know")
    weight_files = (pretrained_cfg["hf_hub_filename"],) if pretrained_cfg.get("hf_hub_filename") else HUB_WEIGHT_FILES
    return BackboneSource(name, architecture, kind, model_id, dict(model_args or {}), weight_files)


# ---------------------------------------------------------------------------- constructor arguments
def _is_json_value(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_json_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json_value(v) for k, v in value.items())
    return False


def check_backbone_kwargs(kwargs: dict) -> None:
    """ValueError naming the first argument that is not a JSON value (classes are spelled as names)
    or whose layer name does not resolve."""
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise ValueError(f"FPTConfig.backbone_kwargs: key {key!r} is not a string")
        if not _is_json_value(value):
            raise ValueError(f"FPTConfig.backbone_kwargs[{key!r}]={value!r} is not a JSON value: spell classes by "
                             f"name ('SwiGLUPacked', 'silu', 'package.module.Name') so that the config, the feature "
                             f"store and checkpoints can hold it")
    resolve_backbone_kwargs(kwargs)


def resolve_backbone_kwargs(kwargs: dict) -> dict:
    """backbone_kwargs with the LAYER_ARGUMENTS given as names replaced by what they name, for
    timm.create_model. ValueError naming the key for a name that does not resolve."""
    return {key: _resolve_layer(key, value) if key in LAYER_ARGUMENTS and isinstance(value, str) else value
            for key, value in kwargs.items()}


def _resolve_layer(key: str, spelling: str):
    import timm.layers

    expected = (f"FPTConfig.backbone_kwargs[{key!r}]={spelling!r} does not name a layer: expected a timm "
                f"{'activation name such as silu or gelu' if key == 'act_layer' else 'norm name such as layernorm or rmsnorm' if 'norm' in key else 'layer such as SwiGLUPacked, GluMlp or Mlp'}"
                f", a class of timm.layers, or a dotted path 'package.module.Name'")
    if "." in spelling:
        module_name, _, attribute = spelling.rpartition(".")
        try:
            resolved = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"{expected} ({type(error).__name__}: {error})") from None
    elif key == "act_layer" or key.endswith("norm_layer"):
        getter = timm.layers.get_act_layer if key == "act_layer" else timm.layers.get_norm_layer
        try:
            resolved = getter(spelling)
        except (KeyError, ValueError, AssertionError):
            resolved = getattr(timm.layers, spelling, None)
    else:
        resolved = getattr(timm.layers, spelling, None)
    if not callable(resolved):
        raise ValueError(expected)
    return resolved


# ------------------------------------------------------------------------------------- building
def create_timm_model(name: str, backbone_kwargs: dict, pretrained: bool = False, **extra) -> nn.Module:
    """The timm model of a backbone name: its architecture, built with the name's config.json
    arguments, then backbone_kwargs (resolved), then extra (e.g. img_size, num_classes). Without
    weights, unless pretrained (timm then loads its published weights itself, strictly: for weights
    only timm can fetch, see backbone_weights.published_weights). Build it under
    torch.device("meta") for a shape-only probe."""
    import timm

    source = resolve_backbone_name(name)
    kwargs = {**source.model_args, **resolve_backbone_kwargs(backbone_kwargs), **extra}
    if not pretrained:
        return timm.create_model(source.architecture, pretrained=False, **kwargs)
    try:
        return timm.create_model(source.architecture, pretrained=True, **kwargs)
    except RuntimeError as error:  # load_state_dict's missing / unexpected / mismatched weights
        raise ValueError(f"FPTConfig.backbone={name!r}: timm's pretrained weights do not fit the backbone with "
                         f"backbone_kwargs={backbone_kwargs!r}: {error}") from None


# -------------------------------------------------------------------------------- architecture
def _block_types():
    from timm.layers import Attention, AttentionRope
    from timm.models.eva import EvaAttention, EvaBlock
    from timm.models.vision_transformer import Block

    return (Block, EvaBlock), (Attention, AttentionRope, EvaAttention)


def _what_it_lacks(block: nn.Module) -> List[str]:
    """What a block lacks for fpt_fast to read its attention, in words (empty: nothing)."""
    blocks, attentions = _block_types()
    attn = getattr(block, "attn", None)
    reasons = []
    if getattr(block, "window_size", 0):
        reasons.append(f"global self-attention (it attends within windows of {block.window_size} x "
                       f"{block.window_size} tokens)")
    if getattr(attn, "use_rel_pos", False):
        reasons.append("plain attention logits (it adds relative-position terms to them)")
    if type(block) not in blocks:
        reasons.append(f"the pre-norm block fpt_fast reads, timm's VisionTransformer Block or Eva EvaBlock (it is "
                       f"{type(block).__module__}.{type(block).__name__})")
    elif type(attn) not in attentions:
        reasons.append(f"the multi-head self-attention fpt_fast reads, timm's Attention, AttentionRope or "
                       f"EvaAttention (it has {type(attn).__module__}.{type(attn).__name__})")
    elif getattr(attn, "num_kv_heads", attn.num_heads) != attn.num_heads:
        reasons.append(f"one key/value head per query head (it has grouped-query attention: "
                       f"{attn.num_kv_heads} key/value heads for {attn.num_heads} heads)")
    return reasons


def check_architecture(model: nn.Module, name: str) -> None:
    """ValueError naming what the model (any device, meta included) lacks for fpt_fast to read the
    keys of its blocks; nothing when it is supported (see the module docstring)."""
    for i, block in enumerate(getattr(model, "blocks", ())):
        reasons = _what_it_lacks(block)
        if reasons:
            raise ValueError(f"FPTConfig.backbone={name!r} ({type(model).__name__}) is not supported: block {i} "
                             f"lacks " + "; and ".join(reasons))
    missing = [a for a in ("patch_embed", "blocks", "embed_dim", "num_prefix_tokens", "_pos_embed")
               if not hasattr(model, a)]
    if missing:
        raise ValueError(f"FPTConfig.backbone={name!r} ({type(model).__name__}) is not a timm VisionTransformer or "
                         f"Eva model: it lacks {missing}")
    attn = model.blocks[0].attn
    if attn.num_heads * attn.head_dim != model.embed_dim:
        raise ValueError(f"FPTConfig.backbone={name!r} is not supported: its attention width "
                         f"{attn.num_heads} x {attn.head_dim} differs from its embedding width {model.embed_dim} "
                         f"(the prompts attend to keys of the embedding width)")


# -------------------------------------------------------------------------------------- shape
@dataclass(frozen=True)
class BackboneInfo:
    """What FPT needs to know of a backbone, read without loading weights.

    embed_dim D, num_heads H, head_dim d (H * d == D), depth, patch_size (ph, pw),
    num_prefix_tokens (class token + register tokens, before the patches), has_class_token,
    num_register_tokens, rotary (rotary position embeddings in the attention), abs_pos_embed
    (absolute position embeddings added to the tokens; Eva models may have both), stored_grid (the
    patch grid the model is built at by default), mlp_width (the widths of an MLP's inner
    activations together), num_parameters, architecture (timm class name).
    """

    name: str
    architecture: str
    embed_dim: int
    num_heads: int
    head_dim: int
    depth: int
    patch_size: Tuple[int, int]
    num_prefix_tokens: int
    has_class_token: bool
    num_register_tokens: int
    rotary: bool
    abs_pos_embed: bool
    stored_grid: Tuple[int, int]
    mlp_width: int
    num_parameters: int


def read_backbone_info(name: str, backbone_kwargs: Optional[dict] = None) -> BackboneInfo:
    """Builds the named model on the meta device (no memory, no weights), checks its architecture
    (check_architecture) and reads its shape. ValueError naming what is wrong."""
    if not isinstance(name, str):
        raise ValueError(f"FPTConfig.backbone={name!r} is invalid: expected a timm model name, 'hf-hub:org/name' "
                         f"or 'local-dir:/path'")
    kwargs = dict(backbone_kwargs or {})
    check_backbone_kwargs(kwargs)
    return _read_backbone_info(name, json.dumps(kwargs, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _read_backbone_info(name: str, kwargs_json: str) -> BackboneInfo:
    kwargs = json.loads(kwargs_json)
    try:
        with torch.device("meta"):
            model = create_timm_model(name, kwargs, num_classes=0)
    except (TypeError, AssertionError, KeyError) as error:
        numbers_as_text = [k for k, v in kwargs.items() if isinstance(v, str) and _looks_numeric(v)]
        hint = (f" (YAML reads numbers such as 1e-5 as text: write 1.0e-5 for {numbers_as_text})"
                if numbers_as_text else "")
        raise ValueError(f"FPTConfig.backbone_kwargs={kwargs!r} are not accepted by {name!r}: "
                         f"{_failure(error)}{hint}") from None
    check_architecture(model, name)
    block = model.blocks[0]
    patch = model.patch_embed.patch_size
    linears = [m for m in block.mlp.modules() if isinstance(m, nn.Linear)]
    reg_token = getattr(model, "reg_token", None)  # (1, registers, D), or None without registers
    return BackboneInfo(
        name=name,
        architecture=type(model).__name__,
        embed_dim=int(model.embed_dim),
        num_heads=int(block.attn.num_heads),
        head_dim=int(block.attn.head_dim),
        depth=len(model.blocks),
        patch_size=(int(patch[0]), int(patch[1])),
        num_prefix_tokens=int(model.num_prefix_tokens),
        has_class_token=getattr(model, "cls_token", None) is not None,
        num_register_tokens=0 if reg_token is None else int(reg_token.shape[1]),
        rotary=getattr(model, "rope", None) is not None,
        abs_pos_embed=getattr(model, "pos_embed", None) is not None,
        stored_grid=tuple(int(g) for g in model.patch_embed.grid_size),
        mlp_width=sum(int(m.out_features) for m in linears[:-1]),
        num_parameters=sum(p.numel() for p in model.parameters()),
    )


def _failure(error: BaseException) -> str:
    """An exception in words; a bare assert of timm's is shown by its failing line."""
    if str(error).strip():
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__} at {os.path.basename(frame.filename)}:{frame.lineno}: {frame.line}"


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
