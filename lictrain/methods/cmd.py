"""CMD-LIC's STDET (Zhang, Duan, Huang, Zhu, TMLR 2025, Section 3.2 and Algorithm 1): parameters grouped into
correlated modes, stable ones embedded as affine functions of their mode's reference parameter and frozen.

Schedule. The paper counts in epochs of a large data set (~7.4k steps each); lictrain ties every event to the
run's own budget B = train.steps instead (`schedule: budget`, the default), keeping the paper's proportions:

  from scratch (`preset: scratch`)   the paper trains 70 epochs where Adam trains 120 (Section 4.1): F = 20 of 70
      epochs of head stage (head_fraction 20/70 = 0.286, Table 11 / A.8), then P = 1% embedded per epoch (L = 1)
      for 50 epochs, 50% at the end. Here: `head_snapshots` = 20 trajectory samples evenly over the head stage
      (the paper's one per epoch), then `embed_events` = 50 embedding events (P = 1% each, so 50%) evenly between
      the head stage's end and `embed_end` = 0.9 B (ours: the last 10% anneals without embedding or resets).
  fine-tuning (`preset: finetune`)   the paper fine-tunes 50 epochs where Adam fine-tunes 80, with F = 10: head
      fraction 10/50, 40 events of 1% (40%).
The shortened budget itself (70/120 or 50/80 of the baseline's steps) is the run's train.steps (or `budget_steps`):
see configs/bench-cmd.yaml. The schedule is fixed when the run starts and kept on resume. `schedule: epochs` keeps
the fixed-length epochs (`epoch_steps`, `head_epochs`, `period`) of lictrain's first version. Every trainable
coordinate is one trajectory w_i(t), sampled at the head-stage events.

Step 1 (once, at the end of the head stage): for M in `modes` (S = `samples_per_mode` * M trajectories, at most
`max_samples`, sampled uniformly): |corr| matrix of the sample, complete-linkage ("farthest point") hierarchical
clustering into M modes on the distance 1 - |corr| (SciPy), per mode the reference = the member with the highest
mean |corr| to its mode's other members; every trajectory joins the reference it correlates with most (|corr|);
(k_i, d_i) by least squares (Eq. 4). The instant CMD model (every w_i replaced by k_i w_m(F) + d_i) is evaluated
on the sampled images; the search stops at the first M whose R-D loss changed by less than `saturation` (relative,
1%: ours) from the previous M's and keeps that M (Algorithm 1, 3(i)); otherwise the last M (the cap).
Step 2 (once): each layer (module) is perturbed by Gaussian noise of std `perturb_std` * max|w| of the layer, and
the loss increase measured on the sampled images: the R-D loss for layers of g_a / g_s, the rate alone for all
other layers (they only shape the entropy model). The top half of the g_a/g_s layers and the top half of the other
layers are the sensitive layers; within them the top half of the parameters by |w| * |E[dL/dw]| (Eq. 5) are not
embeddable; all other non-reference parameters are (75% when the sensitive layers hold half of the parameters).
Step 3 (every event after the head stage): (k_i, d_i) by the recursive least-squares update of Eq. 6 (equal to the
batch fit on all samples so far); embedded coefficients stay fixed.
Step 4 (every embedding event): c_i = |(k_i, d_i)(t) - (k_i, d_i)(t - L)| (Eq. 7); the `embed_percent` = P% (of
all trainable coordinates) most stable embeddable ones are embedded for good: w_i = k_i w_ref(t) + d_i from then
on, their gradients zeroed before every optimizer step and their values re-imposed after it; dummy embedding resets
the next min(t * P / 2 %, `dummy_cap` %) most stable ones to their affine value without freezing (t = epochs since
the start of training; at budget event j, t = F + j in the preset's paper epochs), and (ours) never more than
half of the embeddable coordinates still left: otherwise, late in a run, every remaining one is reset every event
(what made the first version's validation loss rise after ~2400 steps, benchmarks/RESULTS.md).
Gate (ours): after Step 1 the instant CMD model's loss is logged against the true loss on the same images; when it is
more than `max_instant_gap` (10%) worse, the decomposition does not describe the network and nothing is embedded
(the run continues as Adam + SMA).

Decisions are computed on rank 0's data and broadcast, so every process of a torchrun job embeds the same
coordinates. Memory: the head-stage trajectories are N x F values on the CPU (float32, or float16 beyond
`trajectory_mb`); after Step 1 they are dropped and K, D, the previous K, D (for Eq. 7), the mode of each
coordinate and two masks remain (the paper's Appendix A.5).
Optimizer state: for torch's Adam/AdamW/SGD the moments of an embedded coordinate are zeroed when it is embedded
and, its gradient being zero from then on, stay zero, so the optimizer neither moves it nor drifts its state. For
SOAP (moments in a rotated basis) the values are re-imposed after each step. Embedding is element-wise inside
tensors, so it removes no optimizer work until a whole tensor is embedded: such tensors get requires_grad False
(no weight-gradient computation, skipped by the optimizer).
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, fields

import numpy as np
import torch

from ..errors import LictrainError
from ..optim import unwrap
from ..registry import register_method
from .base import Method, RunContext, StepContext
from .cmd_modes import (decompose, gram, layer_sensitivity, main_prefixes, parameter_saliency, rls_update,
                        sample_loss, sensitive_layers, tensors_by_layer)


# ---- the schedule: when each step of the algorithm happens ----------------------------------------------------

# The paper's proportions (Section 4.1, Table 11, Appendix A.8): head-stage fraction of the run, head-stage length F
# in epochs (for the dummy percentage t * P / 2), embedding events (one per epoch after F, L = 1).
PRESETS = {
    "scratch": dict(head_fraction=20 / 70, paper_head_epochs=20, embed_events=50),
    "finetune": dict(head_fraction=10 / 50, paper_head_epochs=10, embed_events=40),
}


@dataclass(frozen=True)
class Event:
    step: int  # happens once this many optimizer steps are done
    kind: str  # "record" (a head-stage trajectory sample; the last one also decomposes), "update" (Step 3) or
    #            "embed" (Steps 3 and 4)
    epoch: float  # the paper's epoch count t at this event (dummy embedding resets t * P / 2 %)


def budget_schedule(total: int, head_fraction: float, head_snapshots: int, embed_events: int, embed_end: float,
                    paper_head_epochs: int) -> list[Event]:
    """Events as fractions of a run of `total` steps: `head_snapshots` samples evenly over the first
    head_fraction * total steps (the last one decomposes), then `embed_events` embedding events evenly up to
    embed_end * total."""
    head = max(head_snapshots, round(total * head_fraction))
    events = [Event(round(head * i / head_snapshots), "record", paper_head_epochs * i / head_snapshots)
              for i in range(1, head_snapshots + 1)]
    stop = round(total * embed_end)
    if stop > head:
        events += [Event(round(head + (stop - head) * j / embed_events), "embed", paper_head_epochs + j)
                   for j in range(1, embed_events + 1)]
    return events


def epoch_schedule(total: int, epoch_steps: int, head_epochs: int, period: int) -> list[Event]:
    """lictrain's first schedule: fixed epochs of `epoch_steps`, F = head_epochs, embedding every `period` epochs."""
    events = [Event(e * epoch_steps, "record", e) for e in range(1, head_epochs + 1)]
    e = head_epochs + 1
    while e * epoch_steps <= total:
        events.append(Event(e * epoch_steps, "embed" if (e - head_epochs) % period == 0 else "update", e))
        e += 1
    return events


