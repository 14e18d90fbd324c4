"""Training, evaluation and prediction of FPT / FPT+ from run settings (fpt_fast.app.settings).

Training (docs/method.md, section 6): AdamW, linear warm-up then cosine decay (per step), gradient-norm
clipping, optional class weights, bf16 autocast on CUDA, cross-entropy; validation metrics every
epoch; best.pt keeps the epoch with the best validation ``train.selection_metric`` (AUC by
default), last.pt everything needed to resume (weights, optimizer, scheduler, epoch, RNG state,
best metric, history). Features come from a feature store (data.store) by sample position, or
from the frozen branch run on each batch.

Reproducibility: the shuffling order of epoch e and every augmentation are functions of
(train.seed, e, sample position); the global RNG (dropout) is saved in last.pt. A run resumed
from last.pt therefore ends with the same weights and metrics as an uninterrupted one.

Checkpoints hold tensors and plain containers only, are written to a temporary file and moved
into place (os.replace), and are read with torch.load(weights_only=True).
"""
from __future__ import annotations

import csv
import io
import math
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .data import (BadImageError, EpochBatches, FPTDataset, FrozenTransform, ImageFolderSplit, ImageList, collate,
                   compute_mean_std, find_classes, list_images, make_generator, side_transform)
from .distributed import Group, local_device
from .metrics import METRIC_ORDER, classification_metrics, pme, ppe
from ..model import FPT
from .settings import Settings
from .store import TORCH_DTYPES, FeatureStore, atomic_open, atomic_write_bytes, atomic_write_json, fingerprint, weights_sha256

CHECKPOINT_KIND = "fpt_fast.checkpoint"
CHECKPOINT_FORMAT = 1
# Settings that may change between a run and its resumption without changing its results.
RESUMABLE_CHANGES = {("train", "epochs"), ("train", "progress"), ("train", "tensorboard"),
                     ("data", "num_workers")}
CSV_COLUMNS = ["epoch", "lr", "train_loss", "train_acc"] + [f"val_{m}" for m in METRIC_ORDER] + \
    ["images_per_s", "seconds", "memory_mb", "best"]

Log = Callable[[str], None]


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else the CPU; anything else as torch.device. Under torchrun,
    "auto" and "cuda" are cuda:LOCAL_RANK (fpt_fast.app.distributed.local_device)."""
    return local_device(name)


def build_model(settings: Settings, num_classes: int) -> FPT:
    """FPT of the settings, initialised from train.seed without touching the global RNG (with
    model.pretrained false and no checkpoint_path, the seed also draws the frozen backbone)."""
    config = settings.fpt_config(num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.train.seed)
        return FPT(config)


class TrainableNet(nn.Module):
    """The learnable part of an FPT as one module: fusion + side network, or, when side_only, the
    side network alone (the same ViT, no prompts, no frozen branch: the ablation baseline).
    DistributedDataParallel wraps this, so it sees only parameters that get gradients and none of
    the frozen branch's buffers; the frozen branch runs outside it.

    forward(side (B, 3, h, w), keys, values (L, B, H, n, d) or None) -> logits (B, C).
    """

    def __init__(self, model: FPT, side_only: bool):
        super().__init__()
        self.side = model.side
        self.fusion = None if side_only else model.fusion

    def forward(self, side: Tensor, keys: Optional[Tensor] = None, values: Optional[Tensor] = None) -> Tensor:
        if self.fusion is None:
            return VisionTransformer.forward(self.side, side)  # SideViT.forward wants prompts
        return self.side(side, self.fusion(keys, values))


def learnable_share(model: FPT, side_only: bool) -> float:
    if not side_only:
        return model.learnable_share()
    side = sum(p.numel() for p in model.side.parameters())
    return side / (side + sum(p.numel() for p in model.frozen.parameters()))


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Union[str, Path], payload: dict) -> None:
    """torch.save, atomically (store.atomic_open)."""
    with atomic_open(path) as f:
        torch.save(payload, f)


def load_checkpoint(path: Union[str, Path]) -> dict:
    """A checkpoint written by fpt_fast (torch.load with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have many types; the message says which
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: {e}") from None
    if not isinstance(payload, dict) or payload.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{str(path)!r} is not an fpt_fast checkpoint (for weights of the official FPT "
                         f"code use fpt_fast.load_official_checkpoint)")
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} has format {payload.get('format')!r}; this version reads "
                         f"format {CHECKPOINT_FORMAT}")
    return payload


def load_trainable_state_dict(model: FPT, weights: dict) -> None:
    """Loads FPT.trainable_state_dict() output (fusion.*, side.*); ValueError naming keys that do not fit."""
    expected = set(model.trainable_state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not fit the model of its settings: missing {missing}, "
                         f"unexpected {unexpected}")
    for prefix, module in (("fusion.", model.fusion), ("side.", model.side)):
        module.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})


def model_from_checkpoint(payload: dict, settings: Settings) -> FPT:
    model = build_model(settings, len(payload["classes"]))
    load_trainable_state_dict(model, payload["model"])
    return model


