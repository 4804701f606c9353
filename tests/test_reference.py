"""The pure-torch oracle ``spp_kernels.reference`` against hand-worked numbers, an independent
float64 re-implementation of SPEC §2, ``torch.optim``, and float64 versions of the §4 formulas."""
from __future__ import annotations

import inspect
import math
import zlib
from types import SimpleNamespace

import pytest
import torch

from spp_kernels import reference as R
from oracles import oracle_masked_linear, oracle_pair
from tolerances import DTYPE_IDS, DTYPES, assert_close, gemm_tol

ACTS = ("none", "gelu", "gelu_tanh", "relu", "silu")
ARENA_NAMES = ("m", "grad", "exp_avg", "exp_avg_sq", "z", "gamma", "entry", "support_count")


pytestmark = pytest.mark.usefixtures("one_thread")


def dtype_id(dtype):
    return DTYPE_IDS[dtype]


# ============================================================================ inclusion_step
def make_arenas(n: int, m0=1.0) -> SimpleNamespace:
    """Fresh arenas as SPEC §2 initialises them (m = m0, everything else 0, entry = -1)."""
    m = torch.full((n,), float(m0)) if not isinstance(m0, (list, tuple)) else torch.tensor(m0, dtype=torch.float32)
    return SimpleNamespace(
        m=m,
        grad=torch.zeros(n),
        exp_avg=torch.zeros(n),
        exp_avg_sq=torch.zeros(n),
        z=torch.zeros(n),
        gamma=torch.zeros(n),
        entry=torch.full((n,), -1, dtype=torch.int32),
        support_count=torch.zeros(n, dtype=torch.int32),
    )


def step(A: SimpleNamespace, grad, t: int, **hyper) -> None:
    A.grad = torch.as_tensor(grad, dtype=torch.float32).clone()
    R.inclusion_step(A.m, A.grad, A.exp_avg, A.exp_avg_sq, A.z, A.gamma, A.entry, A.support_count, t, **hyper)


def snapshot(A):
    return {k: getattr(A, k).clone() for k in ARENA_NAMES}


def check_state(A, expected: dict, t: int) -> None:
    for key in ("m", "exp_avg", "exp_avg_sq", "z", "gamma"):
        if key in expected:
            want = torch.tensor(expected[key], dtype=torch.float64)
            torch.testing.assert_close(getattr(A, key).double(), want, atol=1e-6, rtol=1e-6, msg=lambda s, key=key: f"step {t} {key}: {s}")
    for key in ("entry", "support_count"):
        if key in expected:
            assert getattr(A, key).tolist() == expected[key], f"step {t} {key}: {getattr(A, key).tolist()} != {expected[key]}"


def test_inclusion_defaults_are_the_authors():
    p = inspect.signature(R.inclusion_step).parameters
    got = {k: p[k].default for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "kappa", "lam", "nu", "mode", "optimizer")}
    assert got == dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-4, weight_decay=0.0, kappa=1.0, lam=3.0,
                       nu=math.inf, mode="nonneg", optimizer="adamw")


