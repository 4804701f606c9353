"""The Triton ``pair_matmul`` (spp_kernels/triton/pair_matmul.py) against the float64 oracle:
tokens 1/7/197, widths 1/40/52/384 (1536 in the slow sweep), fp32/fp16/bf16, every activation,
forward and every gradient (x, m, W1, b1, W2, b2), ``active`` subsets (empty, few, unsorted,
most, all) read by the kernel only (NaN elsewhere stays unseen), the fused and the split
(wide-output) paths, leading batch dims, non-contiguous inputs, frozen weights (no dW ops),
opcheck, torch.compile and the dispatcher route. On CPU under TRITON_INTERPRET=1."""

import pytest
import torch

from triton_helpers import DEVICE, OpLog, rand_mask, randn, seed_of  # first: it skips this module where Triton cannot run

import spp_kernels
from spp_kernels import dispatch
from spp_kernels.triton import _common
from spp_kernels.triton import pair_matmul as tri
from oracles import oracle_pair
from tolerances import DTYPE_IDS, DTYPES, assert_close


ACTS = [None, "gelu", "gelu_tanh", "relu", "silu"]
# (tokens T, in K, units U, out N); N = 384 > FUSED_MAX_N takes the split path under the interpreter
SHAPES = [(1, 40, 1, 52), (7, 52, 40, 1), (197, 40, 52, 40), (7, 384, 52, 384), (1, 1, 384, 40)]
SLOW_SHAPES = [(T, K, U, N) for T in (1, 7, 197) for K in (40, 384) for U in (1, 52, 1536) for N in (52, 384, 1536)]
GRADS = ("x", "W1", "b1", "m", "W2", "b2")


def make(T, K, U, N, dtype, gen, lead=(), bias=True, trained=True):
    t = dict(x=randn((*lead, T, K), dtype, gen), W1=randn((U, K), dtype, gen), b1=randn((U,), dtype, gen) if bias else None,
             m=rand_mask(U, gen), W2=randn((N, U), dtype, gen), b2=randn((N,), dtype, gen) if bias else None)
    for k, v in t.items():
        if v is not None and (trained or k in ("x", "m")):
            v.requires_grad_()
    return t


def check(T, K, U, N, dtype, act, active=None, lead=(), bias=True):
    gen = torch.Generator().manual_seed(seed_of(T, K, U, N, act, str(dtype), lead, bias, active is None))
    t = make(T, K, U, N, dtype, gen, lead, bias)
    out = tri.pair_matmul(*(t[k] for k in GRADS), act, active)
    assert out.dtype == dtype and out.shape == (*lead, T, N)
    gy = randn(out.shape, dtype, gen)
    out.backward(gy)
    r = {k: (None if v is None else v.detach().double().requires_grad_()) for k, v in t.items()}
    ref = oracle_pair(*(r[k] for k in GRADS), act, None if active is None else active.cpu())
    ref.backward(gy.double())
    tokens = T * (int(torch.tensor(lead).prod()) if lead else 1)
    assert_close(out, ref, dtype, K, U, msg="out")
    assert t["m"].grad.dtype == torch.float32
    # dh = (dy W2) ⊙ m ⊙ act'(h): it carries a length-N and (through h) a length-K reduction
    assert_close(t["x"].grad, r["x"].grad, dtype, U, N, K, msg="dx")
    assert_close(t["m"].grad, r["m"].grad, dtype, tokens, K, N, msg="dm")
    assert_close(t["W1"].grad, r["W1"].grad, dtype, tokens, N, K, msg="dW1")
    assert_close(t["W2"].grad, r["W2"].grad, dtype, tokens, K, msg="dW2")
    if bias:
        assert_close(t["b1"].grad, r["b1"].grad, dtype, tokens, N, K, msg="db1")
        assert_close(t["b2"].grad, r["b2"].grad, dtype, tokens, msg="db2")
    if active is not None:  # units outside active: not computed, zero gradients
        out_ = torch.ones(U, dtype=torch.bool, device=DEVICE)
        out_[active] = False
        assert torch.all(t["m"].grad[out_] == 0)
        assert torch.all(t["W1"].grad[out_] == 0) and torch.all(t["W2"].grad[:, out_] == 0)
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%d-K%d-U%d-N%d" % s)
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_forward_and_all_grads(dtype, act, shape):
    check(*shape, dtype, act)


def _active(kind, U, gen):
    return {
        "empty": torch.zeros(0, dtype=torch.int64),
        "few": torch.tensor([0, 5, 17, U - 1]),
        "unsorted": torch.tensor([U - 1, 17, 0, 5], dtype=torch.int32),
        "most": torch.randperm(U, generator=gen)[: U - 3],
        "all": torch.arange(U),
    }[kind].to(DEVICE)


