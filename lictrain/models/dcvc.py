"""DCVC (Li, Li and Lu, "Deep Contextual Video Compression", NeurIPS 2021) on CompressAI's layers and entropy
models (issue 33): lictrain's own implementation, following the published inference code (microsoft/DCVC,
DCVC-family/DCVC/src/models/DCVC_net.py, MIT) in structure, widths and module names, so that its weights could be
mapped later.

A P-frame x is coded given the previous decoded frame (the reference):
1. motion: SpyNet estimates the flow from x to the reference (motion.ME_Spynet); the motion encoder (four stride-2
   3x3 convolutions with GDN, `mv` channels) gives the motion latent, coded with a hyperprior (a factorized
   density on its hyper-latent), a 5x5 masked autoregressive context and Laplace likelihoods; the motion decoder
   reconstructs the flow, and `mv_refine` corrects it from the reference (seven 3x3 convolutions, residual);
2. context: features of the reference (a 3x3 convolution and a residual block), warped by the decoded flow and
   refined (a residual block and a convolution), are the temporal context;
3. frame: the contextual encoder codes x concatenated with the context (5x5 stride-2 convolutions, GDN, residual
   blocks; M channels at 1/16); its latent's Laplace parameters come from a hyperprior, a temporal prior (the context
   encoded to 1/16) and a 5x5 masked autoregressive context; the contextual decoder (sub-pixel convolutions) and a
   second part fed the context again reconstruct x.

Differences from the published code, all in what it did not release (training): training uses CompressAI's
conventions (additive uniform noise for the likelihoods and the autoregressive context, as CompressAI's mbt2018
does; DCVC's inference code rounds; in eval mode the context sees round(y) while real coding sees
round(y - mean) + mean, so validation bits are an estimate, as mbt2018's are), and the hyper-latent densities are CompressAI's EntropyBottleneck with filters
(1, 1, 1), the same factorized family as DCVC's BitEstimator (per channel: softplus scales, biases, tanh factors,
a final sigmoid), with CompressAI's quantile (auxiliary) parameters in addition. Bit-streams are lictrain's own
(CompressAI's rANS coder). `forward` also returns the reference warped by the decoded flow in the pixel domain
(`warped`), which DCVC's first training stage (OpenDCVCs) minimises.

Presets: paper (mv 128, N 64, M 96, motion estimation and flow refinement at their published widths: 7,944,448
parameters without the quantiles, the published count), small and tiny (narrower, motion parts included; the same
structure and module names).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from compressai.ans import BufferedRansEncoder, RansDecoder
from compressai.entropy_models import EntropyBottleneck
from compressai.layers import GDN, MaskedConv2d, subpel_conv3x3
from compressai.models.base import CompressionModel

from .laplace import LaplaceConditional
from .motion import ME_Spynet, flow_warp, scaled

# flow: the width of motion estimation (SpyNet's levels) and of the flow refinement (mvDecoder_part2, 64 channels at
# full resolution) relative to the published ones; at 1 they are most of a narrow preset's cost (the paper's N, M, mv
# do not reach them)
PRESETS = {"paper": dict(N=64, M=96, mv=128, flow=1.0), "small": dict(N=32, M=48, mv=64, flow=0.5),
           "tiny": dict(N=16, M=24, mv=32, flow=0.25)}
KERNEL = 5  # the autoregressive contexts' masked convolutions
SCALE_MIN = 1e-5  # DCVC clamps its Laplace scales to [1e-5, 1e10]


class ResBlock(nn.Module):
    """ReLU, conv, ReLU, conv, plus the input (DCVC's ResBlock with equal widths)."""

    def __init__(self, channels: int, kernel: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv2d(channels, channels, kernel, padding=kernel // 2)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class ResBlockLeaky(nn.Module):
    """x + (conv, LeakyReLU 0.1, conv, LeakyReLU 0.1)(x) (DCVC's ResBlock_LeakyReLU_0_Point_1; module `conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.1),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.1))

    def forward(self, x):
        return x + self.conv(x)


def _down(a: int, b: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(a, b, k, stride=2, padding=k // 2)


def _up(a: int, b: int, k: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(a, b, k, stride=2, padding=k // 2, output_padding=1)


def _hyper_analysis(a: int, n: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(a, n, 3, padding=1), nn.LeakyReLU(), _down(n, n, 5), nn.LeakyReLU(),
                         _down(n, n, 5))


def _entropy_parameters(c: int) -> nn.Sequential:
    """1x1 convolutions 4c -> 10c/3 -> 8c/3 -> 2c (means, scales)."""
    return nn.Sequential(nn.Conv2d(c * 12 // 3, c * 10 // 3, 1), nn.LeakyReLU(),
                         nn.Conv2d(c * 10 // 3, c * 8 // 3, 1), nn.LeakyReLU(), nn.Conv2d(c * 8 // 3, c * 6 // 3, 1))


class DCVC(CompressionModel):
    downsampling_factor = 64  # the hyper-latents sit at 1/64 of the frame
    lictrain_transforms = ("contextualEncoder", "contextualDecoder_part1")

    def __init__(self, N: int = 64, M: int = 96, mv: int = 128, flow: float = 1.0):
        super().__init__()
        self.N, self.M, self.mv = N, M, mv
        self.opticFlow = ME_Spynet(width=flow)
        gdn_down = lambda a, b, k: [_down(a, b, k), GDN(b)]  # noqa: E731
        gdn_up = lambda a, b, k: [_up(a, b, k), GDN(b, inverse=True)]  # noqa: E731
        self.mvEncoder = nn.Sequential(*gdn_down(2, mv, 3), *gdn_down(mv, mv, 3), *gdn_down(mv, mv, 3),
                                       _down(mv, mv, 3))
        self.mvDecoder_part1 = nn.Sequential(*gdn_up(mv, mv, 3), *gdn_up(mv, mv, 3), *gdn_up(mv, mv, 3),
                                             _up(mv, 2, 3))
        r = scaled(64, flow)
        refine: list[nn.Module] = [nn.Conv2d(5, r, 3, padding=1), nn.LeakyReLU(0.1)]
        for _ in range(5):
            refine += [nn.Conv2d(r, r, 3, padding=1), nn.LeakyReLU(0.1)]
        self.mvDecoder_part2 = nn.Sequential(*refine, nn.Conv2d(r, 2, 3, padding=1))
        self.mvpriorEncoder = _hyper_analysis(mv, N)
        self.mvpriorDecoder = nn.Sequential(_up(N, N, 5), nn.LeakyReLU(), _up(N, N * 3 // 2, 5), nn.LeakyReLU(),
                                            nn.ConvTranspose2d(N * 3 // 2, mv * 2, 3, padding=1))
        self.auto_regressive_mv = MaskedConv2d(mv, 2 * mv, kernel_size=KERNEL, padding=KERNEL // 2)
        self.entropy_parameters_mv = _entropy_parameters(mv)
        self.bitEstimator_z_mv = EntropyBottleneck(N, filters=(1, 1, 1))

        self.feature_extract = nn.Sequential(nn.Conv2d(3, N, 3, padding=1), ResBlock(N))
        self.context_refine = nn.Sequential(ResBlock(N), nn.Conv2d(N, N, 3, padding=1))
        self.contextualEncoder = nn.Sequential(*gdn_down(N + 3, N, 5), ResBlockLeaky(N), *gdn_down(N, N, 5),
                                               ResBlockLeaky(N), *gdn_down(N, N, 5), _down(N, M, 5))
        self.contextualDecoder_part1 = nn.Sequential(
            subpel_conv3x3(M, N, 2), GDN(N, inverse=True), subpel_conv3x3(N, N, 2), GDN(N, inverse=True),
            ResBlockLeaky(N), subpel_conv3x3(N, N, 2), GDN(N, inverse=True), ResBlockLeaky(N),
            subpel_conv3x3(N, N, 2))
        self.contextualDecoder_part2 = nn.Sequential(nn.Conv2d(2 * N, N, 3, padding=1), ResBlock(N), ResBlock(N),
                                                     nn.Conv2d(N, 3, 3, padding=1))
        self.priorEncoder = _hyper_analysis(M, N)
        self.priorDecoder = nn.Sequential(_up(N, M, 5), nn.LeakyReLU(), _up(M, M, 5), nn.LeakyReLU(),
                                          nn.ConvTranspose2d(M, M, 3, padding=1))
        self.temporalPriorEncoder = nn.Sequential(*gdn_down(N, N, 5), *gdn_down(N, N, 5), *gdn_down(N, N, 5),
                                                  _down(N, M, 5))
        self.auto_regressive = MaskedConv2d(M, 2 * M, kernel_size=KERNEL, padding=KERNEL // 2)
        self.entropy_parameters = _entropy_parameters(M)
        self.bitEstimator_z = EntropyBottleneck(N, filters=(1, 1, 1))
        self.gaussian_encoder = LaplaceConditional(None, scale_bound=SCALE_MIN)

    # ---- the pieces --------------------------------------------------------------------------------------------
    def mv_refine(self, ref: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
        return self.mvDecoder_part2(torch.cat((mv, ref), 1)) + mv

    def motioncompensation(self, ref: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
        return self.context_refine(flow_warp(self.feature_extract(ref), mv))

    def _laplace_params(self, net: nn.Module, prior: torch.Tensor, ctx: torch.Tensor):
        means, scales = net(torch.cat((prior, ctx), dim=1)).chunk(2, 1)  # (DCVC's order: means first)
        return means, scales

    def _latent(self, y, prior, context_net, params_net):
        """Training/evaluation pass of an autoregressive latent: y_hat (noise in training, rounding around the
        means otherwise, as CompressAI's mbt2018), its likelihoods."""
        y_hat = self.gaussian_encoder.quantize(y, "noise" if self.training else "dequantize")
        means, scales = self._laplace_params(params_net, prior, context_net(y_hat))
        _, likelihoods = self.gaussian_encoder(y, scales, means)
        if not self.training:  # what the decoder receives: rounded around the predicted means
            y_hat = self.gaussian_encoder.quantize(y, "dequantize", means)
        return y_hat, likelihoods

    def forward(self, ref: torch.Tensor, x: torch.Tensor) -> dict:
        """ref: the reference (previously decoded frame), x: the frame to code; both N x 3 x H x W, H and W multiples
        of 64. Returns x_hat, likelihoods (mv_y, mv_z, y, z), the decoded flow and the reference warped by it."""
        flow = self.opticFlow(x, ref)
        mv_y = self.mvEncoder(flow)
        mv_z_hat, mv_z_likelihoods = self.bitEstimator_z_mv(self.mvpriorEncoder(mv_y))
        mv_y_hat, mv_y_likelihoods = self._latent(mv_y, self.mvpriorDecoder(mv_z_hat), self.auto_regressive_mv,
                                                  self.entropy_parameters_mv)
        mv_hat = self.mv_refine(ref, self.mvDecoder_part1(mv_y_hat))
        context = self.motioncompensation(ref, mv_hat)
        temporal = self.temporalPriorEncoder(context)
        y = self.contextualEncoder(torch.cat((x, context), dim=1))
        z_hat, z_likelihoods = self.bitEstimator_z(self.priorEncoder(y))
        y_hat, y_likelihoods = self._latent(y, torch.cat((temporal, self.priorDecoder(z_hat)), dim=1),
                                            self.auto_regressive, self.entropy_parameters)
        x_hat = self.contextualDecoder_part2(torch.cat((self.contextualDecoder_part1(y_hat), context), dim=1))
        return {"x_hat": x_hat, "likelihoods": {"mv_y": mv_y_likelihoods, "mv_z": mv_z_likelihoods,
                                                "y": y_likelihoods, "z": z_likelihoods},
                "flow": mv_hat, "warped": flow_warp(ref, mv_hat), "context": context}

    # ---- real bit-streams ----------------------------------------------------------------------------------------
    def _code_ar(self, y: torch.Tensor | None, prior: torch.Tensor, context_net: MaskedConv2d, params_net: nn.Module,
                 channels: int, stream: bytes | None = None):
        """Raster-scan coding of one latent (batch 1) with its 5x5 context: encode y (returns the string and
        y_hat) or decode `stream` (returns y_hat). Encoder and decoder run the same arithmetic in the same order."""
        pad = KERNEL // 2
        h, w = prior.shape[-2:]
        y_hat = prior.new_zeros(1, channels, h + 2 * pad, w + 2 * pad)
        cond = self.gaussian_encoder
        cdf, lengths, offsets = cond.quantized_cdf.tolist(), cond.cdf_length.tolist(), cond.offset.tolist()
        weight = context_net.weight * context_net.mask
        encoder = BufferedRansEncoder() if stream is None else None
        decoder = None
        if stream is not None:
            decoder = RansDecoder()
            decoder.set_stream(stream)
        for i in range(h):
            for j in range(w):
                ctx = F.conv2d(y_hat[:, :, i : i + KERNEL, j : j + KERNEL], weight, bias=context_net.bias)
                means, scales = self._laplace_params(params_net, prior[:, :, i : i + 1, j : j + 1], ctx)
                means, scales = means.flatten(1), scales.flatten(1)
                indexes = cond.build_indexes(scales).flatten().tolist()
                if encoder is not None:
                    q = cond.quantize(y[:, :, i, j], "symbols", means)
                    encoder.encode_with_indexes(q.flatten().tolist(), indexes, cdf, lengths, offsets)
                else:
                    q = torch.tensor(decoder.decode_stream(indexes, cdf, lengths, offsets),
                                     dtype=torch.int32, device=prior.device).view(1, channels)
                y_hat[:, :, i + pad, j + pad] = cond.dequantize(q, means)
        y_hat = y_hat[:, :, pad:-pad, pad:-pad]
        return (encoder.flush(), y_hat) if encoder is not None else y_hat

    @torch.no_grad()
    def compress(self, ref: torch.Tensor, x: torch.Tensor) -> dict:
        """One P-frame (batch 1) to four strings (mv_y, mv_z, y, z); `shape` is what decompress needs."""
        if x.shape[0] != 1:
            raise ValueError("DCVC codes one frame at a time (batch 1)")
        mv_y = self.mvEncoder(self.opticFlow(x, ref))
        mv_z = self.mvpriorEncoder(mv_y)
        mv_z_string = self.bitEstimator_z_mv.compress(mv_z)
        mv_z_hat = self.bitEstimator_z_mv.decompress(mv_z_string, mv_z.shape[-2:])
        mv_y_string, mv_y_hat = self._code_ar(mv_y, self.mvpriorDecoder(mv_z_hat), self.auto_regressive_mv,
                                              self.entropy_parameters_mv, self.mv)
        mv_hat = self.mv_refine(ref, self.mvDecoder_part1(mv_y_hat))
        context = self.motioncompensation(ref, mv_hat)
        y = self.contextualEncoder(torch.cat((x, context), dim=1))
        z = self.priorEncoder(y)
        z_string = self.bitEstimator_z.compress(z)
        z_hat = self.bitEstimator_z.decompress(z_string, z.shape[-2:])
        prior = torch.cat((self.temporalPriorEncoder(context), self.priorDecoder(z_hat)), dim=1)
        y_string, y_hat = self._code_ar(y, prior, self.auto_regressive, self.entropy_parameters, self.M)
        x_hat = self.contextualDecoder_part2(torch.cat((self.contextualDecoder_part1(y_hat), context), dim=1))
        # x_hat: the encoder's reconstruction, the next frame's reference in a low-delay GOP (the decoder's must equal
        # it bit for bit)
        return {"strings": [[mv_y_string], mv_z_string, [y_string], z_string], "shape": tuple(z.shape[-2:]),
                "x_hat": x_hat.clamp(0, 1)}

    @torch.no_grad()
    def decompress(self, ref: torch.Tensor, strings: list, shape: tuple[int, int]) -> dict:
        mv_y_strings, mv_z_string, y_strings, z_string = strings
        mv_z_hat = self.bitEstimator_z_mv.decompress(mv_z_string, shape)
        mv_y_hat = self._code_ar(None, self.mvpriorDecoder(mv_z_hat), self.auto_regressive_mv,
                                 self.entropy_parameters_mv, self.mv, stream=mv_y_strings[0])
        mv_hat = self.mv_refine(ref, self.mvDecoder_part1(mv_y_hat))
        context = self.motioncompensation(ref, mv_hat)
        z_hat = self.bitEstimator_z.decompress(z_string, shape)
        prior = torch.cat((self.temporalPriorEncoder(context), self.priorDecoder(z_hat)), dim=1)
        y_hat = self._code_ar(None, prior, self.auto_regressive, self.entropy_parameters, self.M,
                              stream=y_strings[0])
        x_hat = self.contextualDecoder_part2(torch.cat((self.contextualDecoder_part1(y_hat), context), dim=1))
        return {"x_hat": x_hat.clamp(0, 1)}
