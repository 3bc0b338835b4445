"""Plots of a run's metrics.jsonl (PNG, via matplotlib's non-interactive backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

from ..anchors.curves import Curve
from ..data import set_name
from ..rundir import read_records
from .figures import converged_loss, read_val_curve

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, out_png: str | Path) -> Path:
    """Lay out, write (the folder made if need be) and close a figure."""
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_run(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Four panels: R-D loss against steps and against training time, bpp and PSNR against steps."""
    recs = read_records(metrics_path)
    val = [r for r in recs if r["kind"] == "val"]
    tr = [r for r in recs if r["kind"] == "train"]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    (a, b), (c, d) = ax
    if tr:
        a.plot([r["step"] for r in tr], [r["loss"] for r in tr], color="0.75", lw=1, label="training batches")
    a.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", color="C0", ms=3, label="validation (EMA)")
    a.set(xlabel="step", ylabel="R-D loss  (bpp + λ·255²·MSE)", title="loss vs steps")
    b.plot([r["train_time"] for r in val], [r["loss"] for r in val], "o-", color="C0", ms=3)
    b.set(xlabel="training time (s, steps only)", ylabel="validation R-D loss", title="loss vs training time")
    c.plot([r["step"] for r in val], [r["bpp"] for r in val], "o-", color="C1", ms=3)
    c.set(xlabel="step", ylabel="bpp (estimated)", title="validation rate")
    d.plot([r["step"] for r in val], [r["psnr"] for r in val], "o-", color="C2", ms=3)
    d.set(xlabel="step", ylabel="PSNR (dB)", title="validation distortion")
    # The untrained starting point is ~10x the trained loss: a log axis keeps both readable.
    for axis in (a, b):
        axis.set_yscale("log")
    a.legend()
    for axis in ax.flat:
        axis.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_png)


REFERENCE_STYLES = [dict(color="0.25", ls="--", marker="x"), dict(color="0.5", ls=":", marker="+"),
                    dict(color="0.15", ls="-.", marker="1"), dict(color="0.6", ls="--", marker="2"),
                    dict(color="0.35", ls=":", marker="3")]


def draw_reference(ax, curve: Curve, metric: str, i: int) -> None:
    """A classical codec's or a published curve, grey and dashed beside the models' coloured lines."""
    bpp, q = curve.points(metric)
    if bpp:
        ax.plot(bpp, q, lw=1.2, ms=5, label=curve.label, **REFERENCE_STYLES[i % len(REFERENCE_STYLES)])


def legend_beside(ax, crowded: bool) -> None:
    """With anchors on the plot, the legend goes beside the axes: inside, it would cover the models' points."""
    if crowded:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=8)


def focus_limits(ax, xs: list[float], ys_by_x: list[tuple[list[float], list[float]]]) -> None:
    """Axis limits around the models' points (`xs`), with the references' points that fall in that bpp range:
    a codec swept from 0.1 to 4 bpp must not shrink the models' curves to a corner."""
    lo, hi = min(xs), max(xs)
    pad = 0.15 * (hi - lo or hi or 1.0)
    x0, x1 = max(0.0, lo - pad), hi + pad
    ys = [y for bx, by in ys_by_x for x, y in zip(bx, by) if x0 <= x <= x1]
    if ys:
        ypad = 0.08 * (max(ys) - min(ys) or 1.0)
        ax.set_ylim(min(ys) - ypad, max(ys) + ypad)
    ax.set_xlim(x0, x1)


def plot_curves(curves: list[Curve], out_png: str | Path, metric: str = "psnr", title: str = "",
                focus: list[Curve] | None = None) -> Path:
    """Any R-D curves on one figure (`lictrain plot`): the ones in `focus` in colour and setting the axis limits,
    the others (anchors) grey and dashed."""
    focus = focus if focus is not None else curves
    refs = [c for c in curves if c not in focus]
    fig, ax = plt.subplots(figsize=(9.5 if refs else 6.5, 4.8))
    for i, c in enumerate(focus):
        bpp, q = c.points(metric)
        ax.plot(bpp, q, "o-", color=f"C{i}", ms=4, label=c.label)
    for i, c in enumerate(refs):
        draw_reference(ax, c, metric, i)
    shown = [c.points(metric) for c in focus]
    if any(b for b, _ in shown):
        focus_limits(ax, [x for b, _ in shown for x in b], [c.points(metric) for c in curves])
    ax.set(xlabel="bpp", ylabel="PSNR-RGB (dB)" if metric == "psnr" else "MS-SSIM-RGB (dB)", title=title)
    ax.grid(alpha=0.3)
    legend_beside(ax, crowded=bool(refs))
    return save_figure(fig, out_png)


