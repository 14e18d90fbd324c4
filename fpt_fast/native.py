"""Loader of the native extension fpt_fast._C (csrc/): C++ CPU kernels and CUDA kernels."""
from __future__ import annotations

from typing import Optional


def unavailable_reason() -> Optional[str]:
    """None when the extension is loaded, else why it is not."""
    return "the native extension (csrc/) is not part of this build yet"
