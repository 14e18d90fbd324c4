"""`python -m fpt_fast.info`: versions, device and which backends run here (and why not)."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from .. import ops
from ..ops import dispatch
from ..model.frozen import attention_backends, resolve_attention_backend


def report() -> str:
    lines = [f"fpt_fast {importlib.metadata.version('fpt_fast')}, torch {torch.__version__}, python {platform.python_version()}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}" + (" (interpreter)" if dispatch._TRITON_INTERPRET else ""))
    except ImportError:
        lines.append("triton: not installed")
    import timm

    lines.append(f"timm {timm.__version__}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name()}")
    for device in devices:
        lines.append(f"\nfused ops on {device} (default: {dispatch.resolve('any', None, torch.empty(0, device=device), 64)}):")
        for name, reason in ops.backends(device).items():
            lines.append(f"  {name:<10} {'available' if reason is None else reason}")
        lines.append(f"frozen-branch attention on {device} (auto: {resolve_attention_backend('auto', device)}):")
        for name, reason in attention_backends(device).items():
            lines.append(f"  {name:<10} {'available' if reason is None else reason}")
    return "\n".join(lines)

