"""OPT adapter: biases, ReLU MLP, learned positions, tied lm_head; pruned ≡ masked, cost model, save/load,
search, greedy generation with the KV cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import spp
from helpers import n_params, quiet_search, with_m
from tiny_models import tiny_opt, token_batch

TOL = 1e-5


@torch.no_grad()
def hidden(model, batch):
    out = model(**batch, output_hidden_states=True, use_cache=False)
    keep = batch["attention_mask"].bool()
    return [out.hidden_states[-1][keep], out.logits[keep]]


def err(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def searched():
    model = tiny_opt(0)
    batch = token_batch(0)
    dense = hidden(model, batch)
    dense_count = n_params(model)
    handle = spp.attach(model)
    path = quiet_search(handle, batch, steps=12)
    assert path.steps == 12 and np.isfinite(path.z).all() and np.isfinite(path.m).all()  # the search ran
    rng = np.random.default_rng(0)
    path = with_m(path, rng.uniform(0.3, 1.7, path.m.shape).astype(np.float32))
    yield model, handle, batch, dense, dense_count, path
    spp.detach(model)


def test_attach_keeps_outputs(searched):
    model, handle, batch, dense, dense_count, _ = searched
    handle.set_masks(None)
    assert err(hidden(model, batch), dense) <= 1e-5  # GEMM backend rounding only
    assert {p.name: p.size for p in handle.specs}["blocks.1.mlp"] == 96
    assert n_params(model) == dense_count


@pytest.mark.parametrize("target", [dict(keep=0.5), dict(keep=0.2), dict(params=0.6), dict(flops=0.5, round_to=4)],
                         ids=str)
def test_pruned_equals_masked_and_cost_model(searched, target):
    model, handle, batch, dense, dense_count, path = searched
    masks = path.masks(**target)
    widths = masks.widths()
    pruned = spp.prune(model, masks)
    handle.set_masks(masks)
    try:
        masked = hidden(model, batch)
    finally:
        handle.set_masks(None)
    assert err(hidden(pruned, batch), masked) <= TOL
    assert err(masked, dense) > 1e-3
    dropped = sum((p.size - widths[p.name]) * p.params_per_unit for p in handle.specs)
    assert dropped > 0 and n_params(pruned) == dense_count - dropped
    assert pruned.model.decoder.layers[0].self_attn.scale == pytest.approx(12 ** -0.5)


def test_save_load_round_trip(searched, tmp_path):
    model, handle, batch, _, _, path = searched
    pruned = spp.prune(model, path.masks(keep=0.4))
    spp.save_pruned(pruned, str(tmp_path / "m"))
    loaded = spp.load_pruned(str(tmp_path / "m"))
    assert type(loaded) is type(pruned)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.decoder.embed_tokens.weight.data_ptr()  # still tied
    assert err(hidden(loaded, batch), hidden(pruned, batch)) == 0.0


def test_greedy_generation_with_kv_cache_matches():
    model = tiny_opt(1, attn_impl="eager")
    handle = spp.attach(model)
    try:
        batch = token_batch(1, batch=1, pad=False)
        path = quiet_search(handle, batch, steps=8)
        path = with_m(path, np.random.default_rng(1).uniform(0.5, 1.5, path.m.shape).astype(np.float32))
        masks = path.masks(keep=0.5)
        pruned = spp.prune(model, masks)
        handle.set_masks(masks)
        gen = dict(do_sample=False, max_new_tokens=20, min_new_tokens=20, use_cache=True, pad_token_id=0)
        with torch.no_grad():
            a = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **gen)
            b = pruned.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **gen)
        assert a.shape[1] == batch["input_ids"].shape[1] + 20 and torch.equal(a, b)
    finally:
        handle.set_masks(None)
        spp.detach(model)
