"""``spp.search``: evolve the masks by the discretised differential inclusion (SPEC §2).

Self-distillation makes the loss minimal at m = 1, so its gradient is zero there and, with the
authors' ν = ∞, every unit enters at the same step (SPEC §6). The default here therefore
couples m to Γ (finite ν) *in units of the loss curvature*: before the run the diagonal of the
Gauss-Newton matrix of the distillation loss, H_ii, is estimated with random output projections,
and the loss is scaled by 1 / median(H_ii). The masks then settle near
m_i ≈ H_ii / (H_ii + median(H)/ν): units the output depends on stay near 1, the others sink.
z_i integrates m_i − Γ_i, so the important units enter first; λ is set from the planned number of
steps so that the support grows over the whole run (a unit that stays at m = 1 enters after
``entry_frac`` of the run, one at m = entry_frac never does).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.nn as nn

import spp_kernels

from .handle import SppHandle, resolve
from .path import SolutionPath


@dataclass
class SearchConfig:
    steps: int = 300
    lr: float = 5e-2  # Adam(W) step on the masks: large enough that they settle within the run
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    kappa: float = 1.0
    lam: Union[float, str] = "auto"  # "auto": λ = entry_frac · Σ ρ_t over the steps after warm-up
    entry_frac: float = 0.25
    warmup_frac: float = 0.2  # z, Γ, entry and support start after this fraction of the steps
    nu: float = 1.0  # coupling, in units of the median curvature when loss_scale is "auto"
    loss_scale: Union[float, str] = "auto"  # "auto": 1 / median Gauss-Newton diagonal
    calib_batches: int = 4
    mode: str = "nonneg"
    optimizer: str = "adamw"
    record_every: int = 10
    seed: int = 0

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_frac * self.steps))

    def resolved_lam(self) -> float:
        """λ; "auto" makes a unit that stays at m = 1 enter after ``entry_frac`` of the post-warm-up run."""
        if self.lam != "auto":
            return float(self.lam)
        total = 0.0
        for t in range(self.warmup_steps + 1, self.steps + 1):
            total += spp_kernels.inclusion_scalars(t, self.lr, self.beta1, self.beta2, self.kappa, self.optimizer)["rho"]
        return self.entry_frac * total


def _check_config(cfg: SearchConfig) -> None:
    if isinstance(cfg.steps, bool) or not isinstance(cfg.steps, int) or cfg.steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {cfg.steps!r}")
    if not (isinstance(cfg.entry_frac, (int, float)) and 0 < cfg.entry_frac <= 1):
        raise ValueError(f"entry_frac must be in (0, 1], got {cfg.entry_frac!r}")
    if not (isinstance(cfg.warmup_frac, (int, float)) and 0 <= cfg.warmup_frac < 1):
        raise ValueError(f"warmup_frac must be in [0, 1), got {cfg.warmup_frac!r}")
    if cfg.lam != "auto" and not (isinstance(cfg.lam, (int, float)) and cfg.lam >= 0):
        raise ValueError(f"lam must be 'auto' or a number >= 0, got {cfg.lam!r}")
    if cfg.loss_scale != "auto" and not (isinstance(cfg.loss_scale, (int, float)) and cfg.loss_scale > 0):
        raise ValueError(f"loss_scale must be 'auto' or a positive number, got {cfg.loss_scale!r}")
    if not isinstance(cfg.record_every, int) or cfg.record_every < 1:
        raise ValueError(f"record_every must be an int >= 1, got {cfg.record_every!r}")
    spp_kernels.reference.check_inclusion_args(1, cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay,
                                               cfg.kappa, cfg.resolved_lam(), cfg.nu, cfg.mode, cfg.optimizer)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Relative squared error Σ‖s − t‖² / Σ‖t‖² over the tokens with weight 1 (all if None)."""
    diff = (student.float() - teacher.float()).pow(2).sum(-1)
    ref = teacher.float().pow(2).sum(-1)
    if weights is not None and diff.dim() == weights.dim():
        w = weights.to(diff.dtype)
        return (diff * w).sum() / (ref * w).sum().clamp_min(1e-12)
    return diff.sum() / ref.sum().clamp_min(1e-12)


