"""layer_norm: ``spp_kernels.layer_norm`` (what pruned models' LayerNorms call: the extension's
CPU kernel for fp32 inference) vs ``F.layer_norm``, side by side, at MiniLM's width (384), BERT /
DeiT-B's (768) and an odd one, at 128 rows (batch 1) and 64 × 128 rows. Below
``spp_kernels._norm.MIN_ELEMENTS`` the wrapper itself calls ``F.layer_norm`` (``--kernel-always``
times the kernel there too).

    python benchmarks/bench_layer_norm.py [--quick] [--threads N] [--out CSV]
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
from spp_kernels import _norm  # noqa: E402


def run(args) -> list[dict]:
    label = device_label("cpu")
    print(f"spp_kernels.layer_norm: {'the extension kernel' if _norm.available() else 'F.layer_norm (no kernel built)'}")
    rows = []
    repeats = 3 if args.quick else 15
    torch.manual_seed(0)
    for T in (128, 8192) if not args.quick else (128,):
        for C in (384, 768, 301):
            x = torch.randn(T, C) * 2 + 1
            w, b = torch.randn(C), torch.randn(C)
            shape = f"T{T}xC{C}"
            with torch.no_grad():
                err = (spp_kernels.layer_norm(x, C, w, b, 1e-12) - F.layer_norm(x, (C,), w, b, 1e-12)).abs().max()
                ref = bench(lambda: F.layer_norm(x, (C,), w, b, 1e-12), "cpu", repeats)
                got = bench(lambda: spp_kernels.layer_norm(x, C, w, b, 1e-12), "cpu", repeats)
            for provider, metric, value in (("F.layer_norm", "fwd_us", ref * 1e6),
                                            ("spp_kernels.layer_norm", "fwd_us", got * 1e6),
                                            ("spp_kernels.layer_norm", "speedup", ref / got)):
                rows.append(dict(op="layer_norm", provider=provider, dtype="fp32", shape=shape, metric=metric,
                                 value=f"{value:.6g}", device=label))
            print(f"{shape:14s} F.layer_norm {ref * 1e6:8.1f} us  spp_kernels.layer_norm {got * 1e6:8.1f} us  "
                  f"{ref / got:5.2f}x  (max diff {float(err):.1e})")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--kernel-always", action="store_true", help="the kernel also below MIN_ELEMENTS")
    p.add_argument("--out", default=os.path.join(RESULTS, "kernels_cpu.csv"))
    args = p.parse_args()
    if args.kernel_always:
        _norm.MIN_ELEMENTS = 0
    if args.threads:
        torch.set_num_threads(args.threads)
    write_rows(run(args), args.out, replace_ops=("layer_norm",))


if __name__ == "__main__":
    main()
