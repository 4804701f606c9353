"""Simple unit rankings to compare SPP against, expressed as :class:`SolutionPath` objects so that
every target (keep / params / flops, round_to, min_keep) is read off them by the same code."""
from __future__ import annotations

import numpy as np
import torch

from .handle import SppHandle, fingerprint, resolve
from .path import SolutionPath


def path_from_scores(handle: SppHandle, scores: np.ndarray, name: str) -> SolutionPath:
    """A path whose ranking is ``scores`` (higher first); no unit 'entered', all masks 1."""
    n = handle.arena.numel
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (n,):
        raise ValueError(f"scores must have shape ({n},), got {scores.shape}")
    return SolutionPath(handle.specs, np.full(n, -1), np.zeros(n, np.int64), scores, np.ones(n, np.float32), 0,
                        {"method": name}, fingerprint(handle.model, handle.adapter, handle.specs))


def random_path(model, seed: int = 0) -> SolutionPath:
    handle = resolve(model)
    rng = np.random.default_rng(seed)
    return path_from_scores(handle, rng.random(handle.arena.numel), f"random(seed={seed})")


@torch.no_grad()
def magnitude_scores(model) -> np.ndarray:
    """Per unit: the product of the L2 norms of its weights in the two maps of its pair
    (qk: W_q rows × W_k rows over all heads; vo: W_v rows × W_o columns; mlp: fc1 row × fc2 column)."""
    handle = resolve(model)
    out = []
    for block in handle.adapter.blocks(handle.model):
        attn, mlp = handle.adapter.parts(block)
        H = attn.num_heads

        def per_channel(w: torch.Tensor, width: int, dim: int) -> torch.Tensor:
            w = w.float() if dim == 0 else w.float().t()
            return w.reshape(H, width, -1).pow(2).sum(dim=(0, 2)).sqrt()

        out.append(per_channel(attn.q.weight, attn.qk_dim, 0) * per_channel(attn.k.weight, attn.qk_dim, 0))
        out.append(per_channel(attn.v.weight, attn.v_dim, 0) * per_channel(attn.o.weight, attn.v_dim, 1))
        out.append(mlp.fc1.weight.float().norm(dim=1) * mlp.fc2.weight.float().norm(dim=0))
    return torch.cat(out).double().numpy()


def magnitude_path(model) -> SolutionPath:
    return path_from_scores(resolve(model), magnitude_scores(model), "magnitude")


def _batches_on(handle, data, max_batches: int):
    from .search import _to_device

    dev = handle.arena.m.device
    for i, batch in enumerate(data):
        if i >= max_batches:
            break
        yield _to_device(batch, dev)


def taylor_path(model, data, max_batches: int = 16, seed: int = 0) -> SolutionPath:
    """First-order Taylor importance |m_i · ∂L/∂m_i| accumulated over ``data``.

    Under self-distillation L is at its minimum at m = 1 and its gradient is exactly 0, so L is
    a random linear read-out of the output, L = Σ r·f with r ~ N(0, 1) drawn anew per batch:
    E|∂L/∂m_i| grows with how much the output moves when unit i is scaled."""
    handle = resolve(model)
    arena, net, adapter = handle.arena, handle.model, handle.adapter
    gen = torch.Generator().manual_seed(seed)
    acc = torch.zeros(arena.numel, dtype=torch.float64)
    req = {p: p.requires_grad for p in net.parameters()}
    for p in net.parameters():
        p.requires_grad_(False)
    try:
        n = 0
        for batch in _batches_on(handle, data, max_batches):
            arena.m.grad = None
            out, w = adapter.forward(net, batch)
            r = torch.randn(out.shape, generator=gen).to(out.device)
            if w is not None and w.dim() == out.dim() - 1:
                r = r * w.unsqueeze(-1).to(r.dtype)
            (out.float() * r).sum().backward()
            acc += (arena.m.detach() * arena.m.grad).abs().double().cpu()
            n += 1
        if n == 0:
            raise ValueError("data is empty")
    finally:
        arena.m.grad = None
        for p, r_ in req.items():
            p.requires_grad_(r_)
    return path_from_scores(handle, (acc / n).numpy(), "taylor")


