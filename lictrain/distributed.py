"""Several processes under torchrun: process group set-up and the few collectives the training loop needs.

`torchrun --nproc_per_node=N -m lictrain train ...` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
`setup` sees them and joins the group (nccl on CUDA, gloo on CPU). Without them (plain `lictrain train`) nothing
is initialised and every helper below is the identity, so the one training loop serves both cases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import LictrainError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the group here, so we tear it down

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean_(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Average same-dtype tensors over ranks in place, with one collective (flattened into one buffer)."""
        if not self.enabled or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        return tensors

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The average over ranks of a tensor (a new tensor; the input is left alone)."""
        return self.mean_([t.detach().clone()])[0] if self.enabled else t

    def broadcast_(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Rank 0's values of these tensors on every rank, in place."""
        if self.enabled:
            for t in tensors:
                dist.broadcast(t, src=0)
        return tensors

    def any(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Element-wise OR over ranks (e.g. 'my loss is not finite', 'I was asked to stop')."""
        if not self.enabled:
            return flags
        t = torch.tensor([float(f) for f in flags], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def all_on_device(self, flag: torch.Tensor) -> torch.Tensor:
        """AND over ranks of a boolean device tensor, without reading it on the host (no synchronisation)."""
        if not self.enabled:
            return flag
        t = flag.to(torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t.bool()

    def max(self, value: float, device: torch.device) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def broadcast_object(self, obj):
        """Rank 0's object on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's object, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def collective_timeout_minutes() -> float:
    """How long a rank waits in a collective: while rank 0 alone validates and writes a checkpoint the others wait
    at the next one, and torch's default (10 minutes for NCCL) can be shorter than a validation on a large set or a
    checkpoint of a large model on a slow disk. 60 minutes, or LICTRAIN_COLLECTIVE_TIMEOUT_MIN."""
    raw = os.environ.get("LICTRAIN_COLLECTIVE_TIMEOUT_MIN", "60")
    try:
        minutes = float(raw)
    except ValueError:
        minutes = -1.0
    if minutes <= 0:
        raise LictrainError(f"LICTRAIN_COLLECTIVE_TIMEOUT_MIN must be a positive number of minutes, got '{raw}'")
    return minutes


def setup(device: torch.device) -> Dist:
    """Join the process group torchrun describes (if any). Call once per run, before building the data loader."""
    if dist.is_available() and dist.is_initialized():  # the caller set the group up itself
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_available():
        raise LictrainError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=collective_timeout_minutes()))
    except (RuntimeError, ValueError) as e:
        raise LictrainError(f"cannot join the process group ({backend}): {str(e).splitlines()[0][:200]}") from None
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), owns_group=True)


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each process drives its own GPU: cuda -> cuda:LOCAL_RANK."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device
