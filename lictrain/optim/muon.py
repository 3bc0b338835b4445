"""Muon for LIC models: torch.optim.Muon on every kernel, AdamW on the rest, as one optimizer.

torch.optim.Muon only takes 2-D parameters. Each parameter of two or more dimensions is handed to it as a 2-D view
of the same storage, (shape[0], rest): a conv kernel (out, in, kh, kw) becomes out x (in*kh*kw), a transposed conv
kernel (in, out, kh, kw) in x (out*kh*kw). Biases, GDN parameters and other 1-D/0-d tensors go to AdamW.
Muon's learning rate is adjusted with torch's "match_rms_adamw" rule, so one learning rate serves both parts (the
same as Adam's), and the learning-rate scheduler sees two ordinary parameter groups.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from .common import closure_loss


class MuonWithAdamW(Optimizer):
    def __init__(self, params, lr: float = 2e-4, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if not hasattr(torch.optim, "Muon"):
            raise RuntimeError(f"torch {torch.__version__} has no torch.optim.Muon")
        params = list(params)
        if params and isinstance(params[0], dict):  # groups from build_optimizer: {"kernels": bool} says which
            kernels = [p for g in params if g["kernels"] for p in g["params"]]
            rest = [p for g in params if not g["kernels"] for p in g["params"]]
            rest_decay = next((g.get("weight_decay", weight_decay) for g in params if not g["kernels"]), weight_decay)
        else:  # plain parameters: every tensor of two or more dimensions is a kernel
            kernels = [p for p in params if p.ndim >= 2]
            rest = [p for p in params if p.ndim < 2]
            rest_decay = weight_decay
        groups = ([{"params": kernels, "part": "muon"}] if kernels else []) + (
            [{"params": rest, "part": "adamw", "weight_decay": rest_decay}] if rest else [])
        super().__init__(groups, dict(lr=lr, weight_decay=weight_decay))
        # 2-D views sharing storage with the kernels: Muon's in-place updates land in the real parameters.
        self._views = [torch.nn.Parameter(p.data.view(p.shape[0], -1)) for p in kernels]
        self._muon = torch.optim.Muon(self._views, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn="match_rms_adamw") \
            if kernels else None
        self._adamw = torch.optim.AdamW(rest, lr=lr, betas=betas, eps=eps, weight_decay=rest_decay) if rest else None

    def _inner(self):
        return [(g, opt) for g, opt in zip(self.param_groups, [o for o in (self._muon, self._adamw) if o is not None])]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group, opt in self._inner():  # the scheduler changes our groups' lr: pass it on
            opt.param_groups[0]["lr"] = group["lr"]
            opt.param_groups[0]["weight_decay"] = group["weight_decay"]
        if self._muon is not None:
            for view, p in zip(self._views, self.param_groups[0]["params"]):
                view.grad = None if p.grad is None else p.grad.view_as(view)
            self._muon.step()
            for view in self._views:
                view.grad = None
        if self._adamw is not None:
            self._adamw.step()
        return loss

    def state_dict(self) -> dict:
        return {
            "muon": self._muon.state_dict() if self._muon is not None else None,
            "adamw": self._adamw.state_dict() if self._adamw is not None else None,
            "lr": [g["lr"] for g in self.param_groups],
            "weight_decay": [g["weight_decay"] for g in self.param_groups],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if self._muon is not None:
            self._muon.load_state_dict(state_dict["muon"])
        if self._adamw is not None:
            self._adamw.load_state_dict(state_dict["adamw"])
        for g, lr, wd in zip(self.param_groups, state_dict["lr"], state_dict["weight_decay"]):
            g["lr"], g["weight_decay"] = lr, wd
