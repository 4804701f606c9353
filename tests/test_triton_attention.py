"""The Triton attention kernel (spp_kernels/triton/attention.py) against the float64 oracle:
pruned widths (D != Dv, odd widths), fp32/fp16/bf16, no mask / key padding / causal, forward
and backward (dq, dk, dv), rows with no key, non-contiguous inputs, per-head (ragged) widths,
the SDPA-or-ours predicate and the dispatcher's SPP_BACKEND=triton route. On CPU the kernels run
under TRITON_INTERPRET=1 (set before triton is imported)."""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import spp_kernels  # noqa: E402
from spp_kernels import dispatch, reference  # noqa: E402
from spp_kernels.triton import attention as tri  # noqa: E402
from oracles import oracle_attention  # noqa: E402
from tolerances import DTYPE_IDS, DTYPES, assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not tri.INTERPRET:
    pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

SHAPES = [  # (B, H, N, D_qk, D_v)
    (1, 1, 1, 1, 1),
    (2, 3, 7, 5, 9),
    (1, 2, 33, 40, 13),
    (1, 2, 65, 52, 64),
]
MASKS = ["none", "padding", "causal", "causal_padding", "causal_left_padding"]


def inputs(shape, dtype, seed=0, M=None):
    B, H, N, D, Dv = shape
    M = N if M is None else M
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g).to(dtype)
    k = torch.randn(B, H, M, D, generator=g).to(dtype)
    v = torch.randn(B, H, M, Dv, generator=g).to(dtype)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def mask_args(kind, B, M, seed=1):
    """(attn_mask, is_causal); the padding mask keeps all keys of batch 0 and >= 1 of the others
    (at the end, or for "causal_left_padding" at the start, where the first queries see no key)."""
    if kind == "causal":
        return None, True
    if kind in ("padding", "causal_padding", "causal_left_padding"):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, M + 1, (B,), generator=g)
        lengths[0] = M
        keep = torch.arange(M)[None, :] < lengths[:, None]
        if kind == "causal_left_padding":
            keep = keep.flip(-1)
        return keep.to(DEVICE), kind.startswith("causal")
    return None, False


