"""Model-family adapters, one module per family; :func:`find_adapter` picks the right one."""
from __future__ import annotations

import torch.nn as nn

from .base import Adapter
from .bert import BertAdapter
from .clip import ClipAdapter
from .llama import LlamaAdapter
from .opt import OptAdapter
from .swin import SwinAdapter
from .timm_vit import TimmViTAdapter

ADAPTERS: dict[str, type[Adapter]] = {a.family: a for a in (BertAdapter, TimmViTAdapter, LlamaAdapter, OptAdapter, ClipAdapter, SwinAdapter)}


def supported() -> str:
    return "; ".join(f"{name}: {cls.description}" for name, cls in ADAPTERS.items())


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``; ValueError listing the supported families otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for cls in ADAPTERS.values():
        if cls.matches(model):
            adapter = cls(model)
            adapter.check_supported(model)
            return adapter
    raise ValueError(f"unsupported model {type(model).__name__}; supported families: {supported()}")


def adapter_by_family(family: str) -> type[Adapter]:
    if family not in ADAPTERS:
        raise ValueError(f"unknown model family {family!r}; supported families: {supported()}")
    return ADAPTERS[family]
