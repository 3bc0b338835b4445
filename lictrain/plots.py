"""Plots of a run's metrics.jsonl (PNG, via matplotlib's non-interactive backend)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_run(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Four panels: R-D loss against steps and against training time, bpp and PSNR against steps."""
    recs = read_metrics(metrics_path)
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
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
