"""Pure-torch reference of every op: the oracle of the tests and the ``torch`` backend.

The arithmetic here *is* the contract (SPEC §2, §4): a fused backend must reproduce it up to
float rounding (and bit-for-bit where the order of operations is the same).
"""
from __future__ import annotations

import contextlib
import math
import contextvars
import threading
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda h: h,
    "gelu": lambda h: F.gelu(h),  # erf form (BERT "gelu", timm nn.GELU())
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INCLUSION_MODES = ("nonneg", "signed")
INCLUSION_OPTIMIZERS = ("adamw", "sgd")


def activation(act: Optional[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation called ``act`` (``None`` means ``"none"``); ValueError lists the names."""
    name = "none" if act is None else act
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    return ACTIVATIONS[name]


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_mask(m: torch.Tensor) -> None:
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"m must be a torch.Tensor, got {type(m).__name__}")
    if m.dtype != torch.float32:
        raise TypeError(f"m must be float32 (masks are kept in fp32), got {m.dtype}")
    if m.dim() != 1:
        raise ValueError(f"m must be 1-D, got shape {tuple(m.shape)}")


def _check_bias(name: str, b: Optional[torch.Tensor], n: int, dtype: torch.dtype) -> None:
    if b is None:
        return
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(b).__name__}")
    if b.dtype != dtype:
        raise TypeError(f"{name} dtype {b.dtype} != x dtype {dtype}")
    if tuple(b.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(b.shape)}")


def _scale_by_mask(h: torch.Tensor, mvec: torch.Tensor) -> torch.Tensor:
    # The mask is fp32; multiply in fp32 so that dm is accumulated in fp32 too.
    if h.dtype == torch.float32:
        return h * mvec
    return (h.float() * mvec).to(h.dtype)


def check_masked_linear(x, W, b, m, col2unit) -> torch.Tensor:
    """Validate the arguments of :func:`masked_linear` (shared by every backend); return the
    per-column mask ``m[col2unit]`` (``m`` itself when col2unit is None)."""
    _check_float("x", x)
    _check_float("W", W)
    _check_mask(m)
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (out, in), got shape {tuple(W.shape)}")
    if x.shape[-1] != W.shape[1]:
        raise ValueError(f"x's last dim {x.shape[-1]} != W's in_features {W.shape[1]}")
    if W.dtype != x.dtype:
        raise TypeError(f"W dtype {W.dtype} != x dtype {x.dtype}")
    _check_bias("b", b, W.shape[0], x.dtype)
    if col2unit is None:
        if m.numel() != W.shape[0]:
            raise ValueError(f"m has {m.numel()} units but W has {W.shape[0]} rows and col2unit is None")
        mvec = m
    else:
        if col2unit.dtype not in (torch.int64, torch.int32) or tuple(col2unit.shape) != (W.shape[0],):
            raise ValueError(f"col2unit must be an int tensor of shape ({W.shape[0]},)")
        if col2unit.numel() and (int(col2unit.min()) < 0 or int(col2unit.max()) >= m.numel()):
            raise ValueError(f"col2unit holds unit indices outside [0, {m.numel()})")
        mvec = m[col2unit]
    return mvec


def masked_linear(
    x: torch.Tensor,
    W: torch.Tensor,
    b: Optional[torch.Tensor],
    m: torch.Tensor,
    col2unit: Optional[torch.Tensor] = None,
    act: Optional[str] = None,
) -> torch.Tensor:
    """``act(x Wᵀ + b) ⊙ m[col2unit]``.

    x: (..., K) float; W: (N, K) same dtype; b: (N,) or None; m: (U,) fp32;
    col2unit: (N,) int64 mapping each output column to its mask unit, or None when U == N.
    Returns (..., N) in x's dtype. Gradients flow to x, m (fp32) and to W/b only if they require it.
    """
    mvec = check_masked_linear(x, W, b, m, col2unit)
    h = activation(act)(F.linear(x, W, b))
    return _scale_by_mask(h, mvec)


def check_pair_matmul(x, W1, b1, m, W2, b2, active) -> None:
    """Validate the arguments of :func:`pair_matmul` (shared by every backend)."""
    _check_float("x", x)
    _check_float("W1", W1)
    _check_float("W2", W2)
    _check_mask(m)
    if W1.dim() != 2 or W2.dim() != 2:
        raise ValueError("W1 and W2 must be 2-D")
    if x.shape[-1] != W1.shape[1]:
        raise ValueError(f"x's last dim {x.shape[-1]} != W1's in_features {W1.shape[1]}")
    if W2.shape[1] != W1.shape[0] or m.numel() != W1.shape[0]:
        raise ValueError(
            f"inner widths disagree: W1 rows {W1.shape[0]}, m units {m.numel()}, W2 cols {W2.shape[1]}"
        )
    if W1.dtype != x.dtype or W2.dtype != x.dtype:
        raise TypeError(f"W1/W2 dtype must equal x dtype {x.dtype}")
    _check_bias("b1", b1, W1.shape[0], x.dtype)
    _check_bias("b2", b2, W2.shape[0], x.dtype)
    if active is not None:
        if not isinstance(active, torch.Tensor) or active.dtype not in (torch.int64, torch.int32) or active.dim() != 1:
            raise TypeError("active must be a 1-D int64 tensor of unit indices or None")
        if active.numel() and (int(active.min()) < 0 or int(active.max()) >= m.numel()):
            raise ValueError(f"active holds indices outside [0, {m.numel()})")
        if torch.unique(active).numel() != active.numel():
            raise ValueError("active holds duplicate unit indices")


def pair_matmul(
    x: torch.Tensor,
    W1: torch.Tensor,
    b1: Optional[torch.Tensor],
    m: torch.Tensor,
    W2: torch.Tensor,
    b2: Optional[torch.Tensor],
    act: Optional[str] = None,
    active: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The masked low-rank pair ``(act(x W1ᵀ + b1) ⊙ m) W2ᵀ + b2``.

    x: (..., K); W1: (U, K); b1: (U,) or None; m: (U,) fp32; W2: (N, U); b2: (N,) or None.
    active: int64 indices of the units to compute (kept units); None means all. Units outside
    ``active`` contribute nothing, exactly as if their mask were 0. Returns (..., N).
    """
    check_pair_matmul(x, W1, b1, m, W2, b2, active)
    if active is not None:
        W1 = W1.index_select(0, active)
        b1 = None if b1 is None else b1.index_select(0, active)
        m = m.index_select(0, active)
        W2 = W2.index_select(1, active)
    h = _scale_by_mask(activation(act)(F.linear(x, W1, b1)), m)
    return F.linear(h, W2, b2)


def inclusion_scalars(step: int, lr: float, beta1: float, beta2: float, kappa: float, optimizer: str) -> dict:
    """Host-side scalars of one step, in float64, shared by every backend so they agree exactly."""
    if optimizer == "adamw":
        bc1 = 1.0 - beta1**step
        bc2 = 1.0 - beta2**step
        return {"step_size": lr / bc1, "inv_sqrt_bc2": 1.0 / math.sqrt(bc2), "rho": kappa * lr / bc1}
    return {"step_size": lr, "inv_sqrt_bc2": 1.0, "rho": kappa * lr}


def check_inclusion_arenas(m, grad, exp_avg, exp_avg_sq, z, gamma, entry, support_count) -> None:
    """Validate the state arenas of :func:`inclusion_step` (shared by every backend)."""
    n = m.numel()
    for name, t in (("m", m), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("z", z), ("gamma", gamma)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
        if t.dim() != 1 or t.numel() != n:
            raise ValueError(f"{name} must be 1-D with {n} elements like m, got shape {tuple(t.shape)}")
        if t.device != m.device:
            raise ValueError(f"{name} is on {t.device} but m is on {m.device}")
    for name, t in (("entry", entry), ("support_count", support_count)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
            raise TypeError(f"{name} must be an int32 tensor")
        if t.dim() != 1 or t.numel() != n:
            raise ValueError(f"{name} must be 1-D with {n} elements like m")
        if t.device != m.device:
            raise ValueError(f"{name} is on {t.device} but m is on {m.device}")


def check_inclusion_args(step, lr, beta1, beta2, eps, weight_decay, kappa, lam, nu, mode, optimizer) -> None:
    """Validate the hyper-parameters of :func:`inclusion_step` (shared by every backend)."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)

    for name, v in (("lr", lr), ("kappa", kappa)):
        if not (number(v) and 0 < v < math.inf):
            raise ValueError(f"{name} must be a finite positive number, got {v!r}")
    if not (number(nu) and nu > 0):
        raise ValueError(f"nu must be a positive number (math.inf for no coupling), got {nu!r}")
    for name, v in (("beta1", beta1), ("beta2", beta2)):
        if not (number(v) and 0.0 <= v < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {v!r}")
    for name, v in (("eps", eps), ("weight_decay", weight_decay), ("lam", lam)):
        if not (number(v) and v >= 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if optimizer == "adamw" and eps == 0:
        raise ValueError("eps must be > 0 with the adamw optimizer (0/0 at a zero gradient)")
    if mode not in INCLUSION_MODES:
        raise ValueError(f"mode must be one of {INCLUSION_MODES}, got {mode!r}")
    if optimizer not in INCLUSION_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {INCLUSION_OPTIMIZERS}, got {optimizer!r}")


@torch.no_grad()
def inclusion_step(
    m: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    z: torch.Tensor,
    gamma: torch.Tensor,
    entry: torch.Tensor,
    support_count: torch.Tensor,
    step: int,
    *,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-4,
    weight_decay: float = 0.0,
    kappa: float = 1.0,
    lam: float = 3.0,
    nu: float = math.inf,
    mode: str = "nonneg",
    optimizer: str = "adamw",
    record: bool = False,
    check_finite: bool = True,
) -> None:
    """One step of the discretised differential inclusion (SPEC §2), in place on the arenas.

    All float arenas are 1-D fp32 of equal length; ``entry`` and ``support_count`` are int32.
    ``step`` is the 1-based step count t; ``record`` adds the support to ``support_count``.
    """
    check_inclusion_arenas(m, grad, exp_avg, exp_avg_sq, z, gamma, entry, support_count)
    check_inclusion_args(step, lr, beta1, beta2, eps, weight_decay, kappa, lam, nu, mode, optimizer)
    if check_finite:
        for name, t in (("grad", grad), ("m", m), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("z", z), ("gamma", gamma)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} holds NaN or Inf")
    s = inclusion_scalars(step, lr, beta1, beta2, kappa, optimizer)

    g = grad.clone()
    if math.isfinite(nu):
        g += (m - gamma) / nu
    if optimizer == "adamw":
        if weight_decay:
            m.mul_(1.0 - lr * weight_decay)
        exp_avg.mul_(beta1).add_(g * (1.0 - beta1))
        exp_avg_sq.mul_(beta2).add_(g * g * (1.0 - beta2))
        denom = exp_avg_sq.sqrt() * s["inv_sqrt_bc2"] + eps
        m.sub_(exp_avg / denom * s["step_size"])
    else:
        if weight_decay:
            g += m * weight_decay
        m.sub_(g * s["step_size"])
    z.add_((m - gamma) * s["rho"])
    if mode == "nonneg":
        gamma.copy_(torch.clamp(z - lam, min=0.0) * kappa)
    else:
        gamma.copy_(torch.sign(z) * torch.clamp(z.abs() - lam, min=0.0) * kappa)
    nz = gamma != 0
    entry.masked_fill_((entry == -1) & nz, step)
    if record:
        support_count.add_(nz.to(torch.int32))


def check_attention(q, k, v, scale, attn_mask=None, is_causal=False, bias=None) -> None:
    """Validate the arguments of :func:`attention` (shared by every backend)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, tokens, width), got shape {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, N, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(f"q, k, v must agree on (batch, heads): {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"k's width {k.shape[3]} != q's width {D}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v has {v.shape[2]} tokens, k has {k.shape[2]}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool:
            raise TypeError("attn_mask must be a bool tensor (True = attend) or None")
        M = k.shape[2]
        if attn_mask.dim() == 4:
            if attn_mask.shape[0] not in (1, B) or attn_mask.shape[1] not in (1, H) or attn_mask.shape[2:] != (N, M):
                raise ValueError(f"a 4-D attn_mask must be (batch or 1, heads or 1, queries, keys) = "
                                 f"({B} or 1, {H} or 1, {N}, {M}), got {tuple(attn_mask.shape)}")
        elif attn_mask.shape != (B, M):
            raise ValueError(f"attn_mask must be (batch, key tokens) = {(B, M)} or (batch or 1, heads or 1, "
                             f"queries, keys), got {tuple(attn_mask.shape)}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device}, q on {q.device}")
    if bias is not None:
        check_bias(bias, q, k.shape[2])


def check_bias(bias, q: torch.Tensor, M: int) -> None:
    """Validate :func:`attention`'s additive ``bias``: a float (Bb, Hb, N, M) tensor on q's device
    with Bb dividing the batch and Hb in {1, heads}; finite also in q's dtype (SDPA takes it as a
    mask of q's dtype: an fp32 -1e5 would be -inf in fp16). Values are read on CPUs outside
    transforms and compile; elsewhere they are the caller's promise (exclude keys with
    ``attn_mask`` / ``is_causal``, not with -inf)."""
    B, H, N = q.shape[:3]
    if not isinstance(bias, torch.Tensor) or bias.dtype not in FLOAT_DTYPES:
        raise TypeError("bias must be a float32/float16/bfloat16 tensor (added to the scores) or None, got "
                        + (str(bias.dtype) if isinstance(bias, torch.Tensor) else type(bias).__name__))
    if bias.device != q.device:
        raise ValueError(f"bias is on {bias.device}, q on {q.device}")
    if bias.dim() != 4 or bias.shape[2:] != (N, M) or bias.shape[1] not in (1, H) or bias.shape[0] < 1 \
            or B % bias.shape[0]:
        raise ValueError(f"bias must be (Bb, 1 or heads, queries, keys) = (Bb, 1 or {H}, {N}, {M}) with Bb "
                         f"dividing the batch {B} (batch row b adds bias[b % Bb]), got {tuple(bias.shape)}")
    if q.device.type == "cpu" and _host_reads_ok(bias) and not bool(torch.isfinite(bias.to(q.dtype)).all()):
        raise ValueError(f"bias must be finite, also as {str(q.dtype).replace('torch.', '')} (q's dtype); exclude "
                         "keys with attn_mask / is_causal, not with -inf")


def tile_bias(bias: torch.Tensor, B: int) -> torch.Tensor:
    """(Bb, Hb, N, M) → (B, Hb, N, M), batch row b = bias[b % Bb] (differentiable; a view when
    Bb == 1)."""
    if bias.shape[0] == 1:
        return bias.expand(B, *bias.shape[1:])
    return bias.repeat(B // bias.shape[0], 1, 1, 1)


def causal_keep(N: int, M: int, device=None) -> torch.Tensor:
    """(N, M) bool: query i attends key j iff j <= i + M - N (the last query sees every key)."""
    return torch.ones(N, M, dtype=torch.bool, device=device).tril(M - N)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(q kᵀ · scale + bias + mask) v`` where the qk width may differ from the v width and
    either may be any size (pruned attention).

    q: (B, H, N, D) float; k: (B, H, M, D); v: (B, H, M, Dv); scale: the *original* model's scale
    (pruning must not change it); attn_mask: None, a (B, M) bool key-padding mask (True = attend),
    or a bool (B | 1, H | 1, N, M) mask as SDPA takes it (a key per query: padded or causal batches
    as Hugging Face materialises them, any other pattern);
    is_causal: query i attends keys j <= i + M - N (both may be given: a key must pass both);
    bias: None or a finite float (Bb, Hb, N, M) added to the scaled scores, Hb in {1, H}, Bb
    dividing B with batch row b adding ``bias[b % Bb]`` (Swin's relative position bias plus its
    shifted-window mask: windows of every image share them); differentiable.
    Returns (B, H, N, Dv) in q's dtype; softmax in fp32. A query row with no key to attend gives
    zeros. Keys and values at masked-out (padding) positions never reach the output, not even when
    they hold inf or NaN (with a 4-D mask: keys that no query of the batch row attends; a key
    masked for some queries and attended by others is used, and must be finite there, as in SDPA)."""
    check_attention(q, k, v, scale, attn_mask, is_causal, bias)
    allowed = None
    if attn_mask is not None:
        padding = padding_of(attn_mask, q.shape[0])
        allowed = padding[:, None, None, :] if attn_mask.dim() == 2 else attn_mask
        k, v = _drop_masked(k, v, padding)  # p = 0 there, but 0 * inf is NaN (in dq = dS k too)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + tile_bias(bias, q.shape[0]).float()
    if is_causal:
        causal = causal_keep(q.shape[2], k.shape[2], q.device)
        allowed = causal if allowed is None else allowed & causal
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with every key masked: zeros, not NaN
    return torch.matmul(p, v.float()).to(q.dtype)


def pad_for_cpu_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Zero-pad unequal qk / v head widths to the larger one on CPUs, where SDPA's flash kernel
    needs equal widths and the math path it otherwise falls back to is ~2x slower than flash at the
    larger width. Zero channels change neither q·kᵀ nor the first ``Dv`` output channels (slice
    them back). Nothing is padded on other devices, for equal widths, or when the flash kernel
    is switched off (``sdpa_kernel(MATH)``: padding would only add work there); under
    torch.compile, which cannot read that switch, unequal widths are always padded."""
    D, Dv = q.shape[-1], v.shape[-1]
    if D == Dv or q.device.type != "cpu":
        return q, k, v
    if not torch.compiler.is_compiling() and not torch.backends.cuda.flash_sdp_enabled():
        return q, k, v
    w = max(D, Dv)
    return F.pad(q, (0, w - D)), F.pad(k, (0, w - D)), F.pad(v, (0, w - Dv))


# Score bytes one batched-GEMM chunk of the CPU chunked path may hold (see cpu_chunked_attention).
CPU_SCORE_CHUNK_BYTES = 1 << 20


_SDPA_ONLY: contextvars.ContextVar[int] = contextvars.ContextVar("spp_sdpa_only", default=0)


@contextlib.contextmanager
def sdpa_only():
    """Within it the torch backend's attention takes SDPA everywhere, never the chunked CPU path:
    for comparing against a model that runs SDPA, or to rule the chunked route out. (The route
    depends on shapes, dtype and these switches only, never on autograd, so a no-grad teacher and
    a student that records a graph take the same one and agree bit for bit at m = 1.) The setting
    lives in a context variable: threads and asyncio tasks each see their own."""
    token = _SDPA_ONLY.set(_SDPA_ONLY.get() + 1)
    try:
        yield
    finally:
        _SDPA_ONLY.reset(token)


def _host_reads_ok(*ts: Optional[torch.Tensor]) -> bool:
    """False under torch.compile / torch.export, under torch.jit tracing and where a torch.func
    transform (vmap, grad, jvp) wraps any of ``ts``: ``out=`` calls and host reads of tensor values
    break the graph or fail there, and a trace would keep a value read as a constant."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return not any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in ts)


def padding_of(attn_mask: torch.Tensor, batch: int) -> torch.Tensor:
    """The (B, M) key padding of an ``attention`` mask: itself for a (B, M) one; for a 4-D
    (B | 1, H | 1, N, M) mask, the keys some query of some head of the batch row attends (a key
    no query attends is padding: its k and v are never read). Computed on the device, no read."""
    if attn_mask.dim() == 2:
        return attn_mask
    return attn_mask.any(2).any(1).expand(batch, attn_mask.shape[-1])


def _drop_masked(k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor):
    """k and v with the masked-out key positions zeroed."""
    drop = ~attn_mask[:, None, :, None]
    return k.masked_fill(drop, 0.0), v.masked_fill(drop, 0.0)


def use_cpu_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attn_mask: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                    fused: bool = False) -> bool:
    """Whether :func:`sdpa_attention` takes :func:`cpu_chunked_attention` (inference and training
    alike): fp32 CPU tensors that no torch.func transform (vmap, grad) wraps, outside
    torch.compile, export and jit tracing (graphs traced through keep SDPA; compiled fp32 CPU
    inference runs spp.layers' attention eagerly inside an opaque op); SDPA's flash kernel not switched off
    (``sdpa_kernel(MATH)`` keeps SDPA's math path exactly); not inside :func:`sdpa_only`; one
    head's (N, M) scores within ``CPU_SCORE_CHUNK_BYTES`` (longer sequences keep flash, whose
    memory does not grow with N·M); and unequal qk / v widths (flash would need them padded) or an
    additive ``bias``. Where flash takes the widths as they are and there is no bias it was faster,
    even where the scores fit one chunk (12 heads, 128 tokens, 2-core EPYC): at batch 1 by 5-12 %
    at widths 24 and 32 with key padding (300 interleaved repeats) and by 1-19 % over widths 16-64
    in a shorter run, at batch 64 by 7-19 % over widths 16-64, with and without key padding. With
    a bias SDPA needs it tiled to the batch (Swin's windows) and the chunked route was faster also
    at equal widths: Swin-T windows (49 tokens, 32-wide heads, 64 images) 1.2-2x forward and
    1.5x forward + backward, 12 heads of 128 tokens 1.2x at batch 64 and 1.9x at batch 1; only
    DeiT-S-like heads (197 tokens, width 64, one shared bias) were 6 % slower forward, 2 % forward
    + backward — a shape no adapter gives a bias. With a ``fused`` forward (the extension's kernel,
    see :func:`sdpa_attention`) the route is taken at equal widths too: it beat flash there."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or not _host_reads_ok(q, k, v, attn_mask, bias):
        return False
    if _SDPA_ONLY.get() or not torch.backends.cuda.flash_sdp_enabled():
        return False
    N, D = q.shape[2], q.shape[3]
    if N * k.shape[2] * 4 > CPU_SCORE_CHUNK_BYTES:
        return False
    return D != v.shape[-1] or bias is not None or fused


# Values derived from masks on the host routes (whether a key-padding mask keeps every key, its
# query rows without keys, the chunked route's score biases; in spp.layers the key padding read
# from a model's mask), remembered for the last few masks seen: every layer of a forward gets the
# same mask tensors, so they are computed once per forward instead of once per layer (at batch 1
# and MiniLM's pruned widths the op's part was 45 of 330 µs a call, 4 % of the pruned model at
# 0.3 of the FLOPs). The tensor's identity and version counter guard the reuse; inference tensors,
# which have no version counter, are remembered only within one forward of a model (see
# :func:`one_forward`); writes that bypass the counter (``.data``, NumPy views) are not seen: build
# a new mask instead, as Hugging Face does every forward.
_MASK_MEMO: list = []  # [(weakref to the mask, its version, {key: value})], most recent first
_MASK_MEMO_SIZE = 4  # masks
_MASK_MEMO_KEYS = 16  # values per mask (a mask reused across many shapes starts over past it)
_MASK_MEMO_LOCK = threading.Lock()


# The forward of a pruned model that is running: (memo {id(mask): (mask, {key: value})}, the state
# it replaced, id of its model), or None outside one. Immutable, set per context: a context copied
# during a forward keeps that forward's memo, never the live binding of another.
_FORWARD: contextvars.ContextVar[Optional[tuple]] = contextvars.ContextVar("spp_forward", default=None)


def enter_forward(model=None, *_) -> None:
    """A model's forward begins (a forward pre-hook that pruned models carry): until the matching
    :func:`exit_forward`, values derived from inference-tensor masks are remembered by the mask's
    identity. Within one forward a model never writes to its masks, so what no version counter can
    guard is safe there (under ``torch.inference_mode`` every layer would otherwise derive them
    again: on a GPU a few small launches a layer). A nested forward gets its own memo and the outer
    one's returns after it. A forward that never reached its exit hook (``KeyboardInterrupt`` and
    ``SystemExit`` skip even ``always_call`` hooks) is dropped when the same model's next forward
    begins. Nothing under torch.compile (a compiled graph derives nothing on the host)."""
    if torch.compiler.is_compiling():
        return
    state = _FORWARD.get()
    while state is not None and model is not None and state[2] == id(model):
        state = state[1]  # this model's interrupted forward
    _FORWARD.set(({}, state, None if model is None else id(model)))


def exit_forward(*_) -> None:
    """A model's forward ends, also by an exception (a forward hook with ``always_call``)."""
    if torch.compiler.is_compiling():
        return
    state = _FORWARD.get()
    if state is not None:
        _FORWARD.set(state[1])


@contextlib.contextmanager
def one_forward():
    """:func:`enter_forward` / :func:`exit_forward` as a context (for callers that are no model)."""
    enter_forward()
    try:
        yield
    finally:
        exit_forward()


def remembered(mask: torch.Tensor, key, compute: Callable):
    """``compute()``, remembered under ``key`` (hashable) for ``mask`` while it is unchanged (see
    ``_MASK_MEMO``); an inference tensor only within one forward (:func:`enter_forward`). Callers
    never write to what it returns. Values are computed outside inference mode, so a value first
    computed there still serves a later step that records a graph."""
    if mask.is_inference():
        state = _FORWARD.get()
        if state is None:
            return compute()
        entry = state[0].get(id(mask))
        if entry is None or entry[0] is not mask:  # (the entry holds the mask: its id is not reused)
            entry = state[0][id(mask)] = (mask, {})
        if key not in entry[1]:
            entry[1][key] = compute()
        return entry[1][key]
    with _MASK_MEMO_LOCK:
        for i, (ref, version, memo) in enumerate(_MASK_MEMO):
            if ref() is mask:
                if version != mask._version or len(memo) >= _MASK_MEMO_KEYS and key not in memo:
                    memo = {}
                    _MASK_MEMO[i] = (ref, mask._version, memo)
                break
        else:
            memo = {}
            _MASK_MEMO.insert(0, (weakref.ref(mask), mask._version, memo))
            del _MASK_MEMO[_MASK_MEMO_SIZE:]
        if key in memo:
            return memo[key]
    with torch.inference_mode(False):
        value = compute()
    with _MASK_MEMO_LOCK:
        memo[key] = value
    return value


def _chunk_bias(q: torch.Tensor, H: int, N: int, M: int, attn_mask: Optional[torch.Tensor], is_causal: bool):
    """The additive 0 / -inf score biases of the chunked route, a list of none, one or both of
    (B*H, 1, M) for key padding (remembered per mask and never written to) and (1, N, M) for causal."""
    biases = []
    if attn_mask is not None:
        biases.append(remembered(attn_mask, ("bias", q.dtype, q.device, H),
                                 lambda: _key_padding_bias(attn_mask, H, q.dtype, q.device)))
    if is_causal:  # query i attends keys j <= i + M - N
        bias = torch.zeros(1, N, M, dtype=q.dtype, device=q.device)
        biases.append(bias.masked_fill_(~causal_keep(N, M, q.device), float("-inf")))
    return biases


def _key_padding_bias(attn_mask: torch.Tensor, H: int, dtype, device) -> torch.Tensor:
    B, M = attn_mask.shape
    bias = torch.zeros(B, 1, 1, M, dtype=dtype, device=device)
    bias.masked_fill_(~attn_mask[:, None, None, :], float("-inf"))
    return bias.expand(B, H, 1, M).reshape(B * H, 1, M)


def _bias_rows(bias: Optional[torch.Tensor], B: int, H: int, dtype: torch.dtype):
    """The chunked route's view of :func:`attention`'s ``bias``: (table (Bb·Hb, N, M) in ``dtype``,
    row (B·H,) int64: the table row that (batch, head) pair r adds), or None."""
    if bias is None:
        return None
    Bb, Hb = bias.shape[:2]
    b = torch.arange(B, device=bias.device)[:, None] % Bb
    h = torch.arange(H, device=bias.device)[None, :] % Hb
    return bias.to(dtype).reshape(Bb * Hb, *bias.shape[2:]), (b * Hb + h).reshape(-1)


def _chunk_probs(s: torch.Tensor, q3, k3, bias, scale: float, i: int, j: int, rows=None) -> torch.Tensor:
    """softmax(q kᵀ · scale + biases) of (batch, head) pairs i:j, in place in ``s``; ``bias``: the
    mask biases of :func:`_chunk_bias`, ``rows``: the additive bias of :func:`_bias_rows`."""
    kt = k3[i:j].transpose(1, 2)
    part = [b[i:j] if b.shape[0] > 1 else b for b in bias]
    if rows is not None:  # the gathered bias rows first, the mask biases onto them
        torch.index_select(rows[0], 0, rows[1][i:j], out=s)
        for b in part:
            s.add_(b)
        torch.baddbmm(s, q3[i:j], kt, alpha=scale, out=s)
    elif not part:
        torch.baddbmm(s, q3[i:j], kt, beta=0.0, alpha=scale, out=s)
    elif len(part) == 1:
        torch.baddbmm(part[0], q3[i:j], kt, alpha=scale, out=s)
    else:  # key padding and causal: their sum first, in place of the single bias's copy
        torch.add(part[0], part[1], out=s)
        torch.baddbmm(s, q3[i:j], kt, alpha=scale, out=s)
    return torch.softmax(s, -1, out=s)


def _chunk_step(N: int, M: int, BH: int) -> int:
    return max(1, min(BH, CPU_SCORE_CHUNK_BYTES // max(1, N * M * 4)))


def _no_key_rows(attn_mask: Optional[torch.Tensor], is_causal: bool, N: int, M: int) -> bool:
    """Whether some query row attends to no key (its softmax is NaN on the chunked route)."""
    return _rows_without_keys(attn_mask, is_causal, N, M) is not None


def _rows_without_keys(attn_mask: Optional[torch.Tensor], is_causal: bool, N: int, M: int,
                       read: bool = True) -> Optional[torch.Tensor]:
    """(B | 1, N) bool: the query rows that attend to no key (the op gives them 0), or None when
    there are none. ``read=False`` (no host reads: other devices, transforms, compile) returns the
    tensor whenever the mask could leave a row without keys, without looking at its values. Read
    answers are remembered per mask (:func:`remembered`; never write to them)."""
    if attn_mask is None:
        if not (is_causal and N > M):
            return None
        return (torch.arange(N) < N - M)[None]  # causal queries i < N - M see no key
    if read:
        return remembered(attn_mask, ("rows", is_causal, N, M), lambda: _rows_of(attn_mask, is_causal, N, M, True))
    return _rows_of(attn_mask, is_causal, N, M, False)


def _rows_of(attn_mask: torch.Tensor, is_causal: bool, N: int, M: int, read: bool) -> Optional[torch.Tensor]:
    if not is_causal:
        rows = (~attn_mask.any(-1))[:, None].expand(attn_mask.shape[0], N)
    else:  # query i sees keys j < i + M - N + 1: none when no key of that prefix is kept
        kept = F.pad(attn_mask.cumsum(-1), (1, 0))  # kept[:, n]: how many of the first n keys are kept
        upto = (torch.arange(N, device=attn_mask.device) + (M - N + 1)).clamp(min=0)
        rows = kept.gather(1, upto[None].expand(attn_mask.shape[0], N)) == 0
    if read and not bool(rows.any()):
        return None
    return rows


def cpu_chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                          bias: Optional[torch.Tensor] = None, fused: Optional[Callable] = None) -> torch.Tensor:
    """fp32 CPU attention at the pruned widths as they are: per chunk of (batch, head) pairs,
    ``baddbmm`` (scale and mask bias folded in) → softmax in place → ``bmm`` into the output.
    Chunks hold at most ``CPU_SCORE_CHUNK_BYTES`` of scores so they stay in cache. Differentiable:
    the backward recomputes each chunk's probabilities (nothing of size N·M is kept).

    On a 2-core CPU at batch 64 (DeiT-S/B and BERT-base heads, 12 pruned shapes,
    benchmarks/bench_attention.py) this is 1.19-2.07x faster than SDPA on widths zero-padded to a
    common one, forward, and 1.09-1.75x forward + backward (Swin-T windows with their bias, 4
    pruned shapes: 2.16-2.81x and 1.64-1.98x); SDPA on the unequal widths as they are is slower
    still. No padding: compute falls with both widths. Products whose per-head output
    width is not a multiple of 16 run transposed (see :func:`_flip`), so the output and the
    gradients may come back as non-contiguous views: reshape them, do not ``view`` them. The
    additive ``bias`` is gathered per chunk from its (Bb·Hb) rows (never tiled to the batch) and
    its gradient summed back into them.

    ``fused(q, k, v, scale, attn_mask, is_causal, bias)``, when given, computes the forward
    instead (the extension's fused kernel); the backward stays the one here."""
    if _needs_grad(q, k, v, bias):
        return _CpuChunkedAttention.apply(q, k, v, scale, attn_mask, is_causal, bias, fused)
    return _chunked_forward(q, k, v, scale, attn_mask, is_causal, bias, fused)


def _chunked_forward(q, k, v, scale, attn_mask, is_causal, bias=None, fused=None) -> torch.Tensor:
    if fused is not None:
        return fused(q, k, v, scale, attn_mask, is_causal, bias)
    B, H, N, D = q.shape
    M, Dv = k.shape[2], v.shape[-1]
    BH = B * H
    q3, k3, v3 = q.reshape(BH, N, D), k.reshape(BH, M, D), v.reshape(BH, M, Dv)
    flip = _flip(Dv)  # then the buffer holds Oᵀ per (batch, head), handed on as a transposed view
    buf = _buffer(BH, N, Dv, flip, q)
    if BH == 0 or N == 0:
        return _unflip(buf, (B, H, N, Dv), flip)
    masks = _chunk_bias(q, H, N, M, attn_mask, is_causal)
    rows = _bias_rows(bias, B, H, q.dtype)
    step = _chunk_step(N, M, BH)
    scores = torch.empty(min(step, BH), N, M, dtype=q.dtype, device=q.device)
    for i in range(0, BH, step):
        j = min(BH, i + step)
        p = _chunk_probs(scores[: j - i], q3, k3, masks, scale, i, j, rows)
        _bmm_into(p, v3[i:j], buf[i:j], flip)
    out = _unflip(buf, (B, H, N, Dv), flip)
    empty = _rows_without_keys(attn_mask, is_causal, N, M)
    if empty is not None:  # rows with no key to attend: zeros, as in the reference (softmax gave NaN)
        out.masked_fill_(empty.to(out.device)[:, None, :, None], 0.0)
    return out


class _CpuChunkedAttention(torch.autograd.Function):
    """The chunked route with its own backward, chunk by chunk: P recomputed, dV = Pᵀ dO,
    dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)), dQ = scale · dS K, dK = scale · dSᵀ Q, and dbias the
    sum of dS over the (batch, head) pairs that share each bias row."""

    @staticmethod
    def forward(ctx, q, k, v, scale, attn_mask, is_causal, bias, fused=None):
        out = _chunked_forward(q, k, v, scale, attn_mask, is_causal, bias, fused)
        ctx.save_for_backward(q, k, v, out, bias)
        ctx.scale, ctx.attn_mask, ctx.is_causal = scale, attn_mask, is_causal
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, out, bias = ctx.saved_tensors
        scale, attn_mask, is_causal = ctx.scale, ctx.attn_mask, ctx.is_causal
        want_dbias = bias is not None and ctx.needs_input_grad[6]
        B, H, N, D = q.shape
        M, Dv = k.shape[2], v.shape[-1]
        BH = B * H
        flip_qk, flip_v = _flip(D), _flip(Dv)  # gradients of odd widths are computed transposed
        dq = _buffer(BH, N, D, flip_qk, q)
        dk = _buffer(BH, M, D, flip_qk, q)
        dv = _buffer(BH, M, Dv, flip_v, q)
        dbias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device) if want_dbias else None
        if BH == 0 or N == 0 or M == 0:
            return dq.zero_().view(q.shape), dk.zero_().view(k.shape), dv.zero_().view(v.shape), None, None, None, \
                None if dbias is None else dbias.to(bias.dtype), None
        q3, k3, v3 = q.reshape(BH, N, D), k.reshape(BH, M, D), v.reshape(BH, M, Dv)
        do3 = do.reshape(BH, N, Dv)
        delta = (do * out).sum(-1, keepdim=True).reshape(BH, N, 1)  # rowsum(dO ⊙ O)
        masks = _chunk_bias(q, H, N, M, attn_mask, is_causal)
        rows = _bias_rows(bias, B, H, q.dtype)
        dtable = None if dbias is None else dbias.view(rows[0].shape)
        no_key = _no_key_rows(attn_mask, is_causal, N, M)
        step = _chunk_step(N, M, BH)
        scores = torch.empty(min(step, BH), N, M, dtype=q.dtype, device=q.device)
        dscores = torch.empty_like(scores)
        for i in range(0, BH, step):
            j = min(BH, i + step)
            p = _chunk_probs(scores[: j - i], q3, k3, masks, scale, i, j, rows)
            if no_key:  # rows with no key: P = 0 there (softmax gave NaN), so they pass no gradient
                p.nan_to_num_(nan=0.0)
            _bmm_into(p.transpose(1, 2), do3[i:j], dv[i:j], flip_v)  # dV = Pᵀ dO
            ds = torch.bmm(do3[i:j], v3[i:j].transpose(1, 2), out=dscores[: j - i])
            ds.sub_(delta[i:j]).mul_(p)  # the gradient of the scores (after scale and bias)
            if dtable is not None:
                dtable.index_add_(0, rows[1][i:j], ds)
            _bmm_into(ds, k3[i:j], dq[i:j], flip_qk)  # dQ = dS K
            _bmm_into(ds.transpose(1, 2), q3[i:j], dk[i:j], flip_qk)  # dK = dSᵀ Q
        dq.mul_(scale)
        dk.mul_(scale)
        return _unflip(dq, q.shape, flip_qk), _unflip(dk, k.shape, flip_qk), _unflip(dv, v.shape, flip_v), \
            None, None, None, None if dbias is None else dbias.to(bias.dtype), None


# The chunked route's GEMMs whose output is (rows, width) per (batch, head): where the width is
# not a multiple of 16 (an AVX-512 register of fp32) the BLAS ran them slower than the transposed
# product, whose output rows are the N or M tokens instead (2-core EPYC, 768 heads of 128 tokens:
# P·V at Dv = 27 took 8.5 ms plain, 5.9 ms transposed; the whole forward + backward at MiniLM's
# 22 / 27 and DeiT's 23 / 37 widths 13-16 % less time, and never more at the widths of
# benchmarks/bench_attention.py). Such outputs are computed transposed into a (BH, width, rows)
# buffer and handed on as a transposed view, which the callers' reshape to (B, N, H·width)
# copies anyway.
def _flip(width: int) -> bool:
    return width % 16 != 0


def _buffer(BH: int, rows: int, width: int, flip: bool, like: torch.Tensor) -> torch.Tensor:
    """An output buffer of (rows, width) per (batch, head), transposed where ``flip``."""
    shape = (BH, width, rows) if flip else (BH, rows, width)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _bmm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, flip: bool) -> None:
    """out = a @ b, or outᵀ = bᵀ @ aᵀ where ``flip`` (out is then the transposed buffer)."""
    if flip:
        torch.bmm(b.transpose(1, 2), a.transpose(1, 2), out=out)
    else:
        torch.bmm(a, b, out=out)


def _unflip(g: torch.Tensor, shape, flip: bool) -> torch.Tensor:
    """A :func:`_buffer` as a (B, H, rows, width) tensor (a transposed view where ``flip``)."""
    if flip:
        B, H, rows, width = shape
        return g.view(B, H, width, rows).transpose(2, 3)
    return g.view(shape)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                   bias: Optional[torch.Tensor] = None, *, fused: Optional[Callable] = None) -> torch.Tensor:
    """The torch backend of :func:`attention`: PyTorch's SDPA (its fast kernels where they accept
    the widths, its math path elsewhere; on CPUs unequal qk/v widths are zero-padded to the larger
    one, which keeps the flash kernel), with rows that attend to no key set to 0 as in the reference.
    fp32 on CPUs at moderate sequence lengths takes :func:`cpu_chunked_attention` instead (see
    :func:`use_cpu_chunked`).

    As in the reference, keys and values at masked-out positions reach neither the output nor the
    gradients even when they are inf or NaN (an additive mask alone would let them through). On
    CPUs a non-finite output sum sends the call round once more with them zeroed (reading the sum
    costs about 2 % of the call; zeroing every time would cost 10-20 %). They are zeroed first where
    a query row has no key (its output is set to 0, so the sum cannot see it, but its gradient
    could), on other devices, inside torch.func transforms and under torch.compile, where reading a
    value back is not free or not possible.

    An additive ``bias`` goes to SDPA tiled to the batch, as its float mask in q's dtype (with -inf
    where the masks exclude a key; so with fp16 / bf16 q the bias is rounded to that dtype here,
    where the reference, the chunked route and the Triton kernel add it in fp32); the chunked
    route gathers it per chunk instead.

    A 4-D bool mask is read on CPUs (outside transforms and compile) and run as (B, M) key
    padding where it is one, or causal ∧ key padding (Hugging Face's materialised masks; see
    :func:`_as_key_padding`); any other 4-D mask, and every one elsewhere, goes to SDPA whole
    (:func:`_sdpa_full_mask`).

    ``fused``: a forward for the chunked route's calls (the ext backend passes its fused CPU
    kernel, which then also takes equal widths; see :func:`cpu_chunked_attention`). It must keep
    masked keys' values out of its output, inf and NaN included, and set rows without keys to 0:
    its calls skip the output sum check above (with gradients, k and v are summed instead)."""
    check_attention(q, k, v, scale, attn_mask, is_causal, bias)
    host = q.device.type == "cpu" and _host_reads_ok(q, k, v, attn_mask, bias)
    if attn_mask is not None and attn_mask.dim() == 4:
        as_padding = None
        if host:  # Hugging Face's materialised masks: key padding (∧ causal) in fact
            as_padding = remembered(attn_mask, ("as_key_padding", q.shape[0]),
                                    lambda: _as_key_padding(attn_mask, q.shape[0]))
        if as_padding is None:
            return _sdpa_full_mask(q, k, v, scale, attn_mask, is_causal, host, bias)
        attn_mask, is_causal = as_padding[0], is_causal or as_padding[1]
    check = attn_mask is not None and host and not remembered(attn_mask, "all", lambda: bool(attn_mask.all()))
    if check and fused is not None and use_cpu_chunked(q, k, v, attn_mask, bias, True):
        # the fused forward keeps masked keys' values out itself, so its output cannot tell; a
        # backward would still meet them: with gradients they are zeroed first when k or v holds any
        check = False
        if _needs_grad(q, k, v, bias) and not math.isfinite(float(k.detach().sum(dtype=torch.float32))
                                                           + float(v.detach().sum(dtype=torch.float32))):
            k, v = _drop_masked(k, v, attn_mask)
    if attn_mask is not None and (not host or (check and _no_key_rows(attn_mask, is_causal, q.shape[2], k.shape[2]))):
        k, v = _drop_masked(k, v, attn_mask)
        check = False
    out = _torch_attention(q, k, v, scale, attn_mask, is_causal, host, bias, fused)
    if check and not math.isfinite(float(out.detach().sum(dtype=torch.float32))):
        k, v = _drop_masked(k, v, attn_mask)
        out = _torch_attention(q, k, v, scale, attn_mask, is_causal, host, bias, fused)
    return out


def _as_key_padding(m: torch.Tensor, batch: int) -> Optional[tuple[torch.Tensor, bool]]:
    """A 4-D bool (B | 1, 1, N, M) mask that is (B, M) key padding for every query, as
    ``(padding, False)``, or causal (bottom-right) ∧ key padding, as ``(padding, True)``; None
    for any other mask (per head, per query otherwise). Reads its values: the CPU backends then
    run the (B, M) routes (the extension's fused kernel), with the same numbers, rows without keys
    included (0 in both forms)."""
    if m.shape[1] != 1:
        return None
    N, M = m.shape[2], m.shape[3]
    rows = m[:, 0]
    pad = rows[:, -1, :]  # the last query sees every key that is not padding, in both forms
    if bool((rows == pad[:, None, :]).all()):
        return pad.expand(batch, M), False
    if N <= M and torch.equal(rows, causal_keep(N, M, m.device) & pad[:, None, :]):
        return pad.expand(batch, M), True
    return None


def _sdpa_full_mask(q, k, v, scale, attn_mask, is_causal, host: bool, bias=None) -> torch.Tensor:
    """:func:`sdpa_attention` with a 4-D bool mask: keys no query attends zeroed
    (:func:`padding_of`), the mask (with the causal one and the bias) handed to SDPA, and query
    rows without a key made to attend every key inside SDPA, so that neither its forward nor its
    backward meets an all-masked row, then set to 0. Where values can be read (``host``: CPUs
    outside transforms and compile) k and v are zeroed only when their sums are not finite and the
    rows without keys are handled only when there are any (reading costs a pass over k and v; the
    copies it saves cost several)."""
    N, M = q.shape[2], k.shape[2]
    if not host or not math.isfinite(float(k.detach().sum(dtype=torch.float32))
                                     + float(v.detach().sum(dtype=torch.float32))):
        k, v = _drop_masked(k, v, padding_of(attn_mask, q.shape[0]))
    mask = attn_mask
    if is_causal:
        mask = mask & causal_keep(N, M, q.device)
    empty = ~mask.any(-1, keepdim=True)
    if host and not bool(empty.any()):
        empty = None
    else:
        mask = mask | empty
    if bias is not None:
        mask = sdpa_mask_plus(mask, tile_bias(bias, q.shape[0]).to(q.dtype))
    Dv = v.shape[-1]
    q, k, v = pad_for_cpu_flash(q, k, v)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[..., :Dv]
    return out if empty is None else out.masked_fill(empty, 0.0)


def _needs_grad(*ts: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def sdpa_mask_and(attn_mask: Optional[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """An SDPA mask (None, bool True = attend, or additive float) restricted to the bool ``keep``."""
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.masked_fill(~keep, float("-inf"))


def sdpa_mask_plus(attn_mask: Optional[torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
    """An SDPA mask (None, bool True = attend, or additive float) with an additive ``bias`` added."""
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        return bias.masked_fill(~attn_mask, float("-inf"))
    return bias + attn_mask


def _torch_attention(q, k, v, scale, attn_mask, is_causal, host: bool, bias=None, fused=None) -> torch.Tensor:
    if use_cpu_chunked(q, k, v, attn_mask, bias, fused is not None):
        return cpu_chunked_attention(q, k, v, scale, attn_mask, is_causal, bias, fused)
    N, M = q.shape[2], k.shape[2]
    # rows with no key (on CPUs read back, so None when there are none; elsewhere whenever the mask
    # could leave some): they attend every key inside SDPA, so that neither its forward nor its
    # backward meets an all-masked row, and are zeroed after
    empty = _rows_without_keys(attn_mask, is_causal, N, M, read=host)
    mask = None if attn_mask is None else attn_mask[:, None, None, :]
    # SDPA aligns is_causal top-left and takes no mask with it
    if is_causal and (N != M or mask is not None or bias is not None):
        mask = sdpa_mask_and(mask, causal_keep(N, M, q.device))
        is_causal = False
    if empty is not None:
        empty = empty.to(q.device)[:, None, :, None]
        if host or mask.shape[2] != 1:  # not where it would widen a broadcast key-padding mask unread
            mask = mask | empty
    if bias is not None:
        mask = sdpa_mask_plus(mask, tile_bias(bias, q.shape[0]).to(q.dtype))
    Dv = v.shape[-1]
    q, k, v = pad_for_cpu_flash(q, k, v)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)[..., :Dv]
    return out if empty is None else out.masked_fill(empty, 0.0)