def test_inclusion_adamw_hand_trajectory():
    """Four AdamW steps worked out by hand; kappa, lam, nu, mode are left at the authors' defaults
    (kappa = 1, lam = 3, nu = inf, "nonneg"). Chosen: lr = 1, beta1 = 1/2, beta2 = 3/4, eps = 1, and
    every gradient in {-1, 0, +1}, so that v_hat = v / (1 - beta2^t) is exactly 1 (|g| = 1) or 0
    (g = 0). The AdamW step is then m_hat / (sqrt(v_hat) + eps) = m_hat / 2 (or 0 for g = 0), with
    m_hat = a / (1 - beta1^t). The inclusion step size rho_t = lr / (1 - beta1^t) = 2, 4/3, 8/7, 16/15.
    z_t = z_{t-1} + rho_t (m_t - Gamma_{t-1});  Gamma_t = max(z_t - 3, 0).

    unit 0: g = +1, +1, +1, +1 (m pushed down): a = 1/2, 3/4, 7/8, 15/16 -> m_hat = 1 -> step 1/2
        m = 1/2, 0, -1/2, -1;  z = 2(1/2) = 1, 1 + 0 = 1, 1 - (8/7)(1/2) = 3/7, 3/7 - 16/15 = -67/105
        never enters (Gamma = 0, entry = -1).
    unit 1: g = -1 x4: m = 3/2, 2, 5/2, 3
        z1 = 2 * 3/2 = 3 -> Gamma = max(3 - 3, 0) = 0 exactly: z == lam is *not* in the support
        z2 = 3 + (4/3)(2 - 0) = 17/3 -> Gamma = 8/3, entry = 2
        z3 = 17/3 + (8/7)(5/2 - 8/3) = 17/3 - 4/21 = 115/21 -> Gamma = 52/21 (entry stays 2)
        z4 = 115/21 + (16/15)(3 - 52/21) = 115/21 + 176/315 = 1901/315 -> Gamma = 956/315
    unit 2: g = +1, -1, -1, +1 (moments with sign changes)
        a = 1/2, -1/4, -5/8, 3/16;  m_hat = a / (1/2, 3/4, 7/8, 15/16) = 1, -1/3, -5/7, 1/5
        m = 1 - 1/2 = 1/2, 1/2 + 1/6 = 2/3, 2/3 + 5/14 = 43/42, 43/42 - 1/10 = 97/105
        z = 1, 1 + (4/3)(2/3) = 17/9, 17/9 + (8/7)(43/42) = 1349/441 -> Gamma = 26/441, entry = 3
        z4 = 1349/441 + (16/15)(97/105 - 26/441) = 131687/33075 -> Gamma = 32462/33075
    unit 3: g = 0 (a frozen mask, the nu = inf degenerate case of SPEC §6): m stays 1, a = v = 0
        z = 2, 10/3, 10/3 + (8/7)(1 - 1/3) = 86/21, 86/21 + (16/15)(1 - 23/21) = 1258/315
        Gamma = 0, 1/3, 23/21, 313/315; entry = 2
    unit 4: g = 0, m starts at 3/4: z = 3/2, 5/2, 5/2 + (8/7)(3/4) = 47/14 -> Gamma = 5/14, entry = 3
        z4 = 47/14 + (16/15)(3/4 - 5/14) = 793/210 -> Gamma = 163/210
    record = True on steps 2 and 4 only: support_count = number of those steps with Gamma != 0.
    exp_avg_sq for |g| = 1: 1/4, 7/16, 37/64, 175/256 (v_t = 3/4 v_{t-1} + 1/4).
    """
    grads = [[1, -1, 1, 0, 0], [1, -1, -1, 0, 0], [1, -1, -1, 0, 0], [1, -1, 1, 0, 0]]
    v = [1 / 4, 7 / 16, 37 / 64, 175 / 256]
    expected = [
        dict(m=[1 / 2, 3 / 2, 1 / 2, 1, 3 / 4], exp_avg=[1 / 2, -1 / 2, 1 / 2, 0, 0], exp_avg_sq=[v[0]] * 3 + [0, 0],
             z=[1, 3, 1, 2, 3 / 2], gamma=[0, 0, 0, 0, 0], entry=[-1, -1, -1, -1, -1], support_count=[0, 0, 0, 0, 0]),
        dict(m=[0, 2, 2 / 3, 1, 3 / 4], exp_avg=[3 / 4, -3 / 4, -1 / 4, 0, 0], exp_avg_sq=[v[1]] * 3 + [0, 0],
             z=[1, 17 / 3, 17 / 9, 10 / 3, 5 / 2], gamma=[0, 8 / 3, 0, 1 / 3, 0],
             entry=[-1, 2, -1, 2, -1], support_count=[0, 1, 0, 1, 0]),
        dict(m=[-1 / 2, 5 / 2, 43 / 42, 1, 3 / 4], exp_avg=[7 / 8, -7 / 8, -5 / 8, 0, 0], exp_avg_sq=[v[2]] * 3 + [0, 0],
             z=[3 / 7, 115 / 21, 1349 / 441, 86 / 21, 47 / 14], gamma=[0, 52 / 21, 26 / 441, 23 / 21, 5 / 14],
             entry=[-1, 2, 3, 2, 3], support_count=[0, 1, 0, 1, 0]),
        dict(m=[-1, 3, 97 / 105, 1, 3 / 4], exp_avg=[15 / 16, -15 / 16, 3 / 16, 0, 0], exp_avg_sq=[v[3]] * 3 + [0, 0],
             z=[-67 / 105, 1901 / 315, 131687 / 33075, 1258 / 315, 793 / 210],
             gamma=[0, 956 / 315, 32462 / 33075, 313 / 315, 163 / 210],
             entry=[-1, 2, 3, 2, 3], support_count=[0, 2, 1, 2, 1]),
    ]
    A = make_arenas(5, m0=[1, 1, 1, 1, 0.75])
    B = [spec_state(mi) for mi in (1.0, 1.0, 1.0, 1.0, 0.75)]
    hyper = dict(lr=1.0, beta1=0.5, beta2=0.75, eps=1.0)
    for t in range(1, 5):
        record = t % 2 == 0
        step(A, grads[t - 1], t, record=record, **hyper)
        check_state(A, expected[t - 1], t)
        B = [spec_step(s, float(g), t, record=record, **{**SPEC_DEFAULTS, **hyper}) for s, g in zip(B, grads[t - 1])]
        compare_with_spec(A, B, t, steps_so_far=t)
    assert A.entry.dtype == torch.int32 and A.support_count.dtype == torch.int32


def test_inclusion_sgd_entry_is_kept_when_a_unit_leaves_and_reenters():
    """Plain SGD (rho = kappa * lr, no bias correction), lr = 1, lam = 3, record every step.

    unit 0: g = -3, +5, -6, 0
        t1: m = 1 + 3 = 4,  z = 0 + (4 - 0) = 4, Gamma = 1 -> entry = 1, count 1
        t2: m = 4 - 5 = -1, z = 4 + (-1 - 1) = 2, Gamma = 0 (left the support), count 1
        t3: m = -1 + 6 = 5, z = 2 + (5 - 0) = 7, Gamma = 4 (back in: entry must stay 1), count 2
        t4: m = 5,          z = 7 + (5 - 4) = 8, Gamma = 5, count 3
    unit 1: g = 0: m = 1, z = 1, 2, 3, 4; Gamma = 0, 0, 0 (z == lam), 1 -> entry = 4, count 1
    """
    grads = [[-3, 0], [5, 0], [-6, 0], [0, 0]]
    expected = [
        dict(m=[4, 1], z=[4, 1], gamma=[1, 0], entry=[1, -1], support_count=[1, 0]),
        dict(m=[-1, 1], z=[2, 2], gamma=[0, 0], entry=[1, -1], support_count=[1, 0]),
        dict(m=[5, 1], z=[7, 3], gamma=[4, 0], entry=[1, -1], support_count=[2, 0]),
        dict(m=[5, 1], z=[8, 4], gamma=[5, 1], entry=[1, 4], support_count=[3, 1]),
    ]
    A = make_arenas(2)
    for t in range(1, 5):
        step(A, grads[t - 1], t, lr=1.0, optimizer="sgd", record=True)
        check_state(A, expected[t - 1], t)
    # SGD keeps no moments.
    assert torch.count_nonzero(A.exp_avg) == 0 and torch.count_nonzero(A.exp_avg_sq) == 0


