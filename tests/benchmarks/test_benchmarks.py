"""The benchmark harness in smoke mode (tiny sizes, CPU): every script runs, writes keyed rows, and
the device-independent memory account shows FPT+ with preloading far below full fine-tuning."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import common, extraction, kernels, preload, report, targets, training, xformers_probe  # noqa: E402

KEY_FIELDS = {"op", "provider", "mode", "shape", "dtype", "device", "median_ms", "status", "reason",
              "speedup_vs_reference", "peak_extra_mb", "params"}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def _rows(out, op=None):
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    return [r for r in rows if op is None or r["op"] == op], data


def _check_keys(rows):
    assert rows
    for r in rows:
        assert KEY_FIELDS <= set(r), sorted(KEY_FIELDS - set(r))
        assert r["device"].startswith("cpu"), r["device"]  # CPU numbers are always labelled cpu
        assert r["status"] in ("ok", "skipped", "oom", "error")
        if r["status"] == "ok" and r["op"] not in ("train_memory", "extract_memory", "max_resolution"):
            assert r["median_ms"] > 0
        if r["status"] != "ok":
            assert r["reason"]


def test_kernels_smoke(out):
    kernels.main(["--smoke", "--out", str(out)])
    rows, data = _rows(out)
    rows = [r for r in rows if r["op"] in kernels.OPS]
    _check_keys(rows)
    assert not [r for r in rows if r["status"] == "error"], [r["reason"] for r in rows if r["status"] == "error"]
    for op in kernels.OPS:
        ok = {r["provider"] for r in rows if r["op"] == op and r["status"] == "ok"}
        assert {"torch", "reference"} <= ok, (op, ok)
    assert {("prompt_attention", "fwd"), ("prompt_attention", "fwd+bwd")} <= {(r["op"], r["mode"]) for r in rows}
    ref = [r for r in rows if r["provider"] == "reference" and r["status"] == "ok"]
    assert all(r["speedup_vs_reference"] == pytest.approx(1.0) for r in ref)
    peaks = data["peaks"]["cpu"]
    assert peaks["peak_tflops"] > 0 and peaks["peak_gbps"] > 0
    assert data["env"]["torch"] == torch.__version__


def test_training_smoke_and_memory_account(out):
    training.main(["--smoke", "--out", str(out), "--auc", "fpt=86.4,fpt+=87.12,full_ft=88.82,lora=85.94"])
    steps, _ = _rows(out, "train_step")
    _check_keys(steps)
    methods = {r["provider"] for r in steps if r["status"] == "ok"}
    assert set(training.METHODS) - {"lora"} <= methods
    for r in steps:
        if r["status"] == "ok":
            assert r["images_per_s"] > 0 and 0 < r["learnable_share"] <= 1
    lora = [r for r in steps if r["provider"] == "lora"]
    assert all(r["status"] == "ok" or "peft" in r["reason"] for r in lora)

    acc, _ = _rows(out, "train_memory")
    _check_keys(acc)
    by = {r["provider"]: r for r in acc if r["status"] == "ok"}
    full, plus = by["full_ft"], by["fpt+_preloaded"]
    for field in ("saved_bytes", "param_bytes", "grad_bytes", "optimizer_bytes", "input_bytes", "estimate_bytes"):
        assert full[field] > 0 and plus[field] >= 0
    assert plus["saved_bytes"] < 0.1 * full["saved_bytes"]
    assert plus["estimate_bytes"] < 0.1 * full["estimate_bytes"]
    # Without preloading the frozen backbone stays resident: its parameters are counted.
    assert by["fpt+"]["param_bytes"] > 10 * plus["param_bytes"]
    assert by["fpt"]["frozen_transient_bytes"] > 0 and plus["frozen_transient_bytes"] == 0
    # AdamW: two fp32 moments per trainable parameter (plus step counters).
    assert full["optimizer_bytes"] >= 2 * full["grad_bytes"]
    assert full["ratio_vs_full_ft"] == pytest.approx(1.0)
    assert "pme" in plus and plus["pme"] > full["pme"]


def test_extraction_smoke(out):
    extraction.main(["--smoke", "--out", str(out)])
    rows, _ = _rows(out, "extract")
    _check_keys(rows)
    assert {r["provider"] for r in rows if r["status"] == "ok"} == set(extraction.PROVIDERS)
    search, _ = _rows(out, "max_resolution")
    assert search and all(r["max_fit_px"] and r["max_fit_px"] % 16 == 0 for r in search)
    live, _ = _rows(out, "extract_memory")
    assert live and all(r["live_peak_bytes"] > 0 for r in live)


def test_report_renders(out):
    if not (out / "results.json").exists():
        pytest.skip("needs the smoke runs above")
    path = report.main([str(out)])
    text = Path(path).read_text()
    for section in ("Device-independent training memory", "Frozen-branch extraction", "Training step", "Kernels"):
        assert section in text
    assert "| cpu" in text
    try:
        import matplotlib  # noqa: F401  (the plots are optional: the bench extra)
    except ImportError:
        return
    for png in ("memory_account.png", "throughput_vs_batch.png", "extraction_throughput.png"):
        assert (out / png).stat().st_size > 1000, png


# ------------------------------------------------------------------------------- the pieces
def test_search_max_resolution_brackets_the_limit():
    limit = 1000
    found = extraction.search_max_resolution(lambda s: s <= limit, start=512, cap=4096, granularity=16)
    assert found["max_fit"] <= limit < found["first_fail"]
    assert found["first_fail"] - found["max_fit"] <= 16 and found["max_fit"] % 16 == 0
    sizes = [s for s, _ in found["tried"]]
    assert sizes[:2] == [512, 1024] and all(s % 16 == 0 for s in sizes)
    # Start too large: halves down; nothing fails up to the cap: reports the cap.
    down = extraction.search_max_resolution(lambda s: s <= 200, start=512, cap=4096, granularity=16)
    assert down["max_fit"] <= 200 < down["first_fail"]
    capped = extraction.search_max_resolution(lambda s: True, start=512, cap=3000)
    assert capped["max_fit"] == 2992 and capped["first_fail"] is None
    stopped = extraction.search_max_resolution(lambda s: True, start=512, cap=4096,
                                               should_stop=lambda s: "budget" if s > 1024 else None)
    assert stopped["max_fit"] == 1024 and stopped["stopped"] == "budget"


def test_saved_bytes_counts_each_storage_once_and_skips_parameters():
    w = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(8, 64)
    with common.SavedBytes(exclude=[w, x]) as saved:
        h = x @ w                      # saves x and w: both excluded
        y = torch.tanh(h)              # saves its output (8 x 64 fp32)
        z = (y.view(-1) * y.view(-1)).sum()  # views of y: same storage, counted once
    assert saved.nbytes == 8 * 64 * 4
    z.backward()


def test_live_bytes_tracks_the_peak_of_simultaneously_alive_tensors():
    x = torch.randn(256, 256)
    with torch.no_grad(), common.LiveBytes() as live:
        a = x * 2          # 256 KiB
        b = a + 1          # 256 KiB, both alive
        del a
        c = b.view(-1)     # a view: no new memory
        del b, c
    assert live.peak == 2 * 256 * 256 * 4
    assert live.current == 0


def test_efficiency_scores_of_the_rows():
    """PPE and PME (docs/method.md, section 8) per row, PME against full fine-tuning's row of the same shape."""
    rows = [dict(provider="full_ft", shape="s", status="ok", learnable_share=1.0, peak_mb=10.0),
            dict(provider="fpt+_preloaded", shape="s", status="ok", learnable_share=0.01, peak_mb=5.0),
            dict(provider="fpt+", shape="other", status="ok", learnable_share=0.01, peak_mb=5.0)]
    training.add_efficiency(rows, {"full_ft": 88.0, "fpt+": 87.0}, "peak_mb")
    assert rows[0]["ppe"] == pytest.approx(88.0 * math.exp(-math.log10(2)))
    assert rows[0]["pme"] == pytest.approx(88.0 * math.exp(-math.log10(2)))
    assert rows[1]["auc"] == 87.0 and rows[1]["ppe"] == pytest.approx(87.0 * math.exp(-math.log10(1.01)))
    assert rows[1]["pme"] == pytest.approx(87.0 * math.exp(-math.log10(1.5)))
    assert "pme" not in rows[2]  # no full fine-tuning row at its shape
    assert training.parse_auc("87") == {m: 87.0 for m in ("fpt", "fpt+", "full_ft", "lora")}
    assert training.parse_auc("fpt=1,full_ft=2") == {"fpt": 1.0, "full_ft": 2.0}


