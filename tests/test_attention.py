"""The attention op of pruned layers: qk width != v width, odd widths, key padding and causal
masks, the explicit (original) scale. The reference and the torch (SDPA) backend against a
float64 oracle, per-dtype tolerances from tests/tolerances.py."""
import contextlib
import math

import pytest
import torch

import spp
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


def left_padding_mask(B, M):
    """Left padding: batch row 1 pads its first 3 keys, row 2 its first one (with causal masking
    the first queries of those rows see no key)."""
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[1, :3] = False
    mask[2, :1] = False
    return mask


@pytest.mark.parametrize("fn", [reference.attention, reference.sdpa_attention], ids=["reference", "sdpa"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("masking", ["none", "padding", "causal", "causal_padding"])
def test_attention_matches_the_oracle(fn, dtype, shape, masking):
    q, k, v = inputs(shape, dtype)
    scale = 1 / math.sqrt(64)  # the original head width's scale, not the pruned one's
    mask = padding_mask(shape[0], shape[2]) if masking.endswith("padding") else None
    causal = masking.startswith("causal")
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


def test_public_op_dispatches_on_cpu(monkeypatch):
    # the extension's attention (the torch routes with its fused forward) where it is built, else
    # the torch backend (SDPA / the chunked route); SPP_BACKEND=torch forces the latter
    monkeypatch.delenv("SPP_BACKEND", raising=False)
    from spp_kernels import _ext
    q, k, v = inputs((1, 2, 6, 5, 7), torch.float32)
    if _ext.available and getattr(_ext._C, "attention_cpu", 0):
        from spp_kernels import ext_ops
        want = ext_ops.attention(q, k, v, 0.3)
    else:
        want = reference.sdpa_attention(q, k, v, 0.3)
    assert torch.equal(spp_kernels.attention(q, k, v, 0.3), want)
    monkeypatch.setenv("SPP_BACKEND", "torch")
    assert torch.equal(spp_kernels.attention(q, k, v, 0.3), reference.sdpa_attention(q, k, v, 0.3))


@pytest.mark.parametrize("chunk_heads", [1, 2, 5, 100], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("masking", ["none", "padding", "causal", "causal_short_q", "causal_long_q", "empty_row",
                                     "causal_padding", "causal_left_padding"])
@pytest.mark.parametrize("widths", [(5, 9), (16, 9), (5, 32), (16, 32)], ids=lambda w: f"D{w[0]}_Dv{w[1]}")
def test_cpu_chunked_path_across_chunk_boundaries(monkeypatch, chunk_heads, masking, widths):
    """The fp32 CPU inference path of the torch backend (batched GEMM → softmax → GEMM in chunks
    of (batch, head) pairs) against the float64 oracle, with chunks that split batch rows and heads
    unevenly, unequal widths (odd ones take the transposed GEMMs, multiples of 16 the plain ones),
    key padding, causal with fewer queries than keys, and a batch row that masks every key."""
    B, H, N, M = 3, 3, 7, 7
    D, Dv = widths
    if masking == "causal_short_q":
        N = 4
    if masking == "causal_long_q":  # the first N - M queries see no key
        N = 9
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, H, N, D, generator=g)
    k, v = torch.randn(B, H, M, D, generator=g), torch.randn(B, H, M, Dv, generator=g)
    mask = None
    if masking in ("padding", "empty_row", "causal_padding"):
        mask = padding_mask(B, M, seed=3)
        if masking == "empty_row":
            mask[1] = False
    if masking == "causal_left_padding":
        mask = left_padding_mask(B, M)
    causal = masking.startswith("causal")
    monkeypatch.setattr(reference, "CPU_SCORE_CHUNK_BYTES", chunk_heads * N * M * 4)
    assert reference.use_cpu_chunked(q, k, v)
    out = reference.sdpa_attention(q, k, v, 0.37, mask, causal)
    assert out.shape == (B, H, N, Dv)
    if masking == "empty_row":
        assert torch.all(out[1] == 0)
    assert_close(out, oracle_attention(q, k, v, 0.37, mask, causal), torch.float32, D, M, msg=masking)
    # non-contiguous inputs (a transposed projection's view) give the same numbers
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(reference.sdpa_attention(qt, k, v, 0.37, mask, causal), out, rtol=0, atol=0)
    # the backward, chunk by chunk, against float64 autograd through the oracle
    qg, kg, vg = (t.clone().requires_grad_() for t in (qt, k, v))
    got = reference.sdpa_attention(qg, kg, vg, 0.37, mask, causal)
    torch.testing.assert_close(got, out, rtol=0, atol=0)  # autograd does not change the forward
    do = torch.randn(got.shape, generator=g)
    grads = torch.autograd.grad(got, (qg, kg, vg), do)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(oracle_attention(q64, k64, v64, 0.37, mask, causal), (q64, k64, v64), do.double())
    for name, a, b in zip("qkv", grads, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5, msg=f"d{name} {masking}")
    if masking == "empty_row":
        assert all(torch.all(gr[1] == 0) for gr in grads)
    if masking == "causal_long_q":
        assert torch.all(out[:, :, :2] == 0) and torch.all(grads[0][:, :, :2] == 0)
    if masking == "causal_left_padding":
        assert torch.all(out[1, :, :3] == 0) and torch.all(out[2, :, :1] == 0) and torch.all(grads[0][1, :, :3] == 0)
        assert out[1, :, 3:].abs().sum() > 0


@pytest.mark.parametrize("dims", [(0, 3, 7, 7), (2, 3, 0, 7), (2, 3, 7, 0), (1, 1, 1, 1)], ids=lambda d: "B%d_H%d_N%d_M%d" % d)
@pytest.mark.parametrize("widths", [(5, 9), (16, 32), (0, 9), (5, 0)], ids=lambda w: f"D{w[0]}_Dv{w[1]}")
@pytest.mark.parametrize("masking", ["none", "causal_padding"])
def test_cpu_chunked_path_empty_and_tiny_shapes(dims, widths, masking):
    """Zero batch, queries, keys or widths on the chunked route (transposed and plain products),
    also with key padding and causal together: the oracle's numbers, forward and backward (no
    keys: zeros, as in the reference); the SDPA route (bf16) gives the reference's too."""
    (B, H, N, M), (D, Dv) = dims, widths
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, M, D, generator=g)
    v = torch.randn(B, H, M, Dv, generator=g)
    mask, causal = None, False
    if masking == "causal_padding":
        mask, causal = torch.ones(B, M, dtype=torch.bool), True
        if M:
            mask[:, M - 1] = False
    assert reference.use_cpu_chunked(q, k, v)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    torch.testing.assert_close(reference.sdpa_attention(qb, kb, vb, 0.37, mask, causal),
                               reference.attention(qb, kb, vb, 0.37, mask, causal), rtol=2e-2, atol=2e-2)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = reference.cpu_chunked_attention(qg, kg, vg, 0.37, mask, causal)
    want = reference.attention(q, k, v, 0.37, mask, causal)
    assert out.shape == (B, H, N, Dv)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reference.cpu_chunked_attention(q, k, v, 0.37, mask, causal), out, rtol=0, atol=0)
    do = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (qg, kg, vg), do, allow_unused=True)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o64 = oracle_attention(q64, k64, v64, 0.37, mask, causal)  # no rows or no keys: no graph, zero gradients
    want_g = torch.autograd.grad(o64, (q64, k64, v64), do.double(), allow_unused=True) if o64.requires_grad \
        else (None, None, None)
    for name, a, b in zip("qkv", grads, want_g):
        b = torch.zeros_like(a) if b is None else b.float()
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"d{name}")


