"""``python -m spp_kernels.info``: which backend serves each op on each device, and why."""
from __future__ import annotations

import torch

from . import _ext, dispatch
from ._linear import _torch_forced, onednn_status


def _ext_attention_gemm() -> str:
    return getattr(_ext._C, "attention_gemm", "an unknown GEMM") if _ext.available else "-"


def report() -> str:
    lines = [f"torch {torch.__version__}; cuda available: {torch.cuda.is_available()}"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for op, backend, reason in dispatch.explain(dev):
            if (dev, op, backend) == ("cpu", "attention", "ext"):
                reason += f"; fp32 forward fused, its products on {_ext_attention_gemm()}"
            lines.append(f"{dev:5s} {op:15s} -> {backend:6s} ({reason})")
    ok, why = onednn_status()
    if ok and _torch_forced():
        ok, why = False, "SPP_BACKEND=torch: F.linear"
    ext_too = ok and _ext.available and hasattr(torch.ops.spp_ext, "linear_backend") and torch.ops.spp_ext.linear_backend()
    what = "fp32 products of pruned layers" + (" and of the ext ops' GEMMs" if ext_too else "")
    lines.append(f"{'cpu':5s} {'linear':15s} -> {'onednn' if ok else 'torch':6s} ({what}; {why})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
