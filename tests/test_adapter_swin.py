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


def test_window_attention_runs_the_op_with_its_bias(searched, monkeypatch):
    """Pruned window attention calls spp_kernels.attention with the relative position bias
    (1, H, N, N) and, in shifted blocks, bias + window mask (nW, H, N, N) — never a bias tiled to
    the batch of windows — and gives the masked model's numbers."""
    import spp_kernels

    model, handle, x, _, _, path = searched
    masks = path.masks(keep=0.5)
    pruned = spp.prune(model, masks)
    seen = []
    real = spp_kernels.attention

    def spy(q, k, v, scale, attn_mask=None, is_causal=False, bias=None):
        seen.append((q.shape[0], q.shape[-1], v.shape[-1], None if bias is None else tuple(bias.shape)))
        return real(q, k, v, scale, attn_mask, is_causal, bias=bias)

    monkeypatch.setattr(spp_kernels, "attention", spy)
    got = outs(pruned, x)
    blocks = [b for s in model.layers for b in s.blocks]
    assert len(seen) == 2 * len(blocks)  # two forwards (features, logits)
    for (windows, D, Dv, bias), blk in zip(seen, blocks):
        heads, n = blk.attn.num_heads, blk.attn.relative_position_index.shape[0]
        nw = 1 if blk.attn_mask is None else blk.attn_mask.shape[0]
        tokens = blk.input_resolution[0] * blk.input_resolution[1]
        assert bias == (nw, heads, n, n) and windows == x.shape[0] * tokens // n
    assert any(b.attn_mask is not None for b in blocks) and any(D != Dv for _, D, Dv, _ in seen)
    monkeypatch.undo()
    handle.set_masks(masks)
    try:
        masked = outs(model, x)
    finally:
        handle.set_masks(None)
    assert err(got, masked) <= TOL


def _table_grads(model, x):
    tables = [b.attn.relative_position_bias_table for s in model.layers for b in s.blocks]
    flags = [t.requires_grad for t in tables]
    try:
        for t in tables:
            t.requires_grad_(True)
        return torch.autograd.grad(model.forward_features(x).square().sum(), tables)
    finally:
        for t, f in zip(tables, flags):
            t.requires_grad_(f)


def test_relative_position_bias_gradients(searched):
    """Fine-tuning trains the relative position tables: their gradients through the attached
    model at m = 1 (the op's bias gradient on the SDPA route, shifted windows included) equal
    timm's, and through the pruned model (the chunked route at unequal widths) the masked one's."""
    model, handle, x, _, _, path = searched
    handle.set_masks(None)
    got, want = _table_grads(model, x), _table_grads(tiny_swin(0), x)  # tiny_swin(0): the same weights
    for i, (a, b) in enumerate(zip(got, want)):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"block {i}")
    masks = path.masks(keep=0.5)
    pruned = spp.prune(model, masks)
    assert any(b.attn.qk_dim != b.attn.v_dim for s in pruned.layers for b in s.blocks)
    got = _table_grads(pruned, x)
    handle.set_masks(masks)
    try:
        want = _table_grads(model, x)
    finally:
        handle.set_masks(None)
    for i, (a, b) in enumerate(zip(got, want)):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"pruned block {i}")
