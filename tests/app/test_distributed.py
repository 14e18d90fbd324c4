"""Several processes: torchrun-started training and preloading (gloo on the CPU) give the results
of one process; the batch order, the torchrun environment and the part files of an interrupted
preload."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fpt_fast.app import distributed, preloading, store
from fpt_fast.app.checkpoints import load_checkpoint
from fpt_fast.app.data import EpochBatches
from fpt_fast.app.preloading import preload
from fpt_fast.app.training import train
from tiny_run import tiny_settings

QUIET = dict(log=lambda _: None)
METRICS = ["val_acc", "val_f1", "val_auc", "val_precision", "val_recall", "val_kappa", "best"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(config, *args, nproc=2) -> str:
    """Runs ``fpt_fast <args> -c config`` in nproc processes; returns their output."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
               str(free_port()), "-m", "fpt_fast", *args, "-c", str(config), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def write_config(settings, path):
    path.write_text(settings.to_yaml())
    return path


def sets(*overrides):
    return [arg for value in overrides for arg in ("--set", value)]


def max_weight_difference(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def corrupt(settings, name="vertical/vertical_0001.png"):
    """Makes one training image unreadable."""
    (Path(settings.data.root) / "train" / name).write_bytes(b"\x89PNG\r\n\x1a\n cut short")


# ------------------------------------------------------------------------------- ordering
@pytest.mark.parametrize("num_items,batch_size,world_size", [(11, 5, 2), (12, 2, 2), (13, 2, 3), (2, 4, 3)])
def test_the_slices_of_k_processes_make_the_batches_of_one(num_items, batch_size, world_size):
    for epoch in (0, 3):
        single = EpochBatches(num_items, batch_size * world_size, seed=5)
        ranks = [EpochBatches(num_items, batch_size, seed=5, rank=r, world_size=world_size)
                 for r in range(world_size)]
        for sampler in [single] + ranks:
            sampler.set_epoch(epoch)
        assert all(len(r) == len(single) for r in ranks)
        together = [sum(slices, []) for slices in zip(*[list(r) for r in ranks])]
        assert together == list(single)
        assert sorted(sum(together, [])) == list(range(num_items))
    first, later = EpochBatches(40, 4, seed=5), EpochBatches(40, 4, seed=5)
    later.set_epoch(1)
    assert list(first) != list(later)  # a new order each epoch


# ---------------------------------------------------------------------------- environment
def test_torchrun_variables(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.torchrun_env() is None and distributed.Group().world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.torchrun_env() is None  # torchrun with one process: a plain run
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2 is set but RANK, LOCAL_RANK not"):
        distributed.torchrun_env()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ValueError, match="LOCAL_RANK='x' must be an integer"):
        distributed.torchrun_env()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.torchrun_env() == distributed.TorchrunEnv(1, 2, 1, 2)
    assert distributed.local_device("auto" if not torch.cuda.is_available() else "cpu").type == "cpu"
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="inconsistent torchrun variables"):
        distributed.torchrun_env()


# ------------------------------------------------------------------------------- training
def test_two_processes_train_like_one_with_the_global_batch(tmp_path):
    """2 processes x batch 5 against 1 process x batch 10, from a store (fp32, one image left out:
    11 images, so the last global batch has 1 image and process 1 an empty slice), stopped after
    epoch 1 and resumed for epoch 2. Dropout is off: its draws differ between processes."""
    settings = tiny_settings(tmp_path, "preload.dtype=float32", "model.dropout=0.0", "data.skip_bad_images=true",
                             "train.epochs=2")
    corrupt(settings)
    preload(settings, **QUIET)
    config = write_config(settings, tmp_path / "run.yaml")
    two = tmp_path / "two"
    first = torchrun(config, "train", *sets(f"train.out_dir={two}", "train.batch_size=5", "train.epochs=1"))
    second = torchrun(config, "train", "--resume", *sets(f"train.out_dir={two}", "train.batch_size=5"))

    one = settings.replace("train", out_dir=str(tmp_path / "one"), batch_size=10)
    train(one.replace("train", epochs=1), **QUIET)
    reference = train(one, resume=True, **QUIET)

    a, b = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(two / "last.pt")
    difference = max_weight_difference(a["model"], b["model"])
    print(f"\nmax |w(2 processes) - w(1 process)| = {difference:.3g}")
    assert difference < 1e-5
    assert b["world_size"] == 2 and len(b["rng_ranks"]) == 2
    assert [{k: r[k] for k in METRICS} for r in b["history"]] == [{k: r[k] for k in METRICS} for r in a["history"]]
    for row_a, row_b in zip(a["history"], b["history"]):
        assert row_b["train_loss"] == pytest.approx(row_a["train_loss"], rel=1e-5)
        assert row_b["train_acc"] == row_a["train_acc"]
    assert b["best_epoch"] == reference.best_epoch
    # Rank 0 alone logs; the image left out when preloading is reported once.
    assert first.count("epoch 1/1") == 1 and "global batch 10 = 2 x train.batch_size 5" in first
    assert second.count("epoch 2/2") == 1 and second.count("resuming") == 1
    assert second.count("vertical_0001.png (left out when preloaded)") == 1
    with pytest.raises(ValueError, match=r"had 2 process\(es\) \(global batch 10\), this one has 1"):
        train(settings.replace("train", out_dir=str(two), batch_size=5, epochs=3), resume=True, **QUIET)


