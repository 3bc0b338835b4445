import pytest
import torch

from lictrain import bitstream
from lictrain.errors import LictrainError


def header(**kw):
    h = dict(model="elic", preset="tiny", metric="mse", lmbda=0.013, height=500, width=741, fingerprint=b"\x01" * 8,
             device="cpu", device_name="cpu", numeric="fp32", tables=b"\x02" * 8, choices=b"\x03" * 8)
    h.update(kw)
    return h


def test_round_trip_of_nested_compressai_outputs():
    strings = [[b"abc", b""], [b"\x00\xff" * 300], [[b"x"], [b"yz"]]]
    shape = {"y": [torch.Size([4, 4, 4]), torch.Size([32, 4, 4])], "hyper": torch.Size([1, 1])}
    bs = bitstream.Bitstream(header(), strings, shape)
    back = bitstream.decode(bitstream.encode(bs))
    assert back.header == bs.header and back.strings == strings and back.shape == shape
    assert isinstance(back.shape["hyper"], torch.Size)
    assert back.payload_bytes() == 3 + 600 + 3


def test_integers_and_floats_round_trip_exactly():
    h = header(height=2**40, width=1, lmbda=0.0483)
    back = bitstream.decode(bitstream.encode(bitstream.Bitstream(h, [[b"a"]], torch.Size([-3 + 5, 7]))))
    assert back.header["height"] == 2**40 and back.header["lmbda"] == 0.0483


def test_every_single_bit_flip_is_detected():
    data = bitstream.encode(bitstream.Bitstream(header(), [[b"hello"]], torch.Size([2, 3])))
    for i in range(len(data)):
        for bit in (0, 7):
            bad = data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :]
            with pytest.raises(LictrainError):
                bitstream.decode(bad)


def test_missing_header_field_is_malformed():
    body = bytearray()
    bitstream._encode({"model": "x"}, body)
    bitstream._encode({"strings": [], "shape": torch.Size([1])}, body)
    import struct
    import zlib

    data = bitstream.MAGIC + bytes([1]) + bitstream._varint(len(body)) + bytes(body) + struct.pack(">I", zlib.crc32(body))
    with pytest.raises(LictrainError, match="malformed"):
        bitstream.decode(data)


def _file(version: int, head: dict) -> bytes:
    import struct
    import zlib

    body = bytearray()
    bitstream._encode(head, body)
    bitstream._encode({"strings": [[b"a"]], "shape": torch.Size([1])}, body)
    return bitstream.MAGIC + bytes([version]) + bitstream._varint(len(body)) + bytes(body) + struct.pack(
        ">I", zlib.crc32(body))


def test_version_2_needs_the_coding_fields_and_version_1_files_still_read():
    old = {k: v for k, v in header().items() if k not in bitstream.CODING_KEYS}
    assert bitstream.decode(_file(1, old)).header == old  # written before the coding fields existed
    with pytest.raises(LictrainError, match="malformed"):
        bitstream.decode(_file(2, old))
    with pytest.raises(LictrainError, match="format version 3; this lictrain reads versions 1, 2"):
        bitstream.decode(_file(3, header()))
