"""SOAP's work shared out over data-parallel ranks (issue 34): each rank owns a cost-balanced share of the
parameters, keeps only their state, computes only their step, and one all-gather per step gives every rank every
updated parameter.

Under DistributedDataParallel every rank holds the same parameters and, after the backward pass, the same averaged
gradients, so a replicated optimizer repeats the same arithmetic on every rank. Sharded, a rank's SOAP work shrinks
with the number of ranks, as its forward and backward pass do, and one collective is added (the parameters, in fp32,
once per step; Distributed Shampoo does the same with its blocks). Every parameter is computed by exactly one rank
and copied to the others, so the ranks' weights stay bit-identical. (A rank's own tensors are copied into a flat
buffer and read back by the others: fp32 all the way, nothing rounded.)

Ownership is decided once, identically on every rank, from the parameters alone (their order, shapes and the
options that decide which dimensions get a factor): same-shape tensors of a group are kept together where they can
be, so that each rank's buckets stay few and large (SOAP's batched products), and a group of them that costs more
than a rank's fair share is cut into slices. Units go, costliest first, to the least-loaded rank (as
stagger_refresh spreads refreshes over steps).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def step_cost(shape: tuple[int, ...], factor_dims: list[int], frequency: int) -> float:
    """Multiply-adds per step of one tensor, roughly: rotating in and out and the Gram matrices (~3 numel x sum of
    the factor sides), Adam's elementwise work, and 1/frequency of its refresh (~2 d^3 per factor plus moving its
    first moment)."""
    numel = math.prod(shape)
    refresh = 2 * sum(d**3 for d in factor_dims) + numel * sum(factor_dims)
    return 3 * numel * sum(factor_dims) + 8 * numel + refresh / frequency


def assign_owners(units: list[tuple[list[int], float]], world: int) -> dict[int, int]:
    """units: (item indices that would share a bucket, cost of one item). Returns item -> rank.

    A unit whose cost exceeds a rank's fair share (the total over the world) is cut into that many near-equal
    slices; then the units, costliest first, go one by one to the least-loaded rank (ties: the lower rank).
    Deterministic: every rank computes the same answer from the same input."""
    total = sum(len(items) * cost for items, cost in units)
    fair = total / world if world else total
    pieces: list[tuple[list[int], float]] = []
    for items, cost in units:
        whole = len(items) * cost
        cuts = min(len(items), max(1, math.ceil(whole / fair - 1e-9))) if fair > 0 else 1
        size = math.ceil(len(items) / cuts)
        for k in range(0, len(items), size):
            part = items[k : k + size]
            pieces.append((part, len(part) * cost))
    load = [0.0] * world
    owner: dict[int, int] = {}
    for part, cost in sorted(pieces, key=lambda u: (-u[1], u[0][0])):  # (stable: the first item breaks ties)
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += cost
        for i in part:
            owner[i] = r
    return owner


class Sharding:
    """Who owns which parameter (by its index over all param groups), and the collective that shares the owners'
    results."""

    def __init__(self, params: list[torch.Tensor], owner: dict[int, int], rank: int, world: int, group=None):
        self.params, self.owner, self.rank, self.world, self.group = params, owner, rank, world, group
        self.index = {id(p): i for i, p in enumerate(params)}
        self.mine = {id(p) for i, p in enumerate(params) if owner[i] == rank}

    def owns(self, p: torch.Tensor) -> bool:
        return id(p) in self.mine

    def share_(self, tensors: dict[int, torch.Tensor]) -> None:
        """tensors: parameter index -> a tensor laid out like that parameter (the parameter itself, or its
        preconditioned gradient), the same keys on every rank. Afterwards every entry holds its owner's values, in
        place. Each rank's entries travel as one flat fp32 buffer (fp64 if any tensor is fp64): on NCCL one
        all-gather (buffers padded to the longest); on gloo one broadcast per rank, exact sizes (2-2.5x faster than
        gloo's all-gather on 2 CPU processes, benchmarks/RESULTS.md)."""
        if not tensors:
            return
        keys = sorted(tensors)
        by_rank = [[i for i in keys if self.owner[i] == r] for r in range(self.world)]
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors.values()) else torch.float32
        device = tensors[keys[0]].device
        sizes = [sum(tensors[i].numel() for i in idx) for idx in by_rank]
        mine = [tensors[i].reshape(-1).to(dtype) for i in by_rank[self.rank]]
        if dist.get_backend(self.group) == "gloo":
            flats = [torch.cat(mine) if r == self.rank and mine else torch.empty(sizes[r], dtype=dtype, device=device)
                     for r in range(self.world)]
            works = [dist.broadcast(flats[r], src=dist.get_global_rank(self.group, r) if self.group else r,
                                    group=self.group, async_op=True) for r in range(self.world) if sizes[r]]
            for w in works:  # (all in flight at once: a rank sends its share while it receives the others')
                w.wait()
        else:
            buf = torch.zeros(max(sizes), dtype=dtype, device=device)
            if mine:
                torch.cat(mine, out=buf[: sizes[self.rank]])
            flats = [torch.empty_like(buf) for _ in range(self.world)]
            dist.all_gather(flats, buf, group=self.group)
        targets, sources = [], []
        for r, idx in enumerate(by_rank):
            if r == self.rank or not idx:
                continue
            targets += [tensors[i] for i in idx]
            sources += [part.view(tensors[i].shape)
                        for i, part in zip(idx, flats[r][: sizes[r]].split([tensors[i].numel() for i in idx]))]
        if targets:
            torch._foreach_copy_(targets, sources)  # (one multi-tensor copy, casting back where a tensor is not fp32)

    def gather_state(self, state: dict) -> dict:
        """Every rank's part of an optimizer state dict's "state" (index -> entry) merged, on rank 0 (the others get
        their own part back): for a checkpoint that holds the full state whatever the world size. Tensors travel
        through the host (an object collective)."""
        local = {i: _to_cpu(st) for i, st in state.items()}
        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(local, parts, dst=0, group=self.group)
        if self.rank != 0:
            return state
        merged: dict = {}
        for part in parts:
            merged.update(part)
        return dict(sorted(merged.items()))


def _to_cpu(x):
    if isinstance(x, torch.Tensor):  # (a copy of its own: a view into a bucket's stack would pickle the whole stack)
        return x.detach().cpu().clone()
    if isinstance(x, list):
        return [_to_cpu(v) for v in x]
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    return x
