"""Balanced R-D (Zhang, Duan, Huang, Zhu, CVPR 2025, arXiv 2502.20161): rate and distortion as two objectives.

The objectives are L_R = R (bpp) and L_D = lmbda * D. Both solutions choose, every step, weights w = (w_R, w_D) on
the simplex and update along g = effective_R * grad L_R + effective_D * grad L_D, in one of two spaces:

  space 'loss' (default):  effective = n * w,  n = 2
      the weighted sum of the two objectives; w = (1/2, 1/2) is exactly the standard gradient of R + lmbda * D,
      so learning rates, clipping and schedules tuned for the standard method carry over unchanged.
  space 'log' (FAMO's):    effective_i = n * (w_i / L_i) / sum_j (w_j / L_j)
      the gradient of sum_i w_i log L_i brought back to the loss scale (w_i proportional to L_i gives the
      standard gradient). On our miniature benchmark this space collapses the rate: log R is unbounded below as
      R -> 0, and with R ~ 0.02 bpp against lmbda*D ~ 10 the rate gradient is amplified ~500x on the shared
      (encoder) parameters: bpp fell to 0.002 and PSNR stayed at 14 dB (benchmarks/RESULTS.md), hence 'loss'.

Solution 1, `balanced-rd` (training from scratch), coarse-to-fine gradient descent on the weights:
    w = softmax(xi);   delta_i = log L_i(theta_t) - log L_i(theta_{t+1})   (same batch, same noise draw)
    xi <- xi - beta_t * (J^T delta + gamma * xi),   J = diag(w) - w w^T   (the softmax Jacobian)
The objective that improved more in relative terms (delta is measured in log space in both spaces: scale-free)
loses weight; gamma pulls the logits back towards equal weights. beta_t goes from coarse to fine: a cosine decay
from `weight_lr` to `weight_lr * final_ratio` over the run (or over `schedule_steps`). The step on xi is taken by
Adam by default, as the reference implementations of FAMO (Liu et al., NeurIPS 2023, which this solution builds on)
do: delta is O(1e-3) per step, so a plain step of 0.025 would leave the weights where they started;
`logit_optimizer: sgd` is the literal equation above. Measuring delta costs one extra forward pass without a graph
(StepContext.reevaluate); no second backward pass is needed, because the weights depend on the losses only.

Solution 2, `balanced-rd-qp` (fine-tuning), an equality-constrained quadratic program on the gradients
g_i = grad L_i (space 'loss') or g_i = grad L_i / L_i (space 'log'):
    min_w 1/2 || w_R g_R + w_D g_D ||^2   subject to   w_R + w_D = 1,
closed form w_R = (|g_D|^2 - g_R.g_D) / |g_R - g_D|^2. At the solution d = w_R g_R + w_D g_D satisfies
g_R.d = g_D.d = |d|^2: both objectives decrease at the same first-order rate. Safeguards: losses are floored
at `loss_floor`; when |g_R - g_D|^2 is below `parallel_tol` * (|g_R|^2 + |g_D|^2) (parallel gradients of equal
length: every w gives the same direction) w = (1/2, 1/2); w is clipped to [0, 1], since a negative weight can
make sum_j w_j / L_j vanish in space 'log' and the rescaled update explode (clipping gives the two-objective
min-norm point of Sener & Koltun, which still decreases both objectives). This needs both gradients separately:
two backward passes through the shared graph (the rate one stops at the encoder and entropy model), no second
forward pass.

Source note: only the abstract of the Balanced R-D paper was readable from the machines this was written on; the
update rules above are the FAMO equations the paper builds on and the closed-form two-objective QP its abstract and
the SOAP-for-LIC paper (Appendix A.3) describe. Every choice the text above calls ours is tested in
tests/test_balanced_rd.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import LictrainError
from ..registry import register_method
from .base import Method, StepContext

N_OBJECTIVES = 2
SPACES = ("loss", "log")


def objective_values(ctx: StepContext, terms=None) -> torch.Tensor:
    """(L_R, L_D) = (R, lmbda * D), averaged over processes (so every rank derives the same weights), as a float64
    CPU tensor (the weights are computed there: 2 numbers)."""
    terms = terms or ctx.terms
    values = torch.stack([terms.rate.detach(), terms.weighted_distortion.detach()]).float()
    return ctx.reduce_mean([values])[0].double().cpu()


def effective_weights(w: torch.Tensor, losses: torch.Tensor, floor: float, space: str) -> torch.Tensor:
    """The multipliers of the raw gradients (grad L_R, grad L_D): n * w in space 'loss',
    n * (w_i / L_i) / sum_j (w_j / L_j) in space 'log'."""
    if space == "loss":
        return N_OBJECTIVES * w
    a = w / losses.clamp_min(floor)
    return N_OBJECTIVES * a / a.sum()


def _check_space(method: str, space: str) -> None:
    if space not in SPACES:
        raise LictrainError(f"{method}: space must be one of {', '.join(SPACES)}, got '{space}'")


def qp_weight_rate(gr_gr: float, gd_gd: float, gr_gd: float, parallel_tol: float = 1e-6) -> float:
    """w_R of the equality-constrained min-norm QP for two gradients, given their Gram entries; w_D = 1 - w_R."""
    denom = gr_gr + gd_gd - 2.0 * gr_gd  # |g_R - g_D|^2
    if not math.isfinite(denom) or denom <= parallel_tol * (gr_gr + gd_gd):
        return 0.5
    return min(1.0, max(0.0, (gd_gd - gr_gd) / denom))


def coarse_to_fine(step: int, total: int, start: float, final_ratio: float) -> float:
    """Cosine decay of the weights' step size from `start` to `start * final_ratio` over `total` steps."""
    if total <= 0:
        return start
    progress = min(step / total, 1.0)
    return start * (final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def logit_gradient(logits: torch.Tensor, delta: torch.Tensor, gamma: float) -> torch.Tensor:
    """J^T delta + gamma * xi with J the Jacobian of softmax(xi) (symmetric: diag(w) - w w^T)."""
    w = torch.softmax(logits, 0)
    jac = torch.diag(w) - torch.outer(w, w)
    return jac @ delta + gamma * logits


def _grads(loss: torch.Tensor, params: list[nn.Parameter], retain_graph: bool) -> list[torch.Tensor]:
    gs = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Sum of elementwise products, accumulated in float64 (near-parallel gradients need the precision)."""
    return float(sum(torch.dot(x.flatten().double(), y.flatten().double()) for x, y in zip(a, b)))


def _cosine(ab: float, aa: float, bb: float) -> float:
    return ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else 0.0


def _weight_logs(w: torch.Tensor, eff: torch.Tensor) -> dict[str, float]:
    return {"w_R": float(w[0]), "w_D": float(w[1]), "eff_R": float(eff[0]), "eff_D": float(eff[1])}


@register_method("balanced-rd")
class BalancedRD(Method):
    """Solution 1: coarse-to-fine gradient descent on softmax weights (see the module docstring)."""

    name = "balanced-rd"
    needs_reevaluation = True

    def __init__(self, weight_lr: float = 0.025, final_ratio: float = 0.1, gamma: float = 0.001,
                 logit_optimizer: str = "adam", loss_floor: float = 1e-8, schedule_steps: int | None = None,
                 space: str = "loss"):
        _check_space("balanced-rd", space)
        if weight_lr < 0 or not 0 <= final_ratio <= 1 or gamma < 0 or loss_floor <= 0:
            raise LictrainError("balanced-rd needs weight_lr >= 0, final_ratio in [0, 1], gamma >= 0, loss_floor > 0")
        if logit_optimizer not in ("adam", "sgd"):
            raise LictrainError(f"balanced-rd: logit_optimizer must be adam or sgd, got '{logit_optimizer}'")
        self.weight_lr, self.final_ratio, self.gamma = weight_lr, final_ratio, gamma
        self.logit_optimizer, self.loss_floor, self.space = logit_optimizer, loss_floor, space
        self.logits = torch.zeros(N_OBJECTIVES, dtype=torch.float64, requires_grad=True)  # equal weights at start
        self._adam = torch.optim.Adam([self.logits], lr=weight_lr)
        self.schedule_steps = schedule_steps  # None: the run's train.steps (a resume that extends the run stretches it)
        self.total_steps = schedule_steps or 0
        self._before: torch.Tensor | None = None

    def attach(self, model, optimizer, params, total_steps: int = 0) -> None:
        self.total_steps = self.schedule_steps or total_steps

    @property
    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits.detach(), 0)

    def effective(self, losses: torch.Tensor) -> torch.Tensor:
        return effective_weights(self.weights, losses, self.loss_floor, self.space)

    def backward(self, ctx: StepContext) -> dict[str, float]:
        losses = objective_values(ctx)
        w, eff = self.weights, self.effective(losses)
        logs = _weight_logs(w, eff)
        rate, dist = ctx.terms.rate, ctx.terms.weighted_distortion
        if ctx.will_log:  # diagnostics (on this process's gradients): the update is the same with or without them
            g_r, g_d = _grads(rate, ctx.params, True), _grads(dist, ctx.params, True)
            logs["grad_cos"] = _cosine(_dot(g_r, g_d), _dot(g_r, g_r), _dot(g_d, g_d))
        (float(eff[0]) * rate + float(eff[1]) * dist).backward()
        self._before = losses
        return logs

    def after_step(self, ctx: StepContext) -> dict[str, float]:
        if self._before is None or ctx.reevaluate is None:
            return {}
        after = objective_values(ctx, ctx.reevaluate())
        delta = self._before.clamp_min(self.loss_floor).log() - after.clamp_min(self.loss_floor).log()
        self._before = None
        if not bool(torch.isfinite(delta).all()):
            return {}
        self.update_logits(delta, ctx.step)
        return {"delta_R": float(delta[0]), "delta_D": float(delta[1])}

    def update_logits(self, delta: torch.Tensor, step: int) -> None:
        """One coarse-to-fine step on the logits from the objectives' log improvements delta."""
        lr = coarse_to_fine(step, self.total_steps, self.weight_lr, self.final_ratio)
        grad = logit_gradient(self.logits.detach(), delta.to(self.logits.dtype), self.gamma)
        if self.logit_optimizer == "sgd":
            with torch.no_grad():
                self.logits -= lr * grad
        else:
            for g in self._adam.param_groups:
                g["lr"] = lr
            self.logits.grad = grad
            self._adam.step()
            self.logits.grad = None

    def state_dict(self) -> dict:
        return {"logits": self.logits.detach().clone(), "adam": self._adam.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self._adam.load_state_dict(state["adam"])


@register_method("balanced-rd-qp")
class BalancedRDQP(Method):
    """Solution 2: per-step closed-form equality-constrained QP on the normalised gradients (module docstring)."""

    name = "balanced-rd-qp"
    reduces_gradients = True  # the QP needs the averaged g_R and g_D separately, not only their weighted sum

    def __init__(self, parallel_tol: float = 1e-6, loss_floor: float = 1e-8, space: str = "loss"):
        _check_space("balanced-rd-qp", space)
        if parallel_tol < 0 or loss_floor <= 0:
            raise LictrainError("balanced-rd-qp needs parallel_tol >= 0 and loss_floor > 0")
        self.parallel_tol, self.loss_floor, self.space = parallel_tol, loss_floor, space

    def backward(self, ctx: StepContext) -> dict[str, float]:
        losses = objective_values(ctx)
        g_r = _grads(ctx.terms.rate, ctx.params, True)
        g_d = _grads(ctx.terms.weighted_distortion, ctx.params, False)
        ctx.reduce_mean(g_r)
        ctx.reduce_mean(g_d)
        rr, dd, rd = _dot(g_r, g_r), _dot(g_d, g_d), _dot(g_r, g_d)
        w, eff = self.weights_for(losses, rr, dd, rd)
        e_r, e_d = float(eff[0]), float(eff[1])
        for p, a, b in zip(ctx.params, g_r, g_d):
            p.grad = e_r * a + e_d * b
        return {**_weight_logs(w, eff), "grad_cos": _cosine(rd, rr, dd)}

    def weights_for(self, losses: torch.Tensor, rr: float, dd: float, rd: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, effective multipliers) from the losses and the raw gradients' Gram entries |g_R|^2, |g_D|^2, g_R.g_D."""
        l_r, l_d = (float(v) for v in losses.clamp_min(self.loss_floor)) if self.space == "log" else (1.0, 1.0)
        w_r = qp_weight_rate(rr / l_r**2, dd / l_d**2, rd / (l_r * l_d), self.parallel_tol)
        w = torch.tensor([w_r, 1.0 - w_r], dtype=torch.float64)
        return w, effective_weights(w, losses, self.loss_floor, self.space)
