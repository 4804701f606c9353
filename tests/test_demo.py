"""The embedded demo end to end on the real all-MiniLM-L6-v2, on a short setting."""
import csv
import json
import math
import os

import pytest

from spp.demo import DemoConfig, run

ROW_FIELDS = {"method", "stage", "target_params", "pair_params_kept", "params", "params_ratio", "flops_per_token",
              "flops_ratio", "sentences_per_s", "speedup", "speedup_vs_full_width", "cosine", "top1_agreement",
              "recall_at_10",
              "paraphrase_stability", "widths"}
METHODS = ("spp", "magnitude", "random", "taylor", "activation")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(out=str(out), steps=30, train_sentences=96, heldout_sentences=48, bench_batch=2,
                     bench_repeats=1, progress=False, finetune_steps=6)
    return out, run(cfg)


def test_report_files_and_fields(report):
    out, rep = report
    for name in ("report.json", "report.md", "results.csv", "quality_vs_ratio.png", "retrieval_vs_ratio.png",
                 "kept_units_per_layer.png", "path/path.json", "path/path.safetensors"):
        assert os.path.getsize(out / name) > 0, name
    with open(out / "report.json") as f:
        on_disk = json.load(f)
    assert on_disk["rows"] == json.loads(json.dumps(rep["rows"]))
    assert {"params", "flops_per_token", "sentences_per_s"} <= set(rep["dense"])
    assert rep["full_width"]["sentences_per_s"] > 0 and rep["full_width"]["linear"] in ("onednn", "aten")
    with open(out / "report.md") as f:
        md = f.read()
    assert "vs full width" in md and "at full width through spp's layers" in md
    assert {"fraction_entered", "distinct_entry_steps", "entry_step_q10_q50_q90", "degenerate"} <= set(
        rep["search"]["diagnostics"])
    pruned = {(r["method"], r["target_params"]) for r in rep["rows"] if r["stage"] == "pruned"}
    assert pruned == {(m, r) for m in METHODS for r in (0.7, 0.5, 0.3)}
    tuned = {(r["method"], r["target_params"]) for r in rep["rows"] if r["stage"] == "finetuned"}
    assert tuned == {(m, 0.5) for m in METHODS}
    for r in rep["rows"]:
        assert ROW_FIELDS <= set(r)


def test_report_numbers_are_consistent(report):
    _, rep = report
    dense = rep["dense"]
    assert 22_000_000 < dense["params"] < 23_000_000  # all-MiniLM-L6-v2 without its pooler
    for r in rep["rows"]:
        # each method met its pair-parameter target within one unit type's rounding
        assert abs(r["pair_params_kept"] - r["target_params"]) < 0.01
        assert r["params"] < dense["params"] and r["flops_per_token"] < dense["flops_per_token"]
        assert -1.0 <= r["cosine"] <= 1.0 and 0.0 <= r["top1_agreement"] <= 1.0
        assert r["sentences_per_s"] > 0
        # the two speed-ups are the same throughput over two references
        assert math.isclose(r["speedup"] / r["speedup_vs_full_width"],
                            rep["full_width"]["sentences_per_s"] / rep["dense"]["sentences_per_s"], rel_tol=1e-9)
    for m in METHODS:
        by_ratio = {r["target_params"]: r for r in rep["rows"] if r["method"] == m and r["stage"] == "pruned"}
        assert by_ratio[0.7]["params"] > by_ratio[0.5]["params"] > by_ratio[0.3]["params"]


def test_finetune_rows_share_the_pruned_structure(report):
    _, rep = report
    for r in (r for r in rep["rows"] if r["stage"] == "finetuned"):
        base = next(b for b in rep["rows"] if b["stage"] == "pruned" and b["method"] == r["method"]
                    and b["target_params"] == r["target_params"])
        assert r["params"] == base["params"] and r["widths"] == base["widths"]
        first, last = r["finetune_loss_first_last"]
        assert math.isfinite(first) and math.isfinite(last)


def test_csv_has_a_row_per_result(report):
    out, rep = report
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(rep["rows"])
    assert float(rows[0]["cosine"]) == pytest.approx(rep["rows"][0]["cosine"])


def test_markdown_table_lists_every_row(report):
    out, rep = report
    md = (out / "report.md").read_text()
    for m in METHODS:
        assert md.count(f"\n| {m} | pruned |") == 3 and md.count(f"\n| {m} | finetuned |") == 1
    assert "distinct entry steps" in md


def test_sweep_curve_matches_the_pruned_spp_rows(report):
    """The demo's path sweep: ≥ 10 budgets from 1.0 down to 0.1 (at 1.0 every unit is kept, with
    its final mask value folded in), and where a budget coincides with a pruned SPP row the masked
    evaluation gives its numbers."""
    out, rep = report
    sweep = rep["sweep"]["rows"]
    assert len(sweep) >= 10 and os.path.getsize(out / "sweep.png") > 0 and os.path.getsize(out / "sweep.csv") > 0
    assert sweep[0]["pair_params_kept"] == 1.0 and sweep[-1]["pair_params_kept"] < 0.15
    kept = [r["pair_params_kept"] for r in sweep]
    assert kept == sorted(kept, reverse=True)
    spp_rows = {r["target_params"]: r for r in rep["rows"] if r["method"] == "spp" and r["stage"] == "pruned"}
    for r in sweep:
        if round(r["target"], 6) in spp_rows:
            assert r["cosine"] == pytest.approx(spp_rows[round(r["target"], 6)]["cosine"], abs=1e-4)
