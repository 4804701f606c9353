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
