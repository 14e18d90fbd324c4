"""Training: resume equivalence, schedule, class weights, feature sources, the side network alone."""
import csv
import errno
import math

import numpy as np
import pytest
import torch

from fpt_fast.app import training
from fpt_fast.app.build import build_model
from fpt_fast.app.checkpoints import load_checkpoint
from fpt_fast.app.evaluation import evaluate
from fpt_fast.app.preloading import preload
from fpt_fast.app.files import DiskFullError
from fpt_fast.app.training import TrainingDiverged, class_weight_tensor, train, warmup_cosine
from tiny_run import tiny_settings

METRICS = ["train_loss", "train_acc", "val_acc", "val_f1", "val_auc", "val_precision", "val_recall",
           "val_kappa", "lr", "best"]
QUIET = dict(log=lambda _: None)


def test_resume_gives_the_weights_and_metrics_of_an_uninterrupted_run(tmp_path, monkeypatch):
    settings = tiny_settings(tmp_path, "train.epochs=3")
    preload(settings, **QUIET)
    full = train(settings.replace("train", out_dir=str(tmp_path / "full")), **QUIET)

    part = settings.replace("train", out_dir=str(tmp_path / "part"))
    save = training.save_checkpoint

    def save_then_crash(path, payload):
        save(path, payload)
        if path.name == "last.pt" and payload["epoch"] == 0:
            raise KeyboardInterrupt  # killed right after the first epoch
    monkeypatch.setattr(training, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(part, **QUIET)
    monkeypatch.setattr(training, "save_checkpoint", save)
    assert load_checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 0
    resumed = train(part, resume=True, **QUIET)

    assert [{k: r[k] for k in METRICS} for r in resumed.history] == [{k: r[k] for k in METRICS} for r in full.history]
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "part" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    best_a, best_b = load_checkpoint(tmp_path / "full" / "best.pt"), load_checkpoint(tmp_path / "part" / "best.pt")
    assert best_a["best_epoch"] == best_b["best_epoch"]
    assert all(torch.equal(best_a["model"][k], best_b["model"][k]) for k in best_a["model"])
    with open(tmp_path / "part" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_features_online_and_store_features_train_alike(tmp_path):
    """Training from the store or with the frozen branch run at each step reaches the same weights
    (fp32 store); with the store, the frozen branch never runs and stays on the CPU."""
    settings = tiny_settings(tmp_path, "train.epochs=1", "preload.dtype=float32")
    preload(settings, **QUIET)
    from_store = train(settings.replace("train", out_dir=str(tmp_path / "a")), **QUIET)
    online = train(settings.replace("data", store=None).replace("train", out_dir=str(tmp_path / "b")), **QUIET)
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], atol=1e-4, rtol=1e-3, msg=name)
    assert from_store.history[0]["val_acc"] == online.history[0]["val_acc"]


def test_side_only_trains_only_the_side_network(tmp_path):
    settings = tiny_settings(tmp_path, "train.epochs=1", "train.side_only=true")
    result = train(settings, **QUIET)
    payload = load_checkpoint(result.out_dir / "best.pt")
    fresh = load_checkpoint(result.out_dir / "last.pt")
    model = build_model(settings, 3)
    assert result.learnable_share == model.learnable_share(side_only=True) < model.learnable_share()
    untouched = [k for k in payload["model"] if k.startswith("fusion.")]
    assert untouched and all(torch.equal(payload["model"][k], fresh["model"][k]) for k in untouched)
    metrics = evaluate(result.settings, result.out_dir / "best.pt", "test", **QUIET).metrics
    assert 0.0 <= metrics["acc"] <= 1.0
    # The checkpoint, not the caller's settings, says it is a side-network-only model.
    again = evaluate(result.settings.replace("train", side_only=False), result.out_dir / "best.pt", "test", **QUIET)
    assert again.metrics == metrics


def test_warmup_then_cosine():
    factor = warmup_cosine(warmup_steps=4, total_steps=14)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0 and factor(9) == pytest.approx(0.5) and factor(14) == pytest.approx(0.0)
    no_warmup = warmup_cosine(0, 10)
    assert no_warmup(0) == 1.0 and no_warmup(5) == pytest.approx(0.5)


