"""TCM: learned image compression with mixed Transformer-CNN blocks (Liu, Sun, Katto, CVPR 2023), lictrain's own
implementation on CompressAI's layers, entropy models and range coder.

Structure (as the paper and its public code, GitHub jmliu206/LIC_TCM, build it):
- Transforms. g_a: a strided residual block to 2N channels, then three stages of [2 Transformer-CNN mixture (TCM)
  blocks, a stride-2 step] (the last step a 3x3 stride-2 conv to M). g_s mirrors it with upsampling residual blocks
  and a sub-pixel conv. A TCM block splits its 2N channels by a 1x1 conv into a residual-conv half and a Swin half
  (window attention with a relative position bias, alternating plain and shifted windows, an MLP of 4x width),
  joins them with another 1x1 conv and adds the input. Windows of 8 in g_a/g_s, 4 in the hyper transforms.
- Hyperprior: h_a to Z channels (192 in the paper) at stride 4 more, factorized entropy bottleneck; two hyper
  synthesis branches give latent means and scales (M channels each).
- Channel-wise autoregressive entropy model with 5 slices: for slice i, the hyper means (scales) and the already
  decoded slices go through a Swin-attention block (SWAtten: 1x1 to 128 channels, CompressAI's attention block with
  its non-local branch replaced by a plain + shifted Swin pair, 1x1 back) and a 3-conv network to the slice's mean
  (scale); latent residual prediction (LRP) adds 0.5 tanh(.) of a 3-conv network on the mean support and the
  rounded slice. All slices share one range-coded stream.

Presets: `paper` is TCM-S as the SOAP-for-LIC and CMD-LIC papers train it (N = 64, M = 320); `large` the paper's
TCM-L width (N = 128); `tiny` for CPU tests (every structural element, narrow). Parameter counts: see tests and
benchmarks/RESULTS.md.

Where lictrain differs from the public code (on purpose, documented):
- Window attention pads its input to a multiple of the window (bottom/right, zeros) and crops afterwards, so any
  size that the strides divide works; the public code needs sizes that are multiples of the window at every stage
  (inputs padded to 128 pixels there), and pads the entropy model's attention input asymmetrically without
  cropping back. On sizes that are multiples of the windows both compute the same function.
- The slice count, hyper channels and the entropy model's widths are parameters (the public code fixes 5, 192,
  128, 224/128 and M = 320), so a narrow `tiny` preset keeps every part.
- Training-time rounding of y around the predicted mean and of z around the bottleneck's medians uses the
  straight-through estimator, with CompressAI's noisy likelihoods, as the public code does.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import (AttentionBlock, ResidualBlock, ResidualBlockUpsample, ResidualBlockWithStride,
                               conv3x3, subpel_conv3x3)
from compressai.models import CompressionModel
from compressai.ops import quantize_ste

from .numerics import at_least_fp32
from .rans import ImageDecoders, encode_images


MASK_CACHE_NUMBERS = 4 * 2**20  # the shifted-window mask is kept when it has at most this many numbers (16 MB)
ATTENTION_CHUNK = 32768


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows of a (B, H, W, C) map, with a learned relative
    position bias; `shifted` rolls the map by half a window first and masks pairs that the roll brought together."""

    def __init__(self, dim: int, head_dim: int, window: int, shifted: bool):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention width {dim} is not a multiple of the head width {head_dim}")
        self.heads, self.head_dim, self.window, self.shifted = dim // head_dim, head_dim, window, shifted
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros(self.heads, 2 * window - 1, 2 * window - 1))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = coords[:, :, None] - coords[:, None, :] + window - 1  # (2, w*w, w*w), each in 0..2w-2
        self.register_buffer("rel_index", rel[0] * (2 * window - 1) + rel[1], persistent=False)
        self._mask_cache = None  # ((hp, wp, device), the shifted windows' additive mask): the last size's

    def _mask(self, hp: int, wp: int, device) -> torch.Tensor:
        """(windows, w*w, w*w) True where the shifted map joins regions that were not neighbours."""
        w, s = self.window, self.window // 2
        region = torch.zeros(hp, wp, dtype=torch.long, device=device)
        for i, rows in enumerate((slice(0, hp - w), slice(hp - w, hp - s), slice(hp - s, hp))):
            for j, cols in enumerate((slice(0, wp - w), slice(wp - w, wp - s), slice(wp - s, wp))):
                region[rows, cols] = 3 * i + j
        region = region.view(hp // w, w, wp // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
        return region[:, :, None] != region[:, None, :]

    def _shift_mask(self, hp: int, wp: int, device) -> torch.Tensor:
        """_mask as an additive (windows, w*w, w*w) mask of 0 and -inf. The last map size's is kept when it is small
        (training crops have one size); evaluation images of many, large sizes are not all held in memory (a 2K
        image's first stage would need 180 MB per block)."""
        key = (hp, wp, device)
        if self._mask_cache is not None and self._mask_cache[0] == key:
            return self._mask_cache[1]
        mask = self._mask(hp, wp, device)
        additive = torch.zeros(mask.shape, device=device).masked_fill(mask, float("-inf"))
        self._mask_cache = (key, additive) if additive.numel() <= MASK_CACHE_NUMBERS else None
        return additive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w_, c = x.shape
        w = self.window
        x = F.pad(x, (0, 0, 0, (-w_) % w, 0, (-h) % w))
        hp, wp = x.shape[1:3]
        if self.shifted:
            x = torch.roll(x, (-(w // 2), -(w // 2)), dims=(1, 2))
        win = x.view(b, hp // w, w, wp // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, w * w, c)
        n = win.shape[1]  # windows per image
        q, k, v = (t.reshape(b, self.heads * n, w * w, self.head_dim) for t in
                   self.qkv(win).view(b, n, w * w, 3, self.heads, self.head_dim).permute(3, 0, 4, 1, 2, 5))
        bias = self.bias_table.flatten(1)[:, self.rel_index][:, None]  # (heads, 1, w*w, w*w)
        bias = bias + self._shift_mask(hp, wp, x.device) if self.shifted else bias.expand(-1, n, -1, -1)
        # one fused kernel where the device has one (the bias and mask as its additive mask): (b, heads x windows),
        # in chunks of at most ATTENTION_CHUNK along the second axis (fused kernels give it one grid axis, at most
        # 65,535 blocks: a 4K image's first stage has ~140k heads x windows)
        mask = bias.reshape(1, -1, w * w, w * w).to(q.dtype)
        out = torch.cat([F.scaled_dot_product_attention(*qkvm[:3], attn_mask=qkvm[3], scale=self.head_dim**-0.5)
                         for qkvm in zip(*(t.split(ATTENTION_CHUNK, 1) for t in (q, k, v, mask)))], 1)
        out = out.view(b, self.heads, n, w * w, self.head_dim).permute(0, 2, 3, 1, 4).reshape(b, -1, w * w, c)
        out = self.proj(out).view(b, hp // w, wp // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if self.shifted:
            out = torch.roll(out, (w // 2, w // 2), dims=(1, 2))
        return out[:, :h, :w_]


class SwinLayer(nn.Module):
    """Pre-norm transformer layer on a (B, H, W, C) map: window attention, then an MLP of 4x width."""

    def __init__(self, dim: int, head_dim: int, window: int, shifted: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, head_dim, window, shifted)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MixedBlock(nn.Module):
    """TCM's Transformer-CNN mixture block on 2*dim channels: half through a residual conv block, half through a
    Swin layer, joined by a 1x1 conv and added to the input."""

    def __init__(self, dim: int, head_dim: int, window: int, shifted: bool):
        super().__init__()
        self.dim = dim
        self.split = nn.Conv2d(2 * dim, 2 * dim, 1)
        self.join = nn.Conv2d(2 * dim, 2 * dim, 1)
        self.conv = ResidualBlock(dim, dim)
        self.swin = SwinLayer(dim, head_dim, window, shifted)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, t = self.split(x).split(self.dim, dim=1)
        c = self.conv(c) + c  # (the public code adds the branch input again around CompressAI's residual block)
        t = self.swin(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.join(torch.cat((c, t), dim=1))


def _stage(dim: int, depth: int, head_dim: int, window: int) -> list[nn.Module]:
    return [MixedBlock(dim, head_dim, window, shifted=bool(i % 2)) for i in range(depth)]


class SwinAttention(nn.Module):
    """SWAtten: 1x1 conv to `inner` channels, CompressAI's attention block whose mask branch starts with a plain and
    a shifted Swin layer (in place of the non-local block), the input added back, 1x1 conv out."""

    def __init__(self, dim_in: int, dim_out: int, inner: int, head_dim: int, window: int):
        super().__init__()
        self.inp = nn.Conv2d(dim_in, inner, 1)
        self.out = nn.Conv2d(inner, dim_out, 1)
        self.swin = nn.Sequential(SwinLayer(inner, head_dim, window, False), SwinLayer(inner, head_dim, window, True))
        gate = AttentionBlock(inner)  # its two residual-unit stacks: conv_a (trunk) and conv_b (mask)
        self.trunk, self.mask = gate.conv_a, gate.conv_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        z = self.swin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.out(self.trunk(x) * torch.sigmoid(self.mask(z)) + x)


def param_net(c_in: int, c_out: int, hidden: tuple[int, int]) -> nn.Sequential:
    """The channel-wise entropy models' parameter network (TCM's, DCAE's): three 3x3 convolutions, GELUs between."""
    a, b = hidden
    return nn.Sequential(nn.Conv2d(c_in, a, 3, padding=1), nn.GELU(), nn.Conv2d(a, b, 3, padding=1), nn.GELU(),
                         nn.Conv2d(b, c_out, 3, padding=1))


class ChannelSliceModel(CompressionModel):
    """A compression model whose latent is coded in channel slices, each slice's mean and scale predicted from the
    hyper output and the slices before it, with latent residual prediction (TCM's and DCAE's entropy coding). The
    subclass builds g_a, g_s, h_a, h_mean_s, h_scale_s, lrp, entropy_bottleneck, gaussian_conditional, sets M and
    slices, and defines `_slice_params`; this class gives training, compress and decompress."""

    def _slice_params(self, i: int, means: torch.Tensor, scales: torch.Tensor, done: list[torch.Tensor]):
        """(mean, scale, support) of slice i; `support` is what the LRP sees beside the rounded slice."""
        raise NotImplementedError

    def _refine(self, i: int, mean_support: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
        """Latent residual prediction: y_hat + 0.5 tanh(lrp([mean support, y_hat]))."""
        return y_hat + 0.5 * torch.tanh(self.lrp[i](torch.cat([mean_support, y_hat], dim=1)))

    def _hyper(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.h_mean_s(z_hat), self.h_scale_s(z_hat)

    def forward(self, x: torch.Tensor) -> dict:
        y = self.g_a(x)
        z = self.h_a(y)
        _, z_likelihoods = self.entropy_bottleneck(z)
        medians = self.entropy_bottleneck._get_medians()
        means, scales = self._hyper(quantize_ste(z - medians) + medians)
        done, likelihoods = [], []
        for i, y_slice in enumerate(y.chunk(self.slices, 1)):
            mu, scale, mean_support = self._slice_params(i, means, scales, done)
            _, lik = self.gaussian_conditional(y_slice, scale, mu)
            likelihoods.append(lik)
            # in fp32: under bf16 autocast y - mu would be rounded to bf16 (spacing 0.25 for |y| >= 32), moving the
            # decoder's input by up to 0.125 from what compress/decompress give it
            y_slice, mu = at_least_fp32(y_slice), at_least_fp32(mu)
            done.append(self._refine(i, mean_support, quantize_ste(y_slice - mu) + mu))
        x_hat = self.g_s(torch.cat(done, dim=1))
        return {"x_hat": x_hat, "likelihoods": {"y": torch.cat(likelihoods, dim=1), "z": z_likelihoods}}

    def _coding_tables(self) -> tuple[list, list, list]:
        gc = self.gaussian_conditional
        return gc.quantized_cdf.tolist(), gc.cdf_length.reshape(-1).tolist(), gc.offset.reshape(-1).tolist()

    def compress(self, x: torch.Tensor) -> dict:
        """One range-coded stream per image holding its slices in order, and the hyper-latent's strings."""
        y = self.g_a(x)
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.size()[-2:])
        means, scales = self._hyper(z_hat)
        gc = self.gaussian_conditional
        symbols, indexes, done = [], [], []
        for i, y_slice in enumerate(y.chunk(self.slices, 1)):
            mu, scale, mean_support = self._slice_params(i, means, scales, done)
            q = gc.quantize(y_slice, "symbols", mu)
            symbols.append(q.flatten(1).int())
            indexes.append(gc.build_indexes(scale).flatten(1))
            done.append(self._refine(i, mean_support, q + mu))
        strings = encode_images(torch.cat(symbols, 1), torch.cat(indexes, 1), self._coding_tables())
        return {"strings": [strings, z_strings], "shape": z.size()[-2:]}

    def decompress(self, strings: list, shape) -> dict:
        z_hat = self.entropy_bottleneck.decompress(strings[1], shape)
        means, scales = self._hyper(z_hat)
        gc = self.gaussian_conditional
        decoders = ImageDecoders(strings[0], self._coding_tables())
        done = []
        for i in range(self.slices):
            mu, scale, mean_support = self._slice_params(i, means, scales, done)
            q = decoders.decode(gc.build_indexes(scale), like=mu)
            done.append(self._refine(i, mean_support, gc.dequantize(q, mu)))
        return {"x_hat": self.g_s(torch.cat(done, dim=1)).clamp_(0, 1)}


class TCM(ChannelSliceModel):
    """See the module docstring. N: half the transforms' width; M: latent channels; Z: hyper-latent channels."""

    downsampling_factor = 64

    def __init__(self, N: int = 64, M: int = 320, Z: int = 192, slices: int = 5, depths=(2, 2, 2, 2, 2, 2),
                 head_dims=(8, 16, 32, 32, 16, 8), window: int = 8, hyper_window: int = 4, hyper_head_dim: int = 32,
                 atten_inner: int = 128, atten_head_dim: int = 16, param_hidden=(224, 128)):
        super().__init__()
        if M % slices:
            raise ValueError(f"M = {M} is not divisible into {slices} slices")
        self.M, self.slices, self.depths = M, slices, tuple(depths)
        d, hd = depths, head_dims
        self.g_a = nn.Sequential(
            ResidualBlockWithStride(3, 2 * N, 2),
            *_stage(N, d[0], hd[0], window), ResidualBlockWithStride(2 * N, 2 * N, 2),
            *_stage(N, d[1], hd[1], window), ResidualBlockWithStride(2 * N, 2 * N, 2),
            *_stage(N, d[2], hd[2], window), conv3x3(2 * N, M, stride=2))
        self.g_s = nn.Sequential(
            ResidualBlockUpsample(M, 2 * N, 2),
            *_stage(N, d[3], hd[3], window), ResidualBlockUpsample(2 * N, 2 * N, 2),
            *_stage(N, d[4], hd[4], window), ResidualBlockUpsample(2 * N, 2 * N, 2),
            *_stage(N, d[5], hd[5], window), subpel_conv3x3(2 * N, 3, 2))
        self.h_a = nn.Sequential(ResidualBlockWithStride(M, 2 * N, 2),
                                 *_stage(N, d[0], hyper_head_dim, hyper_window), conv3x3(2 * N, Z, stride=2))

        def hyper_synthesis() -> nn.Sequential:
            return nn.Sequential(ResidualBlockUpsample(Z, 2 * N, 2),
                                 *_stage(N, d[3], hyper_head_dim, hyper_window), subpel_conv3x3(2 * N, M, 2))

        self.h_mean_s, self.h_scale_s = hyper_synthesis(), hyper_synthesis()
        s = M // slices
        support = [M + s * i for i in range(slices)]  # hyper output + the slices decoded before
        self.atten_mean = nn.ModuleList(SwinAttention(c, c, atten_inner, atten_head_dim, window) for c in support)
        self.atten_scale = nn.ModuleList(SwinAttention(c, c, atten_inner, atten_head_dim, window) for c in support)
        self.cc_mean = nn.ModuleList(param_net(c, s, param_hidden) for c in support)
        self.cc_scale = nn.ModuleList(param_net(c, s, param_hidden) for c in support)
        self.lrp = nn.ModuleList(param_net(c + s, s, param_hidden) for c in support)
        self.entropy_bottleneck = EntropyBottleneck(Z)
        self.gaussian_conditional = GaussianConditional(None)

    def _slice_params(self, i: int, means: torch.Tensor, scales: torch.Tensor, done: list[torch.Tensor]):
        mean_support = self.atten_mean[i](torch.cat([means, *done], dim=1))
        mu = self.cc_mean[i](mean_support)
        scale = self.cc_scale[i](self.atten_scale[i](torch.cat([scales, *done], dim=1)))
        return mu, scale, mean_support
