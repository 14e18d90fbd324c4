"""The model layer: FPTConfig, the frozen backbone (backbones: names, constructor arguments,
supported architectures; backbone_weights: published checkpoint layouts), the frozen branch, the
fine-grained fusion, the side network, FPT, its reference twins, the official preprocessing of an
image into the two inputs, the importance maps (importance_maps) and the import of official
checkpoints. Imports only fpt_fast.ops below it."""
from .config import FPTConfig
from .fpt import FPT, LearnableBranch, resize_images
from .frozen import FeaturesWithScores, FrozenBranch, FrozenFeatures
from .fusion import FineGrainedFusion
from .official import load_official_checkpoint
from .preprocessing import FPTTransforms
from .side import SideViT

__all__ = ["FPT", "FPTConfig", "FPTTransforms", "FeaturesWithScores", "FineGrainedFusion", "FrozenBranch",
           "FrozenFeatures", "LearnableBranch", "SideViT", "load_official_checkpoint", "resize_images"]
