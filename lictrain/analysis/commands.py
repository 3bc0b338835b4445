"""`lictrain analyze conflicts | outliers | plot`: the standalone analyses and their figures and tables."""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from pathlib import Path

from ..checkpoint import checkpoint_config, load_checkpoint, model_from_checkpoint
from .. import rundir
from ..io import strict_json, write_atomic
from ..config import set_key, validate
from ..data import EvalImages
from ..errors import LictrainError
from ..models import downsampling
from ..probes.outliers import DEFAULT_LAYER, outlier_stats, save_deviation_figure

log = logging.getLogger("lictrain")


def _name(path: str | Path) -> str:
    p = Path(path)
    return (p.parent.name if p.is_file() else p.name) or str(p)


def read_probes(run_dir: Path) -> list[dict]:
    if not rundir.metrics_file(run_dir).exists():
        raise LictrainError(f"no {rundir.METRICS} in {run_dir}")
    return rundir.read_records(run_dir, "probe", skip_broken=True)


def conflicts(checkpoint: str, optimizers: list[str], out: Path, steps: int = 200, lr: float = 1e-5,
              every: int = 1, per_layer: bool = False, overrides: list[str] = ()) -> dict:
    """Fine-tune from `checkpoint` with each optimizer at a small learning rate (the paper's Figure 3 protocol),
    probing every `every` steps; returns {optimizer: {"intra": [...], "inter": [...], "steps": [...]}}."""
    from ..trainer import train

    out = Path(out)
    ckpt = load_checkpoint(checkpoint)
    series = {}
    for opt in optimizers:
        cfg = checkpoint_config(ckpt)
        # the settings are in the folder name, so a rerun with other settings never reuses an older run
        tag = hashlib.sha256(json.dumps([lr, steps, every, per_layer, list(overrides)]).encode()).hexdigest()[:6]
        cfg.run_dir = str(out / f"{_name(checkpoint)}-{opt}-{tag}")
        for key, value in [("train.init_from", str(checkpoint)), ("optim.name", opt), ("optim.lr", lr),
                           ("optim.options", {}), ("train.steps", steps), ("train.warmup_steps", 0),
                           ("train.val_every", steps), ("train.ckpt_every", steps), ("method.name", "standard"),
                           ("method.options", {}), ("probe.conflicts_every", every),
                           ("probe.conflicts_per_layer", per_layer), ("probe.outliers_every", 0)]:
            set_key(cfg, key, value)
        for o in overrides:
            from ..config import parse_override

            set_key(cfg, *parse_override(o))
        validate(cfg)
        run_dir = Path(cfg.run_dir)
        if not (run_dir / rundir.SUMMARY).exists():
            train(cfg, resume=rundir.has_checkpoint(run_dir))
        rows = read_probes(run_dir)
        series[opt] = {"steps": [r["step"] for r in rows if "intra_cos" in r],
                       "intra": [r["intra_cos"] for r in rows if "intra_cos" in r],
                       "inter_steps": [r["step"] for r in rows if "inter_cos" in r],
                       "inter": [r["inter_cos"] for r in rows if "inter_cos" in r]}
    summary = {opt: conflict_summary(s) for opt, s in series.items()}
    lines = [f"# Gradient conflicts from {checkpoint} (lr {lr:g}, {steps} steps)", "",
             "The first probed step is apart: its optimizer state is fresh (the second moments are that step's own "
             "squared gradient), which makes it an outlier (e.g. -0.87 against ±0.01 afterwards); the means are "
             "over the steps after it.", "",
             "| optimizer | intra-step S(p_R, p_D) mean ± std | inter-step S(p_t-1, p_t) mean ± std | first step: "
             "intra / inter |", "|---|---:|---:|---:|"]
    for opt, m in summary.items():
        lines.append(f"| {opt} | {m['intra_mean']:.3f} ± {m['intra_std']:.3f} | {m['inter_mean']:.3f} ± "
                     f"{m['inter_std']:.3f} | {m['intra_first']:.3f} / {m['inter_first']:.3f} |")
    write_atomic(out / "conflicts.md", "\n".join(lines) + "\n")
    write_atomic(out / "conflicts.json", strict_json({"checkpoint": str(checkpoint), "lr": lr, "steps": steps,
                                                     "summary": summary, "series": series}, indent=2))
    plot_series({opt: {"intra_cos": (s["steps"], s["intra"]), "inter_cos": (s["inter_steps"], s["inter"])}
                 for opt, s in series.items()}, out / "conflicts.png",
                titles={"intra_cos": "intra-step S(p_R, p_D)", "inter_cos": "inter-step S(p_t-1, p_t)"},
                ylim=(-1.05, 1.05))
    return summary