@dataclass(frozen=True)
class BudgetSchedule:
    """`schedule: budget` (the default): events as fractions of the run's budget in the preset's proportions."""
    preset: str = "scratch"
    head_snapshots: int = 20
    embed_end: float = 0.9
    head_fraction: float | None = None  # None: the preset's
    embed_events: int | None = None  # None: the preset's

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise LictrainError(f"cmd-lic: preset must be one of {', '.join(PRESETS)}, got '{self.preset}'")
        if self.head_snapshots < 2 or not 0 < self.embed_end <= 1 or \
                (self.embed_events is not None and self.embed_events < 1) or \
                (self.head_fraction is not None and not 0 < self.head_fraction < 1):
            raise LictrainError("cmd-lic needs head_snapshots >= 2, embed_end in (0, 1], embed_events >= 1 and "
                                "head_fraction in (0, 1)")

    @property
    def values(self) -> dict:
        """The preset's proportions with this run's overrides."""
        v = dict(PRESETS[self.preset])
        if self.head_fraction is not None:
            v["head_fraction"] = self.head_fraction
        if self.embed_events is not None:
            v["embed_events"] = self.embed_events
        return v

    def events(self, total: int) -> list[Event]:
        v = self.values
        return budget_schedule(total, v["head_fraction"], self.head_snapshots, v["embed_events"], self.embed_end,
                               v["paper_head_epochs"])

    def too_short(self, total: int) -> str:
        return (f"cmd-lic: {total} steps are too few for its schedule ({self.head_snapshots} head-stage samples and "
                f"{self.values['embed_events']} embedding events need distinct steps): train longer, or lower "
                "head_snapshots / embed_events")


