"""Quality of pruned models against the dense one: sentence-embedding fidelity, retrieval
agreement and paraphrase stability; classifier accuracy / agreement; JSON + CSV + PNG output."""
from __future__ import annotations

import csv
import os
import re
import time
from typing import Iterable, Optional, Sequence

import torch


def embedding_metrics(emb: torch.Tensor, dense: torch.Tensor, k: int = 10) -> dict:
    """emb, dense: (N, D) L2-normalised embeddings of the same N held-out sentences.

    cosine: mean cos(emb_i, dense_i); top1_agreement: fraction of sentences whose nearest other
    sentence is the same under both models; recall_at_k: mean fraction of the dense model's k
    nearest neighbours that are among the pruned model's k nearest."""
    if emb.shape != dense.shape or emb.dim() != 2:
        raise ValueError(f"emb and dense must be (N, D) of the same shape, got {tuple(emb.shape)} and {tuple(dense.shape)}")
    n = emb.shape[0]
    if n < 2:
        raise ValueError("need at least 2 sentences for retrieval metrics")
    k = min(k, n - 1)
    cos = float((emb * dense).sum(-1).mean())
    sd, sp = dense @ dense.T, emb @ emb.T
    sd.fill_diagonal_(-2.0)
    sp.fill_diagonal_(-2.0)
    top1 = float((sd.argmax(1) == sp.argmax(1)).float().mean())
    nd, np_ = sd.topk(k, dim=1).indices, sp.topk(k, dim=1).indices
    hits = (nd.unsqueeze(2) == np_.unsqueeze(1)).any(2).float().sum(1) / k
    return {"cosine": cos, "top1_agreement": top1, f"recall_at_{k}": float(hits.mean())}


_WORD = re.compile(r"\w+|[^\w\s]")


def paraphrase(sentence: str, seed: int = 0) -> str:
    """A light, meaning-preserving rewrite used for the stability check: lower-cased, punctuation
    dropped, and one pair of adjacent words swapped (position picked by ``seed``)."""
    words = [w for w in _WORD.findall(sentence.lower()) if w.isalnum() or w == "_"]
    if len(words) >= 4:
        i = 1 + (seed % (len(words) - 2))
        words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def paraphrase_stability(embed_fn, sentences: Sequence[str]) -> float:
    """Mean cosine between a sentence's embedding and its paraphrase's, under one model."""
    a = embed_fn(list(sentences))
    b = embed_fn([paraphrase(s, i) for i, s in enumerate(sentences)])
    return float((a * b).sum(-1).mean())


@torch.no_grad()
def classifier_metrics(model, dense, batches: Iterable, forward=None) -> dict:
    """Accuracy on labelled batches and top-1 agreement with the dense model.

    batches: (inputs, labels) pairs where inputs is a dict (Hugging Face) or a tensor (timm);
    forward(model, inputs) -> logits defaults to ``model(**inputs).logits`` / ``model(inputs)``."""
    def fwd(m, x):
        if forward is not None:
            return forward(m, x)
        out = m(**x) if isinstance(x, dict) else m(x)
        return getattr(out, "logits", out)

    correct = agree = total = 0
    for inputs, labels in batches:
        p, d = fwd(model, inputs).argmax(-1), fwd(dense, inputs).argmax(-1)
        correct += int((p == labels).sum())
        agree += int((p == d).sum())
        total += int(labels.numel())
    if total == 0:
        raise ValueError("batches is empty")
    return {"accuracy": correct / total, "dense_agreement": agree / total, "examples": total}


@torch.no_grad()
def throughput(models: dict, batch: dict, repeats: int = 3) -> dict:
    """Inputs per second of each model on ``batch`` (a dict of tensors or a tensor), measured
    side by side in steady state (:func:`spp.bench.side_by_side`: the models take turns, the
    median of ``repeats`` turns)."""
    from .bench import side_by_side

    n = (next(iter(batch.values())) if isinstance(batch, dict) else batch).shape[0]
    return {k: n / s for k, s in side_by_side(models, batch, repeats).items()}


