"""Where a compare's recipes stand against the field: the classical codecs of `compare.codecs` measured on each
evaluation set (JPEG by default, a few seconds on Kodak), and the curves of `compare.references` (published VTM,
BPG, ... where they were measured on the same set; or results files), drawn on the R-D plots and set against each
recipe in a BD-rate table ("BD-rate vs VTM").

A published curve is used only on the set it was published on, over the same number of images; elsewhere the table
says why it is left out rather than comparing numbers from different images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..anchors.codecs import split_available, unavailable_line
from ..anchors.curves import curve_from_results, load_results, published_names, published_sets, resolve
from ..anchors.measure import measure_or_reuse
from ..data import set_name
from ..errors import LictrainError
from .figures import BDRateUnavailable, bd_rate

log = logging.getLogger("lictrain")


def check_references(references: list[str]) -> None:
    """Refuse, before any training, a reference that cannot be read: a results file that is missing or not one, or
    a name published on no set."""
    known = {name for dataset in published_sets() for name in published_names(dataset)}
    for ref in references:
        if ref.endswith(".json") or Path(ref).is_file():
            load_results(ref)
        elif ref.partition("@")[0] not in known:
            raise LictrainError(f"unknown reference curve '{ref}'; published: {', '.join(sorted(known))} (or a "
                                "results .json)")
        elif "@" in ref:
            resolve(ref)


def reference_curves(codecs: list[str], references: list[str], eval_sets: list[str], out_dir: Path,
                     images: dict, max_images: int | None) -> tuple[dict, list[str]]:
    """({eval set: [Curve]}, notes): the measured codecs and the references that apply to each set."""
    available, missing = split_available(codecs)
    notes = [f"Codecs {unavailable_line(missing)}."] if missing else []
    if missing:
        log.warning("anchors %s", unavailable_line(missing))
    refs: dict = {}
    for spec in eval_sets:
        name = set_name(spec)
        curves = []
        for codec in available:
            r = measure_or_reuse(codec, spec, Path(out_dir) / "anchors" / name, max_images)
            curves.append(curve_from_results(r, f"{codec.label} (measured)", f"lictrain anchors on {name}"))
        for ref in references:
            try:
                curve = resolve(ref, name)
            except LictrainError as e:
                if ref.endswith(".json"):
                    raise
                notes.append(f"{ref} left out on {name}: {e}.")
                continue
            if curve.published and curve.images and images.get(spec) != curve.images:
                notes.append(f"{curve.label} left out on {name}: published over {curve.images} images, this set "
                             f"has {images.get(spec)}.")
                continue
            curves.append(curve)
        refs[spec] = curves
    return refs, notes


def bd_against(points: dict, recipes: list[str], seeds: list[int], refs: dict, metric: str, method: str) -> dict:
    """{eval set: {curve label: {recipe: BD-rate (mean over seeds) or 'unavailable (why)'}}}: each recipe's real
    bitstream points against each reference curve."""
    out = {}
    for spec, curves in refs.items():
        table = {}
        for curve in curves:
            ref = curve.points(metric)
            row = {}
            for name in recipes:
                values, why = [], None
                for seed in seeds:
                    pts = points.get((name, seed, spec), [])
                    try:
                        values.append(bd_rate(ref, ([p[1] for p in pts], [p[2] for p in pts]), method))
                    except BDRateUnavailable as e:
                        why = str(e)
                row[name] = float(np.mean(values)) if why is None else f"unavailable ({why})"
            table[curve.label] = row
        out[spec] = table
    return out


def field_markdown(field: dict) -> list[str]:
    lines = []
    for spec, table in field.get("bd_rate", {}).items():
        if not table:
            continue
        labels = list(table)
        recipes = list(next(iter(table.values())))
        lines += ["", f"Against the field's anchors on {set_name(spec)} (BD-rate of each recipe's curve against each, "
                      "mean over seeds; negative: fewer bits at equal quality):", "",
                  "| recipe | " + " | ".join(f"vs {label}" for label in labels) + " |",
                  "|---|" + "---:|" * len(labels)]
        for name in recipes:
            cells = [f"{v:+.2f}%" if isinstance(v, float) else v for v in (table[label][name] for label in labels)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        sources = [f"{c['label']}: {c['source']}" for c in field.get("curves", {}).get(spec, [])]
        if sources:
            lines += ["", "Sources: " + "; ".join(sources) + "."]
    for note in field.get("notes", []):
        lines += ["", note]
    return lines