def test_cpu_chunked_backward_is_once_differentiable():
    """The chunked route's backward is not itself differentiable: asking for a second derivative
    raises instead of returning a wrong one."""
    q, k, v = (t.requires_grad_() for t in inputs((1, 2, 5, 3, 4), torch.float32))
    out = reference.sdpa_attention(q, k, v, 0.5)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        gq.sum().backward()


def test_cpu_chunked_path_is_taken_only_for_fp32_at_moderate_lengths(monkeypatch):
    """Half dtypes, ``sdpa_kernel(MATH)``, ``sdpa_only`` and sequences whose per-head scores exceed
    the chunk budget keep SDPA; autograd takes the chunked route too, with its own backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = inputs((2, 2, 6, 5, 7), torch.float32)
    assert reference.use_cpu_chunked(q, k, v)
    assert not reference.use_cpu_chunked(q.bfloat16(), k.bfloat16(), v.bfloat16())
    with sdpa_kernel(SDPBackend.MATH):
        assert not reference.use_cpu_chunked(q, k, v)
    with reference.sdpa_only():
        with reference.sdpa_only():
            assert not reference.use_cpu_chunked(q, k, v)
        assert not reference.use_cpu_chunked(q, k, v)
    assert reference.use_cpu_chunked(q, k, v)
    monkeypatch.setattr(reference, "CPU_SCORE_CHUNK_BYTES", 6 * 6 * 4 - 1)
    assert not reference.use_cpu_chunked(q, k, v)
    # equal widths: flash takes them unpadded, and was faster, even where one chunk holds all
    qe, ke, ve = inputs((2, 2, 6, 5, 5), torch.float32)
    monkeypatch.setattr(reference, "CPU_SCORE_CHUNK_BYTES", 2 * 2 * 6 * 6 * 4)
    assert not reference.use_cpu_chunked(qe, ke, ve) and reference.use_cpu_chunked(q, k, v)
    monkeypatch.undo()
    qg = q.clone().requires_grad_()
    assert reference.use_cpu_chunked(qg, k, v)
    out = reference.sdpa_attention(qg, k, v, 0.3)
    assert out.grad_fn is not None and "CpuChunked" in type(out.grad_fn).__name__
    out.square().sum().backward()
    q64 = q.double().requires_grad_()
    oracle_attention(q64, k, v, 0.3).square().sum().backward()
    torch.testing.assert_close(qg.grad, q64.grad.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, v: (q[0], k, v, 0.5, None, False), "q must be 4-D"),
    (lambda q, k, v: (q, k[..., :2], v, 0.5, None, False), "k's width"),
    (lambda q, k, v: (q, k, v[:, :, :3], 0.5, None, False), "v has 3 tokens"),
    (lambda q, k, v: (q, k, v.double(), 0.5, None, False), "v must be float32"),
    (lambda q, k, v: (q, k, v.half(), 0.5, None, False), "share a dtype"),
    (lambda q, k, v: (q, k, v, 0.0, None, False), "scale must be"),
    (lambda q, k, v: (q, k, v, 0.5, torch.ones(2, 5), False), "bool tensor"),
    (lambda q, k, v: (q, k, v, 0.5, torch.ones(2, 4, dtype=torch.bool), False), "attn_mask must be"),
    (lambda q, k, v: (q, k, v, 0.5, None, False, torch.ones(1, 2, 5, 5, dtype=torch.int64)), "bias must be a float"),
    (lambda q, k, v: (q, k, v, 0.5, None, False, torch.ones(1, 2, 5, 4)), r"bias must be \(Bb"),
    (lambda q, k, v: (q, k, v, 0.5, None, False, torch.ones(1, 3, 5, 5)), r"bias must be \(Bb"),
    (lambda q, k, v: (q, k, v, 0.5, None, False, torch.ones(3, 1, 5, 5)), "dividing the batch 2"),
    (lambda q, k, v: (q, k, v, 0.5, None, False, torch.ones(2, 5, 5)), r"bias must be \(Bb"),
    (lambda q, k, v: (q, k, v, 0.5, None, False, torch.ones(1, 1, 5, 5, device="meta")), "bias is on meta"),
    (lambda q, k, v: (q, k, v, 0.5, None, False, torch.full((1, 1, 5, 5), float("-inf"))), "bias must be finite"),
])
def test_bad_arguments_name_the_argument(bad, match):
    q, k, v = inputs((2, 2, 5, 3, 4), torch.float32)
    for fn in (reference.attention, reference.sdpa_attention):
        with pytest.raises((ValueError, TypeError), match=match):
            fn(*bad(q, k, v))


BIAS_SHAPES = [(1, 1), (1, 3), (2, 3), (4, 1)]  # (Bb, Hb) for B = 4, H = 3


def swin_like_bias(bs, N, M, seed=9, dtype=torch.float32):
    """A (Bb, Hb, N, M) bias like Swin's: random (relative position) values plus -100 blocks (its
    shifted-window mask)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(*bs, N, M, generator=g)
    b[..., : N // 3, M // 2:] -= 100.0
    return b.to(dtype)


@pytest.mark.parametrize("route", ["reference", "torch", "sdpa_only"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("widths", [(5, 9), (16, 16)], ids=lambda w: f"D{w[0]}_Dv{w[1]}")
@pytest.mark.parametrize("bs", BIAS_SHAPES, ids=lambda b: f"Bb{b[0]}_Hb{b[1]}")
@pytest.mark.parametrize("masking", ["none", "padding", "causal_padding"])
def test_additive_bias_matches_the_oracle(route, dtype, widths, bs, masking):
    """bias (Bb, Hb, N, M), batch row b adding bias[b % Bb], on every route: the reference, the
    torch backend (fp32: the chunked CPU route, which every bias takes; fp16 / bf16: SDPA) and,
    within ``sdpa_only``, SDPA with the bias tiled into its float mask."""
    B, H, N = 4, 3, 7
    q, k, v = inputs((B, H, N, *widths), dtype, seed=4)
    bias = swin_like_bias(bs, N, N, dtype=dtype)
    mask = padding_mask(B, N) if masking.endswith("padding") else None
    causal = masking.startswith("causal")
    assert reference.use_cpu_chunked(q, k, v, mask, bias) == (dtype == torch.float32)
    fn = reference.attention if route == "reference" else reference.sdpa_attention
    with reference.sdpa_only() if route == "sdpa_only" else contextlib.nullcontext():
        out = fn(q, k, v, 0.3, mask, causal, bias)
    want = oracle_attention(q, k, v, 0.3, mask, causal, bias)
    assert_close(out, want, dtype, widths[0], N, msg=f"{route} {bs} {masking}")
    assert (out.double() - oracle_attention(q, k, v, 0.3, mask, causal)).abs().max() > 0.1  # the bias matters


@pytest.mark.parametrize("route, chunk_heads", [("chunked", 1), ("chunked", 2), ("chunked", 5), ("chunked", 100),
                                               ("sdpa", 1)], ids=lambda r: str(r))
@pytest.mark.parametrize("bs", BIAS_SHAPES, ids=lambda b: f"Bb{b[0]}_Hb{b[1]}")
@pytest.mark.parametrize("masking", ["none", "padding", "causal_left_padding"])
def test_additive_bias_gradients(monkeypatch, route, chunk_heads, bs, masking):
    """dq, dk, dv and dbias (summed over the batch rows and heads that share a bias row) against
    float64 autograd: on the chunked route across chunk boundaries (chunks that split batch rows
    and heads unevenly; unequal and equal widths) and on the SDPA route (``sdpa_only``)."""
    B, H, N = 4, 3, 7
    widths = (5, 9) if chunk_heads != 2 else (8, 8)
    q, k, v = inputs((B, H, N, *widths), torch.float32, seed=6)
    bias = swin_like_bias(bs, N, N)
    mask = None
    if masking == "padding":
        mask = padding_mask(B, N, seed=3)
    if masking == "causal_left_padding":
        mask = left_padding_mask(B, N)
    causal = masking.startswith("causal")
    monkeypatch.setattr(reference, "CPU_SCORE_CHUNK_BYTES", chunk_heads * N * N * 4)
    ts = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    with reference.sdpa_only() if route == "sdpa" else contextlib.nullcontext():
        assert reference.use_cpu_chunked(q, k, v, mask, bias) == (route == "chunked")
        out = reference.sdpa_attention(*ts[:3], 0.3, mask, causal, ts[3])
    assert ("CpuChunked" in type(out.grad_fn).__name__) == (route == "chunked")
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(out, ts, do)
    t64 = [t.double().requires_grad_() for t in (q, k, v, bias)]
    ref = oracle_attention(*t64[:3], 0.3, mask, causal, t64[3])
    want = torch.autograd.grad(ref, t64, do.double())
    assert_close(out, ref, torch.float32, widths[0], N, msg=f"out {masking}")
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), grads, want):
        assert a.shape == b.shape and torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5, msg=f"{name} {masking} {bs}")
    assert grads[3].abs().sum() > 0
    if masking == "causal_left_padding":  # rows without keys pass no gradient, also not to the bias
        assert torch.all(out[1, :, :3] == 0) and torch.all(grads[0][1, :, :3] == 0)


