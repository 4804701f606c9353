"""Search checkpoints: everything ``spp.search`` needs to continue bit-identically after a crash.

A checkpoint folder holds

- ``state-<step>-<token>.safetensors``: the masks and all inclusion state (m, Adam moments, z, Γ,
  entry, support_count) and the torch RNG states (uint8 tensors);
- ``checkpoint.json``: step, settings, resolved λ and loss scale, model fingerprint, data
  position, history, non-finite step counters, Python and NumPy RNG states, and the name and
  SHA-256 of the tensor file.

The tensor file is written first under a new name, then ``checkpoint.json`` is replaced
atomically (temporary file, fsync, rename, fsync of the folder): it is the commit point, so a kill
at any moment leaves the previous checkpoint or the new one, never a mix. Older tensor files are
removed after the commit. Loading reads safetensors + JSON only (nothing is unpickled) and checks
every field, so a truncated, corrupted, wrong-version or mismatched file gives one ``ValueError``
naming the file and what is wrong.
"""
from __future__ import annotations

import glob
import hashlib
import math
import os
import random
import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .io import atomic_path, atomic_write_json, read_json, read_safetensors, write_bytes

CKPT_FORMAT = "spp-search-checkpoint"
CKPT_VERSION = 1
CKPT_JSON = "checkpoint.json"
ARENA_FLOAT = ("m", "exp_avg", "exp_avg_sq", "z", "gamma")
ARENA_INT = ("entry", "support_count")
ARENA = ARENA_FLOAT + ARENA_INT
_TENSOR_FILE = re.compile(r"^state-\d{8}-[0-9a-f]{8}\.safetensors$")


@dataclass
class SearchState:
    """One checkpoint of a search (see the module docstring)."""

    step: int  # steps done; 0: only the calibration
    steps: int
    arenas: dict  # name -> 1-D tensor (ARENA)
    config: dict
    lam: float
    loss_scale: float
    loss: str
    fingerprint: dict
    data: dict  # {"kind": "sequence", "index": i, "length": n, "consumed": c} | {"kind": "iterator", "consumed": c}
    history: dict
    nonfinite: dict = field(default_factory=lambda: {"skipped": [], "consecutive": 0})
    rng: dict = field(default_factory=dict)
    path: Optional[str] = None  # checkpoint.json it was read from / written to

    @property
    def complete(self) -> bool:
        return self.step >= self.steps