def test_inclusion_support_count_only_on_record_steps():
    # Unit 0 enters at step 1 (sgd, lr = 1: m = 5, z = 5 > 3) and stays in; 6 steps, record on 3 of them.
    A = make_arenas(2)
    records = [False, True, False, False, True, True]
    for t, rec in enumerate(records, 1):
        step(A, [-4.0, 2.0], t, lr=1.0, optimizer="sgd", record=rec)
        assert A.support_count.tolist() == [sum(records[:t]), 0], t
    assert A.entry.tolist() == [1, -1]


@pytest.mark.parametrize("kappa", [1.0, 2.0])
def test_inclusion_signed_mode(kappa):
    """SGD, lr = 1, lam = 3, one step from m = 1: m = 1 - g; rho = kappa; z = kappa * m.
    g = +5   -> m = -4,   z = -4 kappa
    g = +3.5 -> m = -2.5, z = -2.5 kappa
    g = -3   -> m = 4,    z = 4 kappa
    signed:  Gamma = kappa sign(z) max(|z| - 3, 0)
        kappa 1: z = -4, -2.5, 4 -> Gamma = -1, 0, 1
        kappa 2: z = -8, -5, 8   -> Gamma = 2(-5) = -10, 2(-2) = -4, 2(5) = 10
    nonneg: Gamma = kappa max(z - 3, 0): kappa 1 -> 0, 0, 1;  kappa 2 -> 0, 0, 10
    """
    g = [5.0, 3.5, -3.0]
    want = {1.0: ([-1, 0, 1], [0, 0, 1]), 2.0: ([-10, -4, 10], [0, 0, 10])}[kappa]
    for mode, gamma in zip(("signed", "nonneg"), want):
        A = make_arenas(3)
        step(A, g, 1, lr=1.0, optimizer="sgd", kappa=kappa, mode=mode, record=True)
        nz = [int(v != 0) for v in gamma]
        check_state(A, dict(m=[-4, -2.5, 4], z=[-4 * kappa, -2.5 * kappa, 4 * kappa], gamma=gamma,
                            entry=[1 if v else -1 for v in nz], support_count=nz), 1)


def test_inclusion_finite_nu_coupling():
    """SGD, lr = 0.5, nu = 2, lam = 3, step t = 9; the coupling uses m and Gamma *before* the step:
    g_eff = g + (m - Gamma) / nu;  m -= lr g_eff;  z += lr (m_new - Gamma_old).
    unit 0: m = 1, Gamma = 0, z = 0,  g = 0:    g_eff = 1/2 -> m = 3/4; z = 3/8; Gamma = 0
    unit 1: m = 3, Gamma = 1, z = 4,  g = 0:    g_eff = 1   -> m = 5/2; z = 4 + (3/2)/2 = 19/4; Gamma = 7/4
    unit 2: m = 1, Gamma = 1, z = 4,  g = -1/2: g_eff = -1/2 -> m = 5/4; z = 4 + (1/4)/2 = 33/8; Gamma = 9/8
    Units 1 and 2 entered earlier (entry = 7) and keep that entry.
    With nu = inf the same state gives m = 1, 3, 5/4 (no pull towards Gamma).
    """
    def state():
        A = make_arenas(3, m0=[1.0, 3.0, 1.0])
        A.gamma.copy_(torch.tensor([0.0, 1.0, 1.0]))
        A.z.copy_(torch.tensor([0.0, 4.0, 4.0]))
        A.entry.copy_(torch.tensor([-1, 7, 7], dtype=torch.int32))
        return A

    A = state()
    step(A, [0.0, 0.0, -0.5], 9, lr=0.5, optimizer="sgd", nu=2.0)
    check_state(A, dict(m=[3 / 4, 5 / 2, 5 / 4], z=[3 / 8, 19 / 4, 33 / 8], gamma=[0, 7 / 4, 9 / 8],
                        entry=[-1, 7, 7], support_count=[0, 0, 0]), 9)
    A = state()
    step(A, [0.0, 0.0, -0.5], 9, lr=0.5, optimizer="sgd")
    check_state(A, dict(m=[1, 3, 5 / 4]), 9)


def test_inclusion_weight_decay():
    """m = 2, g = 0, lr = 0.1, weight_decay = 1.
    AdamW decays decoupled: m *= 1 - lr wd = 0.9 -> 1.8, then 1.62; the moments stay 0 (an L2 penalty
    folded into g would give 2 - 0.1 * 2/2 = 1.9 instead).
    SGD folds wd m into the gradient: m -= lr (0 + wd m) -> 1.8, then 1.62.
    """
    for opt in ("adamw", "sgd"):
        A = make_arenas(1, m0=2.0)
        step(A, [0.0], 1, lr=0.1, weight_decay=1.0, optimizer=opt)
        check_state(A, dict(m=[1.8], exp_avg=[0.0], exp_avg_sq=[0.0]), 1)
        step(A, [0.0], 2, lr=0.1, weight_decay=1.0, optimizer=opt)
        check_state(A, dict(m=[1.62], exp_avg=[0.0], exp_avg_sq=[0.0]), 2)


# --- an independent scalar float64 re-implementation of SPEC §2 (not derived from reference.py)
SPEC_DEFAULTS = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-4, weight_decay=0.0, kappa=1.0, lam=3.0,
                     nu=math.inf, mode="nonneg", optimizer="adamw")


