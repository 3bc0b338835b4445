"""Cautious Adam: Adam whose update is kept only where it agrees in sign with the current gradient.

The optimizer the Balanced R-D authors train with (their Solution 1 script pairs it with the FAMO-style weights;
the masking is from "Cautious Optimizers", Liang et al. 2024). Per parameter tensor, after Adam's moment updates:

    mask  = 1[m_t * g_t > 0]                       (elementwise: momentum and gradient point the same way)
    scale = 1 / max(mean(mask), 1 / max_scale)     (keeps the update's size; at most max_scale, 10 in their code)
    p    <- p * (1 - lr * weight_decay) - lr / (1 - b1^t) * scale * mask * m_t / (sqrt(v_t / (1 - b2^t)) + eps)

Everything else is torch.optim.Adam's arithmetic (bias corrections, epsilon after the corrected root); weight decay
is decoupled (AdamW's, as in the authors' code). With max_scale = 1 and a mask of ones it is Adam (AdamW with decay). The recipes `cautious-adam` and `balanced-rd-cautious` use it, so the
benchmark can tell the optimizer's share of the authors' result from the balancing's.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from .common import closure_loss


class CautiousAdam(Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, max_scale: float = 10.0):
        if lr <= 0 or eps < 0 or weight_decay < 0 or max_scale < 1:
            raise ValueError("cautious-adam needs lr > 0, eps >= 0, weight_decay >= 0, max_scale >= 1")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError("cautious-adam betas must be in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      max_scale=max_scale))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("cautious-adam does not support sparse gradients")
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / (1 - b2**t) ** 0.5).add_(group["eps"])
                mask = (m * g > 0).to(m.dtype)
                scale = 1.0 / mask.mean().clamp(min=1.0 / group["max_scale"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(m * mask * scale, denom, value=-group["lr"] / (1 - b1**t))
        return loss
