"""4-D bool attention masks (B | 1, H | 1, N, M) taken whole by ``spp_kernels.attention``: the
reference, the torch (SDPA) and ext backends against the float64 oracle (forward, gradients,
rows without keys, inf / NaN at keys no query attends, with an additive bias), and the layers'
routing: where the op is the Triton kernel (CUDA) Hugging Face's materialised padded / causal
masks, which are not read there, reach the op whole instead of SDPA on zero-padded widths.
On CPU that route is simulated: the mask reads switched off (``layers.traced``) and the Triton
backend forced (its interpreter). The Triton kernel's own tests are in test_triton_attention."""
import os
import types

import pytest
import torch

import spp
import spp_kernels
from spp import layers
from spp_kernels import reference
from oracles import oracle_attention
from tolerances import DTYPE_IDS, DTYPES, assert_close


def _ext_attention():
    from spp_kernels import _ext
    if not (_ext.available and getattr(_ext._C, "attention_cpu", 0)):
        pytest.skip("the C++ extension is not built here")
    from spp_kernels import ext_ops
    return ext_ops.attention


def interpreted_triton():
    """Skip unless the Triton backend can be forced onto CPU tensors (its interpreter, which
    conftest selects on machines without CUDA); on CUDA machines the CUDA test at the end covers
    the route these simulate."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("simulates the CUDA route with Triton's interpreter (set where CUDA is absent)")
    pytest.importorskip("triton")


ROUTES = {"reference": lambda: reference.attention, "torch": lambda: reference.sdpa_attention, "ext": _ext_attention}


def qkv(B, H, N, M, D, Dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, D, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(B, H, M, D, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(B, H, M, Dv, generator=g, dtype=torch.float64).to(dtype))


def per_query_mask(Kb, Kh, N, M, seed=3):
    """Random, with query row N // 2 seeing no key and key M // 3 seen by no query."""
    m = torch.rand(Kb, Kh, N, M, generator=torch.Generator().manual_seed(seed)) < 0.55
    m[..., N // 2, :] = False
    m[..., M // 3] = False
    return m


@pytest.mark.parametrize("causal", [False, True], ids=["mask", "mask_and_causal"])
@pytest.mark.parametrize("km", [(3, 1), (1, 2), (3, 2)], ids=lambda km: f"Kb{km[0]}_Kh{km[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("route", list(ROUTES))
def test_backends_match_the_oracle_with_a_4d_mask(route, dtype, km, causal):
    fn = ROUTES[route]()
    B, H, N, M, D, Dv = 3, 2, 13, 17, 5, 9
    q, k, v = qkv(B, H, N, M, D, Dv, dtype)
    mask = per_query_mask(*km, N, M)
    out = fn(q, k, v, 0.3, mask, causal)
    assert out.dtype == dtype and out.shape == (B, H, N, Dv)
    assert_close(out, oracle_attention(q, k, v, 0.3, mask, causal), dtype, M, msg=f"{route} {km} {causal}")
    assert torch.all(out[:, :, N // 2] == 0)
    assert (out.float() - fn(q, k, v, 0.3, None, causal).float()).abs().max() > 0.1


def hf_form_mask(form, B, N, M):
    """The (B, 1, N, M) bool masks Hugging Face materialises: key padding per query, or causal
    (bottom-right) ∧ right / left padding (left: the first queries of a row see no key)."""
    pad = torch.arange(M)[None] < torch.tensor([M, 4, 6][:B])[:, None]
    if form == "causal_left_padding":
        pad = pad.flip(-1)
    m = pad[:, None, None, :].expand(B, 1, N, M)
    if form != "padding":
        m = m & torch.ones(N, M, dtype=torch.bool).tril(M - N)
    return m.contiguous()


@pytest.mark.parametrize("shared", [False, True], ids=["per_batch_row", "shared_by_the_batch"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["mask", "mask_and_causal"])
@pytest.mark.parametrize("form", ["padding", "causal_padding", "causal_left_padding", "per_query"])
@pytest.mark.parametrize("route", ["torch", "ext"])
def test_cpu_backends_run_hf_masks_as_key_padding(monkeypatch, route, form, is_causal, shared):
    """On CPU the torch / ext backends read a (B, 1, N, M) mask that is key padding (∧ causal) —
    Hugging Face's materialised forms — and run the (B, M) routes (the ext backend's fused
    kernel); other masks take SDPA on the mask. Forward and gradients equal the reference."""
    fn = ROUTES[route]()
    B, H, N, M = 3, 2, 9, 11
    q, k, v = qkv(B, H, N, M, 5, 7, seed=4)
    mask = hf_form_mask(form, B, N, M) if form != "per_query" else per_query_mask(B, 1, N, M)
    if shared:  # (1, 1, N, M): one padded row's mask for the whole batch
        mask = mask[1:2]
    whole = []
    full = reference._sdpa_full_mask
    monkeypatch.setattr(reference, "_sdpa_full_mask", lambda *a, **kw: whole.append(1) or full(*a, **kw))
    do = torch.randn(B, H, N, 7, generator=torch.Generator().manual_seed(2))
    res = []
    for f in (fn, reference.attention):
        ts = [t.clone().requires_grad_() for t in (q, k, v)]
        out = f(*ts, 0.3, mask, is_causal)
        res.append((out, *torch.autograd.grad(out, ts, do)))
    assert len(whole) == (1 if form == "per_query" else 0)
    for name, a, b in zip(("out", "dq", "dk", "dv"), *res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6, msg=name)
    assert_close(res[0][0], oracle_attention(q, k, v, 0.3, mask, is_causal), torch.float32, M)


@pytest.mark.parametrize("route", list(ROUTES))
def test_backends_with_a_4d_mask_and_causal_over_more_queries_than_keys(route):
    """is_causal aligns bottom-right: the first N - M queries see no key and give 0."""
    fn = ROUTES[route]()
    B, H, N, M = 2, 3, 19, 11
    q, k, v = qkv(B, H, N, M, 4, 7, seed=9)
    mask = per_query_mask(B, H, N, M)
    out = fn(q, k, v, 0.3, mask, True)
    assert_close(out, oracle_attention(q, k, v, 0.3, mask, True), torch.float32, M, msg=route)
    assert torch.all(out[:, :, : N - M] == 0)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("route", ["torch", "ext"])
def test_backend_gradients_equal_the_reference_with_a_4d_mask(route, bias):
    """dq, dk, dv through the torch / ext backends equal autograd through the reference (fp32),
    rows without keys included (0 gradients), with and without an additive bias."""
    fn = ROUTES[route]()
    B, H, N, M, D, Dv = 2, 3, 11, 11, 6, 4
    q, k, v = qkv(B, H, N, M, D, Dv, seed=5)
    mask = per_query_mask(B, 1, N, M)
    b = torch.randn(1, H, N, M, generator=torch.Generator().manual_seed(2)) if bias else None
    do = torch.randn(B, H, N, Dv, generator=torch.Generator().manual_seed(1))
    grads = []
    for f in (fn, reference.attention):
        ts = [t.clone().requires_grad_() for t in (q, k, v)]
        out = f(*ts, 0.3, mask, True, b)
        grads.append((out, *torch.autograd.grad(out, ts, do)))
    for name, a, want in zip(("out", "dq", "dk", "dv"), *grads):
        torch.testing.assert_close(a, want, rtol=1e-5, atol=2e-6, msg=name)
        assert torch.isfinite(a).all()
    assert torch.all(grads[0][1][:, :, N // 2] == 0)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("route", list(ROUTES))
def test_inf_and_nan_at_keys_no_query_attends_never_reach_the_output(route, grad):
    fn = ROUTES[route]()
    B, H, N, D, Dv = 2, 2, 9, 4, 5
    q, k, v = qkv(B, H, N, N, D, Dv, seed=7)
    mask = per_query_mask(B, 1, N, N)
    dead = N // 3
    clean = fn(q, k, v, 0.3, mask)
    k, v = k.clone(), v.clone()
    k[0, :, dead], v[1, 0, dead], v[0, 1, dead] = float("inf"), float("nan"), float("-inf")
    ts = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    out = fn(*ts, 0.3, mask)
    torch.testing.assert_close(out, clean, rtol=0, atol=0)
    if grad:
        for g in torch.autograd.grad(out, ts, torch.ones_like(out)):
            assert torch.isfinite(g).all()


def test_a_4d_mask_of_the_wrong_shape_or_device_is_refused():
    q, k, v = qkv(2, 3, 5, 6, 4, 4)
    with pytest.raises(ValueError, match="4-D attn_mask"):
        spp_kernels.attention(q, k, v, 0.3, torch.ones(2, 2, 5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="4-D attn_mask"):
        spp_kernels.attention(q, k, v, 0.3, torch.ones(2, 1, 6, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        spp_kernels.attention(q, k, v, 0.3, torch.zeros(2, 1, 5, 6))
    with pytest.raises(ValueError, match="batch, key tokens"):
        spp_kernels.attention(q, k, v, 0.3, torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="on meta"):
        spp_kernels.attention(q, k, v, 0.3, torch.ones(2, 1, 5, 6, dtype=torch.bool, device="meta"))


def test_full_mask_reads_sdpa_bool_masks_by_their_broadcast(monkeypatch):
    B, H, N, M = 3, 2, 4, 5
    full = layers.full_mask
    assert full(torch.ones(B, 1, N, M, dtype=torch.bool), B, H, N, M) is None  # CPU backends: SDPA is as good
    interpreted_triton()
    monkeypatch.setenv("SPP_BACKEND", "triton")
    m4, m3 = torch.ones(B, 1, N, M, dtype=torch.bool), torch.ones(H, N, M, dtype=torch.bool)
    assert full(m4, B, H, N, M) is m4  # the mask itself, and a remembered view: the kernel's memo hits
    assert full(m3, B, H, N, M) is full(m3, B, H, N, M)
    assert full(torch.ones(B, 1, N, M, dtype=torch.bool), B, H, N, M).shape == (B, 1, N, M)
    assert full(torch.ones(1, H, N, M, dtype=torch.bool), B, H, N, M).shape == (1, H, N, M)
    assert full(torch.ones(N, M, dtype=torch.bool), B, H, N, M).shape == (1, 1, N, M)  # SDPA: (N, M)
    assert full(torch.ones(H, N, M, dtype=torch.bool), B, H, N, M).shape == (1, H, N, M)
    assert full(torch.ones(B, M, dtype=torch.bool), B, H, N, M) is None  # (N, M) by SDPA's rule: N != B
    assert full(torch.ones(2, 1, N, M, dtype=torch.bool), B, H, N, M) is None
    assert full(torch.ones(B, 1, N + 1, M, dtype=torch.bool), B, H, N, M) is None
    assert full(torch.zeros(B, 1, N, M), B, H, N, M) is None  # additive masks stay with SDPA
    assert full(torch.ones(B, 1, N, M, dtype=torch.bool), B, H, N, M, device="meta") is None


def _hf_case(case, B=3, H=4, N=7, M=7, D=6, Dv=11):
    """q, k, v on pruned widths and the bool mask Hugging Face builds for "sdpa" (materialised
    (B, 1, N, M), as transformers 5 does): an encoder's padded batch, a decoder's causal ∧ right
    or left padding, a decode step over a padded cache (N = 1), a chunk over cached keys (N < M)."""
    if case == "decode_padded":
        N = 1
    if case == "cache_chunk_padded":
        N = 3
    G = 2 if case.endswith("gqa") else H  # grouped-query attention: 2 kv heads for 4 query heads
    g = torch.Generator().manual_seed(12)
    q = torch.randn(B, H, N, D, generator=g)
    k, v = torch.randn(B, G, M, D, generator=g), torch.randn(B, G, M, Dv, generator=g)
    pad = torch.arange(M)[None] < torch.tensor([M, 4, 6])[:, None]
    if case.startswith("causal_left_padded"):
        pad = pad.flip(-1)
    keep = pad[:, None, None, :].expand(B, 1, N, M)
    if case != "encoder_padded":
        keep = keep & torch.ones(N, M, dtype=torch.bool).tril(M - N)
    return q, k, v, keep.contiguous()


@pytest.mark.parametrize("reads", ["cpu", "no_reads_triton", "no_reads_cpu"])
@pytest.mark.parametrize("case", ["encoder_padded", "causal_padded", "causal_left_padded", "causal_left_padded_gqa",
                                  "decode_padded", "cache_chunk_padded"])
def test_hf_bool_masks_reach_the_op_also_where_no_value_is_read(monkeypatch, case, reads):
    """hf_attention ("sdpa") with Hugging Face's bool masks: on CPU in eager mode the mask is read
    as key padding (the op's key-padding form); where no value is read and the op is the Triton
    kernel (CUDA) it takes the 4-D mask whole, where before such a mask went to SDPA on
    zero-padded widths; where no value is read and the op is not Triton (CPU compile / export)
    Hugging Face's function keeps it (but for a decode step's (B, 1, 1, M) mask: key padding by
    its shape). The numbers and gradients are always Hugging Face's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    q, k, v, mask = _hf_case(case)
    module = types.SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False,
                                   is_causal=case != "encoder_padded")
    cfg = types.SimpleNamespace(_attn_implementation="sdpa")
    if reads != "cpu":
        monkeypatch.setattr(layers, "traced", lambda: True)
    if reads == "no_reads_triton":
        interpreted_triton()
        monkeypatch.setenv("SPP_BACKEND", "triton")
    calls = []
    op = spp_kernels.attention
    monkeypatch.setattr(spp_kernels, "attention", lambda *a: calls.append(a[4:]) or op(*a))
    got, _ = layers.hf_attention(module, cfg, eager_attention_forward, q, k, v, mask, dropout=0.0, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if reads == "no_reads_cpu" and case != "decode_padded":
        assert not calls
    else:
        dim = 2 if reads == "cpu" or case == "decode_padded" else 4  # a decode step: key padding by its shape
        assert len(calls) == 1 and calls[0][0].dim() == dim, [c[0].shape for c in calls]
    do = torch.randn(got.shape, generator=torch.Generator().manual_seed(3))
    ts = [t.clone().requires_grad_() for t in (q, k, v)]
    mine = torch.autograd.grad(layers.hf_attention(module, cfg, eager_attention_forward, *ts, mask, dropout=0.0,
                                                   scaling=0.3)[0], ts, do)
    ts = [t.clone().requires_grad_() for t in (q, k, v)]
    theirs = torch.autograd.grad(sdpa_attention_forward(module, *ts, mask, dropout=0.0, scaling=0.3)[0], ts, do)
    for name, a, b in zip("qkv", mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"d{name} {case}")


@pytest.mark.parametrize("route", ["cpu", "triton", "no_reads_triton", "no_reads_cpu"])
@pytest.mark.parametrize("mask_kind", ["per_query_3d", "materialised_padding"])
def test_layer_core_gives_bool_masks_to_the_op(monkeypatch, mask_kind, route):
    """MaskedAttention's core hands the op a materialised padding mask as key padding where it
    reads it (CPU), whole where it does not and the op is Triton; a bool mask that is not key
    padding (per query, here 3-D as SDPA broadcasts it) goes to the op whole where that is Triton
    and to SDPA elsewhere. Always equal to SDPA's math kernel on the unpadded widths."""
    from helpers import sdpa_math_layer_output
    from spp.layers import MaskedAttention

    B, H, N, D, Dv, d = 2, 3, 9, 5, 7, 12
    torch.manual_seed(4)
    lin = torch.nn.Linear
    layer = MaskedAttention(lin(d, H * D), lin(d, H * D), lin(d, H * Dv), lin(H * Dv, d), H, D, Dv, scale=0.21).eval()
    x = torch.randn(B, N, d, generator=torch.Generator().manual_seed(5))
    if mask_kind == "per_query_3d":
        mask = per_query_mask(1, H, N, N)[0]
        mask[:, N // 2, 0] = True  # (SDPA's math kernel gives NaN to a row without keys)
    else:
        pad = torch.arange(N)[None] < torch.tensor([N, 4])[:, None]
        mask = pad[:, None, None, :].expand(B, 1, N, N).contiguous()
    if route.startswith("no_reads"):
        monkeypatch.setattr(layers, "traced", lambda: True)
    triton = route.endswith("triton")
    if triton:
        interpreted_triton()
        monkeypatch.setenv("SPP_BACKEND", "triton")
    calls = []
    op = spp_kernels.attention
    monkeypatch.setattr(spp_kernels, "attention", lambda *a, **kw: calls.append(a[4]) or op(*a, **kw))
    got = layer.forward_core(x, mask)
    if mask_kind == "materialised_padding" and not route.startswith("no_reads"):
        assert len(calls) == 1 and calls[0].dim() == 2
    elif triton:
        assert len(calls) == 1 and calls[0].dim() == 4
    else:
        assert not calls
    torch.testing.assert_close(got, sdpa_math_layer_output(layer, x, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "llama", "opt"])
def test_pruned_models_on_padded_batches_match_without_mask_reads(monkeypatch, family):
    """Pruned models on padded batches (a left-padded decoder row included): with the mask reads
    switched off and the Triton backend (the route of CUDA models) every layer's attention is the
    op with the model's 4-D mask, and the outputs at real tokens equal the reading route's."""
    import tiny_models as tm
    from helpers import make, quiet_search

    if family == "bert":
        model, batch = make("bert")
    else:
        model = tm.tiny_llama() if family == "llama" else tm.tiny_opt()
        batch = tm.token_batch(2)
        batch["attention_mask"][2, :3] = 0  # left padding: the first queries of row 2 see no key
    handle = spp.attach(model)
    small = spp.prune(model, quiet_search(handle, batch, steps=6).masks(keep=0.5)).eval()
    spp.detach(model)
    real = batch["attention_mask"].bool()
    assert not real.all()

    def out(m):
        o = m(**batch) if family == "bert" else m(**batch, use_cache=False)
        return (o.last_hidden_state if family == "bert" else o.logits)[real]

    interpreted_triton()
    from spp_kernels.triton import attention as tri

    with torch.no_grad():
        want = out(small)
        monkeypatch.setattr(layers, "traced", lambda: True)
        monkeypatch.setenv("SPP_BACKEND", "triton")
        calls, made = [], []
        op, args_of = spp_kernels.attention, tri._key_padding_args
        monkeypatch.setattr(spp_kernels, "attention", lambda *a, **kw: calls.append(a[4]) or op(*a, **kw))
        monkeypatch.setattr(tri, "_key_padding_args", lambda *a: made.append(1) or args_of(*a))
        got = out(small)
    assert len(calls) == 2 and all(c is not None and c.dim() == 4 for c in calls), [getattr(c, "shape", c) for c in calls]
    assert calls[0] is calls[1] and len(made) == 1  # one mask for both layers: its kernel arguments made once
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs in benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_pruned_models_on_padded_cuda_batches_run_the_triton_kernel(monkeypatch, family):
    """On CUDA a pruned model's padded batch reaches the Triton kernel with Hugging Face's 4-D mask
    (no mask value read on the host), and its outputs at real tokens equal the CPU model's."""
    import tiny_models as tm
    from helpers import make, quiet_search

    from spp_kernels import dispatch

    if family == "bert":
        model, batch = make("bert")
    else:
        model, batch = tm.tiny_llama(), tm.token_batch(2)
        batch["attention_mask"][2, :3] = 0
    handle = spp.attach(model)
    small = spp.prune(model, quiet_search(handle, batch, steps=6).masks(keep=0.5)).eval()
    spp.detach(model)
    real = batch["attention_mask"].bool()
    kw = {} if family == "bert" else {"use_cache": False}

    def out(m, b):
        o = m(**b, **kw)
        return (o.last_hidden_state if family == "bert" else o.logits)[real.to(o[0].device)].float().cpu()

    assert dispatch.choose("attention", "cuda")[0] == "triton"
    with torch.no_grad():
        want = out(small, batch)
        small = small.cuda()
        calls = []
        op = spp_kernels.attention
        monkeypatch.setattr(spp_kernels, "attention", lambda *a, **kw: calls.append(a[4]) or op(*a, **kw))
        got = out(small, {k: v.cuda() for k, v in batch.items()})
    assert len(calls) == 2 and all(c is not None and c.dim() == 4 and c.is_cuda for c in calls)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
