"""Recipes compared through a chain of training stages (issue 33: Adam against SOAP through DCVC's four stages, the
SOAP paper's Fig. 7), `lictrain video-compare`.

Each recipe runs every stage in order, each stage starting from the same recipe's previous stage (train.init_from is
set here, whatever the stage config says), all in the one training loop. Per stage the summary gives the recipes'
Steps-to-anchor and Time-to-anchor (the first validation at which a recipe's loss reaches the anchor's converged
loss of that stage, as `lictrain compare` defines them) and final validation losses, and one figure shows every
stage's validation loss against steps (top row) and against training time (bottom row). A finished run is reused, an
interrupted one resumed: by folder, not by configuration (unlike `lictrain compare`), so a changed stage config
wants a new --out.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..comparison.figures import read_val_curve, to_anchor
from ..config import load_config
from ..errors import LictrainError
from ..recipes import recipe_overrides
from ..trainer import train


def _finished(run_dir: Path, steps: int) -> bool:
    summary = run_dir / "summary.json"
    if not summary.exists():
        return False
    done = json.loads(summary.read_text())
    return done.get("step", 0) >= steps or bool(done.get("converged_stop"))


def run_stages(stages: list[str], recipes: list[str], out_dir: str | Path, overrides: tuple[str, ...] = ()) -> dict:
    """Train (or reuse) every recipe through every stage config; returns {recipe: [run folder per stage]}."""
    if not stages or not recipes:
        raise LictrainError("video-compare needs at least one stage config and one recipe")
    out = Path(out_dir)
    runs: dict[str, list[Path]] = {}
    for recipe in recipes:
        previous: Path | None = None
        runs[recipe] = []
        for k, stage in enumerate(stages, start=1):
            run_dir = out / f"{recipe}-stage{k}"
            chain = [f"train.init_from={previous}"] if previous else ["train.init_from=null"]
            cfg = load_config(stage, [*overrides, *recipe_overrides(recipe), *chain, f"run_dir={run_dir}",
                                      "train.progress=false"])
            if not _finished(run_dir, cfg.train.steps):
                train(cfg, resume=(run_dir / "checkpoint.pt").exists())
            runs[recipe].append(run_dir)
            previous = run_dir
    return runs


def stage_summary(runs: dict[str, list[Path]]) -> dict:
    recipes = list(runs)
    anchor = recipes[0]
    rows = []
    for k in range(len(runs[anchor])):
        anchor_curve = read_val_curve(runs[anchor][k])
        for recipe in recipes:
            curve = read_val_curve(runs[recipe][k])
            ratio = to_anchor(curve, anchor_curve)
            rows.append({"stage": k + 1, "recipe": recipe, "final": curve[-1].loss if curve else float("nan"),
                         "steps": ratio.describe("steps"), "time": ratio.describe("time")})
    return {"anchor": anchor, "rows": rows}


def summary_markdown(summary: dict) -> str:
    lines = [f"| stage | recipe | Steps-to-{summary['anchor']} | Time-to-{summary['anchor']} | final val loss |",
             "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['stage']} | {r['recipe']} | {r['steps']} | {r['time']} | {r['final']:.4f} |"
              for r in summary["rows"]]
    return "\n".join(lines)


def plot_stages(runs: dict[str, list[Path]], out_png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..comparison.plots import save_figure

    n = len(next(iter(runs.values())))
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n, 6.2), squeeze=False)
    for k in range(n):
        for recipe, dirs in runs.items():
            curve = [p for p in read_val_curve(dirs[k]) if p.step > 0]
            axes[0][k].plot([p.step for p in curve], [p.loss for p in curve], label=recipe)
            axes[1][k].plot([p.train_time / 60 for p in curve], [p.loss for p in curve], label=recipe)
        axes[0][k].set_title(f"stage {k + 1}")
        axes[0][k].set_xlabel("steps")
        axes[1][k].set_xlabel("training time (min)")
        for row in axes:
            row[k].set_yscale("log")
            row[k].grid(alpha=0.3)
    axes[0][0].set_ylabel("validation R-D loss")
    axes[1][0].set_ylabel("validation R-D loss")
    axes[0][0].legend()
    return save_figure(fig, out_png)


def video_compare(stages: list[str], recipes: list[str], out_dir: str | Path, overrides: tuple[str, ...] = ()) -> dict:
    runs = run_stages(stages, recipes, out_dir, overrides)
    summary = stage_summary(runs)
    out = Path(out_dir)
    (out / "stages.md").write_text(summary_markdown(summary) + "\n")
    summary["figure"] = str(plot_stages(runs, out / "loss_by_stage.png"))
    return summary