def test_additive_bias_without_grad_inputs_and_with_bias_grad_alone():
    """Only the bias requires grad (a trainable Swin table behind frozen weights): the chunked
    route still records a graph and gives dbias."""
    q, k, v = inputs((4, 3, 7, 5, 9), torch.float32, seed=1)
    bias = swin_like_bias((2, 3), 7, 7).requires_grad_()
    out = reference.sdpa_attention(q, k, v, 0.3, None, False, bias)
    assert "CpuChunked" in type(out.grad_fn).__name__
    (got,) = torch.autograd.grad(out.square().sum(), bias)
    b64 = bias.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(oracle_attention(q, k, v, 0.3, None, False, b64).square().sum(), b64)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_vmap_over_the_bias():
    """vmap over the bias alone (q, k, v shared): the per-bias results (SDPA route inside vmap)."""
    q, k, v = inputs((2, 3, 6, 5, 7), torch.float32)
    biases = torch.stack([swin_like_bias((2, 3), 6, 6, seed=s) for s in range(3)])
    got = torch.func.vmap(lambda b: reference.sdpa_attention(q, k, v, 0.3, None, False, b))(biases)
    with torch.no_grad():
        want = torch.stack([reference.sdpa_attention(q, k, v, 0.3, None, False, b) for b in biases])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_additive_bias_under_torch_compile():
    """fullgraph=True with a bias (compiled code takes SDPA with the tiled bias)."""
    q, k, v = inputs((4, 3, 6, 5, 7), torch.float32)
    bias = swin_like_bias((2, 3), 6, 6)
    mask = padding_mask(4, 6)
    fn = torch.compile(lambda a, b: reference.sdpa_attention(a, k, v, 0.3, mask, False, b), backend="eager",
                       fullgraph=True)
    qg, bg = q.clone().requires_grad_(), bias.clone().requires_grad_()
    got = fn(qg, bg)
    g = torch.autograd.grad(got.square().sum(), (qg, bg))
    qe, be = q.clone().requires_grad_(), bias.clone().requires_grad_()
    want = reference.sdpa_attention(qe, k, v, 0.3, mask, False, be)
    w = torch.autograd.grad(want.square().sum(), (qe, be))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, w):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_public_op_passes_the_bias_on():
    q, k, v = inputs((4, 3, 7, 5, 9), torch.float32)
    bias = swin_like_bias((2, 1), 7, 7)
    torch.testing.assert_close(spp_kernels.attention(q, k, v, 0.3, bias=bias),
                               reference.attention(q, k, v, 0.3, bias=bias), rtol=1e-5, atol=1e-6)


