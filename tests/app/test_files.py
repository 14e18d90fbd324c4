"""Atomic files: a write that fails leaves the old file and no temporary file; the CSV writer."""
import csv

import pytest

from fpt_fast.app import files


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    files.atomic_write_json(path, {"b": 1, "a": [1, 2]})
    before = path.read_bytes()
    assert before.decode().index('"a"') < before.decode().index('"b"')  # sorted keys
    with pytest.raises(RuntimeError, match="disk full"):
        with files.atomic_open(path) as f:
            f.write(b"half of it")
            raise RuntimeError("disk full")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_csv_rows_with_formatted_floats(tmp_path):
    path = tmp_path / "log.csv"
    files.atomic_write_csv(path, [{"epoch": 1, "loss": 0.123456789, "extra": "x"}, {"epoch": 2}], ["epoch", "loss"],
                           ".3f")
    with open(path) as f:
        assert list(csv.DictReader(f)) == [{"epoch": "1", "loss": "0.123"}, {"epoch": "2", "loss": ""}]
