"""`python -m benchmarks.preload`: preloading's images/s from JPEG files at 512 and 1024 px, against
the frozen forward alone, with the machine's DataLoader workers: does decoding and resizing bound it?

JPEG files are generated in the run (--images of --source-size, smooth fundus-like content with a
little noise, quality 95, in parallel) into an ImageFolder layout under a temporary folder. Rows
(op "preload", keyed as every row; images_per_s on each):
    decode    pil_loader        the input pipeline alone: fpt_fast.app.data's FPTDataset (PIL decode,
                                PIL resize of the 8-bit image as the official code does, normalisation)
                                through make_loader with --workers processes (default: every core), no model
    forward   frozen_forward    the frozen branch alone on batches already on the device
    pipeline  pil_loader+frozen the loader feeding the frozen branch: what preloading runs (without
                                writing the store); its row says what bounds it
    decode    gpu_decode        the option preload.decode: gpu as fpt_fast runs it: the workers read the
                                files (fpt_fast.app.data.read_encoded_image), the device decodes the
                                JPEG files (torchvision.io.decode_jpeg, nvJPEG), resizes and normalises
                                (decode_on_device, DeviceFrozenTransform; not bit-identical to PIL:
                                levels_vs_pil_max and share_off_vs_pil compare its frozen inputs of
                                the first 8 files with the official ones, in levels of 255)
    pipeline  gpu_decode+frozen the option feeding the frozen branch: preloading with decode gpu; its row
                                gives its speed against pil_loader+frozen
Without CUDA the gpu_decode rows run only with --smoke, on the CPU (torchvision's CPU decoder: a
stand-in for the code path, labelled cpu like every smoke row). Loader figures are steady state:
timed from the first batch delivered (worker start-up excluded, and reported apart as startup_s).
"""
from __future__ import annotations

import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple

import numpy as np
import torch

from . import common
from .training import BACKBONES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------ JPEG files
@functools.lru_cache(maxsize=4)
def _disc(width: int, height: int) -> np.ndarray:
    """(height, width, 1) float32: 1 inside a centred disc, falling off steeply at its rim."""
    yy, xx = np.ogrid[0:height, 0:width]
    r = np.sqrt((yy - height / 2) ** 2 + (xx - width / 2) ** 2) / (0.45 * min(height, width))
    return np.clip(1.2 - r ** 4, 0, 1).astype(np.float32)[..., None]


