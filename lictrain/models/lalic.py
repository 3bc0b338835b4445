"""LALIC: learned image compression with Bi-RWKV linear attention (Feng et al., CVPR 2025), lictrain's own
implementation after the public code (GitHub sjtu-medialab/RwkvCompress, models/lalic.py at d280846), on
CompressAI's ELIC latent codecs (channel groups, checkerboard context, hyperprior) and range coder.

Structure:
- Bi-RWKV block on a (B, d, H, W) map, tokens in raster order: x + g1 * SpatialMix(LN(x)), then
  + g2 * ChannelMix(LN(.)), with per-channel layer scales g (init 1). SpatialMix: omni-shift (depthwise identity +
  1x1 + 3x3 + 5x5, mixed by 4 learned weights), k, v, r projections, sigmoid(r) * BiWKV(decay / T, boost / T, k, v)
  (lictrain/models/wkv.py; T = H * W; decay and boost one per channel, unconstrained), output projection.
  ChannelMix: its own omni-shift, sigmoid(W_r x) * W_v relu(W_k x)^2 (hidden r * d: 4 in the transforms, 8 in the
  channel context). No biases in the projections.
- g_a: conv5x5/2 -> dims[0], depths[0] blocks, conv3x3/2 -> dims[1], depths[1] blocks, conv3x3/2 -> dims[2],
  depths[2] blocks, conv3x3/2 -> M = dims[3]; g_s mirrors it with transposed convolutions; no other nonlinearity.
  h_a: conv5x5/2 -> dims[4], depths[3] blocks, conv5x5/2 -> Z = dims[5]; h_s mirrors it to M channels.
- Entropy model: ELIC's (5 uneven channel groups, checkerboard 5x5 spatial context, mean-scale Gaussian, STE
  rounding), with the channel context conv3x3 -> 2 Bi-RWKV blocks (M wide, hidden 8x) -> conv1x1, and parameter
  networks of 3 pointwise RWKV-style blocks (1x1 mix, LayerNorm, gated squared-ReLU, residual) on a channel ramp.

Presets: `paper` is the published configuration (dims 96, 144, 256, 320, 256, 192; depths 2, 4, 6, 6; groups 16,
16, 32, 64, 192): 65,621,045 trainable parameters (no published count was found; this is the hand count of the
public code's layers, which its class's trainable parameters also give, the folded omni-shift copies aside);
`tiny` (every element, one block per stage, narrow) for CPU tests.

Where lictrain differs from the public code: the WKV is the exact formula in pure PyTorch (the public CUDA kernel
adds 1e-6 to the denominator and its chunked scan differs from the formula by O(|decay| / T); it is built for one
GPU architecture only); the omni-shift's four depthwise kernels are always folded into one 5x5 kernel before the
convolution (the public code folds them only in eval mode and keeps the folded copy as an extra, untrained
parameter): the same function with the same gradients.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck
from compressai.latent_codecs import (ChannelGroupsLatentCodec, CheckerboardLatentCodec,
                                      GaussianConditionalLatentCodec, HyperLatentCodec, HyperpriorLatentCodec)
from compressai.layers import CheckerboardMaskedConv2d, sequential_channel_ramp
from compressai.models.base import SimpleVAECompressionModel
from compressai.models.utils import conv, deconv

from .wkv import bi_wkv


class OmniShift(nn.Module):
    """Depthwise a0 x + a1 conv1x1(x) + a2 conv3x3(x) + a3 conv5x5(x), computed as one folded 5x5 convolution."""

    def __init__(self, dim: int):
        super().__init__()
        self.k1 = nn.Parameter(torch.empty(dim, 1, 1, 1))
        self.k3 = nn.Parameter(torch.empty(dim, 1, 3, 3))
        self.k5 = nn.Parameter(torch.empty(dim, 1, 5, 5))
        for k in (self.k1, self.k3, self.k5):  # as nn.Conv2d initialises its weight
            nn.init.kaiming_uniform_(k, a=5**0.5)
        self.alpha = nn.Parameter(torch.randn(4))

    def kernel(self) -> torch.Tensor:
        a = self.alpha
        identity = F.pad(torch.ones_like(self.k1), (2, 2, 2, 2))
        return (a[0] * identity + a[1] * F.pad(self.k1, (2, 2, 2, 2)) + a[2] * F.pad(self.k3, (1, 1, 1, 1))
                + a[3] * self.k5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel(), padding=2, groups=x.shape[1])


class SpatialMix(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.shift = OmniShift(dim)
        self.key, self.value, self.receptance, self.output = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.decay, self.boost = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x: (B, T, d) tokens of an (H, W) map in raster order."""
        b, t, d = x.shape
        x = self.shift(x.transpose(1, 2).reshape(b, d, *hw)).flatten(2).transpose(1, 2)
        k, v, r = self.key(x), self.value(x), self.receptance(x)
        wkv = bi_wkv(self.decay / t, self.boost / t, k, v).to(r.dtype)  # computed in (at least) fp32
        return self.output(torch.sigmoid(r) * wkv)


