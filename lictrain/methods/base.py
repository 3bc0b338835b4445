"""The method interface: how one training step turns its rate and distortion terms into a parameter update.

The loop (trainer.py) owns everything shared: data, forward pass, NaN guard, clipping, the optimizer step, EMA,
LR schedule, validation, checkpoints and logs. Once, before the first step, it gives each method and hook the run's
fixed parts (RunContext: model, optimizer, parameters, criterion, collectives) through attach(run); per step it
calls, in order, with a small StepContext (step, terms, batch, will_log, reevaluate):

    hooks' before_backward(ctx)       read-only probes (e.g. gradient-conflict analysis): may compute their own
                                      gradients with torch.autograd.grad(..., retain_graph=True), never touch .grad
    method.backward(ctx) -> logs      must leave the update direction in p.grad of run.params
    (loop: finite check, clipping, optimizer.step())
    method.after_step(ctx) -> logs    may act on parameters between steps (CMD-LIC's embedding, re-masking)
    hooks' after_step(ctx)

Methods plug in without a copy of the loop:
- standard: backward of R + lmbda*D.
- Balanced R-D: two gradients from the shared graph (autograd.grad on R and on lmbda*D), weighted sum into .grad.
- CMD-LIC (STDET): after_step at epoch boundaries records trajectories, embeds and freezes parameters.
- SMA is an optimizer wrapper ("adam+sma"), not a method: it composes with every method.
A method's state_dict() goes into checkpoints so a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..losses import RDTerms


@dataclass
class RunContext:
    """What stays fixed for a run: given once, to Method.attach and StepHook.attach, before any step (and before a
    resume loads state). Methods and hooks keep it as self.run."""
    model: nn.Module | None
    optimizer: torch.optim.Optimizer | None
    params: list[nn.Parameter]  # the main optimizer's parameters (quantiles excluded)
    total_steps: int = 0  # the run's train.steps
    criterion: Callable | None = None  # the run's RateDistortionLoss
    # Averages tensors over the processes of a torchrun job in place (identity in a single process). Methods use it
    # for anything their update depends on beyond the DDP-averaged .grad: losses that set weights, and gradients
    # they compute themselves (methods with reduces_gradients = True, which run outside DDP's averaging).
    reduce_mean: Callable[[list[torch.Tensor]], list[torch.Tensor]] = lambda tensors: tensors
    # Rank 0's values of these tensors on every process, in place (identity in a single process): for decisions
    # that must be identical everywhere but depend on per-rank data (CMD-LIC's modes and embedding).
    broadcast_: Callable[[list[torch.Tensor]], list[torch.Tensor]] = lambda tensors: tensors


@dataclass
class StepContext:
    """What changes every step."""
    step: int  # the step being taken (0-based count of completed optimizer steps before it)
    terms: RDTerms | None = None
    batch: torch.Tensor | None = None  # this step's training crops (this process's share)
    will_log: bool = False  # this step's logs reach metrics.jsonl: compute costly diagnostics only then
    # Re-runs the forward pass on this step's batch with this step's noise (no graph, RNG untouched); set when the
    # method asks for it (needs_reevaluation), e.g. to measure how much each objective improved after the update.
    reevaluate: Callable[[], RDTerms] | None = None


class Method:
    name = "method"
    needs_reevaluation = False  # ask the loop for StepContext.reevaluate
    reduces_gradients = False  # True: the method averages its gradients over processes itself (see reduce_mean)
    # Capabilities the loop asks at set-up (never the method's name):
    supports_loss_scaling = False  # its backward is one backward of ctx.terms.loss, which fp16's GradScaler can scale
    host_sync_free = False  # reads nothing of the step on the host: train.nonfinite=zero (decided on the device) fits

    def attach(self, run: RunContext) -> None:
        """Called once, after the model and optimizer exist and before any step (and before a resume loads state).
        Subclasses that override it call super().attach(run)."""
        self.run = run

    def backward(self, ctx: StepContext) -> dict[str, float]:
        raise NotImplementedError

    def after_step(self, ctx: StepContext) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class StepHook:
    """A read-only observer of training steps; it must not change the trajectory."""

    def attach(self, run: RunContext) -> None:
        """Called once, before the first step."""
        self.run = run

    def before_backward(self, ctx: StepContext) -> dict[str, float] | None:
        return None

    def after_step(self, ctx: StepContext) -> dict[str, float] | None:
        return None
