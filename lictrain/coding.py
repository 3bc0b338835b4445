"""What makes a compressed file decode to what its encoder meant, on any machine, or refuse: the numeric settings
coding runs under, a fingerprint of the entropy coder's tables, and a digest of the coder's choices.

rANS decodes a symbol with the table the decoder chooses for it (from scales, means and contexts the decoder
computes itself); if that choice, or the table itself, differs from the encoder's in a single place, every later
symbol is garbage and nothing in the stream says so. The networks that make those choices compute in floating
point, whose last bits depend on the device (CPU or GPU, and which GPU or CPU), the kernels (TF32, oneDNN's bf16
products, cuDNN's algorithm) and the precision; the tables come from the model's own arithmetic. So:

- coding always runs in fp32 with autocast off, TF32 and oneDNN's reduced precisions off, cuDNN's deterministic
  algorithms without autotuning and torch's deterministic algorithms (warn-only: an op without a deterministic form
  still runs), whatever training used (`coding_numerics`); the coder's tables are built on the CPU (`Codec` in
  evaluation.py);
- the file header records the encoder's device kind and name, this numeric mode and a fingerprint of the coder's
  tables; the decoder refuses a file from another device kind or mode, or whose tables differ from its own, before
  decoding (bitstream.py, evaluation.py);
- `CodingDigest` hashes every table index handed to CompressAI's rANS coder and every symbol coded, in coding
  order, on both sides: the encoder writes its digest into the header and the decoder compares its own after
  decoding, so a choice or a symbol that differs anywhere (another GPU model, another library version) ends in a
  one-line error, never in an image. (A decoded image can still differ from the encoder's reconstruction by the
  rounding of the means added back to the symbols, which the digest does not see: last bits, not garbage.)
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import time
from array import array

import torch
import torch.nn as nn
from compressai import ans

from .precision import full_fp32, numeric_flags

NUMERIC_MODE = "fp32"  # what the header's `numeric` says: fp32, TF32 off, deterministic algorithms
TABLE_SUFFIXES = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")  # what update() derives


def device_name(device: torch.device) -> str:
    """The device as the header names it: the GPU's model, or 'cpu'."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def coding_numerics(device: torch.device) -> contextlib.ExitStack:
    """The context compress, decompress and the tables' construction run in (module docstring)."""
    stack = numeric_flags(device, tf32=False, deterministic=True, warn_only=True)
    stack.enter_context(full_fp32())
    stack.enter_context(torch.autocast(device.type, enabled=False))
    stack.enter_context(torch.no_grad())  # also required: some models (ELIC) fail in compress() with autograd on
    return stack


def tables_fingerprint(model: nn.Module) -> bytes:
    """8 bytes identifying the entropy coder's tables (the buffers update() derives), which the weights' fingerprint
    leaves out: encoder and decoder must code with equal tables."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in sorted(model.state_dict().items()):
        if name.endswith(TABLE_SUFFIXES):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.digest()


# The rANS entry points CompressAI's models and lictrain's (models/rans.py) code through: (class, method, side,
# position of the table indexes among the arguments). Encoders take the symbols first; decoders return them.
_ENTRY_POINTS = ((ans.RansEncoder, "encode_with_indexes", "encode", 1),
                 (ans.BufferedRansEncoder, "encode_with_indexes", "encode", 1),
                 (ans.RansDecoder, "decode_with_indexes", "decode", 1),
                 (ans.RansDecoder, "decode_stream", "decode", 0))
_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar("lictrain_coding_digests", default=())
_installed = False


def _recording(original, side: str, index_at: int):
    def recorded(coder, *args, **kwargs):
        t0 = time.perf_counter()
        out = original(coder, *args, **kwargs)
        seconds = time.perf_counter() - t0
        digests = _ACTIVE.get()
        for d in digests:
            d.coder_seconds += seconds
        if digests:
            indexes = kwargs["indexes"] if "indexes" in kwargs else args[index_at]
            symbols = args[0] if side == "encode" else out
            for d in digests:
                if d.side == side:
                    d.add(indexes, symbols)
        return out

    recorded.__wrapped__ = original
    return recorded


def _install() -> None:
    """Wrap the entry points once; each wrapper feeds the digests active in its own context (thread, task), so
    digests nest, and two codecs coding in two threads do not hear each other."""
    global _installed
    if not _installed:
        for cls, name, side, index_at in _ENTRY_POINTS:
            setattr(cls, name, _recording(getattr(cls, name), side, index_at))
        _installed = True


class CodingDigest:
    """Inside `with CodingDigest(side) as d:` every table index and every symbol that goes through the rANS coder's
    `side` ("encode" or "decode") goes into d (8 bytes, `d.digest()`). For one image the encoder encodes its symbols
    in the order the decoder decodes them, as every model coded through `Codec` does (decoders may take them in
    smaller pieces, which running hashes of the indexes and of the symbols do not see), so equal digests mean equal
    choices and equal symbols. Only one side is heard: encoders also decode (a hyperprior's z, to compute the
    decoder's scales). `coder_seconds` sums the time spent inside the rANS coder's calls, both sides: the entropy
    coding part of an encode or a decode (the rest is the networks and the preparation of symbols)."""

    def __init__(self, side: str):
        if side not in ("encode", "decode"):
            raise ValueError(f"side must be encode or decode, got {side!r}")
        self.side = side
        self._indexes = hashlib.blake2b(digest_size=8)
        self._symbols = hashlib.blake2b(digest_size=8)
        self._token = None
        self.coder_seconds = 0.0

    def add(self, indexes, symbols) -> None:
        self._indexes.update(array("i", indexes).tobytes())
        self._symbols.update(array("i", symbols).tobytes())

    def __enter__(self) -> "CodingDigest":
        _install()
        self._token = _ACTIVE.set(_ACTIVE.get() + (self,))
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)

    def digest(self) -> bytes:
        return hashlib.blake2b(self._indexes.digest() + self._symbols.digest(), digest_size=8).digest()
