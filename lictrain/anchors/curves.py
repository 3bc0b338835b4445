"""R-D curves from anywhere, as one type: lictrain's own results.json, a classical codec measured by `lictrain
anchors`, any results file in CompressAI's format, or a published curve lictrain ships (published/*.json: VTM, BPG,
HM, AV1, JPEG, WebP, JPEG 2000 and CompressAI's trained models on Kodak and CLIC 2020, as CompressAI measured them;
a few papers' points; benchmarks/published_curves.py rebuilds them from a CompressAI checkout).

A curve is named on the command line by a path to a .json file, or by a published name (`vtm`, `bpg`, ...), which is
looked up on the data set being evaluated; `vtm@kodak` names the set outright.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import LictrainError
from ..losses import ms_ssim_db

PUBLISHED_DIR = Path(__file__).parent / "published"
SET_LABELS = {"kodak": "Kodak", "clic2020-professional": "CLIC 2020 professional", "clic2020-mobile": "CLIC 2020 mobile"}


@dataclass(frozen=True)
class Curve:
    label: str  # for legends and table headers
    bpp: tuple
    psnr: tuple  # PSNR-RGB, dB
    ms_ssim: tuple  # MS-SSIM-RGB in [0, 1]; None where not measured
    source: str  # where the numbers come from
    dataset: str | None = None  # the set a published curve was measured on; None for a results file
    published: bool = False
    images: int | None = None  # the images a published curve's points average, where known

    def quality(self, metric: str = "psnr") -> tuple:
        """PSNR in dB, or MS-SSIM in dB (-10 log10(1 - MS-SSIM)) for metric 'ms-ssim'; None where not measured."""
        if metric == "psnr":
            return self.psnr
        return tuple(None if v is None or not math.isfinite(v) else ms_ssim_db(v) for v in self.ms_ssim)

    def points(self, metric: str = "psnr") -> tuple[list[float], list[float]]:
        """(bpp, quality) of the points where the quality exists, by rate."""
        pairs = sorted((b, q) for b, q in zip(self.bpp, self.quality(metric))
                       if q is not None and math.isfinite(q) and math.isfinite(b))
        return [b for b, _ in pairs], [q for _, q in pairs]


def curve_from_results(doc: dict, label: str, source: str, dataset: str | None = None, published: bool = False,
                       images: int | None = None) -> Curve:
    """A curve from a results document in CompressAI's format (its `results` holds bpp, psnr-rgb, ms-ssim-rgb)."""
    r = doc.get("results")
    if not isinstance(r, dict) or "bpp" not in r or "psnr-rgb" not in r:
        raise LictrainError(f"{source} is not an R-D results file (CompressAI's format: results.bpp, "
                            f"results.psnr-rgb)")
    n = len(r["bpp"])
    ms = r.get("ms-ssim-rgb") or [None] * n
    if not (len(r["psnr-rgb"]) == len(ms) == n):
        raise LictrainError(f"{source}: results.bpp, psnr-rgb and ms-ssim-rgb differ in length")
    num = lambda v: math.nan if v is None else float(v)  # noqa: E731  (null: not measured, or infinite)
    return Curve(label, tuple(map(num, r["bpp"])), tuple(map(num, r["psnr-rgb"])),
                 tuple(None if v is None else float(v) for v in ms), source, dataset, published, images)


@lru_cache(maxsize=None)
def _published_doc(dataset: str) -> dict:
    path = PUBLISHED_DIR / f"{dataset}.json"
    if not path.exists():
        raise LictrainError(f"no published curves for '{dataset}'; sets with published curves: "
                            f"{', '.join(published_sets())}")
    return json.loads(path.read_text())


def published_sets() -> list[str]:
    return sorted(p.stem for p in PUBLISHED_DIR.glob("*.json"))


def published_names(dataset: str = "kodak") -> list[str]:
    return list(_published_doc(dataset)["curves"])


def published(name: str, dataset: str = "kodak") -> Curve:
    doc = _published_doc(dataset)
    if name not in doc["curves"]:
        raise LictrainError(f"no published '{name}' curve on {dataset}; there: {', '.join(doc['curves'])}")
    c = doc["curves"][name]
    src = doc["source"]
    where = f"{src['repository']} {c['file']} at {src['commit'][:10]}"
    return curve_from_results(c, f"{c['name']} (published, {SET_LABELS.get(dataset, dataset)})", where, dataset, True,
                  doc.get("images"))


def load_results(path: str | Path, label: str | None = None) -> Curve:
    path = Path(path)
    if not path.is_file():
        raise LictrainError(f"results file not found: {path}")
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise LictrainError(f"{path} is not JSON: {e}") from None
    return curve_from_results(doc, label or doc.get("name") or path.stem, str(path))


def resolve(spec: str, dataset: str | None = None) -> Curve:
    """A curve named on the command line: a .json path, `name@set`, or a published name on `dataset`."""
    if spec.endswith(".json") or Path(spec).is_file():
        return load_results(spec)
    name, _, named_set = spec.partition("@")
    where = named_set or dataset
    if where is None:
        raise LictrainError(f"'{spec}': say on which set (e.g. {spec}@kodak) or give a results .json")
    return published(name, where)
