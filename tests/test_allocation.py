"""Allocation policies on the path: per type (authors'), cost-aware global (+ layer floor), uniform."""
import numpy as np
import pytest
import torch

from spp.arena import PairSpec
from spp.path import SolutionPath


def hand_path(seed=0):
    # 3 layers x (qk 8, vo 8, mlp 24); layer 2's units all rank last
    pairs = []
    for l in range(3):
        pairs += [PairSpec(f"blocks.{l}.qk", "qk", l, 8, 40, 50), PairSpec(f"blocks.{l}.vo", "vo", l, 8, 40, 60),
                  PairSpec(f"blocks.{l}.mlp", "mlp", l, 24, 10, 20)]
    n = sum(p.size for p in pairs)
    rng = np.random.default_rng(seed)
    entry = rng.integers(1, 100, n)
    entry[2 * 40:] = -1  # layer 2 never entered
    fp = {"family": "bert", "pairs": [[p.name, p.size] for p in pairs], "checksum": 1.0}
    return SolutionPath(pairs, entry, np.zeros(n), rng.normal(size=n), np.ones(n, np.float32), 100, {}, fp)


def test_defaults_are_type_for_keep_and_global_for_budgets():
    p = hand_path()
    assert p.masks(keep=0.5).meta["allocation"] == "type"
    assert p.masks(params=0.5).meta["allocation"] == "global"


@pytest.mark.parametrize("target", [dict(keep=0.5), dict(params=0.5), dict(flops=0.25)])
def test_uniform_keeps_the_same_fraction_of_every_pair(target):
    p = hand_path()
    ms = p.masks(**target, allocation="uniform")
    frac = next(iter(target.values()))
    for pair in p.pairs:
        assert ms.widths()[pair.name] == max(1, round(frac * pair.size))
    # within a pair the best-ranked units are kept
    order = p.rank()
    pos = np.empty_like(order)
    pos[order] = np.arange(order.size)
    o = p.offsets[2]
    kept = ms.kept["blocks.0.mlp"][0].numpy()
    dropped = np.setdiff1d(np.arange(24), kept)
    assert pos[o + kept].max() < pos[o + dropped].min()


def test_global_follows_the_ranking_and_layer_floor_protects_late_layers():
    p = hand_path()
    ms = p.masks(params=0.5)
    assert all(ms.widths()[f"blocks.2.{k}"] == 1 for k in ("qk", "vo", "mlp"))  # min_keep only
    floored = p.masks(params=0.5, layer_floor=0.25)
    for pair in p.pairs:
        assert floored.widths()[pair.name] >= int(np.ceil(0.25 * pair.size))
    assert floored.params_kept <= 0.5 * floored.params_total + 1e-9


def test_bad_allocation_arguments():
    p = hand_path()
    with pytest.raises(ValueError, match="allocation"):
        p.masks(keep=0.5, allocation="per-head")
    with pytest.raises(ValueError, match="global"):
        p.masks(keep=0.5, allocation="global")
    with pytest.raises(ValueError, match="layer_floor"):
        p.masks(params=0.5, layer_floor=1.5)
    with pytest.raises(ValueError, match="params"):
        p.masks(params=0.3, layer_floor=0.9)


def test_default_round_to_follows_the_device_and_the_environment(monkeypatch):
    from spp.path import default_round_to

    monkeypatch.delenv("SPP_ROUND_TO", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_round_to() == 8
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_round_to() == 1
    monkeypatch.setenv("SPP_ROUND_TO", "4")
    assert default_round_to() == 4
    monkeypatch.setenv("SPP_ROUND_TO", "zero")
    with pytest.raises(ValueError, match="SPP_ROUND_TO must be a positive integer"):
        default_round_to()
