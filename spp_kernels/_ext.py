"""Loads the compiled extension ``spp_kernels._C`` when it was built, and registers its ops.

Absent or broken, the package still works: the dispatcher records why and falls back.
"""
from __future__ import annotations

from . import dispatch

import importlib
import importlib.util

_C = None
if importlib.util.find_spec("spp_kernels._C") is None:
    dispatch.mark_unavailable("ext", "spp_kernels._C was not built")
else:
    try:  # the extension is optional: a broken build must not break the package
        _C = importlib.import_module("spp_kernels._C")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        dispatch.mark_unavailable("ext", f"spp_kernels._C failed to load ({type(exc).__name__}: {exc})")
if _C is not None:  # pragma: no cover - until csrc/ provides ops
    for op in dispatch.OPS:
        fn = getattr(_C, op, None)
        if fn is not None:
            dispatch.register(op, "ext", fn, devices=("cpu",))

available = _C is not None
