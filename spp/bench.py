"""Dense vs pruned speed, measured side by side (``spp bench``, benchmarks/bench_pruned_vs_dense.py).

FLOPs are counted by torch's FlopCounterMode under SDPA's math kernel (the counter has no formula
for the CPU flash kernel, which would count dense attention as 0). Times are medians of repeats
in which the models take turns, so a slow spell of a shared machine hits them alike; a turn is
``burst`` consecutive calls (column ``burst``), the first untimed, so that each model is timed
with its weights in the caches as when it is served on its own (:func:`side_by_side`).

On glibc, :func:`retain_freed_memory` stops the allocator from handing large freed blocks back to
the kernel. By default each forward at batch 64 re-faults its activations page by page (about
200k page faults per dense MiniLM forward on the development machine, against 28k for the model
pruned to 0.3 of the FLOPs), a cost that falls mostly on the dense model and so flatters the
speed-up. The benchmarks call it first and record the setting in the ``malloc`` column.

The pruned and reference models run their unmasked products through ``spp_kernels.linear``
(oneDNN for fp32 on x86 CPUs, column ``linear``); the dense model keeps its own ``F.linear``.

Each row also times two reference models through the same layers as the pruned one (the fused
attention op instead of the dense model's own attention): ``full_width``, the model "pruned" to
all its units, and the *skeleton*, pruned to one unit per pair — everything that does not shrink
with the pairs (embeddings, layer norms, residual adds, the per-head softmax, the projections'
bias and output writes, Python and dispatch). ``efficiency_vs_full_width`` compares the pruned
model with the full-width one, so that a gain of our layers over the original ones at equal
width is not counted as pruning. With full-width time F, skeleton time S and FLOPs ratios r
(pruned) and r_s (skeleton) to the full width, a model whose pairs took exactly their FLOPs share
of the full-width pair time would take S + (r - r_s) / (1 - r_s) · (F - S): column
``proportional`` is its efficiency, r·F / that time, the figure to hold
``efficiency_vs_full_width`` against. It separates a shortfall in the pairs (below it: narrow
GEMMs or attention running less efficiently than wide ones) from the one the fixed part causes.
It is not a hard bound: narrow GEMMs that suit the caches better than wide ones can beat it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import statistics
import time
from typing import Callable, Optional, Sequence

import torch

FIELDS = ("model", "device", "dtype", "threads", "batch", "seq", "target", "round_to", "flops_ratio",
          "params_ratio", "dense_per_s", "pruned_per_s", "speedup", "ideal_speedup", "efficiency",
          "skeleton_per_s", "skeleton_flops_ratio", "proportional", "full_width_per_s", "efficiency_vs_full_width",
          "latency_predicted", "malloc", "linear", "burst", "compile", "widths")

# Calls per turn in side_by_side, the first untimed. On the 2-core dev machine, batch 1, MiniLM
# pruned to 0.3 of the FLOPs took 6.2 ms a call when its calls alternated with the dense and
# full-width models' (whose 41 MiB of encoder weights evict its 11 MiB from the 32 MiB L3), 5.4 ms
# as the second call of a turn and 5.3 ms as the second to fifth; the full-width and dense models,
# too large for that cache either way, 10.1 and 19.6 ms in all three.
BURST = 2

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC = {"setting": None}


def retain_freed_memory(mmap_threshold: int = 1 << 28, trim_threshold: int = 1 << 30) -> bool:
    """Ask glibc to serve blocks up to ``mmap_threshold`` bytes from its heap and to keep up to
    ``trim_threshold`` freed bytes instead of returning them to the kernel, so that repeated
    forwards reuse pages instead of faulting fresh ones in. The process keeps its peak memory.
    Returns False where the C library is not glibc or refuses a value; True once both are set."""
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
            raise ValueError(f"{name} must be an int in (0, 2**31) (mallopt takes a C int), got {value!r}")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(_M_TRIM_THRESHOLD, trim_threshold):  # mallopt returns 1 on success
        return False
    if not mallopt(_M_MMAP_THRESHOLD, mmap_threshold):
        # glibc releases that bound M_MMAP_THRESHOLD by HEAP_MAX_SIZE / 2 take at most 32 MiB
        mmap_threshold = min(mmap_threshold, 32 << 20)
        if not mallopt(_M_MMAP_THRESHOLD, mmap_threshold):
            _MALLOC["setting"] = f"trim={trim_threshold >> 20}M only"
            return False
    _MALLOC["setting"] = f"retain(mmap={mmap_threshold >> 20}M,trim={trim_threshold >> 20}M)"
    return True


def malloc_setting() -> str:
    """How the C allocator was configured for this process, for the ``malloc`` column."""
    if _MALLOC["setting"]:
        return _MALLOC["setting"]
    tun = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t.startswith("glibc.malloc.")]
    return "GLIBC_TUNABLES=" + ":".join(tun) if tun else "default"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {name}"


def call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


@torch.no_grad()
def count_flops(model, inputs) -> int:
    """FLOPs of one forward on ``inputs`` (attention included)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        call(model, inputs)
    return fc.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def side_by_side(models: dict, inputs, repeats: int = 7, burst: int = BURST) -> dict:
    """Seconds per forward of each model in steady state: ``repeats`` rounds in which the models
    take turns (so that a slow spell of a shared machine hits them alike), each turn ``burst``
    consecutive calls of which all but the first are timed; the median of the timed calls (two
    warm-up calls each first). The untimed first call of a turn brings the model's weights back
    into the caches after the other models' turns, as a deployment that serves one model call
    after call has them; timing single interleaved calls (``burst=1``) times a small model cold
    behind a large one (see :data:`BURST`)."""
    if burst < 1:
        raise ValueError(f"burst must be >= 1, got {burst}")
    device = next(iter(models.values())).parameters().__next__().device
    for m in models.values():
        call(m, inputs)
        call(m, inputs)
    times = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            for i in range(burst):
                _sync(device)
                t = time.perf_counter()
                call(m, inputs)
                _sync(device)
                if i > 0 or burst == 1:
                    times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def proportional_efficiency(flops_ratio: float, full_s: float, skeleton_s: float,
                            skeleton_flops_ratio: float) -> float:
    """The efficiency (speed-up × FLOPs ratio, against the full-width model that takes ``full_s``)
    of a pruned model whose pairs take exactly their FLOPs share of the full-width pair time, over a
    fixed part that takes ``skeleton_s``; both ratios are to the full width (see the module
    docstring). 1 when the fixed part is free."""
    r, rs, f, s = flops_ratio, skeleton_flops_ratio, full_s, skeleton_s
    if not (0 <= rs < r <= 1) or not 0 < s < f:
        raise ValueError(f"need 0 <= skeleton ratio < FLOPs ratio <= 1 and 0 < skeleton time < full-width time, "
                         f"got r={r}, r_s={rs}, F={f}, S={s}")
    return r * f / (s + (r - rs) / (1 - rs) * (f - s))