def test_live_features_and_computed_normalisation_across_processes(tmp_path):
    """Frozen branch run by each process on its own images, mean/std computed by both together,
    an unreadable image met in training: the single-process weights, metrics and mean/std."""
    settings = tiny_settings(tmp_path, "data.store=null", "model.dropout=0.0", "data.skip_bad_images=true",
                             "train.epochs=1")
    corrupt(settings, "horizontal/horizontal_0002.png")
    config = write_config(settings, tmp_path / "run.yaml")
    output = torchrun(config, "train", *sets(f"train.out_dir={tmp_path / 'two'}", "train.batch_size=3"))
    train(settings.replace("train", out_dir=str(tmp_path / "one"), batch_size=6), **QUIET)
    a, b = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    assert b["settings"]["data"]["mean"] == a["settings"]["data"]["mean"]  # bit for bit
    assert b["settings"]["data"]["std"] == a["settings"]["data"]["std"]
    difference = max_weight_difference(a["model"], b["model"])
    print(f"\nlive: max |w(2 processes) - w(1 process)| = {difference:.3g}")
    assert difference < 1e-5
    assert [{k: r[k] for k in METRICS} for r in b["history"]] == [{k: r[k] for k in METRICS} for r in a["history"]]
    assert output.count("1 unreadable image(s) were left out") == 1


# ------------------------------------------------------------------------------ preloading
class InterruptedSecondProcess:
    """Process 1 of 2 of a torchrun preload, interrupted when it would wait for process 0."""

    active, rank, world_size, is_main = True, 1, 2, False

    def main_first(self, fn):
        return fn()

    def all_gather_object(self, obj):
        raise KeyboardInterrupt


def test_two_process_preload_resumes_and_equals_one_process(tmp_path, monkeypatch):
    settings = tiny_settings(tmp_path, "preload.dtype=float32")
    reference = preload(settings.replace("data", store=str(tmp_path / "reference")), **QUIET)

    # An interrupted run (fp32 records: 2 per shard, 6 train shards): one process finished train
    # shard 0 and stopped; then process 1 of a torchrun run finished its share of shards 1-5
    # (2 and 4), recorded in its part file, and stopped.
    commit = store.StoreWriter.commit_shard

    def commit_then_stop(self, *args, **kwargs):
        commit(self, *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(store.StoreWriter, "commit_shard", commit_then_stop)
    with pytest.raises(KeyboardInterrupt):
        preload(settings, **QUIET)
    monkeypatch.setattr(store.StoreWriter, "commit_shard", commit)
    monkeypatch.setattr(preloading, "Group", InterruptedSecondProcess)
    with pytest.raises(KeyboardInterrupt):
        preload(settings, **QUIET)
    monkeypatch.undo()
    path = tmp_path / "store"
    part = json.loads((path / "train.part-00001.json").read_text())
    assert [s["file"] for s in part["shards"]] == ["train-00002.bin", "train-00004.bin"]
    assert [s["file"] for s in json.loads((path / "train.index.json").read_text())["shards"]] == ["train-00000.bin"]

    output = torchrun(write_config(settings, tmp_path / "run.yaml"), "preload", "--verify")
    assert "train: 12 images, 3 shard(s) written, 3 kept from an earlier run" in output
    assert "val: 6 images, 3 shard(s) written" in output and output.count(": OK") == 1
    assert not list(path.glob("*.part-*"))  # folded into the indexes

    ours, theirs = store.FeatureStore(path), store.FeatureStore(reference.store)
    assert ours.manifest == theirs.manifest  # fingerprint included: same mean/std, bit for bit
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in reference.store.iterdir())
    for name in ("train", "val", "test"):
        a, b = ours.split(name), theirs.split(name)
        assert a.index == b.index  # shard files, counts, crc32, samples
        for position in range(len(a)):
            assert torch.equal(torch.stack(a.read(position)), torch.stack(b.read(position))), (name, position)
