"""Hugging Face Llama / Mistral style decoders: GQA, RoPE, SwiGLU MLP, KV cache.

Pairs per block (SPEC §1, §6):
- qk: one unit = the rotary channel pair (i, i + head_dim/2), shared by all H query and G key heads
  (head_dim/2 units). Pruning keeps the pair's rows in W_q/W_k *and its rotary frequency*: the
  pruned attention indexes cos/sin with the kept frequencies (``rope_idx``, a saved buffer).
- vo: one unit = one value channel shared by the G value heads and the H query heads' W_o columns.
- mlp: one unit = act(gate_j(x))·up_j(x); gate and up lose rows together, down loses the column.
The attention scale stays 1/sqrt(original head_dim).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

import spp_kernels

from ..arena import PairSpec
from ..layers import GatedMaskedMlp, MaskSlot, _narrow_linear, hf_attention, prune_mlp, run_linear
from .base import Adapter

_ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_CLASSES = ("LlamaModel", "LlamaForCausalLM", "MistralModel", "MistralForCausalLM")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RopeGqaAttention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and qk / vo masks (HF calling convention).

    q: Linear(d, H*qk_dim); k: Linear(d, G*qk_dim); v: Linear(d, G*v_dim); o: Linear(H*v_dim, d).
    qk_dim = 2 * (kept rotary pairs): channels [pairs' first halves, pairs' second halves] per head.
    ``rope_idx`` (int64, qk_dim/2): the original frequency index of each kept pair (persistent buffer,
    so a saved pruned model rebuilds its RoPE). ``rotary_half``: original head_dim/2.
    ``forward(hidden_states, position_embeddings=(cos, sin), attention_mask, cache)`` → (out, weights).
    """

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, num_heads: int, num_kv_heads: int,
                 qk_dim: int, v_dim: int, rotary_half: int, scale: float, config: Any, layer_idx: int,
                 rope_idx: Optional[torch.Tensor] = None, attn_drop: float = 0.0,
                 qk_slot: Optional[MaskSlot] = None, vo_slot: Optional[MaskSlot] = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if qk_dim % 2:
            raise ValueError(f"qk_dim must be even (rotary pairs), got {qk_dim}")
        if q.out_features != num_heads * qk_dim or k.out_features != num_kv_heads * qk_dim:
            raise ValueError("q/k widths do not match heads * qk_dim")
        if v.out_features != num_kv_heads * v_dim or o.in_features != num_heads * v_dim:
            raise ValueError("v/o widths do not match heads * v_dim")
        self.q, self.k, self.v, self.o = q, k, v, o
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.num_key_value_groups = num_heads // num_kv_heads  # read by HF attention functions
        self.qk_dim, self.v_dim, self.rotary_half = qk_dim, v_dim, rotary_half
        self.scale = float(scale)
        self.config, self.layer_idx = config, layer_idx
        self.is_causal = True
        self.attn_drop = attn_drop
        self.qk_slot, self.vo_slot = qk_slot, vo_slot
        if rope_idx is None:
            rope_idx = torch.arange(qk_dim // 2)
        self.register_buffer("rope_idx", rope_idx.to(torch.int64).to(q.weight.device).clone())
        pairs = qk_dim // 2
        self.register_buffer("qk_col2unit", (torch.arange(qk_dim) % pairs).repeat(num_heads).to(q.weight.device),
                             persistent=False)
        self.register_buffer("v_col2unit", torch.arange(v_dim).repeat(num_kv_heads).to(q.weight.device),
                             persistent=False)

    @property
    def units_qk(self) -> int:
        return self.qk_dim // 2

    def _proj(self, lin, x, slot, col2unit):
        if slot is None or not slot.enabled:
            return spp_kernels.linear(x, lin.weight, lin.bias)
        return spp_kernels.masked_linear(x, lin.weight, lin.bias, slot.mask(), col2unit, None)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        from transformers.models.llama.modeling_llama import eager_attention_forward

        cache = cache if cache is not None else past_key_values
        kwargs.pop("position_ids", None)
        kwargs.pop("use_cache", None)
        B, N, _ = hidden_states.shape
        x = hidden_states
        q = self._proj(self.q, x, self.qk_slot, self.qk_col2unit).view(B, N, self.num_heads, self.qk_dim).transpose(1, 2)
        k = spp_kernels.linear(x, self.k.weight, self.k.bias).view(B, N, self.num_kv_heads, self.qk_dim).transpose(1, 2)
        v = self._proj(self.v, x, self.vo_slot, self.v_col2unit).view(B, N, self.num_kv_heads, self.v_dim).transpose(1, 2)
        cos, sin = position_embeddings
        if self.qk_dim != 2 * self.rotary_half:
            cols = torch.cat((self.rope_idx, self.rope_idx + self.rotary_half))  # kept frequencies only
            cos, sin = cos.index_select(-1, cols), sin.index_select(-1, cols)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        sw = getattr(self.config, "sliding_window", None)
        extra = {"sliding_window": sw} if sw is not None else {}
        out, weights = hf_attention(self, self.config, eager_attention_forward, q, k, v, attention_mask,
                                    dropout=self.attn_drop if self.training else 0.0, scaling=self.scale, **extra,
                                    **kwargs)
        out = out.reshape(B, N, self.num_heads * self.v_dim).contiguous()
        return run_linear(self.o, out), weights

    def extra_repr(self) -> str:
        state = "masked" if self.qk_slot is not None else "pruned"
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, "
                f"scale={self.scale:.6g}, {state}")


