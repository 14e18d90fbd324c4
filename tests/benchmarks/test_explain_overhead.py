"""benchmarks/explain_overhead.py in smoke mode (tiny sizes, CPU): it runs, writes keyed rows with
both timings and the overhead of returning scores, and labels them cpu."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import explain_overhead  # noqa: E402


def test_explain_overhead_smoke(tmp_path):
    explain_overhead.main(["--smoke", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["op"], r["provider"]) for r in ok} >= {("select", "torch"), ("extract", "torch")}
    for r in ok:
        assert r["device"] == "cpu" and r["plain_ms"] > 0 and r["median_ms"] > 0
        assert r["spread_pct"] >= 0 and r["overhead_pct"] > -100
    assert all(r["reason"] for r in rows if r["status"] != "ok")


def test_each_timed_call_is_bracketed_by_device_syncs(monkeypatch):
    """On CUDA a call returns once its kernels are queued: the timer must wait for the device."""
    events = []
    monkeypatch.setattr(explain_overhead.common, "sync", lambda device: events.append(("sync", str(device))))
    explain_overhead.interleaved_ms(lambda: events.append("plain"), lambda: events.append("scored"), 2, "cuda")
    timed = events[2:]  # after the untimed call of each
    assert timed == [("sync", "cuda"), "plain", ("sync", "cuda"), ("sync", "cuda"), "scored", ("sync", "cuda")] * 2
