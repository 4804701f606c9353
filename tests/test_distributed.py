"""Distributed search: ``torchrun --nproc_per_node=2`` with gloo on the CPU gives the path of one
process on the same global batches; the batch split and the single-process group."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import spp
from spp import distributed

HERE = Path(__file__).resolve().parent
STEPS = 30


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory):
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.fail("torchrun is not installed beside this Python (it ships with torch)")
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node=2",
           str(HERE / "dist_worker.py"), str(out), str(STEPS)]  # --standalone: a free local rendezvous port
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-12000:]
    return out


@pytest.mark.parametrize("kind", ["distill", "user", "fsdp"])
def test_two_ranks_give_the_single_process_path(torchrun_out, kind):
    sys.path.insert(0, str(HERE))
    import dist_worker

    single = dist_worker.run("distill" if kind == "fsdp" else kind, STEPS)
    two = spp.SolutionPath.load(torchrun_out / kind)
    assert two.settings["world_size"] == 2 and single.settings["world_size"] == 1
    d = single.diagnostics()
    assert d["distinct_entry_steps"] >= 5, d  # a path worth comparing, not one tie
    np.testing.assert_array_equal(two.entry, single.entry)
    np.testing.assert_allclose(two.m, single.m, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(two.z, single.z, rtol=1e-4, atol=1e-5)
    assert two.settings["loss_scale_resolved"] == pytest.approx(single.settings["loss_scale_resolved"], rel=1e-5)
    # the same model: a path searched on sharded weights applies to the unsharded model
    assert two.fingerprint["pairs"] == single.fingerprint["pairs"]
    assert two.fingerprint["checksum"] == pytest.approx(single.fingerprint["checksum"], rel=1e-9)


def test_ranks_hold_identical_state_and_only_rank0_writes(torchrun_out):
    r0 = json.loads((torchrun_out / "rank0.json").read_text())
    r1 = json.loads((torchrun_out / "rank1.json").read_text())
    assert r0 == r1  # bit-identical: the same all-reduced gradient and the same update on every rank
    assert r0["distill"]["world_size"] == 2
    files = sorted(p.name for p in (torchrun_out / "ckpt").iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) == 1 and "checkpoint.json" in files, files


def test_shard_rows_splits_every_tensor_alike():
    batch = {"input_ids": torch.arange(10).reshape(5, 2), "attention_mask": torch.ones(5, 2), "note": "x"}
    parts = [distributed.shard_rows(batch, r, 2) for r in range(2)]
    assert [p["input_ids"].shape[0] for p in parts] == [3, 2]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert parts[1]["note"] == "x"
    imgs, labels = distributed.shard_rows((torch.zeros(4, 3), torch.arange(4)), 1, 2)
    assert imgs.shape == (2, 3) and labels.tolist() == [2, 3]
    with pytest.raises(ValueError, match="disagree on the batch size"):
        distributed.shard_rows({"a": torch.zeros(4), "b": torch.zeros(3)}, 0, 2)
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        distributed.shard_rows(torch.zeros(3, 2), 0, 4)
    with pytest.raises(TypeError, match="batch along dim 0"):
        distributed.shard_rows({"a": "text"}, 0, 2)


def test_single_process_group_and_refusals():
    g = distributed.current()
    assert not g.active and g.is_main and g.world == 1
    t = torch.ones(3)
    assert g.all_reduce_(t) is t and torch.equal(t, torch.ones(3))
    assert distributed.current(False).world == 1
    if not torch.distributed.is_initialized():
        with pytest.raises(ValueError, match="needs torch.distributed initialised"):
            distributed.current(True)
    sys.path.insert(0, str(HERE))
    from helpers import bert_batch, tiny_bert

    with pytest.raises(TypeError, match="distributed must be a bool"):
        spp.search(spp.attach(tiny_bert(0)), [bert_batch(0)], steps=2, progress=False, distributed="yes")


def test_cli_search_under_torchrun_writes_the_single_process_path(bert_dir, tmp_path):
    """``torchrun … -m spp search`` on 2 ranks: rank 0 writes the path, equal to ``spp search`` in
    one process on the same sentences."""
    from spp import cli

    args = ["search", "--model", str(bert_dir / "bert"), "--text", str(bert_dir / "s.txt"), "--steps", "16",
            "--sentences", "32", "--batch-size", "8", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "spp", *args, "--out",
                          str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-12000:]
    assert res.stdout.count("path written to") == 1  # only rank 0 reports and writes
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    one, two = spp.SolutionPath.load(tmp_path / "one"), spp.SolutionPath.load(tmp_path / "two")
    assert two.settings["world_size"] == 2
    np.testing.assert_array_equal(two.entry, one.entry)
    np.testing.assert_allclose(two.m, one.m, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["created", "exception", "already", "single"])
def test_from_env_destroys_only_a_group_it_created_and_only_on_success(monkeypatch, case):
    """``distributed.from_env`` (what ``spp search`` runs in): the group it initialises is destroyed
    when the block completes; not after an exception (other ranks may still wait in a
    collective), not when one was initialised before, not for a single process."""
    state = {"initialised": case == "already", "destroyed": 0}
    monkeypatch.setenv("WORLD_SIZE", "1" if case == "single" else "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: state["initialised"])
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: state.__setitem__("destroyed", state["destroyed"] + 1))

    def init(backend=None):
        if case != "single":
            state["initialised"] = True
        return distributed.Group(0, 1 if case == "single" else 2)

    monkeypatch.setattr(distributed, "init_from_env", init)
    if case == "exception":
        with pytest.raises(RuntimeError, match="boom"):
            with distributed.from_env() as group:
                raise RuntimeError("boom")
    else:
        with distributed.from_env() as group:
            assert group.world == (1 if case == "single" else 2)
    assert state["destroyed"] == (1 if case == "created" else 0)