# ============================================================================ the layers' attention core
def test_key_padding_reads_hugging_face_and_bool_masks():
    from spp.layers import key_padding

    keep = torch.tensor([[True, True, False, True, False], [True, False, True, True, True]])
    low = torch.finfo(torch.float32).min
    additive = torch.zeros(2, 1, 1, 5).masked_fill(~keep[:, None, None, :], low)
    assert key_padding(None, 2, 5) is None
    assert torch.equal(key_padding(keep[:, None, None, :], 2, 5), keep)
    assert torch.equal(key_padding(additive, 2, 5), keep)
    inf = torch.zeros(2, 1, 1, 5).masked_fill(~keep[:, None, None, :], float("-inf"))
    assert torch.equal(key_padding(inf, 2, 5), keep)
    # Hugging Face's materialised (B, 1, N, M) masks with equal query rows, broadcast or not
    assert torch.equal(key_padding(keep[:, None, None, :].expand(2, 1, 3, 5), 2, 5), keep)
    assert torch.equal(key_padding(additive.expand(2, 1, 3, 5).clone(), 2, 5), keep)
    assert key_padding(torch.zeros(1, 1, 1, 5), 2, 5) is None  # masks nothing
    assert torch.equal(key_padding(keep[:1].reshape(1, 1, 5), 2, 5), keep[:1].expand(2, 5))  # leading dims 1
    # what a key-padding mask cannot express stays with SDPA
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    assert key_padding(causal[None, None].expand(2, 1, 5, 5), 2, 5) is False  # per-query rows
    assert key_padding(causal[:2], 2, 5) is False  # a 2-D (N, M) mask is per query, not per batch row
    assert key_padding(keep[:, None, :], 2, 5) is False  # (X, 1, M) is per head in SDPA
    assert key_padding(torch.randn(2, 1, 1, 5), 2, 5) is False  # a real-valued bias
    assert key_padding(torch.zeros(2, 4, 5, 5), 2, 5) is False  # per head (Swin's relative bias)
    assert key_padding(additive, 2, 6) is False  # wrong key count
    all_masked = additive.clone()
    all_masked[1] = low
    assert key_padding(all_masked, 2, 5) is False  # SDPA averages there; the op would give 0
    assert key_padding(additive.clone().requires_grad_(), 2, 5) is False
    assert key_padding(keep[:, None, None, :], 2, 5, device="meta") is False  # another device


@pytest.mark.parametrize("mask_kind", ["none", "hf_additive", "bias"])
def test_layer_core_matches_sdpa_math_for_pruned_widths(mask_kind):
    """MaskedAttention's core with unequal qk / v widths (a pruned layer) equals SDPA's math kernel
    on the unpadded tensors, whichever route (dispatcher op or padded SDPA) the mask takes."""
    from helpers import sdpa_math_layer_output
    from spp.layers import MaskedAttention

    B, H, N, D, Dv, d = 2, 3, 9, 5, 7, 12
    g = torch.Generator().manual_seed(4)
    lin = lambda i, o: torch.nn.Linear(i, o)  # noqa: E731
    torch.manual_seed(4)
    layer = MaskedAttention(lin(d, H * D), lin(d, H * D), lin(d, H * Dv), lin(H * Dv, d), H, D, Dv, scale=0.21).eval()
    x = torch.randn(B, N, d, generator=g)
    if mask_kind == "none":
        mask = None
    elif mask_kind == "hf_additive":
        keep = torch.ones(B, N, dtype=torch.bool)
        keep[1, 6:] = False
        mask = torch.zeros(B, 1, 1, N).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    else:
        mask = torch.randn(B, H, N, N, generator=g)
    got = layer.forward_core(x, mask)
    torch.testing.assert_close(got, sdpa_math_layer_output(layer, x, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("drop", [0.0, 0.2], ids=["op", "dropout_sdpa"])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "hf_additive"])
def test_layer_core_with_bias_and_causal(drop, mask_kind):
    """forward_core with a bias, is_causal and a mask together: the op without dropout, SDPA with
    one combined mask under attention dropout (SDPA takes no mask with is_causal) — both equal to
    SDPA's math kernel on that mask (the same dropout draw from the same seed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from spp.layers import MaskedAttention

    B, H, N, D, Dv, d = 4, 3, 9, 5, 7, 12
    g = torch.Generator().manual_seed(5)
    lin = lambda i, o: torch.nn.Linear(i, o)  # noqa: E731
    torch.manual_seed(5)
    layer = MaskedAttention(lin(d, H * D), lin(d, H * D), lin(d, H * Dv), lin(H * Dv, d), H, D, Dv, scale=0.21,
                            attn_drop=drop).train()
    x = torch.randn(B, N, d, generator=g)
    bias = swin_like_bias((2, 3), N, N)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, 6:] = False
    mask = {"none": None, "padding": keep[:, None, None, :],
            "hf_additive": torch.zeros(B, 1, 1, N).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
            }[mask_kind]
    torch.manual_seed(7)
    with sdpa_kernel(SDPBackend.MATH):
        got = layer.forward_core(x, mask, True, bias)
    full = reference.tile_bias(bias, B).masked_fill(~reference.causal_keep(N, N), float("-inf"))
    if mask is not None:
        full = full.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else full + mask
    torch.manual_seed(7)
    with sdpa_kernel(SDPBackend.MATH):
        q = layer.q(x).view(B, N, H, D).transpose(1, 2)
        k = layer.k(x).view(B, N, H, D).transpose(1, 2)
        v = layer.v(x).view(B, N, H, Dv).transpose(1, 2)
        ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full, scale=0.21, dropout_p=drop)
        want = layer.o(ctx.transpose(1, 2).reshape(B, N, H * Dv))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_values_of_a_mask_are_remembered_only_while_it_is_unchanged():
    """The host routes remember what they derive from a key-padding mask (for the layers of one
    forward): a mask changed in place, another mask, other head counts or query counts, causal or
    not, and an inference-mode mask all give the oracle's numbers."""
    q, k, v = inputs((2, 3, 7, 5, 9), torch.float32)
    mask = padding_mask(2, 7, seed=3)
    for step in range(5):
        if step == 1:
            mask[1, :] = True  # in place: the version counter moves
        if step == 2:
            mask[1, :] = False  # a batch row without keys
        if step == 3:
            mask = padding_mask(2, 7, seed=4)  # another tensor
        for causal in (False, True):
            for qq, kk, vv in ((q, k, v), (q[:, :2], k[:, :2], v[:, :2]), (q[:, :, :4], k, v)):
                want = oracle_attention(qq, kk, vv, 0.3, mask, causal)
                got = reference.sdpa_attention(qq, kk, vv, 0.3, mask, causal)
                assert_close(got, want, torch.float32, 5, 7, msg=f"step {step} causal {causal} {tuple(qq.shape)}")
    with torch.inference_mode():
        im = padding_mask(2, 7, seed=5)
        got = reference.sdpa_attention(q, k, v, 0.3, im, True)
    assert_close(got, oracle_attention(q, k, v, 0.3, im, True), torch.float32, 5, 7)


