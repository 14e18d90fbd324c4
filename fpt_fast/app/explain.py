"""``fpt-fast explain`` and ``fpt-fast predict --explain``: what the frozen model looked at, per image.

The frozen branch already computes, in every extracted layer, the importance of each token (the
attention it receives) and keeps the most important ones; FPT.extract(..., return_scores=True)
returns both, and fpt_fast.model.importance_maps lays them out on the patch grid. For every image
this module writes, under the output folder at the image's path relative to the images' root:

- ``<path>.explain.png``: the frozen input as the model saw it (resized and de-normalised); the
  importance heatmap of each chosen layer, then their mean when there are several (each panel's
  colours run from its own lowest to its highest patch, and the caption gives that range relative
  to a uniform share, 1/N, and the share the class/register tokens took); and the kept tokens
  (brightness grows with the number of (layer, head) pairs that kept the patch, up to the panel's
  most-kept patch, whose count the caption gives; a patch no head kept is dark). With a
  checkpoint, the title names the predicted class and its probability.
- ``<path>.importance.npy``: float32 (layers, heads, grid_h, grid_w), each patch's importance per
  chosen layer and head (a (layer, head) map sums to 1 minus the prefix tokens' share).
- ``<path>.selected.npy``: bool (layers, heads, grid_h, grid_w), whether the head kept the patch.

Figures are drawn with PIL alone (already a dependency), so they look the same on every install.
Outputs that exist already are refused before any work unless overwrite=True, and an output path
that is one of the input images is always refused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torch.utils.data import DataLoader

from ..model import FPT, FPTConfig
from ..model.importance_maps import (TokenLayout, importance_map, kept_fraction, kept_mask, split_prefix, to_pixels,
                                     token_layout)
from .build import build_model, frozen_transform, place_model, with_normalization
from .checkpoints import is_side_only, load_checkpoint, model_from_checkpoint, with_checkpoint_normalization
from .console import Log, Progress
from .data import BadImages, FPTDataset, ImageFolderSplit, ImageList, list_images, make_loader, side_transform
from .distributed import local_device
from .files import atomic_open
from .settings import Settings
from .store import FeatureStore

PathLike = Union[str, Path]
FIGURE_SUFFIX = ".explain.png"
IMPORTANCE_SUFFIX = ".importance.npy"
SELECTED_SUFFIX = ".selected.npy"

TILE = 256            # longest side of one panel, pixels
COLUMNS = 5           # panels per row
HEAT_ALPHA = 0.55     # weight of the heat colour over the image
KEPT_FLOOR = 0.2      # brightness of a patch no head kept
MARGIN = 8
FONT_SIZE = 13
# Anchors of the heat colour scale (near black, purple, red, orange, pale yellow: lightness rises
# monotonically, so it reads in greyscale too), interpolated linearly to 256 entries.
HEAT_ANCHORS = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], np.float32)


# ------------------------------------------------------------------------------ what to explain
def collect_images(items: Sequence[PathLike]) -> ImageList:
    """The images named by items (image files, or folders searched recursively), with paths
    relative to their deepest common folder. FileNotFoundError for a missing item, ValueError when
    nothing is left."""
    if isinstance(items, (str, Path)):
        items = [items]
    files, folders = [], []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise ValueError(f"no image files under {str(path)!r}")
            files += found
            folders.append(path)
        elif path.is_file():
            files.append(path)
            folders.append(path.parent)
        else:
            raise FileNotFoundError(f"image file or folder {str(path)!r} does not exist")
    if not files:
        raise ValueError("no images given")
    # Absolute, not resolved: a symbolic link inside a folder stays inside it.
    files = sorted({Path(os.path.abspath(p)) for p in files})
    root = Path(os.path.commonpath([os.path.abspath(f) for f in folders]))
    return ImageList(root, files)


def chosen_layers(config: FPTConfig, layers: Optional[Sequence[int]]) -> List[int]:
    """The block indices to draw: layers (each an extracted layer of config), or all extracted ones."""
    if layers is None:
        return list(config.layers)
    chosen = sorted(set(int(i) for i in layers))
    unknown = [i for i in chosen if i not in config.layers]
    if not chosen or unknown:
        raise ValueError(f"layers {list(layers)}: expected block indices among the extracted layers "
                         f"{list(config.layers)} of this model")
    return chosen


# ------------------------------------------------------------------------------------ drawing
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_SIZE)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """values in [0, 1], any shape -> (..., 3) float32 RGB in [0, 1] on the heat scale."""
    position = np.clip(values, 0.0, 1.0) * (len(HEAT_ANCHORS) - 1)
    low = np.minimum(position.astype(np.int64), len(HEAT_ANCHORS) - 2)
    weight = (position - low)[..., None]
    return ((1 - weight) * HEAT_ANCHORS[low] + weight * HEAT_ANCHORS[low + 1]) / 255.0


def heat_overlay(image: np.ndarray, pixel_map: np.ndarray) -> np.ndarray:
    """image (h, w, 3) in [0, 1], pixel_map (h, w) -> (h, w, 3): the map, scaled from its minimum
    (0) to its maximum (1; a constant map is all 0), in heat colours over the image."""
    low, high = float(pixel_map.min()), float(pixel_map.max())
    scaled = (pixel_map - low) / (high - low) if high > low else np.zeros_like(pixel_map)
    return (1 - HEAT_ALPHA) * image + HEAT_ALPHA * heat_colours(scaled)


def kept_overlay(image: np.ndarray, fraction: np.ndarray) -> np.ndarray:
    """image (h, w, 3), fraction (h, w) in [0, 1] -> the image, darkened where few heads kept the
    patch: full brightness at the panel's most-kept patch, KEPT_FLOOR where no head kept it."""
    peak = float(fraction.max())
    scaled = fraction / peak if peak > 0 else fraction
    return image * (KEPT_FLOOR + (1 - KEPT_FLOOR) * scaled)[..., None]


