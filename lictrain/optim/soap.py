"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors (Vyas et al. 2024, arXiv 2409.11321).

For a parameter whose gradient G has dimensions d_1 ... d_k, SOAP keeps one factor per dimension,
F_i = EMA over steps of G_(i) G_(i)^T (G_(i): G with dimension i first, the rest flattened; for a matrix F_1 = L,
F_2 = R), and an orthogonal basis Q_i of its eigenvectors. Adam's moments live in the rotated space
G' = G x_1 Q_1^T ... x_k Q_k^T; the update is rotated back with the Q_i. Q_i comes from `eigh` the first time and is
refreshed every `precondition_frequency` steps by one power-iteration step and a QR decomposition, the columns first
sorted by their estimated eigenvalue with Adam's second moment permuted to match (as in the authors' code).

Choices (all documented because they matter for LIC):
- Dimensions. Every dimension of size 2..max_precond_dim gets its own factor, whatever the tensor's rank: a conv
  kernel (out, in, kh, kw) gets factors out x out, in x in, kh x kh, kw x kw; a transposed conv (in, out, kh, kw)
  likewise, so no layout convention is needed. Larger dimensions stay diagonal (identity basis). `merge_dims=True`
  first merges adjacent dimensions greedily while their product stays <= max_precond_dim (so no factor is ever
  larger than max_precond_dim). 1-D and 0-d parameters (biases, GDN betas) get plain Adam unless precondition_1d.
- Defaults follow the LIC papers (SOAP as a drop-in for Adam: same lr, weight decay 0, frequency 10) and the
  authors' implementation for the rest (betas 0.95/0.95, shampoo_beta = beta2, max_precond_dim 10000, no merging).
- Unlike the authors' code, the first step is taken (in the basis of the first gradient's factors) instead of only
  initialising the factors, so with preconditioning off (max_precond_dim=0) SOAP is exactly torch.optim.Adam.
  Adam's epsilon is placed as in torch.optim.Adam (after the bias-corrected square root), for the same reason, and
  decoupled weight decay is applied before the update, as torch.optim.AdamW does. A cost of taking that first step,
  found while testing the batched path: in the basis of its own gradient the rotated gradient has exact zeros (for a
  matrix, the off-diagonal of its SVD) that arrive as rounding-level values, and Adam's normalisation turns them into
  steps of up to lr/2 of arbitrary sign; the authors' semantics has no such step.
  `semantics="authors"` reproduces the authors' code (and pytorch_optimizer's SOAP, which follows it) instead: the
  first call only initialises the factors and basis, epsilon is added to the uncorrected sqrt(v) with both bias
  corrections folded into the step size, and weight decay multiplies the weights after the update. The test suite
  checks this mode against pytorch_optimizer's SOAP, trajectory for trajectory.
- The first moment is kept in the rotated space (rotated again exactly when the basis changes), which saves one
  projection per step; the arithmetic equals keeping it in the original space.
- Speed: the state of same-shape tensors (a LIC model's N x N x k x k kernels, GDN gammas, the bottleneck's
  matrices) is kept stacked, and rotations, factor updates and basis refreshes are batched products over the stack
  without transposed copies (soap_buckets.py); `batched=False` keeps one tensor at a time (the same results to
  fp32 rounding, tested).
- Memory: a factor is symmetric, so only its upper triangle is stored (state["GG"][i] has d (d + 1) / 2 numbers;
  common.unpack_symmetric gives the matrix): half of the factors' bytes. Checkpoints holding full d x d factors
  (lictrain before this) still load.
- Refresh schedule: every tensor's bases are refreshed after steps that are multiples of the frequency, as in the
  authors' code, so that step pays for every QR at once (2.4-3.6x the median step on the benchmark's models). With
  `stagger_refresh=True` each bucket of same-shape tensors (each tensor with batched=False) gets its own phase in
  [0, frequency), the costliest first to the least-loaded phase over all parameter groups, so every step pays about
  1/frequency of the refreshes; each tensor is still refreshed once per period. Off by default: it departs from the
  authors' schedule (a tensor's refreshes come up to frequency - 1 steps earlier). The phase is kept in the state.
  The two paths give phases to different units (buckets, tensors), so with staggering they follow different
  schedules and no longer agree to rounding.
- Numerics: factors, eigh and QR run in fp32 (fp64 for fp64 parameters) whatever the parameter dtype or autocast.
  If a factor is not finite or eigh/QR fail, the step retries in fp64 with jitter and otherwise keeps the last good
  basis; a non-finite gradient leaves factors and moments untouched and skips that parameter's step.
