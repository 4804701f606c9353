"""spp.search: the schedule, the calibration, and the degenerate case of SPEC §6."""
import math
import warnings

import numpy as np
import pytest
import torch
import transformers

import spp
import spp_kernels
from spp.search import SearchConfig
from helpers import make, quiet_search


def tiny_bert(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def data(n=4, seed=1, rows=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 97, (rows, 9), generator=g)
        am = torch.ones_like(ids)
        am[0, 6:] = 0
        out.append({"input_ids": ids, "attention_mask": am})
    return out


def test_auto_lambda_is_entry_frac_of_the_post_warmup_step_sum():
    cfg = SearchConfig(steps=50, lr=0.05, warmup_frac=0.2, entry_frac=0.25)
    rho = [spp_kernels.inclusion_scalars(t, 0.05, 0.9, 0.999, 1.0, "adamw")["rho"] for t in range(11, 51)]
    assert cfg.warmup_steps == 10
    assert cfg.resolved_lam() == pytest.approx(0.25 * sum(rho), rel=1e-12)
    assert SearchConfig(lam=3.0).resolved_lam() == 3.0


def test_entries_start_after_warmup_and_the_path_is_informative():
    model = tiny_bert()
    h = spp.attach(model)
    path = spp.search(h, data(), steps=80, progress=False)
    cfg = SearchConfig(steps=80)
    entered = path.entry[path.entry >= 0]
    assert entered.size > 0 and entered.min() > cfg.warmup_steps
    d = path.diagnostics()
    assert not d["degenerate"], d
    assert d["distinct_entry_steps"] >= 10
    # the masks separated: they are not all still at 1
    assert np.std(path.m) > 0.05
    # the search leaves the model dense and its weights frozen state as it was
    assert torch.all(h.arena.m == 1)
    assert all(p.requires_grad for p in model.parameters())


def test_authors_setting_is_degenerate_under_self_distillation():
    # nu = inf and no loss scaling: the distillation gradient is 0 at m = 1, masks never move,
    # every unit enters at the same step; the search must say so.
    h = spp.attach(tiny_bert())
    with pytest.warns(RuntimeWarning, match="degenerate"):
        path = spp.search(h, data(), steps=40, progress=False, nu=math.inf, loss_scale=1.0, warmup_frac=0.0,
                          lr=1e-3, lam=0.01)
    d = path.diagnostics()
    assert d["distinct_entry_steps"] == 1 and d["degenerate"]


def test_user_loss_is_used():
    model = tiny_bert()
    h = spp.attach(model)
    calls = []

    def task_loss(net, batch):
        calls.append(1)
        return net(**batch).last_hidden_state[:, 0].pow(2).mean()

    path = spp.search(h, data(), steps=15, loss=task_loss, progress=False)
    assert len(calls) >= 15
    assert path.settings["loss"] == "task_loss"
    assert not np.allclose(path.m, 1.0)


def test_seeded_searches_are_identical():
    paths = []
    for _ in range(2):
        h = spp.attach(tiny_bert())
        paths.append(spp.search(h, data(), steps=30, progress=False, seed=3))
    for name in ("entry", "support_count", "z", "m"):
        np.testing.assert_array_equal(getattr(paths[0], name), getattr(paths[1], name))


@pytest.mark.parametrize("kw, needle", [
    (dict(steps=0), "steps"), (dict(lr=-1.0), "lr"), (dict(entry_frac=0.0), "entry_frac"),
    (dict(warmup_frac=1.0), "warmup_frac"), (dict(lam=-1.0), "lam"), (dict(loss_scale=0.0), "loss_scale"),
    (dict(mode="both"), "mode"), (dict(optimizer="lion"), "optimizer"), (dict(loss="mse"), "loss"),
])
def test_bad_settings_name_the_argument(kw, needle):
    h = spp.attach(tiny_bert())
    kw = {"steps": 10, **kw}
    with pytest.raises(ValueError, match=needle):
        spp.search(h, data(), progress=False, **kw)


def test_bad_data():
    h = spp.attach(tiny_bert())
    with pytest.raises(ValueError, match="empty"):
        spp.search(h, [], steps=5, progress=False)
    with pytest.raises(TypeError, match="data"):
        spp.search(h, 5, steps=5, progress=False)
    with pytest.raises(TypeError, match="input_ids"):
        spp.search(h, [torch.zeros(2, 3)], steps=5, progress=False)
    with pytest.raises(ValueError, match="attach"):
        spp.search(tiny_bert(), data(), steps=5, progress=False)


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_activation_checkpointing_keeps_the_path_and_saves_fewer_activations(family):
    """search(checkpointing=True) gives the same path (entry steps equal, masks within fp32
    rounding); fewer tensors are saved for backward; the blocks are left as they were."""
    from torch.autograd.graph import saved_tensors_hooks

    model, batch = make(family, seed=1)
    handle = spp.attach(model)
    saved = {}

    def counting(tag):
        def pack(t):
            saved[tag] = saved.get(tag, 0) + t.numel()
            return t
        return saved_tensors_hooks(pack, lambda t: t)

    paths = {}
    for ck in (False, True):
        with counting(ck):
            paths[ck] = quiet_search(handle, batch, steps=12, checkpointing=ck, record_every=1)
    assert all("forward" not in b.__dict__ for b in handle.adapter.blocks(model))
    np.testing.assert_array_equal(paths[True].entry, paths[False].entry)
    np.testing.assert_allclose(paths[True].m, paths[False].m, rtol=1e-5, atol=1e-6)
    assert (paths[False].entry > 0).any()
    assert saved[True] < 0.7 * saved[False], saved
    with pytest.raises(TypeError, match="checkpointing"):
        quiet_search(handle, batch, steps=2, checkpointing="yes")


def test_activation_checkpointing_keeps_a_blocks_own_forward():
    """A block's instance-level forward (an offload or profiling hook) is wrapped, called during
    the checkpointed search and given back afterwards."""
    model, batch = make("bert", seed=2)
    handle = spp.attach(model)
    block = handle.adapter.blocks(model)[0]
    calls = []
    plain = block.forward

    def hooked(*args, **kwargs):
        calls.append(1)
        return plain(*args, **kwargs)

    block.forward = hooked
    quiet_search(handle, batch, steps=3, checkpointing=True)
    assert block.__dict__["forward"] is hooked
    assert len(calls) >= 3
    handle.adapter.set_checkpointing(model, True)
    handle.adapter.set_checkpointing(model, True)  # idempotent: still one wrapper deep
    handle.adapter.set_checkpointing(model, False)
    assert block.__dict__["forward"] is hooked
