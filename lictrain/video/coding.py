"""Real bit-streams for a group of pictures (issue 33): I-frames by an image codec (lictrain.evaluation.Codec, any
image checkpoint), the frames between by a P-frame model (DCVC) in low-delay order, each P-frame predicted from the
previous decoded frame.

The encoder keeps, as every frame's reference, exactly what the decoder will have: an I-frame's decoded image (the
image codec decodes it bit-exactly, or refuses), a P-frame's encoder-side reconstruction (DCVC's compress returns
it; its decoder rebuilds it bit-exactly). Frames are replicate-padded to the P-frame model's multiple (64) and the
padded reconstruction is the next reference on both sides; outputs are cropped back.

A P-frame packet: its latent grid (two uint16) and its four strings (motion latent, motion hyper-latent, frame
latent, frame hyper-latent), each a uint32 length and the bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import torch

from .. import bitstream
from ..data import crop_to, pad_to_multiple
from ..errors import LictrainError
from ..losses import psnr_from_mse

P_MULTIPLE = 64


def pack_pframe(strings: list, shape: tuple[int, int]) -> bytes:
    mv_y, mv_z, y, z = strings
    parts = [mv_y[0], mv_z[0], y[0], z[0]]
    return struct.pack("<HH", *shape) + b"".join(struct.pack("<I", len(s)) + s for s in parts)


def unpack_pframe(data: bytes) -> tuple[list, tuple[int, int]]:
    try:
        h, w = struct.unpack_from("<HH", data, 0)
        offset, parts = 4, []
        for _ in range(4):
            (n,) = struct.unpack_from("<I", data, offset)
            offset += 4
            if offset + n > len(data):
                raise struct.error("short")
            parts.append(data[offset : offset + n])
            offset += n
    except struct.error:
        raise LictrainError("truncated P-frame packet") from None
    return [[parts[0]], [parts[1]], [parts[2]], [parts[3]]], (h, w)


@dataclass
class CodedSequence:
    packets: list[bytes]  # one per frame, in coding order (= display order: low delay)
    kinds: list[str]  # "I" or "P"
    height: int
    width: int
    recon: list[torch.Tensor] = field(default_factory=list)  # the encoder's reconstructions (3 x H x W)
    # per frame, the bits the models' likelihoods predict for it (-sum log2 of the evaluation pass's likelihoods, on
    # the same reference): what training optimises, beside what the coder spends
    estimated_bits: list[float] = field(default_factory=list)

    def bits(self) -> list[int]:
        return [8 * len(p) for p in self.packets]


def _padded(x: torch.Tensor) -> torch.Tensor:
    return pad_to_multiple(x.unsqueeze(0), P_MULTIPLE)


@torch.no_grad()
def encode_sequence(iframe, pframe, frames: list[torch.Tensor], intra_period: int) -> CodedSequence:
    """frames: 3 x H x W tensors in [0, 1]; iframe: an evaluation.Codec; pframe: a DCVC model (update() done)."""
    if intra_period < 1:
        raise LictrainError(f"the intra period must be at least 1, got {intra_period}")
    _on_cpu(pframe)
    h, w = frames[0].shape[-2:]
    out = CodedSequence([], [], h, w)
    ref = None
    for t, x in enumerate(frames):
        if t % intra_period == 0:
            bs = iframe.compress(x)
            data = bitstream.encode(bs)
            rec = iframe.decompress(bitstream.decode(data)).cpu()
            ref = _padded(rec)
            out.kinds.append("I")
            out.estimated_bits.append(iframe.estimated_bpp(x) * h * w)
        else:
            out.estimated_bits.append(float(sum(-torch.log2(v).sum() for v in pframe(ref, _padded(x))["likelihoods"]
                                                .values())))
            coded = pframe.compress(ref, _padded(x))
            data = pack_pframe(coded["strings"], coded["shape"])
            ref = coded["x_hat"]
            rec = crop_to(ref, h, w)[0]
            out.kinds.append("P")
        out.packets.append(data)
        out.recon.append(rec)
    return out


def _on_cpu(pframe) -> None:
    # the image codec guards coding across devices (evaluation.Codec); the P-frame path has no such guard yet, so
    # it codes where encoder and decoder are known to compute the same numbers: the CPU
    if next(pframe.parameters()).device.type != "cpu":
        raise LictrainError("P-frame coding runs on the CPU for now (a GPU's networks may differ from the decoder's "
                            "in the last bits, which would desynchronise the entropy decoder)")


@torch.no_grad()
def decode_sequence(iframe, pframe, coded: CodedSequence) -> list[torch.Tensor]:
    _on_cpu(pframe)
    frames, ref = [], None
    for data, kind in zip(coded.packets, coded.kinds):
        if kind == "I":
            rec = iframe.decompress(bitstream.decode(data)).cpu()
            ref = _padded(rec)
        else:
            if ref is None:
                raise LictrainError("a P-frame before any I-frame: the sequence does not start with an intra frame")
            strings, shape = unpack_pframe(data)
            ref = pframe.decompress(ref, strings, shape)["x_hat"]
            rec = crop_to(ref, coded.height, coded.width)[0]
        frames.append(rec)
    return frames


def sequence_metrics(frames: list[torch.Tensor], coded: CodedSequence) -> dict:
    """bpp and PSNR-RGB per frame and over the sequence (bits over all pixels; PSNR as the mean over frames, the
    video papers' convention)."""
    pixels = coded.height * coded.width
    psnr = [psnr_from_mse(float(torch.mean((r.clamp(0, 1) - x) ** 2))) for r, x in zip(coded.recon, frames)]
    bits = coded.bits()
    return {"bpp": sum(bits) / (pixels * len(frames)), "psnr_rgb": sum(psnr) / len(psnr),
            "bpp_estimated": sum(coded.estimated_bits) / (pixels * len(frames)),
            "frames": [{"kind": k, "bpp": b / pixels, "bpp_estimated": e / pixels, "psnr_rgb": p}
                       for k, b, e, p in zip(coded.kinds, bits, coded.estimated_bits, psnr)]}
