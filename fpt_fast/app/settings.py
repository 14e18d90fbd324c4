"""Run settings of the fpt-fast command line: a YAML file plus ``--set section.key=value`` overrides.

Four sections: ``model`` (the fields of fpt_fast.FPTConfig plus ``preset``), ``data``, ``preload`` and
``train``. Layers, later wins:

    schema defaults < model.preset ("fpt" / "fpt+") < data.dataset template < YAML file < --set

Every key is checked when the settings load, before any image is read or any file written: an
unknown key, a value of the wrong type or outside its range (RANGES), or values of two keys that
cannot go together (check_combinations) is an error that names the key (``train.lr``) and what it
takes. Values are checked against the type annotations below; ``float``
settings also take strings such as ``1e-4``, which PyYAML 1.1 reads as text. load_settings also
builds the model section's FPTConfig (every model value checked) and opens model.checkpoint_path.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import yaml

from ..model.backbone_weights import read_weights_file
from ..model.config import OFFICIAL_BACKBONE, PRESETS, FPTConfig

SECTIONS = ("model", "data", "preload", "train")

# Official per-dataset settings of the FPT / FPT+ implementation (its configs/dataset/*.yaml):
# LPM input size, classes, RGB mean/std of the training split, dataset-specific learning rate.
DATASETS: Dict[str, dict] = {
    "messidor2": dict(model=dict(image_size=512, num_classes=5), train=dict(lr=2e-4),
                      data=dict(mean=[0.48436370491981506, 0.2238118201494217, 0.07583174854516983],
                                std=[0.2939208149909973, 0.14721707999706268, 0.06350880116224289])),
    "ddr": dict(model=dict(image_size=512, num_classes=5), train=dict(lr=5e-4),
                data=dict(mean=[0.423737496137619, 0.2609460651874542, 0.128403902053833],
                          std=[0.29482534527778625, 0.20167365670204163, 0.13668020069599152])),
    "isic2016": dict(model=dict(image_size=512, num_classes=2), train=dict(lr=5e-3),
                     data=dict(mean=[0.7243882417678833, 0.6187167167663574, 0.5664605498313904],
                               std=[0.16384567320346832, 0.17090138792991638, 0.19106049835681915])),
    "isic2018": dict(model=dict(image_size=512, num_classes=7), train=dict(lr=1e-4),
                     data=dict(mean=[0.7635627388954163, 0.5466075539588928, 0.5707483291625977],
                               std=[0.1404101848602295, 0.15191355347633362, 0.1692335605621338])),
    "ddsm": dict(model=dict(image_size=512, num_classes=3), train=dict(lr=1e-3),
                 data=dict(mean=[0.2026701271533966] * 3, std=[0.22466830909252167] * 3)),
    "cmmd": dict(model=dict(image_size=512, num_classes=2), train=dict(lr=5e-5),
                 data=dict(mean=[0.16735267639160156] * 3, std=[0.18016798794269562] * 3)),
    "covid": dict(model=dict(image_size=512, num_classes=3), train=dict(lr=1e-4),
                  data=dict(mean=[0.498341828584671, 0.4986386299133301, 0.49894729256629944],
                            std=[0.2426202893257141, 0.24259139597415924, 0.242642343044281])),
    "chncxr": dict(model=dict(image_size=512, num_classes=2), train=dict(lr=5e-4),
                   data=dict(mean=[0.6105489] * 3, std=[0.25847816] * 3)),
}
DatasetName = Literal["messidor2", "ddr", "isic2016", "isic2018", "ddsm", "cmmd", "covid", "chncxr"]

MeanStd = Union[Literal["auto"], Tuple[float, float, float]]


@dataclass
class DataSettings:
    """Images, normalisation, side augmentation (official weak augmentation) and the feature store.

    dataset: official template to start from (DATASETS: messidor2, ddr, isic2016, isic2018, ddsm,
        cmmd, covid, chncxr) or None.
    root: folder with train/, val/, test/, each holding one sub-folder per class.
    mean, std: RGB normalisation of both branches, or "auto" (computed from the train split).
    store: preloaded feature store folder (written by ``preload``, read by ``train``/``evaluate``);
        None runs the frozen branch on the images at every step.
    skip_bad_images: leave unreadable images out (listed at the end) instead of stopping.
    num_workers: DataLoader worker processes.
    hflip_prob, brightness, contrast, saturation, hue, crop_scale, crop_ratio: side-network
        training augmentation (horizontal flip, colour jitter, random resized crop).
    """

    dataset: Optional[DatasetName] = None
    root: Optional[str] = None
    mean: MeanStd = "auto"
    std: MeanStd = "auto"
    store: Optional[str] = None
    skip_bad_images: bool = False
    num_workers: int = 2
    hflip_prob: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.0
    hue: float = 0.0
    crop_scale: Tuple[float, float] = (0.8, 1.0)
    crop_ratio: Tuple[float, float] = (0.7, 1.3)


@dataclass
class PreloadSettings:
    """How ``preload`` writes the feature store.

    dtype: storage width of K_sel / V_sel. batch_size: images per frozen-branch forward.
    shard_mb: target size of one shard file in MiB (fractions allowed). Under torchrun the shards
        of a split are dealt out to the processes: a split with fewer shards leaves some idle.
    splits: splits to preload.
    device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...; under torchrun "auto" and
        "cuda" are cuda:LOCAL_RANK.
    decode: how the frozen inputs are made from the image files. "pil" (default): the official
        preprocessing (PIL decoding and resizing in the DataLoader workers). "gpu": JPEG files are
        decoded (torchvision.io.decode_jpeg, nvJPEG) and resized (antialiased bilinear) on the
        preload device, which must be a CUDA GPU; other formats are decoded by PIL in the workers
        and resized on the GPU. Faster where decoding bounds preloading, but NOT bit-identical to
        the official preprocessing (fpt_fast.model.preprocessing.DeviceFrozenTransform: pixels may
        differ by a level or so). The store records which was used: runs that read it (train,
        evaluate, verify) need the same setting.
    """

    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    batch_size: int = 16
    shard_mb: float = 1024.0
    splits: List[str] = field(default_factory=lambda: ["train", "val", "test"])
    device: str = "auto"
    decode: Literal["pil", "gpu"] = "pil"


@dataclass
class TrainSettings:
    """Optimisation (official defaults: AdamW, 20 epochs, batch 16, weight decay 0.1, clipping 1.0).

    batch_size, eval_batch_size: images per process and step. Under torchrun with K processes the
        global (optimisation) batch is K * batch_size; lr is not scaled with it.
    device: as PreloadSettings.device.
    warmup_epochs: linear warm-up length (fractional epochs allowed), then cosine decay to 0;
        0 (the official default) starts the cosine decay at the first step.
    class_weights: None, "balanced" (n_samples / (n_classes * n_class)) or one weight per class.
    amp: bf16 autocast on CUDA (ignored on the CPU).
    val_split: split used for model selection (None: the last epoch is kept as best).
    selection_metric: validation metric that picks best.pt.
    side_only: ablation: train the side network alone, without prompts and frozen branch.
    reference_memory_mb: training memory of full fine-tuning, for PME (None: PME not reported).
    """

    epochs: int = 20
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.1
    warmup_epochs: float = 0.0
    clip_grad_norm: Optional[float] = 1.0
    class_weights: Union[None, Literal["balanced"], List[float]] = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    out_dir: str = "runs/fpt"
    val_split: Optional[str] = "val"
    selection_metric: Literal["acc", "f1", "auc", "precision", "recall", "kappa"] = "auc"
    progress: bool = True
    tensorboard: bool = True
    side_only: bool = False
    reference_memory_mb: Optional[float] = None


SECTION_CLASSES = {"data": DataSettings, "preload": PreloadSettings, "train": TrainSettings}
# Model settings the command line adds to FPTConfig's fields (FPTConfig.num_classes may be None
# here: it is then the number of class folders of the train split).
MODEL_EXTRA = {"preset": Literal["fpt", "fpt+"]}
# The official LPM: google/vit-base-patch16-384 (ImageNet-21k, fine-tuned on ImageNet-1k at 384 px).
MODEL_DEFAULTS = {"preset": "fpt+", "backbone": OFFICIAL_BACKBONE, "pretrained": True,
                  "num_classes": None}


def model_schema() -> Dict[str, Any]:
    """{key: type} of the model section: FPTConfig's constructor fields plus MODEL_EXTRA."""
    hints = typing.get_type_hints(FPTConfig)
    schema = {f.name: hints[f.name] for f in dataclasses.fields(FPTConfig) if f.init}
    schema["num_classes"] = Optional[int]
    schema.update(MODEL_EXTRA)
    return schema


