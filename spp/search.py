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
import numbers
import os
import signal
import threading
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.nn as nn

import spp_kernels

from . import checkpoint as ckpt
from . import distributed as dist_
from .handle import SppHandle, resolve
from .io import prepare_output_dir
from .path import SolutionPath, check_fingerprint


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
    max_nonfinite_steps: int = 10  # stop after this many consecutive steps with a NaN/Inf loss or update

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


_NUMBERS = ("lr", "beta1", "beta2", "eps", "weight_decay", "kappa", "nu", "entry_frac", "warmup_frac")
_INTS = ("steps", "calib_batches", "record_every", "seed", "max_nonfinite_steps")
# settings that do not change the arithmetic of the search: a resumed search may change them
_RUNTIME = ("max_nonfinite_steps",)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_config(cfg: SearchConfig) -> None:
    """TypeError for a wrong type, ValueError for a value out of range; both name the setting."""
    for name in _INTS:
        v = getattr(cfg, name)
        if not _is_int(v):
            raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    for name in _NUMBERS:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    for name in ("lam", "loss_scale"):
        v = getattr(cfg, name)
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            raise TypeError(f"{name} must be 'auto' or a number, got {type(v).__name__} {v!r}")
    for name in ("mode", "optimizer"):
        if not isinstance(getattr(cfg, name), str):
            raise TypeError(f"{name} must be a str, got {type(getattr(cfg, name)).__name__}")
    if cfg.steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {cfg.steps!r}")
    if not 0 < cfg.entry_frac <= 1:
        raise ValueError(f"entry_frac must be in (0, 1], got {cfg.entry_frac!r}")
    if not 0 <= cfg.warmup_frac < 1:
        raise ValueError(f"warmup_frac must be in [0, 1), got {cfg.warmup_frac!r}")
    if cfg.lam != "auto" and not (cfg.lam >= 0 and math.isfinite(cfg.lam)):
        raise ValueError(f"lam must be 'auto' or a finite number >= 0, got {cfg.lam!r}")
    if cfg.loss_scale != "auto" and not (cfg.loss_scale > 0 and math.isfinite(cfg.loss_scale)):
        raise ValueError(f"loss_scale must be 'auto' or a finite positive number, got {cfg.loss_scale!r}")
    for name in ("record_every", "calib_batches", "max_nonfinite_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be an int >= 1, got {getattr(cfg, name)!r}")
    spp_kernels.reference.check_inclusion_args(1, cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay,
                                               cfg.kappa, 0.0, cfg.nu, cfg.mode, cfg.optimizer)
    lam = cfg.resolved_lam()
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lam resolves to {lam!r}; check lr, kappa and entry_frac")


def distill_parts(student: torch.Tensor, teacher: torch.Tensor, weights: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ‖s − t‖², Σ‖t‖²) over the tokens with weight 1 (all if None): the two sums of :func:`distill_loss`."""
    diff = (student.float() - teacher.float()).pow(2).sum(-1)
    ref = teacher.float().pow(2).sum(-1)
    if weights is not None and diff.dim() == weights.dim():
        w = weights.to(diff.dtype)
        return (diff * w).sum(), (ref * w).sum()
    return diff.sum(), ref.sum()


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Relative squared error Σ‖s − t‖² / Σ‖t‖² over the tokens with weight 1 (all if None)."""
    num, den = distill_parts(student, teacher, weights)
    return num / den.clamp_min(1e-12)


