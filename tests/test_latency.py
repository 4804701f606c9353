"""Latency-aware budgets: the latency table (profile, curve, save/load) and path.masks(latency=)."""
import time

import numpy as np
import pytest
import torch

import spp
from spp import bench
from spp.latency import LatencyTable, predicted_ms, profile, width_grid
from helpers import HEAD_DIM, HIDDEN, bert_batch, make, quiet_search


@pytest.fixture(scope="module")
def searched():
    model, batch = make("bert", seed=0)
    handle = spp.attach(model, seq_len=11)
    return handle, quiet_search(handle, batch, steps=30)


def synthetic(sizes, mlp_step_at=None, qk_cost=1.0) -> LatencyTable:
    """A table with known curves: linear in width, the MLP optionally flat then a jump."""
    widths = {k: [1, sizes[k] // 2, sizes[k]] for k in ("qk", "vo")}
    # attention(w_qk, w_vo) = 0.2 + qk_cost·w_qk/size + w_vo/size; each curve has the other width full
    ms = {"qk": [0.2 + qk_cost * w / sizes["qk"] + 1.0 for w in widths["qk"]],
          "vo": [0.2 + qk_cost + w / sizes["vo"] for w in widths["vo"]]}
    attn_full = 1.2 + qk_cost
    n = sizes["mlp"]
    if mlp_step_at is None:
        widths["mlp"], ms["mlp"] = [1, n], [0.1 + 4 / n, 4.1]
    else:  # flat up to mlp_step_at, then one jump: units past the step are expensive
        widths["mlp"], ms["mlp"] = [1, mlp_step_at, mlp_step_at + 1, n], [0.1, 0.1, 3.1, 4.1]
    return LatencyTable("synthetic", "float32", 1, 11, "bert", dict(sizes), widths, ms, attn_full)


def test_curve_is_monotone_and_interpolates():
    t = LatencyTable("x", "float32", 1, 8, "bert", {"qk": 8, "vo": 8, "mlp": 16},
                     {"qk": [1, 4, 8], "vo": [1, 8], "mlp": [1, 8, 16]},
                     {"qk": [1.0, 3.0, 2.5], "vo": [1.0, 2.0], "mlp": [0.5, 1.5, 2.5]}, 2.5)
    # the noisy dip at width 8 (2.5 < 3.0) is lifted to the running maximum
    assert t.curve("qk", [1, 4, 6, 8]).tolist() == [1.0, 3.0, 3.0, 3.0]
    assert float(t.curve("mlp", 12)) == pytest.approx(2.0)
    assert float(t.curve("mlp", 0)) == pytest.approx(0.5 - 1 / 7)  # extrapolated towards 0
    with pytest.raises(ValueError, match="rise strictly"):
        LatencyTable("x", "f", 1, 8, "bert", {"qk": 8, "vo": 8, "mlp": 8}, {"qk": [4, 1], "vo": [1, 8], "mlp": [1, 8]},
                     {"qk": [1, 2], "vo": [1, 2], "mlp": [1, 2]}, 2.0)


def test_latency_budget_is_met_and_follows_the_measured_costs(searched):
    handle, path = searched
    sizes = {"qk": HEAD_DIM, "vo": HEAD_DIM, "mlp": 2 * HIDDEN}
    table = synthetic(sizes)
    for frac in (0.8, 0.5, 0.3):
        masks = path.masks(latency=frac, table=table)
        widths = masks.widths()
        pred = predicted_ms(table, widths, path.pairs)
        full = predicted_ms(table, {p.name: p.size for p in path.pairs}, path.pairs)
        assert pred <= frac * full + 1e-9
        assert masks.meta["latency_kept_fraction_predicted"] == pytest.approx(pred / full)
        # greedy: the next unit of the ranking would not have fitted (within the largest unit cost)
        assert pred >= frac * full - 1.01 / HEAD_DIM  # the costliest single unit here
    # a free pair type: when qk units cost nothing, the walk keeps every qk unit it reaches
    free = path.masks(latency=0.5, table=synthetic(sizes, qk_cost=0.0))
    flops = path.masks(flops=0.5)
    assert sum(free.widths()[f"blocks.{i}.qk"] for i in range(2)) >= sum(flops.widths()[f"blocks.{i}.qk"] for i in range(2))
    # a step in the MLP curve: widths stop just below it, where a FLOPs count would go on
    stepped = path.masks(latency=0.5, table=synthetic(sizes, mlp_step_at=40))
    mlp_w = [stepped.widths()[f"blocks.{i}.mlp"] for i in range(2)]
    assert min(mlp_w) <= 40  # at most one pair pays for the jump
    assert stepped.meta["latency_kept_fraction_predicted"] <= 0.5


def test_predicted_latency_never_exceeds_the_target_by_rounding(searched):
    """A target read back as a fresh sum of the table (as a user computes it) differs from the
    walk's running sum in the last bits; the budget still holds exactly, at every step of the walk."""
    handle, path = searched
    sizes = {p.kind: p.size for p in path.pairs}
    table = synthetic(sizes, qk_cost=0.37)  # costs that do not add up exactly in binary
    full = predicted_ms(table, {p.name: p.size for p in path.pairs}, path.pairs)
    for frac in np.linspace(0.35, 0.999, 97):
        masks = path.masks(latency=float(frac), table=table)
        got = masks.meta["latency_kept_fraction_predicted"]
        assert got <= frac
        again = predicted_ms(table, masks.widths(), path.pairs) / full  # the same masks, summed afresh
        redo = path.masks(latency=again, table=table)
        assert redo.meta["latency_kept_fraction_predicted"] <= again
    everything = path.masks(latency=1.0, table=table)
    assert everything.meta["latency_kept_fraction_predicted"] == 1.0
    assert everything.widths() == {p.name: p.size for p in path.pairs}


def test_latency_argument_errors(searched):
    handle, path = searched
    table = synthetic({"qk": HEAD_DIM, "vo": HEAD_DIM, "mlp": 2 * HIDDEN})
    with pytest.raises(ValueError, match="latency= needs table="):
        path.masks(latency=0.5)
    with pytest.raises(ValueError, match="table= is only"):
        path.masks(flops=0.5, table=table)
    with pytest.raises(ValueError, match="allocation='global'"):
        path.masks(latency=0.5, table=table, allocation="uniform")
    with pytest.raises(ValueError, match="below the minimum"):
        path.masks(latency=0.01, table=table, min_keep=4)
    wrong = synthetic({"qk": 16, "vo": HEAD_DIM, "mlp": 2 * HIDDEN})
    with pytest.raises(ValueError, match="profile this model"):
        path.masks(latency=0.5, table=wrong)


def test_profile_a_tiny_model_and_round_trip(searched, tmp_path):
    handle, path = searched
    table = profile(handle.model, batch=2, seq=11, points=4, repeats=2)
    assert table.sizes == {"qk": HEAD_DIM, "vo": HEAD_DIM, "mlp": 2 * HIDDEN}
    for kind in ("qk", "vo", "mlp"):
        assert table.widths[kind][0] == 1 and table.widths[kind][-1] == table.sizes[kind]
        assert all(t > 0 for t in table.ms[kind])
    assert table.ms["qk"][-1] == table.ms["vo"][-1] == table.attn_full_ms
    table.save(tmp_path / "lat.json")
    back = LatencyTable.load(tmp_path / "lat.json")
    assert back.to_dict() == table.to_dict()
    # tiny layers are dominated by fixed per-call costs: aim between the table's floor and 1
    full = predicted_ms(back, {p.name: p.size for p in path.pairs}, path.pairs)
    lowest = predicted_ms(back, {p.name: 2 for p in path.pairs}, path.pairs) / full
    target = (1 + lowest) / 2
    masks = path.masks(latency=target, table=back, round_to=2)
    assert all(w % 2 == 0 or w == HEAD_DIM for w in masks.widths().values())
    assert masks.meta["latency_kept_fraction_predicted"] <= target
    (tmp_path / "bad.json").write_text('{"format": "something-else", "version": 1}')
    with pytest.raises(ValueError, match="not a spp-latency-table file"):
        LatencyTable.load(tmp_path / "bad.json")


def test_width_grid():
    assert width_grid(1536) == sorted(set(width_grid(1536)))
    g = width_grid(1536, points=9)
    assert g[0] == 1 and g[-1] == 1536 and all(w % 8 == 0 for w in g[1:])
    assert width_grid(12, points=4) == [1, 4, 8, 12]


def test_cli_profile_then_prune_by_latency_then_bench(bert_dir, tmp_path):
    """spp bench --profile writes a table; spp prune --latency uses it; spp bench --path compares
    dense and pruned and writes rows with the FLOPs ratio and efficiency."""
    import csv

    from spp import cli

    model = str(bert_dir / "bert")
    table = tmp_path / "lat.json"
    assert cli.main(["bench", "--profile", "--model", model, "--out", str(table), "--batches", "2", "--seq", "16",
                     "--points", "4", "--repeats", "2", "--text", str(bert_dir / "s.txt")]) == 0
    measured = LatencyTable.load(table)
    assert measured.sizes == {"qk": 8, "vo": 8, "mlp": 64} and measured.batch == 2 and measured.seq == 16
    # prune against a table with known curves (a tiny model's measured one is all fixed cost and noise)
    synthetic(measured.sizes).save(tmp_path / "synthetic.json")
    assert cli.main(["prune", "--model", model, "--path", str(bert_dir / "done"), "--out", str(tmp_path / "small"),
                     "--latency", "0.5", "--latency-table", str(tmp_path / "synthetic.json")]) == 0
    small = spp.load_pruned(str(tmp_path / "small"))
    assert 0.45 < small.__dict__["_spp_pruned"]["masks"]["latency_kept_fraction_predicted"] <= 0.5
    assert cli.main(["prune", "--model", model, "--path", str(bert_dir / "done"), "--out", str(tmp_path / "x"),
                     "--latency", "0.5"]) == 2  # no table: a one-line error
    out = tmp_path / "bench"
    assert cli.main(["bench", "--model", model, "--path", str(bert_dir / "done"), "--out", str(out), "--flops", "0.5",
                     "--round-to", "1", "--batches", "1", "--seq", "16", "--repeats", "2", "--burst", "3",
                     "--malloc", "default", "--text", str(bert_dir / "s.txt")]) == 0
    rows = list(csv.DictReader(open(out / "bench.csv")))
    assert len(rows) == 1 and rows[0]["target"] == "flops=0.5"
    assert rows[0]["malloc"] == bench.malloc_setting()  # the allocator setting is recorded (here left as it came)
    assert rows[0]["burst"] == "3"
    r = rows[0]
    assert 0.4 < float(r["flops_ratio"]) < 1.0 and float(r["speedup"]) > 0
    assert float(r["efficiency"]) == pytest.approx(float(r["speedup"]) * float(r["flops_ratio"]), abs=2e-3)
    # the skeleton (one unit per pair) and the full-width model were timed in the same rounds
    assert 0 < float(r["skeleton_flops_ratio"]) < float(r["flops_ratio"]) and float(r["skeleton_per_s"]) > 0
    full_s, pruned_s = 1 / float(r["full_width_per_s"]), 1 / float(r["pruned_per_s"])
    assert float(r["efficiency_vs_full_width"]) == pytest.approx(full_s / pruned_s * float(r["flops_ratio"]), rel=0.02)
    if r["proportional"] != "nan":  # (a tiny model's skeleton may time no faster than the full one: none then)
        skel_s = 1 / float(r["skeleton_per_s"])
        assert float(r["proportional"]) == pytest.approx(bench.proportional_efficiency(
            float(r["flops_ratio"]), full_s, skel_s, float(r["skeleton_flops_ratio"])), rel=0.02)


def test_side_by_side_times_the_calls_after_the_first_of_each_turn():
    class Timed(torch.nn.Module):
        """Sleeps ``cold`` s on the first call of a turn (after another model ran), ``warm`` s after."""
        last = None

        def __init__(self, cold, warm):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.cold, self.warm, self.calls = cold, warm, 0

        def forward(self, x):
            self.calls += 1
            time.sleep(self.warm if Timed.last is self else self.cold)
            Timed.last = self
            return x

    a, b = Timed(0.03, 0.002), Timed(0.002, 0.002)
    sec = bench.side_by_side({"a": a, "b": b}, torch.zeros(1), repeats=3, burst=3)
    assert a.calls == b.calls == 2 + 3 * 3  # two warm-up calls, then 3 turns of 3
    assert sec["a"] < 0.015 and sec["b"] < 0.015  # the cold first call of a turn is not timed
    a.calls = 0
    single = bench.side_by_side({"a": a, "b": b}, torch.zeros(1), repeats=3, burst=1)
    assert a.calls == 2 + 3 and single["a"] > 0.025  # single interleaved calls: each one cold
    with pytest.raises(ValueError, match="burst"):
        bench.side_by_side({"a": a}, torch.zeros(1), burst=0)


def test_proportional_efficiency():
    # a free skeleton leaves the ideal; a skeleton of 10 % of the dense time puts 0.3 of the FLOPs at 0.3/0.37
    assert bench.proportional_efficiency(0.3, 1.0, 1e-12, 0.0) == pytest.approx(1.0)
    assert bench.proportional_efficiency(0.3, 1.0, 0.1, 0.0) == pytest.approx(0.3 / 0.37)
    assert bench.proportional_efficiency(1.0, 2.0, 0.5, 0.01) == pytest.approx(1.0)  # the dense model itself
    # a pruned model that takes exactly the proportional time has exactly that efficiency
    r, rs, d, s = 0.5, 0.02, 10.0, 1.5
    t = s + (r - rs) / (1 - rs) * (d - s)
    assert bench.proportional_efficiency(r, d, s, rs) == pytest.approx((d / t) * r)
    assert bench.proportional_efficiency(0.3, 1.0, 0.2, 0.0) < bench.proportional_efficiency(0.5, 1.0, 0.2, 0.0)
    for bad in ((0.3, 1.0, 1.2, 0.0), (0.3, 1.0, 0.1, 0.3), (1.5, 1.0, 0.1, 0.0), (0.3, 1.0, 0.0, 0.0)):
        with pytest.raises(ValueError):
            bench.proportional_efficiency(*bad)


def test_skeleton_keeps_one_unit_per_pair(searched):
    handle, path = searched
    sk = bench.skeleton(handle.model, path)
    assert set(sk.__dict__["_spp_pruned"]["widths"].values()) == {1}
    _, batch = make("bert", seed=0)
    with torch.no_grad():
        out = sk(**batch).last_hidden_state
    assert out.shape[-1] == HIDDEN and torch.isfinite(out).all()
    assert bench.count_flops(sk, batch) < 0.2 * bench.count_flops(handle.model, batch)


def test_pruned_vs_dense_under_torch_compile_times_compiled_models():
    """``compile=``: every timed model runs compiled (the backend sees each model at each batch
    shape) and the rows say so."""
    model, batch = make("bert", seed=0)
    handle = spp.attach(model, seq_len=11)
    path = quiet_search(handle, batch, steps=12)
    spp.detach(model)
    seen = []

    def inputs(b):
        return {k: v[:b] for k, v in bert_batch(1, batch=max(b, 2)).items()}

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    before = counters["stats"]["unique_graphs"]
    rows = bench.pruned_vs_dense(model, path, inputs, name="tiny", seq=11, flops=[0.5], round_to=[1],
                                 batches=[2, 3], repeats=1, log=seen.append, compile="aot_eager")
    assert [r["compile"] for r in rows] == ["aot_eager", "aot_eager"]
    assert all(r["speedup"] > 0 for r in rows) and len(seen) == 2
    # dense, pruned, skeleton and full width, each at two batch sizes: at least 8 graphs
    assert counters["stats"]["unique_graphs"] - before >= 8
    eager = bench.pruned_vs_dense(model, path, inputs, name="tiny", seq=11, flops=[0.5], round_to=[1],
                                  batches=[2], repeats=1, log=None)
    assert eager[0]["compile"] == ""
