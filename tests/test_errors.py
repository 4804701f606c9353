"""Bad input gets a clear ValueError / TypeError / FileNotFoundError naming what is wrong."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn as nn

import spp
from spp import SolutionPath
from helpers import make, quiet_search, tiny_bert


@pytest.fixture(scope="module")
def bert():
    """An attached 2-layer BERT, its batch and a short searched path."""
    model, batch = make("bert", seed=0, layers=2)
    handle = spp.attach(model)
    path = quiet_search(handle, batch, steps=20)
    yield model, handle, batch, path
    spp.detach(model)


# --- SolutionPath.masks ------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 0.0, 1.5, -0.1, math.nan, math.inf])
def test_keep_out_of_range(bert, keep):
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        bert[3].masks(keep=keep)


@pytest.mark.parametrize("keep", ["0.5", [0.5], True, torch.tensor(0.5), 1j])
def test_keep_wrong_type(bert, keep):
    with pytest.raises(TypeError, match="keep must be a number"):
        bert[3].masks(keep=keep)


def test_numpy_scalars_are_numbers(bert, tmp_path):
    import numpy as np

    a, b = bert[3].masks(keep=np.float32(0.5)), bert[3].masks(keep=0.5)
    assert a.widths() == b.widths()
    assert bert[3].masks(params=np.float64(0.6)).widths() == bert[3].masks(params=0.6).widths()
    with pytest.raises(ValueError, match="keep must be in"):
        bert[3].masks(keep=np.float32(np.nan))
    spp.save_pruned(spp.prune(bert[0], a), tmp_path)  # the target is recorded as JSON
    assert json.loads((tmp_path / "config.json").read_text())["masks"]["target"] == {"keep": 0.5}


def test_keep_dict_errors(bert):
    path = bert[3]
    with pytest.raises(ValueError, match=r"keep\['mlp'\] must be in"):
        path.masks(keep={"qk": 0.5, "vo": 0.5, "mlp": 2.0})
    with pytest.raises(ValueError, match="keep as a dict needs exactly the keys"):
        path.masks(keep={"qk": 0.5, "vo": 0.5})
    with pytest.raises(ValueError, match="keep as a dict needs exactly the keys"):
        path.masks(keep={"qk": 0.5, "vo": 0.5, "mlp": 0.5, "ffn": 0.5})


@pytest.mark.parametrize("kind", ["params", "flops"])
def test_budget_below_minimum(bert, kind):
    with pytest.raises(ValueError, match=f"{kind}=0.001 is below the minimum"):
        bert[3].masks(**{kind: 1e-3})
    with pytest.raises(ValueError, match=f"{kind}=0.3 is below the minimum .*round_to=8"):
        bert[3].masks(**{kind: 0.3}, round_to=8)  # 8 of 12 head channels are the least a pair keeps
    with pytest.raises(ValueError, match=rf"{kind} must be in \(0, 1\]"):
        bert[3].masks(**{kind: 1.2})
    with pytest.raises(TypeError, match=f"{kind} must be a number"):
        bert[3].masks(**{kind: "half"})


@pytest.mark.parametrize("kw", [dict(), dict(keep=0.5, params=0.5), dict(params=0.5, flops=0.5),
                                dict(keep=0.5, params=0.5, flops=0.5)])
def test_exactly_one_target(bert, kw):
    with pytest.raises(ValueError, match="exactly one of keep=, params=, flops="):
        bert[3].masks(**kw)


@pytest.mark.parametrize("name,value", [("round_to", 0), ("round_to", -8), ("round_to", 2.5), ("round_to", True),
                                        ("min_keep", 0), ("min_keep", None)])
def test_round_to_and_min_keep(bert, name, value):
    with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
        bert[3].masks(keep=0.5, **{name: value})


def test_values_option(bert):
    with pytest.raises(ValueError, match="values must be 'final' or 'ones'"):
        bert[3].masks(keep=0.5, values="random")


# --- unsupported models ------------------------------------------------------------------


def _gpt2():
    import transformers

    cfg = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    return transformers.GPT2Model(cfg)


@pytest.mark.parametrize("factory", [lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), _gpt2],
                         ids=["Sequential", "GPT2Model"])
def test_unsupported_model_lists_families(bert, factory):
    model = factory()
    for fn in (spp.attach, lambda m: spp.prune(m, bert[3].masks(keep=0.5))):
        with pytest.raises(ValueError, match="unsupported model") as info:
            fn(model)
        msg = str(info.value)
        assert "bert" in msg and "timm_vit" in msg, msg
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        spp.attach("bert-base-uncased")


def test_unsupported_bert_variant():
    with pytest.raises(ValueError, match="hidden_act"):
        spp.attach(tiny_bert(0, hidden_act="quick_gelu"))


# --- masks applied to the wrong model ----------------------------------------------------


@pytest.mark.parametrize("other_kw, needle", [
    (dict(seed=0, layers=3), "layer count"),
    (dict(seed=123, layers=2), "other weights"),  # same shapes, other weights
])
def test_masks_for_another_model(bert, other_kw, needle):
    masks = bert[3].masks(keep=0.5)
    other = tiny_bert(**other_kw)
    with pytest.raises(ValueError, match=needle):
        spp.prune(other, masks)
    h = spp.attach(other)
    try:
        with pytest.raises(ValueError, match=needle):
            h.set_masks(masks)
    finally:
        spp.detach(other)


def test_masks_for_other_family(bert):
    vit, _ = make("vit")
    with pytest.raises(ValueError, match="made for a bert model, not timm_vit"):
        spp.prune(vit, bert[3].masks(keep=0.5))


def test_prune_needs_a_maskset(bert):
    with pytest.raises(TypeError, match="masks must be a MaskSet"):
        spp.prune(bert[0], {"blocks.0.qk": [0, 1]})


def test_prune_of_pruned_model(bert):
    small = spp.prune(bert[0], bert[3].masks(keep=0.5))
    with pytest.raises(ValueError, match="other pairs"):
        spp.prune(small, bert[3].masks(keep=0.5))


# --- files -------------------------------------------------------------------------------


def test_path_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="path.json"):
        SolutionPath.load(str(tmp_path / "nope"))


def test_path_load_corrupt_json(bert, tmp_path):
    bert[3].save(str(tmp_path))
    (tmp_path / "path.json").write_bytes(os.urandom(64) + b"\xff\xfe{")
    with pytest.raises(ValueError, match=r"path\.json"):
        SolutionPath.load(str(tmp_path))


def test_path_load_malformed_json(bert, tmp_path):
    bert[3].save(str(tmp_path))
    meta = json.loads((tmp_path / "path.json").read_text())
    (tmp_path / "path.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(ValueError, match=r"path\.json.*not a spp-path file"):
        SolutionPath.load(str(tmp_path))
    del meta["pairs"]
    (tmp_path / "path.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"path\.json.*missing or malformed"):
        SolutionPath.load(str(tmp_path))


def test_path_load_truncated_safetensors(bert, tmp_path):
    bert[3].save(str(tmp_path))
    f = tmp_path / "path.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"path\.safetensors"):
        SolutionPath.load(str(tmp_path))
    os.remove(f)
    with pytest.raises(FileNotFoundError, match=r"path\.safetensors"):
        SolutionPath.load(str(tmp_path))


def test_path_load_mismatched_files(bert, tmp_path):
    """path.safetensors from another path than path.json."""
    bert[3].save(str(tmp_path / "a"))
    other, batch = make("bert", seed=0, layers=3)
    h3 = spp.attach(other)
    quiet_search(h3, batch, steps=10).save(str(tmp_path / "b"))
    spp.detach(other)
    os.replace(tmp_path / "b" / "path.safetensors", tmp_path / "a" / "path.safetensors")
    with pytest.raises(ValueError, match=r"path\.safetensors.*does not match"):
        SolutionPath.load(str(tmp_path / "a"))


@pytest.mark.parametrize("edit,match", [
    ({"format": "something-else"}, "not a spp-pruned-model file"),
    ({"version": 99}, "unsupported version 99"),
    ({"version": "1"}, "unsupported version"),
    ({"family": "gpt2"}, "unknown model family 'gpt2'"),
])
def test_load_pruned_bad_config(bert, tmp_path, edit, match):
    spp.save_pruned(spp.prune(bert[0], bert[3].masks(keep=0.5)), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(ValueError, match=match):
        spp.load_pruned(str(tmp_path))


def test_load_pruned_missing_and_truncated(bert, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        spp.load_pruned(str(tmp_path / "nope"))
    spp.save_pruned(spp.prune(bert[0], bert[3].masks(keep=0.5)), tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        spp.load_pruned(str(tmp_path))


def test_load_pruned_wrong_widths(bert, tmp_path):
    spp.save_pruned(spp.prune(bert[0], bert[3].masks(keep=0.5)), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["widths"]["blocks.0.mlp"] += 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match"):
        spp.load_pruned(str(tmp_path))


def test_save_pruned_unpruned_model(bert, tmp_path):
    with pytest.raises(ValueError, match="not a pruned model"):
        spp.save_pruned(tiny_bert(0), tmp_path)
    with pytest.raises(ValueError, match="not a pruned model"):
        spp.save_pruned(bert[0], tmp_path)  # attached is not pruned
    assert not any(tmp_path.iterdir())


# --- attach / detach / search ------------------------------------------------------------


def test_attach_twice(bert):
    model, handle = bert[0], bert[1]
    with pytest.raises(ValueError, match="already attached"):
        spp.attach(model)
    with pytest.raises(ValueError, match="already an SppHandle"):
        spp.attach(handle)
    small = spp.prune(model, bert[3].masks(keep=0.5))
    with pytest.raises(ValueError, match="already pruned"):
        spp.attach(small)


def test_attach_bad_seq_len():
    model = tiny_bert(0)
    for bad in (0, -3, 1.5):
        with pytest.raises(ValueError, match="seq_len"):
            spp.attach(model, seq_len=bad)
    spp.detach(spp.attach(model, seq_len=7))  # still attachable after the errors


def test_detach_unattached():
    with pytest.raises(ValueError, match="not attached"):
        spp.detach(tiny_bert(0))


@pytest.mark.parametrize("steps", [0, -1])
def test_search_bad_steps(bert, steps):
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        spp.search(bert[1], [bert[2]], steps=steps, progress=False)


def test_search_bad_data(bert):
    with pytest.raises(ValueError, match="data is empty"):
        spp.search(bert[1], [], steps=5, progress=False)
    with pytest.raises(ValueError, match="data is empty"):
        spp.search(bert[1], iter([]), steps=5, progress=False)
    with pytest.raises(TypeError, match="data must be an iterable"):
        spp.search(bert[1], 5, steps=5, progress=False)


def test_search_unattached_model():
    with pytest.raises(ValueError, match="not attached"):
        spp.search(tiny_bert(0), [{}], steps=5, progress=False)


def test_search_bad_loss(bert):
    with pytest.raises(ValueError, match="loss must be"):
        spp.search(bert[1], [bert[2]], steps=5, loss="mse", progress=False)
