"""Evaluation with real bitstreams, and single-image compress / decompress.

For each image: replicate-pad to the model's stride, `compress` (CompressAI's entropy coder), `decompress`, crop back.
bpp counts the bytes of the entropy-coded strings (as CompressAI's own evaluation does; the file format's ~60-byte
header is reported separately); PSNR and MS-SSIM are computed on the 8-bit RGB reconstruction against the 8-bit
original. Results go to a per-image CSV and a summary JSON in CompressAI's results format, one R-D point per
checkpoint, so several lambdas form one curve.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import bitstream
from .coding import NUMERIC_MODE, CodingDigest, coding_numerics, device_name, tables_fingerprint
from .checkpoint import (
    Checkpoint, checkpoint_config, load_checkpoint, model_from_checkpoint, weights_fingerprint,
)
from .io import WritingThrough, strict_json, write_atomic
from .data import EvalImages, crop_to, load_rgb, pad_to_multiple, to_tensor
from .errors import LictrainError
from .losses import MS_SSIM_MIN_SIDE, bpp_from_likelihoods, ms_ssim_value, psnr_8bit, quantize_8bit
from .models import canonical_name, downsampling


LOSSLESS_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class ImageResult:
    checkpoint: str  # as given to evaluate (a run folder or a checkpoint file): which R-D point this row belongs to
    image: str
    lmbda: float
    height: int
    width: int
    bytes: int
    bpp: float
    bpp_estimated: float
    psnr_rgb: float
    ms_ssim_rgb: float
    encoding_time: float
    decoding_time: float
    encoding_time_coder: float  # of encoding_time, inside the rANS coder (the rest: networks, symbol preparation)
    decoding_time_coder: float


class Codec:
    """A trained model ready for entropy coding (update() done once), plus its identity for the file header.

    The entropy coder runs on the CPU in any case; `device` is where the networks run. Coding is exact only where the
    decoder's networks compute the encoder's numbers (coding.py): the tables are built on the CPU whatever the
    device, coding runs under coding.coding_numerics, and a file is refused on another device kind or numeric mode
    or with other tables (before decoding) and when the decoder's choices differ from the encoder's (after)."""

    def __init__(self, model, name: str, preset: str, metric: str = "mse", lmbda: float = 0.0, device: str = "cpu"):
        try:
            self.device = torch.device(device)
        except RuntimeError:
            raise LictrainError(f"unknown device '{device}' (cpu, cuda, cuda:N)") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise LictrainError(f"device '{device}' asked for, but this machine has no CUDA device")
        # the tables from CPU arithmetic in full fp32 on every machine, then moved: a table built on a GPU (or with
        # reduced-precision products) may differ in a bit
        self.model = model.cpu().eval()
        with coding_numerics(torch.device("cpu")):
            self.model.update(force=True)
        self.model.to(self.device)
        self.name, self.preset, self.metric, self.lmbda = canonical_name(name), preset, metric, float(lmbda)
        self.multiple = downsampling(name)
        self.fingerprint = weights_fingerprint(self.model)
        self.tables = tables_fingerprint(self.model)
        self.coder_seconds = 0.0

    @classmethod
    def from_checkpoint(cls, ckpt: dict, use_ema: bool = True, device: str = "cpu") -> "Codec":
        cfg = checkpoint_config(ckpt)
        model = model_from_checkpoint(ckpt, use_ema=use_ema)
        return cls(model, cfg.model.name, cfg.model.preset, cfg.loss.metric, cfg.loss.lmbda, device)

    def _where(self, header: dict | None = None) -> str:
        hd = header or {"device": self.device.type, "device_name": device_name(self.device), "numeric": NUMERIC_MODE}
        return f"{hd['device_name']} ({hd['device']}, {hd['numeric']})"

    def compress(self, x: torch.Tensor) -> bitstream.Bitstream:
        h, w = x.shape[-2:]
        with coding_numerics(self.device), CodingDigest("encode") as choices:
            out = self.model.compress(pad_to_multiple(x.unsqueeze(0).to(self.device), self.multiple))
        self.coder_seconds = choices.coder_seconds  # the last call's entropy-coding time
        header = dict(model=self.name, preset=self.preset, metric=self.metric, lmbda=float(self.lmbda),
                      height=int(h), width=int(w), fingerprint=self.fingerprint, device=self.device.type,
                      device_name=device_name(self.device), numeric=NUMERIC_MODE, tables=self.tables,
                      choices=choices.digest())
        return bitstream.Bitstream(header, out["strings"], out["shape"])

    def decompress(self, bs: bitstream.Bitstream, source: str = "input") -> torch.Tensor:
        hd = bs.header
        if (hd["model"], hd["preset"]) != (self.name, self.preset):
            raise LictrainError(
                f"{source} was encoded with another model ({hd['model']}/{hd['preset']}, lmbda={hd['lmbda']}); "
                f"this checkpoint is {self.name}/{self.preset}, lmbda={self.lmbda}"
            )
        if hd["fingerprint"] != self.fingerprint:
            raise LictrainError(
                f"{source} was encoded with other weights of {self.name}/{self.preset} (fingerprint "
                f"{hd['fingerprint'].hex()}, lmbda={hd['lmbda']}); this checkpoint's weights are "
                f"{self.fingerprint.hex()} (lmbda={self.lmbda})")
        coded = "device" in hd  # format version 2 on
        if coded and (hd["device"], hd["numeric"]) != (self.device.type, NUMERIC_MODE):
            remedy = (f"decode it with --device {hd['device']}" if hd["device"] != self.device.type else
                      f"it needs a decoder that codes in {hd['numeric']}")
            raise LictrainError(
                f"{source} was encoded on {self._where(hd)}; decoding on {self._where()} would desynchronise the "
                f"entropy decoder (the networks' last bits differ): {remedy}")
        if coded and hd["tables"] != self.tables:
            raise LictrainError(
                f"{source} was encoded with other entropy-coder tables than this checkpoint's (fingerprint "
                f"{hd['tables'].hex()}, here {self.tables.hex()}: another torch, CompressAI or lictrain version builds "
                f"them differently); decode it where it was encoded")
        try:
            with coding_numerics(self.device), CodingDigest("decode") as choices:
                x_hat = self.model.decompress(bs.strings, bs.shape)["x_hat"]
            self.coder_seconds = choices.coder_seconds
        except Exception as e:  # a structurally valid file whose payload does not fit the model
            raise LictrainError(f"{source} could not be decoded: {str(e).splitlines()[0][:200]}") from None
        if coded and choices.digest() != hd["choices"]:
            raise LictrainError(
                f"{source} did not decode: the entropy decoder's table choices or symbols differ from the encoder's "
                f"(encoded on {self._where(hd)}, decoded on {self._where()}: the networks' last bits differ between "
                f"them); decode it on the encoder's kind of device")
        return crop_to(x_hat, hd["height"], hd["width"])[0].clamp(0, 1).cpu()

    @torch.no_grad()
    def estimated_bpp(self, x: torch.Tensor) -> float:
        h, w = x.shape[-2:]
        out = self.model(pad_to_multiple(x.unsqueeze(0).to(self.device), self.multiple))
        return bpp_from_likelihoods(out["likelihoods"], h * w).item()


def evaluate_image(codec: Codec, x: torch.Tensor, name: str, checkpoint: str = "") -> tuple[ImageResult, torch.Tensor]:
    h, w = x.shape[-2:]
    t0 = time.perf_counter()
    bs = codec.compress(x)
    t1 = time.perf_counter()
    enc_coder = codec.coder_seconds
    x_hat = codec.decompress(bs)  # ends on the CPU: a GPU's work is finished when the clock is read
    t2 = time.perf_counter()
    nbytes = bs.payload_bytes()
    ms = float("nan")
    if min(h, w) >= MS_SSIM_MIN_SIDE:
        ms = ms_ssim_value(quantize_8bit(x_hat)[None] / 255, quantize_8bit(x)[None] / 255).item()
    res = ImageResult(
        checkpoint=checkpoint, image=name, lmbda=codec.lmbda, height=h, width=w, bytes=nbytes, bpp=nbytes * 8 / (h * w),
        bpp_estimated=codec.estimated_bpp(x), psnr_rgb=psnr_8bit(x, x_hat), ms_ssim_rgb=ms,
        encoding_time=t1 - t0, decoding_time=t2 - t1, encoding_time_coder=enc_coder,
        decoding_time_coder=codec.coder_seconds,
    )
    return res, x_hat


def cpu_name() -> str:
    """The CPU's model as the system names it (Linux's /proc/cpuinfo), else the platform's word for it."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def timing_line(summary: dict) -> str:
    """How the evaluation's times were taken, and the entropy coder's share of them."""
    r, t = summary["results"], summary.get("timing")
    if not t or "encoding_time_coder" not in r:
        return ""
    enc, dec = sum(r["encoding_time"]), sum(r["decoding_time"])
    share = lambda part, whole: f"{100 * part / whole:.0f}%" if whole > 0 else "n/a"  # noqa: E731
    return (f"timing: {t['device']} ({t['device_kind']}), {t['threads']} threads, after {t['warmup_images']} warm-up "
            f"image; the entropy coder took {share(sum(r['encoding_time_coder']), enc)} of encoding and "
            f"{share(sum(r['decoding_time_coder']), dec)} of decoding (the rest: networks, symbol preparation)")


