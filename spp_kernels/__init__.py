"""spp_kernels: the ops of Solution Path Pruning, each with a pure-torch reference (the oracle)
and backends chosen by one dispatcher (``SPP_BACKEND=torch|triton|ext`` overrides)."""
from __future__ import annotations

from . import _ext, dispatch, reference  # noqa: F401  (_ext registers the extension if built)
from . import triton as _triton  # noqa: F401
from ._linear import linear, onednn_status  # noqa: F401
from .reference import ACTIVATIONS, inclusion_scalars

__all__ = ["masked_linear", "pair_matmul", "inclusion_step", "attention", "linear", "ACTIVATIONS", "inclusion_scalars",
           "dispatch"]
__version__ = "0.1.0"


def masked_linear(x, W, b, m, col2unit=None, act=None):
    """``act(x Wᵀ + b) ⊙ m[col2unit]`` on the best backend for x's device; see reference.masked_linear."""
    return dispatch.resolve("masked_linear", x.device)(x, W, b, m, col2unit, act)


def pair_matmul(x, W1, b1, m, W2, b2, act=None, active=None):
    """``(act(x W1ᵀ + b1) ⊙ m) W2ᵀ + b2`` over the ``active`` units; see reference.pair_matmul."""
    return dispatch.resolve("pair_matmul", x.device)(x, W1, b1, m, W2, b2, act, active)


def inclusion_step(m, grad, exp_avg, exp_avg_sq, z, gamma, entry, support_count, step, **hyper):
    """SPEC §2 in place over the flat arenas; see reference.inclusion_step for the arguments."""
    return dispatch.resolve("inclusion_step", m.device)(
        m, grad, exp_avg, exp_avg_sq, z, gamma, entry, support_count, step, **hyper
    )


def attention(q, k, v, scale, attn_mask=None, is_causal=False, bias=None):
    """``softmax(q kᵀ · scale + bias) v`` for any qk and v widths; see reference.attention."""
    fn = dispatch.resolve("attention", q.device)
    if bias is None:
        return fn(q, k, v, scale, attn_mask, is_causal)
    return fn(q, k, v, scale, attn_mask, is_causal, bias=bias)
