"""The FPT model's fast path against fpt_fast.reference on identical weights."""
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from fpt_fast import FPT, reference
from helpers import tiny_config

VARIANTS = {
    "fpt": dict(preset="fpt"),
    "fpt+": dict(preset="fpt+"),
    "patch8": dict(preset="fpt", backbone="vit_small_patch8_224",
                   backbone_kwargs=dict(depth=2, embed_dim=64, num_heads=2), image_size=(40, 24), side_input_size=16),
    "dinov2_reg4_patch14": dict(preset="fpt+", backbone="vit_small_patch14_reg4_dinov2",
                                backbone_kwargs=dict(depth=2, embed_dim=64, num_heads=2),
                                image_size=(42, 28), side_input_size=28),
    "head_dim_80": dict(preset="fpt", backbone="vit_base_patch16_224",
                        backbone_kwargs=dict(depth=2, embed_dim=160, num_heads=2), image_size=(48, 32)),
    "qk_norm": dict(preset="fpt+", backbone_kwargs=dict(depth=3, embed_dim=64, num_heads=2, qk_norm=True)),
    "class_token": dict(preset="fpt", importance="class_token"),
}


def build(variant, seed=0, **overrides):
    spec = dict(VARIANTS[variant], **overrides)
    torch.manual_seed(seed)
    model = FPT(tiny_config(spec.pop("preset"), **spec))
    # Prompts start at N(0, 1e-6^2); make them matter so the comparison tests something.
    with torch.no_grad():
        model.fusion.prompts.normal_()
    return model


CASES = [(v, "auto") for v in VARIANTS] + [("fpt", "triton"), ("fpt+", "triton"), ("head_dim_80", "triton")]


@pytest.mark.parametrize("variant, backend", CASES, ids=[f"{v}-{b}" for v, b in CASES])
def test_logits_and_gradients_match_reference(variant, backend):
    """backend "triton": every fused op of the model (extraction and fusion) runs the Triton kernels."""
    overrides = {} if backend == "auto" else dict(backend=backend)
    model = build(variant, **overrides).eval()
    cfg = model.config
    torch.manual_seed(1)
    x_hi = torch.randn(3, 3, *cfg.image_size)
    labels = torch.tensor([0, 2, 1])

    logits = model(x_hi)
    F.cross_entropy(logits, labels).backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    ref_logits = reference.fpt_forward(model, x_hi)
    F.cross_entropy(ref_logits, labels).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(fast_grads) == set(ref_grads) == trainable
    for name in trainable:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)


def test_trainable_parameters_are_fusion_and_side_only():
    model = build("fpt")
    trainable = {id(p) for p in model.trainable_parameters()}
    expected = {id(p) for m in (model.fusion, model.side) for p in m.parameters()}
    assert trainable == expected == {id(p) for p in model.trainable_module().parameters()}
    assert all(not p.requires_grad for p in model.frozen.parameters())
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected
    side = {id(p) for p in model.side.parameters()}
    assert {id(p) for p in model.trainable_parameters(side_only=True)} == side
    assert model.trainable_module(side_only=True) is model.side
    frozen = sum(p.numel() for p in model.frozen.parameters())
    counts = {m: sum(p.numel() for p in getattr(model, m).parameters()) for m in ("fusion", "side")}
    assert model.learnable_share() == pytest.approx((counts["fusion"] + counts["side"]) /
                                                    (counts["fusion"] + counts["side"] + frozen))
    assert model.learnable_share(side_only=True) == pytest.approx(counts["side"] / (counts["side"] + frozen))


