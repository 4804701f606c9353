"""Drop-in fused layers. They call the ``spp_kernels`` dispatcher only.

A layer is either *masked* (full width, its masks are views into a :class:`MaskArena`) or
*pruned* (narrow width, mask values folded into the weights, no arena). The attention scale is
fixed at construction to the original ``1/sqrt(head_dim)`` and never changes with the width.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import spp_kernels

from .arena import MaskArena


class MaskSlot:
    """Where a layer finds its mask: pair ``name`` of ``arena`` (kept outside the module tree so
    that state dicts never hold the arena)."""

    def __init__(self, arena: MaskArena, name: str):
        self.arena = arena
        self.name = name

    @property
    def enabled(self) -> bool:
        return self.arena.enabled

    def mask(self) -> torch.Tensor:
        return self.arena.view(self.name)

    def active(self) -> Optional[torch.Tensor]:
        return self.arena.active[self.name]


def run_linear(lin: nn.Module, x: torch.Tensor, act: Optional[str] = None,
               residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(lin(x)) + residual`` through ``spp_kernels.linear`` (the fastest GEMM for an unmasked
    product: oneDNN for fp32 on x86 CPUs, the residual in its epilogue) when ``lin`` is a plain
    ``nn.Linear`` with no hooks; any other module (a LoRA wrapper, a quantised linear, one with
    hooks) is called as it is."""
    if type(lin) is nn.Linear and not (lin._forward_hooks or lin._forward_pre_hooks or _global_hooks()):
        return spp_kernels.linear(x, lin.weight, lin.bias, act, residual)
    y = lin(x)
    y = y if act is None else spp_kernels.reference.activation(act)(y)
    return y if residual is None else y + residual


def _global_hooks() -> bool:
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


def _output(adds_input: bool, lin: nn.Module, h: torch.Tensor, x: torch.Tensor, drop: nn.Dropout) -> torch.Tensor:
    """``drop(lin(h))``, plus ``x`` when ``adds_input`` (in the GEMM's epilogue where dropout is off)."""
    if not adds_input:
        return drop(run_linear(lin, h))
    if drop.training and drop.p > 0:
        return drop(run_linear(lin, h)) + x
    return run_linear(lin, h, residual=x)


def fuse_residual(attn: "MaskedAttention", mlp: "MaskedMlp", attn_drop: float, mlp_drop: float) -> None:
    """Make a pruned block's pairs add their own input to their output (``adds_input``), with the
    dropout that the block applied before its residual add, for a post-norm block (BERT) whose
    ``LayerNorm(dropout(pair(x)) + x)`` then becomes ``LayerNorm(pair(x))``: the add rides in
    the second GEMM's epilogue instead of costing a pass over the activations."""
    attn.adds_input, mlp.adds_input = True, True
    attn.out_drop = nn.Dropout(attn_drop).train(attn.training)  # a new module starts in training mode
    mlp.drop = nn.Dropout(mlp_drop).train(mlp.training)


def _head_col2unit(heads: int, width: int, device=None) -> torch.Tensor:
    # channel h*width + j of a projection belongs to the shared unit j
    return torch.arange(width, device=device).repeat(heads)


