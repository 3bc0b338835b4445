"""TCM with the auxiliary transform (AuxT; Li et al., "On Disentangled Training for Nonlinear Transform in Learned
Image Compression", ICLR 2025), lictrain's own implementation after the public code (GitHub qingshi9974/AuxT,
models/tcm_AuxT.py and models/pywave.py at 11f9c9e).

AuxT gives the nonlinear transforms a linear shortcut that does a coarse energy compaction, so they only have to
learn the details. Each side gets a chain of four wavelet-based linear shortcuts fed only by the transform's input:
- encoder: WLS(3, 2N), WLS(2N, 2N), WLS(2N, 2N), WLS(2N, M); the k-th output is added to g_a's output after its
  k-th stride-2 layer (before that resolution's TCM blocks); the latent is y = g_a(x) + the last shortcut output;
- decoder: iWLS(M, 2N), iWLS(2N, 2N), iWLS(2N, 2N), iWLS(2N, 3); the k-th output is added at the end of g_s's k-th
  resolution stage (after its TCM blocks), the last one to the RGB output.
A WLS is a one-level orthonormal Haar transform (all four subbands kept, subband-major channels
[LL | LH | HL | HH]), a learned gain exp(s) per subband channel (s initialised 0.5 on LL, LH, HL and 0 on HH), and
a 1x1 linear projection; an iWLS is the mirror (projection, division by exp(s), inverse Haar). No activations.
During training the projections are pulled towards orthogonality: the forward pass in training mode returns
`regularizer` = 0.1 * sum over the 8 projections of mean((G - I)^2), with G = W W^T or W^T W, whichever is the
smaller Gram; the R-D loss adds it (lictrain.losses). Otherwise training and inference are the same: the shortcuts
stay in compress/decompress, and the entropy model is TCM's.

Where lictrain differs: the Haar transform is written as reshapes (the public code uses fixed-filter grouped
convolutions: the same numbers); the projections are 1x1 convolutions (the public code applies nn.Linear to
flattened tokens: the same function and default initialisation); additions are out of place; an odd-sized input
is zero-padded before the Haar step (the public code needs sizes divisible by 16; coded images are padded to 64
either way, so this only matters for direct calls on odd sizes).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .numerics import at_least_fp32
from .tcm import TCM


def haar(x: torch.Tensor) -> torch.Tensor:
    """One level of the orthonormal 2-D Haar transform: (B, C, H, W) -> (B, 4C, H/2, W/2), channels [LL|LH|HL|HH]
    (LH: top row minus bottom row, HL: left column minus right column). An odd side is zero-padded at the
    bottom/right first, so the output has the size of TCM's stride-2 layers' output, ceil(H/2) x ceil(W/2)."""
    x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]  # top-left, top-right of each 2x2 block
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]  # bottom-left, bottom-right
    return 0.5 * torch.cat((a + b + c + d, a + b - c - d, a - b + c - d, a - b - c + d), dim=1)


def inverse_haar(z: torch.Tensor) -> torch.Tensor:
    """The inverse (and transpose) of haar: (B, 4C, H, W) -> (B, C, 2H, 2W)."""
    ll, lh, hl, hh = z.chunk(4, dim=1)
    b, c, h, w = ll.shape
    out = z.new_empty(b, c, 2 * h, 2 * w)
    out[..., 0::2, 0::2] = 0.5 * (ll + lh + hl + hh)
    out[..., 0::2, 1::2] = 0.5 * (ll + lh - hl - hh)
    out[..., 1::2, 0::2] = 0.5 * (ll - lh + hl - hh)
    out[..., 1::2, 1::2] = 0.5 * (ll - lh - hl + hh)
    return out


def _subband_gains(channels: int) -> nn.Parameter:
    """Log-gains of 4 * channels subband channels: 0.5 on LL, LH, HL and 0 on HH, as the public code starts."""
    s = torch.full((1, 4 * channels, 1, 1), 0.5)
    s[:, 3 * channels:] = 0.0
    return nn.Parameter(s)


def orthogonality_penalty(weight: torch.Tensor) -> torch.Tensor:
    """mean((G - I)^2) of the smaller Gram matrix of a (out, in) projection, in fp32 even under autocast: a bf16
    Gram is spaced 2^-7 near 1, so the penalty would stop seeing |G - I| below ~4e-3."""
    with torch.autocast(weight.device.type, enabled=False):
        w = at_least_fp32(weight.flatten(1))
        gram = w @ w.T if w.shape[0] < w.shape[1] else w.T @ w
        return (gram - torch.eye(gram.shape[0], device=w.device, dtype=w.dtype)).pow(2).mean()


class WaveletShortcut(nn.Module):
    """WLS: Haar, a gain per subband channel, a 1x1 projection to c_out channels (half the resolution)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.log_gain = _subband_gains(c_in)
        self.proj = nn.Conv2d(4 * c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(haar(x) * self.log_gain.exp())


class InverseWaveletShortcut(nn.Module):
    """iWLS: a 1x1 projection to 4 * c_out subband channels, the gains divided out, inverse Haar (twice the size)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.log_gain = _subband_gains(c_out)
        self.proj = nn.Conv2d(c_in, 4 * c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return inverse_haar(self.proj(x) / self.log_gain.exp())


class WithShortcuts(nn.Module):
    """A transform (the layers of a Sequential) with a chain of shortcuts fed by the transform's input: after layer
    after[k], the k-th shortcut's output is added to the transform's activations."""

    def __init__(self, layers: nn.Sequential, shortcuts: list[nn.Module], after: tuple[int, ...]):
        super().__init__()
        if len(shortcuts) != len(after) or sorted(after) != list(after) or after[-1] >= len(layers):
            raise ValueError(f"shortcut positions {after} do not fit {len(shortcuts)} shortcuts and "
                             f"{len(layers)} layers")
        self.layers, self.shortcuts, self.after = layers, nn.ModuleList(shortcuts), tuple(after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aux, k = x, 0
        for i, layer in enumerate(self.layers):
            x = layer(x)
            while k < len(self.after) and self.after[k] == i:
                aux = self.shortcuts[k](aux)
                x = x + aux
                k += 1
        return x


class TCMAuxT(TCM):
    """TCM (same arguments) with AuxT's shortcuts on both transforms; see the module docstring."""

    def __init__(self, *args, ortho_weight: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        n2, m = self.g_a[0].conv1.out_channels, self.M
        d = self.depths
        # the stride-2 layers of g_a; the last block of each stage of g_s and its output layer (the notes' indices)
        enc_after = (0, 1 + d[0], 2 + d[0] + d[1], 3 + d[0] + d[1] + d[2])
        dec_after = (d[3], 1 + d[3] + d[4], 2 + d[3] + d[4] + d[5], 3 + d[3] + d[4] + d[5])
        self.g_a = WithShortcuts(self.g_a, [WaveletShortcut(3, n2), WaveletShortcut(n2, n2),
                                            WaveletShortcut(n2, n2), WaveletShortcut(n2, m)], enc_after)
        self.g_s = WithShortcuts(self.g_s, [InverseWaveletShortcut(m, n2), InverseWaveletShortcut(n2, n2),
                                            InverseWaveletShortcut(n2, n2), InverseWaveletShortcut(n2, 3)], dec_after)
        self.ortho_weight = float(ortho_weight)

    def orthogonality_loss(self) -> torch.Tensor:
        """Sum of the 8 projections' orthogonality penalties (unweighted)."""
        return sum(orthogonality_penalty(s.proj.weight) for t in (self.g_a, self.g_s) for s in t.shortcuts)

    def forward(self, x: torch.Tensor) -> dict:
        out = super().forward(x)
        if self.training and self.ortho_weight:
            out["regularizer"] = self.ortho_weight * self.orthogonality_loss()
        return out
