"""Motion for learned video coding (issue 33): backward warping by a dense flow and a SpyNet-style pyramid motion
estimator, as DCVC uses them (its ME_Spynet; module names kept so that its weights could be mapped later).

Flow convention: channel 0 is the horizontal displacement, channel 1 the vertical one, in pixels; warping a frame x
by a flow f gives out(p) = x(p + f(p)), sampled bilinearly, the border repeated outside the frame.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def flow_warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warping: out[..., i, j] = x at (row i + flow[1, i, j], column j + flow[0, i, j]) (bilinear; border
    padding). Pixel centres sit at integer coordinates, so an integer flow moves whole pixels (to the rounding of
    grid_sample's normalised coordinates, ~1e-5 in fp32)."""
    n, _, h, w = x.shape
    # in fp32 whatever autocast says: bf16 cannot hold pixel coordinates above 256 (a zero flow on a 512-wide frame
    # moved pixels by up to one)
    with torch.autocast(device_type=x.device.type, enabled=False):
        flow = flow.float()
        rows = torch.arange(h, dtype=torch.float32, device=flow.device).view(1, h, 1)
        cols = torch.arange(w, dtype=torch.float32, device=flow.device).view(1, 1, w)
        # grid_sample's normalised coordinates with align_corners=True: -1 and 1 are the centres of the edge pixels
        gx = (cols + flow[:, 0]) * (2 / max(w - 1, 1)) - 1
        gy = (rows + flow[:, 1]) * (2 / max(h - 1, 1)) - 1
        grid = torch.stack([gx, gy], dim=-1)
        out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.to(x.dtype)


def scaled(channels: int, width: float) -> int:
    """A published width times `width` (at least 4 channels)."""
    return max(4, round(channels * width))


class MEBasic(nn.Module):
    """One pyramid level: (frame 1, frame 2 warped by the current flow, the flow) -> a flow correction; five 7x7
    convolutions 8 -> 32 -> 64 -> 32 -> 16 -> 2 with ReLUs between (the inner widths times `width`: 1 is SpyNet's)."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        widths = (8, *(scaled(c, width) for c in (32, 64, 32, 16)), 2)
        for k, (a, b) in enumerate(zip(widths, widths[1:]), start=1):
            setattr(self, f"conv{k}", nn.Conv2d(a, b, 7, padding=3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(1, 5):
            x = F.relu(getattr(self, f"conv{k}")(x))
        return self.conv5(x)


class ME_Spynet(nn.Module):  # noqa: N801 (DCVC's name, kept for its weights)
    """Coarse-to-fine flow from frame 1 to frame 2 (warping frame 2 by it approximates frame 1) over `levels`
    average-pooled scales: at each scale the flow so far is upsampled (x2 in size and value), frame 2 warped by it,
    and that scale's MEBasic adds its correction. Inputs' sides must be multiples of 2^levels. `width` scales the
    levels' inner widths (1: as published; at 1 SpyNet costs ~320k MACs a pixel, most of a narrow DCVC's)."""

    def __init__(self, levels: int = 4, width: float = 1.0):
        super().__init__()
        self.levels = levels
        self.moduleBasic = nn.ModuleList(MEBasic(width) for _ in range(levels))  # noqa: N815

    def forward(self, im1: torch.Tensor, im2: torch.Tensor) -> torch.Tensor:
        h, w = im1.shape[-2:]
        step = 2**self.levels
        if h % step or w % step:
            raise ValueError(f"ME_Spynet with {self.levels} levels needs sides divisible by {step}, got {h}x{w}")
        pyr1, pyr2 = [im1], [im2]
        for _ in range(self.levels - 1):
            pyr1.append(F.avg_pool2d(pyr1[-1], 2))
            pyr2.append(F.avg_pool2d(pyr2[-1], 2))
        coarse = pyr1[-1]
        flow = coarse.new_zeros(coarse.shape[0], 2, coarse.shape[2] // 2, coarse.shape[3] // 2)
        for level, basic in enumerate(self.moduleBasic):
            a, b = pyr1[self.levels - 1 - level], pyr2[self.levels - 1 - level]
            up = F.interpolate(flow, scale_factor=2, mode="bilinear", align_corners=False) * 2
            flow = up + basic(torch.cat([a, flow_warp(b, up), up], dim=1))
        return flow
