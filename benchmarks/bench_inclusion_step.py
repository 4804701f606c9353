"""inclusion_step (SPEC §2): the fused ext kernel vs a per-tensor torch loop (the authors' style),
a torch ``_foreach`` version and the reference's plain torch ops on one flat arena, on the masks
of a 12-layer DeiT-S / BERT-base and on a 16M-unit arena; plus a plain copy's bandwidth.

    python benchmarks/bench_inclusion_step.py [--quick] [--device cpu|cuda] [--out CSV]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, bench, device_label, triton_op, write_rows  # noqa: E402

from spp_kernels import _ext, reference as R  # noqa: E402

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-4, weight_decay=0.0, kappa=1.0, lam=3.0, nu=math.inf,
             mode="nonneg", optimizer="adamw")
MODELS = {"deit_s_12x(64,64,1536)": [64, 64, 1536] * 12, "bert_base_12x(64,64,3072)": [64, 64, 3072] * 12}
ARENAS = ("m", "grad", "exp_avg", "exp_avg_sq", "z", "gamma", "entry", "support_count")
BYTES_PER_UNIT = 4 * (8 + 7)  # 8 arenas read, 7 written


def flat_state(n: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    st = {"m": torch.ones(n), "grad": torch.randn(n, generator=g) * 1e-3, "exp_avg": torch.zeros(n),
          "exp_avg_sq": torch.zeros(n), "z": torch.zeros(n), "gamma": torch.zeros(n),
          "entry": torch.full((n,), -1, dtype=torch.int32), "support_count": torch.zeros(n, dtype=torch.int32)}
    return {k: v.to(device) for k, v in st.items()}


def per_tensor_loop(tensors: list[dict], step: int) -> None:
    """The authors' style: one small torch update per mask tensor."""
    h = HYPER
    bc1, bc2 = 1 - h["beta1"] ** step, 1 - h["beta2"] ** step
    rho = h["kappa"] * h["lr"] / bc1
    with torch.no_grad():
        for s in tensors:
            s["exp_avg"].mul_(h["beta1"]).add_(s["grad"], alpha=1 - h["beta1"])
            s["exp_avg_sq"].mul_(h["beta2"]).addcmul_(s["grad"], s["grad"], value=1 - h["beta2"])
            denom = (s["exp_avg_sq"].sqrt() / math.sqrt(bc2)).add_(h["eps"])
            s["m"].addcdiv_(s["exp_avg"], denom, value=-h["lr"] / bc1)
            s["z"].add_(s["m"] - s["gamma"], alpha=rho)
            s["gamma"].copy_(torch.clamp(s["z"] - h["lam"], min=0) * h["kappa"])
            nz = s["gamma"] != 0
            s["entry"].masked_fill_((s["entry"] == -1) & nz, step)


def foreach_version(st: dict, step: int) -> None:
    """The same update with torch._foreach ops over the lists of mask tensors."""
    h = HYPER
    bc1, bc2 = 1 - h["beta1"] ** step, 1 - h["beta2"] ** step
    rho = h["kappa"] * h["lr"] / bc1
    with torch.no_grad():
        torch._foreach_lerp_(st["exp_avg"], st["grad"], 1 - h["beta1"])
        torch._foreach_mul_(st["exp_avg_sq"], h["beta2"])
        torch._foreach_addcmul_(st["exp_avg_sq"], st["grad"], st["grad"], 1 - h["beta2"])
        denom = torch._foreach_sqrt(st["exp_avg_sq"])
        torch._foreach_div_(denom, math.sqrt(bc2))
        torch._foreach_add_(denom, h["eps"])
        torch._foreach_addcdiv_(st["m"], st["exp_avg"], denom, -h["lr"] / bc1)
        diff = torch._foreach_sub(st["m"], st["gamma"])
        torch._foreach_add_(st["z"], diff, alpha=rho)
        g = torch._foreach_sub(st["z"], h["lam"])
        torch._foreach_clamp_min_(g, 0.0)
        torch._foreach_mul_(g, h["kappa"])
        for dst, src, e in zip(st["gamma"], g, st["entry"]):
            dst.copy_(src)
        nz = [x != 0 for x in st["gamma"]]
        for e, z in zip(st["entry"], nz):
            e.masked_fill_((e == -1) & z, step)


def run(args) -> list[dict]:
    dev = args.device
    label = device_label(dev)
    rows = []
    repeats = 3 if args.quick else 7

    def row(provider, shape, metric, value):
        rows.append(dict(op="inclusion_step", provider=provider, dtype="fp32", shape=shape, metric=metric,
                         value=f"{value:.6g}", device=label))
        print(f"{provider:22s} {shape:28s} {metric:10s} {value:.4g}")

    ext_ok = _ext.available and (dev == "cpu" or _ext.with_cuda)
    if not ext_ok:
        print(f"skip ext on {dev}: " + ("spp_kernels._C not built" if not _ext.available else "built without CUDA"))
    tri, why = triton_op("inclusion_step", dev)
    if tri is None:
        print(f"skip triton: {why}")
    sizes = dict(MODELS)
    sizes["flat_16M"] = [16 * 2**20]
    if args.quick:
        sizes["flat_16M"] = [4 * 2**20]
        sizes.pop("bert_base_12x(64,64,3072)")
    for shape, widths in sizes.items():
        n = sum(widths)
        st = flat_state(n, dev)
        t = {}
        if len(widths) > 1:
            views = [{k: v for k, v in zip(ARENAS, parts)} for parts in zip(*(st[k].split(widths) for k in ARENAS))]
            lists = {k: [v[k] for v in views] for k in ARENAS}
            t["torch_loop"] = bench(lambda: per_tensor_loop(views, 5), dev, repeats)
            t["torch_foreach"] = bench(lambda: foreach_version(lists, 5), dev, repeats)
        args5 = [st[k] for k in ARENAS]
        t["torch_flat"] = bench(lambda: R.inclusion_step(*args5, 5, check_finite=False, **HYPER), dev, repeats)
        t["torch_flat_checked"] = bench(lambda: R.inclusion_step(*args5, 5, check_finite=True, **HYPER), dev, repeats)
        if ext_ok:
            from spp_kernels import ext_ops
            t["ext"] = bench(lambda: ext_ops.inclusion_step(*args5, 5, check_finite=False, **HYPER), dev, repeats)
            t["ext_checked"] = bench(lambda: ext_ops.inclusion_step(*args5, 5, check_finite=True, **HYPER), dev, repeats)
        if tri is not None:
            t["triton"] = bench(lambda: tri(*args5, 5, check_finite=False, **HYPER), dev, repeats)
        for p, sec in t.items():
            row(p, shape, "time_us", sec * 1e6)
            row(p, shape, "GB_per_s", BYTES_PER_UNIT * n / sec / 1e9)
        if "ext" in t:
            for base in ("torch_loop", "torch_foreach", "torch_flat"):
                if base in t:
                    row(f"ext_vs_{base}", shape, "speedup", t[base] / t["ext"])
        if n >= 2**20:
            src, dst = st["m"].clone(), st["z"]
            sec = bench(lambda: dst.copy_(src), dev, repeats)
            row("copy", shape, "GB_per_s", 8 * n / sec / 1e9)
            if "ext" in t:
                row("ext_vs_copy", shape, "bandwidth_fraction", (BYTES_PER_UNIT * n / t["ext"]) / (8 * n / sec))
        del st
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller arenas")
    p.add_argument("--out", default=os.path.join(RESULTS, "kernels_cpu.csv"))
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    write_rows(run(args), args.out, replace_ops=("inclusion_step",))


if __name__ == "__main__":
    main()
