"""After the same short fine-tune, is SPP ahead of the strongest baselines beyond run-to-run noise?

The setup of quality_sweep.py (search on stdlib docstrings, held-out docstrings of third-party
packages) at 0.5 of the pair params: SPP under its default allocation and the three best
baselines of the sweep (Taylor per type, Torch-Pruning Taylor, activation-aware, each under its
best allocation there), each fine-tuned ``--seeds`` times (100 steps, lr 6e-4, batch 16) with the
fine-tune batches in a different order per seed. Writes benchmarks/results/finetune_seeds.csv and
prints mean ± standard deviation per method.

    .venv/bin/python benchmarks/finetune_seeds.py [--seeds 3] [--steps 100]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import spp  # noqa: E402
from spp import embedded  # noqa: E402
from spp.baselines import activation_path, taylor_path, torch_pruning_path  # noqa: E402
from spp.evaluate import embedding_metrics, write_rows  # noqa: E402
from spp.finetune import finetune  # noqa: E402

METRICS = ("cosine", "top1_agreement", "recall_at_10")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model, tok = embedded.load_minilm()
    train, _ = embedded.split_by_hash(embedded.stdlib_sentences())
    train = [train[i] for i in rng.permutation(len(train))]
    other = sorted(set(embedded.package_sentences()) - set(train))
    held = [other[i] for i in rng.permutation(len(other))[:256]]
    data = embedded.batches(tok, train[:512], 8, 64)
    ft_data = embedded.batches(tok, train[512:512 + 16 * 200], 16, 64)
    teacher = copy.deepcopy(model)
    dense = embedded.embed(model, tok, held)
    h = spp.attach(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.time()
        spp_path = spp.search(h, data, steps=200, progress=False)
        print(f"search {time.time() - t:.0f} s", flush=True)
    rank = data[:16]
    methods = {  # (path, masks at 0.5): each baseline under its best allocation in the quality sweep
        "spp": (spp_path, lambda p: p.masks(params=0.5)),
        "taylor": (taylor_path(h, rank), lambda p: p.masks(keep=0.5, values="ones")),
        "tp-taylor": (torch_pruning_path(h, rank[:8], "taylor"), lambda p: p.masks(params=0.5, values="ones")),
        "activation": (activation_path(h, rank), lambda p: p.masks(params=0.5, values="ones")),
    }
    rows = []
    for seed in range(a.seeds):
        order = np.random.default_rng(100 + seed).permutation(len(ft_data))
        batches = [ft_data[i] for i in order]
        for name, (path, pick) in methods.items():
            small = spp.prune(model, pick(path))
            t = time.time()
            finetune(small, batches, teacher, steps=a.steps, lr=6e-4, progress=False, seed=seed)
            small.eval()
            with torch.no_grad():
                q = embedding_metrics(embedded.embed(small, tok, held), dense, k=10)
            rows.append({"method": name, "seed": seed, "steps": a.steps, **q, "seconds": time.time() - t})
            print(name, seed, {k: round(v, 4) for k, v in q.items()}, flush=True)
    os.makedirs(a.out, exist_ok=True)
    write_rows(rows, a.out, "finetune_seeds")
    print("method | " + " | ".join(f"{m} mean ± sd" for m in METRICS))
    for name in methods:
        rs = [r for r in rows if r["method"] == name]
        print(name + " | " + " | ".join(f"{np.mean([r[m] for r in rs]):.4f} ± {np.std([r[m] for r in rs], ddof=1) if len(rs) > 1 else 0:.4f}"
                                       for m in METRICS))


if __name__ == "__main__":
    main()