class _Batches:
    """Cycles over ``data``; caches teacher outputs when ``data`` is a finite sequence."""

    def __init__(self, data):
        if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
            raise TypeError(f"data must be an iterable of batches, got {type(data).__name__}")
        self.seq = data if isinstance(data, (list, tuple)) else None
        if self.seq is not None and len(self.seq) == 0:
            raise ValueError("data is empty")
        self.data, self.it, self.i = data, None, -1

    def next(self) -> tuple[Optional[int], Any]:
        if self.seq is not None:
            self.i = (self.i + 1) % len(self.seq)
            return self.i, self.seq[self.i]
        for _ in range(2):
            if self.it is None:
                self.it = iter(self.data)
            try:
                return None, next(self.it)
            except StopIteration:
                self.it = None
        raise ValueError("data is empty")


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def search(
    model: Union[nn.Module, SppHandle],
    data: Iterable,
    steps: int = 300,
    loss: Union[str, Callable] = "distill",
    config: Optional[SearchConfig] = None,
    progress: bool = True,
    callback: Optional[Callable[[int, float, SppHandle], None]] = None,
    **overrides,
) -> SolutionPath:
    """Search the solution path of an attached model (``spp.attach`` first).

    data: a list/tuple (teacher outputs cached) or any re-iterable of batches: tokenizer dicts
    for BERT, image tensors (or (images, labels)) for ViTs. loss: "distill" (relative squared
    error to the frozen dense model's outputs) or ``callable(model, batch) -> scalar tensor``.
    Weights stay frozen. Keyword overrides set fields of :class:`SearchConfig`.
    Returns the :class:`SolutionPath`; its ``diagnostics()`` say whether the path is degenerate.
    """
    handle = resolve(model)
    cfg = config or SearchConfig()
    cfg = SearchConfig(**{**asdict(cfg), "steps": steps, **overrides})
    _check_config(cfg)
    if not (loss == "distill" or callable(loss)):
        raise ValueError(f"loss must be 'distill' or a callable(model, batch) -> scalar, got {loss!r}")
    net, arena, adapter = handle.model, handle.arena, handle.adapter
    device = arena.m.device
    batches = _Batches(data)

    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    was_training = net.training
    req = {p: p.requires_grad for p in net.parameters()}
    net.eval()  # no dropout: a deterministic search on frozen weights
    for p in net.parameters():
        p.requires_grad_(False)
    arena.reset_state()
    teacher_cache: dict[int, tuple] = {}

    def teacher(idx, batch):
        if idx is not None and idx in teacher_cache:
            return teacher_cache[idx]
        with torch.no_grad(), handle.dense():
            out = adapter.forward(net, batch)
        out = (out[0].detach(), out[1])
        if idx is not None:
            teacher_cache[idx] = out
        return out

    def loss_of(batch, idx):
        if loss == "distill":
            t_out, w = teacher(idx, batch)
            s_out, _ = adapter.forward(net, batch)
            return distill_loss(s_out, t_out, w)
        return loss(net, batch)

    lam = cfg.resolved_lam()
    history = {"step": [], "loss": [], "support": []}
    try:
        if cfg.loss_scale != "auto":
            scale = float(cfg.loss_scale)
        elif loss == "distill":
            scale = _calibrate(handle, batches, cfg, gen, device, teacher)
        else:
            scale = _gradient_scale(handle, batches, cfg, device, loss_of)
        bar = _progress(cfg.steps, progress)
        for t in range(1, cfg.steps + 1):
            idx, batch = batches.next()
            batch = _to_device(batch, device)
            arena.m.grad = None
            L = loss_of(batch, idx)
            if not bool(torch.isfinite(L.detach())):
                raise FloatingPointError(f"search: loss is {float(L)} at step {t}")
            (L * scale).backward()
            grad = arena.m.grad if arena.m.grad is not None else torch.zeros_like(arena.m)
            spp_kernels.inclusion_step(
                arena.m.data, grad, arena.exp_avg, arena.exp_avg_sq, arena.z, arena.gamma, arena.entry,
                arena.support_count, t, lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps,
                weight_decay=cfg.weight_decay, kappa=cfg.kappa, lam=lam, nu=cfg.nu, mode=cfg.mode,
                optimizer=cfg.optimizer, record=(t % cfg.record_every == 0),
            )
            if t == cfg.warmup_steps:  # the masks have separated: start the inclusion path afresh
                arena.z.zero_(), arena.gamma.zero_(), arena.entry.fill_(-1), arena.support_count.zero_()
            if t % cfg.record_every == 0 or t == cfg.steps:
                sup = int((arena.gamma != 0).sum())
                history["step"].append(t)
                history["loss"].append(float(L.detach()))
                history["support"].append(sup)
                if bar is not None:
                    bar.set_postfix(loss=f"{float(L.detach()):.4g}", support=f"{sup}/{arena.numel}")
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(t, float(L.detach()), handle)
        if bar is not None:
            bar.close()
    finally:
        arena.m.grad = None
        for p, r in req.items():
            p.requires_grad_(r)
        net.train(was_training)
    settings = {**asdict(cfg), "lam_resolved": lam, "loss_scale_resolved": scale,
                "loss": loss if isinstance(loss, str) else getattr(loss, "__name__", "callable"),
                "backend": spp_kernels.dispatch.choose("inclusion_step", device.type)[0]}
    path = SolutionPath.from_arena(arena, cfg.steps, settings, handle.fingerprint(), history)
    with torch.no_grad():
        arena.m.fill_(1.0)  # leave the model dense; the search state lives on in the path
    diag = path.diagnostics()
    if diag["degenerate"]:
        warnings.warn(f"spp.search: degenerate solution path: {diag['why']}", RuntimeWarning, stacklevel=2)
    return path


