"""fpt-fast explain and predict --explain, end to end on the tiny data set: one readable PNG and the
raw .npy maps per image, bad images as in predict, no output replaced or written over an input
unless asked."""
import csv

import numpy as np
import pytest
from PIL import Image

from fpt_fast.app.cli import main
from fpt_fast.app.explain import FIGURE_SUFFIX, IMPORTANCE_SUFFIX, SELECTED_SUFFIX
from tiny_run import make_data, tiny_overrides

# The tiny model: 3 extracted blocks, 2 heads, 64 x 48 px with patch 16 -> a 4 x 3 grid + 1 class token.
LAYERS, HEADS, GRID, TOKENS, KEPT = 3, 2, (4, 3), 13, 2
FIXED = ["data.store=null", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]"]


def sets(overrides):
    return [arg for value in overrides for arg in ("--set", value)]


@pytest.fixture
def tiny(tmp_path):
    root = make_data(tmp_path)
    return root, sets(tiny_overrides(tmp_path, root) + FIXED)


def outputs(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def check_explanation(base, layers=LAYERS):
    figure = Image.open(base.with_name(base.name + FIGURE_SUFFIX))
    figure.load()
    assert figure.format == "PNG" and figure.mode == "RGB" and figure.width > 256 and figure.height > 256
    importance = np.load(base.with_name(base.name + IMPORTANCE_SUFFIX))
    selected = np.load(base.with_name(base.name + SELECTED_SUFFIX))
    assert importance.shape == selected.shape == (layers, HEADS, *GRID)
    assert importance.dtype == np.float32 and selected.dtype == bool
    # Patch shares of one (layer, head) leave out only the class token's share; each head keeps
    # KEPT tokens, the class token possibly among them.
    assert np.all(importance > 0) and np.all(importance.sum(axis=(2, 3)) < 1)
    assert np.all(np.isin(selected.sum(axis=(2, 3)), [KEPT - 1, KEPT]))


def test_explain_writes_a_figure_and_maps_per_image(tiny, tmp_path, capsys):
    root, settings = tiny
    images, out = root / "test", tmp_path / "explained"
    (images / "checker" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    command = ["explain", *settings, "--images", str(images), "--out", str(out), "--no-progress"]
    assert main(command) == 2
    assert "cannot read image" in capsys.readouterr().err and not out.exists()

    assert main(command + ["--skip-bad-images"]) == 0
    log = capsys.readouterr().out
    assert "wrote 6 explanation figure(s)" in log and "broken.png" in log
    names = [f"{c}/{c}_000{i}.png" for c in ("checker", "horizontal", "vertical") for i in (0, 1)]
    assert outputs(out) == sorted(n + s for n in names for s in (FIGURE_SUFFIX, IMPORTANCE_SUFFIX, SELECTED_SUFFIX))
    for name in names:
        check_explanation(out / name)

    # Nothing is replaced unless asked.
    before = (out / names[0]).with_name("checker_0000.png" + FIGURE_SUFFIX).stat().st_mtime_ns
    assert main(command + ["--skip-bad-images"]) == 2
    assert "exist already" in capsys.readouterr().err
    assert (out / names[0]).with_name("checker_0000.png" + FIGURE_SUFFIX).stat().st_mtime_ns == before
    assert main(command + ["--skip-bad-images", "--overwrite", "--layers", "2"]) == 0
    check_explanation(out / names[0], layers=1)

    assert main(command + ["--layers", "7", "--overwrite"]) == 2
    assert "extracted layers [0, 1, 2]" in capsys.readouterr().err


def test_an_output_never_replaces_an_input_image(tiny, tmp_path, capsys):
    root, settings = tiny
    folder = tmp_path / "images"
    folder.mkdir()
    source = (root / "test" / "checker" / "checker_0000.png").read_bytes()
    for name in ("a.png", "a.png" + FIGURE_SUFFIX):
        (folder / name).write_bytes(source)
    assert main(["explain", *settings, "--images", str(folder), "--out", str(folder), "--overwrite"]) == 2
    assert "are input images" in capsys.readouterr().err
    assert (folder / ("a.png" + FIGURE_SUFFIX)).read_bytes() == source


def test_predict_explain_and_explain_with_a_checkpoint(tiny, tmp_path, capsys):
    root, settings = tiny
    assert main(["train", *settings, "--set", "train.epochs=1"]) == 0
    checkpoint = str(tmp_path / "run" / "best.pt")
    capsys.readouterr()
    csv_path, explained = tmp_path / "predictions.csv", tmp_path / "predict_explained"
    assert main(["predict", "--checkpoint", checkpoint, "--images", str(root / "val"), "--output", str(csv_path),
                 "--explain", str(explained), "--no-progress"]) == 0
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    for row in rows:
        check_explanation(explained / row["path"])
    assert len(outputs(explained)) == 3 * len(rows)

    # Files from two folders (paths relative to their common folder); the checkpoint's settings.
    files = [root / "val" / "checker" / "checker_0000.png", root / "test" / "vertical" / "vertical_0001.png"]
    out = tmp_path / "explained"
    assert main(["explain", "--checkpoint", checkpoint, "--images", *map(str, files), "--out", str(out),
                 "--layers", "1", "2", "--no-progress"]) == 0
    for name in ("val/checker/checker_0000.png", "test/vertical/vertical_0001.png"):
        check_explanation(out / name, layers=2)
