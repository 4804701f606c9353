"""Ranking quality of SPP against cheap baselines on the embedded all-MiniLM-L6-v2.

Search / ranking data: stdlib docstrings. Evaluation: held-out docstrings of *third-party*
packages (another source). For every method, allocation and ratio: cosine fidelity and top-1 /
recall@10 retrieval agreement of masked evaluation (identical to the physically pruned model),
no fine-tuning; then the same short distillation fine-tune for every method at keep 0.5 under
each method's default allocation. Writes benchmarks/results/quality_sweep.csv and .png.

    .venv/bin/python benchmarks/quality_sweep.py [--steps 200] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import spp  # noqa: E402
from spp import embedded  # noqa: E402
from spp.baselines import activation_path, magnitude_path, random_path, taylor_path, torch_pruning_path  # noqa: E402
from spp.evaluate import embedding_metrics, write_rows  # noqa: E402
from spp.finetune import finetune  # noqa: E402

RATIOS = (0.7, 0.5, 0.3)
ALLOCATIONS = ("global", "type", "uniform")
# SPP settings tried: the default, and variations of the coupling and of lambda's schedule
SPP_SETTINGS = {
    "spp": {},
    "spp_nu0.5": {"nu": 0.5},
    "spp_nu2": {"nu": 2.0},
    "spp_entry0.5": {"entry_frac": 0.5},
    "spp_authors_nu_inf": {"nu": math.inf, "loss_scale": 1.0, "lr": 1e-3, "lam": 3.0, "warmup_frac": 0.0, "eps": 1e-4},
}


def masks_for(path, ratio, allocation, is_spp):
    values = "final" if is_spp else "ones"
    if allocation == "type":
        return path.masks(keep=ratio, values=values)
    if allocation == "uniform":
        return path.masks(params=ratio, allocation="uniform", values=values)
    return path.masks(params=ratio, values=values)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="fewer settings and sentences (smoke run)")
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--only", help="comma-separated baseline names (e.g. tp-magnitude,tp-taylor): run just "
                                   "those, no search, and merge their rows into the existing CSV")
    a = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model, tok = embedded.load_minilm()
    train, _ = embedded.split_by_hash(embedded.stdlib_sentences())
    train = [train[i] for i in rng.permutation(len(train))]
    other = sorted(set(embedded.package_sentences()) - set(train))
    held = [other[i] for i in rng.permutation(len(other))[: (64 if a.quick else 256)]]
    data = embedded.batches(tok, train[:512], 8, 64)
    ft_data = embedded.batches(tok, train[512:512 + 16 * 200], 16, 64)
    teacher = copy.deepcopy(model)
    dense = embedded.embed(model, tok, held)
    h = spp.attach(model)
    settings = dict(list(SPP_SETTINGS.items())[:2]) if a.quick else SPP_SETTINGS
    only = set(a.only.split(",")) if a.only else None
    if only:
        settings = {}

    paths, info = {}, {}
    for name, kw in settings.items():
        t = time.time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            paths[name] = spp.search(h, data, steps=a.steps, progress=False, **kw)
        d = paths[name].diagnostics()
        info[name] = {"search_seconds": time.time() - t, "distinct_entry_steps": d["distinct_entry_steps"],
                      "fraction_entered": d["fraction_entered"], "support_growth_span": d["support_growth_span"],
                      "degenerate": d["degenerate"]}
        print(name, info[name], flush=True)
    rank_data = data[:16]
    baselines = {"magnitude": lambda: magnitude_path(h), "activation": lambda: activation_path(h, rank_data),
                 "taylor": lambda: taylor_path(h, rank_data),
                 "tp-magnitude": lambda: torch_pruning_path(h, rank_data[:8], "magnitude"),
                 "tp-taylor": lambda: torch_pruning_path(h, rank_data[:8], "taylor")}
    for s in range(1 if a.quick else 5):
        baselines[f"random_{s}"] = (lambda s=s: random_path(h, seed=s))
    for name, make in baselines.items():
        if only and name not in only:
            continue
        try:
            paths[name] = make()
        except ImportError as exc:
            print(f"{name} skipped: {exc}", flush=True)

    def score(ms):
        h.set_masks(ms)
        q = embedding_metrics(embedded.embed(model, tok, held), dense, k=10)
        h.set_masks(None)
        return q

    rows = []
    device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    for name, path in paths.items():
        is_spp = name.startswith("spp")
        for alloc in ALLOCATIONS:
            for r in RATIOS:
                ms = masks_for(path, r, alloc, is_spp)
                rows.append({"method": name.split("_")[0] if name.startswith("random") else name, "draw": name,
                             "allocation": alloc, "target_params": r, "stage": "pruned",
                             "pair_params_kept": ms.params_kept / ms.params_total, **score(ms),
                             **info.get(name, {}), "device": device})
        print(name, "done", flush=True)
    # the same short fine-tune for every method at 0.5: SPP under its default (global)
    # allocation, each baseline under the allocation that scored best for it at 0.5 above
    h_model = model
    for name, path in paths.items():
        if name.startswith("random_") and name != "random_0":
            continue
        mine = [r for r in rows if r["draw"] == name and r["target_params"] == 0.5 and r["stage"] == "pruned"]
        alloc = "global" if name.startswith("spp") else max(mine, key=lambda r: r["cosine"])["allocation"]
        ms = masks_for(path, 0.5, alloc, name.startswith("spp"))
        small = spp.prune(h_model, ms)
        finetune(small, ft_data, teacher, steps=a.finetune_steps, lr=6e-4, progress=False)
        small.eval()
        q = embedding_metrics(embedded.embed(small, tok, held), dense, k=10)
        rows.append({"method": name.split("_")[0] if name.startswith("random") else name, "draw": name,
                     "allocation": alloc, "target_params": 0.5, "stage": f"finetuned_{a.finetune_steps}",
                     "pair_params_kept": ms.params_kept / ms.params_total, **q, "device": device})
        print(name, "finetuned", q, flush=True)
    os.makedirs(a.out, exist_ok=True)
    tag = "quality_sweep_quick" if a.quick else "quality_sweep"
    if only:  # merge: keep the other methods' rows from the last full run
        import csv

        with open(os.path.join(a.out, f"{tag}.csv")) as f:
            old = [r for r in csv.DictReader(f) if r["draw"] not in only]
        for r in old:
            for k in ("target_params", "pair_params_kept", "cosine", "top1_agreement", "recall_at_10"):
                r[k] = float(r[k])
        rows = old + rows
    write_rows(rows, a.out, tag)
    plot(rows, os.path.join(a.out, f"{tag}.png"))
    print(table(rows))


def aggregate(rows):
    """Mean over random draws: one row per (method, allocation, ratio, stage)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["allocation"], r["target_params"], r["stage"]), []).append(r)
    return {k: {m: float(np.mean([r[m] for r in v])) for m in ("cosine", "top1_agreement", "recall_at_10")}
            for k, v in groups.items()}


