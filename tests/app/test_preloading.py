"""Preloading: an interrupted preload resumes to the store of an uninterrupted one, unreadable images
stop it or are left out, the finished store is verified (recomputed samples included)."""
import errno
import json
import os

import pytest

from fpt_fast.app import data, store
from fpt_fast.app.files import DiskFullError
from fpt_fast.app.preloading import preload, verify_store
from tiny_run import tiny_settings


def test_interrupted_preload_resumes_and_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    settings = tiny_settings(tmp_path)
    reference = preload(settings.replace("data", store=str(tmp_path / "reference")), log=lambda _: None)
    train_shards = json.loads((reference.store / "train.index.json").read_text())["shards"]
    assert len(train_shards) == 3  # 12 images, 4 per shard: the interruption below falls inside train

    commit = store.StoreWriter.commit_shard
    calls = []

    def commit_then_crash(self, *args, **kwargs):
        commit(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C right after the 2nd shard
    monkeypatch.setattr(store.StoreWriter, "commit_shard", commit_then_crash)
    with pytest.raises(KeyboardInterrupt):
        preload(settings, log=lambda _: None)
    monkeypatch.setattr(store.StoreWriter, "commit_shard", commit)

    path = tmp_path / "store"
    index = json.loads((path / "train.index.json").read_text())
    assert len(index["shards"]) == 2 and not index["complete"]
    assert not [p for p in path.iterdir() if ".tmp-" in p.name]  # nothing half-written is left
    with pytest.raises(ValueError, match="unfinished"):
        store.FeatureStore(path).split("train")

    result = preload(settings, log=lambda _: None)
    assert [(r.split, r.shards_reused, r.shards_written) for r in result.reports] == \
        [("train", 2, 1), ("val", 0, 2), ("test", 0, 2)]
    files = sorted(p.name for p in reference.store.iterdir())
    assert files == sorted(p.name for p in path.iterdir())
    for name in files:
        if name.endswith(".bin") or name.endswith(".index.json"):
            assert (path / name).read_bytes() == (reference.store / name).read_bytes(), name
    again = preload(settings, log=lambda _: None)  # a finished store is left as it is
    assert all(r.shards_written == 0 for r in again.reports)


def test_unreadable_image_stops_preload_or_is_left_out(tmp_path):
    settings = tiny_settings(tmp_path, "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]")
    bad = tmp_path / "data" / "train" / "horizontal" / "horizontal_0002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(data.BadImageError, match="horizontal_0002.png"):
        preload(settings, log=lambda _: None)
    index = json.loads((tmp_path / "store" / "train.index.json").read_text())
    assert len(index["shards"]) == 1  # the shard before the bad image stays valid

    messages = []
    result = preload(settings.replace("data", skip_bad_images=True), log=messages.append)
    assert len(result.bad_images) == 1 and "horizontal_0002.png" in result.bad_images[0]
    assert any("horizontal_0002.png" in m for m in messages)
    split = store.FeatureStore(result.store).split("train")
    position = [p for p, (path, _) in enumerate(split.samples) if path.endswith("horizontal_0002.png")][0]
    assert split.left_out == [position] and position not in split.present_positions()
    with pytest.raises(ValueError, match="left out of the store"):
        split.read(position)
    assert len(split.present_positions()) == 11


def test_verify_store_recomputes_samples(tmp_path):
    settings = tiny_settings(tmp_path)
    preload(settings, log=lambda _: None)
    lines = []
    report = verify_store(settings, recompute=3, log=lines.append)
    assert report.ok and report.recomputed == 9 and report.samples == 24
    assert any(line.startswith("  read rate train") for line in lines)
    # An image replaced since preloading: its recomputed features differ from the stored ones.
    folder = tmp_path / "data" / "train"
    (folder / "checker" / "checker_0000.png").write_bytes((folder / "vertical" / "vertical_0000.png").read_bytes())
    report = verify_store(settings, recompute=12, log=lambda _: None)
    assert not report.ok and any("split 'train': recomputed features differ" in p for p in report.problems)


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    """Two preloads into one store both computed everything, and one could delete the other's shard."""
    settings = tiny_settings(tmp_path, "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]")
    (tmp_path / "store").mkdir()
    first = store.StoreLock(tmp_path / "store")  # as a preload at work holds it (another open file)
    with pytest.raises(ValueError, match=rf"is being written by another preload \(PID {os.getpid()} on "):
        preload(settings, log=lambda _: None)
    assert not list((tmp_path / "store").glob("*.json"))  # the second wrote nothing
    first.release()
    preload(settings, log=lambda _: None)


class FullDisk:
    """A shard file whose device is full: every write fails with ENOSPC."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_full_disk_names_the_shard_keeps_the_finished_ones_and_a_rerun_resumes(tmp_path, monkeypatch):
    settings = tiny_settings(tmp_path, "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]")
    opened = store.ShardFile.__init__

    def second_shard_on_a_full_disk(self, *args, **kwargs):
        opened(self, *args, **kwargs)
        if self.name == "train-00001.bin":
            self.file = FullDisk(self.file)
    monkeypatch.setattr(store.ShardFile, "__init__", second_shard_on_a_full_disk)
    with pytest.raises(DiskFullError, match=r"no space left on the device while writing .*train-00001.bin \(nothing "
                                            r"written before was lost.*run preload again: it continues with the "
                                            r"unfinished shards"):
        preload(settings, log=lambda _: None)
    monkeypatch.undo()
    path = tmp_path / "store"
    assert [s["file"] for s in json.loads((path / "train.index.json").read_text())["shards"]] == ["train-00000.bin"]
    assert not [p for p in path.iterdir() if ".tmp-" in p.name]
    result = preload(settings, log=lambda _: None)
    assert (result.reports[0].shards_reused, result.reports[0].shards_written) == (1, 2)


def test_gpu_decode_is_refused_without_cuda_and_its_store_is_told_apart(tmp_path, monkeypatch):
    """preload.decode "gpu": refused on a machine without CUDA, naming the setting. Its code path
    (run here on the CPU stand-in) makes a store whose fingerprint names the device transform,
    which runs with decode "pil" refuse (naming the transform) and verify recomputes alike."""
    import torch
    from PIL import Image

    from fpt_fast.app import preloading
    from fpt_fast.app.build import check_store
    from fpt_fast.app.preloading import build_model

    settings = tiny_settings(tmp_path, "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]")
    for path in sorted((tmp_path / "data").rglob("*.png"))[::2]:   # half the images as JPEG files
        Image.open(path).convert("RGB").save(path.with_suffix(".jpg"), quality=90)
        path.unlink()
    gpu = settings.replace("preload", device="auto", decode="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="preload.decode='gpu' decodes images on a CUDA GPU, but the preload "
                                             "device is cpu .*set preload.decode to 'pil'"):
            preload(gpu, log=lambda _: None)
        monkeypatch.setattr(preloading, "gpu_decode_device_problem", lambda settings, device: None)
    result = preload(gpu, log=lambda _: None)
    made = store.FeatureStore(result.store)
    assert made.fingerprint["transform"] == data.DeviceFrozenTransform((64, 48), [0.5] * 3, [0.25] * 3).description()
    assert all(r.samples == len(store.FeatureStore(result.store).split(r.split).present_positions())
               for r in result.reports)
    model = build_model(settings, 3)
    with pytest.raises(ValueError, match="transform: store has"):
        check_store(made, settings, model)          # decode "pil": another transform
    check_store(made, gpu, model)
    report = verify_store(gpu, recompute=2, log=lambda _: None)
    assert report.ok and report.recomputed == 6
