"""spp.layers.MaskedLinear: a drop-in nn.Linear with masked output columns (mask from a MaskSlot)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from spp.arena import MaskArena, PairSpec
from spp.layers import MaskedLinear, MaskSlot


def _setup(units=6, heads=3, act=None, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(10, units * heads)
    arena = MaskArena([PairSpec("blocks.0.qk", "qk", 0, units, 1, 1)])
    with torch.no_grad():
        arena.m.copy_(torch.linspace(0.0, 1.5, units))
    col2unit = torch.arange(units).repeat(heads)
    return lin, arena, MaskedLinear(lin, MaskSlot(arena, "blocks.0.qk"), col2unit, act), col2unit


@pytest.mark.parametrize("act", [None, "relu", "gelu"])
def test_matches_closed_form_and_mask_gradient(act):
    lin, arena, layer, col2unit = _setup(act=act)
    x = torch.randn(2, 7, 10)
    y = layer(x)
    h = F.linear(x, lin.weight, lin.bias)
    h = {None: h, "relu": F.relu(h), "gelu": F.gelu(h)}[act]
    want = h * arena.m.detach()[col2unit]
    assert torch.allclose(y, want, atol=1e-6, rtol=1e-6)
    y.square().sum().backward()
    m = arena.m.detach().clone().requires_grad_(True)
    (h * m[col2unit]).square().sum().backward()
    assert torch.allclose(arena.m.grad, m.grad, atol=1e-4, rtol=1e-5)


def test_plain_linear_without_slot_or_when_disabled():
    lin, arena, layer, _ = _setup()
    x = torch.randn(4, 10)
    assert torch.equal(MaskedLinear(lin)(x), F.linear(x, lin.weight, lin.bias))
    arena.enabled = False
    assert torch.equal(layer(x), F.linear(x, lin.weight, lin.bias))
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert list(dict(layer.state_dict()).keys()) == ["linear.weight", "linear.bias"]  # no arena, no col2unit


def test_bad_arguments_are_named():
    lin = nn.Linear(4, 6)
    with pytest.raises(ValueError, match="col2unit"):
        MaskedLinear(lin, col2unit=torch.arange(5))
    with pytest.raises(TypeError, match="linear"):
        MaskedLinear(nn.Conv1d(1, 1, 1))
    with pytest.raises(ValueError, match="act"):
        MaskedLinear(lin, act="tanhh")
