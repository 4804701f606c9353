"""Safe loading: paths and pruned models come from safetensors + JSON only (nothing is
unpickled), and a truncated, corrupted, wrong-version or mismatched file gives one clear error
naming the file and what is wrong. (Checkpoints: tests/test_checkpoint.py.)"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import warnings

import numpy as np
import pytest
import torch

import spp
from spp import checkpoint as ckpt
from helpers import bert_batch, make

HERE = os.path.dirname(os.path.abspath(__file__))


def _search(model, steps=8, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*degenerate", category=RuntimeWarning)
        return spp.search(spp.attach(model), [bert_batch(0), bert_batch(1)], steps=steps, progress=False, **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two paths and two pruned models of the same tiny BERT (same shapes, other contents)."""
    d = tmp_path_factory.mktemp("saved")
    model, _ = make("bert", seed=0, layers=2)
    path = _search(model)
    path.save(str(d / "path"))
    _search(make("bert", seed=0, layers=2)[0], steps=10).save(str(d / "path-other"))
    spp.save_pruned(spp.prune(model, path.masks(keep=0.5)), str(d / "pruned"))
    spp.save_pruned(spp.prune(model, path.masks(keep=0.5, values="ones")), str(d / "pruned-other"))
    return d


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit(f, fn):
    meta = json.loads(f.read_text())
    fn(meta)
    f.write_text(json.dumps(meta))


def _resave(f, fn, json_file=None):
    """Rewrite a safetensors file through ``fn`` and fix the checksum in ``json_file``: only the
    content checks can catch what ``fn`` did."""
    from safetensors.torch import load, save

    t = load(f.read_bytes())
    fn(t)
    blob = save(t)
    f.write_bytes(blob)
    if json_file is not None:
        _edit(json_file, lambda m: m.__setitem__("tensors_sha256", hashlib.sha256(blob).hexdigest()))


def _flip(f):
    b = bytearray(f.read_bytes())
    b[-5] ^= 0x10
    f.write_bytes(bytes(b))


