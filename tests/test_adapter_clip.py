"""CLIP adapter: both towers with their own pairs; pruned ≡ masked, cost model, save/load, search."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import spp
from helpers import n_params, quiet_search, with_m
from tiny_models import clip_batch, tiny_clip

TOL = 1e-5


@torch.no_grad()
def outs(model, batch):
    out = model(**batch, output_hidden_states=True)
    return [out.image_embeds, out.text_embeds, out.logits_per_image, out.vision_model_output.last_hidden_state,
            out.text_model_output.last_hidden_state[batch["attention_mask"].bool()]]


def err(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def searched(request):
    model = tiny_clip(0, act=request.param)
    batch = clip_batch(0)
    dense = outs(model, batch)
    dense_count = n_params(model)
    handle = spp.attach(model)
    path = quiet_search(handle, batch, steps=12)
    assert path.steps == 12 and np.isfinite(path.z).all() and np.isfinite(path.m).all()  # the search ran
    path = with_m(path, np.random.default_rng(0).uniform(0.3, 1.7, path.m.shape).astype(np.float32))
    yield model, handle, batch, dense, dense_count, path
    spp.detach(model)


def test_attach_keeps_outputs_and_names_both_towers(searched):
    model, handle, batch, dense, dense_count, _ = searched
    handle.set_masks(None)
    assert err(outs(model, batch), dense) <= 1e-5  # GEMM backend rounding only
    names = [p.name for p in handle.specs]
    assert names[:3] == ["vision.blocks.0.qk", "vision.blocks.0.vo", "vision.blocks.0.mlp"]
    assert "text.blocks.1.mlp" in names and len(names) == 12
    assert n_params(model) == dense_count


@pytest.mark.parametrize("target", [dict(keep=0.5), dict(keep=0.2), dict(params=0.6)], ids=str)
def test_pruned_equals_masked_and_cost_model(searched, target):
    model, handle, batch, dense, dense_count, path = searched
    masks = path.masks(**target)
    widths = masks.widths()
    pruned = spp.prune(model, masks)
    handle.set_masks(masks)
    try:
        masked = outs(model, batch)
    finally:
        handle.set_masks(None)
    assert err(outs(pruned, batch), masked) <= TOL
    assert err(masked, dense) > 1e-3
    dropped = sum((p.size - widths[p.name]) * p.params_per_unit for p in handle.specs)
    assert dropped > 0 and n_params(pruned) == dense_count - dropped
    assert pruned.text_projection.weight.shape == model.text_projection.weight.shape  # joint space unchanged
    assert pruned.visual_projection.weight.shape == model.visual_projection.weight.shape


def test_save_load_round_trip(searched, tmp_path):
    model, handle, batch, _, _, path = searched
    pruned = spp.prune(model, path.masks(keep=0.4))
    spp.save_pruned(pruned, str(tmp_path / "m"))
    loaded = spp.load_pruned(str(tmp_path / "m"))
    assert err(outs(loaded, batch), outs(pruned, batch)) == 0.0
