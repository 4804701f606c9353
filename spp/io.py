"""Safe, atomic file I/O: safetensors + JSON only (nothing is unpickled), clear errors."""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Iterable, Optional

import torch


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary file name next to ``path``; on success fsync it and rename onto ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_NONFINITE = "__nonfinite_float__"


def _encode(obj):
    """Strict JSON has no inf/nan (e.g. the authors' coupling nu = inf): store them tagged."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return {_NONFINITE: repr(obj)}  # 'inf', '-inf', 'nan'
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


def _decode(d: dict):
    if len(d) == 1 and _NONFINITE in d and d[_NONFINITE] in ("inf", "-inf", "nan"):
        return float(d[_NONFINITE])
    return d


def atomic_write_json(path: str, obj) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(_encode(obj), f, indent=1, sort_keys=False, allow_nan=False)


def read_json(path: str, expect_format: Optional[str] = None, max_version: Optional[int] = None) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path) as f:
            obj = json.load(f, object_hook=_decode)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: corrupt JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if expect_format is not None and obj.get("format") != expect_format:
        raise ValueError(f"{path}: not a {expect_format} file (format={obj.get('format')!r})")
    if max_version is not None:
        v = obj.get("version")
        if not isinstance(v, int) or v > max_version or v < 1:
            raise ValueError(f"{path}: unsupported version {v!r} (this spp reads versions 1..{max_version})")
    return obj


def read_safetensors(path: str, required: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    missing = [k for k in required if k not in tensors]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}")
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: tensor {k!r} holds NaN or Inf")
    return tensors
