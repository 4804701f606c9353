"""Hugging Face OPT decoders (OPTModel, OPTForCausalLM): biases everywhere, ReLU MLP, learned positions.

The block's fc1 becomes a :class:`MaskedMlp` holding fc1 and fc2 (``activation_fn`` and ``fc2`` become
Identity). OPT scales the queries before the attention product (scaling 1.0 inside); the masked and
pruned attention do the same, with the original 1/sqrt(head_dim).
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

import spp_kernels

from ..layers import MaskedAttention, MaskedMlp, hf_attention, prune_attention, prune_mlp, run_linear
from .base import Adapter

_ACTS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}
_CLASSES = ("OPTModel", "OPTForCausalLM")


class OptMaskedAttention(MaskedAttention):
    """MaskedAttention with OPTAttention's call signature and KV cache (``cache.update``)."""

    config = None  # set by the adapter: the HF config (attention implementation)
    layer_idx = None
    is_causal = True

    def forward(self, hidden_states, cache=None, attention_mask=None, output_attentions=False, past_key_values=None,
                **kwargs):
        from transformers.models.opt.modeling_opt import eager_attention_forward

        cache = cache if cache is not None else past_key_values
        B, N, _ = hidden_states.shape
        H = self.num_heads
        x = hidden_states
        q = (self._proj(self.q, x, self.qk_slot, self.qk_col2unit) * self.scale).view(B, N, H, self.qk_dim).transpose(1, 2)
        k = spp_kernels.linear(x, self.k.weight, self.k.bias).view(B, N, H, self.qk_dim).transpose(1, 2)
        v = self._proj(self.v, x, self.vo_slot, self.v_col2unit).view(B, N, H, self.v_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        out, weights = hf_attention(self, self.config, eager_attention_forward, q, k, v, attention_mask,
                                    dropout=self.attn_drop if self.training else 0.0, scaling=1.0, **kwargs)
        out = out.reshape(B, N, H * self.v_dim).contiguous()
        return self.out_drop(run_linear(self.o, out)), weights


def _decoder(model: nn.Module) -> nn.Module:
    if hasattr(model, "decoder") and hasattr(model.decoder, "layers"):
        return model.decoder
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "decoder"):
        return inner.decoder
    raise ValueError("no OPT decoder found (expected model.decoder.layers or model.model.decoder.layers)")


class OptAdapter(Adapter):
    family = "opt"
    description = "Hugging Face OPT (OPTModel, OPTForCausalLM)"

    @classmethod
    def matches(cls, model):
        return getattr(getattr(model, "config", None), "model_type", None) == "opt"

    def __init__(self, model):
        self.act = _ACTS.get(getattr(model.config, "activation_function", "relu"), "unsupported")

    def blocks(self, model):
        return list(_decoder(model).layers)

    def check_supported(self, model):
        act = model.config.activation_function
        if act not in _ACTS:
            raise ValueError(f"OPT adapter: activation_function must be one of {sorted(_ACTS)}, got {act!r}")
        for i, block in enumerate(self.blocks(model)):
            if self.installed(block) is None and type(block.self_attn).__name__ != "OPTAttention":
                raise ValueError(f"OPT adapter: layer {i} attention is {type(block.self_attn).__name__}, "
                                 "expected OPTAttention")

    def make_attention(self, block):
        a = block.self_attn
        attn = OptMaskedAttention(a.q_proj, a.k_proj, a.v_proj, a.out_proj, a.num_heads, a.head_dim, a.head_dim,
                                  a.scaling, attn_drop=float(a.dropout))
        attn.config, attn.layer_idx = a.config, a.layer_idx
        return attn

    def make_mlp(self, block):
        return MaskedMlp(block.fc1, block.fc2, self.act)

    def install(self, block, attn, mlp):
        saved = (block.self_attn, block.fc1, block.activation_fn, block.fc2)
        block.self_attn, block.fc1, block.activation_fn, block.fc2 = attn, mlp, nn.Identity(), nn.Identity()
        return saved

    def replace(self, block, attn, mlp):
        block.self_attn, block.fc1 = attn, mlp

    def uninstall(self, block, saved):
        block.self_attn, block.fc1, block.activation_fn, block.fc2 = saved

    def installed(self, block):
        a, m = block.self_attn, block.fc1
        return (a, m) if isinstance(a, MaskedAttention) and isinstance(m, MaskedMlp) else None

    def prune_parts(self, attn, mlp, qk, vo, ml):
        new = prune_attention(attn, qk[0], qk[1], vo[0], vo[1])
        new.config, new.layer_idx = attn.config, attn.layer_idx
        return new, prune_mlp(mlp, ml[0], ml[1])

    def describe(self, model):
        return {"class": type(model).__name__, "config": model.config.to_dict()}

    @classmethod
    def build(cls, desc):
        import transformers

        if desc["class"] not in _CLASSES:
            raise ValueError(f"unknown OPT class {desc['class']!r}; known: {list(_CLASSES)}")
        return getattr(transformers, desc["class"])(transformers.OPTConfig.from_dict(desc["config"]))

    def default_seq_len(self, model):
        return 128

    def forward(self, model, batch: Any):
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise TypeError("OPT batches must be dicts with input_ids (and attention_mask), e.g. a tokenizer's output")
        base = model.model if hasattr(model, "model") and hasattr(model.model, "decoder") else model
        out = base(**batch, use_cache=False)
        return out.last_hidden_state, batch.get("attention_mask")
