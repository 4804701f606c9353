"""Shared helpers of the Triton kernel tests: the device they run on (CUDA, else the CPU under
the interpreter that conftest selects before triton is imported), seeded float64-drawn inputs
and a dispatched-op log. Importing this module skips the importing test module where the
kernels cannot run (no triton; a CPU without the interpreter)."""
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from spp_kernels.triton import _common  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not _common.INTERPRET:
    pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)


def seed_of(*parts) -> int:
    """A stable seed per test case (independent of the test order)."""
    return zlib.crc32(repr(parts).encode())


def randn(shape, dtype, gen, scale=1.0):
    """Drawn in float64 then rounded: the oracle sees exactly the same inputs."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def rand_mask(u, gen):
    """Mask values in [0.1, 1.5) with one exact zero (a pruned unit)."""
    m = torch.rand(u, generator=gen) * 1.4 + 0.1
    if u > 1:
        m[u // 3] = 0.0
    return m.to(DEVICE)


class OpLog(TorchDispatchMode):
    """Records the ops dispatched (custom ops appear by name, e.g. ``spp_triton.masked_linear_dw``)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))
