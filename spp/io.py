"""Safe, atomic file I/O: safetensors + JSON only (nothing is unpickled), clear errors.

Writes go to a hidden temporary file next to the target, are fsync'ed, renamed onto the target
and the folder is fsync'ed: a reader sees the old file or the new one, never a half-written one.
A write that fails (full disk, file-size limit, read-only folder) removes its temporary file and
raises :class:`DiskFullError` / :class:`NotWritableError` naming the file.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import tempfile
from typing import Iterable, Optional, Sequence

import torch

_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


class NotWritableError(PermissionError, ValueError):
    """An output file or folder cannot be written (also a ValueError: the argument is bad)."""


class DiskFullError(OSError, ValueError):
    """Writing an output file failed for lack of space (or a file-size limit)."""


def _translate(exc: OSError, path: str) -> OSError:
    if isinstance(exc, (NotWritableError, DiskFullError)):
        return exc
    if exc.errno in _FULL:
        return DiskFullError(exc.errno, f"{path}: cannot write: no space left (or file size limit): {exc.strerror}")
    if exc.errno in _DENIED:
        return NotWritableError(exc.errno, f"{path}: cannot write: {exc.strerror}")
    return exc


def fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prepare_output_dir(directory, name: str = "directory") -> str:
    """Create ``directory`` if needed and check that files can be created in it.

    TypeError for a non-path, ValueError when it is a file, :class:`NotWritableError` when it
    cannot be written. Returns it as a str."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{name} must be a folder path, got {type(directory).__name__}")
    directory = os.fspath(directory)
    if not directory:
        raise ValueError(f"{name} must be a folder path, got ''")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{name} {directory!r} is a file, not a folder")
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".spp-probe.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except (NotADirectoryError, FileExistsError):
        raise ValueError(f"{name} {directory!r}: a parent of it is a file, not a folder") from None
    except OSError as exc:
        if exc.errno in _DENIED:
            raise NotWritableError(exc.errno, f"{name} {directory!r} is not writable ({exc.strerror})") from None
        if exc.errno in _FULL:
            raise DiskFullError(exc.errno, f"{name} {directory!r}: no space left ({exc.strerror})") from None
        raise
    return directory


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str]):
    """Yield one temporary file name per target in ``paths``; when the block succeeds, fsync every
    temporary file, then rename each onto its target in order and fsync the folders. If anything
    fails, every temporary file is removed and no target is touched (all are staged first)."""
    tmps: list[str] = []
    try:
        for path in paths:
            directory = os.path.dirname(os.path.abspath(path))
            try:
                fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
            except OSError as exc:
                raise _translate(exc, path) from None
            os.close(fd)
            tmps.append(tmp)
        try:
            yield list(tmps)
            mode = 0o666 & ~_umask()  # mkstemp makes 0600; outputs get the usual permissions
            for tmp in tmps:
                os.chmod(tmp, mode)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            for tmp, path in zip(tmps, paths):
                os.replace(tmp, path)
        except OSError as exc:
            raise _translate(exc, _names(paths)) from None
        for d in {os.path.dirname(os.path.abspath(p)) for p in paths}:
            fsync_dir(d)
    except BaseException:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _names(paths: Sequence[str]) -> str:
    if len(paths) == 1:
        return paths[0]
    return os.path.join(os.path.dirname(paths[0]), "{" + ", ".join(os.path.basename(p) for p in paths) + "}")


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary file name next to ``path``; on success fsync it and rename onto ``path``."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


def write_bytes(tmp: str, data: bytes) -> None:
    with open(tmp, "wb") as f:
        f.write(data)


def save_model_file(model, tmp: str) -> None:
    """``safetensors.torch.save_model`` (it drops tied duplicates); its I/O errors become OSError."""
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_model

    try:
        save_model(model, tmp)
    except SafetensorError as exc:
        m = re.search(r"os error (\d+)", str(exc))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code)) from None


_NONFINITE = "__nonfinite_float__"


def _encode(obj, reject_nan: bool = False, where: str = ""):
    """Strict JSON has no inf/nan (e.g. the authors' coupling nu = inf): store them tagged."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if reject_nan and math.isnan(obj):
            raise ValueError(f"refusing to write NaN{' at ' + where if where else ''}")
        return {_NONFINITE: repr(obj)}  # 'inf', '-inf', 'nan'
    if isinstance(obj, dict):
        return {k: _encode(v, reject_nan, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, reject_nan, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


def _decode(d: dict):
    if len(d) == 1 and _NONFINITE in d and d[_NONFINITE] in ("inf", "-inf", "nan"):
        return float(d[_NONFINITE])
    return d


def json_bytes(obj, reject_nan: bool = False) -> bytes:
    """The JSON text of ``obj`` (inf tagged; NaN tagged, or refused with ``reject_nan``)."""
    return json.dumps(_encode(obj, reject_nan), indent=1, sort_keys=False, allow_nan=False).encode()


def atomic_write_json(path: str, obj, reject_nan: bool = False) -> None:
    data = json_bytes(obj, reject_nan)  # encode first: a bad object leaves no file behind
    with atomic_path(path) as tmp:
        write_bytes(tmp, data)


def read_json(path: str, expect_format: Optional[str] = None, max_version: Optional[int] = None) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder, expected a JSON file")
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"), object_hook=_decode)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: corrupt or truncated JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if expect_format is not None and obj.get("format") != expect_format:
        raise ValueError(f"{path}: not a {expect_format} file (format={obj.get('format')!r})")
    if max_version is not None:
        v = obj.get("version")
        if isinstance(v, bool) or not isinstance(v, int) or v > max_version or v < 1:
            raise ValueError(f"{path}: unsupported version {v!r} (this spp reads versions 1..{max_version})")
    return obj


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_safetensors(path: str, required: Iterable[str] = (), sha256: Optional[str] = None,
                     against: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; ValueError naming the file if it is truncated, corrupt,
    holds NaN/Inf, lacks ``required`` tensors, or (with ``sha256``) is not the file that
    ``against`` (the JSON file that names it) was written with."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder, expected a safetensors file")
    with open(path, "rb") as f:
        data = f.read()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: does not match {against or 'its JSON file'} (checksum differs: the file is "
                         "truncated, corrupted or from another save)")
    try:
        tensors = load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({str(exc)[:160]})") from None
    missing = [k for k in required if k not in tensors]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}")
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: tensor {k!r} holds NaN or Inf")
    return tensors
