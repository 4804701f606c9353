"""linear: ``spp_kernels.linear`` (what the pruned layers call: oneDNN for fp32 on x86 CPUs above
its size threshold) vs ``F.linear`` (+ the activation), side by side, on MiniLM's full and
pruned widths at batch 1 and 64 × 128 tokens.

    python benchmarks/bench_linear.py [--quick] [--out CSV]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, bench, device_label, write_rows  # noqa: E402

import spp_kernels  # noqa: E402

# (in, out, act): MiniLM's q/k/v/o and fc1/fc2 at full width and at widths its searched path keeps
SHAPES = [(384, 384, None), (384, 1536, "gelu"), (1536, 384, None),  # full width
          (384, 24, None), (384, 27, None), (27, 384, None),  # pruned attention (qk, v, o)
          (384, 229, "gelu"), (229, 384, None), (384, 31, "gelu"), (31, 384, None),  # pruned MLPs
          (384, 1, None), (1, 384, None)]  # one unit (the skeleton)


def run(args) -> list[dict]:
    label = device_label("cpu")
    ok, why = spp_kernels.onednn_status()
    print(f"spp_kernels.linear: {'oneDNN' if ok else 'F.linear'} ({why})")
    rows = []
    repeats = 3 if args.quick else 9
    torch.manual_seed(0)
    for T in (128, 8192) if not args.quick else (128,):
        for K, N, act in SHAPES if not args.quick else SHAPES[:4]:
            x = torch.randn(T, K)
            W = torch.randn(N, K) / K**0.5
            b = torch.randn(N)
            fn = spp_kernels.reference.activation(act)
            shape = f"T{T}xK{K}xN{N}" + (f",{act}" if act else "")
            with torch.no_grad():
                ref = bench(lambda: fn(F.linear(x, W, b)), "cpu", repeats)
                got = bench(lambda: spp_kernels.linear(x, W, b, act), "cpu", repeats)
            for provider, metric, value in (("F.linear", "fwd_ms", ref * 1e3), ("spp_kernels.linear", "fwd_ms", got * 1e3),
                                            ("spp_kernels.linear", "speedup", ref / got)):
                rows.append(dict(op="linear", provider=provider, dtype="fp32", shape=shape, metric=metric,
                                 value=f"{value:.6g}", device=label))
            print(f"{shape:28s} F.linear {ref * 1e3:8.4f} ms  spp_kernels.linear {got * 1e3:8.4f} ms  {ref / got:5.2f}x")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=os.path.join(RESULTS, "kernels_cpu.csv"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    write_rows(run(args), args.out, replace_ops=("linear",))


if __name__ == "__main__":
    main()
