"""Image decoding, the ImageFolder layout, datasets and mean/std (the transforms: tests/model/test_preprocessing.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

from fpt_fast.app import data, demo
from fpt_fast.model.preprocessing import resize_to_tensor


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    image.save(path)
    return path


def test_image_modes_decode_to_8_bit_rgb(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    rgba = rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)
    deep = rng.integers(0, 65536, (9, 7), dtype=np.uint16)

    def pixels(path):
        image = data.load_image(path)
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        return np.asarray(image)

    np.testing.assert_array_equal(pixels(save(tmp_path / "gray.png", gray)), np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(pixels(save(tmp_path / "rgba.png", rgba)), rgba[..., :3])
    path = save(tmp_path / "deep.png", deep)
    assert Image.open(path).mode.startswith("I")
    # 16 bits scaled to 8 (PIL's convert("RGB") would clip everything above 255 to white).
    expected = np.floor(deep.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(pixels(path), np.repeat(expected[..., None], 3, axis=2))
    palette = Image.fromarray(gray).convert("P")
    palette.save(tmp_path / "palette.png")
    assert pixels(tmp_path / "palette.png").shape == (9, 7, 3)


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


def test_gpu_decode_batches_fall_back_to_pil_one_image_at_a_time(tmp_path, monkeypatch):
    """preload.decode "gpu" on the CPU stand-in: the workers give JPEG bytes and decoded PNG pixels,
    decode_on_device makes the frozen batch; a JPEG the device decoder refuses is decoded by PIL,
    one PIL cannot read either becomes a BadSample; the batch equals frozen_inputs of its files."""
    import torchvision.io as tv_io

    root = demo.generate_dataset(tmp_path / "ds", seed=2, images_per_class={"train": 2, "val": 1, "test": 1})
    for path in sorted((root / "train").rglob("*.png"))[:4]:   # checker and horizontal: JPEG files
        Image.open(path).convert("RGB").save(path.with_suffix(".jpg"), quality=95)
        path.unlink()
    split = data.ImageFolderSplit(root, "train")
    transform = data.DeviceFrozenTransform((64, 48), [0.5] * 3, [0.25] * 3)
    dataset = data.FPTDataset(split, None, frozen=transform)
    items = [dataset[i] for i in range(len(dataset))]
    assert [item["encoded"].dim() for item in items] == [1, 1, 1, 1, 3, 3]   # bytes; PNG pixels
    broken = split.path(3)
    original = tv_io.decode_jpeg

    def refuse(inputs, **kwargs):
        if any(torch.equal(x, items[0]["encoded"]) or torch.equal(x, items[3]["encoded"]) for x in inputs):
            raise RuntimeError("the device decoder refuses this file")
        return original(inputs, **kwargs)
    monkeypatch.setattr(tv_io, "decode_jpeg", refuse)
    broken.write_bytes(b"\xff\xd8\xff not a JPEG any more")  # PIL re-reads it: unreadable
    batch = data.decode_on_device(data.collate(items), transform, split, torch.device("cpu"))
    assert batch["position"].tolist() == [0, 1, 2, 4, 5] and batch["label"].shape == (5,)
    assert len(batch["bad"]) == 1 and batch["bad"][0].position == 3 and broken.name in batch["bad"][0].reason
    assert batch["frozen"].shape == (5, 3, 64, 48) and "encoded" not in batch
    monkeypatch.setattr(tv_io, "decode_jpeg", original)
    expected = data.frozen_inputs(transform, [split.path(p) for p in (0, 1, 2, 4, 5)], torch.device("cpu"))
    # File 0 was decoded by PIL, the rest by torchvision: within one level of 255 (here: equal).
    torch.testing.assert_close(batch["frozen"], expected, atol=1.01 / 255 / 0.25, rtol=0)
    with pytest.raises(data.BadImageError, match=broken.name):
        data.frozen_inputs(transform, [broken], torch.device("cpu"))


def test_mean_std_of_the_train_split(tmp_path):
    root = demo.generate_dataset(tmp_path / "ds", seed=1, images_per_class={"train": 2, "val": 1, "test": 1})
    split = data.ImageFolderSplit(root, "train")
    bad_images = data.BadImages(skip=False)
    mean, std = data.compute_mean_std(split, (64, 64), bad_images)
    # The frozen input's pixels before normalisation: PIL's bilinear resize of the 8-bit image.
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(split.path(i)).convert("RGB").resize(
        (64, 64), Image.BILINEAR), dtype=np.float64) / 255).permute(2, 0, 1) for i in range(len(split))])
    torch.testing.assert_close(torch.tensor(mean), pixels.mean(dim=(0, 2, 3)).float())
    torch.testing.assert_close(torch.tensor(std), pixels.std(dim=(0, 2, 3), unbiased=False).float())
    assert bad_images.messages == []
    # An unreadable image stops the computation, or is left out of it (and listed) when skipping.
    (root / "train" / "vertical" / "vertical_0001.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(data.BadImageError, match="vertical_0001.png"):
        data.compute_mean_std(split, (64, 64), data.BadImages(skip=False))
    skipping = data.BadImages(skip=True)
    mean, _ = data.compute_mean_std(split, (64, 64), skipping)
    torch.testing.assert_close(torch.tensor(mean), pixels[:-1].mean(dim=(0, 2, 3)).float())
    assert len(skipping.messages) == 1 and "vertical_0001.png" in skipping.messages[0]


def test_bad_image_policy():
    bad = [data.BadSample(3, "a.png", "cannot read image a.png: x"), data.BadSample(5, "b.png", "cannot read b.png")]
    with pytest.raises(data.BadImageError, match="a.png"):
        data.BadImages(skip=False).handle(bad)
    data.BadImages(skip=False).handle([])  # nothing to stop for
    skipping = data.BadImages(skip=True)
    skipping.handle(bad)
    skipping.note(["cannot read b.png", "c.png (left out when preloaded)"])  # each message once
    assert skipping.messages == ["cannot read image a.png: x", "cannot read b.png", "c.png (left out when preloaded)"]
    assert skipping.report().splitlines() == ["3 unreadable image(s) were left out:"] + \
        ["  " + m for m in skipping.messages]
    assert data.BadImages(skip=True).report() == ""


def test_loader_batches_in_order_and_sets_bad_items_apart(tmp_path):
    root = demo.generate_dataset(tmp_path / "ds", seed=1, images_per_class={"train": 2, "val": 1, "test": 1})
    (root / "train" / "checker" / "checker_0001.png").write_bytes(b"\x89PNG broken")
    split = data.ImageFolderSplit(root, "train")
    dataset = data.FPTDataset(split, data.SideTransform((32, 32), [0.5] * 3, [0.25] * 3, train=False))
    batches = list(data.make_loader(dataset, 2, sampler=[5, 1, 0, 4]))
    assert [b["position"].tolist() for b in batches] == [[5], [0, 4]]
    assert [[s.position for s in b["bad"]] for b in batches] == [[1], []]
    assert batches[0]["side"].shape == (1, 3, 32, 32)
    state = torch.get_rng_state()
    list(data.make_loader(dataset, 4))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone


def test_demo_texture_vanishes_at_the_side_resolution_only():
    # Same random draws, different class: only the period-2 texture differs.
    images = [Image.fromarray(demo.make_image(np.random.default_rng(7), label)) for label in range(len(demo.CLASSES))]
    full = max(np.abs(np.asarray(images[0], np.float64) - np.asarray(other)).max() / 255 for other in images[1:])
    low = [resize_to_tensor(x, (demo.SIDE_SIZE, demo.SIDE_SIZE)) for x in images]  # the side input's resize
    side = max((low[0] - other).abs().max().item() for other in low[1:])
    side_mean = max((low[0] - other).abs().mean().item() for other in low[1:])
    assert full > 1.5 * demo.TEXTURE_AMPLITUDE
    assert side_mean < 0.01 * demo.TEXTURE_AMPLITUDE
    assert side < 0.2 * demo.TEXTURE_AMPLITUDE  # what is left: lesion borders and 8-bit rounding


def test_hidden_folders_are_ignored_and_an_empty_class_folder_is_named(tmp_path):
    """.ipynb_checkpoints in train/ once became class 0 and shifted every label."""
    root = demo.generate_dataset(tmp_path / "ds", seed=1, images_per_class={"train": 1, "val": 1, "test": 1})
    for split in ("train", "val"):
        save(root / split / ".ipynb_checkpoints" / "x-checkpoint.png", np.zeros((8, 8, 3), np.uint8))
        save(root / split / "checker" / ".hidden" / "y.png", np.zeros((8, 8, 3), np.uint8))
    assert data.find_classes(root) == sorted(demo.CLASSES)
    for split in ("train", "val"):
        samples = data.ImageFolderSplit(root, split).samples
        assert [s.label for s in samples] == [0, 1, 2] and all("/." not in s.path for s in samples)
    (root / "val" / "vertical" / "vertical_0000.png").unlink()
    with pytest.raises(ValueError, match=r"class folder '.*val/vertical' holds no images"):
        data.ImageFolderSplit(root, "val")
