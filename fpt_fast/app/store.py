"""The preloaded-feature store: K_sel / V_sel of every image, computed once by the frozen branch.

Layout of a store folder:

    manifest.json            format, fingerprint, feature shape (L, H, n, d), stored dtype, classes
    <split>.index.json       samples (path, label), samples_per_shard, finished shards
                             (file, first position, count, crc32, positions left out), complete
    <split>-<k>.bin          a header of SHARD_HEADER_BYTES (magic line, then JSON: format, sha256 of
                             the fingerprint it was made under, split, first position, count,
                             record bytes), then raw records, one per sample in split order:
                             (2, L, H, n, d) of the stored dtype (keys then values); bfloat16 is
                             stored as its uint16 bits
    writer.lock              the one-writer lock (below)

Records are fixed-size, so a sample is one contiguous block found by arithmetic; training reads
shards through numpy memory maps (big sequential blocks, shared page cache across workers).
Bytes per image: 2 * L * H * n * d * itemsize, against 2 * L * H * n * d * 4 (+ a file each) for
the official per-image fp32 files.

Every file is written to a temporary name and moved into place with os.replace (fpt_fast.app.files),
so a store never holds a half-written file. A shard is registered in the index only after its file
is in place, so an interrupted preload resumes with the unfinished shards.

Checked where it is read: opening a split (FeatureStore.split, in the main process, before any
DataLoader worker starts; the workers receive the checked split) checks every shard's size, its
header (made under this store's fingerprint, for this split and place) and the CRC-32 of its
records against the index: a cut-short, altered or foreign shard is an error naming the file
and the fix, never data. The CRC pass reads the store once per process and run: measured at
about 0.25 s per GB from the page cache (zlib.crc32 over a memory map, 4.1 GB/s on one core of
the development machine; sha256 manages 1.8 GB/s), or the disk's sequential read rate when the
store is not cached (e.g. about 0.5 s per GB at 2 GB/s), against a training step's random reads
of some 3000 records/s (11 GB/s for FPT+ at ViT-B/16, 512 px), which would make a check on every
read the bottleneck. A preload re-checks the shards it keeps from an earlier run the same way and
recomputes damaged ones; shards made under another fingerprint (a replaced manifest, a file
copied from another store) are refused.

One writer per store: a preload holds an exclusive lock (fcntl.flock) on writer.lock, which holds
the writer's PID and host; a second preload into the store is refused naming them. The lock
ends with the process, however it ends. Under torchrun rank 0 holds it for all the processes.

Under torchrun (several processes) each process writes whole shards of its own and records them
in its part file, ``<split>.part-<rank>.json``; once all are done, rank 0 folds the part files into
the index in one atomic write. A resumed preload (with any number of processes) folds the part
files of the interrupted one in first, so each shard is computed once.

The fingerprint records everything that determines the features (backbone, hash of its weights,
input size, position-embedding resampling rule, LayerNorm eps,
extracted layers, token ratio, importance, compute and stored dtypes, the transform);
opening a store with a different fingerprint is an error that names both sides. The dtypes the
features were computed and stored in (STORE_PROPERTIES) are the store's own: a store written on a
GPU (bfloat16 compute) trains on a CPU-only machine; only a preload continuing the store must match
them.

Format 2 (shard headers, CRC-32) replaced format 1 (sha256 in the index, headerless shards): a
format-1 store is refused with the advice to preload again.

The preloading job that fills a store (which images, in which process) is fpt_fast.app.preloading.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import mmap
import os
import random
import socket
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..model import FrozenFeatures
from .data import frozen_inputs
from .files import atomic_write_json, disk_full_error, is_disk_full, make_folder, remove_stale_temporaries

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
LOCK_FILE = "writer.lock"
SHARD_MAGIC = b"fpt_fast feature-store shard\n"
SHARD_HEADER_BYTES = 4096  # the records start on a page boundary
# Fingerprint keys a reader takes from the store instead of matching them: how the machine that
# preloaded computed and stored the features.
STORE_PROPERTIES = ("frozen_compute_dtype", "feature_dtype", "stored_dtype")
STORAGE = {  # stored dtype -> numpy dtype of the file's elements
    "bfloat16": np.dtype("<u2"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
}
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Largest |stored - recomputed| / (|recomputed| + 1) that verify accepts, per stored dtype: a few
# units in the last place (recomputation may batch differently).
VERIFY_TOLERANCE = {"bfloat16": 3 * 2.0 ** -8, "float16": 3 * 2.0 ** -11, "float32": 1e-4}


def read_json(path: Path) -> dict:
    """A JSON file of the store; ValueError naming it when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); the store is damaged") from None