def test_remembered_values_serve_grad_mode_after_inference_mode():
    """A mask first seen under inference mode, then in a training step (rows without keys: the
    remembered rows tensor is saved for the backward): values are computed outside inference mode."""
    q, k, v = inputs((2, 2, 5, 4, 4), torch.float32)  # equal widths: the SDPA route
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    with torch.inference_mode():
        reference.sdpa_attention(q, k, v, 0.3, mask)
    qg = q.clone().requires_grad_()
    out = reference.sdpa_attention(qg, k, v, 0.3, mask)
    (g,) = torch.autograd.grad(out.sum(), qg)
    assert torch.all(out[1] == 0) and torch.all(g[1] == 0) and g[0].abs().sum() > 0


def test_remembered_memo_is_bounded_and_thread_safe():
    """One mask reused at many shapes keeps at most _MASK_MEMO_KEYS values; threads running the op
    with their own masks at once always get their own mask's numbers."""
    import threading

    mask = padding_mask(2, 9, seed=2)
    for n in range(1, 40):
        q = torch.randn(2, 2, n, 3)
        reference.sdpa_attention(q, *inputs((2, 2, 9, 3, 5), torch.float32)[1:], 0.3, mask, True)
    entry = next(e for e in reference._MASK_MEMO if e[0]() is mask)
    assert len(entry[2]) <= reference._MASK_MEMO_KEYS
    q, k, v = inputs((2, 3, 7, 5, 9), torch.float32)
    masks = [padding_mask(2, 7, seed=s) for s in range(6)]
    for m in masks:
        m[1, : 1 + len(masks)] = False
    wants = [oracle_attention(q, k, v, 0.3, m, True) for m in masks]
    errors = []

    def run(i):
        try:
            for _ in range(60):
                assert_close(reference.sdpa_attention(q, k, v, 0.3, masks[i], True), wants[i], torch.float32, 5, 7)
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(masks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_bias_must_be_finite_in_the_dtype_of_q():
    """An fp32 bias of -1e5 is finite, but -inf as fp16 (SDPA's mask takes q's dtype): refused for
    fp16 q, accepted for fp32 q (every route near the oracle: fp32 keeps ~0.008 of a logit at 1e5)."""
    q, k, v = inputs((1, 1, 3, 4, 4), torch.float16)
    bias = torch.zeros(1, 1, 3, 3)
    bias[0, 0, 0] = -1e5
    for fn in (reference.attention, reference.sdpa_attention):
        with pytest.raises(ValueError, match="also as float16"):
            fn(q, k, v, 0.5, None, False, bias)
    q, k, v = (t.float() for t in (q, k, v))
    want = oracle_attention(q, k, v, 0.5, None, False, bias)
    for route in (contextlib.nullcontext(), reference.sdpa_only()):
        with route:
            torch.testing.assert_close(reference.sdpa_attention(q, k, v, 0.5, None, False, bias).double(), want,
                                       rtol=0, atol=5e-3)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_attention_on_pruned_widths_matches_eager(impl):
    """spp.layers.hf_attention (the Llama / OPT / CLIP adapters' call into Hugging Face's attention
    functions) on unequal qk / v widths and GQA: the padded SDPA route equals the eager function."""
    import types

    from transformers.models.llama.modeling_llama import eager_attention_forward

    from spp.layers import hf_attention

    B, H, G, N, D, Dv = 2, 4, 2, 9, 6, 11
    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(B, H, N, D, generator=g), torch.randn(B, G, N, D, generator=g), torch.randn(B, G, N, Dv, generator=g)
    mask = torch.zeros(B, 1, N, N).masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))
    module = types.SimpleNamespace(num_key_value_groups=H // G, training=False, is_causal=True)
    cfg = types.SimpleNamespace(_attn_implementation=impl)
    got, _ = hf_attention(module, cfg, eager_attention_forward, q, k, v, mask, dropout=0.0, scaling=0.3)
    want, _ = eager_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    assert got.shape == (B, N, H, Dv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["causal", "causal_gqa", "causal_mask", "causal_padded", "encoder_padded",
                                  "decode_padded", "causal_left_padded", "causal_left_padded_bool", "causal_cache",
                                  "dropout", "sliding_window"])
def test_hf_attention_sdpa_runs_the_op_where_it_is_exact(monkeypatch, case):
    """hf_attention with "sdpa" computes Hugging Face's sdpa function through spp_kernels.attention
    where the op is exact (no mask, key padding, causal over as many keys as queries, a causal ∧
    padding mask in which every query sees a key, or a bool one — Hugging Face's form for "sdpa" —
    with left padding, where SDPA gives the queries without a key 0 as the op does; GQA), and
    leaves the rest to that function (left padding in an additive mask, where SDPA averages those
    rows, a causal call with cached keys, dropout, sliding windows); both give the function's
    numbers on unequal widths, and the same gradients where the op runs."""
    import types

    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    import spp_kernels
    from spp.layers import hf_attention

    B, H, N, M, D, Dv = 3, 4, 7, 7, 6, 11
    G = 2 if case == "causal_gqa" else H
    if case == "decode_padded":
        N = 1
    if case == "causal_cache":
        N = 3
    g = torch.Generator().manual_seed(12)
    q = torch.randn(B, H, N, D, generator=g)
    k, v = torch.randn(B, G, M, D, generator=g), torch.randn(B, G, M, Dv, generator=g)
    lens = torch.tensor([7, 4, 6])
    pad = torch.arange(M)[None] < lens[:, None]
    mask = None
    if case in ("encoder_padded", "decode_padded"):  # HF's additive form, one row per batch row
        mask = torch.zeros(B, 1, N, M).masked_fill(~pad[:, None, None, :], torch.finfo(torch.float32).min)
    if case.startswith(("causal_padded", "causal_left_padded")):  # HF's causal ∧ padding mask
        if case.startswith("causal_left_padded"):  # the first queries of batch rows 1 and 2 see no key
            pad = pad.flip(-1)
        keep = torch.ones(N, M, dtype=torch.bool).tril() & pad[:, None, None, :]
        mask = keep if case.endswith("bool") else torch.zeros(B, 1, N, M).masked_fill(~keep, torch.finfo(torch.float32).min)
    if case == "causal_mask":  # a causal mask built without padding, as CLIP's text tower does
        mask = torch.ones(N, M, dtype=torch.bool).tril().expand(B, 1, N, M)
    module = types.SimpleNamespace(num_key_value_groups=H // G, training=False,
                                   is_causal=case not in ("encoder_padded", "causal_mask"))
    cfg = types.SimpleNamespace(_attn_implementation="sdpa")
    kw = {"dropout": 0.3 if case == "dropout" else 0.0, "scaling": 0.3}
    if case == "causal_mask":
        kw["is_causal"] = True
    if case == "sliding_window":
        kw["sliding_window"] = 4
    calls = []
    op = spp_kernels.attention
    monkeypatch.setattr(spp_kernels, "attention", lambda *a: calls.append(a[4:]) or op(*a))
    got, weights = hf_attention(module, cfg, eager_attention_forward, q, k, v, mask, **kw)
    ours = case in ("causal", "causal_gqa", "causal_mask", "causal_padded", "encoder_padded", "decode_padded",
                    "causal_left_padded_bool")
    assert len(calls) == (1 if ours else 0), calls
    if ours:
        keys, causal = calls[0]
        assert causal == case.startswith("causal")
        assert (keys is None) == (case in ("causal", "causal_gqa", "causal_mask"))
    assert got.shape == (B, N, H, Dv) and weights is None
    if case != "dropout":
        want, _ = sdpa_attention_forward(module, q, k, v, mask, **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if case == "causal_left_padded_bool":
        assert torch.all(got[1, :3] == 0) and torch.all(got[2, :1] == 0)
    if ours:
        do = torch.randn(got.shape, generator=g)
        ts = [t.clone().requires_grad_() for t in (q, k, v)]
        mine = torch.autograd.grad(hf_attention(module, cfg, eager_attention_forward, *ts, mask, **kw)[0], ts, do)
        ts = [t.clone().requires_grad_() for t in (q, k, v)]
        theirs = torch.autograd.grad(sdpa_attention_forward(module, *ts, mask, **kw)[0], ts, do)
        for name, a, b in zip("qkv", mine, theirs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"d{name} {case}")


def test_hf_attention_default_scale_follows_the_qk_width_when_sdpa_pads():
    """Without ``scaling`` the scale is 1/√D of the qk width also where the widths are padded for
    SDPA's flash kernel (a causal ∧ padding mask keeps Hugging Face's function)."""
    import types

    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from spp.layers import hf_attention

    B, H, N, D, Dv = 2, 2, 5, 4, 9
    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, Dv, generator=g)
    keep = torch.ones(N, N, dtype=torch.bool).tril() & torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:, None, None, :]
    module = types.SimpleNamespace(num_key_value_groups=1, training=False, is_causal=True)
    cfg = types.SimpleNamespace(_attn_implementation="sdpa")
    got, _ = hf_attention(module, cfg, eager_attention_forward, q, k, v, keep, dropout=0.0)
    want, _ = sdpa_attention_forward(module, q, k, v, keep, dropout=0.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["rows", "batch"])
