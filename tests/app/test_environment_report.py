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


TINY_SWIGLU = {"depth": 4, "embed_dim": 160, "num_heads": 2, "reg_tokens": 4, "mlp_ratio": 2.5,
               "mlp_layer": "SwiGLUPacked", "act_layer": "silu"}


def test_backbone_report_of_a_tiny_backbone(capsys):
    """python -m fpt_fast.info --backbone ... --image-size H W: N and n per preset, the dispatcher's
    choice per op, the store's bytes per image and the memory estimate, checked against numbers
    worked out here from the model timm builds."""
    import timm
    import yaml

    from fpt_fast import info as info_command

    status = info_command.main(["--backbone", "vit_tiny_patch16_224", "--image-size", "64", "48", "--batch", "3",
                                "--backbone-kwargs", yaml.safe_dump(TINY_SWIGLU, default_flow_style=True),
                                "--device", "cpu"])
    text = capsys.readouterr().out
    assert status == 0
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, mlp_layer=timm.layers.SwiGLUPacked,
                              act_layer=torch.nn.SiLU, **{k: v for k, v in TINY_SWIGLU.items()
                                                         if k not in ("mlp_layer", "act_layer")})
    params = sum(p.numel() for p in model.parameters())
    N = 5 + 4 * 3                                  # class token + 4 registers + 4 x 3 patches
    assert "width 160, 2 heads of head size 80, depth 4, patch 16 x 16" in text
    assert "prefix tokens 5 (class token, 4 register tokens)" in text and f"N = {N} tokens" in text
    for op in ops.OPS:
        importance = "global" if op in dispatch.IMPORTANCE_OPS else None
        assert f"  {op}: {dispatch.resolve(op, 'auto', 'cpu', torch.float32, 80, importance)}\n" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip().startswith(("fpt ", "fpt+"))}
    n = int(N * 0.2)
    for preset, layers in (("fpt", 4), ("fpt+", 2)):
        store_bytes = 2 * layers * 2 * n * 80 * 2  # keys and values, bf16
        features = 2 * layers * 3 * 2 * n * 80 * 4  # float32 features on the CPU, batch 3
        activations = 3 * N * max(6 * 160, 3 * 160 + 2 * 200) * 4 + 3 * 2 * N * 8
        peak = params * 4 + activations + features + 3 * 3 * 64 * 48 * 4
        assert rows[preset][:4] == [preset, str(layers), str(n), f"{store_bytes:,}"]
        assert rows[preset][4] == f"{peak / 2 ** 20:,.1f}"


@pytest.mark.parametrize("backbone, kwargs, kinds", [
    ("vit_tiny_patch16_224", {"depth": 1}, "absolute"),
    ("vit_small_patch16_dinov3_qkvb", {"depth": 1}, "rotary"),                  # DINOv3: rope only
    ("eva02_tiny_patch14_224", {"depth": 1}, "absolute and rotary"),            # EVA02: both
    ("vit_tiny_patch16_224", {"depth": 1, "pos_embed": "none"}, "none"),
])
def test_backbone_report_names_every_kind_of_position_embedding(backbone, kwargs, kinds, capsys):
    import yaml

    from fpt_fast import info as info_command

    assert info_command.main(["--backbone", backbone, "--image-size", "224", "224", "--device", "cpu",
                              "--backbone-kwargs", yaml.safe_dump(kwargs, default_flow_style=True)]) == 0
    assert f"position embeddings: {kinds}\n" in capsys.readouterr().out


def test_backbone_report_refuses_bad_input(capsys):
    from fpt_fast import info as info_command

    assert info_command.main(["--backbone", "vit_tiny_patch16_224", "--image-size", "50", "48"]) == 2
    assert "--image-size 50 48: expected positive multiples of vit_tiny_patch16_224's patch 16 x 16" in \
        capsys.readouterr().err
    assert info_command.main(["--backbone", "no_such_vit", "--image-size", "64", "64"]) == 2
    assert "unknown timm model 'no_such_vit'" in capsys.readouterr().err
    for flags in (["--image-size", "64", "64"], ["--batch", "4"], ["--backbone-kwargs", "{depth: 2}"],
                  ["--device", "cuda"]):
        with pytest.raises(SystemExit):  # a backbone's flag without --backbone is refused, not ignored
            info_command.main(flags)
        assert f"{flags[0]} needs --backbone" in capsys.readouterr().err
