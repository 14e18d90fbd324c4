"""Training of FPT / FPT+ (or of the side network alone) from run settings (fpt_fast.app.settings).

AdamW, linear warm-up then cosine decay (per step), gradient-norm clipping, optional class weights,
bf16 autocast on CUDA, cross-entropy (docs/method.md, section 6 gives the official recipe); validation
metrics every epoch; best.pt keeps the epoch with the best validation ``train.selection_metric``
(AUC by default), last.pt everything needed to resume (fpt_fast.app.checkpoints). The features
come from a feature store (fpt_fast.app.store) by sample position, or from the frozen branch run
on each batch (features online).

Nothing silently wrong, nothing lost: an out_dir that holds a run is refused unless the run is
resumed or replaced on request (overwrite); a step whose gradient is not finite stops the run
(TrainingDiverged, naming the epoch and step) before the optimiser applies it, and no checkpoint
with non-finite weights is written; an epoch whose validation metric is NaN is never the best.

Reproducibility: the shuffling order of epoch e and every augmentation are functions of
(train.seed, e, sample position); the global RNG (dropout) is saved in last.pt. A run resumed
from last.pt therefore ends with the same weights and metrics as an uninterrupted one.
"""
from __future__ import annotations

import math
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..model import FPT
from .build import build_model, check_store, frozen_transform, place_model, with_normalization
from .checkpoints import (check_resumable, first_non_finite, load_checkpoint, new_checkpoint, save_checkpoint,
                          with_checkpoint_normalization)
from .console import Log, Progress, quiet
from .data import (BadImageError, BadImages, EpochBatches, FPTDataset, ImageFolderSplit, describe_left_out,
                   find_classes, make_loader, side_transform)
from .distributed import Group, local_device
from .evaluation import batch_logits, predict_probabilities
from .files import DiskFullError, atomic_write_bytes, atomic_write_csv, make_folder, remove_stale_temporaries
from .metrics import METRIC_ORDER, classification_metrics
from .settings import Settings
from .store import TORCH_DTYPES, FeatureStore, StoreSplit, weights_sha256

LOG_COLUMNS = ["epoch", "lr", "train_loss", "train_acc"] + [f"val_{m}" for m in METRIC_ORDER] + \
    ["images_per_s", "seconds", "memory_mb", "best"]
# The files that make out_dir hold a run (which a new run must not silently replace).
RUN_FILES = ("best.pt", "last.pt", "log.csv")


class TrainingDiverged(ValueError):
    """The loss, the gradient or the weights became NaN or infinite; the message names the epoch
    and step, says what was kept and what to change."""


@dataclass
class TrainResult:
    """settings: the run's settings with mean/std and num_classes resolved (as in its checkpoints)."""

    settings: Settings
    out_dir: Path
    history: List[dict]
    best_epoch: int  # 0 when no epoch had a finite validation metric (then there is no best.pt)
    best_metric: float
    learnable_share: float
    classes: List[str]
    bad_images: List[str] = field(default_factory=list)


def train(settings: Settings, resume: bool = False, log: Log = print, overwrite: bool = False) -> TrainResult:
    """Trains per settings into train.out_dir (best.pt, last.pt, log.csv, config.yaml); with
    resume, continues the run whose last.pt is there. An out_dir holding another run is an
    error, unless overwrite: its files (and the eval_*.json of its checkpoints) are then deleted
    once the new run is ready to start.

    Under torchrun (torch.distributed initialised, as ``fpt-fast train`` does when torchrun
    starts it), every process calls this: DistributedDataParallel over the learnable part
    (FPT.trainable_module), each process with its slice of every global batch (train.batch_size
    images per process), its own frozen branch or part of the store, validation predictions
    gathered from all; rank 0 logs and writes the files. Every process returns the same TrainResult.
    """
    return Trainer(settings, resume, log, overwrite).run()


