"""``spp.finetune``: recover a pruned model by distillation from the dense one.

Loss = relative squared error of the final output to the teacher's + ``hidden_weight`` × the mean
relative squared error of every block's output (the pruned pairs leave the hidden width
unchanged, so block outputs compare one to one). AdamW with linear warm-up and cosine decay.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .adapters import find_adapter
from .handle import get_handle
from .search import _Batches, _to_device, distill_loss


@dataclass
class FinetuneConfig:
    steps: int = 200
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    warmup_frac: float = 0.1
    hidden_weight: float = 1.0  # 0: match the final output only
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0  # 0: no checkpoints

    def lr_at(self, step: int) -> float:
        """Learning rate of 1-based ``step``: linear warm-up, then cosine decay to 0."""
        warm = max(1, int(round(self.warmup_frac * self.steps)))
        if step <= warm:
            return self.lr * step / warm
        t = (step - warm) / max(1, self.steps - warm)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _check(cfg: FinetuneConfig) -> None:
    if isinstance(cfg.steps, bool) or not isinstance(cfg.steps, int) or cfg.steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {cfg.steps!r}")
    for name in ("lr", "grad_clip"):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a finite positive number, got {v!r}")
    for name in ("weight_decay", "hidden_weight"):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if not (0 <= cfg.warmup_frac < 1):
        raise ValueError(f"warmup_frac must be in [0, 1), got {cfg.warmup_frac!r}")
    if not isinstance(cfg.checkpoint_every, int) or cfg.checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an int >= 0, got {cfg.checkpoint_every!r}")


@contextlib.contextmanager
def block_outputs(model: nn.Module, adapter):
    """Collect each block's output tensor during a forward (a list, cleared on entry)."""
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for b in adapter.blocks(model)]
    try:
        yield outs
    finally:
        for h in hooks:
            h.remove()


def distill_terms(model, adapter, batch, teacher, t_adapter, hidden_weight: float) -> torch.Tensor:
    """The fine-tuning loss of one batch (see the module docstring)."""
    with torch.no_grad(), block_outputs(teacher, t_adapter) as t_hidden:
        t_out, w = t_adapter.forward(teacher, batch)
    with block_outputs(model, adapter) as s_hidden:
        s_out, _ = adapter.forward(model, batch)
    loss = distill_loss(s_out, t_out, w)
    if hidden_weight > 0:
        if len(s_hidden) != len(t_hidden):
            raise ValueError(f"teacher has {len(t_hidden)} blocks, the pruned model {len(s_hidden)}")
        hid = sum(distill_loss(s, t, w) for s, t in zip(s_hidden, t_hidden)) / max(1, len(s_hidden))
        loss = loss + hidden_weight * hid
    return loss


@torch.no_grad()
def evaluate_distill(model, data: Iterable, teacher, hidden_weight: float = 0.0) -> float:
    """Mean fine-tuning loss (by default the output term only) over ``data``: the held-out check."""
    adapter, t_adapter = find_adapter(model), _teacher_adapter(teacher)
    was = model.training
    model.eval()
    vals = []
    try:
        with _dense(teacher):
            for batch in data:
                batch = _to_device(batch, next(model.parameters()).device)
                vals.append(float(distill_terms(model, adapter, batch, teacher, t_adapter, hidden_weight)))
    finally:
        model.train(was)
    if not vals:
        raise ValueError("data is empty")
    return sum(vals) / len(vals)


def _teacher_adapter(teacher):
    h = get_handle(teacher)
    return h.adapter if h is not None else find_adapter(teacher)


def _dense(teacher):
    h = get_handle(teacher)
    return h.dense() if h is not None else contextlib.nullcontext()


def finetune(
    model: nn.Module,
    data: Iterable,
    teacher: nn.Module,
    steps: int = 200,
    lr: float = 1e-4,
    config: Optional[FinetuneConfig] = None,
    progress: bool = True,
    **overrides,
) -> dict:
    """Train ``model`` (typically ``spp.prune``'s output) in place to match the dense ``teacher``.

    data: batches as for :func:`spp.search`; teacher: the dense model (plain or attached; an
    attached one runs with its masks off). Returns ``{"step": [...], "loss": [...], "lr": [...]}``.
    Dropout stays off (eval mode) so that the student matches the teacher's deterministic outputs.
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module (the dense model), got {type(teacher).__name__}")
    cfg = config or FinetuneConfig()
    cfg = FinetuneConfig(**{**asdict(cfg), "steps": steps, "lr": lr, **overrides})
    _check(cfg)
    adapter, t_adapter = find_adapter(model), _teacher_adapter(teacher)
    if get_handle(model) is not None:
        raise ValueError("model is attached (masked): prune it first, or detach it")
    if cfg.checkpoint_dir and "_spp_pruned" not in model.__dict__:
        raise ValueError("checkpoint_dir needs a model made by spp.prune or spp.load_pruned")
    batches = _Batches(data)
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas))
    teacher_was = teacher.training
    teacher.eval()
    model.eval()
    history = {"step": [], "loss": [], "lr": []}
    bar = _progress(cfg.steps, progress, "spp finetune")
    try:
        with _dense(teacher):
            for t in range(1, cfg.steps + 1):
                _, batch = batches.next()
                batch = _to_device(batch, device)
                lr_t = cfg.lr_at(t)
                for g in opt.param_groups:
                    g["lr"] = lr_t
                opt.zero_grad(set_to_none=True)
                loss = distill_terms(model, adapter, batch, teacher, t_adapter, cfg.hidden_weight)
                if not bool(torch.isfinite(loss.detach())):
                    raise FloatingPointError(f"finetune: loss is {float(loss.detach())} at step {t}")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                history["step"].append(t)
                history["loss"].append(float(loss.detach()))
                history["lr"].append(lr_t)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{history['loss'][-1]:.4g}")
                if cfg.checkpoint_dir and cfg.checkpoint_every and (t % cfg.checkpoint_every == 0 or t == cfg.steps):
                    _checkpoint(model, cfg.checkpoint_dir, t, history)
    finally:
        if bar is not None:
            bar.close()
        teacher.train(teacher_was)
    return history


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def _checkpoint(model, directory: str, step: int, history: dict) -> None:
    from .io import atomic_write_json
    from .prune import save_pruned

    os.makedirs(directory, exist_ok=True)
    save_pruned(model, directory)
    atomic_write_json(os.path.join(directory, "finetune_state.json"), {"step": step, "history": history})
