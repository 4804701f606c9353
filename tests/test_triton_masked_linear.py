"""The Triton ``masked_linear`` (spp_kernels/triton/masked_linear.py) against the float64 oracle:
tokens 1/7/197, widths 1/40/52/384 (1536 in the slow sweep), fp32/fp16/bf16, every activation,
forward and every gradient (x, m, W, b), col2unit, leading batch dims, non-contiguous inputs,
frozen weights (no dW op, W.grad None), opcheck, torch.compile, and the dispatcher route.
On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py before triton is imported)."""

import pytest
import torch

from triton_helpers import DEVICE, OpLog, rand_mask, randn, seed_of  # first: it skips this module where Triton cannot run

import spp_kernels
from spp_kernels import dispatch
from spp_kernels.triton import _common
from spp_kernels.triton import masked_linear as tri
from oracles import oracle_masked_linear
from tolerances import DTYPE_IDS, DTYPES, assert_close


ACTS = [None, "gelu", "gelu_tanh", "relu", "silu"]
# (tokens T, in K, out N): tokens 1, 7, 197; widths 1, 40, 52, 384
SHAPES = [(1, 40, 1), (7, 52, 40), (197, 40, 52), (7, 384, 52), (197, 1, 384)]
SLOW_SHAPES = [(T, K, N) for T in (1, 7, 197) for K in (1, 40, 384, 1536) for N in (1, 52, 384, 1536)]


def check_all_grads(T, K, N, dtype, act, bias=True, col2unit=None, U=None, lead=()):
    """Forward and the gradients of x, W, b, m against the float64 oracle."""
    gen = torch.Generator().manual_seed(seed_of(T, K, N, act, bias, str(dtype), lead))
    x = randn((*lead, T, K), dtype, gen).requires_grad_()
    W = randn((N, K), dtype, gen).requires_grad_()
    b = randn((N,), dtype, gen).requires_grad_() if bias else None
    m = rand_mask(U or N, gen).requires_grad_()
    out = tri.masked_linear(x, W, b, m, col2unit, act)
    assert out.dtype == dtype and out.shape == (*lead, T, N)
    gy = randn(out.shape, dtype, gen)
    out.backward(gy)
    leaves = [x, W, m] + ([b] if bias else [])
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    x64, W64, m64 = ref_leaves[:3]
    b64 = ref_leaves[3] if bias else None
    ref = oracle_masked_linear(x64, W64, b64, m64, col2unit, act)
    ref.backward(gy.double())
    tokens = T * max(1, int(torch.tensor(lead).prod())) if lead else T
    per_unit = N // (U or N)
    assert_close(out, ref, dtype, K, msg="out")
    assert x.grad.dtype == dtype and m.grad.dtype == torch.float32 and W.grad.dtype == dtype
    # act'(h) carries h's rounding (a length-K reduction) into dx, dW and db
    assert_close(x.grad, x64.grad, dtype, N, K, msg="dx")
    assert_close(m.grad, m64.grad, dtype, tokens * per_unit, K, msg="dm")
    assert_close(W.grad, W64.grad, dtype, tokens, K, msg="dW")
    if bias:
        assert_close(b.grad, b64.grad, dtype, tokens, K, msg="db")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%d-K%d-N%d" % s)
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_forward_and_all_grads(dtype, act, shape):
    check_all_grads(*shape, dtype, act)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_no_bias_col2unit_and_leading_batch(dtype):
    # qk/vo layout: 4 heads of width 13 share 13 units
    col2unit = torch.arange(13).repeat(4).to(DEVICE)
    check_all_grads(7, 40, 52, dtype, "gelu", bias=False, col2unit=col2unit, U=13, lead=(2, 3))
    check_all_grads(1, 52, 40, dtype, None, col2unit=torch.arange(40).flip(0).to(DEVICE), U=40, lead=(2,))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_non_contiguous_inputs(dtype):
    gen = torch.Generator().manual_seed(seed_of("nc", str(dtype)))
    x = randn((40, 7), dtype, gen).t().requires_grad_()  # transposed view
    xb = randn((2, 3, 80), dtype, gen)[..., ::2]  # strided last dim, leading batch
    W = randn((40, 52), dtype, gen).t()  # (52, 40) transposed view
    b = randn((104,), dtype, gen)[::2]  # strided bias
    m = rand_mask(104, gen)[::2].clone().requires_grad_()
    out = tri.masked_linear(x, W, b, m, None, "silu")
    ref = oracle_masked_linear(x.detach(), W, b, m.detach(), None, "silu")
    assert_close(out, ref, dtype, 40, msg="transposed x/W, strided b")
    gy = randn(out.shape, dtype, gen).t().contiguous().t()  # a non-contiguous upstream gradient
    out.backward(gy)
    x64, m64 = x.detach().double().requires_grad_(), m.detach().double().requires_grad_()
    oracle_masked_linear(x64, W, b, m64, None, "silu").backward(gy.double())
    assert_close(x.grad, x64.grad, dtype, 52, 40, msg="dx")
    assert_close(m.grad, m64.grad, dtype, 7, 40, msg="dm")
    assert_close(tri.masked_linear(xb, W, b, m.detach(), None, "relu"),
                 oracle_masked_linear(xb, W, b, m.detach(), None, "relu"), dtype, 40, msg="strided x")