def test_hf_attention_leaves_masks_of_the_wrong_shape_to_sdpa(bad):
    """A key-padding mask with a query count other than 1 or N, or a causal mask whose batch is
    neither 1 nor B, is not taken by the op: Hugging Face's function (SDPA) refuses it as before."""
    import types

    from transformers.models.llama.modeling_llama import eager_attention_forward

    from spp.layers import hf_attention

    B, H, N, D, Dv = 3, 2, 5, 4, 7
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, Dv, generator=g)
    if bad == "rows":
        mask = torch.ones(B, 1, N + 1, N, dtype=torch.bool)
        mask[1, ..., 3:] = False
    else:
        mask = torch.ones(N, N, dtype=torch.bool).tril().expand(2, 1, N, N)
    module = types.SimpleNamespace(num_key_value_groups=1, training=False, is_causal=False)
    cfg = types.SimpleNamespace(_attn_implementation="sdpa")
    with pytest.raises(RuntimeError):
        hf_attention(module, cfg, eager_attention_forward, q, k, v, mask, dropout=0.0, scaling=0.3)


def test_key_padding_is_read_once_per_mask_and_rereads_a_changed_one():
    from spp import layers

    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[1, ..., 4:] = False
    first = layers.key_padding(keep, 2, 6)
    assert layers.key_padding(keep, 2, 6) is first  # the same tensor, unchanged: remembered
    keep[0, ..., 0] = False  # changed in place: its version counter moved, so it is read again
    again = layers.key_padding(keep, 2, 6)
    assert again is not first and not bool(again[0, 0])
    additive = torch.zeros(2, 1, 1, 6)
    a1 = layers.key_padding(additive, 2, 6)
    additive[1, ..., 5] = torch.finfo(torch.float32).min  # an additive mask's result is a new tensor
    a2 = layers.key_padding(additive, 2, 6)
    assert a1 is None and not bool(a2[1, 5]) and bool(a2[0].all())
    other = keep.clone()
    other[1, ..., :] = True
    assert bool(layers.key_padding(other, 2, 6)[1].all())  # another tensor is not confused with it
    assert layers.key_padding(keep, 2, 7) is False  # nor are other arguments
    grad = torch.zeros(2, 1, 1, 6)
    assert layers.key_padding(grad, 2, 6) is None
    assert layers.key_padding(grad.requires_grad_(), 2, 6) is False  # requires_grad_ moves no version counter


