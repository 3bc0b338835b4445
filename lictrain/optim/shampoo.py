"""Shampoo (Gupta et al. 2018) with Adam grafting, for the optimizer comparison of the SOAP-for-LIC paper.

Per parameter with k preconditioned dimensions: factors F_i = EMA of G_(i) G_(i)^T (as in SOAP), and every
`precondition_frequency` steps P_i = (F_i + matrix_eps * lambda_max(F_i) * I)^(-1/(2k)) by eigh. The update is
the first moment m (momentum on the raw gradient) preconditioned, D = m x_1 P_1 ... x_k P_k, rescaled per tensor to
the norm of Adam's update (grafting, as in Distributed Shampoo: Shampoo's direction, Adam's step size). Until the
first roots exist, and for 1-D/0-d tensors or dimensions above max_precond_dim, the update is Adam's.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from .common import closure_loss
from .soap import project


def inverse_root(f: torch.Tensor, root: int, matrix_eps: float) -> torch.Tensor | None:
    """(F + eps * lambda_max * I)^(-1/root) for a symmetric PSD F, via eigh; None if F is unusable."""
    if not torch.isfinite(f).all():
        return None
    scale = f.abs().max()
    if scale == 0:
        return None
    try:
        w, q = torch.linalg.eigh((f / scale).double())
    except RuntimeError:
        return None
    w = w.clamp(min=0) + matrix_eps * w.max().clamp(min=0)
    out = (q * (w * scale.double()).pow(-1.0 / root)) @ q.T
    return out.to(f.dtype) if torch.isfinite(out).all() else None


class Shampoo(Optimizer):
    def __init__(self, params, lr: float = 2e-4, betas: tuple[float, float] = (0.9, 0.999),
                 shampoo_beta: float = 0.999, eps: float = 1e-8, matrix_eps: float = 1e-6,
                 weight_decay: float = 0.0, precondition_frequency: int = 10, max_precond_dim: int = 10000):
        if precondition_frequency < 1:
            raise ValueError("precondition_frequency must be at least 1")
        defaults = dict(lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, eps=eps, matrix_eps=matrix_eps,
                        weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                        max_precond_dim=max_precond_dim)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float() if p.dtype != torch.float64 else p.grad
                if not torch.isfinite(g).all():
                    continue
                state = self.state[p]
                if not state:
                    dims = g.shape if g.ndim > 1 else ()
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(g)
                    state["exp_avg_sq"] = torch.zeros_like(g)
                    state["GG"] = [torch.zeros(d, d, dtype=g.dtype, device=g.device)
                                   if 1 < d <= group["max_precond_dim"] else None for d in dims]
                    state["P"] = [None] * len(dims)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                adam = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt_().add_(group["eps"]))
                for i, f in enumerate(state["GG"]):
                    if f is not None:
                        gi = g.movedim(i, 0).reshape(g.shape[i], -1)
                        f.lerp_(gi @ gi.T, 1 - group["shampoo_beta"])
                if state["GG"] and t % group["precondition_frequency"] == 0:
                    k = sum(f is not None for f in state["GG"])
                    for i, f in enumerate(state["GG"]):
                        if f is not None:
                            root = inverse_root(f, 2 * k, group["matrix_eps"])
                            state["P"][i] = root if root is not None else state["P"][i]
                update = adam
                if any(pi is not None for pi in state["P"]):
                    direction = project(m, state["P"])  # P_i symmetric: x_i P_i^T = x_i P_i
                    norm = direction.norm()
                    if torch.isfinite(norm) and norm > 0:
                        update = direction * (adam.norm() / norm)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.sub_(update.to(p.dtype), alpha=group["lr"])
        return loss
