"""Gradient conflicts (SOAP-for-LIC, Section 4.1): intra-step S(p_R, p_D) and inter-step S(p_{t-1}, p_t).

g_R = grad R and g_D = grad (lmbda * D) on the step's batch (from the shared graph, before the method's backward),
g = grad (R + lmbda D) by its own backward pass (it equals g_R + g_D except at CompressAI's lower bounds, whose
backward depends on the gradient's sign). From the optimizer's current state, without changing it:

    p          the update the next step applies for g (momentum included, clipped as the loop clips): the
               inter-step score compares consecutive p
    p_R, p_D   the gradient-driven shares of that update: each component's contribution to the new first moment,
               preconditioned by the second moments (and, for SOAP, the eigenbasis) the step will use. They are
               linear in the component, so p = (momentum share) + p_R + p_D when g = g_R + g_D.

Why shares and not "the update the optimizer would make from g_R alone": with momentum, that update is mostly the
momentum both components share (0.9 of Adam's first moment), so S(p_R, p_D) would measure the history, not the
conflict (we measured ~0.92 for Adam that way on the miniature benchmark). Per optimizer:
    sgd          p_X = -lr (1 - dampening) g_X  (times 1 + momentum with Nesterov);  p adds -lr momentum * buffer
    adam, adamw  p_X = -lr (1 - beta1) g_X / (1 - beta1^t) / (sqrt(v_t / (1 - beta2^t)) + eps), v_t from g
    soap         SOAP.precondition(g, parts=[g_R, g_D]) (the same in SOAP's eigenbasis)
Weight decay is left out (it does not come from the gradients). Where g_R and g_D nearly cancel, the second moment
(built from g) is small and the two shares are large and opposite: that is the conflict this score measures (near a
minimum of R + lmbda D, g_R ~ -g_D everywhere), strongest in a fresh optimizer state whose v is the step's own g^2.
"""

from __future__ import annotations

import math

import torch

from ..errors import LictrainError
from ..methods.base import StepContext, StepHook
from ..optim import unwrap
from ..registry import OPTIMIZERS
from .stats import cosine

def supported() -> list[str]:
    """The registered optimizers whose record says how to preview their update (OptimizerSpec.preview)."""
    return [name for name, spec in OPTIMIZERS.items() if spec.preview is not None]


def _state_params(optimizer):
    return [(p, g) for g in optimizer.param_groups for p in g["params"]]


def preview_update(optimizer: torch.optim.Optimizer, grads: list[torch.Tensor],
                   parts: list[list[torch.Tensor]] | None = None):
    """The update (to add to each parameter) the optimizer's next step would apply for these gradients; with
    `parts`, also each part's gradient-driven share of it (module docstring)."""
    optimizer, spec = unwrap(optimizer)  # through wrappers such as SMA; the record says how to preview
    kind = spec.preview if spec is not None else None
    if kind == "precondition":
        saved = [g["weight_decay"] for g in optimizer.param_groups]
        try:
            for g in optimizer.param_groups:
                g["weight_decay"] = 0.0
            result = optimizer.precondition(list(grads), parts=parts)
        finally:
            for g, wd in zip(optimizer.param_groups, saved):
                g["weight_decay"] = wd
        out, shares = result if parts is not None else (result, [])
        fill = lambda us: [torch.zeros_like(g) if u is None else u for u, g in zip(us, grads)]  # noqa: E731
        return (fill(out), [fill(s) for s in shares]) if parts is not None else fill(out)
    if kind not in PREVIEWS:
        raise LictrainError(f"the conflict analysis supports the optimizers {', '.join(supported())}, "
                            f"not {type(optimizer).__name__}")
    fn = PREVIEWS[kind]
    results = [fn(optimizer, p, group, g, [part[i] for part in parts or []])
               for i, ((p, group), g) in enumerate(zip(_state_params(optimizer), grads))]
    out = [r[0] for r in results]
    if parts is None:
        return out
    return out, [[r[1][k] for r in results] for k in range(len(parts))]


def _adam_update(optimizer, p, group, g, parts):
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
    scale = group["lr"] / (1 - b1**t)
    return -scale * m / denom, [-scale * (1 - b1) * x / denom for x in parts]


def _sgd_update(optimizer, p, group, g, parts):
    momentum, damp = group.get("momentum", 0.0), group.get("dampening", 0.0)
    buf = optimizer.state.get(p, {}).get("momentum_buffer") if momentum else None
    d, coef = g, 1.0
    if momentum:
        if buf is not None:
            d, coef = buf * momentum + (1 - damp) * g, 1 - damp
        if group.get("nesterov"):
            d, coef = g + momentum * d, 1 + momentum * coef
    return -group["lr"] * d, [-group["lr"] * coef * x for x in parts]


# OptimizerSpec.preview -> the update the optimizer's next step would apply ("precondition": its own method)
PREVIEWS = {"adam": _adam_update, "sgd": _sgd_update}


def _grads(loss, params):
    """Gradients of loss for every parameter (zeros for frozen or unused ones)."""
    live = [p for p in params if p.requires_grad]
    gs = iter(torch.autograd.grad(loss, live, retain_graph=True, allow_unused=True))
    out = []
    for p in params:
        g = next(gs) if p.requires_grad else None
        out.append(torch.zeros_like(p) if g is None else g.detach())
    return out


class ConflictProbe(StepHook):
    """Every `every` steps, log intra_cos = S(p_R, p_D) and inter_cos = S(p_{t-1}, p_t); read-only.

    The inter-step score needs the previous step's p as well: the probe also runs one step before each probed
    step (keeping p for the next step only). With `per_layer`, intra/<parameter name> and inter/<parameter name>
    are logged too. `names` are the parameter names in self.run.params order.
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
        g_r = _grads(ctx.terms.rate, self.run.params)
        g_d = _grads(ctx.terms.weighted_distortion, self.run.params)
        # The total gradient by its own backward pass, not as g_R + g_D: CompressAI's LowerBound (GDN, entropy
        # bottleneck) passes a gradient depending on its sign, so at a bound grad(R + D) != grad R + grad D.
        g = _grads(ctx.terms.loss, self.run.params)
        for grads in (g_r, g_d, g):  # under torchrun: the averaged gradients the step uses (every rank probes)
            self.run.reduce_mean(grads)
        if self.clip > 0:  # the factor torch.nn.utils.clip_grad_norm_ applies to the total gradient
            norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in g))
            factor = min(1.0, self.clip / (norm + 1e-6))
            if factor < 1.0:
                g_r, g_d, g = ([t * factor for t in ts] for ts in (g_r, g_d, g))
        p, (p_r, p_d) = preview_update(self.run.optimizer, g, parts=[g_r, g_d])
        return p_r, p_d, p

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
