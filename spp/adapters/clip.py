"""Hugging Face CLIP (CLIPModel): both towers, each block with its own pairs.

Pair names say the tower: ``vision.blocks.<i>.qk`` … and ``text.blocks.<i>.qk`` …; the projection
heads (and so the joint embedding space) are untouched. The text tower's causal mask reaches the
masked attention through HF's ``is_causal`` / ``attention_mask`` arguments, as in CLIPAttention.
CLIP's ``quick_gelu`` is not a kernel epilogue activation: that MLP applies it in torch and scales
by the mask afterwards (the same function; the gelu / relu / silu MLPs use ``pair_matmul``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

import spp_kernels

from ..layers import MaskedAttention, MaskedMlp, MaskSlot, _narrow_linear, hf_attention, prune_attention, run_linear
from .base import Adapter, pair_specs_of

_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu",
         "quick_gelu": "quick_gelu"}


def _quick_gelu(h: torch.Tensor) -> torch.Tensor:
    return h * torch.sigmoid(1.702 * h)


class ClipMaskedAttention(MaskedAttention):
    """MaskedAttention with CLIPAttention's call signature (HF attention functions, original scale)."""

    config = None  # set by the adapter
    is_causal = False

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        from transformers.models.clip.modeling_clip import eager_attention_forward

        B, N, _ = hidden_states.shape
        H, x = self.num_heads, hidden_states
        q = self._proj(self.q, x, self.qk_slot, self.qk_col2unit).view(B, N, H, self.qk_dim).transpose(1, 2)
        k = spp_kernels.linear(x, self.k.weight, self.k.bias).view(B, N, H, self.qk_dim).transpose(1, 2)
        v = self._proj(self.v, x, self.vo_slot, self.v_col2unit).view(B, N, H, self.v_dim).transpose(1, 2)
        out, weights = hf_attention(self, self.config, eager_attention_forward, q, k, v, attention_mask,
                                    scaling=self.scale, dropout=self.attn_drop if self.training else 0.0, **kwargs)
        return self.out_drop(run_linear(self.o, out.reshape(B, N, H * self.v_dim).contiguous())), weights


class ClipMaskedMlp(MaskedMlp):
    """MaskedMlp that also takes CLIP's ``quick_gelu`` (applied in torch, then scaled by the mask)."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear, act: str, slot: Optional[MaskSlot] = None, drop: float = 0.0):
        nn.Module.__init__(self)
        if act not in _ACTS.values():
            raise ValueError(f"act must be one of {sorted(set(_ACTS.values()))}, got {act!r}")
        self.fc1, self.fc2, self.act, self.slot = fc1, fc2, act, slot
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act != "quick_gelu":
            return super().forward(x)
        h = _quick_gelu(run_linear(self.fc1, x))
        if self.slot is not None and self.slot.enabled:
            h = h * self.slot.mask().to(h.dtype)
        return self.drop(run_linear(self.fc2, h))


def _find(module: nn.Module, attr: str) -> Optional[nn.Module]:
    """The transformer (with ``.encoder.layers``) of a tower, through CLIPModel's wrappers."""
    m = module
    for _ in range(3):
        if hasattr(m, "encoder") and hasattr(m.encoder, "layers"):
            return m
        m = getattr(m, attr, None)
        if m is None:
            return None
    return None


_CLASSES = ("CLIPModel",)


