"""masked_linear: the ext op (GEMM + fused activation/mask epilogue) vs the reference's torch ops
and a plain ``F.linear``, forward and forward+backward (frozen W: dx, dm only), at ViT/BERT shapes.

    python benchmarks/bench_masked_linear.py [--quick] [--device cpu|cuda] [--out CSV]
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


def run(args) -> list[dict]:
    dev = args.device
    label = device_label(dev)
    rows = []
    repeats = 3 if args.quick else 7
    providers = {"torch": R.masked_linear}
    if _ext.available and dev == "cpu":
        from spp_kernels import ext_ops
        providers["ext"] = ext_ops.masked_linear
    else:
        print("skip ext: serves CPU only" if _ext.available else "skip ext: spp_kernels._C not built")
    tri, why = triton_op("masked_linear", dev)
    if tri is not None:
        providers["triton"] = tri
    else:
        print(f"skip triton: {why}")
    shapes = [(197, 384, 1536), (512, 768, 3072)] if not args.quick else [(197, 384, 1536)]
    dtypes = (torch.float32,) if dev == "cpu" else (torch.float16, torch.bfloat16)
    torch.manual_seed(0)
    for dtype in dtypes:
        did = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        for T, K, N in shapes:
            x = torch.randn(T, K, device=dev, dtype=dtype)
            W = torch.randn(N, K, device=dev, dtype=dtype) / K**0.5
            b = torch.randn(N, device=dev, dtype=dtype)
            m = torch.rand(N, device=dev)
            shape = f"T{T}xK{K}xN{N}"

            def row(provider, metric, value):
                rows.append(dict(op="masked_linear", provider=provider, dtype=did, shape=shape, metric=metric,
                                 value=f"{value:.6g}", device=label))
                print(f"{provider:14s} {did} {shape:18s} {metric:16s} {value:.4g}")

            with torch.no_grad():
                row("F.linear", "fwd_ms", bench(lambda: F.linear(x, W, b), dev, repeats) * 1e3)
                for p, fn in providers.items():
                    row(p, "fwd_ms", bench(lambda: fn(x, W, b, m, None, "gelu"), dev, repeats) * 1e3)
            xg, mg = x.clone().requires_grad_(), m.clone().requires_grad_()
            for p, fn in providers.items():
                row(p, "fwd_bwd_ms", bench(lambda: fn(xg, W, b, mg, None, "gelu").sum().backward(), dev, repeats) * 1e3)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(RESULTS, "kernels_cpu.csv"))
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    write_rows(run(args), args.out, replace_ops=("masked_linear",))


if __name__ == "__main__":
    main()
