"""``linear(x, W, b, act)``: ``act(x Wᵀ + b)`` for the unmasked layers of pruned models, on the
fastest GEMM the machine offers.

On x86-64 CPUs, for fp32 products large enough, the product runs as one oneDNN matmul
primitive (``torch.ops.mkldnn._linear_pointwise``, the op Inductor's CPU backend uses) with the
bias and the activation (or a residual add) fused in its epilogue; everywhere else it is
``F.linear`` followed by the activation. Why: PyTorch's fp32 ``F.linear`` on CPU calls the BLAS
it was built with, and on the CPUs we measured (AMD EPYC, MKL) that BLAS takes a path that runs
at about half oneDNN's speed, and at a third to a quarter on the narrow widths pruning leaves
(``benchmarks/bench_linear.py``). Below :data:`MIN_MACS` multiply-adds the primitive's fixed
cost (about 15 µs) outweighs the gain, so small products stay on ``F.linear``.

Where gradients are needed (fine-tuning a pruned model) the forward runs unfused on oneDNN and
the backward's products (dx, dW) too. Under ``torch.compile`` the no-gradient case runs as the
opaque op ``spp_kernels::linear`` (Inductor lowers oneDNN linears only for weights it has frozen
into constants; ``F.linear`` would take the BLAS path). The plain path is taken whenever the fast
one might change more than rounding: other devices and dtypes, compiled training,
``torch.export`` and jit tracing, torch.func transforms and an active dispatch mode
(``FlopCounterMode`` must count these products).
``SPP_BACKEND=torch`` or ``SPP_ONEDNN_LINEAR=0`` keeps every product on ``F.linear``.
"""
from __future__ import annotations

import os
import platform
from typing import Optional

import torch
import torch.nn.functional as F

from . import reference

MIN_MACS = 1 << 21  # rows × out × in below which F.linear was as fast or faster (MiniLM shapes, 2 threads)

# our activation names -> oneDNN post-op (attr, algorithm) of _linear_pointwise
_POST_OPS = {"none": ("none", ""), "relu": ("relu", ""), "gelu": ("gelu", "none"),
             "gelu_tanh": ("gelu", "tanh"), "silu": ("swish", "")}

_state: Optional[tuple[bool, str]] = None  # (available, why), decided on first use


_F32 = torch.float32
_compiling = torch.compiler.is_compiling
_func_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # pragma: no cover - every torch we support has it
    def _get_current_dispatch_mode():
        return None


def _decide() -> tuple[bool, str]:
    if os.environ.get("SPP_ONEDNN_LINEAR", "1").strip() in ("0", "false", "no", "off"):
        return False, "disabled by SPP_ONEDNN_LINEAR=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"oneDNN linears are used on x86-64 only (this is {platform.machine()})"
    if not torch.backends.mkldnn.is_available():
        return False, "this torch was built without oneDNN"
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return False, "this torch has no mkldnn._linear_pointwise"
    try:  # a self-test: a torch whose op changed meaning must not give wrong numbers
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, 7, generator=g)
        w = torch.randn(3, 7, generator=g)
        b = torch.randn(3, generator=g)
        r = torch.randn(5, 3, generator=g)
        with torch.no_grad():
            ok = all(torch.allclose(op(x, w, b, attr, [], alg), reference.activation(name)(F.linear(x, w, b)),
                                    rtol=1e-4, atol=1e-5) for name, (attr, alg) in _POST_OPS.items())
            ok = ok and torch.allclose(torch.ops.mkldnn._linear_pointwise.binary(x, r, w, b, "add"),
                                       F.linear(x, w, b) + r, rtol=1e-4, atol=1e-5)
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        return False, f"mkldnn._linear_pointwise failed its self-test ({type(exc).__name__}: {str(exc)[:120]})"
    if not ok:
        return False, "mkldnn._linear_pointwise failed its self-test (wrong values)"
    return True, f"oneDNN (mkldnn._linear_pointwise) from {MIN_MACS} multiply-adds, F.linear below"


def onednn_status() -> tuple[bool, str]:
    """(whether fp32 CPU linears of pruned layers may run on oneDNN, a sentence saying why)."""
    global _state
    if _state is None:
        _state = _decide()
    return _state


def _fast(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor]) -> bool:
    # cheapest rejections first: most calls of a small model end at the size check
    if _compiling() or x.dtype is not _F32 or W.dtype is not _F32 or W.dim() != 2 or x.dim() == 0:
        return False  # (torch.compile first: Dynamo traces that flag, not the checks after it)
    if not _big_enough(x, W):
        return False  # (or a size mismatch: F.linear says what is wrong)
    if not (x.is_cpu and W.is_cpu) or type(x) is not torch.Tensor:  # (is_cpu: no device object)
        return False  # other devices; tensor subclasses (fake tensors, …)
    if _func_wrapped(x) or _func_wrapped(W):
        return False  # inside a torch.func transform (vmap, grad, jvp)
    if b is not None and (b.dtype is not _F32 or not b.is_cpu or b.shape != (W.shape[0],)):
        return False
    if torch.jit.is_tracing() or _get_current_dispatch_mode() is not None:
        return False
    if _torch_forced():
        return False
    return (_state or onednn_status())[0]


def _big_enough(x: torch.Tensor, W: torch.Tensor) -> bool:
    """Shapes that fit (K = W's input width, not 0) and at least :data:`MIN_MACS` multiply-adds."""
    K = x.shape[-1]
    return K == W.shape[1] and K != 0 and x.numel() // K * W.shape[0] * K >= MIN_MACS