def plot_compare(runs, points: dict, eval_sets: list[str], out_dir: Path, quality: str = "PSNR-RGB (dB)",
                 images: dict | None = None, references: dict | None = None, also: tuple | None = None) -> list[Path]:
    """Validation R-D loss against steps and against training time (a panel per lambda, the anchor's target
    dashed), and R-D curves (`quality`, PSNR or MS-SSIM in dB, against bpp, each point labelled with its lambda)
    per evaluation set, with the set's `references` (curves: measured classical codecs, published curves) grey and
    dashed; `images`: the number of images each set's points average (named in the title); `also`: (points,
    quality label) of a second quality measure, plotted the same way."""
    out_dir = Path(out_dir)
    recipes = list(dict.fromkeys(r.recipe for r in runs))
    lambdas = sorted({r.lmbda for r in runs})
    colors = {name: f"C{i}" for i, name in enumerate(recipes)}
    written = []
    for axis_key, xlabel, fname in (("step", "step", "loss_vs_steps.png"),
                                    ("train_time", "training time (s, steps only)", "loss_vs_time.png")):
        fig, axes = plt.subplots(1, len(lambdas), figsize=(5.5 * len(lambdas), 4.2), squeeze=False)
        for ax, lmbda in zip(axes[0], lambdas):
            for r in runs:
                if r.lmbda != lmbda:
                    continue
                curve = [p for p in read_val_curve(r.run_dir) if p.step > 0]
                label = r.recipe if r.seed == min(x.seed for x in runs) else None
                ax.plot([getattr(p, axis_key) for p in curve], [p.loss for p in curve], "-", color=colors[r.recipe],
                        lw=1.6, alpha=0.9, label=label)
                if r.recipe == recipes[0] and label:
                    ax.axhline(converged_loss(read_val_curve(r.run_dir)), color="0.4", ls="--",
                               lw=1, label=f"target ({recipes[0]} converged)")
            ax.set(xlabel=xlabel, ylabel="validation R-D loss", title=f"λ = {lmbda:g}")
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append(out_dir / fname)
    written += plot_rd(points, recipes, colors, eval_sets, out_dir, quality, images, references)
    if also is not None:  # the other quality measure (MS-SSIM for MSE-trained runs, PSNR for MS-SSIM ones)
        other_points, other_quality = also
        suffix = "_ms-ssim" if other_quality.startswith("MS-SSIM") else "_psnr"
        written += plot_rd(other_points, recipes, colors, eval_sets, out_dir, other_quality, images, references,
                           suffix)
    return written


def plot_rd(points: dict, recipes: list[str], colors: dict, eval_sets: list[str], out_dir: Path, quality: str,
            images: dict | None, references: dict | None, suffix: str = "") -> list[Path]:
    """An R-D plot per evaluation set: each recipe's curve (mean over seeds, points labelled with their lambda), the
    set's references grey and dashed; rd_<set><suffix>.png. A set where some point lacks the quality (MS-SSIM of
    images too small for it) gets no plot."""
    written = []
    for spec in eval_sets:
        if any(p[2] is None for (n, s, e), pts in points.items() if e == spec for p in pts):
            continue
        refs = (references or {}).get(spec, [])
        fig, ax = plt.subplots(figsize=(9.5 if refs else 6.5, 4.8))
        shown = []
        for name in recipes:
            seeds = sorted({s for (n, s, e) in points if n == name and e == spec})
            curves = [sorted(points[(name, s, spec)]) for s in seeds]
            bpp = np.mean([[p[1] for p in c] for c in curves], axis=0)
            psnr = np.mean([[p[2] for p in c] for c in curves], axis=0)
            ax.plot(bpp, psnr, "o-", color=colors[name], label=name)
            shown.append((list(bpp), list(psnr)))
            for (lmbda, _, _), x, y in zip(curves[0], bpp, psnr):
                ax.annotate(f"λ {lmbda:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                            color=colors[name])
        metric = "psnr" if quality.startswith("PSNR") else "ms-ssim"
        for i, curve in enumerate(refs):
            draw_reference(ax, curve, metric, i)
        if refs and shown:
            focus_limits(ax, [x for b, _ in shown for x in b], shown + [c.points(metric) for c in refs])
        count = f" ({images[spec]} image{'' if images[spec] == 1 else 's'})" if images and spec in images else ""
        ax.set(xlabel="bpp (real bitstreams)", ylabel=quality, title=f"R-D on {set_name(spec)}{count}")
        ax.grid(alpha=0.3)
        legend_beside(ax, crowded=bool(refs))
        fig.tight_layout()
        path = out_dir / f"rd_{set_name(spec)}{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
