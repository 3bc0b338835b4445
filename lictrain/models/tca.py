"""FLIC's entropy model (Li et al., ICLR 2024): the transformer-based channel-wise autoregressive model (T-CA), and
the Gaussian conditional that codes latents rounded to integers, as FLIC quantises them.

T-CA (after the public code, GitHub qingshi9974/ICLR2024-FTIC, models/tca.py; the paper's body was not at hand).
The tokens of its attention are channels, not positions. The M latent channels form `slices` slices; all slices'
means, scales and latent residual predictions (LRP) come out of one pass, and causality over slices is built in:
- The input is shifted by one slice: [a start slice computed from the hyper output (a 3x3 conv), y_hat's slices
  0 .. slices-2], lifted by a 3x3 conv grouped by slice to `ratio` times M channels, so group s sees slice s-1 only.
- `depth` blocks, every conv grouped by slice and every norm a GroupNorm with one group per slice, so slices meet
  only in the attention. A block cuts the map into `window` x `window` windows and, per window, normalises, adds a
  depthwise-conv position encoding, and attends across channels: head h holds the channels c = h (mod heads) (an
  equal share of every slice), a channel of slice s attends to the head's channels of slices <= s (the shift
  makes that causal), with scores scaled by (channels per head)^-1/2. Then a residual MLP on the whole map.
- The parameter head: a per-position linear map of the hyper output, interleaved with the T-CA features channel by
  channel, and three 3x3 convs grouped by slice give (mean, scale, LRP) for every latent channel.
One difference from the public code: its T-CA holds a `start_token` parameter that its forward never uses (64
parameters at the paper's size); lictrain leaves it out (an unused parameter has no gradient, which DDP rejects).

FLIC rounds y to integers (y_hat = round(y), not round(y - mean) + mean), which is what lets the T-CA run in one
pass. The public code's FLIC codes round(y) symbol by symbol with a Python range coder and a Gaussian pmf at the
exact mean. `IntegerGaussianConditional` codes it with CompressAI's rANS instead: the symbol is
round(y) - round(mean), and its table is chosen by the scale and by the mean's fraction mean - round(mean) binned
into `offsets` bins (a table per pair); the public code's GsnConditionalLocScaleShift has such a coding path (100
fraction bins) that its FLIC builds but does not use for coding. Measured on 20,000 synthetic Gaussian symbols
(benchmarks/integer_coding.py, RESULTS.md): 16 bins and 96 scales from 0.01 cost 0.42% more bits than -log2 of
the likelihood; one zero-centred table per scale (no fraction bins) 15.6% more.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from compressai.entropy_models import GaussianConditional


class TCABlock(nn.Module):
    """One T-CA block on `dim` = ratio * M channels (see the module docstring)."""

    def __init__(self, dim: int, slices: int, heads: int, window: int):
        super().__init__()
        if dim % slices or (dim // slices) % heads:
            raise ValueError(f"T-CA width {dim} must split into {slices} slices of a multiple of {heads} heads")
        self.slices, self.heads, self.window = slices, heads, window
        self.norm1, self.norm2 = nn.GroupNorm(slices, dim), nn.GroupNorm(slices, dim)
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.pos_norm = nn.GroupNorm(slices, dim)
        self.q, self.k, self.v, self.proj = (nn.Conv2d(dim, dim, 1, groups=slices) for _ in range(4))
        self.fc1, self.fc2 = nn.Conv2d(dim, dim, 1, groups=slices), nn.Conv2d(dim, dim, 1, groups=slices)
        per_head = dim // heads  # channel i of a head is channel i * heads + h, of slice i // (per_head / slices)
        slice_of = torch.arange(per_head) // (per_head // slices)
        self.register_buffer("allowed", slice_of[None, :] <= slice_of[:, None], persistent=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B', C, w, w) -> (B', heads, C / heads, w*w): head h gets channels h, h + heads, h + 2 heads, ..."""
        b, c = t.shape[:2]
        return t.reshape(b, c // self.heads, self.heads, -1).transpose(1, 2)

    def attention(self, t: torch.Tensor) -> torch.Tensor:
        """Masked channel attention inside one batch of windows t: (B', C, w, w)."""
        t = self.norm1(t)
        t = t + F.gelu(self.pos_norm(self.pos(t)))
        q, k, v = self._heads(self.q(t)), self._heads(self.k(t)), self._heads(self.v(t))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed, scale=q.shape[2] ** -0.5)
        return self.proj(out.transpose(1, 2).reshape(t.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s = self.window
        win = x.view(b, c, h // s, s, w // s, s).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, s, s)
        a = self.attention(win).view(b, h // s, w // s, c, s, s).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        x = x + a
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TCA(nn.Module):
    """hyper (B, 2M, H, W) and y_hat (B, M, H, W) -> means, scales, LRP, each (B, M, H, W); slice s of each depends
    on y_hat's slices before s only."""

    def __init__(self, M: int = 320, slices: int = 5, ratio: int = 4, depth: int = 12, heads: int = 16,
                 window: int = 8):
        super().__init__()
        if M % slices:
            raise ValueError(f"M = {M} is not divisible into {slices} slices")
        self.M, self.slices, self.ratio, self.window = M, slices, ratio, window
        d = M * ratio
        self.start = nn.Conv2d(2 * M, M // slices, 3, padding=1)
        self.lift = nn.Conv2d(M, d, 3, padding=1, groups=slices)
        self.blocks = nn.Sequential(*(TCABlock(d, slices, heads, window) for _ in range(depth)))
        self.hyper_linear = nn.Linear(2 * M, 2 * M)
        self.params = nn.Sequential(
            nn.Conv2d(M * (ratio + 2), M * ratio // 2, 3, padding=1, groups=slices), nn.GELU(),
            nn.Conv2d(M * ratio // 2, 3 * M, 3, padding=1, groups=slices), nn.GELU(),
            nn.Conv2d(3 * M, 3 * M, 3, padding=1, groups=slices))

    def forward(self, hyper: torch.Tensor, y_hat: torch.Tensor):
        b, m, h, w = y_hat.shape
        if h % self.window or w % self.window:
            raise ValueError(f"the T-CA's {self.window}x{self.window} windows do not tile a {h}x{w} latent")
        shifted = torch.cat([self.start(hyper), y_hat[:, : m - m // self.slices]], dim=1)
        features = self.blocks(self.lift(shifted)).view(b, m, self.ratio, h, w)
        hyper_features = self.hyper_linear(hyper.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).reshape(b, m, 2, h, w)
        # per latent channel c: its `ratio` T-CA features, then its 2 hyper features, so group s holds slice s
        out = self.params(torch.cat([features, hyper_features], dim=2).view(b, -1, h, w)).view(b, m, 3, h, w)
        return out[:, :, 0], out[:, :, 1], out[:, :, 2]


def integer_scale_table(low: float = 0.01, high: float = 256.0, levels: int = 96) -> list[float]:
    """Log-spaced scales from FLIC's scale bound 0.01 (CompressAI's default table starts at 0.11)."""
    return [math.exp(v) for v in torch.linspace(math.log(low), math.log(high), levels).tolist()]


class IntegerGaussianConditional(GaussianConditional):
    """A Gaussian conditional for latents rounded to integers: training likelihoods of y + uniform noise, evaluation
    likelihoods and coding of round(y) (not round(y - mean) + mean); tables per (scale, mean-fraction bin)."""

    def __init__(self, scale_bound: float = 0.01, offsets: int = 16, **kwargs):
        super().__init__(None, scale_bound=scale_bound, **kwargs)
        self.offsets = offsets
        self._lists = None  # the tables as the range coder takes them, built once per update()

    def forward(self, inputs, scales, means=None, training=None):
        if training is None:
            training = self.training
        outputs = self.quantize(inputs, "noise") if training else torch.round(inputs)
        likelihood = self._likelihood(outputs, scales, means)
        if self.use_likelihood_bound:
            likelihood = self.likelihood_lower_bound(likelihood)
        return outputs, likelihood

    def _fraction_bin(self, means: torch.Tensor) -> torch.Tensor:
        fraction = means - torch.round(means)  # in [-0.5, 0.5]
        return ((fraction + 0.5) * self.offsets).floor().clamp_(0, self.offsets - 1).int()

    def coding_indexes(self, scales: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """The table of each symbol round(y) - round(mean)."""
        if self._quantized_cdf.shape[0] != len(self.scale_table) * self.offsets:
            raise ValueError(f"the coding tables hold {self._quantized_cdf.shape[0]} rows, not {len(self.scale_table)} "
                             f"scales x {self.offsets} fraction bins: run update(force=True) after changing either")
        return self.build_indexes(scales) * self.offsets + self._fraction_bin(means)

    def coding_tables(self) -> tuple[list, list, list]:
        """(cdfs, lengths, offsets) for the rANS coder, each cdf cut to its length (the stored rows are padded to
        the longest, ten times the entries that are used)."""
        # rebuilt when the tables change: update() replaces the tensors, load_state_dict copies into them in place
        key = tuple((id(t), t._version) for t in (self._quantized_cdf, self._cdf_length, self._offset))
        if self._lists is None or self._lists[0] != key:
            lengths = self._cdf_length.reshape(-1).tolist()
            cdfs = [row[:n] for row, n in zip(self._quantized_cdf.tolist(), lengths)]
            self._lists = (key, (cdfs, lengths, self._offset.reshape(-1).tolist()))
        return self._lists[1]

    def update(self):
        """One quantised CDF per (scale, fraction bin): the pmf of round(y) - round(mean) for y ~ N(mean, scale),
        mean's fraction at the bin's centre. Computed in float64 on the CPU, then moved to the model's device."""
        table = self.scale_table.detach().cpu().double()
        fraction = (torch.arange(self.offsets, dtype=torch.float64) + 0.5) / self.offsets - 0.5
        centre = torch.ceil(table * -self._standardized_quantile(self.tail_mass / 2)).long() + 1
        centre = centre.repeat_interleave(self.offsets)
        sigma = table.repeat_interleave(self.offsets)[:, None]
        delta = fraction.repeat(len(table))[:, None]
        length = 2 * centre + 1
        values = torch.arange(int(length.max()), dtype=torch.float64) - centre[:, None]
        normal = torch.distributions.Normal(0.0, 1.0)
        pmf = normal.cdf((values + 0.5 - delta) / sigma) - normal.cdf((values - 0.5 - delta) / sigma)
        pmf = pmf * (values <= centre[:, None])  # rows shorter than the longest are zero-padded
        tail = (1 - pmf.sum(1, keepdim=True)).clamp_min(0)
        device = self.scale_table.device
        self._quantized_cdf = self._pmf_to_cdf(pmf.float(), tail.float(), length.int(), int(length.max())).to(device)
        self._offset = (-centre).int().to(device)
        self._cdf_length = (length + 2).int().to(device)
