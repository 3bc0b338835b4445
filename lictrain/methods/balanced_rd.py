"""Balanced R-D (Zhang, Duan, Huang, Zhu, CVPR 2025, arXiv 2502.20161): rate and distortion as two objectives.

The objectives are L_R = R (bpp) and L_D = lmbda * D. Both solutions choose, every step, weights w = (w_R, w_D) on
the simplex and update along g = eff_R * grad L_R + eff_D * grad L_D, with the multipliers `eff` given by a space:

  space 'log1p' (default; the authors' Solution 1 code): eff_i = n * (w_i / (L_i + 1)) / sum_j (w_j / (L_j + 1)),
      the gradient of sum_i w_i log(L_i + 1), renormalised so the multipliers sum to n = 2. The +1 (the code sets
      FAMO's minimum losses to -1) keeps a small rate (R ~ 0.02-0.4 bpp) from being amplified hundreds of times.
  space 'log' (FAMO's own, minimum losses 0): the same with L_i in place of L_i + 1. Kept for comparison: on the
      miniature benchmark it collapsed the rate (bpp 0.002, PSNR 14 dB; benchmarks/RESULTS.md).
  space 'loss': eff = n * w, the weighted sum of the objectives themselves (lictrain's first reading).
With w = (1/2, 1/2) and equal L_R, L_D every space gives exactly the standard gradient of R + lmbda * D. The
authors' multipliers sum to 1, not 2: a global factor 1/2 that Adam's normalisation removes (only its epsilon and
gradient clipping would see it); ours keep the standard method's gradient scale, so its clipping threshold carries over.

Solution 1, `balanced-rd` (from scratch), as the authors' code runs it (FAMO, Liu et al., NeurIPS 2023):
    w = softmax(xi);  delta_i = log(L_i(theta_t) + 1) - log(L_i(theta_{t+1}) + 1)   (in the space's log)
    xi <- Adam step on  J^T delta + gamma * xi,   J = diag(w) - w w^T (softmax Jacobian), lr 0.025 constant
The objective that improved more loses weight; gamma (0.003 in the authors' script; it needs tuning per model) pulls
the logits back towards equal weights. Differences from that code, each ours: delta is measured by re-running the
forward pass on the same batch with the same quantisation noise (theirs draws new noise, which adds noise to delta);
`weight_schedule: cosine` (a cosine decay of the logit lr to `final_ratio` of it, lictrain's earlier reading of
"coarse-to-fine") and `logit_optimizer: sgd` (the literal equation) are options, not defaults. The authors pair the
balancing with a "cautious" Adam (optim `cautious-adam`, lictrain/optim/cautious.py); the recipes keep the two apart:
`balanced-rd` (plain Adam), `balanced-rd-cautious` (their pairing), `cautious-adam` (the optimizer alone).

Solution 2, `balanced-rd-qp` (fine-tuning), an equality-constrained quadratic program on the normalised gradients
g_i = grad L_i / (L_i + c) (c = 0 in space 'log', the default here; 1 in 'log1p'; raw gradients in 'loss'):
    min_w 1/2 || w_R g_R + w_D g_D ||^2   subject to   w_R + w_D = 1,
closed form w_R = (|g_D|^2 - g_R.g_D) / |g_R - g_D|^2, then the same renormalisation as Solution 1 brings the
update back to the loss scale. At the solution d = w_R g_R + w_D g_D satisfies g_R.d = g_D.d = |d|^2: both
normalised objectives decrease at the same first-order rate. Safeguards (ours): losses floored at `loss_floor`; when
|g_R - g_D|^2 is below `parallel_tol` * (|g_R|^2 + |g_D|^2) w = (1/2, 1/2); w clipped to [0, 1] (the two-objective
min-norm point of Sener & Koltun). The raw-gradient QP (space 'loss') leaned on the smaller rate gradient and cost
7-8 dB on the miniature benchmark, hence the normalised default. It needs both gradients: two backward passes.
The paper's own text beyond its abstract could not be read from the project's machines: the normalised reading is the
issue's (and FAMO's) and is marked as such; the paper reports fine-tuning at lr 5e-5 (configs/bench-qp.yaml).

Logged every log step: w_R, w_D, the multipliers eff_R, eff_D, delta_R, delta_D, and (Solution 1, from one extra
backward pass on log steps only) |grad R|, |grad lmbda*D| and their cosine; Solution 2 has them every step.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import LictrainError
from ..registry import register_method
from .base import Method, RunContext, StepContext

N_OBJECTIVES = 2
SPACE_OFFSETS = {"log1p": 1.0, "log": 0.0, "loss": None}  # L_i + offset in the logs; None: the losses themselves


def objective_values(terms, reduce_mean) -> torch.Tensor:
    """(L_R, L_D) = (R, lmbda * D), averaged over processes (so every rank derives the same weights), as a float64
    CPU tensor (the weights are computed there: 2 numbers)."""
    values = torch.stack([terms.rate.detach(), terms.weighted_distortion.detach()]).float()
    return reduce_mean([values])[0].double().cpu()


def shifted(losses: torch.Tensor, space: str, floor: float) -> torch.Tensor:
    """L_i + offset of the space (log1p: +1, log: +0), floored: what the logs and the normalisation divide by."""
    return (losses + (SPACE_OFFSETS[space] or 0.0)).clamp_min(floor)


def effective_weights(w: torch.Tensor, losses: torch.Tensor, floor: float, space: str) -> torch.Tensor:
    """The multipliers of the raw gradients (grad L_R, grad L_D): n * w in space 'loss', otherwise
    n * (w_i / (L_i + offset)) / sum_j (w_j / (L_j + offset))."""
    if SPACE_OFFSETS[space] is None:
        return N_OBJECTIVES * w
    a = w / shifted(losses, space, floor)
    return N_OBJECTIVES * a / a.sum()


def log_improvement(before: torch.Tensor, after: torch.Tensor, space: str, floor: float) -> torch.Tensor:
    """delta_i = log(L_i before + offset) - log(L_i after + offset); space 'loss' measures it like 'log'."""
    space = "log" if SPACE_OFFSETS[space] is None else space
    return shifted(before, space, floor).log() - shifted(after, space, floor).log()


def _check_space(method: str, space: str) -> None:
    if space not in SPACE_OFFSETS:
        raise LictrainError(f"{method}: space must be one of {', '.join(SPACE_OFFSETS)}, got '{space}'")


def qp_weight_rate(gr_gr: float, gd_gd: float, gr_gd: float, parallel_tol: float = 1e-6) -> float:
    """w_R of the equality-constrained min-norm QP for two gradients, given their Gram entries; w_D = 1 - w_R."""
    denom = gr_gr + gd_gd - 2.0 * gr_gd  # |g_R - g_D|^2
    if not math.isfinite(denom) or denom <= parallel_tol * (gr_gr + gd_gd):
        return 0.5
    return min(1.0, max(0.0, (gd_gd - gr_gd) / denom))


def cosine_decay(step: int, total: int, start: float, final_ratio: float) -> float:
    """Cosine decay of the logits' step size from `start` to `start * final_ratio` over `total` steps."""
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