def spec_state(m0: float) -> tuple:
    return (float(m0), 0.0, 0.0, 0.0, 0.0, -1, 0)  # m, a, b, z, gamma, entry, support_count


def spec_step(s: tuple, g: float, t: int, *, lr, beta1, beta2, eps, weight_decay, kappa, lam, nu, mode, optimizer, record):
    m, a, b, z, gam, entry, count = s
    if nu != math.inf:
        g = g + (m - gam) / nu
    if optimizer == "adamw":
        m = m * (1.0 - lr * weight_decay)  # decoupled decay
        a = beta1 * a + (1.0 - beta1) * g
        b = beta2 * b + (1.0 - beta2) * g * g
        a_hat, b_hat = a / (1.0 - beta1**t), b / (1.0 - beta2**t)
        m = m - lr * a_hat / (math.sqrt(b_hat) + eps)
        rho = kappa * lr / (1.0 - beta1**t)
    else:  # plain (split linearised-Bregman) SGD: no moments, no bias correction
        m = m - lr * (g + weight_decay * m)
        rho = kappa * lr
    z = z + rho * (m - gam)
    if mode == "nonneg":
        gam = kappa * max(z - lam, 0.0)
    else:
        gam = kappa * math.copysign(max(abs(z) - lam, 0.0), z) if abs(z) > lam else 0.0
    if entry == -1 and gam != 0.0:
        entry = t
    if record and gam != 0.0:
        count += 1
    return (m, a, b, z, gam, entry, count)


def compare_with_spec(A, states, t, steps_so_far):
    cols = list(zip(*states))
    tol = gemm_tol(torch.float32, steps_so_far)  # fp32 state accumulated over t steps
    for i, key in enumerate(("m", "exp_avg", "exp_avg_sq", "z", "gamma")):
        want = torch.tensor(cols[i], dtype=torch.float64)
        torch.testing.assert_close(getattr(A, key).double(), want, atol=tol.atol, rtol=tol.rtol,
                                   msg=lambda s, key=key: f"step {t} {key} vs float64 SPEC: {s}")
    assert A.entry.tolist() == list(cols[5]), f"step {t} entry"
    assert A.support_count.tolist() == list(cols[6]), f"step {t} support_count"


@pytest.mark.parametrize(
    "hyper",
    [
        dict(lr=0.05),  # lam = 3 (authors')
        dict(lr=0.1, lam=3.0, mode="signed", kappa=2.0, nu=2.0, weight_decay=0.1, beta1=0.8, beta2=0.99, eps=1e-3),
        dict(lr=0.05, lam=1.2, optimizer="sgd", nu=5.0, weight_decay=0.01),
        dict(lr=0.1, lam=2.0, optimizer="sgd", mode="signed", kappa=0.5),
    ],
    ids=["adamw-nonneg", "adamw-signed-nu-wd", "sgd-nonneg-nu-wd", "sgd-signed"],
)
def test_inclusion_matches_float64_spec(hyper):
    """37 units, 30 steps of random gradients (a per-unit drift + noise), record every 5 steps.
    Masks start spread around 0.5 (not all at 1) so that "signed" can reach negative Gamma."""
    gen = torch.Generator().manual_seed(1234)
    n, steps = 37, 30
    drift = torch.randn(n, generator=gen) * 2.0
    m0 = (torch.randn(n, generator=gen) * 0.8 + 0.5).tolist()
    A = make_arenas(n, m0=m0)
    S = [spec_state(mi) for mi in A.m.tolist()]
    full = {**SPEC_DEFAULTS, **hyper}
    for t in range(1, steps + 1):
        g = drift + torch.randn(n, generator=gen)
        record = t % 5 == 0
        step(A, g, t, record=record, **hyper)
        S = [spec_step(s, float(gi), t, record=record, **full) for s, gi in zip(S, g.tolist())]
        compare_with_spec(A, S, t, steps_so_far=t)
    entered = int((A.entry > 0).sum())
    assert 0.1 * n < entered < 0.9 * n, f"test is vacuous: {entered}/{n} units entered"
    assert len(set(A.entry.tolist()) - {-1}) >= 3, "entries should spread over several steps"
    if hyper.get("mode") == "signed":
        assert (A.gamma < 0).any() and (A.gamma > 0).any()