def checkpoint_side_only(payload: dict) -> bool:
    """Whether the checkpoint's model is the side network alone (its training decides, not the caller)."""
    return bool(payload["settings"]["train"]["side_only"])


def check_backbone(model: FPT, payload: dict, side_only: bool) -> str:
    """The backbone's weight hash; ValueError if it differs from the one the checkpoint was trained with."""
    digest = weights_sha256(model.frozen.backbone)
    if not side_only and payload.get("backbone_sha256") not in (None, digest):
        raise ValueError(f"the frozen backbone differs from the one this checkpoint was trained with (weights "
                         f"sha256 {digest[:12]}... vs {payload['backbone_sha256'][:12]}...): check model.backbone, "
                         f"model.pretrained, model.checkpoint_path and train.seed")
    return digest


# --------------------------------------------------------------------------------- data
@dataclass
class Normalization:
    """Resolved data.mean / data.std (RGB) and the messages of images skipped while computing them."""

    mean: List[float]
    std: List[float]
    bad_images: List[str] = field(default_factory=list)


def resolve_normalization(settings: Settings, train_split: Optional[ImageFolderSplit],
                          store: Optional[FeatureStore], log: Log, group: Optional[Group] = None) -> Normalization:
    """data.mean / data.std as numbers: given, or "auto": the store's (computed when it was
    preloaded), else computed from the train split at the frozen input size (shared among the
    processes of ``group``, with the single-process result)."""
    data = settings.data
    if data.mean != "auto" and data.std != "auto":
        return Normalization(list(data.mean), list(data.std))
    bad: List[str] = []
    if store is not None:
        computed = store.fingerprint["transform"]
        source = f"feature store {store.root}"
    elif train_split is not None:
        log(f"computing mean/std of {len(train_split)} training images ...")
        mean, std, bad = compute_mean_std(train_split, settings.fpt_config(len(train_split.classes)).image_size,
                                          data.num_workers, data.skip_bad_images, group)
        computed = {"mean": mean, "std": std}
        source = "the train split"
    else:
        raise ValueError("data.mean/data.std are 'auto' but there is no train split to compute them from")
    mean = computed["mean"] if data.mean == "auto" else list(data.mean)
    std = computed["std"] if data.std == "auto" else list(data.std)
    log(f"normalisation from {source}: mean {[round(v, 4) for v in mean]}, std {[round(v, 4) for v in std]}")
    return Normalization(mean, std, bad)


def open_store(settings: Settings, model: FPT, transform: FrozenTransform) -> FeatureStore:
    """The settings' feature store, its fingerprint checked against this run's."""
    store = FeatureStore(settings.data.store)
    run_fingerprint = fingerprint(model, transform.description(), settings.preload.dtype,
                                  resolve_device(settings.preload.device))
    store.check_fingerprint(run_fingerprint)
    return store


def make_loader(dataset, batch_size: int, num_workers: int, device: torch.device, sampler=None,
                batch_sampler: Optional[EpochBatches] = None) -> DataLoader:
    """In-order batches of dataset (of the indices ``sampler`` yields, when given), or the batches
    of ``batch_sampler``. The generator only seeds workers: augmentation is seeded per sample."""
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate,
                          generator=make_generator(batch_sampler.seed), pin_memory=device.type == "cuda")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, generator=make_generator(0), pin_memory=device.type == "cuda")


