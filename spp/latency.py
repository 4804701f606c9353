"""Latency-aware budgets: measure how each pair type's latency falls with its width on this
device, and read masks off the path for a latency target (``path.masks(latency=0.5, table=t)``).

The profile times one block's attention and MLP, physically narrowed to each width of a grid
(the other attention width at full size), at a given batch and sequence length. The latency of a
block is modelled as additive in its pairs::

    t_block(w_qk, w_vo, w_mlp) = T_qk(w_qk) + T_vo(w_vo) − T_attn(full) + T_mlp(w_mlp)

with each T made non-decreasing in the width (running maximum over the grid, then linear
interpolation), so a unit's cost is the latency it adds at the pair's current width: widths that
fall off a fast kernel's tile boundary show up as steps, which a FLOPs count cannot see.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from .arena import PAIR_KINDS

FORMAT = "spp-latency-table"
VERSION = 1


@dataclass
class LatencyTable:
    """Measured latency (ms) of one block's pair modules against their width."""

    device: str
    dtype: str
    batch: int
    seq: int
    family: str
    sizes: dict  # kind -> full width
    widths: dict  # kind -> [w0 < w1 < ... = size]
    ms: dict  # kind -> [latency at each width], attention kinds with the other width full
    attn_full_ms: float
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        for kind in PAIR_KINDS:
            if kind not in self.widths or kind not in self.ms:
                raise ValueError(f"latency table: no measurements for pair type {kind!r}")
            w, t = np.asarray(self.widths[kind], float), np.asarray(self.ms[kind], float)
            if w.ndim != 1 or w.size < 2 or w.size != t.size or np.any(np.diff(w) <= 0):
                raise ValueError(f"latency table: widths of {kind!r} must rise strictly, one time each")
            if not np.all(np.isfinite(t)) or np.any(t < 0):
                raise ValueError(f"latency table: times of {kind!r} must be finite and >= 0")

    def curve(self, kind: str, width) -> np.ndarray:
        """T_kind(width) in ms: the measurements made non-decreasing, interpolated linearly
        (extrapolated linearly towards width 0)."""
        w = np.asarray(self.widths[kind], float)
        t = np.maximum.accumulate(np.asarray(self.ms[kind], float))
        x = np.asarray(width, float)
        out = np.interp(x, w, t)
        below = x < w[0]
        if np.any(below):  # linear towards 0 with the first segment's slope, never below 0
            slope = (t[1] - t[0]) / (w[1] - w[0])
            out = np.where(below, np.maximum(t[0] - slope * (w[0] - x), 0.0), out)
        return out

    def block_ms(self, w_qk, w_vo, w_mlp) -> np.ndarray:
        return self.curve("qk", w_qk) + self.curve("vo", w_vo) - self.attn_full_ms + self.curve("mlp", w_mlp)

    def check_pairs(self, pairs) -> None:
        for p in pairs:
            if p.size != self.sizes[p.kind]:
                raise ValueError(f"latency table was measured for {p.kind} width {self.sizes[p.kind]}, but pair "
                                 f"{p.name} has {p.size} units: profile this model (spp bench --profile)")

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "device": self.device, "dtype": self.dtype,
                "batch": self.batch, "seq": self.seq, "family": self.family, "sizes": self.sizes,
                "widths": self.widths, "ms": self.ms, "attn_full_ms": self.attn_full_ms, "meta": self.meta}

    def save(self, file: str) -> None:
        from .io import atomic_write_json

        atomic_write_json(os.fspath(file), self.to_dict())

    @classmethod
    def load(cls, file: str) -> "LatencyTable":
        from .io import read_json

        d = read_json(os.fspath(file), FORMAT)
        if d.get("version") != VERSION:
            raise ValueError(f"{file}: {FORMAT} version {d.get('version')!r}, this library reads version {VERSION}")
        try:
            return cls(d["device"], d["dtype"], int(d["batch"]), int(d["seq"]), d["family"],
                       {k: int(v) for k, v in d["sizes"].items()}, d["widths"], d["ms"], float(d["attn_full_ms"]),
                       d.get("meta", {}))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{file}: malformed latency table ({type(exc).__name__}: {exc})") from None