class ClipAdapter(Adapter):
    family = "clip"
    description = "Hugging Face CLIP (CLIPModel: vision and text towers, projections unchanged)"
    attn_attr = "self_attn"

    @classmethod
    def matches(cls, model):
        return getattr(getattr(model, "config", None), "model_type", None) == "clip"

    def __init__(self, model):
        # only numbers are kept: prune() runs this adapter on a deep copy of the model
        self.towers = []  # (name, attribute, number of layers, vision tokens or None)
        for name, attr in (("vision", "vision_model"), ("text", "text_model")):
            tr = self._tower(model, attr)
            if tr is not None:
                cfg = tr.config
                tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1 if name == "vision" else None
                self.towers.append((name, attr, len(tr.encoder.layers), tokens))
        self._starts, n = [], 0
        for t in self.towers:
            self._starts.append(n)
            n += t[2]

    @staticmethod
    def _tower(model, attr):
        sub = getattr(model, attr, None)
        return _find(sub, attr) if sub is not None else None

    def _tower_of(self, i: int) -> int:
        t = 0
        while t + 1 < len(self._starts) and i >= self._starts[t + 1]:
            t += 1
        return t

    def block_name(self, i):
        t = self._tower_of(i)
        return f"{self.towers[t][0]}.blocks.{i - self._starts[t]}"

    def blocks(self, model):
        return [b for _, attr, _, _ in self.towers for b in self._tower(model, attr).encoder.layers]

    def check_supported(self, model):
        if len(self.towers) != 2:
            raise ValueError("CLIP adapter: expected a CLIPModel with vision_model and text_model")
        for name, attr, _, _ in self.towers:
            tr = self._tower(model, attr)
            if tr.config.hidden_act not in _ACTS:
                raise ValueError(f"CLIP adapter: {name} hidden_act must be one of {sorted(_ACTS)}, "
                                 f"got {tr.config.hidden_act!r}")
            for i, block in enumerate(tr.encoder.layers):
                if self.installed(block) is None and type(block.self_attn).__name__ != "CLIPAttention":
                    raise ValueError(f"CLIP adapter: {name} layer {i} attention is {type(block.self_attn).__name__}")

    def _act_of(self, block):
        return _ACTS[block.self_attn.config.hidden_act]  # the tower's config (kept by the masked attention too)

    def make_attention(self, block):
        a = block.self_attn
        attn = ClipMaskedAttention(a.q_proj, a.k_proj, a.v_proj, a.out_proj, a.num_heads, a.head_dim, a.head_dim,
                                   a.scale, attn_drop=float(a.dropout))
        attn.config = a.config
        return attn

    def make_mlp(self, block):
        return ClipMaskedMlp(block.mlp.fc1, block.mlp.fc2, self._act_of(block))

    def block_specs(self, layer, attn, mlp, seq_len):
        # FLOPs per token use each tower's own token count (vision: patches + class token)
        tokens = self.towers[self._tower_of(layer)][3]
        seq_len = tokens if tokens is not None else seq_len
        return pair_specs_of(layer, attn, mlp, seq_len, self.block_name(layer))

    def prune_parts(self, attn, mlp, qk, vo, ml):
        new = prune_attention(attn, qk[0], qk[1], vo[0], vo[1])
        new.config = attn.config
        fc1 = _narrow_linear(mlp.fc1, rows=ml[0])
        fc2 = _narrow_linear(mlp.fc2, cols=ml[0], col_scale=ml[1])
        new_mlp = ClipMaskedMlp(fc1, fc2, mlp.act, None, mlp.drop.p)
        new_mlp.train(mlp.training)
        return new, new_mlp

    def describe(self, model):
        return {"class": type(model).__name__, "config": model.config.to_dict()}

    @classmethod
    def build(cls, desc):
        import transformers

        if desc["class"] not in _CLASSES:
            raise ValueError(f"unknown CLIP class {desc['class']!r}; known: {list(_CLASSES)}")
        return getattr(transformers, desc["class"])(transformers.CLIPConfig.from_dict(desc["config"]))

    def default_seq_len(self, model):
        return int(model.config.text_config.max_position_embeddings)

    def forward(self, model, batch: Any):
        """Distil both towers' projected embeddings, stacked: (B_image + B_text, projection_dim)."""
        if not isinstance(batch, dict) or "input_ids" not in batch or "pixel_values" not in batch:
            raise TypeError("CLIP batches must be dicts with input_ids, attention_mask and pixel_values")
        out = model(**batch)
        return torch.cat((out.image_embeds, out.text_embeds), 0), None
