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


def _unit_norms(w: torch.Tensor, pattern: torch.Tensor, n_units: int, dim: int = 0) -> torch.Tensor:
    """L2 norm per unit of the rows (``dim=0``) or columns of ``w``, row r belonging to unit
    ``pattern[r % len(pattern)]`` (one head's channel-to-unit map, repeated over the heads)."""
    w = w.float() if dim == 0 else w.float().t()
    unit = pattern.to(w.device)[torch.arange(w.shape[0], device=w.device) % pattern.numel()]
    sq = torch.zeros(n_units, dtype=torch.float32, device=w.device).index_add_(0, unit, w.pow(2).sum(1))
    return sq.sqrt()


@torch.no_grad()
def magnitude_scores(model) -> np.ndarray:
    """Per unit: the product of the L2 norms of its weights in the maps of its pair, over all heads
    (qk: W_q rows × W_k rows, a rotary pair's two channels together; vo: W_v rows × W_o columns,
    kv heads shared by query heads under GQA; mlp: fc1 row × fc2 column, and × the up row of a
    gated MLP)."""
    handle = resolve(model)
    out = []
    for block in handle.adapter.blocks(handle.model):
        attn, mlp = handle.adapter.parts(block)
        qk_map, v_map = attn.qk_col2unit[: attn.qk_dim], attn.v_col2unit[: attn.v_dim]
        n_qk, n_vo = int(qk_map.max()) + 1, int(v_map.max()) + 1
        out.append(_unit_norms(attn.q.weight, qk_map, n_qk) * _unit_norms(attn.k.weight, qk_map, n_qk))
        out.append(_unit_norms(attn.v.weight, v_map, n_vo) * _unit_norms(attn.o.weight, v_map, n_vo, dim=1))
        score = mlp.fc1.weight.float().norm(dim=1) * mlp.fc2.weight.float().norm(dim=0)
        up = getattr(mlp, "up", None)
        if up is not None:
            score = score * up.weight.float().norm(dim=1)
        out.append(score)
    return torch.cat(out).double().cpu().numpy()


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


def _unit_mean(cols: torch.Tensor, pattern: torch.Tensor, n_units: int) -> torch.Tensor:
    """Mean over the columns of each unit (column c belongs to ``pattern[c % len(pattern)]``)."""
    unit = pattern.to(cols.device)[torch.arange(cols.numel(), device=cols.device) % pattern.numel()]
    total = torch.zeros(n_units, dtype=cols.dtype, device=cols.device).index_add_(0, unit, cols)
    return total / torch.bincount(unit, minlength=n_units).to(cols.dtype)


@torch.no_grad()
def activation_scores(model, data, max_batches: int = 16) -> np.ndarray:
    """Activation-aware importance: mean |activation| of a unit over the tokens of ``data`` times
    the norm of the weights that read it (qk: mean |q| · mean |k| over the unit's columns in all
    heads; vo: mean |v| × ‖W_o columns‖; mlp: mean |h| × ‖fc2 column‖, h the input of fc2 —
    act(fc1 x), or act(gate x) · up x for a gated MLP)."""
    handle = resolve(model)
    net, adapter = handle.model, handle.adapter
    parts = [adapter.parts(b) for b in adapter.blocks(net)]
    sums = [[None, None, None] for _ in parts]
    count = [0]
    hooks = []

    def add(i, j, val):
        sums[i][j] = val if sums[i][j] is None else sums[i][j] + val

    def attn_hook(i):
        def fn(mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            xs = x.reshape(-1, x.shape[-1]).float()
            cols = {}
            for name in ("q", "k", "v"):
                lin = getattr(mod, name)
                y = torch.nn.functional.linear(xs, lin.weight.float(), None if lin.bias is None else lin.bias.float())
                cols[name] = y.abs().mean(0)
            qk_map, v_map = mod.qk_col2unit[: mod.qk_dim], mod.v_col2unit[: mod.v_dim]
            n_qk, n_vo = int(qk_map.max()) + 1, int(v_map.max()) + 1
            add(i, 0, _unit_mean(cols["q"], qk_map, n_qk) * _unit_mean(cols["k"], qk_map, n_qk))
            add(i, 1, _unit_mean(cols["v"], v_map, n_vo))
        return fn

    def mlp_hook(i):
        def fn(mod, args):  # on fc2: its input is the vector of unit activations
            h = args[0]
            add(i, 2, h.reshape(-1, h.shape[-1]).float().abs().mean(0))
        return fn

    for i, (attn, mlp) in enumerate(parts):
        hooks.append(attn.register_forward_pre_hook(attn_hook(i), with_kwargs=True))
        hooks.append(mlp.fc2.register_forward_pre_hook(mlp_hook(i)))
    try:
        with handle.dense():  # masks off: the MLPs call fc2 as a module, so its hook sees h
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
        v_map = attn.v_col2unit[: attn.v_dim]
        o_norm = _unit_norms(attn.o.weight, v_map, int(v_map.max()) + 1, dim=1)
        out += [qk, vo * o_norm, ml * mlp.fc2.weight.float().norm(dim=0)]
    return torch.cat(out).double().cpu().numpy() / count[0]


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
