"""Property-based fuzzing (hypothesis) of every op and of ``SolutionPath.masks``.

Ops: the dispatched op (whatever backend serves it here: ``SPP_BACKEND`` picks one) against the
pure-torch reference and against float64 oracles written from the formulas, over random shapes
(leading batch dims, token counts, widths 1..64 and the contract's odd ones), dtypes, strides
(transposed, sliced and broadcast views), biases, activations, col2unit maps and active sets.
inclusion_step: random hyper-parameters, states and step counts against a vectorised float64
re-implementation of SPEC §2, and the non-finite-input refusal.
Masks: for random paths (ties, never-entered units, mixed costs): a larger target keeps a
superset of units; budgets are met to within one unit (or one ``round_to`` group); every pair
keeps its best-ranked units; counts respect ``round_to`` and ``min_keep``.

Profiles (tests/conftest.py): ``quick`` in ``make test``; ``slow`` (``make test-slow``) runs
>= 200 examples per property.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import spp_kernels
from spp import PairSpec, SolutionPath
from spp_kernels import reference as R
from oracles import oracle_masked_linear, oracle_pair
from tolerances import DTYPES, assert_close

ACTS = ("none", "gelu", "gelu_tanh", "relu", "silu")
WIDTHS = st.one_of(st.integers(1, 64), st.sampled_from([1, 40, 52, 97]))
TOKENS = st.one_of(st.integers(1, 12), st.sampled_from([0, 1, 7, 197]))  # 0: an empty batch
LEADING = st.lists(st.integers(1, 3), min_size=0, max_size=2)
INNER = st.one_of(WIDTHS, st.just(0))  # 0: a pair pruned away whole


pytestmark = pytest.mark.usefixtures("one_thread")


# --- float64 oracles, from the formulas --------------------------------------------------------
# --- strategies ---------------------------------------------------------------------------------
def layout(draw, shape, dtype, gen, name):
    """A tensor of ``shape`` as a contiguous, transposed, strided-slice or broadcast view."""
    kind = draw(st.sampled_from(["contiguous", "transposed", "sliced", "broadcast"]), label=f"{name} layout")
    if kind == "transposed" and len(shape) >= 2:
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen, dtype=torch.float64).to(dtype)
        return base.transpose(-1, -2)
    if kind == "sliced":
        base = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64).to(dtype)
        return base[..., ::2]
    if kind == "broadcast" and len(shape) >= 2:
        base = torch.randn(1, *shape[1:], generator=gen, dtype=torch.float64).to(dtype)
        return base.expand(*shape)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def mask(draw, u, gen):
    m = torch.rand(u, generator=gen) * 1.4 + 0.1
    if u > 1 and draw(st.booleans(), label="a zero unit"):
        m[draw(st.integers(0, u - 1))] = 0.0
    if draw(st.booleans(), label="strided mask"):
        big = torch.zeros(2 * u)
        big[::2] = m
        m = big[::2]
    return m


@st.composite
def masked_linear_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    lead, T, K, N = draw(LEADING), draw(TOKENS), draw(WIDTHS), draw(WIDTHS)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = layout(draw, (*lead, T, K), dtype, gen, "x")
    W = layout(draw, (N, K), dtype, gen, "W")
    b = torch.randn(N, generator=gen, dtype=torch.float64).to(dtype) if draw(st.booleans()) else None
    if draw(st.booleans(), label="col2unit"):
        U = draw(st.integers(1, N))
        col2unit = torch.randint(0, U, (N,), generator=gen).to(draw(st.sampled_from([torch.int64, torch.int32])))
    else:
        U, col2unit = N, None
    return dtype, x, W, b, mask(draw, U, gen), col2unit, draw(st.sampled_from(ACTS))


@st.composite
def pair_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    lead, T, K, U, N = draw(LEADING), draw(TOKENS), draw(WIDTHS), draw(INNER), draw(WIDTHS)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = layout(draw, (*lead, T, K), dtype, gen, "x")
    W1, W2 = layout(draw, (U, K), dtype, gen, "W1"), layout(draw, (N, U), dtype, gen, "W2")
    b1 = torch.randn(U, generator=gen, dtype=torch.float64).to(dtype) if draw(st.booleans()) else None
    b2 = torch.randn(N, generator=gen, dtype=torch.float64).to(dtype) if draw(st.booleans()) else None
    active = None
    if draw(st.booleans(), label="active set"):
        idx = draw(st.lists(st.integers(0, max(U - 1, 0)), unique=True, max_size=U))  # any order, may be empty
        active = torch.tensor(idx, dtype=draw(st.sampled_from([torch.int64, torch.int32])))
        if active.numel() == 0:
            active = active.reshape(0)
    return dtype, x, W1, b1, mask(draw, U, gen), W2, b2, draw(st.sampled_from(ACTS)), active


# --- masked_linear -----------------------------------------------------------------------------
@given(masked_linear_case())
def test_fuzz_masked_linear(case):
    dtype, x, W, b, m, col2unit, act = case
    K, N = W.shape[1], W.shape[0]
    note(f"x {tuple(x.shape)} stride {x.stride()}, W {tuple(W.shape)} stride {W.stride()}, {dtype}, {act}")
    xg, mg = x.detach().clone().requires_grad_(), m.detach().clone().requires_grad_()
    out = spp_kernels.masked_linear(xg, W, b, mg, col2unit, act)
    assert out.dtype == dtype and out.shape == (*x.shape[:-1], N)
    assert_close(out, R.masked_linear(x, W, b, m, col2unit, act).double(), dtype, K, msg="vs reference")
    x64, m64 = x.detach().double().requires_grad_(), m.detach().double().requires_grad_()
    ref = oracle_masked_linear(x64, W, b, m64, col2unit, act)
    assert_close(out, ref, dtype, K, msg="vs float64")
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    out.backward(gy)
    ref.backward(gy.double())
    tokens = max(1, x[..., 0].numel())
    assert mg.grad.dtype == torch.float32 and xg.grad.dtype == dtype
    assert_close(xg.grad, x64.grad, dtype, N, msg="dx")
    assert_close(mg.grad, m64.grad, dtype, tokens * K * max(1, N // m.numel()), msg="dm")


# --- pair_matmul -------------------------------------------------------------------------------
@given(pair_case())
def test_fuzz_pair_matmul(case):
    dtype, x, W1, b1, m, W2, b2, act, active = case
    K, U, N = W1.shape[1], W1.shape[0], W2.shape[0]
    note(f"x {tuple(x.shape)} stride {x.stride()}, U {U}, N {N}, {dtype}, {act}, active {active}")
    xg, mg = x.detach().clone().requires_grad_(), m.detach().clone().requires_grad_()
    out = spp_kernels.pair_matmul(xg, W1, b1, mg, W2, b2, act, active)
    assert out.dtype == dtype and out.shape == (*x.shape[:-1], N)
    assert_close(out, R.pair_matmul(x, W1, b1, m, W2, b2, act, active).double(), dtype, K, U, msg="vs reference")
    x64, m64 = x.detach().double().requires_grad_(), m.detach().double().requires_grad_()
    ref = oracle_pair(x64, W1, b1, m64, W2, b2, act, active)
    assert_close(out, ref, dtype, K, U, msg="vs float64")
    if active is not None and active.numel() == 0:
        want = torch.zeros_like(out) if b2 is None else b2.expand_as(out)
        assert torch.equal(out, want), "no active unit: exactly b2 (or 0)"
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    out.backward(gy)
    ref.backward(gy.double())
    tokens = max(1, x[..., 0].numel())
    assert_close(xg.grad, x64.grad, dtype, N, U, msg="dx")
    assert_close(mg.grad, m64.grad, dtype, tokens, K, N, msg="dm")
    if active is not None:
        outside = torch.ones(U, dtype=torch.bool)
        outside[active.long()] = False
        assert torch.all(mg.grad[outside] == 0), "units outside active are not computed"


# --- inclusion_step ----------------------------------------------------------------------------
HYPER = st.fixed_dictionaries({
    "lr": st.floats(1e-4, 0.5), "beta1": st.floats(0.0, 0.99), "beta2": st.floats(0.5, 0.9999),
    "eps": st.floats(1e-8, 1e-2), "weight_decay": st.one_of(st.just(0.0), st.floats(0.0, 0.2)),
    "kappa": st.floats(0.1, 4.0), "lam": st.floats(0.0, 3.0),
    "nu": st.one_of(st.just(math.inf), st.floats(0.5, 100.0)),
    "mode": st.sampled_from(R.INCLUSION_MODES), "optimizer": st.sampled_from(R.INCLUSION_OPTIMIZERS),
})


def oracle_inclusion(s: dict, g, t, h, record):
    """SPEC §2 in float64 over numpy arrays (written from the spec, not from reference.py)."""
    m, a, b, z, gam, entry, count = (s[k].copy() for k in ("m", "exp_avg", "exp_avg_sq", "z", "gamma", "entry",
                                                            "support_count"))
    g = g.astype(np.float64)
    if math.isfinite(h["nu"]):
        g = g + (m - gam) / h["nu"]
    if h["optimizer"] == "adamw":
        m = m * (1.0 - h["lr"] * h["weight_decay"])
        a = h["beta1"] * a + (1.0 - h["beta1"]) * g
        b = h["beta2"] * b + (1.0 - h["beta2"]) * g * g
        m = m - h["lr"] * (a / (1.0 - h["beta1"] ** t)) / (np.sqrt(b / (1.0 - h["beta2"] ** t)) + h["eps"])
        rho = h["kappa"] * h["lr"] / (1.0 - h["beta1"] ** t)
    else:
        m = m - h["lr"] * (g + h["weight_decay"] * m)
        rho = h["kappa"] * h["lr"]
    z = z + rho * (m - gam)
    if h["mode"] == "nonneg":
        gam = h["kappa"] * np.maximum(z - h["lam"], 0.0)
    else:
        gam = h["kappa"] * np.sign(z) * np.maximum(np.abs(z) - h["lam"], 0.0)
    nz = gam != 0
    entry = np.where((entry == -1) & nz, t, entry)
    if record:
        count = count + nz
    return {"m": m, "exp_avg": a, "exp_avg_sq": b, "z": z, "gamma": gam, "entry": entry, "support_count": count}, z


@st.composite
def inclusion_case(draw):
    n = draw(st.one_of(st.integers(1, 300), st.sampled_from([1, 4224])))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t0 = draw(st.integers(1, 2000))
    entered = torch.rand(n, generator=gen) < draw(st.floats(0.0, 1.0))
    state = {
        "m": torch.randn(n, generator=gen) * 0.7 + 0.5,
        "exp_avg": torch.randn(n, generator=gen) * 0.1,
        "exp_avg_sq": torch.rand(n, generator=gen) * 0.05,
        "z": torch.randn(n, generator=gen) * 2.0,
        "gamma": torch.randn(n, generator=gen).clamp_min(0.0),
        "entry": torch.where(entered, torch.randint(1, t0 + 1, (n,), generator=gen), torch.full((n,), -1)).to(torch.int32),
        "support_count": torch.randint(0, t0 + 1, (n,), generator=gen).to(torch.int32),
    }
    strided = draw(st.booleans(), label="strided arenas")
    if strided:  # every arena a stride-2 view into a bigger buffer (updated in place through it)
        for k, v in state.items():
            big = torch.zeros(2 * n, dtype=v.dtype)
            big[::2] = v
            state[k] = big[::2]
    steps = draw(st.integers(1, 4))
    grads = [torch.randn(n, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 30.0])) for _ in range(steps)]
    return state, grads, t0, draw(HYPER), draw(st.integers(1, 5))


@given(inclusion_case())
def test_fuzz_inclusion_step(case):
    state, grads, t0, hyper, record_every = case
    lam = hyper["lam"]
    ref_state = {k: v.clone() for k, v in state.items()}
    oracle = {k: v.double().numpy() if v.is_floating_point() else v.numpy().astype(np.int64) for k, v in state.items()}
    ambiguous = np.zeros(state["m"].numel(), dtype=bool)
    for i, g in enumerate(grads):
        t, record = t0 + i, (t0 + i) % record_every == 0
        for fn, s in ((spp_kernels.inclusion_step, state), (R.inclusion_step, ref_state)):
            fn(s["m"], g, s["exp_avg"], s["exp_avg_sq"], s["z"], s["gamma"], s["entry"], s["support_count"], t,
               record=record, **hyper)
        oracle, z64 = oracle_inclusion(oracle, g.numpy(), t, hyper, record)
        # where z sits within rounding of the threshold, fp32 and fp64 may disagree on Γ ≠ 0
        ambiguous |= np.abs(np.abs(z64) - lam) <= 1e-4 * (1.0 + np.abs(z64))
    for k in ("m", "exp_avg", "exp_avg_sq", "z", "gamma"):
        assert state[k].dtype == torch.float32 and bool(torch.isfinite(state[k]).all()), k
        assert_close(state[k], ref_state[k].double(), torch.float32, len(grads), msg=f"{k} vs reference")
        want = torch.from_numpy(oracle[k])
        scale = 1.0 + float(want.abs().max())  # errors grow with the magnitude carried along
        got = state[k].double()
        assert bool(((got - want).abs() <= 2e-5 * scale * len(grads) + 1e-5 * want.abs()).all()), \
            f"{k} vs float64 oracle: max err {float((got - want).abs().max()):.3g}"
    clear = torch.from_numpy(~ambiguous)
    for k in ("entry", "support_count"):
        assert torch.equal(state[k], ref_state[k]), f"{k} vs reference"
        assert torch.equal(state[k][clear].long(), torch.from_numpy(oracle[k])[clear]), f"{k} vs float64 oracle"


@given(n=st.integers(1, 50), where=st.integers(0, 49), bad=st.sampled_from([math.nan, math.inf, -math.inf]),
       name=st.sampled_from(["grad", "m", "exp_avg", "exp_avg_sq", "z", "gamma"]))
def test_fuzz_inclusion_step_refuses_nonfinite_input(n, where, bad, name):
    arenas = {"m": torch.ones(n), "grad": torch.zeros(n), "exp_avg": torch.zeros(n), "exp_avg_sq": torch.zeros(n),
              "z": torch.zeros(n), "gamma": torch.zeros(n), "entry": torch.full((n,), -1, dtype=torch.int32),
              "support_count": torch.zeros(n, dtype=torch.int32)}
    arenas[name][where % n] = bad
    before = {k: v.clone() for k, v in arenas.items()}
    with pytest.raises(ValueError, match=name):
        spp_kernels.inclusion_step(*arenas.values(), 1, lr=0.1)
    for k, v in arenas.items():  # nothing was touched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)


# --- SolutionPath.masks ------------------------------------------------------------------------
@st.composite
def paths(draw):
    n_pairs = draw(st.integers(1, 6))
    pairs = []
    for i in range(n_pairs):
        kind = draw(st.sampled_from(["qk", "vo", "mlp"]))
        pairs.append(PairSpec(f"blocks.{i}.{kind}", kind, i, draw(st.integers(1, 40)), draw(st.integers(1, 500)),
                              draw(st.integers(1, 3000))))
    n = sum(p.size for p in pairs)
    steps = draw(st.integers(10, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tie = draw(st.sampled_from([1, 10, 100]))  # coarse entry steps: many ties
    entry = rng.integers(1, steps + 1, n) // tie * tie
    entry[rng.random(n) < draw(st.floats(0.0, 0.6))] = -1
    support = np.where(entry >= 0, rng.integers(0, steps // 10 + 1, n), 0)
    z = np.round(rng.normal(size=n), draw(st.integers(0, 3)))
    m = rng.uniform(-1.5, 1.5, n).astype(np.float32)
    fp = {"family": "test", "pairs": [[p.name, p.size] for p in pairs], "checksum": 1.0}
    return SolutionPath(pairs, entry, support, z, m, steps, {}, fp)


def kept_set(path, masks) -> np.ndarray:
    kept = np.zeros(path.entry.size, bool)
    for name, (idx, _) in masks.kept.items():
        i = [p.name for p in path.pairs].index(name)
        kept[path.offsets[i] + idx.numpy()] = True
    return kept


def counts(path, masks) -> np.ndarray:
    w = masks.widths()
    return np.array([w[p.name] for p in path.pairs])


def floors(path, min_keep, round_to, layer_floor=0.0):
    sizes = np.array([p.size for p in path.pairs])
    f = np.minimum(sizes, np.maximum(min_keep, np.ceil(layer_floor * sizes - 1e-9).astype(np.int64)))
    if round_to > 1:
        f = np.minimum(sizes, -(-np.maximum(f, 1) // round_to) * round_to)
    return f


def check_common(path, masks, round_to, min_keep):
    """Each pair keeps its best-ranked units, as many as round_to / min_keep allow, with the
    path's final mask values."""
    kept = kept_set(path, masks)
    pos = np.empty(path.entry.size, int)
    pos[path.rank()] = np.arange(path.entry.size)
    sizes = np.array([p.size for p in path.pairs])
    c = counts(path, masks)
    assert (c >= np.minimum(sizes, min_keep)).all()
    if round_to > 1:
        assert ((c % round_to == 0) | (c == sizes)).all(), (c, sizes)
    for i, p in enumerate(path.pairs):
        mine = path.pair_id == i
        if (mine & ~kept).any() and (mine & kept).any():
            assert pos[mine & kept].max() < pos[mine & ~kept].min(), "a pair must keep its best-ranked units"
        idx, val = masks.kept[p.name]
        np.testing.assert_array_equal(val.numpy(), path.m[path.offsets[i] + idx.numpy()])
    return kept