class BadImages:
    """Collects unreadable images: raise at once, or (skip) keep their messages for the end."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.messages: List[str] = []

    def handle(self, bad: Sequence) -> None:
        for item in bad:
            if not self.skip:
                raise BadImageError(item.reason)
            if item.reason not in self.messages:
                self.messages.append(item.reason)

    def extend(self, messages: Sequence[str]) -> None:
        for m in messages:
            if m not in self.messages:
                self.messages.append(m)


# ------------------------------------------------------------------------------ stepping
def batch_inputs(model: FPT, batch: dict, device: torch.device, side_only: bool):
    """(side, keys, values) of a collated batch on device: keys/values from the store, or from the
    frozen branch run here (live), or None (side network alone)."""
    side = batch["side"].to(device, non_blocking=True)
    if side_only:
        return side, None, None
    if "keys" in batch:
        # (B, L, H, n, d) as stored -> (L, B, H, n, d); the fusion casts them to its dtype
        return (side, batch["keys"].to(device, non_blocking=True).transpose(0, 1),
                batch["values"].to(device, non_blocking=True).transpose(0, 1))
    keys, values = model.extract(batch["frozen"].to(device, non_blocking=True))
    return side, keys, values


def batch_logits(model: FPT, batch: dict, device: torch.device, side_only: bool, autocast: bool,
                 net: Optional[nn.Module] = None) -> Tensor:
    """Logits (B, C) float32 of a collated batch; net: the module to run (default the model's
    TrainableNet; in training, its DistributedDataParallel wrapper)."""
    net = net if net is not None else TrainableNet(model, side_only)
    side, keys, values = batch_inputs(model, batch, device, side_only)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = net(side, keys, values)
    return logits.float()


@torch.no_grad()
def predict_probabilities(model: FPT, loader: DataLoader, device: torch.device, side_only: bool,
                          autocast: bool, bad: BadImages, progress: bool = False, description: str = "eval",
                          allow_empty: bool = False):
    """(positions (N,), labels (N,), probabilities (N, C) float64) over a loader, in eval mode.
    ValueError when no image was readable, unless allow_empty (then N may be 0)."""
    model.eval()
    net = TrainableNet(model, side_only)
    positions, labels, probabilities = [], [], []
    for batch in _bar(loader, progress, description):
        bad.handle(batch["bad"])
        if len(batch["label"]) == 0:
            continue
        probabilities.append(batch_logits(model, batch, device, side_only, autocast, net).softmax(-1).double().cpu())
        positions.append(batch["position"])
        labels.append(batch["label"])
    if not probabilities:
        if not allow_empty:
            raise ValueError("no readable image to evaluate")
        num_classes = model.config.num_classes
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, num_classes), np.float64)
    return torch.cat(positions).numpy(), torch.cat(labels).numpy(), torch.cat(probabilities).numpy()


def _bar(iterable, enabled: bool, description: str, total: Optional[int] = None):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; a broken install still trains, without bars
        return iterable
    return tqdm(iterable, desc=description, total=total, dynamic_ncols=True, leave=False)


def memory_mb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor of step s: linear warm-up over warmup_steps, then cosine decay to 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def class_weight_tensor(setting, labels: np.ndarray, num_classes: int) -> Optional[Tensor]:
    if setting is None:
        return None
    if setting == "balanced":
        counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
        weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
        return torch.tensor(weights, dtype=torch.float32)
    if len(setting) != num_classes:
        raise ValueError(f"setting train.class_weights has {len(setting)} values but there are {num_classes} classes")
    return torch.tensor(setting, dtype=torch.float32)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------------------------- logging
def write_csv(path: Path, history: List[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


class TensorBoard:
    """SummaryWriter when torch.utils.tensorboard imports (the tensorboard package), else nothing."""

    def __init__(self, enabled: bool, folder: Path, first_epoch: int, log: Log):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("TensorBoard logging is off: torch.utils.tensorboard needs the tensorboard package "
                "(pip install tensorboard); the CSV log is written")
            return
        self.writer = SummaryWriter(str(folder), purge_step=first_epoch + 1)

    def epoch(self, row: dict) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if isinstance(value, float) and key != "epoch" and not math.isnan(value):
                self.writer.add_scalar(key.replace("_", "/", 1) if key.startswith("val_") else key, value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def describe_metrics(metrics: dict) -> str:
    return "  ".join(f"{m} {metrics[m]:.4f}" for m in METRIC_ORDER)


# --------------------------------------------------------------------------------- train
@dataclass
class TrainResult:
    """settings: the run's settings with mean/std and num_classes resolved (as in its checkpoints)."""

    settings: Settings
    out_dir: Path
    history: List[dict]
    best_epoch: int
    best_metric: float
    learnable_share: float
    classes: List[str]
    bad_images: List[str] = field(default_factory=list)


def _comparable(settings_dict: dict) -> dict:
    return {(s, k): v for s, values in settings_dict.items() for k, v in values.items()
            if (s, k) not in RESUMABLE_CHANGES}


def train(settings: Settings, resume: bool = False, log: Log = print) -> TrainResult:
    """Trains per settings into train.out_dir (best.pt, last.pt, log.csv, config.yaml); with
    resume, continues the run whose last.pt is there.

    Under torchrun (torch.distributed initialised, as ``fpt-fast train`` does when torchrun
    starts it), every process calls this: DistributedDataParallel over the learnable part, each
    process with its slice of every global batch (train.batch_size images per process), its own
    frozen branch or part of the store, validation predictions gathered from all; rank 0 logs and
    writes the files. Every process returns the same TrainResult.
    """
    return Trainer(settings, resume, log).run()


def _quiet(_: str) -> None:
    pass


def _stop_together(error: Optional[Exception], failed: float) -> None:
    """Raises error, or (when another process failed) a BadImageError, so that all processes stop
    at the same step instead of leaving the others waiting for the one that stopped."""
    if error is not None:
        raise error
    if failed:
        raise BadImageError("another process met an unreadable image (its message names it); set "
                            "data.skip_bad_images (--skip-bad-images) to leave such images out")


def process_seed(seed: int, rank: int) -> int:
    """Seed of the global RNG (dropout) of process ``rank``: train.seed on rank 0, so a single
    process is seeded as before, and different draws on the others."""
    return seed if rank == 0 else (seed * 1_000_003 + rank * 7_368_787) % (2 ** 63)


