"""The two inputs of an FPT made from one PIL image, as the official FPT code makes them
(docs/method.md, section 3), so that ``model(x_hi, x_lo)`` sees what the official model sees:

    transforms = fpt_fast.FPTTransforms(config, mean, std)          # train=True: augmented side input
    x_hi, x_lo = transforms(Image.open(path))                       # (3, H, W), (3, h, w) float32
    logits = model(x_hi[None], x_lo[None])

- frozen input (FrozenTransform): the 8-bit RGB image resized with PIL's bilinear filter
  (torchvision's Resize on a PIL image), then scaled to [0, 1] and normalised. Never augmented.
- side input (SideTransform), a separate transform of the same original image: for evaluation a
  resize to the side size; for training a horizontal flip, then colour jitter on the full image,
  then a random resized crop to the side size, in that order; then scaled and normalised.

Images of other modes are first made 8-bit RGB (as_rgb8). Random draws come from torch's global
generator, in the official order, so the same seed gives the official augmentation.

Not official: DeviceFrozenTransform makes the frozen input on a device (a GPU) from the encoded
JPEG file, for preloading (the fpt-fast setting preload.decode: gpu); close to FrozenTransform's
output but not bit-identical (its docstring says how close).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as tv_functional

from .config import FPTConfig, size_pair

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# How FrozenTransform resizes, in the words the feature store's fingerprint records.
FROZEN_RESIZE = "pil-bilinear-uint8"
# How DeviceFrozenTransform decodes and resizes, likewise.
DEVICE_DECODE = "torchvision-decode_jpeg-on-device, other images pil"
DEVICE_RESIZE = "torchvision-antialiased-bilinear-uint8-rounded"


def as_rgb8(image: Image.Image) -> Image.Image:
    """An 8-bit RGB PIL image of any PIL image: grayscale is repeated to three channels, alpha is
    dropped and palettes are expanded (PIL's convert("RGB"), as the official loader does); 16-bit
    and 32-bit integer images are scaled from [0, 65535] to [0, 255] and floating-point ones from
    [0, 1], both clipped and rounded (PIL's own conversion would clip them at 255 instead)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        top = 1.0 if image.mode == "F" else 65535.0
        gray = np.clip(np.asarray(image, dtype=np.float64), 0.0, top) * (255.0 / top)
        image = Image.fromarray(np.rint(gray).astype(np.uint8))
    return image.convert("RGB")


def _channel_values(values: Sequence[float], name: str) -> Tuple[float, float, float]:
    values = [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 (RGB) values, got {values}")
    return tuple(values)


def resize_to_tensor(image: Image.Image, size: Tuple[int, int]) -> Tensor:
    """The image (any mode, made 8-bit RGB) resized to size (h, w) with PIL's bilinear filter on the
    uint8 pixels, as float32 (3, h, w) in [0, 1]: the frozen input before normalisation."""
    return T.functional.to_tensor(T.functional.resize(as_rgb8(image), list(size_pair(size))))


class FrozenTransform:
    """Frozen-branch input: PIL image -> resize to size (PIL bilinear, uint8) -> [0, 1] -> normalise.
    Returns float32 (3, h, w)."""

    def __init__(self, size, mean: Sequence[float], std: Sequence[float]):
        self.size = size_pair(size)
        self.mean, self.std = _channel_values(mean, "mean"), _channel_values(std, "std")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {list(self.std)}")
        self.normalize = T.Normalize(self.mean, self.std)

    def __call__(self, image: Image.Image) -> Tensor:
        return self.normalize(resize_to_tensor(image, self.size))

    def description(self) -> dict:
        """What determines this transform's output (part of the feature-store fingerprint)."""
        return {"size": list(self.size), "resize": FROZEN_RESIZE, "mean": list(self.mean), "std": list(self.std)}


class SideTransform:
    """Side-network input: PIL image -> float32 (3, h, w), normalised.

    train=False: resize to size (PIL bilinear). train=True, in this order: horizontal flip with
    probability hflip_prob; colour jitter (brightness, contrast, saturation, hue) of the full
    image; random resized crop (area fraction crop_scale, aspect ratio crop_ratio) resized to size.
    Random draws use torch's global generator, in the official order.
    """

    def __init__(self, size, mean: Sequence[float], std: Sequence[float], train: bool,
                 hflip_prob: float = 0.5, brightness: float = 0.2, contrast: float = 0.2,
                 saturation: float = 0.0, hue: float = 0.0, crop_scale: Sequence[float] = (0.8, 1.0),
                 crop_ratio: Sequence[float] = (0.7, 1.3)):
        self.size = size_pair(size)
        self.train = train
        normalise = FrozenTransform(self.size, mean, std).normalize
        crop_scale, crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        if not (len(crop_scale) == len(crop_ratio) == 2 and 0 < crop_scale[0] <= crop_scale[1]
                and 0 < crop_ratio[0] <= crop_ratio[1]):
            raise ValueError(f"crop_scale={list(crop_scale)} and crop_ratio={list(crop_ratio)} must be "
                             f"increasing positive ranges (data.crop_scale, data.crop_ratio)")
        if not train:
            steps = [T.Resize(list(self.size))]
        else:
            # The official code wraps jitter and crop in RandomApply(p=1): each draws one number
            # more, which keeps the random stream (and so a seeded augmentation) the official one.
            steps = [T.RandomHorizontalFlip(hflip_prob),
                     T.RandomApply([T.ColorJitter(brightness, contrast, saturation, hue)], p=1.0),
                     T.RandomApply([T.RandomResizedCrop(list(self.size), crop_scale, crop_ratio)], p=1.0)]
        self.transform = T.Compose([as_rgb8, *steps, T.ToTensor(), normalise])

    def __call__(self, image: Image.Image) -> Tensor:
        return self.transform(image)


class FPTTransforms:
    """Both inputs of an FPT from one PIL image: (x_hi, x_lo) = (frozen input (3, *config.image_size),
    side input (3, *config.side_input_size)), float32, normalised with the dataset's mean and std.
    train=True augments the side input (keyword arguments: SideTransform's augmentation settings)."""

    def __init__(self, config: FPTConfig, mean: Sequence[float], std: Sequence[float], train: bool = False,
                 **augmentation):
        self.frozen = FrozenTransform(config.image_size, mean, std)
        self.side = SideTransform(config.side_input_size, mean, std, train, **augmentation)

    def __call__(self, image: Image.Image) -> Tuple[Tensor, Tensor]:
        return self.frozen(image), self.side(image)


def device_decodable_jpeg(data: bytes) -> bool:
    """Whether data is a JPEG file that DeviceFrozenTransform decodes on its device: Huffman-coded
    (baseline, extended or progressive), 8-bit, 1 (grayscale) or 3 (YCbCr) components, no Adobe
    colour-transform marker, ending with its end-of-image marker. Anything else (CMYK, 12-bit,
    arithmetic-coded or lossless JPEGs, files cut short) goes to PIL, whose colour conversion and
    error on a truncated file are the official path's."""
    if data[:3] != b"\xff\xd8\xff" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return False
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xEE and data[i + 4:i + 9] == b"Adobe":
            return False
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header (SOFn)
            return marker in (0xC0, 0xC1, 0xC2) and i + 10 <= len(data) and data[i + 4] == 8 and data[i + 9] in (1, 3)
        if marker == 0xDA:          # a scan before any frame header
            return False
        i += 2 + length
    return False


def image_pixels(image: Image.Image) -> Tensor:
    """uint8 (3, H, W) pixels of a PIL image (made 8-bit RGB: as_rgb8)."""
    return torch.from_numpy(np.array(as_rgb8(image))).permute(2, 0, 1).contiguous()


class DeviceFrozenTransform:
    """Frozen-branch inputs made on a device, for preloading: NOT the official preprocessing.

    images: JPEG files as their bytes (1-D uint8, device_decodable_jpeg), decoded on the device with
    torchvision.io.decode_jpeg (nvJPEG on CUDA), or images already decoded (uint8 (3, H, W): other
    formats, decoded by PIL: image_pixels). Each is resized to size with torchvision's antialiased
    bilinear resize of uint8 images (rounded to uint8, as PIL's resize is), images of one size in
    one call, then scaled to [0, 1] and normalised with FrozenTransform's arithmetic. Returns float32
    (B, 3, h, w) on the device.

    How far from FrozenTransform (the official PIL path), measured here on the CPU (synthetic images,
    JPEG quality 95, 2048x1536 and smaller, resized to 512 and 1024 px): torchvision's CPU decoder
    gave libjpeg's (PIL's) pixels exactly, and its CPU uint8 resize PIL's resized pixels exactly or
    one level of 255 off on under 0.2 % of the values. On CUDA the resize interpolates in float32 and
    rounds: that arithmetic, reproduced on the CPU, moved 4-17 % of the values by one level (none by
    more). nvJPEG's decoding against libjpeg's is unmeasured (IDCT and chroma upsampling may differ
    by a few levels; benchmarks/preload.py times the option on a GPU). A feature store records which
    transform made it (description), so stores made the two ways are never mixed.
    """

    def __init__(self, size, mean: Sequence[float], std: Sequence[float]):
        frozen = FrozenTransform(size, mean, std)  # the same checks and normalisation constants
        self.size, self.mean, self.std = frozen.size, frozen.mean, frozen.std

    def __call__(self, images: Sequence[Tensor], device) -> Tensor:
        device = torch.device(device)
        pixels = list(images)
        encoded = [row for row, image in enumerate(pixels) if image.dim() == 1]
        if encoded:
            # Imported here: torchvision 0.29 warns at import that its image decoders are deprecated
            # (superseded by TorchCodec); only this option uses them.
            from torchvision import io as tv_io

            decoded = tv_io.decode_jpeg([pixels[row] for row in encoded], mode=tv_io.ImageReadMode.RGB,
                                        device=device)
            for row, image in zip(encoded, decoded):
                pixels[row] = image
        by_size = defaultdict(list)
        for row, image in enumerate(pixels):
            by_size[tuple(image.shape)].append(row)
        out = torch.empty((len(pixels), 3, *self.size), device=device)
        for rows in by_size.values():
            batch = torch.stack([pixels[row].to(device, non_blocking=True) for row in rows])
            out[rows] = tv_functional.resize(batch, list(self.size), antialias=True).float()
        mean = torch.tensor(self.mean, device=device).view(3, 1, 1)
        std = torch.tensor(self.std, device=device).view(3, 1, 1)
        return out.div_(255).sub_(mean).div_(std)

    @staticmethod
    def decoding_problem(device) -> Optional[str]:
        """Why torchvision cannot decode JPEG files on device (None when a small one decodes there)."""
        import io

        from torchvision import io as tv_io

        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 100, 50)).save(buffer, format="JPEG")
        try:
            tv_io.decode_jpeg(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8), device=device)
        except RuntimeError as e:
            return f"torchvision cannot decode JPEG files on {device} ({e})"
        return None

    def description(self) -> dict:
        """What determines this transform's output (part of the feature-store fingerprint)."""
        return {"size": list(self.size), "decode": DEVICE_DECODE, "resize": DEVICE_RESIZE, "mean": list(self.mean),
                "std": list(self.std)}