- The refresh's QR (`refresh_qr`): Householder (torch.linalg.qr) or CholeskyQR2 in fp64 (common.cholesky_qr2:
  batched products, Cholesky and triangular solves, where CUDA runs Householder's orgqr one matrix at a time; an
  item whose Cholesky fails is redone from the shifted factor on the device, without a host synchronisation). The
  two bases agree up to column signs, to which SOAP is invariant. auto: CholeskyQR2 on CUDA, Householder on the CPU.
- Data parallel (`shard`, on by default): under torch.distributed with several ranks each rank owns a cost-balanced
  share of the parameters, keeps only their state and computes only their step; one exchange a step (an all-gather
  on NCCL, a broadcast per rank on gloo) gives every rank the updated parameters (soap_shard.py). state_dict() is then collective (every rank calls it; rank 0 gets
  the full state), and a full state loads under any number of processes. It assumes every rank holds the same
  parameters (checked once); shard=False replicates the work instead.
- Launch overhead (`capture`, off by default): on CUDA each parameter group's non-refresh bucketed step is recorded
  once as a CUDA graph and replayed (soap_graph.py), equal to the eager step; refresh steps run the refresh eagerly.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.optim import Optimizer
from torch.profiler import record_function

from ..precision import full_fp32_matmul
from .common import (REFRESH_QR, closure_loss, eigh_descending, eigh_descending_batched, pack_symmetric, packed_size,
                     power_step_basis, unpack_symmetric)
from .soap_shard import Sharding, assign_owners, step_cost
from .soap_buckets import Bucket, rotation_units, updates_back
from .soap_graph import StepGraph