def skeleton(model, path):
    """``model`` pruned to one unit per pair: the part of every pruned model that does not shrink."""
    from .prune import prune

    return prune(model, path.masks(keep=1e-12, round_to=1, min_keep=1)).eval()


def pruned_vs_dense(model, path, inputs: Callable[[int], object], *, name: str, seq: int,
                    flops: Sequence[float] = (0.7, 0.5, 0.3), round_to: Sequence[int] = (1, 8),
                    batches: Sequence[int] = (1, 64), repeats: int = 7, burst: int = BURST, latency_table=None,
                    latency: Sequence[float] = (), log: Optional[Callable[[str], None]] = print,
                    references: bool = True, compile: Optional[str] = None) -> list[dict]:
    """Rows of dense vs physically pruned throughput for each target × round_to × batch.

    model: the dense model (not attached); path: its SolutionPath; inputs(batch) -> model inputs
    at sequence ``seq``. ``latency`` targets (with ``latency_table``) add rows whose masks come
    from ``path.masks(latency=…)``; their ``latency_predicted`` is the table's prediction.
    ``references``: also time :func:`skeleton` and the full-width model in the same rounds and fill
    ``proportional`` and ``efficiency_vs_full_width`` (else NaN). ``compile``: a torch.compile
    backend ("inductor") that every timed model, the dense one included, runs under (its
    compilation happens in the warm-up calls, untimed); None: eager."""
    from .prune import prune

    compiled = {}

    def run(m):
        if compile is None:
            return m
        if id(m) not in compiled:
            compiled[id(m)] = (m, torch.compile(m, backend=compile, dynamic=False))
        return compiled[id(m)][1]

    if compile is not None:  # every pruned model and batch shape is one more entry of the same code objects
        import torch._dynamo as dynamo  # (binds dynamo only: a bare `import torch._dynamo` makes torch local)

        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 256))

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    dense_flops = count_flops(model, inputs(1))
    dense_params = sum(p.numel() for p in model.parameters())
    skel = full = None
    skel_ratio = full_ratio = float("nan")
    if references:
        skel, full = skeleton(model, path), prune(model, path.masks(keep=1.0, round_to=1)).eval()
        skel_ratio, full_ratio = (count_flops(m, inputs(1)) / dense_flops for m in (skel, full))
    targets = [("flops", f) for f in flops] + [("latency", f) for f in latency]
    rows = []
    for kind, target in targets:
        for rt in round_to:
            extra = {"table": latency_table} if kind == "latency" else {}
            masks = path.masks(**{kind: target}, round_to=rt, **extra)
            small = prune(model, masks).eval()
            ratio = count_flops(small, inputs(1)) / dense_flops
            params_ratio = sum(p.numel() for p in small.parameters()) / dense_params
            for b in batches:
                models = {"dense": model, "pruned": small}
                if references:
                    models["skeleton"], models["full_width"] = skel, full
                sec = side_by_side({k: run(m) for k, m in models.items()}, inputs(b), repeats, burst)
                speed = sec["dense"] / sec["pruned"]
                prop = vs_full = float("nan")
                if references:
                    r, rs = ratio / full_ratio, skel_ratio / full_ratio  # FLOPs ratios to the full width
                    vs_full = sec["full_width"] / sec["pruned"] * r
                    if rs < r <= 1 and sec["skeleton"] < sec["full_width"]:
                        prop = proportional_efficiency(r, sec["full_width"], sec["skeleton"], rs)
                rows.append({
                    "model": name, "device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
                    "threads": torch.get_num_threads(), "batch": b, "seq": seq, "target": f"{kind}={target:g}",
                    "round_to": rt, "flops_ratio": round(ratio, 4), "params_ratio": round(params_ratio, 4),
                    "dense_per_s": round(b / sec["dense"], 3), "pruned_per_s": round(b / sec["pruned"], 3),
                    "speedup": round(speed, 3), "ideal_speedup": round(1 / ratio, 3),
                    "efficiency": round(speed * ratio, 3),
                    "skeleton_per_s": round(b / sec["skeleton"], 3) if references else float("nan"),
                    "skeleton_flops_ratio": round(skel_ratio, 4), "proportional": round(prop, 3),
                    "full_width_per_s": round(b / sec["full_width"], 3) if references else float("nan"),
                    "efficiency_vs_full_width": round(vs_full, 3),
                    "latency_predicted": round(masks.meta.get("latency_kept_fraction_predicted", float("nan")), 4),
                    "malloc": malloc_setting(), "linear": linear_setting(device, dtype), "burst": burst,
                    "compile": compile or "",
                    "widths": " ".join(str(w) for w in masks.widths().values())})
                if log is not None:
                    log(f"{name} {kind}={target:g} round_to={rt} batch={b}: FLOPs ratio {ratio:.3f}, speed-up "
                        f"{speed:.2f}x of ideal {1 / ratio:.2f}x (efficiency {speed * ratio:.2f}, "
                        f"vs the full-width model {vs_full:.2f}, proportional {prop:.2f})")
            compiled.pop(id(small), None)
            del small
    return rows


