"""Python side of the compiled ops ``torch.ops.spp_ext.*`` (schemas and CPU kernels in csrc/):
fake implementations, autograd registration, the weight-gather cache of ``pair_matmul`` and the
wrappers with exactly the reference signatures that ``_ext`` registers with the dispatcher.

Imported only after ``spp_kernels._C`` loaded (the ops must exist).
"""
from __future__ import annotations

import math
import threading
from typing import Optional

import torch

from . import reference

ops = torch.ops.spp_ext


# ---------------------------------------------------------------- fake (meta) implementations
@torch.library.register_fake("spp_ext::masked_linear")
def _masked_linear_fake(x, W, b, mvec, act, need_pre):
    out = x.new_empty((x.shape[0], W.shape[0]))
    pre = x.new_empty((x.shape[0], W.shape[0]) if need_pre else (0,), dtype=torch.float32)
    return out, pre


@torch.library.register_fake("spp_ext::masked_linear_backward")
def _masked_linear_backward_fake(grad, x, W, pre, mvec, act, need_dx, need_dW, need_db):
    dx = x.new_empty(x.shape if need_dx else (0,))
    dm = pre.new_empty((pre.shape[1],))
    dW = W.new_empty(W.shape if need_dW else (0,))
    db = W.new_empty((W.shape[0],) if need_db else (0,))
    return dx, dm, dW, db


@torch.library.register_fake("spp_ext::pair_matmul")
def _pair_matmul_fake(x, W1, b1, m, W2, b2, act, need_pre):
    out = x.new_empty((x.shape[0], W2.shape[0]))
    pre = x.new_empty((x.shape[0], W1.shape[0]) if need_pre else (0,), dtype=torch.float32)
    return out, pre


@torch.library.register_fake("spp_ext::pair_matmul_backward")
def _pair_matmul_backward_fake(grad, x, W1, pre, m, W2, act, need_dx, need_dW):
    f = dict(dtype=torch.float32)
    dx = x.new_empty(x.shape if need_dx else (0,))
    dm = pre.new_empty((pre.shape[1],))
    if need_dW:
        return dx, dm, pre.new_empty(W1.shape, **f), pre.new_empty((W1.shape[0],), **f), \
            pre.new_empty(W2.shape, **f), pre.new_empty((W2.shape[0],), **f)
    e = pre.new_empty((0,), **f)
    return dx, dm, e, e.clone(), e.clone(), e.clone()


@torch.library.register_fake("spp_ext::inclusion_step")
def _inclusion_step_fake(*args):
    return None


# ---------------------------------------------------------------- autograd
def _ml_setup(ctx, inputs, output):
    x, W, b, mvec, act, need_pre = inputs
    ctx.act = act
    ctx.has_b = b is not None
    ctx.save_for_backward(x, W, output[1], mvec)


def _ml_backward(ctx, grad_out, grad_pre):
    x, W, pre, mvec = ctx.saved_tensors
    need_x, need_W, need_b, need_m = ctx.needs_input_grad[:4]
    if pre.numel() == 0 and grad_out.numel() != 0:
        raise RuntimeError("spp_ext::masked_linear: backward needs the forward to run with need_pre=True")
    dx, dm, dW, db = ops.masked_linear_backward(grad_out, x, W, pre, mvec, ctx.act, need_x, need_W, need_b and ctx.has_b)
    return (dx if need_x else None, dW if need_W else None, db if need_b and ctx.has_b else None,
            dm if need_m else None, None, None)


torch.library.register_autograd("spp_ext::masked_linear", _ml_backward, setup_context=_ml_setup)


def _pm_setup(ctx, inputs, output):
    x, W1, b1, m, W2, b2, act, need_pre = inputs
    ctx.act = act
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
    ctx.save_for_backward(x, W1, output[1], m, W2)