# --------------------------------------------------- preloading, targets, run_all (issue 16)
def test_preload_smoke(out):
    preload.main(["--smoke", "--out", str(out), "--workers", "0"])
    rows, _ = _rows(out, "preload")
    _check_keys(rows)
    by = {r["provider"]: r for r in rows}
    for provider in ("pil_loader", "frozen_forward", "pil_loader+frozen"):
        assert by[provider]["status"] == "ok" and by[provider]["images_per_s"] > 0, provider
    assert by["pil_loader+frozen"]["bound"].startswith(("decoding", "the frozen forward"))
    for provider in ("gpu_decode", "gpu_decode+frozen"):  # the option's code path, on the CPU in --smoke
        assert by[provider]["status"] == "ok" and by[provider]["images_per_s"] > 0, provider
    assert by["pil_loader+frozen"]["gpu_decode_vs_pil"] > 0
    assert by["gpu_decode"]["levels_vs_pil_max"] >= 0 and 0 <= by["gpu_decode"]["share_off_vs_pil"] <= 1


def test_synthetic_jpegs_decode_to_their_size(tmp_path):
    made = preload.make_jpegs(tmp_path, 3, 40, 24, workers=1)
    assert made["images"] == 3 and made["bytes"] > 0
    from fpt_fast.app.data import load_image

    image = load_image(next((tmp_path / "train").rglob("*.jpg")))  # an 8-bit RGB PIL image
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.shape == (24, 40, 3) and 0 < pixels.mean() < 255


