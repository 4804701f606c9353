"""Physical pruning is exact: ``spp.prune(model, masks)(x) == masked model (dropped units 0)(x)``.

For random-init BERT (padded row, odd sequence length) and timm ViT / distilled DeiT, at several
targets read off a searched path, with mask values far from 1 so that folding really matters.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import spp
from helpers import FAMILIES, HEAD_DIM, make, max_err, n_params, outputs, quiet_search, with_m

TOL = 1e-5  # fp32

TARGETS = [
    dict(keep=0.9),
    dict(keep=0.5),
    dict(keep=0.2),
    dict(keep=0.5, round_to=8),
    dict(keep=0.2, round_to=8),
    dict(params=0.5),
    dict(params=0.7, round_to=8),
    dict(flops=0.4),
]


@pytest.fixture(scope="module", params=FAMILIES)
def searched(request):
    """An attached tiny model of each family, its dense reference outputs and a searched path."""
    family = request.param
    model, batch = make(family, seed=0, layers=3 if family == "bert" else 2)
    dense = outputs(model, batch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = spp.attach(model)
    path = quiet_search(handle, batch, steps=40)
    yield family, model, handle, batch, dense, path, state
    spp.detach(model)


@pytest.fixture
def env(searched):
    yield searched
    searched[2].set_masks(None)


def _dropped_params(handle, masks) -> int:
    return sum((p.size - masks.widths()[p.name]) * p.params_per_unit for p in handle.specs)


def _check_exact(model, handle, batch, masks):
    pruned = spp.prune(model, masks)
    handle.set_masks(masks)
    masked = outputs(model, batch)
    got = outputs(pruned, batch)
    err = max_err(got, masked)
    assert err <= TOL, f"pruned vs masked max abs error {err:.3g}"
    return pruned, masked


def test_attach_keeps_outputs(env):
    family, model, handle, batch, dense, path, _ = env
    handle.set_masks(None)
    assert float(handle.arena.m.detach().min()) == 1.0 and handle.arena.numel == sum(p.size for p in handle.specs)
    assert max_err(outputs(model, batch), dense) <= 1e-6


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: ",".join(f"{k}={v}" for k, v in t.items()))
def test_pruned_equals_masked(env, target):
    family, model, handle, batch, dense, path, state = env
    dense_count = n_params(model)  # attached: same parameters as the original model
    masks = path.masks(**target)
    widths = masks.widths()
    assert any(widths[p.name] < p.size for p in handle.specs), "target pruned nothing"
    pruned, masked = _check_exact(model, handle, batch, masks)
    # the masks really changed the function
    assert max_err(masked[:1], dense[:1]) > 1e-3
    # physically narrower, by exactly the cost model's parameter count
    assert n_params(pruned) == dense_count - _dropped_params(handle, masks)
    assert n_params(pruned) == round(masks.params_kept + (dense_count - masks.params_total))
    assert handle.adapter.widths(pruned) == widths
    if "round_to" in target:
        assert all(w % 8 == 0 or w == p.size for p, w in zip(handle.specs, widths.values()))
    # the input model is untouched by prune
    assert handle.adapter.widths(model) == {p.name: p.size for p in handle.specs}
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items() if k in now)
    assert spp.handle.get_handle(pruned) is None and spp.handle.get_handle(model) is handle


@pytest.mark.parametrize("how", ["path_m", "edit_kept"])
def test_folding_far_from_one(env, how):
    """Kept mask values far from 1 (and negative ones) are folded into the weights exactly."""
    family, model, handle, batch, dense, path, _ = env
    rng = np.random.default_rng(7)
    if how == "path_m":
        m = rng.uniform(0.2, 3.0, path.m.size).astype(np.float32) * rng.choice([-1, 1], path.m.size)
        masks = with_m(path, m).masks(keep=0.5)
        for name, (idx, val) in masks.kept.items():  # kept values are the path's final m
            off = path.offsets[[p.name for p in path.pairs].index(name)]
            np.testing.assert_array_equal(val.numpy(), m[off + idx.numpy()])
    else:
        base = path.masks(params=0.6)
        kept = {n: (i, torch.from_numpy(rng.uniform(0.1, 4.0, i.numel()).astype(np.float32))) for n, (i, v) in base.kept.items()}
        masks = copy.copy(base)
        masks.kept = kept
    _, masked = _check_exact(model, handle, batch, masks)
    # folding matters: the same units at value 1 give another function
    ones = spp.MaskSet({n: (i, torch.ones_like(v)) for n, (i, v) in masks.kept.items()}, masks.sizes,
                       masks.fingerprint, 0, 0, 0, 0)
    handle.set_masks(ones)
    assert max_err(outputs(model, batch), masked) > 1e-2


def test_attention_scale_is_original(env):
    family, model, handle, batch, dense, path, _ = env
    pruned = spp.prune(model, path.masks(keep=0.2))
    attns = [handle.adapter.parts(b)[0] for b in handle.adapter.blocks(pruned)]
    assert any(a.qk_dim < HEAD_DIM for a in attns)
    for a in attns:
        assert a.scale == pytest.approx(1.0 / math.sqrt(HEAD_DIM), rel=1e-7)


def test_save_load_roundtrip(env, tmp_path):
    family, model, handle, batch, dense, path, _ = env
    m = np.random.default_rng(3).uniform(0.3, 2.0, path.m.size).astype(np.float32)
    pruned = spp.prune(model, with_m(path, m).masks(keep=0.5, round_to=8))
    spp.save_pruned(pruned, tmp_path / "out")
    loaded = spp.load_pruned(str(tmp_path / "out"))
    assert type(loaded) is type(pruned)
    assert handle.adapter.widths(loaded) == handle.adapter.widths(pruned)
    sd_a, sd_b = pruned.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert max_err(outputs(loaded, batch), outputs(pruned, batch)) == 0.0
    # a loaded pruned model can be saved again and is recognised as pruned
    spp.save_pruned(loaded, tmp_path / "again")
    with pytest.raises(ValueError, match="already"):
        spp.attach(loaded)


def test_prune_unattached_equals_attached():
    """prune works on a plain (never attached) model and gives the same narrow model."""
    model, batch = make("vit", seed=1)
    plain = copy.deepcopy(model)
    handle = spp.attach(model)
    path = quiet_search(handle, batch, steps=30)
    masks = path.masks(keep=0.4)
    a, b = spp.prune(model, masks), spp.prune(plain, masks)
    assert max_err(outputs(a, batch), outputs(b, batch)) == 0.0
    assert n_params(b) == n_params(plain) - _dropped_params(handle, masks)
    assert not any(isinstance(mod, spp.layers.MaskedAttention) for mod in plain.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_detach_restores(family):
    model, batch = make(family, seed=2)
    originals = [type(m) for m in model.modules()]
    dense = outputs(model, batch)
    handle = spp.attach(model)
    path = quiet_search(handle, batch, steps=30)
    handle.set_masks(path.masks(keep=0.3))
    assert max_err(outputs(model, batch), dense) > 1e-3
    spp.detach(handle)
    assert [type(m) for m in model.modules()] == originals
    assert max_err(outputs(model, batch), dense) == 0.0
    handle2 = spp.attach(model)  # attachable again after detach
    assert max_err(outputs(model, batch), dense) <= 1e-6
    spp.detach(model)
    assert handle2.arena is not handle.arena


TIMM_VARIANTS = [
    dict(act_layer=torch.nn.ReLU, norm_layer=torch.nn.LayerNorm),  # non-default activation and LayerNorm eps
    dict(act_layer="gelu_tanh"),  # timm's own activation class
    dict(global_pool="avg", class_token=False),  # final norm lives in fc_norm
    dict(global_pool="avg", pool_include_prefix=True),
    dict(global_pool="avg", fc_norm=False),
    dict(reg_tokens=2, no_embed_class=True),
    dict(pos_embed="none"),
    dict(proj_bias=False),
    dict(qkv_bias=False),
    dict(init_values=1e-5, pre_norm=True),
    dict(mlp_ratio=2.5),
]


@pytest.mark.parametrize("kw", TIMM_VARIANTS, ids=lambda kw: ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in kw.items()))
def test_timm_variants_exact_and_reload(kw, tmp_path):
    """ViT options that change the function or the parameter set survive prune -> save -> load."""
    from helpers import tiny_vit, vit_batch

    model, x = tiny_vit(4, **kw), vit_batch(4)
    handle = spp.attach(model)
    masks = quiet_search(handle, x, steps=12).masks(keep=0.5, round_to=4)
    pruned, _ = _check_exact(model, handle, x, masks)
    assert n_params(pruned) == n_params(model) - _dropped_params(handle, masks)
    spp.save_pruned(pruned, tmp_path)
    loaded = spp.load_pruned(str(tmp_path))
    assert type(loaded) is type(pruned)
    assert max_err(outputs(loaded, x), outputs(pruned, x)) == 0.0
    spp.detach(model)