def _pm_backward(ctx, grad_out, grad_pre):
    x, W1, pre, m, W2 = ctx.saved_tensors
    nx, nW1, nb1, nm, nW2, nb2 = ctx.needs_input_grad[:6]
    need_dW = bool(nW1 or nb1 or nW2 or nb2)
    if pre.numel() == 0 and grad_out.numel() != 0 and W1.shape[0] != 0:
        raise RuntimeError("spp_ext::pair_matmul: backward needs the forward to run with need_pre=True")
    dx, dm, dW1, db1, dW2, db2 = ops.pair_matmul_backward(grad_out, x, W1, pre, m, W2, ctx.act, nx, need_dW)

    def cast(g, like):
        return g.to(like.dtype)

    return (dx if nx else None, cast(dW1, W1) if nW1 else None, db1.to(W1.dtype) if nb1 and ctx.has_b1 else None,
            dm if nm else None, cast(dW2, W2) if nW2 else None, db2.to(W2.dtype) if nb2 and ctx.has_b2 else None,
            None, None)


torch.library.register_autograd("spp_ext::pair_matmul", _pm_backward, setup_context=_pm_setup)


# ---------------------------------------------------------------- wrappers (reference signatures)
def _act_name(act: Optional[str]) -> str:
    reference.activation(act)  # ValueError listing the names
    return "none" if act is None else act


def _check_cpu(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}; the ext backend of this op serves CPU tensors")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def masked_linear(x, W, b, m, col2unit=None, act=None):
    """The ext backend of :func:`reference.masked_linear` (same arguments and result)."""
    mvec = reference.check_masked_linear(x, W, b, m, col2unit)
    name = _act_name(act)
    _check_cpu(x=x, W=W, b=b, m=m)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    need = _needs_grad(x, W, b, m)
    out, _ = ops.masked_linear(x2, W.contiguous(), None if b is None else b.contiguous(), mvec.contiguous(), name, need)
    return out.reshape(*lead, W.shape[0])


class _GatherCache:
    """Active rows of W1 / columns of W2 (and b1), gathered into contiguous fp32 buffers, kept per
    (weights, active set) and rebuilt when a weight or the active set changes (version counters
    and the index values are compared, so a mask set recomputed into a new tensor still hits)."""

    def __init__(self, size: int = 64):
        self.size = size
        self.entries: dict = {}
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def _stamp(t):
        return None if t is None else (t.data_ptr(), t._version, tuple(t.shape), t.dtype)

    def get(self, W1, b1, W2, active):
        key = (self._stamp(W1), self._stamp(b1), self._stamp(W2), active.numel())
        with self.lock:
            hit = self.entries.get(key)
            if hit is not None and torch.equal(hit[0], active):
                self.hits += 1
                return hit[1]
        self.misses += 1
        with torch.no_grad():
            W1a = W1.index_select(0, active).float().contiguous()
            b1a = None if b1 is None else b1.index_select(0, active).float().contiguous()
            W2a = W2.index_select(1, active).float().contiguous()
        with self.lock:
            if len(self.entries) >= self.size:
                self.entries.pop(next(iter(self.entries)))
            self.entries[key] = (active.clone(), (W1a, b1a, W2a))
        return W1a, b1a, W2a

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


gather_cache = _GatherCache()


def pair_matmul(x, W1, b1, m, W2, b2, act=None, active=None):
    """The ext backend of :func:`reference.pair_matmul` (same arguments and result)."""
    reference.check_pair_matmul(x, W1, b1, m, W2, b2, active)
    name = _act_name(act)
    _check_cpu(x=x, W1=W1, b1=b1, m=m, W2=W2, b2=b2, active=active)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    weights_grad = _needs_grad(W1, b1, W2, b2)
    if active is not None:
        active = active.long()
        ma = m.index_select(0, active)
        if weights_grad:  # differentiable gather: autograd scatters dW back
            W1, W2 = W1.index_select(0, active).float(), W2.index_select(1, active).float()
            b1 = None if b1 is None else b1.index_select(0, active).float()
        else:
            W1, b1, W2 = gather_cache.get(W1, b1, W2, active)
    else:
        ma = m
        if weights_grad:
            W1, W2 = W1.float(), W2.float()
            b1 = None if b1 is None else b1.float()
        else:  # frozen weights: the cache also holds their fp32 contiguous copies
            if W1.dtype != torch.float32 or not W1.is_contiguous() or not W2.is_contiguous():
                all_units = torch.arange(W1.shape[0])
                W1, b1, W2 = gather_cache.get(W1, b1, W2, all_units)
    b2f = None if b2 is None else b2.float().contiguous()
    need = _needs_grad(x, W1, b1, ma, W2, b2f)
    out, _ = ops.pair_matmul(x2, W1, b1, ma.contiguous(), W2, b2f, name, need)
    return out.reshape(*lead, W2.shape[0])


