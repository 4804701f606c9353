"""Is the pruned model faster? Dense vs physically pruned throughput, measured side by side.

For each model, kept-FLOPs target (0.7 / 0.5 / 0.3), ``round_to`` (1 and 8) and batch (1 and 64):
the FLOPs ratio counted by FlopCounterMode (SDPA's math kernel, so attention is counted), the
ideal speed-up 1 / FLOPs ratio, the measured speed-up (medians over rounds in which the models
take turns, each turn ``--burst`` consecutive calls timed after the first: steady state, as a
model served on its own runs) and the efficiency = measured / ideal; also, timed in the same rounds, the
model at full width and the skeleton through the pruned model's layers (column
``efficiency_vs_full_width`` measures pruning alone: on x86 CPUs those layers run their products
on oneDNN, column ``linear``, while the dense model keeps ``F.linear``; see spp/bench.py).

Models: ``minilm`` — the real all-MiniLM-L6-v2 with an SPP path searched here (CPU); and random-
weight ``deit_s``, ``deit_b``, ``bert_base``, ``llama`` stacks whose widths come from a magnitude
ranking (speed depends on the widths only; these are meant for a GPU run).

    .venv/bin/python benchmarks/bench_pruned_vs_dense.py [--models minilm] [--batches 1 64] [--quick]

Rows go to benchmarks/results/pruned_vs_dense_<device>.csv (and a PNG beside it). ``--compile``
runs every model under torch.compile (Inductor by default; each model and batch shape compiles in
its untimed warm-up calls) and writes pruned_vs_dense_<device>_compiled.csv.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import spp  # noqa: E402
from spp import bench, latency  # noqa: E402



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
    table = None
    if args.latency:
        table = latency.profile(model, batch=max(args.batches), seq=seq, repeats=args.repeats)
        print(f"{name}: latency table measured at batch {max(args.batches)}", flush=True)
    spp.detach(model)  # the dense model runs its own, unmasked modules
    rows += bench.pruned_vs_dense(model, path, inputs, name=name, seq=seq, flops=args.flops, round_to=args.round_to,
                                  batches=args.batches, repeats=args.repeats, burst=args.burst, latency_table=table,
                                  latency=args.latency or (), references=not args.no_references,
                                  compile=args.compile)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None, help="minilm deit_s deit_b bert_base llama "
                    "(default: minilm on CPU, all on CUDA)")
    ap.add_argument("--flops", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    ap.add_argument("--round-to", nargs="+", type=int, default=None, help="default: 1 8")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--burst", type=int, default=bench.BURST,
                    help="calls per model turn, the first untimed (1: single interleaved calls, caches cold)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--latency", nargs="*", type=float, default=None,
                    help="also latency targets (a table is profiled first at the largest batch)")
    ap.add_argument("--quick", action="store_true", help="one target, batch 1, 3 repeats")
    ap.add_argument("--no-references", action="store_true",
                    help="time dense and pruned only, not also the full-width model and the skeleton (about half "
                    "the time; the vs-full-width and proportional columns stay empty)")
    ap.add_argument("--malloc", choices=("retain", "default"), default="retain",
                    help="retain (default): glibc keeps freed memory, so neither model pays page faults per "
                    "forward; default: the C library as it comes (see spp.bench.retain_freed_memory)")
    ap.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                    help="run every model (dense, pruned, references) under torch.compile with this backend "
                    "(default inductor); results go to pruned_vs_dense_<device>_compiled.csv")
    args = ap.parse_args()
    if args.malloc == "retain" and not bench.retain_freed_memory():
        print(f"--malloc retain: the C library refused (malloc column: {bench.malloc_setting()})", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    args.round_to = args.round_to or [1, 8]
    if args.quick:
        args.flops, args.batches, args.repeats, args.round_to = [0.5], [1], 3, [1]
    models = args.models or (["minilm"] if device.type == "cpu" else ["minilm", "deit_s", "deit_b", "bert_base", "llama"])
    rows = []
    tag = "cuda" if device.type == "cuda" else "cpu"
    path = os.path.join(args.out, f"pruned_vs_dense_{tag}{'_compiled' if args.compile else ''}.csv")
    failed = []
    for name in models:
        try:
            run_model(name, args, device, dtype, rows)
        except Exception as exc:  # noqa: BLE001  (a missing package or model: the other models still run)
            failed.append(name)
            print(f"{name}: failed ({type(exc).__name__}: {exc})", flush=True)
        bench.write_csv(rows, path)  # after every model: a run cut short keeps what it measured
    if rows:
        bench.plot(rows, path[:-4] + ".png")
    print(f"wrote {path}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