def test_pruned_bert_runs_under_inference_mode():
    """Inference tensors have no version counter: the mask is read without being remembered."""
    from helpers import bert_batch, tiny_bert
    from spp.baselines import magnitude_path

    model = tiny_bert()
    batch = bert_batch(seed=1)
    batch["attention_mask"][0, -3:] = 0
    h = spp.attach(model)
    small = spp.prune(h.model, magnitude_path(h).masks(keep=0.5))
    with torch.no_grad():
        want = small(**batch).last_hidden_state
    with torch.inference_mode():
        got = small(**batch).last_hidden_state
        again = small(**batch).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(again, want, rtol=0, atol=0)


def test_inference_tensor_masks_are_read_once_per_forward_of_a_pruned_model(monkeypatch):
    """Under inference_mode a model's mask is an inference tensor (no version counter): a pruned
    model's forward hooks remember what its layers derive from it for that forward only — one
    reading per forward, a fresh one for the next forward (which sees an in-place change made in
    between), nothing left behind after it, also when the forward raises."""
    from helpers import bert_batch, tiny_bert
    from spp import layers
    from spp.baselines import magnitude_path

    model = tiny_bert()
    batch = bert_batch(seed=1)
    batch["attention_mask"][0, -3:] = 0
    h = spp.attach(model)
    small = spp.prune(h.model, magnitude_path(h).masks(keep=0.5))
    spp.detach(model)
    reads = []
    read = layers._key_padding
    monkeypatch.setattr(layers, "_key_padding", lambda *a, **kw: reads.append(1) or read(*a, **kw))
    with torch.no_grad():
        want = small(**batch).last_hidden_state
        batch2 = dict(batch, attention_mask=batch["attention_mask"].clone())
        batch2["attention_mask"][1, -2:] = 0
        want2 = small(**batch2).last_hidden_state
    reads.clear()
    with torch.inference_mode():
        mask = batch["attention_mask"].clone()
        got = small(**dict(batch, attention_mask=mask)).last_hidden_state
        assert len(reads) == 1 and reference._FORWARD.get() is None
        mask[1, -2:] = 0  # in place, between forwards
        got2 = small(**dict(batch, attention_mask=mask)).last_hidden_state
        assert len(reads) == 2
        with pytest.raises(IndexError):
            small(input_ids=batch["input_ids"] + 10 ** 6, attention_mask=mask)  # ids past the vocabulary
        assert reference._FORWARD.get() is None
        # Ctrl-C in the middle of a forward skips even always_call hooks: the next forward drops
        # the cut-short one's memo, so a mask changed in place since is read afresh
        layer = small.encoder.layer[1]
        stop = layer.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            small(**dict(batch, attention_mask=mask))
        stop.remove()
        assert reference._FORWARD.get() is not None
        mask.copy_(batch["attention_mask"])  # back to the first batch's padding, in place
        got3 = small(**dict(batch, attention_mask=mask)).last_hidden_state
        assert reference._FORWARD.get() is None
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got2, want2, rtol=0, atol=0)
    torch.testing.assert_close(got3, want, rtol=0, atol=0)
    assert len(small._forward_pre_hooks) == 1 and len(small._forward_hooks) == 1


def test_forward_memo_nests_holds_its_masks_and_drops_an_interrupted_forward():
    with torch.inference_mode():
        m = torch.ones(2, 3, dtype=torch.bool)
        calls = []
        with reference.one_forward():
            assert reference.remembered(m, "k", lambda: calls.append(1) or 5) == 5
            with reference.one_forward():  # a nested forward: its own memo
                assert reference.remembered(m, "k", lambda: calls.append(1) or 6) == 6
                assert reference.remembered(m, "k", lambda: calls.append(1) or 0) == 6
            assert reference.remembered(m, "k", lambda: calls.append(1) or 0) == 5  # the outer one is back
            assert reference._FORWARD.get()[0][id(m)][0] is m  # held: its id cannot be reused meanwhile
        assert reference._FORWARD.get() is None
        assert reference.remembered(m, "k", lambda: calls.append(1) or 7) == 7  # outside: not remembered
        assert len(calls) == 3
        # a forward cut short by KeyboardInterrupt never runs its exit hook: the same model's next
        # forward drops it, and once that one ends no memo is left
        model = torch.nn.Identity()
        reference.enter_forward(model, ())
        reference.remembered(m, "k", lambda: 8)
        reference.enter_forward(model, ())
        assert reference.remembered(m, "k", lambda: 9) == 9
        reference.exit_forward(model, (), None)
        assert reference._FORWARD.get() is None


def test_causal_with_unequal_query_and_key_counts_on_both_routes():
    """Query rows with no key to attend are 0 (not NaN) on the inference route too."""
    q, k, v = torch.randn(1, 1, 4, 2), torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 3)
    want = reference.attention(q, k, v, 0.5, None, True)
    with torch.no_grad():
        torch.testing.assert_close(reference.sdpa_attention(q, k, v, 0.5, None, True), want)
    with reference.sdpa_only():  # SDPA's route, whose is_causal is aligned top-left: given tril(M - N)
        torch.testing.assert_close(reference.sdpa_attention(q, k, v, 0.5, None, True), want)
        torch.testing.assert_close(reference.sdpa_attention(k, q, q[..., :3], 0.5, None, True),
                                   reference.attention(k, q, q[..., :3], 0.5, None, True))


@pytest.mark.parametrize("dropped", ["tail", "row"])
@pytest.mark.parametrize("route", ["reference", "reference_grad", "chunked", "chunked_grad", "sdpa", "sdpa_grad", "bf16",
                                   "ext", "ext_grad"])
