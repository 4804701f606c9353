"""Tiny random-init models and inputs for the spp tests (no downloads, CPU, fp32)."""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn as nn

import spp

HIDDEN, HEADS, HEAD_DIM = 48, 4, 12
SEQ = 11  # odd on purpose
VOCAB = 64

# Tiny models gain nothing from threads, and OpenMP threads spinning on a shared 2-core machine
# make every tiny matmul ~30x slower; one thread keeps the suite fast and its timing steady.
torch.set_num_threads(1)


def tiny_bert(seed: int = 0, layers: int = 2, cls: str = "BertModel", hidden_act: str = "gelu") -> nn.Module:
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN, max_position_embeddings=32, type_vocab_size=2, hidden_act=hidden_act,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    torch.manual_seed(seed)
    return getattr(transformers, cls)(cfg).eval()


def bert_batch(seed: int = 0, batch: int = 3, seq: int = SEQ) -> dict:
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    am = torch.ones(batch, seq, dtype=torch.long)
    am[1, seq - 4:] = 0  # one padded row
    ids[1, seq - 4:] = 0
    return {"input_ids": ids, "attention_mask": am}


def tiny_vit(seed: int = 0, distilled: bool = False, depth: int = 2, **kw) -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    model = cls(img_size=32, patch_size=8, embed_dim=HIDDEN, depth=depth, num_heads=HEADS, num_classes=10, **kw)
    with torch.no_grad():  # timm zero-inits some tensors; make every weight matter
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" not in name:
                p.add_(0.05 * torch.randn_like(p))
            elif name in ("cls_token", "dist_token", "pos_embed"):
                p.normal_(0.0, 0.1)
    return model.eval()


def vit_batch(seed: int = 0, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(2000 + seed)
    return torch.randn(batch, 3, 32, 32, generator=g)


FAMILIES = ("bert", "bert_cls", "vit", "deit_distilled")


def make(family: str, seed: int = 0, layers: int = 2):
    """(model, batch) for one of FAMILIES."""
    if family == "bert":
        return tiny_bert(seed, layers=layers), bert_batch(seed)
    if family == "bert_cls":
        return tiny_bert(seed, layers=layers, cls="BertForSequenceClassification"), bert_batch(seed)
    if family == "vit":
        return tiny_vit(seed, depth=layers), vit_batch(seed)
    if family == "deit_distilled":
        return tiny_vit(seed, distilled=True, depth=layers), vit_batch(seed)
    raise KeyError(family)


@torch.no_grad()
def outputs(model: nn.Module, batch) -> list[torch.Tensor]:
    """The tensors to compare, restricted to non-padded tokens for BERT."""
    if isinstance(batch, dict):
        out = model(**batch, output_hidden_states=True)
        keep = batch["attention_mask"].bool()
        res = [out.hidden_states[-1][keep]]
        for name in ("pooler_output", "logits"):
            if getattr(out, name, None) is not None:
                res.append(getattr(out, name))
        return res
    return [model.forward_features(batch)[:, :], model(batch)]


def max_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def quiet_search(handle, batch, steps: int = 40, **kw):
    """spp.search on one batch without progress bars or degenerate-path warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return spp.search(handle, [batch], steps=steps, progress=False, **kw)


def with_m(path: spp.SolutionPath, m: np.ndarray) -> spp.SolutionPath:
    """A copy of ``path`` whose final mask values are ``m``."""
    return spp.SolutionPath(path.pairs, path.entry, path.support_count, path.z, m, path.steps, path.settings,
                            path.fingerprint, path.history)


def sdpa_math_layer_output(layer, x, mask):
    """A MaskedAttention layer's output computed with SDPA's math kernel on its unpadded widths
    (the oracle of the layer-core tests)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, N, _ = x.shape
    H, D, Dv = layer.num_heads, layer.qk_dim, layer.v_dim
    with sdpa_kernel(SDPBackend.MATH):
        q = layer.q(x).view(B, N, H, D).transpose(1, 2)
        k = layer.k(x).view(B, N, H, D).transpose(1, 2)
        v = layer.v(x).view(B, N, H, Dv).transpose(1, 2)
        ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer.scale)
        return layer.o(ctx.transpose(1, 2).reshape(B, N, H * Dv))
