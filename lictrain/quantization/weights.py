"""8-bit weights: symmetric per-output-channel scales, rounded to nearest or by AdaRound (Nagel et al. 2020).

Scales: s_c = max|W_c| / 127 for output channel c (a Conv2d's dimension 0, a ConvTranspose2d's dimension 1, a
Linear's dimension 0); integers in [-127, 127]. (RDO-PTQ, whose AdaRound set-up the paper follows, searches its
per-channel ranges; lictrain keeps min-max ranges so that nearest and AdaRound share the same grid and differ only
in rounding.)

AdaRound learns, per weight, whether to round down or up: W_q = s * clamp(floor(W / s) + h(V), -127, 127) with the
rectified sigmoid h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1, V initialised
so that h(V) equals the fractional part (the soft weights start at the float weights). V minimises the layer's output
reconstruction error (sum over channels, mean over the rest) on calibration inputs plus
weight * mean(1 - |2 h(V) - 1|^b), with b annealed from 20 to 2 after a warm-up without the regulariser (20% of the
iterations, as in the AdaRound paper); at the end each weight rounds by h(V) >= 0.5.

Where lictrain differs from RDO-PTQ (Adam at its default lr 1e-3, 20000 iterations, regulariser weight 0.001 on a
sum over weights, error in the layer's own units): the error is divided by nearest rounding's error on the same
calibration inputs and the regulariser is a mean, so one weight (10) binarises every layer whatever its size and
scale; lr 1e-2 and 1000 iterations make it affordable on a CPU. Measured on a toy 8-bit layer, the regulariser
weight had to be >= 3 for h(V) to become binary at all (below it the result is nearest rounding), and AdaRound's
gain over nearest rounding at 8 bits is a few percent of the layer's error: 8-bit grids leave little to choose.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

QMAX = 127
ZETA, GAMMA = 1.1, -0.1


def channel_axis(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.ConvTranspose2d) else 0


def weight_scales(w: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-output-channel symmetric scales, shaped to broadcast against w (an all-zero channel gets scale 1)."""
    dims = [d for d in range(w.dim()) if d != axis]
    s = w.detach().abs().amax(dim=dims, keepdim=True) / QMAX
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize_nearest(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int8 grid's integers (as a float tensor) of w by rounding to nearest."""
    return torch.clamp(torch.round(w / scale), -QMAX, QMAX)


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _layer_output(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, weight, layer.bias, layer.stride, layer.padding, layer.output_padding,
                                  layer.groups, layer.dilation)
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, layer.bias)
    return F.linear(x, weight, layer.bias)


def reconstruction_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels, averaged over samples and positions."""
    return (pred - target).pow(2).sum(1).mean()


def adaround(layer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, iters: int = 1000, batch: int = 4,
             lr: float = 1e-2, weight: float = 10.0, warmup: float = 0.2, b_range: tuple = (20.0, 2.0),
             seed: int = 0, progress: bool = True, desc: str = "") -> torch.Tensor:
    """The int8 integers (as a float tensor) of layer.weight learned by AdaRound on (inputs -> targets).

    `inputs` are the layer's inputs in the quantized model (already activation-quantized), `targets` the float
    model's outputs of the same layer: the rounding also corrects the error that reaches this layer."""
    w = layer.weight.detach()
    scale = weight_scales(w, channel_axis(layer))
    floor = torch.floor(w / scale)
    rest = (w / scale - floor).clamp(1e-4, 1 - 1e-4)
    v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(v) = rest
    opt = torch.optim.Adam([v], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = inputs.shape[0]
    start = int(warmup * iters)
    with torch.no_grad():  # the unit of the reconstruction error: nearest rounding's, on all calibration inputs
        unit = reconstruction_error(_layer_output(layer, inputs, quantize_nearest(w, scale) * scale), targets)
        unit = unit.clamp_min(1e-12)
    for it in tqdm(range(iters), desc=desc or "adaround", disable=None if progress else True, leave=False):
        idx = torch.randperm(n, generator=gen)[:batch]
        soft = torch.clamp(floor + _h(v), -QMAX, QMAX) * scale
        loss = reconstruction_error(_layer_output(layer, inputs[idx], soft), targets[idx]) / unit
        if it >= start:
            b = b_range[1] + (b_range[0] - b_range[1]) * (1 - (it - start) / max(1, iters - start))
            loss = loss + weight * (1 - (2 * _h(v) - 1).abs().pow(b)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.clamp(floor + (_h(v) >= 0.5).to(w.dtype), -QMAX, QMAX)
