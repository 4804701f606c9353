"""The solution path: per-unit entry steps and final state, and mask sets read off it."""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch

from .arena import PAIR_KINDS, MaskArena, PairSpec

ALLOCATIONS = ("type", "global", "uniform")
PATH_FORMAT = "spp-path"
PATH_VERSION = 1
_TENSORS = ("entry", "support_count", "z", "m")


@dataclass
class MaskSet:
    """Kept units per pair: ``kept[name] = (indices int64 sorted, mask values fp32)``."""

    kept: dict[str, tuple[torch.Tensor, torch.Tensor]]
    sizes: dict[str, int]
    fingerprint: dict
    params_kept: float
    params_total: float
    flops_kept: float
    flops_total: float
    meta: dict = field(default_factory=dict)
    source: Optional[str] = None  # the path file the masks were read off, for error messages

    def widths(self) -> dict[str, int]:
        return {k: int(v[0].numel()) for k, v in self.kept.items()}

    def check_compatible(self, fp: dict) -> None:
        """ValueError unless these masks were made for a model with fingerprint ``fp``."""
        check_fingerprint(self.fingerprint, fp, what=f"masks read off {self.source}" if self.source else "masks")

    def summary(self) -> dict:
        return {
            "params_kept_fraction": self.params_kept / self.params_total if self.params_total else 1.0,
            "flops_kept_fraction": self.flops_kept / self.flops_total if self.flops_total else 1.0,
            "params_kept": self.params_kept, "flops_kept": self.flops_kept, **self.meta,
        }


def check_fingerprint(mine: dict, theirs: dict, what: str) -> None:
    if mine.get("family") != theirs.get("family"):
        raise ValueError(f"{what} were made for a {mine.get('family')} model, not {theirs.get('family')}")
    if [tuple(p) for p in mine.get("pairs", [])] != [tuple(p) for p in theirs.get("pairs", [])]:
        raise ValueError(f"{what} were made for a model with other pairs (layer count or widths differ)")
    a, b = float(mine.get("checksum", 0.0)), float(theirs.get("checksum", 0.0))
    if abs(a - b) > 1e-3 * max(abs(a), abs(b), 1e-12):
        raise ValueError(f"{what} were made for a model with other weights (weight checksum {a:.6g} != {b:.6g})")


def _fraction(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):  # numpy scalars are fine
        raise TypeError(f"{name} must be a number in (0, 1], got {type(v).__name__}")
    if not (0.0 < float(v) <= 1.0) or math.isnan(v):
        raise ValueError(f"{name} must be in (0, 1], got {v!r}")
    return float(v)


