"""The frozen backbone's weights, from the files their authors publish.

A weights file (FPTConfig.checkpoint_path, the weights of a "local-dir:" folder or of a cached hub
model) goes through these steps, each in one place here:

1. read (read_weights_file): a .safetensors file, or a torch.save file read with weights_only=True
   (no Python objects are unpickled beyond tensors, plain containers and the argparse.Namespace of
   MAE's training arguments); anything else is a ValueError naming the file.
2. unwrap (backbone_state): the first of CONTAINERS holding a dict: "teacher" (DINOv2 training
   checkpoints), "model" (MAE / RETFound-MAE, DeiT), "state_dict" (Lightning), "module"; values
   that are not tensors (epoch, args) are left out.
3. the vision trunk (backbone_state): the keys that share the prefix of the one patch embedding
   ("<prefix>patch_embed.proj.weight"), with the prefix removed: "backbone." (DINOv2), "visual.trunk."
   (OpenCLIP models with a timm vision tower: CONCH, BiomedCLIP), "module." (DistributedDataParallel);
   keys outside it (a text tower, projection heads, the student) are left out. DINOv2's chunked
   blocks "blocks.<chunk>.<i>." (FSDP block chunks) become "blocks.<i>.".
4. the architecture's own timm checkpoint filter (checkpoint_filter_fn of the model's timm module:
   DINOv2, DINOv3, EVA and OpenAI CLIP layouts are converted there), then a strict comparison with
   the backbone FPT runs (load_backbone_weights: the model after its early exit, without the blocks
   after the last extracted one, the final norm and the head): weights it needs but the file lacks,
   weights of the file it does not have, and shapes that differ are a ValueError naming them.
   The file's weights of the dropped blocks and its UNUSED_PARTS are left out.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
import zipfile
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .backbones import HUB_WEIGHT_FILES, BackboneInfo, hub_file, resolve_backbone_name

CONTAINERS = ("teacher", "model", "state_dict", "module")
PATCH_EMBED = "patch_embed.proj.weight"
# Top-level parts of published checkpoints that no FPT forward runs: the MAE decoder and mask
# tokens of masked-image pretraining, classifier heads and the norms / pooling before them.
UNUSED_PARTS = ("decoder", "mask_token", "head.", "head_dist.", "fc_norm.", "norm.", "attn_pool.", "pre_logits.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")


def read_weights_file(path, what: str = "backbone weights file") -> Dict[str, object]:
    """The contents of a weights file: a dict (tensors, or containers of them). ValueError naming
    the file when it is not a safetensors file or a torch.save file of tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{what} {str(path)!r} cannot be read as a safetensors file: {error}") from None
    try:
        # MAE-style checkpoints (RETFound-MAE) keep their training arguments as an argparse.Namespace:
        # a plain attribute container, allowed; nothing else beyond tensors and containers is unpickled.
        allowed = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        with allowed([argparse.Namespace]) if allowed is not None else contextlib.nullcontext():
            contents = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # UnpicklingError, RuntimeError, EOFError...: not a file of weights
        first_line = str(error).strip().split("\n")[0][:200]
        raise ValueError(f"{what} {str(path)!r} cannot be read as a checkpoint of weights: it is neither a "
                         f"safetensors file nor a torch.save file of tensors and plain containers "
                         f"({type(error).__name__}: {first_line})") from None
    if not isinstance(contents, dict):
        raise ValueError(f"{what} {str(path)!r} holds a {type(contents).__name__}, not a dict of weights")
    return contents


def backbone_state(contents: Mapping, what: str = "backbone weights") -> Dict[str, Tensor]:
    """The vision trunk's tensors of a checkpoint's contents, keyed as timm names them before its
    architecture filter (steps 2 and 3 of the module docstring). ValueError when there is none."""
    state: Mapping = contents
    for container in CONTAINERS:
        if isinstance(state.get(container), Mapping):
            state = state[container]
            break
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{what}: no tensors found (top-level keys {sorted(map(str, contents))[:12]}; weights are "
                         f"read from the top level or from one of {CONTAINERS})")
    prefixes = sorted(k[:-len(PATCH_EMBED)] for k in tensors if k.endswith(PATCH_EMBED))
    if len(prefixes) > 1:
        teachers = [p for p in prefixes if p.startswith("teacher.")]
        if len(teachers) != 1:
            raise ValueError(f"{what}: several patch embeddings {[p + PATCH_EMBED for p in prefixes]}: which model "
                             f"is the backbone is ambiguous; save the backbone's weights alone")
        prefixes = teachers
    if prefixes and prefixes[0]:
        prefix = prefixes[0]
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in tensors.items()}


