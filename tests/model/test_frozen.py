"""The frozen branch: extraction equals the reference's, early exit, chunking, no autograd, and the
position embeddings resampled once from the stored grid by the official formula (written out here)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from fpt_fast import FPTConfig, FrozenBranch, FrozenFeatures, ops, reference
from helpers import TINY, assert_same_rows, official_resampling, tiny_config


def extract_both(cfg, x):
    torch.manual_seed(0)
    frozen = FrozenBranch(cfg)
    fast = frozen(x)
    ref = reference.extract_features(frozen.backbone, x, cfg.layers, cfg.num_selected, cfg.importance)
    return frozen, fast, ref


@pytest.mark.parametrize("importance", ["global", "class_token"])
@pytest.mark.parametrize("size", [(64, 48), (32, 80)])
def test_extraction_matches_reference(importance, size):
    cfg = tiny_config("fpt", image_size=size, importance=importance)
    x = torch.randn(2, 3, *size)
    _, fast, (ref_k, ref_v) = extract_both(cfg, x)
    assert fast.keys.shape == ref_k.shape == (3, 2, 2, cfg.num_selected, 32)
    assert_same_rows(fast.keys, ref_k)
    assert_same_rows(fast.values, ref_v)


def test_selected_tokens_are_per_head_and_ascending():
    cfg = tiny_config("fpt", token_ratio=0.5)
    x = torch.randn(1, 3, *cfg.image_size)
    frozen, fast, _ = extract_both(cfg, x)
    # Recover the token indices by matching the selected keys against all keys of block 0.
    captured = {}
    handle = frozen.backbone.blocks[0].attn.k_norm.register_forward_hook(lambda m, i, o: captured.update(k=o))
    frozen(x)
    handle.remove()
    k_all = captured["k"][0]                                   # (H, N, d)
    index = torch.cdist(fast.keys[0, 0], k_all).argmin(-1)     # (H, n)
    assert torch.all(index[:, 1:] > index[:, :-1])             # ascending token index
    assert not torch.equal(index[0], index[1])                 # each head chooses its own tokens


def test_early_exit_drops_later_blocks_norm_and_head():
    cfg = tiny_config("fpt", extracted_layers=[0, 1])
    frozen = FrozenBranch(cfg)
    assert len(frozen.backbone.blocks) == 2
    assert isinstance(frozen.backbone.norm, torch.nn.Identity)


def test_chunked_equals_unchunked_bitwise():
    cfg = tiny_config("fpt+")
    x = torch.randn(5, 3, *cfg.image_size)
    torch.manual_seed(0)
    whole = FrozenBranch(cfg)(x)
    torch.manual_seed(0)
    chunked = FrozenBranch(tiny_config("fpt+", frozen_chunk_size=2))(x)
    assert torch.equal(whole.keys, chunked.keys) and torch.equal(whole.values, chunked.values)


def test_no_autograd_graph_and_no_gradients():
    frozen = FrozenBranch(tiny_config("fpt"))
    x = torch.randn(1, 3, 64, 48, requires_grad=True)
    with torch.enable_grad():
        out = frozen(x)
    assert out.keys.grad_fn is None and out.values.grad_fn is None
    assert all(not p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.training


def test_feature_dtype():
    frozen = FrozenBranch(tiny_config("fpt", feature_dtype="bfloat16"))
    out = frozen(torch.randn(1, 3, 64, 48))
    assert out.keys.dtype == out.values.dtype == torch.bfloat16


def test_unsupported_architecture_is_named():
    with pytest.raises(ValueError, match="backbone"):
        FPTConfig(backbone="resnet18")


def test_bad_images():
    frozen = FrozenBranch(tiny_config("fpt"))
    with pytest.raises(ValueError, match="images"):
        frozen(torch.randn(3, 64, 48))
    with pytest.raises(ValueError, match="images"):
        frozen(torch.randn(0, 3, 64, 48))


def test_layer_norm_eps_of_the_official_frozen_model():
    """The presets normalise the official LPM as the official (HuggingFace) ViT does, eps 1e-12, and
    leave other backbones their own (timm: 1e-6); None keeps the own, a number sets it."""
    def eps_values(**overrides):
        backbone = FrozenBranch(tiny_config("fpt", **overrides)).backbone
        return {m.eps for m in backbone.modules() if isinstance(m, torch.nn.LayerNorm)}

    official = dict(backbone="vit_base_patch16_384.orig_in21k_ft_in1k", image_size=(64, 48))
    assert eps_values(**official) == {1e-12}
    assert eps_values(**official, frozen_layer_norm_eps=None) == {1e-6}
    assert eps_values() == {1e-6}  # the tiny test backbone is not the official LPM
    assert eps_values(frozen_layer_norm_eps=1e-5) == {1e-5}


def test_local_checkpoint_is_loaded(tmp_path):
    cfg = tiny_config("fpt")
    torch.manual_seed(0)
    source = FrozenBranch(cfg).backbone
    import timm
    full = timm.create_model(cfg.backbone, num_classes=0, img_size=cfg.image_size, **TINY["backbone_kwargs"])
    path = tmp_path / "backbone.pth"
    torch.save(full.state_dict(), path)
    loaded = FrozenBranch(tiny_config("fpt", checkpoint_path=str(path))).backbone
    torch.testing.assert_close(loaded.blocks[0].attn.qkv.weight, full.blocks[0].attn.qkv.weight)
    assert not torch.equal(loaded.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


MEMORY_PROBE = """
import resource, sys, torch
from fpt_fast import FPTConfig, FrozenBranch
def frozen_branch(size):
    return FrozenBranch(FPTConfig.preset("fpt", backbone="vit_tiny_patch16_224", image_size=size, side_input_size=32,
                                         backbone_kwargs=dict(depth=1, embed_dim=64, num_heads=2),
                                         extracted_layers=[0]))