class MaskedAttention(nn.Module):
    """Multi-head self-attention with a qk mask on the query channels and a vo mask on the value
    channels (one unit per head-dimension channel, shared by all heads).

    q: Linear(d, H*qk_dim); k: Linear(d, H*qk_dim); v: Linear(d, H*v_dim); o: Linear(H*v_dim, d_out).
    ``forward_core(x (B, N, d), attn_mask, is_causal) -> (B, N, d_out)``.

    ``adds_input`` (False unless an adapter sets it, see :func:`fuse_residual`): also add the
    input x to the output — the block's residual connection, taken into W_o's GEMM.
    """

    adds_input = False

    def __init__(
        self,
        q: nn.Linear,
        k: nn.Linear,
        v: nn.Linear,
        o: nn.Linear,
        num_heads: int,
        qk_dim: int,
        v_dim: int,
        scale: float,
        attn_drop: float = 0.0,
        out_drop: float = 0.0,
        qk_slot: Optional[MaskSlot] = None,
        vo_slot: Optional[MaskSlot] = None,
    ):
        super().__init__()
        if q.out_features != num_heads * qk_dim or k.out_features != num_heads * qk_dim:
            raise ValueError("q/k widths do not match num_heads * qk_dim")
        if v.out_features != num_heads * v_dim or o.in_features != num_heads * v_dim:
            raise ValueError("v/o widths do not match num_heads * v_dim")
        self.q, self.k, self.v, self.o = q, k, v, o
        self.num_heads, self.qk_dim, self.v_dim = num_heads, qk_dim, v_dim
        self.scale = float(scale)
        self.attn_drop = attn_drop
        self.out_drop = nn.Dropout(out_drop)
        self.qk_slot, self.vo_slot = qk_slot, vo_slot
        self.register_buffer("qk_col2unit", _head_col2unit(num_heads, qk_dim), persistent=False)
        self.register_buffer("v_col2unit", _head_col2unit(num_heads, v_dim), persistent=False)

    def _proj(self, lin: nn.Linear, x: torch.Tensor, slot: Optional[MaskSlot], col2unit: torch.Tensor) -> torch.Tensor:
        if slot is None or not slot.enabled:
            return spp_kernels.linear(x, lin.weight, lin.bias)
        return spp_kernels.masked_linear(x, lin.weight, lin.bias, slot.mask(), col2unit, None)

    def forward_core(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``bias``: an additive score bias (Bb, 1 | H, N, N), batch row b adding bias[b % Bb]
        (see ``spp_kernels.attention``), on top of ``attn_mask`` / ``is_causal``."""
        B, N, _ = x.shape
        H = self.num_heads
        q = self._proj(self.q, x, self.qk_slot, self.qk_col2unit).view(B, N, H, self.qk_dim).transpose(1, 2)
        k = spp_kernels.linear(x, self.k.weight, self.k.bias).view(B, N, H, self.qk_dim).transpose(1, 2)
        v = self._proj(self.v, x, self.vo_slot, self.v_col2unit).view(B, N, H, self.v_dim).transpose(1, 2)
        ctx = self._attend(q, k, v, attn_mask, is_causal, bias)
        ctx = ctx.transpose(1, 2).reshape(B, N, H * self.v_dim)
        return _output(self.adds_input, self.o, ctx, x, self.out_drop)

    def _attend(self, q, k, v, attn_mask, is_causal, bias=None):
        return attention_core(q, k, v, attn_mask, is_causal, bias, self.scale,
                              self.attn_drop if self.training else 0.0)

    def extra_repr(self) -> str:
        state = "masked" if self.qk_slot is not None else "pruned"
        return (f"heads={self.num_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, scale={self.scale:.6g}, {state}"
                + (", adds its input" if self.adds_input else ""))


def traced() -> bool:
    """Under torch.compile, torch.export and torch.jit tracing. The layers then read no tensor
    value on the host: a read would break the compiled graph, fail export, or be baked into a
    trace as a constant (a trace made on an unpadded batch would then ignore every later mask)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def attention_core(q, k, v, attn_mask, is_causal: bool, bias: Optional[torch.Tensor], scale: float,
                   drop: float = 0.0, opaque: bool = True) -> torch.Tensor:
    """The attention core of :class:`MaskedAttention`, (B, H, N, Dv). Without dropout, with no mask,
    a key-padding one or (where the op is the Triton kernel) any other bool mask (:func:`full_mask`),
    and with or without an additive ``bias`` it is the dispatcher's ``attention`` op (any qk / v
    widths); other masks and attention dropout go to SDPA (the bias tiled into its mask), with CPU
    widths padded for its flash kernel.

    Under torch.compile, CPU fp32 inference calls this function whole as one opaque op
    (``spp_layers::attention``), so the compiled model keeps the extension's attention kernel and
    reads its masks as eager code does; every other compiled or exported call (gradients, other
    devices and dtypes, torch.export) traces through it reading no value (:func:`traced`): bool
    masks as they are, additive ones to SDPA. ``opaque=False``: never the op (its own body; the
    compile flag is process-wide, so an eager call may see it set while another thread compiles)."""
    if opaque and drop == 0.0 and _opaque_attention(q, k, v, attn_mask, bias):
        B, H, N, _ = q.shape
        out = torch.ops.spp_layers.attention(q, k, v, attn_mask, bias, float(scale), bool(is_causal))
        return out.view(B, N, H, v.shape[-1]).transpose(1, 2)
    if drop == 0.0:
        keys = key_padding(attn_mask, q.shape[0], k.shape[2], q.device, queries=q.shape[2])
        if keys is False:
            keys = full_mask(attn_mask, *q.shape[:3], k.shape[2], q.device)
            keys = False if keys is None else keys
        if keys is not False:
            return spp_kernels.attention(q, k, v, scale, keys, is_causal, bias=bias)
    if is_causal and (attn_mask is not None or bias is not None):  # SDPA takes no mask with is_causal
        attn_mask = spp_kernels.reference.sdpa_mask_and(
            attn_mask, spp_kernels.reference.causal_keep(q.shape[2], k.shape[2], q.device))
        is_causal = False
    if bias is not None:
        attn_mask = spp_kernels.reference.sdpa_mask_plus(
            attn_mask, spp_kernels.reference.tile_bias(bias, q.shape[0]).to(q.dtype))
    Dv = v.shape[-1]
    q, k, v = spp_kernels.reference.pad_for_cpu_flash(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, is_causal=is_causal,
                                          scale=scale)[..., :Dv]


def _opaque_attention(q, k, v, attn_mask, bias) -> bool:
    """Whether :func:`attention_core` runs as the opaque ``spp_layers::attention`` op: under
    torch.compile (not export: an exported program keeps to ATen ops), fp32 CPU tensors, no
    gradient needed (the op has no backward)."""
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if q.device.type != "cpu" or any(t.dtype != torch.float32 for t in (q, k, v)):
        return False
    return not spp_kernels.reference._needs_grad(q, k, v, attn_mask, bias)


@torch.library.custom_op("spp_layers::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], scale: float, is_causal: bool) -> torch.Tensor:
    """:func:`attention_core` without dropout, run eagerly, as (B, N, H·Dv)."""
    B, H, N, _ = q.shape
    out = attention_core(q, k, v, attn_mask, is_causal, bias, scale, opaque=False)
    return out.transpose(1, 2).reshape(B, N, H * v.shape[-1])


@_attention_op.register_fake
def _(q, k, v, attn_mask, bias, scale, is_causal):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1] * v.shape[-1]))


