"""The environment report of ``python -m fpt_fast.info``: versions, the native extension's state,
and per device present the dispatcher's table: which backend runs which op ("ok" or its reasons)
and which backend ``auto`` picks."""
from __future__ import annotations

import importlib.metadata
import platform
from typing import List

import torch

from .. import ops
from ..ops import native_backend


def _versions() -> List[str]:
    lines = [f"fpt_fast {importlib.metadata.version('fpt_fast')}",
             f"python {platform.python_version()}, torch {torch.__version__}"]
    try:
        from ..kernels import _common

        import triton

        lines.append(f"triton {triton.__version__} (interpreter: {'on' if _common.INTERPRETED else 'off'})")
    except ImportError:
        lines.append("triton: not installed")
    lines.append(f"timm {importlib.metadata.version('timm')}")
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    return lines


def _native_state() -> List[str]:
    status = native_backend.extension_status()
    if status["reason"] is not None:
        return [f"native extension: unavailable ({status['reason']})"]
    built = f", ready in {status['build_seconds']:.1f} s" if status["build_seconds"] is not None else ""
    cuda = "present" if status["cuda_reason"] is None else f"absent ({status['cuda_reason']})"
    return [f"native extension: {status['source']}{built}; CPU path {status['cpu_isa']}; CUDA kernel {cuda}"]


def device_table(device: str) -> List[str]:
    """The dispatcher's table for one device type: a row per op, a column for auto's choice and one
    per backend ("ok", or "no [i]" with the reasons in note i below the table)."""
    table = ops.backend_table(device)
    choices = ops.auto_choices(device)
    notes: dict = {}

    def note(text: str) -> str:
        return f"no [{notes.setdefault(text, len(notes) + 1)}]"

    rows = [["op", "auto", *ops.BACKENDS]]
    for op in ops.OPS:
        auto = choices[op] if choices[op] in ops.BACKENDS else note(f"auto: {choices[op]}")
        cells = [op, auto]
        for name in ops.BACKENDS:
            reasons = table[name][op]
            cells.append("ok" if not reasons else note(f"{name}: {'; '.join(reasons)}"))
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"fused ops on {device} (float32 inputs, head size 64, importance 'global'):"]
    lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines += [f"  [{number}] {text}" for text, number in notes.items()]
    return lines


def report() -> str:
    lines = _versions() + _native_state()
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        lines += [""] + device_table(device)
    return "\n".join(lines)