def test_frozen_weights_run_no_dw_op():
    gen = torch.Generator().manual_seed(3)
    x = randn((7, 40), torch.float32, gen).requires_grad_()
    W, b = randn((52, 40), torch.float32, gen), randn((52,), torch.float32, gen)
    m = rand_mask(52, gen).requires_grad_()
    log = OpLog()
    with log:
        out = tri.masked_linear(x, W, b, m, None, "gelu")
        out.sum().backward()
    assert "spp_triton.masked_linear_bwd" in log.ops, log.ops
    assert "spp_triton.masked_linear_dw" not in log.ops, "frozen W: the dW op must not run"
    assert W.grad is None and b.grad is None and x.grad is not None and m.grad is not None
    # and it does run when W is trained
    W.requires_grad_()
    log = OpLog()
    with log:
        tri.masked_linear(x, W, b, m, None, "gelu").sum().backward()
    assert "spp_triton.masked_linear_dw" in log.ops and W.grad is not None and b.grad is None


def test_no_saved_activation_without_grad():
    gen = torch.Generator().manual_seed(4)
    x, W, b = randn((7, 40), torch.float32, gen), randn((52, 40), torch.float32, gen), randn((52,), torch.float32, gen)
    m = rand_mask(52, gen)
    y, h = tri.masked_linear_fwd(x, W, b, m, _common.act_id("gelu"), False)
    assert h.numel() == 0
    torch.testing.assert_close(y, tri.masked_linear(x, W, b, m, None, "gelu"), atol=0, rtol=0)


def test_bad_input_is_refused_with_the_argument_named():
    x, W, b, m = torch.randn(7, 40), torch.randn(52, 40), torch.randn(52), torch.rand(52)
    with pytest.raises(ValueError, match="in_features"):
        tri.masked_linear(torch.randn(7, 41), W, b, m)
    with pytest.raises(TypeError, match="W dtype"):
        tri.masked_linear(x, W.half(), b, m)
    with pytest.raises(TypeError, match="m must be float32"):
        tri.masked_linear(x, W, b, m.double())
    with pytest.raises(ValueError, match="act"):
        tri.masked_linear(x, W, b, m, None, "tanh")
    with pytest.raises(ValueError, match="col2unit"):
        tri.masked_linear(x, W, b, torch.rand(13), torch.full((52,), 13))


def _op_args(requires_w):
    gen = torch.Generator().manual_seed(5)
    x = randn((7, 40), torch.float32, gen).requires_grad_()
    W = randn((52, 40), torch.float32, gen).requires_grad_(requires_w)
    b = randn((52,), torch.float32, gen).requires_grad_(requires_w)
    return x, W, b, rand_mask(52, gen).requires_grad_()


@pytest.mark.parametrize("requires_w", [False, True], ids=["frozen", "trained"])
def test_opcheck(requires_w):
    x, W, b, m = _op_args(requires_w)
    torch.library.opcheck(torch.ops.spp_triton.masked_linear_fwd.default, (x, W, b, m, _common.act_id("gelu"), True))
    y, h = tri.masked_linear_fwd(x, W, b, m, _common.act_id("gelu"), True)
    dy = torch.randn_like(y)
    args = (dy, x.detach(), W.detach(), h.detach(), m.detach(), _common.act_id("gelu"), True, True)
    torch.library.opcheck(torch.ops.spp_triton.masked_linear_bwd.default, args)
    dh = tri.masked_linear_bwd(*args)[2]
    torch.library.opcheck(torch.ops.spp_triton.masked_linear_dw.default, (dh, x.detach()))


def test_torch_compile():
    x, W, b, m = _op_args(True)

    def f(x, W, b, m):
        return tri.masked_linear(x, W, b, m, None, "silu").square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(x, W, b, m)
    grads = torch.autograd.grad(loss, (x, W, b, m))
    eager = f(x, W, b, m)
    want = torch.autograd.grad(eager, (x, W, b, m))
    torch.testing.assert_close(loss, eager)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


def test_dispatcher_serves_triton_on_cpu_only_when_asked(monkeypatch):
    if DEVICE != "cpu":
        assert dispatch.choose("masked_linear", "cuda")[0] == "triton"
        return
    monkeypatch.delenv("SPP_BACKEND", raising=False)
    assert dispatch.choose("masked_linear", "cpu")[0] != "triton"
    monkeypatch.setenv("SPP_BACKEND", "triton")
    assert dispatch.choose("masked_linear", "cpu") == ("triton", "forced by SPP_BACKEND")
    assert dispatch.resolve("masked_linear", torch.device("cpu")) is tri.masked_linear
    x, W, b, m = _op_args(False)
    with OpLog() as log:
        out = spp_kernels.masked_linear(x, W, b, m, None, "gelu")
    assert "spp_triton.masked_linear_fwd" in log.ops
    assert_close(out, oracle_masked_linear(x.detach(), W, b, m.detach(), None, "gelu"), torch.float32, 40)


@pytest.mark.slow
@pytest.mark.parametrize("shape", SLOW_SHAPES, ids=lambda s: "T%d-K%d-N%d" % s)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_wide_sweep(dtype, shape):
    check_all_grads(*shape, dtype, "gelu")
