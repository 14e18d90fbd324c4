"""Checkpoints of training runs: their format, writing and reading, and what they are checked against.

A checkpoint is a dict of tensors and plain containers (read with torch.load(weights_only=True)):

    kind "fpt_fast.checkpoint", format 1
    settings          the run's settings (Settings.to_dict(), mean/std and num_classes resolved)
    classes           class names, in label order
    model             FPT.trainable_state_dict(): "fusion.*" and "side.*" (the frozen backbone is
                      rebuilt from the settings)
    backbone_sha256   hash of the frozen backbone's weights (checked before the weights are used)
    epoch, best_metric, best_epoch, history, learnable_share, world_size
    last.pt also:     optimizer, scheduler, rng (rank 0's RNG state) and, with several processes,
                      rng_ranks (every process's), for an exact resume

Files are written atomically (fpt_fast.app.files): a checkpoint is either the old one or the new one.
Training never writes a checkpoint with non-finite weights, and load_checkpoint refuses one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from ..model import FPT
from .build import build_model
from .files import atomic_open, read_torch_file
from .settings import Settings, upgrade_saved_settings
from .store import weights_sha256

KIND = "fpt_fast.checkpoint"
FORMAT = 1
# Settings that may change between a run and its resumption without changing its results.
RESUMABLE_CHANGES = {("train", "epochs"), ("train", "progress"), ("train", "tensorboard"),
                     ("data", "num_workers")}


def new_checkpoint(settings: Settings, classes, model: FPT, **fields) -> dict:
    """A checkpoint of model (its trainable state) trained with settings on classes; fields: the
    other entries (see the module's docstring)."""
    return {"kind": KIND, "format": FORMAT, "settings": settings.to_dict(), "classes": list(classes),
            "model": model.trainable_state_dict(), **fields}


def save_checkpoint(path: Union[str, Path], checkpoint: dict) -> None:
    """torch.save, atomically."""
    with atomic_open(path) as f:
        torch.save(checkpoint, f)


def first_non_finite(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """"name (n NaN, m inf of k values)" of the first floating tensor of state (in its order)
    holding a NaN or an infinity; None when all are finite."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nan = int(torch.isnan(tensor).sum())
            return f"{name} ({nan} NaN, {int(torch.isinf(tensor).sum())} inf of {tensor.numel()} values)"
    return None


def load_checkpoint(path: Union[str, Path]) -> dict:
    """A checkpoint written by fpt_fast. FileNotFoundError, or ValueError naming the file when it
    cannot be read, is not an fpt_fast checkpoint, has another format or non-finite weights."""
    path = Path(path)
    checkpoint = read_torch_file(path, "checkpoint")
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != KIND:
        raise ValueError(f"{str(path)!r} is not an fpt_fast checkpoint (for weights of the official FPT "
                         f"code use fpt_fast.load_official_checkpoint)")
    if checkpoint.get("format") != FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} has format {checkpoint.get('format')!r}; this version reads "
                         f"format {FORMAT}")
    bad = first_non_finite(checkpoint["model"])
    if bad is not None:
        raise ValueError(f"checkpoint {str(path)!r} holds non-finite weights (first: {bad}): the run that wrote "
                         f"it diverged; use a checkpoint of an earlier epoch, or train again with a lower "
                         f"train.lr or with train.clip_grad_norm set")
    checkpoint["settings"] = upgrade_saved_settings(checkpoint["settings"])
    return checkpoint


def is_side_only(checkpoint: dict) -> bool:
    """Whether the checkpoint's model is the side network alone (its training decides, not the caller)."""
    return bool(checkpoint["settings"]["train"]["side_only"])


def model_from_checkpoint(checkpoint: dict, settings: Settings) -> FPT:
    """The FPT of settings with the checkpoint's weights. ValueError when the weights do not fit
    the model of the settings, or when the frozen backbone differs from the one the checkpoint
    was trained with (unless it is a side-network-alone model, which never runs the backbone)."""
    model = build_model(settings, len(checkpoint["classes"]))
    try:
        model.load_trainable_state_dict(checkpoint["model"])
    except ValueError as e:
        raise ValueError(f"the checkpoint does not fit the model of its settings ({e})") from None
    trained_with = checkpoint.get("backbone_sha256")
    if not is_side_only(checkpoint) and trained_with is not None:
        digest = weights_sha256(model.frozen.backbone)
        if digest != trained_with:
            raise ValueError(f"the frozen backbone differs from the one this checkpoint was trained with "
                             f"(weights sha256 {digest[:12]}... vs {trained_with[:12]}...): check "
                             f"model.backbone, model.pretrained, model.checkpoint_path, train.seed, and the "
                             f"position embeddings (model.pos_embed_resampling, model.image_size)")
    return model


def with_checkpoint_normalization(settings: Settings, checkpoint: dict) -> Settings:
    """settings whose "auto" data.mean / data.std are the checkpoint's run's numbers."""
    data, stored = settings.data, Settings.from_tree(checkpoint["settings"]).data
    if "auto" not in (data.mean, data.std):
        return settings
    return settings.replace("data", mean=stored.mean if data.mean == "auto" else data.mean,
                            std=stored.std if data.std == "auto" else data.std)


def check_resumable(checkpoint: dict, settings: Settings, classes, world_size: int) -> None:
    """ValueError naming what differs between the interrupted run of checkpoint (last.pt) and
    this one: settings (but RESUMABLE_CHANGES), classes, or the number of processes."""
    now, before = _comparable(settings.to_dict()), _comparable(checkpoint["settings"])
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if changed:
        raise ValueError("cannot resume: settings differ from the interrupted run's: " + "; ".join(
            f"{s}.{k}: {before.get((s, k))!r} then, {now.get((s, k))!r} now" for s, k in changed))
    if checkpoint["classes"] != list(classes):
        raise ValueError(f"cannot resume: classes are {list(classes)} now, {checkpoint['classes']} then")
    then = checkpoint.get("world_size", 1)
    if then != world_size:
        batch = settings.train.batch_size
        raise ValueError(f"cannot resume: the interrupted run had {then} process(es) (global batch "
                         f"{then * batch}), this one has {world_size} (global batch {world_size * batch}); "
                         f"start it with the same number of processes (torchrun --nnodes x --nproc_per_node)")


def _comparable(settings_tree: dict) -> dict:
    return {(s, k): v for s, values in settings_tree.items() for k, v in values.items()
            if (s, k) not in RESUMABLE_CHANGES}
