"""A Laplace conditional entropy model beside CompressAI's Gaussian one (DCVC codes its motion and frame latents with
Laplace likelihoods; issue 33).

CompressAI's GaussianConditional reaches the distribution through two functions only: the standardised cumulative
F (likelihoods during training and the tables' masses) and its inverse (how wide a scale's table must be for the
tail mass). Giving it the Laplace ones gives everything else unchanged: noise/STE quantization around the means,
the scale table's indexes, its CDF tables and real rANS coding.

Standard Laplace (location 0, scale 1): F(x) = exp(x) / 2 for x < 0 and 1 - exp(-x) / 2 for x >= 0;
F^-1(q) = log(2q) for q < 1/2 and -log(2 (1 - q)) above. The likelihood of an integer bin |y - mu| = v is
F((1/2 - v) / b) - F((-1/2 - v) / b), formed by CompressAI's _likelihood from F.
"""

from __future__ import annotations

import math

import torch
from compressai.entropy_models import GaussianConditional


class LaplaceConditional(GaussianConditional):
    """GaussianConditional with a Laplace density: `scales` are the Laplace scales b (not standard deviations; a
    Laplace of scale b has standard deviation b sqrt(2))."""

    def _standardized_cumulative(self, inputs: torch.Tensor) -> torch.Tensor:
        # both branches from exp of a non-positive number: no overflow, full precision in either tail
        e = 0.5 * torch.exp(-inputs.abs())
        return torch.where(inputs < 0, e, 1 - e)

    @staticmethod
    def _standardized_quantile(quantile):
        q = float(quantile)
        return math.log(2 * q) if q < 0.5 else -math.log(2 * (1 - q))
