"""``python -m spp_kernels.info``: which backend serves each op on each device, and why."""
from __future__ import annotations

import torch

from . import dispatch


def report() -> str:
    lines = [f"torch {torch.__version__}; cuda available: {torch.cuda.is_available()}"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for op, backend, reason in dispatch.explain(dev):
            lines.append(f"{dev:5s} {op:15s} -> {backend:6s} ({reason})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
