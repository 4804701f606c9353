"""The attention op of pruned layers: qk width != v width, odd widths, key padding and causal
masks, the explicit (original) scale. The reference and the torch (SDPA) backend against a
float64 oracle, per-dtype tolerances from tests/tolerances.py."""
import math

import pytest
import torch

import spp_kernels
from spp_kernels import reference
from oracles import oracle_attention
from tolerances import DTYPE_IDS, DTYPES, assert_close

SHAPES = [  # (B, H, N, D_qk, D_v)
    (1, 1, 1, 1, 1),
    (2, 3, 7, 5, 9),
    (1, 2, 33, 40, 13),
    (2, 4, 17, 52, 64),
]


def inputs(shape, dtype, seed=0):
    B, H, N, D, Dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g).to(dtype)
    k = torch.randn(B, H, N, D, generator=g).to(dtype)
    v = torch.randn(B, H, N, Dv, generator=g).to(dtype)
    return q, k, v


def padding_mask(B, N, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, N + 1, (B,), generator=g)
    lengths[0] = N
    return torch.arange(N)[None, :] < lengths[:, None]


@pytest.mark.parametrize("fn", [reference.attention, reference.sdpa_attention], ids=["reference", "sdpa"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("masking", ["none", "padding", "causal"])
def test_attention_matches_the_oracle(fn, dtype, shape, masking):
    q, k, v = inputs(shape, dtype)
    scale = 1 / math.sqrt(64)  # the original head width's scale, not the pruned one's
    mask = padding_mask(shape[0], shape[2]) if masking == "padding" else None
    causal = masking == "causal"
    out = fn(q, k, v, scale, mask, causal)
    assert out.dtype == dtype and out.shape == (*shape[:3], shape[4])
    want = oracle_attention(q, k, v, scale, mask, causal)
    # scores reduce over D, outputs over N keys of the softmax-weighted v
    assert_close(out, want, dtype, shape[3], shape[2], msg=f"{fn.__name__} {masking}")


def test_fully_masked_rows_are_zero_and_scale_matters():
    q, k, v = inputs((2, 2, 5, 3, 4), torch.float32)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0] = True
    for fn in (reference.attention, reference.sdpa_attention):
        out = fn(q, k, v, 0.5, mask)
        assert torch.all(out[1] == 0) and torch.all(torch.isfinite(out))
        assert not torch.allclose(fn(q, k, v, 0.5), fn(q, k, v, 0.25))


def test_public_op_dispatches_to_sdpa_on_cpu(monkeypatch):
    monkeypatch.delenv("SPP_BACKEND", raising=False)
    q, k, v = inputs((1, 2, 6, 5, 7), torch.float32)
    assert torch.equal(spp_kernels.attention(q, k, v, 0.3), reference.sdpa_attention(q, k, v, 0.3))


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, v: (q[0], k, v, 0.5, None, False), "q must be 4-D"),
    (lambda q, k, v: (q, k[..., :2], v, 0.5, None, False), "k's width"),
    (lambda q, k, v: (q, k, v[:, :, :3], 0.5, None, False), "v has 3 tokens"),
    (lambda q, k, v: (q, k, v.double(), 0.5, None, False), "v must be float32"),
    (lambda q, k, v: (q, k, v.half(), 0.5, None, False), "share a dtype"),
    (lambda q, k, v: (q, k, v, 0.0, None, False), "scale must be"),
    (lambda q, k, v: (q, k, v, 0.5, torch.ones(2, 5), False), "bool tensor"),
    (lambda q, k, v: (q, k, v, 0.5, torch.ones(2, 4, dtype=torch.bool), False), "attn_mask must be"),
    (lambda q, k, v: (q, k, v, 0.5, torch.ones(2, 5, dtype=torch.bool), True), "not both"),
])
def test_bad_arguments_name_the_argument(bad, match):
    q, k, v = inputs((2, 2, 5, 3, 4), torch.float32)
    for fn in (reference.attention, reference.sdpa_attention):
        with pytest.raises((ValueError, TypeError), match=match):
            fn(*bad(q, k, v))
