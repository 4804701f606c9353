"""``pair_matmul`` (SPEC §4): the masked low-rank pair ``(act(x W1ᵀ + b1) ⊙ m) W2ᵀ + b2`` over the
``active`` units only.

Forward: one program per token block (and the whole output width, up to ``FUSED_MAX_N``) loops
over blocks of active units; for each it computes the hidden tile ``act(x W1[a]ᵀ + b1[a]) ⊙ m[a]``
on chip (W1 rows gathered through the index list) and feeds it straight into the second GEMM
against the gathered columns ``W2[:, a]`` — the hidden activations never reach memory. Cost ∝ the
kept fraction. A wider output would need the hidden tile recomputed for every output block, so
there the same kernel writes the masked hidden (tokens, kept) once and a gathered GEMM finishes.
With a gradient needed the pre-activation (tokens, kept) is saved for the backward.

Backward: one pass over (token block, kept-unit block) tiles computes ``dH = dy W2[:, a]``, the
mask gradient ``dm[a] = Σ_tokens dH ⊙ act(h)`` (fp32 atomics) and ``dh = dH ⊙ m ⊙ act'(h)``;
then ``dx = dh W1[a]`` (gathered GEMM). dW1 / dW2 are separate ops, called only when the weights
require grad (rows / columns of units outside ``active`` get zero). ``dm`` is 0 outside ``active``.

Custom ops (namespace ``spp_triton``): ``pair_matmul_fwd``, ``pair_matmul_bwd``,
``pair_matmul_dw1``, ``pair_matmul_dw2``, with fakes and ``register_autograd``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import reference
from ._common import (BLOCK_K, BLOCK_M, BLOCK_N, INTERPRET, act_fwd, act_grad, act_id, check_device, define_op, dot,
                      dot_flags, gemm)

BLOCK_U = 64 if INTERPRET else 32
FUSED_MAX_N = 256 if INTERPRET else 128  # one output block: beyond it the split path avoids recomputation


@triton.jit
def _fwd_kernel(x_ptr, w1_ptr, b1_ptr, m_ptr, w2_ptr, b2_ptr, idx_ptr, y_ptr, h_ptr, hm_ptr,
                M, N, K, A, s_xm, s_xk, s_1u, s_1k, s_2n, s_2u,
                HAS_IDX: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, SAVE_H: tl.constexpr,
                DO_OUT: tl.constexpr, ACT: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BU: tl.constexpr, BK: tl.constexpr,
                F32_DOT: tl.constexpr, IEEE: tl.constexpr):
    """DO_OUT: y = Σ_a hm[:, a] W2[:, a]ᵀ (+ b2), hm kept on chip; else hm (M, A) is stored.
    SAVE_H: the pre-activation h (M, A) is stored (by the first output block only)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mm = rm < M
    mn = rn < N
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for u0 in range(0, A, BU):
        ru = u0 + tl.arange(0, BU)
        mu = ru < A
        if HAS_IDX:
            unit = tl.load(idx_ptr + ru, mask=mu, other=0).to(tl.int64)
        else:
            unit = ru.to(tl.int64)
        h = tl.zeros((BM, BU), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < K
            a = tl.load(x_ptr + rm64[:, None] * s_xm + rk[None, :] * s_xk, mask=mm[:, None] & mk[None, :], other=0.0)
            w1 = tl.load(w1_ptr + unit[None, :] * s_1u + rk[:, None] * s_1k, mask=mk[:, None] & mu[None, :], other=0.0)
            h += dot(a, w1, F32_DOT, IEEE)
        if HAS_B1:
            h += tl.load(b1_ptr + unit, mask=mu, other=0.0).to(tl.float32)[None, :]
        hmask = mm[:, None] & mu[None, :]
        hoff = rm64[:, None] * A + ru[None, :]
        if SAVE_H:
            tl.store(h_ptr + hoff, h.to(h_ptr.dtype.element_ty), mask=hmask & (pid_n == 0))
        mv = tl.load(m_ptr + unit, mask=mu, other=0.0)
        hm = act_fwd(h, ACT) * mv[None, :]
        hm = tl.where(hmask, hm, 0.0)
        if DO_OUT:
            w2 = tl.load(w2_ptr + rn.to(tl.int64)[None, :] * s_2n + unit[:, None] * s_2u,
                         mask=mu[:, None] & mn[None, :], other=0.0)
            acc += dot(hm.to(w2.dtype), w2, F32_DOT, IEEE)
        else:
            tl.store(hm_ptr + hoff, hm.to(hm_ptr.dtype.element_ty), mask=hmask)
    if DO_OUT:
        if HAS_B2:
            acc += tl.load(b2_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm64[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def _bwd_kernel(dy_ptr, w2_ptr, h_ptr, m_ptr, idx_ptr, dh_ptr, dm_ptr, hm_ptr,
                M, N, A, s_dym, s_dyn, s_2n, s_2u,
                HAS_IDX: tl.constexpr, STORE_HM: tl.constexpr, ACT: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BU: tl.constexpr, F32_DOT: tl.constexpr, IEEE: tl.constexpr):
    """dH = dy W2[:, a]; dm[a] += Σ_rows dH ⊙ act(h); dh = dH ⊙ m[a] ⊙ act'(h); hm = act(h) ⊙ m[a]."""
    pid_m = tl.program_id(0)
    pid_u = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    ru = pid_u * BU + tl.arange(0, BU)
    mm = rm < M
    mu = ru < A
    rm64 = rm.to(tl.int64)
    if HAS_IDX:
        unit = tl.load(idx_ptr + ru, mask=mu, other=0).to(tl.int64)
    else:
        unit = ru.to(tl.int64)
    dH = tl.zeros((BM, BU), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        mn = rn < N
        dy = tl.load(dy_ptr + rm64[:, None] * s_dym + rn[None, :] * s_dyn, mask=mm[:, None] & mn[None, :], other=0.0)
        w2 = tl.load(w2_ptr + rn.to(tl.int64)[:, None] * s_2n + unit[None, :] * s_2u, mask=mn[:, None] & mu[None, :],
                     other=0.0)
        dH += dot(dy, w2, F32_DOT, IEEE)
    hmask = mm[:, None] & mu[None, :]
    hoff = rm64[:, None] * A + ru[None, :]
    h = tl.load(h_ptr + hoff, mask=hmask, other=0.0).to(tl.float32)
    mv = tl.load(m_ptr + unit, mask=mu, other=0.0)
    a = act_fwd(h, ACT)
    tl.atomic_add(dm_ptr + unit, tl.sum(dH * a, axis=0), mask=mu)
    dh = tl.where(hmask, dH * mv[None, :] * act_grad(h, ACT), 0.0)
    tl.store(dh_ptr + hoff, dh.to(dh_ptr.dtype.element_ty), mask=hmask)
    if STORE_HM:
        tl.store(hm_ptr + hoff, (a * mv[None, :]).to(hm_ptr.dtype.element_ty), mask=hmask)


def _width(W1, active):
    return W1.shape[0] if active is None else active.shape[0]


def _fwd_fake(x, W1, b1, m, W2, b2, active, act, save_h):
    A = _width(W1, active)
    return x.new_empty(x.shape[0], W2.shape[0]), x.new_empty((x.shape[0], A) if save_h else (0,))


@define_op("spp_triton::pair_matmul_fwd", (), _fwd_fake)
def pair_matmul_fwd(x: torch.Tensor, W1: torch.Tensor, b1: Optional[torch.Tensor], m: torch.Tensor,
                    W2: torch.Tensor, b2: Optional[torch.Tensor], active: Optional[torch.Tensor], act: int,
                    save_h: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (M, K); W1: (U, K); b1: (U,)|None; m: (U,) fp32; W2: (N, U); b2: (N,)|None; active: (A,)
    int32 distinct unit indices or None (all). Returns y (M, N) and, when ``save_h``, the
    pre-activation (M, A) of the active units (else an empty tensor)."""
    M, K = x.shape
    N = W2.shape[0]
    A = _width(W1, active)
    y = x.new_empty(M, N)
    h = x.new_empty((M, A) if save_h else (0,))
    if M == 0 or N == 0:
        return y, h
    fused = N <= FUSED_MAX_N
    hm = x.new_empty((0,) if fused else (M, A))  # the split path's masked hidden
    bn = max(16, triton.next_power_of_2(N)) if fused else BLOCK_N
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, bn) if fused else 1)
    wrap_triton(_fwd_kernel)[grid](
        x, W1, b1 if b1 is not None else m, m, W2, b2 if b2 is not None else m,
        active if active is not None else m, y, h, hm,
        M, N, K, A, x.stride(0), x.stride(1), W1.stride(0), W1.stride(1), W2.stride(0), W2.stride(1),
        HAS_IDX=active is not None, HAS_B1=b1 is not None, HAS_B2=b2 is not None, SAVE_H=save_h,
        DO_OUT=fused, ACT=act, BM=BLOCK_M, BN=bn, BU=BLOCK_U, BK=BLOCK_K, **dot_flags(x.dtype))
    if not fused:  # y = hm W2[:, active]ᵀ + b2: B (A, N) rows gathered from W2's columns
        gemm(hm, W2, y, M, N, A, a_strides=(A, 1), b_strides=(W2.stride(1), W2.stride(0)), c_strides=(N, 1),
             bias=b2, kidx=active)
    return y, h


def _bwd_fake(dy, x, W1, m, W2, h, active, act, need_dx, need_hm):
    M, K = x.shape
    A = _width(W1, active)
    return (x.new_empty((M, K) if need_dx else (0,)), m.new_empty(m.shape[0]), x.new_empty(M, A),
            x.new_empty((M, A) if need_hm else (0,)))


@define_op("spp_triton::pair_matmul_bwd", (), _bwd_fake)
def pair_matmul_bwd(dy: torch.Tensor, x: torch.Tensor, W1: torch.Tensor, m: torch.Tensor, W2: torch.Tensor,
                    h: torch.Tensor, active: Optional[torch.Tensor], act: int, need_dx: bool, need_hm: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (M, K) or empty, dm (U,) fp32 (0 outside active), dh (M, A), hm (M, A) or empty)."""
    M, K = x.shape
    N = W2.shape[0]
    A = _width(W1, active)
    dm = torch.zeros(m.shape[0], dtype=torch.float32, device=x.device)
    dh = x.new_empty(M, A)
    hm = x.new_empty((M, A) if need_hm else (0,))
    if M and A:
        grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(A, BLOCK_U))
        wrap_triton(_bwd_kernel)[grid](dy, W2, h, m, active if active is not None else m, dh, dm, hm,
                                       M, N, A, dy.stride(0), dy.stride(1), W2.stride(0), W2.stride(1),
                                       HAS_IDX=active is not None, STORE_HM=need_hm, ACT=act,
                                       BM=BLOCK_M, BN=BLOCK_N, BU=BLOCK_U, **dot_flags(x.dtype))
    dx = x.new_empty((M, K) if need_dx else (0,))
    if need_dx:
        if A == 0:
            dx.zero_()
        else:  # dx = dh W1[active]: B (A, K) rows gathered from W1
            gemm(dh, W1, dx, M, K, A, a_strides=(A, 1), b_strides=(W1.stride(0), W1.stride(1)), c_strides=(K, 1),
                 kidx=active)
    return dx, dm, dh, hm


def _dw1_fake(dh, x, active, units):
    return x.new_empty(units, x.shape[1])


@define_op("spp_triton::pair_matmul_dw1", (), _dw1_fake)
def pair_matmul_dw1(dh: torch.Tensor, x: torch.Tensor, active: Optional[torch.Tensor], units: int) -> torch.Tensor:
    """dW1 (U, K): rows ``active`` get dhᵀ x, the others 0. Called only when W1 requires grad."""
    M, A = dh.shape
    K = x.shape[1]
    dW1 = x.new_zeros(units, K) if (active is not None or M == 0) else x.new_empty(units, K)
    if M:
        gemm(dh, x, dW1, A, K, M, a_strides=(dh.stride(1), dh.stride(0)), b_strides=(x.stride(0), x.stride(1)),
             c_strides=(K, 1), iidx=active)
    return dW1


def _dw2_fake(dy, hm, active, units):
    return hm.new_empty(dy.shape[1], units)


@define_op("spp_triton::pair_matmul_dw2", (), _dw2_fake)
def pair_matmul_dw2(dy: torch.Tensor, hm: torch.Tensor, active: Optional[torch.Tensor], units: int) -> torch.Tensor:
    """dW2 (N, U): columns ``active`` get dyᵀ hm, the others 0. Called only when W2 requires grad."""
    M, N = dy.shape
    A = hm.shape[1] if hm.dim() == 2 else 0
    dW2 = hm.new_zeros(N, units) if (active is not None or M == 0) else hm.new_empty(N, units)
    if M:
        gemm(dy, hm, dW2, N, A, M, a_strides=(dy.stride(1), dy.stride(0)), b_strides=(hm.stride(0), hm.stride(1)),
             c_strides=(units, 1), jidx=active, scatter_cj=active is not None)
    return dW2


def _setup_context(ctx, inputs, output):
    x, W1, b1, m, W2, b2, active, act, save_h = inputs
    ctx.save_for_backward(x, W1, m, W2, output[1], active)
    ctx.act = act
    ctx.dtypes = (None if b1 is None else b1.dtype, None if b2 is None else b2.dtype)


def _backward(ctx, dy, dh_unused):  # h is an auxiliary output: its gradient is ignored
    x, W1, m, W2, h, active = ctx.saved_tensors
    need_x, need_w1, need_b1, need_m, need_w2, need_b2 = ctx.needs_input_grad[:6]
    U = W1.shape[0]
    dx, dm, dh, hm = pair_matmul_bwd(dy, x, W1, m, W2, h, active, ctx.act, need_x, need_w2)
    dW1 = pair_matmul_dw1(dh, x, active, U) if need_w1 else None  # frozen weights: no kernel, no buffer
    dW2 = pair_matmul_dw2(dy, hm, active, U) if need_w2 else None
    db1 = db2 = None
    if need_b1:
        s = dh.float().sum(0)
        db1 = s if active is None else torch.zeros(U, dtype=torch.float32, device=s.device).index_copy_(0, active.long(), s)
        db1 = db1.to(ctx.dtypes[0])
    if need_b2:
        db2 = dy.float().sum(0).to(ctx.dtypes[1])
    return dx if need_x else None, dW1, db1, dm if need_m else None, dW2, db2, None, None, None


pair_matmul_fwd.register_autograd(_backward, setup_context=_setup_context)


def pair_matmul(x: torch.Tensor, W1: torch.Tensor, b1: Optional[torch.Tensor], m: torch.Tensor, W2: torch.Tensor,
                b2: Optional[torch.Tensor], act: Optional[str] = None, active: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
    """Triton ``(act(x W1ᵀ + b1) ⊙ m) W2ᵀ + b2`` over the ``active`` units, with the semantics of
    :func:`spp_kernels.reference.pair_matmul`.

    x: (..., K) (any strides); W1: (U, K); b1: (U,)|None; m: (U,) fp32; W2: (N, U); b2: (N,)|None;
    act: a name of ``reference.ACTIVATIONS`` or None; active: 1-D int64/int32 distinct unit
    indices or None (all units). Returns (..., N) in x's dtype; differentiable w.r.t. x and m
    (0 outside ``active``), and W1/b1/W2/b2 when they require grad."""
    reference.check_pair_matmul(x, W1, b1, m, W2, b2, active)
    reference.activation(act)  # validates the name
    check_device("x", x)
    for name, t in (("W1", W1), ("b1", b1), ("m", m), ("W2", W2), ("b2", b2), ("active", active)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(math.prod(lead), K)  # not -1: K may be 0
    idx = None if active is None else active.to(torch.int32).contiguous()
    need = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, W1, b1, m, W2, b2))
    y, _ = pair_matmul_fwd(x2, W1, None if b1 is None else b1.contiguous(), m.contiguous(), W2,
                           None if b2 is None else b2.contiguous(), idx, act_id(act), need)
    return y.reshape(*lead, W2.shape[0])
