"""The statistics, exactly as the SOAP-for-LIC paper defines them.

Cosine (Eq. 4): S(u, v) = <u, v> / (|u| |v|) over all parameters (or one tensor), accumulated in float64.

Outliers (Eq. 8) of X in R^{n x d} (n positions, d channels), after rescaling X so that its second moment
m2 = |X|_F^2 / (n d) is 1, with s_j = sqrt(mean_alpha X_{alpha j}^2) the per-channel RMS:
    Kurt(X)   = mean_j s_j^4 / (mean_j s_j^2)^2
    MaxMed(X) = mean_alpha  max_j |X_{alpha j}| / median_j |X_{alpha j}|
Both are scale-invariant, so the rescaling changes no value; we apply it anyway, as the paper does. The median of
an even number of channels is the mean of the two middle values (numpy's convention; torch.median would take the
lower one). A position whose median is 0 would divide by zero: such rows are left out (and counted).
"""

from __future__ import annotations

import math

import torch


def cosine(u: list[torch.Tensor] | torch.Tensor, v: list[torch.Tensor] | torch.Tensor) -> float:
    if isinstance(u, torch.Tensor):
        u, v = [u], [v]
    uv = uu = vv = 0.0
    for a, b in zip(u, v):
        a, b = a.detach().double().flatten(), b.detach().double().flatten()
        uv += float(a @ b)
        uu += float(a @ a)
        vv += float(b @ b)
    return uv / math.sqrt(uu * vv) if uu > 0 and vv > 0 else float("nan")


def channels_last_matrix(t: torch.Tensor) -> torch.Tensor:
    """A (C, H, W) or (1, C, H, W) feature map as the n x d matrix of the paper: rows = positions, columns = channels."""
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ValueError("one image at a time: statistics are averaged over images, not pooled")
        t = t[0]
    if t.dim() != 3:
        raise ValueError(f"expected a (C, H, W) feature map, got shape {tuple(t.shape)}")
    return t.detach().double().flatten(1).T


def rescale_second_moment(x: torch.Tensor) -> torch.Tensor:
    m2 = x.pow(2).mean()
    return x / m2.sqrt() if m2 > 0 else x


def kurtosis(x: torch.Tensor) -> float:
    x = rescale_second_moment(x.double())
    s2 = x.pow(2).mean(0)  # s_j^2
    return float(s2.pow(2).mean() / s2.mean().pow(2))


def max_median(x: torch.Tensor) -> float:
    a = rescale_second_moment(x.double()).abs()
    med = torch.quantile(a, 0.5, dim=1)  # interpolates between the two middle values
    keep = med > 0
    if not bool(keep.any()):
        return float("nan")
    return float((a[keep].max(1).values / med[keep]).mean())