def conflict_summary(series: dict) -> dict:
    """Means and spreads of one optimizer's probe series, the first probed step apart (intra_first, inter_first)
    and left out of them: fine-tuning starts with a fresh optimizer state (see the table's note)."""
    intra, inter = series["intra"], series["inter"]
    first = lambda xs: xs[0] if xs else float("nan")  # noqa: E731
    return {"intra_mean": _mean(intra[1:]), "intra_std": _std(intra[1:]), "inter_mean": _mean(inter[1:]),
            "inter_std": _std(inter[1:]), "intra_first": first(intra), "inter_first": first(inter)}


def _mean(xs):
    xs = [x for x in xs if x == x]
    return statistics.fmean(xs) if xs else float("nan")


def _std(xs):
    xs = [x for x in xs if x == x]
    return statistics.pstdev(xs) if len(xs) > 1 else float("nan")


def outliers(checkpoints: list[str], data: str, out: Path, layer: str | None = DEFAULT_LAYER,
             max_images: int | None = None, maps: int = 3, names: list[str] | None = None) -> list[dict]:
    """Table 2's outlier columns for each checkpoint (EMA weights), and Figure 4's deviation maps."""
    out = Path(out)
    names = names or [_name(c) for c in checkpoints]
    if len(names) != len(checkpoints):
        raise LictrainError(f"{len(names)} names for {len(checkpoints)} checkpoints")
    images = EvalImages(data, None, max_images)
    rows, all_maps = [], {}
    for name, path in zip(names, checkpoints):
        ckpt = load_checkpoint(path)
        cfg = checkpoint_config(ckpt)
        model = model_from_checkpoint(ckpt)
        stats = outlier_stats(model, images, downsampling(cfg.model.name), layer, maps=maps > 0)
        all_maps[name] = stats.pop("maps", [])[:maps]
        rows.append({"name": name, "checkpoint": str(path), "model": cfg.model.name, "preset": cfg.model.preset,
                     "lmbda": cfg.loss.lmbda, "optimizer": cfg.optim.name, "layer": layer, **stats})
    head = "| checkpoint | latent Kurt | latent MaxMed |" + (f" {layer} Kurt | {layer} MaxMed |" if layer else "")
    lines = [f"# Outliers on {data} ({len(images)} images; Eq. 8, averaged over images)", "", head,
             "|---|---:|---:|" + ("---:|---:|" if layer else "")]
    for r in rows:
        cells = f"| {r['name']} | {r['latent_kurt']:.2f} | {r['latent_maxmed']:.2f} |"
        if layer:
            cells += f" {r['act_kurt']:.2f} | {r['act_maxmed']:.2f} |"
        lines.append(cells)
    write_atomic(out / "outliers.md", "\n".join(lines) + "\n")
    write_atomic(out / "outliers.json", strict_json(rows, indent=2))
    for i in range(min(maps, len(images))):
        save_deviation_figure(out / f"deviation_{i}.png", images[i], {n: m[i] for n, m in all_maps.items()},
                              title=images.name(i) if hasattr(images, "name") else f"image {i}")
    return rows


def plot_series(series: dict[str, dict[str, tuple[list, list]]], path: Path, titles: dict | None = None,
                ylim: tuple | None = None) -> None:
    """One panel per metric, one line per run: series[run][metric] = (steps, values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({m for s in series.values() for m in s}, key=lambda m: list(titles or {}).index(m)
                     if titles and m in titles else 99)
    if not metrics:
        raise LictrainError("nothing to plot: no probe measurements found")
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for run, s in series.items():
            if metric in s and s[metric][0]:
                ax.plot(s[metric][0], s[metric][1], label=run, lw=1)
        ax.set_title((titles or {}).get(metric, metric))
        ax.set_xlabel("step")
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_runs(run_dirs: list[str], metrics: list[str], out: Path) -> Path:
    """Probe metrics over training for several runs on one figure (e.g. Figure 14: latent_kurt, latent_maxmed).
    Returns the file written (OUT, with .png added when it has no suffix)."""
    series = {}
    for d in run_dirs:
        rows = read_probes(Path(d))
        series[_name(d)] = {m: ([r["step"] for r in rows if m in r], [r[m] for r in rows if m in r])
                            for m in metrics}
        if not any(series[_name(d)][m][0] for m in metrics):
            log.warning("%s has no probe lines with %s: left out of the plot", d, ", ".join(metrics))
            del series[_name(d)]
    if not any(s[m][0] for s in series.values() for m in metrics):
        raise LictrainError(f"no probe lines with {', '.join(metrics)} in these runs "
                            "(train with --set probe.outliers_every=N or probe.conflicts_every=N)")
    out = Path(out) if Path(out).suffix else Path(out).with_suffix(".png")
    plot_series(series, out)
    return out
