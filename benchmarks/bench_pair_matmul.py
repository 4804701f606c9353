"""pair_matmul over the kept units: the ext op (gather cache + GEMM + fused epilogue + GEMM) at
kept fraction f vs the dense ``F.linear`` pair, at BERT-base MLP shapes (768 -> 3072 -> 768).

    python benchmarks/bench_pair_matmul.py [--quick] [--device cpu|cuda] [--out CSV]
Target (CPU, 2 threads): ext time <= (f + 0.15) x dense time.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, bench, device_label, triton_op, write_rows  # noqa: E402

from spp_kernels import _ext, reference as R  # noqa: E402

FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.1)


def run(args) -> list[dict]:
    dev = args.device
    label = device_label(dev)
    rows = []
    repeats = 3 if args.quick else 7
    dtypes = (torch.float32,) if dev == "cpu" else (torch.float16, torch.bfloat16)
    ext_ok = _ext.available and dev == "cpu"
    if not ext_ok:
        print("skip ext: " + ("spp_kernels._C not built" if not _ext.available else f"ext pair_matmul serves CPU only"))
    tri, why = triton_op("pair_matmul", dev)
    if tri is None:
        print(f"skip triton: {why}")
    T, K, U, N = (4 * 128 if args.quick else 8 * 128), 768, 3072, 768
    torch.manual_seed(0)
    for dtype in dtypes:
        did = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        x = torch.randn(T, K, device=dev, dtype=dtype)
        W1 = torch.randn(U, K, device=dev, dtype=dtype) / K**0.5
        b1 = torch.randn(U, device=dev, dtype=dtype)
        W2 = torch.randn(N, U, device=dev, dtype=dtype) / U**0.5
        b2 = torch.randn(N, device=dev, dtype=dtype)
        m = torch.rand(U, device=dev)
        shape = f"T{T}xK{K}xU{U}xN{N}"

        def row(provider, f, metric, value):
            rows.append(dict(op="pair_matmul", provider=provider, dtype=did, shape=f"{shape},f={f}", metric=metric,
                             value=f"{value:.6g}", device=label))
            print(f"{provider:18s} {did} {shape} f={f:<5} {metric:14s} {value:.4g}")

        with torch.no_grad():
            dense = bench(lambda: F.linear(F.gelu(F.linear(x, W1, b1)), W2, b2), dev, repeats)
            row("dense_F.linear", 1.0, "time_ms", dense * 1e3)
            for f in FRACTIONS:
                active = torch.randperm(U, device=dev)[: int(round(f * U))].sort().values
                t = {"torch": bench(lambda: R.pair_matmul(x, W1, b1, m, W2, b2, "gelu", active), dev, repeats)}
                if ext_ok:
                    from spp_kernels import ext_ops
                    t["ext"] = bench(lambda: ext_ops.pair_matmul(x, W1, b1, m, W2, b2, "gelu", active), dev, repeats)
                if tri is not None:
                    t["triton"] = bench(lambda: tri(x, W1, b1, m, W2, b2, "gelu", active), dev, repeats)
                for p, sec in t.items():
                    row(p, f, "time_ms", sec * 1e3)
                    row(p, f, "vs_dense", sec / dense)
                if "ext" in t:
                    row("ext_target", f, "vs_dense", f + 0.15)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="fewer repeats and tokens")
    p.add_argument("--out", default=os.path.join(RESULTS, "kernels_cpu.csv"))
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    write_rows(run(args), args.out, replace_ops=("pair_matmul",))


if __name__ == "__main__":
    main()
