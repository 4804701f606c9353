"""Physical pruning (mask values folded into the weights) and pruned-model save / load."""
from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn

from .adapters import adapter_by_family, find_adapter
from .handle import _ATTR, fingerprint, get_handle
from .io import (atomic_paths, json_bytes, prepare_output_dir, read_json, read_safetensors, save_model_file,
                 sha256_file, write_bytes)
from .path import MaskSet

PRUNED_FORMAT = "spp-pruned-model"
PRUNED_VERSION = 1
_INFO = "_spp_pruned"


def prune(model: nn.Module, masks: MaskSet) -> nn.Module:
    """A physically smaller copy of ``model`` (attached or not) keeping the units of ``masks``,
    with their mask values folded into the weights. ``model`` itself is not changed."""
    if not isinstance(masks, MaskSet):
        raise TypeError(f"masks must be a MaskSet (from SolutionPath.masks), got {type(masks).__name__}")
    handle = get_handle(model)
    adapter = handle.adapter if handle is not None else find_adapter(model)
    specs = handle.specs if handle is not None else adapter.pair_specs(model)
    masks.check_compatible(fingerprint(model, adapter, specs))
    memo = {}
    if handle is not None:  # share, do not copy, the arena and the handle
        memo[id(handle)] = None
        memo[id(handle.arena)] = handle.arena
    pruned = copy.deepcopy(model, memo)
    pruned.__dict__.pop(_ATTR, None)
    adapter.prune_(pruned, masks.kept)
    pruned.__dict__[_INFO] = {"family": adapter.family, "describe": adapter.describe(model),
                              "widths": adapter.widths(pruned), "masks": masks.summary()}
    return pruned


def save_pruned(model: nn.Module, directory: str) -> None:
    """Write ``model.safetensors`` + ``config.json`` for a model returned by :func:`prune`."""
    info = model.__dict__.get(_INFO)
    if info is None:
        raise ValueError("model is not a pruned model (use spp.prune first)")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path, got {type(directory).__name__}")
    directory = prepare_output_dir(directory, "directory")

    # check that load_pruned will rebuild exactly this architecture before writing anything
    skeleton = _rebuild(info)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:5]
        raise ValueError(f"save_pruned: this model cannot be rebuilt from its description (first differences: {diff})")
    # both files are staged first: a failed write (full disk, ...) leaves neither behind
    files = [os.path.join(directory, "model.safetensors"), os.path.join(directory, "config.json")]
    with atomic_paths(files) as (w_tmp, c_tmp):
        save_model_file(model, w_tmp)
        write_bytes(c_tmp, json_bytes({
            "format": PRUNED_FORMAT, "version": PRUNED_VERSION, **info,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "tensors_sha256": sha256_file(w_tmp),
        }))


def load_pruned(directory: str, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_pruned` (safetensors + JSON; nothing is unpickled)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a folder path, got {type(directory).__name__}")
    cfg_path = os.path.join(os.fspath(directory), "config.json")
    info = read_json(cfg_path, expect_format=PRUNED_FORMAT, max_version=PRUNED_VERSION)
    for key in ("family", "describe", "widths"):
        if key not in info:
            raise ValueError(f"{cfg_path}: missing field {key!r}")
    try:
        model = _rebuild(info)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{cfg_path}: malformed model description ({exc})") from None
    except ValueError as exc:
        raise ValueError(f"{cfg_path}: {exc}") from None
    wpath = os.path.join(directory, "model.safetensors")
    sha = info.get("tensors_sha256")
    if sha is not None and not isinstance(sha, str):
        raise ValueError(f"{cfg_path}: malformed field tensors_sha256")
    state = read_safetensors(wpath, sha256=sha, against=cfg_path)
    dtype = getattr(torch, info.get("dtype", "float32"), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{cfg_path}: unknown dtype {info.get('dtype')!r}")
    model.to(dtype)
    own = model.state_dict()
    mismatch = [k for k in state if k not in own or tuple(state[k].shape) != tuple(own[k].shape)]
    if mismatch:
        raise ValueError(f"{wpath}: tensors do not match {cfg_path} (e.g. {mismatch[:3]})")
    missing = model.load_state_dict(state, strict=False).missing_keys
    # a tied weight is stored once; every other missing tensor is an error
    stored = {own[k].data_ptr() for k in state}
    untied = [k for k in missing if own[k].data_ptr() not in stored]
    if untied:
        raise ValueError(f"{wpath}: tensors missing for {cfg_path} (e.g. {untied[:3]})")
    model.__dict__[_INFO] = {k: info[k] for k in ("family", "describe", "widths", "masks") if k in info}
    return model.to(device).eval()


def _rebuild(info: dict) -> nn.Module:
    adapter_cls = adapter_by_family(info["family"])
    dense = adapter_cls.build(info["describe"])
    adapter = adapter_cls(dense)
    kept = {}
    for name, w in info["widths"].items():
        kept[name] = (torch.arange(int(w)), torch.ones(int(w)))
    adapter.prune_(dense, kept)
    return dense
