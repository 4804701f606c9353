"""The dispatcher (``spp_kernels.dispatch``): which backend serves each op, the SPP_BACKEND override
and its fallback, registration of a backend, and ``python -m spp_kernels.info``."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import spp_kernels
from spp_kernels import _ext, dispatch, reference

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
needs_no_ext = pytest.mark.skipif(_ext.available, reason="spp_kernels._C is built on this machine")


@pytest.fixture
def clean_env(monkeypatch):
    """No SPP_BACKEND, and a fresh record of the fallback warnings already given."""
    monkeypatch.delenv("SPP_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_warned", set())
    return monkeypatch


@pytest.fixture
def scratch_registry(clean_env):
    """A private copy of every op's registry, restored afterwards, so a test may register backends."""
    for op in dispatch.OPS:
        clean_env.setitem(dispatch._REGISTRY, op, dict(dispatch._REGISTRY[op]))
    return clean_env


def small_inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 40, generator=gen)
    W1, b1 = torch.randn(52, 40, generator=gen), torch.randn(52, generator=gen)
    W2, b2 = torch.randn(40, 52, generator=gen), torch.randn(40, generator=gen)
    m = torch.rand(52, generator=gen)
    return x, W1, b1, m, W2, b2


def arenas(n=13):
    gen = torch.Generator().manual_seed(1)
    return [torch.ones(n), torch.randn(n, generator=gen), torch.zeros(n), torch.zeros(n), torch.zeros(n),
            torch.zeros(n), torch.full((n,), -1, dtype=torch.int32), torch.zeros(n, dtype=torch.int32)]


def test_ops_list():
    assert dispatch.OPS == ("masked_linear", "pair_matmul", "inclusion_step", "attention")
    assert set(dispatch.PREFERENCE) == set(dispatch.BACKENDS) and dispatch.PREFERENCE[-1] == "torch"


@needs_no_ext
@pytest.mark.parametrize("value", [None, "", "auto", " AUTO "])
def test_default_cpu_backend_is_torch(clean_env, value):
    if value is not None:
        clean_env.setenv("SPP_BACKEND", value)
    for op in dispatch.OPS:
        backend, reason = dispatch.choose(op, "cpu")
        assert backend == "torch", (op, reason)
        assert reason.startswith("fastest available"), reason
        # the reason says why the faster backends were skipped
        assert "Triton" in reason and "not built" in reason, reason
        assert dispatch.resolve(op, CPU) is dispatch.TORCH[op]
    assert [row[:2] for row in dispatch.explain("cpu")] == [(op, "torch") for op in dispatch.OPS]


def test_forced_torch(clean_env):
    clean_env.setenv("SPP_BACKEND", "Torch")  # case-insensitive
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # forcing an available backend must not warn
        for op in dispatch.OPS:
            assert dispatch.choose(op, "cpu") == ("torch", "forced by SPP_BACKEND")
            assert dispatch.resolve(op, CPU) is dispatch.TORCH[op]


def test_public_ops_equal_reference_on_torch_backend(clean_env):
    clean_env.setenv("SPP_BACKEND", "torch")
    x, W1, b1, m, W2, b2 = small_inputs()
    assert torch.equal(spp_kernels.masked_linear(x, W1, b1, m, None, "gelu"), reference.masked_linear(x, W1, b1, m, None, "gelu"))
    active = torch.tensor([1, 4, 30])
    assert torch.equal(spp_kernels.pair_matmul(x, W1, b1, m, W2, b2, "silu", active),
                       reference.pair_matmul(x, W1, b1, m, W2, b2, "silu", active))
    a, b = arenas(), arenas()
    spp_kernels.inclusion_step(*a, 3, lr=0.5, lam=0.1, record=True)
    reference.inclusion_step(*b, 3, lr=0.5, lam=0.1, record=True)
    for ta, tb in zip(a, b):
        assert torch.equal(ta, tb)
    assert (a[6] == 3).any(), "some unit should have entered at step 3"


