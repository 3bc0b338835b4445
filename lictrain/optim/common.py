"""Small pieces shared by lictrain's optimizers."""

from __future__ import annotations

import torch


def closure_loss(closure):
    """torch's optimizer convention: re-evaluate the model with gradients on, if a closure is given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
