"""Loads the compiled extension ``spp_kernels._C`` when it was built, and registers its ops.

Absent, broken or disabled (``SPP_DISABLE_EXT=1``), the package still works: the dispatcher
records why and falls back.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from . import dispatch

_C = None
with_cuda = False
if os.environ.get("SPP_DISABLE_EXT", "") not in ("", "0"):
    dispatch.mark_unavailable("ext", "spp_kernels._C disabled by SPP_DISABLE_EXT")
elif importlib.util.find_spec("spp_kernels._C") is None:
    dispatch.mark_unavailable("ext", "spp_kernels._C was not built")
else:
    try:  # the extension is optional: a broken build must not break the package
        _C = importlib.import_module("spp_kernels._C")
        from . import ext_ops
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        _C = None
        dispatch.mark_unavailable("ext", f"spp_kernels._C failed to load ({type(exc).__name__}: {exc})")
if _C is not None:
    with_cuda = bool(getattr(_C, "with_cuda", 0))
    if hasattr(torch.ops.spp_ext, "set_linear_backend"):  # the CPU ops' plain products: oneDNN where linear() uses it
        from ._linear import MIN_MACS, onednn_status

        torch.ops.spp_ext.set_linear_backend(onednn_status()[0], MIN_MACS)
    dispatch.register("masked_linear", "ext", ext_ops.masked_linear, devices=("cpu",))
    dispatch.register("pair_matmul", "ext", ext_ops.pair_matmul, devices=("cpu",))
    dispatch.register("inclusion_step", "ext", ext_ops.inclusion_step,
                      devices=("cpu", "cuda") if with_cuda else ("cpu",))
    if getattr(_C, "attention_cpu", 0):
        dispatch.register("attention", "ext", ext_ops.attention, devices=("cpu",))

available = _C is not None