def inclusion_step(m, grad, exp_avg, exp_avg_sq, z, gamma, entry, support_count, step, *, lr=1e-3, beta1=0.9,
                   beta2=0.999, eps=1e-4, weight_decay=0.0, kappa=1.0, lam=3.0, nu=math.inf, mode="nonneg",
                   optimizer="adamw", record=False, check_finite=True):
    """The ext backend of :func:`reference.inclusion_step`: one fused pass, in place."""
    reference.check_inclusion_arenas(m, grad, exp_avg, exp_avg_sq, z, gamma, entry, support_count)
    reference.check_inclusion_args(step, lr, beta1, beta2, eps, weight_decay, kappa, lam, nu, mode, optimizer)
    state = [m, exp_avg, exp_avg_sq, z, gamma, entry, support_count]
    # the kernel walks flat arenas; strided views (never the search's own arenas) run on contiguous
    # copies that are written back through the views afterwards — which is only well defined when
    # no two state arrays share memory
    if not all(t.is_contiguous() for t in state):
        names = ("m", "exp_avg", "exp_avg_sq", "z", "gamma", "entry", "support_count")
        spans = [(t.untyped_storage().data_ptr(), n) for t, n in zip(state, names)]
        for i in range(len(spans)):
            for j in range(i + 1, len(spans)):
                if spans[i][0] == spans[j][0]:
                    raise ValueError(f"{spans[i][1]} and {spans[j][1]} share memory; with strided arenas "
                                     "every state array must have its own storage")
    work = [t if t.is_contiguous() else t.contiguous() for t in state]
    s = reference.inclusion_scalars(step, lr, beta1, beta2, kappa, optimizer)
    with torch.no_grad():
        ops.inclusion_step(work[0], grad.contiguous(), *work[1:], int(step), float(lr),
                           float(beta1), float(beta2), float(eps), float(weight_decay), float(kappa), float(lam),
                           float(nu), s["step_size"], s["inv_sqrt_bc2"], s["rho"], mode, optimizer, bool(record),
                           bool(check_finite))
        for t, w in zip(state, work):
            if w is not t:
                t.copy_(w)


# ---------------------------------------------------------------- attention (CPU forward)
@torch.library.register_fake("spp_ext::attention")
def _attention_fake(q, k, v, scale, keep, causal, bias=None):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[3]))


def _fused_attention(q, k, v, scale, attn_mask, is_causal, bias=None):
    """The fused kernel's forward as the chunked route's (B, H, N, Dv), a view of its (B, N, H, Dv)."""
    if bias is not None:
        bias = bias.detach().to(torch.float32)  # its gradient comes from the chunked route's backward
    return ops.attention(q, k, v, float(scale), attn_mask, bool(is_causal), bias).permute(0, 2, 1, 3)


def attention(q, k, v, scale, attn_mask=None, is_causal=False, bias=None):
    """The ext backend of :func:`reference.attention`: the torch backend's routes and guards
    (:func:`reference.sdpa_attention`), whose fp32 CPU calls run the fused kernel
    ``spp_ext::attention`` forward (equal widths too, and with an additive ``bias``) and the
    chunked route's backward."""
    return reference.sdpa_attention(q, k, v, scale, attn_mask, is_causal, bias, fused=_fused_attention)
