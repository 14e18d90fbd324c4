"""fpt_fast: kernel-accelerated Fine-grained Prompt Tuning (FPT, FPT+) for high-resolution medical
image classification.

    model = fpt_fast.FPT(fpt_fast.FPTConfig.preset("fpt+", backbone="vit_base_patch16_384", num_classes=5))
"""
from .config import FPTConfig
from .frozen import FrozenBranch, FrozenFeatures
from .fusion import FineGrainedFusion
from .model import FPT, build
from .official import load_official_checkpoint
from .ops import backends, get_backend, set_backend, use_backend
from .side import SideViT

__version__ = "0.1.0"
__all__ = ["FPT", "FPTConfig", "FineGrainedFusion", "FrozenBranch", "FrozenFeatures", "SideViT", "build",
           "load_official_checkpoint", "backends", "get_backend", "set_backend", "use_backend", "__version__"]
