"""Classical codecs measured on an image set, in CompressAI's results format, with the same metrics as lictrain's
own evaluation (evaluation.py: bpp from the coded bytes, PSNR and MS-SSIM on 8-bit RGB, means over images).

Two ways to choose the points: a sweep of the codec's quality knob (one R-D point per value, each the mean over the
images), or `match`: per image, the knob value whose bpp (or PSNR) comes closest to a target, found by bisection as
CompressAI's `find_close` does, so that a codec can be set beside a model's points at the model's own rates.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import EvalImages, active_spec
from ..errors import LictrainError
from ..io import strict_json, write_atomic
from ..losses import MS_SSIM_MIN_SIDE, ms_ssim_value, psnr_8bit
from .codecs import ClassicalCodec


@dataclass
class CodedImage:
    image: str
    quality: float
    bytes: int
    bpp: float
    psnr_rgb: float
    ms_ssim_rgb: float  # NaN for an image under MS_SSIM_MIN_SIDE a side
    encoding_time: float
    decoding_time: float


def code_image(codec: ClassicalCodec, rgb: np.ndarray, quality: float, name: str = "", ms_ssim: bool = True
               ) -> CodedImage:
    """Encode and decode one 8-bit RGB image (H x W x 3) at one quality; the measurements of evaluation.py."""
    t0 = time.perf_counter()
    data = codec.encode(rgb, quality)
    t1 = time.perf_counter()
    rec = codec.decode(data)
    t2 = time.perf_counter()
    if rec.shape != rgb.shape:
        raise LictrainError(f"{codec.label} decoded {name or 'an image'} to {rec.shape}, expected {rgb.shape}")
    x, x_hat = (torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255 for a in (rgb, rec))
    h, w = rgb.shape[:2]
    ms = float("nan")
    if ms_ssim and min(h, w) >= MS_SSIM_MIN_SIDE:
        ms = ms_ssim_value(x_hat[None], x[None]).item()
    return CodedImage(name, float(quality), len(data), len(data) * 8 / (h * w), psnr_8bit(x, x_hat), ms, t1 - t0,
                      t2 - t1)


def _images(data: str, max_images: int | None) -> tuple[EvalImages, list[np.ndarray]]:
    dataset = EvalImages(data, max_images=max_images)
    if len(dataset) == 0:
        raise LictrainError(f"no readable images in {data}")
    return dataset, [dataset[i].mul(255).round().byte().permute(1, 2, 0).numpy() for i in range(len(dataset))]


def _closest(codec: ClassicalCodec, rgb: np.ndarray, target: float, by: str, name: str) -> CodedImage:
    """The image coded at the knob value whose `by` (bpp or psnr_rgb) is closest to `target` (bisection over the
    knob, assuming `by` grows with the rate, as it does for every codec here)."""
    lo, hi = codec.limits
    cache: dict[float, CodedImage] = {}

    def at(q: float) -> CodedImage:
        if q not in cache:
            cache[q] = code_image(codec, rgb, q, name, ms_ssim=False)
        return cache[q]

    def value(q: float) -> float:
        v = getattr(at(q), by)
        return v if codec.rising else -v  # a knob that spends fewer bits as it grows: search on the negation

    goal = target if codec.rising else -target
    for _ in range(40):
        if (hi - lo <= 1) if codec.integer else (hi - lo <= 1e-3 * max(abs(hi), 1e-3)):
            break
        mid = (lo + hi) // 2 if codec.integer else (lo + hi) / 2
        if value(mid) < goal:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda q: abs(getattr(at(q), by) - target))
    return code_image(codec, rgb, best, name)  # again, with MS-SSIM and clean timings


def measure(codec: ClassicalCodec, data: str, qualities: list[float] | None = None, max_images: int | None = None,
            match: list[float] | None = None, by: str = "bpp", progress: bool = True) -> tuple[dict, list[CodedImage]]:
    """One codec on one image set: (results in CompressAI's format, the per-image rows). Points from `qualities`
    (default: the codec's sweep), or with `match` one point per target value of `by` ("bpp" or "psnr")."""
    from tqdm import tqdm

    if by not in ("bpp", "psnr"):
        raise LictrainError(f"match by 'bpp' or 'psnr', got '{by}'")
    dataset, images = _images(data, max_images)
    targets = list(match) if match else list(qualities or codec.qualities)
    rows: list[CodedImage] = []
    points = []
    bar = tqdm(total=len(targets) * len(images), desc=codec.name, disable=None if progress else True)
    for t in targets:
        per = []
        for i, rgb in enumerate(images):
            per.append(_closest(codec, rgb, t, "bpp" if by == "bpp" else "psnr_rgb", dataset.name(i)) if match
                       else code_image(codec, rgb, t, dataset.name(i)))
            bar.update()
        rows += per
        points.append({k: float(np.mean([getattr(r, k) for r in per]))
                       for k in ("quality", "bpp", "psnr_rgb", "ms_ssim_rgb", "encoding_time", "decoding_time")})
    bar.close()
    order = sorted(range(len(points)), key=lambda j: points[j]["bpp"])
    how = (f"matched per image to {by} targets {', '.join(f'{t:g}' for t in targets)}" if match else
           f"quality sweep {', '.join(f'{q:g}' for q in targets)}")
    results = {
        "name": codec.label,
        "description": f"{codec.describe()}; measured by lictrain on {active_spec(data)} ({len(images)} images), "
                       f"file sizes; {how}",
        "codec": codec.name,
        "results": {
            "quality": [points[j]["quality"] for j in order],  # the mean knob value where it differs per image
            "bpp": [points[j]["bpp"] for j in order],
            "psnr-rgb": [points[j]["psnr_rgb"] for j in order],
            "ms-ssim-rgb": [points[j]["ms_ssim_rgb"] for j in order],
            "encoding_time": [points[j]["encoding_time"] for j in order],
            "decoding_time": [points[j]["decoding_time"] for j in order],
        },
    }
    if match:
        results["results"]["target"] = [targets[j] for j in order]
    return results, rows


def write_results(results: dict, rows: list[CodedImage], out_dir: Path, stem: str) -> Path:
    """OUT/STEM.json (CompressAI's format, strict JSON) and OUT/STEM_per_image.csv."""
    out_dir = Path(out_dir)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(asdict(rows[0])))
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    write_atomic(out_dir / f"{stem}_per_image.csv", table.getvalue())
    write_atomic(out_dir / f"{stem}.json", strict_json(results))
    return out_dir / f"{stem}.json"


def measure_or_reuse(codec: ClassicalCodec, data: str, out_dir: Path, max_images: int | None = None) -> dict:
    """The codec's default sweep on `data`, kept in OUT_DIR and reused while the set, the limit, the sweep and the
    library version are the same (a compare measures its anchors once)."""
    stamp = {"spec": active_spec(data), "max_images": max_images, "qualities": list(codec.qualities),
             "version": codec.version(), "settings": codec.settings}
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:6]
    path = Path(out_dir) / f"{codec.name}-{key}.json"
    if path.exists():
        try:
            data_ = json.loads(path.read_text())
            if data_.get("lictrain") == stamp:
                return data_
        except ValueError:
            pass
    results, rows = measure(codec, data, max_images=max_images, progress=False)
    results["lictrain"] = stamp
    write_results(results, rows, Path(out_dir), path.stem)
    return results
