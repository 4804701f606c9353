"""The ``spp`` command line: demo, search, prune, info.

Errors in the input end the command with a one-line message and exit status 2 (no traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional


def _check_model_spec(spec: str) -> str:
    if spec != "minilm" and not os.path.isdir(spec):
        raise FileNotFoundError(f"--model: {spec!r} is neither 'minilm' nor a model folder")
    return spec


def _load_text_model(spec: str):
    """``minilm`` (the embedded model) or a folder with a Hugging Face BERT checkpoint."""
    from . import embedded

    if _check_model_spec(spec) == "minilm":
        return embedded.load_minilm()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(spec, local_files_only=True).eval(), AutoTokenizer.from_pretrained(spec, local_files_only=True)


def _sentences(text: Optional[str]) -> list[str]:
    from . import embedded

    if text is None:
        return embedded.split_by_hash(embedded.stdlib_sentences())[0]
    if not os.path.isfile(text):
        raise FileNotFoundError(f"--text: no such file {text!r}")
    with open(text, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    if not lines:
        raise ValueError(f"--text: {text!r} holds no sentences")
    return lines


def cmd_demo(a) -> int:
    from .demo import DemoConfig, main

    cfg = DemoConfig(out=a.out, steps=a.steps, progress=not a.no_progress)
    if a.quick:
        cfg.train_sentences, cfg.heldout_sentences, cfg.bench_repeats, cfg.bench_batch = 64, 64, 1, 4
    return main(cfg)


def cmd_search(a) -> int:
    from . import distributed

    with distributed.from_env() as group:  # under torchrun: one rank per process, the same batches on each
        return _search(a, group)


def _search(a, group) -> int:
    from . import embedded
    from .handle import attach
    from .io import prepare_output_dir
    from .search import search

    # bad inputs fail before anything is created, and before the model is loaded rather than after the search
    _check_model_spec(a.model)
    sents = _sentences(a.text)[: a.sentences]
    ckpt_dir = a.checkpoint_dir or os.path.join(a.out, "checkpoint")
    if group.is_main:
        prepare_output_dir(a.out, "--out")
        ckpt_dir = prepare_output_dir(ckpt_dir, "--checkpoint-dir")
    group.barrier()
    model, tok = _load_text_model(a.model)
    data = embedded.batches(tok, sents, a.batch_size, a.max_length)
    if not data:
        raise ValueError(f"--batch-size {a.batch_size} exceeds the {len(sents)} sentences available")
    handle = attach(model)
    path = search(handle, data, steps=a.steps, progress=not a.no_progress, seed=a.seed, checkpoint_dir=ckpt_dir,
                  checkpoint_every=a.checkpoint_every, resume=a.resume, max_nonfinite_steps=a.max_nonfinite_steps,
                  checkpointing=a.activation_checkpointing)
    if not group.is_main:
        return 0
    path.save(a.out)
    d = path.diagnostics()
    print(f"path written to {a.out}: {d['fraction_entered'] * 100:.1f} % of {d['units']} units entered at "
          f"{d['distinct_entry_steps']} distinct steps" + (f"; DEGENERATE: {d['why']}" if d["degenerate"] else ""))
    return 0


def cmd_prune(a) -> int:
    from .handle import attach
    from .path import SolutionPath
    from .prune import prune, save_pruned

    path = SolutionPath.load(a.path)
    model, tok = _load_text_model(a.model)
    target = {k: v for k, v in (("keep", a.keep), ("params", a.params), ("flops", a.flops), ("latency", a.latency))
              if v is not None}
    if (a.latency is None) != (a.latency_table is None):
        raise ValueError("--latency and --latency-table go together")
    if a.latency_table is not None:
        from .latency import LatencyTable

        target["table"] = LatencyTable.load(a.latency_table)
    masks = path.masks(**target, round_to=a.round_to, min_keep=a.min_keep)
    handle = attach(model)
    small = prune(handle.model, masks)
    save_pruned(small, a.out)
    tok.save_pretrained(a.out)
    s = masks.summary()
    print(f"pruned model written to {a.out}: {s['params_kept_fraction']:.3f} of pair params, "
          f"{s['flops_kept_fraction']:.3f} of pair FLOPs kept")
    return 0


def _heldout(text: Optional[str], limit: int) -> list[str]:
    from . import embedded

    if text is None:
        return embedded.split_by_hash(embedded.stdlib_sentences())[1][:limit]
    return _sentences(text)[:limit]


def _load_pruned_dir(d: str):
    from transformers import AutoTokenizer

    from .prune import load_pruned

    model = load_pruned(d)
    try:
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    except (OSError, ValueError):
        tok = None
    return model, tok


def cmd_finetune(a) -> int:
    from . import embedded
    from .finetune import evaluate_distill, finetune
    from .prune import save_pruned

    teacher, tok = _load_text_model(a.model)
    small, _ = _load_pruned_dir(a.pruned)
    sents = _sentences(a.text)[: a.sentences]
    data = embedded.batches(tok, sents, a.batch_size, a.max_length)
    if len(data) < 2:
        raise ValueError(f"--sentences/--batch-size leave {len(data)} batches; need at least 2 (one held out)")
    held, train = data[: max(1, len(data) // 10)], data[max(1, len(data) // 10):]
    before = evaluate_distill(small, held, teacher)
    finetune(small, train, teacher, steps=a.steps, lr=a.lr, progress=not a.no_progress, seed=a.seed,
             checkpoint_dir=a.out, checkpoint_every=a.checkpoint_every or a.steps)
    after = evaluate_distill(small, held, teacher)
    save_pruned(small, a.out)
    tok.save_pretrained(a.out)
    print(f"fine-tuned model written to {a.out}: held-out distillation loss {before:.4g} -> {after:.4g}")
    return 0


def cmd_eval(a) -> int:
    import torch

    from . import embedded
    from .evaluate import classifier_metrics, embedding_metrics, paraphrase_stability, plot_quality, throughput, write_rows

    if a.sweep is not None:
        return _eval_sweep(a)
    dense, tok = _load_text_model(a.model) if a.labelled is None else _load_classifier(a.model)
    models = {}
    for d in a.pruned:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"--pruned: no such folder {d!r}")
        models[os.path.basename(os.path.normpath(d))] = (_load_pruned_dir(d)[0], d)
    rows = []
    if a.labelled is None:
        held = _heldout(a.text, a.sentences)
        if len(held) < 2:
            raise ValueError("--text: need at least 2 held-out sentences")
        dense_emb = embedded.embed(dense, tok, held)
        para = held[:64]
        dense_para = paraphrase_stability(lambda s: embedded.embed(dense, tok, s), para)
        for name, (m, d) in models.items():
            q = embedding_metrics(embedded.embed(m, tok, held), dense_emb, k=10)
            q["paraphrase_stability"] = paraphrase_stability(lambda s: embedded.embed(m, tok, s), para)
            q["dense_paraphrase_stability"] = dense_para
            rows.append({**_row_meta(name, m, d), **q})
    else:
        batches = _labelled_batches(tok, a.labelled, a.batch_size)
        for name, (m, d) in models.items():
            rows.append({**_row_meta(name, m, d), **classifier_metrics(m, dense, batches)})
    enc = tok(_heldout(a.text, a.bench_batch) if a.labelled is None else ["a sentence"] * a.bench_batch,
              padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    tput = throughput({"dense": dense, **{k: v[0] for k, v in models.items()}}, enc, a.repeats)
    for r in rows:
        r["speedup"] = tput[r["name"]] / tput["dense"]
    write_rows(rows, a.out, "eval")
    metric = "cosine" if a.labelled is None else "dense_agreement"
    plot_quality(rows, os.path.join(a.out, "eval.png"), metric)
    for r in rows:
        print(f"{r['name']:24s} {r['stage']:9s} pair params {r['pair_params_kept']:.3f}  speedup {r['speedup']:.2f}x  "
              f"{metric} {r[metric]:.4f}")
    print(f"wrote {a.out}/eval.json, eval.csv, eval.png")
    return 0


def _eval_sweep(a) -> int:
    from . import embedded
    from .evaluate import embedding_metrics, path_sweep, plot_sweep, sweep_fractions, write_rows
    from .handle import attach
    from .path import SolutionPath

    if a.labelled is not None:
        raise ValueError("--sweep evaluates sentence embeddings; it does not take --labelled")
    fractions = sweep_fractions(a.points, a.lowest)
    path = SolutionPath.load(a.sweep)
    dense, tok = _load_text_model(a.model)
    held = _heldout(a.text, a.sentences)
    if len(held) < 2:
        raise ValueError("--text: need at least 2 held-out sentences")
    dense_emb = embedded.embed(dense, tok, held)
    handle = attach(dense)
    rows = path_sweep(handle, path, fractions, lambda m: embedding_metrics(embedded.embed(m, tok, held), dense_emb),
                      by=a.by)
    write_rows(rows, a.out, "sweep")
    plot_sweep(rows, os.path.join(a.out, "sweep.png"))
    for r in rows:
        print(f"{a.by} {r['target']:.3f}  pair params {r['pair_params_kept']:.3f}  FLOPs {r['pair_flops_kept']:.3f}  "
              f"cosine {r['cosine']:.4f}  top1 {r['top1_agreement']:.3f}  {r['eval_seconds']:.2f}s")
    print(f"wrote {a.out}/sweep.json, sweep.csv, sweep.png")
    return 0


def _row_meta(name, model, d) -> dict:
    info = model.__dict__.get("_spp_pruned", {})
    kept = info.get("masks", {}).get("params_kept_fraction")
    stage = "finetuned" if os.path.exists(os.path.join(d, "finetune_state.json")) else "pruned"
    return {"name": name, "method": name.split("@")[0], "stage": stage,
            "pair_params_kept": kept if kept is not None else float("nan"), "folder": d}


def _load_classifier(spec: str):
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"--model: {spec!r} is not a model folder (classifiers need one)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return (AutoModelForSequenceClassification.from_pretrained(spec, local_files_only=True).eval(),
            AutoTokenizer.from_pretrained(spec, local_files_only=True))


def _labelled_batches(tok, path: str, batch_size: int):
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--labelled: no such file {path!r}")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            label, sep, text = line.rstrip("\n").partition("\t")
            if not sep or not label.strip().lstrip("-").isdigit():
                raise ValueError(f"--labelled: line {n} of {path!r} is not 'label<TAB>text'")
            pairs.append((int(label), text))
    if not pairs:
        raise ValueError(f"--labelled: {path!r} holds no examples")
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        enc = tok([t for _, t in chunk], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append(({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")},
                    torch.tensor([lab for lab, _ in chunk])))
    return out


def cmd_bench(a) -> int:
    import torch

    from . import bench
    from .handle import attach

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.malloc == "retain" and not bench.retain_freed_memory():
        print(f"--malloc retain: the C library refused (malloc column: {bench.malloc_setting()})")
    model, tok = _load_text_model(a.model)
    sents = _heldout(a.text, max(a.batches))
    if len(sents) < max(a.batches):
        sents = (sents * max(a.batches))[: max(a.batches)]

    def inputs(batch):
        enc = tok(sents[:batch], padding="max_length", truncation=True, max_length=a.seq, return_tensors="pt")
        return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}

    if a.profile:
        from .latency import profile

        out = a.out if a.out.endswith(".json") else os.path.join(a.out, "latency.json")
        table = profile(model, batch=max(a.batches), seq=a.seq, points=a.points, repeats=a.repeats)
        table.save(out)
        for kind in ("qk", "vo", "mlp"):
            print(f"{kind}: " + ", ".join(f"{w}:{t:.2f}ms" for w, t in zip(table.widths[kind], table.ms[kind])))
        print(f"latency table ({table.device}, batch {table.batch}, seq {table.seq}) written to {out}")
        return 0
    if a.path is None:
        raise ValueError("give --path (a folder written by spp search) to compare dense and pruned, or --profile")
    from .path import SolutionPath

    path = SolutionPath.load(a.path)
    attach(model)  # checks the model is supported; prune reads it unattached
    from .handle import detach

    detach(model)
    table = None
    if a.latency:
        if a.latency_table is None:
            raise ValueError("--latency needs --latency-table (spp bench --profile writes one)")
        from .latency import LatencyTable

        table = LatencyTable.load(a.latency_table)
    rows = bench.pruned_vs_dense(model, path, inputs, name=a.model, seq=a.seq, flops=a.flops, round_to=a.round_to,
                                 batches=a.batches, repeats=a.repeats,
                                 burst=bench.BURST if a.burst is None else a.burst, latency_table=table,
                                 latency=a.latency or (), compile=a.compile)
    os.makedirs(a.out, exist_ok=True)
    bench.write_csv(rows, os.path.join(a.out, "bench.csv"))
    bench.plot(rows, os.path.join(a.out, "bench.png"))
    print(f"wrote {a.out}/bench.csv, bench.png")
    return 0


def cmd_info(a) -> int:
    from spp_kernels.info import report

    from .adapters import supported

    print(report())
    print("model families: " + supported())
    return 0


def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s!r}")
    return v


def _int_at_least(lo: int, what: str):
    """An argparse type: an integer >= ``lo``, described as ``what`` in the error."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    return parse


