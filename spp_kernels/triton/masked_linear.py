"""``masked_linear`` (SPEC §4): ``act(x Wᵀ + b) ⊙ m[col2unit]`` as one Triton GEMM whose epilogue
adds the bias, applies the activation and the mask (fp32), and keeps the pre-activation for the
backward when a gradient is needed.

Backward: one pass over (tokens, columns) tiles computes ``dh = dy ⊙ mvec ⊙ act'(h)`` and reduces
``dmvec = Σ_tokens dy ⊙ act(h)`` (and db) in fp32 with fp32 atomics; then ``dx = dh W`` (strided
GEMM) and, only when W requires grad, ``dW = dhᵀ x`` in its own op — a frozen W costs no dW
kernel and no dW buffer. ``m[col2unit]`` is gathered by torch before the op, so its (tiny) index
backward scatters ``dmvec`` into ``dm``.

Custom ops (namespace ``spp_triton``): ``masked_linear_fwd``, ``masked_linear_bwd``,
``masked_linear_dw``, with fakes and ``register_autograd``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import reference
from ._common import (BLOCK_K, BLOCK_M, BLOCK_N, act_fwd, act_grad, act_id, check_device, define_op, dot,
                      dot_flags, gemm)


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, m_ptr, y_ptr, h_ptr, M, N, K, s_xm, s_xk, s_wn, s_wk,
                HAS_B: tl.constexpr, SAVE_H: tl.constexpr, ACT: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, F32_DOT: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mm = rm < M
    mn = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mk = rk < K
        a = tl.load(x_ptr + rm.to(tl.int64)[:, None] * s_xm + rk[None, :] * s_xk, mask=mm[:, None] & mk[None, :], other=0.0)
        w = tl.load(w_ptr + rn.to(tl.int64)[None, :] * s_wn + rk[:, None] * s_wk, mask=mk[:, None] & mn[None, :], other=0.0)
        acc += dot(a, w, F32_DOT, IEEE)
    if HAS_B:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    out = rm.to(tl.int64)[:, None] * N + rn[None, :]
    omask = mm[:, None] & mn[None, :]
    if SAVE_H:
        tl.store(h_ptr + out, acc.to(h_ptr.dtype.element_ty), mask=omask)
    mv = tl.load(m_ptr + rn, mask=mn, other=0.0)
    y = act_fwd(acc, ACT) * mv[None, :]
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _bwd_kernel(dy_ptr, h_ptr, m_ptr, dh_ptr, dm_ptr, db_ptr, M, N, s_dym, s_dyn,
                HAS_DB: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """dh = dy ⊙ m ⊙ act'(h); dm += Σ_rows dy ⊙ act(h); db += Σ_rows dh (fp32 atomics)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mm = rm < M
    mn = rn < N
    omask = mm[:, None] & mn[None, :]
    dy = tl.load(dy_ptr + rm.to(tl.int64)[:, None] * s_dym + rn[None, :] * s_dyn, mask=omask, other=0.0).to(tl.float32)
    out = rm.to(tl.int64)[:, None] * N + rn[None, :]
    h = tl.load(h_ptr + out, mask=omask, other=0.0).to(tl.float32)
    mv = tl.load(m_ptr + rn, mask=mn, other=0.0)
    dm = tl.sum(dy * act_fwd(h, ACT), axis=0)
    tl.atomic_add(dm_ptr + rn, dm, mask=mn)
    dh = dy * mv[None, :] * act_grad(h, ACT)
    dh = tl.where(omask, dh, 0.0)
    tl.store(dh_ptr + out, dh.to(dh_ptr.dtype.element_ty), mask=omask)
    if HAS_DB:
        tl.atomic_add(db_ptr + rn, tl.sum(dh, axis=0), mask=mn)


def _fwd_fake(x, W, b, mvec, act, save_h):
    M, N = x.shape[0], W.shape[0]
    return x.new_empty(M, N), x.new_empty((M, N) if save_h else (0,))


