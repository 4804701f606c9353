"""The cost model is exact: the FLOPs that torch's FlopCounterMode counts in a physically pruned
model, and its parameter count, fall short of the dense model's by exactly the per-unit costs of
the pair specs times the units removed (issue: exact cost models)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import spp
from helpers import FAMILIES, SEQ, VOCAB, make, n_params, quiet_search


def _one_row_input(family, batch):
    """One unpadded row: every token counts, as in the cost model's FLOPs per token."""
    if isinstance(batch, dict):
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(1, VOCAB, (1, SEQ), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return batch[:1]


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    """Count with the torch backend: the counter has no formulas for the extension's custom ops
    (a masked model served by them would count its pair matmuls as 0 FLOPs)."""
    monkeypatch.setenv("SPP_BACKEND", "torch")


def _counter():
    """FlopCounterMode under SDPA's math kernel: the counter has no formula for the CPU flash
    kernel (it would count attention as 0 FLOPs); the math kernel's bmm calls are counted."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    stack.enter_context(torch.no_grad())
    return stack, stack.enter_context(FlopCounterMode(display=False))


def _flops(model, x) -> int:
    stack, fc = _counter()
    with stack:
        model(**x) if isinstance(x, dict) else model(x)
    return fc.get_total_flops()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target", [dict(keep=0.5), dict(params=0.3, round_to=2), dict(flops=0.6)])
def test_counted_flops_and_params_match_the_cost_model(family, target):
    model, batch = make(family, seed=0)
    x = _one_row_input(family, batch)
    tokens = SEQ if isinstance(x, dict) else None
    handle = spp.attach(model, seq_len=tokens)
    if tokens is None:
        tokens = handle.arena.seq_len  # a ViT's token count (patches + class/distillation tokens)
    dense_flops, dense_params = _flops(model, x), n_params(model)
    path = quiet_search(handle, batch, steps=20)
    masks = path.masks(**target)
    small = spp.prune(handle.model, masks)
    removed_flops = masks.flops_total - masks.flops_kept  # per token, from the pair specs
    removed_params = masks.params_total - masks.params_kept
    assert removed_flops > 0
    assert (dense_flops - _flops(small, x)) == pytest.approx(removed_flops * tokens, rel=0, abs=0.5)
    assert dense_params - n_params(small) == removed_params


@pytest.mark.parametrize("family", FAMILIES)
def test_total_pair_costs_match_the_dense_counts(family):
    """Removing every unit of every pair would remove exactly the counted attention + MLP work."""
    model, batch = make(family, seed=0)
    x = _one_row_input(family, batch)
    handle = spp.attach(model, seq_len=SEQ if isinstance(x, dict) else None)
    specs = handle.specs
    tokens = handle.arena.seq_len
    pair_flops = sum(p.size * p.flops_per_unit for p in specs) * tokens
    # FLOPs inside the attention and MLP modules alone, counted with the masks at one
    counted = 0
    for block in handle.adapter.blocks(model):
        attn, mlp = handle.adapter.parts(block)
        seen = {}

        def hook(mod, args, kwargs, out, seen=seen):
            seen[mod] = (args, kwargs)

        hs = [attn.register_forward_hook(hook, with_kwargs=True), mlp.register_forward_hook(hook, with_kwargs=True)]
        with torch.no_grad():
            model(**x) if isinstance(x, dict) else model(x)
        for h in hs:
            h.remove()
        for mod, (args, kwargs) in seen.items():
            stack, fc = _counter()
            with handle.dense(), stack:
                mod(*args, **kwargs)
            counted += fc.get_total_flops()
    assert counted == pair_flops