TARGETS = st.floats(0.01, 1.0)


@given(path=paths(), kind=st.sampled_from(["params", "flops"]), f1=TARGETS, f2=TARGETS,
       round_to=st.sampled_from([1, 1, 2, 4, 8]), min_keep=st.integers(1, 4))
def test_fuzz_budget_masks(path, kind, f1, f2, round_to, min_keep):
    lo, hi = sorted((f1, f2))
    cost = path.params_cost if kind == "params" else path.flops_cost
    total = cost.sum()
    unit = np.array([cost[o] for o in path.offsets])
    minimum = float((floors(path, min_keep, round_to) * unit).sum())
    kept = {}
    for f in (lo, hi):
        if minimum > f * total * (1 + 1e-9):
            with pytest.raises(ValueError, match=f"{kind}=.* is below the minimum"):
                path.masks(**{kind: f}, round_to=round_to, min_keep=min_keep)
            continue
        masks = path.masks(**{kind: f}, round_to=round_to, min_keep=min_keep)
        k = check_common(path, masks, round_to, min_keep)
        spent = cost[k].sum()
        assert spent <= f * total * (1 + 1e-9), "over budget"
        if not k.all():  # met exactly up to one unit (one round_to group) of the costliest pair
            assert f * total - spent < round_to * unit.max() * (1 + 1e-9), (f * total, spent)
        assert (masks.params_kept if kind == "params" else masks.flops_kept) == pytest.approx(spent)
        kept[f] = k
    if len(kept) == 2:
        assert not (kept[lo] & ~kept[hi]).any(), "a larger budget must keep a superset of units"


