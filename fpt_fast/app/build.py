"""What every job builds from its settings: the model, the normalisation, the feature store, and the
model's place on the device."""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..model import FPT
from .console import Log
from .data import BadImages, DeviceFrozenTransform, FrozenTransform, ImageFolderSplit, compute_mean_std
from .distributed import Group, local_device
from .settings import Settings
from .store import FeatureStore, fingerprint


def build_model(settings: Settings, num_classes: int) -> FPT:
    """FPT of the settings, initialised from train.seed without touching the global RNG (with
    model.pretrained false and no checkpoint_path, the seed also draws the frozen backbone)."""
    config = settings.fpt_config(num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.train.seed)
        return FPT(config)


def place_model(model: FPT, device: torch.device, features_online: bool) -> FPT:
    """The learnable branch on device, and the frozen branch too when it computes the features at
    each step (features_online). Otherwise it never runs and stays on the CPU. Returns model."""
    model.learnable.to(device)
    if features_online:
        model.frozen.to(device)
    return model


def with_normalization(settings: Settings, train_split: Optional[ImageFolderSplit], store: Optional[FeatureStore],
                       log: Log, bad_images: BadImages, group: Optional[Group] = None) -> Settings:
    """settings with data.mean / data.std as numbers: given, or "auto": the store's (computed when
    it was preloaded), else computed from the train split at the frozen input size (shared among
    the processes of ``group``, with the single-process result; unreadable images go to
    bad_images)."""
    data = settings.data
    if data.mean != "auto" and data.std != "auto":
        return settings
    if store is not None:
        computed = store.fingerprint["transform"]
        source = f"feature store {store.root}"
    elif train_split is not None:
        log(f"computing mean/std of {len(train_split)} training images ...")
        mean, std = compute_mean_std(train_split, settings.fpt_config(len(train_split.classes)).image_size,
                                     bad_images, data.num_workers, group)
        computed = {"mean": mean, "std": std}
        source = "the train split"
    else:
        raise ValueError("data.mean/data.std are 'auto' but there is no train split to compute them from")
    mean = computed["mean"] if data.mean == "auto" else list(data.mean)
    std = computed["std"] if data.std == "auto" else list(data.std)
    log(f"normalisation from {source}: mean {[round(v, 4) for v in mean]}, std {[round(v, 4) for v in std]}")
    return settings.replace("data", mean=mean, std=std)


def frozen_transform(settings: Settings, model: FPT) -> FrozenTransform:
    """The frozen branch's input transform (data.mean / data.std must be numbers)."""
    return FrozenTransform(model.config.image_size, settings.data.mean, settings.data.std)


def preload_transform(settings: Settings, model: FPT) -> Union[FrozenTransform, DeviceFrozenTransform]:
    """How preloading makes the frozen inputs (preload.decode): the official FrozenTransform ("pil"),
    or DeviceFrozenTransform ("gpu"; data.mean / data.std must be numbers)."""
    if settings.preload.decode == "gpu":
        return DeviceFrozenTransform(model.config.image_size, settings.data.mean, settings.data.std)
    return frozen_transform(settings, model)


def gpu_decode_device_problem(settings: Settings, device: torch.device) -> Optional[str]:
    """Why preload.decode "gpu" cannot run on device (None when it can, or when decode is "pil"):
    not a CUDA device, or torchvision cannot decode a JPEG there (built without nvJPEG)."""
    if settings.preload.decode != "gpu":
        return None
    if device.type != "cuda":
        return (f"setting preload.decode='gpu' decodes images on a CUDA GPU, but the preload device is {device} "
                f"(preload.device={settings.preload.device!r}"
                f"{'' if torch.cuda.is_available() else '; no CUDA GPU here'})")
    problem = DeviceFrozenTransform.decoding_problem(device)
    return None if problem is None else f"setting preload.decode='gpu': {problem}"


def check_store(store: FeatureStore, settings: Settings, model: FPT,
                backbone_sha256: Optional[str] = None) -> FeatureStore:
    """store, its fingerprint checked against this run's (ValueError naming every difference); the
    frozen inputs' transform is preloading's (preload_transform). backbone_sha256: the frozen
    backbone's weights_sha256 when the caller has it already (hashing the weights again costs
    some 0.5 s per GB of them)."""
    store.check_fingerprint(fingerprint(model, preload_transform(settings, model).description(),
                                        settings.preload.dtype, local_device(settings.preload.device),
                                        backbone_sha256))
    return store
