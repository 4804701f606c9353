"""Triton kernels, one file per op (``masked_linear``, ``pair_matmul``, ``inclusion_step``,
``attention``), each a ``torch.library`` custom op in the ``spp_triton`` namespace.

They serve CUDA tensors through the dispatcher. On CPU they run only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported) and only when ``SPP_BACKEND=triton`` asks
for them: correct, but far too slow to be picked on its own. Importing this package never fails:
without a working triton the dispatcher records why and serves the other backends. Where the
kernels cannot run at all (no CUDA, no interpreter) their modules are loaded only on first use,
so ``import spp_kernels`` stays cheap (defining the GPU ops imports torch._inductor, ~1 s).
"""
from __future__ import annotations

import importlib
import os

import torch

from .. import dispatch

_OPS = {"masked_linear": "masked_linear", "pair_matmul": "pair_matmul", "inclusion_step": "inclusion_step"}


def _interpreting() -> bool:
    try:
        from ._common import INTERPRET
        return INTERPRET
    except Exception:  # noqa: BLE001
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _lazy(op: str):
    def call(*args, **kwargs):
        return getattr(importlib.import_module(f"{__name__}.{_OPS[op]}"), op)(*args, **kwargs)
    call.__name__ = call.__qualname__ = op
    call.__doc__ = f"the Triton ``{op}`` (module loaded on first call)"
    return call


def _register() -> None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # noqa: BLE001  (missing or broken install: report, never fail the import)
        dispatch.mark_unavailable("triton", f"triton is not importable ({type(exc).__name__}: {exc})")
        return
    interpreting = _interpreting()
    eager = interpreting or torch.cuda.is_available()
    fns = {}
    try:
        for op, mod in _OPS.items():
            fns[op] = getattr(importlib.import_module(f"{__name__}.{mod}"), op) if eager else _lazy(op)
    except Exception as exc:  # noqa: BLE001
        dispatch.mark_unavailable("triton", f"the Triton kernels failed to load ({type(exc).__name__}: {exc})")
        return
    forced = ("cpu",) if interpreting else ()
    for op, fn in fns.items():
        dispatch.register(op, "triton", fn, devices=("cuda",), forced_devices=forced)
    try:  # attention registers itself
        importlib.import_module(f"{__name__}.attention")
    except Exception:  # noqa: BLE001  (its absence leaves the other ops served)
        pass


_register()
