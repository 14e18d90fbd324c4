"""The GPU check suite of the model (benchmarks/run_all runs it with `-m "cuda or gpu_suite"`): the
frozen branch end to end against fpt_fast.reference.extract_features, and the FPT forward and
backward (fused fusion + side network, then the whole model) against fpt_fast.reference.

The same test bodies run on the CPU for the tiny random backbone of the CPU tests; ViT-B/16 and
ViT-L/16 at 512 and 1024 px carry the `cuda` marker. Random backbones attend almost uniformly, so
importance scores are nearly tied and rounding can swap which of two near-equal tokens is kept:
selections are compared as the share of selected rows the reference did not select, held to
PyTorch's own share in the same dtype (the reference run in that dtype) times two plus a small
floor, and the rows both kept must agree to the dtype's precision.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from fpt_fast import FPT, FPTConfig, FrozenBranch, FrozenFeatures, ops, reference
from fpt_fast.model import resize_images
from helpers import TINY

pytestmark = pytest.mark.gpu_suite

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# A selected row matches a reference row within this fraction of the largest key (distinct rows are
# O(1) apart); unmatched shares allowed on top of twice PyTorch's own.
ROW_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1}
UNMATCHED_FLOOR = {"float32": 0.002, "bfloat16": 0.01}

TINY_CASE = dict(TINY, image_size=(64, 48), side_input_size=32, batch=2)
REALISTIC = [("ViT-B/16@512", dict(backbone="vit_base_patch16_384", image_size=512, batch=2)),
             ("ViT-B/16@1024", dict(backbone="vit_base_patch16_384", image_size=1024, batch=2)),
             ("ViT-L/16@512", dict(backbone="vit_large_patch16_384", image_size=512, batch=1))]
CASES = [pytest.param(TINY_CASE, id="tiny")] + [pytest.param(c, id=label, marks=pytest.mark.cuda)
                                                 for label, c in REALISTIC]
# Backbones beyond the plain ViT at their sizes (random weights): DINOv3 (Eva, rotary embeddings,
# 4 registers) and a Virchow2-style ViT-H/14 (SwiGLU, 4 registers, head size 80).
OTHER_BACKBONES = [
    ("DINOv3-L/16@512", dict(backbone="vit_large_patch16_dinov3", image_size=512, batch=1)),
    ("Virchow2-style-ViT-H/14@448", dict(backbone="vit_huge_patch14_224", image_size=448, side_input_size=112, batch=1,
                                         backbone_kwargs=dict(mlp_layer="SwiGLUPacked", act_layer="silu", reg_tokens=4,
                                                              mlp_ratio=5.3375, init_values=1e-5)))]
# The frozen branch with every backend at the tiny size (triton there runs on the CPU too), and
# with the one the GPU runs by default at the realistic sizes (the op-level checks cover the
# others there).
FROZEN_CASES = ([pytest.param(TINY_CASE, "triton", id="tiny-triton")]
                + [pytest.param(TINY_CASE, b, id=f"tiny-{b}", marks=pytest.mark.cuda) for b in ("torch", "native")]
                + [pytest.param(c, "triton", id=f"{label}-triton", marks=pytest.mark.cuda)
                   for label, c in REALISTIC + OTHER_BACKBONES])


def _config(case, preset="fpt", **overrides):
    values = {k: v for k, v in case.items() if k != "batch"}
    values.update(num_classes=3, **overrides)
    return FPTConfig.preset(preset, **values)


def _images(case, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    size = case["image_size"] if isinstance(case["image_size"], tuple) else (case["image_size"],) * 2
    return torch.randn(case["batch"], 3, *size, generator=g, device=DEVICE)


def _autocast(dtype_name):
    if dtype_name == "float32":
        return contextlib.nullcontext()
    return torch.autocast(DEVICE, dtype=DTYPES[dtype_name])


def unmatched_share(fast, ref, tolerance):
    """Share of fast's selected rows (each (b, h) group of n rows) with no reference row of the same
    group within tolerance * max |ref|. Exact distances (no matmul shortcut, whose cancellation
    reaches 1e-3 on rows of unit size)."""
    f = fast.float().flatten(0, 2)
    r = ref.float().flatten(0, 2)
    distance = torch.cdist(f, r, compute_mode="donot_use_mm_for_euclid_dist").amin(-1)
    return (distance > tolerance * r.abs().max()).float().mean().item()


@pytest.mark.parametrize("importance", ["global", pytest.param("class_token", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case, backend", FROZEN_CASES)
def test_frozen_branch_selects_the_reference_tokens(case, backend, dtype, importance):
    cfg = _config(case, importance=importance, frozen_dtype=dtype, backend=backend)
    for op in ("attention_with_importance", "select_tokens"):
        reasons = ops.unsupported_reasons(backend, op, DEVICE, DTYPES[dtype], cfg.backbone_info.head_dim, importance
                                          if op == "attention_with_importance" else None)
        if reasons:
            pytest.skip(f"{backend}: {'; '.join(reasons)}")
    torch.manual_seed(0)
    with torch.device(DEVICE):
        frozen = FrozenBranch(cfg)
    x = _images(case, seed=1)
    fast = frozen(x)
    assert fast.keys.shape == (len(cfg.layers), x.shape[0], cfg.backbone_info.num_heads, cfg.num_selected,
                               cfg.backbone_info.head_dim)
    assert fast.keys.dtype == DTYPES[dtype] and torch.isfinite(fast.keys).all()

    def extract():
        return reference.extract_features(frozen.backbone, x, cfg.layers, cfg.num_selected, importance)

    truth_k, truth_v = extract()                             # float32 reference
    with _autocast(dtype):
        own_k, _ = extract()                                 # the reference in the tested dtype
    tolerance = ROW_TOLERANCE[dtype]
    allowed = 2 * unmatched_share(own_k, truth_k, tolerance) + UNMATCHED_FLOOR[dtype]
    for name, got, want in (("keys", fast.keys, truth_k), ("values", fast.values, truth_v)):
        share = unmatched_share(got, want, tolerance)
        assert share <= allowed, f"{name}: {share:.2%} of the selected rows are not the reference's (allowed {allowed:.2%})"


def _model(case, preset, dtype):
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = FPT(_config(case, preset=preset, frozen_dtype=dtype, backend="auto")).eval()
    with torch.no_grad():
        model.fusion.prompts.normal_()  # prompts start near zero; make them matter
    return model


def _logits_and_grads(model, forward, labels, dtype):
    model.zero_grad(set_to_none=True)
    with _autocast(dtype):
        logits = forward()
    F.cross_entropy(logits.float(), labels).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads


@pytest.mark.parametrize("preset", ["fpt", "fpt+"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CASES)
def test_learnable_branch_matches_reference(case, dtype, preset):
    """Fusion (prompt attention) and side network from the same features: logits and every
    trainable gradient; bfloat16 autocast within twice the reference's own bfloat16 error."""
    model = _model(case, preset, dtype)
    x_hi = _images(case, seed=2)
    x_lo = resize_images(x_hi, model.config.side_input_size)
    labels = torch.arange(x_hi.shape[0], device=DEVICE) % 3
    feats = model.extract(x_hi)
    keys, values = feats.keys.float(), feats.values.float()

    def ref_forward():
        return reference.side_forward(model.side, x_lo, reference.fusion_forward(model.fusion, keys, values))

    truth = _logits_and_grads(model, ref_forward, labels, "float32")
    got = _logits_and_grads(model, lambda: model.forward_from_features(x_lo, FrozenFeatures(keys, values)),
                            labels, dtype)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got[1]) == set(truth[1]) == trainable
    if dtype == "float32":
        torch.testing.assert_close(got[0], truth[0], atol=2e-5, rtol=1e-4)
        for name in trainable:
            torch.testing.assert_close(got[1][name], truth[1][name], atol=2e-5, rtol=1e-4, msg=name)
        return
    # The reference in bfloat16 autocast, its features rounded as the fused fusion rounds them.
    keys16, values16 = keys.bfloat16().float(), values.bfloat16().float()
    own = _logits_and_grads(model, lambda: reference.side_forward(
        model.side, x_lo, reference.fusion_forward(model.fusion, keys16, values16)), labels, dtype)
    # Twice the reference's own bfloat16 error, as relative L2 errors: of the logits, and of all the
    # gradients together. A tensor of a few elements alone (a side LayerNorm of width 8 here) can
    # see its two bfloat16 errors differ several-fold by chance (the side network's attention is
    # SDPA in one run, eager in the other), so each gradient is held only to a bound that a wrong
    # gradient (O(1) relative error) cannot meet: 8 bfloat16 epsilons.
    eps = torch.finfo(torch.bfloat16).eps
    names = sorted(trainable)
    flat = [torch.cat([run[1][n].flatten() for n in names]) for run in (got, own, truth)]
    for name, a, o, t in (("logits", got[0], own[0], truth[0]), ("gradients", *flat)):
        err, base = ((a - t).norm() / t.norm()).item(), ((o - t).norm() / t.norm()).item()
        assert err <= 2 * base + eps, f"{name}: relative error {err:.3g} vs the reference's bfloat16 error {base:.3g}"
    for n in names:
        err = ((got[1][n] - truth[1][n]).norm() / truth[1][n].norm()).item()
        assert err <= 8 * eps, f"{n}: relative error {err:.3g} > 8 bfloat16 epsilons"


@pytest.mark.parametrize("case", CASES)
def test_fpt_forward_matches_reference(case):
    """The whole fused model against the whole reference in float32 (frozen branch included): the
    same logits up to the rounding of near-tied selections."""
    model = _model(case, "fpt", "float32")
    x_hi = _images(case, seed=3)
    with torch.no_grad():
        logits = model(x_hi)
        ref_logits = reference.fpt_forward(model, x_hi)
    assert torch.isfinite(logits).all()
    scale = ref_logits.abs().max().item()
    assert (logits - ref_logits).abs().max().item() <= 1e-3 * scale + 1e-5