def test_inclusion_m_update_matches_torch_optim():
    """With nu = inf the m update is exactly torch.optim.AdamW / SGD on the mask (state included)."""
    gen = torch.Generator().manual_seed(7)
    n = 23
    grads = [torch.randn(n, generator=gen) for _ in range(12)]
    for opt_name, hyper in (("adamw", dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-4, weight_decay=0.05)),
                            ("sgd", dict(lr=0.01, weight_decay=0.05))):
        A = make_arenas(n)
        p = torch.nn.Parameter(torch.ones(n))
        if opt_name == "adamw":
            opt = torch.optim.AdamW([p], lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
                                    weight_decay=hyper["weight_decay"], foreach=False)
        else:
            opt = torch.optim.SGD([p], lr=hyper["lr"], weight_decay=hyper["weight_decay"], foreach=False)
        for t, g in enumerate(grads, 1):
            step(A, g, t, optimizer=opt_name, **hyper)
            p.grad = g.clone()
            opt.step()
            torch.testing.assert_close(A.m, p.detach(), atol=1e-6, rtol=1e-6, msg=lambda s: f"{opt_name} step {t}: {s}")
            if opt_name == "adamw":
                torch.testing.assert_close(A.exp_avg, opt.state[p]["exp_avg"], atol=1e-7, rtol=1e-6)
                torch.testing.assert_close(A.exp_avg_sq, opt.state[p]["exp_avg_sq"], atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------ inclusion_step validation
def call_step(A, t=1, **hyper):
    R.inclusion_step(A.m, A.grad, A.exp_avg, A.exp_avg_sq, A.z, A.gamma, A.entry, A.support_count, t, **hyper)


def assert_untouched(A, before):
    for k in ARENA_NAMES:
        torch.testing.assert_close(getattr(A, k), before[k], atol=0, rtol=0, equal_nan=True,
                                   msg=lambda s, k=k: f"{k} was modified by a rejected call: {s}")


@pytest.mark.parametrize("name", ARENA_NAMES)
def test_inclusion_rejects_wrong_dtype(name):
    A = make_arenas(5)
    A.grad.fill_(0.5)
    bad_dtype = torch.int64 if name in ("entry", "support_count") else torch.float64
    setattr(A, name, getattr(A, name).to(bad_dtype))
    before = snapshot(A)
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        call_step(A)
    assert_untouched(A, before)


@pytest.mark.parametrize("name", ARENA_NAMES[1:])
@pytest.mark.parametrize("length", [4, 6])
def test_inclusion_rejects_mismatched_lengths(name, length):
    A = make_arenas(5)
    t = getattr(A, name)
    setattr(A, name, torch.zeros(length, dtype=t.dtype) if t.dtype == torch.float32 else torch.full((length,), -1 if name == "entry" else 0, dtype=t.dtype))
    before = snapshot(A)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call_step(A)
    assert_untouched(A, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_inclusion_rejects_non_finite_grad(bad):
    A = make_arenas(5)
    A.grad[3] = bad
    before = snapshot(A)
    with pytest.raises(ValueError, match=r"\bgrad\b"):
        call_step(A)
    assert_untouched(A, before)


def test_inclusion_rejects_nan_in_state():
    A = make_arenas(5)
    A.m[2] = float("nan")
    with pytest.raises(ValueError, match=r"\bm\b"):
        call_step(A)


@pytest.mark.parametrize(
    "hyper, name",
    [
        (dict(t=0), "step"), (dict(t=-1), "step"), (dict(t=1.0), "step"), (dict(t=True), "step"),
        (dict(lr=0.0), "lr"), (dict(lr=-1e-3), "lr"), (dict(lr=float("nan")), "lr"),
        (dict(beta1=1.0), "beta1"), (dict(beta1=-0.1), "beta1"), (dict(beta2=1.0), "beta2"),
        (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
        (dict(kappa=0.0), "kappa"), (dict(lam=-1.0), "lam"), (dict(lam=float("inf")), "lam"),
        (dict(nu=0.0), "nu"), (dict(nu=-1.0), "nu"),
        (dict(mode="positive"), "mode"), (dict(optimizer="adam"), "optimizer"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v[k]}" for k in v),
)
def test_inclusion_rejects_bad_hyper(hyper, name):
    A = make_arenas(5)
    A.grad.fill_(0.5)
    hyper = dict(hyper)
    t = hyper.pop("t", 1)
    before = snapshot(A)
    with pytest.raises(ValueError, match=rf"\b{name}\b") as info:
        call_step(A, t, **hyper)
    if name == "mode":
        assert "nonneg" in str(info.value) and "signed" in str(info.value)
    if name == "optimizer":
        assert "adamw" in str(info.value) and "sgd" in str(info.value)
    assert_untouched(A, before)


# ========================================================== masked_linear / pair_matmul
def seed_of(*parts) -> int:
    """A seed per test case that does not depend on PYTHONHASHSEED."""
    return zlib.crc32(repr(parts).encode())


def randn(shape, dtype, gen, scale=1.0):
    # Drawn in float64 then rounded: the oracle sees exactly the same (rounded) inputs.
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def rand_mask(u, gen, zero_unit=True):
    m = torch.rand(u, generator=gen) * 1.4 + 0.1
    if zero_unit and u > 1:
        m[u // 3] = 0.0
    return m


# (tokens T, in K, units/out N): tokens 1, 7, 197; widths 1, 40, 52
ML_SHAPES = [(1, 40, 1), (7, 52, 40), (197, 40, 52), (7, 1, 52)]


@pytest.mark.parametrize("shape", ML_SHAPES, ids=lambda s: "T%d-K%d-N%d" % s)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_masked_linear_forward(dtype, act, bias, shape):
    T, K, N = shape
    gen = torch.Generator().manual_seed(seed_of(T, K, N, act, bias, str(dtype)))
    x, W = randn((T, K), dtype, gen), randn((N, K), dtype, gen)
    b = randn((N,), dtype, gen) if bias else None
    m = rand_mask(N, gen)
    out = R.masked_linear(x, W, b, m, None, act)
    assert out.dtype == dtype and out.shape == (T, N)
    assert_close(out, oracle_masked_linear(x, W, b, m, None, act), dtype, K, msg="masked_linear")
    if N > 1:
        assert torch.all(out[:, N // 3] == 0), "a unit with mask 0 must give exact zeros"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_masked_linear_act_none_is_identity_and_leading_batch(dtype):
    gen = torch.Generator().manual_seed(11)
    x, W, b = randn((2, 3, 40), dtype, gen), randn((52, 40), dtype, gen), randn((52,), dtype, gen)
    m = rand_mask(52, gen)
    out = R.masked_linear(x, W, b, m, None, None)
    assert out.shape == (2, 3, 52) and out.dtype == dtype
    assert torch.equal(out, R.masked_linear(x, W, b, m, None, "none"))
    assert_close(out, oracle_masked_linear(x, W, b, m, None, None), dtype, 40, msg="leading batch")
    # each row of the batch is the 2-D op on that row
    assert_close(out.reshape(6, 52), oracle_masked_linear(x.reshape(6, 40), W, b, m, None, None), dtype, 40)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["blocks", "interleaved"])
def test_masked_linear_col2unit(dtype, layout):
    """52 output columns shared by 4 units (13 columns each, e.g. one channel per head); dm sums them."""
    gen = torch.Generator().manual_seed(5)
    T, K, N, U = 7, 40, 52, 4
    col2unit = torch.arange(N) // 13 if layout == "blocks" else torch.randperm(N, generator=gen) % U
    x = randn((T, K), dtype, gen).requires_grad_()
    W, b = randn((N, K), dtype, gen), randn((N,), dtype, gen)
    m = rand_mask(U, gen, zero_unit=False).requires_grad_()
    out = R.masked_linear(x, W, b, m, col2unit, "gelu")
    gy = randn(out.shape, dtype, gen)
    out.backward(gy)
    x64, m64 = x.detach().double().requires_grad_(), m.detach().double().requires_grad_()
    ref = oracle_masked_linear(x64, W, b, m64, col2unit, "gelu")
    ref.backward(gy.double())
    assert_close(out, ref, dtype, K, msg="col2unit out")
    assert m.grad.dtype == torch.float32 and m.grad.shape == (U,)
    assert_close(m.grad, m64.grad, dtype, T * K * N // U, msg="col2unit dm")
    assert_close(x.grad, x64.grad, dtype, N, msg="col2unit dx")


@pytest.mark.parametrize("shape", [(7, 52, 40), (197, 40, 1)], ids=lambda s: "T%d-K%d-N%d" % s)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_masked_linear_backward(dtype, act, shape):
    T, K, N = shape
    gen = torch.Generator().manual_seed(seed_of(T, K, N, act, str(dtype), "bwd"))
    x = randn((2, T, K), dtype, gen).requires_grad_()  # leading batch (2, T)
    W, b = randn((N, K), dtype, gen), randn((N,), dtype, gen)  # frozen
    m = rand_mask(N, gen).requires_grad_()
    out = R.masked_linear(x, W, b, m, None, act)
    gy = randn(out.shape, dtype, gen)
    out.backward(gy)
    x64, m64 = x.detach().double().requires_grad_(), m.detach().double().requires_grad_()
    oracle_masked_linear(x64, W, b, m64, None, act).backward(gy.double())
    assert x.grad.dtype == dtype and m.grad.dtype == torch.float32
    assert_close(x.grad, x64.grad, dtype, N, msg="dx")
    assert_close(m.grad, m64.grad, dtype, 2 * T * K, msg="dm")  # dm sums over all 2*T tokens
    assert W.grad is None and b.grad is None, "no dW/db when W and b are frozen"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_dm_is_accumulated_in_fp32(dtype):
    """Small-integer inputs make every product exact in fp16/bf16, so dm is an integer sum; with
    fp32 accumulation it is exact, while rounding it to ``dtype`` would not be (|dm| >> 256)."""
    gen = torch.Generator().manual_seed(17)
    T, K, U, N = 197, 16, 40, 8

    def ints(lo, hi, *shape):
        return torch.randint(lo, hi + 1, shape, generator=gen).to(dtype)

    # |h| <= 16 * 9 = 144 and |gy W2| <= 8 * 12 = 96: integers that fp16 and bf16 hold exactly
    x, W1, W2 = ints(-3, 3, T, K), ints(-3, 3, U, K), ints(-3, 3, N, U)
    gy_ml, gy_pm = ints(1, 4, T, U), ints(1, 4, T, N)
    m = rand_mask(U, gen).requires_grad_()
    h = (x.double() @ W1.double().T).clamp(min=0)
    for name, run, exact in (
        ("masked_linear", lambda: R.masked_linear(x, W1, None, m, None, "relu").backward(gy_ml), (h * gy_ml.double()).sum(0)),
        ("pair_matmul", lambda: R.pair_matmul(x, W1, None, m, W2, None, "relu").backward(gy_pm),
         (h * (gy_pm.double() @ W2.double())).sum(0)),
    ):
        assert (exact.to(dtype).double() != exact).sum() > U // 4, "inputs must give sums the dtype cannot hold"
        m.grad = None
        run()
        assert torch.equal(m.grad.double(), exact), f"{name}: dm not accumulated exactly in fp32"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_masked_linear_weight_grad_when_trained(dtype):
    gen = torch.Generator().manual_seed(3)
    T, K, N = 7, 40, 52
    x = randn((T, K), dtype, gen)
    W, b = randn((N, K), dtype, gen).requires_grad_(), randn((N,), dtype, gen).requires_grad_()
    m = rand_mask(N, gen)  # m frozen here
    out = R.masked_linear(x, W, b, m, None, "silu")
    gy = randn(out.shape, dtype, gen)
    out.backward(gy)
    W64, b64 = W.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    oracle_masked_linear(x, W64, b64, m, None, "silu").backward(gy.double())
    assert m.grad is None
    assert_close(W.grad, W64.grad, dtype, T, msg="dW")
    assert_close(b.grad, b64.grad, dtype, T, msg="db")
    assert torch.all(W.grad[N // 3] == 0), "a unit with mask 0 gets no weight gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_non_contiguous_x(dtype):
    gen = torch.Generator().manual_seed(9)
    T, K, U, N = 7, 40, 52, 40
    x = randn((K, T), dtype, gen).t()  # a transposed view
    assert not x.is_contiguous()
    W1, b1, W2, b2 = randn((U, K), dtype, gen), randn((U,), dtype, gen), randn((N, U), dtype, gen), randn((N,), dtype, gen)
    m = rand_mask(U, gen)
    out = R.masked_linear(x, W1, b1, m, None, "gelu")
    assert_close(out, R.masked_linear(x.contiguous(), W1, b1, m, None, "gelu").double(), dtype, K)
    assert_close(out, oracle_masked_linear(x, W1, b1, m, None, "gelu"), dtype, K)
    out = R.pair_matmul(x, W1, b1, m, W2, b2, "gelu")
    assert_close(out, R.pair_matmul(x.contiguous(), W1, b1, m, W2, b2, "gelu").double(), dtype, K * U)
    assert_close(out, oracle_pair(x, W1, b1, m, W2, b2, "gelu"), dtype, K * U)
    # a strided slice of a batch (non-contiguous, leading dims) as well
    xb = randn((2, 3, 2 * K), dtype, gen)[..., ::2]
    assert_close(R.pair_matmul(xb, W1, b1, m, W2, b2, "relu"), oracle_pair(xb, W1, b1, m, W2, b2, "relu"), dtype, K * U)


# (tokens T, in K, units U, out N)
PM_SHAPES = [(1, 40, 1, 52), (7, 52, 40, 1), (197, 40, 52, 40), (7, 1, 52, 40)]


@pytest.mark.parametrize("shape", PM_SHAPES, ids=lambda s: "T%d-K%d-U%d-N%d" % s)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_pair_matmul_forward(dtype, act, bias, shape):
    T, K, U, N = shape
    gen = torch.Generator().manual_seed(seed_of(T, K, U, N, act, bias, str(dtype)))
    x, W1, W2 = randn((T, K), dtype, gen), randn((U, K), dtype, gen), randn((N, U), dtype, gen)
    b1, b2 = (randn((U,), dtype, gen), randn((N,), dtype, gen)) if bias else (None, None)
    m = rand_mask(U, gen)
    out = R.pair_matmul(x, W1, b1, m, W2, b2, act)
    assert out.dtype == dtype and out.shape == (T, N)
    assert_close(out, oracle_pair(x, W1, b1, m, W2, b2, act), dtype, K, U, msg="pair_matmul")


@pytest.mark.parametrize("shape", [(7, 52, 40, 52), (197, 1, 52, 40)], ids=lambda s: "T%d-K%d-U%d-N%d" % s)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_pair_matmul_backward(dtype, act, shape):
    T, K, U, N = shape
    gen = torch.Generator().manual_seed(seed_of(T, K, U, N, act, str(dtype), "bwd"))
    x = randn((2, T, K), dtype, gen).requires_grad_()
    W1, b1, W2, b2 = randn((U, K), dtype, gen), randn((U,), dtype, gen), randn((N, U), dtype, gen), randn((N,), dtype, gen)
    m = rand_mask(U, gen).requires_grad_()
    out = R.pair_matmul(x, W1, b1, m, W2, b2, act)
    assert out.shape == (2, T, N)
    gy = randn(out.shape, dtype, gen)
    out.backward(gy)
    x64, m64 = x.detach().double().requires_grad_(), m.detach().double().requires_grad_()
    oracle_pair(x64, W1, b1, m64, W2, b2, act).backward(gy.double())
    assert x.grad.dtype == dtype and m.grad.dtype == torch.float32
    assert_close(x.grad, x64.grad, dtype, N, U, msg="dx")
    assert_close(m.grad, m64.grad, dtype, 2 * T, K, N, msg="dm")
    assert W1.grad is None and W2.grad is None


def _active(kind, U, gen):
    return {
        "empty": torch.zeros(0, dtype=torch.int64),
        "few": torch.tensor([0, 5, 17, U - 1]),
        "unsorted": torch.tensor([U - 1, 17, 0, 5]),
        "most": torch.randperm(U, generator=gen)[: U - 3],
        "all": torch.arange(U),
    }[kind]


@pytest.mark.parametrize("kind", ["empty", "few", "unsorted", "most", "all"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_pair_matmul_active(dtype, bias, kind):
    """Units outside ``active`` contribute exactly as if their mask were 0; they are not computed,
    so their dm is 0."""
    gen = torch.Generator().manual_seed(seed_of(kind, bias, str(dtype)))
    T, K, U, N = 7, 40, 52, 40
    x = randn((T, K), dtype, gen).requires_grad_()
    W1, W2 = randn((U, K), dtype, gen), randn((N, U), dtype, gen)
    b1, b2 = (randn((U,), dtype, gen), randn((N,), dtype, gen)) if bias else (None, None)
    m = rand_mask(U, gen).requires_grad_()
    active = _active(kind, U, gen)
    keep = torch.zeros(U, dtype=torch.bool)
    keep[active] = True
    m_zeroed = torch.where(keep, m.detach(), torch.zeros(()))

    out = R.pair_matmul(x, W1, b1, m, W2, b2, "gelu", active)
    assert out.shape == (T, N) and out.dtype == dtype
    if kind == "empty":
        want = torch.zeros(T, N, dtype=dtype) if b2 is None else b2.expand(T, N)
        assert torch.equal(out, want), "no active unit: the output is exactly b2 (or 0)"
    full = R.pair_matmul(x.detach(), W1, b1, m_zeroed, W2, b2, "gelu")
    assert_close(out, full.double(), dtype, K, U, msg="active vs zeroed mask")

    gy = randn(out.shape, dtype, gen)
    out.backward(gy)
    x64, m64 = x.detach().double().requires_grad_(), m_zeroed.double().requires_grad_()
    ref = oracle_pair(x64, W1, b1, m64, W2, b2, "gelu")
    ref.backward(gy.double())
    assert_close(out, ref, dtype, K, U, msg="active vs float64 oracle")
    assert_close(x.grad, x64.grad, dtype, N, U, msg="active dx")
    assert_close(m.grad[keep], m64.grad[keep], dtype, T, K, N, msg="active dm")
    assert torch.all(m.grad[~keep] == 0), "units outside active are not computed: dm = 0"


def test_pair_matmul_active_duplicates():
    gen = torch.Generator().manual_seed(2)
    x, W1, W2 = randn((7, 40), torch.float32, gen), randn((52, 40), torch.float32, gen), randn((40, 52), torch.float32, gen)
    m = rand_mask(52, gen)
    once = R.pair_matmul(x, W1, None, m, W2, None, "relu", torch.tensor([3, 9]))
    try:
        twice = R.pair_matmul(x, W1, None, m, W2, None, "relu", torch.tensor([3, 3, 9]))
    except ValueError as exc:
        assert "active" in str(exc)
        return
    torch.testing.assert_close(twice, once)


# ---------------------------------------------------------------------------- bad input
def _ml_inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return randn((7, 40), dtype, gen), randn((52, 40), dtype, gen), randn((52,), dtype, gen), rand_mask(52, gen)


def _pm_inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (randn((7, 40), dtype, gen), randn((52, 40), dtype, gen), randn((52,), dtype, gen), rand_mask(52, gen),
            randn((30, 52), dtype, gen), randn((30,), dtype, gen))


def test_masked_linear_rejects_bad_input():
    x, W, b, m = _ml_inputs()
    with pytest.raises(ValueError, match=r"\bx\b"):
        R.masked_linear(x[:, :39], W, b, m)  # K mismatch
    with pytest.raises(ValueError, match=r"\bb\b"):
        R.masked_linear(x, W, b[:51], m)
    with pytest.raises(ValueError, match=r"\bm\b"):
        R.masked_linear(x, W, b, m[:51])  # units != rows without col2unit
    with pytest.raises(ValueError, match=r"\bm\b"):
        R.masked_linear(x, W, b, m.reshape(4, 13))
    with pytest.raises(ValueError, match=r"\bW\b"):
        R.masked_linear(x, W[None], b, m)
    with pytest.raises(ValueError, match=r"\bcol2unit\b"):
        R.masked_linear(x, W, b, m[:4], torch.arange(51) % 4)
    with pytest.raises(TypeError, match=r"\bm\b.*float32"):
        R.masked_linear(x, W, b, m.half())
    with pytest.raises(TypeError, match=r"\bm\b"):
        R.masked_linear(x, W, b, m.double())
    with pytest.raises(TypeError, match=r"\bx\b"):
        R.masked_linear(x.long(), W, b, m)
    with pytest.raises(TypeError, match=r"\bx\b"):
        R.masked_linear(x.double(), W.double(), b.double(), m)  # float64 is not a supported input dtype
    with pytest.raises(TypeError, match=r"\bW\b"):
        R.masked_linear(x, W.half(), b, m)
    with pytest.raises(ValueError) as info:
        R.masked_linear(x, W, b, m, None, "tanh")
    assert all(name in str(info.value) for name in ACTS), "the error lists the accepted activations"


def test_masked_linear_rejects_bias_dtype():
    x, W, b, m = _ml_inputs(torch.float16)
    with pytest.raises(TypeError, match=r"\bb\b"):
        R.masked_linear(x, W, b.float(), m)


@pytest.mark.parametrize("bad", [4, -1])
def test_masked_linear_rejects_col2unit_out_of_range(bad):
    x, W, b, m = _ml_inputs()
    col2unit = torch.arange(52) % 4
    col2unit[10] = bad
    with pytest.raises(ValueError, match=r"\bcol2unit\b"):
        R.masked_linear(x, W, b, m[:4], col2unit)


def test_pair_matmul_rejects_bad_input():
    x, W1, b1, m, W2, b2 = _pm_inputs()
    with pytest.raises(ValueError, match=r"\bx\b"):
        R.pair_matmul(x[:, :39], W1, b1, m, W2, b2)
    with pytest.raises(ValueError, match=r"W2"):
        R.pair_matmul(x, W1, b1, m, W2[:, :51], b2)
    with pytest.raises(ValueError, match=r"\bm\b"):
        R.pair_matmul(x, W1, b1, m[:51], W2, b2)
    with pytest.raises(TypeError, match=r"\bm\b.*float32"):
        R.pair_matmul(x, W1, b1, m.bfloat16(), W2, b2)
    with pytest.raises(TypeError, match=r"W1"):
        R.pair_matmul(x, W1.half(), b1, m, W2, b2)
    with pytest.raises(ValueError) as info:
        R.pair_matmul(x, W1, b1, m, W2, b2, "swish")
    assert all(name in str(info.value) for name in ACTS)
    for bad in ([0, 52], [-1, 3]):
        with pytest.raises(ValueError, match=r"\bactive\b"):
            R.pair_matmul(x, W1, b1, m, W2, b2, None, torch.tensor(bad))
    with pytest.raises(TypeError, match=r"\bactive\b"):
        R.pair_matmul(x, W1, b1, m, W2, b2, None, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("case", ["b2-broadcast", "b1-too-long-with-active"])
def test_pair_matmul_rejects_bad_bias_shape(case):
    x, W1, b1, m, W2, b2 = _pm_inputs()
    if case == "b2-broadcast":
        with pytest.raises(ValueError, match=r"\bb2\b"):
            R.pair_matmul(x, W1, b1, m, W2, b2[:1])
    else:
        with pytest.raises(ValueError, match=r"\bb1\b"):
            R.pair_matmul(x, W1, torch.cat([b1, b1]), m, W2, b2, None, torch.tensor([0, 1, 2]))
