"""`python -m benchmarks.xformers_probe [--out DIR]`: can xformers run here, and is it worth a backend?

The design card names an xformers attention backend. xformers 0.0.35 (torch >= 2.10) ships one
wheel whose C++/CUDA extension links libcudart.so.12; the device image has CUDA 13. This probe
imports xformers.ops (with or without its extension), says what its memory-efficient attention
dispatches to, runs memory_efficient_attention_partial (output and row LSE) at ViT-B/16 @ 1024 px
(B = 8, H = 12, N = 4097, d = 64, bf16), checks both against float32 math, times it against
PyTorch's SDPA and fpt_fast's own forward, and times its LSE feeding fpt_fast's importance kernel
(the attention_with_importance row "triton:lse=xformers", next to the kernels benchmark's LSE
sources). Rows go into DIR/results.json; the last printed line is the verdict. Without xformers
it says so and exits 0.

benchmarks/README.md gives the commands that carry the wheels to the device machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import common


def describe_xformers() -> Tuple[Optional[object], str]:
    """(the xformers.ops.fmha module or None, what the import said)."""
    start = time.perf_counter()
    try:
        import xformers
        import xformers.ops.fmha as fmha
    except Exception as exc:  # ImportError, or an OSError from a library it loads
        return None, f"import failed: {type(exc).__name__}: {str(exc)[:300]}"
    from xformers import _cpp_lib

    problem = _cpp_lib._cpp_library_load_exception
    ext = "loaded" if problem is None else f"NOT loaded ({' '.join(str(problem).split())[:300]})"
    return fmha, (f"xformers {xformers.__version__} imported in {time.perf_counter() - start:.1f} s; "
                  f"C++/CUDA extension {ext}")


def available_ops(fmha, q) -> List[str]:
    """The forward ops xformers would consider for these inputs, and whether each accepts them."""
    names = []
    for module_name in ("cutlass", "flash", "flash3", "ck"):
        module = getattr(fmha, module_name, None)
        op = getattr(module, "FwOp", None) if module is not None else None
        if op is None:
            continue
        try:
            inputs = fmha.Inputs(query=q, key=q, value=q)
            reasons = op.not_supported_reasons(inputs)
        except Exception as exc:
            reasons = [f"{type(exc).__name__}: {exc}"]
        names.append(f"{op.NAME}: {'ok' if not reasons else '; '.join(map(str, reasons))[:120]}")
    return names


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/latest")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    fmha, said = describe_xformers()
    print(said)
    if fmha is None:
        verdict = f"xformers verdict: cannot run here ({said})"
        print(verdict)
        return verdict
    if not torch.cuda.is_available():
        verdict = "xformers verdict: imported, not run (no CUDA device)"
        print(verdict)
        return verdict

    from fpt_fast.kernels import token_importance as kernel

    from .kernels import IMPORTANCE_BATCH, shape_label

    device = torch.device("cuda")
    label = common.device_label(device)
    B, H, N, d = IMPORTANCE_BATCH[4097], 12, 4097, 64
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(B, N, 3, H, d, device=device, dtype=torch.bfloat16, generator=gen)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                 # (B, H, N, d) views
    qx, kx, vx = (t.transpose(1, 2) for t in (q, k, v))            # xformers' (B, N, H, d)
    for line in available_ops(fmha, qx):
        print(f"  fmha op {line}")
    shape = shape_label("ViT-B/16@1024", B=B, H=H, N=N, d=d)
    params = dict(model="ViT-B/16@1024", resolution=1024, B=B, H=H, N=N, d=d)
    rows = []

    def xformers_forward():
        return fmha.memory_efficient_attention_partial(qx, kx, vx)

    try:
        out, lse = xformers_forward()
    except Exception as exc:
        verdict = f"xformers verdict: imports but memory_efficient_attention fails: {type(exc).__name__}: {str(exc)[:300]}"
        print(verdict)
        return verdict
    out = out.transpose(1, 2)
    lse = lse[..., :N] if lse.dim() == 3 and lse.shape[-1] >= N else lse
    logits = q.float() @ k.float().transpose(-1, -2) * d ** -0.5
    lse_err = (lse.float() - logits.logsumexp(-1)).abs().max().item()
    out_err = (out.float() - logits.softmax(-1) @ v.float()).abs().max().item()
    sdpa_err = (F.scaled_dot_product_attention(q, k, v).float() - logits.softmax(-1) @ v.float()).abs().max().item()
    del logits
    print(f"  output error {out_err:.3g} (PyTorch SDPA bf16: {sdpa_err:.3g}); LSE error {lse_err:.3g}, "
          f"LSE shape {tuple(lse.shape)}")

    def timed(provider, fn, op="attention_with_importance", note=None):
        r = common.row(op, provider, "fwd", shape, torch.bfloat16, label, params=params)
        try:
            r.update(median_ms=common.time_ms(fn, device))
        except Exception as exc:
            r.update(common.failure_fields(exc))
        if note:
            r["note"] = note
        rows.append(r)
        return r

    ok = lse_err < 1e-2 and out_err <= 2 * sdpa_err + 1e-2
    timed("xformers", xformers_forward, op="xformers_probe", note="memory_efficient_attention_partial")
    timed("sdpa", lambda: F.scaled_dot_product_attention(q, k, v), op="xformers_probe")
    timed("fpt_fast_forward", lambda: kernel.attention_forward(q, k, v), op="xformers_probe")
    if ok:
        def xformers_importance():
            _, x_lse = xformers_forward()
            return kernel.token_importance_forward(q, k, x_lse[..., :N])
        timed("triton:lse=xformers", xformers_importance)
    common.save_results(args.out, "xformers_probe", rows, env=common.environment(device),
                        meta={"argv": sys.argv, "said": said})
    times = {r["provider"]: r["median_ms"] for r in rows if r["status"] == "ok"}
    if not ok:
        verdict = (f"xformers verdict: runs but is wrong here (output error {out_err:.3g}, LSE error {lse_err:.3g}): "
                   "do not implement the backend")
    elif "xformers" in times and "sdpa" in times:
        ratio = times["sdpa"] / times["xformers"]
        verdict = (f"xformers verdict: runs ({said.split(';')[1].strip()}); memory_efficient_attention "
                   f"{times['xformers']:.3f} ms vs SDPA {times['sdpa']:.3f} ms ({ratio:.2f}x) vs fpt_fast's "
                   f"forward {times.get('fpt_fast_forward', float('nan')):.3f} ms: "
                   + ("worth a backend" if ratio > 1.05 else "no faster than PyTorch's own kernels"))
    else:
        verdict = f"xformers verdict: imports, timing failed ({[common.status_text(r) for r in rows]})"
    print(verdict)
    return verdict


if __name__ == "__main__":
    main()