def test_targets_are_computed_from_the_smoke_rows(out):
    """Every target line of a smoke run is computed from its own rows, or says why not (on the CPU
    only peak memory, which needs the CUDA allocator); the printed table ends the output."""
    data = json.loads((out / "results.json").read_text())
    if not {r["op"] for r in data["rows"]} >= {"token_importance", "extract", "train_step", "preload"}:
        pytest.skip("needs the smoke runs above")
    lines = targets.evaluate(data)
    assert len(lines) == 12
    for line in lines:
        assert line.verdict in ("met", "MISSED", "not measured") and line.where
    missing = [line.target for line in lines if line.value is None]
    assert missing == ["FPT step peak memory vs reference, no preload"], missing
    assert "not recorded on cpu" in lines[9].where
    text = targets.main([str(out)])
    assert text.splitlines()[-1].endswith("not measured") and "SMOKE" in text
    assert json.loads((out / "targets.json").read_text())["targets"][0]["target"] == lines[0].target


def test_choices_name_the_fastest_variant_and_lse_source():
    def r(op, provider, ms, shape="s", mode="fwd"):
        return dict(common.row(op, provider, mode, shape, "bfloat16", "cuda: X"), median_ms=ms)

    rows = [r("prompt_attention", "triton:default", 2.0, mode="fwd+bwd"),
            r("prompt_attention", "triton:bwd:batch_chunk=1", 0.5, mode="fwd+bwd"),
            r("prompt_attention", "eager", 0.1, mode="fwd+bwd"),
            r("attention_with_importance", "triton:kernels", 1.0),
            r("select_tokens", "triton", 0.3), r("select_tokens", "triton:rowwise", 0.2),
            r("select_tokens", "triton:split", 0.31), r("select_tokens", "topk_gather", 0.1),
            r("attention_with_importance", "triton:lse=cudnn", 1.25),
            dict(r("attention_with_importance", "triton:lse=flash", None), status="error", reason="LSE differs")]
    text = "\n".join(targets.choices(rows))
    assert "fastest triton:bwd:batch_chunk=1 0.500 ms vs triton:default 2.000 ms (4.00x)" in text
    assert "fastest triton:kernels 1.000 ms vs triton:kernels" in text  # the own forward stays
    assert "select_tokens fwd launch @ s bfloat16: fastest triton:rowwise 0.200 ms vs triton 0.300 ms (1.50x)" in text


def test_prompt_attention_bytes_model():
    """Forward: q once (shared), K and V, out and the LSE; fwd+bwd adds q, K, V, out, dout, LSE, dq."""
    L, B, H, P, n, d, es = 2, 3, 4, 5, 7, 8, 2
    q, kv, o, lse = L * H * P * d * es, 2 * L * B * H * n * d * es, L * B * P * H * d * es, L * B * H * P * 4
    assert kernels.prompt_attention_bytes(L, B, H, P, n, d, es, True, "fwd") == q + kv + o + lse
    assert kernels.prompt_attention_bytes(L, B, H, P, n, d, es, True, "fwd+bwd") == 3 * q + 2 * kv + 3 * o + 2 * lse


def test_xformers_probe_says_why_it_cannot_run(tmp_path):
    import importlib.util

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed here")
    verdict = xformers_probe.main(["--out", str(tmp_path)])
    assert verdict.startswith("xformers verdict: cannot run here (import failed")


def test_run_all_on_the_cpu(tmp_path):
    """benchmarks/run_all's CPU path with a subset of steps: the folder's files, the steps record,
    the archive, and the targets table as the last lines of its output."""
    import os
    import subprocess
    import tarfile

    folder, archive = tmp_path / "run", tmp_path / "run.tgz"
    env = dict(os.environ, PYTHON=sys.executable, RUN_ALL_STEPS="preload,targets", RUN_ALL_SECONDS="120",
               RUN_ALL_ARCHIVE=str(archive))
    done = subprocess.run([str(ROOT / "benchmarks" / "run_all"), str(folder)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("results.json", "targets.json", "targets.txt", "versions.txt", "steps.tsv", "run_all.log"):
        assert (folder / name).stat().st_size > 0, name
    assert [line.split("\t")[0] for line in (folder / "steps.tsv").read_text().splitlines()] == ["preload"]
    last = done.stdout.strip().splitlines()
    assert last[-1].startswith(("0 of 12 targets met", "1 of 12 targets met")) and "Targets" in "\n".join(last[-15:])
    assert "torch " in (folder / "versions.txt").read_text()
    with tarfile.open(archive) as tar:
        assert any(name.endswith("run/results.json") for name in tar.getnames())