def test_class_weights():
    labels = np.array([0, 0, 0, 1, 2, 2])
    torch.testing.assert_close(class_weight_tensor("balanced", labels, 4),
                               torch.tensor([6 / 12, 6 / 4, 6 / 8, 0.0]))
    assert class_weight_tensor(None, labels, 3) is None
    with pytest.raises(ValueError, match="train.class_weights has 2 values but there are 3 classes"):
        class_weight_tensor([1.0, 2.0], labels, 3)


def test_uniform_class_weights_train_exactly_like_none(tmp_path):
    """The loss is the weighted mean over the global batch, so a weight of 2 for every class (a
    power of two: exact in floating point) gives the same weights, loss and accuracy bit for bit."""
    settings = tiny_settings(tmp_path, "train.epochs=1", "train.val_split=null", "data.store=null")
    plain = train(settings.replace("train", out_dir=str(tmp_path / "plain")), **QUIET)
    doubled = train(settings.replace("train", out_dir=str(tmp_path / "doubled"), class_weights=[2.0, 2.0, 2.0]),
                    **QUIET)
    a, b = load_checkpoint(tmp_path / "plain" / "last.pt"), load_checkpoint(tmp_path / "doubled" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [(r["train_loss"], r["train_acc"]) for r in plain.history] == \
        [(r["train_loss"], r["train_acc"]) for r in doubled.history]
    correct = plain.history[0]["train_acc"] * 12  # 12 training images
    assert correct == round(correct)


def test_loss_falls_and_the_best_epoch_is_kept(tmp_path):
    settings = tiny_settings(tmp_path, "train.epochs=4", "train.lr=3e-3", "model.dropout=0.0")
    preload(settings, **QUIET)
    result = train(settings, **QUIET)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert all(not math.isnan(row["val_auc"]) for row in result.history)
    best = max(range(len(result.history)), key=lambda i: (result.history[i]["val_auc"], -i))
    assert result.best_epoch == best + 1
    assert load_checkpoint(result.out_dir / "best.pt")["epoch"] == best
    with open(result.out_dir / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["best"]) for r in rows] == [int(row["best"]) for row in result.history]
    assert float(rows[0]["train_loss"]) == pytest.approx(losses[0], rel=1e-5)  # written with 6 digits