@torch.no_grad()
def activation_scores(model, data, max_batches: int = 16) -> np.ndarray:
    """Activation-aware importance: mean |activation| of a unit over the tokens of ``data`` times
    the norm of the weights that read it (qk: mean |q_i| · mean |k_i| over heads; vo: mean |v_i|
    × ‖W_o columns‖; mlp: mean |act(fc1)_i| × ‖fc2 column‖)."""
    handle = resolve(model)
    net, adapter = handle.model, handle.adapter
    parts = [adapter.parts(b) for b in adapter.blocks(net)]
    sums = [[None, None, None] for _ in parts]
    count = [0]
    hooks = []

    def attn_hook(i):
        def fn(mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            H = mod.num_heads
            xs = x.reshape(-1, x.shape[-1]).float()
            q = torch.nn.functional.linear(xs, mod.q.weight.float(), None if mod.q.bias is None else mod.q.bias.float())
            k = torch.nn.functional.linear(xs, mod.k.weight.float(), None if mod.k.bias is None else mod.k.bias.float())
            v = torch.nn.functional.linear(xs, mod.v.weight.float(), None if mod.v.bias is None else mod.v.bias.float())
            qa = q.abs().reshape(-1, H, mod.qk_dim).mean(0).mean(0)
            ka = k.abs().reshape(-1, H, mod.qk_dim).mean(0).mean(0)
            va = v.abs().reshape(-1, H, mod.v_dim).mean(0).mean(0)
            for j, val in enumerate((qa * ka, va)):
                sums[i][j] = val if sums[i][j] is None else sums[i][j] + val
        return fn

    def mlp_hook(i):
        def fn(mod, args):
            x = args[0]
            h = spp_act(mod)(torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).float(), mod.fc1.weight.float(),
                                                        None if mod.fc1.bias is None else mod.fc1.bias.float()))
            val = h.abs().mean(0)
            sums[i][2] = val if sums[i][2] is None else sums[i][2] + val
        return fn

    for i, (attn, mlp) in enumerate(parts):
        hooks.append(attn.register_forward_pre_hook(attn_hook(i), with_kwargs=True))
        hooks.append(mlp.register_forward_pre_hook(mlp_hook(i)))
    try:
        with handle.dense():
            for batch in _batches_on(handle, data, max_batches):
                adapter.forward(net, batch)
                count[0] += 1
    finally:
        for h in hooks:
            h.remove()
    if count[0] == 0:
        raise ValueError("data is empty")
    out = []
    for (attn, mlp), (qk, vo, ml) in zip(parts, sums):
        H = attn.num_heads
        o_norm = attn.o.weight.float().t().reshape(H, attn.v_dim, -1).pow(2).sum(dim=(0, 2)).sqrt()
        out += [qk, vo * o_norm, ml * mlp.fc2.weight.float().norm(dim=0)]
    return torch.cat(out).double().cpu().numpy() / count[0]


def spp_act(mlp):
    from spp_kernels.reference import activation

    return activation(mlp.act)


def activation_path(model, data, max_batches: int = 16) -> SolutionPath:
    handle = resolve(model)
    return path_from_scores(handle, activation_scores(model, data, max_batches), "activation")


def torch_pruning_path(model, data, importance: str = "magnitude", max_batches: int = 8, seed: int = 0) -> SolutionPath:
    """Torch-Pruning's group importance ("magnitude": L2 group norm; "taylor": |w · ∂L/∂w| with L a
    random read-out of the output, as in :func:`taylor_path`) on each pair's own layers, summed
    over heads for the shared head-dimension units. Needs ``torch-pruning``; Hugging Face BERT only."""
    import copy

    try:
        import torch_pruning as tp
    except ImportError:
        raise ImportError("the Torch-Pruning baseline needs the optional package torch-pruning") from None
    from .handle import detach

    handle = resolve(model)
    if handle.adapter.family != "bert":
        raise ValueError("the Torch-Pruning baseline supports the bert family only")
    if importance not in ("magnitude", "taylor"):
        raise ValueError(f"importance must be 'magnitude' or 'taylor', got {importance!r}")
    net = detach(copy.deepcopy(handle.model))  # the copy's own original modules, same weights
    batches = list(_batches_on(handle, data, max_batches))
    if not batches:
        raise ValueError("data is empty")
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=dict(batches[0]))
    if importance == "taylor":
        imp = tp.importance.GroupTaylorImportance()
        gen = torch.Generator().manual_seed(seed)
        net.zero_grad()
        for b in batches:
            out = net(**b).last_hidden_state
            r = torch.randn(out.shape, generator=gen) * b["attention_mask"].unsqueeze(-1)
            (out * r).sum().backward()
    else:
        imp = tp.importance.GroupMagnitudeImportance(p=2)

    def scores(lead, members):
        g = dg.get_pruning_group(lead, tp.prune_linear_out_channels, idxs=list(range(lead.out_features)))
        sub = tp.dependency.Group()
        sub._DG = dg
        for item in g.items:  # keep the pair's own layers (the graph couples q, k, v and o via SDPA)
            if item.dep.target.module in members:
                sub.items.append(item)
        return imp(sub).detach().double()

    out = []
    for layer in net.encoder.layer:
        sa, H = layer.attention.self, layer.attention.self.num_attention_heads
        qk = scores(sa.query, {sa.query, sa.key})
        vo = scores(sa.value, {sa.value, layer.attention.output.dense})
        out += [qk.reshape(H, -1).sum(0), vo.reshape(H, -1).sum(0),
                scores(layer.intermediate.dense, {layer.intermediate.dense, layer.output.dense})]
    return path_from_scores(handle, torch.cat(out).numpy(), f"torch_pruning_{importance}")
