"""The papers' comparison figures: Steps-to-anchor, Time-to-anchor (from validation curves) and BD-rate.

Definitions (used by `lictrain compare`):
- A validation curve is the list of (step, train_time, loss) points of a run's metrics.jsonl (kind "val"), less
  the extra validation a Ctrl-C adds (marked "interrupted").
- The anchor's converged loss (the target) is the minimum over the run (step 0 left out) of its validation curve
  smoothed by a running median of three consecutive points (two at the ends). The median keeps a single lucky
  validation from setting a target that the anchor's own plateau, and a recipe as good as the anchor, never reach
  again (an average, EMA included, would not); the smoothed minimum is never below the raw minimum, so the anchor
  always reaches its own target.
- A run reaches the target at its first validation point whose raw loss is <= the target (no interpolation:
  the resolution is the validation interval).
- Steps-to-anchor = reach step of the recipe / reach step of the anchor; Time-to-anchor the same with training time.
  A recipe that never reaches the target is "not reached", reported with its final gap (best raw loss - target),
  never as a number.
- BD-rate: Bjontegaard delta rate (bjontegaard package, Akima by default) of PSNR-bpp curves; None (unavailable)
  with fewer than 4 points, rather than an extrapolation.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..rundir import read_records


@dataclass(frozen=True)
class CurvePoint:
    step: int
    train_time: float
    loss: float


def read_val_records(run: str | Path) -> list[dict]:
    """The validation lines of a run's metrics.jsonl (step, train_time, lr, loss, bpp, psnr, ...), less Ctrl-C
    extras; `run`: the run folder or the file."""
    return [r for r in read_records(run, "val") if not r.get("interrupted")]


def read_val_curve(metrics_jsonl: str | Path) -> list[CurvePoint]:
    return [CurvePoint(r["step"], r["train_time"], r["loss"]) for r in read_val_records(metrics_jsonl)]


# A run whose slowest validation interval took this many times its median seconds per step ran on a loaded
# machine part of the time (2-core CPUs swing 3-50 s per 25 steps when something else runs): its Time-to-X is flagged.
TIME_SPREAD_FLAG = 2.0


def time_spread(curve: list[CurvePoint]) -> float | None:
    """Seconds per step of the slowest validation interval over the median interval's: ~1 on a quiet machine.
    None with fewer than three intervals (nothing to compare)."""
    rates = [(b.train_time - a.train_time) / (b.step - a.step) for a, b in zip(curve, curve[1:]) if b.step > a.step]
    if len(rates) < 3:
        return None
    median = float(np.median(rates))
    return max(rates) / median if median > 0 else None


def median_smooth(values: list[float]) -> list[float]:
    """Running median of three (centred; two at the ends)."""
    return [float(np.median(values[max(0, i - 1) : i + 2])) for i in range(len(values))]


def converged_loss(curve: list[CurvePoint]) -> float:
    """The target: minimum of the median-smoothed curve, the untrained step-0 point and non-finite losses left out."""
    pts = [p for p in curve if p.step != 0 and math.isfinite(p.loss)] or curve
    return min(median_smooth([p.loss for p in pts]))


@dataclass(frozen=True)
class Reach:
    reached: bool
    step: int | None = None
    train_time: float | None = None
    final_gap: float | None = None  # best loss - target, when not reached


def first_reach(curve: list[CurvePoint], target: float) -> Reach:
    for p in curve:
        if p.loss <= target:
            return Reach(True, p.step, p.train_time)
    best = min(p.loss for p in curve) if curve else math.inf
    return Reach(False, final_gap=best - target)


@dataclass(frozen=True)
class ToAnchor:
    steps: float | None  # None: not reached, or no ratio (`undefined` says why)
    time: float | None
    final_gap: float | None = None
    undefined: str | None = None

    def describe(self, key: str) -> str:
        value = getattr(self, key)
        if value is not None:
            return f"{value:.2f}"
        return f"undefined ({self.undefined})" if self.undefined else f"not reached (gap {self.final_gap:+.4f})"


def to_anchor(recipe_curve: list[CurvePoint], anchor_curve: list[CurvePoint]) -> ToAnchor:
    target = converged_loss(anchor_curve)
    a, r = first_reach(anchor_curve, target), first_reach(recipe_curve, target)
    if not r.reached:
        return ToAnchor(None, None, r.final_gap)
    if not a.step or not a.train_time:  # the anchor "reached" its target at its start: no meaningful ratio (a chained
        # stage the anchor does not improve on starts at its best)
        return ToAnchor(None, None, r.final_gap, undefined="the anchor starts at its target")
    return ToAnchor(r.step / a.step, r.train_time / a.train_time)


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


class BDRateUnavailable(ValueError):
    """BD-rate cannot be computed honestly for these curves; the message says why."""


def bd_rate(anchor: tuple[list[float], list[float]], test: tuple[list[float], list[float]],
            method: str = "akima", min_overlap: float = 0.25) -> float:
    """BD-rate (%) of test against anchor, each (bpp list, psnr list), by the bjontegaard package.

    The package interpolates log-rate as a function of PSNR, so each curve is sorted by PSNR. Raises
    BDRateUnavailable with fewer than 4 points, PSNR values that repeat, PSNR ranges that do not overlap (where
    BD-rate would be an extrapolation) or overlap by less than `min_overlap` of the narrower curve's PSNR range.
    """
    import bjontegaard

    (ra, da), (rt, dt) = anchor, test
    if min(len(ra), len(rt)) < 4:
        raise BDRateUnavailable("<4 λ")
    if any(v is None or not math.isfinite(v) for v in (*ra, *da, *rt, *dt)):
        raise BDRateUnavailable("a point's rate or quality was not measured")
    curves = []
    for rate, psnr in ((ra, da), (rt, dt)):
        order = np.argsort(psnr)
        r, d = np.asarray(rate, float)[order], np.asarray(psnr, float)[order]
        if np.any(np.diff(d) <= 0):
            raise BDRateUnavailable("repeated PSNR")
        curves.append((r, d))
    (r_a, d_a), (r_t, d_t) = curves
    overlap = min(d_a[-1], d_t[-1]) - max(d_a[0], d_t[0])
    if overlap <= 0:
        raise BDRateUnavailable("PSNR ranges do not overlap")
    narrower = min(d_a[-1] - d_a[0], d_t[-1] - d_t[0])
    if overlap < min_overlap * narrower:
        # an average over a sliver of the curves (e.g. 0.03 dB) is noise, not a BD-rate
        raise BDRateUnavailable(f"PSNR ranges overlap by {overlap:.2f} dB only")
    with warnings.catch_warnings():  # the package warns on partial overlap; the result is over the overlap
        warnings.simplefilter("ignore")
        return float(bjontegaard.bd_rate(r_a, d_a, r_t, d_t, method=method, require_matching_points=False))