# ------------------------------------------------------------------------------- records
def record_shape(feature_shape: Sequence[int]) -> Tuple[int, ...]:
    """(2, L, H, n, d): one sample's keys, then its values."""
    return (2,) + tuple(int(s) for s in feature_shape)


def record_bytes(feature_shape: Sequence[int], dtype: str) -> int:
    """Bytes of one sample's record in the stored dtype (with "float32": an official per-image file's
    payload)."""
    return math.prod(record_shape(feature_shape)) * STORAGE[dtype].itemsize


def records_from_features(features: Tuple[Tensor, Tensor]) -> Tensor:
    """The records (B, 2, L, H, n, d) of features (keys, values), each (L, B, H, n, d)."""
    keys, values = features
    return torch.stack([keys, values]).permute(2, 0, 1, 3, 4, 5)


def features_from_records(keys: Tensor, values: Tensor) -> FrozenFeatures:
    """Keys and values of a batch of records, each (B, L, H, n, d) -> FrozenFeatures, each
    (L, B, H, n, d): the layout FPT.forward_from_features takes (a view, no copy)."""
    return FrozenFeatures(keys.transpose(0, 1), values.transpose(0, 1))


# ----------------------------------------------------------------------- dtype conversions
def to_storage(t: Tensor, dtype: str) -> np.ndarray:
    """t cast to the stored dtype, as the numpy array written to disk (bfloat16 -> uint16 bits)."""
    cast = t.detach().to("cpu", TORCH_DTYPES[dtype]).contiguous()
    if dtype == "bfloat16":
        return cast.view(torch.int16).numpy().view(np.uint16)
    return cast.numpy()


def from_storage(array: np.ndarray, dtype: str, copy: bool = True) -> Tensor:
    """The torch tensor (stored dtype) of an array read from disk. copy=True copies it out of a
    memory map; copy=False shares the memory of an array the caller owns."""
    array = np.array(array, copy=True) if copy else np.ascontiguousarray(array)
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


# ---------------------------------------------------------------------------- fingerprints
def weights_sha256(module: nn.Module) -> str:
    """sha256 over the module's state_dict: names, dtypes, shapes and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy())
    return digest.hexdigest()


def fingerprint(model, transform_description: dict, stored_dtype: str, device: torch.device,
                backbone_sha256: Optional[str] = None) -> dict:
    """Everything that determines the stored features of ``model`` (an fpt_fast.FPT) on ``device``."""
    config = model.config
    compute = model.frozen.compute_dtype(torch.device(device))
    compute_name = {v: k for k, v in TORCH_DTYPES.items()}[compute]
    return {
        "format": FORMAT_VERSION,
        "backbone": config.backbone,
        "backbone_kwargs": dict(config.backbone_kwargs),
        "backbone_sha256": backbone_sha256 or weights_sha256(model.frozen.backbone),
        "image_size": list(config.image_size),
        "pos_embed_resampling": config.pos_embed_resampling,
        "frozen_layer_norm_eps": config.layer_norm_eps,
        "extracted_layers": list(config.layers),
        "token_ratio": config.token_ratio,
        "num_selected": config.num_selected,
        "importance": config.importance,
        "frozen_compute_dtype": compute_name,
        "feature_dtype": config.feature_dtype or compute_name,
        "stored_dtype": stored_dtype,
        "transform": transform_description,
    }


def fingerprint_digest(fingerprint: dict) -> str:
    """sha256 of a fingerprint (canonical JSON): what each shard header records."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint_differences(store_fp: dict, run_fp: dict) -> List[str]:
    keys = sorted(set(store_fp) | set(run_fp))
    return [f"{k}: store has {store_fp.get(k, '<missing>')!r}, this run has {run_fp.get(k, '<missing>')!r}"
            for k in keys if store_fp.get(k) != run_fp.get(k)]