def synthetic_image(seed: int, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8: a bright disc on black with smooth colour variation and a little
    noise, so that JPEG compresses it like a photograph rather than like white noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8))
    field = np.asarray(coarse.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255
    tile = rng.normal(0, 0.015, (256, 256, 3)).astype(np.float32)
    noise = np.tile(tile, (height // 256 + 1, width // 256 + 1, 1))[:height, :width]
    base = np.array([0.8, 0.35, 0.15], dtype=np.float32)
    image = _disc(width, height) * (base + 0.25 * field) + noise
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _write_jpeg(job: Tuple[Path, int, int, int]) -> int:
    from PIL import Image

    path, seed, width, height = job
    Image.fromarray(synthetic_image(seed, width, height)).save(path, quality=95)
    return path.stat().st_size


def make_jpegs(root: Path, count: int, width: int, height: int, workers: int) -> dict:
    """root/train/{a,b}/NNNNN.jpg; returns the count, total bytes and seconds it took."""
    jobs = []
    for i in range(count):
        folder = root / "train" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{i:05d}.jpg", i, width, height))
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        sizes = list(pool.map(_write_jpeg, jobs, chunksize=4))
    return {"images": count, "bytes": sum(sizes), "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------- timing
def steady_rate(batches: Iterable, consume: Callable[[dict], int], device) -> dict:
    """Runs consume over every batch; images/s from the first delivered batch to the end (its
    images excluded), the seconds until the first batch (worker start-up), and median_ms: the
    median host time between consecutive batches (ms per batch)."""
    start = time.perf_counter()
    first_time, first_count, total, stamps = None, 0, 0, []
    for batch in batches:
        n = consume(batch)
        total += n
        if first_time is None:
            common.sync(device)
            first_time, first_count = time.perf_counter(), n
        stamps.append(time.perf_counter())
    common.sync(device)
    end = time.perf_counter()
    if first_time is None or total <= first_count:
        raise RuntimeError("too few batches to time a steady state: raise --images")
    intervals = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])] or [(end - first_time) * 1e3]
    return {"images_per_s": (total - first_count) / (end - first_time), "startup_s": first_time - start,
            "images": total, "seconds": end - start, "median_ms": statistics.median(intervals)}


# --------------------------------------------------------------------------------- rows
def bench_resolution(args, res: int, root: Path, device, budget, gen, label: str) -> List[dict]:
    from fpt_fast import FPTConfig, FrozenBranch
    from fpt_fast.app.data import (DeviceFrozenTransform, FPTDataset, FrozenTransform, ImageFolderSplit,
                                   decode_on_device, make_loader)

    spec = BACKBONES[args.backbone]
    shape = f"{spec[1]}@{res} B={args.batch} from {args.source_size[0]}x{args.source_size[1]} JPEG"
    params = dict(model=spec[1], resolution=res, batch=args.batch, workers=args.workers,
                  source=f"{args.source_size[0]}x{args.source_size[1]}", images=args.images)
    rows = []

    def measure(mode, provider, *measurements, dtype="float32", reason=None) -> None:
        """A row with the fields of each measurement in turn (callables returning dicts), or
        skipped (reason, or the budget spent), or failed (the fields measured before stay)."""
        r = common.row("preload", provider, mode, shape, dtype, label, params=params)
        rows.append(r)
        reason = reason or (budget.reason if budget.expired() else None)
        if reason is not None:
            r.update(status="skipped", reason=reason)
            return
        try:
            for measurement in measurements:
                r.update(measurement())
        except Exception as exc:
            r.update(common.failure_fields(exc))

    split = ImageFolderSplit(root, "train")
    transform = FrozenTransform((res, res), IMAGENET_MEAN, IMAGENET_STD)
    dataset = FPTDataset(split, side=None, frozen=transform)

    def loader():
        return make_loader(dataset, args.batch, args.workers, torch.device(device))

    def count(batch):
        return len(batch["label"])

    measure("decode", "pil_loader", lambda: steady_rate(loader(), count, "cpu"))

    with torch.device(device):
        frozen = FrozenBranch(FPTConfig.preset("fpt", backbone=spec[0], backbone_kwargs=dict(spec[2]),
                                               image_size=res))
    dtype_text = common.dtype_name(frozen.compute_dtype(torch.device(device)))
    x = torch.randn(args.batch, 3, res, res, device=device, generator=gen)

    def forward_alone():
        ms = common.time_ms(lambda: frozen(x), device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        return dict(median_ms=ms, images_per_s=args.batch / (ms * 1e-3))
    measure("forward", "frozen_forward", forward_alone, dtype=dtype_text)
    del x

    def extract(batch):
        frozen(batch["frozen"].to(device, non_blocking=True))
        return len(batch["label"])

    measure("pipeline", "pil_loader+frozen", lambda: steady_rate(loader(), extract, device), dtype=dtype_text)

    gpu_transform = DeviceFrozenTransform((res, res), IMAGENET_MEAN, IMAGENET_STD)
    gpu_dataset = FPTDataset(split, side=None, frozen=gpu_transform)

    def gpu_batches():
        for batch in make_loader(gpu_dataset, args.batch, args.workers, torch.device(device)):
            yield decode_on_device(batch, gpu_transform, split, torch.device(device))

    gpu_reason = gpu_decode_reason(device, args.smoke)
    measure("decode", "gpu_decode", lambda: steady_rate(gpu_batches(), count, device),
            lambda: pixels_against_pil(split, transform, gpu_transform, device), reason=gpu_reason)
    measure("pipeline", "gpu_decode+frozen", lambda: steady_rate(gpu_batches(), extract, device), dtype=dtype_text,
            reason=gpu_reason)

    del frozen
    common.clear(device)
    add_bound(rows)
    return rows


def pixels_against_pil(split, official, gpu_transform, device, images: int = 8) -> dict:
    """How far the option's frozen inputs are from the official ones on the first images, in levels
    of 255: the largest difference and the share of pixel values off by half a level or more."""
    from fpt_fast.app.data import frozen_inputs

    paths = [split.path(p) for p in range(min(images, len(split)))]
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    got = frozen_inputs(gpu_transform, paths, torch.device(device)).cpu()
    want = frozen_inputs(official, paths, torch.device("cpu"))
    levels = ((got - want) * std * 255).abs()
    return {"levels_vs_pil_max": levels.max().item(), "share_off_vs_pil": (levels >= 0.5).float().mean().item()}


def gpu_decode_reason(device, smoke: bool) -> Optional[str]:
    """Why the gpu_decode rows do not run here (None when they do)."""
    if torch.device(device).type != "cuda" and not smoke:
        return "preload.decode gpu needs a CUDA device (--smoke runs its code path on the CPU)"
    return None


def add_bound(rows: List[dict]) -> None:
    """On the pipeline row: what bounds preloading (the slower of the loader alone and the frozen
    forward alone), the pipeline's share of each, and the GPU decode option's pipeline against it."""
    by = {r["provider"]: r for r in rows if r["status"] == "ok"}
    loader, forward, pipe = by.get("pil_loader"), by.get("frozen_forward"), by.get("pil_loader+frozen")
    if not (loader and forward and pipe):
        return
    pipe["vs_loader_alone"] = pipe["images_per_s"] / loader["images_per_s"]
    pipe["vs_forward_alone"] = pipe["images_per_s"] / forward["images_per_s"]
    if loader["images_per_s"] < forward["images_per_s"]:
        pipe["bound"] = (f"decoding and resizing: the loader alone gives {loader['images_per_s']:.0f} img/s, "
                         f"the frozen forward alone {forward['images_per_s']:.0f} img/s")
    else:
        pipe["bound"] = (f"the frozen forward: {forward['images_per_s']:.0f} img/s alone, the loader "
                         f"{loader['images_per_s']:.0f} img/s")
    gpu_pipe = by.get("gpu_decode+frozen")
    if gpu_pipe is not None:
        pipe["gpu_decode_vs_pil"] = gpu_pipe["images_per_s"] / pipe["images_per_s"]


# --------------------------------------------------------------------------------- main
def parse_args(argv):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--resolutions", type=common.int_list, default=None, help="default 512,1024 (64 in --smoke)")
    p.add_argument("--images", type=int, default=None, help="JPEG files generated (default 384; 12 in --smoke)")
    p.add_argument("--source-size", type=common.int_list, default=None,
                   help="width,height of the JPEG files (default 2048,1536, a fundus photograph's order; "
                        "96,80 in --smoke)")
    p.add_argument("--batch", type=int, default=None, help="default 32 (4 in --smoke)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: os.cpu_count())")
    p.add_argument("--backbone", default=None, help=f"one of {sorted(BACKBONES)} (default vit_b16; tiny in --smoke)")
    p.add_argument("--folder", default=None, help="where the JPEG files go (default: a temporary folder, removed)")
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None)
    args = p.parse_args(argv)
    smoke = args.smoke
    args.resolutions = args.resolutions or ([64] if smoke else [512, 1024])
    args.images = args.images or (12 if smoke else 384)
    args.source_size = args.source_size or ([96, 80] if smoke else [2048, 1536])
    args.batch = args.batch or (4 if smoke else 32)
    args.workers = (os.cpu_count() or 1) if args.workers is None else args.workers
    args.backbone = args.backbone or ("tiny" if smoke else "vit_b16")
    args.warmup_ms = args.warmup_ms or (1 if smoke else 25)
    args.rep_ms = args.rep_ms or (5 if smoke else 100)
    if len(args.source_size) != 2:
        p.error("--source-size takes width,height")
    if args.backbone not in BACKBONES:
        p.error(f"unknown backbone {args.backbone!r}; expected one of {sorted(BACKBONES)}")
    return args


def main(argv=None) -> List[dict]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device, budget, gen, saver = common.start_run(args, "preload")
    label = common.device_label(device)
    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="fpt_fast_preload_"))
    try:
        made = make_jpegs(folder, args.images, *args.source_size, workers=args.workers)
        print(f"generated {made['images']} JPEG files of {args.source_size[0]}x{args.source_size[1]} "
              f"({made['bytes'] / made['images'] / 1024:.0f} KiB each) in {made['seconds']:.1f} s")
        for res in args.resolutions:
            saver.add(bench_resolution(args, res, folder, device, budget, gen, label), extra={"preload_jpegs": made})
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)
    path = saver.add([])
    print(summary(saver.rows))
    print(f"wrote {len(saver.rows)} rows to {path}")
    return saver.rows


def summary(rows: List[dict]) -> str:
    return common.text_table(rows, [
        ("mode", "<9", lambda r: r["mode"]), ("provider", "<18", lambda r: r["provider"]),
        ("shape", "<36", lambda r: r["shape"][:36]),
        ("img/s", ">9", lambda r: common.fmt(r.get("images_per_s"), ".1f")),
        ("bound", "<60", lambda r: (r.get("bound") or "")[:60])])


if __name__ == "__main__":
    main()