@needs_no_ext
def test_forced_ext_unavailable_falls_back_with_warning(clean_env):
    clean_env.setenv("SPP_BACKEND", "ext")
    for op in dispatch.OPS:
        backend, reason = dispatch.choose(op, "cpu")
        assert backend == "torch"
        assert "SPP_BACKEND=ext" in reason and "not built" in reason, reason
    x, W1, b1, m, W2, b2 = small_inputs()
    with pytest.warns(RuntimeWarning, match=r"masked_linear on cpu falls back to torch.*not built") as rec:
        out = spp_kernels.masked_linear(x, W1, b1, m, None, "relu")
    assert torch.equal(out, reference.masked_linear(x, W1, b1, m, None, "relu")), "the fallback computes the op"
    assert len(rec) == 1 and rec[0].filename == __file__, "the warning points at the caller of the public op"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per (op, device), not on every call
        spp_kernels.masked_linear(x, W1, b1, m, None, "relu")
    with pytest.warns(RuntimeWarning, match=r"pair_matmul on cpu falls back to torch"):
        spp_kernels.pair_matmul(x, W1, b1, m, W2, b2)
    with pytest.warns(RuntimeWarning, match=r"inclusion_step on cpu falls back to torch"):
        spp_kernels.inclusion_step(*arenas(), 1)


@pytest.mark.parametrize("value", ["bogus", "cuda", "torch,triton"])
def test_unknown_backend_raises(clean_env, value):
    clean_env.setenv("SPP_BACKEND", value)
    for op in dispatch.OPS:
        with pytest.raises(ValueError, match=r"SPP_BACKEND") as info:
            dispatch.choose(op, "cpu")
        assert all(b in str(info.value) for b in dispatch.BACKENDS), "the error lists the accepted values"
    x, W1, b1, m, _, _ = small_inputs()
    with pytest.raises(ValueError, match=r"SPP_BACKEND"):
        spp_kernels.masked_linear(x, W1, b1, m)


def test_registered_fake_ext_backend_is_chosen(scratch_registry):
    calls = []

    def fake(name):
        def fn(*args, **kwargs):
            calls.append((name, args, kwargs))
            return f"fake {name}"
        return fn

    for op in dispatch.OPS:
        dispatch.register(op, "ext", fake(op), devices=("cpu",))
    scratch_registry.setenv("SPP_BACKEND", "ext")
    x, W1, b1, m, W2, b2 = small_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an available forced backend does not warn
        for op in dispatch.OPS:
            assert dispatch.choose(op, "cpu") == ("ext", "forced by SPP_BACKEND")
        assert spp_kernels.masked_linear(x, W1, b1, m, None, "gelu") == "fake masked_linear"
        assert spp_kernels.pair_matmul(x, W1, b1, m, W2, b2, "relu") == "fake pair_matmul"
        A = arenas()
        assert spp_kernels.inclusion_step(*A, 4, lr=0.1, record=True) == "fake inclusion_step"
        q = torch.randn(1, 2, 3, 5)
        assert spp_kernels.attention(q, q, q[..., :4], 0.5) == "fake attention"
    assert [c[0] for c in calls] == list(dispatch.OPS)
    assert calls[0][1][0] is x and calls[0][1][5] == "gelu"
    assert calls[1][1][6] == "relu" and calls[1][1][7] is None  # act, active
    assert calls[2][1][8] == 4 and calls[2][2] == {"lr": 0.1, "record": True}
    # it serves cpu only: cuda tensors fall back to torch, saying why
    backend, reason = dispatch.choose("masked_linear", "cuda")
    assert backend == "torch" and "serves cpu" in reason and "not cuda" in reason, reason
    # without the variable, ext is preferred to torch (triton is not there)
    scratch_registry.delenv("SPP_BACKEND")
    backend, reason = dispatch.choose("pair_matmul", "cpu")
    assert backend == "ext" and reason.startswith("fastest available"), reason
    # the registry is restored afterwards
    scratch_registry.undo()
    assert all("ext" not in dispatch._REGISTRY[op] or _ext.available for op in dispatch.OPS)
    if not _ext.available:
        assert all(dispatch.choose(op, "cpu")[0] == "torch" for op in dispatch.OPS)