class Trainer:
    """One training run: data, model, optimizer and schedule set up from the settings (or from
    last.pt when resuming), then one epoch after the other. With several processes (torchrun)
    every process holds the same state; only rank 0 logs and writes."""

    def __init__(self, settings: Settings, resume: bool, log: Log):
        data, opts = settings.data, settings.train
        if data.root is None:
            raise ValueError("setting data.root is not set: the folder with train/, val/ and test/")
        self.group = group = Group()
        self.log = log if group.is_main else _quiet
        self.device = resolve_device(opts.device)
        self.out_dir = Path(opts.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.bad = BadImages(data.skip_bad_images)
        self.classes = find_classes(data.root)
        train_split = ImageFolderSplit(data.root, "train", self.classes)
        val_split = ImageFolderSplit(data.root, opts.val_split, self.classes) if opts.val_split else None

        # Rank 0 reads last.pt and hands it to the others: no node but rank 0's needs the file.
        checkpoint = group.broadcast_result(lambda: load_checkpoint(self.out_dir / "last.pt")) if resume else None
        if checkpoint is not None:  # "auto" mean/std: the interrupted run's values, not a recomputation
            stored = Settings.from_tree(checkpoint["settings"]).data
            settings = settings.replace("data", mean=stored.mean if data.mean == "auto" else data.mean,
                                        std=stored.std if data.std == "auto" else data.std)
        store = FeatureStore(data.store) if data.store is not None and not opts.side_only else None
        normalization = resolve_normalization(settings, train_split, store, self.log, group)
        self.bad.extend(normalization.bad_images)
        settings = settings.replace("data", mean=normalization.mean, std=normalization.std)
        self.settings = settings = settings.replace("model", num_classes=len(self.classes))
        if checkpoint is not None:
            self._check_resumable(checkpoint)

        self.model = model = build_model(settings, len(self.classes))
        self.share = learnable_share(model, opts.side_only)
        frozen_transform = FrozenTransform(model.config.image_size, normalization.mean, normalization.std)
        train_store = val_store = None
        if store is not None:
            store = open_store(settings, model, frozen_transform)
            train_store = store.split("train", [(s.path, s.label) for s in train_split.samples])
            if val_split is not None:
                val_store = store.split(val_split.split, [(s.path, s.label) for s in val_split.samples])
            self.bad.extend(f"{train_split.samples[p].path} (left out when preloaded)" for p in train_store.left_out)
        self.live = live = not opts.side_only and store is None
        self.store = store

        def dataset(split, split_store, train_mode):
            side = side_transform(data, model.config.side_input_size, normalization.mean, normalization.std,
                                  train=train_mode)
            positions = split_store.present_positions() if split_store is not None else None
            return FPTDataset(split, side, frozen_transform if live else None, split_store, positions, seed=opts.seed)

        self.train_set = dataset(train_split, train_store, True)
        self.val_set = dataset(val_split, val_store, False) if val_split is not None else None
        self.batches = EpochBatches(len(self.train_set), opts.batch_size, opts.seed, group.rank, group.world_size)
        if live:
            model.to(self.device)
        else:  # the frozen branch is not run: keep it off the accelerator
            model.fusion.to(self.device)
            model.side.to(self.device)
        self.net: nn.Module = TrainableNet(model, opts.side_only)
        if group.active:
            # The frozen branch (and its buffers) stays outside: only the learnable part is synchronised.
            self.net = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.parameters = list(model.side.parameters()) if opts.side_only else list(model.trainable_parameters())
        self.optimizer = torch.optim.AdamW(self.parameters, lr=opts.lr, weight_decay=opts.weight_decay)
        steps_per_epoch = len(self.batches)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(
            round(opts.warmup_epochs * steps_per_epoch), steps_per_epoch * opts.epochs))
        weights = class_weight_tensor(opts.class_weights, train_split.labels(), len(self.classes))
        self.class_weights = weights.to(self.device) if weights is not None else None
        self.autocast = opts.amp and self.device.type == "cuda"
        self.backbone_digest = weights_sha256(model.frozen.backbone)
        self.features_text = ("not used" if opts.side_only else f"from store {store.root}" if store is not None
                              else "computed live")

        self.history: List[dict] = []
        self.best_metric, self.best_epoch, self.start_epoch = -math.inf, -1, 0
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            seed = process_seed(opts.seed, group.rank)
            torch.manual_seed(seed)
            if torch.cuda.is_available():
                torch.cuda.manual_seed_all(seed)

    def _check_resumable(self, checkpoint: dict) -> None:
        now, before = _comparable(self.settings.to_dict()), _comparable(checkpoint["settings"])
        changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
        if changed:
            raise ValueError("cannot resume: settings differ from the interrupted run's: " + "; ".join(
                f"{s}.{k}: {before.get((s, k))!r} then, {now.get((s, k))!r} now" for s, k in changed))
        if checkpoint["classes"] != self.classes:
            raise ValueError(f"cannot resume: classes are {self.classes} now, {checkpoint['classes']} then")
        then, now_size = checkpoint.get("world_size", 1), self.group.world_size
        if then != now_size:
            batch = self.settings.train.batch_size
            raise ValueError(f"cannot resume: the interrupted run had {then} process(es) (global batch "
                             f"{then * batch}), this one has {now_size} (global batch {now_size * batch}); "
                             f"start it with the same number of processes (torchrun --nnodes x --nproc_per_node)")

    def _restore(self, checkpoint: dict) -> None:
        load_trainable_state_dict(self.model, checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.history = list(checkpoint["history"])
        self.best_metric, self.best_epoch = checkpoint["best_metric"], checkpoint["best_epoch"]
        self.start_epoch = checkpoint["epoch"] + 1
        set_rng_state(checkpoint["rng_ranks"][self.group.rank] if self.group.active else checkpoint["rng"])
        self.log(f"resuming {self.out_dir} after epoch {self.start_epoch} of {self.settings.train.epochs}")

    def run(self) -> TrainResult:
        opts, group = self.settings.train, self.group
        if group.is_main:
            atomic_write_bytes(self.out_dir / "config.yaml", self.settings.to_yaml().encode("utf-8"))
        where = str(self.device) if not group.active else (
            f"{group.world_size} processes ({self.device.type}, global batch {self.batches.global_batch_size} = "
            f"{group.world_size} x train.batch_size {opts.batch_size})")
        self.log(f"training {'the side network alone' if opts.side_only else 'FPT'} on {len(self.train_set)} "
                 f"images ({len(self.classes)} classes) on {where}; learnable parameters "
                 f"{100 * self.share:.3f}% of the model; features {self.features_text}")
        board = TensorBoard(opts.tensorboard and group.is_main, self.out_dir / "tensorboard", self.start_epoch,
                            self.log)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for epoch in range(self.start_epoch, opts.epochs):
            row = self.train_epoch(epoch)
            if self.val_set is not None:
                metrics = self.validate()
                row.update({f"val_{m}": metrics[m] for m in METRIC_ORDER})
                score = metrics[opts.selection_metric]
            else:
                score = float(epoch)  # no validation split: the latest epoch is the best
            score = -math.inf if math.isnan(score) else score
            is_best = score > self.best_metric or self.best_epoch < 0
            if is_best:
                self.best_metric, self.best_epoch = score, epoch + 1
            row["best"] = int(is_best)
            self.history.append(row)
            self.save(epoch, is_best)
            board.epoch(row)
            val_text = "  ".join(f"val {m} {row[f'val_{m}']:.4f}" for m in ("acc", "auc") if f"val_{m}" in row)
            self.log(f"epoch {epoch + 1}/{opts.epochs}  loss {row['train_loss']:.4f}  {val_text}  "
                     f"lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s  mem {row['memory_mb']:.0f} MB"
                     f"{'  *best' if is_best else ''}")
        board.close()
        messages = self.bad.messages
        if group.active:  # each process met the unreadable images of its own slices
            messages = list(dict.fromkeys(m for part in group.all_gather_object(messages) for m in part))
        if messages:
            self.log(f"{len(messages)} unreadable image(s) were left out:\n  " + "\n  ".join(messages))
        return TrainResult(self.settings, self.out_dir, self.history, self.best_epoch, self.best_metric, self.share,
                           self.classes, messages)

    def _bad_images(self, bad: Sequence) -> Optional[BadImageError]:
        """self.bad.handle(bad); with several processes, its error is returned, to be raised on all."""
        try:
            self.bad.handle(bad)
        except BadImageError as e:
            if not self.group.active:
                raise
            return e
        return None

    def placeholder_batch(self) -> dict:
        """One all-zero sample, for a process whose slice of a global batch is empty (a short last
        batch, or only unreadable images): DistributedDataParallel needs every process in every
        step. It enters the loss with weight 0."""
        config = self.model.config
        batch = {"bad": [], "position": torch.zeros(1, dtype=torch.long), "label": torch.zeros(1, dtype=torch.long),
                 "side": torch.zeros(1, 3, *config.side_input_size)}
        if self.live:
            batch["frozen"] = torch.zeros(1, 3, *config.image_size)
        elif self.store is not None:
            dtype = TORCH_DTYPES[self.store.dtype]
            batch["keys"] = torch.zeros(1, *self.store.feature_shape, dtype=dtype)
            batch["values"] = torch.zeros(1, *self.store.feature_shape, dtype=dtype)
        return batch

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training set; returns the epoch's log row (loss, accuracy, speed, memory).

        The loss of a step is the class-weighted mean cross-entropy over the global batch. With
        K processes, process r backpropagates K * sum_r(w * ce) / sum(w) (sum(w) over the global
        batch, by one small all-reduce); DistributedDataParallel averages the gradients, which
        gives the gradient of that global mean exactly as one process with batch K * b would.
        """
        opts, device, model, group = self.settings.train, self.device, self.model, self.group
        model.train()
        self.train_set.set_epoch(epoch)
        self.batches.set_epoch(epoch)
        loader = make_loader(self.train_set, opts.batch_size, self.settings.data.num_workers, device,
                             batch_sampler=self.batches)
        start = time.perf_counter()
        seen, loss_sum, correct = 0, 0.0, 0  # loss_sum: this process's share of sum(batch loss * batch size)
        bar = _bar(loader, opts.progress and group.is_main, f"epoch {epoch + 1}/{opts.epochs}")
        for batch in bar:
            error = self._bad_images(batch["bad"])
            labels = batch["label"].to(device, non_blocking=True)
            weights = (self.class_weights[labels] if self.class_weights is not None
                       else torch.ones(len(labels), device=device))
            local_weight = weights.sum().item()
            weight_total, count, failed = group.all_reduce([local_weight, len(labels), error is not None])
            _stop_together(error, failed)
            if weight_total <= 0:  # no readable image (or only zero class weights) in the whole global batch
                continue
            real = len(labels) > 0
            if not real:
                batch = self.placeholder_batch()
                labels = batch["label"].to(device)
                weights = torch.zeros(1, device=device)
            logits = batch_logits(model, batch, device, opts.side_only, self.autocast, self.net)
            local = (weights * F.cross_entropy(logits, labels, reduction="none")).sum()
            loss = local / weight_total * group.world_size
            self.optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                # A 1-image slice gives the side network's class token a strided gradient, which
                # DistributedDataParallel copies into its bucket and warns about; a copy is all it costs.
                warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
                loss.backward()
            if opts.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.parameters, opts.clip_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            local_value = local.item()
            seen += int(count)
            loss_sum += local_value * count / weight_total
            if real:
                correct += int((logits.argmax(-1) == labels).sum())
            if bar is not loader:
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{local_value / max(local_weight, 1e-12):.4f}",
                                img_s=f"{seen / elapsed:.0f}", mem=f"{memory_mb(device):.0f}MB")
        loss_sum, correct = group.all_reduce([loss_sum, correct])
        seconds, memory = group.all_reduce([time.perf_counter() - start, memory_mb(device)], op="max")
        return {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
                "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                "images_per_s": seen / max(seconds, 1e-9), "seconds": seconds, "memory_mb": memory}

    def validate(self) -> dict:
        """Validation metrics. With K processes, process r predicts every K-th image; the gathered
        predictions are put back in position order, so the metrics are those of one process."""
        opts, group = self.settings.train, self.group
        loader = make_loader(self.val_set, opts.eval_batch_size, self.settings.data.num_workers, self.device,
                             sampler=range(group.rank, len(self.val_set), group.world_size))
        error = None
        try:
            positions, labels, probabilities = predict_probabilities(
                self.model, loader, self.device, opts.side_only, self.autocast, self.bad, allow_empty=group.active)
        except BadImageError as e:
            if not group.active:
                raise
            error, positions, labels, probabilities = e, np.zeros(0, np.int64), np.zeros(0, np.int64), None
        if group.active:
            parts = group.all_gather_object((positions, labels, probabilities, error is not None))
            _stop_together(error, sum(p[3] for p in parts))
            positions = np.concatenate([p[0] for p in parts])
            # Each position once (a sampler that pads would repeat some), in position order.
            positions, first = np.unique(positions, return_index=True)
            labels = np.concatenate([p[1] for p in parts])[first]
            probabilities = np.concatenate([p[2] for p in parts])[first]
            if len(positions) == 0:
                raise ValueError("no readable image to evaluate")
        return classification_metrics(labels, probabilities)

    def save(self, epoch: int, is_best: bool) -> None:
        """best.pt (when best), last.pt (with optimizer, scheduler, RNG) and log.csv, each atomically,
        by rank 0; the other processes wait until they are written (an error there stops all)."""
        group = self.group
        rng_ranks = group.all_gather_object(rng_state())  # every process's dropout RNG, for an exact resume

        def write() -> None:
            payload = {"kind": CHECKPOINT_KIND, "format": CHECKPOINT_FORMAT, "settings": self.settings.to_dict(),
                       "classes": self.classes, "model": self.model.trainable_state_dict(),
                       "backbone_sha256": self.backbone_digest, "epoch": epoch, "best_metric": self.best_metric,
                       "best_epoch": self.best_epoch, "history": self.history, "learnable_share": self.share,
                       "world_size": group.world_size}
            if is_best:
                save_checkpoint(self.out_dir / "best.pt", payload)
            resume_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                            "rng": rng_ranks[0]}
            if group.active:
                resume_state["rng_ranks"] = rng_ranks
            save_checkpoint(self.out_dir / "last.pt", {**payload, **resume_state})
            write_csv(self.out_dir / "log.csv", self.history)

        group.broadcast_result(write)


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
    holds the split, else computed live). Writes eval_<split>.json beside the checkpoint."""
    payload = load_checkpoint(checkpoint_path)
    data, opts = settings.data, settings.train
    if data.root is None:
        raise ValueError("setting data.root is not set: the folder with the split to evaluate")
    if "auto" in (data.mean, data.std):
        raise ValueError("data.mean/data.std must be numbers for evaluation (the checkpoint's settings hold them)")
    device = resolve_device(opts.device)
    classes = payload["classes"]
    split = ImageFolderSplit(data.root, split_name, classes)
    model = model_from_checkpoint(payload, settings)
    side_only = checkpoint_side_only(payload)
    check_backbone(model, payload, side_only)
    transform = FrozenTransform(model.config.image_size, data.mean, data.std)
    split_store = None
    if data.store is not None and not side_only:
        store = open_store(settings, model, transform)
        if split_name in store.splits():
            split_store = store.split(split_name, [(s.path, s.label) for s in split.samples])
    live = not side_only and split_store is None
    side = side_transform(data, model.config.side_input_size, data.mean, data.std, train=False)
    positions = split_store.present_positions() if split_store is not None else None
    dataset = FPTDataset(split, side, transform if live else None, split_store, positions)
    if live:
        model.to(device)
    else:
        model.fusion.to(device)
        model.side.to(device)
    bad = BadImages(data.skip_bad_images)
    if split_store is not None:
        bad.extend(f"{split.samples[p].path} (left out when preloaded)" for p in split_store.left_out)
    loader = make_loader(dataset, opts.eval_batch_size, data.num_workers, device)
    _, labels, probabilities = predict_probabilities(model, loader, device, side_only,
                                                     opts.amp and device.type == "cuda", bad, opts.progress,
                                                     f"evaluate {split_name}")
    metrics = classification_metrics(labels, probabilities)
    share = payload.get("learnable_share", learnable_share(model, side_only))
    metrics["ppe_auc"] = ppe(metrics["auc"], share) if not math.isnan(metrics["auc"]) else math.nan
    if opts.reference_memory_mb is not None and payload["history"]:
        memory = max(row["memory_mb"] for row in payload["history"])
        metrics["pme_auc"] = pme(metrics["auc"], memory, opts.reference_memory_mb)
    result = EvalResult(split_name, metrics, classes, len(labels), share, bad.messages)
    atomic_write_json(Path(checkpoint_path).parent / f"eval_{split_name}.json",
                      {"split": split_name, "checkpoint": str(checkpoint_path), "classes": classes,
                       "num_images": len(labels), "metrics": metrics, "bad_images": bad.messages})
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
        lines.append(f"{len(result.bad_images)} unreadable image(s) left out:\n  " + "\n  ".join(result.bad_images))
    return "\n".join(lines)


# ------------------------------------------------------------------------------- predict
def predict(settings: Settings, checkpoint_path: Union[str, Path], images: Union[str, Path],
            output: Union[str, Path], log: Log = print) -> List[dict]:
    """Per-image predictions of a checkpoint for every image under a folder, written as CSV
    (path, prediction, confidence, one probability column per class)."""
    payload = load_checkpoint(checkpoint_path)
    data, opts = settings.data, settings.train
    device = resolve_device(opts.device)
    classes = payload["classes"]
    paths = list_images(images)
    if not paths:
        raise ValueError(f"no image files under {str(images)!r}")
    model = model_from_checkpoint(payload, settings)
    side_only = checkpoint_side_only(payload)
    check_backbone(model, payload, side_only)
    transform = FrozenTransform(model.config.image_size, data.mean, data.std)
    side = side_transform(data, model.config.side_input_size, data.mean, data.std, train=False)
    image_list = ImageList(images, paths)
    dataset = FPTDataset(image_list, side, None if side_only else transform)
    model.to(device)
    bad = BadImages(data.skip_bad_images)
    loader = make_loader(dataset, opts.eval_batch_size, data.num_workers, device)
    positions, _, probabilities = predict_probabilities(model, loader, device, side_only,
                                                        opts.amp and device.type == "cuda", bad, opts.progress,
                                                        "predict")
    rows = []
    for position, probs in zip(positions, probabilities):
        best = int(np.argmax(probs))
        row = {"path": image_list.samples[position].path, "prediction": classes[best], "confidence": float(probs[best])}
        row.update({f"p_{name}": float(p) for name, p in zip(classes, probs)})
        rows.append(row)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["path", "prediction", "confidence"] + [f"p_{c}" for c in classes])
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, buffer.getvalue().encode("utf-8"))
    log(f"wrote predictions for {len(rows)} images to {output}")
    if bad.messages:
        log(f"{len(bad.messages)} unreadable image(s) left out:\n  " + "\n  ".join(bad.messages))
    return rows


