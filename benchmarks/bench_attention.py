"""Pruned attention: our Triton kernel vs PyTorch SDPA on the same pruned widths, and vs SDPA on
widths zero-padded up to a size its fast kernels accept (then the output sliced back).

Shapes are pruned heads of DeiT-S (H=6, N=197), DeiT-B (H=12, N=197) and BERT-base (H=12,
N=128; also as a right-padded text batch, ``bert_base_padded``: each row keeps its first 8..128
keys, lengths uniform, given as the op's (B, M) key padding, and ``bert_base_padded_mask``: the
same padding as the materialised (B, 1, N, N) bool mask Hugging Face builds for "sdpa", which the
op reads per tile where no mask value is read on the host, i.e. what pruned BERTs run on CUDA), batch 64, (D_qk, D_v) in {(64,64), (40,52), (23,37), (13,64), (64,17)},
and of Swin-T's first stage (H=3, N=49 tokens per 7x7 window, 64 windows per image, batch 64
images, the same width fractions of its 32-wide heads) with its relative position bias plus
shifted-window mask as the additive bias (64, 3, 49, 49): our op reads it per window, SDPA gets
it tiled to all B·64 windows, as timm builds it (the tiling timed). Forward (``fwd_ms``) and
forward+backward (``fwd_bwd_ms``), median of repeats (CUDA events on GPUs).
Providers: ``spp_triton`` (spp_kernels.triton.attention.attention, CUDA only: interpreter timings
on CPU mean nothing), ``spp_ext`` (CPU only, where the extension is built: its attention, which
pruned layers run on CPUs — the fused forward kernel, the chunked route's backward),
``spp_cpu`` (CPU only: the op's torch backend, ``reference.sdpa_attention``), ``sdpa_same`` (F.scaled_dot_product_attention on the pruned widths as they
are), ``sdpa_padded`` (q, k, v zero-padded to one common width, the next multiple of 8 of
max(D, Dv) — zero channels change neither q·k nor the kept outputs — padding and slicing timed).

    .venv/bin/python benchmarks/bench_attention.py [--quick] [--dtype bf16|fp16|fp32] [--repeats 20]

Rows (op, provider, dtype, shape, metric, value, device) go to
benchmarks/results/attention_<cuda|cpu>.csv.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# name -> (heads, tokens, windows per image: > 0 adds Swin's (windows, heads, N, N) bias, key
# padding: a right-padded text batch, each row's length drawn uniformly from 8..N, given as (B, M)
# key padding (True) or as a materialised (B, 1, N, N) bool mask ("mask"))
MODELS = {"deit_s": (6, 197, 0, False), "deit_b": (12, 197, 0, False), "bert_base": (12, 128, 0, False),
          "bert_base_padded": (12, 128, 0, True), "bert_base_padded_mask": (12, 128, 0, "mask"),
          "swin_t": (3, 49, 64, False)}
WIDTHS = [(64, 64), (40, 52), (23, 37), (13, 64), (64, 17)]
SWIN_WIDTHS = [(32, 32), (20, 26), (12, 19), (7, 32), (32, 9)]  # the same fractions of Swin-T's 32-wide heads
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _tiled(bias, B):
    """SDPA's float mask for a (windows, H, N, N) bias: tiled to every window of the batch."""
    if bias is None:
        return None
    from spp_kernels.reference import tile_bias

    return tile_bias(bias, B)


def _sdpa_mask(keep, bias, B):
    """SDPA's mask: the key padding (B, M) as a bool (B, 1, 1, M) one, a 4-D bool mask as it is, or
    the tiled bias (never both here)."""
    if keep is not None:
        return keep if keep.dim() == 4 else keep[:, None, None, :]
    return _tiled(bias, B)


def sdpa_same(q, k, v, scale, keep=None, bias=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_sdpa_mask(keep, bias, q.shape[0]), scale=scale)


def sdpa_padded(q, k, v, scale, keep=None, bias=None):
    D, Dv = q.shape[-1], v.shape[-1]
    w = 8 * math.ceil(max(D, Dv) / 8)
    q, k, v = F.pad(q, (0, w - D)), F.pad(k, (0, w - D)), F.pad(v, (0, w - Dv))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_sdpa_mask(keep, bias, q.shape[0]), scale=scale)[..., :Dv]


def ours(fn):
    """Our op's call: the mask as it is ((B, M) key padding or 4-D), the bias as its keyword (None:
    as without)."""
    return lambda q, k, v, scale, keep=None, bias=None: (fn(q, k, v, scale, keep, bias=bias) if bias is not None
                                                         else fn(q, k, v, scale, keep))


