"""`python -m fpt_fast.info` (fpt_fast/app/environment_report.py): versions, the native extension's
state, and per device the dispatcher's table: every backend x every op, "ok" or its reasons, and
what "auto" picks."""
import subprocess
import sys

import pytest
import torch

from fpt_fast import ops
from fpt_fast.app import environment_report
from fpt_fast.ops import dispatch


@pytest.fixture
def interpreted(request, monkeypatch):
    """Triton's interpreter on or off as the dispatcher sees it, with its reason cache emptied."""
    monkeypatch.setattr(dispatch, "_triton_interpreted", lambda: request.param)
    dispatch._reasons.cache_clear()
    yield request.param
    dispatch._reasons.cache_clear()


@pytest.mark.parametrize("interpreted", [True, False], ids=["interpreter", "no_interpreter"], indirect=True)
def test_device_table_matches_the_dispatcher(interpreted):
    """Without Triton's interpreter, triton has a reason on the CPU: a note below the table."""
    lines = environment_report.device_table("cpu")
    assert lines[0].startswith("fused ops on cpu")
    assert lines[1].split() == ["op", "auto", *ops.BACKENDS]
    # Notes "  [i] backend: reasons" below the table, by their text.
    number = {line.split("] ", 1)[1]: line.split("]", 1)[0].strip() + "]"
              for line in lines if line.lstrip().startswith("[")}
    table, choices = ops.backend_table("cpu"), ops.auto_choices("cpu")
    rows = {line.split()[0]: line.split() for line in lines[2:] if not line.lstrip().startswith("[")}
    assert list(rows) == list(ops.OPS)
    for op in ops.OPS:
        want = [op, choices[op]]
        for name in ops.BACKENDS:
            reasons = table[name][op]
            want += ["ok"] if not reasons else ["no", number[f"{name}: {'; '.join(reasons)}"]]
        assert rows[op] == want
    assert bool(number) == (not interpreted)


def test_report_lists_versions_native_state_and_devices():
    text = environment_report.report()
    assert f"torch {torch.__version__}" in text and "timm " in text and "python " in text
    assert "triton " in text and "interpreter: " in text
    assert "native extension: " in text
    assert "fused ops on cpu" in text
    assert ("fused ops on cuda" in text) == torch.cuda.is_available()


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "fpt_fast.info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fused ops on cpu" in result.stdout and "prompt_attention" in result.stdout
