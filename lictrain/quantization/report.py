"""`lictrain ptq`: quantize checkpoints, evaluate float and W8A8 with real bitstreams, and report ΔBD-rate.

Checkpoints are grouped into curves by how they were trained (optimizer, and method when not standard), one
checkpoint per λ, so `lictrain ptq runs/bench/runs/{adam,soap}-*/checkpoint.pt` gives the paper's Table 2 column
for Adam and SOAP in one call: for each curve and weight rounding, the BD-rate of the W8A8 curve against the same
checkpoints in float (positive: quantization costs that much rate at equal PSNR).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import Checkpoint, load_checkpoint
from ..comparison.figures import BDRateUnavailable, bd_rate
from ..config import MethodConfig
from ..data import EvalImages
from ..evaluation import evaluate
from ..io import strict_json, write_atomic
from ..models import downsampling
from .ptq import calibration_batch, quantize_checkpoint


def _curve_label(cfg) -> str:
    return cfg.optim.name if cfg.method.name == MethodConfig.name else f"{cfg.optim.name}+{cfg.method.name}"


def _point(summary: dict) -> tuple[float, float, float]:
    r = summary["results"]
    return r["lmbda"][0], r["bpp"][0], r["psnr-rgb"][0]


def _evaluate_once(ckpt, data: str, out: Path, max_images: int | None, progress: bool) -> dict:
    done = out / "results.json"
    if done.exists():  # reruns only do what is missing
        return json.loads(done.read_text())
    return evaluate([ckpt], data, out, progress=progress, max_images=max_images)


def ptq_report(checkpoints: list[str], calib: str, eval_data: str, out_dir: str | Path,
               modes: tuple[str, ...] = ("adaround", "nearest"), iters: int = 1000, batch: int = 4,
               calib_images: int = 8, calib_crop: int = 256, keep_float: tuple[str, ...] = (),
               max_images: int | None = None, progress: bool = True, outliers: bool = False,
               min_targets_per_weight: float = 10.0) -> dict:
    """With `outliers`, also the paper's outlier columns (latent and g_a.3-activation Kurt / MaxMed of the float
    models on the evaluation images, averaged over images and then over each curve's checkpoints), so that the
    summary is the whole of Table 2."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves: dict[str, dict[str, list]] = {}
    adarounded: dict[str, list[str]] = {}
    batches: dict[int, object] = {}
    for i, path in enumerate(checkpoints):
        ckpt = Checkpoint.load(path)  # read once: quantized, evaluated and measured from this object
        path, cfg = ckpt.path, ckpt.config
        label = _curve_label(cfg)
        stem = f"{i:02d}-{path.parent.name}"
        multiple = downsampling(cfg.model.name)
        if multiple not in batches:
            batches[multiple] = calibration_batch(calib, calib_images, calib_crop, multiple)
        variants = {"float": _evaluate_once(ckpt, eval_data, out_dir / "eval" / f"{stem}-float", max_images,
                                            progress)}
        for mode in modes:
            qpath = out_dir / f"{stem}-w8a8-{mode}.pt"
            if not qpath.exists():
                quantize_checkpoint(ckpt, batches[multiple], qpath, mode, iters, batch, keep_float, calib, progress,
                                    min_targets_per_weight)
            if mode == "adaround":
                rounding = load_checkpoint(qpath)["ptq"].get("rounding", {})  # absent in files of earlier versions
                adarounded[label] = sorted(n for n, r in rounding.items() if r == "adaround")
            variants[mode] = _evaluate_once(qpath, eval_data, out_dir / "eval" / f"{stem}-{mode}", max_images,
                                            progress)
        for variant, summary in variants.items():
            curves.setdefault(label, {}).setdefault(variant, []).append(_point(summary))
        if outliers:
            from ..probes.outliers import outlier_stats

            stats = outlier_stats(ckpt.model(), EvalImages(eval_data, None, max_images), multiple)
            curves[label].setdefault("outliers", []).append(stats)
    rows, table2 = [], {}
    for label, by_variant in curves.items():
        if "outliers" in by_variant:
            keys = ("latent_kurt", "latent_maxmed", "act_kurt", "act_maxmed")
            table2[label] = {k: sum(o[k] for o in by_variant["outliers"]) / len(by_variant["outliers"]) for k in keys}
        base = sorted(by_variant["float"])
        for mode in modes:
            test = sorted(by_variant[mode])
            try:
                delta = bd_rate(([b for _, b, _ in base], [p for _, _, p in base]),
                                ([b for _, b, _ in test], [p for _, _, p in test]))
                why = ""
            except BDRateUnavailable as e:
                delta, why = None, str(e)
            rows.append({"curve": label, "weights": mode, "delta_bd_rate": delta, "unavailable": why,
                         "float": base, "w8a8": test})
    summary = {"eval_data": eval_data, "calib": calib, "calib_images": calib_images, "calib_crop": calib_crop,
               "iters": iters, "keep_float": list(keep_float), "rows": rows, "outliers": table2,
               "min_targets_per_weight": min_targets_per_weight, "adaround_layers": adarounded}
    write_atomic(out_dir / "summary.json", strict_json(summary, indent=2))
    write_atomic(out_dir / "summary.md", format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"W8A8 post-training quantization (8-bit dynamic per-channel activations, int8 per-channel weights); "
             f"calibration: {summary['calib_images']} crops of {summary['calib_crop']}² from {summary['calib']}, "
             f"AdaRound {summary['iters']} iterations per layer on the layers with >= "
             f"{summary.get('min_targets_per_weight', 0):g} calibration outputs per weight "
             f"({', '.join(sorted(set(sum(summary.get('adaround_layers', {}).values(), [])))) or 'none'}; nearest "
             f"rounding elsewhere); evaluation: {summary['eval_data']}, real bitstreams.",
             "", "| curve | weights | ΔBD-rate vs float | per λ: bpp / PSNR float → W8A8 |", "|---|---|---:|---|"]
    for r in summary["rows"]:
        delta = f"{r['delta_bd_rate']:+.2f}%" if r["delta_bd_rate"] is not None else f"unavailable ({r['unavailable']})"
        pts = "; ".join(f"λ={lf:g}: {bf:.3f}/{pf:.2f} → {bq:.3f}/{pq:.2f}"
                        for (lf, bf, pf), (_, bq, pq) in zip(r["float"], r["w8a8"]))
        lines.append(f"| {r['curve']} | {r['weights']} | {delta} | {pts} |")
    if summary.get("outliers"):
        modes = list(dict.fromkeys(r["weights"] for r in summary["rows"]))
        lines += ["", "Table 2 (outliers of the float models on the evaluation images, mean over the curve's λ; "
                  "ΔBD-rate of W8A8 against float):", "",
                  "| curve | latent Kurt | latent MaxMed | g_a.3 Kurt | g_a.3 MaxMed | "
                  + " | ".join(f"W8A8 ΔBD-rate ({m})" for m in modes) + " |",
                  "|---|---:|---:|---:|---:|" + "---:|" * len(modes)]
        for label, o in summary["outliers"].items():
            deltas = []
            for m in modes:
                d = next(r["delta_bd_rate"] for r in summary["rows"] if r["curve"] == label and r["weights"] == m)
                deltas.append(f"{d:+.2f}%" if d is not None else "n/a")
            lines.append(f"| {label} | {o['latent_kurt']:.2f} | {o['latent_maxmed']:.2f} | {o['act_kurt']:.2f} | "
                         f"{o['act_maxmed']:.2f} | " + " | ".join(deltas) + " |")
    return "\n".join(lines) + "\n"
