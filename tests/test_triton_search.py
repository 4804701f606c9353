"""A short ``spp.search`` on a tiny BERT with the Triton backend (``SPP_BACKEND=triton``; on CPU
the kernels run under TRITON_INTERPRET=1) gives the same solution path as the torch backend:
the same entry steps and support counts, masks and z within the fp32 tolerance."""
import warnings

import numpy as np
import torch

from triton_helpers import OpLog  # first: it skips this module where Triton cannot run

import spp
from spp_kernels import dispatch
from test_search import data, tiny_bert
from tolerances import TOL


def run(backend, monkeypatch, log=None):
    monkeypatch.setenv("SPP_BACKEND", backend)
    h = spp.attach(tiny_bert())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*degenerate", category=RuntimeWarning)
        if log is None:
            return spp.search(h, data(3, rows=3), steps=40, progress=False, seed=3)
        with log:
            return spp.search(h, data(3, rows=3), steps=40, progress=False, seed=3)


def test_search_path_matches_the_torch_backend(monkeypatch):
    ref = run("torch", monkeypatch)
    log = OpLog()
    ours = run("triton", monkeypatch, log)
    assert ours.settings["backend"] == "triton" and ref.settings["backend"] == "torch"
    used = {op for op in log.ops if op.startswith("spp_triton.")}
    assert {"spp_triton.masked_linear_fwd", "spp_triton.masked_linear_bwd", "spp_triton.pair_matmul_fwd",
            "spp_triton.pair_matmul_bwd", "spp_triton.inclusion_step"} <= used, used
    assert not used & {"spp_triton.masked_linear_dw", "spp_triton.pair_matmul_dw1", "spp_triton.pair_matmul_dw2"}
    d = ref.diagnostics()
    assert not d["degenerate"] and d["distinct_entry_steps"] >= 10, d  # a path that grows gradually
    np.testing.assert_array_equal(ours.entry, ref.entry)
    np.testing.assert_array_equal(ours.support_count, ref.support_count)
    tol = TOL[torch.float32]
    np.testing.assert_allclose(ours.m, ref.m, atol=tol.atol, rtol=tol.rtol)
    np.testing.assert_allclose(ours.z, ref.z, atol=tol.atol, rtol=tol.rtol)
    monkeypatch.delenv("SPP_BACKEND")
    assert dispatch.choose("pair_matmul", "cpu")[0] != "triton" or torch.cuda.is_available()
