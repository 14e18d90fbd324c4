"""The fpt-fast command line end to end on a tiny generated data set."""
import csv
import json
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fpt_fast.app import demo
from fpt_fast.app.cli import main
from fpt_fast.app.store import FeatureStore
from fpt_fast.model.reference import extract_features
from helpers import TINY, assert_same_rows, official_resampling
from tiny_run import make_data, tiny_overrides


def sets(overrides):
    return [arg for value in overrides for arg in ("--set", value)]


@pytest.fixture
def run(tmp_path):
    """(config path, root): a YAML file with the tiny settings."""
    root = make_data(tmp_path)
    tree = {}
    for text in tiny_overrides(tmp_path, root):
        key, value = text.split("=", 1)
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = yaml.safe_load(value)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tree))
    return config, root


def test_preload_train_evaluate_predict(run, tmp_path, capsys):
    config, root = run
    assert main(["preload", "-c", str(config), "--verify", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "KiB per image" in out and ": OK" in out and "samples/s" in out

    assert main(["train", "-c", str(config), "--set", "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "best epoch 1" in out
    run_dir = tmp_path / "run"
    assert {"best.pt", "last.pt", "log.csv", "config.yaml"} <= {p.name for p in run_dir.iterdir()}
    assert "TensorBoard" not in out  # train.tensorboard=false in the tiny settings

    assert main(["evaluate", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "test: 6 images" in out and "confusion matrix" in out and "auc" in out
    evaluation = json.loads((run_dir / "eval_test.json").read_text())
    assert sum(map(sum, evaluation["metrics"]["confusion"])) == 6

    output = tmp_path / "predictions.csv"
    # predict needs no config: the checkpoint carries the settings.
    assert main(["predict", "--checkpoint", str(run_dir / "best.pt"), "--images", str(root / "test"),
                 "--output", str(output), "--no-progress"]) == 0
    with open(output) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and rows[0]["path"] == "checker/checker_0000.png"
    assert set(rows[0]) == {"path", "prediction", "confidence", "p_checker", "p_horizontal", "p_vertical"}
    assert all(abs(sum(float(r[f"p_{c}"]) for c in demo.CLASSES) - 1) < 1e-4 for r in rows)

    # Nothing is replaced unasked, nothing written among the images, nothing ends in a traceback.
    predict = ["predict", "--checkpoint", str(run_dir / "best.pt"), "--images", str(root / "test"), "--no-progress"]
    image = root / "test" / "checker" / "checker_0000.png"
    before = image.read_bytes()
    for target, flags, message in [
            (output, [], "predictions.csv' exists: choose another file, or add --overwrite"),
            (image, ["--overwrite"], "is inside the images folder"),
            (root / "test" / "p.csv", [], "is inside the images folder"),
            (tmp_path, [], "is a folder: give the path of a file")]:
        assert main(predict + ["--output", str(target)] + flags) == 2
        assert message in capsys.readouterr().err
    assert image.read_bytes() == before
    assert main(predict + ["--output", str(output), "--overwrite"]) == 0
    assert main(["train", "-c", str(config), "--set", "train.epochs=1"]) == 2
    assert "holds a run (best.pt, last.pt, log.csv): add --resume" in capsys.readouterr().err


def test_preloaded_features_above_the_stored_grid_are_the_official_ones(run, tmp_path):
    """The CLI's preload of PNG files at (256, 240), above the backbone's stored 224 px grid, equals
    a reference path built here from the official formulas: PIL's bilinear resize of the 8-bit
    image, normalisation, position embeddings resampled by the official rule (helpers), the
    backbone's own LayerNorm eps (the preset's "official" eps is 1e-12 only for the official
    ViT-B/16-384), timm's eager forward and n = int(N * token_ratio) tokens by mean attention."""
    import timm

    config, root = run
    torch.manual_seed(5)
    stored = timm.create_model(TINY["backbone"], num_classes=0, **TINY["backbone_kwargs"])  # grid 14 x 14
    checkpoint = tmp_path / "backbone.pth"
    torch.save(stored.state_dict(), checkpoint)
    mean, std = [0.45, 0.5, 0.55], [0.2, 0.25, 0.3]
    assert main(["preload", "-c", str(config), "--no-progress", "--set", "model.image_size=[256, 240]",
                 "--set", f"model.checkpoint_path={checkpoint}", "--set", "preload.dtype=float32",
                 "--set", "preload.splits=[train]", "--set", f"data.mean={mean}", "--set", f"data.std={std}"]) == 0
    split = FeatureStore(tmp_path / "store").split("train")

    state = dict(stored.state_dict(), pos_embed=official_resampling(stored.pos_embed.detach(), 1, (14, 14), (16, 15)))
    backbone = timm.create_model(TINY["backbone"], num_classes=0, img_size=(256, 240), **TINY["backbone_kwargs"])
    backbone.load_state_dict(state)
    backbone.eval()
    paths = sorted((root / "train").rglob("*.png"))
    pixels = [np.asarray(Image.open(p).convert("RGB").resize((240, 256), Image.BILINEAR), np.float32) / 255
              for p in paths]
    x = (torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) - torch.tensor(mean).view(3, 1, 1)) \
        / torch.tensor(std).view(3, 1, 1)
    n = int((1 + 16 * 15) * 0.2)
    keys, values = extract_features(backbone, x, [0, 1, 2], n, "global")        # (L, B, H, n, d)
    for position in range(len(paths)):
        stored_keys, stored_values = split.read(position)
        assert stored_keys.shape == (3, 2, n, 32)
        assert_same_rows(stored_keys, keys[:, position], atol=1e-4)
        assert_same_rows(stored_values, values[:, position], atol=1e-4)


def test_print_config_shows_the_resolved_settings(run, capsys):
    config, _ = run
    assert main(["train", "-c", str(config), "--set", "data.dataset=covid", "--set", "train.lr=5e-5",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 5e-5 and printed["model"]["num_classes"] == 3
    assert printed["model"]["prompt_reduction_ratio"] == 8  # preset fpt from the file


@pytest.mark.parametrize("override,message", [
    ("train.epocs=2", "unknown setting 'train.epocs'; did you mean train.epochs?"),
    ("train.batch_size=big", "setting train.batch_size: expected an integer"),
])
def test_bad_settings_exit_with_status_2_naming_the_key(run, capsys, override, message):
    config, _ = run
    assert main(["train", "-c", str(config), "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_corrupt_image_stops_or_is_skipped_and_listed(run, capsys):
    config, root = run
    bad = root / "train" / "vertical" / "vertical_0001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    no_store = ["--set", "data.store=null", "--set", "train.epochs=1", "--set", "data.mean=[0.5, 0.5, 0.5]",
                "--set", "data.std=[0.25, 0.25, 0.25]"]
    assert main(["train", "-c", str(config)] + no_store) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "vertical_0001.png" in err
    assert main(["train", "-c", str(config), "--skip-bad-images"] + no_store) == 0
    out = capsys.readouterr().out
    assert "1 unreadable image(s) were left out" in out and "vertical_0001.png" in out


def test_evaluate_refuses_a_different_model(run, capsys):
    config, _ = run
    assert main(["train", "-c", str(config), "--set", "data.store=null", "--set", "train.epochs=1"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "-c", str(config), "--set", "data.store=null", "--set", "model.num_prompts=4"]) == 2
    assert "model.num_prompts: 16 in the checkpoint, 4 now" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path):
    lines = []
    report = demo.run_demo(tmp_path / "demo", epochs=1, progress=False,
                           images_per_class={"train": 4, "val": 2, "test": 2}, log=lines.append)
    text = "\n".join(lines)
    assert "FPT demo report" in text and "side network alone" in text
    assert 0.0 < report.learnable_share < 0.05 and abs(report.vit_b_share - 0.0103) < 0.001
    assert report.bytes_per_image < report.official_bytes_per_image / 1.9
    assert report.explain_figure == tmp_path / "demo" / "explain" / (demo.EXPLAINED_IMAGE.split("/")[-1] + ".explain.png")
    assert str(report.explain_figure) in text
    with Image.open(report.explain_figure) as figure:
        figure.load()
        assert figure.format == "PNG"


def test_module_and_console_script():
    result = subprocess.run([sys.executable, "-m", "fpt_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("preload", "train", "evaluate", "predict", "explain", "demo"):
        assert command in result.stdout
    scripts = [e for e in entry_points(group="console_scripts") if e.name == "fpt-fast"]
    if not scripts:
        pytest.skip("fpt_fast is not installed (no fpt-fast console script)")
    assert scripts[0].load() is main


def test_user_caused_failures_end_in_one_line_not_a_traceback(run, tmp_path, capsys):
    config, root = run
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 cut short")
    for args, message in [
            (["preload", "--set", f"data.store={tmp_path / 'a_file'}"], "data.store='"),
            (["train", "--set", f"train.out_dir={tmp_path / 'a_file'}"], "train.out_dir='"),
            (["train", "--set", "train.clip_grad_norm=-1"], "setting train.clip_grad_norm=-1.0 is out of range")]:
        assert main(args[:1] + ["-c", str(config)] + args[1:]) == 2
        assert message in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(tmp_path / "cut.pt"), "--images", str(root / "test")]) == 2
    err = capsys.readouterr().err
    assert "cut.pt' cannot be read" in err and "weights_only" not in err and "Traceback" not in err


def test_skipped_images_of_every_split_are_listed_once(run, capsys):
    """With a store, the images left out of val when preloading were not listed."""
    config, root = run
    for name in ("train/vertical/vertical_0001.png", "val/horizontal/horizontal_0000.png"):
        (root / name).write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    assert main(["preload", "-c", str(config), "--skip-bad-images", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "-c", str(config), "--skip-bad-images", "--set", "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "2 unreadable image(s) were left out" in out
    assert out.count("vertical_0001.png (left out when preloaded)") == 1
    assert out.count("horizontal_0000.png (left out when preloaded)") == 1