def test_register_rejects_unknown_names(scratch_registry):
    before = {op: dict(impls) for op, impls in dispatch._REGISTRY.items()}
    with pytest.raises(ValueError, match=r"\bop\b.*masked_linear"):
        dispatch.register("attention_v2", "ext", lambda *a: None)
    with pytest.raises(ValueError, match=r"\bbackend\b.*triton"):
        dispatch.register("masked_linear", "cuda", lambda *a: None)
    assert dispatch._REGISTRY == before


def run_info(extra_env):
    env = {k: v for k, v in os.environ.items() if k != "SPP_BACKEND"}
    env.update(extra_env)
    proc = subprocess.run([sys.executable, "-m", "spp_kernels.info"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@needs_no_ext
def test_info_prints_one_line_per_op():
    lines = run_info({})
    assert lines[0].startswith(f"torch {torch.__version__}"), lines[0]
    cpu = [line for line in lines if line.startswith("cpu")]
    assert len(cpu) == len(dispatch.OPS), lines
    for op, line in zip(dispatch.OPS, cpu):
        assert line.split()[:4] == ["cpu", op, "->", "torch"], line
        assert "fastest available" in line and "not built" in line, line


@needs_no_ext
def test_info_reports_the_forced_fallback():
    cpu = [line for line in run_info({"SPP_BACKEND": "ext"}) if line.startswith("cpu")]
    assert len(cpu) == len(dispatch.OPS)
    for op, line in zip(dispatch.OPS, cpu):
        assert line.split()[:4] == ["cpu", op, "->", "torch"], line
        assert "SPP_BACKEND=ext unavailable" in line and "not built" in line, line


def test_forced_only_device_is_served_on_request_only(scratch_registry):
    """A backend registered for CPU tensors as forced-only (Triton's interpreter) never wins the
    automatic choice there, but serves when SPP_BACKEND names it."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        return reference.pair_matmul(*args, **kwargs)

    dispatch.register("pair_matmul", "triton", fake, devices=("cuda",), forced_devices=("cpu",))
    backend, reason = dispatch.choose("pair_matmul", "cpu")
    assert backend != "triton" and "only when SPP_BACKEND=triton" in reason, reason
    assert dispatch.choose("pair_matmul", "cuda")[0] == "triton"
    scratch_registry.setenv("SPP_BACKEND", "triton")
    assert dispatch.choose("pair_matmul", "cpu") == ("triton", "forced by SPP_BACKEND")
    x, W1, b1, m, W2, b2 = small_inputs()
    spp_kernels.pair_matmul(x, W1, b1, m, W2, b2, "gelu")
    assert calls == [1]


def test_resolve_remembers_its_answer_until_the_registry_or_the_request_changes(scratch_registry):
    cpu = torch.device("cpu")
    first = dispatch.resolve("pair_matmul", cpu)
    assert dispatch.resolve("pair_matmul", cpu) is first
    assert any(k[0] == "pair_matmul" and k[1] == "cpu" for k in dispatch._RESOLVED)

    def mine(*args):
        return "mine"

    dispatch.register("pair_matmul", "triton", mine, devices=("cpu",))  # a new, preferred backend
    assert dispatch.resolve("pair_matmul", cpu) is mine
    scratch_registry.setenv("SPP_BACKEND", "torch")
    assert dispatch.resolve("pair_matmul", cpu) is dispatch.TORCH["pair_matmul"]
    scratch_registry.setenv("SPP_BACKEND", "auto")
    assert dispatch.resolve("pair_matmul", cpu) is mine