# -------------------------------------------------------------------------------- shards
def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.bin"


class DamagedShard(ValueError):
    """A shard file that is missing, cut short or altered since it was written: preload recomputes it."""

    def __init__(self, file: Path, problem: str):
        self.file, self.problem = file, problem
        super().__init__(f"feature store shard {str(file)!r} {problem}: run `fpt-fast preload` again with this "
                         f"store's settings, which recomputes damaged shards")


class ForeignShard(ValueError):
    """A shard file made under another fingerprint, or for another split or place, than the store
    expects there: refused (preload does not overwrite it)."""

    def __init__(self, file: Path, split: str, problem: str):
        self.file, self.problem = file, problem
        super().__init__(f"feature store shard {str(file)!r} {problem} (the store's {MANIFEST} was replaced, or the "
                         f"file comes from another store): preload into a new data.store folder, or delete "
                         f"{split}-*.bin and {split}.index.json in {str(file.parent)!r} and preload again")


def shard_header(fingerprint_sha256: str, split: str, start: int, count: int, record_bytes: int) -> bytes:
    """The SHARD_HEADER_BYTES that open a shard file: what it holds and under which fingerprint."""
    text = json.dumps({"format": FORMAT_VERSION, "fingerprint_sha256": fingerprint_sha256, "split": split,
                       "start": start, "count": count, "record_bytes": record_bytes}, sort_keys=True)
    header = SHARD_MAGIC + text.encode() + b"\n"
    return header + b" " * (SHARD_HEADER_BYTES - len(header))


def read_shard_header(file: Path) -> dict:
    with open(file, "rb") as f:
        raw = f.read(SHARD_HEADER_BYTES)
    try:
        if not raw.startswith(SHARD_MAGIC):
            raise ValueError
        header = json.loads(raw[len(SHARD_MAGIC):].decode())
        if not isinstance(header, dict):
            raise ValueError
    except ValueError:  # JSON and UTF-8 errors included
        raise DamagedShard(file, "has no readable shard header") from None
    return header


def records_crc32(file: Path, chunk_bytes: int = 64 * 2 ** 20) -> int:
    """CRC-32 of a shard's records (everything after its header), read through a memory map."""
    crc = 0
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            for offset in range(SHARD_HEADER_BYTES, len(mapped), chunk_bytes):
                crc = zlib.crc32(view[offset:offset + chunk_bytes], crc)
        finally:
            view.release()
    return crc


