"""Baseline rankings: magnitude by hand, Taylor and activation scores vanish for a dead unit."""
import numpy as np
import pytest
import torch

import spp
from spp.baselines import activation_scores, magnitude_scores, random_path, taylor_path, torch_pruning_path
from helpers import HEAD_DIM, HEADS, bert_batch, tiny_bert


def test_magnitude_matches_hand_computed_norms():
    model = tiny_bert()
    h = spp.attach(model)
    s = magnitude_scores(h)
    attn, mlp = h.adapter.parts(h.adapter.blocks(model)[1])
    off = {p.name: h.arena.offsets[p.name] for p in h.specs}
    j = 5  # qk unit 5 of layer 1: rows j, j+12, j+24, j+36 of W_q and W_k
    rows = [hd * HEAD_DIM + j for hd in range(HEADS)]
    want = attn.q.weight[rows].detach().norm() * attn.k.weight[rows].detach().norm()
    assert s[off["blocks.1.qk"] + j] == pytest.approx(float(want), rel=1e-5)
    want = attn.v.weight[rows].detach().norm() * attn.o.weight[:, rows].detach().norm()
    assert s[off["blocks.1.vo"] + j] == pytest.approx(float(want), rel=1e-5)
    u = 17
    want = mlp.fc1.weight[u].detach().norm() * mlp.fc2.weight[:, u].detach().norm()
    assert s[off["blocks.1.mlp"] + u] == pytest.approx(float(want), rel=1e-5)


def test_magnitude_on_gqa_rotary_gated_blocks():
    """Llama: a qk unit is a rotary pair (channels p and p + P of every q and kv head), a vo unit a
    value channel of every kv head (and the o columns of the query heads sharing it), an mlp unit
    gate row × up row × down column."""
    from tiny_models import tiny_llama

    model = tiny_llama(1)
    h = spp.attach(model)
    s = magnitude_scores(h)
    assert s.shape == (h.arena.numel,) and np.all(s > 0)
    attn, mlp = h.adapter.parts(h.adapter.blocks(model)[1])
    H, G, D, P = attn.num_heads, attn.num_kv_heads, attn.qk_dim, attn.units_qk
    off = h.arena.offsets
    p = 4
    q_rows = [hd * D + c for hd in range(H) for c in (p, p + P)]
    k_rows = [hd * D + c for hd in range(G) for c in (p, p + P)]
    want = attn.q.weight[q_rows].detach().norm() * attn.k.weight[k_rows].detach().norm()
    assert s[off[f"{h.adapter.block_name(1)}.qk"] + p] == pytest.approx(float(want), rel=1e-5)
    c, Dv = 7, attn.v_dim
    want = attn.v.weight[[g * Dv + c for g in range(G)]].detach().norm() * \
        attn.o.weight[:, [hd * Dv + c for hd in range(H)]].detach().norm()
    assert s[off[f"{h.adapter.block_name(1)}.vo"] + c] == pytest.approx(float(want), rel=1e-5)
    u = 11
    want = mlp.fc1.weight[u].detach().norm() * mlp.up.weight[u].detach().norm() * mlp.fc2.weight[:, u].detach().norm()
    assert s[off[f"{h.adapter.block_name(1)}.mlp"] + u] == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt", "clip", "swin"])
def test_magnitude_and_activation_rankings_on_every_family(family):
    import tiny_models

    model = getattr(tiny_models, f"tiny_{family}")(0)
    batch = {"clip": tiny_models.clip_batch, "swin": tiny_models.image_batch}.get(family, tiny_models.token_batch)
    h = spp.attach(model)
    path = spp.baselines.magnitude_path(h)
    assert path.z.shape == (h.arena.numel,) and np.all(path.z > 0)
    assert spp.prune(h.model, path.masks(keep=0.5)) is not None
    act = activation_scores(h, [batch(2), batch(3)])
    assert act.shape == (h.arena.numel,) and np.all(np.isfinite(act)) and np.all(act >= 0)
    assert np.count_nonzero(act) > act.size // 2


def test_dead_unit_scores_zero_and_live_units_do_not():
    model = tiny_bert()
    layer = model.encoder.layer[0]
    with torch.no_grad():
        layer.output.dense.weight[:, 7] = 0.0  # mlp unit 7 of layer 0 no longer reaches the output
    h = spp.attach(model)
    data = [bert_batch(seed=s) for s in range(3)]
    o = h.arena.offsets["blocks.0.mlp"]
    for scores in (taylor_path(h, data).z, activation_scores(h, data)):
        assert scores.shape == (h.arena.numel,)
        assert scores[o + 7] == 0.0
        assert np.all(scores >= 0) and np.count_nonzero(scores) == scores.size - 1


def test_taylor_leaves_the_model_as_it_was():
    model = tiny_bert()
    h = spp.attach(model)
    req = [p.requires_grad for p in model.parameters()]
    taylor_path(h, [bert_batch()])
    assert [p.requires_grad for p in model.parameters()] == req and h.arena.m.grad is None


def test_random_path_is_seeded():
    h = spp.attach(tiny_bert())
    np.testing.assert_array_equal(random_path(h, seed=3).z, random_path(h, seed=3).z)
    assert not np.array_equal(random_path(h, seed=3).z, random_path(h, seed=4).z)


def test_empty_data_is_refused():
    h = spp.attach(tiny_bert())
    with pytest.raises(ValueError, match="empty"):
        taylor_path(h, [])
    with pytest.raises(ValueError, match="empty"):
        activation_scores(h, [])


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_torch_pruning_baseline(importance):
    model = tiny_bert()
    layer = model.encoder.layer[1]
    fc1, fc2 = layer.intermediate.dense, layer.output.dense
    with torch.no_grad():  # mlp unit 3 of layer 1 is dead: no weights in or out
        fc1.weight[3] = 0.0
        fc1.bias[3] = 0.0
        fc2.weight[:, 3] = 0.0
    h = spp.attach(model)
    p = torch_pruning_path(h, [bert_batch(seed=s) for s in range(2)], importance)
    o = h.arena.offsets["blocks.1.mlp"]
    mlp = p.z[o:o + h.arena.pair("blocks.1.mlp").size]
    assert p.z.shape == (h.arena.numel,) and np.all(np.isfinite(p.z))
    assert mlp[3] == mlp.min() and mlp[3] < 1e-6 * mlp.max()
    if importance == "magnitude":  # the L2 group norm of the unit's fc1 row, bias and fc2 column
        want = fc1.weight.detach().pow(2).sum(1) + fc1.bias.detach().pow(2) + fc2.weight.detach().pow(2).sum(0)
        assert np.array_equal(np.argsort(mlp), np.argsort(want.numpy()))
    assert torch.all(h.arena.m == 1)  # the attached model is untouched