def _to_tile(panel: np.ndarray) -> Image.Image:
    """(h, w, 3) in [0, 1] -> a PIL image whose longest side is TILE (patch edges stay sharp when enlarged)."""
    image = Image.fromarray((np.clip(panel, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    h, w = panel.shape[:2]
    scale = TILE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX)


def compose_figure(panels: Sequence[Tuple[np.ndarray, Sequence[str]]], title: Sequence[str],
                   legend: Sequence[str]) -> Image.Image:
    """One figure: title lines, the panels ((h, w, 3) arrays in [0, 1], each with caption lines) in
    rows of COLUMNS, a heat colour bar and the legend lines."""
    font = _font()
    line = FONT_SIZE + 4
    tiles = [(_to_tile(array), caption) for array, caption in panels]
    text_w = max(font.getlength(text) for _, caption in tiles for text in caption)
    tile_w = max(max(t.width for t, _ in tiles), int(text_w) + 1)
    tile_h = max(t.height for t, _ in tiles)
    caption_lines = max(len(c) for _, c in tiles)
    columns = min(COLUMNS, len(tiles))
    rows = -(-len(tiles) // columns)
    cell_w, cell_h = tile_w + MARGIN, tile_h + caption_lines * line + MARGIN
    title_h = len(title) * line + MARGIN
    bar_h = 12
    legend_h = bar_h + MARGIN + len(legend) * line + MARGIN
    width = max(columns * cell_w + MARGIN, MARGIN + int(max(font.getlength(t) for t in (*title, *legend))) + MARGIN)
    height = title_h + MARGIN + rows * cell_h + legend_h
    figure = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(figure)
    for i, text in enumerate(title):
        draw.text((MARGIN, MARGIN + i * line), text, fill="black", font=font)
    for i, (tile, caption) in enumerate(tiles):
        x = MARGIN + (i % columns) * cell_w
        y = title_h + MARGIN + (i // columns) * cell_h
        figure.paste(tile, (x, y))
        for j, text in enumerate(caption):
            draw.text((x, y + tile_h + 2 + j * line), text, fill="black", font=font)
    y = title_h + MARGIN + rows * cell_h
    bar = heat_colours(np.linspace(0.0, 1.0, TILE, dtype=np.float32))[None].repeat(bar_h, axis=0)
    figure.paste(Image.fromarray((bar * 255.0 + 0.5).astype(np.uint8)), (MARGIN, y))
    for i, text in enumerate(legend):
        draw.text((MARGIN, y + bar_h + MARGIN // 2 + i * line), text, fill="black", font=font)
    return figure


# ------------------------------------------------------------------------------------ writing
class ExplanationWriter:
    """Writes the figure and raw maps of each image of ``images`` under out_dir (see the module
    docstring). Refuses, when made (before any work), outputs that exist (unless overwrite) or that
    are inputs.

    config: the model's FPTConfig; layers: block indices to draw (None: every extracted layer);
    classes: class names, for the predicted class in the title.
    """

    def __init__(self, out_dir: PathLike, images: ImageList, config: FPTConfig,
                 layers: Optional[Sequence[int]] = None, classes: Optional[Sequence[str]] = None,
                 overwrite: bool = False):
        self.out_dir = Path(out_dir)
        self.images = images
        self.config = config
        self.layers = chosen_layers(config, layers)
        self.layer_positions = [config.layers.index(i) for i in self.layers]  # along the scores' L
        self.classes = list(classes) if classes is not None else None
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"output folder {str(self.out_dir)!r} is a file")
        inputs = {images.path(i).resolve() for i in range(len(images))}
        clashes, existing = [], []
        for i in range(len(images)):
            for path in self.outputs(i):
                if path.resolve() in inputs:
                    clashes.append(str(path))
                elif path.exists():
                    existing.append(str(path))
        if clashes:
            raise ValueError(f"{len(clashes)} output path(s) are input images, e.g. {clashes[0]!r}: choose another "
                             f"output folder")
        if existing and not overwrite:
            raise ValueError(f"{len(existing)} output file(s) exist already, e.g. {existing[0]!r}: choose another "
                             f"output folder, or pass --overwrite to replace them")

    def outputs(self, position: int) -> Tuple[Path, Path, Path]:
        """(figure, importance, selected) paths of the image at position."""
        base = self.out_dir / self.images.samples[position].path
        return tuple(base.with_name(base.name + suffix) for suffix in (FIGURE_SUFFIX, IMPORTANCE_SUFFIX,
                                                                         SELECTED_SUFFIX))

    def write(self, position: int, image: Tensor, scores: Tensor, indices: Tensor,
              probabilities: Optional[np.ndarray] = None) -> None:
        """One image's outputs. image: (3, h, w) in [0, 1], the frozen branch's input before its
        normalisation; scores (L, H, N) and indices (L, H, n): this image's FeaturesWithScores
        slices (every extracted layer); probabilities: (C,) or None."""
        layout = token_layout(self.config, image.shape[-2:])
        scores = scores[self.layer_positions, None].float().cpu()      # (L', 1, H, N): one image
        indices = indices[self.layer_positions, None].cpu()
        figure_path, importance_path, selected_path = self.outputs(position)
        figure_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(importance_path) as f:
            np.save(f, split_prefix(scores[:, 0], layout)[1].numpy())
        with atomic_open(selected_path) as f:
            np.save(f, split_prefix(kept_mask(indices[:, 0], layout), layout)[1].numpy())
        with atomic_open(figure_path) as f:
            self.figure(position, image, scores, indices, probabilities, layout).save(f, format="PNG")

    def figure(self, position: int, image: Tensor, scores: Tensor, indices: Tensor,
               probabilities: Optional[np.ndarray], layout: TokenLayout) -> Image.Image:
        """The PNG figure of write(): scores (L', 1, H, N) and indices (L', 1, H, n) of the chosen layers."""
        N, (h, w) = layout.num_tokens, image.shape[-2:]
        ch, cw = layout.covered_size
        image = np.clip(image.float().cpu().numpy()[:, :ch, :cw].transpose(1, 2, 0), 0.0, 1.0)
        panels = [(image, ["input as the model saw it", f"{w}x{h} px"])]
        groups = [([p], f"layer {layer}") for p, layer in enumerate(self.layers)]
        if len(self.layers) > 1:
            groups.append((None, "mean of layers " + ", ".join(str(i) for i in self.layers)))
        for positions, name in groups:
            heat = importance_map(scores, layout, positions)[0]
            picked = scores if positions is None else scores[positions]
            prefix_share = float(split_prefix(picked, layout)[0].sum(-1).mean())
            caption = [name, f"{float(heat.min()) * N:.2f}x to {float(heat.max()) * N:.2f}x uniform",
                       f"class/register tokens: {100 * prefix_share:.0f}%"]
            panels.append((heat_overlay(image, to_pixels(heat, layout).numpy()), caption))
        kept = kept_fraction(indices, layout)[0]
        pairs = scores.shape[0] * scores.shape[2]
        over = f"{pairs} (layer, head) pairs" if len(self.layers) > 1 else f"{pairs} heads"
        panels.append((kept_overlay(image, to_pixels(kept, layout).numpy()),
                       ["kept tokens", f"{indices.shape[-1]} of {N} per head; brightest:",
                        f"kept by {round(float(kept.max()) * pairs)} of {over}"]))
        title = [self.images.samples[position].path]
        if probabilities is not None:
            best = int(np.argmax(probabilities))
            title.append(f"prediction: {self.classes[best]} (p = {probabilities[best]:.3f})")
        legend = ["importance: the attention each patch receives (mean over queries and heads),",
                  "from the panel's lowest patch (dark) to its highest (light); 1x uniform = 1/N of all attention",
                  "kept tokens: the more heads kept a patch, the brighter it is; dark = kept by none"]
        return compose_figure(panels, title, legend)


# ------------------------------------------------------------------------------------ running
@torch.no_grad()
def explain_batches(model: FPT, loader: DataLoader, device: torch.device, writer: ExplanationWriter,
                    settings: Settings, bad_images: BadImages, with_predictions: bool
                    ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Runs the frozen branch (with its scores) over loader (FPTDataset items with "frozen", and
    "side" for predictions) and writes every image's explanation; with_predictions also runs the
    learnable branch. settings: data.mean / data.std (numbers) undo the frozen input's
    normalisation for the figures; train.progress, train.amp. Returns (positions (N,),
    probabilities (N, C) float64 or None). ValueError when no image was readable."""
    model.eval()
    mean = torch.tensor(settings.data.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(settings.data.std, dtype=torch.float32).view(3, 1, 1)
    progress, autocast = settings.train.progress, settings.train.amp and device.type == "cuda"
    positions, probabilities = [], []
    bar = Progress(progress, "explain", total=len(loader))
    for batch in loader:
        bar.update()
        bad_images.handle(batch["bad"])
        if len(batch["position"]) == 0:
            continue
        frozen = batch["frozen"].to(device, non_blocking=True)
        extracted = model.extract(frozen, return_scores=True)
        probs = None
        if with_predictions:
            side = batch["side"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model.forward_from_features(side, extracted.features)
            probs = logits.float().softmax(-1).double().cpu()
            probabilities.append(probs)
        for b, position in enumerate(batch["position"].tolist()):
            writer.write(position, batch["frozen"][b] * std + mean, extracted.scores[:, b], extracted.indices[:, b],
                         None if probs is None else probs[b].numpy())
        positions.append(batch["position"])
    bar.close()
    if not positions:
        raise ValueError("no readable image to explain")
    return torch.cat(positions).numpy(), torch.cat(probabilities).numpy() if with_predictions else None


def check_explainable(checkpoint: dict, checkpoint_path: PathLike) -> None:
    """ValueError for a checkpoint of the side network alone: its predictions use no frozen-branch
    feature, so the frozen branch's maps would not explain them."""
    if is_side_only(checkpoint):
        raise ValueError(f"checkpoint {str(checkpoint_path)!r} is a side-network-alone model: its predictions "
                         f"use nothing of the frozen branch, so there is nothing of it to explain")


def _frozen_only_settings(settings: Settings, log: Log, bad_images: BadImages) -> Settings:
    """settings with numeric data.mean / data.std when there is no checkpoint: given, or the feature
    store's (data.store), or computed from data.root's train split."""
    data = settings.data
    if "auto" not in (data.mean, data.std):
        return settings
    store = FeatureStore(data.store) if data.store is not None else None
    train_split = ImageFolderSplit(data.root, "train") if store is None and data.root is not None else None
    return with_normalization(settings, train_split, store, log, bad_images)


def explain(settings: Settings, images: Sequence[PathLike], out_dir: PathLike,
            checkpoint_path: Optional[PathLike] = None, layers: Optional[Sequence[int]] = None,
            overwrite: bool = False, log: Log = print) -> List[Path]:
    """Writes the explanation of every image of ``images`` (files or folders) under out_dir; with a
    checkpoint (best.pt of a training run; settings must be its own, see fpt_fast.app.cli) the
    figures name its predicted class. layers: block indices to draw (default: every extracted
    layer). Returns the figure paths."""
    image_list = collect_images(images)
    device = local_device(settings.train.device)
    bad_images = BadImages(settings.data.skip_bad_images)
    checkpoint = classes = None
    if checkpoint_path is not None:
        checkpoint = load_checkpoint(checkpoint_path)
        check_explainable(checkpoint, checkpoint_path)
        classes = checkpoint["classes"]
    # Without a checkpoint only the frozen branch runs: any valid class count does for the rest.
    num_classes = len(classes) if classes is not None else None if settings.model["num_classes"] else 1
    writer = ExplanationWriter(out_dir, image_list, settings.fpt_config(num_classes), layers, classes, overwrite)
    if checkpoint is not None:
        settings = with_checkpoint_normalization(settings, checkpoint)
        model = model_from_checkpoint(checkpoint, settings)
    else:
        settings = _frozen_only_settings(settings, log, bad_images)
        model = build_model(settings, num_classes)
    data = settings.data
    side = side_transform(data, model.config.side_input_size, train=False) if classes is not None else None
    dataset = FPTDataset(image_list, side, frozen_transform(settings, model))
    place_model(model, device, features_online=True)
    loader = make_loader(dataset, settings.train.eval_batch_size, data.num_workers, device)
    positions, _ = explain_batches(model, loader, device, writer, settings, bad_images,
                                   with_predictions=classes is not None)
    figures = [writer.outputs(p)[0] for p in positions]
    log(f"wrote {len(figures)} explanation figure(s) and their maps to {out_dir}")
    if bad_images.messages:
        log(bad_images.report())
    return figures
