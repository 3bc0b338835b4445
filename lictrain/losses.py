"""The rate-distortion loss, returning rate and distortion separately so methods can treat them as two objectives.

    loss = R + lmbda * D
    R = bits per pixel from the likelihoods of all latents
    D = 255^2 * MSE  (metric 'mse': the papers' "lmbda * 255^2 * MSE + bpp")
    D = 1 - MS-SSIM  (metric 'ms-ssim': CompressAI's convention)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim  # the library's window and single-scale SSIM

from .errors import LictrainError

MS_SSIM_MIN_SIDE = 161  # pytorch-msssim's 5 scales with an 11-pixel window need more than 160 pixels a side


@dataclass
class RDTerms:
    """One batch's differentiable rate and distortion, and the weight between them."""

    rate: torch.Tensor  # bpp
    distortion: torch.Tensor  # D as defined above
    lmbda: float
    mse: torch.Tensor  # detached, on the [0, 1] scale, for PSNR logging
    # a training-time penalty the model's authors add to R + lmbda D (the model's forward returns it as
    # "regularizer" in training mode only: e.g. AuxT's orthogonality term); not part of the R-D trade-off
    regularizer: torch.Tensor | None = None

    @property
    def rd(self) -> torch.Tensor:
        """R + lmbda D alone (what validation reports: the model's regularizer is training-only)."""
        return self.rate + self.lmbda * self.distortion

    @property
    def loss(self) -> torch.Tensor:
        """The training objective: R + lmbda D, plus the model's regularizer where it returns one."""
        return self.rd if self.regularizer is None else self.rd + self.regularizer

    @property
    def weighted_distortion(self) -> torch.Tensor:
        return self.lmbda * self.distortion


def _iter_likelihoods(likelihoods):
    if isinstance(likelihoods, torch.Tensor):
        yield likelihoods
    elif isinstance(likelihoods, dict):
        for v in likelihoods.values():
            yield from _iter_likelihoods(v)
    elif isinstance(likelihoods, (list, tuple)):
        for v in likelihoods:
            yield from _iter_likelihoods(v)


def bpp_from_likelihoods(likelihoods, num_pixels: int) -> torch.Tensor:
    """Sum over all latents of -log2(p), per pixel of the batch (num_pixels = N * H * W); None when no likelihoods
    count (a video training stage that scores distortion only: the loss makes its zero)."""
    logs = [torch.log(lk.float()).sum() for lk in _iter_likelihoods(likelihoods)]
    if not logs:
        return None
    return sum(logs) / (-math.log(2) * num_pixels)


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, pytorch_msssim's defaults
_MS_SSIM_CONSTANTS: dict = {}


def _window_and_weights(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    key = (x.device, x.dtype, x.shape[1])
    if key not in _MS_SSIM_CONSTANTS:
        win = _fspecial_gauss_1d(11, 1.5).repeat([x.shape[1], 1, 1, 1]).to(x.device, x.dtype)
        _MS_SSIM_CONSTANTS[key] = win, torch.tensor(MS_SSIM_WEIGHTS, device=x.device, dtype=x.dtype)
    return _MS_SSIM_CONSTANTS[key]


def ms_ssim_value(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Standard 5-scale MS-SSIM of images in [0, 1] (mean over the batch); a clear error for small images.

    pytorch_msssim's ms_ssim, scale by scale with its own single-scale SSIM, except that its 11-tap Gaussian window
    and the scale weights are made once per device: its ms_ssim builds both on the CPU at every call, and on a GPU
    each copy waits for the device (two host synchronisations per training step). Equal to its result (tested)."""
    side = min(a.shape[-2:])
    if side < MS_SSIM_MIN_SIDE:
        raise LictrainError(f"MS-SSIM needs images of at least {MS_SSIM_MIN_SIDE} pixels a side, got {side}")
    x, y = a.float(), b.float()
    win, weights = _window_and_weights(x)
    contrasts = []
    for level in range(len(MS_SSIM_WEIGHTS)):
        ssim_per_channel, cs = _ssim(x, y, data_range=1.0, win=win, size_average=False)
        if level < len(MS_SSIM_WEIGHTS) - 1:
            contrasts.append(torch.relu(cs))
            padding = [s % 2 for s in x.shape[2:]]
            x, y = F.avg_pool2d(x, kernel_size=2, padding=padding), F.avg_pool2d(y, kernel_size=2, padding=padding)
    levels = torch.stack(contrasts + [torch.relu(ssim_per_channel)])  # (level, batch, channel)
    return torch.prod(levels ** weights.view(-1, 1, 1), dim=0).mean()


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the 8-bit values a decoder writes (0-255, as floats)."""
    return x.clamp(0, 1).mul(255).round()


def psnr_8bit(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """PSNR (dB) of two images in [0, 1] after both are rounded to 8 bits, as evaluation measures every codec."""
    mse = torch.mean((quantize_8bit(x) - quantize_8bit(x_hat)) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ms_ssim_db(value: float) -> float:
    """MS-SSIM on the decibel scale LIC papers plot, -10 log10(1 - MS-SSIM) (infinite for a perfect match)."""
    return float("inf") if value >= 1 else -10 * math.log10(1 - value)


class RateDistortionLoss(nn.Module):
    def __init__(self, lmbda: float, metric: str = "mse"):
        super().__init__()
        if metric not in ("mse", "ms-ssim"):
            raise LictrainError(f"unknown distortion metric '{metric}'; valid: mse, ms-ssim")
        self.lmbda, self.metric = float(lmbda), metric

    def forward(self, output: dict, target: torch.Tensor) -> RDTerms:
        # a model may name its own target (a video stage: the frame it codes out of the sequence it was given)
        target = output.get("target", target)
        n, _, h, w = target.shape
        rate = bpp_from_likelihoods(output["likelihoods"], n * h * w)
        x_hat = output["x_hat"]
        if rate is None:  # no bits count: a zero on the loss's device, in its graph (methods take its gradient)
            rate = x_hat.float().sum() * 0.0
        mse = F.mse_loss(x_hat.float(), target.float())
        if self.metric == "mse":
            distortion = (255.0**2) * mse
        else:
            distortion = 1.0 - ms_ssim_value(x_hat, target)
        return RDTerms(rate=rate, distortion=distortion, lmbda=self.lmbda, mse=mse.detach(),
                       regularizer=output.get("regularizer"))


def psnr_from_mse(mse: float, peak: float = 1.0) -> float:
    return float("inf") if mse <= 0 else 10.0 * math.log10(peak**2 / mse)
