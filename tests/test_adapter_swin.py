"""timm Swin adapter: window attention with relative position bias; pruned ≡ masked, cost model, save/load."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import spp
from helpers import n_params, quiet_search, with_m
from tiny_models import image_batch, tiny_swin

TOL = 1e-5


@torch.no_grad()
def outs(model, x):
    return [model.forward_features(x), model(x)]


def err(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def searched():
    model = tiny_swin(0)
    x = image_batch(0)
    dense = outs(model, x)
    dense_count = n_params(model)
    handle = spp.attach(model)
    path = quiet_search(handle, x, steps=12)
    assert path.steps == 12 and np.isfinite(path.z).all() and np.isfinite(path.m).all()  # the search ran
    path = with_m(path, np.random.default_rng(0).uniform(0.3, 1.7, path.m.shape).astype(np.float32))
    yield model, handle, x, dense, dense_count, path
    spp.detach(model)


def test_attach_keeps_outputs(searched):
    model, handle, x, dense, dense_count, _ = searched
    handle.set_masks(None)
    assert err(outs(model, x), dense) <= 1e-5
    assert [p.size for p in handle.specs[:3]] == [8, 8, 32] and len(handle.specs) == 12
    assert n_params(model) == dense_count


@pytest.mark.parametrize("target", [dict(keep=0.5), dict(keep=0.2), dict(params=0.6)], ids=str)
def test_pruned_equals_masked_and_cost_model(searched, target):
    model, handle, x, dense, dense_count, path = searched
    masks = path.masks(**target)
    widths = masks.widths()
    pruned = spp.prune(model, masks)
    handle.set_masks(masks)
    try:
        masked = outs(model, x)
    finally:
        handle.set_masks(None)
    assert err(outs(pruned, x), masked) <= TOL
    assert err(masked, dense) > 1e-3
    dropped = sum((p.size - widths[p.name]) * p.params_per_unit for p in handle.specs)
    assert dropped > 0 and n_params(pruned) == dense_count - dropped
    a0 = pruned.layers[0].blocks[0].attn
    assert a0.scale == pytest.approx(8 ** -0.5)
    assert a0.relative_position_bias_table.shape == (49, 2)  # per head, untouched by the widths


def test_save_load_round_trip(searched, tmp_path):
    model, handle, x, _, _, path = searched
    pruned = spp.prune(model, path.masks(keep=0.4))
    spp.save_pruned(pruned, str(tmp_path / "m"))
    loaded = spp.load_pruned(str(tmp_path / "m"))
    assert err(outs(loaded, x), outs(pruned, x)) == 0.0
