"""What every job builds from its settings: the seeded model, its place on the device, the normalisation."""
import pytest
import torch

from fpt_fast.app import build, data
from tiny_run import tiny_settings


def test_the_model_is_seeded_without_touching_the_global_rng(tmp_path):
    settings = tiny_settings(tmp_path)
    state = torch.get_rng_state()
    a, b = build.build_model(settings, 3), build.build_model(settings, 3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    other = build.build_model(settings.replace("train", seed=1), 3)
    assert not torch.equal(other.frozen.backbone.patch_embed.proj.weight, a.frozen.backbone.patch_embed.proj.weight)


@pytest.mark.parametrize("features_online", [True, False])
def test_the_frozen_branch_moves_only_when_it_runs(tmp_path, features_online):
    model = build.build_model(tiny_settings(tmp_path), 3)
    build.place_model(model, torch.device("meta"), features_online)  # meta: a device other than the CPU
    assert all(p.device.type == "meta" for p in model.learnable.parameters())
    expected = "meta" if features_online else "cpu"
    assert all(p.device.type == expected for p in model.frozen.parameters())


def test_normalisation_given_or_computed(tmp_path):
    settings = tiny_settings(tmp_path, "data.mean=[0.5, 0.4, 0.3]", "data.std=[0.2, 0.2, 0.2]")
    assert build.with_normalization(settings, None, None, print, data.BadImages(False)) is settings
    auto = tiny_settings(tmp_path, "data.std=[0.2, 0.2, 0.2]")
    split = data.ImageFolderSplit(auto.data.root, "train")
    lines = []
    resolved = build.with_normalization(auto, split, None, lines.append, data.BadImages(False))
    mean, _ = data.compute_mean_std(split, (64, 48), data.BadImages(False))
    assert list(resolved.data.mean) == mean and list(resolved.data.std) == [0.2, 0.2, 0.2]
    assert "normalisation from the train split" in lines[-1]
    with pytest.raises(ValueError, match="no train split"):
        build.with_normalization(auto, None, None, print, data.BadImages(False))
