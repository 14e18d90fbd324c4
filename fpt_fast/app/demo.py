"""``fpt-fast demo``: FPT against the side network alone on a task only fine detail can solve.

The synthetic data set: 128x128 images with a smooth random background and a few round "lesions"
(darker, visible at any resolution). The three classes differ only in the texture inside the
lesions: vertical stripes, horizontal stripes or a checkerboard, all of period 2 pixels and the
same mean. The frozen branch sees the image at 128 px; the side network at 32 px, where a 4x
antialiased downsampling averages every period-2 pattern away exactly. So the side network alone
is left at chance, while FPT reads the texture through the frozen branch's selected keys/values
(even with a random, untrained backbone: its patch embedding is a linear map of 16x16 pixels that
keeps the textures apart).

Everything runs on the CPU in about a minute: a 4-block ViT-Tiny frozen backbone with random
weights (no download), the FPT+ preset, a feature store, 10 epochs of training for each model.
Last, it explains FPT's prediction on one test image (fpt_fast.app.explain): <out>/explain/.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

from .settings import Settings, load_settings

CLASSES = ("checker", "horizontal", "vertical")
IMAGES_PER_CLASS = {"train": 80, "val": 20, "test": 40}
IMAGE_SIZE = 128
SIDE_SIZE = 32
TEXTURE_AMPLITUDE = 0.1
DEFAULT_EPOCHS = 10
# The test image whose explanation the demo draws (a texture class: the lesions carry the answer).
EXPLAINED_IMAGE = "test/vertical/vertical_0001.png"


# ------------------------------------------------------------------------------ the data
def make_image(rng: np.random.Generator, label: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """One (size, size, 3) uint8 image of class label (index into CLASSES)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = np.tile(rng.uniform(0.3, 0.7, 3).astype(np.float32), (size, size, 1))
    for _ in range(rng.integers(2, 5)):  # smooth background blobs
        cy, cx = rng.uniform(0, size, 2)
        sigma = rng.uniform(0.08, 0.3) * size
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma * sigma))
        image += blob[..., None] * rng.uniform(-0.3, 0.3, 3).astype(np.float32)
    lesions = np.zeros((size, size), np.float32)
    for _ in range(3):
        cy, cx = rng.uniform(0.125 * size, 0.875 * size, 2)
        radius = rng.uniform(0.11, 0.2) * size
        lesions = np.maximum(lesions, ((yy - cy) ** 2 + (xx - cx) ** 2 < radius * radius).astype(np.float32))
    # Period-2 patterns of zero mean: any 2x2 average (hence the 4x downsampling) removes them.
    texture = {"checker": (xx + yy) % 2, "horizontal": yy % 2, "vertical": xx % 2}[CLASSES[label]] * 2 - 1
    image -= 0.15 * lesions[..., None]
    image += TEXTURE_AMPLITUDE * (texture * lesions)[..., None]
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def generate_dataset(root: Path, seed: int = 0, images_per_class: Optional[Dict[str, int]] = None) -> Path:
    """Writes root/{train,val,test}/<class>/<i>.png deterministically from seed. An existing
    complete data set of the same recipe is reused; the folder appears atomically (renamed into place)."""
    images_per_class = images_per_class or IMAGES_PER_CLASS
    recipe = {"seed": seed, "images_per_class": images_per_class, "size": IMAGE_SIZE, "classes": list(CLASSES),
              "amplitude": TEXTURE_AMPLITUDE, "version": 1}
    marker = root / "recipe.json"
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return root
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for split_index, (split, count) in enumerate(images_per_class.items()):
        for label, name in enumerate(CLASSES):
            folder = tmp / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                rng = np.random.default_rng([seed, split_index, label, i])
                Image.fromarray(make_image(rng, label)).save(folder / f"{name}_{i:04d}.png")
    (tmp / "recipe.json").write_text(json.dumps(recipe))
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root


# ----------------------------------------------------------------------------- the run
def demo_settings(out: Path, epochs: Optional[int] = None, seed: int = 0) -> Settings:
    """Settings of the demo: FPT+ on a random 4-block ViT-Tiny, 128 px frozen input, 32 px side input."""
    out = Path(out)
    overrides = [
        "model.preset=fpt+", "model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs={depth: 4}",
        "model.pretrained=false", f"model.image_size={IMAGE_SIZE}", f"model.side_input_size={SIDE_SIZE}",
        f"data.root={out / 'data'}", f"data.store={out / 'store'}", "data.num_workers=0",
        "preload.batch_size=60", "preload.shard_mb=8",
        f"train.epochs={epochs or DEFAULT_EPOCHS}", "train.batch_size=32", "train.lr=1e-3", "train.warmup_epochs=1",
        f"train.seed={seed}", f"train.out_dir={out / 'runs' / 'fpt'}", "train.tensorboard=false",
    ]
    return load_settings(None, overrides)