size = int(sys.argv[1])
cfg = frozen_branch(size).config
frozen_branch(64)(torch.randn(1, 3, 64, 64))  # warm up allocator and kernels at a small size
frozen = frozen_branch(size)
x = torch.randn(1, 3, size, size)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = frozen(x)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(cfg.num_tokens, (after - before) * 1024)
"""


def test_extraction_never_allocates_n_by_n(tmp_path):
    """At 1792 px (N = 12545) the reference's probabilities alone need 1.26 GB for one layer of a
    2-head model; the extraction's peak resident memory grows by a small fraction of that."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(MEMORY_PROBE)
    result = subprocess.run([sys.executable, str(script), "1792"], capture_output=True, text=True, check=True)
    num_tokens, growth = map(int, result.stdout.split())
    probs_bytes = 2 * num_tokens * num_tokens * 4
    assert probs_bytes > 2**30
    assert growth < 0.25 * probs_bytes, f"peak RSS grew by {growth / 2**20:.0f} MiB"


def test_training_step_records_nothing_of_the_frozen_branch():
    """Without preloading, the autograd graph saves exactly what it saves with preloaded features."""
    from fpt_fast import FPT
    from fpt_fast.model.fpt import resize_images

    torch.manual_seed(0)
    model = FPT(tiny_config("fpt")).train()
    x_hi = torch.randn(2, 3, *model.config.image_size)

    def saved_bytes(fn):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch.manual_seed(1)
            fn().sum().backward()
        return sum(total)

    features = model.extract(x_hi)
    x_lo = resize_images(x_hi, model.config.side_input_size)
    assert saved_bytes(lambda: model(x_hi)) == saved_bytes(lambda: model.forward_from_features(x_lo, features))


