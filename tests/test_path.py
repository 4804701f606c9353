"""SolutionPath: search determinism, save/load round trip, and the invariants of ``masks``."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import spp
from spp import PairSpec, SolutionPath
from helpers import make, quiet_search

ARRAYS = ("entry", "support_count", "z", "m")


def _pairs(layers: int = 3) -> list[PairSpec]:
    out = []
    for i in range(layers):
        out += [PairSpec(f"blocks.{i}.qk", "qk", i, 24, 392, 1900 + i),
                PairSpec(f"blocks.{i}.vo", "vo", i, 20, 388, 1800),
                PairSpec(f"blocks.{i}.mlp", "mlp", i, 40 + 8 * i, 97, 192)]
    return out


def random_path(seed: int = 0, layers: int = 3, steps: int = 200) -> SolutionPath:
    """A hand-built path with many ties in entry (so the tie-breaks matter) and some never-entered units."""
    pairs = _pairs(layers)
    n = sum(p.size for p in pairs)
    rng = np.random.default_rng(seed)
    entry = rng.integers(10, steps, n) // 10 * 10
    entry[rng.random(n) < 0.15] = -1
    support = np.where(entry >= 0, (steps - entry) // 10 + rng.integers(0, 2, n), 0)
    z = np.round(rng.normal(size=n), 1)
    m = rng.uniform(-1.5, 1.5, n).astype(np.float32)
    fp = {"family": "test", "pairs": [[p.name, p.size] for p in pairs], "checksum": 1.0}
    return SolutionPath(pairs, entry, support, z, m, steps, {"seed": seed, "nu": float("inf")}, fp,
                        {"step": [10, 20], "loss": [0.5, 0.25], "support": [3, 9]})


def kept_units(path: SolutionPath, masks) -> np.ndarray:
    """Global indices of the kept units."""
    names = [p.name for p in path.pairs]
    out = [path.offsets[names.index(n)] + idx.numpy() for n, (idx, _) in masks.kept.items()]
    return np.sort(np.concatenate(out))


def counts(path: SolutionPath, masks) -> np.ndarray:
    w = masks.widths()
    return np.array([w[p.name] for p in path.pairs])


@pytest.fixture(scope="module")
def searched():
    model, batch = make("bert", seed=0, layers=2)
    handle = spp.attach(model)
    path = quiet_search(handle, batch, steps=40)
    yield model, handle, batch, path
    spp.detach(model)


# --- determinism and persistence ---------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_search_is_deterministic(family):
    paths = []
    for _ in range(2):
        model, batch = make(family, seed=5)
        handle = spp.attach(model)
        paths.append(quiet_search(handle, batch, steps=30, seed=3))
    paths.append(quiet_search(handle, batch, steps=30, seed=3))  # again on the same (reset) handle
    a = paths[0]
    assert (a.entry >= 0).any(), "nothing entered: the comparison would be vacuous"
    assert np.unique(a.z).size > 10
    for b in paths[1:]:
        for name in ARRAYS:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert a.fingerprint == b.fingerprint and a.steps == b.steps
        assert a.history == b.history
    # the search leaves the model dense
    assert float(handle.arena.m.detach().min()) == 1.0 == float(handle.arena.m.detach().max())


def _assert_same_masks(m1, m2):
    assert m1.kept.keys() == m2.kept.keys()
    for k in m1.kept:
        assert torch.equal(m1.kept[k][0], m2.kept[k][0]) and torch.equal(m1.kept[k][1], m2.kept[k][1])
    assert (m1.params_kept, m1.flops_kept, m1.sizes) == (m2.params_kept, m2.flops_kept, m2.sizes)


@pytest.mark.parametrize("which", ["searched", "hand_built"])
def test_save_load_round_trip(which, searched, tmp_path):
    path = searched[3] if which == "searched" else random_path(1)
    path.save(str(tmp_path))
    # strict JSON (no NaN / Infinity literals), even with nu = inf in the settings
    text = (tmp_path / "path.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    back = SolutionPath.load(str(tmp_path))
    for name in ARRAYS:
        a, b = getattr(path, name), getattr(back, name)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert back.pairs == path.pairs and back.steps == path.steps
    assert back.settings == path.settings and back.fingerprint == path.fingerprint
    assert back.history == path.history
    assert back.diagnostics() == path.diagnostics()
    if which == "hand_built":
        assert back.settings["nu"] == math.inf
    for target in (dict(keep=0.5), dict(keep=0.2, round_to=8), dict(params=0.4), dict(flops=0.6, min_keep=2)):
        _assert_same_masks(path.masks(**target), back.masks(**target))
    assert spp.load_path == SolutionPath.load


def test_loaded_path_masks_apply_to_model(searched, tmp_path):
    model, handle, batch, path = searched
    path.save(str(tmp_path))
    masks = SolutionPath.load(str(tmp_path)).masks(keep=0.5)
    small = spp.prune(model, masks)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


# --- ranking -----------------------------------------------------------------------------


def test_ranking_rule_hand_built():
    pairs = [PairSpec("blocks.0.qk", "qk", 0, 4, 10, 100), PairSpec("blocks.0.mlp", "mlp", 0, 4, 3, 20),
             PairSpec("blocks.0.vo", "vo", 0, 1, 5, 50)]
    #            0     1     2     3    4    5    6    7    8
    entry = [5, 3, 3, 3, 3, -1, -1, 7, -1]
    support = [9, 2, 2, 2, 5, 0, 0, 1, 0]
    z = [0.1, 0.5, 0.5, 0.9, 0.0, 9.0, 1.0, 0.2, 1.0]
    m = np.array([1.0, 0.3, -0.8, 0.1, 1.0, 1.0, 1.0, 1.0, 2.0], np.float32)
    path = SolutionPath(pairs, entry, support, z, m, 10, {}, {"family": "x", "pairs": [], "checksum": 0})
    # earlier entry first (3 < 5 < 7); then larger support count (4); then larger z (3); then larger |m|
    # (|-0.8| > 0.3: 2 before 1); never-entered last even with a large z, ordered by z then |m|
    np.testing.assert_array_equal(path.rank(), [4, 3, 2, 1, 0, 7, 5, 8, 6])
    masks = path.masks(keep=0.5)
    assert masks.kept["blocks.0.qk"][0].tolist() == [2, 3]  # units 3, 2 of the qk pair
    assert masks.kept["blocks.0.mlp"][0].tolist() == [0, 3]  # units 4, 7
    assert masks.kept["blocks.0.qk"][1].tolist() == pytest.approx([-0.8, 0.1])
    assert masks.kept["blocks.0.mlp"][1].tolist() == [1.0, 1.0]
    assert path.masks(keep=0.5, values="ones").kept["blocks.0.qk"][1].tolist() == [1.0, 1.0]
    # keep=0.75 over 4 units: 3 kept
    assert path.masks(keep=0.75).kept["blocks.0.qk"][0].tolist() == [1, 2, 3]


def test_ranking_is_a_permutation(searched):
    path = searched[3]
    r = path.rank()
    assert sorted(r.tolist()) == list(range(path.entry.size))
    e = np.where(path.entry < 0, np.iinfo(np.int64).max, path.entry)[r]
    assert (np.diff(e) >= 0).all()


# --- masks: keep ratios ------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.3, 0.2])
def test_keep_ratio_per_type(keep):
    path = random_path(2)
    masks = path.masks(keep=keep)
    c = counts(path, masks)
    assert (c > 1).all(), "min_keep binds: choose another seed"
    kept = np.zeros(path.entry.size, bool)
    kept[kept_units(path, masks)] = True
    pos = np.empty(path.entry.size, int)
    pos[path.rank()] = np.arange(path.entry.size)
    for kind in ("qk", "vo", "mlp"):
        sel = [i for i, p in enumerate(path.pairs) if p.kind == kind]
        n_type = sum(path.pairs[i].size for i in sel)
        assert c[sel].sum() == round(keep * n_type)
        # one global threshold per type: every kept unit of the type outranks every dropped one
        of_type = path.kind == kind
        assert pos[of_type & kept].max() < pos[of_type & ~kept].min()


def test_keep_ratio_searched_path(searched):
    path = searched[3]
    for keep in (0.9, 0.5, 0.2):
        c = counts(path, path.masks(keep=keep))
        for kind in ("qk", "vo", "mlp"):
            sel = [i for i, p in enumerate(path.pairs) if p.kind == kind]
            n_type = sum(path.pairs[i].size for i in sel)
            want = round(keep * n_type)
            if (c[sel] > 1).all():
                assert c[sel].sum() == want
            else:
                assert c[sel].sum() >= want


def test_keep_dict_per_type():
    path = random_path(3)
    keep = {"qk": 0.5, "vo": 1.0, "mlp": 0.25}
    c = counts(path, path.masks(keep=keep))
    for kind, f in keep.items():
        sel = [i for i, p in enumerate(path.pairs) if p.kind == kind]
        assert c[sel].sum() == round(f * sum(path.pairs[i].size for i in sel))
    assert all(c[i] == p.size for i, p in enumerate(path.pairs) if p.kind == "vo")


def test_kept_values_and_costs():
    path = random_path(4)
    masks = path.masks(keep=0.4)
    for name, (idx, val) in masks.kept.items():
        i = [p.name for p in path.pairs].index(name)
        assert idx.dtype == torch.int64 and val.dtype == torch.float32
        assert (np.diff(idx.numpy()) > 0).all()
        np.testing.assert_array_equal(val.numpy(), path.m[path.offsets[i] + idx.numpy()])
    u = kept_units(path, masks)
    assert masks.params_kept == pytest.approx(path.params_cost[u].sum())
    assert masks.flops_kept == pytest.approx(path.flops_cost[u].sum())
    assert masks.params_total == sum(p.size * p.params_per_unit for p in path.pairs)
    s = masks.summary()
    assert s["params_kept_fraction"] == pytest.approx(masks.params_kept / masks.params_total)


# --- masks: budgets ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["params", "flops"])
@pytest.mark.parametrize("frac", [0.3, 0.55, 0.8, 1.0])
@pytest.mark.parametrize("source", ["hand_built", "searched"])
def test_budget_is_met_and_tight(kind, frac, source, searched):
    path = random_path(5) if source == "hand_built" else searched[3]
    cost = path.params_cost if kind == "params" else path.flops_cost
    budget = frac * cost.sum()
    masks = path.masks(**{kind: frac})
    kept = np.zeros(path.entry.size, bool)
    kept[kept_units(path, masks)] = True
    spent = cost[kept].sum()
    assert spent <= budget * (1 + 1e-9)
    assert (masks.params_kept if kind == "params" else masks.flops_kept) == pytest.approx(spent)
    rest = [u for u in path.rank() if not kept[u]]
    if rest:  # the next-ranked unit would not fit
        assert spent + cost[rest[0]] > budget
    else:
        assert frac == 1.0
    # the kept units of each pair are its best-ranked ones
    pos = np.empty(path.entry.size, int)
    pos[path.rank()] = np.arange(path.entry.size)
    for i in range(len(path.pairs)):
        mine = path.pair_id == i
        if (mine & ~kept).any():
            assert pos[mine & kept].max() < pos[mine & ~kept].min()


@pytest.mark.parametrize("target", [dict(params=0.5), dict(flops=0.45), dict(params=0.75, min_keep=9)])
def test_budget_with_round_to(target):
    path = random_path(6)
    kind = "params" if "params" in target else "flops"
    cost = path.params_cost if kind == "params" else path.flops_cost
    masks = path.masks(round_to=8, **target)
    c = counts(path, masks)
    sizes = np.array([p.size for p in path.pairs])
    assert ((c % 8 == 0) | (c == sizes)).all()
    assert (c >= np.minimum(sizes, 8)).all()
    if "min_keep" in target:
        assert (c >= np.minimum(sizes, 16)).all()  # min_keep=9 -> two groups of 8
    spent = float((c * cost[path.offsets]).sum())
    budget = target[kind] * cost.sum()
    assert spent <= budget * (1 + 1e-9)
    # the budget is used: growing the pair of the best dropped unit by one more group would exceed it
    kept = np.zeros(path.entry.size, bool)
    kept[kept_units(path, masks)] = True
    u = next(u for u in path.rank() if not kept[u])
    i = path.pair_id[u]
    assert spent + min(8, sizes[i] - c[i]) * cost[u] > budget


def test_round_to_keep():
    path = random_path(7)
    for keep in (0.9, 0.5, 0.2, 0.01):
        c = counts(path, path.masks(keep=keep, round_to=8))
        sizes = np.array([p.size for p in path.pairs])
        assert ((c % 8 == 0) | (c == sizes)).all()
        assert (c >= 8).all()


def test_min_keep():
    path = random_path(8)
    c = counts(path, path.masks(keep=0.01, min_keep=3))
    assert (c >= 3).all() and (c == 3).any()
    c = counts(path, path.masks(params=0.4, min_keep=5))
    assert (c >= 5).all()
    c = counts(path, path.masks(keep=0.01, min_keep=1000))  # more than a pair has: the whole pair
    assert (c == np.array([p.size for p in path.pairs])).all()
    assert (counts(path, path.masks(keep=0.01)) >= 1).all()  # default min_keep=1


@pytest.mark.parametrize("kind", ["params", "flops", "keep"])
def test_larger_budget_keeps_superset(kind):
    path = random_path(9)
    prev = None
    for frac in (0.15, 0.3, 0.45, 0.6, 0.8, 1.0):
        cur = set(kept_units(path, path.masks(**{kind: frac})).tolist())
        if prev is not None:
            assert prev <= cur and len(cur) > len(prev)
        prev = cur
    assert len(prev) == path.entry.size


def test_diagnostics():
    pairs = [PairSpec("blocks.0.mlp", "mlp", 0, 6, 3, 20)]
    fp = {"family": "x", "pairs": [], "checksum": 0}
    path = SolutionPath(pairs, [10, 20, 30, 40, -1, -1], [1] * 6, [0] * 6, np.ones(6, np.float32), 50, {}, fp)
    d = path.diagnostics()
    assert d["units"] == 6 and d["fraction_entered"] == pytest.approx(4 / 6)
    assert d["distinct_entry_steps"] == 4 and d["entry_step_q10_q50_q90"][1] == pytest.approx(25.0)
    assert d["degenerate"] and "distinct" in d["why"]
    same = SolutionPath(pairs, [7] * 6, [1] * 6, [0] * 6, np.ones(6, np.float32), 50, {}, fp).diagnostics()
    assert same["degenerate"] and same["distinct_entry_steps"] == 1
    none = SolutionPath(pairs, [-1] * 6, [0] * 6, [0] * 6, np.ones(6, np.float32), 50, {}, fp).diagnostics()
    assert none["degenerate"] and none["fraction_entered"] == 0
    spread = SolutionPath(pairs * 1, list(range(1, 6)) + [50], [1] * 6, [0] * 6, np.ones(6, np.float32), 50, {}, fp)
    assert spread.diagnostics()["distinct_entry_steps"] == 6
