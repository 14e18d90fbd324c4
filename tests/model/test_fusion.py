"""FineGrainedFusion against the reference fusion, and its drop-in contract."""
import math

import pytest
import torch

from fpt_fast import FineGrainedFusion, reference

# (prompt_dim, prompt_norm, prompt_proj): FPT (dp = Ds, projection) and FPT+ (dp = D, norm).
MODES = {"fpt": (8, False, True), "fpt+": (64, True, False), "both": (8, True, True), "plain": (64, False, False)}


def make(mode, L=3, D=64, Ds=8, H=2, P=5, p_dropout=0.5):
    dp, norm, proj = MODES[mode]
    torch.manual_seed(0)
    fusion = FineGrainedFusion(L, D, Ds, H, P, prompt_dim=dp, prompt_norm=norm, prompt_proj=proj, p_dropout=p_dropout)
    with torch.no_grad():
        fusion.prompts.normal_()
    return fusion


def features(L=3, B=4, H=2, n=7, d=32, dtype=torch.float32):
    return torch.randn(L, B, H, n, d, dtype=dtype), torch.randn(L, B, H, n, d, dtype=dtype)


@pytest.mark.parametrize("mode", list(MODES))
def test_matches_reference_with_gradients(mode):
    fusion = make(mode).eval()
    keys, values = features()
    out = fusion(keys, values)
    assert out.shape == (3, 4, 5, 8)
    grads = torch.autograd.grad(out.square().sum(), list(fusion.parameters()))
    ref = reference.fusion_forward(fusion, keys, values)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(fusion.parameters()))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for (name, _), g, r in zip(fusion.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4, msg=name)


def test_dropout_in_training_matches_reference_under_the_same_seed():
    fusion = make("fpt+").train()
    keys, values = features()
    torch.manual_seed(7)
    out = fusion(keys, values)
    torch.manual_seed(7)
    ref = reference.fusion_forward(fusion, keys, values)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out == 0).float().mean() > 0.3  # p = 0.5 dropout is on


def test_official_state_dict_keys_and_init():
    fusion = FineGrainedFusion(12, 768, 96, 12, 16, prompt_dim=96, prompt_norm=False, prompt_proj=True)
    keys = set(fusion.state_dict())
    assert keys == {"prompts", "prompt_proj.weight", "prompt_proj.bias", "out_proj.weight", "out_proj.bias"}
    assert fusion.prompts.shape == (12, 1, 16, 96)
    assert fusion.prompts.abs().max() < 1e-4  # N(0, 1e-6^2)
    plus = FineGrainedFusion(6, 768, 96, 12, 16)
    assert set(plus.state_dict()) == {"prompts", "layer_norm.weight", "layer_norm.bias", "out_proj.weight", "out_proj.bias"}


def official_fusion_state(L, D, Ds, P):
    """A state_dict laid out as the official FusionModule's (FPT+): prompts (L, 1, P, D), a
    LayerNorm(D) and out_proj Linear(D -> Ds), with values away from any init."""
    g = torch.Generator().manual_seed(3)
    return {"prompts": torch.randn(L, 1, P, D, generator=g),
            "layer_norm.weight": 1 + torch.randn(D, generator=g), "layer_norm.bias": torch.randn(D, generator=g),
            "out_proj.weight": torch.randn(Ds, D, generator=g) / 8, "out_proj.bias": torch.randn(Ds, generator=g)}


def test_official_fusion_state_dict_loads_strictly_and_computes_the_official_output():
    L, D, Ds, H, P = 3, 64, 8, 2, 5
    state = official_fusion_state(L, D, Ds, P)
    # The official module's constructor arguments, by keyword.
    fusion = FineGrainedFusion(num_layers=L, in_dim=D, out_dim=Ds, num_heads=H, num_prompts=P, p_dropout=0.5)
    fusion.load_state_dict(state, strict=True)
    fusion.eval()
    keys, values = features(L=L, H=H, d=D // H)
    # The official forward, written out: LayerNorm'd prompts query each head; raw prompts added back.
    prompts = state["prompts"].expand(-1, keys.shape[1], -1, -1)                 # (L, B, P, D)
    q = torch.nn.functional.layer_norm(prompts, (D,), state["layer_norm.weight"], state["layer_norm.bias"])
    q = q.view(L, -1, P, H, D // H).permute(0, 1, 3, 2, 4)
    context = ((q @ keys.transpose(-1, -2)) / math.sqrt(D // H)).softmax(-1) @ values
    context = context.permute(0, 1, 3, 2, 4).reshape(L, -1, P, D)
    expected = (context + prompts) @ state["out_proj.weight"].T + state["out_proj.bias"]
    torch.testing.assert_close(fusion(keys, values), expected, atol=1e-4, rtol=1e-4)
    assert {k: tuple(v.shape) for k, v in fusion.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}


def test_earlier_prompt_layout_still_loads():
    """fpt_fast checkpoints written before the official layout hold prompts (L, P, dp)."""
    state = official_fusion_state(3, 64, 8, 5)
    earlier = dict(state, prompts=state["prompts"][:, 0])
    fusion = FineGrainedFusion(3, 64, 8, 2, 5)
    fusion.load_state_dict(earlier, strict=True)
    assert torch.equal(fusion.prompts, state["prompts"])


def test_bf16_features_are_accepted():
    fusion = make("fpt").eval()
    keys, values = features(dtype=torch.bfloat16)
    out = fusion(keys, values)
    assert out.dtype == torch.float32
    # The attention runs in bf16 (the features' dtype) with fp32 accumulation.
    torch.testing.assert_close(out, fusion(keys.float(), values.float()), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_dim=8, prompt_proj=False), "prompt_proj"),
    (dict(prompt_dim=16, prompt_proj=True), "prompt_dim"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FineGrainedFusion(3, 64, 8, 2, 5, **kwargs)


def test_mismatched_features_raise():
    fusion = make("fpt")
    keys, values = features(H=4, d=16)
    with pytest.raises(ValueError):
        fusion(keys, values)
