"""The classical codecs lictrain measures as anchors: an 8-bit RGB image in, the coded bytes and the decoded image
out.

JPEG, WebP, AVIF and JPEG 2000 run in-process through Pillow's bindings (libjpeg-turbo, libwebp, libavif, OpenJPEG),
each at its library's default settings except the one rate knob; BPG runs through its `bpgenc`/`bpgdec` binaries
when they are on PATH. What each codec calls its quality differs, so each says how its knob maps to rate:
`rising` is True where a larger value spends more bits (JPEG/WebP/AVIF quality, JPEG 2000's target bpp) and False
where it spends fewer (BPG's quantiser). VTM and HM need their reference software and YUV conversion: lictrain
ships their published curves instead (published.py).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, features

from ..errors import LictrainError


@dataclass(frozen=True)
class ClassicalCodec:
    name: str
    label: str  # as plots and tables name it
    qualities: tuple  # the default sweep, low rate to high rate
    rising: bool  # True: a larger quality value spends more bits
    integer: bool  # the quality knob takes integers only
    limits: tuple  # the knob's range, for a search
    encode: Callable[[np.ndarray, float], bytes]
    decode: Callable[[bytes], np.ndarray]
    version: Callable[[], str | None]  # None: not available on this machine
    settings: str = ""  # what is not the library's default, for the results' description
    needs: str = ""  # what to install when unavailable

    def available(self) -> bool:
        return self.version() is not None

    def describe(self) -> str:
        return f"{self.label} ({self.version()}){'; ' + self.settings if self.settings else ''}"


def _pillow_encoder(fmt: str, **fixed):
    def encode(rgb: np.ndarray, quality: float) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format=fmt, quality=int(quality), **fixed)
        return buf.getvalue()
    return encode


def _pillow_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _jpeg2000_encode(rgb: np.ndarray, bpp: float) -> bytes:
    # Pillow's JPEG 2000 ignores quality= and is lossless by default: a rate is asked for as a compression ratio of
    # the 24-bit image (quality_mode "rates"), with the irreversible 9/7 wavelet and the colour transform (RGB to
    # YCbCr, mct=1) that lossy JPEG 2000 uses; without it OpenJPEG codes R, G and B apart, 2-4 dB worse on Kodak
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG2000", quality_mode="rates", quality_layers=[24.0 / bpp],
                              irreversible=True, mct=1)
    return buf.getvalue()


def _pillow_version(feature: str, library: str):
    return lambda: f"{library} {features.version(feature)} via Pillow" if features.check(feature) else None


def _jpeg_version():
    if not features.check("jpg"):
        return None
    if features.check_feature("libjpeg_turbo"):  # Pillow's "jpg" version is the libjpeg API's (6.2), not turbo's
        return f"libjpeg-turbo {features.version_feature('libjpeg_turbo')} via Pillow"
    return f"libjpeg {features.version('jpg')} via Pillow"


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True)
    if done.returncode != 0:
        why = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        raise LictrainError(f"{Path(cmd[0]).name} failed (exit {done.returncode}): {why[-1] if why else ''}")


def _bpg_encode(rgb: np.ndarray, qp: float) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.png", Path(tmp) / "out.bpg"
        Image.fromarray(rgb).save(src)
        # 4:4:4 YCbCr 8-bit with x265, the settings of CompressAI's published BPG curve
        _run(["bpgenc", "-o", str(out), "-q", str(int(qp)), "-f", "444", "-e", "x265", "-c", "ycbcr", "-b", "8",
              str(src)])
        return out.read_bytes()


def _bpg_decode(data: bytes) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.bpg", Path(tmp) / "out.png"
        src.write_bytes(data)
        _run(["bpgdec", "-o", str(out), str(src)])
        return _pillow_decode(out.read_bytes())


def _bpg_version():
    return "bpgenc on PATH" if shutil.which("bpgenc") and shutil.which("bpgdec") else None


CODECS: dict[str, ClassicalCodec] = {c.name: c for c in (
    ClassicalCodec("jpeg", "JPEG", (5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 95), True, True, (1, 95),
                   _pillow_encoder("JPEG"), _pillow_decode, _jpeg_version,
                   "4:2:0, baseline Huffman (Pillow's defaults)"),
    ClassicalCodec("webp", "WebP", (0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95), True, True, (0, 100),
                   _pillow_encoder("WEBP"), _pillow_decode, _pillow_version("webp", "libwebp"),
                   "lossy, method 4 (Pillow's defaults)"),
    ClassicalCodec("avif", "AVIF", (10, 20, 30, 40, 50, 60, 70, 80, 90), True, True, (0, 100),
                   _pillow_encoder("AVIF"), _pillow_decode, _pillow_version("avif", "libavif"),
                   "4:2:0, speed 6 (Pillow's defaults)"),
    ClassicalCodec("jpeg2000", "JPEG 2000", (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0), True, False,
                   (0.01, 8.0), _jpeg2000_encode, _pillow_decode, _pillow_version("jpg_2000", "OpenJPEG"),
                   "9/7 wavelet, YCbCr, one layer at the target rate (quality = target bpp)"),
    ClassicalCodec("bpg", "BPG", (47, 44, 41, 38, 35, 32, 29, 26, 23), False, True, (0, 51), _bpg_encode,
                   _bpg_decode, _bpg_version, "4:4:4 YCbCr, x265, 8 bit (quality = QP)",
                   needs="bpgenc and bpgdec on PATH (https://bellard.org/bpg/)"),
)}


def get_codec(name: str) -> ClassicalCodec:
    if name not in CODECS:
        raise LictrainError(f"unknown codec '{name}'; codecs: {', '.join(CODECS)} (VTM, HM, AV1: published curves, "
                            "lictrain anchors --list)")
    return CODECS[name]


def split_available(names: list[str]) -> tuple[list[ClassicalCodec], list[ClassicalCodec]]:
    """(available, unavailable) codecs among `names` (unknown names refused)."""
    codecs = [get_codec(n) for n in names]
    return [c for c in codecs if c.available()], [c for c in codecs if not c.available()]


def unavailable_line(codecs: list[ClassicalCodec]) -> str:
    return "unavailable here: " + "; ".join(f"{c.name} (needs {c.needs or 'a Pillow built with it'})" for c in codecs)
