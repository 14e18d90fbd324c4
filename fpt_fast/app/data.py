"""Images for FPT: the ImageFolder layout, image decoding, the two input transforms, datasets.

Layout: root/{train,val,test}/<class>/<image>; classes are the sorted sub-folder names of train/.
Hidden files and folders (names starting with ".", such as .ipynb_checkpoints) are ignored in
every split and in the folders given to predict; a class folder without images is an error.
Every image is decoded to an 8-bit RGB PIL image (fpt_fast.model.preprocessing.as_rgb8): grayscale
is repeated to three channels, alpha is dropped (PIL's convert("RGB"), as the official loader does),
16-bit images are scaled to 8 bits.

Two transforms per image, the official ones (fpt_fast.model.preprocessing; docs/method.md, section 3):
- frozen branch (FrozenTransform): PIL bilinear resize of the uint8 image to model.image_size,
  normalise; never augmented (so it can be preloaded). Preloading may instead decode JPEG files
  and resize on the GPU (preload.decode: gpu; DeviceFrozenTransform, not bit-identical): the
  workers then only read the files (read_encoded_image) and decode_on_device makes the batch's
  frozen inputs on the device.
- side network (SideTransform): train: horizontal flip, colour jitter, random resized crop to
  side_input_size (in that order, on the PIL image), normalise; eval: resize to side_input_size,
  normalise.

Unreadable images follow one policy (BadImages): stop with a BadImageError naming the file, or
(data.skip_bad_images) leave them out and list them at the end. Every DataLoader is made by
make_loader.

Augmentation randomness is a pure function of (seed, epoch, sample position), and the order of
an epoch a function of (seed, epoch) (EpochBatches), so a run gives the same batches whatever the
number of workers or of torchrun processes, and a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..model.preprocessing import (DeviceFrozenTransform, FrozenTransform, SideTransform, as_rgb8,
                                   device_decodable_jpeg, image_pixels, resize_to_tensor)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")


class BadImageError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


class BadImages:
    """The policy for unreadable images: stop at the first (its BadImageError), or, with skip,
    leave them out and keep their messages, each once, for the report at the end (messages)."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.messages: List[str] = []

    def handle(self, bad: Sequence["BadSample"]) -> None:
        """Applies the policy to the BadSamples of a batch."""
        for sample in bad:
            if not self.skip:
                raise BadImageError(sample.reason)
            self.note([sample.reason])

    def note(self, messages: Sequence[str]) -> None:
        """Records images left out elsewhere (e.g. when the store was preloaded)."""
        for message in messages:
            if message not in self.messages:
                self.messages.append(message)

    def report(self) -> str:
        """What was left out, for the end of a run ("" when nothing was)."""
        return describe_left_out(self.messages)


def describe_left_out(messages: Sequence[str]) -> str:
    """"N unreadable image(s) were left out:" and one message a line ("" when there are none)."""
    if not messages:
        return ""
    return f"{len(messages)} unreadable image(s) were left out:\n  " + "\n  ".join(messages)


# --------------------------------------------------------------------------------- decoding
def load_image(path: Union[str, Path]) -> Image.Image:
    """The image at path as an 8-bit RGB PIL image (as_rgb8). BadImageError if unreadable."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: truncated or corrupt data fails here, not later
            return as_rgb8(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot read image {path}: {e}") from None


def read_encoded_image(path: Union[str, Path]) -> Tensor:
    """The image at path as DeviceFrozenTransform takes it: a JPEG file it decodes on the device
    (device_decodable_jpeg) as its bytes, 1-D uint8; any other image decoded here (load_image) as
    uint8 (3, H, W). BadImageError if unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadImageError(f"cannot read image {path}: {e}") from None
    if device_decodable_jpeg(data):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return image_pixels(load_image(path))


def decode_images(transform: DeviceFrozenTransform, images: Sequence[Tensor], paths: Sequence[Path],
                  device: torch.device) -> Tuple[Optional[Tensor], List[int], List[Tuple[int, str]]]:
    """transform(images, device) (images from read_encoded_image of paths): (frozen inputs, the rows
    of images they are of, (row, message) of each image that could not be read). When the device
    decoder refuses the batch, the images go one at a time, and one it refuses is decoded by PIL."""
    try:
        return transform(images, device), list(range(len(images))), []
    except RuntimeError:
        pass  # one image at a time: only the refused ones take the slower PIL path
    frozen, rows, bad = [], [], []
    for row, (image, path) in enumerate(zip(images, paths)):
        try:
            frozen.append(transform([image], device))
        except RuntimeError:
            try:
                frozen.append(transform([image_pixels(load_image(path))], device))
            except BadImageError as e:
                bad.append((row, str(e)))
                continue
        rows.append(row)
    return (torch.cat(frozen) if frozen else None), rows, bad


