"""The preloaded-feature store: exactness per dtype, resumable preloading, fingerprints, bad images."""
import json

import numpy as np
import pytest
import torch

from fpt_fast.app import data, store
from fpt_fast.app.train import build_model, preload, train, verify_store
from tiny_run import tiny_settings


def test_storage_round_trip_per_dtype():
    torch.manual_seed(0)
    t = torch.randn(3, 2, 5, 7) * 100
    t[0, 0, 0, :3] = torch.tensor([1e-40, -0.0, 65504.0])  # a subnormal, a signed zero, fp16's max
    for dtype, torch_dtype in store.TORCH_DTYPES.items():
        on_disk = store.to_storage(t, dtype)
        assert on_disk.dtype == store.STORAGE[dtype]
        back = store.from_storage(np.frombuffer(on_disk.tobytes(), dtype=store.STORAGE[dtype]).reshape(t.shape), dtype)
        assert back.dtype == torch_dtype
        assert torch.equal(back.view(torch.uint8), t.to(torch_dtype).view(torch.uint8)), dtype  # bit-exact
    assert torch.equal(store.from_storage(store.to_storage(t, "float32"), "float32"), t)


def read_all(split):
    return torch.stack([torch.stack(split.read(p)) for p in range(len(split))])


def test_store_holds_the_frozen_branch_features_bit_exactly(tmp_path):
    settings = tiny_settings(tmp_path, "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]")
    stores = {}
    for dtype in ("float32", "bfloat16", "float16"):
        s = settings.replace("data", store=str(tmp_path / f"store_{dtype}")).replace("preload", dtype=dtype)
        result = preload(s, log=lambda _: None)
        stores[dtype] = store.FeatureStore(result.store)
    model = build_model(settings, 3)
    split = data.ImageFolderSplit(settings.data.root, "train")
    transform = data.FrozenTransform(model.config.image_size, settings.data.mean, settings.data.std)
    images = torch.stack([transform(data.load_image(split.path(p))) for p in range(len(split))])
    keys, values = model.extract(images)
    expected = torch.stack([keys, values]).permute(2, 0, 1, 3, 4, 5)   # (B, 2, L, H, n, d)
    stored32 = read_all(stores["float32"].split("train"))
    torch.testing.assert_close(stored32, expected, atol=1e-5, rtol=1e-5)  # batching may differ by ulps
    for dtype in ("bfloat16", "float16"):
        stored = read_all(stores[dtype].split("train"))
        assert stored.dtype == store.TORCH_DTYPES[dtype]
        assert torch.equal(stored, stored32.to(store.TORCH_DTYPES[dtype])), dtype
    # Reading a batch gives the model's layout (L, B, H, n, d).
    k, v = stores["bfloat16"].split("train").read_batch([3, 0, 7])
    assert torch.equal(k, stored32[[3, 0, 7], 0].transpose(0, 1).to(torch.bfloat16))
    assert stores["bfloat16"].record_bytes() * 2 == stores["float32"].record_bytes()