# ------------------------------------------------------------------------------- preload
@dataclass
class PreloadResult:
    store: Path
    reports: list
    bytes_per_image: float
    official_bytes_per_image: int
    bad_images: List[str] = field(default_factory=list)


def preload(settings: Settings, log: Log = print) -> PreloadResult:
    """Writes (or finishes) the feature store data.store for the splits preload.splits.

    Under torchrun (torch.distributed initialised) every process calls this: each computes and
    writes its share of every split's shards (data.store must then be a folder all nodes share),
    rank 0 merges the index of each split once all are done and logs. Every process returns the
    PreloadResult of the whole store.
    """
    from .store import MANIFEST, StoreWriter, preload_split

    group = Group()
    log = log if group.is_main else _quiet
    data, opts = settings.data, settings.preload
    if data.store is None:
        raise ValueError("setting data.store is not set: the folder to write the features to")
    if data.root is None:
        raise ValueError("setting data.root is not set: the folder with train/, val/ and test/")
    device = resolve_device(opts.device)
    classes = find_classes(data.root)
    splits = [ImageFolderSplit(data.root, name, classes) for name in opts.splits]
    train_split = next((s for s in splits if s.split == "train"), None) or ImageFolderSplit(data.root, "train", classes)
    existing = FeatureStore(data.store) if (Path(data.store) / MANIFEST).is_file() else None
    normalization = resolve_normalization(settings, train_split, existing, log, group)
    bad_messages = list(normalization.bad_images)
    settings = settings.replace("data", mean=normalization.mean, std=normalization.std)
    model = build_model(settings, len(classes))
    config = model.config
    transform = FrozenTransform(config.image_size, normalization.mean, normalization.std)
    run_fingerprint = fingerprint(model, transform.description(), opts.dtype, device)
    feature_shape = (len(config.layers), config.backbone_info.num_heads, config.num_selected, config.backbone_info.head_dim)
    # Rank 0 creates the manifest (or checks the existing one) before the others open the store.
    writer = group.main_first(lambda: StoreWriter(data.store, run_fingerprint, feature_shape, classes, opts.shard_mb))
    model.to(device).eval()
    where = str(device) if not group.active else f"{group.world_size} processes ({device.type})"
    log(f"preloading into {data.store}: K_sel/V_sel of shape (L={feature_shape[0]}, H={feature_shape[1]}, "
        f"n={feature_shape[2]}, d={feature_shape[3]}) per image, stored as {opts.dtype}, on {where}")
    reports = []
    for split in splits:
        report = preload_split(model, writer, split, transform, device, opts.batch_size, data.num_workers,
                               data.skip_bad_images, settings.train.progress, group)
        reports.append(report)
        bad_messages += report.left_out
        rate = (report.samples / report.seconds) if report.shards_written else 0.0
        log(f"  {split.split}: {report.samples} images, {report.shards_written} shard(s) written"
            f"{f', {report.shards_reused} kept from an earlier run' if report.shards_reused else ''}, "
            f"{report.seconds:.1f} s{f' ({rate:.1f} img/s)' if rate else ''}")
        if 0 < report.shards_written < group.world_size and not report.shards_reused:
            log(f"    (work is dealt out by shard: {report.shards_written} shard(s) for {group.world_size} "
                f"processes; a smaller preload.shard_mb spreads a split wider)")
    store = FeatureStore(data.store)
    total_bytes = sum(f.stat().st_size for f in store.root.iterdir() if f.is_file())
    images = sum(r.samples for r in reports)
    official = 2 * math.prod(feature_shape) * 4
    per_image = total_bytes / max(images, 1)
    log(f"store: {total_bytes / 2 ** 20:.1f} MiB, {per_image / 1024:.1f} KiB per image (records and index) vs "
        f"{official / 1024:.1f} KiB per image for the official per-image fp32 files ({official / per_image:.2f}x)")
    if bad_messages:
        log(f"{len(bad_messages)} unreadable image(s) were left out:\n  " + "\n  ".join(bad_messages))
    return PreloadResult(store.root, reports, per_image, official, bad_messages)


