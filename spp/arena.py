"""MaskArena: every mask of a model in one flat fp32 tensor, with the inclusion state beside it.

Each pair's mask is the slice ``arena.m[offset:offset + size]``; the per-unit arrays (pair id,
params and FLOPs cost) let one kernel launch update all masks and let the path charge costs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import torch

PAIR_KINDS = ("qk", "vo", "mlp")


@dataclass(frozen=True)
class PairSpec:
    """One pair of linear maps sharing a prunable inner dimension."""

    name: str  # e.g. "blocks.3.qk"
    kind: str  # one of PAIR_KINDS
    layer: int
    size: int  # number of mask units
    params_per_unit: int  # parameters removed with one unit
    flops_per_unit: int  # FLOPs per token removed with one unit (at the arena's seq_len)

    def to_dict(self) -> dict:
        return asdict(self)


class MaskArena:
    """Flat fp32 masks plus the §2 state, all of equal length (one entry per unit).

    m: (U,) fp32 leaf with requires_grad (the masks); exp_avg, exp_avg_sq, z, gamma: (U,) fp32;
    entry, support_count: (U,) int32; pair_id: (U,) int32; params_cost, flops_cost: (U,) float64.
    """

    def __init__(self, pairs: Iterable[PairSpec], device: torch.device | str = "cpu", seq_len: int = 128):
        self.pairs: list[PairSpec] = list(pairs)
        names = [p.name for p in self.pairs]
        if len(set(names)) != len(names):
            raise ValueError("pair names must be unique")
        self.seq_len = seq_len
        self._index = {p.name: i for i, p in enumerate(self.pairs)}
        self.offsets: dict[str, int] = {}
        off = 0
        for p in self.pairs:
            if p.kind not in PAIR_KINDS:
                raise ValueError(f"pair kind must be one of {PAIR_KINDS}, got {p.kind!r}")
            self.offsets[p.name] = off
            off += p.size
        self.numel = off
        dev = torch.device(device)
        self.m = torch.ones(off, dtype=torch.float32, device=dev, requires_grad=True)
        self.pair_id = torch.cat(
            [torch.full((p.size,), i, dtype=torch.int32) for i, p in enumerate(self.pairs)]
        ) if self.pairs else torch.zeros(0, dtype=torch.int32)
        self.params_cost = torch.cat(
            [torch.full((p.size,), float(p.params_per_unit), dtype=torch.float64) for p in self.pairs]
        ) if self.pairs else torch.zeros(0, dtype=torch.float64)
        self.flops_cost = torch.cat(
            [torch.full((p.size,), float(p.flops_per_unit), dtype=torch.float64) for p in self.pairs]
        ) if self.pairs else torch.zeros(0, dtype=torch.float64)
        # active[name]: int64 indices of the computed units, or None for all (set by masked evaluation)
        self.active: dict[str, Optional[torch.Tensor]] = {p.name: None for p in self.pairs}
        self.enabled = True  # False: every layer runs dense (the teacher of self-distillation)
        self.reset_state()

    def reset_state(self) -> None:
        """Masks to 1 and all inclusion state to its initial value (SPEC §2)."""
        dev = self.m.device
        with torch.no_grad():
            self.m.fill_(1.0)
        self.m.grad = None
        z32 = lambda: torch.zeros(self.numel, dtype=torch.float32, device=dev)  # noqa: E731
        self.exp_avg, self.exp_avg_sq, self.z, self.gamma = z32(), z32(), z32(), z32()
        self.entry = torch.full((self.numel,), -1, dtype=torch.int32, device=dev)
        self.support_count = torch.zeros(self.numel, dtype=torch.int32, device=dev)
        for k in self.active:
            self.active[k] = None

    def pair(self, name: str) -> PairSpec:
        return self.pairs[self._index[name]]

    def view(self, name: str, tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The slice of ``tensor`` (default: the masks) that belongs to pair ``name``."""
        off = self.offsets[name]
        t = self.m if tensor is None else tensor
        return t[off: off + self.pairs[self._index[name]].size]

    @property
    def total_params(self) -> float:
        return float(self.params_cost.sum())

    @property
    def total_flops(self) -> float:
        return float(self.flops_cost.sum())

    def to(self, device) -> "MaskArena":
        """Move every array to ``device`` (the masks stay a grad-requiring leaf)."""
        dev = torch.device(device)
        with torch.no_grad():
            self.m = self.m.detach().to(dev).requires_grad_(True)
        for name in ("exp_avg", "exp_avg_sq", "z", "gamma", "entry", "support_count"):
            setattr(self, name, getattr(self, name).to(dev))
        return self
