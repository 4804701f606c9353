"""``spp_kernels.linear`` (the unmasked product of pruned layers): the oneDNN path agrees with
``F.linear`` + activation, is taken exactly where it should be, and pruned models stay exact on it."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import spp
import spp_kernels
import spp_kernels._linear as lin_mod
from helpers import make, max_err, outputs, quiet_search
from spp.layers import run_linear
from tolerances import gemm_tol

ONEDNN = lin_mod.onednn_status()[0]
needs_onednn = pytest.mark.skipif(not ONEDNN, reason=f"no oneDNN linear here: {lin_mod.onednn_status()[1]}")
ACTS = ("none", "relu", "gelu", "gelu_tanh", "silu")


def _ref(x, W, b, act):
    return spp_kernels.reference.activation(act)(F.linear(x.double(), W.double(), None if b is None else b.double()))


def _ran_onednn(fn) -> bool:
    """Whether ``fn()`` called oneDNN's linear (read from the profiler's op names)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any("_linear_pointwise" in e.key for e in prof.key_averages())


@pytest.fixture
def fresh_state(monkeypatch):
    """Forget the remembered availability, so that env changes are read again."""
    monkeypatch.setattr(lin_mod, "_state", None)
    yield
    lin_mod._state = None


@needs_onednn
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape,out,bias", [((3, 67, 384), 53, True), ((197, 40), 1536, False), ((1, 7, 1536), 1, True)])
def test_onednn_path_matches_reference(act, shape, out, bias, monkeypatch):
    monkeypatch.setattr(lin_mod, "MIN_MACS", 0)
    g = torch.Generator().manual_seed(len(shape) * 1000 + out)
    x = torch.randn(*shape, generator=g)
    W = torch.randn(out, shape[-1], generator=g)
    b = torch.randn(out, generator=g) if bias else None
    with torch.no_grad():
        assert _ran_onednn(lambda: spp_kernels.linear(x, W, b, act))
        got = spp_kernels.linear(x, W, b, act)
    ref = _ref(x, W, b, act)
    assert got.shape == (*shape[:-1], out) and got.dtype == torch.float32
    tol = gemm_tol(torch.float32, shape[-1])
    torch.testing.assert_close(got.double(), ref, atol=tol.atol, rtol=tol.rtol)


@needs_onednn
def test_threshold_and_what_stays_on_f_linear(monkeypatch):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(24, 384, generator=g)
    b = torch.randn(24, generator=g)
    big, small = torch.randn(2, 128, 384, generator=g), torch.randn(1, 9, 384, generator=g)
    assert 2 * 128 * 24 * 384 >= lin_mod.MIN_MACS > 9 * 24 * 384
    with torch.no_grad():
        assert _ran_onednn(lambda: spp_kernels.linear(big, W, b))
        assert not _ran_onednn(lambda: spp_kernels.linear(small, W, b))
        # other dtypes: F.linear, bit for bit
        for dt in (torch.float16, torch.bfloat16, torch.float64):
            xb, Wb, bb = big.to(dt), W.to(dt), b.to(dt)
            assert not _ran_onednn(lambda: spp_kernels.linear(xb, Wb, bb, "gelu"))
            assert torch.equal(spp_kernels.linear(xb, Wb, bb, "gelu"), F.gelu(F.linear(xb, Wb, bb)))
        monkeypatch.setenv("SPP_BACKEND", "torch")
        assert not _ran_onednn(lambda: spp_kernels.linear(big, W, b))
        assert torch.equal(spp_kernels.linear(big, W, b), F.linear(big, W, b))
    monkeypatch.delenv("SPP_BACKEND")
    # FlopCounterMode (the cost-model tests) must see the product
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        spp_kernels.linear(big, W, b)
    assert fc.get_total_flops() == 2 * 2 * 128 * 24 * 384


def test_disabled_by_env(fresh_state, monkeypatch):
    monkeypatch.setenv("SPP_ONEDNN_LINEAR", "0")
    ok, why = spp_kernels.onednn_status()
    assert not ok and "SPP_ONEDNN_LINEAR" in why
    x, W = torch.randn(64, 384), torch.randn(384, 384)
    with torch.no_grad():
        assert not _ran_onednn(lambda: spp_kernels.linear(x, W))
        assert torch.equal(spp_kernels.linear(x, W, None, "relu"), F.relu(F.linear(x, W)))


def test_info_reports_the_linear(fresh_state):
    from spp_kernels.info import report

    line = [r for r in report().splitlines() if r.split()[1:2] == ["linear"]]
    assert len(line) == 1
    ok, why = spp_kernels.onednn_status()
    assert ("-> onednn" in line[0]) == ok and why in line[0]


