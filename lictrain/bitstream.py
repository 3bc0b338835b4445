"""The compressed-file format of `lictrain compress` / `decompress`.

    magic   4 bytes  b"LICT"
    version 1 byte   (2; version 1, without the coding fields, is still read)
    length  varint   size of the rest before the checksum
    header           tree: {model, preset, metric, lmbda, height, width, fingerprint,
                            device, device_name, numeric, tables, choices}
    payload          tree: {strings, shape}  (CompressAI's compress() output, any nesting)
    crc32   4 bytes  big-endian CRC-32 of header + payload

A tree is a tagged, length-prefixed encoding of the values CompressAI returns (lists of lists of bytes, torch.Size,
dicts of those) and a few scalars, so every model's output round-trips without per-model code. `fingerprint` is 8
bytes of a hash of the weights: a file is never decoded with a model other than the one that wrote it. `device`
(cpu | cuda), `device_name` (the GPU's model) and `numeric` (the coding's numeric mode) say where and how it was
encoded, `tables` is a fingerprint of the entropy coder's tables and `choices` the digest of its table choices and
symbols (coding.py): a decoder on another device kind or mode, or with other tables, refuses the file, and one whose
choices differ refuses its own output.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import torch

from .errors import LictrainError

MAGIC = b"LICT"
VERSION = 2
READABLE = (1, 2)
CODING_KEYS = ("device", "device_name", "numeric", "tables", "choices")  # version 2 on


def _varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("varint must be non-negative")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _encode(v, out: bytearray) -> None:
    if isinstance(v, bool):
        raise TypeError("booleans are not encoded")
    if isinstance(v, (bytes, bytearray)):
        out += b"B" + _varint(len(v)) + bytes(v)
    elif isinstance(v, str):
        raw = v.encode()
        out += b"T" + _varint(len(raw)) + raw
    elif isinstance(v, int):
        out += b"I" + _varint((v << 1) ^ (v >> 63))  # zig-zag
    elif isinstance(v, float):
        out += b"F" + struct.pack(">d", v)
    elif isinstance(v, torch.Size):
        out += b"S" + _varint(len(v))
        for d in v:
            out += _varint(int(d))
    elif isinstance(v, (list, tuple)):
        out += b"L" + _varint(len(v))
        for x in v:
            _encode(x, out)
    elif isinstance(v, dict):
        out += b"D" + _varint(len(v))
        for k, x in v.items():
            _encode(str(k), out)
            _encode(x, out)
    else:
        raise TypeError(f"cannot encode {type(v).__name__}")


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise EOFError
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def varint(self) -> int:
        n, shift = 0, 0
        while True:
            b = self.take(1)[0]
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n
            if shift > 63:
                raise ValueError("varint too long")

    def tree(self, depth: int = 0):
        if depth > 16:
            raise ValueError("nesting too deep")
        tag = self.take(1)
        if tag == b"B":
            return self.take(self.varint())
        if tag == b"T":
            return self.take(self.varint()).decode()
        if tag == b"I":
            z = self.varint()
            return (z >> 1) ^ -(z & 1)
        if tag == b"F":
            return struct.unpack(">d", self.take(8))[0]
        if tag == b"S":
            return torch.Size([self.varint() for _ in range(self.varint())])
        if tag == b"L":
            return [self.tree(depth + 1) for _ in range(self.varint())]
        if tag == b"D":
            return {self.tree(depth + 1): self.tree(depth + 1) for _ in range(self.varint())}
        raise ValueError(f"unknown tag {tag!r}")


@dataclass
class Bitstream:
    header: dict  # model, preset, metric, lmbda, height, width, fingerprint, then CODING_KEYS
    strings: list
    shape: object

    def payload_bytes(self) -> int:
        """Bytes of entropy-coded data alone (what bpp counts, as in CompressAI's evaluation)."""

        def count(v):
            if isinstance(v, (bytes, bytearray)):
                return len(v)
            if isinstance(v, (list, tuple)):
                return sum(count(x) for x in v)
            return 0

        return count(self.strings)


def encode(bs: Bitstream) -> bytes:
    body = bytearray()
    _encode(bs.header, body)
    _encode({"strings": bs.strings, "shape": bs.shape}, body)
    return MAGIC + bytes([VERSION]) + _varint(len(body)) + bytes(body) + struct.pack(">I", zlib.crc32(body))


def decode(data: bytes, source: str = "input") -> Bitstream:
    if data[:4] != MAGIC:
        raise LictrainError(f"{source} is not a lictrain compressed file (bad magic number)")
    if len(data) < 5:
        raise LictrainError(f"{source} is truncated")
    if data[4] not in READABLE:
        raise LictrainError(f"{source} has format version {data[4]}; this lictrain reads versions "
                            f"{', '.join(map(str, READABLE))}")
    r = _Reader(data)
    r.pos = 5
    try:
        n = r.varint()
        body = r.take(n)
        (crc,) = struct.unpack(">I", r.take(4))
    except (EOFError, ValueError):
        raise LictrainError(f"{source} is truncated") from None
    if r.pos != len(data):
        raise LictrainError(f"{source} has {len(data) - r.pos} unexpected trailing bytes")
    if zlib.crc32(body) != crc:
        raise LictrainError(f"{source} is corrupted (checksum mismatch)")
    try:
        br = _Reader(body)
        header = br.tree()
        payload = br.tree()
        strings, shape = payload["strings"], payload["shape"]
        required = ("model", "preset", "lmbda", "height", "width", "fingerprint")
        required += CODING_KEYS if data[4] >= 2 else ()
        for key in required:
            header[key]
    except (EOFError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise LictrainError(f"{source} is malformed (checksum valid, structure not)") from None
    return Bitstream(header, strings, shape)
