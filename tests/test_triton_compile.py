"""Every Triton kernel compiles for sm_90 (H100/H200) down to a cubin, here, without a GPU: the
interpreter tests never run Triton's compiler (see tests/triton_compile_check.py). The default
suite compiles a covering subset (every constexpr value and argument type of each kernel at
least once); the slow suite compiles every specialisation the workload launches."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_compile_check.py")


def _run(args, interpret: bool, timeout: int, cache: str):
    env = dict(os.environ, TRITON_CACHE_DIR=cache)  # a fresh cache: every kernel is really compiled
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    d = tmp_path_factory.mktemp("triton")
    path = str(d / "specs.json")
    r = _run(["record", path], interpret=True, timeout=600, cache=str(d / "cache-record"))
    assert r.returncode == 0, r.stdout + r.stderr
    with open(path) as fh:
        recorded = json.load(fh)
    kernels = {(s["module"], s["name"]) for s in recorded}
    # every kernel of every op was launched: masked_linear, pair_matmul (and their GEMMs), attention, inclusion
    assert {m.rsplit(".", 1)[1] for m, _ in kernels} == {"masked_linear", "pair_matmul", "_common", "attention",
                                                          "inclusion_step"}
    assert len(kernels) >= 10
    return path


def _compile(path, cover: bool):
    cache = os.path.join(os.path.dirname(path), "cache-cover" if cover else "cache-all")
    r = _run(["compile", path] + (["--cover"] if cover else []), interpret=False, timeout=1800, cache=cache)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "kernel specialisations for sm_90" in out and "FAILED" not in out, out


def test_every_kernel_compiles_for_sm90(specs):
    _compile(specs, cover=True)


@pytest.mark.slow
def test_every_recorded_specialisation_compiles_for_sm90(specs):
    _compile(specs, cover=False)