def check_shard(root: Path, split: str, entry: dict, samples_per_shard: int, num_samples: int, record_bytes: int,
                fingerprint_sha256: str, content: bool = True) -> None:
    """Checks one shard of an index: its entry, file size, header (this fingerprint, split and
    place) and, with content, the CRC-32 of its records. DamagedShard or ForeignShard naming the file."""
    start, count = entry.get("start"), entry.get("count")
    file = root / str(entry.get("file"))
    if (not isinstance(start, int) or start % samples_per_shard or not 0 <= start < num_samples
            or entry.get("file") != shard_name(split, start // samples_per_shard)
            or count != min(samples_per_shard, num_samples - start)):
        raise DamagedShard(file, f"has an entry in {split}.index.json that does not fit the split (damaged index)")
    if not file.is_file():
        raise DamagedShard(file, "is missing")
    size, expected = file.stat().st_size, SHARD_HEADER_BYTES + count * record_bytes
    if size != expected:
        raise DamagedShard(file, f"has {size} bytes, {expected} expected (cut short or altered)")
    header = read_shard_header(file)
    if header.get("fingerprint_sha256") != fingerprint_sha256:
        raise ForeignShard(file, split, "was made under another fingerprint than the store's")
    place = {"split": split, "start": start, "count": count, "record_bytes": record_bytes}
    found = {key: header.get(key) for key in place}
    if found != place:
        raise ForeignShard(file, split, f"holds {found}, not {place}")
    if content and records_crc32(file) != entry.get("crc32"):
        raise DamagedShard(file, "differs from its CRC-32 in the index (its bytes were altered)")


# ------------------------------------------------------------------------------- reading
class StoreSplit:
    """The features of one split. read(position) -> (keys, values), each (L, H, n, d) in the
    stored dtype. Memory maps are opened lazily in each process (DataLoader workers included);
    check() checks the shards once, in the process that opens the split."""

    def __init__(self, root: Path, index: dict, feature_shape: Sequence[int], dtype: str):
        self.root = Path(root)
        self.index = index
        self.name = index["split"]
        self.feature_shape = tuple(feature_shape)
        self.dtype = dtype
        self.samples_per_shard = int(index["samples_per_shard"])
        self.samples = [tuple(s) for s in index["samples"]]
        self.shards = index["shards"]
        self.left_out = sorted(p for shard in self.shards for p in shard["left_out"])
        self._left_out_set = set(self.left_out)
        self._maps: Dict[int, np.memmap] = {}
        self._pid = os.getpid()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}  # a memory map is re-opened in the receiving process
        return state

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def record_bytes(self) -> int:
        return record_bytes(self.feature_shape, self.dtype)

    def check(self, fingerprint_sha256: str) -> None:
        """Every shard the split needs there, whole (size, header, CRC-32): DamagedShard,
        ForeignShard or ValueError naming the file."""
        expected = StoreWriter.num_shards(len(self.samples), self.samples_per_shard)
        if len(self.shards) != expected:
            raise ValueError(f"{str(self.root / (self.name + '.index.json'))!r} lists {len(self.shards)} shards, "
                             f"{expected} expected (damaged index): run `fpt-fast preload` again with this store's "
                             f"settings")
        for entry in self.shards:
            check_shard(self.root, self.name, entry, self.samples_per_shard, len(self.samples), self.record_bytes,
                        fingerprint_sha256)

    def left_out_messages(self) -> List[str]:
        """The images left out as unreadable when the split was preloaded, one message each."""
        return [f"{self.samples[p][0]} (left out when preloaded)" for p in self.left_out]

    def present_positions(self) -> List[int]:
        """Positions whose features are stored (all but the images left out as unreadable)."""
        return [p for p in range(len(self.samples)) if p not in self._left_out_set]

    def _shard(self, k: int) -> np.memmap:
        if os.getpid() != self._pid:
            self._maps, self._pid = {}, os.getpid()
        if k not in self._maps:
            shard = self.shards[k]
            self._maps[k] = np.memmap(self.root / shard["file"], dtype=STORAGE[self.dtype], mode="r",
                                      offset=SHARD_HEADER_BYTES,
                                      shape=(shard["count"],) + record_shape(self.feature_shape))
        return self._maps[k]

    def read_record(self, position: int) -> np.ndarray:
        """The raw (2, L, H, n, d) record of one sample (a view into the memory map)."""
        if not 0 <= position < len(self.samples):
            raise IndexError(f"position {position} is outside split {self.name!r} ({len(self.samples)} samples)")
        if position in self._left_out_set:
            raise ValueError(f"sample {self.samples[position][0]!r} of split {self.name!r} was left out of "
                             f"the store (unreadable image)")
        k, offset = divmod(position, self.samples_per_shard)
        return self._shard(k)[offset]

    def read(self, position: int) -> Tuple[Tensor, Tensor]:
        record = from_storage(self.read_record(position), self.dtype)
        return record[0], record[1]

    def read_batch(self, positions: Sequence[int]) -> FrozenFeatures:
        """The features of several samples, each (L, B, H, n, d) in the stored dtype."""
        records = from_storage(np.stack([self.read_record(p) for p in positions]), self.dtype, copy=False)
        return features_from_records(records[:, 0], records[:, 1])


