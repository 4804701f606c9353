"""A short ``spp.search`` on a tiny BERT with the Triton backend (``SPP_BACKEND=triton``; on CPU
the kernels run under TRITON_INTERPRET=1) gives the same solution path as the torch backend:
the same entry steps and support counts, masks and z within the fp32 tolerance."""
import os
import warnings

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import transformers  # noqa: E402

import spp  # noqa: E402
from spp_kernels import dispatch  # noqa: E402
from spp_kernels.triton import _common  # noqa: E402
from tolerances import TOL  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

if not torch.cuda.is_available() and not _common.INTERPRET:
    pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def data(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 97, (3, 9), generator=g)
        am = torch.ones_like(ids)
        am[0, 6:] = 0
        out.append({"input_ids": ids, "attention_mask": am})
    return out


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def run(backend, monkeypatch, log=None):
    monkeypatch.setenv("SPP_BACKEND", backend)
    h = spp.attach(tiny_bert())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*degenerate", category=RuntimeWarning)
        if log is None:
            return spp.search(h, data(), steps=40, progress=False, seed=3)
        with log:
            return spp.search(h, data(), steps=40, progress=False, seed=3)


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