def verify_store(settings: Settings, recompute: int = 4, log: Log = print):
    """Checks data.store (files, hashes, finite values, and ``recompute`` recomputed samples per
    split when data.root is set) and measures its read rate. Returns the VerifyReport."""
    from .store import measure_read_rate, verify

    data = settings.data
    if data.store is None:
        raise ValueError("setting data.store is not set: the store to verify")
    store = FeatureStore(data.store)
    model = transform = None
    device = resolve_device(settings.preload.device)
    if data.root is not None and recompute > 0:
        normalization = resolve_normalization(settings, None, store, log)
        settings = settings.replace("data", mean=normalization.mean, std=normalization.std)
        model = build_model(settings, len(store.classes))
        transform = FrozenTransform(model.config.image_size, normalization.mean, normalization.std)
        store.check_fingerprint(fingerprint(model, transform.description(), settings.preload.dtype, device))
        model.to(device).eval()
    report = verify(store.root, model, transform, data.root, device, recompute if model is not None else 0)
    log(f"verify {store.root}: {report.samples} samples, {report.bytes / 2 ** 20:.1f} MiB of shards"
        + (f", {report.recomputed} recomputed (max relative error {report.max_recompute_error:.2g})"
           if report.recomputed else "")
        + (": OK" if report.ok else ": PROBLEMS\n  " + "\n  ".join(report.problems)))
    if report.ok:
        for name in store.splits():
            samples_per_s, mb_per_s = measure_read_rate(store.split(name), settings.train.batch_size, max_seconds=3.0)
            log(f"  read rate {name}: {samples_per_s:.0f} samples/s ({mb_per_s:.0f} MB/s, random batches of "
                f"{settings.train.batch_size}, page cache warm)")
    return report
