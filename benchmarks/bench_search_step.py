"""One search step of the demo's MiniLM (student forward, backward to the masks, the inclusion
update over every mask) with each backend that can serve this device, side by side in one run:
``SPP_BACKEND=torch`` (the reference ops) against ``ext`` (the compiled extension) and, on CUDA,
``triton``. The teacher's outputs are cached, as in a search over a list of batches.

    python benchmarks/bench_search_step.py [--quick] [--device cpu|cuda] [--batch 8] [--seq 64] [--out CSV]

Rows: op=search_step, provider=<backend>, metric=ms_per_step and speedup_vs_torch.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, device_label, sync, write_rows  # noqa: E402

import spp  # noqa: E402
import spp_kernels  # noqa: E402
from spp.embedded import load_minilm, stdlib_sentences  # noqa: E402
from spp.search import distill_loss  # noqa: E402


def step_fn(handle, batch, teacher, t_box):
    """A closure running one search step (the same arithmetic as spp.search's loop)."""
    arena, net, adapter = handle.arena, handle.model, handle.adapter

    def step():
        t_box[0] += 1
        arena.m.grad = None
        out, w = adapter.forward(net, batch)
        distill_loss(out, teacher[0], teacher[1]).backward()
        spp_kernels.inclusion_step(arena.m.data, arena.m.grad, arena.exp_avg, arena.exp_avg_sq, arena.z, arena.gamma,
                                   arena.entry, arena.support_count, t_box[0], lr=1e-3, lam=3.0)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per sample (default 5; quick 2)")
    ap.add_argument("--repeats", type=int, default=None, help="samples per backend, interleaved (default 5; quick 2)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="CSV (default benchmarks/results/kernels_<device>.csv)")
    a = ap.parse_args()
    a.out = a.out or os.path.join(RESULTS, f"kernels_{a.device}.csv")
    steps = a.steps or (2 if a.quick else 5)
    repeats = a.repeats or (2 if a.quick else 5)
    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device")

    model, tok = load_minilm()
    model = model.to(dev).eval()
    handle = spp.attach(model)
    for p in model.parameters():
        p.requires_grad_(False)
    sents = stdlib_sentences()[: a.batch]
    batch = {k: v.to(dev) for k, v in tok(sents, padding="max_length", truncation=True, max_length=a.seq,
                                          return_tensors="pt").items()}
    with torch.no_grad(), handle.dense():
        out, w = handle.adapter.forward(model, batch)
    teacher = (out.detach(), w)

    backends = ["torch"]
    for b in ("ext", "triton"):
        why = spp_kernels.dispatch._why_not("inclusion_step", b, dev)
        if why is None:
            backends.append(b)
        else:
            print(f"skip {b}: {why}")
    state0 = {n: getattr(handle.arena, n).detach().clone() for n in ("m", "exp_avg", "exp_avg_sq", "z", "gamma",
                                                                    "entry", "support_count")}
    samples = {b: [] for b in backends}
    t_box = [0]
    step = step_fn(handle, batch, teacher, t_box)
    old = os.environ.get("SPP_BACKEND")
    try:
        for r in range(repeats + 1):  # round 0 warms up every backend
            for b in backends:
                os.environ["SPP_BACKEND"] = b
                with torch.no_grad():
                    for n, v in state0.items():
                        getattr(handle.arena, n).copy_(v)
                t_box[0] = 0
                step()
                sync(dev)
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                sync(dev)
                if r:
                    samples[b].append((time.perf_counter() - t0) / steps)
    finally:
        if old is None:
            os.environ.pop("SPP_BACKEND", None)
        else:
            os.environ["SPP_BACKEND"] = old
    label = device_label(dev)
    shape = f"minilm,batch={a.batch},seq={a.seq}"
    base = statistics.median(samples["torch"])
    rows = []
    served = {b: sorted(op for op in spp_kernels.dispatch.OPS if spp_kernels.dispatch._why_not(op, b, dev) is None)
              for b in backends}
    for b in backends:
        ms = statistics.median(samples[b]) * 1e3
        # a backend serves only the ops it has for this device; the dispatcher gives the rest to torch
        label_b = b if b == "torch" or len(served[b]) == len(spp_kernels.dispatch.OPS) else f"{b}({'+'.join(served[b])})"
        rows.append(dict(op="search_step", provider=label_b, dtype="fp32", shape=shape, metric="ms_per_step",
                         value=f"{ms:.4g}", device=label))
        rows.append(dict(op="search_step", provider=label_b, dtype="fp32", shape=shape, metric="speedup_vs_torch",
                         value=f"{base * 1e3 / ms:.4g}", device=label))
        print(f"{label_b:8s} {ms:8.2f} ms/step  {base * 1e3 / ms:5.2f}x torch  ({label})")
    write_rows(rows, a.out, replace_ops=("search_step",))


if __name__ == "__main__":
    main()