@pytest.mark.parametrize("backend", ["torch", "reference", "triton", "native"])
@pytest.mark.parametrize("variant", ["plain", "dinov2_reg4_patch14", "qk_norm"])
def test_every_backend_matches_reference(backend, variant):
    kwargs = {
        "plain": dict(image_size=(48, 32)),
        "dinov2_reg4_patch14": dict(backbone="vit_small_patch14_reg4_dinov2", image_size=(42, 28), side_input_size=28,
                                    backbone_kwargs=dict(depth=2, embed_dim=64, num_heads=2)),
        "qk_norm": dict(image_size=(32, 64), backbone_kwargs=dict(depth=2, embed_dim=64, num_heads=2, qk_norm=True)),
    }[variant]
    cfg = tiny_config("fpt", backend=backend, **kwargs)
    x = torch.randn(2, 3, *cfg.image_size)
    reference_backend = backend == "reference"
    with pytest.warns(UserWarning, match="N x N") if reference_backend else contextlib.nullcontext():
        frozen, fast, (ref_k, ref_v) = extract_both(cfg, x)
    # "reference": the blocks that are not extracted materialise their N x N attention too.
    assert all(block.attn.fused_attn != reference_backend for block in frozen.backbone.blocks)
    assert_same_rows(fast.keys, ref_k, atol=1e-4)
    assert_same_rows(fast.values, ref_v, atol=1e-4)


def test_bfloat16_frozen_branch_keeps_most_tokens():
    cfg32 = tiny_config("fpt", token_ratio=0.5)
    x = torch.randn(2, 3, *cfg32.image_size)
    torch.manual_seed(0)
    ref = FrozenBranch(cfg32)(x)
    torch.manual_seed(0)
    low = FrozenBranch(tiny_config("fpt", token_ratio=0.5, frozen_dtype="bfloat16"))(x)
    assert low.keys.dtype == torch.bfloat16
    # A random tiny backbone attends almost uniformly, so bf16 rounding swaps some near-tied tokens;
    # the rows that are kept by both agree to bf16 precision.
    dist = torch.cdist(low.keys.float().flatten(0, 2), ref.keys.flatten(0, 2)).amin(-1)
    assert (dist < 0.05).float().mean() > 0.7