class ChannelMix(nn.Module):
    def __init__(self, dim: int, hidden_rate: int):
        super().__init__()
        self.shift = OmniShift(dim)
        self.key = nn.Linear(dim, hidden_rate * dim, bias=False)
        self.value = nn.Linear(hidden_rate * dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, t, d = x.shape
        x = self.shift(x.transpose(1, 2).reshape(b, d, *hw)).flatten(2).transpose(1, 2)
        return torch.sigmoid(self.receptance(x)) * self.value(torch.relu(self.key(x)) ** 2)


class BiRWKVBlock(nn.Module):
    """Pre-norm Bi-RWKV block on a (B, d, H, W) map (module docstring)."""

    def __init__(self, dim: int, hidden_rate: int = 4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.spatial, self.channel = SpatialMix(dim), ChannelMix(dim, hidden_rate)
        self.gamma1, self.gamma2 = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.gamma1 * self.spatial(self.norm1(t), (h, w))
        t = t + self.gamma2 * self.channel(self.norm2(t), (h, w))
        return t.transpose(1, 2).reshape(b, d, h, w)


class EntropyParametersBlock(nn.Module):
    """Pointwise: m = conv1x1(x); m + sigmoid(W_r LN(m)) * W_v relu(W_k LN(m))^2 (hidden 2x)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.mix = nn.Conv2d(c_in, c_out, 1)
        self.norm = nn.LayerNorm(c_out)
        self.key = nn.Linear(c_out, 2 * c_out, bias=False)
        self.value = nn.Linear(2 * c_out, c_out, bias=False)
        self.receptance = nn.Linear(c_out, c_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mix(x)
        h = self.norm(m.permute(0, 2, 3, 1))
        h = torch.sigmoid(self.receptance(h)) * self.value(torch.relu(self.key(h)) ** 2)
        return m + h.permute(0, 3, 1, 2)


def _blocks(dim: int, depth: int) -> list[nn.Module]:
    return [BiRWKVBlock(dim) for _ in range(depth)]


class LALIC(SimpleVAECompressionModel):
    """See the module docstring. dims: the 6 stage widths (dims[3] = M, dims[5] = Z); depths: blocks per stage
    (g_a/g_s stages 1-3, hyper transforms); groups: ELIC's channel groups of M; min_params: the parameter networks'
    narrowest width."""

    downsampling_factor = 64

    def __init__(self, dims=(96, 144, 256, 320, 256, 192), depths=(2, 4, 6, 6), groups=(16, 16, 32, 64, 192),
                 min_params: int = 256, context_hidden_rate: int = 8):
        super().__init__()
        d, n = dims, depths
        m, self.groups = d[3], list(groups)
        if sum(groups) != m:
            raise ValueError(f"channel groups {list(groups)} do not sum to M = {m}")
        self.g_a = nn.Sequential(conv(3, d[0], 5), *_blocks(d[0], n[0]), conv(d[0], d[1], 3), *_blocks(d[1], n[1]),
                                 conv(d[1], d[2], 3), *_blocks(d[2], n[2]), conv(d[2], m, 3))
        self.g_s = nn.Sequential(deconv(m, d[2], 3), *_blocks(d[2], n[2]), deconv(d[2], d[1], 3),
                                 *_blocks(d[1], n[1]), deconv(d[1], d[0], 3), *_blocks(d[0], n[0]),
                                 deconv(d[0], 3, 5))
        h_a = nn.Sequential(conv(m, d[4], 5), *_blocks(d[4], n[3]), conv(d[4], d[5], 5))
        h_s = nn.Sequential(deconv(d[5], d[4], 5), *_blocks(d[4], n[3]), deconv(d[4], m, 5))
        g = self.groups
        channel_context = {
            f"y{k}": nn.Sequential(nn.Conv2d(sum(g[:k]), m, 3, padding=1),
                                   BiRWKVBlock(m, context_hidden_rate), BiRWKVBlock(m, context_hidden_rate),
                                   nn.Conv2d(m, 2 * g[k], 1))
            for k in range(1, len(g))}
        groups_codec = {
            f"y{k}": CheckerboardLatentCodec(
                latent_codec={"y": GaussianConditionalLatentCodec(quantizer="ste")},
                context_prediction=CheckerboardMaskedConv2d(g[k], 2 * g[k], kernel_size=5, stride=1, padding=2),
                entropy_parameters=sequential_channel_ramp(
                    2 * g[k] + (k > 0) * 2 * g[k] + m, 2 * g[k], min_ch=min_params, num_layers=3,
                    make_layer=EntropyParametersBlock, make_act=nn.Identity))
            for k in range(len(g))}
        self.latent_codec = HyperpriorLatentCodec(latent_codec={
            "y": ChannelGroupsLatentCodec(groups=g, channel_context=channel_context, latent_codec=groups_codec),
            "hyper": HyperLatentCodec(entropy_bottleneck=EntropyBottleneck(d[5]), h_a=h_a, h_s=h_s,
                                      quantizer="ste"),
        })
