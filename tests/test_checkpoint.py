"""Search checkpoints: exact resume after SIGKILL / SIGINT / SIGTERM, atomic writes, safe loading."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import spp
from spp import checkpoint as ckpt
from helpers import bert_batch, tiny_bert

HERE = os.path.dirname(os.path.abspath(__file__))
ARRAYS = ("entry", "support_count", "z", "m")
STEPS = 24


def data3():
    return [bert_batch(s) for s in range(3)]


def run(steps=STEPS, data=None, model=None, **kw):
    model = model if model is not None else tiny_bert(0, layers=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*degenerate", category=RuntimeWarning)
        return spp.search(spp.attach(model), data if data is not None else data3(), steps=steps, progress=False, **kw)


def assert_same_path(a: spp.SolutionPath, b: spp.SolutionPath):
    for k in ARRAYS:
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    assert a.history == b.history
    assert a.settings == b.settings


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted search, without checkpoints."""
    return run()


def interrupt_at(step, signum=signal.SIGINT):
    def cb(t, loss, handle):
        if t == step:
            os.kill(os.getpid(), signum)
    return cb


# --- the kill-and-resume test (SIGKILL in a subprocess) -------------------------------------
def _worker(*args, **kw):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "resume_worker.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def kill_and_resume(tmp_path, seed: int, steps: int = 30, every: int = 3):
    """Run the worker, SIGKILL it at a step drawn from a seeded RNG, resume in a new process,
    compare with the worker's own uninterrupted reference run."""
    kill_at = random.Random(seed).randrange(2, steps - 3)
    ck, out = tmp_path / "ck", tmp_path / "out"
    out.mkdir()
    p = _worker("run", ck, out, steps, every)
    seen = None
    try:
        for line in p.stdout:
            if line.startswith("step ") and int(line.split()[1]) >= kill_at:
                p.send_signal(signal.SIGKILL)
                seen = int(line.split()[1])
                break
    finally:
        p.kill()
        _, err = p.communicate(timeout=120)
    assert seen is not None, f"the worker never reached step {kill_at}: {err[-2000:]}"
    assert p.returncode == -signal.SIGKILL
    state = json.loads((ck / "checkpoint.json").read_text())
    assert state["step"] < steps and not state["complete"], "the kill must land before the end of the search"
    r = _worker("resume", ck, out, steps, every)
    _, err = r.communicate(timeout=300)
    assert r.returncode == 0, err[-3000:]
    ref, res = spp.load_path(str(out / "reference")), spp.load_path(str(out / "resumed"))
    assert_same_path(ref, res)
    assert res.diagnostics()["fraction_entered"] > 0  # a real path, not an empty one
    leftovers = [f for f in os.listdir(ck) if f.endswith(".tmp")]
    assert not leftovers
    return kill_at, state["step"]


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path):
    kill_and_resume(tmp_path, seed=4)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 6))
def test_sigkill_many_random_steps(tmp_path, seed):
    kill_and_resume(tmp_path, seed=100 + seed, steps=40, every=1)  # a checkpoint per step: kills land mid-write too


# --- in-process interruptions ---------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_writes_checkpoint_and_resume_is_exact(tmp_path, reference, signum):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(spp.SearchInterrupted) as info:
        run(checkpoint_dir=str(tmp_path), checkpoint_every=5, callback=interrupt_at(13, signum))
    exc = info.value
    assert (exc.signum, exc.step, exc.steps) == (signum, 13, STEPS)
    assert exc.checkpoint == str(tmp_path / "checkpoint.json")
    assert "--resume" in str(exc) and "step 13 of 24" in str(exc)
    assert {s: signal.getsignal(s) for s in before} == before, "signal handlers must be restored"
    assert ckpt.load_checkpoint(str(tmp_path)).step == 13  # not the periodic one at step 10
    calls = []
    res = run(checkpoint_dir=str(tmp_path), checkpoint_every=5, resume=True,
              callback=lambda t, loss, h: calls.append(t))
    assert calls == list(range(14, STEPS + 1))
    assert_same_path(reference, res)


