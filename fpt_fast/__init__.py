"""fpt_fast: kernel-accelerated Fine-grained Prompt Tuning (FPT, FPT+) for high-resolution medical
image classification.

    model = fpt_fast.FPT(fpt_fast.FPTConfig.preset("fpt+", backbone="vit_base_patch16_384", num_classes=5))

Layers (imports only go down): ``fpt_fast.ops`` (the fused ops, their backends and reference twins),
``fpt_fast.model`` (config, frozen branch, fusion, side network, FPT), ``fpt_fast.app`` (settings,
data, feature store, training, CLI).
"""
__version__ = "0.1.0"

from .model import (FPT, FeaturesWithScores, FineGrainedFusion, FPTConfig, FPTTransforms, FrozenBranch,
                    FrozenFeatures, LearnableBranch, SideViT, load_official_checkpoint)
from .ops import backend_table, get_backend, set_backend, use_backend

__all__ = ["FPT", "FPTConfig", "FPTTransforms", "FeaturesWithScores", "FineGrainedFusion", "FrozenBranch",
           "FrozenFeatures", "LearnableBranch", "SideViT", "load_official_checkpoint", "backend_table", "get_backend",
           "set_backend", "use_backend", "__version__"]