def section_schema(section: str) -> Dict[str, Any]:
    if section == "model":
        return model_schema()
    cls = SECTION_CLASSES[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def default_values() -> Dict[str, dict]:
    """The schema defaults of every section, as plain values."""
    config_defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                       for f in dataclasses.fields(FPTConfig) if f.init}
    values = {"model": {**config_defaults, **MODEL_DEFAULTS}}
    for section, cls in SECTION_CLASSES.items():
        values[section] = dataclasses.asdict(cls())
    return _plain(values)


# ----------------------------------------------------------------------------- type checking
def describe_type(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin is Union:
        return " or ".join(describe_type(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(describe_type(a) for a in args)})"
        return f"a list of {describe_type(args[0])}" if args else "a list"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}.get(hint, getattr(hint, "__name__", str(hint)))


class _Mismatch(Exception):
    pass


def _coerce(value, hint):
    """value checked against hint and normalised (tuples -> lists, ints -> floats); _Mismatch if not."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise _Mismatch
    if origin is Union:
        for option in args:
            try:
                return _coerce(value, option)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch
            return [_coerce(v, a) for v, a in zip(value, args)]
        return [_coerce(v, args[0]) for v in value] if args else list(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # "1e-4": PyYAML 1.1 leaves exponents without a dot as text
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if hint is dict:
        if isinstance(value, dict):
            return dict(value)
        raise _Mismatch
    raise TypeError(f"settings schema: unsupported type {hint!r}")


def check_value(key: str, value, hint):
    """value normalised to hint; a TypeError (ValueError for a wrong choice) naming key if it does not fit."""
    try:
        return _coerce(value, hint)
    except _Mismatch:
        error = ValueError if typing.get_origin(hint) is Literal else TypeError
        raise error(f"setting {key}: expected {describe_type(hint)}, got {value!r} "
                    f"({type(value).__name__})") from None


# ------------------------------------------------------------------------------ value ranges
def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: _finite(v) and v >= low


def _positive(v) -> bool:
    return _finite(v) and v > 0


def _increasing_range(high: float) -> Callable[[Any], bool]:
    return lambda v: _finite(*v) and 0 < v[0] <= v[1] <= high


# (section, key) -> (test of a value of the right type, what the key takes). None passes where
# the type allows it (checked by the type); "auto" likewise.
RANGES: Dict[Tuple[str, str], Tuple[Callable[[Any], bool], str]] = {
    ("data", "num_workers"): (_at_least(0), "an integer >= 0"),
    ("data", "std"): (lambda v: all(_positive(s) for s in v), "'auto' or three numbers > 0"),
    ("data", "mean"): (lambda v: _finite(*v), "'auto' or three finite numbers"),
    ("data", "hflip_prob"): (lambda v: _finite(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    ("data", "brightness"): (_at_least(0), "a number >= 0"),
    ("data", "contrast"): (_at_least(0), "a number >= 0"),
    ("data", "saturation"): (_at_least(0), "a number >= 0"),
    ("data", "hue"): (lambda v: _finite(v) and 0 <= v <= 0.5, "a number in [0, 0.5]"),
    ("data", "crop_scale"): (_increasing_range(1.0), "[low, high] with 0 < low <= high <= 1"),
    ("data", "crop_ratio"): (_increasing_range(math.inf), "[low, high] with 0 < low <= high"),
    ("preload", "batch_size"): (_at_least(1), "an integer >= 1"),
    ("preload", "shard_mb"): (_positive, "a number > 0 (MiB)"),
    ("train", "epochs"): (_at_least(1), "an integer >= 1"),
    ("train", "batch_size"): (_at_least(1), "an integer >= 1"),
    ("train", "eval_batch_size"): (_at_least(1), "an integer >= 1"),
    ("train", "lr"): (_positive, "a number > 0"),
    ("train", "weight_decay"): (_at_least(0), "a number >= 0"),
    ("train", "warmup_epochs"): (_at_least(0), "a number of epochs >= 0"),
    ("train", "clip_grad_norm"): (_positive, "a number > 0, or null for no clipping"),
    ("train", "class_weights"): (lambda v: all(_at_least(0)(w) for w in v) and any(w > 0 for w in v),
                                 "null, 'balanced' or one weight >= 0 per class, not all 0"),
    ("train", "reference_memory_mb"): (_positive, "a number > 0 (MB), or null"),
}


def check_ranges(tree: dict) -> None:
    """ValueError naming the first key of a checked settings tree whose value is outside RANGES."""
    for (section, key), (test, allowed) in RANGES.items():
        value = tree.get(section, {}).get(key)
        if value is None or value in ("auto", "balanced"):
            continue
        if not test(value):
            raise ValueError(f"setting {section}.{key}={value!r} is out of range: expected {allowed}")


def check_combinations(tree: dict) -> None:
    """ValueError naming the keys of a checked settings tree whose values cannot go together."""
    preload = tree.get("preload", {})
    if preload.get("decode") == "gpu" and str(preload.get("device", "auto")).startswith("cpu"):
        raise ValueError(f"setting preload.decode='gpu' decodes images on a CUDA GPU, but preload.device="
                         f"{preload['device']!r}: set preload.decode to 'pil' or preload.device to 'auto' or 'cuda'")


def check_backbone_file(path: Optional[str]) -> None:
    """model.checkpoint_path, when set, is a file of weights that can be read: a .safetensors
    file (its header), or a torch.save file holding a mapping, read as the frozen branch reads it
    (fpt_fast.model.backbone_weights.read_weights_file; memory-mapped: its tensors are not read)."""
    if path is None:
        return
    what = "setting model.checkpoint_path"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what}={path!r}: no such file (the frozen backbone's weights)")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(path, framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{what}={path!r} cannot be read as a safetensors file: {e}") from None
        return
    read_weights_file(path, what)


# Names of the official implementation's settings, for a hint when they are used here.
OFFICIAL_NAMES = {"learning_rate": "train.lr", "input_size": "model.image_size", "data_path": "data.root",
                  "preload_path": "data.store", "save_path": "train.out_dir", "layers_to_extract":
                  "model.extracted_layers", "token_imp": "model.importance", "reduction_ratio":
                  "model.side_reduction_ratio", "random_seed": "train.seed", "loss_weight": "train.class_weights"}


# Model settings of earlier fpt_fast versions, now model.backend (one backend for every op the model runs).
FORMER_BACKEND_KEYS = ("attention_backend", "op_backend")


def upgrade_saved_settings(tree: dict) -> dict:
    """Settings saved by an earlier version (in a checkpoint) in today's keys: model.attention_backend
    and model.op_backend become model.backend (the attention choice when it named one, else the op
    choice); a model section without model.pos_embed_resampling was made when timm's rule resampled
    the backbone's position embeddings and the backbone kept its own LayerNorm eps: it gets "timm"
    and model.frozen_layer_norm_eps null. A copy; other keys are left for check_tree to judge."""
    if not tree.get("model"):
        return tree
    model = dict(tree["model"])
    former = {key: model.pop(key) for key in FORMER_BACKEND_KEYS if key in model}
    if former and "backend" not in model:
        attention = former.get("attention_backend", "auto")
        model["backend"] = attention if attention not in ("auto", "xformers") else former.get("op_backend", "auto")
    model.setdefault("pos_embed_resampling", "timm")
    model.setdefault("frozen_layer_norm_eps", None)
    return {**tree, "model": model}


def _unknown_key_error(key: str, known: Sequence[str]) -> ValueError:
    section, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, known, n=1)
    if name in OFFICIAL_NAMES:
        hint = f"; did you mean {OFFICIAL_NAMES[name]}?"
    elif section == "model" and name in FORMER_BACKEND_KEYS:
        hint = "; it is now model.backend (one backend for every op of the model)"
    else:
        hint = f"; did you mean {section + '.' if section else ''}{close[0]}?" if close else ""
    where = f"section {section!r}" if section else "the top level"
    return ValueError(f"unknown setting {key!r}{hint} (known keys of {where}: {', '.join(sorted(known))})")


def check_tree(tree: dict, source: str = "settings") -> dict:
    """Checks a (partial) nested {section: {key: value}} mapping: every section and key known, every
    value of the right type. Returns the normalised copy."""
    if not isinstance(tree, dict):
        raise TypeError(f"{source}: expected a mapping of sections {SECTIONS}, got {type(tree).__name__}")
    checked = {}
    for section, values in tree.items():
        if section not in SECTIONS:
            raise _unknown_key_error(str(section), SECTIONS)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise TypeError(f"setting {section}: expected a mapping of keys, got {values!r}")
        schema = section_schema(section)
        checked[section] = {}
        for key, value in values.items():
            if key not in schema:
                raise _unknown_key_error(f"{section}.{key}", list(schema))
            checked[section][key] = check_value(f"{section}.{key}", value, schema[key])
    return checked


# ------------------------------------------------------------------------------- overrides
def parse_override(text: str) -> Tuple[str, str, Any]:
    """"train.lr=1e-4" -> ("train", "lr", 1e-4). The value is read as YAML (lists, null, true...)."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected SECTION.KEY=VALUE, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    section, dot, name = key.partition(".")
    if not dot or not name or "." in name:
        raise ValueError(f"--set {text!r}: the key must be SECTION.KEY (sections: {', '.join(SECTIONS)})")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"--set {text!r}: the value is not valid YAML: {e}") from None
    return section, name, value