def _gradient_logs(rr: float, dd: float, rd: float) -> dict[str, float]:
    cos = rd / math.sqrt(rr * dd) if rr > 0 and dd > 0 else 0.0
    return {"grad_norm_R": math.sqrt(rr), "grad_norm_D": math.sqrt(dd), "grad_cos": cos}


def _weight_logs(w: torch.Tensor, eff: torch.Tensor) -> dict[str, float]:
    return {"w_R": float(w[0]), "w_D": float(w[1]), "eff_R": float(eff[0]), "eff_D": float(eff[1])}


@register_method("balanced-rd")
class BalancedRD(Method):
    """Solution 1: FAMO-style weights learned from the objectives' log improvements (see the module docstring)."""

    name = "balanced-rd"
    needs_reevaluation = True

    def __init__(self, weight_lr: float = 0.025, gamma: float = 0.003, space: str = "log1p",
                 weight_schedule: str = "constant", final_ratio: float = 0.1, logit_optimizer: str = "adam",
                 loss_floor: float = 1e-8, schedule_steps: int | None = None):
        _check_space("balanced-rd", space)
        if weight_lr < 0 or not 0 <= final_ratio <= 1 or gamma < 0 or loss_floor <= 0:
            raise LictrainError("balanced-rd needs weight_lr >= 0, final_ratio in [0, 1], gamma >= 0, loss_floor > 0")
        if logit_optimizer not in ("adam", "sgd"):
            raise LictrainError(f"balanced-rd: logit_optimizer must be adam or sgd, got '{logit_optimizer}'")
        if weight_schedule not in ("constant", "cosine"):
            raise LictrainError(f"balanced-rd: weight_schedule must be constant or cosine, got '{weight_schedule}'")
        self.weight_lr, self.final_ratio, self.gamma = weight_lr, final_ratio, gamma
        self.logit_optimizer, self.loss_floor, self.space = logit_optimizer, loss_floor, space
        self.weight_schedule = weight_schedule
        self.logits = torch.zeros(N_OBJECTIVES, dtype=torch.float64, requires_grad=True)  # equal weights at start
        self._adam = torch.optim.Adam([self.logits], lr=weight_lr)
        self.schedule_steps = schedule_steps  # cosine only; None: the run's train.steps
        self.total_steps = schedule_steps or 0
        self._before: torch.Tensor | None = None

    def attach(self, run: RunContext) -> None:
        super().attach(run)
        self.total_steps = self.schedule_steps or run.total_steps

    @property
    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits.detach(), 0)

    def effective(self, losses: torch.Tensor) -> torch.Tensor:
        return effective_weights(self.weights, losses, self.loss_floor, self.space)

    def backward(self, ctx: StepContext) -> dict[str, float]:
        losses = objective_values(ctx.terms, self.run.reduce_mean)
        w, eff = self.weights, self.effective(losses)
        logs = _weight_logs(w, eff)
        rate, dist = ctx.terms.rate, ctx.terms.weighted_distortion
        # Diagnostics on log steps (the update is the same with or without them): one extra backward pass for
        # grad R, which stops at the encoder and entropy model; grad lmbda*D then follows from the combined gradient
        # the update needs anyway. Under DDP that combined gradient is averaged over processes, so grad R is too
        # (will_log is the same on every process: the collective is safe).
        g_r = self.run.reduce_mean(_grads(rate, self.run.params, True)) if ctx.will_log else None
        e_r, e_d = float(eff[0]), float(eff[1])
        # a model's own training penalty (AuxT): added as is, outside the balancing; it depends on the weights alone,
        # so its gradient is the same on every process and needs no averaging
        reg = ctx.terms.regularizer
        g_reg = _grads(reg, self.run.params, True) if g_r is not None and reg is not None else None
        (e_r * rate + e_d * dist + (0 if reg is None else reg)).backward()
        if g_r is not None and e_d > 0:
            g_reg = g_reg or [0.0] * len(g_r)
            g_d = [((p.grad if p.grad is not None else torch.zeros_like(p)) - e_r * a - c) / e_d
                   for p, a, c in zip(self.run.params, g_r, g_reg)]
            logs.update(_gradient_logs(_dot(g_r, g_r), _dot(g_d, g_d), _dot(g_r, g_d)))
        self._before = losses
        return logs

    def after_step(self, ctx: StepContext) -> dict[str, float]:
        if self._before is None or ctx.reevaluate is None:
            return {}
        after = objective_values(ctx.reevaluate(), self.run.reduce_mean)
        delta = log_improvement(self._before, after, self.space, self.loss_floor)
        self._before = None
        if not bool(torch.isfinite(delta).all()):
            return {}
        self.update_logits(delta, ctx.step)
        return {"delta_R": float(delta[0]), "delta_D": float(delta[1])}

    def update_logits(self, delta: torch.Tensor, step: int) -> None:
        """One step on the logits from the objectives' log improvements delta."""
        lr = self.weight_lr
        if self.weight_schedule == "cosine":
            lr = cosine_decay(step, self.total_steps, self.weight_lr, self.final_ratio)
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

    def __init__(self, parallel_tol: float = 1e-6, loss_floor: float = 1e-8, space: str = "log"):
        _check_space("balanced-rd-qp", space)
        if parallel_tol < 0 or loss_floor <= 0:
            raise LictrainError("balanced-rd-qp needs parallel_tol >= 0 and loss_floor > 0")
        self.parallel_tol, self.loss_floor, self.space = parallel_tol, loss_floor, space

    def backward(self, ctx: StepContext) -> dict[str, float]:
        losses = objective_values(ctx.terms, self.run.reduce_mean)
        g_r = _grads(ctx.terms.rate, self.run.params, True)
        g_d = _grads(ctx.terms.weighted_distortion, self.run.params, False)
        self.run.reduce_mean(g_r)
        self.run.reduce_mean(g_d)
        rr, dd, rd = _dot(g_r, g_r), _dot(g_d, g_d), _dot(g_r, g_d)
        w, eff = self.weights_for(losses, rr, dd, rd)
        e_r, e_d = float(eff[0]), float(eff[1])
        for p, a, b in zip(self.run.params, g_r, g_d):
            p.grad = e_r * a + e_d * b
        if ctx.terms.regularizer is not None:  # a model's own training penalty (AuxT), outside the balancing
            ctx.terms.regularizer.backward()
        return {**_weight_logs(w, eff), **_gradient_logs(rr, dd, rd)}

    def weights_for(self, losses: torch.Tensor, rr: float, dd: float, rd: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, effective multipliers) from the losses and the raw gradients' Gram entries |g_R|^2, |g_D|^2, g_R.g_D."""
        l_r, l_d = (1.0, 1.0)
        if SPACE_OFFSETS[self.space] is not None:
            l_r, l_d = (float(v) for v in shifted(losses, self.space, self.loss_floor))
        w_r = qp_weight_rate(rr / l_r**2, dd / l_d**2, rd / (l_r * l_d), self.parallel_tol)
        w = torch.tensor([w_r, 1.0 - w_r], dtype=torch.float64)
        return w, effective_weights(w, losses, self.loss_floor, self.space)