def one_mask(attn_mask):
    """The attention mask a model hands every layer, as one buffer under torch.compile.

    A model-level hook calls it once per forward (the BERT adapter's encoder hook). In fp32 CPU
    inference every layer's attention core is an opaque op (:func:`attention_core`), and Inductor
    computes a mask that is cheap to recompute (Hugging Face's padding mask) into a separate
    buffer for each such consumer — at MiniLM's batch 64, 6 × 1 MiB and ~13 ms a forward — and
    each layer then reads its own copy. Passed through ``spp_layers::one_mask`` (a copy), the
    mask is built once and every layer gets the same tensor. Elsewhere (eager, export, gradients,
    other devices) it is returned as it is."""
    if (not torch.compiler.is_compiling() or torch.compiler.is_exporting() or not isinstance(attn_mask, torch.Tensor)
            or attn_mask.device.type != "cpu" or torch.is_grad_enabled()):
        return attn_mask
    return torch.ops.spp_layers.one_mask(attn_mask)


def mark_forwards(model: nn.Module) -> None:
    """Hook a pruned model's forward with ``spp_kernels.reference.enter_forward`` /
    ``exit_forward`` (once): within each forward, what the layers and kernels derive from an
    inference-tensor mask (key padding read on CPUs, the Triton kernel's mask arguments on GPUs)
    is made once, not in every layer, also under ``torch.inference_mode``."""
    ref = spp_kernels.reference
    if ref.enter_forward not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(ref.enter_forward)
    if ref.exit_forward not in model._forward_hooks.values():
        model.register_forward_hook(ref.exit_forward, always_call=True)


