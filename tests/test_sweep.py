"""``spp.evaluate.path_sweep``: quality along the path without copying weights equals the
physically pruned models, and the masks are left at ones."""
import pytest
import torch

import spp
from spp.evaluate import path_sweep, sweep_fractions
from helpers import FAMILIES, make, max_err, outputs, quiet_search


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("by", ["params", "flops", "keep"])
def test_sweep_equals_physically_pruned_models(family, by):
    model, batch = make(family, seed=1)
    handle = spp.attach(model)
    path = quiet_search(handle, batch, steps=30)
    fractions = [0.9, 0.55, 0.3]
    seen = []

    def evaluate(m):
        out = outputs(m, batch)
        seen.append(out)
        return {"norm": float(sum(o.norm() for o in out))}

    rows = path_sweep(handle, path, fractions, evaluate, by=by, round_to=2)
    assert [r["target"] for r in rows] == fractions
    for r, f, out in zip(rows, fractions, seen):
        masks = path.masks(**{by: f}, round_to=2)
        small = spp.prune(handle.model, masks)
        assert max_err(outputs(small, batch), out) <= 1e-5
        assert r["pair_params_kept"] == pytest.approx(masks.summary()["params_kept_fraction"])
        assert r["norm"] == pytest.approx(float(sum(o.norm() for o in out)))
    kept = [r["pair_params_kept"] for r in rows]
    assert kept == sorted(kept, reverse=True) and kept[-1] < kept[0]
    # the model is dense again afterwards
    assert torch.all(handle.arena.m == 1) and all(v is None for v in handle.arena.active.values())


@pytest.mark.parametrize("family", ["llama", "opt", "clip", "swin"])
def test_sweep_equals_pruned_models_for_the_other_families(family):
    """Gated MLPs, rotary / GQA attention, CLIP's towers, Swin windows: masked with active units
    equals physically pruned, at two budgets."""
    import tiny_models

    model = getattr(tiny_models, f"tiny_{family}")(0)
    batch = {"clip": tiny_models.clip_batch, "swin": tiny_models.image_batch}.get(family, tiny_models.token_batch)(2)
    handle = spp.attach(model)
    path = quiet_search(handle, batch, steps=20)
    seen = []

    def evaluate(m):
        with torch.no_grad():
            seen.append(handle.adapter.forward(m, batch)[0].clone())
        return {}

    path_sweep(handle, path, [0.8, 0.45], evaluate)
    for f, out in zip([0.8, 0.45], seen):
        small = spp.prune(handle.model, path.masks(params=f))
        with torch.no_grad():
            want = handle.adapter.forward(small, batch)[0]
        assert float((out - want).abs().max()) <= 1e-5


def test_sweep_restores_ones_when_evaluation_fails():
    model, batch = make("bert", seed=0)
    handle = spp.attach(model)
    path = quiet_search(handle, batch, steps=20)

    def boom(m):
        raise RuntimeError("evaluation failed")

    with pytest.raises(RuntimeError, match="evaluation failed"):
        path_sweep(handle, path, [0.5], boom)
    assert torch.all(handle.arena.m == 1)


def test_sweep_fractions_and_bad_arguments():
    fr = sweep_fractions(10, 0.1)
    assert len(fr) == 10 and fr[0] == 1.0 and fr[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(fr, fr[1:]))
    with pytest.raises(ValueError, match="points must be"):
        sweep_fractions(1)
    with pytest.raises(ValueError, match="lowest must be"):
        sweep_fractions(5, 1.5)
    model, batch = make("bert", seed=0)
    handle = spp.attach(model)
    path = quiet_search(handle, batch, steps=10)
    with pytest.raises(ValueError, match="by must be"):
        path_sweep(handle, path, [0.5], lambda m: {}, by="latency_ms")


def test_cli_eval_sweep(bert_dir, tmp_path):
    """``spp eval --sweep PATH``: one row per budget, written as JSON/CSV/PNG, quality falling
    towards the smallest budget; a bad --points is a one-line error."""
    import json

    from spp import cli

    out = tmp_path / "sweep"
    args = ["eval", "--model", str(bert_dir / "bert"), "--sweep", str(bert_dir / "done"), "--text",
            str(bert_dir / "s.txt"), "--sentences", "20", "--points", "10", "--lowest", "0.2", "--out", str(out)]
    assert cli.main(args) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert len(rows) == 10 and (out / "sweep.csv").exists() and (out / "sweep.png").stat().st_size > 0
    assert rows[0]["target"] == 1.0 and rows[0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert rows[-1]["pair_params_kept"] < 0.3 and rows[-1]["cosine"] < rows[0]["cosine"]
    assert cli.main(["eval", "--sweep", str(bert_dir / "done"), "--points", "1", "--out", str(tmp_path / "x")]) == 2
