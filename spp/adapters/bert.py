"""Hugging Face BERT (BertModel, Bert* heads, and sentence-embedding models built on BertModel)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..layers import MaskedAttention, MaskedMlp, fuse_residual, one_mask
from .base import Adapter

_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}


class BertMaskedAttention(MaskedAttention):
    """MaskedAttention with BertSelfAttention's call signature; it also applies W_o (the block's
    ``attention.output.dense`` becomes an Identity), so BertSelfOutput only adds dropout + LayerNorm."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, cache=None, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("cross-attention is not supported by the BERT adapter")
        return self.forward_core(hidden_states, attention_mask), None


class NormOnly(nn.Module):
    """A pruned block's BertSelfOutput / BertOutput once its pair adds the residual itself
    (``adds_input``, in the second GEMM's epilogue, after the dropout this module had):
    ``LayerNorm(hidden_states)``. Same state-dict keys (``LayerNorm.*``) as the module it replaces."""

    def __init__(self, layer_norm: nn.LayerNorm):
        super().__init__()
        self.LayerNorm = layer_norm

    def forward(self, hidden_states, input_tensor=None):
        return self.LayerNorm(hidden_states)


def _one_mask_hook(encoder, args, kwargs):
    """A pruned BERT's encoder pre-hook: every layer gets one built attention mask under
    torch.compile (:func:`spp.layers.one_mask`); nothing changes elsewhere."""
    if not torch.compiler.is_compiling():
        return None
    if "attention_mask" in kwargs:
        return args, dict(kwargs, attention_mask=one_mask(kwargs["attention_mask"]))
    if len(args) > 1:
        return (args[0], one_mask(args[1]), *args[2:]), kwargs
    return None


def _encoder(model: nn.Module):
    if hasattr(model, "encoder") and hasattr(model.encoder, "layer"):
        return model.encoder
    inner = getattr(model, "bert", None)
    if inner is not None and hasattr(inner, "encoder"):
        return inner.encoder
    raise ValueError("no BERT encoder found (expected model.encoder.layer or model.bert.encoder.layer)")


class BertAdapter(Adapter):
    family = "bert"
    description = "Hugging Face BERT (transformers BertModel / Bert* heads, sentence-embedding BERT such as all-MiniLM-L6-v2)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        cfg = getattr(model, "config", None)
        return getattr(cfg, "model_type", None) == "bert"

    def __init__(self, model: nn.Module):
        self.act = _ACTS.get(getattr(model.config, "hidden_act", "gelu"), "unsupported")

    def blocks(self, model):
        return list(_encoder(model).layer)

    def check_supported(self, model):
        cfg = model.config
        if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
            raise ValueError("BERT adapter: decoder / cross-attention configurations are not supported")
        if getattr(cfg, "hidden_act", "gelu") not in _ACTS:
            raise ValueError(f"BERT adapter: hidden_act must be one of {sorted(_ACTS)}, got {cfg.hidden_act!r}")
        for i, block in enumerate(self.blocks(model)):
            if self.installed(block) is None and type(block.attention.self).__name__ != "BertSelfAttention":
                raise ValueError(f"BERT adapter: layer {i} attention is {type(block.attention.self).__name__}, "
                                 "expected BertSelfAttention")

    def make_attention(self, block):
        sa, o = block.attention.self, block.attention.output.dense
        H, hd = sa.num_attention_heads, sa.attention_head_size
        return BertMaskedAttention(sa.query, sa.key, sa.value, o, H, hd, hd, sa.scaling, attn_drop=sa.dropout.p)

    def make_mlp(self, block):
        return MaskedMlp(block.intermediate.dense, block.output.dense, self.act)

    def install(self, block, attn, mlp):
        saved = (block.attention.self, block.attention.output.dense, block.intermediate, block.output.dense)
        block.attention.self = attn
        block.attention.output.dense = nn.Identity()
        block.intermediate = mlp
        block.output.dense = nn.Identity()
        return saved

    def replace(self, block, attn, mlp):
        block.attention.self = attn
        block.intermediate = mlp

    def prune_(self, model, kept):
        super().prune_(model, kept)
        enc = _encoder(model)
        if _one_mask_hook not in enc._forward_pre_hooks.values():
            enc.register_forward_pre_hook(_one_mask_hook, with_kwargs=True)

    def finish_pruned(self, block, attn, mlp):
        """LayerNorm(dropout(pair(x)) + x) → the pair adds x (in its GEMM) and the block only normalises."""
        outs = (block.attention.output, block.output)
        if any(isinstance(o, NormOnly) for o in outs):  # a pruned model pruned again: already done
            fuse_residual(attn, mlp, attn.out_drop.p, mlp.drop.p)
            return
        if any(not isinstance(o.dense, nn.Identity) for o in outs):
            return  # not the layout install() leaves: keep the block's own residual adds
        fuse_residual(attn, mlp, block.attention.output.dropout.p, block.output.dropout.p)
        block.attention.output = NormOnly(block.attention.output.LayerNorm)
        block.output = NormOnly(block.output.LayerNorm)

    def uninstall(self, block, saved):
        block.attention.self, block.attention.output.dense, block.intermediate, block.output.dense = saved

    def installed(self, block):
        a, m = block.attention.self, block.intermediate
        return (a, m) if isinstance(a, MaskedAttention) and isinstance(m, MaskedMlp) else None

    def describe(self, model):
        desc = {"class": type(model).__name__, "config": model.config.to_dict()}
        if hasattr(model, "pooler"):
            desc["add_pooling_layer"] = model.pooler is not None
        return desc

    @classmethod
    def build(cls, desc):
        import transformers

        cls = getattr(transformers, desc["class"], None)
        if cls is None or not desc["class"].startswith("Bert"):
            raise ValueError(f"unknown BERT class {desc['class']!r}")
        config = transformers.BertConfig.from_dict(desc["config"])
        kwargs = {"add_pooling_layer": desc["add_pooling_layer"]} if "add_pooling_layer" in desc else {}
        return cls(config, **kwargs)

    def default_seq_len(self, model):
        return 128

    def forward(self, model, batch: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise TypeError("BERT batches must be dicts with input_ids (and attention_mask), e.g. a tokenizer's output")
        out = model(**batch)
        if getattr(out, "last_hidden_state", None) is not None:
            return out.last_hidden_state, batch.get("attention_mask")
        return out.logits, None