class SolutionPath:
    """Per unit: entry step (−1: never entered), support count, final z and m; plus the pairs,
    their costs, the number of steps and the search settings.

    Ranking (best first): earlier entry; then larger support count; then larger z; then larger |m|.
    """

    def __init__(self, pairs: list[PairSpec], entry, support_count, z, m, steps: int,
                 settings: dict, fingerprint: dict, history: Optional[dict] = None):
        self.pairs = list(pairs)
        self.entry = np.array(entry, dtype=np.int64)  # copies: never alias a live arena
        self.support_count = np.array(support_count, dtype=np.int64)
        self.z = np.array(z, dtype=np.float64)
        self.m = np.array(m, dtype=np.float32)
        n = sum(p.size for p in self.pairs)
        for name in _TENSORS:
            if getattr(self, name).shape != (n,):
                raise ValueError(f"path array {name} has shape {getattr(self, name).shape}, expected ({n},)")
        self.steps, self.settings, self.fingerprint = int(steps), dict(settings), dict(fingerprint)
        self.history = history or {}
        self.source: Optional[str] = None  # set by load(): the file this path was read from
        self.offsets = np.cumsum([0] + [p.size for p in self.pairs])[:-1]
        self.pair_id = np.concatenate([np.full(p.size, i) for i, p in enumerate(self.pairs)]) if self.pairs else np.zeros(0, int)
        self.params_cost = np.concatenate([np.full(p.size, p.params_per_unit, float) for p in self.pairs])
        self.flops_cost = np.concatenate([np.full(p.size, p.flops_per_unit, float) for p in self.pairs])
        self.kind = np.array([p.kind for p in self.pairs])[self.pair_id]

    @classmethod
    def from_arena(cls, arena: MaskArena, steps: int, settings: dict, fingerprint: dict, history=None) -> "SolutionPath":
        return cls(arena.pairs, arena.entry.cpu().numpy(), arena.support_count.cpu().numpy(),
                   arena.z.cpu().numpy(), arena.m.detach().cpu().numpy(), steps, settings, fingerprint, history)

    # --- ranking --------------------------------------------------------------------------
    def rank(self) -> np.ndarray:
        """Unit indices, best first (see the class docstring for the rule)."""
        entry = np.where(self.entry < 0, np.iinfo(np.int64).max, self.entry)
        # lexsort: last key is primary
        return np.lexsort((-np.abs(self.m), -self.z, -self.support_count, entry))

    def diagnostics(self) -> dict:
        entered = self.entry >= 0
        e = self.entry[entered]
        q = np.quantile(e, [0.1, 0.5, 0.9]).tolist() if e.size else [None] * 3
        distinct = int(np.unique(e).size)
        growth_span = (float(q[2] - q[0]) / self.steps) if e.size else 0.0
        d = {
            "units": int(self.entry.size), "fraction_entered": float(entered.mean()) if self.entry.size else 0.0,
            "distinct_entry_steps": distinct, "entry_step_q10_q50_q90": q, "steps": self.steps,
            "support_growth_span": growth_span,
            # first and last entry: the support keeps growing over this part of the run
            "entry_first_last": [int(e.min()), int(e.max())] if e.size else [None, None],
        }
        d["degenerate"], d["why"] = _degenerate(d)
        return d

    # --- mask sets ------------------------------------------------------------------------
    def masks(self, keep: Union[float, dict, None] = None, *, params: Optional[float] = None,
              flops: Optional[float] = None, latency: Optional[float] = None, table=None, round_to: Optional[int] = None,
              min_keep: int = 1, values: str = "final", allocation: str = "auto",
              layer_floor: float = 0.0) -> MaskSet:
        """A mask set read off the path for one target (exactly one of them):

        keep:   fraction of units kept per pair type (float, or {"qk": .., "vo": .., "mlp": ..});
        params: fraction of the pair parameters kept;
        flops:  fraction of the pair FLOPs per token kept;
        latency: fraction of the pair modules' measured latency kept, charged with ``table`` (a
                :class:`spp.latency.LatencyTable` from ``spp.latency.profile`` / ``spp bench
                --profile``): each unit costs the latency it adds at its pair's width.
        allocation: how the target is shared among the pairs —
                "type":    one global threshold per pair type over all layers (the authors'; the
                           default for keep=);
                "global":  cost-aware walk down the whole ranking, each unit charged its params or
                           FLOPs, pairs of every type competing (the default for params=/flops=);
                "uniform": every pair keeps the same fraction of its own units, its best ones.
        layer_floor: with "global", every pair keeps at least this fraction of its units;
        round_to: each pair keeps a multiple of this many units (or all of them); None means
                  :func:`default_round_to` (8 where CUDA is available, where widths off a multiple
                  of 8 leave tensor cores idle; 1 on CPUs; ``SPP_ROUND_TO`` overrides);
        min_keep: each pair keeps at least this many units;
        values: "final" folds the kept units' final mask values, "ones" keeps them at 1.
        """
        given = [n for n, v in (("keep", keep), ("params", params), ("flops", flops), ("latency", latency))
                 if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of keep=, params=, flops=, latency= (got {given or 'none'})")
        if (latency is None) != (table is None):
            raise ValueError("latency= needs table= (a LatencyTable from spp.latency.profile), and table= is only "
                             "used with latency=")
        if round_to is None:
            round_to = default_round_to()
        for name, v in (("round_to", round_to), ("min_keep", min_keep)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if values not in ("final", "ones"):
            raise ValueError(f"values must be 'final' or 'ones', got {values!r}")
        if allocation == "auto":
            allocation = "type" if given[0] == "keep" else "global"
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS} or 'auto', got {allocation!r}")
        if given[0] == "keep" and allocation == "global":
            raise ValueError("allocation='global' needs a params= or flops= budget (keep= is per type)")
        if given[0] == "latency" and allocation != "global":
            raise ValueError("latency= budgets use allocation='global' (a cost-aware walk with the measured costs)")
        if isinstance(layer_floor, bool) or not isinstance(layer_floor, numbers.Real) or not 0 <= layer_floor <= 1:
            raise ValueError(f"layer_floor must be a number in [0, 1], got {layer_floor!r}")
        order = self.rank()
        pos = np.empty_like(order)
        pos[order] = np.arange(order.size)  # pos[u]: rank of unit u
        sizes = np.array([p.size for p in self.pairs])
        floor = np.minimum(sizes, np.maximum(min_keep, np.ceil(layer_floor * sizes - 1e-9).astype(np.int64)))
        predicted = None
        if given[0] == "latency":
            from .latency import counts_by_latency

            frac = _fraction("latency", latency)
            counts, predicted = counts_by_latency(self, frac, table, order, floor, round_to, min_keep)
        elif allocation == "uniform":
            if given[0] == "keep":
                fr = self._type_fractions(keep)
                frac = np.array([fr[p.kind] for p in self.pairs])
            else:
                frac = _fraction(given[0], params if params is not None else flops)
            counts = np.maximum(np.round(frac * sizes).astype(np.int64), floor)
            counts = _round_counts(counts, sizes, round_to, floor)
        elif given[0] == "keep":
            counts = _round_counts(self._counts_by_type(keep, order, floor), sizes, round_to, floor)
        else:
            frac = _fraction(given[0], params if params is not None else flops)
            cost = self.params_cost if params is not None else self.flops_cost
            # the walk takes whole round_to groups and stays within the budget
            counts = self._counts_by_budget(frac, cost, order, floor, given[0], round_to, min_keep)
        kept, n_kept_mask = {}, np.zeros(self.entry.size, bool)
        for i, p in enumerate(self.pairs):
            o = self.offsets[i]
            idx_local = np.argsort(pos[o:o + p.size], kind="stable")[: counts[i]]
            idx_local = np.sort(idx_local)
            vals = self.m[o + idx_local] if values == "final" else np.ones(idx_local.size, np.float32)
            kept[p.name] = (torch.from_numpy(idx_local.astype(np.int64)), torch.from_numpy(vals.astype(np.float32)))
            n_kept_mask[o + idx_local] = True
        target = {"keep": keep, "params": params, "flops": flops, "latency": latency}[given[0]]
        # plain floats (numpy scalars are accepted above but are not JSON-serialisable)
        target = {k: float(v) for k, v in target.items()} if isinstance(target, dict) else float(target)
        meta = {"target": {given[0]: target}, "allocation": allocation, "layer_floor": float(layer_floor),
                "round_to": round_to, "min_keep": min_keep, "values": values}
        if predicted is not None:
            meta["latency_kept_fraction_predicted"] = float(predicted)
            meta["latency_table"] = {k: table.to_dict()[k] for k in ("device", "dtype", "batch", "seq")}
        return MaskSet(kept, {p.name: p.size for p in self.pairs}, self.fingerprint,
                       float(self.params_cost[n_kept_mask].sum()), float(self.params_cost.sum()),
                       float(self.flops_cost[n_kept_mask].sum()), float(self.flops_cost.sum()), meta,
                       self.source)

    @staticmethod
    def _type_fractions(keep) -> dict:
        if isinstance(keep, dict):
            if set(keep) != set(PAIR_KINDS):
                raise ValueError(f"keep as a dict needs exactly the keys {PAIR_KINDS}, got {sorted(keep)}")
            return {k: _fraction(f"keep[{k!r}]", v) for k, v in keep.items()}
        f = _fraction("keep", keep)
        return {k: f for k in PAIR_KINDS}

    def _counts_by_type(self, keep, order, floor) -> np.ndarray:
        fr = self._type_fractions(keep)
        counts = floor.copy()
        for kind in PAIR_KINDS:
            units = order[self.kind[order] == kind]  # ranked units of this type
            if units.size == 0:
                continue
            target = int(round(fr[kind] * units.size))
            taken = np.bincount(self.pair_id[units[:target]], minlength=len(self.pairs))
            counts = np.where(np.array([p.kind == kind for p in self.pairs]), np.maximum(taken, floor), counts)
        return counts

    def _counts_by_budget(self, frac, cost, order, floor, name, round_to=1, min_keep=1) -> np.ndarray:
        """Walk the ranking and charge each unit its cost until the next one would exceed the
        budget. With ``round_to`` > 1 a pair grows by whole groups of ``round_to`` units (or up to
        its full size), charged when the group's best unit is reached, so the budget still holds."""
        total = float(cost.sum())
        budget = frac * total
        sizes = np.array([p.size for p in self.pairs], dtype=np.int64)
        if round_to > 1:
            floor = np.minimum(sizes, -(-np.maximum(floor, 1) // round_to) * round_to)
        counts = floor.astype(np.int64).copy()
        unit_cost = np.array([float(cost[o]) if p.size else 0.0 for o, p in zip(self.offsets, self.pairs)])
        spent = float((counts * unit_cost).sum())
        if spent > budget * (1 + 1e-9):
            raise ValueError(f"{name}={frac:g} is below the minimum this model allows with min_keep={min_keep}, "
                             f"round_to={round_to} (every pair keeps at least that much): {spent / total:.4g}")
        # walk the ranking; the first counts[i] units of each pair are already paid for
        seen = np.zeros(len(self.pairs), dtype=np.int64)
        for u in order:
            i = self.pair_id[u]
            seen[i] += 1
            if seen[i] <= counts[i]:
                continue
            step = min(round_to, int(sizes[i] - counts[i]))
            if spent + step * unit_cost[i] > budget * (1 + 1e-12):
                break
            spent += step * unit_cost[i]
            counts[i] += step
        return counts

    # --- persistence ----------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Write ``path.safetensors`` and ``path.json`` into ``directory``: both are staged in
        temporary files first, so a failed write (full disk, …) leaves no file behind; path.json
        records the checksum of path.safetensors. NaN/Inf in the arrays is refused."""
        import hashlib

        from safetensors.torch import save

        from .io import atomic_paths, json_bytes, prepare_output_dir, write_bytes

        for name in ("z", "m"):
            if not np.isfinite(getattr(self, name)).all():
                raise ValueError(f"path array {name} holds NaN or Inf; refusing to save it")
        directory = prepare_output_dir(directory, "directory")
        tensors = {name: torch.from_numpy(np.ascontiguousarray(getattr(self, name))) for name in _TENSORS}
        blob = save(tensors)
        meta = json_bytes({
            "format": PATH_FORMAT, "version": PATH_VERSION, "steps": self.steps,
            "pairs": [p.to_dict() for p in self.pairs], "settings": self.settings,
            "fingerprint": self.fingerprint, "history": self.history, "diagnostics": self.diagnostics(),
            "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        }, reject_nan=True)
        files = [os.path.join(directory, "path.safetensors"), os.path.join(directory, "path.json")]
        with atomic_paths(files) as (t_tmp, j_tmp):
            write_bytes(t_tmp, blob)
            write_bytes(j_tmp, meta)

    @classmethod
    def load(cls, directory: str) -> "SolutionPath":
        """Read a path written by :meth:`save`; clear errors for missing or corrupt files."""
        from .io import read_json, read_safetensors

        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a folder path, got {type(directory).__name__}")
        directory = os.fspath(directory)
        meta = read_json(os.path.join(directory, "path.json"), expect_format=PATH_FORMAT, max_version=PATH_VERSION)
        jpath = os.path.join(directory, "path.json")
        tpath = os.path.join(directory, "path.safetensors")
        try:
            pairs = [PairSpec(**p) for p in meta["pairs"]]
            steps, settings, fp = meta["steps"], meta["settings"], meta["fingerprint"]
            _check_pairs(pairs)
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"steps must be an int >= 1, got {steps!r}")
            if not isinstance(settings, dict) or not isinstance(fp, dict):
                raise ValueError("settings and fingerprint must be JSON objects")
            history = meta.get("history") or {}
            if not isinstance(history, dict):
                raise ValueError("history must be a JSON object")
            sha = meta.get("tensors_sha256")
            if sha is not None and not isinstance(sha, str):
                raise ValueError("tensors_sha256 must be a string")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{jpath}: missing or malformed field ({exc})") from None
        t = read_safetensors(tpath, _TENSORS, sha256=sha, against=jpath)
        want = {"entry": torch.int64, "support_count": torch.int64, "z": torch.float64, "m": torch.float32}
        bad = {k: str(t[k].dtype) for k, d in want.items() if t[k].dtype != d}
        if bad:
            raise ValueError(f"{tpath}: unexpected tensor dtypes {bad}")
        try:
            path = cls(pairs, t["entry"].numpy(), t["support_count"].numpy(), t["z"].numpy(), t["m"].numpy(),
                       steps, settings, fp, history)
        except ValueError as exc:
            raise ValueError(f"{tpath}: does not match {jpath}: {exc}") from None
        path.source = jpath
        return path


def _check_pairs(pairs: list) -> None:
    """ValueError unless every pair of a loaded file is well-formed."""
    for p in pairs:
        if not isinstance(p.name, str) or p.kind not in PAIR_KINDS:
            raise ValueError(f"pair {p.name!r}: kind must be one of {PAIR_KINDS}, got {p.kind!r}")
        for k in ("layer", "size", "params_per_unit", "flops_per_unit"):
            v = getattr(p, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"pair {p.name!r}: {k} must be an int >= 0, got {v!r}")
    if len({p.name for p in pairs}) != len(pairs):
        raise ValueError("pair names are not unique")


def default_round_to() -> int:
    """The ``round_to`` of :meth:`SolutionPath.masks` when none is given: ``SPP_ROUND_TO`` if set,
    else 8 when CUDA is available and 1 otherwise."""
    env = os.environ.get("SPP_ROUND_TO", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"SPP_ROUND_TO must be a positive integer, got {env!r}")
        return int(env)
    return 8 if torch.cuda.is_available() else 1


def _round_counts(counts, sizes, round_to, floor) -> np.ndarray:
    if round_to == 1:
        return np.maximum(counts, floor)
    r = np.round(counts / round_to).astype(np.int64) * round_to
    r = np.maximum(r, -(-np.maximum(floor, 1) // round_to) * round_to)  # at least one group
    return np.minimum(r, sizes)


def _degenerate(d: dict) -> tuple[bool, str]:
    if d["fraction_entered"] == 0:
        return True, "no unit entered the support: the ranking is by z alone"
    if d["distinct_entry_steps"] < 10:
        return True, f"units entered at only {d['distinct_entry_steps']} distinct steps: the ranking is mostly tie-breaking"
    if d["support_growth_span"] < 0.1:
        return True, "the support grew within less than a tenth of the run"
    return False, ""
