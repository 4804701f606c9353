"""Eager vs torch.compile, side by side: the dense MiniLM, the model at full width through the
pruned layers, and the pruned models, each timed eager and compiled in the same rounds.

The question a deployment asks: does compiling a pruned model pay, and does it keep what pruning
gained? Each compiled model is ``torch.compile(m, backend=…, dynamic=False)``, compiled in its
untimed warm-up calls (the compile time is reported separately); the timing is
``spp.bench.side_by_side`` (models take turns, medians of the calls after the first of each
turn). Also checks that the compiled pruned model agrees with the eager one.

    .venv/bin/python benchmarks/bench_compile.py [--flops 0.7 0.5 0.3] [--batches 1 64] [--repeats 11]
    .venv/bin/python benchmarks/bench_compile.py --option realize_opcount_threshold=0

Rows go to benchmarks/results/compile_<device>.csv, or with ``--option`` (Inductor settings for
these compilations only, ``torch.compile(options=…)``) to compile_<device>_<key>.csv.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import spp  # noqa: E402
from spp import bench  # noqa: E402
from spp.prune import prune  # noqa: E402

FIELDS = ("model", "device", "dtype", "threads", "batch", "seq", "variant", "flops_ratio", "backend", "options",
          "eager_per_s",
          "compiled_per_s", "compiled_vs_eager", "compile_s", "max_abs_diff", "linear", "malloc")


def main():
    from bench_pruned_vs_dense import build

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flops", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="an Inductor setting for these compilations (a Python literal value), repeatable")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    import ast

    options = {k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in args.option)}
    bench.retain_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, inputs, seq, make_path = build("minilm", device, dtype)
    handle = spp.attach(model, seq_len=seq)
    path = make_path(handle)
    spp.detach(model)
    import torch._dynamo as dynamo

    for knob in ("recompile_limit", "cache_size_limit"):  # (the name changed across torch versions)
        if hasattr(dynamo.config, knob):
            setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 256))
    dense_flops = bench.count_flops(model, inputs(1))
    variants = {"dense": model, "full_width": prune(model, path.masks(keep=1.0, round_to=1)).eval()}
    for f in args.flops:
        variants[f"flops={f:g}"] = prune(model, path.masks(flops=f, round_to=1)).eval()
    ratios = {k: bench.count_flops(m, inputs(1)) / dense_flops for k, m in variants.items()}
    rows = []
    tag = "cuda" if device.type == "cuda" else "cpu"
    out = os.path.join(args.out, f"compile_{tag}{''.join('_' + k for k in options)}.csv")
    for b in args.batches:
        x = inputs(b)
        models, compile_s, diff = {}, {}, {}
        for k, m in variants.items():
            c = torch.compile(m, backend=args.backend, dynamic=False, options=options or None)
            with torch.no_grad():
                t = time.perf_counter()
                got = bench.call(c, x).last_hidden_state
                compile_s[k] = time.perf_counter() - t
                diff[k] = float((got - bench.call(m, x).last_hidden_state).abs().max())
            models[k], models[k + " compiled"] = m, c
        sec = bench.side_by_side(models, x, args.repeats)
        for k in variants:
            rows.append({"model": "minilm", "device": bench.device_name(device), "dtype": str(dtype).replace("torch.", ""),
                         "threads": torch.get_num_threads(), "batch": b, "seq": seq, "variant": k,
                         "flops_ratio": round(ratios[k], 4), "backend": args.backend,
                         "options": " ".join(f"{a}={b}" for a, b in options.items()),
                         "eager_per_s": round(b / sec[k], 3), "compiled_per_s": round(b / sec[k + " compiled"], 3),
                         "compiled_vs_eager": round(sec[k] / sec[k + " compiled"], 3),
                         "compile_s": round(compile_s[k], 1), "max_abs_diff": f"{diff[k]:.2e}",
                         "linear": bench.linear_setting(device, dtype), "malloc": bench.malloc_setting()})
            r = rows[-1]
            print(f"batch {b} {k}: eager {r['eager_per_s']}/s, compiled {r['compiled_per_s']}/s "
                  f"({r['compiled_vs_eager']}x; compiled in {r['compile_s']} s; max |diff| {r['max_abs_diff']})",
                  flush=True)
        import csv

        os.makedirs(args.out, exist_ok=True)
        with open(out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
