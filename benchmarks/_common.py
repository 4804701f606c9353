"""Shared helpers of the kernel benchmarks: timing (median of repeats), device label, CSV rows."""
from __future__ import annotations

import csv
import os
import statistics
import time

import torch

FIELDS = ("op", "provider", "dtype", "shape", "metric", "value", "device")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_label(device: str) -> str:
    if device == "cuda":
        return f"cuda: {torch.cuda.get_device_name()}"
    name = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {name}, {torch.get_num_threads()} threads"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(fn, device: str = "cpu", repeats: int = 7, min_time: float = 0.02) -> float:
    """Median seconds per call over ``repeats`` timed batches (each batch at least ``min_time``)."""
    fn()
    sync(device)
    n, t = 1, 0.0
    while True:  # calibrate calls per batch
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        t = time.perf_counter() - t0
        if t >= min_time or n >= 1 << 16:
            break
        n *= 2
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def write_rows(rows: list[dict], path: str, replace_ops: tuple = ()) -> None:
    """Append ``rows`` to the CSV at ``path``, replacing earlier rows of ``replace_ops`` on the same device."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    devices = {r["device"] for r in rows}
    keep = []
    if os.path.exists(path):
        with open(path, newline="") as fh:
            keep = [r for r in csv.DictReader(fh) if not (r["op"] in replace_ops and r["device"] in devices)]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(keep + rows)


def triton_op(name: str, device: str):
    """``spp_kernels.triton.<name>`` when it can run here, else (None, reason)."""
    if device != "cuda":
        return None, "the Triton kernels run on CUDA (the CPU interpreter is not a benchmark)"
    try:
        import importlib
        mod = importlib.import_module(f"spp_kernels.triton.{name}")
        return getattr(mod, name), None
    except Exception as exc:  # noqa: BLE001
        return None, f"spp_kernels.triton.{name} unavailable ({type(exc).__name__}: {exc})"