# --- RNG states ------------------------------------------------------------------------------
def capture_rng() -> dict:
    """torch (CPU and every initialised CUDA device), Python ``random`` and NumPy global RNG states."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    version, internal, gauss = random.getstate()
    state["python"] = [version, list(internal), gauss]
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state["numpy"] = {"name": name, "keys": [int(k) for k in keys], "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def restore_rng(state: dict, where: str = "checkpoint") -> None:
    try:
        torch.set_rng_state(state["torch"])
        cuda = state.get("cuda") or []
        if cuda and torch.cuda.is_available():
            for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)
        if "python" in state:
            version, internal, gauss = state["python"]
            random.setstate((version, tuple(internal), gauss))
        if "numpy" in state:
            n = state["numpy"]
            np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                                 n["cached_gaussian"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{where}: malformed RNG state ({str(exc)[:120]})") from None


# --- writing ---------------------------------------------------------------------------------
def save_checkpoint(directory: str, st: SearchState) -> str:
    """Write ``st`` into ``directory`` atomically; returns the path of checkpoint.json.

    Refuses (ValueError) to write NaN or Inf: no non-finite value ever reaches a checkpoint."""
    from safetensors.torch import save

    tensors = {}
    for name in ARENA:
        t = st.arenas[name].detach().to("cpu").contiguous()
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"search state {name} holds NaN or Inf at step {st.step}; refusing to checkpoint it")
        tensors[name] = t.clone()
    tensors["rng_torch"] = st.rng["torch"].clone()
    for i, s in enumerate(st.rng.get("cuda", [])):
        tensors[f"rng_cuda_{i}"] = s.cpu().clone()
    blob = save(tensors, metadata={"format": CKPT_FORMAT, "step": str(st.step)})
    name = f"state-{st.step:08d}-{os.urandom(4).hex()}.safetensors"
    _remove_stale_temporaries(directory)
    with atomic_path(os.path.join(directory, name)) as tmp:
        write_bytes(tmp, blob)
    meta = {
        "format": CKPT_FORMAT, "version": CKPT_VERSION, "step": st.step, "steps": st.steps,
        "complete": st.complete, "units": int(st.arenas["m"].numel()),
        "tensors": name, "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "config": st.config, "lam": st.lam, "loss_scale": st.loss_scale, "loss": st.loss,
        "fingerprint": st.fingerprint, "data": st.data, "history": st.history, "nonfinite": st.nonfinite,
        "rng": {k: v for k, v in st.rng.items() if k in ("python", "numpy")},
        "cuda_rng_states": len(st.rng.get("cuda", [])),
    }
    jpath = os.path.join(directory, CKPT_JSON)
    try:
        atomic_write_json(jpath, meta, reject_nan=True)  # the commit point
    except BaseException:
        _unlink(os.path.join(directory, name))  # never committed
        raise
    for old in glob.glob(os.path.join(glob.escape(directory), "state-*.safetensors")):
        if os.path.basename(old) != name:
            _unlink(old)
    st.path = jpath
    return jpath


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _remove_stale_temporaries(directory: str) -> None:
    """Temporary files left by a process killed while writing (SIGKILL cannot clean up)."""
    for pattern in (".state-*.tmp", "." + CKPT_JSON + ".*.tmp"):
        for f in glob.glob(os.path.join(glob.escape(directory), pattern)):
            _unlink(f)


# --- reading ---------------------------------------------------------------------------------
def exists(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, CKPT_JSON))


def peek(directory: str) -> dict:
    """The JSON part of the checkpoint in ``directory`` (validated format and version only)."""
    return read_json(os.path.join(directory, CKPT_JSON), expect_format=CKPT_FORMAT, max_version=CKPT_VERSION)


def _int(v, lo=0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_checkpoint(directory: str) -> SearchState:
    """Read and check the checkpoint in ``directory``. FileNotFoundError when there is none;
    ValueError naming the file and the problem when it is unusable."""
    jpath = os.path.join(directory, CKPT_JSON)
    meta = peek(directory)

    def bad(what: str):
        return ValueError(f"{jpath}: {what}")

    for key in ("step", "steps", "units", "tensors", "tensors_sha256", "config", "lam", "loss_scale", "loss",
                "fingerprint", "data", "history", "nonfinite", "rng"):
        if key not in meta:
            raise bad(f"missing field {key!r}")
    step, steps, units = meta["step"], meta["steps"], meta["units"]
    if not (_int(step) and _int(steps, 1) and _int(units) and step <= steps):
        raise bad(f"malformed step / steps / units ({step!r}, {steps!r}, {units!r})")
    if not isinstance(meta["tensors"], str) or not _TENSOR_FILE.match(meta["tensors"]):
        raise bad(f"malformed tensor file name {meta['tensors']!r}")
    if not isinstance(meta["tensors_sha256"], str):
        raise bad("malformed field 'tensors_sha256'")
    for key in ("config", "fingerprint", "data", "history", "nonfinite", "rng"):
        if not isinstance(meta[key], dict):
            raise bad(f"field {key!r} must be a JSON object")
    if not (_num(meta["lam"]) and meta["lam"] >= 0 and _num(meta["loss_scale"]) and meta["loss_scale"] > 0):
        raise bad(f"malformed lam / loss_scale ({meta['lam']!r}, {meta['loss_scale']!r})")
    if not isinstance(meta["loss"], str):
        raise bad("malformed field 'loss'")
    data = meta["data"]
    if data.get("kind") == "sequence":
        if not (_int(data.get("length"), 1) and isinstance(data.get("index"), int)
                and -1 <= data["index"] < data["length"] and _int(data.get("consumed"))):
            raise bad(f"malformed data position {data!r}")
    elif data.get("kind") == "iterator":
        if not _int(data.get("consumed")):
            raise bad(f"malformed data position {data!r}")
    else:
        raise bad(f"unknown data kind {data.get('kind')!r}")
    nf = meta["nonfinite"]
    if not (isinstance(nf.get("skipped"), list) and all(_int(s, 1) and s <= step for s in nf["skipped"])
            and _int(nf.get("consecutive")) and nf["consecutive"] <= len(nf["skipped"])):
        raise bad(f"malformed non-finite step counters {nf!r}")
    hist = meta["history"]
    if not all(isinstance(hist.get(k), list) for k in ("step", "loss", "support")):
        raise bad("malformed history")
    if not all(_num(v) for v in hist["loss"]):
        raise bad("history holds a non-finite loss")
    n_cuda = meta.get("cuda_rng_states", 0)
    if not _int(n_cuda):
        raise bad("malformed field 'cuda_rng_states'")

    tpath = os.path.join(directory, meta["tensors"])
    t = read_safetensors(tpath, ARENA + ("rng_torch",) + tuple(f"rng_cuda_{i}" for i in range(n_cuda)),
                         sha256=meta["tensors_sha256"], against=jpath)
    for name in ARENA:
        want = torch.float32 if name in ARENA_FLOAT else torch.int32
        if t[name].dtype != want or tuple(t[name].shape) != (units,):
            raise ValueError(f"{tpath}: tensor {name!r} is {t[name].dtype} of shape {tuple(t[name].shape)}, "
                             f"expected {want} of shape ({units},) as {jpath} says")
    if t["rng_torch"].dtype != torch.uint8:
        raise ValueError(f"{tpath}: tensor 'rng_torch' must be uint8")
    entry, count = t["entry"], t["support_count"]
    if units and (int(entry.max()) > step or int(entry.min()) < -1 or int(count.min()) < 0 or int(count.max()) > step):
        raise ValueError(f"{tpath}: entry / support_count hold steps outside [-1, {step}]")
    rng = dict(meta["rng"])
    rng["torch"] = t["rng_torch"]
    rng["cuda"] = [t[f"rng_cuda_{i}"] for i in range(n_cuda)]
    return SearchState(step=step, steps=steps, arenas={n: t[n] for n in ARENA}, config=meta["config"],
                       lam=float(meta["lam"]), loss_scale=float(meta["loss_scale"]), loss=meta["loss"],
                       fingerprint=meta["fingerprint"], data=data, history=hist, nonfinite=nf, rng=rng, path=jpath)
