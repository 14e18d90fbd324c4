"""Image decoding, the ImageFolder layout, the two transforms, datasets and mean/std."""
import numpy as np
import pytest
import torch
from PIL import Image

from fpt_fast.app import data, demo


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    image.save(path)
    return path


def test_image_modes_decode_to_rgb_in_unit_range(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    rgba = rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)
    deep = rng.integers(0, 65536, (9, 7), dtype=np.uint16)

    x = data.load_image(save(tmp_path / "gray.png", gray))
    assert x.shape == (3, 9, 7) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.from_numpy(gray / 255.0).float().expand(3, 9, 7))

    x = data.load_image(save(tmp_path / "rgba.png", rgba))
    torch.testing.assert_close(x, torch.from_numpy(rgba[..., :3] / 255.0).float().permute(2, 0, 1))

    path = save(tmp_path / "deep.png", deep)
    assert Image.open(path).mode.startswith("I")
    torch.testing.assert_close(data.load_image(path), torch.from_numpy(deep / 65535.0).float().expand(3, 9, 7))

    palette = Image.fromarray(gray).convert("P")
    palette.save(tmp_path / "palette.png")
    assert data.load_image(tmp_path / "palette.png").shape == (3, 9, 7)


def test_unreadable_images_raise_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(data.BadImageError, match="garbage.png"):
        data.load_image(garbage)
    good = save(tmp_path / "good.png", np.zeros((64, 64, 3), np.uint8) + 100)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(data.BadImageError, match="truncated.png"):
        data.load_image(truncated)


def test_image_folder_layout(tmp_path):
    root = demo.generate_dataset(tmp_path / "ds", seed=1, images_per_class={"train": 2, "val": 1, "test": 1})
    split = data.ImageFolderSplit(root, "train")
    assert split.classes == sorted(demo.CLASSES)
    assert len(split) == 2 * len(demo.CLASSES)
    assert [s.label for s in split.samples] == [0, 0, 1, 1, 2, 2]
    assert split.samples[0].path == "train/checker/checker_0000.png"
    (root / "val" / "intruder").mkdir()
    with pytest.raises(ValueError, match="intruder"):
        data.ImageFolderSplit(root, "val", split.classes)
    with pytest.raises(FileNotFoundError, match="holdout"):
        data.ImageFolderSplit(root, "holdout", split.classes)
    with pytest.raises(FileNotFoundError, match="no train/ folder"):
        data.find_classes(tmp_path)


def test_frozen_transform_resizes_and_normalises():
    image = torch.rand(3, 100, 80)
    transform = data.FrozenTransform((64, 48), [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    out = transform(image)
    assert out.shape == (3, 64, 48)
    expected = (data.resize(image, (64, 48)) - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / \
        torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    torch.testing.assert_close(out, expected)
    assert transform.description()["mean"] == pytest.approx([0.5, 0.4, 0.3])
    with pytest.raises(ValueError, match="std must be positive"):
        data.FrozenTransform((64, 48), [0.5] * 3, [0.2, 0.0, 0.3])
    with pytest.raises(ValueError, match="3 \\(RGB\\) values"):
        data.FrozenTransform((64, 48), [0.5] * 2, [0.2] * 3)


def test_side_transform_train_is_random_and_eval_is_a_resize():
    image = torch.rand(3, 90, 120)
    train = data.SideTransform((32, 32), [0.5] * 3, [0.25] * 3, train=True)
    evaluation = data.SideTransform((32, 32), [0.5] * 3, [0.25] * 3, train=False)
    torch.manual_seed(0)
    a = train(image)
    torch.manual_seed(0)
    b = train(image)
    c = train(image)
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(b, c)
    torch.testing.assert_close(evaluation(image), (data.resize(image, (32, 32)) - 0.5) / 0.25)


def test_dataset_augmentation_depends_only_on_seed_epoch_and_position(tmp_path):
    root = demo.generate_dataset(tmp_path / "ds", seed=1, images_per_class={"train": 2, "val": 1, "test": 1})
    split = data.ImageFolderSplit(root, "train")
    side = data.SideTransform((32, 32), [0.5] * 3, [0.25] * 3, train=True)
    dataset = data.FPTDataset(split, side, seed=3)
    first = dataset[4]["side"]
    torch.rand(10)  # the global RNG is not what decides
    assert torch.equal(dataset[4]["side"], first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[4]["side"], first)
    state = torch.get_rng_state()
    dataset[2]
    assert torch.equal(torch.get_rng_state(), state)  # and it is left untouched


def test_collate_sets_bad_samples_apart(tmp_path):
    root = demo.generate_dataset(tmp_path / "ds", seed=1, images_per_class={"train": 2, "val": 1, "test": 1})
    (root / "train" / "vertical" / "vertical_0001.png").write_bytes(b"\x89PNG broken")
    split = data.ImageFolderSplit(root, "train")
    dataset = data.FPTDataset(split, data.SideTransform((32, 32), [0.5] * 3, [0.25] * 3, train=False),
                              frozen=data.FrozenTransform((64, 64), [0.5] * 3, [0.25] * 3))
    batch = data.collate([dataset[i] for i in range(len(dataset))])
    assert batch["side"].shape == (5, 3, 32, 32) and batch["frozen"].shape == (5, 3, 64, 64)
    assert batch["position"].tolist() == [0, 1, 2, 3, 4]
    assert len(batch["bad"]) == 1 and "vertical_0001.png" in batch["bad"][0].reason


def test_mean_std_of_the_train_split(tmp_path):
    root = demo.generate_dataset(tmp_path / "ds", seed=1, images_per_class={"train": 2, "val": 1, "test": 1})
    split = data.ImageFolderSplit(root, "train")
    mean, std, bad = data.compute_mean_std(split, (64, 64))
    pixels = torch.stack([data.resize(data.load_image(split.path(i)), (64, 64)) for i in range(len(split))])
    torch.testing.assert_close(torch.tensor(mean), pixels.double().mean(dim=(0, 2, 3)).float())
    torch.testing.assert_close(torch.tensor(std), pixels.double().std(dim=(0, 2, 3), unbiased=False).float())
    assert bad == []


def test_demo_texture_vanishes_at_the_side_resolution_only():
    # Same random draws, different class: only the period-2 texture differs.
    images = [torch.from_numpy(demo.make_image(np.random.default_rng(7), label)).permute(2, 0, 1).float() / 255
              for label in range(len(demo.CLASSES))]
    full = max((images[0] - other).abs().max().item() for other in images[1:])
    low = [data.resize(x, (demo.SIDE_SIZE, demo.SIDE_SIZE)) for x in images]
    side = max((low[0] - other).abs().max().item() for other in low[1:])
    side_mean = max((low[0] - other).abs().mean().item() for other in low[1:])
    assert full > 1.5 * demo.TEXTURE_AMPLITUDE
    assert side_mean < 0.01 * demo.TEXTURE_AMPLITUDE
    assert side < 0.2 * demo.TEXTURE_AMPLITUDE  # what is left: lesion borders and 8-bit rounding