def test_a_named_backend_runs_every_op_of_the_extracted_blocks(monkeypatch):
    """config.backend reaches both ops of an extracted block, and is never replaced."""
    from fpt_fast import ops

    seen = []
    for name in ("attention_with_importance", "select_tokens"):
        original = getattr(ops, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            seen.append((_name, kwargs.get("backend")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    frozen = FrozenBranch(tiny_config("fpt", backend="torch", extracted_layers=[1]))
    assert all(block.attn.fused_attn for block in frozen.backbone.blocks)
    frozen(torch.randn(1, 3, 64, 48))
    assert seen == [("attention_with_importance", "torch"), ("select_tokens", "torch")]


# ------------------------------------------------------------------ position-embedding resampling
@pytest.mark.parametrize("stored, grid, num_prefix", [
    ((14, 14), (16, 15), 1), ((24, 24), (32, 32), 1), ((14, 14), (4, 3), 1), ((14, 14), (9, 20), 5),
    ((14, 14), (14, 14), 1), ((6, 4), (9, 7), 0), ((6, 4), (3, 5), 1), ((24, 24), (18, 32), 1)])
def test_official_position_embedding_rule_matches_the_formula(stored, grid, num_prefix):
    from fpt_fast.model.frozen import resample_position_embeddings

    pos_embed = torch.randn(1, num_prefix + stored[0] * stored[1], 8, generator=torch.Generator().manual_seed(0))
    out = resample_position_embeddings(pos_embed, stored, grid, num_prefix, "official")
    assert out.shape == (1, num_prefix + grid[0] * grid[1], 8)
    torch.testing.assert_close(out, official_resampling(pos_embed, num_prefix, stored, grid), atol=2e-5, rtol=1e-5)
    assert torch.equal(out[:, :num_prefix], pos_embed[:, :num_prefix])  # class / register tokens kept
    if grid != stored:
        # Neither a plain resize to the grid (sampling at g0 / g) nor timm's antialiased rule.
        patches = pos_embed[:, num_prefix:].reshape(1, *stored, 8).permute(0, 3, 1, 2)
        plain = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
        assert (plain.reshape(1, -1, 8) - out[:, num_prefix:]).abs().max() > 1e-3
        timm_rule = resample_position_embeddings(pos_embed, stored, grid, num_prefix, "timm")
        assert (timm_rule - out).abs().max() > 1e-3


@pytest.mark.parametrize("stored_size, rule", [(224, "official"), (128, "official"), (224, "timm")])
def test_backbone_is_loaded_at_its_stored_grid_and_resampled_once(tmp_path, stored_size, rule):
    """A checkpoint stored at grid 14 (the model's default) or 8 reaches the frozen branch at
    (256, 240) (grid 16 x 15) through one resampling of the stored embeddings, by the rule."""
    import timm
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    stored = timm.create_model(TINY["backbone"], num_classes=0, img_size=stored_size, **TINY["backbone_kwargs"])
    path = tmp_path / "backbone.pth"
    torch.save(stored.state_dict(), path)
    cfg = tiny_config("fpt", image_size=(256, 240), checkpoint_path=str(path), pos_embed_resampling=rule)
    backbone = FrozenBranch(cfg).backbone
    grid = (stored_size // 16,) * 2
    if rule == "official":
        expected = official_resampling(stored.pos_embed.detach(), 1, grid, (16, 15))
    else:
        expected = resample_abs_pos_embed(stored.pos_embed.detach(), [16, 15], old_size=list(grid))
    torch.testing.assert_close(backbone.pos_embed.detach(), expected, atol=2e-5, rtol=1e-5)
    assert not backbone.pos_embed.requires_grad
    with pytest.raises(ValueError, match=r"config.image_size \(256, 240\)"):
        FrozenBranch(cfg)(torch.randn(1, 3, 224, 224))


# ------------------------------------------------------------------- scores and kept indices
REGISTERS = dict(backbone="vit_small_patch14_reg4_dinov2", image_size=(42, 28), side_input_size=28,
                 backbone_kwargs=dict(depth=3, embed_dim=64, num_heads=2), token_ratio=0.4)


def assert_same_selection(indices, ref_indices, ref_scores, atol):
    """Per row, the kept sets are equal, except for tokens whose reference score ties (within atol)
    with the reference's n-th score: those may be swapped by float rounding."""
    fast = indices.sort(dim=-1).values.flatten(0, -2)
    ref = ref_indices.sort(dim=-1).values.flatten(0, -2)
    scores = ref_scores.flatten(0, -2)
    n = ref.shape[-1]
    for row in (fast != ref).any(dim=-1).nonzero().flatten().tolist():
        threshold = scores[row].topk(n).values[-1]
        swapped = set(fast[row].tolist()) ^ set(ref[row].tolist())
        assert all(abs(float(scores[row, j] - threshold)) <= atol for j in swapped), (row, swapped)


@pytest.mark.parametrize("importance", ["global", "class_token"])
@pytest.mark.parametrize("backend", ["triton", "native", "torch"])
def test_scores_and_indices_match_reference(backend, importance):
    """return_scores: the importance scores and kept indices of every extracted layer equal the
    reference's (indices as sets per row, ties excepted), the indices are ascending and name the
    kept keys, and the keys and values are those of the default call."""
    reasons = ops.unsupported_reasons(backend, "select_tokens", "cpu")
    if reasons:
        pytest.skip("; ".join(reasons))
    cfg = tiny_config("fpt", backend=backend, importance=importance, **REGISTERS)
    x = torch.randn(2, 3, *cfg.image_size)
    torch.manual_seed(0)
    frozen = FrozenBranch(cfg)
    out = frozen(x, return_scores=True)
    _, _, ref_scores, ref_indices = reference.extract_features(
        frozen.backbone, x, cfg.layers, cfg.num_selected, importance, return_scores=True)
    L, B, H, N, n = len(cfg.layers), 2, 2, cfg.num_tokens, cfg.num_selected
    assert out.scores.shape == ref_scores.shape == (L, B, H, N) and out.scores.dtype == torch.float32
    assert out.indices.shape == ref_indices.shape == (L, B, H, n) and out.indices.dtype == torch.int64
    torch.testing.assert_close(out.scores, ref_scores, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(out.scores.sum(-1), torch.ones(L, B, H))
    assert bool((out.indices.diff(dim=-1) > 0).all())
    assert_same_selection(out.indices, ref_indices, ref_scores, atol=1e-5)
    plain = frozen(x)
    assert isinstance(plain, FrozenFeatures)
    assert torch.equal(plain.keys, out.keys) and torch.equal(plain.values, out.values)
    assert isinstance(out.features, FrozenFeatures) and out.features.keys is out.keys
    # The kept keys are the rows of the layer's keys at the indices (with the reference's sets above,
    # this makes them the reference's keys, ties excepted): the layer's keys captured by hooks.
    captured = {}
    hooks = [frozen.backbone.blocks[i].attn.k_norm.register_forward_hook(
        lambda m, i_, o, i=i: captured.__setitem__(i, o)) for i in cfg.layers]
    frozen(x)
    for h in hooks:
        h.remove()
    for position, i in enumerate(cfg.layers):
        k_all = captured[i]                                            # (B, H, N, d)
        index = out.indices[position][..., None].expand(-1, -1, -1, k_all.shape[-1])
        torch.testing.assert_close(out.keys[position], k_all.gather(2, index).to(out.keys.dtype))


def test_scores_of_chunked_extraction_equal_unchunked():
    cfg = tiny_config("fpt+")
    x = torch.randn(3, 3, *cfg.image_size)
    torch.manual_seed(0)
    whole = FrozenBranch(cfg)(x, return_scores=True)
    torch.manual_seed(0)
    chunked = FrozenBranch(tiny_config("fpt+", frozen_chunk_size=2))(x, return_scores=True)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def test_default_extraction_allocates_nothing_for_scores(monkeypatch):
    """Without return_scores the select op is asked for no indices, and the extraction makes no
    tensor that the scored extraction does not make too; the scored one adds only its own outputs
    (the per-layer indices of the select kernel and the two stacks)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class NewTensors(TorchDispatchMode):
        """(shape, dtype) of every tensor an op makes (views excepted: they allocate nothing)."""

        def __init__(self):
            super().__init__()
            self.made = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and not t._is_view():
                    self.made[(tuple(t.shape), t.dtype)] += 1
            return out

    asked = []
    select = ops.select_tokens
    monkeypatch.setattr(ops, "select_tokens", lambda *a, **kw: asked.append(kw.get("return_indices")) or select(*a, **kw))
    cfg = tiny_config("fpt")
    torch.manual_seed(0)
    frozen = FrozenBranch(cfg)
    x = torch.randn(2, 3, *cfg.image_size)
    with NewTensors() as plain:
        frozen(x)
    assert asked == [None] * len(cfg.layers)
    with NewTensors() as scored:
        frozen(x, return_scores=True)
    assert asked[len(cfg.layers):] == [True] * len(cfg.layers)
    assert not plain.made - scored.made
    L, B, H, N, n = len(cfg.layers), 2, 2, cfg.num_tokens, cfg.num_selected
    extra = scored.made - plain.made
    assert extra[((L, B, H, N), torch.float32)] == 1 and extra[((L, B, H, n), torch.int64)] == 1
    assert set(extra) <= {((L, B, H, N), torch.float32), ((L, B, H, n), torch.int64), ((B, H, n), torch.int64)}
    assert extra[((B, H, n), torch.int64)] <= L
