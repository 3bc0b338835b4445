"""Per-image rANS streams for the models that code all of an image's latent symbols in one stream (TCM, DCAE,
FLIC): batches are coded image by image, so a batch's strings equal the strings of its images coded alone."""

from __future__ import annotations

import torch
from compressai.ans import BufferedRansEncoder, RansDecoder


def encode_images(symbols: torch.Tensor, indexes: torch.Tensor, tables: tuple[list, list, list]) -> list[bytes]:
    """One stream per image of (B, n) integer symbols with their (B, n) table indexes; tables = (cdfs, lengths,
    offsets) as CompressAI's coder takes them."""
    strings = []
    for image_symbols, image_indexes in zip(symbols.int().tolist(), indexes.int().tolist()):
        encoder = BufferedRansEncoder()
        encoder.encode_with_indexes(image_symbols, image_indexes, *tables)
        strings.append(encoder.flush())
    return strings


class ImageDecoders:
    """The decoders of a batch's streams, read in the order the encoder wrote: each `decode` call takes the next
    symbols of every image."""

    def __init__(self, strings: list[bytes], tables: tuple[list, list, list]):
        self.tables = tables
        self.decoders = []
        for s in strings:
            self.decoders.append(RansDecoder())
            self.decoders[-1].set_stream(s)

    def decode(self, indexes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Symbols shaped like `like` (B, ...), their table indexes `indexes` (same shape), as `like`'s dtype."""
        index = indexes.flatten(1).tolist()
        q = [d.decode_stream(idx, *self.tables) for d, idx in zip(self.decoders, index)]
        return torch.tensor(q, dtype=like.dtype, device=like.device).reshape(like.shape)