def attention64(q, k, v, scale, attn_mask=None, is_causal=False, bias=None):
    """reference.attention's formula in float64 (the reference itself accepts fp32/16/bf16 only),
    differentiable: the oracle of the gradients."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + reference.tile_bias(bias.to(s.device, torch.float64), q.shape[0])
    N, M = q.shape[2], k.shape[2]
    allowed = None
    if attn_mask is not None:
        allowed = attn_mask[:, None, None, :] if attn_mask.dim() == 2 else attn_mask
    if is_causal:
        causal = torch.ones(N, M, dtype=torch.bool, device=q.device).tril(M - N)
        allowed = causal if allowed is None else allowed & causal
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    return torch.matmul(p, v)


def grads64(q, k, v, do, scale, attn_mask, is_causal):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = attention64(q64, k64, v64, scale, attn_mask, is_causal)
    return out, torch.autograd.grad(out, (q64, k64, v64), do.double())


def check_forward_backward(q, k, v, scale, attn_mask, is_causal, dtype, fn=tri.attention, msg=""):
    N, M, D, Dv = q.shape[2], k.shape[2], q.shape[3], v.shape[3]
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(qg, kg, vg, scale, attn_mask, is_causal)
    assert out.dtype == dtype and out.shape == (*q.shape[:3], Dv)
    g = torch.Generator().manual_seed(7)
    do = torch.randn(out.shape, generator=g).to(dtype).to(out.device)
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), do)
    ref, (rdq, rdk, rdv) = grads64(q, k, v, do, scale, attn_mask, is_causal)
    assert_close(out.cpu(), ref.cpu(), dtype, M, msg=f"{msg} out")
    assert_close(dv.cpu(), rdv.cpu(), dtype, N, msg=f"{msg} dv")
    assert_close(dq.cpu(), rdq.cpu(), dtype, M, msg=f"{msg} dq")
    assert_close(dk.cpu(), rdk.cpu(), dtype, N, msg=f"{msg} dk")
    return out


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_oracle(shape, dtype, mask):
    q, k, v = inputs(shape, dtype)
    attn_mask, is_causal = mask_args(mask, shape[0], shape[2])
    scale = 1 / math.sqrt(64)  # an original model's scale, not the pruned width's
    out = tri.attention(q, k, v, scale, attn_mask, is_causal)
    ref = oracle_attention(q.cpu(), k.cpu(), v.cpu(), scale, None if attn_mask is None else attn_mask.cpu(), is_causal)
    assert out.dtype == dtype
    assert_close(out.cpu(), ref, dtype, shape[2], msg=f"{shape} {mask}")


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_matches_float64_autograd(shape, dtype, mask):
    q, k, v = inputs(shape, dtype, seed=3)
    attn_mask, is_causal = mask_args(mask, shape[0], shape[2])
    check_forward_backward(q, k, v, 0.125, attn_mask, is_causal, dtype, msg=f"{shape} {mask}")


def test_float64_oracle_of_gradients_is_the_reference():
    """attention64 (the gradients' oracle) computes reference.attention's function."""
    q, k, v = inputs((2, 3, 7, 5, 9), torch.float32)
    for kind in MASKS:
        attn_mask, is_causal = mask_args(kind, 2, 7)
        ref = reference.attention(q, k, v, 0.3, attn_mask, is_causal)
        assert_close(ref, attention64(q.double(), k.double(), v.double(), 0.3, attn_mask, is_causal),
                     torch.float32, 7, msg=kind)


@pytest.mark.parametrize("N,M", [(5, 40), (40, 5), (33, 64)])
@pytest.mark.parametrize("kind", ["none", "padding", "causal"])
def test_queries_and_keys_of_different_lengths(N, M, kind):
    """N != M: causal aligns the diagonal bottom-right (query i sees keys j <= i + M - N); with
    N > M the first queries see no key and get 0 and 0 gradients."""
    q, k, v = inputs((2, 2, N, 12, 7), torch.float32, M=M)
    attn_mask, is_causal = mask_args(kind, 2, M)
    out = check_forward_backward(q, k, v, 0.2, attn_mask, is_causal, torch.float32, msg=f"N={N} M={M} {kind}")
    if is_causal and N > M:
        assert torch.all(out[:, :, : N - M] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_fully_masked_rows_give_zero_output_and_zero_grads(dtype):
    q, k, v = inputs((3, 2, 9, 6, 11), dtype)
    attn_mask = torch.ones(3, 9, dtype=torch.bool, device=DEVICE)
    attn_mask[1] = False  # batch 1 attends to nothing
    attn_mask[2, 4:] = False
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = tri.attention(qg, kg, vg, 0.5, attn_mask)
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), torch.ones_like(out))
    assert torch.isfinite(out).all() and torch.all(out[1] == 0)
    assert torch.all(dq[1] == 0) and torch.all(dk[1] == 0) and torch.all(dv[1] == 0)
    assert torch.all(dk[2, :, 4:] == 0) and torch.all(dv[2, :, 4:] == 0)  # padding keys: no gradient
    check_forward_backward(q, k, v, 0.5, attn_mask, False, dtype, msg="fully masked")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("ragged", [False, True], ids=["plain", "ragged"])
def test_inf_and_nan_at_padding_keys_never_reach_outputs_or_gradients(dtype, ragged):
    """k and v at padding positions load as zero: inf / NaN there (fp16 overflow in padded rows)
    leaves the output and every gradient equal to those of the same inputs with zeros there."""
    q, k, v = inputs((2, 3, 9, 6, 11), dtype)
    attn_mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    attn_mask[1, 5:] = False
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[1, :, 5] = float("inf")
    dirty_k[1, 0, 6, 2] = float("nan")
    dirty_v[1, :, 7] = float("-inf")
    dirty_v[1, 2, 8, 0] = float("nan")
    clean_k, clean_v = k.clone(), v.clone()
    clean_k[1, :, 5:] = 0
    clean_v[1, :, 5:] = 0
    if ragged:
        fn = lambda a, b, c, scale, m: tri.attention_ragged(a, b, c, scale, torch.tensor([6, 3, 5]), torch.tensor([11, 4, 7]), m)  # noqa: E731
    else:
        fn = tri.attention
    g = torch.Generator().manual_seed(3)
    do = torch.randn(2, 3, 9, 11, generator=g).to(dtype).to(DEVICE)
    results = []
    for kk, vv in ((dirty_k, dirty_v), (clean_k, clean_v)):
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, kk, vv))
        out = fn(qg, kg, vg, 0.4, attn_mask)
        results.append((out, *torch.autograd.grad(out, (qg, kg, vg), do)))
    for name, dirty, clean in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.isfinite(dirty).all(), name
        assert torch.equal(dirty, clean), name
    assert torch.all(results[0][2][1, :, 5:] == 0) and torch.all(results[0][3][1, :, 5:] == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_right_padded_rows_stop_at_their_last_kept_key(causal):
    """The kernels stop at each batch row's last kept key: rows whose padding spans whole key
    blocks (the interpreter's are 32 keys), one with no key, one with a hole, against the float64
    oracle forward and backward, and the padding's gradients exactly 0."""
    dtype = torch.float32
    q, k, v = inputs((5, 2, 75, 7, 10), dtype, seed=5)
    lengths = torch.tensor([75, 3, 40, 0, 33], device=DEVICE)
    attn_mask = torch.arange(75, device=DEVICE)[None, :] < lengths[:, None]
    attn_mask[2, 10] = False  # a hole before the end
    _, kend, *_ = tri._mask_args(q, attn_mask)
    assert kend.tolist() == [75, 3, 40, 0, 33]
    check_forward_backward(q, k, v, 0.3, attn_mask, causal, dtype, msg=f"right padded, causal={causal}")
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = tri.attention(qg, kg, vg, 0.3, attn_mask, causal)
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), torch.ones_like(out))
    assert torch.all(out[3] == 0) and torch.all(dq[3] == 0)
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(dk[b, :, n:] == 0) and torch.all(dv[b, :, n:] == 0)


