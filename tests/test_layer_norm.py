"""``spp_kernels.layer_norm`` and the extension's CPU kernel behind it (csrc/layer_norm.cpp):
agreement with a float64 LayerNorm at odd widths (vector tails, widths under one vector, a large
mean), the cases that keep ``F.layer_norm``, and pruned / rebuilt models whose LayerNorms use it."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spp
import spp_kernels
from helpers import bert_batch, make, max_err, outputs, quiet_search
from spp.layers import FastLayerNorm, use_fast_norms
from spp_kernels import _norm
from tolerances import assert_close

needs_kernel = pytest.mark.skipif(not _norm.available(), reason="spp_kernels._C with the LayerNorm kernel is not built")


@pytest.fixture(autouse=True)
def every_size(monkeypatch):
    """The kernel for inputs of any size (small ones keep F.layer_norm by default)."""
    monkeypatch.setattr(_norm, "MIN_ELEMENTS", 0)


def _ran_kernel(fn) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.key for e in prof.key_averages()]
    assert any("layer_norm" in n for n in names)  # one of the two ran
    return any(n.startswith("spp_ext::layer_norm") for n in names)


def _ref(x, w, b, eps):
    return F.layer_norm(x.double(), (x.shape[-1],), None if w is None else w.double(),
                        None if b is None else b.double(), eps)


@needs_kernel
@pytest.mark.parametrize("shape", [(3, 5, 384), (7, 1), (2, 17), (4, 33), (1, 1536), (5, 3, 47), (9, 16)])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_kernel_matches_a_float64_layer_norm(shape, affine):
    g = torch.Generator().manual_seed(shape[-1] * 10 + len(affine))
    x = torch.randn(*shape, generator=g) * 3 + 2
    C = shape[-1]
    w = torch.randn(C, generator=g) if affine != "none" else None
    b = torch.randn(C, generator=g) if affine == "both" else None
    with torch.no_grad():
        assert _ran_kernel(lambda: spp_kernels.layer_norm(x, C, w, b, 1e-5))
        got = spp_kernels.layer_norm(x, (C,), w, b, 1e-5)
    assert got.shape == x.shape and got.dtype == torch.float32 and got.is_contiguous()
    assert_close(got, _ref(x, w, b, 1e-5), torch.float32, C, msg=str(shape))
    # as close to torch's own fp32 LayerNorm as rounding allows
    torch.testing.assert_close(got, F.layer_norm(x, (C,), w, b, 1e-5), rtol=2e-5, atol=2e-5)


@needs_kernel
def test_large_mean_small_spread_keeps_its_digits():
    # a one-pass E[x²] - E[x]² would lose the spread (0.05) under the mean (300) in fp32; two
    # passes are as accurate as torch's own fp32 LayerNorm
    g = torch.Generator().manual_seed(5)
    x = (300 + torch.randn(6, 200, generator=g, dtype=torch.float64) * 0.05).float()
    want = F.layer_norm(x.double(), (200,), eps=1e-12)  # the fp32 inputs, normalised in float64
    ours = (torch.ops.spp_ext.layer_norm(x, None, None, 1e-12).double() - want).abs().max()
    aten = (F.layer_norm(x, (200,), eps=1e-12).double() - want).abs().max()
    assert ours < max(2 * aten, 1e-4), (ours, aten)


@needs_kernel
def test_eps_rows_of_constants_and_empty_inputs():
    x = torch.full((3, 40), 7.0)
    w, b = torch.randn(40), torch.randn(40)
    got = torch.ops.spp_ext.layer_norm(x, w, b, 1e-5)
    torch.testing.assert_close(got, b.expand(3, 40))  # zero spread: (x - mean) = 0, only the bias is left
    assert torch.ops.spp_ext.layer_norm(torch.empty(0, 5), None, None, 1e-5).shape == (0, 5)
    # constants whose rounded mean would be an ulp off: still exactly the bias, even with BERT's
    # eps = 1e-12 (an ulp of 127 times 1 / sqrt(eps) would be ~8 · w)
    for c, C in ((126.99, 384), (0.1, 384), (3.3, 301), (-1e4 / 3, 768)):
        w, b = torch.randn(C), torch.randn(C)
        got = torch.ops.spp_ext.layer_norm(torch.full((2, C), c), w, b, 1e-12)
        assert torch.equal(got, b.expand(2, C)), (c, C)
    x = torch.randn(4, 8) * 1e3
    torch.testing.assert_close(torch.ops.spp_ext.layer_norm(x, None, None, 1e7), F.layer_norm(x, (8,), eps=1e7))


@needs_kernel
def test_non_contiguous_inputs_and_thread_counts_give_the_same_bits():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(37, 4096, generator=g)
    w, b = torch.randn(37, generator=g), torch.randn(37, generator=g)
    xt = x.t()  # (4096, 37), last dim strided: 4096 rows are several chunks of >= 16 K elements
    a = torch.ops.spp_ext.layer_norm(xt, w, b, 1e-6)
    assert torch.equal(a, torch.ops.spp_ext.layer_norm(xt.contiguous(), w, b, 1e-6))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.spp_ext.layer_norm(xt, w, b, 1e-6)
        torch.set_num_threads(2)
        two = torch.ops.spp_ext.layer_norm(xt, w, b, 1e-6)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, one) and torch.equal(a, two)


@needs_kernel
def test_cases_that_keep_f_layer_norm(monkeypatch):
    x = torch.randn(4, 24)
    ln = nn.LayerNorm(24)
    use_fast_norms(nn.Sequential(ln))
    assert type(ln) is FastLayerNorm
    # a gradient to compute: torch's LayerNorm, and the gradient arrives
    assert not _ran_kernel(lambda: ln(x))
    ln(x).sum().backward()
    assert ln.weight.grad is not None and torch.isfinite(ln.weight.grad).all()
    with torch.no_grad():
        assert _ran_kernel(lambda: ln(x))
        assert not _ran_kernel(lambda: F.layer_norm(x.double(), (24,)))
        assert not _ran_kernel(lambda: spp_kernels.layer_norm(x.double(), 24))
        assert not _ran_kernel(lambda: spp_kernels.layer_norm(x.view(4, 4, 6), (4, 6)))  # two normalised dims
        monkeypatch.setenv("SPP_BACKEND", "torch")
        assert not _ran_kernel(lambda: ln(x))
        monkeypatch.delenv("SPP_BACKEND")
        assert _ran_kernel(lambda: ln(x))
    with torch.inference_mode():
        assert _ran_kernel(lambda: ln(x))


@needs_kernel
def test_small_inputs_keep_f_layer_norm(monkeypatch):
    monkeypatch.setattr(_norm, "MIN_ELEMENTS", 1 << 16)
    w, b = torch.randn(384), torch.randn(384)
    with torch.no_grad():
        assert not _ran_kernel(lambda: spp_kernels.layer_norm(torch.randn(128, 384), 384, w, b))  # batch 1
        assert _ran_kernel(lambda: spp_kernels.layer_norm(torch.randn(2, 128, 384), 384, w, b))


@needs_kernel
def test_under_torch_compile_and_torch_func():
    ln = nn.LayerNorm(24)
    use_fast_norms(nn.Sequential(ln))
    x = torch.randn(5, 24)
    with torch.no_grad():
        want = F.layer_norm(x, (24,), ln.weight, ln.bias, ln.eps)
        # Dynamo traces the compiling flag first, so the whole module is one graph of F.layer_norm
        compiled = torch.compile(ln, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), want)
    # vmap over stacked parameters (wrapped weight, plain input): torch's op, which has the rules
    params = {"weight": torch.randn(3, 24), "bias": torch.randn(3, 24)}
    with torch.no_grad():
        got = torch.func.vmap(lambda p: torch.func.functional_call(ln, p, (x,)))(params)
    for i in range(3):
        torch.testing.assert_close(got[i], F.layer_norm(x, (24,), params["weight"][i], params["bias"][i], ln.eps))


def test_which_norms_are_converted():
    import timm.layers

    plain, timm_ln, timm_fast = nn.LayerNorm(8), timm.layers.LayerNorm(8), timm.layers.LayerNorm(8)
    timm_fast._fast_norm = True  # timm's own fused norm: a different function, left alone

    class Sub(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    sub = Sub(8)
    assert use_fast_norms(nn.ModuleList([plain, timm_ln, timm_fast, sub])) == 2
    assert type(plain) is FastLayerNorm and type(timm_ln) is FastLayerNorm
    assert type(timm_fast) is timm.layers.LayerNorm and type(sub) is Sub


@needs_kernel
def test_argument_checks_and_opcheck():
    x = torch.randn(3, 10)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.spp_ext.layer_norm(x, torch.randn(9), None, 1e-5)
    with pytest.raises(RuntimeError, match="fp32 CPU x"):
        torch.ops.spp_ext.layer_norm(x.double(), None, None, 1e-5)
    torch.library.opcheck(torch.ops.spp_ext.layer_norm, (x, torch.randn(10), torch.randn(10), 1e-5))
    torch.library.opcheck(torch.ops.spp_ext.layer_norm, (x.t(), None, None, 1e-3))


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_pruned_and_rebuilt_models_use_it_with_the_same_state(family, tmp_path):
    model, batch = make(family)
    before = [type(m) for m in model.modules()]
    handle = spp.attach(model)
    path = quiet_search(handle, batch, steps=30)
    spp.detach(model)
    pruned = spp.prune(model, path.masks(keep=0.6))
    norms = [m for m in pruned.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(type(m) is FastLayerNorm for m in norms)
    assert [type(m) for m in model.modules()] == before  # the model itself is untouched
    plain = spp.prune(model, path.masks(keep=0.6))
    (orig,) = {type(m) for m in model.modules() if isinstance(m, nn.LayerNorm)}  # nn's or timm's
    for m in plain.modules():
        if type(m) is FastLayerNorm:
            m.__class__ = orig
    assert list(pruned.state_dict()) == list(plain.state_dict())
    assert max_err(outputs(pruned, batch), outputs(plain, batch)) < 1e-5
    if _norm.available():
        assert _ran_kernel(lambda: outputs(pruned, batch))
    spp.save_pruned(pruned, tmp_path / "m")
    loaded = spp.load_pruned(str(tmp_path / "m"))
    assert all(type(m) is FastLayerNorm for m in loaded.modules() if isinstance(m, nn.LayerNorm))
    assert max_err(outputs(loaded, batch), outputs(pruned, batch)) == 0
    # the opt-out keeps the classes
    kept = spp.prune(model, path.masks(keep=0.6), fast_norms=False)
    assert {type(m) for m in kept.modules() if isinstance(m, nn.LayerNorm)} == {orig}
    assert {type(m) for m in spp.load_pruned(str(tmp_path / "m"), fast_norms=False).modules()
            if isinstance(m, nn.LayerNorm)} == {orig}
