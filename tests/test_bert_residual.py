"""Pruned BERT blocks add their residual inside the pairs' second GEMM (``adds_input``) and keep
only the LayerNorm of BertSelfOutput / BertOutput: same function as the masked model in eval and
in training (dropout before the add, drawn in the same order), same state-dict keys, and the same
again after save / load and on the oneDNN path."""
from __future__ import annotations

import pytest
import torch
import transformers

import spp
import spp_kernels._linear as lin_mod
from helpers import HEADS, HIDDEN, VOCAB, bert_batch, max_err, quiet_search
from spp.adapters.bert import NormOnly

DROP = 0.3


def _bert(seed=0):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                                  intermediate_size=2 * HIDDEN, max_position_embeddings=32, type_vocab_size=2,
                                  hidden_dropout_prob=DROP, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


@pytest.fixture(scope="module")
def setup():
    model = _bert()
    batch = bert_batch(0)
    handle = spp.attach(model)
    path = quiet_search(handle, batch, steps=30)
    masks = path.masks(keep=0.5)
    pruned = spp.prune(model, masks)
    yield model, handle, batch, masks, pruned
    spp.detach(model)


def _run(model, batch, train=False, seed=0):
    model.train(train)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    model.eval()
    return out[batch["attention_mask"].bool()]


def test_structure_and_keys(setup):
    model, handle, batch, masks, pruned = setup
    for block in pruned.encoder.layer:
        assert isinstance(block.attention.output, NormOnly) and isinstance(block.output, NormOnly)
        attn, mlp = block.attention.self, block.intermediate
        assert attn.adds_input and mlp.adds_input
        assert attn.out_drop.p == DROP and mlp.drop.p == DROP
        assert not attn.out_drop.training and not mlp.drop.training  # the eval model stays in eval
    keys = set(pruned.state_dict())
    assert "encoder.layer.0.attention.output.LayerNorm.weight" in keys and "encoder.layer.1.output.LayerNorm.bias" in keys
    assert not any(".output.dense." in k for k in keys)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("onednn", [False, True], ids=["aten", "onednn"])
def test_same_function_as_masked(setup, train, onednn, monkeypatch):
    model, handle, batch, masks, pruned = setup
    if onednn:
        if not lin_mod.onednn_status()[0]:
            pytest.skip(lin_mod.onednn_status()[1])
        monkeypatch.setattr(lin_mod, "MIN_MACS", 0)
    handle.set_masks(masks)
    try:
        masked = _run(model, batch, train, seed=5)
    finally:
        handle.set_masks(None)
    got = _run(pruned, batch, train, seed=5)
    assert max_err([got], [masked]) <= 1e-5
    if train:  # dropout really ran: another seed differs
        assert max_err([_run(pruned, batch, True, seed=6)], [got]) > 1e-2
    else:
        assert torch.equal(_run(pruned, batch), got)


def test_save_load_keeps_the_fusion(setup, tmp_path):
    model, handle, batch, masks, pruned = setup
    spp.save_pruned(pruned, str(tmp_path / "m"))
    loaded = spp.load_pruned(str(tmp_path / "m"))
    assert all(isinstance(b.output, NormOnly) and b.intermediate.adds_input for b in loaded.encoder.layer)
    assert max_err([_run(loaded, batch)], [_run(pruned, batch)]) <= 1e-6


def test_gradients_flow_through_the_fused_residual(setup):
    model, handle, batch, masks, pruned = setup
    emb = pruned.embeddings.word_embeddings.weight
    emb.grad = None
    pruned(**batch).last_hidden_state.square().mean().backward()
    g = emb.grad
    assert g is not None and torch.isfinite(g).all() and float(g.abs().sum()) > 0
    pruned.zero_grad(set_to_none=True)