def overrides_tree(overrides: Sequence[str]) -> dict:
    tree: Dict[str, dict] = {}
    for text in overrides:
        section, name, value = parse_override(text)
        tree.setdefault(section, {})[name] = value
    return tree


def read_yaml(path: Union[str, Path]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            tree = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    return tree or {}


# ---------------------------------------------------------------------------------- Settings
@dataclass
class Settings:
    """Resolved settings of a run. model: dict of FPTConfig fields + preset."""

    model: dict
    data: DataSettings
    preload: PreloadSettings
    train: TrainSettings

    def to_dict(self) -> dict:
        model = {"preset": self.model["preset"], **{k: v for k, v in self.model.items() if k != "preset"}}
        return _plain({"model": model, "data": dataclasses.asdict(self.data),
                       "preload": dataclasses.asdict(self.preload), "train": dataclasses.asdict(self.train)})

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False)

    def fpt_config(self, num_classes: Optional[int] = None) -> FPTConfig:
        """The FPTConfig of these settings; num_classes fills model.num_classes when that is None."""
        values = {k: v for k, v in self.model.items() if k not in MODEL_EXTRA}
        if values["num_classes"] is None:
            if num_classes is None:
                raise ValueError("setting model.num_classes is null and no dataset gives the number of classes")
            values["num_classes"] = num_classes
        elif num_classes is not None and values["num_classes"] != num_classes:
            raise ValueError(f"setting model.num_classes={values['num_classes']} but the dataset has "
                             f"{num_classes} class folders")
        try:
            return FPTConfig(**values)
        except ValueError as e:
            raise ValueError(f"invalid model settings: {e}") from None

    def replace(self, section: str, **values) -> "Settings":
        """A copy with some keys of one section changed (checked like --set)."""
        checked = check_tree({section: values})[section]
        tree = self.to_dict()
        tree[section].update(checked)
        return Settings.from_tree(tree)

    @classmethod
    def from_tree(cls, tree: dict) -> "Settings":
        """Settings from a complete tree (every key present), checked: types and RANGES."""
        tree = check_tree(tree)
        check_ranges(tree)
        check_combinations(tree)
        model = dict(tree["model"])
        return cls(model=model, data=DataSettings(**_tuples(tree["data"], DataSettings)),
                   preload=PreloadSettings(**tree["preload"]), train=TrainSettings(**tree["train"]))