def prune_rope_attention(attn: RopeGqaAttention, qk_kept: torch.Tensor, qk_values: torch.Tensor,
                         vo_kept: torch.Tensor, vo_values: torch.Tensor) -> RopeGqaAttention:
    """Narrow copy keeping rotary pairs ``qk_kept`` (indices into the current pairs) and value channels
    ``vo_kept``; mask values folded into W_q rows (both channels of a pair) and W_v rows."""
    H, G, P = attn.num_heads, attn.num_kv_heads, attn.units_qk
    order = torch.argsort(qk_kept)  # keep the pairs in frequency order
    qk_kept, qk_values = qk_kept[order], qk_values[order]
    vo_order = torch.argsort(vo_kept)
    vo_kept, vo_values = vo_kept[vo_order], vo_values[vo_order]
    chans = torch.cat((qk_kept, qk_kept + P))  # per head: first halves, then second halves
    ch_scale = qk_values.repeat(2)

    def rows(heads: int, width: int, kept: torch.Tensor) -> torch.Tensor:
        return (torch.arange(heads, device=kept.device)[:, None] * width + kept[None, :]).reshape(-1)

    q = _narrow_linear(attn.q, rows=rows(H, attn.qk_dim, chans), row_scale=ch_scale.repeat(H))
    k = _narrow_linear(attn.k, rows=rows(G, attn.qk_dim, chans))
    v = _narrow_linear(attn.v, rows=rows(G, attn.v_dim, vo_kept), row_scale=vo_values.repeat(G))
    o = _narrow_linear(attn.o, cols=rows(H, attn.v_dim, vo_kept))
    new = RopeGqaAttention(q, k, v, o, H, G, 2 * int(qk_kept.numel()), int(vo_kept.numel()), attn.rotary_half,
                           attn.scale, attn.config, attn.layer_idx, rope_idx=attn.rope_idx[qk_kept],
                           attn_drop=attn.attn_drop)
    new.train(attn.training)
    return new


def _base(model: nn.Module) -> nn.Module:
    return model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model


