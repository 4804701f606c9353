"""timm VisionTransformer and DeiT (including the distilled DeiT)."""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn as nn

from ..layers import MaskedAttention, MaskedMlp
from .base import Adapter


class TimmMaskedAttention(MaskedAttention):
    """MaskedAttention with timm Attention's call signature (projection included)."""

    def forward(self, x, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        return self.forward_core(x, attn_mask, is_causal)


def _act_name(act: nn.Module) -> str:
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    from timm.layers import activations as timm_acts  # timm's own classes (act_layer="gelu" etc.)

    if type(act) is getattr(timm_acts, "GELU", None):
        return "gelu"
    if type(act) is getattr(timm_acts, "GELUTanh", None):
        return "gelu_tanh"
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.SiLU):
        return "silu"
    raise ValueError(f"timm ViT adapter: unsupported MLP activation {type(act).__name__} (GELU, ReLU, SiLU are)")


def _vit_classes():
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    return {"VisionTransformer": VisionTransformer, "VisionTransformerDistilled": VisionTransformerDistilled}


class TimmViTAdapter(Adapter):
    family = "timm_vit"
    description = "timm VisionTransformer / DeiT (incl. distilled DeiT)"

    @classmethod
    def matches(cls, model):
        try:
            return isinstance(model, tuple(_vit_classes().values()))
        except ImportError:
            return False

    def blocks(self, model):
        return list(model.blocks)

    def check_supported(self, model):
        from timm.layers import Mlp
        from timm.layers.attention import Attention

        for i, block in enumerate(self.blocks(model)):
            if self.installed(block) is not None:
                continue
            a, m = block.attn, block.mlp
            if type(a) is not Attention:
                raise ValueError(f"timm ViT adapter: block {i} attention is {type(a).__name__}, expected timm Attention")
            if not (isinstance(a.q_norm, nn.Identity) and isinstance(a.k_norm, nn.Identity) and isinstance(a.norm, nn.Identity)) \
                    or getattr(a, "gate", None) is not None:
                raise ValueError(f"timm ViT adapter: block {i} uses qk-norm / scale-norm / gated attention, not supported")
            if type(m) is not Mlp or not isinstance(m.norm, nn.Identity):
                raise ValueError(f"timm ViT adapter: block {i} MLP is {type(m).__name__}, expected a plain timm Mlp")
            _act_name(m.act)

    def make_attention(self, block):
        a = block.attn
        A, d = a.attn_dim, a.qkv.in_features
        W = a.qkv.weight.detach()
        b = a.qkv.bias.detach() if a.qkv.bias is not None else None
        lins = []
        for j in range(3):  # split the fused qkv into q, k, v (exact: rows are disjoint)
            lin = nn.Linear(d, A, bias=b is not None, device=W.device, dtype=W.dtype)
            with torch.no_grad():
                lin.weight.copy_(W[j * A:(j + 1) * A])
                if b is not None:
                    lin.bias.copy_(b[j * A:(j + 1) * A])
            lin.requires_grad_(a.qkv.weight.requires_grad)
            lins.append(lin)
        return TimmMaskedAttention(*lins, a.proj, a.num_heads, a.head_dim, a.head_dim, a.scale,
                                   attn_drop=a.attn_drop.p, out_drop=a.proj_drop.p)

    def make_mlp(self, block):
        m = block.mlp
        return MaskedMlp(m.fc1, m.fc2, _act_name(m.act), drop=m.drop2.p)

    def describe(self, model):
        blk = model.blocks[0]
        attn, mlp = self.parts(blk)
        pe = model.patch_embed
        ls = blk.ls1
        return {
            "class": type(model).__name__,
            "kwargs": {
                "img_size": list(pe.img_size), "patch_size": list(pe.patch_size),
                "in_chans": pe.proj.in_channels, "num_classes": model.num_classes,
                "global_pool": model.global_pool, "embed_dim": model.embed_dim, "depth": len(model.blocks),
                "num_heads": attn.num_heads, "mlp_ratio": mlp.fc1.out_features / model.embed_dim,
                "qkv_bias": attn.q.bias is not None, "class_token": model.cls_token is not None,
                "no_embed_class": model.no_embed_class, "reg_tokens": model.num_reg_tokens,
                "pre_norm": not isinstance(model.norm_pre, nn.Identity),
                "fc_norm": not isinstance(model.fc_norm, nn.Identity),
                # timm puts the final norm in fc_norm instead of norm when pooling by average
                "final_norm": not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
                "init_values": float(ls.gamma.detach().flatten()[0]) if hasattr(ls, "gamma") else None,
                "dynamic_img_size": model.dynamic_img_size,
                # not defaults-only: a rebuilt model must compute the same function
                "act_layer": mlp.act,
                "norm_eps": float(blk.norm1.eps) if hasattr(blk.norm1, "eps") else None,
                "pool_include_prefix": bool(getattr(model, "pool_include_prefix", False)),
                "pos_embed": "learn" if getattr(model, "pos_embed", None) is not None else "none",
                "proj_bias": attn.o.bias is not None,
            },
        }

    @classmethod
    def build(cls, desc):
        classes = _vit_classes()
        if desc.get("class") not in classes:
            raise ValueError(f"unknown timm ViT class {desc.get('class')!r}; known: {sorted(classes)}")
        kw = dict(desc["kwargs"])
        kw["img_size"], kw["patch_size"] = tuple(kw["img_size"]), tuple(kw["patch_size"])
        if "act_layer" in kw:  # absent in files written before it was recorded: timm's default GELU
            acts = {"gelu": nn.GELU, "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),
                    "relu": nn.ReLU, "silu": nn.SiLU}
            if kw["act_layer"] not in acts:
                raise ValueError(f"unknown timm ViT activation {kw['act_layer']!r}; known: {sorted(acts)}")
            kw["act_layer"] = acts[kw["act_layer"]]
        eps = kw.pop("norm_eps", None)
        if eps is not None:
            from timm.layers import LayerNorm

            kw["norm_layer"] = functools.partial(LayerNorm, eps=float(eps))
        return classes[desc["class"]](**kw)

    def default_seq_len(self, model):
        return model.patch_embed.num_patches + model.num_prefix_tokens

    def forward(self, model, batch: Any):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise TypeError("timm ViT batches must be image tensors (B, C, H, W) or (images, labels) pairs")
        return model.forward_features(x), None
