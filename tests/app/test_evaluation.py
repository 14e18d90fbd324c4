"""Evaluation and prediction with a checkpoint: the run's validation repeated, features from the
store or from the frozen branch alike, predictions consistent with the metrics."""
import csv
import errno
import json

import numpy as np
import pytest

from fpt_fast.app import files
from fpt_fast.app.evaluation import evaluate, predict
from fpt_fast.app.preloading import preload
from fpt_fast.app.training import train
from tiny_run import tiny_settings

QUIET = dict(log=lambda _: None)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One epoch of FPT from an fp32 store (no dropout): the TrainResult."""
    tmp_path = tmp_path_factory.mktemp("run")
    settings = tiny_settings(tmp_path, "train.epochs=1", "preload.dtype=float32", "model.dropout=0.0")
    preload(settings, **QUIET)
    return train(settings, **QUIET)


def test_evaluating_the_best_checkpoint_repeats_its_validation(run):
    lines = []
    evaluation = evaluate(run.settings, run.out_dir / "best.pt", "val", log=lines.append)
    validation = run.history[run.best_epoch - 1]
    assert evaluation.metrics["acc"] == validation["val_acc"]
    assert evaluation.metrics["auc"] == pytest.approx(validation["val_auc"])
    assert evaluation.num_images == 6 and "confusion matrix" in lines[0]
    written = json.loads((run.out_dir / "eval_val.json").read_text())
    assert written["metrics"]["confusion"] == evaluation.metrics["confusion"]
    # Without the store the frozen branch computes the features: the same predictions.
    online = evaluate(run.settings.replace("data", store=None), run.out_dir / "best.pt", "val", **QUIET)
    assert online.metrics["confusion"] == evaluation.metrics["confusion"]
    assert online.metrics["auc"] == pytest.approx(evaluation.metrics["auc"], abs=1e-6)


def test_the_frozen_backbone_is_hashed_once_per_evaluation_and_training(run, tmp_path, monkeypatch):
    """The checkpoint check and the store's fingerprint check share one weights_sha256 of the
    backbone (hashing a large backbone's weights takes seconds)."""
    from fpt_fast.app import checkpoints, store, training
    calls, original = [], store.weights_sha256

    def counted(module):
        calls.append(module)
        return original(module)
    for module in (checkpoints, store, training):
        monkeypatch.setattr(module, "weights_sha256", counted)
    evaluate(run.settings, run.out_dir / "best.pt", "val", **QUIET)
    assert len(calls) == 1
    calls.clear()
    train(run.settings.replace("train", out_dir=str(tmp_path / "again")), **QUIET)
    assert len(calls) == 1


def test_predictions_agree_with_the_evaluation(run, tmp_path):
    evaluation = evaluate(run.settings, run.out_dir / "best.pt", "test", **QUIET)
    rows = predict(run.settings, run.out_dir / "best.pt", run.settings.data.root + "/test", tmp_path / "p.csv",
                   **QUIET)
    classes = evaluation.classes
    confusion = np.zeros((len(classes), len(classes)), np.int64)
    for row in rows:
        confusion[classes.index(row["path"].split("/")[0]), classes.index(row["prediction"])] += 1
    assert confusion.tolist() == evaluation.metrics["confusion"]
    with open(tmp_path / "p.csv") as f:
        written = list(csv.DictReader(f))
    assert [r["path"] for r in written] == [r["path"] for r in rows]
    assert all(float(w["confidence"]) == pytest.approx(r["confidence"], abs=1e-6) for w, r in zip(written, rows))


def test_a_full_disk_while_writing_predictions_is_named_and_keeps_the_old_file(run, tmp_path, monkeypatch):
    output = tmp_path / "p.csv"
    output.write_text("earlier predictions\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(files.DiskFullError, match=r"while writing .*p.csv .*free some space, then rerun predict"):
        predict(run.settings, run.out_dir / "best.pt", run.settings.data.root + "/test", output, overwrite=True,
                **QUIET)
    assert output.read_text() == "earlier predictions\n"