def linear_setting(device, dtype) -> str:
    """What the pruned and reference models' unmasked products run on (``spp_kernels.linear``):
    "onednn" (fp32 on x86 CPUs, above its size threshold) or "aten" (``F.linear``). The dense
    model keeps its own layers, so with "onednn" its speed-up includes that GEMM's gain: column
    ``efficiency_vs_full_width`` is the one that measures pruning alone."""
    from spp_kernels._linear import onednn_in_use

    return "onednn" if onednn_in_use(device, dtype) else "aten"


def write_csv(rows: list[dict], file: str) -> None:
    import csv
    import os

    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    with open(file, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict], out_png: str) -> None:
    """Measured vs ideal speed-up, one line per (model, batch, round_to)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch"], r["round_to"], r["target"].split("=")[0]), []).append(r)
    for (model, batch, rt, kind), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["ideal_speedup"])
        ax.plot([r["ideal_speedup"] for r in rs], [r["speedup"] for r in rs], marker="o",
                label=f"{model} {kind} batch {batch} round_to {rt}")
    top = max([r["ideal_speedup"] for r in rows] + [1.0])
    ax.plot([1, top], [1, top], "k:", label="ideal")
    ax.plot([1, top], [0.9, 0.9 * top], "k--", lw=0.7, label="0.9 of ideal")
    ax.set_xlabel("ideal speed-up (1 / FLOPs ratio)")
    ax.set_ylabel("measured speed-up vs dense")
    ax.set_title(rows[0]["device"] if rows else "")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
