"""Progress bars: shown on stderr when enabled, nothing at all when disabled."""
from fpt_fast.app.console import Progress


def test_progress_bar(capsys):
    off = Progress(False, "epoch 1/2", total=3)
    off.update()
    off.show(loss="0.5")
    off.close()
    assert not off.shown and capsys.readouterr().err == ""
    on = Progress(True, "epoch 1/2", total=3, unit="img")
    on.update(3)
    on.show(loss="0.5")
    on.close()
    err = capsys.readouterr().err
    assert on.shown and "epoch 1/2" in err and "3/3" in err and "loss=0.5" in err