def test_worker_processes_do_not_change_the_run(tmp_path):
    settings = tiny_settings(tmp_path, "train.epochs=1")
    preload(settings, **QUIET)
    in_process = train(settings.replace("train", out_dir=str(tmp_path / "w0")), **QUIET)
    workers = train(settings.replace("train", out_dir=str(tmp_path / "w2")).replace("data", num_workers=2), **QUIET)
    a, b = load_checkpoint(tmp_path / "w0" / "last.pt"), load_checkpoint(tmp_path / "w2" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert in_process.history[0]["val_auc"] == workers.history[0]["val_auc"]


def test_tensorboard_when_available_else_said(tmp_path):
    settings = tiny_settings(tmp_path, "train.epochs=1", "train.tensorboard=true", "train.val_split=null",
                             "data.store=null", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]")
    lines = []
    result = train(settings, log=lines.append)
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert any("TensorBoard logging is off" in line for line in lines)
    else:
        assert any((result.out_dir / "tensorboard").iterdir())
    assert result.best_epoch == 1  # no validation split: the last epoch is the best


# Without a store, with fixed normalisation: the quickest runs.
ONLINE = ("data.store=null", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]")
NO_SUCH_PID = 2 ** 22 + 1  # above Linux's largest pid_max: no process has it


def test_a_diverging_run_stops_naming_the_epoch_and_step_and_saves_nothing(tmp_path):
    """lr 1e4 without clipping once finished with exit 0, "val auc ... *best" and a NaN best.pt."""
    settings = tiny_settings(tmp_path, *ONLINE, "train.lr=1e4", "train.clip_grad_norm=null")
    with pytest.raises(TrainingDiverged, match=r"training diverged in epoch 1: at step \d of 3 the gradient norm is "
                                               r"(nan|inf).*no checkpoint was written.*train.clip_grad_norm"):
        train(settings, **QUIET)
    assert not (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "run" / "last.pt").exists()


def test_a_nan_validation_metric_is_never_the_best(tmp_path, monkeypatch):
    aucs = iter([math.nan, 0.6, math.nan, math.nan])
    monkeypatch.setattr(training.Trainer, "validate",
                        lambda self: {**{m: 0.5 for m in training.METRIC_ORDER}, "auc": next(aucs)})
    result = train(tiny_settings(tmp_path, *ONLINE, "train.epochs=3"), **QUIET)
    assert [row["best"] for row in result.history] == [0, 1, 0] and result.best_epoch == 2
    assert load_checkpoint(result.out_dir / "best.pt")["epoch"] == 1
    lines = []
    none = train(tiny_settings(tmp_path, *ONLINE, "train.epochs=1", f"train.out_dir={tmp_path / 'none'}"),
                 log=lines.append)
    assert none.best_epoch == 0 and not (tmp_path / "none" / "best.pt").exists()
    assert any("no epoch had a finite validation auc, so best.pt was not written" in line for line in lines)


def test_a_run_in_out_dir_is_refused_unless_resumed_or_overwritten(tmp_path):
    settings = tiny_settings(tmp_path, *ONLINE, "train.epochs=1", "train.val_split=null")
    train(settings, **QUIET)
    run = tmp_path / "run"
    best = (run / "best.pt").read_bytes()
    stale = run / f".last.pt.tmp-{NO_SUCH_PID}"
    stale.write_bytes(b"left by a killed run")
    with pytest.raises(ValueError, match=r"holds a run \(best.pt, last.pt, log.csv\): add --resume to continue it, "
                                         r"--overwrite to replace it"):
        train(settings, **QUIET)
    assert (run / "best.pt").read_bytes() == best and not stale.exists()  # cleaned at the start
    (run / "eval_test.json").write_text("{}")  # an evaluation of the run being replaced
    train(settings.replace("train", seed=1), overwrite=True, **QUIET)
    assert (run / "best.pt").read_bytes() != best and not (run / "eval_test.json").exists()
    with pytest.raises(ValueError, match="is a file, not a folder"):
        train(settings.replace("train", out_dir=str(run / "log.csv")), **QUIET)


def test_a_full_disk_while_saving_names_the_file_and_a_resume_continues(tmp_path, monkeypatch):
    settings = tiny_settings(tmp_path, *ONLINE, "train.epochs=2", "train.val_split=null")
    save = torch.save

    def full_in_epoch_2(obj, f, *args, **kwargs):
        if obj["epoch"] == 1:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_in_epoch_2)
    with pytest.raises(DiskFullError, match=r"while writing .*best.pt \(nothing written before was lost.*free some "
                                            r"space, then rerun with --resume"):
        train(settings, **QUIET)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 0  # epoch 1's, intact
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name]
    assert [row["epoch"] for row in train(settings, resume=True, **QUIET).history] == [1, 2]


def test_resuming_from_a_last_pt_with_optimizer_state_of_other_shapes_is_refused(tmp_path):
    """A last.pt of an earlier version (the prompts were (L, P, dp) then) is named, not crashed on."""
    settings = tiny_settings(tmp_path, "train.epochs=2", "data.store=null", "train.val_split=null")
    run = settings.replace("train", epochs=1)
    train(run, **QUIET)
    last = tmp_path / "run" / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    state = checkpoint["optimizer"]["state"][0]
    state["exp_avg"] = state["exp_avg"].reshape(-1)
    torch.save(checkpoint, last)
    with pytest.raises(ValueError, match="optimizer state for parameter 0 has shape"):
        train(settings, resume=True, **QUIET)


def test_layer_names_in_yaml_go_through_the_store_and_checkpoints(tmp_path):
    """backbone_kwargs naming classes (a Virchow2-style ViT: SwiGLU, SiLU, registers) stay names in
    the store's manifest and the checkpoints: the store's fingerprint compares, the checkpoint reads
    with weights_only, and evaluation rebuilds the same model from it."""
    import json

    kwargs = "{depth: 2, embed_dim: 64, num_heads: 2, reg_tokens: 4, mlp_layer: SwiGLUPacked, act_layer: silu, " \
             "init_values: 0.1}"
    settings = tiny_settings(tmp_path, "train.epochs=1", f"model.backbone_kwargs={kwargs}")
    preload(settings, **QUIET)
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["fingerprint"]["backbone_kwargs"]["mlp_layer"] == "SwiGLUPacked"
    result = train(settings, **QUIET)  # checks the store's fingerprint against this run's
    checkpoint = load_checkpoint(result.out_dir / "best.pt")  # weights_only
    assert checkpoint["settings"]["model"]["backbone_kwargs"]["act_layer"] == "silu"
    assert 0.0 <= evaluate(result.settings, result.out_dir / "best.pt", "test", **QUIET).metrics["acc"] <= 1.0
