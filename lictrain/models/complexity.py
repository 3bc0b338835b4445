"""Complexity as LIC papers tabulate it: parameters and multiply-accumulates per pixel (kMACs/pixel).

MACs are counted by torch.utils.flop_counter over one forward pass (analysis, hyper analysis and synthesis, context
and entropy-parameter networks, synthesis: encoder and decoder together) of a random image at a stated size: the
convolutions, matrix products and attention products it dispatches, halved (the counter counts a multiply-add as two
operations). Element-wise work (GDN's square root, activations, normalisations) is not counted, as papers do not.
Models whose cost depends on content (none here) or on the image size beyond proportion (global attention) give the
count at that size only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

SIZE = 256  # the stated input: 256 x 256, the papers' training crop


@torch.no_grad()
def macs(model: nn.Module, height: int = SIZE, width: int = SIZE, frames: int = 0) -> int:
    """Multiply-accumulates of one forward pass of `model` on a 1 x 3 x height x width image, or for a video model
    (`frames` > 0) on a 1 x frames x 3 x height x width sequence (a P-frame model: one coded frame)."""
    shape = (1, frames, 3, height, width) if frames else (1, 3, height, width)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.rand(*shape, generator=torch.Generator().manual_seed(0)))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def kmacs_per_pixel(model: nn.Module, height: int = SIZE, width: int = SIZE, frames: int = 0) -> float:
    return macs(model, height, width, frames) / (height * width) / 1e3