@torch.library.custom_op("spp_layers::one_mask", mutates_args=())
def _one_mask_op(mask: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``mask`` (see :func:`one_mask`)."""
    return mask.clone(memory_format=torch.contiguous_format)


@_one_mask_op.register_fake
def _(mask):
    return mask.new_empty(mask.shape)


def hf_attention(module: nn.Module, config, default_fn, q, k, v, attention_mask, **kwargs):
    """Call the Hugging Face attention function that ``config._attn_implementation`` names
    (``default_fn``, the family's eager one, when none is set) on pruned widths: q, k (B, H, N, D)
    and v (B, H_kv, M, Dv) with D != Dv allowed. "sdpa" runs as ``spp_kernels.attention`` (the
    pruned-attention op of every adapter: the chunked CPU route, the Triton kernel on CUDA) wherever
    that computes the same function (:func:`_spp_attention`); elsewhere, and for the other
    implementations, Hugging Face's function runs, for "sdpa" on CPUs with the widths zero-padded
    for SDPA's flash kernel (exact: zero channels change neither q·kᵀ nor the kept outputs) and the
    output sliced back. Returns (out (B, N, H, Dv), attention weights or None)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl == "sdpa":
        out = _spp_attention(module, q, k, v, attention_mask, kwargs)
        if out is not None:
            return out, None
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(impl, default_fn)
    Dv = v.shape[-1]
    if impl == "sdpa":
        if kwargs.get("scaling") is None:  # SDPA's default scale would follow the padded width
            kwargs["scaling"] = q.shape[-1] ** -0.5
        q, k, v = spp_kernels.reference.pad_for_cpu_flash(q, k, v)
    out, weights = fn(module, q, k, v, attention_mask, **kwargs)
    return (out[..., :Dv] if out.shape[-1] != Dv else out), weights


def _spp_attention(module, q, k, v, attention_mask, kwargs) -> Optional[torch.Tensor]:
    """Hugging Face's "sdpa" attention function, computed by ``spp_kernels.attention`` (any qk / v
    widths: the chunked CPU route, the Triton kernel on CUDA) where that is exact: no dropout,
    softcap, position bias or sliding window, and no mask, one that :func:`key_padding` reads as
    key padding, (on CPU) one that :func:`causal_key_padding` reads as causal ∧ key padding, or,
    where the op is the Triton kernel (CUDA), any other bool mask, which it takes whole and reads
    per tile (:func:`full_mask`; no mask value is read on CUDA, so Hugging Face's materialised
    padded and causal masks arrive there so).
    The same semantics as that function: causal only without a mask and for more than one query
    (``is_causal`` from the call, else the module's, default true) over as many keys as queries,
    GQA by repeating the kv heads. Returns (B, N, H, Dv), or None where Hugging Face's own
    function must run."""
    if kwargs.get("dropout", 0.0) or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None \
            or kwargs.get("sliding_window") is not None:
        return None
    B, H, N, _ = q.shape
    G, M = k.shape[1], k.shape[2]
    if G != H:
        if G == 0 or H % G:
            return None
        k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    keys = None
    if attention_mask is None:
        causal = causal and N > 1
        if causal and M != N:  # the function aligns a causal call without a mask top-left
            return None
    else:  # a mask: SDPA applies it alone, so the op is causal only where the mask itself is
        keys = key_padding(attention_mask, B, M, q.device, queries=N)
        causal = False
        if keys is False:
            keys = causal_key_padding(attention_mask, B, N, M, q.device)
            if keys is False:
                keys = full_mask(attention_mask, B, H, N, M, q.device)
                if keys is None:
                    return None
            else:
                causal = True
    scale = kwargs.get("scaling")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return spp_kernels.attention(q, k, v, scale, keys, causal).transpose(1, 2)


def full_mask(attn_mask: torch.Tensor, batch: int, heads: int, queries: int, keys: int,
              device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """An SDPA bool mask (True = attend) that broadcasts to (B, H, N, M), as the 4-D
    (B | 1, H | 1, N, M) mask ``spp_kernels.attention`` takes whole, where the op's backend for
    ``device`` is the Triton kernel (CUDA; on CPU only when forced), which reads it per tile with
    no value read on the host; None elsewhere (on CPUs the layers read masks as key padding
    themselves, and where they read none — compile, export — the CPU backends could only run SDPA
    on the whole mask, with more copies than SDPA alone), for additive float masks, masks that
    require grad, live on another device or do not broadcast so. SDPA aligns a mask's dims from
    the right, so a 2-D mask is (N, M) and a 3-D one (H | 1, N, M). A bool mask in which a query
    sees no key gives that row 0, as SDPA does since torch 2.5 (with an older torch, whose SDPA
    gives NaN there, None). A 4-D mask comes back as itself, a 2-D / 3-D one as a 4-D view
    remembered per mask, so that the kernel's per-mask arguments are made once per forward."""
    m = attn_mask
    if m.dtype != torch.bool or m.requires_grad or m.dim() not in (2, 3, 4) or not _SDPA_ZEROES_ROWS_WITHOUT_KEYS \
            or (device is not None and m.device != torch.device(device)):
        return None
    if spp_kernels.dispatch.choose("attention", m.device.type)[0] != "triton":
        return None
    shape = (1,) * (4 - m.dim()) + tuple(m.shape)
    if shape[0] not in (1, batch) or shape[1] not in (1, heads) or shape[2:] != (queries, keys):
        return None
    if m.dim() == 4:  # the mask itself: the kernel's per-mask memo keeps hitting, layer after layer
        return m
    return spp_kernels.reference.remembered(m, ("full_mask", shape), lambda: m.reshape(shape))


# torch 2.5 made SDPA give 0 (not NaN) for query rows whose bool mask admits no key, as the op does
_SDPA_ZEROES_ROWS_WITHOUT_KEYS = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def key_padding(attn_mask: Optional[torch.Tensor], batch: int, keys: int, device: Optional[torch.device] = None,
                queries: Optional[int] = None):
    """:func:`_key_padding`, remembered per mask (``spp_kernels.reference.remembered``): every
    layer of a forward gets the same mask tensor, so it is read once per forward, not once per
    layer (the tensor's identity and version counter guard the reuse; an inference tensor has no
    version counter, so it is read every time)."""
    if attn_mask is None:
        return None
    if traced():
        return _key_padding(attn_mask, batch, keys, device, queries, reads=False)
    return spp_kernels.reference.remembered(attn_mask, ("key_padding", batch, keys, device, queries,
                                                        attn_mask.requires_grad),
                                            lambda: _key_padding(attn_mask, batch, keys, device, queries))


def causal_key_padding(attn_mask: torch.Tensor, batch: int, queries: int, keys: int,
                       device: Optional[torch.device] = None):
    """A (B|1, 1, N, M) CPU mask (bool, or additive with 0 / "minus infinity" as Hugging Face
    builds them) that is exactly causal (tril(M − N)) ∧ key padding, as the (B, M) key-padding
    mask to give the op with ``is_causal`` (None when it pads nothing: a pure causal mask, as
    CLIP's text tower builds); False for any other mask, on other devices (not read), for an
    additive mask in which a query sees no key (left padding: SDPA averages such a row over all
    keys, since "minus infinity" is finite there; the op gives 0), or when the attention runs on
    another ``device``. Left padding in a bool mask — what Hugging Face builds for "sdpa" — is
    read: SDPA gives those rows 0 as the op does (forward and gradients; since torch 2.5, whose
    SDPA zeroes rows without a key — with an older torch such masks stay with the model's
    function). Remembered per mask, like :func:`key_padding`."""
    if traced() or (device is not None and torch.device(device) != attn_mask.device):
        return False
    return spp_kernels.reference.remembered(attn_mask, ("causal_key_padding", batch, queries, keys,
                                                        attn_mask.requires_grad),
                                            lambda: _causal_key_padding(attn_mask, batch, queries, keys))


def _causal_key_padding(m: torch.Tensor, batch: int, queries: int, keys: int):
    if (m.device.type != "cpu" or m.requires_grad or m.dim() != 4 or m.shape[1] != 1 or queries == 0
            or tuple(m.shape[2:]) != (queries, keys) or queries > keys or m.shape[0] not in (1, batch)):
        return False
    keep = _keep_of(m)
    if keep is None:
        return False
    keep = keep[:, 0]
    pad = keep[:, -1, :]  # the last query sees every key that is not padding
    if not torch.equal(keep, spp_kernels.reference.causal_keep(queries, keys) & pad[:, None, :]):
        return False
    if (m.dtype != torch.bool or not _SDPA_ZEROES_ROWS_WITHOUT_KEYS) \
            and spp_kernels.reference._no_key_rows(pad, True, queries, keys):
        return False
    return None if bool(pad.all()) else pad.expand(batch, keys)


def _keep_of(m: torch.Tensor) -> Optional[torch.Tensor]:
    """The bool keep-mask (True = attend) of a bool mask (itself) or of an additive float mask whose
    entries are all 0 or "minus infinity" (≤ half the dtype's lowest value, as Hugging Face builds
    them); None for any other mask. Reads the values of a float mask."""
    if m.dtype == torch.bool:
        return m
    if not m.is_floating_point():
        return None
    low = m <= torch.finfo(m.dtype).min / 2
    return ~low if bool(((m == 0) | low).all()) else None


def _key_padding(attn_mask: Optional[torch.Tensor], batch: int, keys: int, device: Optional[torch.device] = None,
                 queries: Optional[int] = None, reads: bool = True):
    """An SDPA-style mask as the (B, M) bool key-padding mask of ``spp_kernels.attention``, or
    False where it is not one (the caller then keeps it for SDPA, with SDPA's exact semantics).

    Read as key padding: None (returned as None); a (B|1, 1, 1, M) mask, or a (B|1, 1, N, M) one
    (N = ``queries`` when given; another row count is left to SDPA, which refuses it) whose query
    rows are all equal (broadcast with stride 0, or, on CPU, checked); a 2-D / 3-D
    mask whose leading dims are 1 (SDPA aligns masks from the right, so a (N, M) or (X, 1, M)
    mask is per query or per head, never per batch row). Bool masks as they are; additive float
    masks only on CPU (reading values on an accelerator would synchronise) and only when every
    entry is 0 or "minus infinity" (≤ half the dtype's lowest value, as Hugging Face builds them)
    and no batch row masks every key (SDPA averages over all keys there, the op would give 0).
    A mask that requires grad or lives on another device than ``device`` is left to SDPA.
    On CPU a mask that masks nothing gives None. ``reads=False`` (under torch.compile / export and
    tracing, see :func:`traced`): no value is read, on any device, as on an accelerator."""
    if attn_mask is None:
        return None
    m = attn_mask
    if m.requires_grad or (device is not None and m.device != torch.device(device)):
        return False
    on_cpu = reads and m.device.type == "cpu"  # (values are read on CPUs only)
    if m.dim() == 4:
        if m.shape[1] != 1 or (queries is not None and m.shape[2] not in (1, queries)):
            return False
        if m.shape[2] != 1:
            if m.stride(2) != 0 and not (on_cpu and bool((m == m[:, :, :1]).all())):
                return False
            m = m[:, :, :1]
        m = m[:, 0, 0, :]
    elif m.dim() in (2, 3):
        if any(d != 1 for d in m.shape[:-1]):
            return False
        m = m.reshape(1, m.shape[-1])
    else:
        return False
    if m.shape[-1] != keys or m.shape[0] not in (1, batch):
        return False
    if m.dtype != torch.bool and not on_cpu:
        return False
    keep = _keep_of(m)
    if keep is None or (m.dtype != torch.bool and bool((~keep).all(-1).any())):
        return False
    if on_cpu and bool(keep.all()):
        return None
    return keep.expand(batch, keys)


class MaskedMlp(nn.Module):
    """The MLP pair ``fc2(act(fc1(x)) ⊙ m)`` as one ``pair_matmul``; pruned when ``slot`` is None."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear, act: str, slot: Optional[MaskSlot] = None, drop: float = 0.0):
        super().__init__()
        spp_kernels.reference.activation(act)  # validates the name
        self.fc1, self.fc2, self.act = fc1, fc2, act
        self.slot = slot
        self.drop = nn.Dropout(drop)

    adds_input = False  # see MaskedAttention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slot is None or not self.slot.enabled:
            return _output(self.adds_input, self.fc2, run_linear(self.fc1, x, self.act), x, self.drop)
        y = self.drop(spp_kernels.pair_matmul(
            x, self.fc1.weight, self.fc1.bias, self.slot.mask(), self.fc2.weight, self.fc2.bias,
            self.act, self.slot.active(),
        ))
        return y + x if self.adds_input else y

    def extra_repr(self) -> str:
        return (f"act={self.act}, hidden={self.fc1.out_features}, {'masked' if self.slot is not None else 'pruned'}"
                + (", adds its input" if self.adds_input else ""))


class GatedMaskedMlp(MaskedMlp):
    """The gated (SwiGLU) MLP pair ``down((act(gate(x)) ⊙ m) · up(x))``; unit j masks the product
    act(gate_j(x))·up_j(x). ``fc1`` is the gate, ``fc2`` the down projection; pruned when ``slot`` is None."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act: str, slot: Optional[MaskSlot] = None,
                 drop: float = 0.0):
        super().__init__(gate, down, act, slot, drop)
        if up.weight.shape != gate.weight.shape:
            raise ValueError(f"up {tuple(up.weight.shape)} and gate {tuple(gate.weight.shape)} shapes differ")
        self.up = up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slot is None or not self.slot.enabled:
            h = run_linear(self.fc1, x, self.act)
        else:  # the mask rides in the gate GEMM's epilogue
            h = spp_kernels.masked_linear(x, self.fc1.weight, self.fc1.bias, self.slot.mask(), None, self.act)
        return _output(self.adds_input, self.fc2, h * run_linear(self.up, x), x, self.drop)


class MaskedLinear(nn.Module):
    """Drop-in ``nn.Linear`` whose output columns are masked: ``act(x Wᵀ + b) ⊙ m[col2unit]``.

    ``linear``: the wrapped Linear (its parameters are used, not copied); ``col2unit``: (out,) int64
    mapping each output column to a mask unit, or None when there is one unit per column; the mask
    comes from ``slot``; without a slot (or with the arena disabled) it is ``spp_kernels.linear``.
    """

    def __init__(self, linear: nn.Linear, slot: Optional[MaskSlot] = None, col2unit: Optional[torch.Tensor] = None,
                 act: Optional[str] = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        if act is not None:
            spp_kernels.reference.activation(act)  # validates the name
        self.linear, self.slot, self.act = linear, slot, act
        if col2unit is not None:
            col2unit = torch.as_tensor(col2unit, dtype=torch.int64, device=linear.weight.device)
            if col2unit.shape != (linear.out_features,):
                raise ValueError(f"col2unit must have shape ({linear.out_features},), got {tuple(col2unit.shape)}")
        self.register_buffer("col2unit", col2unit, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slot is None or not self.slot.enabled:
            return spp_kernels.linear(x, self.linear.weight, self.linear.bias, self.act)
        return spp_kernels.masked_linear(x, self.linear.weight, self.linear.bias, self.slot.mask(), self.col2unit,
                                         self.act)

    def extra_repr(self) -> str:
        return f"act={self.act}, {'masked' if self.slot is not None else 'plain'}"


# ---------------------------------------------------------------------------------------------
# Folding: build the narrow (pruned) layers from a full-width one and a set of kept units.


def _narrow_linear(lin: nn.Linear, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None,
                   row_scale: Optional[torch.Tensor] = None, col_scale: Optional[torch.Tensor] = None) -> nn.Linear:
    W = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    if rows is not None:
        W = W.index_select(0, rows)
        b = b.index_select(0, rows) if b is not None else None
    if cols is not None:
        W = W.index_select(1, cols)
    if row_scale is not None:
        W = (W.float() * row_scale[:, None]).to(W.dtype)
        b = (b.float() * row_scale).to(b.dtype) if b is not None else None
    if col_scale is not None:
        W = (W.float() * col_scale[None, :]).to(W.dtype)
    out = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        out.weight.copy_(W)
        if b is not None:
            out.bias.copy_(b)
    out.weight.requires_grad_(lin.weight.requires_grad)
    if out.bias is not None:
        out.bias.requires_grad_(lin.bias.requires_grad)
    return out


def _head_rows(heads: int, width: int, kept: torch.Tensor) -> torch.Tensor:
    return (torch.arange(heads, device=kept.device)[:, None] * width + kept[None, :]).reshape(-1)


def prune_attention(attn: MaskedAttention, qk_kept: torch.Tensor, qk_values: torch.Tensor,
                    vo_kept: torch.Tensor, vo_values: torch.Tensor) -> MaskedAttention:
    """A narrow copy of ``attn`` keeping units ``*_kept`` (int64) with mask values ``*_values``
    (fp32) folded into W_q rows/bias (qk) and W_v rows/bias (vo). Scale is unchanged."""
    H = attn.num_heads
    qk_rows = _head_rows(H, attn.qk_dim, qk_kept)
    vo_rows = _head_rows(H, attn.v_dim, vo_kept)
    q = _narrow_linear(attn.q, rows=qk_rows, row_scale=qk_values.repeat(H))
    k = _narrow_linear(attn.k, rows=qk_rows)
    v = _narrow_linear(attn.v, rows=vo_rows, row_scale=vo_values.repeat(H))
    o = _narrow_linear(attn.o, cols=vo_rows)
    # subclasses only change forward's signature, so the same constructor serves them all
    new = type(attn)(q, k, v, o, H, int(qk_kept.numel()), int(vo_kept.numel()), attn.scale,
                     attn.attn_drop, attn.out_drop.p)
    new.train(attn.training)
    return new


def prune_mlp(mlp: MaskedMlp, kept: torch.Tensor, values: torch.Tensor) -> MaskedMlp:
    """A narrow copy of ``mlp`` keeping hidden units ``kept``; mask values folded into fc2 columns."""
    fc1 = _narrow_linear(mlp.fc1, rows=kept)
    fc2 = _narrow_linear(mlp.fc2, cols=kept, col_scale=values)
    if isinstance(mlp, GatedMaskedMlp):  # gate and up lose the same rows
        new = GatedMaskedMlp(fc1, _narrow_linear(mlp.up, rows=kept), fc2, mlp.act, None, mlp.drop.p)
    else:
        new = MaskedMlp(fc1, fc2, mlp.act, None, mlp.drop.p)
    new.train(mlp.training)
    return new