def test_handlers_only_during_a_checkpointed_search(tmp_path):
    seen = []

    def cb(t, loss, h):
        seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    run(steps=3, callback=cb)
    assert seen[-1] == before  # no checkpoint_dir: the default handling is untouched
    seen.clear()
    run(steps=3, callback=cb, checkpoint_dir=str(tmp_path))
    assert seen[-1] != before and signal.getsignal(signal.SIGTERM) == before
    with pytest.raises(ZeroDivisionError):  # restored after an error as well
        run(steps=3, callback=lambda *a: 1 / 0, checkpoint_dir=str(tmp_path / "b"))
    assert signal.getsignal(signal.SIGTERM) == before


class Reiterable:
    """An iterable that is not a sequence (like a DataLoader): the checkpoint holds the number of
    batches consumed."""

    def __init__(self, n=3):
        self.n = n

    def __iter__(self):
        return (bert_batch(s) for s in range(self.n))


def test_iterator_data_resume_is_exact(tmp_path):
    ref = run(data=Reiterable(), calib_batches=2)
    with pytest.raises(spp.SearchInterrupted):
        run(data=Reiterable(), calib_batches=2, checkpoint_dir=str(tmp_path), callback=interrupt_at(8))
    assert ckpt.peek(str(tmp_path))["data"] == {"kind": "iterator", "consumed": 2 + 8}
    assert_same_path(ref, run(data=Reiterable(), calib_batches=2, checkpoint_dir=str(tmp_path), resume=True))


def test_resume_restores_the_rng_state(tmp_path):
    """A user loss drawing random numbers (a structured dropout, say) continues the same stream."""
    def noisy_loss(net, batch):
        out = net(**batch).last_hidden_state
        return (out * torch.rand(out.shape[-1])).pow(2).mean()

    ref = run(loss=noisy_loss)
    with pytest.raises(spp.SearchInterrupted):
        run(loss=noisy_loss, checkpoint_dir=str(tmp_path), callback=interrupt_at(11))
    assert_same_path(ref, run(loss=noisy_loss, checkpoint_dir=str(tmp_path), resume=True))


def test_interrupt_during_calibration_checkpoints_step_0(tmp_path, reference):
    n = []

    def loss(net, batch):  # the SIGINT arrives in the calibration (before step 1)
        n.append(1)
        if len(n) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return net(**batch).last_hidden_state.pow(2).mean()

    with pytest.raises(spp.SearchInterrupted) as info:
        run(loss=loss, checkpoint_dir=str(tmp_path))
    assert info.value.step == 0 and ckpt.load_checkpoint(str(tmp_path)).step == 0


def test_resume_without_checkpoint_starts_afresh(tmp_path, reference):
    with pytest.warns(RuntimeWarning, match="no checkpoint"):
        res = run(checkpoint_dir=str(tmp_path / "new"), resume=True)
    assert_same_path(reference, res)


def test_resume_of_a_finished_search_returns_its_path(tmp_path, reference):
    run(checkpoint_dir=str(tmp_path))
    state = ckpt.peek(str(tmp_path))
    assert state["complete"] and state["step"] == STEPS
    calls = []
    res = run(checkpoint_dir=str(tmp_path), resume=True, callback=lambda *a: calls.append(1))
    assert calls == []
    assert_same_path(reference, res)


def test_checkpoint_files_are_replaced_not_accumulated(tmp_path):
    run(checkpoint_dir=str(tmp_path), checkpoint_every=2)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0] == "checkpoint.json" and re.match(r"state-00000024-[0-9a-f]{8}\.safetensors", files[1])
    state = ckpt.load_checkpoint(str(tmp_path))
    for name in ckpt.ARENA:
        assert state.arenas[name].numel() == sum(p[1] for p in state.fingerprint["pairs"])
    assert state.rng["torch"].dtype == torch.uint8 and len(state.rng["python"][1]) == 625


