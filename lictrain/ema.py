"""Exponential moving average of a model's weights; validation, evaluation and saved models use it."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """EMA with a warm-up of the decay: d_n = min(decay, (1 + n) / (10 + n)) after n updates.

    Without the warm-up an EMA with decay 0.999 spends thousands of steps averaging the random initialisation, so
    the short runs this toolkit measures (Steps-to-Adam) would validate a model that lags far behind the weights.
    Floating-point parameters and buffers are averaged; integer buffers (CDF tables) are copied.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_p = [p for p in self.model.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            if b_ema.shape != b.shape:  # CompressAI resizes CDF buffers in update(): follow the live model
                continue
            if b.is_floating_point():
                b_ema.lerp_(b, 1.0 - d)
            else:
                b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
