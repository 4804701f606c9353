"""Is the pruned model faster? Dense vs physically pruned throughput, measured side by side.

For each model, kept-FLOPs target (0.7 / 0.5 / 0.3), ``round_to`` (1 and 8) and batch (1 and 64):
the FLOPs ratio counted by FlopCounterMode (SDPA's math kernel, so attention is counted), the
ideal speed-up 1 / FLOPs ratio, the measured speed-up (median of interleaved repeats, dense and
pruned alternating) and the efficiency = measured / ideal.

Models: ``minilm`` — the real all-MiniLM-L6-v2 with an SPP path searched here (CPU); and random-
weight ``deit_s``, ``deit_b``, ``bert_base``, ``llama`` stacks whose widths come from a magnitude
ranking (speed depends on the widths only; these are meant for a GPU run).

    .venv/bin/python benchmarks/bench_pruned_vs_dense.py [--models minilm] [--batches 1 64] [--quick]

Rows go to benchmarks/results/pruned_vs_dense_<device>.csv (and a PNG beside it).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import spp  # noqa: E402

FIELDS = ("model", "device", "dtype", "threads", "batch", "seq", "target_flops", "round_to", "flops_ratio",
          "params_ratio", "dense_per_s", "pruned_per_s", "speedup", "ideal_speedup", "efficiency", "widths")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {model}"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def count_flops(model, inputs) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        _call(model, inputs)
    return fc.get_total_flops()


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


@torch.no_grad()
def side_by_side(models: dict, inputs, repeats: int, device) -> dict:
    """Seconds per call of each model: median of ``repeats`` rounds, the models alternating."""
    for m in models.values():  # warm-up (allocator, kernels, caches)
        _call(m, inputs)
        _call(m, inputs)
    times = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            _sync(device)
            t = time.perf_counter()
            _call(m, inputs)
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def build(name: str, device, dtype):
    """(model, make_inputs(batch) -> inputs, seq, path maker(handle) -> SolutionPath)."""
    if name == "minilm":
        from spp import embedded

        model, tok = embedded.load_minilm()
        sents = embedded.stdlib_sentences()

        def inputs(batch, seq=128):
            enc = tok(sents[:batch], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
            return {k: enc[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids")}

        def make_path(handle):
            train, _ = embedded.split_by_hash(sents)
            data = embedded.batches(tok, train[:256], 8, 64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return spp.search(handle, data, steps=120, progress=False)

        return model.to(device, dtype).eval(), inputs, 128, make_path
    from spp.baselines import magnitude_path

    if name in ("deit_s", "deit_b"):
        import timm

        model = timm.create_model("deit_small_patch16_224" if name == "deit_s" else "deit_base_patch16_224",
                                  pretrained=False)
        return model.to(device, dtype).eval(), lambda b: torch.randn(b, 3, 224, 224, device=device, dtype=dtype), 197, \
            magnitude_path
    if name == "bert_base":
        import transformers

        cfg = transformers.BertConfig()  # bert-base-uncased shapes
        model = transformers.BertModel(cfg, add_pooling_layer=False)

        def inputs(batch, seq=128):
            ids = torch.randint(1000, 20000, (batch, seq), device=device)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        return model.to(device, dtype).eval(), inputs, 128, magnitude_path
    if name == "llama":
        import transformers

        cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=8,
                                       num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)

        def inputs(batch, seq=128):
            ids = torch.randint(100, 30000, (batch, seq), device=device)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        model = transformers.LlamaModel(cfg)
        return model.to(device, dtype).eval(), inputs, 128, magnitude_path
    raise SystemExit(f"unknown model {name!r}")


def run_model(name, args, device, dtype, rows):
    model, inputs, seq, make_path = build(name, device, dtype)
    try:
        handle = spp.attach(model, seq_len=seq)
    except ValueError as exc:
        print(f"{name}: skipped ({exc})", flush=True)
        return
    t = time.time()
    path = make_path(handle)
    print(f"{name}: path in {time.time() - t:.1f} s", flush=True)
    spp.detach(model)  # the dense model runs its own, unmasked modules
    dense_flops = count_flops(model, inputs(1))
    dense_params = sum(p.numel() for p in model.parameters())
    for target in args.flops:
        for round_to in args.round_to:
            masks = path.masks(flops=target, round_to=round_to)
            small = spp.prune(model, masks).eval()
            ratio = count_flops(small, inputs(1)) / dense_flops
            params_ratio = sum(p.numel() for p in small.parameters()) / dense_params
            for batch in args.batches:
                x = inputs(batch)
                sec = side_by_side({"dense": model, "pruned": small}, x, args.repeats, device)
                speed = sec["dense"] / sec["pruned"]
                rows.append({
                    "model": name, "device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
                    "threads": torch.get_num_threads(), "batch": batch, "seq": seq, "target_flops": target,
                    "round_to": round_to, "flops_ratio": round(ratio, 4), "params_ratio": round(params_ratio, 4),
                    "dense_per_s": round(batch / sec["dense"], 3), "pruned_per_s": round(batch / sec["pruned"], 3),
                    "speedup": round(speed, 3), "ideal_speedup": round(1 / ratio, 3),
                    "efficiency": round(speed * ratio, 3),
                    "widths": " ".join(str(w) for w in masks.widths().values())})
                print(f"{name} flops {target} round_to {round_to} batch {batch}: FLOPs ratio {ratio:.3f}, "
                      f"speed-up {speed:.2f}x of ideal {1 / ratio:.2f}x -> {speed * ratio:.2f}", flush=True)
            del small


def plot(rows, out_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch"], r["round_to"]), []).append(r)
    for (model, batch, rt), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["ideal_speedup"])
        ax.plot([r["ideal_speedup"] for r in rs], [r["speedup"] for r in rs], marker="o",
                label=f"{model} batch {batch} round_to {rt}")
    top = max([r["ideal_speedup"] for r in rows] + [1.0])
    ax.plot([1, top], [1, top], "k:", label="ideal")
    ax.plot([1, top], [0.9, 0.9 * top], "k--", lw=0.7, label="0.9 of ideal")
    ax.set_xlabel("ideal speed-up (1 / FLOPs ratio)")
    ax.set_ylabel("measured speed-up vs dense")
    ax.set_title(rows[0]["device"] if rows else "")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None, help="minilm deit_s deit_b bert_base llama "
                    "(default: minilm on CPU, all on CUDA)")
    ap.add_argument("--flops", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    ap.add_argument("--round-to", nargs="+", type=int, default=None, help="default: 1 8")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--quick", action="store_true", help="one target, batch 1, 3 repeats")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    args.round_to = args.round_to or [1, 8]
    if args.quick:
        args.flops, args.batches, args.repeats, args.round_to = [0.5], [1], 3, [1]
    models = args.models or (["minilm"] if device.type == "cpu" else ["minilm", "deit_s", "deit_b", "bert_base", "llama"])
    rows = []
    for name in models:
        run_model(name, args, device, dtype, rows)
    os.makedirs(args.out, exist_ok=True)
    tag = "cuda" if device.type == "cuda" else "cpu"
    path = os.path.join(args.out, f"pruned_vs_dense_{tag}.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    if rows:
        plot(rows, path[:-4] + ".png")
    print(f"wrote {path}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