class _Dumper(yaml.SafeDumper):
    """Sections and keys one per line, lists inline ([0.8, 1.0])."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


def _tuples(values: dict, cls) -> dict:
    """Fixed-length list values of a section back to tuples (dataclass field types)."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        if typing.get_origin(hints[key]) is tuple and isinstance(value, list):
            out[key] = tuple(value)
    return out


def _plain(tree):
    """Tuples -> lists, recursively: YAML- and checkpoint-safe primitives."""
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_plain(v) for v in tree]
    return tree


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for section, values in update.items():
        out.setdefault(section, {}).update(copy.deepcopy(values))
    return out


def load_settings(config_path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = (),
                  base: Optional[dict] = None) -> Settings:
    """Resolves the layers: defaults (or ``base``, e.g. a checkpoint's settings) < preset < dataset
    template < YAML file < overrides. The preset and dataset template are those named by the
    YAML file or the overrides (or by ``base``). The result is checked throughout: every key's
    type and range, the model section as an FPTConfig (model.num_classes null stands for any
    number of classes), model.checkpoint_path readable."""
    user = check_tree(read_yaml(config_path), source=str(config_path)) if config_path else {}
    user = _merge(user, check_tree(overrides_tree(overrides), source="--set"))
    if base is not None:
        resolved = _merge(default_values(), check_tree(base, source="checkpoint settings"))
        settings = Settings.from_tree(_merge(resolved, user))
    else:
        tree = default_values()
        preset = user.get("model", {}).get("preset", tree["model"]["preset"])
        tree["model"].update(PRESETS[preset])
        dataset = user.get("data", {}).get("dataset")
        if dataset is not None:
            tree = _merge(tree, DATASETS[dataset])
        settings = Settings.from_tree(_merge(tree, user))
    check_backbone_file(settings.model["checkpoint_path"])
    settings.fpt_config(settings.model["num_classes"] or 2)
    return settings