def _fast_compiled(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor]) -> bool:
    """Under torch.compile: whether the product runs as the opaque ``spp_kernels::linear`` op (and
    so on oneDNN), as :func:`_fast` decides in eager code, for inference only. Inductor lowers
    ``mkldnn._linear_pointwise`` only for weights it has frozen into constants, and ``F.linear``
    would run on the BLAS path this module avoids. Not under torch.export: an exported program
    keeps to ATen ops."""
    if torch.compiler.is_exporting() or reference._needs_grad(x, W, b, residual):
        return False
    if x.dtype != _F32 or W.dtype != _F32 or W.dim() != 2 or x.dim() == 0 or x.device.type != "cpu" \
            or W.device.type != "cpu":
        return False
    if not _big_enough(x, W):
        return False
    if b is not None and (b.dtype != _F32 or b.device.type != "cpu" or b.shape != (W.shape[0],)):
        return False
    if residual is not None and (residual.dtype != _F32 or residual.device.type != "cpu"):
        return False
    return _onednn_ok()


@torch.compiler.assume_constant_result
def _onednn_ok() -> bool:
    # decided once, outside the graph (its self-test runs real products); SPP_BACKEND is read
    # when a graph is traced
    return not _torch_forced() and onednn_status()[0]


@torch.library.custom_op("spp_kernels::linear", mutates_args=())
def _linear_op(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], act: str,
               residual: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`linear` run eagerly (its oneDNN route), for compiled graphs."""
    return _linear_eager(x, W, b, act, residual).contiguous()


@_linear_op.register_fake
def _(x, W, b, act, residual):
    shape = (*x.shape[:-1], W.shape[0])
    if residual is not None:
        shape = torch.broadcast_shapes(shape, residual.shape)
    return x.new_empty(shape)


def _torch_forced() -> bool:
    return os.environ.get("SPP_BACKEND", "").strip().lower() == "torch"


def onednn_in_use(device, dtype: torch.dtype) -> bool:
    """Whether :func:`linear` may run products of tensors of this device and dtype on oneDNN now
    (those above :data:`MIN_MACS` multiply-adds, outside the cases that keep ``F.linear``)."""
    return torch.device(device).type == "cpu" and dtype == _F32 and not _torch_forced() and onednn_status()[0]


def _needs_grad(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or W.requires_grad or (b is not None and b.requires_grad))


class _OneDNNLinear(torch.autograd.Function):
    """x Wᵀ + b on oneDNN with its backward on oneDNN too (fine-tuning a pruned model): dx = g W
    and dW = gᵀ x as the same primitive on transposed views, db = Σ g."""

    @staticmethod
    def forward(ctx, x, W, b):
        ctx.save_for_backward(x, W)
        ctx.has_bias = b is not None
        return torch.ops.mkldnn._linear_pointwise(x, W, b, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, W = ctx.saved_tensors
        op = torch.ops.mkldnn._linear_pointwise
        g = g.contiguous()
        dx = dW = db = None
        if ctx.needs_input_grad[0]:
            dx = op(g, W.t(), None, "none", [], "")
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[1]:
            dW = op(g2.t(), x.reshape(-1, x.shape[-1]).t(), None, "none", [], "")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0)
        return dx, dW, db


def _fast_residual(x: torch.Tensor, W: torch.Tensor, residual: torch.Tensor) -> bool:
    return (type(residual) is torch.Tensor and residual.dtype is _F32 and residual.device.type == "cpu"
            and residual.is_contiguous() and residual.shape == (*x.shape[:-1], W.shape[0])
            and not (residual.requires_grad and torch.is_grad_enabled()))


def linear(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor] = None,
           act: Optional[str] = None, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(x Wᵀ + b) + residual`` (x (..., K), W (N, K), b (N,) or None; ``act`` one of
    ``spp_kernels.ACTIVATIONS``, None = "none"; ``residual`` None or broadcastable to the
    output), as ``F.linear`` computes it up to fp32 rounding. No mask: the pruned model's layers,
    whose masks are folded into their weights. On oneDNN a residual of the output's shape (and
    no activation) is added in the GEMM's epilogue, saving a pass over the output."""
    if _compiling():
        name = "none" if act is None else act
        if isinstance(name, str) and name in _POST_OPS and _fast_compiled(x, W, b, residual):
            return torch.ops.spp_kernels.linear(x, W, b, name, residual)
    return _linear_eager(x, W, b, act, residual)


def _linear_eager(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], act: Optional[str],
                  residual: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`linear` without the compiled graph's op (that op's body: the compile flag is
    process-wide, so an eager call may see it set while another thread compiles; ``_fast`` then
    keeps ``F.linear``)."""
    post = _POST_OPS.get("none" if act is None else act) if isinstance(act, (str, type(None))) else None
    if post is None:
        reference.activation(act)  # raises, naming the activations, for an unknown one
    elif _fast(x, W, b):
        if _needs_grad(x, W, b):  # training: the products on oneDNN, activation and residual in torch
            return _finish(_OneDNNLinear.apply(x, W, b), act, residual)
        if residual is not None and post[0] == "none" and _fast_residual(x, W, residual):
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, W, b, "add")
        y = torch.ops.mkldnn._linear_pointwise(x, W, b, post[0], [], post[1])
        return y if residual is None else y + residual
    return _finish(F.linear(x, W, b), act, residual)


def _finish(y: torch.Tensor, act: Optional[str], residual: Optional[torch.Tensor]) -> torch.Tensor:
    if act is not None and act != "none":
        y = reference.ACTIVATIONS[act](y)
    return y if residual is None else y + residual
