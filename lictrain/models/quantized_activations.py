"""8-bit activations as the SOAP-for-LIC paper quantizes them (Section 5, footnote 5): non-learnable, dynamic, per
channel. For each channel c of the current activation x (over the batch and all positions):

    zero point = min_c,  scale_c = (max_c - min_c) / 255,  q = clamp(round((x - min_c) / scale_c), 0, 255),
    x_hat = q * scale_c + min_c.

A constant channel (max = min) has no range to divide: it is returned exactly (q = 0, x_hat = min).

The statistics come from the tensor being quantized, so encoder and decoder agree whenever they evaluate the layer
on the same tensor (the hyperprior's h_s on z_hat, a context model on the same decoded neighbourhood): real
bitstreams stay decodable.
"""

from __future__ import annotations

import torch
import torch.nn as nn

LEVELS = 255


def quantize_activation(x: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """Per-channel asymmetric uint8 fake quantization of x (see the module docstring); returns x's dtype."""
    dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    scale = (hi - lo) / LEVELS
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((x - lo) / safe), 0, LEVELS)
    return torch.where(scale > 0, q * safe + lo, lo.expand_as(x))


def _pre_hook(module, args):
    return (quantize_activation(args[0]),) + tuple(args[1:])


def attach_activation_quantizers(model: nn.Module, names: list[str]) -> None:
    """Quantize the input of each named layer (8-bit, dynamic per channel) at every call, by a forward pre-hook."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no such layers: {', '.join(missing[:5])}")
    for n in names:
        m = modules[n]
        if not getattr(m, "_lictrain_act_quant", False):
            m.register_forward_pre_hook(_pre_hook)
            m._lictrain_act_quant = True