class FeatureStore:
    """An existing, readable store folder."""

    def __init__(self, path: Union[str, Path]):
        self.root = Path(path)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"data.store={str(self.root)!r} is a file, not a feature store folder")
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"feature store {str(self.root)!r} does not exist or has no {MANIFEST} "
                                    f"(run `fpt-fast preload` first)")
        self.manifest = read_json(manifest_path)
        if self.manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"feature store {str(self.root)!r} has format {self.manifest.get('format')!r}, written "
                             f"by another fpt_fast version; this one reads format {FORMAT_VERSION} (shards with "
                             f"headers and CRC-32 checksums): preload again into a new data.store folder, or "
                             f"delete this one first")
        self.fingerprint_sha256 = fingerprint_digest(self.fingerprint)

    @property
    def fingerprint(self) -> dict:
        return self.manifest["fingerprint"]

    @property
    def feature_shape(self) -> Tuple[int, ...]:
        return tuple(self.manifest["feature_shape"])

    @property
    def dtype(self) -> str:
        return self.fingerprint["stored_dtype"]

    @property
    def classes(self) -> List[str]:
        return list(self.manifest["classes"])

    @property
    def record_bytes(self) -> int:
        return record_bytes(self.feature_shape, self.dtype)

    def splits(self) -> List[str]:
        return sorted(p.name[: -len(".index.json")] for p in self.root.glob("*.index.json"))

    def check_fingerprint(self, run_fingerprint: dict, writing: bool = False) -> None:
        """ValueError naming every differing key, with the store's and the run's values. A reader
        (writing False) takes STORE_PROPERTIES from the store; a writer must match them too."""
        ignored = () if writing else STORE_PROPERTIES
        differences = fingerprint_differences({k: v for k, v in self.fingerprint.items() if k not in ignored},
                                              {k: v for k, v in run_fingerprint.items() if k not in ignored})
        if differences:
            raise ValueError(f"feature store {str(self.root)!r} was written for a different configuration "
                             f"than this run's; preload again into a new store. Differences:\n  "
                             + "\n  ".join(differences))

    def split(self, name: str, samples: Optional[Sequence] = None, check: bool = True) -> StoreSplit:
        """The finished split ``name``, its shards checked (StoreSplit.check) unless check is False
        (for a caller that just checked them). samples: the run's (path, label) list, which must
        match the store's."""
        index_path = self.root / f"{name}.index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"feature store {str(self.root)!r} has no split {name!r} "
                                    f"(it has {self.splits() or 'none'}); preload it first")
        index = read_json(index_path)
        if not index.get("complete"):
            raise ValueError(f"split {name!r} of feature store {str(self.root)!r} is unfinished: run "
                             f"`fpt-fast preload` again to finish it")
        split = StoreSplit(self.root, index, self.feature_shape, self.dtype)
        if samples is not None:
            check_same_samples(name, split.samples, [tuple(s) for s in samples], str(self.root))
        if check:
            split.check(self.fingerprint_sha256)
        return split


def check_same_samples(split: str, stored: Sequence[tuple], current: Sequence[tuple], where: str) -> None:
    if list(stored) == list(current):
        return
    for i, (a, b) in enumerate(zip(stored, current)):
        if a != b:
            raise ValueError(f"split {split!r} changed since it was preloaded into {where!r}: sample {i} is "
                             f"{b!r} now but {a!r} in the store; preload again into a new store")
    raise ValueError(f"split {split!r} changed since it was preloaded into {where!r}: {len(current)} images "
                     f"now, {len(stored)} in the store; preload again into a new store")


