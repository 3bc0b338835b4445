"""`lictrain ptq`: quantize checkpoints, evaluate float and W8A8 with real bitstreams, and report ΔBD-rate.

Checkpoints are grouped into curves by how they were trained (optimizer, and method when not standard), one
checkpoint per λ, so `lictrain ptq runs/bench/runs/{adam,soap}-*/checkpoint.pt` gives the paper's Table 2 column
for Adam and SOAP in one call: for each curve and weight rounding, the BD-rate of the W8A8 curve against the same
checkpoints in float (positive: quantization costs that much rate at equal PSNR).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import checkpoint_config, load_checkpoint
from ..comparison.figures import BDRateUnavailable, bd_rate
from ..evaluation import evaluate
from ..io import write_atomic
from ..models import downsampling
from .ptq import calibration_batch, quantize_checkpoint


def _curve_label(cfg) -> str:
    return cfg.optim.name if cfg.method.name == "standard" else f"{cfg.optim.name}+{cfg.method.name}"


def _point(summary: dict) -> tuple[float, float, float]:
    r = summary["results"]
    return r["lmbda"][0], r["bpp"][0], r["psnr-rgb"][0]


def _evaluate_once(ckpt: Path, data: str, out: Path, max_images: int | None, progress: bool) -> dict:
    done = out / "results.json"
    if done.exists():  # reruns only do what is missing
        return json.loads(done.read_text())
    return evaluate([ckpt], data, out, progress=progress, max_images=max_images)


def ptq_report(checkpoints: list[str], calib: str, eval_data: str, out_dir: str | Path,
               modes: tuple[str, ...] = ("adaround", "nearest"), iters: int = 1000, batch: int = 4,
               calib_images: int = 8, calib_crop: int = 256, keep_float: tuple[str, ...] = (),
               max_images: int | None = None, progress: bool = True) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves: dict[str, dict[str, list]] = {}
    batches: dict[int, object] = {}
    for i, path in enumerate(checkpoints):
        path = Path(path)
        if path.is_dir():
            path = path / "checkpoint.pt"
        ckpt = load_checkpoint(path)
        cfg = checkpoint_config(ckpt)
        label = _curve_label(cfg)
        stem = f"{i:02d}-{path.parent.name}"
        multiple = downsampling(cfg.model.name)
        if multiple not in batches:
            batches[multiple] = calibration_batch(calib, calib_images, calib_crop, multiple)
        variants = {"float": _evaluate_once(path, eval_data, out_dir / "eval" / f"{stem}-float", max_images,
                                            progress)}
        for mode in modes:
            qpath = out_dir / f"{stem}-w8a8-{mode}.pt"
            if not qpath.exists():
                quantize_checkpoint(path, batches[multiple], qpath, mode, iters, batch, keep_float, calib, progress)
            variants[mode] = _evaluate_once(qpath, eval_data, out_dir / "eval" / f"{stem}-{mode}", max_images,
                                            progress)
        for variant, summary in variants.items():
            curves.setdefault(label, {}).setdefault(variant, []).append(_point(summary))
    rows = []
    for label, by_variant in curves.items():
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
               "iters": iters, "keep_float": list(keep_float), "rows": rows}
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    write_atomic(out_dir / "summary.md", format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"W8A8 post-training quantization (8-bit dynamic per-channel activations, int8 per-channel weights); "
             f"calibration: {summary['calib_images']} crops of {summary['calib_crop']}² from {summary['calib']}, "
             f"AdaRound {summary['iters']} iterations per layer; evaluation: {summary['eval_data']}, real bitstreams.",
             "", "| curve | weights | ΔBD-rate vs float | per λ: bpp / PSNR float → W8A8 |", "|---|---|---:|---|"]
    for r in summary["rows"]:
        delta = f"{r['delta_bd_rate']:+.2f}%" if r["delta_bd_rate"] is not None else f"unavailable ({r['unavailable']})"
        pts = "; ".join(f"λ={lf:g}: {bf:.3f}/{pf:.2f} → {bq:.3f}/{pq:.2f}"
                        for (lf, bf, pf), (_, bq, pq) in zip(r["float"], r["w8a8"]))
        lines.append(f"| {r['curve']} | {r['weights']} | {delta} | {pts} |")
    return "\n".join(lines) + "\n"