class LlamaAdapter(Adapter):
    family = "llama"
    description = "Hugging Face Llama / Mistral style decoders (LlamaModel, LlamaForCausalLM, Mistral*; GQA, RoPE, SwiGLU)"
    attn_attr = "self_attn"
    attn_type = RopeGqaAttention
    mlp_type = GatedMaskedMlp

    @classmethod
    def matches(cls, model):
        cfg = getattr(model, "config", None)
        return getattr(cfg, "model_type", None) in ("llama", "mistral")

    def __init__(self, model):
        self.act = _ACTS.get(getattr(model.config, "hidden_act", "silu"), "unsupported")

    def blocks(self, model):
        base = _base(model)
        if not hasattr(base, "layers"):
            raise ValueError("no Llama decoder layers found (expected model.layers or model.model.layers)")
        return list(base.layers)

    def check_supported(self, model):
        cfg = model.config
        if cfg.hidden_act not in _ACTS:
            raise ValueError(f"Llama adapter: hidden_act must be one of {sorted(_ACTS)}, got {cfg.hidden_act!r}")
        if getattr(cfg, "pretraining_tp", 1) not in (1, None):
            raise ValueError("Llama adapter: pretraining_tp > 1 is not supported")
        for i, block in enumerate(self.blocks(model)):
            if self.installed(block) is not None:
                continue
            a, m = block.self_attn, block.mlp
            if type(a).__name__ not in ("LlamaAttention", "MistralAttention"):
                raise ValueError(f"Llama adapter: layer {i} attention is {type(a).__name__}, expected LlamaAttention "
                                 "or MistralAttention")
            if a.head_dim % 2:
                raise ValueError(f"Llama adapter: head_dim must be even for RoPE pairs, got {a.head_dim}")
            if not all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")):
                raise ValueError(f"Llama adapter: layer {i} MLP is {type(m).__name__}, expected a gated MLP")

    def make_attention(self, block):
        a = block.self_attn
        hd = a.head_dim
        H, G = a.q_proj.out_features // hd, a.k_proj.out_features // hd
        return RopeGqaAttention(a.q_proj, a.k_proj, a.v_proj, a.o_proj, H, G, hd, hd, hd // 2, a.scaling, a.config,
                                a.layer_idx, attn_drop=float(a.attention_dropout))

    def make_mlp(self, block):
        m = block.mlp
        return GatedMaskedMlp(m.gate_proj, m.up_proj, m.down_proj, self.act)

    def block_specs(self, layer, attn, mlp, seq_len):
        """qk unit (a rotary pair): 2 rows in each of H query and G key heads; vo unit: G value rows and
        H W_o columns; mlp unit: a gate row, an up row (+ biases) and a down column."""
        H, G, d, d_out = attn.num_heads, attn.num_kv_heads, attn.q.in_features, attn.o.out_features
        qb = H * int(attn.q.bias is not None) + G * int(attn.k.bias is not None)
        qk = PairSpec(f"{self.block_name(layer)}.qk", "qk", layer, attn.units_qk, 2 * ((H + G) * d + qb),
                      2 * (2 * d * (H + G) + 2 * seq_len * H))
        vo = PairSpec(f"{self.block_name(layer)}.vo", "vo", layer, attn.v_dim, G * d + G * int(attn.v.bias is not None) + H * d_out,
                      2 * d * G + 2 * H * d_out + 2 * seq_len * H)
        d1, d2 = mlp.fc1.in_features, mlp.fc2.out_features
        mb = int(mlp.fc1.bias is not None) + int(mlp.up.bias is not None)
        ml = PairSpec(f"{self.block_name(layer)}.mlp", "mlp", layer, mlp.fc1.out_features, 2 * d1 + mb + d2, 4 * d1 + 2 * d2)
        return [qk, vo, ml]

    def block_widths(self, attn, mlp):
        return attn.units_qk, attn.v_dim, mlp.fc1.out_features

    def prune_parts(self, attn, mlp, qk, vo, ml):
        return prune_rope_attention(attn, qk[0], qk[1], vo[0], vo[1]), prune_mlp(mlp, ml[0], ml[1])

    def describe(self, model):
        return {"class": type(model).__name__, "config_class": type(model.config).__name__,
                "config": model.config.to_dict()}

    @classmethod
    def build(cls, desc):
        import transformers

        name, cname = desc["class"], desc.get("config_class", "LlamaConfig")
        if name not in _CLASSES or cname not in ("LlamaConfig", "MistralConfig"):
            raise ValueError(f"unknown Llama-style class {name!r} / {cname!r}; known: {list(_CLASSES)}")
        config = getattr(transformers, cname).from_dict(desc["config"])
        return getattr(transformers, name)(config)

    def default_seq_len(self, model):
        return 128

    def forward(self, model, batch: Any):
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise TypeError("Llama batches must be dicts with input_ids (and attention_mask), e.g. a tokenizer's output")
        base = _base(model)
        out = base(**batch, use_cache=False)
        return out.last_hidden_state, batch.get("attention_mask")
