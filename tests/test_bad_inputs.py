"""The bad-input table: every case through the Python API or the ``spp`` CLI.

API: a ``ValueError`` / ``TypeError`` / ``FileNotFoundError`` (the output errors
``NotWritableError`` and ``DiskFullError`` are ValueErrors too) whose message names the argument.
CLI: a non-zero exit with a one-line message and no traceback. Both: no output file is left
half-written (no temporary file, no file of a pair without the other).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import torch.nn as nn

import spp
from spp import cli
from helpers import bert_batch, tiny_bert

# --- helpers ---------------------------------------------------------------------------------


def _writable(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / ".probe"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder that cannot be written: a read-only folder, or (as root, who may write anywhere
    on a normal file system) a folder under sysfs."""
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o500)
    target = ro / "out"
    if _writable(target):  # root ignores the mode bits
        target = Path("/sys/kernel/spp-test-out")
    assert not _writable(target), "could not find an unwritable folder"
    return target


@contextlib.contextmanager
def file_size_limit(nbytes: int = 2048):
    """A full disk, as the kernel reports it to a writer: writes past ``nbytes`` fail (EFBIG)."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)


PAIRS = [("path.json", "path.safetensors"), ("config.json", "model.safetensors")]


def assert_nothing_half_written(root: Path) -> None:
    if not root.exists():
        return
    for dirpath, _, files in os.walk(root):
        names = set(files)
        tmp = [f for f in names if f.endswith(".tmp")]
        assert not tmp, f"temporary files left in {dirpath}: {tmp}"
        for a, b in PAIRS:
            assert (a in names) == (b in names), f"{dirpath}: {a} / {b} written without the other"
        states = [f for f in names if f.startswith("state-")]
        assert not states or "checkpoint.json" in names, f"{dirpath}: checkpoint tensors without checkpoint.json"


def assert_no_output(d: Path) -> None:
    """The failed command wrote nothing at all into ``d``."""
    if d.exists():
        left = [str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()]
        assert not left, f"files left in {d}: {left}"


# --- shared objects ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    model = tiny_bert(0, layers=2)
    handle = spp.attach(model)
    data = [bert_batch(s) for s in range(2)]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        path = spp.search(handle, data, steps=8, progress=False)
    saved = tmp_path_factory.mktemp("saved")
    path.save(str(saved / "path"))
    small = spp.prune(model, path.masks(keep=0.5))
    yield {"model": model, "handle": handle, "data": data, "path": path, "saved": saved, "small": small}
    spp.detach(model)


def search(ctx, **kw):
    kw = {"steps": 3, "progress": False, **kw}
    return spp.search(kw.pop("handle", ctx["handle"]), kw.pop("data", ctx["data"]), **kw)


@dataclass
class ApiCase:
    id: str
    call: Callable  # (ctx, tmp_path) -> None
    exc: type
    arg: str  # the argument the message must name
    match: str = ""
    out: Optional[str] = None  # a folder under tmp_path that must stay without files


def _a_file(t: Path) -> str:
    (t / "f").write_text("x")
    return str(t / "f")


def _float64_bert():
    return tiny_bert(0).double()


def _other_model_masks(ctx, tmp):
    other = tiny_bert(7, layers=2)
    masks = spp.load_path(str(ctx["saved"] / "path")).masks(keep=0.5)
    spp.prune(other, masks)


def _full(fn):
    def call(ctx, tmp):
        with file_size_limit():
            fn(ctx, tmp)
    return call


API_CASES = [
    # search: settings out of range and of the wrong type
    ApiCase("steps=0", lambda c, t: search(c, steps=0), ValueError, "steps", ">= 1"),
    ApiCase("steps=2.5", lambda c, t: search(c, steps=2.5), TypeError, "steps", "must be an int"),
    ApiCase("steps='10'", lambda c, t: search(c, steps="10"), TypeError, "steps"),
    ApiCase("lr=-1", lambda c, t: search(c, lr=-1.0), ValueError, "lr", "positive"),
    ApiCase("lr=nan", lambda c, t: search(c, lr=math.nan), ValueError, "lr"),
    ApiCase("entry_frac=1.5", lambda c, t: search(c, entry_frac=1.5), ValueError, "entry_frac"),
    ApiCase("nu=0", lambda c, t: search(c, nu=0.0), ValueError, "nu"),
    ApiCase("seed='0'", lambda c, t: search(c, seed="0"), TypeError, "seed"),
    ApiCase("mode=None", lambda c, t: search(c, mode=None), TypeError, "mode"),
    ApiCase("unknown option", lambda c, t: search(c, learning_rate=0.1), TypeError, "learning_rate", "unknown search option"),
    ApiCase("progress='no'", lambda c, t: search(c, progress="no"), TypeError, "progress"),
    ApiCase("config=dict", lambda c, t: search(c, config={"lr": 0.1}), TypeError, "config"),
    ApiCase("max_nonfinite_steps=0", lambda c, t: search(c, max_nonfinite_steps=0), ValueError, "max_nonfinite_steps"),
    # search: data and loss
    ApiCase("data=[]", lambda c, t: search(c, data=[]), ValueError, "data", "empty"),
    ApiCase("data=iter([])", lambda c, t: search(c, data=iter([])), ValueError, "data", "empty"),
    ApiCase("data=5", lambda c, t: search(c, data=5), TypeError, "data", "iterable"),
    ApiCase("data=one batch dict", lambda c, t: search(c, data=bert_batch(0)), TypeError, "data", "dict"),
    ApiCase("data=image tensors for BERT", lambda c, t: search(c, data=[torch.zeros(2, 3)]), TypeError, "data", "input_ids"),
    ApiCase("loss='mse'", lambda c, t: search(c, loss="mse"), ValueError, "loss"),
    ApiCase("loss returns a float", lambda c, t: search(c, loss=lambda net, b: 1.0), TypeError, "loss", "scalar float tensor"),
    # search: checkpoints
    ApiCase("checkpoint_every=-1", lambda c, t: search(c, checkpoint_dir=str(t / "ck"), checkpoint_every=-1),
            ValueError, "checkpoint_every", out="ck"),
    ApiCase("checkpoint_every=1.5", lambda c, t: search(c, checkpoint_dir=str(t / "ck"), checkpoint_every=1.5),
            TypeError, "checkpoint_every", out="ck"),
    ApiCase("checkpoint_every without dir", lambda c, t: search(c, checkpoint_every=5), ValueError, "checkpoint_dir"),
    ApiCase("resume without dir", lambda c, t: search(c, resume=True), ValueError, "checkpoint_dir"),
    ApiCase("resume='yes'", lambda c, t: search(c, checkpoint_dir=str(t / "ck"), resume="yes"), TypeError, "resume", out="ck"),
    ApiCase("checkpoint_dir=123", lambda c, t: search(c, checkpoint_dir=123), TypeError, "checkpoint_dir"),
    ApiCase("checkpoint_dir is a file", lambda c, t: search(c, checkpoint_dir=_a_file(t)),
            ValueError, "checkpoint_dir", "is a file"),
    ApiCase("checkpoint_dir unwritable", lambda c, t: search(c, checkpoint_dir=str(unwritable_dir(t))),
            spp.NotWritableError, "checkpoint_dir", "not writable"),
    ApiCase("checkpoint_dir on a full disk", _full(lambda c, t: search(c, checkpoint_dir=str(t / "ck"))),
            spp.DiskFullError, "checkpoint", "no space left", out="ck"),
    # models
    ApiCase("attach: unsupported model", lambda c, t: spp.attach(nn.Sequential(nn.Linear(4, 4))), ValueError, "model",
            "unsupported model Sequential; supported families: bert"),
    ApiCase("attach: not a module", lambda c, t: spp.attach("bert-base-uncased"), TypeError, "model"),
    ApiCase("attach: float64 model", lambda c, t: spp.attach(_float64_bert()), TypeError, "model", "dtype torch.float64"),
    ApiCase("search: model not attached", lambda c, t: search(c, handle=tiny_bert(0)), ValueError, "model", "not attached"),
    ApiCase("prune: masks of another model", _other_model_masks, ValueError, "path.json", "other weights"),
    ApiCase("prune: masks=dict", lambda c, t: spp.prune(c["model"], {}), TypeError, "masks"),
    # ratios and budgets
    ApiCase("keep=1.5", lambda c, t: c["path"].masks(keep=1.5), ValueError, "keep", r"\(0, 1\]"),
    ApiCase("keep=0", lambda c, t: c["path"].masks(keep=0), ValueError, "keep"),
    ApiCase("keep=[0.5]", lambda c, t: c["path"].masks(keep=[0.5]), TypeError, "keep"),
    ApiCase("params=0.001", lambda c, t: c["path"].masks(params=0.001), ValueError, "params", "below the minimum"),
    ApiCase("flops='half'", lambda c, t: c["path"].masks(flops="half"), TypeError, "flops"),
    ApiCase("params=nan", lambda c, t: c["path"].masks(params=math.nan), ValueError, "params"),
    ApiCase("round_to=0", lambda c, t: c["path"].masks(keep=0.5, round_to=0), ValueError, "round_to"),
    ApiCase("min_keep=-1", lambda c, t: c["path"].masks(keep=0.5, min_keep=-1), ValueError, "min_keep"),
    # files
    ApiCase("path.save: unwritable", lambda c, t: c["path"].save(str(unwritable_dir(t))), spp.NotWritableError,
            "directory", "not writable"),
    ApiCase("path.save: folder is a file", lambda c, t: c["path"].save(_a_file(t)),
            ValueError, "directory", "is a file"),
    ApiCase("path.save: full disk", _full(lambda c, t: c["path"].save(str(t / "p"))), spp.DiskFullError,
            "path.safetensors", "no space left", out="p"),
    ApiCase("save_pruned: full disk", _full(lambda c, t: spp.save_pruned(c["small"], str(t / "m"))), spp.DiskFullError,
            "model.safetensors", "no space left", out="m"),
    ApiCase("save_pruned: unwritable", lambda c, t: spp.save_pruned(c["small"], str(unwritable_dir(t))),
            spp.NotWritableError, "directory", "not writable"),
    ApiCase("load_path: missing", lambda c, t: spp.load_path(str(t / "nope")), FileNotFoundError, "path.json"),
    ApiCase("load_path: not a path", lambda c, t: spp.load_path(5), TypeError, "directory"),
    ApiCase("load_pruned: missing", lambda c, t: spp.load_pruned(str(t / "nope")), FileNotFoundError, "config.json"),
    ApiCase("load_pruned: not a path", lambda c, t: spp.load_pruned(None), TypeError, "directory"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_api_bad_input(ctx, tmp_path, case):
    with pytest.raises(case.exc) as info:
        case.call(ctx, tmp_path)
    exc = info.value
    assert isinstance(exc, (ValueError, TypeError, FileNotFoundError)), type(exc)
    msg = str(exc)
    assert case.arg in msg, f"the message does not name {case.arg!r}: {msg}"
    if case.match:
        assert re.search(case.match, msg), msg
    assert "\n" not in msg
    assert_nothing_half_written(tmp_path)
    if case.out:
        assert_no_output(tmp_path / case.out)
    assert torch.all(ctx["handle"].arena.m == 1)  # a refused search leaves the model as it was


# --- the CLI --------------------------------------------------------------------------------


@dataclass
class CliCase:
    id: str
    argv: Callable  # (bert_dir, tmp_path) -> list[str]
    match: str
    out: Optional[str] = None  # a folder under tmp_path that must stay without files
    full_disk: bool = False


def _s(d, t, *extra, out=None):
    return ["search", "--model", str(d / "bert"), "--text", str(d / "s.txt"), "--out", str(out or t / "out"),
            "--steps", "3", "--sentences", "16", "--no-progress", *extra]


CLI_CASES = [
    CliCase("search --steps 0", lambda d, t: _s(d, t, "--steps", "0"), r"--steps: expected a positive integer, got '0'"),
    CliCase("search --steps abc", lambda d, t: _s(d, t, "--steps", "abc"), "--steps: expected a positive integer"),
    CliCase("search --checkpoint-every -1", lambda d, t: _s(d, t, "--checkpoint-every", "-1"),
            "--checkpoint-every: expected an integer >= 0"),
    CliCase("search --max-nonfinite-steps 0", lambda d, t: _s(d, t, "--max-nonfinite-steps", "0"),
            "--max-nonfinite-steps: expected a positive integer"),
    CliCase("search --batch-size 0", lambda d, t: _s(d, t, "--batch-size", "0"), "--batch-size: expected a positive"),
    CliCase("search unknown option", lambda d, t: _s(d, t, "--learning-rate", "0.1"), "unrecognized arguments: --learning-rate"),
    CliCase("search without --out", lambda d, t: ["search", "--steps", "3"], "the following arguments are required: --out"),
    CliCase("search --out is a file", lambda d, t: _s(d, t, out=d / "a-file"), "--out .*a-file' is a file"),
    CliCase("search --out unwritable", lambda d, t: _s(d, t, out=unwritable_dir(t)), "--out .* is not writable"),
    CliCase("search --checkpoint-dir unwritable",
            lambda d, t: _s(d, t, "--checkpoint-dir", str(unwritable_dir(t))), "--checkpoint-dir .* is not writable"),
    CliCase("search --text missing", lambda d, t: _s(d, t, "--text", str(t / "nope.txt")), "--text: no such file"),
    CliCase("search --text empty", lambda d, t: _s(d, t, "--text", str(d / "empty.txt")), "--text: .* holds no sentences",
            out="out"),
    CliCase("search --model missing", lambda d, t: _s(d, t, "--model", str(t / "nope")), "--model: .* is neither 'minilm'"),
    CliCase("search --model unsupported (GPT-2)", lambda d, t: _s(d, t, "--model", str(d / "gpt2")),
            "unsupported model GPT2Model; supported families: bert", out="out"),
    CliCase("search --model float64", lambda d, t: _s(d, t, "--model", str(d / "bert64")), "dtype torch.float64 are not supported",
            out="out"),
    CliCase("search --batch-size larger than the data", lambda d, t: _s(d, t, "--batch-size", "64"),
            "--batch-size 64 exceeds the 16 sentences", out="out"),
    CliCase("search --resume with other settings",
            lambda d, t: _s(d, t, "--resume", "--steps", "5", "--checkpoint-dir", str(_copy_ckpt(d, t))),
            r"checkpoint\.json: the checkpoint was written by a search with other settings \(steps=4 there, 5 now\)",
            out="out"),
    CliCase("search on a full disk", lambda d, t: _s(d, t), r"state-.*\.safetensors: cannot write: no space left", out="out",
            full_disk=True),
    CliCase("prune --params 1.5", lambda d, t: ["prune", "--path", str(d / "done"), "--out", str(t / "m"), "--params", "1.5"],
            r"--params: expected a number in \(0, 1\]"),
    CliCase("prune --round-to 0", lambda d, t: ["prune", "--path", str(d / "done"), "--out", str(t / "m"), "--keep", "0.5",
                                                "--round-to", "0"], "--round-to: expected a positive integer"),
    CliCase("prune --path corrupt", lambda d, t: ["prune", "--path", str(d / "corrupt"), "--out", str(t / "m"), "--keep", "0.5"],
            r"corrupt/path\.json: corrupt or truncated JSON", out="m"),
    CliCase("prune with a path of another model",
            lambda d, t: ["prune", "--path", str(d / "done"), "--out", str(t / "m"), "--keep", "0.5"],  # on MiniLM
            r"masks read off .*done/path\.json were made for a model with other pairs", out="m"),
    CliCase("prune without a target", lambda d, t: ["prune", "--path", "p", "--out", "o"],
            "one of the arguments --keep --params --flops --latency is required"),
    CliCase("unknown command", lambda d, t: ["frobnicate"], "invalid choice: 'frobnicate'"),
]


def _copy_ckpt(d, t):
    dst = t / "ck"
    dst.mkdir()
    for f in (d / "done" / "checkpoint").iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def run_cli(argv, capsys, full_disk=False):
    capsys.readouterr()
    try:
        with file_size_limit() if full_disk else contextlib.nullcontext():
            code = cli.main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_bad_input(bert_dir, tmp_path, capsys, case):
    code, err = run_cli(case.argv(bert_dir, tmp_path), capsys, case.full_disk)
    assert code not in (0, None), err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    last = lines[-1]
    assert re.match(r"spp( \w+)?: error: ", last), err  # the message: one line, the last one
    assert re.search(case.match, last), last
    assert sum("error" in ln for ln in lines) == 1, err
    assert_nothing_half_written(tmp_path)
    if case.out:
        assert_no_output(tmp_path / case.out)


@pytest.mark.slow  # the in-process cases above run main(); tests/test_cli.py runs `python -m spp` in make test
def test_cli_bad_input_in_a_real_process(bert_dir, tmp_path):
    """The same through ``python -m spp``: exit status 2, one line, no traceback."""
    r = subprocess.run([sys.executable, "-m", "spp", *_s(bert_dir, tmp_path, "--text", str(bert_dir / "empty.txt"))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("spp search: error: --text:")
    assert_no_output(tmp_path / "out")
