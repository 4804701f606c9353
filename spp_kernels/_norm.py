"""``layer_norm(x, normalized_shape, weight, bias, eps)``: ``F.layer_norm`` for the LayerNorms of
pruned models, on the extension's CPU kernel (csrc/layer_norm.cpp) for fp32 inference calls.

A pruned model's products shrink with its widths, its LayerNorms do not: at MiniLM's shapes
(batch 64 × 128 tokens × 384) ATen's CPU LayerNorm took 1.6-1.7x as long as the extension's row
loop, at 768 wide (memory-bound) 1.0-1.2x; below :data:`MIN_ELEMENTS` (batch 1), where these
checks (~2.5 µs) and the op call cost as much as the kernel gains, torch's was as fast or faster
(``benchmarks/bench_layer_norm.py``). Everything the kernel does not cover keeps
``F.layer_norm``: small inputs, a gradient to compute, other devices and dtypes, a normalized
shape of more than the last dimension, ``torch.compile`` / tracing, torch.func transforms, an
active dispatch mode, ``SPP_BACKEND=torch``, and a build without the extension.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import _ext
from ._linear import _F32, _compiling, _func_wrapped, _get_current_dispatch_mode, _torch_forced


_PLAIN = (torch.Tensor, torch.nn.Parameter)
# elements below which F.layer_norm was as fast or faster (the call's fixed costs: 128 × 384 on a
# par, 128 × 301 0.82x, 128 × 768 1.21x; benchmarks/bench_layer_norm.py, 2 threads)
MIN_ELEMENTS = 1 << 16


def available() -> bool:
    """Whether the extension's LayerNorm kernel is built and loaded here."""
    return _ext.available and hasattr(torch.ops.spp_ext, "layer_norm")


def _fast(x: torch.Tensor, shape, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> bool:
    # (torch.compile first: Dynamo traces the flag, not the checks after it; then the cheap ones:
    # at batch 1 these checks cost about a third of the kernel)
    if _compiling() or type(x) is not torch.Tensor or x.dtype is not _F32 or not x.is_cpu or len(shape) != 1:
        return False
    if x.dim() == 0 or shape[0] != x.shape[-1] or x.numel() < MIN_ELEMENTS:
        return False
    C = x.shape[-1]
    grad = torch.is_grad_enabled() and x.requires_grad
    for t in (weight, bias):
        if t is not None:
            if type(t) not in _PLAIN or t.dtype is not _F32 or not t.is_cpu or t.dim() != 1 or t.shape[0] != C:
                return False
            if _func_wrapped(t):
                return False  # torch.func over the parameters (vmap of stacked weights, jvp)
            grad = grad or (t.requires_grad and torch.is_grad_enabled())
    if grad or _func_wrapped(x) or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None:
        return False
    return available() and not _torch_forced()


def layer_norm(x: torch.Tensor, normalized_shape: Union[int, Sequence[int]], weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)`` up to fp32 rounding."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if _fast(x, shape, weight, bias):
        return torch.ops.spp_ext.layer_norm(x, weight, bias, float(eps))
    return F.layer_norm(x, shape, weight, bias, eps)
