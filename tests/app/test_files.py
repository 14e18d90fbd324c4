"""Atomic files: a write that fails leaves the old file and no temporary file; the CSV writer."""
import csv
import errno
import os

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


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "log.csv"
    path.write_text("the previous epochs\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(files.DiskFullError, match=r"while writing .*log.csv \(nothing written before was lost: "
                                                  r"log.csv is as it was\); free some space, then run the command "
                                                  r"again") as error:
        files.atomic_write_bytes(path, b"the previous epochs and one more\n")
    assert isinstance(error.value, ValueError) and error.value.errno == errno.ENOSPC
    assert path.read_text() == "the previous epochs\n" and [p.name for p in tmp_path.iterdir()] == ["log.csv"]


def test_folders_that_are_files_and_outputs_that_exist_are_refused(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="train.out_dir='.*a_file' is a file, not a folder"):
        files.make_folder(tmp_path / "a_file", "train.out_dir")
    with pytest.raises(ValueError, match="a part of that path is a file"):
        files.make_folder(tmp_path / "a_file" / "run", "train.out_dir")
    with pytest.raises(ValueError, match="--output '.*' is a folder: give the path of a file"):
        files.check_new_file(tmp_path, False, "--output")
    with pytest.raises(ValueError, match="a_file' is a file, not a folder"):
        files.check_new_file(tmp_path / "a_file" / "p.csv", False, "--output")
    with pytest.raises(ValueError, match="exists: choose another file, or add --overwrite"):
        files.check_new_file(tmp_path / "a_file", False, "--output")
    assert files.check_new_file(tmp_path / "a_file", True, "--output") == tmp_path / "a_file"
    with pytest.raises(ValueError, match="is a folder: expected the path of a file"):
        files.atomic_write_bytes(tmp_path, b"")


def test_temporary_files_of_dead_processes_are_removed(tmp_path):
    dead, alive = tmp_path / f".last.pt.tmp-{2 ** 22 + 1}", tmp_path / f".best.pt.tmp-{os.getpid()}"
    for path in (dead, alive, tmp_path / "last.pt", tmp_path / ".notes.tmp-x"):
        path.write_bytes(b"")
    assert files.remove_stale_temporaries(tmp_path) == [dead]
    assert files.remove_stale_temporaries(tmp_path, every=True) == [alive]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp-x", "last.pt"]
