"""Preloading: the frozen branch run once over the splits, its K_sel / V_sel written into a feature
store (the format, reader and writer are fpt_fast.app.store); and the check of a finished store.

The frozen inputs are made as preload.decode says: the official PIL preprocessing in the DataLoader
workers, or ("gpu") the workers read the files and the GPU decodes and resizes them
(fpt_fast.app.data.decode_on_device; not bit-identical, and recorded in the store's fingerprint).

An interrupted preload resumes with the shards it has not finished; the shards it keeps are
checked whole first (a damaged one is computed again, and said so). Under torchrun the shards
still to write are dealt out to the processes (each writes whole shards and records them in its
part file) and rank 0 merges the part files into each split's index once all are done. One
preload at a time writes a store (its lock: fpt_fast.app.store.StoreLock).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..model import FPT
from .build import build_model, check_store, gpu_decode_device_problem, preload_transform, with_normalization
from .console import Log, Progress, quiet
from .data import (BadImages, DeviceFrozenTransform, FPTDataset, FrozenTransform, ImageFolderSplit, decode_on_device,
                   find_classes, make_loader)
from .distributed import Group, local_device
from .files import DiskFullError, make_folder
from .settings import Settings
from .store import (MANIFEST, FeatureStore, StoreLock, StoreWriter, VerifyReport, fingerprint, measure_read_rate,
                    record_bytes, records_from_features, to_storage, verify)


@dataclass
class SplitReport:
    """What preloading one split did. left_out: messages of the images left out as unreadable;
    damaged: what was wrong with each shard of an earlier run that was computed again."""

    split: str
    samples: int
    shards_written: int
    shards_reused: int
    seconds: float
    left_out: List[str] = field(default_factory=list)
    damaged: List[str] = field(default_factory=list)


@dataclass
class PreloadResult:
    store: Path
    reports: List[SplitReport]
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
    group = Group()
    log = log if group.is_main else quiet
    data, opts = settings.data, settings.preload
    if data.store is None:
        raise ValueError("setting data.store is not set: the folder to write the features to")
    if data.root is None:
        raise ValueError("setting data.root is not set: the folder with train/, val/ and test/")
    device = local_device(opts.device)
    problem = gpu_decode_device_problem(settings, device)
    if problem is not None:
        raise ValueError(f"{problem}: set preload.decode to 'pil' (the official preprocessing)")
    # Before any image is read: a file at data.store, or another preload writing there, stops it.
    # Rank 0 holds the lock for all the processes.
    lock = group.main_first(lambda: StoreLock(make_folder(data.store, "data.store")) if group.is_main else None)
    try:
        return _preload_locked(settings, device, group, log)
    except DiskFullError as e:
        raise e.then("run preload again: it continues with the unfinished shards") from None
    finally:
        if lock is not None:
            lock.release()


def _preload_locked(settings: Settings, device: torch.device, group: Group, log: Log) -> PreloadResult:
    data, opts = settings.data, settings.preload
    classes = find_classes(data.root)
    splits = [ImageFolderSplit(data.root, name, classes) for name in opts.splits]
    train_split = next((s for s in splits if s.split == "train"), None) or ImageFolderSplit(data.root, "train", classes)
    existing = FeatureStore(data.store) if (Path(data.store) / MANIFEST).is_file() else None
    bad_images = BadImages(data.skip_bad_images)
    settings = with_normalization(settings, train_split, existing, log, bad_images, group)
    model = build_model(settings, len(classes))
    config = model.config
    transform = preload_transform(settings, model)
    run_fingerprint = fingerprint(model, transform.description(), opts.dtype, device)
    feature_shape = (len(config.layers), config.backbone_info.num_heads, config.num_selected, config.backbone_info.head_dim)
    # Rank 0 creates the manifest (or checks the existing one) before the others open the store.
    writer = group.main_first(lambda: StoreWriter(data.store, run_fingerprint, feature_shape, classes, opts.shard_mb,
                                                  holds_lock=group.is_main))
    model.to(device).eval()
    where = str(device) if not group.active else f"{group.world_size} processes ({device.type})"
    log(f"preloading into {data.store}: K_sel/V_sel of shape (L={feature_shape[0]}, H={feature_shape[1]}, "
        f"n={feature_shape[2]}, d={feature_shape[3]}) per image, stored as {opts.dtype}, on {where}"
        + (", images decoded and resized on the GPU (preload.decode: gpu, not the official PIL preprocessing)"
           if opts.decode == "gpu" else ""))
    reports = []
    for split in splits:
        report = preload_split(model, writer, split, transform, device, opts.batch_size, bad_images,
                               data.num_workers, settings.train.progress, group)
        reports.append(report)
        bad_images.note(report.left_out)  # every process's, not only this one's
        for problem in report.damaged:
            log(f"  {problem}: computed again")
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
    official = record_bytes(feature_shape, "float32")  # the official code's per-image fp32 files
    per_image = total_bytes / max(images, 1)
    log(f"store: {total_bytes / 2 ** 20:.1f} MiB, {per_image / 1024:.1f} KiB per image (records and index) vs "
        f"{official / 1024:.1f} KiB per image for the official per-image fp32 files ({official / per_image:.2f}x)")
    if bad_images.messages:
        log(bad_images.report())
    return PreloadResult(store.root, reports, per_image, official, bad_images.messages)


def preload_split(model: FPT, writer: StoreWriter, split: ImageFolderSplit,
                  transform: Union[FrozenTransform, DeviceFrozenTransform], device: torch.device, batch_size: int,
                  bad_images: BadImages, num_workers: int = 0, progress: bool = False,
                  group: Optional[Group] = None) -> SplitReport:
    """Computes and stores the features of one split, continuing an interrupted run. With a
    DeviceFrozenTransform the loader delivers the encoded images, decoded on device here.

    Unreadable images go to bad_images (a BadImageError, or, when skipping, a record of zeros, its
    position recorded as left out and its message in the report). Finished shards stay valid.

    group: the processes of a torchrun preload, or None. The shards still to write are dealt out
    round-robin; each process writes its own, records them in its part file, and rank 0 merges
    the part files into the index once all are done. Every process gets the report of the whole
    split.
    """
    group = group or Group()
    start_time = time.perf_counter()
    samples = [(s.path, s.label) for s in split.samples]
    damaged_before = len(writer.damaged)
    index = group.main_first(lambda: writer.open_index(split.split, samples) if group.is_main
                             else writer.read_index(split.split, samples))
    damaged = [f"{e.file.name} {e.problem}" for e in writer.damaged[damaged_before:]]
    per_shard = index["samples_per_shard"]
    total_shards = writer.num_shards(len(samples), per_shard)
    done = {shard["start"] // per_shard for shard in index["shards"]}
    todo = [k for k in range(total_shards) if k not in done]
    mine = todo[group.rank::group.world_size]
    part = group.rank if group.active else None
    left_out: List[Tuple[int, str]] = []
    error = None
    if mine:
        positions = [p for k in mine for p in range(k * per_shard, min((k + 1) * per_shard, len(samples)))]
        dataset = FPTDataset(split, side=None, frozen=transform, positions=positions)
        loader = make_loader(dataset, batch_size, num_workers, device)
        bar = Progress(progress and group.is_main, f"preload {split.split}", total=len(positions), unit="img")
        shard = None
        try:
            for batch in loader:
                if isinstance(transform, DeviceFrozenTransform):
                    batch = decode_on_device(batch, transform, split, device)
                bad_images.handle(batch["bad"])
                left_out += [(sample.position, sample.reason) for sample in batch["bad"]]
                records = _batch_records(model, batch, device, writer.dtype, split)
                # Positions ascend within a process's shards, and each shard's are all there.
                for position in sorted(records):
                    k, offset = divmod(position, per_shard)
                    count = min(per_shard, len(samples) - k * per_shard)
                    if shard is None:
                        shard = writer.new_shard(split.split, k, count)
                    shard.write(records[position], position)
                    if offset == count - 1:
                        shard.close()
                        writer.commit_shard(index, shard, part=part)
                        shard = None
                bar.update(len(batch["label"]) + len(batch["bad"]))
        except (ValueError, TypeError, FileNotFoundError) as e:  # BadImageError is a ValueError
            if not group.active:
                raise
            error = e  # raised below on every process, not left for the others to wait on
        finally:
            if shard is not None:
                shard.discard()
            bar.close()
    elif not todo:
        left_out = [(p, f"{samples[p][0]} (left out in an earlier run)")
                    for shard in index["shards"] for p in shard["left_out"]]
    seconds = time.perf_counter() - start_time
    if not group.active:
        writer.finish(index)
        return SplitReport(split.split, len(samples), len(todo), len(done), seconds, [m for _, m in sorted(left_out)],
                           damaged)
    reports = group.all_gather_object((seconds, left_out, None if error is None else str(error)))
    if error is not None:
        raise error
    failed = [(rank, message) for rank, (_, _, message) in enumerate(reports) if message is not None]
    if failed:
        raise ValueError(f"process {failed[0][0]} stopped: {failed[0][1]}")
    group.broadcast_result(lambda: _merge(writer, split.split, samples))
    left_out = sorted(item for _, items, _ in reports for item in items)
    return SplitReport(split.split, len(samples), len(todo), len(done), max(r[0] for r in reports),
                       [m for _, m in left_out], damaged)


def _merge(writer: StoreWriter, split: str, samples: Sequence[tuple]) -> None:
    writer.merge(split, samples)  # the index stays on rank 0: the others need only "done"


def _batch_records(model: FPT, batch: dict, device: torch.device, dtype: str,
                   split: ImageFolderSplit) -> Dict[int, Optional[np.ndarray]]:
    """{position: (2, L, H, n, d) record in the stored dtype, or None for an unreadable image}.
    ValueError naming the image when its features are not finite (never stored)."""
    records: Dict[int, Optional[np.ndarray]] = {sample.position: None for sample in batch["bad"]}
    if len(batch["label"]):
        features = records_from_features(model.extract(batch["frozen"].to(device, non_blocking=True)))
        finite = torch.isfinite(features.flatten(1)).all(1).tolist()
        if not all(finite):
            path = split.path(batch["position"][finite.index(False)].item())
            raise ValueError(f"the frozen branch computed NaN or inf features for {str(path)!r} (frozen compute dtype "
                             f"{model.frozen.compute_dtype(device)}): nothing of it was stored; a float16 backbone "
                             f"can overflow: set model.frozen_dtype to bfloat16 or float32")
        stacked = to_storage(features, dtype)
        for row, position in enumerate(batch["position"].tolist()):
            records[position] = stacked[row]
    return records


def verify_store(settings: Settings, recompute: int = 4, log: Log = print) -> VerifyReport:
    """Checks data.store (files, CRC-32 checksums, finite values, and ``recompute`` recomputed samples per
    split when data.root is set) and measures its read rate."""
    data = settings.data
    if data.store is None:
        raise ValueError("setting data.store is not set: the store to verify")
    store = FeatureStore(data.store)
    model = transform = None
    device = local_device(settings.preload.device)
    problem = gpu_decode_device_problem(settings, device)
    if problem is not None and data.root is not None and recompute > 0:
        log(f"verify {store.root}: no samples recomputed: {problem}")
        recompute = 0
    if data.root is not None and recompute > 0:
        settings = with_normalization(settings, None, store, log, BadImages(data.skip_bad_images))
        # Recompute as the store's machine computed (a GPU's bfloat16 runs on the CPU too).
        settings = settings.replace("model", frozen_dtype=store.fingerprint["frozen_compute_dtype"],
                                    feature_dtype=store.fingerprint["feature_dtype"])
        model = build_model(settings, len(store.classes))
        transform = preload_transform(settings, model)
        check_store(store, settings, model)
        model.to(device).eval()
    report = verify(store.root, model, transform, data.root, device, recompute if model is not None else 0)
    log(f"verify {store.root}: {report.samples} samples, {report.bytes / 2 ** 20:.1f} MiB of shards"
        + (f", {report.recomputed} recomputed (max relative error {report.max_recompute_error:.2g})"
           if report.recomputed else "")
        + (": OK" if report.ok else ": PROBLEMS\n  " + "\n  ".join(report.problems)))
    if report.ok:
        for name in store.splits():
            samples_per_s, mb_per_s = measure_read_rate(store.split(name, check=False), settings.train.batch_size,
                                                        max_seconds=3.0)  # verify just checked it
            log(f"  read rate {name}: {samples_per_s:.0f} samples/s ({mb_per_s:.0f} MB/s, random batches of "
                f"{settings.train.batch_size}, page cache warm)")
    return report
