"""spp: Solution Path Pruning of pretrained transformers.

    handle = spp.attach(model)                 # masked layers backed by one flat arena
    path = spp.search(handle, batches, steps)  # one search -> the whole solution path
    masks = path.masks(params=0.5)             # any ratio, read off the path
    small = spp.prune(model, masks)            # physically narrower, mask values folded in
    spp.save_pruned(small, "out"); spp.load_pruned("out")
"""
from __future__ import annotations

from .adapters import ADAPTERS, find_adapter, supported
from .arena import MaskArena, PairSpec
from .handle import SppHandle, attach, detach
from .path import MaskSet, SolutionPath
from .prune import load_pruned, prune, save_pruned
from .io import DiskFullError, NotWritableError
from .search import NonFiniteError, SearchConfig, SearchInterrupted, distill_loss, search

__all__ = [
    "attach", "detach", "search", "prune", "save_pruned", "load_pruned", "SolutionPath", "MaskSet",
    "MaskArena", "PairSpec", "SppHandle", "SearchConfig", "distill_loss", "find_adapter", "supported",
    "ADAPTERS", "load_path", "SearchInterrupted", "NonFiniteError", "NotWritableError", "DiskFullError",
]
__version__ = "0.1.0"

load_path = SolutionPath.load