def is_hidden(name: str) -> bool:
    """A hidden file or folder (".ipynb_checkpoints", macOS's "._x.png"): never data."""
    return name.startswith(".")


def list_images(folder: Union[str, Path]) -> List[Path]:
    """Image files under folder (recursively, hidden files and folders left out), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(is_hidden(part) for part in p.relative_to(folder).parts))


def class_folders(split_folder: Path) -> List[str]:
    """Sorted names of the class folders of a split folder (hidden ones left out)."""
    return sorted(p.name for p in split_folder.iterdir() if p.is_dir() and not is_hidden(p.name))


# ------------------------------------------------------------------------------- the layout
@dataclass(frozen=True)
class Sample:
    """One image of a split: path relative to the dataset root (POSIX separators) and class index."""

    path: str
    label: int


def find_classes(root: Union[str, Path]) -> List[str]:
    """Sorted class-folder names of root/train."""
    train = Path(root) / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"data.root {str(root)!r} has no train/ folder (expected "
                                f"root/{{train,val,test}}/<class>/<image>)")
    classes = class_folders(train)
    if not classes:
        raise ValueError(f"{str(train)!r} has no class folders")
    return classes


class ImageFolderSplit:
    """The samples of root/<split>/<class>/<image>, in sorted class then path order.

    Classes come from the train split; a class folder in another split that train lacks is an error.
    """

    def __init__(self, root: Union[str, Path], split: str, classes: Optional[Sequence[str]] = None):
        self.root = Path(root)
        self.split = split
        self.classes = list(classes) if classes is not None else find_classes(root)
        folder = self.root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"split folder {str(folder)!r} does not exist")
        unknown = [name for name in class_folders(folder) if name not in self.classes]
        if unknown:
            raise ValueError(f"{str(folder)!r} has class folders {unknown} that train/ lacks "
                             f"(classes: {self.classes})")
        samples = []
        for label, name in enumerate(self.classes):
            class_folder = folder / name
            if class_folder.is_dir():
                images = list_images(class_folder)
                if not images:
                    raise ValueError(f"class folder {str(class_folder)!r} holds no images "
                                     f"({', '.join(IMAGE_EXTENSIONS)}): add its images or remove the folder")
                samples += [Sample(p.relative_to(self.root).as_posix(), label) for p in images]
        if not samples:
            raise ValueError(f"split folder {str(folder)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.samples: List[Sample] = samples

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, position: int) -> Path:
        return self.root / self.samples[position].path

    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)


class ImageList:
    """Unlabelled images (label -1) with the interface FPTDataset reads, for prediction."""

    def __init__(self, root: Union[str, Path], paths: Sequence[Path]):
        self.root = Path(root)
        self.samples = [Sample(Path(p).relative_to(self.root).as_posix(), -1) for p in paths]

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, position: int) -> Path:
        return self.root / self.samples[position].path


# ------------------------------------------------------------------------------- transforms
def side_transform(settings, size: Tuple[int, int], train: bool) -> SideTransform:
    """SideTransform from DataSettings: mean and std (numbers by now) and the augmentation keys."""
    return SideTransform(size, settings.mean, settings.std, train, hflip_prob=settings.hflip_prob,
                         brightness=settings.brightness,
                         contrast=settings.contrast, saturation=settings.saturation, hue=settings.hue,
                         crop_scale=settings.crop_scale, crop_ratio=settings.crop_ratio)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of one sample's augmentation: distinct per (seed, epoch, position), 63-bit."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + position) % (2 ** 63)


# --------------------------------------------------------------------------------- datasets
@dataclass
class BadSample:
    """Returned in place of an item whose image cannot be read (the collate function sorts it out)."""

    position: int
    path: str
    reason: str


class FPTDataset(Dataset):
    """Items of one split for training or evaluation.

    Each item is a dict: "position" (index in the split), "label", "side" (3, h, w) and, as asked,
    "frozen" (3, H, W) (frozen-branch input), or with a DeviceFrozenTransform "encoded" (the image
    as read_encoded_image gives it, made into "frozen" later by decode_on_device), or "keys"/"values"
    (L, H, n, d) read from a feature store (stored dtype). An unreadable image gives a BadSample
    instead.

    Args:
        split: the ImageFolderSplit.
        side: SideTransform, or None when the side input is not needed.
        frozen: FrozenTransform, DeviceFrozenTransform, or None.
        store: a fpt_fast.app.store.StoreSplit with the split's features, or None.
        positions: the sample positions this dataset serves (default: all, or with a store all it
            holds features of).
        seed: base seed of the augmentation.
    """

    def __init__(self, split: ImageFolderSplit, side: Optional[SideTransform],
                 frozen: Union[FrozenTransform, DeviceFrozenTransform, None] = None, store=None,
                 positions: Optional[Sequence[int]] = None, seed: int = 0):
        self.split = split
        self.side = side
        self.frozen = frozen
        self.store = store
        if positions is None:
            positions = store.present_positions() if store is not None else range(len(split))
        self.positions = list(positions)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int):
        position = self.positions[index]
        item: Dict[str, object] = {"position": position, "label": self.split.samples[position].label}
        if isinstance(self.frozen, DeviceFrozenTransform):
            try:
                item["encoded"] = read_encoded_image(self.split.path(position))
            except BadImageError as e:
                return BadSample(position, str(self.split.path(position)), str(e))
        if self.side is not None or isinstance(self.frozen, FrozenTransform):
            try:
                image = load_image(self.split.path(position))
            except BadImageError as e:
                return BadSample(position, str(self.split.path(position)), str(e))
            if isinstance(self.frozen, FrozenTransform):
                item["frozen"] = self.frozen(image)
            if self.side is not None:
                if self.side.train:  # random: seeded per (seed, epoch, position)
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(sample_seed(self.seed, self.epoch, position))
                        item["side"] = self.side(image)
                else:
                    item["side"] = self.side(image)
        if self.store is not None:
            item["keys"], item["values"] = self.store.read(position)
        return item


def collate(items: List) -> Dict[str, object]:
    """Stacks the good items; "bad" lists the BadSamples; "position" and "label" are always there
    (empty when every item is bad). Tensors keep the item layout (B first); "encoded" images (of
    different sizes) stay a list."""
    good = [i for i in items if not isinstance(i, BadSample)]
    batch: Dict[str, object] = {"bad": [i for i in items if isinstance(i, BadSample)]}
    batch["position"] = torch.tensor([i["position"] for i in good], dtype=torch.long)
    batch["label"] = torch.tensor([i["label"] for i in good], dtype=torch.long)
    for key in good[0] if good else ():
        if key == "encoded":
            batch[key] = [i[key] for i in good]
        elif key not in ("position", "label"):
            batch[key] = torch.stack([i[key] for i in good])
    return batch


def decode_on_device(batch: dict, transform: DeviceFrozenTransform, split, device: torch.device) -> dict:
    """A batch of an FPTDataset with a DeviceFrozenTransform, its "encoded" images made into
    "frozen" (B, 3, H, W) float32 on device (decode_images); an image PIL cannot read either moves
    to "bad" (a BadSample), its position and label out of the batch."""
    encoded = batch.pop("encoded", [])
    if not encoded:
        return batch
    positions = batch["position"].tolist()
    paths = [split.path(p) for p in positions]
    batch["frozen"], rows, bad = decode_images(transform, encoded, paths, device)
    if bad:
        batch["bad"] = list(batch["bad"]) + [BadSample(positions[row], str(paths[row]), message)
                                             for row, message in bad]
        kept = torch.tensor(rows, dtype=torch.long)
        batch["position"], batch["label"] = batch["position"][kept], batch["label"][kept]
    return batch


def frozen_inputs(transform: Union[FrozenTransform, DeviceFrozenTransform], paths: Sequence[Path],
                  device: torch.device) -> Tensor:
    """(B, 3, H, W) float32 on device: the frozen inputs of image files as preloading makes them with
    transform. BadImageError naming a file that cannot be read."""
    if isinstance(transform, FrozenTransform):
        return torch.stack([transform(load_image(path)) for path in paths]).to(device)
    frozen, _, bad = decode_images(transform, [read_encoded_image(path) for path in paths], paths, device)
    if bad:
        raise BadImageError(bad[0][1])
    return frozen


def make_loader(dataset: Dataset, batch_size: Optional[int] = None, num_workers: int = 0,
                device: torch.device = torch.device("cpu"), sampler: Optional[Sequence[int]] = None,
                batch_sampler: Optional["EpochBatches"] = None) -> DataLoader:
    """Batches (collate) of dataset, in order, of the indices ``sampler`` yields when given; or
    the batches of ``batch_sampler``. Pinned memory for a CUDA device. The loader's generator
    only seeds its workers (augmentation is seeded per sample), and leaves the global RNG alone."""
    pin_memory = device.type == "cuda"
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate,
                          generator=make_generator(batch_sampler.seed), pin_memory=pin_memory)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, generator=make_generator(0), pin_memory=pin_memory)


class _PixelStatistics(Dataset):
    """Items "position", "label" and "pixel_sums" (2, 3) float64: the per-channel sums of the
    pixels and of their squares, at the frozen input size; for computing mean/std."""

    def __init__(self, split: ImageFolderSplit, size: Tuple[int, int]):
        self.split, self.size = split, size

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, position: int):
        try:
            image = resize_to_tensor(load_image(self.split.path(position)), self.size).double()
        except BadImageError as e:
            return BadSample(position, str(self.split.path(position)), str(e))
        return {"position": position, "label": self.split.samples[position].label,
                "pixel_sums": torch.stack([image.sum(dim=(1, 2)), (image * image).sum(dim=(1, 2))])}


def compute_mean_std(split: ImageFolderSplit, size: Tuple[int, int], bad_images: BadImages, num_workers: int = 0,
                     group=None) -> Tuple[List[float], List[float]]:
    """RGB mean and std of the split's pixels after resizing to size, as the frozen input is
    resized (resize_to_tensor; the official code's statistics are of the same pixels).

    group: the processes of a torchrun run (fpt_fast.app.distributed.Group) or None. Each process
    reads every world_size-th image; the per-image sums are gathered and added in position order
    on every process, so all of them get the single-process result bit for bit. Unreadable images
    go to bad_images on every process, after the gathering (so that all stop alike).
    """
    rank, world_size = (group.rank, group.world_size) if group is not None else (0, 1)
    sums, bad = [], []
    for batch in make_loader(_PixelStatistics(split, size), 16, num_workers,
                             sampler=range(rank, len(split), world_size)):
        sums += zip(batch["position"].tolist(), batch["pixel_sums"]) if len(batch["position"]) else []
        bad += batch["bad"]
    if world_size > 1:
        parts = group.all_gather_object((sums, bad))
        sums = [item for part, _ in parts for item in part]
        bad = [sample for _, part in parts for sample in part]
    bad_images.handle(sorted(bad, key=lambda sample: sample.position))
    total = torch.zeros(2, 3, dtype=torch.float64)
    count = 0
    for _, pixel_sums in sorted(sums, key=lambda item: item[0]):
        total += pixel_sums
        count += size[0] * size[1]
    if count == 0:
        raise ValueError(f"no readable image in {str(split.root / split.split)!r} to compute mean/std from")
    mean = total[0] / count
    std = (total[1] / count - mean * mean).clamp_min(0).sqrt()
    return mean.tolist(), [max(float(s), 1e-6) for s in std.tolist()]


class EpochBatches:
    """The training batches of one process, epoch after epoch (a DataLoader batch_sampler).

    Epoch e visits the dataset in the order of a permutation drawn from epoch_order_seed(seed, e),
    cut into global batches of world_size * batch_size items. Process r gets the r-th of
    world_size slices of each global batch: batch_size items, except in a shorter last global
    batch, whose slices have ceil(size / world_size) items (the last processes may get fewer, or
    none). So a step of K processes with batch b sees the samples of a step of one process with
    batch K * b, and the number of steps is the same on every process.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return math.ceil(self.num_items / self.global_batch_size)

    def __iter__(self) -> Iterator[List[int]]:
        order = torch.randperm(self.num_items, generator=make_generator(epoch_order_seed(self.seed, self.epoch)))
        order = order.tolist()
        for start in range(0, self.num_items, self.global_batch_size):
            chunk = order[start:start + self.global_batch_size]
            slice_size = math.ceil(len(chunk) / self.world_size)
            yield chunk[self.rank * slice_size:(self.rank + 1) * slice_size]


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator for a DataLoader's order and worker seeds, so the global RNG is left alone."""
    return torch.Generator().manual_seed(int(seed) % (2 ** 63))


def epoch_order_seed(seed: int, epoch: int) -> int:
    """Seed of the shuffling order of one epoch."""
    return (seed * 7_919 + epoch * 104_729 + 1) % (2 ** 63)
