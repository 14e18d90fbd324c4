"""CPU timings of the native extension against the "torch" and "reference" backends of fpt_fast.ops.

    python benchmarks/native_cpu.py [--reps 5] [--threads N] [--csv out.csv] [--quick]

Shapes are CPU-sized versions of the paper's setting: ViT-B/16 at 512 x 512 gives N = 32 * 32 + 1 =
1025 tokens, H = 12, d = 64, n = floor(0.2 * N) = 205; the fusion module's prompt attention runs over
L = 12 layers, P = 16 prompts, batch 8. Each figure is the best of --reps runs after one warm-up, in
milliseconds; "fwd+bwd" of prompt attention includes the backward for q only (k, v are constants in
FPT), as in training. Prints a markdown table; --csv also writes rows keyed by
(op, provider, mode, shape, dtype, device).
"""
from __future__ import annotations

import argparse
import csv
import platform
import time
from typing import Callable, Dict, List

import torch

from fpt_fast import ops
from fpt_fast.ops import native_backend as native

PROVIDERS = ("native", "torch", "reference")


def best_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def cases(quick: bool) -> List[Dict]:
    B, H, N, d = (1, 12, 257, 64) if quick else (2, 12, 1025, 64)
    n = int(N * 0.2)
    L, Bp, P, nn = (12, 2, 16, 51) if quick else (12, 8, 16, 205)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, N, d, generator=g).to(dtype) for _ in range(3))
        scores = ops.token_importance(q, k, backend="torch")
        shape = f"B={B} H={H} N={N} d={d}"
        out.append(dict(op="token_importance", mode="fwd", shape=shape, dtype=dtype,
                        run=lambda be, q=q, k=k: ops.token_importance(q, k, backend=be)))
        out.append(dict(op="attention_with_importance", mode="fwd", shape=shape, dtype=dtype,
                        run=lambda be, q=q, k=k, v=v: ops.attention_with_importance(q, k, v, backend=be)))
        out.append(dict(op="select_tokens", mode="fwd", shape=f"{shape} n={n}", dtype=dtype,
                        run=lambda be, s=scores, k=k, v=v: ops.select_tokens(s, k, v, n, backend=be)))
        pq = torch.randn(L, H, P, d, generator=g).to(dtype)
        pk, pv = (torch.randn(L, Bp, H, nn, d, generator=g).to(dtype) for _ in range(2))
        pshape = f"L={L} B={Bp} H={H} P={P} n={nn} d={d}"
        out.append(dict(op="prompt_attention", mode="fwd", shape=pshape, dtype=dtype,
                        run=lambda be, q=pq, k=pk, v=pv: ops.prompt_attention(q, k, v, backend=be)))

        def fwd_bwd(be, q=pq, k=pk, v=pv):
            leaf = q.detach().requires_grad_()
            ops.prompt_attention(leaf, k, v, backend=be).float().square().sum().backward()
            return leaf.grad

        out.append(dict(op="prompt_attention", mode="fwd+bwd", shape=pshape, dtype=dtype, run=fwd_bwd))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    parser.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reason = native.unavailable_reason()
    status = native.extension_status()
    print(f"# native vs torch vs reference on the CPU: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, native ISA {status['cpu_isa']}"
          + (f" (native unavailable: {reason})" if reason else ""))
    print()
    print("| op | mode | shape | dtype | native ms | torch ms | reference ms | native speed-up vs torch |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    rows = []
    for case in cases(args.quick):
        times = {}
        for provider in PROVIDERS:
            if provider == "native" and reason is not None:
                times[provider] = float("nan")
                continue
            times[provider] = best_ms(lambda: case["run"](provider), args.reps)
            rows.append(dict(op=case["op"], provider=provider, mode=case["mode"], shape=case["shape"],
                             dtype=str(case["dtype"]).replace("torch.", ""), device="cpu", ms=f"{times[provider]:.3f}"))
        speedup = times["torch"] / times["native"]
        print(f"| {case['op']} | {case['mode']} | {case['shape']} | {str(case['dtype']).replace('torch.', '')} | "
              f"{times['native']:.2f} | {times['torch']:.2f} | {times['reference']:.2f} | {speedup:.1f}x |", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
