"""Files that are never seen half-written: every write goes to a temporary file in the same folder,
is synced, and is moved into place with os.replace; a failed write leaves the old file (or none).

Also the checks that keep user-made files safe and user-caused failures readable: folders that
are files, outputs that would replace a file, a full disk (DiskFullError), temporary files left
by killed processes, and torch files that cannot be read.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import BinaryIO, Iterator, List, Mapping, Optional, Sequence, Union

PathLike = Union[str, Path]
# ".NAME.tmp-PID": the temporary file of atomic_open (and of a feature-store shard being written).
TEMPORARY_NAME = re.compile(r"^\..+\.tmp-(\d+)$")


class DiskFullError(OSError, ValueError):
    """The device ran out of space (or quota) while a file was written. The message names the
    file, says that nothing written before was lost and how to continue (a caller that knows
    better says so with then()). A ValueError as well, so the command line reports it in one
    line and torchrun's other processes stop with the same message."""

    def __init__(self, what: str, how_to_continue: str = "run the command again"):
        super().__init__(errno.ENOSPC, what)
        self.how_to_continue = how_to_continue

    def __str__(self) -> str:
        return f"{self.args[1]}; free some space, then {self.how_to_continue}"

    def then(self, how_to_continue: str) -> "DiskFullError":
        return DiskFullError(self.args[1], how_to_continue)


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(path: PathLike) -> DiskFullError:
    return DiskFullError(f"no space left on the device while writing {path} (nothing written before was lost: "
                         f"{Path(path).name} is as it was)")


@contextlib.contextmanager
def atomic_open(path: PathLike) -> Iterator[BinaryIO]:
    """A binary file that appears at path only once it is completely written and synced.
    ValueError when path is a folder; DiskFullError when the device is full."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder: expected the path of a file to write")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(path) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(path: PathLike, obj) -> None:
    """obj as indented JSON with sorted keys."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def atomic_write_csv(path: PathLike, rows: Sequence[Mapping], columns: Sequence[str], float_format: str) -> None:
    """rows as CSV with a header of columns (keys of a row outside them are left out, missing
    ones are empty); floats written with float_format (e.g. ".6g")."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (format(v, float_format) if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


# ------------------------------------------------------------------- folders and outputs
def make_folder(path: PathLike, setting: str) -> Path:
    """The folder at path, created if needed. ValueError naming the setting when path, or a
    folder on its way, is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{setting}={str(path)!r} is a file, not a folder: name a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{setting}={str(path)!r} cannot be created: a part of that path is a file, "
                         f"not a folder") from None
    return path


def check_new_file(path: PathLike, overwrite: bool, option: str) -> Path:
    """path, checked as a file to write: ValueError naming ``option`` when it is a folder, when a
    folder on its way is a file, or when it exists and overwrite is False."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a folder: give the path of a file (e.g. "
                         f"{str(path / 'predictions.csv')!r})")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option} {str(path)!r} cannot be written: {str(parent)!r} is a file, not a folder")
            break
    if path.exists() and not overwrite:
        raise ValueError(f"{option} {str(path)!r} exists: choose another file, or add --overwrite to replace it")
    return path


def remove_stale_temporaries(folder: PathLike, every: bool = False, name: Optional[str] = None) -> List[Path]:
    """Deletes the temporary files (".NAME.tmp-PID") in folder that killed processes left: those
    of PIDs no longer running on this machine, or with every=True all of them (for a caller that
    knows no other writer is at work, e.g. under the feature store's lock); with name, only
    those of that file (in a folder of the user's). Returns them."""
    removed = []
    for path in Path(folder).iterdir():
        match = TEMPORARY_NAME.match(path.name)
        if name is not None and not path.name.startswith(f".{name}.tmp-"):
            continue
        if match and path.is_file() and (every or not _running(int(match.group(1)))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# --------------------------------------------------------------------------- torch files
def read_torch_file(path: PathLike, what: str, mmap: bool = False):
    """torch.load(path, weights_only=True) on the CPU, with errors that name ``what`` and the file:
    FileNotFoundError when it is missing, ValueError when it cannot be read (not written by
    torch.save, cut short, or holding Python objects beyond tensors and plain containers, which
    are never unpickled). mmap: map a zip-format file instead of reading it (cheap to open)."""
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        raise ValueError(f"{what} {str(path)!r} cannot be read: it is not a file of tensors and plain containers "
                         f"written by torch.save (Python objects of other kinds are never unpickled: that could "
                         f"run code)") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ... for files it cannot parse
        reason = ": ".join([type(e).__name__] + [str(e).split(". ")[0].strip()] * bool(str(e).strip()))
        raise ValueError(f"{what} {str(path)!r} cannot be read: it was not written by torch.save, or it is "
                         f"damaged or cut short ({reason})") from None