@pytest.mark.parametrize("kind", ["empty", "few", "unsorted", "most", "all"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_active_subsets(dtype, kind):
    gen = torch.Generator().manual_seed(seed_of(kind, str(dtype)))
    active = _active(kind, 52, gen)
    out = check(7, 40, 52, 40, dtype, "gelu", active=active, bias=kind != "few")
    if kind == "empty":  # no unit: exactly b2
        gen = torch.Generator().manual_seed(seed_of(7, 40, 52, 40, "gelu", str(dtype), (), True, False))
        t = make(7, 40, 52, 40, dtype, gen)
        assert torch.equal(out.detach(), t["b2"].detach().expand(7, 40))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_units_outside_active_are_never_read(dtype):
    """Poisoned rows of W1 / columns of W2 / entries of b1 and m outside ``active`` stay unseen:
    the kernels gather only the kept units (cost ∝ kept fraction)."""
    gen = torch.Generator().manual_seed(seed_of("poison", str(dtype)))
    T, K, U, N = 7, 40, 52, 40
    t = make(T, K, U, N, dtype, gen, trained=False)
    active = torch.tensor([3, 30, 11, 50], device=DEVICE)
    drop = torch.ones(U, dtype=torch.bool, device=DEVICE)
    drop[active] = False
    W1, b1, W2 = t["W1"].clone(), t["b1"].clone(), t["W2"].clone()
    W1[drop], b1[drop], W2[:, drop] = float("nan"), float("nan"), float("nan")
    m = t["m"].detach().clone()
    m[drop] = float("nan")
    m.requires_grad_()
    out = tri.pair_matmul(t["x"], W1, b1, m, W2, t["b2"], "silu", active)
    ref = oracle_pair(t["x"].detach(), t["W1"], t["b1"], t["m"].detach(), t["W2"], t["b2"], "silu", active.cpu())
    assert_close(out, ref, dtype, K, U, msg="poisoned inactive units")
    out.sum().backward()
    assert torch.isfinite(t["x"].grad).all() and torch.all(m.grad[drop] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_fused_and_split_paths_agree(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(seed_of("paths", str(dtype)))
    t = make(197, 52, 40, 52, dtype, gen, trained=False)
    active = torch.randperm(40, generator=gen)[:25].to(DEVICE)
    args = [t[k].detach() for k in GRADS]
    fused = tri.pair_matmul(*args, "gelu_tanh", active)
    monkeypatch.setattr(tri, "FUSED_MAX_N", 0)
    split = tri.pair_matmul(*args, "gelu_tanh", active)
    ref = oracle_pair(*args, "gelu_tanh", active.cpu())
    assert_close(fused, ref, dtype, 52, 40, msg="fused")
    assert_close(split, ref, dtype, 52, 40, msg="split")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_leading_batch_no_bias(dtype):
    check(7, 40, 52, 40, dtype, "relu", lead=(2, 3), bias=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_non_contiguous_inputs(dtype):
    gen = torch.Generator().manual_seed(seed_of("nc", str(dtype)))
    x = randn((40, 7), dtype, gen).t().requires_grad_()
    W1 = randn((40, 52), dtype, gen).t()  # (52, 40) view
    W2 = randn((52, 30), dtype, gen).t()  # (30, 52) view
    b1, b2 = randn((104,), dtype, gen)[::2], randn((30,), dtype, gen)
    m = rand_mask(52, gen).requires_grad_()
    active = torch.arange(0, 52, 3, device=DEVICE)[::2]  # strided index list
    out = tri.pair_matmul(x, W1, b1, m, W2, b2, "gelu", active)
    gy = randn(out.shape, dtype, gen).t().contiguous().t()
    out.backward(gy)
    x64, m64 = x.detach().double().requires_grad_(), m.detach().double().requires_grad_()
    ref = oracle_pair(x64, W1, b1, m64, W2, b2, "gelu", active.cpu())
    ref.backward(gy.double())
    assert_close(out, ref, dtype, 40, 52, msg="out")
    assert_close(x.grad, x64.grad, dtype, 52, 30, 40, msg="dx")
    assert_close(m.grad, m64.grad, dtype, 7, 40, 30, msg="dm")
    xb = randn((2, 3, 80), dtype, gen)[..., ::2]
    assert_close(tri.pair_matmul(xb, W1, b1, m.detach(), W2, b2, "relu"),
                 oracle_pair(xb, W1, b1, m.detach(), W2, b2, "relu"), dtype, 40, 52, msg="strided x")


def test_frozen_weights_run_no_dw_op():
    gen = torch.Generator().manual_seed(9)
    t = make(7, 40, 52, 40, torch.float32, gen, trained=False)
    with OpLog() as log:
        tri.pair_matmul(*(t[k] for k in GRADS), "gelu", torch.arange(0, 52, 2, device=DEVICE)).sum().backward()
    assert "spp_triton.pair_matmul_bwd" in log.ops, log.ops
    assert "spp_triton.pair_matmul_dw1" not in log.ops and "spp_triton.pair_matmul_dw2" not in log.ops
    assert all(t[k].grad is None for k in ("W1", "b1", "W2", "b2"))
    t["W2"].requires_grad_()
    with OpLog() as log:
        tri.pair_matmul(*(t[k] for k in GRADS), "gelu").sum().backward()
    assert "spp_triton.pair_matmul_dw2" in log.ops and "spp_triton.pair_matmul_dw1" not in log.ops
    assert t["W2"].grad is not None and t["W1"].grad is None


def test_bad_input_is_refused_with_the_argument_named():
    gen = torch.Generator().manual_seed(10)
    t = make(7, 40, 52, 30, torch.float32, gen, trained=False)
    args = [t[k].detach() for k in GRADS]
    with pytest.raises(ValueError, match="active"):
        tri.pair_matmul(*args, "gelu", torch.tensor([0, 52]))
    with pytest.raises(ValueError, match="active"):
        tri.pair_matmul(*args, "gelu", torch.tensor([3, 3]))
    with pytest.raises(TypeError, match="active"):
        tri.pair_matmul(*args, "gelu", torch.tensor([0.0]))
    with pytest.raises(ValueError, match="inner widths"):
        tri.pair_matmul(args[0], args[1], args[2], torch.rand(51), *args[4:])
    with pytest.raises(TypeError, match="W1/W2 dtype"):
        tri.pair_matmul(args[0], args[1].half(), *args[2:])


@pytest.mark.parametrize("with_active", [False, True], ids=["all", "active"])
def test_opcheck(with_active):
    gen = torch.Generator().manual_seed(11)
    t = make(7, 40, 52, 30, torch.float32, gen)
    active = torch.tensor([5, 0, 40, 17], dtype=torch.int32) if with_active else None
    args = (*(t[k] for k in GRADS), active, _common.act_id("gelu"), True)
    torch.library.opcheck(torch.ops.spp_triton.pair_matmul_fwd.default, args)
    y, h = tri.pair_matmul_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    dy = torch.randn_like(y)
    d = {k: t[k].detach() for k in GRADS}
    bwd_args = (dy, d["x"], d["W1"], d["m"], d["W2"], h, active, _common.act_id("gelu"), True, True)
    torch.library.opcheck(torch.ops.spp_triton.pair_matmul_bwd.default, bwd_args)
    _, _, dh, hm = tri.pair_matmul_bwd(*bwd_args)
    torch.library.opcheck(torch.ops.spp_triton.pair_matmul_dw1.default, (dh, d["x"], active, 52))
    torch.library.opcheck(torch.ops.spp_triton.pair_matmul_dw2.default, (dy, hm, active, 52))


@pytest.mark.parametrize("with_active", [False, True], ids=["all", "active"])
def test_torch_compile(with_active):
    """One graph without ``active``; with it, the validator's range check on the index values
    (a host read) is a graph break, the op itself still compiles."""
    gen = torch.Generator().manual_seed(12)
    t = make(7, 40, 52, 30, torch.float32, gen)
    active = torch.tensor([5, 0, 40, 17]) if with_active else None
    leaves = [t[k] for k in GRADS]

    def f(*a):
        return tri.pair_matmul(*a, "silu", active).square().sum()

    loss = torch.compile(f, backend="aot_eager", fullgraph=not with_active)(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager = f(*leaves)
    want = torch.autograd.grad(eager, leaves)
    torch.testing.assert_close(loss, eager)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


def test_dispatcher_serves_triton_on_cpu_only_when_asked(monkeypatch):
    if DEVICE != "cpu":
        assert dispatch.choose("pair_matmul", "cuda")[0] == "triton"
        return
    monkeypatch.delenv("SPP_BACKEND", raising=False)
    assert dispatch.choose("pair_matmul", "cpu")[0] != "triton"
    monkeypatch.setenv("SPP_BACKEND", "triton")
    assert dispatch.choose("pair_matmul", "cpu") == ("triton", "forced by SPP_BACKEND")
    gen = torch.Generator().manual_seed(13)
    args = [v.detach() for v in make(7, 40, 52, 30, torch.float32, gen).values()]
    with OpLog() as log:
        out = spp_kernels.pair_matmul(*args, "gelu", torch.tensor([1, 2, 3]))
    assert "spp_triton.pair_matmul_fwd" in log.ops
    assert_close(out, oracle_pair(*args, "gelu", torch.tensor([1, 2, 3])), torch.float32, 40, 52)


@pytest.mark.slow
@pytest.mark.parametrize("shape", SLOW_SHAPES, ids=lambda s: "T%d-K%d-U%d-N%d" % s)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_wide_sweep(dtype, shape):
    U = shape[2]
    gen = torch.Generator().manual_seed(seed_of("sweep", shape))
    check(*shape, dtype, "gelu")
    check(*shape, dtype, "silu", active=torch.randperm(U, generator=gen)[: max(1, U // 3)].to(DEVICE))