def test_key_padding_arguments_are_computed_once_per_mask():
    q = torch.zeros(2, device=DEVICE)
    mask = torch.arange(9, device=DEVICE)[None, :] < torch.tensor([[9], [4]], device=DEVICE)
    first = tri._mask_args(q, mask)
    again = tri._mask_args(q, mask)  # every layer of a forward passes the same mask: no new launches
    assert again[0] is first[0] and again[1] is first[1] and first[1].tolist() == [9, 4]
    mask[1, 6] = True  # changed in place: its version counter moved, so it is read again
    assert tri._mask_args(q, mask)[1].tolist() == [9, 7]


def test_non_contiguous_inputs():
    """(B, N, H, D) layouts transposed to (B, H, N, D), as attention layers produce them."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 7, 3, 5, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, 7, 3, 5, generator=g).to(DEVICE).transpose(1, 2)
    v = torch.randn(2, 3, 9, 7, generator=g).to(DEVICE).transpose(2, 3)  # (2, 3, 7, 9), stride-permuted
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    attn_mask, _ = mask_args("padding", 2, 7)
    check_forward_backward(q, k, v, 0.4, attn_mask, False, torch.float32, msg="non-contiguous")


def test_scale_is_explicit():
    q, k, v = inputs((1, 2, 7, 5, 9), torch.float32)
    a = tri.attention(q, k, v, 1.0)
    b = tri.attention(q, k, v, 1 / math.sqrt(5))
    assert not torch.allclose(a, b)
    assert_close(a.cpu(), oracle_attention(q.cpu(), k.cpu(), v.cpu(), 1.0), torch.float32, 7)


def test_bad_inputs_name_the_argument():
    q, k, v = inputs((1, 2, 4, 5, 6), torch.float32)
    with pytest.raises(ValueError, match="k's width"):
        tri.attention(q, k[..., :4], v, 0.5)
    with pytest.raises(TypeError, match="dtype"):
        tri.attention(q, k.half(), v, 0.5)
    with pytest.raises(ValueError, match="scale"):
        tri.attention(q, k, v, -1.0)
    with pytest.raises(ValueError, match="attn_mask"):
        tri.attention(q, k, v, 0.5, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="qk_widths"):
        tri.attention_ragged(q, k, v, 0.5, torch.tensor([5, 6]), torch.tensor([6, 6]))
    with pytest.raises(TypeError, match="v_widths"):
        tri.attention_ragged(q, k, v, 0.5, torch.tensor([5, 5]), torch.tensor([6.0, 6.0]))


def ragged_reference(q, k, v, scale, qk_widths, v_widths, attn_mask=None, is_causal=False, bias=None):
    """Per-head widths: head h keeps q/k channels < qk_widths[h] and v channels < v_widths[h]
    (the rest read as zero), float64."""
    D, Dv = q.shape[3], v.shape[3]
    mq = (torch.arange(D)[None, :] < qk_widths.cpu()[:, None]).to(q.device)[None, :, None, :]
    mv = (torch.arange(Dv)[None, :] < v_widths.cpu()[:, None]).to(q.device)[None, :, None, :]
    return attention64(q * mq, k * mq, v * mv, scale, attn_mask, is_causal, bias)


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_ragged_per_head_widths(dtype, kind):
    B, H, N, D, Dv = 2, 4, 19, 13, 10
    q, k, v = inputs((B, H, N, D, Dv), dtype, seed=11)
    qkw, vw = torch.tensor([13, 5, 0, 8]), torch.tensor([3, 10, 7, 0])
    attn_mask, is_causal = mask_args(kind, B, N)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = tri.attention_ragged(qg, kg, vg, 0.3, qkw, vw, attn_mask, is_causal)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(out.device)
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ragged_reference(q64, k64, v64, 0.3, qkw, vw, attn_mask, is_causal)
    rdq, rdk, rdv = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    assert_close(out.cpu(), ref.cpu(), dtype, N, msg="ragged out")
    assert_close(dv.cpu(), rdv.cpu(), dtype, N, msg="ragged dv")
    assert_close(dq.cpu(), rdq.cpu(), dtype, N, msg="ragged dq")
    assert_close(dk.cpu(), rdk.cpu(), dtype, N, msg="ragged dk")
    # channels beyond a head's width: zero output, zero gradient
    for h in range(H):
        assert torch.all(out[:, h, :, vw[h]:] == 0)
        assert torch.all(dq[:, h, :, qkw[h]:] == 0) and torch.all(dk[:, h, :, qkw[h]:] == 0)
        assert torch.all(dv[:, h, :, vw[h]:] == 0)


BIAS_SHAPES = [(1, 1), (1, 3), (2, 3), (4, 1)]  # (Bb, Hb) for B = 4, H = 3


def bias_of(bs, N, M, dtype=torch.float32, seed=9):
    """A (Bb, Hb, N, M) bias like Swin's: a relative-position-like part plus -100 blocks (its
    shifted-window mask), so some keys are all but excluded by the bias alone."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(*bs, N, M, generator=g)
    b[..., : N // 3, M // 2:] -= 100.0
    return b.to(dtype).to(DEVICE)


def check_bias(shape, bs, mask, dtype, msg=""):
    """Forward and dq / dk / dv with an additive (Bb, Hb, N, N) bias against float64 autograd."""
    B, H, N, D, Dv = shape
    q, k, v = inputs(shape, dtype, seed=5)
    attn_mask, is_causal = mask_args(mask, B, N)
    bias = bias_of(bs, N, N, dtype)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = tri.attention(qg, kg, vg, 0.3, attn_mask, is_causal, bias)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(dtype).to(out.device)
    grads = torch.autograd.grad(out, (qg, kg, vg), do)
    t64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention64(*t64, 0.3, attn_mask, is_causal, bias)
    want = torch.autograd.grad(ref, t64, do.double())
    assert_close(out.cpu(), ref.cpu(), dtype, N, msg=f"{msg} {bs} {mask} out")
    for name, a, b in zip(("dq", "dk", "dv"), grads, want):
        assert_close(a.cpu(), b.cpu(), dtype, N, msg=f"{msg} {bs} {mask} {name}")
    # the bias matters
    assert (out - tri.attention(q, k, v, 0.3, attn_mask, is_causal)).abs().max() > 0.1


@pytest.mark.parametrize("bs", BIAS_SHAPES, ids=lambda b: f"Bb{b[0]}_Hb{b[1]}")
@pytest.mark.parametrize("mask", ["none", "padding", "causal_padding"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_additive_bias_forward_and_backward(bs, mask, dtype):
    """The additive bias of (Bb, Hb) rows (batch row b adds bias[b % Bb]) against float64 autograd,
    with key padding and causal masks on top, across key blocks (33 tokens, 32-token blocks)."""
    check_bias((4, 3, 33, 5, 11), bs, mask, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape, bs", [((2, 3, 197, 64, 17), (1, 3)), ((4, 3, 49, 32, 9), (2, 3)),
                                       ((2, 2, 64, 23, 37), (2, 1))], ids=str)
def test_additive_bias_sweep_larger_shapes(shape, bs, dtype, mask):
    check_bias(shape, bs, mask, dtype, msg=str(shape))


def test_additive_bias_with_ragged_widths():
    q, k, v = inputs((4, 3, 9, 7, 6), torch.float32, seed=8)
    qkw, vw = torch.tensor([7, 2, 0]), torch.tensor([6, 0, 3])
    bias = bias_of((2, 3), 9, 9)
    out = tri.attention_ragged(q, k, v, 0.4, qkw, vw, None, True, bias)
    ref = ragged_reference(q.double(), k.double(), v.double(), 0.4, qkw, vw, None, True, bias)
    assert_close(out.cpu(), ref.cpu(), torch.float32, 9, msg="ragged bias")


def test_bias_that_requires_grad_goes_to_the_torch_backend(monkeypatch):
    """The kernel does not differentiate the bias: it refuses one that requires grad (outside
    no_grad), and the dispatcher sends such calls to the torch backend, whose dbias is exact."""
    q, k, v = inputs((2, 3, 7, 5, 9), torch.float32)
    bias = bias_of((1, 3), 7, 7).requires_grad_()
    with pytest.raises(ValueError, match="does not differentiate the bias"):
        tri.attention(q, k, v, 0.3, None, False, bias)
    with torch.no_grad():
        tri.attention(q, k, v, 0.3, None, False, bias)  # no graph: fine
    calls = []
    monkeypatch.setattr(reference, "sdpa_attention", lambda *a, **kw: calls.append(1) or reference.attention(*a, **kw))
    out = tri.dispatch_attention(q, k, v, 0.3, None, False, bias)
    (dbias,) = torch.autograd.grad(out.sum(), bias)
    assert calls == [1] and dbias.abs().sum() > 0
    tri.dispatch_attention(q, k, v, 0.3, None, False, bias.detach())
    assert calls == [1]  # a detached bias stays on the kernel


def test_bias_and_mask_changed_in_place_before_the_backward_raise():
    """The bias and the key-padding mask are saved like q, k, v: changing them in place between
    forward and backward raises instead of giving gradients of another function."""
    q, k, v = inputs((2, 3, 7, 5, 9), torch.float32)
    bias = bias_of((1, 3), 7, 7)
    mask = torch.ones(2, 7, dtype=torch.bool, device=DEVICE)
    for changed in ("bias", "mask"):
        qg = q.clone().requires_grad_()
        out = tri.attention(qg, k, v, 0.3, mask, False, bias)
        (bias if changed == "bias" else mask)[..., 0] = (bias[..., 0] + 1.0) if changed == "bias" else False
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(out.sum(), qg)


def test_gpu_blocks_fit_short_sequences(monkeypatch):
    """On a GPU the token blocks shrink to the sequence (padded to a power of two, at least 16):
    Swin's 49-token windows take 64-row blocks, not 128 (the GPU sizes, without the interpreter)."""
    monkeypatch.setattr(tri, "INTERPRET", False)
    assert tri._blocks(32, 32, False, 49, 49) == (64, 64, 32, 32)
    assert tri._blocks(64, 17, False, 197, 197) == (128, 64, 64, 32)
    assert tri._blocks(64, 64, True, 197, 197) == (64, 64, 64, 64)
    assert tri._blocks(13, 5, True, 5, 7) == (16, 16, 16, 16)
    assert tri._blocks(13, 5, False, 0, 0) == (16, 16, 16, 16)
    assert tri._blocks(256, 64, False, 4096, 4096) == (32, 32, 256, 64)


def test_ragged_with_full_widths_equals_attention():
    q, k, v = inputs((2, 3, 7, 5, 9), torch.float32)
    full = tri.attention_ragged(q, k, v, 0.3, torch.full((3,), 5), torch.full((3,), 9))
    assert torch.equal(full, tri.attention(q, k, v, 0.3))


def meta(shape, dtype, device="meta"):
    B, H, N, D, Dv = shape
    return (torch.empty(B, H, N, D, dtype=dtype, device=device), torch.empty(B, H, N, D, dtype=dtype, device=device),
            torch.empty(B, H, N, Dv, dtype=dtype, device=device))


@pytest.mark.parametrize("shape,dtype,mask,causal,fast", [
    ((2, 12, 128, 64, 64), torch.bfloat16, None, False, True),
    ((2, 12, 128, 64, 64), torch.float16, None, True, True),
    ((2, 12, 128, 256, 256), torch.bfloat16, None, False, True),
    ((2, 12, 128, 64, 64), torch.float32, None, False, False),  # fp32: SDPA's flash refuses
    ((2, 12, 128, 40, 52), torch.bfloat16, None, False, False),  # D != Dv
    ((2, 12, 128, 23, 23), torch.bfloat16, None, False, False),  # not a multiple of 8
    ((2, 12, 128, 264, 264), torch.bfloat16, None, False, False),  # > 256
    ((2, 12, 128, 64, 64), torch.bfloat16, "padding", False, False),  # bool mask
])
def test_sdpa_is_fast(shape, dtype, mask, causal, fast):
    q, k, v = meta(shape, dtype)
    attn_mask = torch.ones(shape[0], shape[2], dtype=torch.bool, device="meta") if mask else None
    assert tri.sdpa_is_fast(q, k, v, attn_mask, causal) is fast


def test_sdpa_is_fast_refuses_causal_with_different_lengths():
    q = torch.empty(1, 2, 8, 64, dtype=torch.bfloat16, device="meta")
    kv = torch.empty(1, 2, 16, 64, dtype=torch.bfloat16, device="meta")
    assert tri.sdpa_is_fast(q, kv, kv, None, True) is False
    assert tri.sdpa_is_fast(q, kv, kv, None, False) is True


def test_spp_backend_triton_serves_cpu_attention_with_the_kernel(monkeypatch):
    """SPP_BACKEND=triton sends CPU tensors to this kernel (the interpreter, forced_devices);
    without it CPU attention stays off Triton (the extension where built, else torch)."""
    if DEVICE != "cpu":
        pytest.skip("the forced CPU route is for the interpreter")
    calls = []
    real = tri.attention

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(tri, "attention", spy)
    q, k, v = inputs((1, 2, 7, 5, 9), torch.float32)
    monkeypatch.setenv("SPP_BACKEND", "triton")
    assert dispatch.choose("attention", "cpu") == ("triton", "forced by SPP_BACKEND")
    out = spp_kernels.attention(q, k, v, 0.3)
    assert calls == [1]
    assert_close(out, oracle_attention(q, k, v, 0.3), torch.float32, 7)
    monkeypatch.delenv("SPP_BACKEND")
    assert dispatch.choose("attention", "cpu")[0] in ("ext", "torch")
    spp_kernels.attention(q, k, v, 0.3)
    assert calls == [1]


@pytest.mark.skipif(DEVICE != "cuda", reason="the SDPA route is taken on CUDA only")
def test_dispatch_routes_fast_shapes_to_sdpa_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(tri, "attention", lambda *a, **kw: calls.append(1))
    q, k, v = meta((1, 2, 16, 64, 64), torch.bfloat16, device="cuda")
    tri.dispatch_attention(q, k, v, 0.125)
    assert calls == []
    q, k, v = meta((1, 2, 16, 40, 52), torch.bfloat16, device="cuda")
    tri.dispatch_attention(q, k, v, 0.125)
    assert calls == [1]


@pytest.mark.slow
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", [(2, 3, 197, 64, 17), (1, 2, 130, 13, 64), (1, 1, 97, 384, 23), (2, 2, 64, 23, 37)], ids=str)
def test_sweep_larger_shapes(shape, dtype, mask):
    q, k, v = inputs(shape, dtype, seed=21)
    attn_mask, is_causal = mask_args(mask, shape[0], shape[2])
    check_forward_backward(q, k, v, 1 / math.sqrt(64), attn_mask, is_causal, dtype, msg=f"{shape} {mask}")


@pytest.mark.parametrize("N,M", [(0, 5), (4, 0)])
def test_empty_token_counts(N, M):
    """No queries: empty output; no keys: every row attends to nothing, zeros and zero grads."""
    q, k, v = inputs((2, 3, N, 5, 6), torch.float32, M=M)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = tri.attention(qg, kg, vg, 0.5)
    assert out.shape == (2, 3, N, 6) and torch.all(out == 0)
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), torch.ones_like(out))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert torch.all(dq == 0) and torch.all(dk == 0) and torch.all(dv == 0)


OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("kind", ["none", "padding", "causal", "ragged", "bias", "full_mask"])
def test_opcheck(kind):
    """torch.library.opcheck on the forward op (schema, fake tensor, autograd registration,
    aot dispatch) and on the backward op."""
    q, k, v = inputs((2, 2, 7, 5, 9), torch.float32)
    attn_mask, is_causal = mask_args("padding" if kind == "padding" else "none", 2, 7)
    if kind == "full_mask":
        attn_mask = full_mask_of("per_query", 2, 1, 7, 7)
    is_causal = kind == "causal"
    qkw, vw = (torch.tensor([5, 3], dtype=torch.int32), torch.tensor([2, 9], dtype=torch.int32)) if kind == "ragged" \
        else (None, None)
    bias = torch.randn(1, 2, 7, 7, generator=torch.Generator().manual_seed(4)).to(DEVICE) if kind == "bias" else None
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    res = torch.library.opcheck(tri.attention_fwd, (q, k, v, 0.3, attn_mask, is_causal, qkw, vw, bias))
    assert res == dict.fromkeys(OPCHECK_UTILS, "SUCCESS")
    o, lse = tri.attention_fwd(q, k, v, 0.3, attn_mask, is_causal, qkw, vw, bias)
    do = torch.randn_like(o)
    res = torch.library.opcheck(tri.attention_bwd, (do, q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(),
                                                    0.3, attn_mask, is_causal, qkw, vw, bias))
    assert res == dict.fromkeys(OPCHECK_UTILS, "SUCCESS")


