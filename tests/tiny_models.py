"""Tiny random-init builders for the Llama / Mistral / OPT / CLIP / Swin adapter tests (no downloads)."""
from __future__ import annotations

import torch
import torch.nn as nn

VOCAB = 96


def tiny_llama(seed: int = 0, layers: int = 2, family: str = "llama", dtype=torch.float32, attn_impl: str = "sdpa",
               bias: bool = False, tie: bool = False, sliding_window=None) -> nn.Module:
    """LlamaForCausalLM (or Mistral) with GQA: 4 query heads, 2 kv heads, head_dim 12 (6 rotary pairs)."""
    import transformers

    kw = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
              attn_implementation=attn_impl)
    if family == "llama":
        cfg = transformers.LlamaConfig(**kw, attention_bias=bias, mlp_bias=bias)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.MistralConfig(**kw, sliding_window=sliding_window)
        cls = transformers.MistralForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():  # HF inits biases to 0 and norms to 1: make every weight matter
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def token_batch(seed: int = 0, batch: int = 3, seq: int = 11, pad: bool = True) -> dict:
    g = torch.Generator().manual_seed(3000 + seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    am = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        am[1, seq - 4:] = 0  # one right-padded row
    return {"input_ids": ids, "attention_mask": am}


def tiny_opt(seed: int = 0, layers: int = 2, attn_impl: str = "sdpa", tie: bool = True) -> nn.Module:
    """OPTForCausalLM: hidden 48, 4 heads (head_dim 12), ffn 96, ReLU, biases, learned positions."""
    import transformers

    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=layers, ffn_dim=96,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=48,
                                 dropout=0.0, attention_dropout=0.0, pad_token_id=0, tie_word_embeddings=tie,
                                 attn_implementation=attn_impl)
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_clip(seed: int = 0, attn_impl: str = "sdpa", act: str = "quick_gelu") -> nn.Module:
    """CLIPModel: vision 32x32 images, patch 8 (17 tokens), text 9 tokens; both towers hidden 32 (4 heads), 2 layers."""
    import transformers

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act=act,
                  attention_dropout=0.0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, max_position_embeddings=16, **common),
        vision_config=dict(image_size=32, patch_size=8, num_channels=3, **common),
        projection_dim=24, attn_implementation=attn_impl)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def clip_batch(seed: int = 0, images: int = 2, texts: int = 3, seq: int = 9) -> dict:
    g = torch.Generator().manual_seed(4000 + seed)
    ids = torch.randint(1, VOCAB - 1, (texts, seq), generator=g)
    am = torch.ones(texts, seq, dtype=torch.long)
    am[1, seq - 3:] = 0
    ids[:, -1] = VOCAB - 1  # CLIP pools at the eos id (argmax token id in the legacy config)
    return {"input_ids": ids, "attention_mask": am, "pixel_values": torch.randn(images, 3, 32, 32, generator=g)}


def tiny_swin(seed: int = 0) -> nn.Module:
    """timm SwinTransformer: 32x32 images, patch 4 (8x8 grid), window 4 (shifted windows in stage 1),
    embed 16, depths (2, 2), heads (2, 4) (head_dim 8), mlp_ratio 2, 10 classes."""
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(seed)
    model = SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
                            mlp_ratio=2.0, num_classes=10, drop_path_rate=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" not in name:
                p.add_(0.05 * torch.randn_like(p))
            elif "relative_position_bias_table" in name:
                p.normal_(0.0, 0.5)  # make the bias matter
    return model.eval()


def image_batch(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(5000 + seed))
