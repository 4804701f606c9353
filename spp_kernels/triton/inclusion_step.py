"""``inclusion_step`` (SPEC §2): one step of the discretised differential inclusion over the flat
arenas in ONE kernel launch — every state array read once and written once, in place; the step
count and hyper-parameters are kernel arguments (no recompilation per step, no host sync in the
update itself).

The arithmetic follows :func:`spp_kernels.reference.inclusion_step` operation by operation, with
the host scalars of :func:`spp_kernels.reference.inclusion_scalars` (float64 on the host, rounded
to fp32 as kernel arguments, as torch rounds its Python scalars), and division / square root
rounded to nearest (``div_rn``, ``sqrt_rn``), so that backends agree to the last bits where the
compiler keeps the order (GPUs may contract a·b + c into an FMA: ~1 ulp).

``check_finite=True`` (the default, like the reference) costs one host sync: a single fused
finiteness reduction over the six float arenas before the update, so the arenas are untouched
when it raises. ``check_finite=False`` makes the step fully asynchronous.

Custom op: ``spp_triton::inclusion_step`` (mutates m, exp_avg, exp_avg_sq, z, gamma, entry,
support_count).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import reference
from ._common import INTERPRET, check_device, define_op

BLOCK = 4096 if INTERPRET else 1024


@triton.jit(do_not_specialize=["step"])  # one compiled kernel for every step count
def _inclusion_kernel(m_ptr, g_ptr, a_ptr, b_ptr, z_ptr, gam_ptr, entry_ptr, sc_ptr, n, step,
                      nu, beta1, one_m_beta1, beta2, one_m_beta2, eps, wd_scale, weight_decay,
                      step_size, inv_sqrt_bc2, rho, kappa, lam,
                      HAS_NU: tl.constexpr, ADAMW: tl.constexpr, HAS_WD: tl.constexpr, SIGNED: tl.constexpr,
                      RECORD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    m = tl.load(m_ptr + offs, mask=ok, other=0.0)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0)
    z = tl.load(z_ptr + offs, mask=ok, other=0.0)
    gam = tl.load(gam_ptr + offs, mask=ok, other=0.0)
    entry = tl.load(entry_ptr + offs, mask=ok, other=0)
    if HAS_NU:
        g = g + tl.div_rn(m - gam, nu)
    if ADAMW:
        a = tl.load(a_ptr + offs, mask=ok, other=0.0)
        b = tl.load(b_ptr + offs, mask=ok, other=0.0)
        if HAS_WD:
            m = m * wd_scale
        a = a * beta1 + g * one_m_beta1
        b = b * beta2 + (g * g) * one_m_beta2
        denom = tl.sqrt_rn(b) * inv_sqrt_bc2 + eps
        m = m - tl.div_rn(a, denom) * step_size
        tl.store(a_ptr + offs, a, mask=ok)
        tl.store(b_ptr + offs, b, mask=ok)
    else:
        if HAS_WD:
            g = g + m * weight_decay
        m = m - g * step_size
    z = z + (m - gam) * rho
    if SIGNED:
        mag = tl.maximum(tl.abs(z) - lam, 0.0)
        sgn = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0))
        gam = sgn * mag * kappa
    else:
        gam = tl.maximum(z - lam, 0.0) * kappa
    nz = gam != 0.0
    entry = tl.where((entry == -1) & nz, step, entry)
    tl.store(m_ptr + offs, m, mask=ok)
    tl.store(z_ptr + offs, z, mask=ok)
    tl.store(gam_ptr + offs, gam, mask=ok)
    tl.store(entry_ptr + offs, entry, mask=ok)
    if RECORD:
        sc = tl.load(sc_ptr + offs, mask=ok, other=0)
        tl.store(sc_ptr + offs, sc + nz.to(tl.int32), mask=ok)


def _fake(m, grad, exp_avg, exp_avg_sq, z, gamma, entry, support_count, step, lr, beta1, beta2, eps,
          weight_decay, kappa, lam, nu, signed, adamw, record):
    return None


@define_op("spp_triton::inclusion_step",
           ("m", "exp_avg", "exp_avg_sq", "z", "gamma", "entry", "support_count"), _fake)
def inclusion_step_op(m: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                      z: torch.Tensor, gamma: torch.Tensor, entry: torch.Tensor, support_count: torch.Tensor,
                      step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                      kappa: float, lam: float, nu: float, signed: bool, adamw: bool, record: bool) -> None:
    """The update in place on contiguous, validated arenas (one launch)."""
    n = m.numel()
    if n == 0:
        return
    s = reference.inclusion_scalars(step, lr, beta1, beta2, kappa, "adamw" if adamw else "sgd")
    has_nu = math.isfinite(nu)
    wrap_triton(_inclusion_kernel)[(triton.cdiv(n, BLOCK),)](
        m, grad, exp_avg, exp_avg_sq, z, gamma, entry, support_count, n, step,
        nu if has_nu else 1.0, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, 1.0 - lr * weight_decay,
        weight_decay, s["step_size"], s["inv_sqrt_bc2"], s["rho"], kappa, lam,
        HAS_NU=has_nu, ADAMW=adamw, HAS_WD=weight_decay != 0, SIGNED=signed, RECORD=record, BLOCK=BLOCK)


_FLOAT_ARENAS = ("grad", "m", "exp_avg", "exp_avg_sq", "z", "gamma")


def inclusion_step(m: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                   z: torch.Tensor, gamma: torch.Tensor, entry: torch.Tensor, support_count: torch.Tensor, step: int,
                   *, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-4,
                   weight_decay: float = 0.0, kappa: float = 1.0, lam: float = 3.0, nu: float = math.inf,
                   mode: str = "nonneg", optimizer: str = "adamw", record: bool = False,
                   check_finite: bool = True) -> None:
    """Triton SPEC §2 step, in place, with the arguments and semantics of
    :func:`spp_kernels.reference.inclusion_step`.

    m, grad, exp_avg, exp_avg_sq, z, gamma: 1-D fp32 of equal length; entry, support_count: 1-D
    int32; step: the 1-based step t; ``record`` adds the support to ``support_count``. The
    arenas must be contiguous (they are views of flat arenas); others get a ValueError."""
    reference.check_inclusion_arenas(m, grad, exp_avg, exp_avg_sq, z, gamma, entry, support_count)
    reference.check_inclusion_args(step, lr, beta1, beta2, eps, weight_decay, kappa, lam, nu, mode, optimizer)
    check_device("m", m)
    arenas = dict(m=m, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, z=z, gamma=gamma, entry=entry,
                  support_count=support_count)
    for name, t in arenas.items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernel updates the flat arenas in place)")
    if check_finite and m.numel():
        ok = torch.stack([torch.isfinite(arenas[k]).all() for k in _FLOAT_ARENAS])
        if not bool(ok.all()):  # the one host sync; name the first bad arena like the reference
            raise ValueError(f"{_FLOAT_ARENAS[int((~ok).nonzero()[0, 0])]} holds NaN or Inf")
    inclusion_step_op(m, grad, exp_avg, exp_avg_sq, z, gamma, entry, support_count, int(step),
                      float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), float(kappa),
                      float(lam), float(nu), mode == "signed", optimizer == "adamw", bool(record))