def test_info_says_torch_under_spp_backend_torch(fresh_state, monkeypatch):
    from spp_kernels.info import report

    monkeypatch.setenv("SPP_BACKEND", "torch")
    line = [r for r in report().splitlines() if r.split()[1:2] == ["linear"]]
    assert len(line) == 1 and "-> torch" in line[0] and "SPP_BACKEND=torch" in line[0]
    x, W = torch.randn(64, 384), torch.randn(384, 384)
    with torch.no_grad():
        assert not _ran_onednn(lambda: spp_kernels.linear(x, W))  # what the line says


def test_bad_arguments_raise_like_f_linear():
    x, W = torch.randn(4, 8), torch.randn(3, 8)
    for bad in ("tanh", ["gelu"], 1):
        with pytest.raises(ValueError, match="act must be one of"):
            spp_kernels.linear(x, W, None, bad)
    with torch.no_grad(), pytest.raises(RuntimeError):
        spp_kernels.linear(torch.randn(4, 9), W)
    with torch.no_grad(), pytest.raises(RuntimeError):
        spp_kernels.linear(x, W, torch.randn(4))


@needs_onednn
def test_run_linear_respects_hooks_and_wrappers(monkeypatch):
    monkeypatch.setattr(lin_mod, "MIN_MACS", 0)
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert _ran_onednn(lambda: run_linear(lin, x, "gelu"))
        torch.testing.assert_close(run_linear(lin, x, "gelu"), F.gelu(lin(x)))
        seen = []
        h = lin.register_forward_hook(lambda mod, inp, out: seen.append(out.shape) or out * 2)
        try:
            assert not _ran_onednn(lambda: run_linear(lin, x))
            torch.testing.assert_close(run_linear(lin, x), 2 * F.linear(x, lin.weight, lin.bias))
            assert seen
        finally:
            h.remove()

        class Wrapped(nn.Linear):  # e.g. a LoRA layer: its own forward must run
            def forward(self, inp):
                return super().forward(inp) + 1.0

        w = Wrapped(16, 8)
        torch.testing.assert_close(run_linear(w, x, "relu"), F.relu(F.linear(x, w.weight, w.bias) + 1.0))


@needs_onednn
@pytest.mark.parametrize("family", ["bert", "vit"])
def test_pruned_model_exact_on_onednn(family, monkeypatch):
    """Pruned vs masked at a searched target, with every product of the pruned model on oneDNN."""
    model, batch = make(family, seed=3)
    handle = spp.attach(model)
    path = quiet_search(handle, batch, steps=30)
    masks = path.masks(keep=0.4)
    pruned = spp.prune(model, masks)
    handle.set_masks(masks)
    masked = outputs(model, batch)
    handle.set_masks(None)
    spp.detach(model)
    monkeypatch.setattr(lin_mod, "MIN_MACS", 0)
    assert _ran_onednn(lambda: outputs(pruned, batch))
    got = outputs(pruned, batch)
    assert max_err(got, masked) <= 1e-5
    monkeypatch.setattr(lin_mod, "MIN_MACS", 1 << 62)
    assert not _ran_onednn(lambda: outputs(pruned, batch))
    assert max_err(outputs(pruned, batch), got) <= 1e-5


@needs_onednn
def test_residual_in_the_epilogue(monkeypatch):
    monkeypatch.setattr(lin_mod, "MIN_MACS", 0)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 41, 29, generator=g)
    W = torch.randn(384, 29, generator=g)
    b = torch.randn(384, generator=g)
    r = torch.randn(3, 41, 384, generator=g)
    tol = gemm_tol(torch.float32, 29)
    with torch.no_grad():
        for bias in (b, None):
            ref = _ref(x, W, bias, None) + r.double()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                got = spp_kernels.linear(x, W, bias, None, r)
            assert any("_linear_pointwise" in e.key for e in prof.key_averages())
            assert not any(e.key == "aten::add" for e in prof.key_averages())  # no separate pass
            torch.testing.assert_close(got.double(), ref, atol=tol.atol, rtol=tol.rtol)
        r_before = r.clone()
        spp_kernels.linear(x, W, b, None, r)
        assert torch.equal(r, r_before)  # the residual is read, not written
        # what the epilogue does not take falls back and still computes act(x Wᵀ + b) + residual
        for act, res in (("gelu", r), (None, r.transpose(0, 1).contiguous().transpose(0, 1)), (None, r[0, 0])):
            ref = _ref(x, W, b, act) + res.double()
            torch.testing.assert_close(spp_kernels.linear(x, W, b, act, res).double(), ref, atol=tol.atol,
                                       rtol=tol.rtol)
    xg = x.clone().requires_grad_()
    rg = r.clone().requires_grad_()
    (spp_kernels.linear(xg, W, b, None, rg) * r).sum().backward()
    assert torch.equal(rg.grad, r) and xg.grad is not None


