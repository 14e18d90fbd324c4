"""`python -m fpt_fast.info`: every backend is listed with its availability or the reason it is not."""
import fpt_fast
from fpt_fast import info, ops


def test_report_lists_every_backend_and_the_choice_of_auto():
    text = info.report()
    for name in ops.BACKENDS + ("sdpa", "math", "xformers"):
        assert f"  {name:<10}" in text
    assert "fused ops on cpu (default: " in text and "frozen-branch attention on cpu (auto: " in text
    assert "xformers   not implemented" in text


def test_backends_table():
    table = fpt_fast.backends("cpu")
    assert set(table) == set(ops.BACKENDS)
    assert table["torch"] is None and table["reference"] is None