def published_weights(name: str) -> Tuple[Optional[Dict[str, Tensor]], str]:
    """The published weights of backbone name (FPTConfig.pretrained) as a backbone state, and where
    they come from (for messages): a "local-dir:" folder's weights file, a hub repository's (from
    the Hugging Face cache, else downloaded: backbones.hub_file, which fails fast offline), timm's
    pretrained weights of a registry name (on the hub likewise). (None, where) for timm weights
    published only at a URL: timm loads those itself."""
    import timm.models

    source = resolve_backbone_name(name)
    if source.kind == "local-dir":
        from timm.models._hub import load_state_dict_from_path

        what = f"the weights of folder {source.location!r}"
        try:
            contents = load_state_dict_from_path(source.location)
        except Exception as error:  # no weights file, or one torch cannot read: say which
            raise ValueError(f"FPTConfig.backbone={name!r}: {what} cannot be read ({type(error).__name__}: "
                             f"{error})") from None
        return backbone_state(contents, what), what
    if source.kind == "hf-hub":
        repo, files = source.location, source.weight_files
    else:
        cfg = timm.models.get_pretrained_cfg(source.architecture)
        if cfg is None:
            raise ValueError(f"FPTConfig.backbone={name!r}: timm has no pretrained weights for it (pretrained=True)")
        if not cfg.hf_hub_id:
            return None, f"timm's pretrained weights of {name!r} ({cfg.url})"
        repo, files = cfg.hf_hub_id, (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHT_FILES
    path = hub_file(name, repo, files, "weights")
    what = f"the weights of {name!r} ({path})"
    return backbone_state(read_weights_file(path, what), what), what


def stored_grid(state: Mapping[str, Tensor], info: BackboneInfo, image_grid: Tuple[int, int],
                what: str) -> Optional[Tuple[int, int]]:
    """The patch grid of the position embeddings in a backbone state (backbone_state) for the
    backbone described by info; None when the state has none (or the backbone has no absolute
    position embeddings). A grid fits when the stored tokens are its patches plus 0, 1 (a class
    token) or the backbone's prefix tokens; the candidates are its default grid (info.stored_grid),
    image_grid and the square grid. ValueError naming the file when none fits."""
    pos_embed = state.get("pos_embed")
    if pos_embed is None or pos_embed.dim() != 3 or not info.abs_pos_embed:
        return None
    tokens = int(pos_embed.shape[1])
    for extra in sorted({0, 1, info.num_prefix_tokens}):
        side = int(max(tokens - extra, 0) ** 0.5)
        for grid in (info.stored_grid, tuple(image_grid), (side, side)):
            if grid[0] * grid[1] == tokens - extra and grid[0] > 0:
                return grid
    raise ValueError(f"{what}: its position embeddings ({tokens} tokens) fit no patch grid of the backbone; set "
                     f"backbone_kwargs img_size to the input size the weights were trained at")


def _architecture_filter(state: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """timm's own checkpoint filter of the model's module, where it has one."""
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    return dict(convert(state, model)) if convert is not None else state


def load_backbone_weights(model: nn.Module, state: Dict[str, Tensor], what: str) -> None:
    """Loads a backbone state (backbone_state) into model, the backbone FPT runs (possibly pruned
    by prune_intermediate_layers), through timm's architecture filter. ValueError naming the
    missing weights, the unexpected ones and those whose shapes differ, before anything is loaded.
    Weights of blocks the pruned model no longer has, and UNUSED_PARTS, are left out."""
    converted = _architecture_filter(dict(state), model)
    wanted = model.state_dict()
    depth = len(model.blocks)

    def left_out(key: str) -> bool:
        block = _BLOCK_INDEX.match(key)
        return key.startswith(UNUSED_PARTS) or (block is not None and int(block.group(1)) >= depth)

    missing = [k for k in wanted if k not in converted]  # in the model's order: embeddings, then block by block
    unexpected = sorted(k for k in set(converted) - set(wanted) if not left_out(k))
    wrong = [f"{k}: file {tuple(converted[k].shape)}, model {tuple(v.shape)}"
             for k, v in wanted.items() if k in converted and converted[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing weights {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected weights {_listed(unexpected)}")
    if wrong:
        problems.append(f"shapes that differ: {_listed(wrong)}")
    if problems:
        raise ValueError(f"{what} does not fit the backbone ({type(model).__name__}): " + "; ".join(problems))
    model.load_state_dict({k: converted[k] for k in wanted}, strict=True)


def _listed(items: Iterable[str], limit: int = 12) -> str:
    items = list(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + "]" + more