def merged_shape(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """Merge adjacent dimensions greedily while their product stays <= max_dim (dims of 1 are absorbed)."""
    out: list[int] = []
    for d in shape:
        if out and out[-1] * d <= max_dim:
            out[-1] *= d
        else:
            out.append(d)
    return tuple(out) or (1,)


def _rotation_plan(shape: tuple[int, ...], qs: list) -> list[tuple[int, int, int, torch.Tensor]]:
    """How to rotate a tensor of `shape` by the Q_i: a list of (pre, d, post, Q) acting on x.reshape(pre, d, post).

    Trailing small dimensions (a conv kernel's kh x kw) are merged into one step by the Kronecker product of their
    bases, Q_kh (x) Q_kw, which equals rotating them one by one; dimensions without a basis are skipped.
    """
    sizes, mats = list(shape), list(qs)
    merged = rotation_units(shape, [q is not None for q in qs])[-1]
    if len(merged) >= 2:
        j, k = merged[0], None
        for d, q in zip(sizes[j:], mats[j:]):
            if q is None:
                ref = next(m for m in mats[j:] if m is not None)
                q = torch.eye(d, dtype=ref.dtype, device=ref.device)
            # (contiguous: torch.kron raises a view error when one operand is a QR output, column-major, and the
            # other is not; found by tests/test_soap_buckets.py)
            k = q if k is None else torch.kron(k.contiguous(), q.contiguous())
        sizes, mats = sizes[:j] + [math.prod(sizes[j:])], mats[:j] + [k]
    return [(math.prod(sizes[:i]), sizes[i], math.prod(sizes[i + 1 :]), q) for i, q in enumerate(mats) if q is not None]


def _rotate(x: torch.Tensor, plan: list, back: bool = False) -> torch.Tensor:
    """Apply a rotation plan: Q_i^T along each dimension (into the eigenbasis), or Q_i with back=True.

    Matrix products on reshaped views: a left product for the first dimension, a right product for the last, and
    for a middle dimension one product on a transposed copy (faster on CPU than a broadcast batched product).
    """
    shape = x.shape
    for pre, d, post, q in plan:
        m = q if back else q.T  # applied to each vector along this dimension: y = m @ x
        if post == 1:
            x = x.reshape(pre, d) @ m.T
        elif pre == 1:
            x = m @ x.reshape(d, post)
        else:
            xt = x.reshape(pre, d, post).transpose(0, 1).reshape(d, pre * post)
            x = (m @ xt).reshape(d, pre, post).transpose(0, 1)
    return x.reshape(shape)


def project(x: torch.Tensor, qs: list, back: bool = False) -> torch.Tensor:
    """Rotate every dimension i of x by Q_i^T (into the eigenbasis) or, with back=True, by Q_i (out of it)."""
    return _rotate(x, _rotation_plan(tuple(x.shape), qs), back)


def _factor_update(f: torch.Tensor, g: torch.Tensor, i: int, beta: float) -> None:
    """f <- beta f + (1 - beta) G_(i) G_(i)^T, with G_(i) dimension i of g against all the others; f is the packed
    upper triangle (common.pack_symmetric)."""
    pre, d, post = math.prod(g.shape[:i]), g.shape[i], math.prod(g.shape[i + 1 :])
    if pre == 1:
        gi = g.reshape(d, post)
    elif post == 1:
        gi = g.reshape(pre, d).T
    else:
        gi = g.reshape(pre, d, post).transpose(0, 1).reshape(d, pre * post)
    f.mul_(beta).add_(pack_symmetric(gi @ gi.T), alpha=1 - beta)


def first_bases(states: list[dict]) -> None:
    """The first eigenbases of fresh states (their factors hold the first gradient; moments zero, no basis yet), by
    one batched eigh per factor size (common.eigh_descending_batched) instead of eigh_descending per factor: on a
    GPU a few host reads per size instead of three per factor (TCM-S: ~1,500 factors). A factor whose basis cannot
    be had keeps none (the next refresh tries eigh again), as in SOAP._refresh_basis."""
    by_size: dict = {}
    for st in states:
        for i, f in enumerate(st["GG"]):
            if f is not None:
                by_size.setdefault((f.shape[0], f.dtype, f.device), []).append((st, i))
    for items in by_size.values():
        q, ok = eigh_descending_batched(torch.stack([unpack_symmetric(st["GG"][i]) for st, i in items]))
        for (st, i), qi, good in zip(items, q.unbind(0), ok.tolist()):
            if good:
                st["Q"][i] = qi.clone()


def refresh_cost(shape: tuple[int, ...], factors: list) -> int:
    """A tensor's basis refresh in multiply-adds, roughly: a power-iteration product and a QR per factor (~2 d^3)
    and moving its first moment to the new bases (numel x sum of d)."""
    dims = [d for d, f in zip(shape, factors) if f is not None]
    return 2 * sum(d**3 for d in dims) + math.prod(shape) * sum(dims)


def assign_refresh_phases(units: list[tuple[list[dict], int]], frequency: int, load: list[int] | None = None) -> None:
    """Give each unit (the states refreshed together, their refresh cost) a phase in [0, frequency), stored in the
    states as "refresh_phase" (so it survives checkpoints): the costliest first, each to the phase with the least
    cost so far (`load`: the cost already on each phase). Units that already have one keep it and count towards
    their phase's load."""
    load = list(load) if load is not None else [0] * frequency
    fresh = []
    for states, cost in units:
        phase = states[0].get("refresh_phase")
        if phase is None:
            fresh.append((states, cost))
        else:
            load[phase % frequency] += cost
    for states, cost in sorted(fresh, key=lambda u: -u[1]):  # (stable: equal costs keep the parameter order)
        phase = min(range(frequency), key=lambda k: (load[k], k))
        load[phase] += cost
        for st in states:
            st["refresh_phase"] = phase


class SOAP(Optimizer):
    def __init__(
        self,
        params,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        bias_correction: bool = True,
        basis_refresh: str = "qr",
        semantics: str = "adam",
        batched: bool = True,
        stagger_refresh: bool = False,
        refresh_qr: str = "auto",
        shard: bool = True,
        capture: bool = False,
    ):
        if lr <= 0 or eps < 0 or weight_decay < 0:
            raise ValueError("SOAP needs lr > 0, eps >= 0, weight_decay >= 0")
        if not all(0 <= b < 1 for b in betas) or (shampoo_beta is not None and not 0 <= shampoo_beta < 1):
            raise ValueError("SOAP betas must be in [0, 1)")
        if precondition_frequency < 1:
            raise ValueError("precondition_frequency must be at least 1")
        if basis_refresh not in ("qr", "eigh"):
            raise ValueError("basis_refresh must be 'qr' (power iteration + QR, the default) or 'eigh' (exact)")
        if refresh_qr not in ("auto", *REFRESH_QR):
            raise ValueError(f"refresh_qr must be auto, {' or '.join(REFRESH_QR)}, got '{refresh_qr}'")
        if semantics not in ("adam", "authors"):
            raise ValueError("semantics must be 'adam' (torch.optim.Adam's first step and epsilon, the default) or "
                             "'authors' (the SOAP authors' code)")
        defaults = dict(
            lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
            precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim, merge_dims=merge_dims,
            precondition_1d=precondition_1d, bias_correction=bias_correction, basis_refresh=basis_refresh,
            semantics=semantics, stagger_refresh=stagger_refresh, refresh_qr=refresh_qr,
        )
        super().__init__(params, defaults)
        self.check_finite = True  # see step()
        self.batched = batched  # rotate and accumulate same-shape tensors together (same results to fp32 rounding)
        self._plans: dict = {}  # per-tensor rotation plans (batched=False)
        self._buckets: dict = {}  # per param group: (its parameters with a gradient, their buckets)
        self.shard = shard  # share the work out over data-parallel ranks (soap_shard.py) when there are several
        self._sharding: tuple | None = None  # (the parameters' ids it was built for, soap_shard.Sharding)
        self._prune = False  # a loaded state dict holds every parameter's state: drop the other ranks' share
        self.capture = capture  # replay the non-refresh step as a CUDA graph (soap_graph.py; batched path)
        self._graphs: dict = {}  # per param group: its soap_graph.StepGraph

    # ---- shapes and state ----------------------------------------------------------------------------------------
    @staticmethod
    def _work_shape(p: torch.Tensor, group: dict) -> tuple[int, ...]:
        shape = tuple(p.shape) or (1,)
        if group["merge_dims"] and len(shape) > 1:
            shape = merged_shape(shape, group["max_precond_dim"])
        return shape

    @staticmethod
    def _factor_dtype(p: torch.Tensor) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def _fresh_state(self, p: torch.Tensor, group: dict) -> dict:
        """A new, unstored state for p: zero moments and factors, no basis yet."""
        shape = self._work_shape(p, group)
        dtype = self._factor_dtype(p)
        precondition = len(shape) > 1 or group["precondition_1d"]
        factors = [
            torch.zeros(packed_size(d), dtype=dtype, device=p.device)
            if precondition and 1 < d <= group["max_precond_dim"] else None
            for d in shape
        ]
        return {
            "step": 0,
            "exp_avg": torch.zeros(shape, dtype=dtype, device=p.device),  # in the rotated space
            "exp_avg_sq": torch.zeros(shape, dtype=dtype, device=p.device),
            "GG": factors,
            "Q": [None] * len(shape),
        }

    # ---- the pieces of a step ------------------------------------------------------------------------------------
    @staticmethod
    def _accumulate_factors(state: dict, g: torch.Tensor, beta: float) -> None:
        for i, f in enumerate(state["GG"]):
            if f is not None:
                _factor_update(f, g, i, beta)

    @staticmethod
    def _refresh_basis(state: dict, exact: bool, qr: str = "householder") -> None:
        """New eigenbases: eigh (first time, or exact=True) or one power-iteration step + QR."""
        old = list(state["Q"])
        m_orig = project(state["exp_avg"], old, back=True) if any(q is not None for q in old) else state["exp_avg"]
        v = state["exp_avg_sq"]
        new = list(old)
        for i, f in enumerate(state["GG"]):
            if f is None:
                continue
            f = unpack_symmetric(f)
            if exact or old[i] is None:
                q = eigh_descending(f)
            else:
                q = None
                scale = f.abs().max()
                if torch.isfinite(scale) and scale > 0:
                    fs = f / scale  # as in eigh: keep fp32 away from underflow
                    est = (old[i] * (fs @ old[i])).sum(0)  # diag(Q^T F Q): current eigenvalue estimates
                    order = torch.argsort(est, descending=True)
                    q, failed = power_step_basis(fs[None], old[i][:, order][None], qr)
                    if bool(failed[0]):
                        q = None
                    else:
                        q = q[0]
                        v = v.index_select(i, order)
            if q is not None:
                new[i] = q
        state["Q"] = new
        state["exp_avg_sq"] = v
        state["exp_avg"] = project(m_orig, new) if any(q is not None for q in new) else m_orig

    # ---- public API ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("SOAP does not support sparse gradients")
        if not grads:
            return loss
        # One check for all tensors: a non-finite gradient must reach neither the factors, the moments nor the weights.
        # It reads a flag from the device (a synchronisation); lictrain's trainer checks before calling and turns it
        # off (check_finite = False).
        if self.check_finite and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
            return loss
        sharding = self._sharding_now()
        # Factors, bases and rotations in full precision even when the caller runs under autocast or enabled TF32.
        with torch.autocast(device_type=grads[0].device.type, enabled=False), full_fp32_matmul():
            for group in self.param_groups:
                self._step_group(group, sharding)
        if sharding is not None:  # every rank gets every updated parameter from its owner
            with record_function("soap.all_gather"):
                sharding.share_({i: p for i, p in enumerate(sharding.params) if p.grad is not None})
        return loss

    # ---- sharding over data-parallel ranks (soap_shard.py) -------------------------------------------------------
    def _sharding_now(self) -> Sharding | None:
        """The ranks' shares of the parameters, when torch.distributed runs with several ranks and `shard` is on.
        Built once (every rank calls: it checks that the ranks hold the same parameters), rebuilt if the parameters
        change; a state loaded since is pruned to this rank's share."""
        if not self.shard or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
            return None
        params = [p for group in self.param_groups for p in group["params"]]
        key = tuple(id(p) for p in params)
        if self._sharding is None or self._sharding[0] != key:
            if self._sharding is not None and self.state:
                # new owners would start the moved parameters' state afresh (their old owner holds it)
                raise RuntimeError("sharded SOAP's parameters changed after it took steps; build a new optimizer (or "
                                   "load a state dict into one) instead of adding parameters to this one")
            world, rank = dist.get_world_size(), dist.get_rank()
            signature = [(tuple(p.shape), str(p.dtype)) for p in params]
            gathered = [None] * world
            dist.all_gather_object(gathered, signature)
            if any(g != signature for g in gathered):
                raise RuntimeError("sharded SOAP needs the same parameters on every rank (data parallel); pass "
                                   "shard=False for other layouts")
            units: dict = {}
            i = 0
            for gi, group in enumerate(self.param_groups):
                for p in group["params"]:
                    shape = self._work_shape(p, group)
                    precondition = len(shape) > 1 or group["precondition_1d"]
                    dims = tuple(d for d in shape if precondition and 1 < d <= group["max_precond_dim"])
                    unit = units.setdefault((gi, shape, p.dtype, dims), ([], step_cost(
                        shape, list(dims), group["precondition_frequency"])))
                    unit[0].append(i)
                    i += 1
            owner = assign_owners(list(units.values()), world)
            self._sharding = (key, Sharding(params, owner, rank, world))
            self._prune = True
            self._buckets.clear()
        sharding = self._sharding[1]
        if self._prune:
            for p in params:
                if not sharding.owns(p):
                    self.state.pop(p, None)
            self._prune = False
        return sharding

    def state_dict(self) -> dict:
        """torch's state dict; sharded, every rank must call it and rank 0 gets every rank's state (a checkpoint
        holds the full state whatever the number of processes, and loads under any other)."""
        sd = super().state_dict()
        sharding = self._sharding_now()
        if sharding is not None:
            sd["state"] = sharding.gather_state(sd["state"])
        return sd

    def _plan(self, p: torch.Tensor, state: dict) -> list:
        """The rotation plan of p's current bases, cached until the bases change (not part of the state dict)."""
        key = (id(p), tuple(id(q) for q in state["Q"]))
        plan = self._plans.get(id(p))
        if plan is None or plan[0] != key:  # the bases are kept alive with the plan: a freed id can be reused
            plan = (key, _rotation_plan(tuple(state["exp_avg"].shape), state["Q"]), list(state["Q"]))
            self._plans[id(p)] = plan
        return plan[1]

    def _step_group(self, group: dict, sharding: Sharding | None = None) -> None:
        b1, b2 = group["betas"]
        shampoo_beta = b2 if group["shampoo_beta"] is None else group["shampoo_beta"]
        authors = group.get("semantics", "adam") == "authors"
        params, states, first = [], [], []
        for p in group["params"]:
            if p.grad is None or (sharding is not None and not sharding.owns(p)):
                continue
            state = self.state[p]
            fresh = not state
            if fresh:
                state.update(self._fresh_state(p, group))
                if any(f is not None for f in state["GG"]):
                    g = p.grad.reshape(state["exp_avg"].shape).to(state["exp_avg"].dtype)
                    self._accumulate_factors(state, g, shampoo_beta)
                    if self.batched:
                        first.append(state)
                    else:
                        self._refresh_basis(state, exact=True)
                if authors:  # the authors' first call only sets up the factors and the basis
                    continue
            state["step"] += 1
            params.append(p)
            states.append(state)
        if first:
            first_bases(first)
        if not params:
            return
        step = self._step_buckets if self.batched else self._step_per_tensor
        step(group, params, states, shampoo_beta, authors)

    def _apply(self, group: dict, params: list, updates: list, authors: bool) -> None:
        """Weight decay (decoupled, before the update as AdamW; after it with the authors' semantics) and the step."""
        decay = 1 - group["lr"] * group["weight_decay"]
        if group["weight_decay"] and not authors:
            torch._foreach_mul_(params, decay)
        torch._foreach_sub_(params, updates)
        if group["weight_decay"] and authors:
            torch._foreach_mul_(params, decay)

    def _step_buckets(self, group: dict, params: list, states: list, shampoo_beta: float, authors: bool) -> None:
        """Same-shape tensors together (soap_buckets.py): one batched product per dimension for the rotations, the
        factor updates riding on the rotation of the gradient, the elementwise Adam arithmetic over the stacks.
        (The parts are named for torch.profiler: soap.rotate_in, soap.adam, soap.rotate_out, soap.refresh; with
        capture, soap.graph_step for the first three.)"""
        buckets = self._bucket_list(group, params, states)
        for b in buckets:
            b.step = self.state[b.params[0]]["step"]
        graph = self._graph(group, buckets, shampoo_beta, authors) if self.capture else None
        if graph is not None:
            with record_function("soap.graph_step"):
                graph.step(group, shampoo_beta, authors)
        else:
            self._eager_bucket_step(group, buckets, shampoo_beta, authors)
        with record_function("soap.refresh"):
            for b in buckets:
                if b.preconditioned and self._refreshes(group, b.step, self.state[b.params[0]]):
                    b.refresh(exact=group["basis_refresh"] == "eigh", qr=self._qr(group, b.m.device))

    def _graph(self, group: dict, buckets: list[Bucket], shampoo_beta: float, authors: bool) -> StepGraph | None:
        """The group's captured step, when it can take this one: every tensor past its first step (its factors
        take the gradient), the same buckets and hyperparameters as when it was made (else a new one)."""
        if not all(b.step > 1 for b in buckets) and not authors:
            return None
        key = (tuple(group["betas"]), group["eps"], group["weight_decay"], shampoo_beta, authors,
               group["bias_correction"])
        graph = self._graphs.get(id(group))
        if graph is None or graph.buckets is not buckets or graph.key != key:
            graph = self._graphs[id(group)] = StepGraph(buckets, key)
        return graph

    def _eager_bucket_step(self, group: dict, buckets: list[Bucket], shampoo_beta: float, authors: bool) -> None:
        b1, b2 = group["betas"]
        g_rots = []
        with record_function("soap.rotate_in"):  # the gradients into the eigenbases, the factors updated
            for b in buckets:
                g = torch.stack([p.grad.reshape(b.shape) for p in b.params]).to(b.m.dtype)
                # (a tensor's first gradient went into its factors when they were created, except with the authors'
                # semantics, whose first call only initialised)
                beta = shampoo_beta if b.step > 1 or authors else None
                g_rots.append(b.rotate(g, accumulate=beta) if b.preconditioned else g)
        with record_function("soap.adam"):
            ms, vs = [b.m for b in buckets], [b.v for b in buckets]
            torch._foreach_lerp_(ms, g_rots, 1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, g_rots, g_rots, value=1 - b2)
            directions = self._directions([{"step": b.step} for b in buckets], group, ms, vs)
        with record_function("soap.rotate_out"):  # the updates back, applied
            self._apply(group, *updates_back(buckets, directions), authors)

    def _bucket_list(self, group: dict, params: list, states: list) -> list[Bucket]:
        """The group's buckets, rebuilt (stacking the per-parameter state) when the parameters with a gradient,
        their step counts or their state objects (load_state_dict) changed."""
        cached = self._buckets.get(id(group))
        if (cached is not None and len(cached[0]) == len(params) and all(a is b for a, b in zip(cached[0], params))
                and all(b.still_holds([self.state[p] for p in b.params]) for b in cached[1])):
            return cached[1]
        by: dict = {}
        stagger = bool(group.get("stagger_refresh"))
        for p, st in zip(params, states):
            by.setdefault(Bucket.key(st, stagger), []).append((p, st))
        buckets = [Bucket([p for p, _ in items], [st for _, st in items]) for items in by.values()]
        for b in buckets:  # updates need no reshape or cast (merge_dims off, fp32 parameters)
            b.plain = all(tuple(p.shape) == b.shape and p.dtype == b.m.dtype for p in b.params)
        if stagger:
            units = [([self.state[p] for p in b.params], b.n * refresh_cost(b.shape, b.gg)) for b in buckets
                     if b.preconditioned]
            assign_refresh_phases(units, group["precondition_frequency"], self._phase_load(group))
        self._buckets[id(group)] = (list(params), buckets)
        return buckets

    def _step_per_tensor(self, group: dict, params: list, states: list, shampoo_beta: float, authors: bool) -> None:
        """One tensor at a time (batched=False): the reference the bucketed path is tested against."""
        b1, b2 = group["betas"]
        preconditioned = [st for st in states if any(f is not None for f in st["GG"])]
        # (only when a tensor has no phase yet, not every step; the phased ones count towards the load)
        if group.get("stagger_refresh") and any("refresh_phase" not in st for st in preconditioned):
            assign_refresh_phases([([st], refresh_cost(st["exp_avg"].shape, st["GG"])) for st in preconditioned],
                                  group["precondition_frequency"], self._phase_load(group))
        grads = [p.grad.reshape(st["exp_avg"].shape).to(st["exp_avg"].dtype) for p, st in zip(params, states)]
        g_rots = [self._rotate_one(p, st, g) for p, st, g in zip(params, states, grads)]
        ms, vs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        torch._foreach_lerp_(ms, g_rots, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, g_rots, g_rots, value=1 - b2)
        directions = self._directions(states, group, ms, vs)
        updates = [self._rotate_one(p, st, d, back=True).reshape(p.shape).to(p.dtype)
                   for p, st, d in zip(params, states, directions)]
        self._apply(group, params, updates, authors)
        for p, st, g in zip(params, states, grads):
            if st["step"] > 1 or authors:
                self._accumulate_factors(st, g, shampoo_beta)
            if any(f is not None for f in st["GG"]) and self._refreshes(group, st["step"], st):
                self._refresh_basis(st, exact=group["basis_refresh"] == "eigh", qr=self._qr(group, g.device))

    @staticmethod
    def _qr(group: dict, device: torch.device) -> str:
        """How the refresh orthonormalises (common.power_step_basis). auto: CholeskyQR2 on CUDA (batched kernels
        where Householder QR runs one matrix at a time), Householder on the CPU (faster there: benchmarks/RESULTS.md,
        "SOAP's basis refresh: Householder vs CholeskyQR2")."""
        qr = group.get("refresh_qr", "auto")
        if qr == "auto":
            return "cholesky" if device.type == "cuda" else "householder"
        return qr

    @staticmethod
    def _refreshes(group: dict, step: int, state: dict) -> bool:
        """Whether a tensor's bases are refreshed after this step: at multiples of the frequency (the authors'
        schedule), or, with stagger_refresh, at the steps of its own phase (taken modulo the frequency, which a
        user may have lowered since the phase was given)."""
        frequency = group["precondition_frequency"]
        phase = state.get("refresh_phase", 0) % frequency if group.get("stagger_refresh") else 0
        return step % frequency == phase

    def _phase_load(self, group: dict) -> list[int]:
        """Refresh cost per phase of the other parameter groups' tensors that already have a phase, so that the
        groups' refreshes are spread together (each group's costliest bucket would otherwise land on phase 0)."""
        frequency, load = group["precondition_frequency"], [0] * group["precondition_frequency"]
        mine = {id(p) for p in group["params"]}
        for other in self.param_groups:
            for p in other["params"]:
                st = self.state.get(p)
                if id(p) not in mine and st and st.get("refresh_phase") is not None:
                    load[st["refresh_phase"] % frequency] += refresh_cost(st["exp_avg"].shape, st["GG"])
        return load

    def _rotate_one(self, p: torch.Tensor, state: dict, x: torch.Tensor, back: bool = False) -> torch.Tensor:
        plan = self._plan(p, state)
        return _rotate(x, plan, back) if plan else x

    @staticmethod
    def _directions(states: list, group: dict, ms: list, vs: list) -> list:
        """Adam's step in the rotated space, m_hat / (sqrt(v_hat) + eps) * lr, in torch.optim.Adam's order of
        operations (so that without preconditioning SOAP is bit-identical to it); with the authors' semantics
        m / (sqrt(v) + eps) * lr * sqrt(1 - b2^t) / (1 - b1^t)."""
        b1, b2 = group["betas"]
        steps = [st["step"] for st in states]
        bc1 = [1 - b1**t if group["bias_correction"] else 1.0 for t in steps]
        bc2 = [(1 - b2**t) ** 0.5 if group["bias_correction"] else 1.0 for t in steps]
        denom = torch._foreach_sqrt(vs)
        if group.get("semantics", "adam") == "authors":
            torch._foreach_add_(denom, group["eps"])
            updates = torch._foreach_mul(ms, [group["lr"] * c2 / c1 for c1, c2 in zip(bc1, bc2)])
        else:
            torch._foreach_div_(denom, bc2)
            torch._foreach_add_(denom, group["eps"])
            updates = torch._foreach_mul(ms, [group["lr"] / c for c in bc1])
        torch._foreach_div_(updates, denom)
        return list(updates)

    @torch.no_grad()
    def precondition(self, grads: list[torch.Tensor | None], parts: list[list[torch.Tensor]] | None = None):
        """The update step() would apply (as a tensor to add to the parameter) if these were the gradients.

        Side-effect free: moments, factors and bases are read, never written. Parameters without state yet use
        the basis of the factors their gradient would create. Weight decay is included. `grads` follows the order
        of the parameters over all groups; None gives None.

        With `parts` (lists of gradients laid out like `grads`, e.g. the rate and distortion gradients whose sum
        is `grads`), also returns, per part, the gradient-driven share of that update: the part's contribution to
        the new first moment, preconditioned with the basis and the second moments the step would use. It is
        linear in the part, so the parts' shares add up to the update minus its momentum (and decay) share.
        """
        params = [p for group in self.param_groups for p in group["params"]]
        if len(grads) != len(params):
            raise ValueError(f"precondition got {len(grads)} gradients for {len(params)} parameters")
        device_type = next((g.device.type for g in grads if g is not None), "cpu")
        sharding = self._sharding_now()  # sharded: each rank its own parameters, then shared (every rank calls)
        with torch.autocast(device_type=device_type, enabled=False), full_fp32_matmul():  # as step()
            result = self._precondition(params, grads, parts, sharding)
        if sharding is not None:
            for tensors in [result[0], *result[1]] if parts is not None else [result]:
                sharding.share_({i: t for i, t in enumerate(tensors) if t is not None})
        return result

    def _precondition(self, params: list, grads: list, parts: list | None, sharding: Sharding | None = None):
        groups = [group for group in self.param_groups for _ in group["params"]]
        out: list[torch.Tensor | None] = []
        shares: list[list[torch.Tensor | None]] = [[] for _ in (parts or [])]
        for i, (p, grad, group) in enumerate(zip(params, grads, groups)):
            if grad is None:
                out.append(None)
                for sh in shares:
                    sh.append(None)
                continue
            if sharding is not None and not sharding.owns(p):  # (its owner's values arrive afterwards)
                out.append(torch.zeros_like(p))
                for sh in shares:
                    sh.append(torch.zeros_like(p))
                continue
            b1, b2 = group["betas"]
            shampoo_beta = b2 if group["shampoo_beta"] is None else group["shampoo_beta"]
            real = self.state.get(p)
            authors = group.get("semantics", "adam") == "authors"
            if not real and authors:  # the authors' first call only initialises: no update
                out.append(torch.zeros_like(p))
                for sh in shares:
                    sh.append(torch.zeros_like(p))
                continue
            if real and (real["step"] > 0 or authors):
                state = {"Q": real["Q"], "exp_avg": real["exp_avg"], "exp_avg_sq": real["exp_avg_sq"]}
                t = real["step"] + 1
            else:
                state = self._fresh_state(p, group)
                g0 = grad.reshape(state["exp_avg"].shape).to(state["exp_avg"].dtype)
                self._accumulate_factors(state, g0, shampoo_beta)
                self._refresh_basis(state, exact=True)
                t = 1
            g = grad.reshape(state["exp_avg"].shape).to(state["exp_avg"].dtype)
            g_rot = project(g, state["Q"])
            m = torch.lerp(state["exp_avg"], g_rot, 1 - b1)
            v = state["exp_avg_sq"] * b2 + (1 - b2) * g_rot * g_rot
            (direction,) = self._directions([{"step": t}], group, [m], [v])
            update = -project(direction, state["Q"], back=True).reshape(p.shape)
            if group["weight_decay"]:  # authors: (p + update)(1 - lr wd) - p; ours: p(1 - lr wd) + update - p
                decayed = p.to(update.dtype) + (update if authors else 0)
                update = update - group["lr"] * group["weight_decay"] * decayed
            out.append(update.to(p.dtype))
            # with the authors' decay after the update, every share of the update is scaled by (1 - lr wd) too
            share_scale = 1 - group["lr"] * group["weight_decay"] if authors else 1.0
            for sh, part in zip(shares, parts or []):
                x_rot = project(part[i].reshape(g.shape).to(g.dtype), state["Q"]) * (1 - b1)
                (d,) = self._directions([{"step": t}], group, [x_rot], [v])
                sh.append(-share_scale * project(d, state["Q"], back=True).reshape(p.shape).to(p.dtype))
        return (out, shares) if parts is not None else out

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded state to each parameter's dtype (bf16 would round the factors and bases); put back the
        # saved fp32 (or fp64) tensors, on the parameter's device.
        originals = dict(state_dict["state"])
        super().load_state_dict(state_dict)
        self._plans.clear()
        self._buckets.clear()
        self._prune = True
        indices = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(indices, params):
            if i not in originals or p not in self.state:
                continue
            saved, state, dtype = originals[i], self.state[p], self._factor_dtype(p)
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:
                    state[key] = saved[key].to(device=p.device, dtype=dtype)
            for key in ("GG", "Q"):
                if key in saved:
                    state[key] = [None if t is None else t.to(device=p.device, dtype=dtype) for t in saved[key]]
            if "GG" in state:  # checkpoints from before the factors were packed hold full d x d matrices
                state["GG"] = [pack_symmetric(f) if f is not None and f.dim() == 2 else f for f in state["GG"]]
