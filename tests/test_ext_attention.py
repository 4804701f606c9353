"""The fused CPU attention forward of the extension (``spp_ext::attention``, csrc/attention.cpp)
against the float64 oracle: odd and unequal widths (both of its GEMM paths: brgemm, and the BLAS
matrix-vector path for P·V at Dv = 1), key padding, causal alignment with N != M, rows without keys,
an additive (Bb, Hb, N, M) bias as Swin gives it,
inputs laid out as the projections give them, long key ranges (smaller query blocks, exp tails),
its softmax alone at extreme score spreads, inf / NaN in padded keys through the public op,
gradients (fused forward + the chunked route's backward, with and without a bias), thread-count independence, opcheck
and which route the dispatcher takes."""
from __future__ import annotations

import pytest
import torch

import spp_kernels
from spp_kernels import _ext, dispatch, reference
from oracles import oracle_attention
from tolerances import assert_close

pytestmark = pytest.mark.skipif(not (_ext.available and getattr(_ext._C, "attention_cpu", 0)),
                                reason="spp_kernels._C with the fused attention is not built")


def ext():
    from spp_kernels import ext_ops
    return ext_ops


def projected(B, H, N, M, D, Dv, seed=0):
    """q, k, v as a pruned layer hands them over: (B, H, tokens, width) views of (B, tokens, H·width)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, M, H, D, generator=g).transpose(1, 2)
    v = torch.randn(B, M, H, Dv, generator=g).transpose(1, 2)
    return q, k, v


def keep_mask(B, M, seed=1, empty_row=None):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, M, generator=g) > 0.35
    keep[:, 0] |= ~keep.any(-1)  # every row keeps some key ...
    if empty_row is not None:
        keep[empty_row] = False  # ... except this one
    return keep


def fused(q, k, v, scale, keep, causal, bias=None):
    out = torch.ops.spp_ext.attention(q, k, v, scale, keep, causal, bias)
    assert out.is_contiguous() and out.shape == (q.shape[0], q.shape[2], q.shape[1], v.shape[3])
    return out.permute(0, 2, 1, 3)


CASES = [  # (B, H, N, M, D, Dv, causal, padding)
    (1, 1, 1, 1, 1, 1, False, False),  # Dv = 1: P·V on the BLAS
    (2, 3, 19, 23, 1, 1, True, True),  # the skeleton's widths (one unit per pair)
    (2, 3, 17, 17, 5, 7, False, True),
    (3, 2, 9, 21, 4, 3, True, True),  # causal with more keys than queries
    (2, 2, 13, 5, 8, 16, True, False),  # more queries than keys: the first 8 rows see no key
    (1, 2, 33, 33, 24, 27, True, True),  # MiniLM's pruned widths
    (2, 1, 7, 40, 32, 32, False, True),  # equal widths (the dense model's 32 / 32)
    (1, 2, 70, 300, 9, 11, False, True),  # M > 256: query blocks of 64 rows, a ragged last block
    (1, 1, 5, 3000, 3, 5, True, True),  # query blocks of 21 rows
    (2, 2, 6, 9, 0, 4, False, True),  # no qk channels: uniform weights over the kept keys
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}N{}M{}D{}Dv{}{}{}".format(
    *c[:6], "c" if c[6] else "", "p" if c[7] else ""))
def test_forward_matches_the_oracle(case):
    B, H, N, M, D, Dv, causal, padding = case
    q, k, v = projected(B, H, N, M, D, Dv)
    keep = keep_mask(B, M, empty_row=B - 1 if B > 1 else None) if padding else None
    out = fused(q, k, v, 0.37, keep, causal)
    assert_close(out, oracle_attention(q, k, v, 0.37, keep, causal), torch.float32, max(D, 1), M,
                 msg=str(case))
    if padding and B > 1:
        assert torch.all(out[B - 1] == 0)  # a row without keys gives exactly 0
    if causal and N > M:
        assert torch.all(out[:, :, : N - M] == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_right_padded_batches_skip_their_padding_exactly(causal):
    """A right-padded batch (keys after each row's last kept one take no part in the products): rows
    of every length from none to all, holes inside the kept range, inf / NaN in the padding, with
    N != M, a bias, and query blocks both single and several (M > 256)."""
    for B, H, N, M, D, Dv in [(6, 2, 11, 13, 5, 7), (4, 3, 70, 300, 9, 4)]:
        q, k, v = projected(B, H, N, M, D, Dv, seed=3)
        lengths = [0, 1, M // 3, M - 2, M, M // 2][:B]
        keep = torch.arange(M)[None, :] < torch.tensor(lengths)[:, None]
        keep[2, 1] = False  # a hole before the end
        bias = torch.randn(1, H, N, M, generator=torch.Generator().manual_seed(4))
        kb, vb = k.clone(), v.clone()
        kb[1, :, 3:] = float("inf")
        vb[2, :, lengths[2]:] = float("nan")
        out = fused(q, kb, vb, 0.29, keep, causal, bias)
        assert torch.isfinite(out).all()
        assert_close(out, oracle_attention(q, k, v, 0.29, keep, causal, bias), torch.float32, D, M,
                     msg=f"B{B} M{M} causal={causal}")
        assert torch.all(out[0] == 0)  # no key at all
        # the same call without the padding: what the rows of a batch padded to their own length give
        for b, n in enumerate(lengths):
            if n == 0 or causal:  # (causal alignment depends on M)
                continue
            alone = fused(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], 0.29, keep[b:b + 1, :n], False,
                          bias[:, :, :, :n].contiguous())
            assert_close(out[b:b + 1], alone, torch.float32, D, n, msg=f"row {b}")


@pytest.mark.parametrize("bb, hb, causal, padding", [(1, 1, False, False), (2, 3, False, True), (4, 1, True, True),
                                                   (1, 3, True, False)])
def test_forward_with_an_additive_bias(bb, hb, causal, padding):
    # Swin's case: a (Bb, Hb, N, M) bias, batch row b adding bias[b % Bb], head h bias[:, h % Hb]
    B, H, N, M, D, Dv = 4, 3, 11, 11 if causal else 15, 7, 5
    q, k, v = projected(B, H, N, M, D, Dv, seed=5)
    g = torch.Generator().manual_seed(6)
    bias = torch.randn(bb, hb, N, M, generator=g) * 3
    keep = keep_mask(B, M, empty_row=1) if padding else None
    out = fused(q, k, v, 0.41, keep, causal, bias)
    want = oracle_attention(q, k, v, 0.41, keep, causal, bias)
    assert_close(out, want, torch.float32, D, M, msg=f"bias {bb}x{hb}")
    if padding:
        assert torch.all(out[1] == 0)
    # a bias of zeros is no bias at all; a constant per row changes nothing either (softmax)
    zero = fused(q, k, v, 0.41, keep, causal, torch.zeros(1, 1, N, M))
    assert torch.equal(zero, fused(q, k, v, 0.41, keep, causal))
    shift = fused(q, k, v, 0.41, keep, causal, torch.full((1, H, N, 1), 2.5).expand(1, H, N, M))
    torch.testing.assert_close(shift, zero, rtol=2e-5, atol=2e-6)


def test_contiguous_and_projection_layouts_agree_bit_for_bit():
    q, k, v = projected(2, 3, 19, 23, 6, 10)
    keep = keep_mask(2, 23)
    a = fused(q, k, v, 0.5, keep, False)
    b = fused(q.contiguous(), k.contiguous(), v.contiguous(), 0.5, keep, False)
    assert torch.equal(a, b)
    # rows a BLAS cannot stride over (stride 0 along the tokens) are copied first
    k0 = k[:, :, :1].expand(-1, -1, 23, -1)
    assert_close(fused(q, k0, v, 0.5, keep, False), oracle_attention(q, k0, v, 0.5, keep, False),
                 torch.float32, 6, 23)


def test_softmax_alone_at_extreme_spreads():
    # v = identity: the output is the attention weights themselves, so the kernel's own exp is
    # checked over score gaps up to ~2000 (weights from 1 down to underflow) against torch's fp32
    # softmax of the same fp32 scores (width 1: one rounded product each, as in the kernel)
    N, M = 7, 45
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, N, 1, generator=g) * torch.tensor([0.01, 0.3, 1, 3, 10, 30, 100])[None, None, :, None]
    k = torch.linspace(-20, 20, M)[None, None, :, None]
    v = torch.eye(M)[None, None]
    w = fused(q, k, v, 1.0, None, False)
    want = torch.softmax(q @ k.transpose(-1, -2), -1)
    assert want.min() == 0 and want.max() == 1 and (want[want > 0].min() < 1e-30)  # the whole range
    torch.testing.assert_close(w, want, rtol=2e-6, atol=1e-37)
    assert torch.allclose(w.sum(-1), torch.ones(1, 1, N), atol=1e-6)


def test_nonfinite_values():
    q, k, v = projected(2, 2, 8, 12, 5, 7)
    keep = keep_mask(2, 12)
    pad = (~keep).nonzero()[0].tolist()
    kept = keep.nonzero()[0].tolist()
    # inf / NaN in masked keys and values never reach the output: the raw kernel's own doing
    # (one call, no check of the output, in inference); with gradients the public op finds them
    # by summing k and v and zeroes them before its one call, for the backward's sake
    kb, vb = k.clone(), v.clone()
    kb[pad[0], :, pad[1]] = float("nan")
    vb[pad[0], :, pad[1]] = float("inf")
    assert pad[1] < (keep[pad[0]].nonzero().max()), "a masked key before its row's last kept one"
    want = reference.attention(q, k, v, 0.4, keep)
    raw = fused(q, kb, vb, 0.4, keep, False)
    assert torch.equal(raw, fused(q, k, v, 0.4, keep, False))
    assert torch.isfinite(vb).logical_not().any()  # the caller's v is not changed
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = spp_kernels.attention(q, kb, vb, 0.4, keep)
    calls = [e.count for e in prof.key_averages() if e.key == "spp_ext::attention"]
    assert calls == [1]
    assert torch.equal(got, raw)
    assert_close(got, oracle_attention(q, k, v, 0.4, keep), torch.float32, 5, 12)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grads = []
    for kk, vv in ((kb, vb), (k.masked_fill(~keep[:, None, :, None], 0), v.masked_fill(~keep[:, None, :, None], 0))):
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, kk, vv))
        out = spp_kernels.attention(qg, kg, vg, 0.4, keep)
        out.square().sum().backward()
        grads.append((out, qg.grad, kg.grad, vg.grad))
    assert all(torch.isfinite(t).all() for t in grads[0])
    assert all(torch.equal(a, b) for a, b in zip(*grads))  # as if the masked values had been 0
    # NaN in a kept key reaches its batch row, as in the reference
    kn = k.clone()
    kn[kept[0], 0, kept[1], 0] = float("nan")
    out = fused(q, kn, v, 0.4, keep, False)
    assert torch.isnan(out[kept[0], 0]).all() and torch.isfinite(out[1 - kept[0]]).all()


def test_thread_count_does_not_change_the_result():
    q, k, v = projected(3, 4, 37, 41, 9, 13)
    keep = keep_mask(3, 41)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused(q, k, v, 0.3, keep, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, fused(q, k, v, 0.3, keep, True))


def test_opcheck():
    q, k, v = projected(2, 2, 6, 9, 5, 7)
    keep = keep_mask(2, 9)
    torch.library.opcheck(torch.ops.spp_ext.attention, (q, k, v, 0.25, keep, False))
    torch.library.opcheck(torch.ops.spp_ext.attention, (q.contiguous(), k, v, 0.25, None, True))
    torch.library.opcheck(torch.ops.spp_ext.attention, (q, k, v, 0.25, keep, False, torch.randn(1, 2, 6, 9)))


def test_argument_checks():
    q, k, v = projected(1, 2, 4, 4, 3, 5)
    with pytest.raises(RuntimeError, match="fp32"):
        torch.ops.spp_ext.attention(q.double(), k.double(), v.double(), 0.5, None, False)
    with pytest.raises(RuntimeError, match="keep must be"):
        torch.ops.spp_ext.attention(q, k, v, 0.5, torch.ones(2, 4, dtype=torch.bool), False)
    with pytest.raises(RuntimeError, match="v must be"):
        torch.ops.spp_ext.attention(q, k, v[:, :, :3], 0.5, None, False)
    for bad in (torch.zeros(1, 3, 4, 4), torch.zeros(2, 1, 4, 4), torch.zeros(1, 1, 4, 3), torch.zeros(1, 4, 4)):
        with pytest.raises(RuntimeError, match="bias must be"):
            torch.ops.spp_ext.attention(q, k, v, 0.5, None, False, bad)
    with pytest.raises(RuntimeError, match="bias must be fp32"):
        torch.ops.spp_ext.attention(q, k, v, 0.5, None, False, torch.zeros(1, 1, 4, 4, dtype=torch.float64))


def test_the_dispatcher_runs_it_for_fp32_cpu_calls(monkeypatch):
    monkeypatch.delenv("SPP_BACKEND", raising=False)
    assert dispatch.choose("attention", "cpu")[0] == "ext"
    calls = []
    real = ext()._fused_attention

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(ext(), "_fused_attention", counting)
    q, k, v = projected(2, 3, 10, 10, 8, 8)  # equal widths too (SDPA's flash kernel before)
    spp_kernels.attention(q, k, v, 0.3, keep_mask(2, 10))
    q2, k2, v2 = projected(2, 3, 10, 10, 8, 5)
    spp_kernels.attention(q2, k2, v2, 0.3, None, True)
    assert len(calls) == 2
    spp_kernels.attention(q, k, v, 0.3, bias=torch.zeros(1, 1, 10, 10))  # with a bias too
    assert len(calls) == 3
    # not in other dtypes or inside sdpa_only
    spp_kernels.attention(q.half(), k.half(), v.half(), 0.3)
    with reference.sdpa_only():
        spp_kernels.attention(q, k, v, 0.3)
    assert len(calls) == 3
    # SPP_BACKEND=torch: the torch backend's own routes
    monkeypatch.setenv("SPP_BACKEND", "torch")
    torch.testing.assert_close(spp_kernels.attention(q2, k2, v2, 0.3, None, True),
                               reference.attention(q2, k2, v2, 0.3, None, True), rtol=1e-5, atol=1e-6)
    assert len(calls) == 3


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_through_the_public_op(causal):
    q, k, v = projected(2, 3, 11, 14, 6, 9, seed=4)
    keep = keep_mask(2, 14, empty_row=1)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = spp_kernels.attention(*leaves, 0.3, keep, causal)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, do)
    l64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(oracle_attention(*l64, 0.3, keep, causal), l64, do.double())
    for name, a, b, n in zip("qkv", got, want, (14, 14, 11)):
        assert_close(a, b, torch.float32, 9, n, msg=f"d{name}")
    # the recorded forward is the inference one, bit for bit
    with torch.no_grad():
        assert torch.equal(spp_kernels.attention(q, k, v, 0.3, keep, causal), out.detach())


def test_gradients_with_a_bias_through_the_public_op():
    # Swin's windows: 4 images × 2 windows, one bias row per window and head, learnable
    q, k, v = projected(8, 3, 9, 9, 5, 6, seed=7)
    bias = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(8))
    leaves = [t.detach().requires_grad_() for t in (q, k, v, bias)]
    out = spp_kernels.attention(*leaves[:3], 0.45, None, False, bias=leaves[3])
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, do)
    l64 = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    want = torch.autograd.grad(oracle_attention(*l64[:3], 0.45, None, False, l64[3]), l64, do.double())
    for name, a, b in zip(("q", "k", "v", "bias"), got, want):
        assert_close(a, b, torch.float32, 6, 9 * 4, msg=f"d{name}")
    with torch.no_grad():  # the recorded forward is the inference one, bit for bit
        assert torch.equal(spp_kernels.attention(q, k, v, 0.45, None, False, bias=bias), out.detach())