def width_grid(size: int, points: int = 9, multiple: int = 8) -> list[int]:
    """About ``points`` widths from 1 to ``size``: evenly spaced, rounded to ``multiple``."""
    raw = np.linspace(0, size, points)
    grid = {1, size}
    for v in raw[1:-1]:
        r = int(round(v / multiple)) * multiple if size >= 4 * multiple else int(round(v))
        grid.add(min(max(r, 1), size))
    return sorted(grid)


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def profile(model, batch: int = 1, seq: Optional[int] = None, points: int = 9, repeats: int = 7,
            block: int = 0) -> LatencyTable:
    """Measure the latency of one block's attention and MLP against each pair type's width.

    model: a supported model (attached or not; it is not changed). batch, seq: the input shape
    to measure at (seq defaults to the adapter's). Returns a :class:`LatencyTable`."""
    from .adapters import find_adapter
    from .handle import get_handle
    from .layers import prune_attention, prune_mlp

    handle = get_handle(model)
    adapter = handle.adapter if handle is not None else find_adapter(model)
    blocks = adapter.blocks(model)
    if not 0 <= block < len(blocks):
        raise ValueError(f"block must be in [0, {len(blocks)}), got {block}")
    attn, mlp = adapter.parts(blocks[block])
    seq = seq or adapter.default_seq_len(model)
    param = attn.q.weight
    device, dtype = param.device, param.dtype
    x = torch.randn(batch, seq, attn.q.in_features, device=device, dtype=dtype)
    sizes = {"qk": attn.qk_dim, "vo": attn.v_dim, "mlp": mlp.fc1.out_features}

    def ones(n):
        return torch.ones(n, device=device)

    def idx(n):
        return torch.arange(n, device=device)

    def attn_at(w_qk, w_vo):
        small = prune_attention(attn, idx(w_qk), ones(w_qk), idx(w_vo), ones(w_vo)).eval()
        return _median_ms(lambda: small.forward_core(x), repeats, device)

    widths, ms = {}, {}
    full_qk, full_vo = sizes["qk"], sizes["vo"]
    widths["qk"] = width_grid(full_qk, points)
    ms["qk"] = [attn_at(w, full_vo) for w in widths["qk"]]
    widths["vo"] = width_grid(full_vo, points)
    ms["vo"] = [attn_at(full_qk, w) for w in widths["vo"]]
    attn_full = (ms["qk"][-1] + ms["vo"][-1]) / 2
    ms["qk"][-1] = ms["vo"][-1] = attn_full  # one measurement of the full attention, not two noisy ones
    widths["mlp"] = width_grid(sizes["mlp"], points)
    ms["mlp"] = []
    for w in widths["mlp"]:
        small = prune_mlp(mlp, idx(w), ones(w)).eval()
        ms["mlp"].append(_median_ms(lambda: small(x), repeats, device))
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return LatencyTable(dev, str(dtype).replace("torch.", ""), batch, seq, adapter.family, sizes, widths, ms,
                        attn_full, {"threads": torch.get_num_threads(), "repeats": repeats, "block": block})


def counts_by_latency(path, frac: float, table: LatencyTable, order: np.ndarray, floor: np.ndarray,
                      round_to: int = 1, min_keep: int = 1) -> tuple[np.ndarray, float]:
    """Walk the ranking, charging each unit (or round_to group) the latency it adds at its pair's
    current width, until the next one would exceed ``frac`` of the full pairs' latency.
    Returns (units kept per pair, predicted fraction of the full latency)."""
    pairs = path.pairs
    table.check_pairs(pairs)
    sizes = np.array([p.size for p in pairs], dtype=np.int64)
    if round_to > 1:
        floor = np.minimum(sizes, -(-np.maximum(floor, 1) // round_to) * round_to)
    counts = floor.astype(np.int64).copy()
    layers = sorted({p.layer for p in pairs})
    n_attn = len(layers)

    def total(c) -> float:
        t = -table.attn_full_ms * n_attn
        for i, p in enumerate(pairs):
            t += float(table.curve(p.kind, c[i]))
        return t

    full = total(sizes)
    budget = frac * full
    spent = total(counts)
    if spent > budget * (1 + 1e-9):
        raise ValueError(f"latency={frac:g} is below the minimum this model allows with min_keep={min_keep}, "
                         f"round_to={round_to} (every pair keeps at least that much): {spent / full:.4g}")
    if frac >= 1.0:  # everything: no sum of measured increments to round against the whole
        return sizes.copy(), 1.0
    seen = np.zeros(len(pairs), dtype=np.int64)
    for u in order:
        i = path.pair_id[u]
        seen[i] += 1
        if seen[i] <= counts[i]:
            continue
        step = min(round_to, int(sizes[i] - counts[i]))
        kind = pairs[i].kind
        add = float(table.curve(kind, counts[i] + step) - table.curve(kind, counts[i]))
        # the same expression as the fraction returned, so that it never exceeds frac, not even
        # by the last bit (a relative slack here once let a unit in at 1 ulp over the target)
        if (spent + add) / full > frac:
            break
        spent += add
        counts[i] += step
    return counts, spent / full


def predicted_ms(table: LatencyTable, widths: dict, pairs: Sequence) -> float:
    """The table's prediction of the pair modules' latency (ms) at ``widths`` (pair name -> width)."""
    t = -table.attn_full_ms * len({p.layer for p in pairs})
    for p in pairs:
        t += float(table.curve(p.kind, widths[p.name]))
    return t

