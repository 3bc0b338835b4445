"""Gradient conflicts (SOAP-for-LIC, Section 4.1): intra-step S(p_R, p_D) and inter-step S(p_{t-1}, p_t).

g_R = grad R and g_D = grad (lmbda * D) on the step's batch (from the shared graph, before the method's backward);
p_R, p_D and p are the updates the optimizer would apply to g_R, g_D and g = grad (R + lmbda D) (which equals
g_R + g_D except at CompressAI's lower bounds, whose backward depends on the gradient's sign) from its current state,
without changing it. The total gradient is scaled by the loop's clipping factor (min(1, max_norm / |g|)), and g_R
and g_D by the same factor, so p is exactly the update the next step applies for the standard method.

    sgd          p = -lr * (momentum * buffer + g)   (a fresh buffer is g itself); p_R, p_D from g_R, g_D alone
    adam, adamw  the bias-corrected Adam step with the moments updated by the given gradient (amsgrad unsupported)
    soap         SOAP.precondition (side-effect free)
Weight decay is left out of all three (it does not come from the gradients); with it, p differs from the applied
update by -lr * wd * theta.
"""

from __future__ import annotations

import math

import torch

from ..errors import LictrainError
from ..methods.base import StepContext, StepHook
from ..optim.soap import SOAP
from .stats import cosine

SUPPORTED = "sgd, adam, adamw, soap"


def _state_params(optimizer):
    return [(p, g) for g in optimizer.param_groups for p in g["params"]]


def preview_update(optimizer: torch.optim.Optimizer, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The update (to add to each parameter) the optimizer's next step would apply for these gradients."""
    if isinstance(optimizer, SOAP):
        saved = [g["weight_decay"] for g in optimizer.param_groups]
        try:
            for g in optimizer.param_groups:
                g["weight_decay"] = 0.0
            out = optimizer.precondition(list(grads))
        finally:
            for g, wd in zip(optimizer.param_groups, saved):
                g["weight_decay"] = wd
        return [torch.zeros_like(g) if u is None else u for u, g in zip(out, grads)]
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is a subclass
        return [_adam_update(optimizer, p, group, g) for (p, group), g in zip(_state_params(optimizer), grads)]
    if isinstance(optimizer, torch.optim.SGD):
        return [_sgd_update(optimizer, p, group, g) for (p, group), g in zip(_state_params(optimizer), grads)]
    raise LictrainError(f"the conflict analysis supports the optimizers {SUPPORTED}, not {type(optimizer).__name__}")


def _adam_update(optimizer, p, group, g):
    if group.get("amsgrad"):
        raise LictrainError("the conflict analysis does not support amsgrad")
    b1, b2 = group["betas"]
    state = optimizer.state.get(p, {})
    if state:
        m, v, t = state["exp_avg"], state["exp_avg_sq"], int(state["step"]) + 1
    else:
        m, v, t = torch.zeros_like(p), torch.zeros_like(p), 1
    m = torch.lerp(m, g, 1 - b1)
    v = v * b2 + (1 - b2) * g * g
    denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(group["eps"])
    return -(group["lr"] / (1 - b1**t)) * m / denom


def _sgd_update(optimizer, p, group, g):
    momentum = group.get("momentum", 0.0)
    state = optimizer.state.get(p, {})
    d = g
    if momentum:
        buf = state.get("momentum_buffer")
        if buf is not None:
            d = buf * momentum + (1 - group.get("dampening", 0.0)) * g
        if group.get("nesterov"):
            d = g + momentum * d
    return -group["lr"] * d


def _grads(loss, params):
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, gs)]


class ConflictProbe(StepHook):
    """Every `every` steps, log intra_cos = S(p_R, p_D) and inter_cos = S(p_{t-1}, p_t); read-only.

    The inter-step score needs the previous step's p as well: the probe also runs one step before each probed
    step (keeping p for the next step only). With `per_layer`, intra/<parameter name> and inter/<parameter name>
    are logged too. `names` are the parameter names in ctx.params order.
    """

    def __init__(self, every: int = 1, clip_max_norm: float = 0.0, per_layer: bool = False,
                 names: list[str] | None = None):
        if every < 1:
            raise LictrainError("the conflict probe's interval must be at least 1")
        self.every, self.clip, self.per_layer, self.names = every, clip_max_norm, per_layer, names
        self.previous: list[torch.Tensor] | None = None
        self.previous_step = -2

    def wants(self, step: int) -> bool:
        return step % self.every == 0 or (step + 1) % self.every == 0

    def vectors(self, ctx: StepContext):
        """(p_R, p_D, p) for this step's batch."""
        g_r = _grads(ctx.terms.rate, ctx.params)
        g_d = _grads(ctx.terms.weighted_distortion, ctx.params)
        # The total gradient by its own backward pass, not as g_R + g_D: CompressAI's LowerBound (GDN, entropy
        # bottleneck) passes a gradient depending on its sign, so at a bound grad(R + D) != grad R + grad D.
        g = _grads(ctx.terms.loss, ctx.params)
        if self.clip > 0:  # the factor torch.nn.utils.clip_grad_norm_ applies to the total gradient
            norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in g))
            factor = min(1.0, self.clip / (norm + 1e-6))
            if factor < 1.0:
                g_r, g_d, g = ([t * factor for t in ts] for ts in (g_r, g_d, g))
        opt = ctx.optimizer
        return preview_update(opt, g_r), preview_update(opt, g_d), preview_update(opt, g)

    def before_backward(self, ctx: StepContext):
        if not self.wants(ctx.step):
            return None
        p_r, p_d, p = self.vectors(ctx)
        logs = {}
        if ctx.step % self.every == 0:
            logs["intra_cos"] = cosine(p_r, p_d)
            if self.previous is not None and self.previous_step == ctx.step - 1:
                logs["inter_cos"] = cosine(self.previous, p)
            if self.per_layer:
                names = self.names or [str(i) for i in range(len(p))]
                for i, name in enumerate(names):
                    logs[f"intra/{name}"] = cosine(p_r[i], p_d[i])
                    if "inter_cos" in logs:
                        logs[f"inter/{name}"] = cosine(self.previous[i], p[i])
        self.previous, self.previous_step = [t.detach().clone() for t in p], ctx.step
        return logs