class _Batches:
    """Cycles over ``data``; caches teacher outputs when ``data`` is a finite sequence.

    The position (for checkpoints) is the index of the last batch served for a sequence, and the
    number of batches consumed for any other iterable (a resumed search skips that many)."""

    def __init__(self, data):
        if isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
            raise TypeError(f"data must be an iterable of batches, got {type(data).__name__}")
        self.seq = data if isinstance(data, (list, tuple)) else None
        if self.seq is not None and len(self.seq) == 0:
            raise ValueError("data is empty")
        self.data, self.it, self.i, self.consumed = data, None, -1, 0

    def next(self) -> tuple[Optional[int], Any]:
        self.consumed += 1
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

    def position(self) -> dict:
        if self.seq is not None:
            return {"kind": "sequence", "index": self.i, "length": len(self.seq), "consumed": self.consumed}
        return {"kind": "iterator", "consumed": self.consumed}

    def restore(self, pos: dict, where: str) -> None:
        kind = "sequence" if self.seq is not None else "iterator"
        if pos["kind"] != kind:
            raise ValueError(f"{where}: the checkpoint was written for {pos['kind']} data, this search gets {kind} data")
        if self.seq is not None:
            if pos["length"] != len(self.seq):
                raise ValueError(f"{where}: the checkpoint was written for {pos['length']} batches of data, "
                                 f"this search gets {len(self.seq)}")
            self.i, self.consumed = pos["index"], pos["consumed"]
            return
        self.it, self.consumed = None, 0
        for _ in range(pos["consumed"]):
            self.next()


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class SearchInterrupted(KeyboardInterrupt):
    """A search stopped by SIGINT/SIGTERM after writing a checkpoint; resume it with ``resume=True``."""

    def __init__(self, signum: int, step: int, steps: int, checkpoint: str):
        self.signum, self.step, self.steps, self.checkpoint = signum, step, steps, checkpoint
        super().__init__(f"search interrupted by {signal.Signals(signum).name} after step {step} of {steps}; "
                         f"checkpoint written to {checkpoint}; continue with resume=True (CLI: --resume)")


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps had a NaN/Inf loss, mask gradient or update."""


class _SignalGuard:
    """SIGINT/SIGTERM handlers for the duration of a search: the first signal is noted (the search
    checkpoints after the current step and stops), a second one stops at once. The previous
    handlers are restored on exit. Installed only in the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: Optional[int] = None
        self.previous: dict = {}

    def _handler(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.received = signum

    def __enter__(self):
        if self.enabled:
            for sig in self.SIGNALS:
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, prev in self.previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self.previous = {}
        return False


_ARENA = ("m", "exp_avg", "exp_avg_sq", "z", "gamma", "entry", "support_count")


def _check_run_args(progress, callback, checkpoint_dir, checkpoint_every, resume) -> None:
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable(step, loss, handle) or None, got {type(callback).__name__}")
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a folder path or None, got {type(checkpoint_dir).__name__}")
    if not _is_int(checkpoint_every):
        raise TypeError(f"checkpoint_every must be an int, got {type(checkpoint_every).__name__} {checkpoint_every!r}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0: only at the start, the end and on SIGINT/SIGTERM), "
                         f"got {checkpoint_every}")
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be a bool, got {type(resume).__name__}")
    if checkpoint_dir is None and (checkpoint_every or resume):
        raise ValueError(f"{'resume' if resume else 'checkpoint_every'} needs checkpoint_dir")


def search(
    model: Union[nn.Module, SppHandle],
    data: Iterable,
    steps: int = 300,
    loss: Union[str, Callable] = "distill",
    config: Optional[SearchConfig] = None,
    progress: bool = True,
    callback: Optional[Callable[[int, float, SppHandle], None]] = None,
    checkpoint_dir: Optional[str] = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    distributed: Optional[bool] = None,
    checkpointing: bool = False,
    **overrides,
) -> SolutionPath:
    """Search the solution path of an attached model (``spp.attach`` first).

    data: a list/tuple (teacher outputs cached) or any re-iterable of batches: tokenizer dicts
    for BERT, image tensors (or (images, labels)) for ViTs. loss: "distill" (relative squared
    error to the frozen dense model's outputs) or ``callable(model, batch) -> scalar tensor``.
    Weights stay frozen. Keyword overrides set fields of :class:`SearchConfig`.

    Checkpoints (``checkpoint_dir``): the full search state is written atomically after the
    calibration, every ``checkpoint_every`` steps, at the end, and on SIGINT/SIGTERM (then the
    search raises :class:`SearchInterrupted`); ``resume=True`` continues from the checkpoint in
    ``checkpoint_dir`` and gives a path bit-identical to an uninterrupted run (same data, settings
    and device; iterator data must yield the same batches again when re-iterated, the batches
    consumed before the checkpoint are skipped). Without a checkpoint there, ``resume=True``
    warns and starts afresh; without ``resume`` a folder holding an unfinished search is refused.

    Non-finite steps: a step whose loss, mask gradient or update is NaN/Inf changes nothing and is
    counted (``path.history["skipped"]``); after ``max_nonfinite_steps`` consecutive ones the
    search raises :class:`NonFiniteError` naming the step (the last good checkpoint stays).

    Distributed (``torchrun``; see :mod:`spp.distributed`): when the default process group has
    more than one rank (or ``distributed=True``), every rank passes the same global batches, works
    on its rows of each batch, and the mask gradient is summed over the ranks; the path equals a
    single-process search on the same batches up to float summation order. A user ``loss`` must
    then be a mean over the rows of its batch. Only rank 0 writes checkpoints (``checkpoint_dir``
    must be on a file system every rank can read for ``resume``); every rank returns the path.

    Memory: ``checkpointing=True`` recomputes each block's activations in the backward pass
    instead of storing them (the path is unchanged; a step costs about one more forward). Frozen
    weights may stay in bf16/fp16 while the masks and the inclusion state are fp32.

    Returns the :class:`SolutionPath`; its ``diagnostics()`` say whether the path is degenerate.
    """
    handle = resolve(model)
    if config is not None and not isinstance(config, SearchConfig):
        raise TypeError(f"config must be a SearchConfig or None, got {type(config).__name__}")
    known = {f.name for f in fields(SearchConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown search option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    cfg = config or SearchConfig()
    cfg = SearchConfig(**{**asdict(cfg), "steps": steps, **overrides})
    _check_config(cfg)
    if not ((isinstance(loss, str) and loss == "distill") or callable(loss)):
        raise ValueError(f"loss must be 'distill' or a callable(model, batch) -> scalar, got {loss!r}")
    _check_run_args(progress, callback, checkpoint_dir, checkpoint_every, resume)
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be a bool or None, got {type(distributed).__name__}")
    if not isinstance(checkpointing, bool):
        raise TypeError(f"checkpointing must be a bool, got {type(checkpointing).__name__}")
    group = dist_.current(distributed)
    net, arena, adapter = handle.model, handle.arena, handle.adapter
    device = arena.m.device
    batches = _Batches(data)
    loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "callable")
    lam = cfg.resolved_lam()
    fp = handle.fingerprint()

    state = None
    if checkpoint_dir is not None:
        outcome = None
        if group.is_main:
            try:
                checkpoint_dir, found = _open_checkpoint_dir(checkpoint_dir, resume, cfg, lam, loss_name, fp)
                outcome = ("ok", checkpoint_dir, found is not None)
                state = found
            except (ValueError, TypeError, OSError) as exc:
                outcome = ("error", exc, False)
        outcome = group.broadcast_object(outcome)
        if outcome[0] == "error":
            raise outcome[1]
        checkpoint_dir = outcome[1]
        if outcome[2] and not group.is_main:
            state = ckpt.load_checkpoint(checkpoint_dir)

    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    was_training = net.training
    req = {p: p.requires_grad for p in net.parameters()}
    net.eval()  # no dropout: a deterministic search on frozen weights
    for p in net.parameters():
        p.requires_grad_(False)
    arena.reset_state()
    teacher_cache: dict[int, tuple] = {}

    def forward(batch):
        try:
            return adapter.forward(net, batch)
        except TypeError as exc:
            if "batch" in str(exc):
                raise TypeError(f"data: {exc}") from None
            raise

    def teacher(idx, batch):
        if idx is not None and idx in teacher_cache:
            return teacher_cache[idx]
        with torch.no_grad(), handle.dense():  # same kernels and attention route as the student
            out = forward(batch)
        out = (out[0].detach(), out[1])
        if idx is not None:
            teacher_cache[idx] = out
        return out

    def loss_of(batch, idx, rows: Optional[tuple[int, int]] = None):
        """(this rank's loss to back-propagate, the loss of the whole batch as a float). ``rows``:
        (this rank's rows, the batch's rows) in a distributed search."""
        if loss == "distill":
            t_out, w = teacher(idx, batch)
            s_out, _ = forward(batch)
            if not group.active:
                L = distill_loss(s_out, t_out, w)
                return L, float(L.detach())
            num, den = distill_parts(s_out, t_out, w)
            den = group.all_reduce_(den.detach().clone()).clamp_min(1e-12)
            return num / den, float(group.all_reduce_(num.detach().clone()) / den)
        L = loss(net, batch)
        if not isinstance(L, torch.Tensor) or L.numel() != 1 or not L.is_floating_point():
            raise TypeError(f"loss must return a scalar float tensor, got {type(L).__name__}"
                            + (f" {L.dtype} of shape {tuple(L.shape)}" if isinstance(L, torch.Tensor) else ""))
        L = L.reshape(())
        if not group.active:
            return L, float(L.detach())
        L = L * (rows[0] / rows[1])  # a mean over this rank's rows -> its share of the batch mean
        return L, float(group.all_reduce_(L.detach().float().clone()))

    def next_batch():
        """(index, this rank's part of the next batch on the device, (its rows, the batch's rows))."""
        idx, batch = batches.next()
        if not group.active:
            return idx, _to_device(batch, device), None
        part = group.shard(batch)
        return idx, _to_device(part, device), (dist_._rows(part), dist_._rows(batch))

    history = {"step": [], "loss": [], "support": [], "skipped": []}
    consecutive = 0
    last_ckpt: Optional[tuple[str, int]] = None
    scale = None

    def save(t: int) -> str:
        """Write a checkpoint on rank 0; every rank gets its path."""
        if not group.is_main:
            return group.broadcast_object(None)
        st = ckpt.SearchState(
            step=t, steps=cfg.steps, arenas={n: getattr(arena, n).detach() for n in _ARENA}, config=asdict(cfg),
            lam=lam, loss_scale=scale, loss=loss_name, fingerprint=fp, data=batches.position(),
            history={k: list(v) for k, v in history.items() if k != "skipped"},
            nonfinite={"skipped": list(history["skipped"]), "consecutive": consecutive}, rng=ckpt.capture_rng())
        return group.broadcast_object(ckpt.save_checkpoint(checkpoint_dir, st))

    guard = _SignalGuard(enabled=checkpoint_dir is not None)

    def interrupted() -> bool:  # a collective decision, so that every rank stops at the same step
        return group.any(guard.received is not None, device)

    def signum() -> int:
        return guard.received if guard.received is not None else signal.SIGTERM

    bar = None
    try:
        if checkpointing:
            adapter.set_checkpointing(net, True)
        with guard:
            if state is None:
                t0 = 0
                if cfg.loss_scale != "auto":
                    scale = float(cfg.loss_scale)
                elif loss == "distill":
                    scale = _calibrate(handle, batches, cfg, gen, teacher, forward, next_batch, group)
                else:
                    scale = _gradient_scale(handle, batches, cfg, loss_of, next_batch, group)
                if checkpoint_dir is not None:
                    last_ckpt = (save(0), 0)
            else:
                t0, scale = state.step, state.loss_scale
                with torch.no_grad():
                    for n in _ARENA:
                        getattr(arena, n).copy_(state.arenas[n].to(device))
                history = {k: list(state.history[k]) for k in ("step", "loss", "support")}
                history["skipped"] = list(state.nonfinite["skipped"])
                consecutive = state.nonfinite["consecutive"]
                batches.restore(state.data, state.path)
                ckpt.restore_rng(state.rng, state.path)
                last_ckpt = (state.path, t0)
            if interrupted():
                raise SearchInterrupted(signum(), t0, cfg.steps, save(t0))
            bar = _progress(cfg.steps, progress and group.is_main, t0)
            for t in range(t0 + 1, cfg.steps + 1):
                idx, batch, rows = next_batch()
                arena.m.grad = None
                L, loss_value = loss_of(batch, idx, rows)
                ok = math.isfinite(loss_value)
                if ok:
                    (L * scale).backward()
                    grad = arena.m.grad if arena.m.grad is not None else torch.zeros_like(arena.m)
                    group.all_reduce_(grad)
                    ok = bool(torch.isfinite(grad).all())
                if ok:
                    before = [getattr(arena, n).detach().clone() for n in _ARENA]
                    spp_kernels.inclusion_step(
                        arena.m.data, grad, arena.exp_avg, arena.exp_avg_sq, arena.z, arena.gamma, arena.entry,
                        arena.support_count, t, lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, kappa=cfg.kappa, lam=lam, nu=cfg.nu, mode=cfg.mode,
                        optimizer=cfg.optimizer, record=(t % cfg.record_every == 0),
                    )
                    ok = _state_finite(arena)
                    if not ok:  # the update overflowed: undo it
                        with torch.no_grad():
                            for n, v in zip(_ARENA, before):
                                getattr(arena, n).copy_(v)
                arena.m.grad = None
                if ok:
                    consecutive = 0
                else:
                    consecutive += 1
                    history["skipped"].append(t)
                    if consecutive >= cfg.max_nonfinite_steps:
                        where = (f"; the last good checkpoint ({last_ckpt[0]}, step {last_ckpt[1]}) is intact"
                                 if last_ckpt else "")
                        raise NonFiniteError(
                            f"search stopped at step {t}: the loss, mask gradient or update was NaN/Inf at "
                            f"{consecutive} consecutive steps ({t - consecutive + 1}..{t}; loss at step {t}: "
                            f"{loss_value}){where}. Check the data and the loss, or lower lr")
                if t == cfg.warmup_steps:  # the masks have separated: start the inclusion path afresh
                    arena.z.zero_(), arena.gamma.zero_(), arena.entry.fill_(-1), arena.support_count.zero_()
                if ok and (t % cfg.record_every == 0 or t == cfg.steps):
                    sup = int((arena.gamma != 0).sum())
                    history["step"].append(t)
                    history["loss"].append(loss_value)
                    history["support"].append(sup)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_value:.4g}", support=f"{sup}/{arena.numel}")
                if bar is not None:
                    bar.update(1)
                if callback is not None:
                    callback(t, loss_value, handle)
                if checkpoint_dir is not None and (
                        t == cfg.steps or (checkpoint_every and t % checkpoint_every == 0 and consecutive == 0)):
                    last_ckpt = (save(t), t)
                if checkpoint_dir is not None and interrupted():
                    path_ = last_ckpt[0] if last_ckpt[1] == t else save(t)
                    raise SearchInterrupted(signum(), t, cfg.steps, path_)
    finally:
        if bar is not None:
            bar.close()
        arena.m.grad = None
        for p, r in req.items():
            p.requires_grad_(r)
        net.train(was_training)
        if checkpointing:
            adapter.set_checkpointing(net, False)
    settings = {**asdict(cfg), "lam_resolved": lam, "loss_scale_resolved": scale, "loss": loss_name,
                "backend": spp_kernels.dispatch.choose("inclusion_step", device.type)[0],
                "nonfinite_steps_skipped": len(history["skipped"]), "world_size": group.world}
    path = SolutionPath.from_arena(arena, cfg.steps, settings, fp, history)
    with torch.no_grad():
        arena.m.fill_(1.0)  # leave the model dense; the search state lives on in the path
    diag = path.diagnostics()
    if diag["degenerate"] and group.is_main:
        warnings.warn(f"spp.search: degenerate solution path: {diag['why']}", RuntimeWarning, stacklevel=2)
    return path


def _open_checkpoint_dir(checkpoint_dir, resume: bool, cfg: SearchConfig, lam: float, loss_name: str, fp: dict):
    """(folder, the checkpoint to resume or None); ValueError when the folder cannot serve this search."""
    checkpoint_dir = prepare_output_dir(checkpoint_dir, "checkpoint_dir")
    if resume and ckpt.exists(checkpoint_dir):
        state = ckpt.load_checkpoint(checkpoint_dir)
        _check_resumable(state, cfg, lam, loss_name, fp)
        return checkpoint_dir, state
    if resume:
        warnings.warn(f"spp.search: no checkpoint in {checkpoint_dir!r}; starting from step 0", RuntimeWarning,
                      stacklevel=3)
    elif ckpt.exists(checkpoint_dir):
        jpath = os.path.join(checkpoint_dir, ckpt.CKPT_JSON)
        try:
            old = ckpt.peek(checkpoint_dir)
        except ValueError as exc:
            raise ValueError(f"checkpoint_dir holds an unreadable checkpoint ({exc}); remove it or choose "
                             "another folder") from None
        if not old.get("complete", False):
            raise ValueError(f"checkpoint_dir {checkpoint_dir!r} holds an unfinished search (step "
                             f"{old.get('step')} of {old.get('steps')}, {jpath}): pass resume=True (CLI: --resume) "
                             "to continue it, or remove it / choose another folder")
    return checkpoint_dir, None


def _state_finite(arena) -> bool:
    return bool(torch.isfinite(torch.cat([arena.m.detach(), arena.exp_avg, arena.exp_avg_sq, arena.z,
                                          arena.gamma])).all())


def _check_resumable(state, cfg: SearchConfig, lam: float, loss_name: str, fp: dict) -> None:
    """ValueError naming the checkpoint file unless it was written by this same search."""
    where = state.path
    now = asdict(cfg)
    for k in sorted(set(now) | set(state.config)):
        if k in _RUNTIME:
            continue
        if k not in state.config or k not in now or state.config[k] != now[k]:
            raise ValueError(f"{where}: the checkpoint was written by a search with other settings "
                             f"({k}={state.config.get(k)!r} there, {now.get(k)!r} now); resume with the same "
                             "settings, or start afresh in another folder")
    if state.steps != cfg.steps or state.lam != lam:
        raise ValueError(f"{where}: steps / lambda ({state.steps}, {state.lam}) differ from this search's "
                         f"({cfg.steps}, {lam})")
    if state.loss != loss_name:
        raise ValueError(f"{where}: the checkpoint was written with loss {state.loss!r}, this search uses {loss_name!r}")
    try:
        check_fingerprint(state.fingerprint, fp, what="checkpoint")
    except ValueError as exc:
        raise ValueError(f"{where}: this checkpoint is from another model: {exc}") from None
    if int(state.arenas["m"].numel()) != int(_fp_units(fp)):
        raise ValueError(f"{where}: the checkpoint holds {state.arenas['m'].numel()} units, the model "
                         f"{_fp_units(fp)}")


def _fp_units(fp: dict) -> int:
    return sum(int(size) for _, size in fp.get("pairs", []))


def _calibrate(handle, batches, cfg, gen, teacher, forward, next_batch, group) -> float:
    """1 / median of the Gauss-Newton diagonal of the distillation loss at m = 1, estimated with
    Gaussian output projections r: E[(∂(r·f)/∂m_i)²] = ‖∂f/∂m_i‖²."""
    net, arena, adapter = handle.model, handle.arena, handle.adapter
    acc = torch.zeros_like(arena.m)
    n = cfg.calib_batches
    for _ in range(n):
        idx, batch, rows = next_batch()
        t_out, w = teacher(idx, batch)
        arena.m.grad = None
        out, _ = forward(batch)
        if rows is None:
            r = torch.randn(out.shape, generator=gen, dtype=torch.float32)
        else:  # the projections a single process would draw for the whole batch; this rank's rows
            r = torch.randn((rows[1], *out.shape[1:]), generator=gen, dtype=torch.float32)
            r = torch.tensor_split(r, group.world, dim=0)[group.rank]
        r = r.to(out.device)
        if w is not None and w.dim() == out.dim() - 1:
            r = r * w.unsqueeze(-1).to(r.dtype)
        (out.float() * r).sum().backward()
        tok = w.to(torch.float32) if w is not None and w.dim() == out.dim() - 1 else 1
        denom = float(group.all_reduce_(t_out.float().pow(2).sum(-1).mul(tok).sum().reshape(1)))
        g = arena.m.grad if arena.m.grad is not None else torch.zeros_like(arena.m)
        group.all_reduce_(g)
        acc += 2.0 * g.pow(2) / max(denom, 1e-12)
    arena.m.grad = None
    batches.i = -1  # start the search at the first batch again
    if not bool(torch.isfinite(acc).all()):
        raise ValueError(f"data: the calibration on the first {n} batches gave NaN/Inf mask gradients; "
                         "check the data for NaN/Inf values")
    med = float((acc / n).median())
    if not (med > 0 and math.isfinite(med)):
        raise ValueError("search: the loss does not depend on the masks (zero curvature); check the data")
    return 1.0 / med


def _gradient_scale(handle, batches, cfg, loss_of, next_batch, group) -> float:
    """For a user loss: 1 / median |∂L/∂m| at m = 1 over the calibration batches (batches with a
    NaN/Inf loss or gradient are left out)."""
    arena = handle.arena
    acc = torch.zeros_like(arena.m)
    n = used = 0
    for _ in range(cfg.calib_batches):
        idx, batch, rows = next_batch()
        arena.m.grad = None
        L, value = loss_of(batch, idx, rows)
        n += 1
        if not math.isfinite(value):
            continue
        L.backward()
        g = arena.m.grad if arena.m.grad is not None else torch.zeros_like(arena.m)
        group.all_reduce_(g)
        if bool(torch.isfinite(g).all()):
            acc += g.abs()
            used += 1
    arena.m.grad = None
    batches.i = -1
    if used == 0:
        raise ValueError(f"data: the loss or its mask gradient was NaN/Inf on all {n} calibration batches; "
                         "check the data and the loss")
    med = float((acc / used).median())
    return 1.0 / med if med > 0 and math.isfinite(med) else 1.0


def _progress(total: int, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="spp search", leave=False)
