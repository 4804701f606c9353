"""``spp.attach`` / ``spp.detach`` and the handle that ties a model to its mask arena."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn

from .adapters import Adapter, find_adapter
from .arena import MaskArena, PairSpec

_ATTR = "_spp_handle"


class SppHandle:
    """A model with masked layers installed. ``arena`` holds every mask; ``specs`` its pairs."""

    def __init__(self, model: nn.Module, adapter: Adapter, arena: MaskArena, saved: list):
        self.model, self.adapter, self.arena, self._saved = model, adapter, arena, saved

    @property
    def specs(self) -> list[PairSpec]:
        return self.arena.pairs

    def fingerprint(self) -> dict:
        return fingerprint(self.model, self.adapter, self.specs)

    @contextlib.contextmanager
    def dense(self):
        """Run the model without masks (the frozen dense teacher)."""
        prev = self.arena.enabled
        self.arena.enabled = False
        try:
            yield
        finally:
            self.arena.enabled = prev

    @torch.no_grad()
    def set_masks(self, masks=None) -> None:
        """Load a :class:`MaskSet` into the arena (dropped units 0, and skipped via ``active``);
        ``None`` restores all-ones masks. The inclusion state is untouched."""
        if masks is None:
            self.arena.m.fill_(1.0)
            for k in self.arena.active:
                self.arena.active[k] = None
            return
        masks.check_compatible(self.fingerprint())
        self.arena.m.zero_()
        for name, (idx, val) in masks.kept.items():
            view = self.arena.view(name)
            view[idx.to(view.device)] = val.to(view.device)
            self.arena.active[name] = idx.to(view.device)


def fingerprint(model: nn.Module, adapter: Adapter, specs: list[PairSpec]) -> dict:
    """Identifies the model a path was searched on: family, pair structure and a weight checksum."""
    checksum = 0.0
    for block in adapter.blocks(model):
        attn, mlp = adapter.parts(block)
        for w in (attn.q.weight, attn.v.weight, mlp.fc1.weight):
            checksum += float(w.detach()[:4].double().abs().sum())
    return {"family": adapter.family, "pairs": [[p.name, p.size] for p in specs], "checksum": checksum}


def get_handle(model: nn.Module) -> Optional[SppHandle]:
    return model.__dict__.get(_ATTR)


def attach(model: nn.Module, seq_len: Optional[int] = None) -> SppHandle:
    """Install masked layers into a supported model and return its handle.

    ``seq_len`` sets the sequence length at which FLOPs per token are counted (default: 128 for
    text, the number of tokens for ViTs). Weights and the model's behaviour are unchanged while
    every mask is 1.
    """
    if isinstance(model, SppHandle):
        raise ValueError("model is already an SppHandle; pass handle.model to attach a model")
    adapter = find_adapter(model)
    from spp_kernels.reference import FLOAT_DTYPES

    bad = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype not in FLOAT_DTYPES})
    if bad:
        raise TypeError(f"model: parameters of dtype {', '.join(bad)} are not supported "
                        "(spp runs float32, float16 and bfloat16 models); convert it with model.float()")
    if get_handle(model) is not None:
        raise ValueError("model is already attached: call spp.detach(model) first")
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 1):
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if any(adapter.installed(b) is not None for b in adapter.blocks(model)):
        raise ValueError("model is already pruned (spp.prune output) or attached; it cannot be attached again")
    specs = adapter.pair_specs(model, seq_len)
    device = next(model.parameters()).device
    arena = MaskArena(specs, device=device, seq_len=seq_len or adapter.default_seq_len(model))
    saved = adapter.attach(model, arena)
    handle = SppHandle(model, adapter, arena, saved)
    model.__dict__[_ATTR] = handle
    return handle


def detach(model_or_handle) -> nn.Module:
    """Restore the original modules; returns the model."""
    model = model_or_handle.model if isinstance(model_or_handle, SppHandle) else model_or_handle
    handle = get_handle(model)
    if handle is None:
        raise ValueError("model is not attached")
    handle.adapter.detach(model, handle._saved)
    del model.__dict__[_ATTR]
    return model


def resolve(model_or_handle) -> SppHandle:
    """The handle of an attached model (or the handle itself)."""
    if isinstance(model_or_handle, SppHandle):
        return model_or_handle
    handle = get_handle(model_or_handle) if isinstance(model_or_handle, nn.Module) else None
    if handle is None:
        raise ValueError("model is not attached: call spp.attach(model) first")
    return handle