def _calibrate(handle, batches, cfg, gen, device, teacher) -> float:
    """1 / median of the Gauss-Newton diagonal of the distillation loss at m = 1, estimated with
    Gaussian output projections r: E[(∂(r·f)/∂m_i)²] = ‖∂f/∂m_i‖²."""
    net, arena, adapter = handle.model, handle.arena, handle.adapter
    acc = torch.zeros_like(arena.m)
    n = max(1, cfg.calib_batches)
    for _ in range(n):
        idx, batch = batches.next()
        batch = _to_device(batch, device)
        t_out, w = teacher(idx, batch)
        arena.m.grad = None
        out, _ = adapter.forward(net, batch)
        r = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(device)
        if w is not None and w.dim() == out.dim() - 1:
            r = r * w.unsqueeze(-1).to(r.dtype)
        (out.float() * r).sum().backward()
        denom = float(t_out.float().pow(2).sum(-1).mul(w.to(torch.float32) if w is not None and w.dim() == out.dim() - 1 else 1).sum())
        acc += 2.0 * arena.m.grad.pow(2) / max(denom, 1e-12)
    arena.m.grad = None
    batches.i = -1  # start the search at the first batch again
    med = float((acc / n).median())
    if not (med > 0 and math.isfinite(med)):
        raise ValueError("search: the loss does not depend on the masks (zero curvature); check the data")
    return 1.0 / med


def _gradient_scale(handle, batches, cfg, device, loss_of) -> float:
    """For a user loss: 1 / median |∂L/∂m| at m = 1 over the calibration batches."""
    arena = handle.arena
    acc = torch.zeros_like(arena.m)
    n = max(1, cfg.calib_batches)
    for _ in range(n):
        idx, batch = batches.next()
        arena.m.grad = None
        loss_of(_to_device(batch, device), idx).backward()
        acc += arena.m.grad.abs()
    arena.m.grad = None
    batches.i = -1
    med = float((acc / n).median())
    return 1.0 / med if med > 0 and math.isfinite(med) else 1.0


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="spp search", leave=False)
