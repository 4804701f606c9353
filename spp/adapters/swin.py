"""timm Swin Transformer (v1, ``SwinTransformer``): shifted-window attention with relative position bias.

The relative position bias is per head (added to the scores), so qk / vo width changes leave it
untouched: the masked and pruned window attention carry the same bias table. The scale is passed
explicitly (timm's fused path lets SDPA derive it from the width, which pruning would change).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..layers import MaskedAttention, MaskedMlp, prune_attention, prune_mlp
from .base import Adapter
from .timm_vit import _act_name


class SwinMaskedAttention(MaskedAttention):
    """MaskedAttention with timm WindowAttention's call signature ``forward(x (B·nW, N, C), mask (nW, N, N))``.

    ``relative_position_bias_table`` ((2Wh-1)(2Ww-1), H) and ``relative_position_index`` (N, N) are set by
    the adapter (the original block's table and index)."""

    def _rel_pos_bias(self) -> torch.Tensor:
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)  # (1, H, N, N)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        N = x.shape[1]
        bias = self._rel_pos_bias()  # (1, H, N, N)
        if mask is not None:  # shifted windows: (nW, N, N), 0 or -100, window w of every image = batch row b % nW
            bias = bias + mask.view(-1, 1, N, N)  # (nW, H, N, N): the op reads row b % nW, nothing tiled
        return self.forward_core(x, bias=bias.to(x.dtype))


def _set_bias(attn: SwinMaskedAttention, table: nn.Parameter, index: torch.Tensor) -> SwinMaskedAttention:
    attn.relative_position_bias_table = table
    attn.register_buffer("relative_position_index", index, persistent=False)
    return attn


class SwinAdapter(Adapter):
    family = "timm_swin"
    description = "timm SwinTransformer (v1; window attention with relative position bias)"
    attn_type = SwinMaskedAttention

    @classmethod
    def matches(cls, model):
        try:
            from timm.models.swin_transformer import SwinTransformer
        except ImportError:
            return False
        return isinstance(model, SwinTransformer)

    def blocks(self, model):
        return [b for stage in model.layers for b in stage.blocks]

    def check_supported(self, model):
        from timm.layers import Mlp
        from timm.models.swin_transformer import WindowAttention

        for i, block in enumerate(self.blocks(model)):
            if self.installed(block) is not None:
                continue
            if type(block.attn) is not WindowAttention:
                raise ValueError(f"timm Swin adapter: block {i} attention is {type(block.attn).__name__}, "
                                 "expected WindowAttention")
            if type(block.mlp) is not Mlp:
                raise ValueError(f"timm Swin adapter: block {i} MLP is {type(block.mlp).__name__}, expected timm Mlp")
            _act_name(block.mlp.act)

    def make_attention(self, block):
        a = block.attn
        A, d = a.qkv.out_features // 3, a.qkv.in_features
        W = a.qkv.weight.detach()
        b = a.qkv.bias.detach() if a.qkv.bias is not None else None
        lins = []
        for j in range(3):  # split the fused qkv (rows are disjoint: exact)
            lin = nn.Linear(d, A, bias=b is not None, device=W.device, dtype=W.dtype)
            with torch.no_grad():
                lin.weight.copy_(W[j * A:(j + 1) * A])
                if b is not None:
                    lin.bias.copy_(b[j * A:(j + 1) * A])
            lin.requires_grad_(a.qkv.weight.requires_grad)
            lins.append(lin)
        hd = A // a.num_heads
        attn = SwinMaskedAttention(*lins, a.proj, a.num_heads, hd, hd, a.scale, attn_drop=a.attn_drop.p,
                                   out_drop=a.proj_drop.p)
        return _set_bias(attn, a.relative_position_bias_table, a.relative_position_index)

    def make_mlp(self, block):
        m = block.mlp
        return MaskedMlp(m.fc1, m.fc2, _act_name(m.act), drop=m.drop2.p)

    def prune_parts(self, attn, mlp, qk, vo, ml):
        new = prune_attention(attn, qk[0], qk[1], vo[0], vo[1])
        return _set_bias(new, attn.relative_position_bias_table, attn.relative_position_index), \
            prune_mlp(mlp, ml[0], ml[1])

    def describe(self, model):
        pe = model.patch_embed
        blk = model.layers[0].blocks[0]
        attn, mlp = self.parts(blk)
        return {
            "class": "SwinTransformer",
            "kwargs": {
                "img_size": list(pe.img_size), "patch_size": int(pe.patch_size[0]), "in_chans": model.in_chans,
                "num_classes": model.num_classes, "global_pool": model.global_pool, "embed_dim": model.embed_dim,
                "depths": [len(s.blocks) for s in model.layers],
                "num_heads": [self.parts(s.blocks[0])[0].num_heads for s in model.layers],
                "head_dim": attn.qk_dim if attn.qk_dim * attn.num_heads != model.embed_dim else None,
                "window_size": list(blk.window_size), "always_partition": bool(blk.always_partition),
                "strict_img_size": not model.dynamic_img_size,
                "mlp_ratio": mlp.fc1.out_features / model.embed_dim, "qkv_bias": attn.q.bias is not None,
                "act_layer": mlp.act, "norm_eps": float(model.norm.eps),
            },
        }

    @classmethod
    def build(cls, desc):
        import functools

        from timm.models.swin_transformer import SwinTransformer

        if desc.get("class") != "SwinTransformer":
            raise ValueError(f"unknown timm Swin class {desc.get('class')!r}; known: ['SwinTransformer']")
        kw = dict(desc["kwargs"])
        kw["img_size"], kw["window_size"] = tuple(kw["img_size"]), tuple(kw["window_size"])
        kw["depths"], kw["num_heads"] = tuple(kw["depths"]), tuple(kw["num_heads"])
        acts = {"gelu": nn.GELU, "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"), "relu": nn.ReLU,
                "silu": nn.SiLU}
        act = kw.pop("act_layer", "gelu")
        if act not in acts:
            raise ValueError(f"unknown timm Swin activation {act!r}; known: {sorted(acts)}")
        eps = kw.pop("norm_eps", 1e-5)
        model = SwinTransformer(**kw, norm_layer=functools.partial(nn.LayerNorm, eps=float(eps)))
        if act != "gelu":  # SwinTransformer has no act_layer argument: swap the modules
            for stage in model.layers:
                for b in stage.blocks:
                    b.mlp.act = acts[act]()
        return model

    def default_seq_len(self, model):
        return int(model.layers[0].blocks[0].window_size[0] * model.layers[0].blocks[0].window_size[1])

    def forward(self, model, batch: Any):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise TypeError("timm Swin batches must be image tensors (B, C, H, W) or (images, labels) pairs")
        return model.forward_features(x).flatten(1, 2), None
