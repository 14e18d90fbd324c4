"""The preloaded-feature store: exactness per dtype, the record layout, fingerprints, changed splits,
damaged files, the read rate."""
import json

import numpy as np
import pytest
import torch

from fpt_fast.app import data, store
from fpt_fast.app.build import build_model
from fpt_fast.app.preloading import preload
from fpt_fast.app.training import train
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
    assert torch.equal(v, stored32[[3, 0, 7], 1].transpose(0, 1).to(torch.bfloat16))
    assert stores["bfloat16"].record_bytes * 2 == stores["float32"].record_bytes


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
    extra.save(tmp_path / "data" / "train" / "checker" / "checker_9999.png")
    with pytest.raises(ValueError, match="split 'train' changed since it was preloaded"):
        train(settings, log=lambda _: None)


def test_read_rate_is_measured(tmp_path):
    settings = tiny_settings(tmp_path)
    result = preload(settings, log=lambda _: None)
    samples_per_s, mb_per_s = store.measure_read_rate(store.FeatureStore(result.store).split("train"), 4, 1.0)
    assert samples_per_s > 0 and mb_per_s > 0
    assert result.official_bytes_per_image == 2 * 3 * 2 * 2 * 32 * 4


def test_records_hold_keys_then_values_of_one_sample():
    keys, values = torch.randn(2, 2, 4, 3, 5, 7).unbind(0)         # each (L=2, B=4, H=3, n=5, d=7)
    records = store.records_from_features((keys, values))
    assert records.shape == (4, 2, 2, 3, 5, 7) == (4,) + store.record_shape((2, 3, 5, 7))
    assert torch.equal(records[1, 0], keys[:, 1]) and torch.equal(records[1, 1], values[:, 1])
    back = store.features_from_records(records[:, 0], records[:, 1])
    assert torch.equal(back.keys, keys) and torch.equal(back.values, values)
    assert store.record_bytes((2, 3, 5, 7), "bfloat16") == 2 * 2 * 3 * 5 * 7 * 2
    assert store.record_bytes((2, 3, 5, 7), "float32") == 2 * 2 * 3 * 5 * 7 * 4


def test_verify_names_damaged_shards(tmp_path):
    settings = tiny_settings(tmp_path)
    preload(settings, log=lambda _: None)
    assert store.verify(tmp_path / "store", recompute=0).ok
    shard = tmp_path / "store" / "val-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[store.SHARD_HEADER_BYTES + 10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    report = store.verify(tmp_path / "store", recompute=0)
    assert not report.ok and any("val-00000.bin: differs from its CRC-32" in p for p in report.problems)
    shard.write_bytes(bytes(raw[:-2]))
    report = store.verify(tmp_path / "store", recompute=0)
    assert any("val-00000.bin" in p and "bytes" in p for p in report.problems)


def test_damaged_shards_are_named_where_read_and_computed_again_by_preload(tmp_path):
    """A cut-short shard once failed with "mmap length is greater than file size" naming no file, a
    flipped byte trained silently, and a plain preload kept the flipped shard."""
    settings = tiny_settings(tmp_path, "train.epochs=1")
    preload(settings, log=lambda _: None)
    shard = tmp_path / "store" / "train-00001.bin"
    intact = shard.read_bytes()
    shard.write_bytes(intact[:-100])
    assert len(intact) == store.SHARD_HEADER_BYTES + 4 * 1536  # 4 records of the tiny model
    with pytest.raises(ValueError, match=rf"train-00001.bin' has {len(intact) - 100} bytes, {len(intact)} expected "
                                         r".*run `fpt-fast preload` again"):
        train(settings, log=lambda _: None)
    flipped = bytearray(intact)
    flipped[-100] ^= 0x01
    shard.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="train-00001.bin' differs from its CRC-32 in the index"):
        train(settings, log=lambda _: None)
    lines = []
    result = preload(settings, log=lines.append)
    assert "  train-00001.bin differs from its CRC-32 in the index (its bytes were altered): computed again" in lines
    assert [(r.shards_written, r.shards_reused) for r in result.reports] == [(1, 2), (0, 2), (0, 2)]
    assert shard.read_bytes() == intact  # computed again, bit for bit
    store.FeatureStore(tmp_path / "store").split("train")  # whole again


def test_shards_of_another_fingerprint_or_format_are_refused(tmp_path):
    """manifest.json deleted, then a preload with another backbone: the old shards were adopted."""
    settings = tiny_settings(tmp_path, "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]")
    preload(settings, log=lambda _: None)
    root = tmp_path / "store"
    shards = {p.name: p.read_bytes() for p in root.glob("*.bin")}
    (root / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"train-00000.bin' was made under another fingerprint than the store's .*"
                                         r"delete train-\*.bin and train.index.json"):
        preload(settings.replace("train", seed=1), log=lambda _: None)  # another (random) backbone
    assert {p.name: p.read_bytes() for p in root.glob("*.bin")} == shards  # nothing overwritten
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(ValueError, match="has format 1, written by another fpt_fast version.*preload again"):
        store.FeatureStore(root)


def test_a_store_preloaded_in_bfloat16_trains_on_a_cpu_only_machine(tmp_path):
    """How the features were computed is the store's: training need not reproduce it."""
    settings = tiny_settings(tmp_path, "train.epochs=1")
    preload(settings.replace("model", frozen_dtype="bfloat16"), log=lambda _: None)  # as a GPU preloads
    assert store.FeatureStore(tmp_path / "store").fingerprint["frozen_compute_dtype"] == "bfloat16"
    assert train(settings, log=lambda _: None).history[0]["epoch"] == 1  # frozen_dtype auto: float32 here
    with pytest.raises(ValueError, match="frozen_compute_dtype: store has 'bfloat16', this run has 'float32'"):
        preload(settings, log=lambda _: None)  # continuing the store must compute alike
