"""Checkpoints: plain containers, damaged or foreign files named, the weights and the backbone checked,
resumption refused when the run changed."""
import pytest
import torch

from fpt_fast.app.checkpoints import (load_checkpoint, model_from_checkpoint, save_checkpoint,
                                     with_checkpoint_normalization)
from fpt_fast.app.training import train
from tiny_run import tiny_settings

QUIET = dict(log=lambda _: None)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One epoch without a store: (settings, TrainResult)."""
    tmp_path = tmp_path_factory.mktemp("run")
    settings = tiny_settings(tmp_path, "train.epochs=1", "train.val_split=null", "data.store=null")
    return settings, train(settings, **QUIET)


def test_checkpoints_hold_only_tensors_and_plain_containers(run, tmp_path):
    _, result = run
    for name in ("best.pt", "last.pt"):
        checkpoint = torch.load(result.out_dir / name, weights_only=True)  # raises on anything else
        assert checkpoint["kind"] == "fpt_fast.checkpoint" and checkpoint["format"] == 1
        assert checkpoint["classes"] == ["checker", "horizontal", "vertical"]
        assert checkpoint["settings"]["data"]["mean"] != "auto"  # resolved for evaluate/predict
        assert type(checkpoint["model"]) is dict
        assert {k.split(".")[0] for k in checkpoint["model"]} == {"fusion", "side"}
    assert not [p for p in result.out_dir.iterdir() if ".tmp-" in p.name]
    (tmp_path / "other.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="other.pt.*cannot be read"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"some": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not an fpt_fast checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    checkpoint = load_checkpoint(result.out_dir / "best.pt")
    torch.save({**checkpoint, "format": 2}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="has format 2; this version reads format 1"):
        load_checkpoint(tmp_path / "future.pt")


def test_the_model_of_a_checkpoint_is_checked(run):
    _, result = run
    checkpoint = load_checkpoint(result.out_dir / "best.pt")
    model = model_from_checkpoint(checkpoint, result.settings)
    for name, value in model.trainable_state_dict().items():
        assert torch.equal(value, checkpoint["model"][name]), name
    # Another seed draws another random backbone: the weights hash says so.
    with pytest.raises(ValueError, match="frozen backbone differs"):
        model_from_checkpoint(checkpoint, result.settings.replace("train", seed=1))
    with pytest.raises(ValueError, match=r"checkpoint does not fit the model of its settings .*missing keys \[\], "
                                         r"unexpected keys \['side.extra'\]"):
        model_from_checkpoint({**checkpoint, "model": {**checkpoint["model"], "side.extra": torch.zeros(1)}},
                              result.settings)


def test_auto_normalisation_is_the_checkpoints(run):
    settings, result = run
    checkpoint = load_checkpoint(result.out_dir / "best.pt")
    resolved = with_checkpoint_normalization(settings.replace("data", std=[0.5, 0.5, 0.5]), checkpoint)
    assert list(resolved.data.mean) == checkpoint["settings"]["data"]["mean"] != "auto"
    assert list(resolved.data.std) == [0.5, 0.5, 0.5]


def test_resume_refuses_changed_settings(run, tmp_path):
    settings, _ = run
    with pytest.raises(ValueError, match=r"train.lr: 0.001 then, 0.002 now"):
        train(settings.replace("train", lr=2e-3, epochs=2), resume=True, **QUIET)
    with pytest.raises(FileNotFoundError, match="last.pt"):
        train(settings.replace("train", out_dir=str(tmp_path / "elsewhere")), resume=True, **QUIET)


def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor(run, tmp_path):
    _, result = run
    checkpoint = load_checkpoint(result.out_dir / "best.pt")
    name = sorted(checkpoint["model"])[3]
    checkpoint["model"][name].view(-1)[:2] = torch.tensor([float("nan"), float("inf")])
    save_checkpoint(tmp_path / "diverged.pt", checkpoint)
    with pytest.raises(ValueError, match=rf"diverged.pt' holds non-finite weights \(first: {name} \(1 NaN, 1 inf"):
        load_checkpoint(tmp_path / "diverged.pt")  # what evaluate, predict and --resume read checkpoints with


class Payload:
    """A Python object that a weights-only load refuses to unpickle."""


def test_unreadable_files_are_named_without_torch_advice(tmp_path):
    cut = tmp_path / "cut.pt"
    torch.save({"kind": "fpt_fast.checkpoint"}, cut)
    cut.write_bytes(cut.read_bytes()[:100])
    with pytest.raises(ValueError, match="cut.pt' cannot be read: it was not written by torch.save, or it is damaged"):
        load_checkpoint(cut)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": Payload()}, pickled)
    with pytest.raises(ValueError, match="pickled.pt' cannot be read: it is not a file of tensors") as error:
        load_checkpoint(pickled)
    assert "weights_only" not in str(error.value)