def evaluate(
    checkpoints: list, data: str, out_dir: str | Path, use_ema: bool = True, name: str | None = None,
    progress: bool = True, max_images: int | None = None, device: str = "cpu",
) -> dict:
    """Evaluate one checkpoint per R-D point (paths, or Checkpoint objects already read) on an image folder; write
    per_image.csv and results.json."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    dataset = EvalImages(data, max_images=max_images)
    # paths (each row names it as given) or checkpoints already read (named by their file)
    loaded = [(str(c.path), c) if isinstance(c, Checkpoint) else (str(c), Checkpoint.load(c)) for c in checkpoints]
    pairs = sorted(((label, Codec.from_checkpoint(c.data, use_ema, device)) for label, c in loaded),
                   key=lambda pc: pc[1].lmbda)
    labels, codecs = [label for label, _ in pairs], [codec for _, codec in pairs]
    rows: list[ImageResult] = []
    points = []
    for label, codec in pairs:
        evaluate_image(codec, dataset[0], dataset.name(0))  # warm-up, untimed: first calls allocate and tune
        per = []
        for i in tqdm(range(len(dataset)), desc=f"eval lmbda={codec.lmbda}", disable=None if progress else True):
            res, _ = evaluate_image(codec, dataset[i], dataset.name(i), label)
            per.append(res)
        rows += per
        points.append({k: float(np.mean([getattr(r, k) for r in per]))
                       for k in ("bpp", "bpp_estimated", "psnr_rgb", "ms_ssim_rgb", "encoding_time", "decoding_time",
                                 "encoding_time_coder", "decoding_time_coder")})
    out_dir.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(asdict(rows[0])))
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    write_atomic(out_dir / "per_image.csv", table.getvalue())
    c0 = codecs[0]
    unread = f"; {len(dataset.skipped)} unreadable, left out" if dataset.skipped else ""
    summary = {
        "name": name or f"{c0.name}-{c0.preset}",
        "description": f"lictrain evaluation on {data} ({len(dataset)} images{unread}), real bitstreams, "
        f"{'EMA' if use_ema else 'raw'} weights",
        # the images left out, so that a mean over fewer images than the set holds says so where it is kept
        "skipped": [{"image": str(p), "why": why} for p, why in dataset.skipped],
        "results": {
            "checkpoint": labels,
            "lmbda": [c.lmbda for c in codecs],
            "bpp": [p["bpp"] for p in points],
            "bpp_estimated": [p["bpp_estimated"] for p in points],
            "psnr-rgb": [p["psnr_rgb"] for p in points],
            "ms-ssim-rgb": [p["ms_ssim_rgb"] for p in points],
            "encoding_time": [p["encoding_time"] for p in points],
            "decoding_time": [p["decoding_time"] for p in points],
            "encoding_time_coder": [p["encoding_time_coder"] for p in points],
            "decoding_time_coder": [p["decoding_time_coder"] for p in points],
        },
        # how the times were taken: per image, after one untimed warm-up image per checkpoint
        "timing": {"device": device_name(c0.device) if c0.device.type == "cuda" else cpu_name(), "device_kind": c0.device.type, "threads": torch.get_num_threads(),
                   "warmup_images": 1, "coder": "the *_coder times: inside the rANS coder's calls"},
    }
    write_atomic(out_dir / "results.json", strict_json(summary, indent=2))  # last: its presence means done
    return summary


def compress_file(checkpoint: str, image: str, output: str, device: str = "cpu") -> dict:
    codec = Codec.from_checkpoint(load_checkpoint(checkpoint), device=device)
    path = Path(image)
    if not path.is_file():
        raise LictrainError(f"image not found: {image}")
    try:
        x = to_tensor(load_rgb(path))
    except Exception as e:
        raise LictrainError(f"cannot read image {image}: {str(e).splitlines()[0][:120]}") from None
    data = bitstream.encode(codec.compress(x))
    write_atomic(Path(output), data)
    h, w = x.shape[-2:]
    return {"bytes": len(data), "bpp": len(data) * 8 / (h * w)}


def decompress_file(checkpoint: str, file: str, output: str, device: str = "cpu") -> dict:
    path, out = Path(file), Path(output)
    if out.suffix.lower() not in LOSSLESS_SUFFIXES:
        raise LictrainError(f"output must be a lossless image ({', '.join(LOSSLESS_SUFFIXES)}), got '{output}'")
    if not path.is_file():
        raise LictrainError(f"file not found: {file}")
    bs = bitstream.decode(path.read_bytes(), source=str(path))
    codec = Codec.from_checkpoint(load_checkpoint(checkpoint), device=device)
    x_hat = codec.decompress(bs, source=str(path))
    arr = quantize_8bit(x_hat).byte().permute(1, 2, 0).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp" + out.suffix)
    with WritingThrough(out, tmp):
        Image.fromarray(arr).save(tmp, **({"lossless": True} if out.suffix.lower() == ".webp" else {}))
        tmp.replace(out)
    return {"height": arr.shape[0], "width": arr.shape[1]}
