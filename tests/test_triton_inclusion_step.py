"""The Triton ``inclusion_step`` (spp_kernels/triton/inclusion_step.py) against the reference
(SPEC §2): multi-step trajectories for adamw/sgd x nonneg/signed x finite/infinite nu x weight
decay x record, within 1e-6 relative (bit-identical where the operations are the same: sgd; the
adamw square root of torch's CPU kernel is not correctly rounded, ours is), one launch per step,
NaN/Inf refused before anything is written, validation, opcheck and the dispatcher route."""
import math

import pytest
import torch

from triton_helpers import DEVICE  # first: it skips this module where Triton cannot run

import spp_kernels
from spp_kernels import dispatch, reference
from spp_kernels.triton import inclusion_step as tri
from tolerances import TOL

NAMES = ("m", "exp_avg", "exp_avg_sq", "z", "gamma", "entry", "support_count")


def arenas(n, gen):
    m = (torch.randn(n, generator=gen) * 0.5 + 1.0).to(DEVICE)
    zeros = lambda: torch.zeros(n, device=DEVICE)  # noqa: E731
    return [m, zeros(), zeros(), zeros(), zeros(), torch.full((n,), -1, dtype=torch.int32, device=DEVICE),
            torch.zeros(n, dtype=torch.int32, device=DEVICE)]


HYPERS = {
    "authors": dict(lam=0.02, lr=0.01),
    "nu-wd-signed": dict(nu=10.0, weight_decay=0.01, mode="signed", lam=0.01, lr=0.05),
    "sgd": dict(optimizer="sgd", lr=0.1, lam=0.05, weight_decay=0.1),
    "sgd-nu-signed-kappa": dict(optimizer="sgd", nu=3.0, mode="signed", lam=0.02, kappa=2.0),
    "beta0": dict(beta1=0.0, beta2=0.5, eps=1e-8, lam=0.01, lr=0.02),
}


@pytest.mark.parametrize("name", list(HYPERS))
def test_trajectory_matches_reference(name):
    hyper = HYPERS[name]
    gen = torch.Generator().manual_seed(len(name))
    n = 4099  # not a multiple of the block
    ref, ours = arenas(n, gen), None
    ours = [t.clone() for t in ref]
    drift = torch.randn(n, generator=gen).to(DEVICE)
    for t in range(1, 26):
        grad = drift + torch.randn(n, generator=gen).to(DEVICE)
        reference.inclusion_step(ref[0], grad, *ref[1:], t, record=t % 3 == 0, **hyper)
        tri.inclusion_step(ours[0], grad, *ours[1:], t, record=t % 3 == 0, **hyper)
        for key, a, b in zip(NAMES, ours, ref):
            if a.dtype == torch.int32:
                assert torch.equal(a, b), f"step {t} {key}"
            elif hyper.get("optimizer") == "sgd":
                assert torch.equal(a, b), f"step {t} {key}: sgd uses the same operations, bit for bit"
            else:
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda s, t=t, key=key: f"step {t} {key}: {s}")
    assert (ref[4] != 0).any() and (ref[5] > 1).any() and (ref[6] > 0).any(), "the path must be exercised"
    # the state stays within the fp32 row of the tolerance table as well
    torch.testing.assert_close(ours[0], ref[0], atol=TOL[torch.float32].atol, rtol=TOL[torch.float32].rtol)


def test_one_launch_per_step(monkeypatch):
    launches = []
    real = tri.wrap_triton

    def counting(kernel):
        launches.append(kernel)
        return real(kernel)

    monkeypatch.setattr(tri, "wrap_triton", counting)
    gen = torch.Generator().manual_seed(1)
    A = arenas(10_000, gen)
    tri.inclusion_step(A[0], torch.randn(10_000, generator=gen).to(DEVICE), *A[1:], 1, record=True, nu=5.0)
    assert len(launches) == 1


def test_empty_arenas_are_a_no_op():
    A = arenas(0, torch.Generator())
    tri.inclusion_step(A[0], torch.zeros(0, device=DEVICE), *A[1:], 1)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # check_finite=False: inf/inf in the kernel
@pytest.mark.parametrize("bad_name", ["grad", "m", "exp_avg_sq", "gamma"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_is_refused_before_any_write(bad_name, bad):
    gen = torch.Generator().manual_seed(2)
    A = arenas(100, gen)
    grad = torch.randn(100, generator=gen).to(DEVICE)
    named = dict(zip(NAMES, A), grad=grad)
    named[bad_name][7] = bad
    before = {k: v.clone() for k, v in named.items()}
    with pytest.raises(ValueError, match=f"{bad_name} holds NaN or Inf"):
        tri.inclusion_step(A[0], grad, *A[1:], 1)
    for k, v in named.items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0, equal_nan=True)
    # check_finite=False: no check, the kernel runs
    tri.inclusion_step(A[0], grad, *A[1:], 1, check_finite=False)


def test_validation_names_the_argument():
    gen = torch.Generator().manual_seed(3)
    A = arenas(10, gen)
    g = torch.zeros(10, device=DEVICE)
    with pytest.raises(TypeError, match="entry"):
        tri.inclusion_step(A[0], g, *A[1:5], A[5].long(), A[6], 1)
    with pytest.raises(ValueError, match="grad"):
        tri.inclusion_step(A[0], torch.zeros(9, device=DEVICE), *A[1:], 1)
    with pytest.raises(ValueError, match="step"):
        tri.inclusion_step(A[0], g, *A[1:], 0)
    with pytest.raises(ValueError, match="mode"):
        tri.inclusion_step(A[0], g, *A[1:], 1, mode="both")
    with pytest.raises(ValueError, match="eps"):
        tri.inclusion_step(A[0], g, *A[1:], 1, eps=0.0)
    wide = torch.zeros(20, device=DEVICE)
    with pytest.raises(ValueError, match="z must be contiguous"):
        tri.inclusion_step(A[0], g, A[1], A[2], wide[::2], *A[4:], 1)


def test_opcheck():
    gen = torch.Generator().manual_seed(4)
    A = arenas(300, gen)
    g = torch.randn(300, generator=gen).to(DEVICE)
    for signed, adamw, record, nu in ((False, True, True, math.inf), (True, False, False, 7.0)):
        args = (A[0], g, *A[1:], 3, 0.01, 0.9, 0.999, 1e-4, 0.01, 1.0, 0.001, nu, signed, adamw, record)
        torch.library.opcheck(torch.ops.spp_triton.inclusion_step.default, args)


def test_dispatcher_route(monkeypatch):
    if DEVICE != "cpu":
        assert dispatch.choose("inclusion_step", "cuda")[0] == "triton"
        return
    monkeypatch.delenv("SPP_BACKEND", raising=False)
    assert dispatch.choose("inclusion_step", "cpu")[0] != "triton"
    monkeypatch.setenv("SPP_BACKEND", "triton")
    assert dispatch.resolve("inclusion_step", torch.device("cpu")) is tri.inclusion_step
    gen = torch.Generator().manual_seed(5)
    A, B = arenas(50, gen), None
    B = [t.clone() for t in A]
    g = torch.randn(50, generator=gen)
    spp_kernels.inclusion_step(A[0], g, *A[1:], 1, optimizer="sgd", lam=0.0, record=True)
    reference.inclusion_step(B[0], g, *B[1:], 1, optimizer="sgd", lam=0.0, record=True)
    for a, b in zip(A, B):
        assert torch.equal(a, b)
