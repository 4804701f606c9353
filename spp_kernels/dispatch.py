"""The one place that chooses a backend for an op.

Backends register implementations per op; ``SPP_BACKEND=torch|triton|ext`` forces one (falling
back to ``torch`` with a warning, and a reason in :func:`explain`, when it cannot serve the op).
Without the variable the first available backend in ``PREFERENCE`` that accepts the device wins.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import reference

OPS = ("masked_linear", "pair_matmul", "inclusion_step", "attention")
BACKENDS = ("torch", "triton", "ext")
PREFERENCE = ("triton", "ext", "torch")


@dataclass
class Impl:
    fn: Callable
    devices: tuple  # device types served, e.g. ("cuda",) or ("cpu", "cuda")
    forced_devices: tuple = ()  # also served there, but only when SPP_BACKEND names this backend


_REGISTRY: dict[str, dict[str, Impl]] = {op: {} for op in OPS}
_UNAVAILABLE: dict[str, str] = {}  # backend -> why it is not there
_warned: set = set()
# resolve() runs once per op call (every layer of every forward): its answers are remembered per
# (op, device type, SPP_BACKEND, the op's registry dict, held so that its id cannot be reused);
# register / mark_unavailable forget them all
_RESOLVED: dict = {}


def register(op: str, backend: str, fn: Callable, devices: tuple = ("cpu", "cuda"),
             forced_devices: tuple = ()) -> None:
    """Register ``fn`` as ``backend``'s ``op`` for tensors on ``devices``; ``forced_devices`` are
    served only on request (e.g. Triton's CPU interpreter: correct, far too slow to pick itself)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _REGISTRY[op][backend] = Impl(fn, tuple(devices), tuple(forced_devices))
    _RESOLVED.clear()


def mark_unavailable(backend: str, why: str) -> None:
    _UNAVAILABLE[backend] = why
    _RESOLVED.clear()


def requested_backend() -> Optional[str]:
    val = os.environ.get("SPP_BACKEND", "").strip().lower()
    if not val or val == "auto":
        return None
    if val not in BACKENDS:
        raise ValueError(f"SPP_BACKEND must be one of {BACKENDS} or 'auto', got {val!r}")
    return val


def _why_not(op: str, backend: str, device_type: str, forced: bool = False) -> Optional[str]:
    impl = _REGISTRY[op].get(backend)
    if impl is None:
        return _UNAVAILABLE.get(backend, f"no {backend} implementation of {op} yet")
    if forced and device_type in impl.forced_devices:
        return None
    if device_type not in impl.devices:
        if device_type in impl.forced_devices:
            return f"{backend} {op} serves {device_type} tensors only when SPP_BACKEND={backend}"
        return f"{backend} {op} serves {', '.join(impl.devices)} tensors, not {device_type}"
    return None


def choose(op: str, device_type: str) -> tuple[str, str]:
    """(backend, reason) that serves ``op`` for tensors on ``device_type``."""
    forced = requested_backend()
    if forced is not None:
        why = _why_not(op, forced, device_type, forced=True)
        if why is None:
            return forced, "forced by SPP_BACKEND"
        return "torch", f"SPP_BACKEND={forced} unavailable: {why}"
    skipped = []
    for backend in PREFERENCE:
        why = _why_not(op, backend, device_type)
        if why is None:
            return backend, "fastest available" + (f" ({'; '.join(skipped)})" if skipped else "")
        skipped.append(why)
    raise RuntimeError(f"no backend serves {op}")  # torch is always registered


def resolve(op: str, device: torch.device) -> Callable:
    registry = _REGISTRY[op]
    key = (op, device.type, os.environ.get("SPP_BACKEND", ""), id(registry))
    hit = _RESOLVED.get(key)
    if hit is not None and hit[0] is registry:
        return hit[1]
    backend, reason = choose(op, device.type)
    fn = registry[backend].fn
    if reason.startswith("SPP_BACKEND="):  # a fallback: not remembered, so that it warns as it should
        if (op, device.type) not in _warned:
            _warned.add((op, device.type))
            warnings.warn(f"spp_kernels: {op} on {device.type} falls back to torch: {reason}", RuntimeWarning,
                          stacklevel=3)
    else:
        _RESOLVED[key] = (registry, fn)
    return fn


def explain(device_type: str = "cpu") -> list[tuple[str, str, str]]:
    """Rows (op, backend, reason) for ``device_type``: what serves each op and why."""
    return [(op, *choose(op, device_type)) for op in OPS]


# the torch backend: the reference itself, except attention, which runs PyTorch's SDPA
TORCH = {op: getattr(reference, op) for op in OPS}
TORCH["attention"] = reference.sdpa_attention
for _op in OPS:
    register(_op, "torch", TORCH[_op])