@dataclass
class DemoReport:
    fpt: dict
    side_only: dict
    fpt_losses: List[float]
    side_losses: List[float]
    learnable_share: float
    vit_b_share: float
    bytes_per_image: float
    official_bytes_per_image: int
    explain_figure: Path
    seconds: float


def vit_b_learnable_share(preset: str = "fpt+") -> float:
    """Learnable share of the preset on ViT-B/16-384, counted on the meta device (no memory)."""
    import torch

    from ..model import FPT, FPTConfig

    with torch.device("meta"):
        config = FPTConfig.preset(preset, backbone="vit_base_patch16_384", num_classes=len(CLASSES))
        return FPT(config).learnable_share()


def run_demo(out: Path = Path("fpt_demo"), epochs: Optional[int] = None, seed: int = 0, progress: bool = True,
             images_per_class: Optional[Dict[str, int]] = None, log=print) -> DemoReport:
    """Generates the data, preloads, trains FPT and the side network alone, evaluates both on the
    test split and prints the comparison. images_per_class: per split (default IMAGES_PER_CLASS)."""
    from .evaluation import evaluate
    from .explain import explain
    from .preloading import preload
    from .training import train

    start = time.perf_counter()
    out = Path(out)
    settings = demo_settings(out, epochs, seed).replace("train", progress=progress)
    images_per_class = images_per_class or IMAGES_PER_CLASS
    log(f"== data: {sum(images_per_class.values()) * len(CLASSES)} synthetic {IMAGE_SIZE}x{IMAGE_SIZE} images in "
        f"{out / 'data'}")
    generate_dataset(out / "data", seed, images_per_class)
    log("== preload")
    stored = preload(settings, log=log)
    log("== train FPT (fusion module + side network, features from the store)")
    fpt_run = train(settings, log=log, overwrite=True)  # the demo's own folder: a rerun replaces its runs
    fpt_eval = evaluate(fpt_run.settings, fpt_run.out_dir / "best.pt", "test", log=log)
    # The same resolved settings (mean/std, classes) with the prompts and frozen branch switched off.
    side_settings = fpt_run.settings.replace("train", side_only=True, out_dir=str(out / "runs" / "side_only"))
    log("== train the side network alone (same ViT, same data and schedule, no prompts)")
    side_run = train(side_settings, log=log, overwrite=True)
    side_eval = evaluate(side_run.settings, side_run.out_dir / "best.pt", "test", log=log)
    log("== explain FPT's prediction on one test image")
    # The demo's own folder: a rerun replaces its figure.
    figure, = explain(fpt_run.settings, [out / "data" / EXPLAINED_IMAGE], out / "explain",
                      fpt_run.out_dir / "best.pt", overwrite=True, log=log)
    report = DemoReport(fpt_eval.metrics, side_eval.metrics, [r["train_loss"] for r in fpt_run.history],
                        [r["train_loss"] for r in side_run.history], fpt_run.learnable_share,
                        vit_b_learnable_share(settings.model["preset"]), stored.bytes_per_image,
                        stored.official_bytes_per_image, figure, time.perf_counter() - start)
    log(format_report(report))
    return report


def format_report(report: DemoReport) -> str:
    def losses(values):
        return " ".join(f"{v:.3f}" for v in values)

    fpt, side = report.fpt, report.side_only
    return "\n".join([
        "",
        "================ FPT demo report ================",
        f"task: {len(CLASSES)} classes ({', '.join(CLASSES)}) told apart only by a period-2 texture inside the",
        f"      lesions, seen by the frozen branch at {IMAGE_SIZE} px, averaged away at the side input "
        f"of {SIDE_SIZE} px",
        f"learnable parameters: {100 * report.learnable_share:.2f}% of this demo model (tiny random backbone); "
        f"{100 * report.vit_b_share:.2f}% for FPT+ on ViT-B/16-384",
        f"feature store: {report.bytes_per_image / 1024:.1f} KiB per image (bf16 shards) vs "
        f"{report.official_bytes_per_image / 1024:.1f} KiB per official fp32 per-image file",
        f"training loss per epoch, FPT:       {losses(report.fpt_losses)}",
        f"training loss per epoch, side only: {losses(report.side_losses)}",
        "",
        f"{'test split':<22}{'accuracy':>10}{'AUC':>10}{'F1':>10}{'kappa':>10}",
        f"{'FPT':<22}{fpt['acc']:>10.3f}{fpt['auc']:>10.3f}{fpt['f1']:>10.3f}{fpt['kappa']:>10.3f}",
        f"{'side network alone':<22}{side['acc']:>10.3f}{side['auc']:>10.3f}{side['f1']:>10.3f}{side['kappa']:>10.3f}",
        f"FPT ahead by {fpt['acc'] - side['acc']:+.3f} accuracy and {fpt['auc'] - side['auc']:+.3f} AUC "
        f"(chance: accuracy {1 / len(CLASSES):.3f}, AUC 0.5)",
        f"what FPT's frozen branch looked at in one test image: {report.explain_figure}",
        f"total time {report.seconds:.0f} s",
        "=================================================",
    ])