def test_inf_and_nan_at_padding_keys_never_reach_the_output(route, dropped):
    """A masked-out key holding inf or NaN (fp16 overflow in a padded row) leaves the output and
    the gradients equal to those of the same inputs with zeros there, on every route of the torch
    backend and on the ext backend's fused CPU kernel, also where a batch row masks every key; an
    additive mask alone would turn the whole batch row into NaN."""
    if route.startswith("ext"):
        from spp_kernels import _ext
        if not (_ext.available and getattr(_ext._C, "attention_cpu", 0)):
            pytest.skip("spp_kernels._C with the fused attention is not built")
        from spp_kernels import ext_ops
    dtype = torch.bfloat16 if route == "bf16" else torch.float32
    q, k, v = inputs((2, 3, 6, 5, 7), dtype, seed=4)
    mask = torch.ones(2, 6, dtype=torch.bool)
    first = 4 if dropped == "tail" else 0
    mask[1, first:] = False
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[1, :, 4] = float("inf")
    dirty_k[1, 0, 5, 0] = float("nan")
    dirty_v[1, :, 5] = float("-inf")
    clean_k, clean_v = k.clone(), v.clone()
    clean_k[1, :, first:] = 0.0
    clean_v[1, :, first:] = 0.0
    fn = reference.attention if route.startswith("reference") else reference.sdpa_attention
    if route.startswith("ext"):
        fn = ext_ops.attention
    grad = route.endswith("_grad")
    sdpa = route.startswith("sdpa")

    def run(kk, vv, m=mask):
        qg, kg, vg = (t.clone().requires_grad_(grad) for t in (q, kk, vv))
        with reference.sdpa_only() if sdpa else contextlib.nullcontext(), torch.set_grad_enabled(grad):
            if route.startswith("ext"):
                assert reference.use_cpu_chunked(qg, kg, vg, m, None, True)
            elif not route.startswith("reference"):
                assert reference.use_cpu_chunked(qg, kg, vg, m) == route.startswith("chunked")
            out = fn(qg, kg, vg, 0.4, m)
            if not grad:
                return out, ()
            return out, torch.autograd.grad(out, (qg, kg, vg), torch.ones_like(out))

    (got, got_grads), (want, want_grads) = run(dirty_k, dirty_v), run(clean_k, clean_v)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(got_grads, want_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a non-finite key that is attended still reaches the output, as in the reference
    assert not torch.isfinite(run(dirty_k, dirty_v, None)[0][1]).all()


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("masking", ["none", "padding", "causal"])
def test_vmap_over_the_torch_backend(masking):
    """torch.func.vmap over the op (fp32 CPU, where the inference route would use out= calls and
    host reads) gives the per-sample results."""
    q, k, v = (torch.randn(4, *t.shape[1:], generator=torch.Generator().manual_seed(i))
               for i, t in enumerate(inputs((1, 2, 6, 5, 7), torch.float32)))
    mask = padding_mask(4, 6) if masking == "padding" else None
    causal = masking == "causal"
    if mask is None:
        batched = torch.func.vmap(lambda a, b, c: reference.sdpa_attention(a[None], b[None], c[None], 0.3, None, causal))
        got = batched(q, k, v)[:, 0]
    else:
        batched = torch.func.vmap(lambda a, b, c, m: reference.sdpa_attention(a[None], b[None], c[None], 0.3, m[None]))
        got = batched(q, k, v, mask)[:, 0]
    with torch.no_grad():
        want = reference.sdpa_attention(q, k, v, 0.3, mask, causal)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_vmap_over_the_mask_alone():
    """Only the key-padding mask batched by vmap (q, k, v shared): the per-mask results."""
    q, k, v = inputs((1, 2, 6, 5, 7), torch.float32)
    masks = padding_mask(4, 6)
    got = torch.func.vmap(lambda m: reference.sdpa_attention(q, k, v, 0.3, m[None]))(masks)[:, 0]
    with torch.no_grad():
        want = torch.stack([reference.sdpa_attention(q, k, v, 0.3, m[None])[0] for m in masks])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("masking", ["none", "padding"])
def test_torch_backend_traces_whole_under_torch_compile(masking):
    """fullgraph=True: no host read or out= call of the CPU route breaks the graph (compiled code
    takes SDPA); values and gradients match eager."""
    q, k, v = inputs((2, 2, 6, 5, 7), torch.float32)
    mask = padding_mask(2, 6) if masking == "padding" else None
    fn = torch.compile(lambda a, b, c: reference.sdpa_attention(a, b, c, 0.3, mask), backend="eager", fullgraph=True)
    qg = q.clone().requires_grad_()
    got = fn(qg, k, v)
    (gq,) = torch.autograd.grad(got.square().sum(), qg)
    qe = q.clone().requires_grad_()
    want = reference.sdpa_attention(qe, k, v, 0.3, mask)
    (wq,) = torch.autograd.grad(want.square().sum(), qe)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gq, wq, rtol=1e-4, atol=1e-5)


def test_non_finite_check_reads_the_sum_in_fp32(monkeypatch):
    """A finite fp16 output whose fp16 sum would overflow (65504) is not computed twice."""
    calls = []
    real = reference._torch_attention
    monkeypatch.setattr(reference, "_torch_attention", lambda *a: calls.append(1) or real(*a))
    q, k = torch.ones(8, 12, 64, 8, dtype=torch.float16), torch.zeros(8, 12, 64, 8, dtype=torch.float16)
    v = torch.full((8, 12, 64, 8), 4.0, dtype=torch.float16)
    mask = torch.ones(8, 64, dtype=torch.bool)
    mask[:, 60:] = False
    out = reference.sdpa_attention(q, k, v, 0.3, mask)
    assert torch.isfinite(out).all() and float(out.float().sum()) > 65504
    assert len(calls) == 1


def test_sdpa_only_is_scoped_to_its_context():
    """sdpa_only is a context variable: a thread started inside it, and an asyncio task created
    outside it, do not see it."""
    import asyncio
    import threading

    q, k, v = inputs((1, 2, 6, 5, 7), torch.float32)
    seen = {}
    with reference.sdpa_only():
        assert not reference.use_cpu_chunked(q, k, v)
        t = threading.Thread(target=lambda: seen.setdefault("thread", reference.use_cpu_chunked(q, k, v)))
        t.start()
        t.join()

    async def main():
        async def inside():
            with reference.sdpa_only():
                await asyncio.sleep(0.01)
                return reference.use_cpu_chunked(q, k, v)

        async def outside():
            await asyncio.sleep(0.005)  # runs while `inside` holds sdpa_only
            return reference.use_cpu_chunked(q, k, v)

        return await asyncio.gather(inside(), outside())

    assert seen["thread"] is True
    assert asyncio.run(main()) == [False, True]
    assert reference.use_cpu_chunked(q, k, v)
