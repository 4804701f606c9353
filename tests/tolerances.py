"""The one per-dtype tolerance table of the kernel tests (results vs a float64 oracle).

Inputs of the tests are O(1) (standard normal), so a dot product of length k is O(sqrt(k)) and
its rounding error grows like eps * sqrt(k): GEMM tolerances scale ``atol`` by sqrt(k), where k
is the product of the lengths of every reduction that feeds the checked value (chained GEMMs
multiply: the second GEMM of a pair sums over U values that each summed over K).
Calibrated on CPU (4 seeds, shapes 1..197 x 1..52, all activations): the largest error seen was
about 19 eps32 * (sqrt(k) + |ref|) in fp32 and 2 eps * (sqrt(k) + |ref|) in fp16/bf16, so the
table holds ~6x (fp32) and ~2x (fp16/bf16, i.e. about 2 ulps more) of margin.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Tol(NamedTuple):
    atol: float
    rtol: float


# Elementwise tolerance (k = 1) of each input dtype; fp32 state arenas use the fp32 row.
TOL: dict[torch.dtype, Tol] = {
    torch.float32: Tol(atol=1.5e-5, rtol=1.5e-5),  # ~128 eps32
    torch.float16: Tol(atol=4e-3, rtol=4e-3),  # ~4 eps16 (eps16 = 2**-10)
    torch.bfloat16: Tol(atol=3e-2, rtol=3e-2),  # ~4 epsbf16 (epsbf16 = 2**-7)
}
DTYPES = tuple(TOL)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def gemm_tol(dtype: torch.dtype, *reduction_lengths: int) -> Tol:
    """Tolerance of a value computed through reductions of the given lengths, in ``dtype``."""
    k = math.prod(max(int(n), 1) for n in reduction_lengths) if reduction_lengths else 1
    base = TOL[dtype]
    return Tol(atol=base.atol * math.sqrt(k), rtol=base.rtol)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *reduction_lengths: int, msg: str = "") -> None:
    """``actual`` (any float dtype) vs the float64 ``expected`` at the table's tolerance for ``dtype``."""
    tol = gemm_tol(dtype, *reduction_lengths)
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(
        actual.detach().double(), expected.detach().double(), atol=tol.atol, rtol=tol.rtol,
        msg=lambda m: f"{msg} [{DTYPE_IDS[dtype]}, k={reduction_lengths}, atol={tol.atol:.3g}, rtol={tol.rtol:.3g}]\n{m}",
    )
