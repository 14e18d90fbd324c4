"""The reports of ``python -m fpt_fast.info``.

report(): versions, the native extension's state, and per device present the dispatcher's table:
which backend runs which op ("ok" or its reasons) and which backend ``auto`` picks.
backbone_report(): what a backbone costs before anything runs: its shape, N and n at an input
size, the kernel path of each op, the feature store's bytes per image and an estimate of the
frozen forward's peak memory.
"""
from __future__ import annotations

import importlib.metadata
import platform
from typing import List, Optional, Sequence

import torch

from .. import ops
from ..model.backbones import read_backbone_info
from ..model.config import PRESETS, num_selected_tokens
from ..model.frozen import frozen_compute_dtype
from ..ops import native_backend
from ..ops.dispatch import IMPORTANCE_OPS, resolve
from .store import record_bytes


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


def frozen_peak_memory(info, image_size: Sequence[int], batch: int, num_layers: int, num_selected: int,
                       dtype: torch.dtype, feature_bytes: int) -> dict:
    """An estimate (not a measurement) of the frozen forward's peak memory in bytes, by part:

        weights     = P * 4                      (parameters kept in float32; autocast casts per op)
        activations = B * N * max(6 D, 3 D + M) * s + B * H * N * 8
        features    = 2 * L * B * H * n * d * f  (the selected keys and values of every extracted layer)
        input       = B * 3 * h * w * 4
        peak        = weights + activations + features + input

    with P parameters, B the batch, N tokens, D the width, H heads of d, M the MLP's inner widths
    (BackboneInfo.mlp_width), s the compute dtype's bytes, f the feature dtype's, L extracted layers,
    n kept tokens. The activation term is the largest set one block keeps alive with fused
    attention: during attention the residual stream, its normalised copy, q, k, v and the attention
    output (6 D per token) plus the float32 LSE and importance scores (8 bytes per token and head);
    during the MLP the residual stream, its normalised copy, the MLP's inner activations and its
    output (3 D + M). Never N x N: the fused kernels do not materialise the attention matrix.
    Allocator rounding and the per-op low-precision weight copies of autocast come on top."""
    B, (h, w) = batch, image_size
    ph, pw = info.patch_size
    N = info.num_prefix_tokens + (h // ph) * (w // pw)
    D, H, d, s = info.embed_dim, info.num_heads, info.head_dim, dtype.itemsize
    parts = {
        "weights": info.num_parameters * 4,
        "activations": B * N * max(6 * D, 3 * D + info.mlp_width) * s + B * H * N * 8,
        "features": 2 * num_layers * B * H * num_selected * d * feature_bytes,
        "input": B * 3 * h * w * 4,
    }
    parts["peak"] = sum(parts.values())
    return parts


def backbone_report(backbone: str, image_size: Sequence[int], batch: int = 1, backbone_kwargs: Optional[dict] = None,
                    device: Optional[str] = None) -> str:
    """What backbone (a name as FPTConfig.backbone takes it) costs at image_size (height, width) and
    batch, read on the meta device (no weights, nothing run): width, heads, head size, patch,
    prefix tokens, N and n per preset, the kernel path of each op on device (default: cuda when
    present, else cpu) in the frozen branch's compute dtype there, the feature store's bytes per
    image per preset (bfloat16), and frozen_peak_memory's estimate per preset. ValueError for an
    unknown backbone or a size that is not a multiple of the patch."""
    info = read_backbone_info(backbone, backbone_kwargs or {})
    h, w = (int(s) for s in image_size)
    ph, pw = info.patch_size
    if h < ph or w < pw or h % ph or w % pw:
        raise ValueError(f"--image-size {h} {w}: expected positive multiples of {backbone}'s patch {ph} x {pw}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # No GPU here to ask: a GPU the frozen branch runs on computes in bfloat16 when it supports it.
    absent = device.type == "cuda" and not torch.cuda.is_available()
    dtype = torch.bfloat16 if absent else frozen_compute_dtype(None, device)
    grid = (h // ph, w // pw)
    N = info.num_prefix_tokens + grid[0] * grid[1]
    prefix = (f"{info.num_prefix_tokens} ({'class token' if info.has_class_token else 'no class token'}, "
              f"{info.num_register_tokens} register tokens)")
    position_embeddings = " and ".join(kind for kind, present in (("absolute", info.abs_pos_embed),
                                                                   ("rotary", info.rotary)) if present) or "none"
    lines = [f"backbone {backbone} ({info.architecture}, {info.num_parameters / 1e6:.1f} M parameters)",
             f"  width {info.embed_dim}, {info.num_heads} heads of head size {info.head_dim}, depth {info.depth}, "
             f"patch {ph} x {pw}, prefix tokens {prefix}, "
             f"position embeddings: {position_embeddings}",
             f"  at {h} x {w}: grid {grid[0]} x {grid[1]}, N = {N} tokens", ""]
    lines.append(f"kernel paths on {device.type} ({str(dtype).replace('torch.', '')}"
                 f"{', assumed: no GPU here' if absent else ''}, head size {info.head_dim}):")
    for op in ops.OPS:
        try:
            path = resolve(op, "auto", device.type, dtype, info.head_dim, "global" if op in IMPORTANCE_OPS else None)
        except ValueError as error:
            path = f"none ({error})"
        lines.append(f"  {op}: {path}")
    lines.append("  other blocks: PyTorch's fused scaled_dot_product_attention (timm's own forward)")
    lines += ["", f"per preset (bfloat16 store; frozen forward's peak memory at batch {batch}: an estimate, "
                  f"see frozen_peak_memory):"]
    rows = [["preset", "layers", "n", "store bytes/image", "peak memory", "weights", "activations", "features"]]
    for preset, values in PRESETS.items():
        L = info.depth if values["layer_selection"] == "all" else info.depth - info.depth // 2
        n = num_selected_tokens(N, values["token_ratio"])
        memory = frozen_peak_memory(info, (h, w), batch, L, n, dtype, dtype.itemsize)
        rows.append([preset, str(L), str(n), f"{record_bytes((L, info.num_heads, n, info.head_dim), 'bfloat16'):,}",
                     *(_mib(memory[k]) for k in ("peak", "weights", "activations", "features"))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2 ** 20:,.1f} MiB"