def write_rows(rows: list[dict], out_dir: str, name: str = "eval") -> None:
    """rows -> ``name``.json and ``name``.csv (scalar columns only) in ``out_dir``."""
    from .io import atomic_path, atomic_write_json

    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(os.path.join(out_dir, f"{name}.json"), {"rows": rows})
    cols = []
    for r in rows:
        for k, v in r.items():
            if k not in cols and (isinstance(v, (int, float, str, bool)) or v is None):
                cols.append(k)
    with atomic_path(os.path.join(out_dir, f"{name}.csv")) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k) for k in cols})


def plot_quality(rows: list[dict], out_png: str, metric: str = "cosine", title: Optional[str] = None) -> None:
    """Quality vs kept pair params and vs measured speed-up; one line per (method, stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r.get("stage", "pruned")), []).append(r)
    for (method, stage), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["pair_params_kept"])
        style = "-" if stage == "pruned" else "--"
        label = method if stage == "pruned" else f"{method} + fine-tune"
        axes[0].plot([r["pair_params_kept"] for r in rs], [r[metric] for r in rs], style, marker="o", label=label)
        if all("speedup" in r for r in rs):
            axes[1].plot([r["speedup"] for r in rs], [r[metric] for r in rs], style, marker="o", label=label)
    axes[0].set_xlabel("fraction of pair parameters kept")
    axes[1].set_xlabel("measured speed-up vs dense (CPU)")
    for ax in axes:
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def sweep_fractions(points: int, lowest: float = 0.1) -> list[float]:
    """``points`` budgets evenly spaced from 1.0 down to ``lowest`` (both included)."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an int >= 2, got {points!r}")
    if not 0 < lowest < 1:
        raise ValueError(f"lowest must be in (0, 1), got {lowest!r}")
    return [round(1.0 - (1.0 - lowest) * i / (points - 1), 6) for i in range(points)]


@torch.no_grad()
def path_sweep(handle, path, fractions: Sequence[float], evaluate, by: str = "params", **mask_options) -> list[dict]:
    """Quality along the solution path without copying a weight: for each budget in ``fractions``
    the path's masks are loaded into the attached model (dropped units are skipped through the
    ``active`` lists of ``pair_matmul``, so an evaluation costs about its kept fraction of the MLP
    work), ``evaluate(model) -> dict`` is called, and the masks are restored to ones at the end.

    by: "params", "flops" or "keep" (per type); mask_options go to :meth:`SolutionPath.masks`.
    Returns one row per budget: the target, the kept params/FLOPs fractions, the evaluation's
    keys and ``eval_seconds``. The result equals evaluating the physically pruned models."""
    if by not in ("params", "flops", "keep"):
        raise ValueError(f"by must be 'params', 'flops' or 'keep', got {by!r}")
    if not callable(evaluate):
        raise TypeError("evaluate must be callable(model) -> dict")
    rows = []
    try:
        for f in fractions:
            masks = path.masks(**{by: f}, **mask_options)
            handle.set_masks(masks)
            t = time.perf_counter()
            result = evaluate(handle.model)
            seconds = time.perf_counter() - t
            s = masks.summary()
            rows.append({"by": by, "target": float(f), "pair_params_kept": s["params_kept_fraction"],
                         "pair_flops_kept": s["flops_kept_fraction"], **result, "eval_seconds": seconds})
    finally:
        handle.set_masks(None)
    return rows


def plot_sweep(rows: list[dict], out_png: str, metrics: Sequence[str] = ("cosine", "top1_agreement")) -> None:
    """Quality along the path (one line per metric) against the kept pair params."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = sorted(rows, key=lambda r: r["pair_params_kept"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric in metrics:
        if all(metric in r for r in rs):
            ax.plot([r["pair_params_kept"] for r in rs], [r[metric] for r in rs], marker="o", label=metric)
    ax.set_xlabel("fraction of pair parameters kept")
    ax.set_ylabel("agreement with the dense model")
    ax.set_title(f"quality along the solution path ({len(rs)} budgets, one search)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
