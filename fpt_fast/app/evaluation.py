"""Evaluation and prediction with a checkpoint, and the forward of a collated batch that training
shares: side input, features (read from the store, computed by the frozen branch, or none for the
side network alone) and logits."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..model import FPT, FrozenFeatures
from .build import check_store, frozen_transform, place_model
from .checkpoints import is_side_only, load_checkpoint, model_from_checkpoint
from .console import Log, Progress
from .data import (BadImages, FPTDataset, ImageFolderSplit, ImageList, describe_left_out, list_images, make_loader,
                   side_transform)
from .distributed import local_device
from .explain import ExplanationWriter, check_explainable, explain_batches
from .files import (DiskFullError, atomic_write_csv, atomic_write_json, check_new_file, make_folder,
                    remove_stale_temporaries)
from .metrics import METRIC_ORDER, classification_metrics, pme, ppe
from .settings import Settings
from .store import FeatureStore, features_from_records


# ------------------------------------------------------------------------------ one batch
def batch_inputs(model: FPT, batch: dict, device: torch.device, side_only: bool
                 ) -> Tuple[Tensor, Optional[FrozenFeatures]]:
    """(side input (B, 3, h, w), features) of a collated batch on device. The features, each
    (L, B, H, n, d), are read from the store ("keys"/"values"), or computed by the frozen branch
    (from "frozen"), or None with side_only (the side network alone)."""
    side = batch["side"].to(device, non_blocking=True)
    if side_only:
        return side, None
    if "keys" in batch:  # the fusion casts them to its dtype
        return side, features_from_records(batch["keys"].to(device, non_blocking=True),
                                           batch["values"].to(device, non_blocking=True))
    return side, model.extract(batch["frozen"].to(device, non_blocking=True))


def batch_logits(model: FPT, batch: dict, device: torch.device, side_only: bool, autocast: bool,
                 trainable_module: Optional[nn.Module] = None) -> Tensor:
    """Logits (B, C) float32 of a collated batch. trainable_module: what runs the learnable part
    (default model.trainable_module(side_only); in training, its DistributedDataParallel wrapper)."""
    module = trainable_module if trainable_module is not None else model.trainable_module(side_only)
    side, features = batch_inputs(model, batch, device, side_only)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = module(side) if features is None else module(side, features)
    return logits.float()


@torch.no_grad()
def predict_probabilities(model: FPT, loader: DataLoader, device: torch.device, side_only: bool,
                          autocast: bool, bad_images: BadImages, progress: bool = False,
                          description: str = "eval", allow_empty: bool = False):
    """(positions (N,), labels (N,), probabilities (N, C) float64) over a loader, in eval mode.
    ValueError when no image was readable, unless allow_empty (then N may be 0)."""
    model.eval()
    module = model.trainable_module(side_only)
    positions, labels, probabilities = [], [], []
    bar = Progress(progress, description, total=len(loader))
    for batch in loader:
        bar.update()
        bad_images.handle(batch["bad"])
        if len(batch["label"]) == 0:
            continue
        probabilities.append(batch_logits(model, batch, device, side_only, autocast, module).softmax(-1).double().cpu())
        positions.append(batch["position"])
        labels.append(batch["label"])
    bar.close()
    if not probabilities:
        if not allow_empty:
            raise ValueError("no readable image to evaluate")
        num_classes = model.config.num_classes
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, num_classes), np.float64)
    return torch.cat(positions).numpy(), torch.cat(labels).numpy(), torch.cat(probabilities).numpy()


def describe_metrics(metrics: dict) -> str:
    return "  ".join(f"{m} {metrics[m]:.4f}" for m in METRIC_ORDER)


# ------------------------------------------------------------------------------ evaluate
@dataclass
class EvalResult:
    split: str
    metrics: dict
    classes: List[str]
    num_images: int
    learnable_share: float
    bad_images: List[str] = field(default_factory=list)


def evaluate(settings: Settings, checkpoint_path: Union[str, Path], split_name: str = "test",
             log: Log = print) -> EvalResult:
    """Metrics and confusion matrix of a checkpoint on one split (features from data.store when it
    holds the split, else computed by the frozen branch). Writes eval_<split>.json beside the
    checkpoint."""
    checkpoint = load_checkpoint(checkpoint_path)
    data, opts = settings.data, settings.train
    if data.root is None:
        raise ValueError("setting data.root is not set: the folder with the split to evaluate")
    if "auto" in (data.mean, data.std):
        raise ValueError("data.mean/data.std must be numbers for evaluation (the checkpoint's settings hold them)")
    device = local_device(opts.device)
    classes = checkpoint["classes"]
    split = ImageFolderSplit(data.root, split_name, classes)
    model = model_from_checkpoint(checkpoint, settings)
    side_only = is_side_only(checkpoint)
    transform = frozen_transform(settings, model)
    split_store = None
    if data.store is not None and not side_only:
        # model_from_checkpoint checked the backbone against the hash the checkpoint records
        store = check_store(FeatureStore(data.store), settings, model, checkpoint.get("backbone_sha256"))
        if split_name in store.splits():
            split_store = store.split(split_name, [(s.path, s.label) for s in split.samples])
    features_online = not side_only and split_store is None
    side = side_transform(data, model.config.side_input_size, train=False)
    dataset = FPTDataset(split, side, transform if features_online else None, split_store)
    place_model(model, device, features_online)
    bad_images = BadImages(data.skip_bad_images)
    if split_store is not None:
        bad_images.note(split_store.left_out_messages())
    loader = make_loader(dataset, opts.eval_batch_size, data.num_workers, device)
    _, labels, probabilities = predict_probabilities(model, loader, device, side_only,
                                                     opts.amp and device.type == "cuda", bad_images, opts.progress,
                                                     f"evaluate {split_name}")
    metrics = classification_metrics(labels, probabilities)
    learnable_share = checkpoint.get("learnable_share", model.learnable_share(side_only))
    metrics["ppe_auc"] = ppe(metrics["auc"], learnable_share) if not math.isnan(metrics["auc"]) else math.nan
    if opts.reference_memory_mb is not None and checkpoint["history"]:
        memory = max(row["memory_mb"] for row in checkpoint["history"])
        metrics["pme_auc"] = pme(metrics["auc"], memory, opts.reference_memory_mb)
    result = EvalResult(split_name, metrics, classes, len(labels), learnable_share, bad_images.messages)
    atomic_write_json(Path(checkpoint_path).parent / f"eval_{split_name}.json",
                      {"split": split_name, "checkpoint": str(checkpoint_path), "classes": classes,
                       "num_images": len(labels), "metrics": metrics, "bad_images": bad_images.messages})
    log(format_evaluation(result))
    return result


def format_evaluation(result: EvalResult) -> str:
    lines = [f"{result.split}: {result.num_images} images  " + describe_metrics(result.metrics)]
    if "ppe_auc" in result.metrics:
        lines[0] += f"  PPE(auc) {result.metrics['ppe_auc']:.4f}"
    if "pme_auc" in result.metrics:
        lines[0] += f"  PME(auc) {result.metrics['pme_auc']:.4f}"
    width = max(len(c) for c in result.classes)
    lines.append("confusion matrix (rows: true class, columns: predicted):")
    lines.append(" " * (width + 2) + " ".join(f"{i:>6d}" for i in range(len(result.classes))))
    for i, (name, row) in enumerate(zip(result.classes, result.metrics["confusion"])):
        lines.append(f"{name:>{width}} {i:d} " + " ".join(f"{v:>6d}" for v in row))
    if result.bad_images:
        lines.append(describe_left_out(result.bad_images))
    return "\n".join(lines)


# ------------------------------------------------------------------------------- predict
def predict(settings: Settings, checkpoint_path: Union[str, Path], images: Union[str, Path],
            output: Union[str, Path], log: Log = print, overwrite: bool = False,
            explain_dir: Optional[Union[str, Path]] = None) -> List[dict]:
    """Per-image predictions of a checkpoint for every image under a folder, written as CSV
    (path, prediction, confidence, one probability column per class). explain_dir: also write each
    image's explanation figure and maps there, from the same pass (fpt_fast.app.explain).

    output (and explain_dir's files) are checked before anything runs: an existing file is replaced
    only with overwrite, and a path inside the images folder is refused (predictions are never
    written among the input images, whatever the file's name)."""
    output = check_output(output, images, overwrite)
    checkpoint = load_checkpoint(checkpoint_path)
    data, opts = settings.data, settings.train
    device = local_device(opts.device)
    classes = checkpoint["classes"]
    paths = list_images(images)
    if not paths:
        raise ValueError(f"no image files under {str(images)!r}")
    model = model_from_checkpoint(checkpoint, settings)
    side_only = is_side_only(checkpoint)
    side = side_transform(data, model.config.side_input_size, train=False)
    image_list = ImageList(images, paths)
    writer = None
    if explain_dir is not None:
        check_explainable(checkpoint, checkpoint_path)
        writer = ExplanationWriter(explain_dir, image_list, model.config, classes=classes, overwrite=overwrite)
    dataset = FPTDataset(image_list, side, None if side_only else frozen_transform(settings, model))
    place_model(model, device, features_online=not side_only)
    bad_images = BadImages(data.skip_bad_images)
    loader = make_loader(dataset, opts.eval_batch_size, data.num_workers, device)
    if writer is None:
        positions, _, probabilities = predict_probabilities(model, loader, device, side_only,
                                                            opts.amp and device.type == "cuda", bad_images,
                                                            opts.progress, "predict")
    else:
        positions, probabilities = explain_batches(model, loader, device, writer, settings, bad_images,
                                                   with_predictions=True)
    rows = []
    for position, probs in zip(positions, probabilities):
        best = int(np.argmax(probs))
        row = {"path": image_list.samples[position].path, "prediction": classes[best], "confidence": float(probs[best])}
        row.update({f"p_{name}": float(p) for name, p in zip(classes, probs)})
        rows.append(row)
    make_folder(output.parent, "the folder of --output")
    remove_stale_temporaries(output.parent, name=output.name)
    try:
        atomic_write_csv(output, rows, ["path", "prediction", "confidence"] + [f"p_{c}" for c in classes], ".6f")
    except DiskFullError as e:
        raise e.then("rerun predict") from None
    log(f"wrote predictions for {len(rows)} images to {output}")
    if writer is not None:
        log(f"wrote their explanation figures and maps to {explain_dir}")
    if bad_images.messages:
        log(bad_images.report())
    return rows


def check_output(output: Union[str, Path], images: Union[str, Path], overwrite: bool) -> Path:
    """The predictions file: outside the images folder, and checked by fpt_fast.app.files.check_new_file."""
    folder, target = Path(images).resolve(), Path(output).resolve()
    if target == folder or folder in target.parents:
        raise ValueError(f"--output {str(output)!r} is inside the images folder {str(images)!r}: predictions are "
                         f"never written among the input images; write them elsewhere")
    return check_new_file(output, overwrite, "--output")
