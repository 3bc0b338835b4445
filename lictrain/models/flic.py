"""FLIC (the paper's FTIC): frequency-aware transformer for learned image compression (Li et al., ICLR 2024),
lictrain's own implementation on CompressAI's layers, entropy models and range coder.

Structure (as the public code, GitHub qingshi9974/ICLR2024-FTIC, builds it; the paper's body was not at hand):
- Transforms. g_a: a strided residual block to dims[0], then three stages of [frequency-aware transformer (FAT)
  blocks, a stride-2 step] through dims[1], dims[2] to M (the last step a 3x3 stride-2 conv). g_s mirrors it with
  upsampling residual blocks and a sub-pixel conv. h_a (to Z channels) and the two hyper synthesis branches (hyper
  means, hyper scales; M channels each) use FAT blocks too, at `hyper_dim` channels with a window of 2.
- A FAT block: x + 1x1(layer(1x1(x))). The layer is pre-norm: frequency-decomposition window attention (FDWA),
  then an MLP of 4x width whose output goes through frequency modulation (FM).
- FDWA: one bias-free qkv projection; its channels split into 4 quarters, each attending (with heads / 4 heads)
  inside windows of its own shape, for window size s: 2s x 2s, s/2 x s/2, s/2 x 2s (a horizontal stripe),
  2s x s/2 (vertical); each with a relative position bias (zeros at init). Odd blocks roll each quarter by half its
  window first and roll back afterwards, with no mask: the shifted windows wrap around the map.
- FM: the map cut into (2s x 2s) blocks, rfft2 of each block (orthonormal), a learned complex filter per channel and
  frequency (shared by the blocks; 1 at init, so FM starts as the identity), inverse rfft2; computed in float32.
- Entropy model: the hyper output and y_hat go through the T-CA (lictrain/models/tca.py), which gives every latent
  channel's mean, scale and latent residual prediction (LRP) in one pass. y_hat = round(y) (straight-through in
  training), not rounded around the mean; the rate of y is the Gaussian likelihood of y + uniform noise (training)
  or of round(y) (evaluation) with scales bounded below by 0.01. x_hat = g_s(y_hat + 0.5 tanh(LRP)).

Sizes: every window must tile its map exactly, so images are padded to multiples of 128 (16x16 windows at 1/8,
the T-CA's 8x8 windows at 1/16, 4x4 hyper windows at 1/32), as the public code's evaluation pads to 256.

Presets: `paper` is the public code's default (dims 96/144/256, M = 320, Z = 192, T-CA of 12 blocks at 4 x 320
channels): 70,960,972 parameters, the 70.96M of CMD-LIC (TMLR) Table 1 (64 fewer than the public code: the T-CA's
unused start token). `tiny` keeps every structural element, narrow, for CPU tests.

Where lictrain differs from the public code (documented on purpose):
- Coding. The public code codes round(y) with a Python range coder, symbol by symbol, with the Gaussian pmf at the
  exact mean; lictrain uses CompressAI's rANS with tables per (scale, fraction of the mean) (tca.py), one stream per
  image. Its encoder computes each slice's parameters from a T-CA pass that sees only the slices decoded before (the
  decoder's five passes), so both sides compute the same tables, given the same device and kernels: a table index
  depends on round(mean) and the mean's fraction, so a mean that differs in its last bit between encoder and
  decoder (another device, TF32, another convolution algorithm) can break decoding, more easily than with TCM.
- The public code's rolls for the shifted blocks are written -s//4 and s//4, which for the hyper transforms' s = 2
  are -1 and 0: three quarters come back translated by one pixel (cyclically). lictrain does the same by default
  (`public_shifts=True`); `public_shifts=False` rolls every quarter back exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck
from compressai.layers import ResidualBlockUpsample, ResidualBlockWithStride, conv3x3, subpel_conv3x3
from compressai.models import CompressionModel
from compressai.ops import quantize_ste

from .numerics import at_least_fp32
from .rans import ImageDecoders, encode_images
from .tca import TCA, IntegerGaussianConditional, integer_scale_table


def branch_windows(s: int) -> list[tuple[int, int]]:
    """FDWA's four window shapes (rows, columns) for window size s: large square, small square, horizontal stripe,
    vertical stripe."""
    return [(2 * s, 2 * s), (s // 2, s // 2), (s // 2, 2 * s), (2 * s, s // 2)]


def branch_rolls(s: int, public: bool) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(roll before, roll after) of each quarter in a shifted block: half the window each way (s for a side of 2s,
    s // 4 for a side of s / 2). `public` computes the roll before as the public code does, -s // 4 for a short side,
    which Python floors: for s = 2 it is -1 while the roll after is 0."""
    short_before = (-s) // 4 if public else -(s // 4)
    after = [(s, s), (s // 4, s // 4), (s // 4, s), (s, s // 4)]
    return [((-a if a == s else short_before, -b if b == s else short_before), (a, b)) for a, b in after]


class WindowBranch(nn.Module):
    """Multi-head attention inside non-overlapping (rows x cols) windows of (B, H, W, C) q, k, v maps, with a
    relative position bias table ((2 rows - 1)(2 cols - 1), heads), zeros at init."""

    def __init__(self, heads: int, window: tuple[int, int]):
        super().__init__()
        self.heads, self.window = heads, window
        r, c = window
        self.bias_table = nn.Parameter(torch.zeros((2 * r - 1) * (2 * c - 1), heads))
        coords = torch.stack(torch.meshgrid(torch.arange(r), torch.arange(c), indexing="ij")).flatten(1)
        rel = coords[:, :, None] - coords[:, None, :]
        self.register_buffer("rel_index", (rel[0] + r - 1) * (2 * c - 1) + rel[1] + c - 1, persistent=False)

    def _windows(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B * windows, heads, r * c, C / heads)."""
        b, h, w, ch = t.shape
        r, c = self.window
        t = t.reshape(b, h // r, r, w // c, c, self.heads, ch // self.heads)
        return t.permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, self.heads, r * c, ch // self.heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, w, ch = q.shape
        r, c = self.window
        bias = self.bias_table[self.rel_index].permute(2, 0, 1).to(q.dtype)  # (heads, r*c, r*c)
        out = F.scaled_dot_product_attention(self._windows(q), self._windows(k), self._windows(v), attn_mask=bias)
        out = out.view(b, h // r, w // c, self.heads, r, c, ch // self.heads).permute(0, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, h, w, ch)


class FrequencyModulation(nn.Module):
    """FM: per (f x f) block, rfft2 -> a learned complex filter per frequency and channel -> inverse, in float32."""

    def __init__(self, dim: int, f: int):
        super().__init__()
        self.f = f
        weight = torch.zeros(f, f // 2 + 1, dim, 2)
        weight[..., 0] = 1  # 1 + 0j: the identity at init
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        f = self.f
        with torch.autocast(x.device.type, enabled=False):  # torch.fft has no bfloat16; the public code casts too
            blocks = x.float().view(b, h // f, f, w // f, f, c).transpose(2, 3)
            spectrum = torch.fft.rfft2(blocks, dim=(3, 4), norm="ortho") * torch.view_as_complex(self.weight.float())
            out = torch.fft.irfft2(spectrum, s=(f, f), dim=(3, 4), norm="ortho")
        return out.transpose(2, 3).reshape(b, h, w, c).to(x.dtype)


class FDWALayer(nn.Module):
    """Pre-norm transformer layer on (B, H, W, C): FDWA (4 window shapes, one per channel quarter), then an MLP of
    4x width followed by frequency modulation."""

    def __init__(self, dim: int, heads: int, window: int, shifted: bool, public_shifts: bool = True):
        super().__init__()
        if dim % 4 or heads % 4 or (dim // 4) % (heads // 4) or window % 2:
            raise ValueError(f"FDWA needs a width ({dim}) and heads ({heads}) that split into 4 quarters of whole "
                             f"heads, and an even window ({window})")
        self.dim, self.window, self.shifted = dim, window, shifted
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.branches = nn.ModuleList(WindowBranch(heads // 4, shape) for shape in branch_windows(window))
        self.rolls = branch_rolls(window, public_shifts)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.fm = FrequencyModulation(dim, 2 * window)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        outs = []
        for i, branch in enumerate(self.branches):
            part = [t[..., i * self.dim // 4:(i + 1) * self.dim // 4] for t in (q, k, v)]
            if self.shifted:
                before, after = self.rolls[i]
                out = torch.roll(branch(*(torch.roll(t, before, dims=(1, 2)) for t in part)), after, dims=(1, 2))
            else:
                out = branch(*part)
            outs.append(out)
        return self.proj(torch.cat(outs, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.fm(self.mlp(self.norm2(x)))


class FATBlock(nn.Module):
    """x + 1x1(FDWA layer(1x1(x))) on a (B, C, H, W) map."""

    def __init__(self, dim: int, heads: int, window: int, shifted: bool, public_shifts: bool = True):
        super().__init__()
        self.inp, self.out = nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 1)
        self.layer = FDWALayer(dim, heads, window, shifted, public_shifts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.layer(self.inp(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.out(t)


class FLIC(CompressionModel):
    """See the module docstring. dims: the transforms' widths at 1/2, 1/4, 1/8; M, Z: latent and hyper-latent
    channels; heads: per stage (g_a's three, then g_s's three); slices, tca_*: the T-CA; offsets: coding tables'
    mean-fraction bins."""

    downsampling_factor = 128

    def __init__(self, dims=(96, 144, 256), M: int = 320, Z: int = 192, hyper_dim: int = 256, depths=(2,) * 6,
                 heads=(8, 16, 32, 32, 16, 8), hyper_heads: int = 32, window: int = 8, hyper_window: int = 2,
                 slices: int = 5, tca_ratio: int = 4, tca_depth: int = 12, tca_heads: int = 16, tca_window: int = 8,
                 public_shifts: bool = True, offsets: int = 16):
        super().__init__()
        self.M, self.slices = M, slices
        # image sides must be multiples of every window's side in image pixels: FDWA's and FM's 2 * window at 1/8,
        # the T-CA's window at 1/16, the hyper transforms' 2 * hyper_window at 1/32
        self.size_multiple = math.lcm(16 * window, 16 * tca_window, 64 * hyper_window)
        if self.downsampling_factor % self.size_multiple:
            raise ValueError(f"windows {window}, tca_window {tca_window}, hyper_window {hyper_window} need images "
                             f"padded to multiples of {self.size_multiple}; lictrain pads FLIC to "
                             f"{self.downsampling_factor}")

        def stage(dim: int, depth: int, n_heads: int, win: int) -> list[nn.Module]:
            return [FATBlock(dim, n_heads, win, bool(i % 2), public_shifts) for i in range(depth)]

        d, n = depths, dims
        self.g_a = nn.Sequential(
            ResidualBlockWithStride(3, n[0], 2),
            *stage(n[0], d[0], heads[0], window), ResidualBlockWithStride(n[0], n[1], 2),
            *stage(n[1], d[1], heads[1], window), ResidualBlockWithStride(n[1], n[2], 2),
            *stage(n[2], d[2], heads[2], window), conv3x3(n[2], M, stride=2))
        self.g_s = nn.Sequential(
            ResidualBlockUpsample(M, n[2], 2),
            *stage(n[2], d[3], heads[3], window), ResidualBlockUpsample(n[2], n[1], 2),
            *stage(n[1], d[4], heads[4], window), ResidualBlockUpsample(n[1], n[0], 2),
            *stage(n[0], d[5], heads[5], window), subpel_conv3x3(n[0], 3, 2))
        self.h_a = nn.Sequential(ResidualBlockWithStride(M, hyper_dim, 2),
                                 *stage(hyper_dim, d[0], hyper_heads, hyper_window), conv3x3(hyper_dim, Z, stride=2))

        def hyper_synthesis() -> nn.Sequential:
            return nn.Sequential(ResidualBlockUpsample(Z, hyper_dim, 2),
                                 *stage(hyper_dim, d[3], hyper_heads, hyper_window), subpel_conv3x3(hyper_dim, M, 2))

        self.h_mean_s, self.h_scale_s = hyper_synthesis(), hyper_synthesis()
        self.tca = TCA(M, slices, tca_ratio, tca_depth, tca_heads, tca_window)
        self.entropy_bottleneck = EntropyBottleneck(Z)
        self.gaussian_conditional = IntegerGaussianConditional(scale_bound=0.01, offsets=offsets)

    def _check_size(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2:]
        side = self.size_multiple
        if h % side or w % side:
            raise ValueError(f"FLIC's windows need image sides that are multiples of {side} (got {h}x{w}); "
                             f"pad the image or set data.crop to a multiple of {side}")

    def _hyper(self, z_hat: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.h_mean_s(z_hat), self.h_scale_s(z_hat)], dim=1)  # means first, as T-CA expects

    def forward(self, x: torch.Tensor) -> dict:
        self._check_size(x)
        y = self.g_a(x)
        z = self.h_a(y)
        _, z_likelihoods = self.entropy_bottleneck(z)
        medians = self.entropy_bottleneck._get_medians()
        hyper = self._hyper(quantize_ste(z - medians) + medians)
        y_hat = quantize_ste(at_least_fp32(y))  # rounded in fp32: a bf16 y cannot hold every integer beyond 256
        means, scales, lrp = self.tca(hyper, y_hat)
        _, y_likelihoods = self.gaussian_conditional(y, scales, means)
        x_hat = self.g_s(y_hat + 0.5 * torch.tanh(lrp))
        return {"x_hat": x_hat, "likelihoods": {"y": y_likelihoods, "z": z_likelihoods}}

    def update(self, scale_table=None, force: bool = False, update_quantiles: bool = False) -> bool:
        """CompressAI's update, with FLIC's scale table (from its scale bound 0.01) unless one is given."""
        if scale_table is None:
            scale_table = integer_scale_table()
        return super().update(scale_table, force=force, update_quantiles=update_quantiles)

    def _slice_pass(self, hyper: torch.Tensor, known: torch.Tensor, i: int):
        """The T-CA pass for slice i, on y_hat with the slices from i on still zero (what the decoder has)."""
        c = self.M // self.slices
        means, scales, lrp = self.tca(hyper, known)
        return means[:, i * c:(i + 1) * c], scales[:, i * c:(i + 1) * c], lrp[:, i * c:(i + 1) * c]

    def compress(self, x: torch.Tensor) -> dict:
        """One range-coded stream per image holding round(y) - round(mean), slice by slice, and z's strings."""
        self._check_size(x)
        y = self.g_a(x)
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        hyper = self._hyper(self.entropy_bottleneck.decompress(z_strings, z.size()[-2:]))
        q, known = torch.round(y), torch.zeros_like(y)
        c, symbols, indexes = self.M // self.slices, [], []
        for i in range(self.slices):
            means, scales, _ = self._slice_pass(hyper, known, i)
            part = q[:, i * c:(i + 1) * c]
            symbols.append((part - torch.round(means)).flatten(1))
            indexes.append(self.gaussian_conditional.coding_indexes(scales, means).flatten(1))
            known[:, i * c:(i + 1) * c] = part
        strings = encode_images(torch.cat(symbols, 1), torch.cat(indexes, 1),
                                self.gaussian_conditional.coding_tables())
        return {"strings": [strings, z_strings], "shape": z.size()[-2:]}

    def decompress(self, strings: list, shape) -> dict:
        hyper = self._hyper(self.entropy_bottleneck.decompress(strings[1], shape))
        b, _, h, w = hyper.shape
        decoders = ImageDecoders(strings[0], self.gaussian_conditional.coding_tables())
        c = self.M // self.slices
        y_hat = hyper.new_zeros(b, self.M, h, w)
        lrps = []
        for i in range(self.slices):
            means, scales, lrp = self._slice_pass(hyper, y_hat, i)
            q = decoders.decode(self.gaussian_conditional.coding_indexes(scales, means), like=means)
            y_hat[:, i * c:(i + 1) * c] = q + torch.round(means)
            lrps.append(lrp)
        return {"x_hat": self.g_s(y_hat + 0.5 * torch.tanh(torch.cat(lrps, dim=1))).clamp_(0, 1)}
