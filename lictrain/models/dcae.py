"""DCAE: learned image compression with a dictionary-based entropy model (Lu et al., CVPR 2025), lictrain's own
implementation after the authors' public code (GitHub LabShuHangGU/DCAE, models/dcae.py at bd00306), on
CompressAI's layers and entropy models; the slice loop, latent residual prediction and the range coding are TCM's
(both subclass ChannelSliceModel in lictrain/models/tcm.py; DCAE brings its modules and slice parameters).

Structure:
- Transforms: stride-2 stages of a 5x5 convolution and 3 residual bottleneck blocks (widths dims = 96, 144, 256),
  each followed by a Swin stage (blocks = 1, 2, 12 layers; window 8), and a 5x5 stride-2 convolution to M = 320;
  g_s mirrors it. A Swin stage: layers alternating plain and shifted window attention, each
  x = g1 * x + WMSA(LN x); x = g2 * x + ConvGLU(LN x) (per-channel scales g on the skip path, init 1; ConvGLU: a
  linear to 4d split in two halves, GELU of a depthwise 3x3 convolution of one gating the other, a linear back),
  then a 3x3 convolution and the stage's input added.
- Hyperprior: h_a = stride-2 stage to N = 192, a one-layer Swin stage (window 4), a 3x3 stride-2 convolution to
  Z = 192; two hyper synthesis branches (scales, means): 3x3 stride-2 transposed convolution, Swin stage, 3 residual
  bottleneck blocks and a 5x5 stride-2 transposed convolution to M.
- Entropy model: 5 slices. Per slice, the query [hyper scales, hyper means, decoded slices] goes through the
  dictionary cross-attention (DCA): a linear to 640 channels, a multi-scale aggregation (1x1, a dense chain of 3
  depthwise-separable units, a 1x1 fusion, a 7x7 spatial gate) with a scaled skip, then cross-attention of every
  position (20 heads of 32, a learned temperature per head, no 1/sqrt(d)) to a learned dictionary of 128 entries
  shared by all slices (keys: a linear of the layer-normed dictionary; values: the layer-normed dictionary), a
  ConvGLU, and a linear to M channels. The support [query, DCA output] feeds both the mean and the scale networks
  (TCM's 3-conv networks) and the LRP.

Presets: `paper` (the released configuration): 119,400,351 parameters (no published count was found; the hand count
of the public code's layers); `tiny` for CPU tests (every element, narrow, one Swin layer per stage).

Where lictrain differs from the public code: window attention pads to the window (the public code needs inputs that
are multiples of 128); every image of a batch gets its own range-coded stream (the public code codes batch 1 only).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import conv3x3
from compressai.models.sensetime import ResidualBottleneckBlock  # ELIC's: 1x1, 3x3, 1x1 at half width, ReLUs
from compressai.models.utils import conv, deconv

from .tcm import ChannelSliceModel, WindowAttention, param_net


def down_stage(c_in: int, c_out: int) -> nn.Sequential:
    """A 5x5 stride-2 convolution, then three residual bottleneck blocks."""
    return nn.Sequential(conv(c_in, c_out, 5), *(ResidualBottleneckBlock(c_out, c_out) for _ in range(3)))


def up_stage(c_in: int, c_out: int) -> nn.Sequential:
    """Three residual bottleneck blocks, then a 5x5 stride-2 transposed convolution."""
    return nn.Sequential(*(ResidualBottleneckBlock(c_in, c_in) for _ in range(3)), deconv(c_in, c_out, 5))


class ConvGLU(nn.Module):
    """On (B, H, W, d): fc2(GELU(dwconv3x3(a)) * v) with (a, v) = fc1(x) split in halves of hidden / 2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.half = hidden // 2
        self.fc1, self.fc2 = nn.Linear(dim, 2 * self.half), nn.Linear(self.half, dim)
        self.dw = nn.Conv2d(self.half, self.half, 3, padding=1, groups=self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, v = self.fc1(x).split(self.half, dim=-1)
        a = self.dw(a.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(F.gelu(a) * v)


class ScaledSwinLayer(nn.Module):
    """x = g1 * x + WMSA(LN x); x = g2 * x + ConvGLU(LN x), on (B, H, W, d)."""

    def __init__(self, dim: int, head_dim: int, window: int, shifted: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, head_dim, window, shifted)
        self.mlp = ConvGLU(dim, 4 * dim)
        self.gamma1, self.gamma2 = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gamma1 * x + self.attn(self.norm1(x))
        return self.gamma2 * x + self.mlp(self.norm2(x))


class SwinStage(nn.Module):
    """Layers alternating plain and shifted windows, a 3x3 convolution, the input added; on (B, d, H, W)."""

    def __init__(self, dim: int, head_dim: int, window: int, depth: int):
        super().__init__()
        self.layers = nn.Sequential(*(ScaledSwinLayer(dim, head_dim, window, bool(i % 2)) for i in range(depth)))
        self.conv = conv3x3(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.layers(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)) + x


class SeparableUnit(nn.Module):
    """1x1, GELU, depthwise 3x3, GELU, 1x1 (all `dim` wide, with biases)."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU(), nn.Conv2d(dim, dim, 3, padding=1, groups=dim),
                                  nn.GELU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class MultiScaleAggregation(nn.Module):
    """s = 1x1(x); d_0 = s, d_k = unit_k(GELU(d_(k-1))) for k = 1..3; f = 1x1([d_0..d_3]); f times a spatial gate
    sigmoid(7x7([channel mean of f, channel max of f]))."""

    def __init__(self, dim: int, units: int = 3):
        super().__init__()
        self.inp = nn.Conv2d(dim, dim, 1)
        self.units = nn.ModuleList(SeparableUnit(dim) for _ in range(units))
        self.fuse = nn.Conv2d((units + 1) * dim, dim, 1)
        self.gate = nn.Conv2d(2, 1, 7, padding=3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = [self.inp(x)]
        for unit in self.units:
            d.append(unit(F.gelu(d[-1])))
        f = self.fuse(torch.cat(d, dim=1))
        return f * torch.sigmoid(self.gate(torch.cat([f.mean(1, keepdim=True), f.amax(1, keepdim=True)], dim=1)))


class DictionaryCrossAttention(nn.Module):
    """DCA: from a (B, c_in, H, W) query map and a (entries, heads * head_dim) dictionary to (B, c_out, H, W)."""

    def __init__(self, c_in: int, c_out: int, heads: int, head_dim: int):
        super().__init__()
        dim = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.inp = nn.Linear(c_in, dim)
        self.norm_a, self.norm_q, self.norm_d, self.norm_m = (nn.LayerNorm(dim) for _ in range(4))
        self.aggregate = MultiScaleAggregation(dim)
        self.query, self.key, self.proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.mlp = ConvGLU(dim, 4 * dim)
        self.out = nn.Linear(dim, c_out)
        self.gamma1, self.gamma2, self.gamma3 = (nn.Parameter(torch.ones(dim)) for _ in range(3))

    def forward(self, x: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x1 = self.inp(x.permute(0, 2, 3, 1))  # (B, H, W, dim)
        agg = self.aggregate(self.norm_a(x1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x2 = agg + self.gamma1 * x1
        q = self.query(self.norm_q(x2)).reshape(b, h * w, self.heads, self.head_dim).transpose(1, 2)
        d = self.norm_d(dictionary)  # (entries, dim)
        k = self.key(d).reshape(-1, self.heads, self.head_dim).transpose(0, 1)  # (heads, entries, head_dim)
        v = d.reshape(-1, self.heads, self.head_dim).transpose(0, 1)
        # softmax(temperature q k^T) v, by one fused kernel where the device has one (the temperature folded into q)
        o = F.scaled_dot_product_attention(self.temperature * q, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1),
                                           scale=1.0)  # (B, heads, HW, head_dim)
        o = o.transpose(1, 2).reshape(b, h, w, -1)
        x3 = self.proj(o) + self.gamma2 * x2
        x4 = self.mlp(self.norm_m(x3)) + self.gamma3 * x3
        return self.out(x4).permute(0, 3, 1, 2)


class DCAE(ChannelSliceModel):
    """See the module docstring. N: hyper width; M: latent channels; Z: hyper-latent channels; dims: the transforms'
    stage widths; blocks: Swin layers per stage; dict_entries x (dict_heads * dict_head_dim): the dictionary."""

    downsampling_factor = 64

    def __init__(self, N: int = 192, M: int = 320, Z: int = 192, slices: int = 5, dims=(96, 144, 256),
                 blocks=(1, 2, 12), head_dims=(8, 16, 32, 32, 16, 8), window: int = 8, hyper_window: int = 4,
                 hyper_head_dim: int = 32, dict_entries: int = 128, dict_heads: int = 20, dict_head_dim: int = 32,
                 param_hidden=(224, 128)):
        super().__init__()
        if M % slices:
            raise ValueError(f"M = {M} is not divisible into {slices} slices")
        self.M, self.slices = M, slices
        d, n, hd = dims, blocks, head_dims
        self.g_a = nn.Sequential(
            down_stage(3, d[0]), SwinStage(d[0], hd[0], window, n[0]), down_stage(d[0], d[1]),
            SwinStage(d[1], hd[1], window, n[1]), down_stage(d[1], d[2]), SwinStage(d[2], hd[2], window, n[2]),
            conv(d[2], M, 5))
        self.g_s = nn.Sequential(
            deconv(M, d[2], 5), SwinStage(d[2], hd[3], window, n[2]), up_stage(d[2], d[1]),
            SwinStage(d[1], hd[4], window, n[1]), up_stage(d[1], d[0]), SwinStage(d[0], hd[5], window, n[0]),
            up_stage(d[0], 3))
        self.h_a = nn.Sequential(down_stage(M, N), SwinStage(N, hyper_head_dim, hyper_window, 1), conv(N, Z, 3))

        def hyper_synthesis() -> nn.Sequential:
            return nn.Sequential(deconv(Z, N, 3), SwinStage(N, hyper_head_dim, hyper_window, 1), up_stage(N, M))

        self.h_scale_s, self.h_mean_s = hyper_synthesis(), hyper_synthesis()
        s = M // slices
        query = [2 * M + s * i for i in range(slices)]  # hyper scales, hyper means, the slices decoded before
        self.dictionary = nn.Parameter(torch.randn(dict_entries, dict_heads * dict_head_dim))
        self.dca = nn.ModuleList(DictionaryCrossAttention(c, M, dict_heads, dict_head_dim) for c in query)
        self.cc_mean = nn.ModuleList(param_net(c + M, s, param_hidden) for c in query)
        self.cc_scale = nn.ModuleList(param_net(c + M, s, param_hidden) for c in query)
        self.lrp = nn.ModuleList(param_net(c + M + s, s, param_hidden) for c in query)
        self.entropy_bottleneck = EntropyBottleneck(Z)
        self.gaussian_conditional = GaussianConditional(None)

    def _slice_params(self, i: int, means: torch.Tensor, scales: torch.Tensor, done: list[torch.Tensor]):
        query = torch.cat([scales, means, *done], dim=1)
        support = torch.cat([query, self.dca[i](query, self.dictionary)], dim=1)
        return self.cc_mean[i](support), self.cc_scale[i](support), support