def table(rows) -> str:
    agg = aggregate(rows)
    lines = ["method | allocation | stage | " + " | ".join(f"cos@{r} top1@{r}" for r in RATIOS)]
    keys = sorted({(m, al, st) for (m, al, _, st) in agg})
    for m, al, st in keys:
        cells = []
        for r in RATIOS:
            v = agg.get((m, al, r, st))
            cells.append(f"{v['cosine']:.3f} {v['top1_agreement']:.3f}" if v else "-")
        lines.append(f"{m} | {al} | {st} | " + " | ".join(cells))
    return "\n".join(lines)


def plot(rows, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    methods = sorted({k[0] for k in agg})
    fig, axes = plt.subplots(1, len(ALLOCATIONS), figsize=(15, 4.2), sharey=True)
    for ax, al in zip(axes, ALLOCATIONS):
        for m in methods:
            pts = sorted((r, agg[(m, al, r, "pruned")]["cosine"]) for r in RATIOS if (m, al, r, "pruned") in agg)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m, lw=2.5 if m == "spp" else 1.2)
        ax.set_title(f"allocation: {al}")
        ax.set_xlabel("fraction of pair parameters kept")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cosine to dense (held-out, other source)")
    axes[-1].legend(fontsize=7)
    fig.suptitle("all-MiniLM-L6-v2: SPP vs baselines, no fine-tuning")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