def test_stale_temporary_files_are_cleaned_up(tmp_path):
    """A writer killed mid-write leaves a hidden temporary file; the next checkpoint removes it."""
    (tmp_path / ".checkpoint.json.abc123.tmp").write_text('{"half": ')
    (tmp_path / ".state-00000003-0badc0de.safetensors.xyz.tmp").write_bytes(b"\0" * 10)
    run(steps=3, checkpoint_dir=str(tmp_path))
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".")) == []


def test_unfinished_checkpoint_is_not_overwritten(tmp_path):
    with pytest.raises(spp.SearchInterrupted):
        run(checkpoint_dir=str(tmp_path), callback=interrupt_at(5))
    before = (tmp_path / "checkpoint.json").read_bytes()
    with pytest.raises(ValueError, match=r"unfinished search \(step 5 of 24.*resume=True"):
        run(checkpoint_dir=str(tmp_path))
    assert (tmp_path / "checkpoint.json").read_bytes() == before


# --- a checkpoint from another search is refused, naming the file -----------------------------
@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("interrupted")
    with pytest.raises(spp.SearchInterrupted):
        run(checkpoint_dir=str(d), callback=interrupt_at(7))
    return d


@pytest.mark.parametrize("kw, needle", [
    (dict(lr=0.01), r"other settings \(lr=0.05 there, 0.01 now\)"),
    (dict(steps=30), r"other settings \(steps=24 there, 30 now\)"),
    (dict(seed=1), r"other settings \(seed=0 there"),
    (dict(loss=lambda net, b: net(**b).last_hidden_state.pow(2).mean()), "loss 'distill'"),
    (dict(model="other weights"), "from another model.*other weights"),
    (dict(model="other layers"), "from another model.*layer count"),
    (dict(data=[bert_batch(0), bert_batch(1)]), "3 batches of data, this search gets 2"),
    (dict(data=Reiterable()), "sequence data, this search gets iterator data"),
])
def test_resume_refuses_another_search(tmp_path, interrupted, kw, needle):
    d = tmp_path / "ck"
    d.mkdir()
    for f in os.listdir(interrupted):
        (d / f).write_bytes((interrupted / f).read_bytes())
    if kw.get("model") == "other weights":
        kw["model"] = tiny_bert(5, layers=2)
    elif kw.get("model") == "other layers":
        kw["model"] = tiny_bert(0, layers=3)
    with pytest.raises(ValueError, match=needle) as info:
        run(checkpoint_dir=str(d), resume=True, **kw)
    assert str(d / "checkpoint.json") in str(info.value)


# --- corrupted, truncated, wrong-version, mismatched checkpoint files --------------------------
def _tensor_file(d):
    return d / json.loads((d / "checkpoint.json").read_text())["tensors"]


def _edit_json(d, **changes):
    meta = json.loads((d / "checkpoint.json").read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    (d / "checkpoint.json").write_text(json.dumps(meta))


def _truncate(d, name):
    f = d / name if name != "tensors" else _tensor_file(d)
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])


def _flip_byte(d):
    f = _tensor_file(d)
    b = bytearray(f.read_bytes())
    b[-3] ^= 0x40
    f.write_bytes(bytes(b))


def _swap_tensors(d, other):
    """The tensor file of another checkpoint under this checkpoint's name."""
    _tensor_file(d).write_bytes(_tensor_file(other).read_bytes())


def _nan_in_state(d):
    """A tensor file holding NaN, with a checksum that matches it (only the NaN check can catch it)."""
    import hashlib

    from safetensors.torch import load, save

    f = _tensor_file(d)
    t = load(f.read_bytes())
    t["z"][3] = float("nan")
    blob = save(t)
    f.write_bytes(blob)
    _edit_json(d, tensors_sha256=hashlib.sha256(blob).hexdigest())


