"""Peak memory and time of search steps on a Llama-2-7B-shaped decoder (random bf16 weights), with
and without activation checkpointing, to set against the computed figures of docs/memory.md.

    python benchmarks/search_memory.py                    # CUDA: 7B shape, B x N in 1x2048, 4x2048
    python benchmarks/search_memory.py --tiny             # any device: a 2-layer toy (checks the script)

Each configuration first runs a one-step search (compilation and autotuning stay out of the
figures), then ``spp.search`` for ``--steps`` steps on one batch (the teacher's output cached,
``loss_scale`` fixed so no calibration pass) after resetting the peak-memory counter; the row
reports the peak allocated memory during that search, the weights' bytes, and the seconds per
step of steps 2..n. Rows are appended as they are measured.
Rows: model, device, dtype, batch, seq, checkpointing, weights_gb, peak_gb, s_per_step.
"""
from __future__ import annotations

import argparse
import csv
import gc
import os
import time
import warnings

import torch

import spp

FIELDS = ("model", "device", "dtype", "batch", "seq", "checkpointing", "weights_gb", "peak_gb", "s_per_step")


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    import transformers

    if tiny:
        cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                       attn_implementation="sdpa")
    else:  # Llama-2-7B's shape
        cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                       max_position_embeddings=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(cfg, torch_dtype=dtype)
    return model.eval(), cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--shapes", nargs="+", default=None, help="BxN, e.g. 1x2048 4x2048 (default: 1x2048 4x2048; "
                    "tiny: 2x64)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None, help="CSV (default benchmarks/results/search_memory_<device>.csv)")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not a.tiny:
        raise SystemExit("the 7B shape needs a CUDA device; use --tiny to check the script on a CPU")
    dtype = torch.bfloat16
    shapes = a.shapes or (["2x64"] if a.tiny else ["1x2048", "4x2048"])
    model, cfg = build(a.tiny, device, dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    handle = spp.attach(model)
    name = "llama-tiny" if a.tiny else "llama-2-7b-shape"
    label = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out = os.path.abspath(a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                f"search_memory_{device.type}.csv"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", newline="") as fh:
        csv.DictWriter(fh, fieldnames=FIELDS).writeheader()

    def search(batch, steps, ck, timer=None):
        with warnings.catch_warnings():  # a few-step path is degenerate by design: not the point here
            warnings.simplefilter("ignore", RuntimeWarning)
            spp.search(handle, [batch], steps=steps, progress=False, loss_scale=1.0, checkpointing=ck, callback=timer)

    for shape in shapes:
        B, N = (int(v) for v in shape.lower().split("x"))
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1, cfg.vocab_size, (B, N), generator=g)
        batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        for ck in (False, True):
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            ok = True
            try:
                search(batch, 1, ck)  # warm-up: kernel compilation / autotuning stay out of the timing
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                stamps = []

                def timer(t, loss, h):  # time steps 2..n (step 1 also runs the teacher and fills its cache)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    stamps.append(time.perf_counter())

                search(batch, a.steps, ck, timer)
            except torch.OutOfMemoryError:
                ok = False
            dt = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if ok and len(stamps) > 1 else float("nan")
            peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" and ok else float("nan")
            row = dict(model=name, device=label, dtype="bf16", batch=B, seq=N, checkpointing=ck,
                       weights_gb=f"{weights:.3f}", peak_gb=f"{peak:.3f}" if ok else "OOM",
                       s_per_step=f"{dt:.3f}" if ok else "nan")
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            with open(out, "a", newline="") as fh:  # row by row: a stage cut short keeps what it measured
                csv.DictWriter(fh, fieldnames=FIELDS).writerow(row)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
