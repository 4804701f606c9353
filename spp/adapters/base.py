"""What every model family adapter provides; the generic attach / prune / rebuild logic.

An adapter knows where a family keeps its blocks and how to turn a block's attention and MLP
into :class:`MaskedAttention` / :class:`MaskedMlp` and back. Everything else (arena layout,
costs, folding) is shared here.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint

from ..arena import MaskArena, PairSpec
from ..layers import MaskedAttention, MaskedMlp, MaskSlot, mark_forwards, prune_attention, prune_mlp


class Adapter:
    family: str = ""
    description: str = ""

    def __init__(self, model: nn.Module):
        pass

    # --- per-family hooks -----------------------------------------------------------------
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def check_supported(self, model: nn.Module) -> None:
        """Raise ValueError naming the unsupported feature (decoder, cross-attention, qk-norm…)."""

    def make_attention(self, block: nn.Module) -> MaskedAttention:
        """A full-width MaskedAttention built from the block's original modules (no slots)."""
        raise NotImplementedError

    def make_mlp(self, block: nn.Module) -> MaskedMlp:
        raise NotImplementedError

    # where a block keeps its attention and MLP, and the masked types that replace them: the
    # defaults below serve families whose block holds both as plain attributes
    attn_attr: str = "attn"
    mlp_attr: str = "mlp"
    attn_type: type = MaskedAttention
    mlp_type: type = MaskedMlp

    def install(self, block: nn.Module, attn: MaskedAttention, mlp: MaskedMlp) -> Any:
        """Put ``attn``/``mlp`` into ``block``; return what :meth:`uninstall` needs to undo it."""
        saved = (getattr(block, self.attn_attr), getattr(block, self.mlp_attr))
        setattr(block, self.attn_attr, attn)
        setattr(block, self.mlp_attr, mlp)
        return saved

    def uninstall(self, block: nn.Module, saved: Any) -> None:
        setattr(block, self.attn_attr, saved[0])
        setattr(block, self.mlp_attr, saved[1])

    def installed(self, block: nn.Module) -> Optional[tuple[MaskedAttention, MaskedMlp]]:
        a, m = getattr(block, self.attn_attr), getattr(block, self.mlp_attr)
        return (a, m) if isinstance(a, self.attn_type) and isinstance(m, self.mlp_type) else None

    def describe(self, model: nn.Module) -> dict:
        """JSON-able description from which :meth:`build` makes the same dense architecture."""
        raise NotImplementedError

    @classmethod
    def build(cls, desc: dict) -> nn.Module:
        raise NotImplementedError

    def default_seq_len(self, model: nn.Module) -> int:
        return 128

    def forward(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Run ``model`` on ``batch``; return (output to distil (B, N, D) or (B, D), token weights (B, N) or None)."""
        raise NotImplementedError

    # --- shared logic ---------------------------------------------------------------------
    def parts(self, block: nn.Module) -> tuple[MaskedAttention, MaskedMlp]:
        cur = self.installed(block)
        return cur if cur is not None else self._make(block)

    def _make(self, block: nn.Module) -> tuple[MaskedAttention, MaskedMlp]:
        attn, mlp = self.make_attention(block), self.make_mlp(block)
        attn.train(block.training)  # new modules start in training mode; follow the block's
        mlp.train(block.training)
        return attn, mlp

    def pair_specs(self, model: nn.Module, seq_len: Optional[int] = None) -> list[PairSpec]:
        n = seq_len or self.default_seq_len(model)
        specs = []
        for i, block in enumerate(self.blocks(model)):
            attn, mlp = self.parts(block)
            specs.extend(self.block_specs(i, attn, mlp, n))
        return specs

    # hooks for families whose layers are not plain MaskedAttention / MaskedMlp (GQA, RoPE, SwiGLU)
    def block_name(self, i: int) -> str:
        """Prefix of block ``i``'s pair names (``<prefix>.qk`` …); models with several towers override it."""
        return f"blocks.{i}"

    def block_specs(self, layer: int, attn: nn.Module, mlp: nn.Module, seq_len: int) -> list[PairSpec]:
        return pair_specs_of(layer, attn, mlp, seq_len, self.block_name(layer))

    def prune_parts(self, attn: nn.Module, mlp: nn.Module, qk, vo, ml) -> tuple[nn.Module, nn.Module]:
        """Narrow copies of one block's layers; ``qk``/``vo``/``ml`` are (kept int64, values fp32)."""
        return prune_attention(attn, qk[0], qk[1], vo[0], vo[1]), prune_mlp(mlp, ml[0], ml[1])

    def block_widths(self, attn: nn.Module, mlp: nn.Module) -> tuple[int, int, int]:
        """Number of qk, vo and mlp units of one block."""
        return attn.qk_dim, attn.v_dim, mlp.fc1.out_features

    def attach(self, model: nn.Module, arena: MaskArena) -> list:
        saved = []
        for i, block in enumerate(self.blocks(model)):
            if self.installed(block) is not None:
                raise ValueError("model is already attached (or already pruned): call spp.detach first")
            attn, mlp = self._make(block)
            name = self.block_name(i)
            attn.qk_slot = MaskSlot(arena, f"{name}.qk")
            attn.vo_slot = MaskSlot(arena, f"{name}.vo")
            mlp.slot = MaskSlot(arena, f"{name}.mlp")
            saved.append(self.install(block, attn, mlp))
        return saved

    def detach(self, model: nn.Module, saved: list) -> None:
        for block, s in zip(self.blocks(model), saved):
            self.uninstall(block, s)

    def prune_(self, model: nn.Module, kept: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Replace every block's attention and MLP by narrow copies keeping ``kept[pair] = (idx, values)``."""
        for i, block in enumerate(self.blocks(model)):
            attn, mlp = self.parts(block)
            name = self.block_name(i)
            qk, vo, ml = kept[f"{name}.qk"], kept[f"{name}.vo"], kept[f"{name}.mlp"]
            dev = attn.q.weight.device
            new_attn, new_mlp = self.prune_parts(attn, mlp, (qk[0].to(dev), qk[1].to(dev)),
                                                 (vo[0].to(dev), vo[1].to(dev)), (ml[0].to(dev), ml[1].to(dev)))
            if self.installed(block) is None:
                self.install(block, new_attn, new_mlp)
            else:
                self.replace(block, new_attn, new_mlp)
            self.finish_pruned(block, new_attn, new_mlp)
        mark_forwards(model)

    def finish_pruned(self, block: nn.Module, attn: nn.Module, mlp: nn.Module) -> None:
        """Called on every block of a pruned model (also when :func:`spp.load_pruned` rebuilds one),
        after its narrow layers are in: e.g. fold the block's residual adds into them."""

    def replace(self, block: nn.Module, attn: MaskedAttention, mlp: MaskedMlp) -> None:
        """Swap already-installed layers for new ones."""
        self.install(block, attn, mlp)

    def set_checkpointing(self, model: nn.Module, enabled: bool = True) -> None:
        """Activation checkpointing per block: when gradients are on, each block's activations are
        recomputed in the backward pass instead of stored (non-reentrant, so the mask gradient flows
        although the weights are frozen). Without gradients (teacher, evaluation) blocks run as usual."""
        for block in self.blocks(model):
            current = block.__dict__.get("forward")
            ours = isinstance(current, functools.partial) and current.func is _checkpointed_forward
            if enabled and not ours:  # wrap whatever forward the block has (e.g. an offload hook's)
                block.forward = functools.partial(_checkpointed_forward, block, current)
            elif not enabled and ours:  # give back the forward it had before
                previous = current.args[1]
                if previous is None:
                    del block.forward
                else:
                    block.forward = previous

    def widths(self, model: nn.Module) -> dict[str, int]:
        out = {}
        for i, block in enumerate(self.blocks(model)):
            attn, mlp = self.parts(block)
            name = self.block_name(i)
            out[f"{name}.qk"], out[f"{name}.vo"], out[f"{name}.mlp"] = self.block_widths(attn, mlp)
        return out


def _checkpointed_forward(block: nn.Module, previous, *args, **kwargs):
    """``previous``: the instance-level forward the block had (None: its class's forward)."""
    if previous is None:
        previous = functools.partial(type(block).forward, block)
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(previous, *args, use_reentrant=False, **kwargs)
    return previous(*args, **kwargs)


def pair_specs_of(layer: int, attn: MaskedAttention, mlp: MaskedMlp, seq_len: int,
                  prefix: Optional[str] = None) -> list[PairSpec]:
    """Exact per-unit cost of each pair of one block (params, and FLOPs per token at ``seq_len``).

    qk unit: one channel in each of H query and H key heads: 2·H·d weights (+ biases); FLOPs per
    token 2·2·d·H for the projections + 2·N·H for the scores. vo unit: H value rows (+ bias) and
    H output columns; 2·d·H + 2·H·d_out + 2·N·H FLOPs. mlp unit: a fc1 row (+ bias) and a fc2 column.
    """
    H, d, d_out = attn.num_heads, attn.q.in_features, attn.o.out_features
    prefix = prefix or f"blocks.{layer}"
    qb = int(attn.q.bias is not None) + int(attn.k.bias is not None)
    qk = PairSpec(f"{prefix}.qk", "qk", layer, attn.qk_dim, 2 * H * d + qb * H, 4 * d * H + 2 * seq_len * H)
    vo = PairSpec(f"{prefix}.vo", "vo", layer, attn.v_dim,
                  H * d + int(attn.v.bias is not None) * H + H * d_out, 2 * d * H + 2 * H * d_out + 2 * seq_len * H)
    d1, d2 = mlp.fc1.in_features, mlp.fc2.out_features
    ml = PairSpec(f"{prefix}.mlp", "mlp", layer, mlp.fc1.out_features,
                  d1 + int(mlp.fc1.bias is not None) + d2, 2 * d1 + 2 * d2)
    return [qk, vo, ml]