def _bad_entry(d):
    import hashlib

    from safetensors.torch import load, save

    f = _tensor_file(d)
    t = load(f.read_bytes())
    t["entry"][0] = 10_000
    blob = save(t)
    f.write_bytes(blob)
    _edit_json(d, tensors_sha256=hashlib.sha256(blob).hexdigest())


CORRUPTIONS = {
    "json truncated": (lambda d, o: _truncate(d, "checkpoint.json"), "checkpoint.json: corrupt or truncated JSON"),
    "json garbage": (lambda d, o: (d / "checkpoint.json").write_bytes(b"\x00\xffgarbage"), "checkpoint.json: corrupt"),
    "json not an object": (lambda d, o: (d / "checkpoint.json").write_text("[1, 2]"), "expected a JSON object"),
    "wrong format": (lambda d, o: _edit_json(d, format="spp-path"), "not a spp-search-checkpoint file"),
    "newer version": (lambda d, o: _edit_json(d, version=2), "unsupported version 2"),
    "missing field": (lambda d, o: _edit_json(d, config=None), "missing field 'config'"),
    "step beyond steps": (lambda d, o: _edit_json(d, step=99), "malformed step"),
    "path traversal": (lambda d, o: _edit_json(d, tensors="../../etc/passwd"), "malformed tensor file name"),
    "bad data position": (lambda d, o: _edit_json(d, data={"kind": "sequence", "index": 7, "length": 3, "consumed": 0}),
                          "malformed data position"),
    "NaN loss in history": (lambda d, o: _edit_json(d, history={"step": [10], "loss": [{"__nonfinite_float__": "nan"}],
                                                                 "support": [1]}), "non-finite loss"),
    "tensors truncated": (lambda d, o: _truncate(d, "tensors"), r"state-.*\.safetensors: does not match .*checkpoint\.json"),
    "tensors flipped byte": (lambda d, o: _flip_byte(d), r"state-.*\.safetensors: does not match"),
    "tensors missing": (lambda d, o: os.remove(_tensor_file(d)), r"state-.*\.safetensors: no such file", FileNotFoundError),
    "tensors of another checkpoint": (_swap_tensors, r"state-.*\.safetensors: does not match"),
    "NaN in the state": (lambda d, o: _nan_in_state(d), "tensor 'z' holds NaN or Inf"),
    "entry beyond step": (lambda d, o: _bad_entry(d), r"entry / support_count hold steps outside \[-1, 7\]"),
    "units disagree": (lambda d, o: _edit_json(d, units=5), r"tensor 'm' is torch.float32 of shape \(\d+,\), expected"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_checkpoint_one_clear_error(tmp_path, interrupted, case):
    d, other = tmp_path / "ck", tmp_path / "other"
    for dst in (d, other):
        dst.mkdir()
        for f in os.listdir(interrupted):
            (dst / f).write_bytes((interrupted / f).read_bytes())
    # "another checkpoint": the same search, one step further
    with pytest.raises(spp.SearchInterrupted):
        run(checkpoint_dir=str(other), resume=True, callback=interrupt_at(8))
    corrupt, needle, *exc = CORRUPTIONS[case]
    exc = exc[0] if exc else ValueError
    corrupt(d, other)
    with pytest.raises(exc, match=needle) as info:
        ckpt.load_checkpoint(str(d))
    msg = str(info.value)
    assert str(d) in msg and "\n" not in msg
    with pytest.raises(exc, match=needle):  # the search says the same, and runs nothing
        run(checkpoint_dir=str(d), resume=True, callback=lambda *a: pytest.fail("a step ran"))


def test_checkpoint_refuses_nan(tmp_path):
    st = ckpt.SearchState(step=1, steps=2, arenas={n: torch.zeros(4, dtype=torch.int32 if n in ckpt.ARENA_INT else torch.float32)
                                                   for n in ckpt.ARENA},
                          config={}, lam=1.0, loss_scale=1.0, loss="distill", fingerprint={}, data={"kind": "iterator", "consumed": 1},
                          history={"step": [], "loss": [], "support": []}, rng=ckpt.capture_rng())
    st.arenas["exp_avg_sq"][2] = float("inf")
    with pytest.raises(ValueError, match="exp_avg_sq holds NaN or Inf at step 1"):
        ckpt.save_checkpoint(str(tmp_path), st)
    st.arenas["exp_avg_sq"][2] = 0.0
    st.history = {"step": [1], "loss": [float("nan")], "support": [0]}
    with pytest.raises(ValueError, match="NaN"):
        ckpt.save_checkpoint(str(tmp_path), st)
    assert os.listdir(tmp_path) == []  # nothing committed, nothing left behind


# --- the CLI: --checkpoint-every, --resume, SIGINT / SIGTERM -----------------------------------
def _cli_search(bert_dir, out, *extra, steps=40):
    return ["search", "--model", str(bert_dir / "bert"), "--text", str(bert_dir / "s.txt"), "--out", str(out),
            "--steps", str(steps), "--sentences", "24", "--batch-size", "4", "--no-progress", *extra]


def _quiet_main(argv):
    from spp import cli

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*degenerate", category=RuntimeWarning)
        return cli.main(argv)


def test_cli_interrupt_then_resume(bert_dir, tmp_path, capsys, monkeypatch):
    """In process: SIGINT arrives right after the checkpoint after step 6 is written."""
    assert _quiet_main(_cli_search(bert_dir, tmp_path / "ref")) == 0
    real_save = ckpt.save_checkpoint

    def save_then_signal(directory, st):
        out = real_save(directory, st)
        if st.step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_signal)
    capsys.readouterr()
    code = _quiet_main(_cli_search(bert_dir, tmp_path / "run", "--checkpoint-every", "3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 128 + signal.SIGINT
    assert re.fullmatch(r"spp search: search interrupted by SIGINT after step 6 of 40; checkpoint written to "
                        r".*/run/checkpoint/checkpoint\.json; continue with --resume", err[-1]), err
    assert not (tmp_path / "run" / "path.json").exists()
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    assert _quiet_main(_cli_search(bert_dir, tmp_path / "run", "--resume")) == 0
    assert_same_path(spp.load_path(str(tmp_path / "ref")), spp.load_path(str(tmp_path / "run")))
    # an unfinished checkpoint is not overwritten by a fresh run without --resume
    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_signal)
    assert _quiet_main(_cli_search(bert_dir, tmp_path / "again", "--checkpoint-every", "3")) == 130
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    capsys.readouterr()
    assert _quiet_main(_cli_search(bert_dir, tmp_path / "again")) == 2
    assert "pass resume=True (CLI: --resume)" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_sigterm_in_a_real_process_then_resume(bert_dir, tmp_path):
    """``python -m spp search`` gets SIGTERM once its first checkpoint exists: it finishes the
    step, writes a checkpoint, exits 143 with one line; ``--resume`` completes the same path."""
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as this process: same bits
    assert _quiet_main(_cli_search(bert_dir, tmp_path / "ref", steps=300)) == 0
    p = subprocess.Popen([sys.executable, "-m", "spp", *_cli_search(bert_dir, tmp_path / "run", steps=300)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    marker = tmp_path / "run" / "checkpoint" / "checkpoint.json"
    deadline = time.time() + 120
    while not marker.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"spp search: search interrupted by SIGTERM after step \d+ of 300; checkpoint written to "
                        r".*checkpoint\.json; continue with --resume", last), last
    step = ckpt.peek(str(tmp_path / "run" / "checkpoint"))["step"]
    assert 0 <= step < 300
    r = subprocess.run([sys.executable, "-m", "spp", *_cli_search(bert_dir, tmp_path / "run", "--resume", steps=300)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_path(spp.load_path(str(tmp_path / "ref")), spp.load_path(str(tmp_path / "run")))
