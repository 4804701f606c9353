"""Non-finite steps: skipped and counted, K in a row stop the search; no NaN is ever saved."""
from __future__ import annotations

import json
import math
import os
import sys
import warnings

import numpy as np
import pytest
import torch

import spp
from spp import checkpoint as ckpt
from spp.handle import get_handle
from helpers import bert_batch, tiny_bert, tiny_vit, vit_batch, with_m

STEPS = 20


def task_loss(net, batch):
    return net(**batch).last_hidden_state[:, 0].pow(2).mean()


def injecting(bad_steps, kind="loss", calib=4):
    """A task loss that turns NaN (``kind="loss"``), has a NaN mask gradient with a finite value
    (``"grad"``) or a huge finite gradient whose update overflows (``"overflow"``) at the given
    search steps (the first ``calib`` calls are the calibration)."""
    calls = []

    def loss(net, batch):
        calls.append(1)
        L = task_loss(net, batch)
        step = len(calls) - calib
        if step in bad_steps:
            m = get_handle(net).arena.m
            if kind == "loss":
                L = L * float("nan")
            elif kind == "grad":  # value 0 * sqrt(0) = 0, gradient 0 * inf = NaN
                L = L + 0.0 * torch.sqrt((m - m.detach()).sum())
            else:  # |dL/dm| ~ 1e30: finite, but its square overflows the Adam second moment
                L = L + 1e30 * (m.sum() - m.detach().sum())
        return L
    return loss


def run(loss, steps=STEPS, **kw):
    h = spp.attach(tiny_bert(0, layers=2))
    snaps = {}

    def cb(t, value, handle):
        snaps[t] = {n: getattr(handle.arena, n).detach().clone() for n in ckpt.ARENA}
        if "callback" in kw:
            kw["callback"](t, value, handle)

    extra = {k: v for k, v in kw.items() if k != "callback"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*degenerate", category=RuntimeWarning)
        path = spp.search(h, [bert_batch(s) for s in range(3)], steps=steps, loss=loss, progress=False,
                          callback=cb, **extra)
    return path, snaps


@pytest.mark.parametrize("kind", ["loss", "grad", "overflow"])
def test_nonfinite_steps_are_skipped_and_counted(kind, tmp_path, monkeypatch):
    bad = {5, 9, 10}
    search_mod = sys.modules["spp.search"]
    overflows = []
    check = search_mod._state_finite
    monkeypatch.setattr(search_mod, "_state_finite", lambda arena: overflows.append(not check(arena)) or not overflows[-1])
    # loss_scale=1: the injected 1e30 gradient stays finite, only its square (Adam's b) overflows
    kw = dict(loss_scale=1.0) if kind == "overflow" else {}
    path, snaps = run(injecting(bad, kind, calib=0 if kw else 4), checkpoint_dir=str(tmp_path), checkpoint_every=1, **kw)
    assert sum(overflows) == (3 if kind == "overflow" else 0)  # the update was computed, then undone
    assert path.history["skipped"] == sorted(bad)
    assert path.settings["nonfinite_steps_skipped"] == 3
    for t in bad:  # a skipped step changes nothing (the step after warm-up reset aside)
        for n in ckpt.ARENA:
            assert torch.equal(snaps[t][n], snaps[t - 1][n]), (t, n)
    assert not torch.equal(snaps[6]["m"], snaps[5]["m"])  # the good step after them does update
    for k in ("z", "m"):
        assert np.isfinite(getattr(path, k)).all()
    assert all(math.isfinite(v) for v in path.history["loss"])
    path.save(str(tmp_path / "p"))
    assert "NaN" not in (tmp_path / "p" / "path.json").read_text()
    assert spp.load_path(str(tmp_path / "p")).history["skipped"] == sorted(bad)
    state = ckpt.load_checkpoint(str(tmp_path))  # the final checkpoint is clean too
    assert state.nonfinite == {"skipped": sorted(bad), "consecutive": 0}


def test_k_consecutive_nonfinite_steps_stop_with_a_clear_error(tmp_path):
    bad = set(range(8, STEPS + 1))  # from step 8 on every step is NaN
    with pytest.raises(spp.NonFiniteError) as info:
        run(injecting(bad, "loss"), checkpoint_dir=str(tmp_path), checkpoint_every=3, max_nonfinite_steps=4)
    msg = str(info.value)
    assert "stopped at step 11" in msg and "4 consecutive steps (8..11" in msg
    assert f"last good checkpoint ({tmp_path / 'checkpoint.json'}, step 6) is intact" in msg
    assert isinstance(info.value, FloatingPointError)
    state = ckpt.load_checkpoint(str(tmp_path))  # intact and clean: step 6, before the bad streak
    assert state.step == 6 and state.nonfinite == {"skipped": [], "consecutive": 0}
    assert all(torch.isfinite(state.arenas[n]).all() for n in ckpt.ARENA_FLOAT)


def test_streak_shorter_than_k_continues(tmp_path):
    path, _ = run(injecting({4, 5, 6}, "grad"), max_nonfinite_steps=4)
    assert path.history["skipped"] == [4, 5, 6]


def test_nan_images_in_one_batch_of_three():
    """Real data with NaN: the batch's steps are skipped every time it comes round."""
    model = tiny_vit(0)
    h = spp.attach(model)
    bad = vit_batch(2)
    bad[0, 1, 3, 3] = float("nan")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*degenerate", category=RuntimeWarning)
        path = spp.search(h, [vit_batch(0), vit_batch(1), bad], steps=12, progress=False, calib_batches=2)
    assert path.history["skipped"] == [3, 6, 9, 12]
    assert np.isfinite(path.z).all() and np.isfinite(path.m).all()


def test_nan_in_the_calibration_batches_is_a_data_error():
    h = spp.attach(tiny_vit(0))
    bad = vit_batch(0)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="data: the calibration .* NaN/Inf"):
        spp.search(h, [bad], steps=5, progress=False)


def test_saved_path_never_holds_nan(tmp_path):
    path, _ = run(task_loss, steps=6)
    m = path.m.copy()
    m[2] = np.nan
    with pytest.raises(ValueError, match="path array m holds NaN or Inf"):
        with_m(path, m).save(str(tmp_path / "p"))
    assert not (tmp_path / "p").exists() or os.listdir(tmp_path / "p") == []
    bad = spp.SolutionPath(path.pairs, path.entry, path.support_count, path.z, path.m, path.steps,
                           {**path.settings, "lr": float("nan")}, path.fingerprint, path.history)
    with pytest.raises(ValueError, match="NaN"):
        bad.save(str(tmp_path / "q"))
    assert not (tmp_path / "q").exists() or os.listdir(tmp_path / "q") == []
    path.save(str(tmp_path / "ok"))  # inf is allowed (nu = inf), tagged in strict JSON
    json.loads((tmp_path / "ok" / "path.json").read_text(), parse_constant=lambda c: pytest.fail(c))