def test_torch_compile_fullgraph_matches_eager():
    q, k, v = inputs((2, 3, 7, 5, 9), torch.float32)
    attn_mask, _ = mask_args("padding", 2, 7)

    def loss(q, k, v):
        return (tri.attention(q, k, v, 0.3, attn_mask) ** 2).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    args = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    eager_args = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    gc = torch.autograd.grad(compiled(*args), args)
    ge = torch.autograd.grad(loss(*eager_args), eager_args)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ------------------------------------------------------------------ 4-D bool masks, read per tile
FULL_MASK_SHAPES = [(3, 1), (1, 2), (3, 2), (1, 1)]  # (Kb, Kh) for B = 3, H = 2


def full_mask_of(kind, Kb, Kh, N, M, seed=3):
    """A bool (Kb, Kh, N, M) mask. "per_query": random, with a query row that sees no key and a
    key that no query sees; "hf_padding": key padding materialised per query, as Hugging Face
    builds a padded BERT batch's "sdpa" mask; "hf_causal_left": causal ∧ left padding, as it
    builds a padded decoder batch's (the first queries of a left-padded row see no key)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "per_query":
        m = torch.rand(Kb, Kh, N, M, generator=g) < 0.6
        m[..., N // 2, :] = False
        m[..., M // 3] = False
    else:
        lengths = torch.randint(1, M - 2, (Kb,), generator=g)
        lengths[-1] = M if Kb > 1 else lengths[-1]  # one row unpadded, where there are several
        pad = torch.arange(M)[None, :] < lengths[:, None]
        pad = pad[:, None, :]  # (Kb, 1, M): the same keys for every query
        if kind == "hf_causal_left":
            pad = pad.flip(-1) & torch.ones(N, M, dtype=torch.bool).tril(M - N)
        m = pad[:, None].expand(Kb, Kh, N, M).contiguous()
    return m.to(DEVICE)


@pytest.mark.parametrize("causal", [False, True], ids=["mask", "mask_and_causal"])
@pytest.mark.parametrize("kind", ["per_query", "hf_padding", "hf_causal_left"])
@pytest.mark.parametrize("km", FULL_MASK_SHAPES, ids=lambda km: f"Kb{km[0]}_Kh{km[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_full_mask_forward_backward(dtype, km, kind, causal):
    """A 4-D (B | 1, H | 1, N, M) bool mask read per tile, alone and with is_causal, forward and
    dq / dk / dv against float64 autograd; the row without keys gives 0, the mask matters."""
    B, H, N, M, D, Dv = 3, 2, 37, 41, 11, 6
    q, k, v = inputs((B, H, N, D, Dv), dtype, seed=12, M=M)
    mask = full_mask_of(kind, *km, N, M)
    out = check_forward_backward(q, k, v, 0.3, mask, causal, dtype, msg=f"{km} {kind} causal={causal}")
    if kind == "per_query":
        assert torch.all(out[:, :, N // 2] == 0)
    assert (out - tri.attention(q, k, v, 0.3, None, causal)).abs().max() > 0.1


def test_materialised_padding_mask_equals_key_padding_bit_for_bit():
    """Hugging Face's padded-batch mask, materialised as (B, 1, N, M), runs the same blocks as the
    (B, M) key padding it encodes: the same row ends (padding past a row's last key is skipped)
    and the same bits, forward and backward."""
    B, H, N, D, Dv = 4, 2, 70, 9, 12
    q, k, v = inputs((B, H, N, D, Dv), torch.float32, seed=4)
    pad = torch.arange(N, device=DEVICE)[None, :] < torch.tensor([70, 5, 33, 1], device=DEVICE)[:, None]
    full = pad[:, None, None, :].expand(B, 1, N, N).contiguous()
    assert tri._mask_args(q, full)[1].tolist() == [70, 5, 33, 1]
    outs, grads = [], []
    for mask in (pad, full):
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = tri.attention(qg, kg, vg, 0.3, mask)
        outs.append(out)
        grads.append(torch.autograd.grad(out, (qg, kg, vg), torch.ones_like(out)))
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
def test_full_mask_keeps_inf_and_nan_at_keys_no_query_attends_out(dtype):
    """Keys that no query of a batch row attends are that row's padding: their k and v are never
    loaded, so inf / NaN there reach neither the output nor any gradient."""
    B, H, N, D, Dv = 3, 2, 21, 7, 5
    q, k, v = inputs((B, H, N, D, Dv), dtype, seed=8)
    mask = full_mask_of("per_query", B, 1, N, N)
    dead = N // 3  # full_mask_of leaves this key out for every query
    clean = check_forward_backward(q, k, v, 0.3, mask, False, dtype, msg="clean")
    k, v = k.clone(), v.clone()
    k[0, :, dead] = float("inf")
    v[1, :, dead] = float("nan")
    v[2, 0, dead] = float("-inf")
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = tri.attention(qg, kg, vg, 0.3, mask)
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), torch.ones_like(out))
    assert torch.equal(out, clean)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.all(dk[:, :, dead] == 0) and torch.all(dv[:, :, dead] == 0)


def test_full_mask_with_bias_and_ragged_widths():
    """The 4-D mask together with an additive (Bb, Hb, N, M) bias and per-head widths, against
    float64 autograd."""
    B, H, N, D, Dv = 3, 2, 23, 10, 8
    q, k, v = inputs((B, H, N, D, Dv), torch.float32, seed=13)
    mask = full_mask_of("per_query", B, H, N, N)
    bias = bias_of((1, H), N, N)
    qkw, vw = torch.tensor([10, 4]), torch.tensor([3, 8])
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = tri.attention_ragged(qg, kg, vg, 0.3, qkw, vw, mask, False, bias)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
    grads = torch.autograd.grad(out, (qg, kg, vg), do)
    t64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = ragged_reference(*t64, 0.3, qkw, vw, mask, False, bias)
    want = torch.autograd.grad(ref, t64, do.double())
    assert_close(out.cpu(), ref.cpu(), torch.float32, N, msg="full mask + bias + ragged out")
    for name, a, b in zip(("dq", "dk", "dv"), grads, want):
        assert_close(a.cpu(), b.cpu(), torch.float32, N, msg=f"full mask + bias + ragged {name}")


def test_full_mask_arguments_are_computed_once_per_mask():
    """The key padding, row ends and int8 copy of a 4-D mask are made once per mask (every layer
    of a forward passes the same one) and again when it changes in place."""
    q = torch.zeros(2, device=DEVICE)
    mask = full_mask_of("hf_padding", 2, 1, 6, 9)
    first = tri._mask_args(q, mask)
    again = tri._mask_args(q, mask)
    assert all(a is b for a, b in zip(again[:3], first[:3])) and first[3:] == (2, 1)
    assert first[1].tolist() == [int(mask[0, 0, 0].sum()), 9] and mask[0, 0, 0].sum() < 9
    mask[0, 0, 3, 8] = True  # one query now sees the last key: that key is no longer padding
    assert tri._mask_args(q, mask)[1].tolist() == [9, 9]


def test_dispatcher_sends_full_masks_to_the_kernel_on_cuda():
    """On CUDA shapes SDPA's fast kernels take without a mask go to the kernel with a 4-D mask
    (checked through the predicate; the call itself runs where CUDA is present)."""
    q, k, v = inputs((1, 2, 5, 8, 8), torch.float16)
    assert tri.sdpa_is_fast(q, k, v, None, False)
    assert not tri.sdpa_is_fast(q, k, v, full_mask_of("per_query", 1, 1, 5, 5), False)


@pytest.mark.parametrize("NM", [(41, 37), (9, 30)], ids=["more_queries", "fewer_queries"])
def test_full_mask_with_causal_and_unequal_lengths(NM):
    """A 4-D mask and is_causal over unequal query / key counts (the diagonal bottom-right: with
    more queries than keys the first queries see no key), forward and backward vs float64."""
    N, M = NM
    q, k, v = inputs((2, 3, N, 6, 10), torch.float32, seed=21, M=M)
    mask = full_mask_of("per_query", 2, 3, N, M)
    out = check_forward_backward(q, k, v, 0.3, mask, True, torch.float32, msg=f"causal N={N} M={M}")
    if N > M:
        assert torch.all(out[:, :, : N - M] == 0)