def _cut(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _pair0(key, value):
    return lambda m: m["pairs"][0].__setitem__(key, value)


PATH_CASES = {
    "json truncated": (lambda d, s: _cut(d / "path.json"), r"path\.json: corrupt or truncated JSON"),
    "json binary garbage": (lambda d, s: (d / "path.json").write_bytes(os.urandom(40) + b"\xff"), r"path\.json: corrupt"),
    "json nested too deep": (lambda d, s: (d / "path.json").write_text("[" * 100000 + "]" * 100000), r"path\.json: corrupt"),
    "wrong format": (lambda d, s: _edit(d / "path.json", _set("format", "spp-pruned-model")), "not a spp-path file"),
    "newer version": (lambda d, s: _edit(d / "path.json", _set("version", 7)), "unsupported version 7"),
    "version as text": (lambda d, s: _edit(d / "path.json", _set("version", "1")), "unsupported version '1'"),
    "unknown pair kind": (lambda d, s: _edit(d / "path.json", _pair0("kind", "ffn")), r"path\.json: missing or malformed .*kind"),
    "negative pair size": (lambda d, s: _edit(d / "path.json", _pair0("size", -4)), r"path\.json: missing or malformed .*size"),
    "extra pair field": (lambda d, s: _edit(d / "path.json", _pair0("evil", "__import__('os')")), r"path\.json: missing or malformed"),
    "steps not an int": (lambda d, s: _edit(d / "path.json", _set("steps", 1.5)), r"path\.json: missing or malformed .*steps"),
    "pairs disagree with the tensors": (lambda d, s: _edit(d / "path.json", _pair0("size", 13)),
                                        r"path\.safetensors: does not match .*path\.json"),
    "tensors truncated": (lambda d, s: _cut(d / "path.safetensors"), r"path\.safetensors: does not match .*checksum"),
    "tensors flipped byte": (lambda d, s: _flip(d / "path.safetensors"), r"path\.safetensors: does not match"),
    "tensors of another path": (lambda d, s: shutil.copy(s / "path-other" / "path.safetensors", d / "path.safetensors"),
                                r"path\.safetensors: does not match .*path\.json"),
    "tensors NaN": (lambda d, s: _resave(d / "path.safetensors", lambda t: t["z"].__setitem__(0, float("nan")), d / "path.json"),
                    r"path\.safetensors: tensor 'z' holds NaN"),
    "tensor dtype changed": (lambda d, s: _resave(d / "path.safetensors", lambda t: t.__setitem__("m", t["m"].half()),
                                                  d / "path.json"), r"path\.safetensors: unexpected tensor dtypes \{'m'"),
    "tensor missing": (lambda d, s: _resave(d / "path.safetensors", lambda t: t.pop("support_count"), d / "path.json"),
                       r"path\.safetensors: missing tensors \['support_count'\]"),
    "tensors file missing": (lambda d, s: os.remove(d / "path.safetensors"), r"path\.safetensors: no such file", FileNotFoundError),
    "json missing": (lambda d, s: os.remove(d / "path.json"), r"path\.json: no such file", FileNotFoundError),
}


@pytest.mark.parametrize("case", list(PATH_CASES))
def test_corrupt_path_one_clear_error(saved, tmp_path, case):
    d = _copy(saved / "path", tmp_path / "p")
    corrupt, needle, *exc = PATH_CASES[case]
    corrupt(d, saved)
    with pytest.raises(exc[0] if exc else ValueError, match=needle) as info:
        spp.load_path(str(d))
    assert str(d) in str(info.value) and "\n" not in str(info.value)


def test_path_of_another_model_names_the_file(saved):
    path = spp.load_path(str(saved / "path"))
    for other, why in ((make("bert", seed=3, layers=2)[0], "other weights"), (make("bert", seed=0, layers=3)[0], "other pairs"),
                       (make("vit", seed=0)[0], "made for a bert model, not timm_vit")):
        with pytest.raises(ValueError, match=f"masks read off .*path.json .*{why}|masks read off .*path.json were made for a bert"):
            spp.prune(other, path.masks(keep=0.5))
        h = spp.attach(other)
        with pytest.raises(ValueError, match=r"path\.json"):
            h.set_masks(path.masks(keep=0.5))
        spp.detach(other)


def _widths_plus_one(m):
    m["widths"]["blocks.0.mlp"] += 1


PRUNED_CASES = {
    "config truncated": (lambda d, s: _cut(d / "config.json"), r"config\.json: corrupt or truncated JSON"),
    "wrong format": (lambda d, s: _edit(d / "config.json", _set("format", "spp-path")), "not a spp-pruned-model file"),
    "newer version": (lambda d, s: _edit(d / "config.json", _set("version", 2)), "unsupported version 2"),
    "unknown family": (lambda d, s: _edit(d / "config.json", _set("family", "gpt2")), "unknown model family 'gpt2'"),
    "class outside the family": (lambda d, s: _edit(d / "config.json", lambda m: m["describe"].__setitem__("class", "GPT2Model")),
                                 "unknown BERT class 'GPT2Model'"),
    "description not an object": (lambda d, s: _edit(d / "config.json", _set("describe", "x")),
                                  r"config\.json: malformed model description"),
    "dtype not a dtype": (lambda d, s: _edit(d / "config.json", _set("dtype", "load")), "unknown dtype 'load'"),
    "widths disagree with the tensors": (lambda d, s: (_edit(d / "config.json", _widths_plus_one),
                                                       _edit(d / "config.json", lambda m: m.pop("tensors_sha256"))),
                                         r"model\.safetensors: tensors do not match .*config\.json"),
    "weights truncated": (lambda d, s: _cut(d / "model.safetensors"), r"model\.safetensors: does not match .*config\.json"),
    "weights flipped byte": (lambda d, s: _flip(d / "model.safetensors"), r"model\.safetensors: does not match"),
    "weights of another pruning": (lambda d, s: shutil.copy(s / "pruned-other" / "model.safetensors", d / "model.safetensors"),
                                   r"model\.safetensors: does not match .*config\.json"),
    "weights NaN": (lambda d, s: _resave(d / "model.safetensors",
                                         lambda t: next(v for v in t.values() if v.is_floating_point()).view(-1).__setitem__(0, float("inf")),
                                         d / "config.json"), r"model\.safetensors: tensor .* holds NaN or Inf"),
}


@pytest.mark.parametrize("case", list(PRUNED_CASES))
def test_corrupt_pruned_model_one_clear_error(saved, tmp_path, case):
    d = _copy(saved / "pruned", tmp_path / "m")
    corrupt, needle = PRUNED_CASES[case]
    corrupt(d, saved)
    with pytest.raises(ValueError, match=needle) as info:
        spp.load_pruned(str(d))
    assert str(d) in str(info.value) and "\n" not in str(info.value)


def test_files_without_checksum_still_load(saved, tmp_path):
    """Files written before the checksum was recorded load as before."""
    p = _copy(saved / "path", tmp_path / "p")
    _edit(p / "path.json", lambda m: m.pop("tensors_sha256"))
    np.testing.assert_array_equal(spp.load_path(str(p)).entry, spp.load_path(str(saved / "path")).entry)
    m = _copy(saved / "pruned", tmp_path / "m")
    _edit(m / "config.json", lambda c: c.pop("tensors_sha256"))
    spp.load_pruned(str(m))


# --- nothing is unpickled ---------------------------------------------------------------------
def test_loading_never_unpickles(saved, tmp_path, monkeypatch):
    model, _ = make("bert", seed=0, layers=2)

    def stop(t, loss, h):
        if t == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(spp.SearchInterrupted):
        _search(model, checkpoint_dir=str(tmp_path / "ck"), callback=stop)

    def forbidden(*a, **k):
        raise AssertionError("something tried to unpickle")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"), (np, "load")):
        monkeypatch.setattr(mod, name, forbidden)
    spp.load_path(str(saved / "path"))
    spp.load_pruned(str(saved / "pruned"))
    ckpt.load_checkpoint(str(tmp_path / "ck"))
    _search(make("bert", seed=0, layers=2)[0], checkpoint_dir=str(tmp_path / "ck"), resume=True)


def test_no_unsafe_loader_in_the_sources():
    offenders = []
    for root in (os.path.join(HERE, "..", d) for d in ("spp", "spp_kernels")):
        for dirpath, _, files in os.walk(root):
            for f in files:
                if not f.endswith(".py"):
                    continue
                text = open(os.path.join(dirpath, f), encoding="utf-8").read()
                for pat in (r"\bimport pickle\b", r"\bpickle\.", r"\bdill\b", r"\bjoblib\b", r"allow_pickle\s*=\s*True",
                            r"torch\.load\((?![^)]*weights_only\s*=\s*True)", r"(?<![.\w])eval\(", r"(?<![.\w])exec\("):
                    if re.search(pat, text):
                        offenders.append(f"{f}: {pat}")
    assert not offenders, offenders