def test_trainable_state_round_trip_and_mismatches_named():
    model, other = build("fpt+", seed=0), build("fpt+", seed=1)
    state = model.trainable_state_dict()
    assert type(state) is dict
    assert set(state) == ({f"fusion.{k}" for k in model.fusion.state_dict()} |
                          {f"side.{k}" for k in model.side.state_dict()})
    assert "learnable.fusion.prompts" in model.state_dict()  # FPT's own keys hold both branches
    other.load_trainable_state_dict(state)
    model.eval()
    other.eval()
    x_lo = torch.randn(2, 3, *model.config.side_input_size)
    features = model.extract(torch.randn(2, 3, *model.config.image_size))
    assert torch.equal(other.forward_from_features(x_lo, features), model.forward_from_features(x_lo, features))
    before = {k: v.clone() for k, v in other.trainable_state_dict().items()}
    changed = {k: torch.zeros_like(v) for k, v in state.items()}
    del changed["side.head.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['side.head.bias'\], unexpected keys \[\]"):
        other.load_trainable_state_dict(changed)
    with pytest.raises(ValueError, match=r"unexpected keys \['frozen.x'\]"):
        other.load_trainable_state_dict({**state, "frozen.x": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"shapes do not fit this FPT: side.head.weight: given \(4, 16\)"):
        other.load_trainable_state_dict({**state, "side.head.weight": torch.zeros(4, 16)})
    after = other.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing loaded by the failed calls
    # Earlier fpt_fast checkpoints hold the prompts as (L, P, dp), without the official batch axis.
    other.load_trainable_state_dict({**state, "fusion.prompts": state["fusion.prompts"][:, 0]})
    assert torch.equal(other.fusion.prompts, model.fusion.prompts)


def test_side_only_forward_is_the_plain_side_vit():
    model = build("fpt").eval()
    x_lo = torch.randn(2, 3, *model.config.side_input_size)
    plain = VisionTransformer.forward(model.side, x_lo)
    assert torch.equal(model.forward_from_features(x_lo, None), plain)
    assert torch.equal(model.trainable_module(side_only=True)(x_lo), plain)
    features = model.extract(torch.randn(2, 3, *model.config.image_size))
    assert not torch.equal(model.forward_from_features(x_lo, features), plain)  # the prompts do something


def test_frozen_branch_stays_frozen_in_training():
    model = build("fpt").train()
    assert model.training and model.fusion.training and model.side.training
    assert not model.frozen.training and not any(m.training for m in model.frozen.modules())
    x_hi = torch.randn(2, 3, *model.config.image_size)
    features = model.extract(x_hi)
    assert features.keys.grad_fn is None and not features.keys.requires_grad
    model(x_hi).sum().backward()
    assert all(p.grad is None for p in model.frozen.parameters())
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_forward_with_explicit_side_input_and_features():
    model = build("fpt+").eval()
    cfg = model.config
    x_hi, x_lo = torch.randn(2, 3, *cfg.image_size), torch.randn(2, 3, 48, 32)
    features = model.extract(x_hi)
    L, n, d = len(cfg.layers), cfg.num_selected, cfg.backbone_info.head_dim
    assert features.keys.shape == features.values.shape == (L, 2, cfg.backbone_info.num_heads, n, d)
    torch.testing.assert_close(model.forward_from_features(x_lo, features), model(x_hi, x_lo))
    torch.testing.assert_close(model.forward_from_features(x_lo, tuple(features)), model(x_hi, x_lo))
    torch.testing.assert_close(model(x_hi, x_lo), reference.fpt_forward(model, x_hi, x_lo), atol=2e-5, rtol=1e-4)


def test_training_reduces_the_loss():
    model = build("fpt+").train()
    cfg = model.config
    torch.manual_seed(3)
    x_hi = torch.randn(8, 3, *cfg.image_size)
    labels = torch.arange(8) % cfg.num_classes
    features = model.extract(x_hi)  # preloading: the frozen branch runs once
    x_lo = F.interpolate(x_hi, size=cfg.side_input_size, mode="bilinear", antialias=True)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(model.forward_from_features(x_lo, features), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_fusion_and_side_compile_without_graph_breaks():
    model = build("fpt").eval()
    cfg = model.config
    x_hi = torch.randn(2, 3, *cfg.image_size)
    x_lo = torch.randn(2, 3, *cfg.side_input_size)
    features = model.extract(x_hi)
    compiled = torch.compile(model.forward_from_features, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x_lo, features), model.forward_from_features(x_lo, features), atol=1e-5, rtol=1e-5)


def bad_inputs(model, features):
    """(name, call, error type, what the message must say): inputs that once reached timm or torch.
    features: of a batch of 2."""
    h, w = model.config.image_size
    x_hi, x_lo = torch.randn(2, 3, h, w), torch.randn(2, 3, 32, 32)
    return [
        ("4 channels", lambda: model(torch.randn(2, 4, h, w)), ValueError, r"x_hi \(shape \(2, 4, 64, 48\)"),
        ("rank 3", lambda: model(torch.randn(3, h, w)), ValueError, r"x_hi \(shape \(3, 64, 48\).*\(B, 3, height"),
        ("uint8", lambda: model(x_hi.to(torch.uint8)), TypeError, r"x_hi .*torch.uint8.*must be a float tensor"),
        ("float64", lambda: model(x_hi.double()), TypeError, r"x_hi .*torch.float64.*must be torch.float32"),
        ("float16 on the CPU", lambda: model.extract(x_hi.half()), TypeError, r"x_hi .*torch.float16.*float32"),
        ("size not divisible", lambda: model(torch.randn(2, 3, 60, w)), ValueError,
         r"x_hi \(shape \(2, 3, 60, 48\).*configured size \(64, 48\)"),
        ("size not the config's", lambda: model.extract(torch.randn(2, 3, w, h)), ValueError,
         r"x_hi \(shape \(2, 3, 48, 64\).*configured size \(64, 48\)"),
        ("numpy", lambda: model(x_hi.numpy()), TypeError, r"x_hi must be a torch.Tensor .*ndarray of shape"),
        ("x_lo batch", lambda: model(x_hi, torch.randn(3, 3, 32, 32)), ValueError,
         r"x_lo \(shape \(3, 3, 32, 32\).*batch size of x_hi \(2\)"),
        ("x_lo not divisible", lambda: model.forward_from_features(torch.randn(2, 3, 30, 32), None), ValueError,
         r"x_lo \(shape \(2, 3, 30, 32\).*divisible by the patch"),
        ("x_lo float64", lambda: model(x_hi, x_lo.double()), TypeError, r"x_lo .*torch.float64"),
        ("features batch", lambda: model.forward_from_features(x_lo[:1], features), ValueError,
         r"features.keys \(shape \(3, 2, 2, 2, 32\).*\(3, 1, 2, 2, 32\)"),
    ]


def test_bad_inputs_are_named_before_timm_or_torch_run(monkeypatch):
    model = build("fpt").eval()
    cases = bad_inputs(model, model.extract(torch.randn(2, 3, *model.config.image_size)))

    def never(*args, **kwargs):
        raise AssertionError("a bad input reached the model's internals")
    monkeypatch.setattr(model.frozen, "forward", never)
    monkeypatch.setattr(model.learnable, "forward", never)
    for name, call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