def _time_once_ms(fn, device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def swin_bias(windows, H, N, g):
    """A (windows, H, N, N) bias like Swin's: relative position values plus a -100 block in the
    shifted windows' mask (every other window here)."""
    bias = torch.randn(windows, H, N, N, generator=g) * 0.5
    bias[1::2, :, : N // 2, N // 2:] -= 100.0
    return bias


def closures(fn, B, H, N, D, Dv, dtype, device, windows=0, padded=False):
    """{metric: callable} for one provider on fresh seeded inputs (B = images; with windows > 0,
    B · windows windows of N tokens and a (windows, H, N, N) bias; ``padded``: a (B, N) key padding
    keeping each row's first 8..N keys, lengths drawn uniformly, seeded; "mask": the same padding
    as a materialised (B, 1, N, N) bool mask)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    bias = swin_bias(windows, H, N, g).to(device, dtype) if windows else None
    keep = None
    if padded:
        lengths = torch.randint(min(8, N), N + 1, (B,), generator=g)
        keep = (torch.arange(N)[None, :] < lengths[:, None]).to(device)
        if padded == "mask":
            keep = keep[:, None, None, :].expand(B, 1, N, N).contiguous()
    B = B * windows if windows else B
    q = torch.randn(B, H, N, D, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(B, H, N, D, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(B, H, N, Dv, generator=g).to(device, dtype).requires_grad_()
    do = torch.randn(B, H, N, Dv, generator=g).to(device, dtype)
    scale = 1 / math.sqrt(64)  # the original model's scale

    def fwd():
        with torch.no_grad():
            fn(q, k, v, scale, keep, bias)

    def fwd_bwd():
        out = fn(q, k, v, scale, keep, bias)
        torch.autograd.grad(out, (q, k, v), do)

    return {"fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd}


def measure_side_by_side(providers: dict, B, H, N, D, Dv, dtype, device, repeats, warmup=3, windows=0,
                         padded=False) -> dict:
    """{provider: {metric: median ms}}; providers alternate within every repeat so that machine
    noise hits them alike (SPEC §6: ratios measured side by side)."""
    runs = {name: closures(fn, B, H, N, D, Dv, dtype, device, windows, padded) for name, fn in providers.items()}
    times = {name: {m: [] for m in c} for name, c in runs.items()}
    for metric in ("fwd_ms", "fwd_bwd_ms"):
        for i in range(warmup + repeats):
            for name, c in runs.items():
                t = _time_once_ms(c[metric], device)
                if i >= warmup:
                    times[name][metric].append(t)
    return {name: {m: statistics.median(ts) for m, ts in d.items()} for name, d in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: batch 4, two models, 5 repeats (< 1 min)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None, help="default: all")
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/attention_<device>.csv)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    models = dict(MODELS)
    batch, repeats = 64, 20
    if args.quick:
        batch, repeats = 4, 5
        models = {m: MODELS[m] for m in ("deit_s", "bert_base", "swin_t")}
    if args.models:
        models = {m: MODELS[m] for m in args.models}
    batch = args.batch or batch
    repeats = args.repeats or repeats

    providers = {"sdpa_same": sdpa_same, "sdpa_padded": sdpa_padded}
    if device.type == "cuda":
        from spp_kernels.triton import attention as tri

        providers = {"spp_triton": ours(tri.attention), **providers}
    else:
        from spp_kernels import reference

        providers = {"spp_cpu": ours(reference.sdpa_attention), **providers}
        from spp_kernels import _ext

        if _ext.available and getattr(_ext._C, "attention_cpu", 0):
            from spp_kernels import ext_ops

            providers = {"spp_ext": ours(ext_ops.attention), **providers}
        print("CPU: skipping the spp_triton rows (only Triton's interpreter runs on CPU; its timings mean "
              "nothing). spp_ext is the extension's op that pruned layers use on CPUs where it is built (a "
              "fused forward); spp_cpu the torch backend (chunked GEMM-softmax-GEMM at the pruned widths in "
              "fp32 where it applies, with its own backward; else SDPA).")

    dev_name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    out_path = args.out or os.path.join(os.path.dirname(__file__), "results", f"attention_{device.type}.csv")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    rows = []
    t_start = time.perf_counter()
    for model, (H, N, windows, padded) in models.items():
        for D, Dv in (SWIN_WIDTHS if windows else WIDTHS):
            shape = (f"{model} B={batch} H={H} N={N} D={D} Dv={Dv}" + (f" windows={windows} bias" if windows else "")
                     + {False: "", True: " key padding", "mask": " padding as (B,1,N,N) mask"}[padded])
            res = measure_side_by_side(providers, batch, H, N, D, Dv, dtype, device, repeats, windows=windows,
                                       padded=padded)
            for name in res:
                for metric, value in res[name].items():
                    rows.append(("attention", name, dtype_name, shape, metric, f"{value:.4f}", dev_name))
            base = res["sdpa_same"]
            for name in res:
                if name != "sdpa_same":
                    for metric in base:
                        rows.append(("attention", f"{name}/sdpa_same", dtype_name, shape, f"{metric}_speedup",
                                     f"{base[metric] / res[name][metric]:.3f}", dev_name))
            line = "  ".join(f"{n}: fwd {r['fwd_ms']:.3f} ms, fwd+bwd {r['fwd_bwd_ms']:.3f} ms" for n, r in res.items())
            print(f"{shape:40s} {line}")
    with open(out_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("op", "provider", "dtype", "shape", "metric", "value", "device"))
        w.writerows(rows)
    print(f"{len(rows)} rows -> {out_path} ({time.perf_counter() - t_start:.1f} s)")


if __name__ == "__main__":
    main()