def test_interrupted_preload_resumes_and_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    settings = tiny_settings(tmp_path)
    reference = preload(settings.replace("data", store=str(tmp_path / "reference")), log=lambda _: None)
    train_shards = json.loads((reference.store / "train.index.json").read_text())["shards"]
    assert len(train_shards) == 3  # 12 images, 4 per shard: the interruption below falls inside train

    commit = store.StoreWriter.commit_shard
    calls = []

    def commit_then_crash(self, *args, **kwargs):
        commit(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C right after the 2nd shard
    monkeypatch.setattr(store.StoreWriter, "commit_shard", commit_then_crash)
    with pytest.raises(KeyboardInterrupt):
        preload(settings, log=lambda _: None)
    monkeypatch.setattr(store.StoreWriter, "commit_shard", commit)

    path = tmp_path / "store"
    index = json.loads((path / "train.index.json").read_text())
    assert len(index["shards"]) == 2 and not index["complete"]
    assert not [p for p in path.iterdir() if ".tmp-" in p.name]  # nothing half-written is left
    with pytest.raises(ValueError, match="unfinished"):
        store.FeatureStore(path).split("train")

    result = preload(settings, log=lambda _: None)
    assert [(r.split, r.shards_reused, r.shards_written) for r in result.reports] == \
        [("train", 2, 1), ("val", 0, 2), ("test", 0, 2)]
    files = sorted(p.name for p in reference.store.iterdir())
    assert files == sorted(p.name for p in path.iterdir())
    for name in files:
        if name.endswith(".bin") or name.endswith(".index.json"):
            assert (path / name).read_bytes() == (reference.store / name).read_bytes(), name
    again = preload(settings, log=lambda _: None)  # a finished store is left as it is
    assert all(r.shards_written == 0 for r in again.reports)


def test_fingerprint_mismatch_names_both_sides(tmp_path):
    settings = tiny_settings(tmp_path)
    preload(settings, log=lambda _: None)
    with pytest.raises(ValueError, match=r"token_ratio: store has 0.2, this run has 0.3") as error:
        train(settings.replace("model", token_ratio=0.3), log=lambda _: None)
    assert "num_selected: store has 2, this run has 3" in str(error.value)
    with pytest.raises(ValueError, match=r"stored_dtype: store has 'bfloat16', this run has 'float16'"):
        preload(settings.replace("preload", dtype="float16"), log=lambda _: None)
    # A different random backbone (different seed) is caught by the weights hash.
    with pytest.raises(ValueError, match="backbone_sha256: store has"):
        train(settings.replace("train", seed=1), log=lambda _: None)


def test_changed_split_is_detected(tmp_path):
    settings = tiny_settings(tmp_path)
    preload(settings, log=lambda _: None)
    extra = data.load_image(tmp_path / "data" / "train" / "checker" / "checker_0000.png")
    from PIL import Image
    Image.fromarray((extra.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(
        tmp_path / "data" / "train" / "checker" / "checker_9999.png")
    with pytest.raises(ValueError, match="split 'train' changed since it was preloaded"):
        train(settings, log=lambda _: None)


def test_unreadable_image_stops_preload_or_is_left_out(tmp_path):
    settings = tiny_settings(tmp_path, "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]")
    bad = tmp_path / "data" / "train" / "horizontal" / "horizontal_0002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(data.BadImageError, match="horizontal_0002.png"):
        preload(settings, log=lambda _: None)
    index = json.loads((tmp_path / "store" / "train.index.json").read_text())
    assert len(index["shards"]) == 1  # the shard before the bad image stays valid

    messages = []
    result = preload(settings.replace("data", skip_bad_images=True), log=messages.append)
    assert len(result.bad_images) == 1 and "horizontal_0002.png" in result.bad_images[0]
    assert any("horizontal_0002.png" in m for m in messages)
    split = store.FeatureStore(result.store).split("train")
    position = [p for p, (path, _) in enumerate(split.samples) if path.endswith("horizontal_0002.png")][0]
    assert split.left_out == [position] and position not in split.present_positions()
    with pytest.raises(ValueError, match="left out of the store"):
        split.read(position)
    assert len(split.present_positions()) == 11


def test_verify_checks_files_and_recomputes(tmp_path):
    settings = tiny_settings(tmp_path)
    preload(settings, log=lambda _: None)
    report = verify_store(settings, recompute=3, log=lambda _: None)
    assert report.ok and report.recomputed == 9 and report.samples == 24
    shard = tmp_path / "store" / "val-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    report = verify_store(settings, recompute=0, log=lambda _: None)
    assert not report.ok and any("val-00000.bin: sha256" in p for p in report.problems)
    shard.write_bytes(bytes(raw[:-2]))
    report = verify_store(settings, recompute=0, log=lambda _: None)
    assert any("val-00000.bin" in p and "bytes" in p for p in report.problems)


def test_read_rate_is_measured(tmp_path):
    settings = tiny_settings(tmp_path)
    result = preload(settings, log=lambda _: None)
    samples_per_s, mb_per_s = store.measure_read_rate(store.FeatureStore(result.store).split("train"), 4, 1.0)
    assert samples_per_s > 0 and mb_per_s > 0
    assert result.official_bytes_per_image == 2 * 3 * 2 * 2 * 32 * 4
