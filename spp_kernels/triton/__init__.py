"""Triton kernels, one file per op. None is registered yet: the dispatcher reports that and
serves every op with the torch reference."""
from __future__ import annotations

from .. import dispatch

dispatch.mark_unavailable("triton", "no Triton kernel is registered yet")
