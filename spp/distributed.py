"""Data-parallel search on ``torch.distributed`` (``torchrun``).

Every rank passes the *same* global batches to :func:`spp.search`; each rank computes its rows of
each batch (``torch.tensor_split`` along dim 0), the distillation loss is normalised by the global
denominator, and the flat mask gradient is summed over ranks with one ``all_reduce`` (the masks
of a model are one contiguous arena, so this is exactly the single bucket DDP would reduce).
Every rank then applies the same inclusion update to identical state, so the ranks never drift;
only rank 0 writes checkpoints, the path and the progress bar.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist


class Group:
    """The data-parallel group of a search: ``world == 1`` means a plain single-process search."""

    def __init__(self, rank: int = 0, world: int = 1, group: Optional[Any] = None):
        self.rank, self.world, self.group = rank, world, group

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (a no-op for one process)."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any rank (keeps collective decisions in step)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        self.all_reduce_(t)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.group)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def shard(self, batch: Any) -> Any:
        """This rank's rows of ``batch`` (tensors, dicts, lists and tuples of them, split along dim 0)."""
        if not self.active:
            return batch
        return shard_rows(batch, self.rank, self.world)


def current(distributed: Optional[bool] = None) -> Group:
    """The group a search runs in: the default process group when one is initialised with more
    than one rank (or ``distributed=True``), else a single process. ``distributed=False`` forces
    a single-process search even inside ``torchrun``."""
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = initialised and dist.get_world_size() > 1
    if not distributed:
        return Group()
    if not initialised:
        raise ValueError("distributed=True needs torch.distributed initialised (run under torchrun and call "
                         "spp.distributed.init_from_env() or torch.distributed.init_process_group first)")
    return Group(dist.get_rank(), dist.get_world_size())


def _rows(batch: Any) -> Optional[int]:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    if isinstance(batch, dict):
        sizes = {_rows(v) for v in batch.values()} - {None}
    elif isinstance(batch, (list, tuple)):
        sizes = {_rows(v) for v in batch} - {None}
    else:
        return None
    if len(sizes) > 1:
        raise ValueError(f"distributed search: the tensors of a batch disagree on the batch size ({sorted(sizes)}); "
                         "every tensor of a batch must have the rows along dim 0")
    return sizes.pop() if sizes else None


def shard_rows(batch: Any, rank: int, world: int) -> Any:
    """Rows ``rank`` of ``world`` near-equal parts (``torch.tensor_split``) of every tensor in ``batch``."""
    n = _rows(batch)
    if n is None:
        raise TypeError("distributed search: a batch must hold tensors with the batch along dim 0")
    if n < world:
        raise ValueError(f"distributed search: a batch of {n} rows cannot be split over {world} ranks; "
                         "use batches of at least world_size rows")

    def split(v):
        if isinstance(v, torch.Tensor) and v.dim():
            return torch.tensor_split(v, world, dim=0)[rank]
        if isinstance(v, dict):
            return {k: split(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(split(x) for x in v)
        return v

    return split(batch)


def init_from_env(backend: Optional[str] = None) -> Group:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE`` > 1);
    gloo on CPU, nccl when CUDA is there (override with ``backend``). Returns the group; a single
    process when not launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return current(True)


@contextlib.contextmanager
def from_env(backend: Optional[str] = None) -> Iterator[Group]:
    """:func:`init_from_env` as a context: a process group it initialises is destroyed when the
    block completes, so NCCL does not warn at exit about a live group and no gloo object is left
    to interpreter teardown. After an exception the group is left alone (destroying it while
    other ranks may still wait in a collective can hang); a group initialised before, or a
    single process, is left as it was. ``spp search`` runs in one."""
    created = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    group = init_from_env(backend)
    yield group
    if created and dist.is_initialized():
        dist.destroy_process_group()


def device_for_rank() -> torch.device:
    """The device this rank should use: ``cuda:LOCAL_RANK`` when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def shard_weights(handle, group: Optional[Group] = None):
    """Shard the frozen weights of an attached model over the ranks with FSDP (``fully_shard`` on
    every transformer block, then on the root), for models that do not fit one device; returns the
    handle. Each block's weights are gathered for its forward and backward and freed after, while
    the masks and the inclusion state stay whole on every rank (they are small: one fp32 value and
    six state values per unit). Call it after ``spp.attach`` and before ``spp.search``; prune a
    fresh, unsharded copy of the model with the path afterwards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    group = group or current()
    if not group.active:
        raise ValueError("shard_weights needs a distributed run with more than one rank (torchrun)")
    model, adapter = handle.model, handle.adapter
    mesh = init_device_mesh(handle.arena.m.device.type, (group.world,))
    for block in adapter.blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return handle