# ------------------------------------------------------------------------------- writing
class StoreLock:
    """The one-writer lock of a store folder: an exclusive flock on its writer.lock, which then
    holds "PID <pid> on <host>". ValueError naming the holder when another process has it. Held
    until release() or the end of the process. A context manager."""

    def __init__(self, root: Path):
        self.file = open(root / LOCK_FILE, "a+")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "a process that is just starting"
            self.file.close()
            raise ValueError(f"feature store {str(root)!r} is being written by another preload ({holder}): wait "
                             f"for it to finish, or preload into another data.store folder") from None
        self.file.truncate(0)
        self.file.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()

    def __enter__(self) -> "StoreLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class StoreWriter:
    """Creates or continues a store. One instance per preload run (per process under torchrun).
    holds_lock: this process holds the store's StoreLock, so no other writer is at work (rank 0
    under torchrun: the other processes write under its lock)."""

    def __init__(self, path: Union[str, Path], run_fingerprint: dict, feature_shape: Sequence[int],
                 classes: Sequence[str], shard_mb: float, holds_lock: bool = True):
        self.fingerprint_sha256 = fingerprint_digest(run_fingerprint)
        self.feature_shape = tuple(int(s) for s in feature_shape)
        self.dtype = run_fingerprint["stored_dtype"]
        self.record_bytes = record_bytes(self.feature_shape, self.dtype)
        if not shard_mb > 0:
            raise ValueError(f"setting preload.shard_mb={shard_mb!r} must be positive")
        self.samples_per_shard = max(1, int(shard_mb * 2 ** 20) // self.record_bytes)
        self._parts: Dict[str, List[dict]] = {}  # split -> shards this process recorded in its part file
        self.damaged: List[DamagedShard] = []  # shards found damaged by open_index, to be computed again
        self.root = make_folder(path, "data.store")
        if holds_lock:  # no other writer is at work: every temporary file is a killed writer's
            remove_stale_temporaries(self.root, every=True)
        manifest_path = self.root / MANIFEST
        if manifest_path.exists():
            store = FeatureStore(self.root)
            store.check_fingerprint(run_fingerprint, writing=True)
            if store.classes != list(classes):
                raise ValueError(f"feature store {str(self.root)!r} has classes {store.classes}, the data has "
                                 f"{list(classes)}; preload into a new store")
        else:
            atomic_write_json(manifest_path, {"format": FORMAT_VERSION, "fingerprint": run_fingerprint,
                                              "feature_shape": list(self.feature_shape),
                                              "classes": list(classes)})

    def index_path(self, split: str) -> Path:
        return self.root / f"{split}.index.json"

    def part_paths(self, split: str) -> List[Path]:
        """The part files of a torchrun preload of split: the shards each process finished."""
        return sorted(self.root.glob(f"{split}.part-*.json"))

    def open_index(self, split: str, samples: Sequence[tuple]) -> dict:
        """The split's index: the existing one (checked against samples), or a new one.

        Its shards are those it lists plus those the processes of an interrupted torchrun preload
        recorded in their part files, each checked whole (check_shard, CRC-32 included): damaged
        ones are left out, to be computed again, and noted in self.damaged; a foreign one is an
        error. Part files are folded into the index (index written, then the part files deleted):
        one process calls this while none writes."""
        path = self.index_path(split)
        samples = [list(s) for s in samples]
        parts = self.part_paths(split)
        if not path.exists():
            for part in parts:  # written after an index that is gone: nothing to keep
                part.unlink()
            index = {"split": split, "samples": samples, "samples_per_shard": self.samples_per_shard,
                     "shards": [], "complete": False}
            atomic_write_json(path, index)
            return index
        index, parts, changed = self._folded(split, samples, content=True)
        if changed:
            atomic_write_json(path, index)
        for part in parts:  # after the index holds their shards: a crash in between loses nothing
            part.unlink()
        return index

    def _folded(self, split: str, samples: Sequence[list], content: bool) -> Tuple[dict, List[Path], bool]:
        """(the existing index with the intact shards it and the part files list, the part files,
        whether that differs from the index on disk). content: check the shards' CRC-32 too."""
        index = read_json(self.index_path(split))
        check_same_samples(split, [tuple(s) for s in index["samples"]], [tuple(s) for s in samples], str(self.root))
        parts = self.part_paths(split)
        listed = list(index["shards"]) + [shard for part in parts for shard in read_json(part)["shards"]]
        finished: Dict[int, dict] = {}
        for shard in listed:
            if shard.get("start") in finished:
                continue
            try:
                check_shard(self.root, split, shard, index["samples_per_shard"], len(samples), self.record_bytes,
                            self.fingerprint_sha256, content)
            except DamagedShard as e:
                self.damaged.append(e)
                continue
            finished[shard["start"]] = shard
        shards = [finished[start] for start in sorted(finished)]
        all_there = len(shards) == self.num_shards(len(samples), index["samples_per_shard"])
        complete = bool(index.get("complete", False) and all_there)
        changed = shards != index["shards"] or complete != index.get("complete", False)
        index["shards"], index["complete"] = shards, complete
        return index, parts, changed

    def read_index(self, split: str, samples: Sequence[tuple]) -> dict:
        """The split's index as it is (for the processes of a torchrun preload other than rank 0,
        after rank 0 opened it)."""
        index = read_json(self.index_path(split))
        check_same_samples(split, [tuple(s) for s in index["samples"]], [tuple(s) for s in samples], str(self.root))
        return index

    @staticmethod
    def num_shards(num_samples: int, per_shard: int) -> int:
        return math.ceil(num_samples / per_shard)

    def new_shard(self, split: str, k: int, count: int) -> "ShardFile":
        """The temporary file of shard k of split (count records), its header written."""
        return ShardFile(self.root, split, k, k * self.samples_per_shard, count, self.record_bytes,
                         self.fingerprint_sha256)

    def commit_shard(self, index: dict, shard: "ShardFile", part: Optional[int] = None) -> None:
        """Moves a finished (closed) shard file into place, then records it: in the split's index,
        or, for process ``part`` of a torchrun preload, in that process's part file (merged at the end)."""
        split = index["split"]
        os.replace(shard.tmp, self.root / shard.name)
        entry = shard.entry()
        index["shards"] = sorted(index["shards"] + [entry], key=lambda listed: listed["start"])
        if part is None:
            atomic_write_json(self.index_path(split), index)
            return
        mine = self._parts.setdefault(split, [])
        mine.append(entry)
        atomic_write_json(self.root / f"{split}.part-{part:05d}.json", {"split": split, "shards": mine})

    def finish(self, index: dict) -> None:
        index["complete"] = True
        atomic_write_json(self.index_path(index["split"]), index)

    def merge(self, split: str, samples: Sequence[tuple]) -> dict:
        """Rank 0, after every process of a torchrun preload finished its shards: folds the part
        files into the index and marks it complete (one atomic write), then deletes them."""
        index, parts, _ = self._folded(split, [list(s) for s in samples], content=False)  # written just now
        per_shard = index["samples_per_shard"]
        present = {shard["start"] // per_shard for shard in index["shards"]}
        missing = [k for k in range(self.num_shards(len(samples), per_shard)) if k not in present]
        if missing:
            raise ValueError(f"feature store {str(self.root)!r}: shard(s) {missing} of split {split!r} are "
                             f"missing after every process finished; on several nodes, data.store must be "
                             f"a folder all nodes share")
        self.finish(index)
        for part in parts:
            part.unlink()
        return index


class ShardFile:
    """A shard being written: a temporary file in the store folder, its header first, its records'
    CRC-32 computed as they are written. A full disk discards it and raises DiskFullError."""

    def __init__(self, root: Path, split: str, k: int, start: int, count: int, record_bytes: int,
                 fingerprint_sha256: str):
        self.name = shard_name(split, k)
        self.tmp = root / f".{self.name}.tmp-{os.getpid()}"
        self.start, self.count, self.record_bytes = start, count, record_bytes
        self.crc = 0
        self.left_out: List[int] = []
        self.file = open(self.tmp, "wb")
        self._guarded(self.file.write, shard_header(fingerprint_sha256, split, start, count, record_bytes))

    def _guarded(self, write, *args) -> None:
        try:
            write(*args)
        except OSError as e:
            if not is_disk_full(e):
                raise
            self.discard()
            raise disk_full_error(self.tmp.parent / self.name) from None

    def write(self, record: Optional[np.ndarray], position: int) -> None:
        """Appends a sample's record; None (an unreadable image) writes zeros and marks it left out."""
        if record is None:
            self.left_out.append(position)
            data = bytes(self.record_bytes)
        else:
            data = memoryview(np.ascontiguousarray(record)).cast("B")
        if len(data) != self.record_bytes:
            raise ValueError(f"record of sample {position} has {len(data)} bytes, the store's records "
                             f"{self.record_bytes}")
        self._guarded(self.file.write, data)
        self.crc = zlib.crc32(data, self.crc)

    def close(self) -> None:
        self._guarded(self.file.flush)
        self._guarded(os.fsync, self.file.fileno())
        self.file.close()

    def entry(self) -> dict:
        """The shard's entry in its split's index."""
        return {"file": self.name, "start": self.start, "count": self.count, "crc32": self.crc,
                "left_out": self.left_out}

    def discard(self) -> None:
        self.file.close()
        if self.tmp.exists():
            self.tmp.unlink()


# ------------------------------------------------------------------------------- checking
@dataclass
class VerifyReport:
    ok: bool
    problems: List[str]
    samples: int
    bytes: int
    recomputed: int = 0
    max_recompute_error: float = 0.0


def verify(path: Union[str, Path], model=None, transform=None, data_root=None, device="cpu",
           recompute: int = 4, seed: int = 0) -> VerifyReport:
    """Checks a store: every split finished, every shard whole (check_shard: size, header, CRC-32),
    no NaN/inf. With model, transform (preloading's: a FrozenTransform or DeviceFrozenTransform) and
    data_root, also recomputes ``recompute`` random samples per split and compares them with the
    stored records (tolerance VERIFY_TOLERANCE)."""
    store = FeatureStore(path)
    problems: List[str] = []
    total_samples, total_bytes = 0, 0
    recomputed, max_error = 0, 0.0
    record_bytes = store.record_bytes
    for name in store.splits():
        index = read_json(store.root / f"{name}.index.json")
        if not index.get("complete"):
            problems.append(f"split {name!r} is unfinished ({len(index['shards'])} shards written)")
            continue
        expected_shards = StoreWriter.num_shards(len(index["samples"]), index["samples_per_shard"])
        if len(index["shards"]) != expected_shards:
            problems.append(f"split {name!r}: {len(index['shards'])} shards recorded, {expected_shards} expected")
        for shard in index["shards"]:
            file = store.root / str(shard.get("file"))
            try:
                check_shard(store.root, name, shard, index["samples_per_shard"], len(index["samples"]), record_bytes,
                            store.fingerprint_sha256)
            except (DamagedShard, ForeignShard) as e:
                problems.append(f"{file.name}: {e.problem}")
                continue
            total_bytes += file.stat().st_size
            if not _all_finite(file, store.dtype):
                problems.append(f"{file.name}: holds NaN or inf values")
        total_samples += len(index["samples"])
        if model is not None and recompute > 0 and not problems:
            split = store.split(name, check=False)
            candidates = split.present_positions()
            chosen = sorted(random.Random(seed).sample(candidates, min(recompute, len(candidates))))
            images = frozen_inputs(transform, [Path(data_root) / split.samples[p][0] for p in chosen], device)
            fresh = records_from_features(model.extract(images)).float().cpu()
            stored = torch.stack([from_storage(split.read_record(p), store.dtype) for p in chosen]).float()
            error = ((stored - fresh).abs() / (fresh.abs() + 1)).amax().item()
            max_error = max(max_error, error)
            recomputed += len(chosen)
            if error > VERIFY_TOLERANCE[store.dtype]:
                problems.append(f"split {name!r}: recomputed features differ from the stored ones (max relative "
                                f"error {error:.3g} > {VERIFY_TOLERANCE[store.dtype]:.3g}): the images or the "
                                f"backbone changed since preloading")
    return VerifyReport(not problems, problems, total_samples, total_bytes, recomputed, max_error)


def _all_finite(file: Path, dtype: str, chunk_elements: int = 32 * 2 ** 20) -> bool:
    """Whether a shard's records hold no NaN or inf."""
    values = np.memmap(file, dtype=STORAGE[dtype], mode="r", offset=SHARD_HEADER_BYTES)
    for i in range(0, len(values), chunk_elements):
        chunk = values[i:i + chunk_elements]
        if dtype == "bfloat16":
            if np.any((chunk & 0x7F80) == 0x7F80):  # exponent all ones: inf or NaN
                return False
        elif not np.isfinite(chunk).all():
            return False
    return True


def measure_read_rate(split: StoreSplit, batch_size: int = 16, max_seconds: float = 5.0,
                      seed: int = 0) -> Tuple[float, float]:
    """(samples/s, MB/s) of reading random batches of records into torch tensors (read_batch): the
    store's side of a training step's reads (FPTDataset reads a record per sample, then the loader
    stacks them: one copy more)."""
    positions = split.present_positions()
    random.Random(seed).shuffle(positions)
    start = time.perf_counter()
    done = 0
    for i in range(0, len(positions), batch_size):
        split.read_batch(positions[i:i + batch_size])
        done += len(positions[i:i + batch_size])
        if time.perf_counter() - start > max_seconds:
            break
    seconds = max(time.perf_counter() - start, 1e-9)
    return done / seconds, done * split.record_bytes / seconds / 1e6