def check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """out_dir created (ValueError when it is a file) and cleared of the temporary files of killed
    runs; ValueError when it holds a run (RUN_FILES) that is neither resumed nor to be overwritten."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in train.out_dir and --overwrite replaces it: give one")
    make_folder(out_dir, "train.out_dir")
    remove_stale_temporaries(out_dir)
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not resume and not overwrite:
        raise ValueError(f"train.out_dir {str(out_dir)!r} holds a run ({', '.join(existing)}): add --resume to "
                         f"continue it, --overwrite to replace it, or set another train.out_dir")


def gradient_norm(parameters: Sequence[nn.Parameter], clip: Optional[float]) -> Tensor:
    """The total 2-norm of the parameters' gradients (a 0-d tensor), after clipping them to clip
    when it is set (clip_grad_norm_ returns the norm before clipping)."""
    if clip is not None:
        return torch.nn.utils.clip_grad_norm_(parameters, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


# ------------------------------------------------------------------------ schedule, loss
def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor of step s: linear warm-up over warmup_steps, then cosine decay to 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def class_weight_tensor(setting, labels: np.ndarray, num_classes: int) -> Optional[Tensor]:
    """train.class_weights as a (C,) float32 tensor: None, "balanced" or one weight per class."""
    if setting is None:
        return None
    if setting == "balanced":
        counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
        weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
        return torch.tensor(weights, dtype=torch.float32)
    if len(setting) != num_classes:
        raise ValueError(f"setting train.class_weights has {len(setting)} values but there are {num_classes} classes")
    return torch.tensor(setting, dtype=torch.float32)


# ----------------------------------------------------------------------------- RNG state
def process_seed(seed: int, rank: int) -> int:
    """Seed of the global RNG (dropout) of process ``rank``: train.seed on rank 0, so a single
    process is seeded as before, and different draws on the others."""
    return seed if rank == 0 else (seed * 1_000_003 + rank * 7_368_787) % (2 ** 63)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------- logging
def memory_mb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


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


# --------------------------------------------------------------------------- the trainer
def _stop_together(error: Optional[Exception], failed: float) -> None:
    """Raises error, or (when another process failed) a BadImageError, so that all processes stop
    at the same step instead of leaving the others waiting for the one that stopped."""
    if error is not None:
        raise error
    if failed:
        raise BadImageError("another process met an unreadable image (its message names it); set "
                            "data.skip_bad_images (--skip-bad-images) to leave such images out")


class Trainer:
    """One training run: settings resolved, then the model, the data, the optimiser and its
    schedule built from them (and restored from last.pt when resuming), then one epoch after the
    other. With several processes (torchrun) every process holds the same state; only rank 0
    logs and writes.

    features_online: whether the frozen branch computes the features at each step (no store and
    not side_only); otherwise they are read from the store, or not used (side_only).
    """

    def __init__(self, settings: Settings, resume: bool, log: Log, overwrite: bool = False):
        if settings.data.root is None:
            raise ValueError("setting data.root is not set: the folder with train/, val/ and test/")
        self.group = Group()
        self.log = log if self.group.is_main else quiet
        self.device = local_device(settings.train.device)
        self.out_dir = Path(settings.train.out_dir)
        # Rank 0 alone writes the run's files; its verdict stops every process alike.
        self.group.broadcast_result(lambda: check_out_dir(self.out_dir, resume, overwrite))
        self.replaces_run = overwrite
        self.bad_images = BadImages(settings.data.skip_bad_images)
        self.classes = find_classes(settings.data.root)
        train_split = ImageFolderSplit(settings.data.root, "train", self.classes)
        val_name = settings.train.val_split
        val_split = ImageFolderSplit(settings.data.root, val_name, self.classes) if val_name else None
        # Rank 0 reads last.pt and hands it to the others: no node but rank 0's needs the file.
        checkpoint = self.group.broadcast_result(lambda: load_checkpoint(self.out_dir / "last.pt")) if resume else None
        uses_store = settings.data.store is not None and not settings.train.side_only
        store = FeatureStore(settings.data.store) if uses_store else None
        self.settings = self._resolve_settings(settings, train_split, store, checkpoint)
        self.features_online = not uses_store and not settings.train.side_only

        self.model, self.trainable_module = self._build_model()
        self.learnable_share = self.model.learnable_share(self.settings.train.side_only)
        self.backbone_digest = weights_sha256(self.model.frozen.backbone)
        self.store, self.train_set, self.val_set, self.batches = self._build_data(store, train_split, val_split)
        self.trainable_parameters, self.optimizer, self.scheduler = self._build_optimiser()
        self.class_weights = self._build_class_weights(train_split)
        self.autocast = self.settings.train.amp and self.device.type == "cuda"

        self.history: List[dict] = []
        self.best_metric, self.best_epoch, self.start_epoch = -math.inf, -1, 0
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            seed = process_seed(self.settings.train.seed, self.group.rank)
            torch.manual_seed(seed)
            if torch.cuda.is_available():
                torch.cuda.manual_seed_all(seed)

    # ---------------------------------------------------------------- builders
    def _resolve_settings(self, settings: Settings, train_split: ImageFolderSplit, store: Optional[FeatureStore],
                          checkpoint: Optional[dict]) -> Settings:
        """The run's settings: data.mean/std as numbers (a resumed run's "auto" values are the
        interrupted run's, not a recomputation), model.num_classes from the class folders;
        checked against the interrupted run's when resuming."""
        if checkpoint is not None:
            settings = with_checkpoint_normalization(settings, checkpoint)
        settings = with_normalization(settings, train_split, store, self.log, self.bad_images, self.group)
        settings = settings.replace("model", num_classes=len(self.classes))
        if checkpoint is not None:
            check_resumable(checkpoint, settings, self.classes, self.group.world_size)
        return settings

    def _build_model(self) -> Tuple[FPT, nn.Module]:
        """(the model, on the device as far as it runs; the module a step runs: the model's
        trainable module, wrapped in DistributedDataParallel with several processes)."""
        model = place_model(build_model(self.settings, len(self.classes)), self.device, self.features_online)
        module = model.trainable_module(self.settings.train.side_only)
        if self.group.active:  # the frozen branch (and its buffers) stays outside: it is not synchronised
            module = DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model, module

    def _build_data(self, store: Optional[FeatureStore], train_split: ImageFolderSplit,
                    val_split: Optional[ImageFolderSplit]):
        """(the feature store, its fingerprint checked, or None; the training set; the validation
        set or None; this process's batches). The sets give the side network's images with the
        frozen branch's input (features online) or the store's features."""
        data, opts = self.settings.data, self.settings.train
        transform = frozen_transform(self.settings, self.model)
        if store is not None:
            check_store(store, self.settings, self.model, self.backbone_digest)

        def dataset(split: ImageFolderSplit, train_mode: bool) -> FPTDataset:
            side = side_transform(data, self.model.config.side_input_size, train=train_mode)
            split_store: Optional[StoreSplit] = None
            if store is not None:
                split_store = store.split(split.split, [(s.path, s.label) for s in split.samples])
                self.bad_images.note(split_store.left_out_messages())
            return FPTDataset(split, side, transform if self.features_online else None, split_store, seed=opts.seed)

        train_set = dataset(train_split, True)
        val_set = dataset(val_split, False) if val_split is not None else None
        batches = EpochBatches(len(train_set), opts.batch_size, opts.seed, self.group.rank, self.group.world_size)
        return store, train_set, val_set, batches

    def _build_optimiser(self):
        """(the trainable parameters, AdamW over them, its per-step warm-up + cosine schedule)."""
        opts = self.settings.train
        parameters = list(self.model.trainable_parameters(opts.side_only))
        optimizer = torch.optim.AdamW(parameters, lr=opts.lr, weight_decay=opts.weight_decay)
        steps_per_epoch = len(self.batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
            round(opts.warmup_epochs * steps_per_epoch), steps_per_epoch * opts.epochs))
        return parameters, optimizer, scheduler

    def _build_class_weights(self, train_split: ImageFolderSplit) -> Optional[Tensor]:
        """train.class_weights on the CPU, where the loader's labels are: a step sums its weights
        there, without waiting for the device (None: all classes weigh 1)."""
        return class_weight_tensor(self.settings.train.class_weights, train_split.labels(), len(self.classes))

    def _restore(self, checkpoint: dict) -> None:
        self.model.load_trainable_state_dict(checkpoint["model"])
        self._check_optimizer_state(checkpoint["optimizer"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.history = list(checkpoint["history"])
        self.best_metric, self.best_epoch = checkpoint["best_metric"], checkpoint["best_epoch"]
        self.start_epoch = checkpoint["epoch"] + 1
        set_rng_state(checkpoint["rng_ranks"][self.group.rank] if self.group.active else checkpoint["rng"])
        self.log(f"resuming {self.out_dir} after epoch {self.start_epoch} of {self.settings.train.epochs}")

    def _check_optimizer_state(self, saved: dict) -> None:
        """ValueError when last.pt's AdamW moments do not have the shapes of the parameters they
        belong to (a last.pt of an earlier version whose parameters had other shapes): torch would
        load them and fail at the first step."""
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        for index, state in saved["state"].items():
            wrong = [name for name, value in state.items()
                     if torch.is_tensor(value) and value.dim() > 0 and value.shape != parameters[index].shape]
            if wrong:
                raise ValueError(f"cannot resume from {self.out_dir / 'last.pt'}: its optimizer state for parameter "
                                 f"{index} has shape {tuple(state[wrong[0]].shape)}, the parameter "
                                 f"{tuple(parameters[index].shape)} (written by an earlier version of fpt_fast); "
                                 f"start a new run (--overwrite) or keep the version that wrote it")

    # ------------------------------------------------------------------- running
    def run(self) -> TrainResult:
        opts, group = self.settings.train, self.group
        if group.is_main:
            if self.replaces_run:  # everything is ready: the run asked to be replaced goes now
                for path in [self.out_dir / name for name in RUN_FILES] + sorted(self.out_dir.glob("eval_*.json")):
                    path.unlink(missing_ok=True)
            atomic_write_bytes(self.out_dir / "config.yaml", self.settings.to_yaml().encode("utf-8"))
        where = str(self.device) if not group.active else (
            f"{group.world_size} processes ({self.device.type}, global batch {self.batches.global_batch_size} = "
            f"{group.world_size} x train.batch_size {opts.batch_size})")
        features = ("not used" if opts.side_only else f"from store {self.store.root}" if self.store is not None
                    else "computed by the frozen branch at each step")
        self.log(f"training {'the side network alone' if opts.side_only else 'FPT'} on {len(self.train_set)} "
                 f"images ({len(self.classes)} classes) on {where}; learnable parameters "
                 f"{100 * self.learnable_share:.3f}% of the model; features {features}")
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
            is_best = math.isfinite(score) and score > self.best_metric  # NaN never wins
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
        if self.best_epoch < 0:
            self.log(f"no epoch had a finite validation {opts.selection_metric}, so best.pt was not written (last.pt "
                     f"holds the last epoch); a validation split with a single class has no auc: set "
                     f"train.selection_metric, or train.val_split=null to keep the last epoch as the best")
        messages = self.bad_images.messages
        if group.active:  # each process met the unreadable images of its own slices
            messages = list(dict.fromkeys(m for part in group.all_gather_object(messages) for m in part))
        if messages:
            self.log(describe_left_out(messages))
        return TrainResult(self.settings, self.out_dir, self.history, max(self.best_epoch, 0), self.best_metric,
                           self.learnable_share, self.classes, messages)

    def _handle_bad_images(self, bad: Sequence) -> Optional[BadImageError]:
        """The bad-image policy on a batch's BadSamples; with several processes, its error is
        returned, to be raised on all."""
        try:
            self.bad_images.handle(bad)
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
        if self.features_online:
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
        loader = make_loader(self.train_set, num_workers=self.settings.data.num_workers, device=device,
                             batch_sampler=self.batches)
        start = time.perf_counter()
        seen, loss_sum = 0, 0.0  # loss_sum: this process's share of sum(batch loss * batch size)
        correct = torch.zeros((), dtype=torch.long, device=device)  # read once, after the epoch
        bar = Progress(opts.progress and group.is_main, f"epoch {epoch + 1}/{opts.epochs}", total=len(loader))
        for step, batch in enumerate(loader):
            bar.update()
            error = self._handle_bad_images(batch["bad"])
            # The weights are summed on the CPU: no synchronisation with the device before the forward.
            weights = (self.class_weights[batch["label"]] if self.class_weights is not None
                       else torch.ones(len(batch["label"])))
            local_weight = float(weights.sum())
            labels = batch["label"].to(device, non_blocking=True)
            weights = weights.to(device, non_blocking=True)
            weight_total, count, failed = group.all_reduce([local_weight, len(labels), error is not None])
            _stop_together(error, failed)
            if weight_total <= 0:  # no readable image (or only zero class weights) in the whole global batch
                continue
            has_images = len(labels) > 0  # this process's slice of the global batch
            if not has_images:
                batch = self.placeholder_batch()
                labels = batch["label"].to(device)
                weights = torch.zeros(1, device=device)
            logits = batch_logits(model, batch, device, opts.side_only, self.autocast, self.trainable_module)
            local = (weights * F.cross_entropy(logits, labels, reduction="none")).sum()
            loss = local / weight_total * group.world_size
            self.optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                # A 1-image slice gives the side network's class token a strided gradient, which
                # DistributedDataParallel copies into its bucket and warns about; a copy is all it costs.
                warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
                loss.backward()
            # The gradients are the same on every process (DistributedDataParallel averaged them), so
            # all stop at the same step; one synchronisation for both numbers.
            local_value, norm = torch.stack([local.detach().float(), gradient_norm(
                self.trainable_parameters, opts.clip_grad_norm).float()]).tolist()
            if not math.isfinite(norm):
                raise self._diverged(epoch, f"at step {step + 1} of {len(loader)} the gradient norm is {norm:.4g} "
                                            f"(this process's loss {local_value:.4g})")
            self.optimizer.step()
            self.scheduler.step()
            seen += int(count)
            loss_sum += local_value * count / weight_total
            if has_images:
                correct += (logits.argmax(-1) == labels).sum()
            if bar.shown:
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.show(loss=f"{local_value / max(local_weight, 1e-12):.4f}", img_s=f"{seen / elapsed:.0f}",
                         mem=f"{memory_mb(device):.0f}MB")
        bar.close()
        loss_sum, correct = group.all_reduce([loss_sum, int(correct)])
        if not math.isfinite(loss_sum):  # a sample of class weight 0 with an infinite loss
            raise self._diverged(epoch, f"the epoch's loss is {loss_sum / max(seen, 1):.4g}")
        bad = first_non_finite(self.model.trainable_state_dict())  # the same on every process
        if bad is not None:  # finite gradients, but a step too large for the weights' range
            raise self._diverged(epoch, f"its last step left non-finite weights ({bad})")
        seconds, memory = group.all_reduce([time.perf_counter() - start, memory_mb(device)], op="max")
        return {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
                "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                "images_per_s": seen / max(seconds, 1e-9), "seconds": seconds, "memory_mb": memory}

    def _diverged(self, epoch: int, what: str) -> TrainingDiverged:
        opts = self.settings.train
        kept = (f"the checkpoints of epoch {self.history[-1]['epoch']} and before are kept" if self.history
                else "no checkpoint was written")
        advice = f"lower train.lr (now {opts.lr:g})" + (
            " or set train.clip_grad_norm (now null; the official value is 1.0)" if opts.clip_grad_norm is None else "")
        return TrainingDiverged(f"training diverged in epoch {epoch + 1}: {what}; nothing of this epoch was saved "
                                f"({kept}); {advice}, and train again")

    def validate(self) -> dict:
        """Validation metrics. With K processes, process r predicts every K-th image; the gathered
        predictions are put back in position order, so the metrics are those of one process."""
        opts, group = self.settings.train, self.group
        loader = make_loader(self.val_set, opts.eval_batch_size, self.settings.data.num_workers, self.device,
                             sampler=range(group.rank, len(self.val_set), group.world_size))
        error = None
        try:
            positions, labels, probabilities = predict_probabilities(
                self.model, loader, self.device, opts.side_only, self.autocast, self.bad_images,
                allow_empty=group.active)
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
            checkpoint = new_checkpoint(self.settings, self.classes, self.model,
                                        backbone_sha256=self.backbone_digest, epoch=epoch,
                                        best_metric=self.best_metric, best_epoch=self.best_epoch,
                                        history=self.history, learnable_share=self.learnable_share,
                                        world_size=group.world_size)
            resume_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                            "rng": rng_ranks[0]}
            if group.active:
                resume_state["rng_ranks"] = rng_ranks
            try:
                if is_best:
                    save_checkpoint(self.out_dir / "best.pt", checkpoint)
                save_checkpoint(self.out_dir / "last.pt", {**checkpoint, **resume_state})
                atomic_write_csv(self.out_dir / "log.csv", self.history, LOG_COLUMNS, ".6g")
            except DiskFullError as e:
                raise e.then("rerun with --resume: training continues after the epoch last.pt holds") from None

        group.broadcast_result(write)
