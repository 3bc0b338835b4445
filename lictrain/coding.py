"""What makes a compressed file decode to what its encoder meant, on any machine, or refuse: the numeric settings
coding runs under, and a digest of the entropy coder's table choices.

rANS decodes a symbol with the table the decoder chooses for it (from scales, means and contexts the decoder
computes itself); if that choice differs from the encoder's in a single place, every later symbol is garbage and
nothing in the stream says so. The networks that make those choices compute in floating point, whose last bits
depend on the device (CPU or GPU, and which GPU), the kernels (TF32, cuDNN's algorithm) and the precision. So:

- coding always runs in fp32 with autocast off, TF32 off, cuDNN's deterministic algorithms without autotuning and
  torch's deterministic algorithms (warn-only: an op without a deterministic form still runs), whatever training
  used (`coding_numerics`); the coder's tables are built on the CPU (`Codec` in evaluation.py);
- the file header records the encoder's device kind and name and this numeric mode, and the decoder refuses a file
  from another device kind or mode before decoding (bitstream.py, evaluation.py);
- `TableDigest` hashes every table index handed to CompressAI's rANS coder, in coding order, on both sides: the
  encoder writes its digest into the header and the decoder compares its own after decoding, so a choice that
  differs anywhere (another GPU model, another library version) ends in a one-line error, never in an image.
"""

from __future__ import annotations

import contextlib
import hashlib
from array import array

import torch
from compressai import ans

from .precision import numeric_flags

NUMERIC_MODE = "fp32"  # what the header's `numeric` says: fp32, TF32 off, deterministic algorithms


def device_name(device: torch.device) -> str:
    """The device as the header names it: the GPU's model, or 'cpu'."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def coding_numerics(device: torch.device) -> contextlib.ExitStack:
    """The context compress and decompress run in (module docstring)."""
    stack = numeric_flags(device, tf32=False, deterministic=True, warn_only=True)
    stack.enter_context(torch.autocast(device.type, enabled=False))
    stack.enter_context(torch.no_grad())  # also required: some models (ELIC) fail in compress() with autograd on
    return stack


# The rANS entry points CompressAI's models and lictrain's (models/rans.py) code through, with the position of the
# table indexes among their arguments.
_ENTRY_POINTS = {
    "encode": ((ans.RansEncoder, "encode_with_indexes", 1), (ans.BufferedRansEncoder, "encode_with_indexes", 1)),
    "decode": ((ans.RansDecoder, "decode_with_indexes", 1), (ans.RansDecoder, "decode_stream", 0)),
}


class TableDigest:
    """Inside `with TableDigest(side) as d:` every table index passed to the rANS coder's `side` ("encode" or
    "decode") goes into d (8 bytes, `d.digest()`). The encoder encodes its symbols in the order the decoder
    decodes them (decoders may take them in smaller pieces, which a running hash does not see), so equal digests
    mean equal table choices. Only one side is heard: encoders also decode (a hyperprior's z, to compute the
    decoder's scales)."""

    def __init__(self, side: str):
        self._entry_points = _ENTRY_POINTS[side]
        self._hash = hashlib.blake2b(digest_size=8)
        self._saved: list = []

    def _wrap(self, original, position: int):
        digest = self._hash

        def recorded(coder, *args, **kwargs):
            indexes = kwargs["indexes"] if "indexes" in kwargs else args[position]
            digest.update(array("i", indexes).tobytes())
            return original(coder, *args, **kwargs)

        return recorded

    def __enter__(self) -> "TableDigest":
        for cls, name, position in self._entry_points:
            original = getattr(cls, name)
            self._saved.append((cls, name, original))
            setattr(cls, name, self._wrap(original, position))
        return self

    def __exit__(self, *exc) -> None:
        for cls, name, original in reversed(self._saved):
            setattr(cls, name, original)
        self._saved.clear()

    def digest(self) -> bytes:
        return self._hash.digest()
