"""Llama / Mistral adapter: GQA + RoPE pairs + SwiGLU; pruned ≡ masked, cost model, save/load, search, generation."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import spp
from helpers import n_params, quiet_search, with_m
from tiny_models import tiny_llama, token_batch

TOL = 1e-5


@torch.no_grad()
def hidden(model, batch):
    out = model(**batch, output_hidden_states=True, use_cache=False)
    keep = batch["attention_mask"].bool()
    return [out.hidden_states[-1][keep], out.logits[keep]]


def err(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.fixture(scope="module", params=["llama", "mistral_sliding", "llama_bias_tied"])
def searched(request):
    fam = request.param
    model = tiny_llama(0, family="mistral" if fam.startswith("mistral") else "llama", bias=fam == "llama_bias_tied",
                       tie=fam == "llama_bias_tied", sliding_window=5 if fam == "mistral_sliding" else None)
    batch = token_batch(0)
    dense = hidden(model, batch)
    dense_count = n_params(model)
    handle = spp.attach(model)
    path = quiet_search(handle, batch, steps=12)
    assert path.steps == 12 and np.isfinite(path.z).all() and np.isfinite(path.m).all()  # the search ran
    # mask values far from 1 so that folding matters
    rng = np.random.default_rng(0)
    path = with_m(path, rng.uniform(0.3, 1.7, path.m.shape).astype(np.float32))
    yield model, handle, batch, dense, dense_count, path
    spp.detach(model)


def test_attach_is_exact_and_specs(searched):
    model, handle, batch, dense, dense_count, _ = searched
    handle.set_masks(None)
    assert err(hidden(model, batch), dense) <= 1e-5  # all masks 1: the original function (GEMM backend rounding only)
    sizes = {p.name: p.size for p in handle.specs}
    assert sizes["blocks.0.qk"] == 6 and sizes["blocks.0.vo"] == 12 and sizes["blocks.0.mlp"] == 80
    assert n_params(model) == dense_count


@pytest.mark.parametrize("target", [dict(keep=0.5), dict(keep=0.25), dict(params=0.6), dict(flops=0.5, round_to=2)],
                         ids=str)
def test_pruned_equals_masked_and_cost_model(searched, target):
    model, handle, batch, dense, dense_count, path = searched
    masks = path.masks(**target)
    widths = masks.widths()
    assert any(widths[p.name] < p.size for p in handle.specs)
    pruned = spp.prune(model, masks)
    handle.set_masks(masks)
    try:
        masked = hidden(model, batch)
    finally:
        handle.set_masks(None)
    got = hidden(pruned, batch)
    assert err(got, masked) <= TOL
    assert err(masked, dense) > 1e-3  # the masks changed the function
    dropped = sum((p.size - widths[p.name]) * p.params_per_unit for p in handle.specs)
    assert n_params(pruned) == dense_count - dropped
    # the pruned RoPE keeps the pruned pairs' original frequencies
    att = pruned.model.layers[0].self_attn
    kept = masks.kept["blocks.0.qk"][0].sort().values
    assert torch.equal(att.rope_idx, kept)
    assert att.scale == pytest.approx(12 ** -0.5)


def test_save_load_round_trip(searched, tmp_path):
    model, handle, batch, _, _, path = searched
    pruned = spp.prune(model, path.masks(keep=0.4))
    spp.save_pruned(pruned, str(tmp_path / "m"))
    loaded = spp.load_pruned(str(tmp_path / "m"))
    assert type(loaded) is type(pruned)
    assert err(hidden(loaded, batch), hidden(pruned, batch)) == 0.0


def test_greedy_generation_with_kv_cache_matches():
    model = tiny_llama(1, attn_impl="eager")
    handle = spp.attach(model)
    try:
        batch = token_batch(1, batch=1, pad=False)
        path = quiet_search(handle, batch, steps=8)
        rng = np.random.default_rng(1)
        path = with_m(path, rng.uniform(0.5, 1.5, path.m.shape).astype(np.float32))
        masks = path.masks(keep=0.5)
        pruned = spp.prune(model, masks)
        handle.set_masks(masks)
        gen = dict(do_sample=False, max_new_tokens=20, min_new_tokens=20, use_cache=True, pad_token_id=0)
        with torch.no_grad():
            a = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **gen)
            b = pruned.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **gen)
            # the cache path agrees with recomputing the whole prefix
            c = pruned.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                **{**gen, "use_cache": False})
        assert a.shape[1] == batch["input_ids"].shape[1] + 20
        assert torch.equal(a, b) and torch.equal(b, c)
    finally:
        handle.set_masks(None)
        spp.detach(model)


def test_left_padded_batch_generation_runs_the_op(monkeypatch):
    """Batched generation pads on the left, so the first queries of a padded row see no key. With
    "sdpa" Hugging Face builds a bool mask and SDPA gives those rows 0, as the op does: the prefill
    (causal ∧ left padding) and every decode step (key padding) run spp_kernels.attention, and the
    tokens equal those of the unattached model; masked and pruned give the same tokens too."""
    import spp_kernels

    model = tiny_llama(3)
    dense = copy.deepcopy(model)
    batch = token_batch(3, pad=False)
    batch["attention_mask"][1, :4] = 0  # left padding
    batch["attention_mask"][2, :1] = 0
    gen = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8, use_cache=True, pad_token_id=0)
    calls = []
    op = spp_kernels.attention

    def spy(q, k, v, scale, attn_mask=None, is_causal=False, **kw):
        calls.append((q.shape[2], attn_mask is not None, is_causal))
        return op(q, k, v, scale, attn_mask, is_causal, **kw)

    handle = spp.attach(model)
    try:
        with torch.no_grad():
            want = dense.generate(**batch, **gen)
            monkeypatch.setattr(spp_kernels, "attention", spy)
            got = model.generate(**batch, **gen)
            n_layers = len(model.model.layers)
            assert calls[:n_layers] == [(11, True, True)] * n_layers  # the prefill: causal ∧ left padding
            assert len(calls) == 8 * n_layers and all(c == (1, True, False) for c in calls[n_layers:])
            assert torch.equal(got, want)
        path = with_m(quiet_search(handle, batch, steps=6),
                      np.random.default_rng(3).uniform(0.5, 1.5, handle.arena.m.numel()).astype(np.float32))
        masks = path.masks(keep=0.5)
        pruned = spp.prune(model, masks)
        handle.set_masks(masks)
        with torch.no_grad():
            assert torch.equal(pruned.generate(**batch, **gen), model.generate(**batch, **gen))
    finally:
        handle.set_masks(None)
        spp.detach(model)


def test_bf16_weights_search_runs_with_fp32_masks():
    model = tiny_llama(2, layers=1, dtype=torch.bfloat16)
    handle = spp.attach(model)
    try:
        assert handle.arena.m.dtype == torch.float32
        path = quiet_search(handle, token_batch(2), steps=6)
        assert np.isfinite(path.m).all() and path.steps == 6
        pruned = spp.prune(model, path.masks(keep=0.5))
        assert next(pruned.parameters()).dtype == torch.bfloat16
        with torch.no_grad():
            assert torch.isfinite(pruned(**token_batch(2)).logits.float()).all()
    finally:
        spp.detach(model)


def test_activation_checkpointing_gives_the_same_mask_gradient():
    model = tiny_llama(3)
    handle = spp.attach(model)
    try:
        batch = token_batch(3)
        with torch.no_grad():
            handle.arena.m.mul_(torch.linspace(0.5, 1.5, handle.arena.numel))

        def grad():
            handle.arena.m.grad = None
            out, w = handle.adapter.forward(model, batch)
            (out.square().mean(-1) * w).sum().backward()
            return handle.arena.m.grad.clone()

        plain = grad()
        handle.adapter.set_checkpointing(model, True)
        assert "forward" in model.model.layers[0].__dict__
        ckpt = grad()
        handle.adapter.set_checkpointing(model, False)
        assert "forward" not in model.model.layers[0].__dict__
        assert plain.abs().max() > 0 and torch.allclose(ckpt, plain, rtol=1e-5, atol=1e-7)
    finally:
        spp.detach(model)
