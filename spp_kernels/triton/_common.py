"""Shared pieces of the Triton ops: interpreter detection, activations and their derivatives,
the ``tl.dot`` wrapper, a generic strided GEMM with index gathers/scatters, and the op factory.

Under ``TRITON_INTERPRET=1`` (CPU tests) ``tl.dot`` on fp16/bf16 tiles returns garbage, so every
dot casts its tiles to fp32 there (constexpr ``F32_DOT``). fp32 dots always pass
``input_precision="ieee"`` (the GPU default would be TF32, outside the fp32 tolerance table).
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

try:
    INTERPRET = bool(triton.knobs.runtime.interpret)
except AttributeError:  # older triton: no knobs module
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# activation name -> constexpr id used by the kernels (the names of reference.ACTIVATIONS)
ACT_IDS = {"none": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4}

# Tile sizes. The interpreter's cost is per program and per loop trip (numpy does the tile maths),
# so there a few big tiles are fastest; on GPUs moderate tiles keep registers and occupancy sane.
if INTERPRET:
    BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64
else:
    BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32


def act_id(act) -> int:
    return ACT_IDS["none" if act is None else act]


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexpr flags of :func:`dot` for tiles of ``dtype``."""
    return dict(F32_DOT=INTERPRET, IEEE=INTERPRET or dtype == torch.float32)


def check_device(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{name} must be a CUDA tensor for the Triton kernels, got {t.device.type} "
                         "(on CPU set TRITON_INTERPRET=1 before importing triton, or use the spp_kernels dispatcher)")


def define_op(name: str, mutates_args: Iterable[str], fake: Callable) -> Callable:
    """Decorator: ``fn`` becomes the custom op ``name``.

    On GPUs a ``torch.library.triton_op`` (launches through ``wrap_triton``, so ``torch.compile``
    sees the kernels; ``fn`` itself is the fake). Under the interpreter the kernels cannot run on
    fake tensors, so there it is an opaque ``torch.library.custom_op`` with ``fake`` as its fake."""
    def deco(fn):
        if INTERPRET:
            op = torch.library.custom_op(name, fn, mutates_args=tuple(mutates_args))
            op.register_fake(fake)
            return op
        return torch.library.triton_op(name, fn, mutates_args=tuple(mutates_args))
    return deco


@triton.jit
def dot(a, b, F32_DOT: tl.constexpr, IEEE: tl.constexpr):
    if F32_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _tanh(u):
    # no tanh in tl; |u| <= 15 keeps exp finite and tanh(15) is 1 in fp32
    u = tl.minimum(tl.maximum(u, -15.0), 15.0)
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def act_fwd(h, ACT: tl.constexpr):
    """act(h) on fp32 h; ACT ids as in ACT_IDS."""
    if ACT == 1:
        return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:
        return 0.5 * h * (1.0 + _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
    elif ACT == 3:
        return tl.where(h > 0, h, 0.0)
    elif ACT == 4:
        return h * tl.sigmoid(h)
    else:
        return h


@triton.jit
def act_grad(h, ACT: tl.constexpr):
    """d act(h) / dh on fp32 h."""
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        return cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
    elif ACT == 3:
        return tl.where(h > 0, 1.0, 0.0)
    elif ACT == 4:
        s = tl.sigmoid(h)
        return s * (1.0 + h * (1.0 - s))
    else:
        return h * 0.0 + 1.0


@triton.jit
def gemm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, kidx_ptr, jidx_ptr, iidx_ptr,
                M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                HAS_BIAS: tl.constexpr, KIDX: tl.constexpr, GATHER_BJ: tl.constexpr,
                SCATTER_CI: tl.constexpr, SCATTER_CJ: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                F32_DOT: tl.constexpr, IEEE: tl.constexpr):
    """C[i', j'] = sum_k A[i, k] B[k', j''] (+ bias[j]) with fp32 accumulation, any strides.

    KIDX: B's row k' = kidx[k] (a gathered reduction: only listed units are read);
    GATHER_BJ: B's column j'' = jidx[j]; SCATTER_CI / SCATTER_CJ: C's row i' = iidx[i] /
    column j' = jidx[j] (distinct indices, so plain stores suffice)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mm = rm < M
    mn = rn < N
    if GATHER_BJ or SCATTER_CJ:
        jj = tl.load(jidx_ptr + rn, mask=mn, other=0).to(tl.int64)
    else:
        jj = rn.to(tl.int64)
    if GATHER_BJ:
        bcol = jj
    else:
        bcol = rn.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mk = rk < K
        a = tl.load(a_ptr + rm.to(tl.int64)[:, None] * s_am + rk.to(tl.int64)[None, :] * s_ak,
                    mask=mm[:, None] & mk[None, :], other=0.0)
        if KIDX:
            kk = tl.load(kidx_ptr + rk, mask=mk, other=0).to(tl.int64)
        else:
            kk = rk.to(tl.int64)
        b = tl.load(b_ptr + kk[:, None] * s_bk + bcol[None, :] * s_bn, mask=mk[:, None] & mn[None, :], other=0.0)
        acc += dot(a, b, F32_DOT, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    if SCATTER_CI:
        ci = tl.load(iidx_ptr + rm, mask=mm, other=0).to(tl.int64)
    else:
        ci = rm.to(tl.int64)
    if SCATTER_CJ:
        cj = jj
    else:
        cj = rn.to(tl.int64)
    tl.store(c_ptr + ci[:, None] * s_cm + cj[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


def gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, M: int, N: int, K: int, *,
         a_strides, b_strides, c_strides, bias=None, kidx=None, jidx=None, iidx=None,
         gather_bj: bool = False, scatter_cj: bool = False) -> None:
    """Launch :func:`gemm_kernel` (see there); strides are (row, col) of the logical A (M, K),
    B (K, N) and C (M, N). Nothing is launched for an empty output."""
    if M == 0 or N == 0:
        return
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    dummy = a  # read-only stand-in for absent pointers (never dereferenced)
    wrap_triton(gemm_kernel)[grid](
        a, b, c, bias if bias is not None else dummy, kidx if kidx is not None else dummy,
        jidx if jidx is not None else dummy, iidx if iidx is not None else dummy,
        M, N, K, a_strides[0], a_strides[1], b_strides[0], b_strides[1], c_strides[0], c_strides[1],
        HAS_BIAS=bias is not None, KIDX=kidx is not None, GATHER_BJ=gather_bj,
        SCATTER_CI=iidx is not None, SCATTER_CJ=scatter_cj,
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, **dot_flags(a.dtype),
    )
