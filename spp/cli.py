"""The ``spp`` command line: demo, search, prune, info.

Errors in the input end the command with a one-line message and exit status 2 (no traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional


def _load_text_model(spec: str):
    """``minilm`` (the embedded model) or a folder with a Hugging Face BERT checkpoint."""
    from . import embedded

    if spec == "minilm":
        return embedded.load_minilm()
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"--model: {spec!r} is neither 'minilm' nor a model folder")
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
    from . import embedded
    from .handle import attach
    from .search import search

    model, tok = _load_text_model(a.model)
    sents = _sentences(a.text)[: a.sentences]
    data = embedded.batches(tok, sents, a.batch_size, a.max_length)
    if not data:
        raise ValueError(f"--batch-size {a.batch_size} exceeds the {len(sents)} sentences available")
    handle = attach(model)
    path = search(handle, data, steps=a.steps, progress=not a.no_progress, seed=a.seed)
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
    target = {k: v for k, v in (("keep", a.keep), ("params", a.params), ("flops", a.flops)) if v is not None}
    masks = path.masks(**target, round_to=a.round_to, min_keep=a.min_keep)
    handle = attach(model)
    small = prune(handle.model, masks)
    save_pruned(small, a.out)
    tok.save_pretrained(a.out)
    s = masks.summary()
    print(f"pruned model written to {a.out}: {s['params_kept_fraction']:.3f} of pair params, "
          f"{s['flops_kept_fraction']:.3f} of pair FLOPs kept")
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


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


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
    s.set_defaults(fn=cmd_search)

    r = sub.add_parser("prune", help="prune a model at one ratio read off a saved path")
    r.add_argument("--model", default="minilm")
    r.add_argument("--path", required=True, help="folder written by spp search")
    r.add_argument("--out", required=True)
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--keep", type=_fraction, help="fraction of units kept per pair type")
    g.add_argument("--params", type=_fraction, help="fraction of pair parameters kept")
    g.add_argument("--flops", type=_fraction, help="fraction of pair FLOPs kept")
    r.add_argument("--round-to", type=_positive, default=1)
    r.add_argument("--min-keep", type=_positive, default=1)
    r.set_defaults(fn=cmd_prune)

    i = sub.add_parser("info", help="which backend serves each op, and the supported model families")
    i.set_defaults(fn=cmd_info)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, TypeError, FileNotFoundError, PermissionError) as exc:
        print(f"spp {args.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