@needs_onednn
def test_torch_func_transforms_keep_f_linear(monkeypatch):
    """vmap / grad see F.linear (the oneDNN op has no batching rule or derivative)."""
    monkeypatch.setattr(lin_mod, "MIN_MACS", 0)
    g = torch.Generator().manual_seed(3)
    x, W, b = torch.randn(5, 6, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    with torch.no_grad():
        got = torch.func.vmap(lambda t: spp_kernels.linear(t, W, b, "gelu"))(x)
    torch.testing.assert_close(got, F.gelu(F.linear(x, W, b)))
    gx = torch.func.grad(lambda t: spp_kernels.linear(t, W, b, "silu").sum())(x)
    xr = x.clone().requires_grad_()
    F.silu(F.linear(xr, W, b)).sum().backward()
    torch.testing.assert_close(gx, xr.grad)


@needs_onednn
@pytest.mark.parametrize("shape,out,bias,act,residual", [((3, 67, 384), 53, True, "gelu", False),
                                                         ((197, 40), 1536, False, None, True),
                                                         ((2, 5, 29), 384, True, "silu", True)])
def test_training_path_on_onednn(shape, out, bias, act, residual, monkeypatch):
    """With gradients (fine-tuning) the products, forward and backward, run on oneDNN; values and
    dx, dW, db (and the residual's gradient) agree with float64 autograd."""
    monkeypatch.setattr(lin_mod, "MIN_MACS", 0)
    g = torch.Generator().manual_seed(out)
    x = torch.randn(*shape, generator=g)
    W = torch.randn(out, shape[-1], generator=g) / shape[-1] ** 0.5
    b = torch.randn(out, generator=g) if bias else None
    r = torch.randn(*shape[:-1], out, generator=g) if residual else None
    go = torch.randn(*shape[:-1], out, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, W, b, r) if t is not None]
    it = iter(leaves)
    xl, Wl = next(it), next(it)
    bl = next(it) if bias else None
    rl = next(it) if residual else None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = spp_kernels.linear(xl, Wl, bl, act, rl)
        y.backward(go)
    names = [e.key for e in prof.key_averages()]
    assert sum("_linear_pointwise" in n for n in names) >= 1 and "aten::addmm" not in names and "aten::mm" not in names
    refs = [t.double().requires_grad_() for t in (x, W, b, r) if t is not None]
    it = iter(refs)
    x64, W64 = next(it), next(it)
    b64 = next(it) if bias else None
    r64 = next(it) if residual else None
    ref = spp_kernels.reference.activation(act)(F.linear(x64, W64, b64))
    ref = ref if r64 is None else ref + r64
    ref.backward(go.double())
    K, T = shape[-1], x.numel() // shape[-1]
    tol = gemm_tol(torch.float32, K)
    torch.testing.assert_close(y.double(), ref.detach(), atol=tol.atol, rtol=tol.rtol)
    for name, a, e, n in (("dx", xl, x64, out), ("dW", Wl, W64, T), ("db", bl, b64, T), ("dresidual", rl, r64, 1)):
        if a is not None:
            t = gemm_tol(torch.float32, n)
            torch.testing.assert_close(a.grad.double(), e.grad, atol=t.atol, rtol=t.rtol, msg=name)


@needs_onednn
def test_frozen_weights_get_no_gradient(monkeypatch):
    monkeypatch.setattr(lin_mod, "MIN_MACS", 0)
    x = torch.randn(4, 9, 16, requires_grad=True)
    W, b = torch.randn(8, 16), torch.randn(8)
    spp_kernels.linear(x, W, b).sum().backward()
    assert W.grad is None and b.grad is None
    torch.testing.assert_close(x.grad, W.sum(0).expand(4, 9, 16))


def test_bench_records_the_route(monkeypatch):
    from spp.bench import linear_setting

    on = spp_kernels.onednn_status()[0]
    assert linear_setting("cpu", torch.float32) == ("onednn" if on else "aten")
    assert linear_setting("cpu", torch.bfloat16) == "aten" and linear_setting("cuda", torch.float32) == "aten"
    monkeypatch.setenv("SPP_BACKEND", "torch")
    assert linear_setting("cpu", torch.float32) == "aten"
