"""float64 oracles of the GEMM ops, written from their formulas (shared by the reference and fuzz tests)."""
from __future__ import annotations

import math

import torch


def oracle_act(name, h):
    """The activations from their definitions, in float64."""
    if name in (None, "none"):
        return h
    if name == "gelu":
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    if name == "relu":
        return torch.where(h > 0, h, torch.zeros_like(h))
    if name == "silu":
        return h / (1.0 + torch.exp(-h))
    raise AssertionError(name)


def oracle_masked_linear(x, W, b, m, col2unit, act):
    h = x.double() @ W.double().T + (0.0 if b is None else b.double())
    mv = m.double() if col2unit is None else m.double()[col2unit.long()]
    return oracle_act(act, h) * mv


def oracle_pair(x, W1, b1, m, W2, b2, act, active=None):
    """Units outside ``active`` contribute nothing, as if their mask were 0."""
    m = m.double()
    if active is not None:
        keep = torch.zeros(m.numel(), dtype=torch.bool)
        keep[active.long()] = True
        m = torch.where(keep, m, torch.zeros((), dtype=m.dtype))
    h = oracle_act(act, x.double() @ W1.double().T + (0.0 if b1 is None else b1.double())) * m
    out = h @ W2.double().T
    return out if b2 is None else out + b2.double()


def oracle_attention(q, k, v, scale, attn_mask=None, is_causal=False, bias=None):
    """Attention from its formula in float64, one query row at a time (explicit exp-normalise;
    a row with no key to attend is 0). ``bias`` (Bb, Hb, N, M): batch row b adds bias[b % Bb].
    ``attn_mask``: (B, M) key padding or a 4-D (B | 1, H | 1, N, M) bool mask."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, N, _ = q.shape
    M = k.shape[2]
    if attn_mask is not None and attn_mask.dim() == 4:  # one query row of one head at a time
        m = attn_mask.expand(B, H, N, M)
        out = torch.zeros(B, H, N, v.shape[3], dtype=torch.float64)
        for b in range(B):
            for h in range(H):
                for i in range(N):
                    allowed = m[b, h, i].clone()
                    if is_causal:
                        allowed &= torch.arange(M) <= i + (M - N)
                    if not allowed.any():
                        continue
                    s = (k[b, h, allowed] @ q[b, h, i]) * scale
                    if bias is not None:
                        s = s + bias[b % bias.shape[0], h % bias.shape[1], i, allowed].double()
                    w = torch.exp(s - s.max())
                    out[b, h, i] = (w / w.sum()) @ v[b, h, allowed]
        return out
    out = torch.zeros(B, H, N, v.shape[3], dtype=torch.float64)
    for b in range(B):
        for i in range(N):
            allowed = torch.ones(M, dtype=torch.bool)
            if attn_mask is not None:
                allowed &= attn_mask[b].bool()
            if is_causal:
                allowed &= torch.arange(M) <= i + (M - N)
            if not allowed.any():
                continue
            s = (k[b, :, allowed] @ q[b, :, i, :, None]).squeeze(-1) * scale  # (H, kept keys)
            if bias is not None:
                s = s + bias[b % bias.shape[0], :, i, allowed].double()  # (1 or H, kept keys)
            w = torch.exp(s - s.max(dim=-1, keepdim=True).values)
            w = w / w.sum(dim=-1, keepdim=True)
            out[b, :, i] = (w[:, :, None] * v[b, :, allowed]).sum(1)
    return out