@dataclass(frozen=True)
class EpochSchedule:
    """`schedule: epochs`: lictrain's first version, fixed epochs of `epoch_steps`."""
    epoch_steps: int = 100
    head_epochs: int = 10
    period: int = 1

    def __post_init__(self):
        if self.epoch_steps < 1 or self.head_epochs < 2 or self.period < 1:
            raise LictrainError("cmd-lic's epochs schedule needs epoch_steps >= 1, head_epochs >= 2 (a trajectory "
                                "needs two points) and period >= 1")

    def events(self, total: int) -> list[Event]:
        return epoch_schedule(total, self.epoch_steps, self.head_epochs, self.period)

    def too_short(self, total: int) -> str:
        return f"cmd-lic: {total} steps are too few for its epochs schedule: lower epoch_steps"


SCHEDULES = {"budget": BudgetSchedule, "epochs": EpochSchedule}


def build_schedule(name: str, options: dict) -> BudgetSchedule | EpochSchedule:
    """The schedule family `name` from its own options; an option of the other family is named as such."""
    if name not in SCHEDULES:
        raise LictrainError(f"cmd-lic: schedule must be {' or '.join(SCHEDULES)}, got '{name}'")
    cls = SCHEDULES[name]
    own = {f.name for f in fields(cls)}
    for key in options:
        if key not in own:
            other = [n for n, c in SCHEDULES.items() if key in {f.name for f in fields(c)}]
            if not other:
                valid = sorted(set(inspect.signature(CMDLIC).parameters) - {"schedule_options"} | own)
                raise LictrainError(f"method 'cmd-lic' has no option {key}; valid options: {', '.join(valid)}")
            raise LictrainError(f"cmd-lic: '{key}' belongs to schedule: {other[0]}, and this run's schedule is {name} "
                                f"(its options: {', '.join(sorted(own))})")
    return cls(**options)


# ---- the method -------------------------------------------------------------------------------------------------

def _zero_moments(optimizer, p: torch.Tensor, idx: torch.Tensor) -> None:
    """Zero the coordinate-wise optimizer state of p at flat positions idx: the buffers its record names
    (OptimizerSpec.coordinate_state: Adam's moments, SGD's momentum, ...). An optimizer without any (SOAP: its
    moments live in a rotated basis, coordinates do not map) keeps its state; the values are re-imposed."""
    base, spec = unwrap(optimizer)
    state = base.state.get(p)
    if spec is None or not spec.coordinate_state or not state:
        return
    for key in spec.coordinate_state:
        buf = state.get(key)
        if isinstance(buf, torch.Tensor) and buf.shape == p.shape:
            buf.view(-1)[idx] = 0