@define_op("spp_triton::masked_linear_fwd", (), _fwd_fake)
def masked_linear_fwd(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], mvec: torch.Tensor,
                      act: int, save_h: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (M, K); W: (N, K); b: (N,) or None; mvec: (N,) fp32 contiguous; act: id of ACT_IDS.
    Returns y (M, N) and the pre-activation h (M, N) when ``save_h`` (else an empty tensor)."""
    M, K = x.shape
    N = W.shape[0]
    y = x.new_empty(M, N)
    h = x.new_empty((M, N) if save_h else (0,))
    if M and N:
        grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
        wrap_triton(_fwd_kernel)[grid](x, W, b if b is not None else mvec, mvec, y, h, M, N, K,
                                       x.stride(0), x.stride(1), W.stride(0), W.stride(1),
                                       HAS_B=b is not None, SAVE_H=save_h, ACT=act,
                                       BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, **dot_flags(x.dtype))
    return y, h


def _bwd_fake(dy, x, W, h, mvec, act, need_dx, need_db):
    M, K = x.shape
    N = W.shape[0]
    return (x.new_empty((M, K) if need_dx else (0,)), mvec.new_empty(N), x.new_empty(M, N),
            mvec.new_empty(N if need_db else 0))


@define_op("spp_triton::masked_linear_bwd", (), _bwd_fake)
def masked_linear_bwd(dy: torch.Tensor, x: torch.Tensor, W: torch.Tensor, h: torch.Tensor, mvec: torch.Tensor,
                      act: int, need_dx: bool, need_db: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (M, K) or empty, dmvec (N,) fp32, dh (M, N), db (N,) fp32 or empty) from the saved h."""
    M, K = x.shape
    N = W.shape[0]
    dmvec = torch.zeros(N, dtype=torch.float32, device=x.device)
    db = torch.zeros(N if need_db else 0, dtype=torch.float32, device=x.device)
    dh = x.new_empty(M, N)
    if M and N:
        grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
        wrap_triton(_bwd_kernel)[grid](dy, h, mvec, dh, dmvec, db, M, N, dy.stride(0), dy.stride(1),
                                       HAS_DB=need_db, ACT=act, BM=BLOCK_M, BN=BLOCK_N)
    dx = x.new_empty((M, K) if need_dx else (0,))
    if need_dx:
        if N == 0:
            dx.zero_()
        else:  # dx = dh W: A = dh (M, N), B = W (N, K)
            gemm(dh, W, dx, M, K, N, a_strides=(N, 1), b_strides=(W.stride(0), W.stride(1)), c_strides=(K, 1))
    return dx, dmvec, dh, db


def _dw_fake(dh, x):
    return x.new_empty(dh.shape[1], x.shape[1])


@define_op("spp_triton::masked_linear_dw", (), _dw_fake)
def masked_linear_dw(dh: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW = dhᵀ x: (N, K); called only when W requires grad."""
    M, N = dh.shape
    K = x.shape[1]
    dW = x.new_empty(N, K)
    if M == 0:
        return dW.zero_()
    gemm(dh, x, dW, N, K, M, a_strides=(dh.stride(1), dh.stride(0)), b_strides=(x.stride(0), x.stride(1)),
         c_strides=(K, 1))
    return dW


def _setup_context(ctx, inputs, output):
    x, W, b, mvec, act, save_h = inputs
    ctx.save_for_backward(x, W, output[1], mvec)
    ctx.act = act
    ctx.b_dtype = None if b is None else b.dtype


def _backward(ctx, dy, dh_unused):  # h is an auxiliary output: its gradient is ignored
    x, W, h, mvec = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dmvec, dh, db = masked_linear_bwd(dy, x, W, h, mvec, ctx.act, need_x, need_b)
    dW = masked_linear_dw(dh, x) if need_w else None  # frozen W: no kernel, no buffer
    return (dx if need_x else None, dW, db.to(ctx.b_dtype) if need_b else None,
            dmvec if ctx.needs_input_grad[3] else None, None, None)


masked_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def masked_linear(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], m: torch.Tensor,
                  col2unit: Optional[torch.Tensor] = None, act: Optional[str] = None) -> torch.Tensor:
    """Triton ``act(x Wᵀ + b) ⊙ m[col2unit]`` with the semantics of :func:`spp_kernels.reference.masked_linear`.

    x: (..., K) fp32/fp16/bf16 (any strides); W: (N, K) same dtype (any strides); b: (N,) or None;
    m: (U,) fp32; col2unit: (N,) int or None (U == N); act: a name of ``reference.ACTIVATIONS`` or None.
    Returns (..., N) in x's dtype; differentiable w.r.t. x, m, and W/b when they require grad."""
    mvec = reference.check_masked_linear(x, W, b, m, col2unit)
    reference.activation(act)  # validates the name
    check_device("x", x)
    for name, t in (("W", W), ("b", b), ("m", m)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(math.prod(lead), K)  # not -1: K may be 0
    need = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, W, b, m))
    y, _ = masked_linear_fwd(x2, W, None if b is None else b.contiguous(), mvec.contiguous(), act_id(act), need)
    return y.reshape(*lead, W.shape[0])
