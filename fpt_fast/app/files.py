"""Files that are never seen half-written: every write goes to a temporary file in the same folder,
is synced, and is moved into place with os.replace; a failed write leaves the old file (or none)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping, Sequence, Union

PathLike = Union[str, Path]


@contextlib.contextmanager
def atomic_open(path: PathLike) -> Iterator[BinaryIO]:
    """A binary file that appears at path only once it is completely written and synced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