@register_method("cmd-lic")
class CMDLIC(Method):
    """STDET (see the module docstring). Use with the SMA wrapper (`adam+sma`): recipe `cmd-lic`."""

    name = "cmd-lic"

    def __init__(self, schedule: str = "budget", budget_steps: int | None = None,
                 modes: list | tuple = (10, 30, 50, 100), samples_per_mode: int = 200, max_samples: int = 10000,
                 embed_percent: float = 1.0, dummy: bool = True, dummy_cap: float = 25.0,
                 dummy_left_fraction: float = 0.5, max_instant_gap: float = 0.1, perturb_std: float = 0.1,
                 sensitivity_images: int = 16, saturation: float = 0.01, trajectory_mb: int = 2048, seed: int = 0,
                 **schedule_options):
        """Options of STDET itself by name; `schedule` names the family (BudgetSchedule or EpochSchedule) whose
        fields the remaining options set, e.g. {schedule: budget, preset: finetune} or {schedule: epochs,
        epoch_steps: 50}."""
        self.schedule = build_schedule(schedule, schedule_options)
        if not isinstance(modes, (list, tuple)) or not all(isinstance(m, int) and m >= 1 for m in modes):
            raise LictrainError(f"cmd-lic: modes must be a list of positive integers, e.g. [10, 30, 50], got {modes!r}")
        if not modes or samples_per_mode < 1 or max_samples < 2:
            raise LictrainError("cmd-lic needs samples_per_mode >= 1, max_samples >= 2 and at least one value in "
                                "modes")
        if not 0 <= embed_percent <= 100 or not 0 <= dummy_cap <= 100 or perturb_std <= 0 or sensitivity_images < 1 \
                or not 0 <= dummy_left_fraction <= 1 or max_instant_gap < 0:
            raise LictrainError("cmd-lic needs embed_percent and dummy_cap in [0, 100], dummy_left_fraction in [0, 1], "
                                "max_instant_gap >= 0, perturb_std > 0, sensitivity_images >= 1")
        if budget_steps is not None and budget_steps < 1:
            raise LictrainError("cmd-lic needs budget_steps >= 1 (or unset: the run's train.steps)")
        self.budget_steps = budget_steps
        self.modes = sorted(int(m) for m in modes)
        self.samples_per_mode, self.max_samples = samples_per_mode, max_samples
        self.embed_percent, self.dummy, self.dummy_cap = embed_percent, dummy, dummy_cap
        self.dummy_left_fraction, self.max_instant_gap = dummy_left_fraction, max_instant_gap
        self.perturb_std = perturb_std
        self.sensitivity_images, self.saturation = sensitivity_images, saturation
        self.trajectory_mb, self.seed = trajectory_mb, seed
        self.events: list[Event] = []
        self.done = 0  # events handled so far
        self.trajectories: list[torch.Tensor] = []
        self.images: list[torch.Tensor] = []
        self.decomposed = False
        self.embedding_off = False
        self.overhead = 0.0
        self.chosen_modes = 0

    # -- bookkeeping over the flat parameter vector --
    def attach(self, run: RunContext) -> None:
        super().attach(run)
        self.model, self.optimizer, self.params = run.model, run.optimizer, list(run.params)
        self.named = [(n, p) for n, p in self.model.named_parameters() if any(p is q for q in self.params)]
        self.offsets = np.cumsum([0] + [p.numel() for p in self.params])
        self.n = int(self.offsets[-1])
        total_steps = self.budget_steps or run.total_steps
        self.events = self.schedule.events(total_steps)
        self.n_records = sum(e.kind == "record" for e in self.events)
        steps = [e.step for e in self.events]
        if total_steps and len(set(steps)) < len(steps):
            raise LictrainError(self.schedule.too_short(total_steps))

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def _split(self, flat_idx: torch.Tensor):
        """Flat indices -> {tensor position: local indices} (sorted)."""
        out = {}
        t = np.searchsorted(self.offsets, flat_idx.cpu().numpy(), side="right") - 1
        for j in np.unique(t):
            sel = flat_idx[torch.from_numpy(t == j)]
            out[int(j)] = (sel - int(self.offsets[j])).to(self.params[j].device)
        return out

    # -- the loop's interface --
    def backward(self, ctx: StepContext) -> dict[str, float]:
        ctx.terms.loss.backward()
        if self.decomposed and self.embedded_count:
            for j, idx in self.embedded_by_tensor.items():
                g = self.params[j].grad
                if g is not None:
                    g.view(-1)[idx] = 0
        frac = self.embedded_count / self.n if self.decomposed else 0.0
        return {"embedded_fraction": frac, "trainable_fraction": 1.0 - frac, "cmd_overhead_s": self.overhead}

    def after_step(self, ctx: StepContext) -> dict[str, float]:
        tick = time.perf_counter()
        if self.decomposed and self.embedded_count:
            self.impose()
        if not self.decomposed and ctx.batch is not None and \
                sum(x.shape[0] for x in self.images) < self.sensitivity_images:  # crops for Steps 1-2
            self.images.append(ctx.batch.detach().clone())
        logs = {}
        # Events whose step was skipped (non-finite loss: after_step does not run) are caught up here.
        while self.done < len(self.events) and self.events[self.done].step <= ctx.step + 1:
            event = self.events[self.done]
            self.done += 1
            if event.kind == "record":
                self.record()
                if len(self.trajectories) == self.n_records:
                    logs.update(self.decompose_and_rank())
            elif self.decomposed and not self.embedding_off:
                logs.update(self.coefficient_update(event))
        self.overhead += time.perf_counter() - tick
        return logs

    def record(self) -> None:
        bytes32 = self.n * 4 * self.n_records
        dtype = torch.float32 if bytes32 <= self.trajectory_mb * 2**20 else torch.float16
        self.trajectories.append(self.flat().to("cpu", dtype))

    def decompose_and_rank(self) -> dict[str, float]:
        self.run.broadcast_(self.images)  # every process decides on rank 0's images: the same decisions everywhere
        traj = torch.stack(self.trajectories, 1)  # (N, F)
        if not self.images:
            raise LictrainError("cmd-lic: no training images were kept for the sensitivity analysis")
        images = self.images
        gen = torch.Generator().manual_seed(self.seed)
        prev, best = 10_000.0, None
        for m in self.modes:
            refs, mode, k, d = decompose(traj, m, min(self.samples_per_mode * m, self.max_samples), gen)
            loss = self.instant_loss(refs, mode, k, d, traj[:, -1], images, self.run.criterion)
            best = (refs, mode, k, d, m, loss)
            if abs(loss - prev) / prev < self.saturation:
                break
            prev = loss
        refs, mode, k, d, m, loss = best
        true_loss, _ = sample_loss(self.model, images, self.run.criterion, self.seed)
        # Every process must take rank 0's decision (M, embed or not), or install()'s broadcast would not match
        decision = torch.tensor([float(m), loss, true_loss], dtype=torch.float64, device=self.params[0].device)
        self.run.broadcast_([decision])
        if int(decision[0]) != m:  # this rank's kernels chose another M: decompose at rank 0's (install() then
            # broadcasts rank 0's references, modes and coefficients, which only need the same shapes here)
            m = int(decision[0])
            refs, mode, k, d = decompose(traj, m, min(self.samples_per_mode * m, self.max_samples),
                                         torch.Generator().manual_seed(self.seed))
        loss, true_loss = float(decision[1]), float(decision[2])
        self.chosen_modes = m
        logs = {"cmd_modes": float(m), "cmd_instant_loss": loss, "cmd_true_loss": true_loss}
        if not loss <= (1 + self.max_instant_gap) * true_loss:  # (also catches a NaN instant loss)
            self.embedding_off = True
            self.trajectories = []
            return {**logs, "cmd_embedding_off": 1.0}
        # Step 2 on the final weights
        scores = layer_sensitivity(self.model, self.named, images, self.run.criterion, self.perturb_std, self.seed)
        sensitive = set(sensitive_layers(scores, main_prefixes(self.model)))
        saliency = parameter_saliency(self.model, self.named, images, self.run.criterion, self.seed)
        layers = tensors_by_layer(self.named)
        blocked = torch.zeros(self.n, dtype=torch.bool)
        for layer in sensitive:
            idx = layers[layer]
            flat_idx = torch.cat([torch.arange(int(self.offsets[i]), int(self.offsets[i + 1])) for i in idx])
            s = torch.cat([saliency[i].reshape(-1).cpu() for i in idx])
            top = flat_idx[torch.argsort(s, descending=True)[: len(s) // 2]]
            blocked[top] = True
        embeddable = ~blocked
        embeddable[refs] = False
        embeddable &= traj.double().var(1) > 0  # a coordinate that never moved (e.g. a masked weight) stays as it is
        self.install(refs, mode, k, d, embeddable, gram(traj[refs]))
        self.trajectories = []  # the head-stage memory goes
        return {**logs, "cmd_embedding_off": 0.0, "embeddable_fraction": float(embeddable.float().mean())}

    def instant_loss(self, refs, mode, k, d, last, images, criterion) -> float:
        """R-D loss of the CMD model w_i = k_i w_m(F) + d_i on the sampled images; the weights are restored."""
        saved = [p.detach().clone() for p in self.params]
        ref_now = last[refs].double()
        approx = (k * ref_now[mode] + d).float()
        with torch.no_grad():
            for j, p in enumerate(self.params):
                p.copy_(approx[int(self.offsets[j]):int(self.offsets[j + 1])].view_as(p).to(p))
        try:
            loss, _ = sample_loss(self.model, images, criterion, self.seed)
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)
        return loss

    def install(self, refs, mode, k, d, embeddable, g) -> None:
        """Broadcast rank 0's decomposition (so all processes agree) and set up the embedding state."""
        dev = self.params[0].device
        refs, mode, k, d, g = refs.to(dev), mode.to(dev), k.to(dev), d.to(dev), g.to(dev)
        emb = embeddable.to(dev).to(torch.uint8)
        self.run.broadcast_([refs, mode, k, d, emb, g])
        self.refs, self.mode, self.k, self.d = refs, mode, k, d
        self.embeddable = emb.bool()
        self.embedded = torch.zeros(self.n, dtype=torch.bool, device=dev)
        self.g = g  # Eq. 6's Gram, from the head-stage reference trajectories on
        self._after_install()

    def _after_install(self) -> None:
        if not hasattr(self, "k_prev") or self.k_prev is None:
            self.k_prev, self.d_prev = self.k.clone(), self.d.clone()
        self._ref_plan = self._plan_references()
        self._refresh_embedded()
        self.decomposed = True

    def _refresh_embedded(self) -> None:
        """After the embedded set changes: counts, per-tensor indices and the imposition plan."""
        self.embedded_count = int(self.embedded.sum())
        self.embedded_by_tensor = self._split(torch.nonzero(self.embedded).flatten())
        self._impose_plan = self._plan_imposition(self.embedded_by_tensor)

    def coefficient_update(self, event: Event) -> dict[str, float]:
        w_now = self.flat().double()
        k, d, self.g = rls_update(self.k, self.d, self.mode, self.g, w_now, w_now[self.refs])
        keep = self.embedded
        self.k = torch.where(keep, self.k, k)
        self.d = torch.where(keep, self.d, d)
        self.k[self.refs], self.d[self.refs] = 1.0, 0.0
        return self.embed_step(event.epoch) if event.kind == "embed" else {}

    def embed_step(self, epoch: float) -> dict[str, float]:
        c = ((self.k - self.k_prev) ** 2 + (self.d - self.d_prev) ** 2).sqrt()
        self.k_prev, self.d_prev = self.k.clone(), self.d.clone()
        candidates = self.embeddable & ~self.embedded
        order = torch.argsort(torch.where(candidates, c, torch.full_like(c, math.inf)))
        n_true = min(int(round(self.n * self.embed_percent / 100)), int(candidates.sum()))
        new = order[:n_true]
        self.embedded[new] = True
        self._refresh_embedded()
        for j, idx in self._split(new).items():
            _zero_moments(self.optimizer, self.params[j], idx)
        self.impose()
        n_dummy = 0
        if self.dummy:
            pct = min(epoch * self.embed_percent / 2, self.dummy_cap)
            left = int(candidates.sum()) - n_true
            n_dummy = min(int(round(self.n * pct / 100)), int(left * self.dummy_left_fraction))
            if n_dummy > 0:
                self.impose(self._plan_imposition(self._split(order[n_true:n_true + n_dummy])))
        self._freeze_whole_tensors()
        return {"embedded_now": float(n_true), "dummy_reset": float(n_dummy),
                "embedded_fraction": self.embedded_count / self.n}

    def _plan_references(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(tensor, positions in the reference vector, local indices) per tensor holding references."""
        t = np.searchsorted(self.offsets, self.refs.cpu().numpy(), side="right") - 1
        plan = []
        for j in np.unique(t):
            pos = torch.from_numpy(np.nonzero(t == j)[0]).to(self.refs.device)
            plan.append((int(j), pos, (self.refs[pos] - int(self.offsets[j])).to(self.params[j].device)))
        return plan

    def _plan_imposition(self, by_tensor: dict[int, torch.Tensor]) -> list:
        """(tensor, local indices, k, d, mode) per tensor, gathered once for coordinates whose k, d are fixed."""
        plan = []
        for j, idx in by_tensor.items():
            flat = idx + int(self.offsets[j])
            plan.append((j, idx, self.k[flat], self.d[flat], self.mode[flat]))
        return plan

    @torch.no_grad()
    def impose(self, plan: list | None = None) -> None:
        """w_i <- k_i w_ref(now) + d_i at the planned coordinates (default: every embedded one)."""
        ref_now = torch.empty(len(self.refs), dtype=torch.float64, device=self.refs.device)
        for j, pos, local in self._ref_plan:
            ref_now[pos] = self.params[j].detach().reshape(-1)[local].double()
        # Only the weights are set, not SMA's moving average: the paper resets w_i (Eq. 10, dummy embedding) and
        # says nothing of w_SMA, so a dummy reset is blended at the next sync. (Writing it into the average too made
        # the resets stick and cost 10-90% more loss on the miniature benchmark: benchmarks/RESULTS.md.)
        for j, idx, k, d, mode in self._impose_plan if plan is None else plan:
            p = self.params[j]
            p.view(-1)[idx] = (k * ref_now[mode] + d).to(p.dtype)

    def _freeze_whole_tensors(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return  # DDP expects a gradient for every parameter it was built with: grads stay masked instead
        for j, idx in self.embedded_by_tensor.items():
            p = self.params[j]
            if p.requires_grad and idx.numel() == p.numel():
                p.requires_grad_(False)
                p.grad = None

    # -- checkpoints: everything, so a resumed run continues exactly --
    def state_dict(self) -> dict:
        state = {"events_done": self.done, "events": [(e.step, e.kind, e.epoch) for e in self.events],
                 "trajectories": self.trajectories, "images": [x.cpu() for x in self.images],
                 "overhead": self.overhead, "chosen_modes": self.chosen_modes, "decomposed": self.decomposed,
                 "embedding_off": self.embedding_off}
        if self.decomposed:
            state.update(refs=self.refs, mode=self.mode, k=self.k, d=self.d, k_prev=self.k_prev, d_prev=self.d_prev,
                         embeddable=self.embeddable, embedded=self.embedded, g=self.g,
                         frozen=[not p.requires_grad for p in self.params])
        return state

    def load_state_dict(self, state: dict) -> None:
        epochs = isinstance(self.schedule, EpochSchedule)
        if epochs and "events_done" in state:
            self.done = state["events_done"]  # fixed-length epochs: a longer run only appends events (attach)
        elif "events" in state:  # the budget schedule the run started with: a resume that changes train.steps keeps it
            self.events = [Event(int(st), kind, ep) for st, kind, ep in state["events"]]
            self.n_records = sum(e.kind == "record" for e in self.events)
            self.done = state["events_done"]
        elif not epochs:
            raise LictrainError("this checkpoint is from cmd-lic's first version (fixed epochs): resume it with "
                                "method.options.schedule=epochs")
        else:  # the first version: one event per epoch
            self.done = state["epoch"]
        self.trajectories = list(state["trajectories"])
        self.embedding_off = state.get("embedding_off", False)
        dev = self.params[0].device
        self.images = [x.to(dev) for x in state["images"]]
        self.overhead, self.chosen_modes = state["overhead"], state["chosen_modes"]
        if state["decomposed"]:
            for key in ("refs", "mode", "k", "d", "k_prev", "d_prev", "embeddable", "embedded", "g"):
                setattr(self, key, state[key].to(dev))
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            for p, frozen in zip(self.params, state["frozen"]):
                if frozen and not distributed:  # under DDP gradients stay masked instead (see _freeze_whole_tensors)
                    p.requires_grad_(False)
            self._after_install()
