"""SOAP's step without launch overhead (`SOAP(capture=True)`): a parameter group's bucketed step recorded once as a
CUDA graph and replayed at every step that refreshes no basis.

The bucketed step (soap.SOAP._step_buckets) launches ~25 small kernels per bucket (the rotations in and out, the
factor update riding on the first, Adam's arithmetic, the weight update): 50-90 buckets make over a thousand launches
a step, which on a GPU can cost more than the arithmetic. Replayed as one graph they cost one launch.

Exact against the eager step: the graph records the same kernels in the same order (`step_body` below mirrors
_step_buckets; on the CPU, where there are no graphs, `capture=True` runs step_body eagerly, which is what the
tests compare bit for bit with the eager step). What changes from step to step reaches the graph through static
buffers filled before each replay:
- the gradients, copied into one stacked buffer per bucket (the eager step stacks them too);
- the step's scalars (lr over the first bias correction, the second bias correction, the weight decay factor),
  computed on the host in double precision as the eager step computes them and copied to the device from pinned
  memory, so no host synchronisation; the kernels see them rounded to the parameters' precision, as the eager
  foreach kernels see their Python scalars.
Everything else the step reads keeps its storage between refreshes: the moments, factors and bases are updated in
place (soap_buckets.Bucket.refresh), the Kronecker unit matrices are copied into their old storage.

Eager instead: refresh steps (the refresh itself, after the step, stays eager and its step is replayed), a tensor's
first step, the first step after the buckets were (re)built (it warms up on a side stream, as CUDA graphs need), any
change of betas, eps, weight decay or semantics (a new graph), and `batched=False`.
"""

from __future__ import annotations

import torch

from .soap_buckets import Bucket, updates_back


def step_scalars(group: dict, buckets: list[Bucket], authors: bool) -> list[float]:
    """Per bucket the multiplier of the first moment and the divisor of sqrt(v) (1 with the authors' semantics),
    then the weight decay factor: the Python numbers soap.SOAP._directions and _apply use."""
    b1, b2 = group["betas"]
    out = []
    for b in buckets:
        c1 = 1 - b1**b.step if group["bias_correction"] else 1.0
        c2 = (1 - b2**b.step) ** 0.5 if group["bias_correction"] else 1.0
        out += [group["lr"] * c2 / c1, 1.0] if authors else [group["lr"] / c1, c2]
    return out + [1 - group["lr"] * group["weight_decay"]]


def step_body(group: dict, buckets: list[Bucket], grads: list[torch.Tensor], scalars: torch.Tensor,
              shampoo_beta: float, authors: bool) -> None:
    """_step_buckets without the refresh, its scalars read from `scalars` (step_scalars' layout, on the device)."""
    b1, b2 = group["betas"]
    g_rots = [b.rotate(g, accumulate=shampoo_beta) if b.preconditioned else g for b, g in zip(buckets, grads)]
    ms, vs = [b.m for b in buckets], [b.v for b in buckets]
    torch._foreach_lerp_(ms, g_rots, 1 - b1)
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, g_rots, g_rots, value=1 - b2)
    denom = torch._foreach_sqrt(vs)
    cast = {dtype: scalars.to(dtype) for dtype in {m.dtype for m in ms}}
    if not authors:
        for k, d in enumerate(denom):
            d.div_(cast[d.dtype][2 * k + 1])
    torch._foreach_add_(denom, group["eps"])
    updates = [m * cast[m.dtype][2 * k] for k, m in enumerate(ms)]
    torch._foreach_div_(updates, denom)
    order, deltas = updates_back(buckets, updates)
    if group["weight_decay"] and not authors:
        _scale(order, scalars[-1])
    torch._foreach_sub_(order, deltas)
    if group["weight_decay"] and authors:
        _scale(order, scalars[-1])


def _scale(params: list[torch.Tensor], factor: torch.Tensor) -> None:
    for dtype in {p.dtype for p in params}:
        torch._foreach_mul_([p for p in params if p.dtype == dtype], factor.to(dtype))


class StepGraph:
    """One parameter group's step over fixed buckets: eager on its first use (a warm-up on a side stream), then
    captured, then replayed. On the CPU step_body runs eagerly every time."""

    def __init__(self, buckets: list[Bucket], key: tuple):
        self.buckets, self.key = buckets, key
        first = buckets[0].m
        self.grads = [torch.empty((b.n, *b.shape), dtype=b.m.dtype, device=first.device) for b in buckets]
        self.slots = [g[j] for g, b in zip(self.grads, buckets) for j in range(b.n)]
        self.scalars = torch.zeros(2 * len(buckets) + 1, dtype=torch.float64, device=first.device)
        self.cuda = first.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warmed = False
        self.replays = 0

    def step(self, group: dict, shampoo_beta: float, authors: bool) -> None:
        buckets = self.buckets
        grads = [p.grad.reshape(b.shape).to(b.m.dtype) for b in buckets for p in b.params]
        torch._foreach_copy_(self.slots, grads)
        host = torch.tensor(step_scalars(group, buckets, authors), dtype=torch.float64)
        self.scalars.copy_(host.pin_memory() if self.cuda else host, non_blocking=self.cuda)

        def body():
            step_body(group, buckets, self.grads, self.scalars, shampoo_beta, authors)

        if not self.cuda:
            body()
        elif self.graph is not None:
            self.graph.replay()
            self.replays += 1
        elif not self.warmed:  # CUDA graphs need the kernels' lazy set-up done off the capture
            side, current = torch.cuda.Stream(), torch.cuda.current_stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                body()
            current.wait_stream(side)
            self.warmed = True
        else:  # capture (nothing runs), then the first replay takes this step
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the data loader's pin-memory thread may call CUDA while this thread captures
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                body()
            self.graph.replay()
            self.replays += 1
