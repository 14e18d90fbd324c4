"""Shared by the run-level tests (store, train, cli): a tiny synthetic data set and tiny settings."""
from fpt_fast.app import demo
from fpt_fast.app.settings import load_settings
from helpers import TINY

IMAGES_PER_CLASS = {"train": 4, "val": 2, "test": 2}
# 12 train images; records of the tiny model are 1536 bytes in bf16: 4 samples per shard.
TINY_SHARD_MB = 4 * 1536 / 2 ** 20


def make_data(tmp_path, seed=0):
    return demo.generate_dataset(tmp_path / "data", seed=seed, images_per_class=IMAGES_PER_CLASS)


def tiny_overrides(tmp_path, root):
    kwargs = TINY["backbone_kwargs"]
    return [
        "model.preset=fpt", f"model.backbone={TINY['backbone']}",
        f"model.backbone_kwargs={{depth: {kwargs['depth']}, embed_dim: {kwargs['embed_dim']}, "
        f"num_heads: {kwargs['num_heads']}}}",
        "model.pretrained=false", "model.image_size=[64, 48]", "model.side_input_size=32",
        f"data.root={root}", f"data.store={tmp_path / 'store'}", "data.num_workers=0",
        "preload.batch_size=5", f"preload.shard_mb={TINY_SHARD_MB}", "preload.device=cpu",
        "train.epochs=2", "train.batch_size=4", "train.eval_batch_size=5", "train.lr=1e-3",
        "train.warmup_epochs=0.5", "train.progress=false", "train.tensorboard=false",
        f"train.out_dir={tmp_path / 'run'}", "train.device=cpu",
    ]


def tiny_settings(tmp_path, *extra, root=None):
    root = root or make_data(tmp_path)
    return load_settings(None, tiny_overrides(tmp_path, root) + list(extra))