@given(path=paths(), f1=TARGETS, f2=TARGETS, round_to=st.sampled_from([1, 1, 2, 8]), min_keep=st.integers(1, 3),
       allocation=st.sampled_from(["type", "uniform"]))
def test_fuzz_keep_masks(path, f1, f2, round_to, min_keep, allocation):
    lo, hi = sorted((f1, f2))
    sizes = np.array([p.size for p in path.pairs])
    fl = floors(path, min_keep, 1)
    kept = {}
    for f in (lo, hi):
        masks = path.masks(keep=f, round_to=round_to, min_keep=min_keep, allocation=allocation)
        kept[f] = check_common(path, masks, round_to, min_keep)
        c = counts(path, masks)
        if allocation == "uniform":
            want = np.maximum(np.round(f * sizes), fl)
            assert (np.abs(c - want) <= max(round_to, 1) / 2 + (round_to > 1) * round_to).all(), (c, want)
        else:
            for kind in ("qk", "vo", "mlp"):
                sel = np.array([p.kind == kind for p in path.pairs])
                if not sel.any():
                    continue
                target = round(f * sizes[sel].sum())
                if round_to == 1:  # the type keeps round(f * units), plus what the floors add
                    assert target <= c[sel].sum() <= target + fl[sel].sum(), (kind, c[sel], target)
                else:
                    assert abs(c[sel].sum() - target) <= sel.sum() * round_to + fl[sel].sum()
    assert not (kept[lo] & ~kept[hi]).any(), "a larger keep ratio must keep a superset of units"


@given(path=paths(), f=TARGETS)
def test_fuzz_masks_are_deterministic_and_in_range(path, f):
    a, b = path.masks(keep=f), path.masks(keep=f)
    for name in a.kept:
        assert torch.equal(a.kept[name][0], b.kept[name][0])
        idx = a.kept[name][0]
        assert idx.dtype == torch.int64 and (idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < a.sizes[name]))
        assert bool((idx[1:] > idx[:-1]).all()), "indices sorted and unique"