_positive = _int_at_least(1, "a positive integer")
_nonnegative = _int_at_least(0, "an integer >= 0")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spp", description="Solution Path Pruning of pretrained transformers")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="search, prune and evaluate the embedded all-MiniLM-L6-v2")
    d.add_argument("--out", default="spp-demo-out", help="output folder (report.json, report.md, PNGs)")
    d.add_argument("--steps", type=_positive, default=200)
    d.add_argument("--quick", action="store_true", help="small corpus and one timing repeat (for tests)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=cmd_demo)

    s = sub.add_parser("search", help="search the solution path of a text model")
    s.add_argument("--model", default="minilm", help="'minilm' (embedded) or a Hugging Face BERT folder")
    s.add_argument("--text", help="a text file, one sentence per line (default: stdlib docstrings)")
    s.add_argument("--out", required=True, help="folder for path.safetensors + path.json")
    s.add_argument("--steps", type=_positive, default=200)
    s.add_argument("--sentences", type=_positive, default=1024)
    s.add_argument("--batch-size", type=_positive, default=8)
    s.add_argument("--max-length", type=_positive, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--checkpoint-every", type=_nonnegative, default=50,
                   help="write a checkpoint every N steps (also after the calibration, at the end and on "
                        "SIGINT/SIGTERM; 0: only then)")
    s.add_argument("--checkpoint-dir", help="checkpoint folder (default: OUT/checkpoint)")
    s.add_argument("--resume", action="store_true", help="continue the search from the checkpoint folder")
    s.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory, same path)")
    s.add_argument("--max-nonfinite-steps", type=_positive, default=10,
                   help="stop after this many consecutive steps with a NaN/Inf loss or mask gradient")
    s.set_defaults(fn=cmd_search)

    r = sub.add_parser("prune", help="prune a model at one ratio read off a saved path")
    r.add_argument("--model", default="minilm")
    r.add_argument("--path", required=True, help="folder written by spp search")
    r.add_argument("--out", required=True)
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--keep", type=_fraction, help="fraction of units kept per pair type")
    g.add_argument("--params", type=_fraction, help="fraction of pair parameters kept")
    g.add_argument("--flops", type=_fraction, help="fraction of pair FLOPs kept")
    g.add_argument("--latency", type=_fraction, help="fraction of the pair modules' latency kept (needs "
                   "--latency-table from spp bench --profile)")
    r.add_argument("--latency-table", help="a latency table written by spp bench --profile")
    r.add_argument("--round-to", type=_positive, default=None,
                   help="each pair keeps a multiple of this many units (default: 8 with CUDA, else 1)")
    r.add_argument("--min-keep", type=_positive, default=1)
    r.set_defaults(fn=cmd_prune)

    f = sub.add_parser("finetune", help="recover a pruned text model by distillation from the dense one")
    f.add_argument("--model", default="minilm", help="the dense teacher: 'minilm' or a Hugging Face BERT folder")
    f.add_argument("--pruned", required=True, help="folder written by spp prune")
    f.add_argument("--out", required=True, help="folder for the fine-tuned model (and its checkpoints)")
    f.add_argument("--text", help="a text file, one sentence per line (default: stdlib docstrings)")
    f.add_argument("--steps", type=_positive, default=200)
    f.add_argument("--lr", type=float, default=6e-4)
    f.add_argument("--sentences", type=_positive, default=4096)
    f.add_argument("--batch-size", type=_positive, default=16)
    f.add_argument("--max-length", type=_positive, default=64)
    f.add_argument("--checkpoint-every", type=_positive, default=None)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(fn=cmd_finetune)

    e = sub.add_parser("eval", help="quality and speed of pruned models against the dense one")
    e.add_argument("--model", default="minilm", help="the dense model: 'minilm' or a Hugging Face folder")
    what = e.add_mutually_exclusive_group(required=True)
    what.add_argument("--pruned", nargs="+", help="folders written by spp prune / spp finetune")
    what.add_argument("--sweep", metavar="PATH", help="a folder written by spp search: evaluate --points budgets "
                      "along the path in the masked dense model (no weights copied), into sweep.json/csv/png")
    e.add_argument("--points", type=_positive, default=12, help="--sweep: number of budgets (>= 2)")
    e.add_argument("--lowest", type=float, default=0.1, help="--sweep: the smallest budget (fraction)")
    e.add_argument("--by", choices=("params", "flops", "keep"), default="params", help="--sweep: the budget kind")
    e.add_argument("--out", required=True, help="folder for eval.json, eval.csv, eval.png")
    e.add_argument("--text", help="held-out sentences, one per line (default: the stdlib held-out split)")
    e.add_argument("--labelled", help="classifiers: a file of 'label<TAB>text' lines")
    e.add_argument("--sentences", type=_positive, default=256)
    e.add_argument("--batch-size", type=_positive, default=32)
    e.add_argument("--bench-batch", type=_positive, default=16)
    e.add_argument("--repeats", type=_positive, default=3)
    e.set_defaults(fn=cmd_eval)

    b = sub.add_parser("bench", help="dense vs pruned speed from a path, or --profile a latency table")
    b.add_argument("--model", default="minilm", help="'minilm' or a Hugging Face BERT folder")
    b.add_argument("--profile", action="store_true", help="measure each pair type's latency against its width "
                   "and write a latency table (for spp prune --latency)")
    b.add_argument("--path", help="folder written by spp search (without --profile)")
    b.add_argument("--out", required=True, help="folder (or, with --profile, a .json file)")
    b.add_argument("--text", help="sentences to time on (default: the stdlib held-out split)")
    b.add_argument("--flops", nargs="+", type=_fraction, default=[0.7, 0.5, 0.3])
    b.add_argument("--latency", nargs="+", type=_fraction, help="latency targets (with --latency-table)")
    b.add_argument("--latency-table", help="a table written by spp bench --profile")
    b.add_argument("--round-to", nargs="+", type=_positive, default=[1, 8])
    b.add_argument("--batches", nargs="+", type=_positive, default=[1, 64])
    b.add_argument("--seq", type=_positive, default=128)
    b.add_argument("--points", type=_positive, default=9, help="--profile: widths per pair type")
    b.add_argument("--repeats", type=_positive, default=7)
    b.add_argument("--burst", type=_positive, default=None,
                   help="calls per model turn, the first untimed (default 2; 1: single interleaved calls, caches cold)")
    b.add_argument("--threads", type=_positive, default=None)
    b.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="time every model under torch.compile with this backend (default inductor)")
    b.add_argument("--malloc", choices=("retain", "default"), default="retain",
                   help="retain (default): glibc keeps freed memory, so no model pays page faults per forward "
                   "(recorded in the CSV's malloc column)")
    b.set_defaults(fn=cmd_bench)

    i = sub.add_parser("info", help="which backend serves each op, and the supported model families")
    i.set_defaults(fn=cmd_info)
    return p




def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Optional[list[str]] = None) -> int:
    from .search import SearchInterrupted

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SearchInterrupted as exc:  # a checkpoint was written: say how to continue
        print(f"spp {args.cmd}: {_one_line(exc).replace('resume=True (CLI: --resume)', '--resume')}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"spp {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, FloatingPointError) as exc:  # OSError: missing, unwritable, full
        print(f"spp {args.cmd}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
