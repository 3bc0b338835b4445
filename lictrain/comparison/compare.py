"""`lictrain compare`: training recipes side by side, as in the papers' Table 1.

For every lambda and seed, every recipe trains from the same initial weights on the same data in the same order
(both are functions of the seed alone), then is evaluated with real bitstreams on each evaluation set. Runs live in
OUT/runs/<recipe>-lmbda<..>-seed<..>-<hash of the resolved config>: a finished run is reused, an interrupted one
resumed, so re-running a compare only does what is missing. The figures (figures.py) go to summary.md,
summary.json and PNG plots in OUT.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import rundir
from ..checkpoint import load_checkpoint
from ..config import POLICIES, RunConfig, config_from_dict, get_key, identity_hash, set_key, validate
from ..data import active_spec, canonical_split_spelling, resolve_image_files, set_name
from ..errors import LictrainError
from ..evaluation import evaluate
from ..io import number, strict_json, write_atomic
from ..losses import ms_ssim_db
from ..recipes import RECIPES
from ..schedule import converged_at, finish_state
from ..trainer import train
from .figures import (TIME_SPREAD_FLAG, BDRateUnavailable, bd_rate, converged_loss, mean_and_spread, read_val_curve,
                      read_val_records, time_spread, to_anchor)
from .field import bd_against, check_references, field_markdown, reference_curves
from .plots import plot_compare

log = logging.getLogger("lictrain")


@dataclass
class Run:
    recipe: str
    lmbda: float
    seed: int
    cfg: RunConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)


# The keys that existed while run folders were named by legacy_hash (up to 2026-12-03): frozen, so that the runs
# stored then are still found after keys are added.
LEGACY_KEYS = frozenset("""run_dir seed device model.name model.preset model.kwargs data.train data.val data.crop
data.batch_size data.val_crop data.val_max_images data.workers data.order data.cache_mb loss.lmbda loss.metric
optim.name optim.lr optim.options optim.aux_lr method.name method.options train.steps train.clip_max_norm
train.ema_decay train.warmup_steps train.init_from train.init_state train.val_every train.ckpt_every train.log_every
train.schedule train.decay_start train.final_lr_factor train.plateau_patience train.plateau_factor train.min_lr
train.max_consecutive_skips train.precision train.tf32 train.deterministic train.compile train.nonfinite
train.tensorboard train.progress""".split())


def legacy_hash(cfg: RunConfig) -> str | None:
    """The hash run folders were named by before identity_hash (config.py), kept to find the runs stored then; None
    where the config sets a key that did not exist then (no stored run can have it)."""
    d = cfg.to_dict()
    for key, policy in POLICIES.items():
        if key in LEGACY_KEYS or key.startswith(("compare.", "probe.")):
            continue
        if get_key(cfg, key) != policy["baseline"]:
            return None
        section, _, name = key.rpartition(".")
        (d[section] if section else d).pop(name)
    d.pop("run_dir")
    d.pop("compare")
    d["train"].pop("progress")
    d["train"].pop("tensorboard")
    if d["train"].get("init_from") is None:
        d["train"].pop("init_from", None)
    if d["train"].get("init_state") == "weights":
        d["train"].pop("init_state")
    if d["train"]["schedule"] == "plateau":
        for k in ("schedule", "decay_start", "final_lr_factor"):
            d["train"].pop(k)
    d["data"]["workers"] = 0
    if d["data"].get("order") == "shuffle":
        d["data"].pop("order")
    for key, default in (("precision", "fp32"), ("tf32", True), ("compile", False), ("nonfinite", "auto"),
                         ("deterministic", False)):
        if d["train"].get(key) == default:
            d["train"].pop(key, None)
    for k in ("train", "val"):
        d["data"][k] = canonical_split_spelling(active_spec(d["data"][k]))
    if not d["model"].get("kwargs"):
        d["model"].pop("kwargs", None)
    d.pop("probe")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


def init_source(pattern: str | None, lmbda: float, seed: int) -> str | None:
    """train.init_from for one point of a curve: `{lmbda}` and `{seed}` are filled in (lambda as in run folder
    names, e.g. 0.0018) and a glob must then match exactly one run folder or checkpoint file, so each point of a
    fine-tuning compare starts from the matching point of a trained curve, e.g.
    runs/bench/runs/adam-lmbda{lmbda}-seed{seed}-*. Paths are relative to the current directory."""
    if not pattern:
        return pattern
    try:
        text = pattern.format(lmbda=f"{lmbda:g}", seed=seed) if "{" in pattern else pattern
    except (KeyError, IndexError, ValueError) as e:
        raise LictrainError(f"train.init_from '{pattern}': only {{lmbda}} and {{seed}} can be filled in ({e})") from None
    if not glob.has_magic(text):
        return text
    matches = [m for m in sorted(glob.glob(text)) if Path(m).is_file() or rundir.has_checkpoint(m)]
    if len(matches) != 1:
        raise LictrainError(f"train.init_from '{pattern}' gives {len(matches)} checkpoints for lambda {lmbda:g}, "
                            f"seed {seed} ({text}); it must give exactly one")
    return matches[0]


def plan_runs(base: RunConfig, out_dir: Path) -> list[Run]:
    recipes = {**RECIPES, **base.compare.recipe_sets}
    runs = []
    for name in base.compare.recipes:
        if name not in recipes:
            raise LictrainError(f"unknown recipe '{name}'; valid recipes: {', '.join(recipes)} "
                                "(or define it under compare.recipe_sets)")
    grid = lambda name: base.compare.lambdas_for.get(name, base.compare.lambdas)  # noqa: E731
    for lmbda in sorted({float(v) for name in base.compare.recipes for v in grid(name)}):
        for seed in base.compare.seeds:
            for name in base.compare.recipes:
                if lmbda not in {float(v) for v in grid(name)}:
                    continue
                cfg = config_from_dict(base.to_dict())
                for key, value in recipes[name].items():
                    set_key(cfg, key, value)
                cfg.loss.lmbda, cfg.seed = float(lmbda), int(seed)
                cfg.train.init_from = init_source(cfg.train.init_from, float(lmbda), int(seed))
                validate(cfg)
                h, old = identity_hash(cfg), legacy_hash(cfg)
                # A run with the same configuration under another recipe name (e.g. the winner of a learning-rate
                # sweep) is the same computation: reuse its folder (named by either hash).
                same = sorted((out_dir / "runs").glob(f"*-{h}")) or (
                    sorted((out_dir / "runs").glob(f"*-{old}")) if old else [])
                cfg.run_dir = str(same[0] if same else out_dir / "runs" / f"{name}-lmbda{lmbda:g}-seed{seed}-{h}")
                runs.append(Run(name, float(lmbda), int(seed), cfg))
    return runs


def train_or_reuse(run: Run) -> None:
    ckpt = run.run_dir / rundir.CHECKPOINT
    if ckpt.exists():
        state = load_checkpoint(ckpt)["state"]
        if state["step"] >= run.cfg.train.steps or state.get("converged_stop"):
            log.info("reusing %s (finished, %d steps)", run.run_dir.name, state["step"])
            return
        result = train(run.cfg, resume=True)  # the trainer says "resuming ... at step N"
    else:
        log.info("training %s", run.run_dir.name)
        result = train(run.cfg)
    # stopped by Ctrl-C (not by train.stop_when_converged): do not evaluate or summarise a half-trained run
    if result.step < run.cfg.train.steps and not result.converged_stop:
        raise LictrainError(f"interrupted in {run.run_dir.name} at step {result.step}; run the same command again "
                            "to resume")


def evaluate_or_reuse(run: Run, spec: str, max_images: int | None) -> dict:
    """Results of this run on this set, reused only if they were made from the same checkpoint step, spec and
    image limit (recorded in results.json)."""
    key = hashlib.sha256(f"{active_spec(spec)}|{max_images}".encode()).hexdigest()[:6]
    out = run.run_dir / f"eval-{set_name(spec)}-{key}"
    results = out / "results.json"
    step = load_checkpoint(run.run_dir / rundir.CHECKPOINT)["state"]["step"]
    stamp = {"spec": active_spec(spec), "max_images": max_images, "step": step}
    if results.exists():
        try:
            data = json.loads(results.read_text())
            if data.get("lictrain") == stamp:
                return data
        except ValueError:
            pass
    data = evaluate([run.run_dir / rundir.CHECKPOINT], spec, out, name=run.recipe, max_images=max_images)
    data["lictrain"] = stamp
    write_atomic(results, strict_json(data, indent=2))
    return data


def compare(base: RunConfig, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    check_references(base.compare.references)  # before any training: a typo must not cost hours
    runs = plan_runs(base, out_dir)
    settings = base.compare
    for run in runs:
        train_or_reuse(run)
    points: dict = {}  # (recipe, seed, eval set) -> list of (lmbda, bpp, quality: PSNR or MS-SSIM in dB)
    metric = base.loss.metric
    other = "ms-ssim" if metric == "mse" else "mse"
    other_points: dict = {}  # the same, with the other quality measure, for a second R-D plot
    for run in runs:
        for spec in settings.eval_data:
            r = evaluate_or_reuse(run, spec, settings.eval_max_images)["results"]
            points.setdefault((run.recipe, run.seed, spec), []).append((run.lmbda, r["bpp"][0], quality(r, metric)))
            other_points.setdefault((run.recipe, run.seed, spec), []).append(
                (run.lmbda, r["bpp"][0], quality(r, other)))
    summary = summarize(runs, points, settings.recipes, settings.eval_data, settings.bd_method)
    summary["quality"] = QUALITY_LABELS[metric]
    summary["data"] = data_roles(base)
    images = {spec: len(resolve_image_files(spec)[:settings.eval_max_images]) for spec in settings.eval_data}
    refs, notes = reference_curves(settings.codecs, settings.references, settings.eval_data, out_dir, images,
                                   settings.eval_max_images)
    measure = "psnr" if metric == "mse" else "ms-ssim"
    summary["field"] = {"bd_rate": bd_against(points, settings.recipes, summary["seeds"], refs, measure,
                                              settings.bd_method),
                        "curves": {spec: [{"label": c.label, "source": c.source} for c in cs]
                                   for spec, cs in refs.items()},
                        "notes": notes}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "summary.json", strict_json(summary, indent=2))
    write_atomic(out_dir / "summary.md", summary_markdown(summary))
    summary["plots"] = [str(p) for p in plot_compare(runs, points, settings.eval_data, out_dir, summary["quality"],
                                                     images, refs, (other_points, QUALITY_LABELS[other]))]
    write_atomic(out_dir / "summary.json", strict_json(summary, indent=2))
    return summary


QUALITY_LABELS = {"mse": "PSNR-RGB (dB)", "ms-ssim": "MS-SSIM-RGB (dB)"}


def quality(results: dict, metric: str) -> float:
    """The first point's quality in a results.json: PSNR for MSE-trained runs, MS-SSIM in dB for MS-SSIM ones (the
    metric each is trained for, as the papers plot them)."""
    if metric == "mse":
        return results["psnr-rgb"][0]
    value = results["ms-ssim-rgb"][0]
    return None if value is None or value != value else ms_ssim_db(value)  # null: images too small for MS-SSIM


def data_roles(cfg: RunConfig) -> dict:
    """Which images did what in a compare, and whether any image plays two roles (file paths compared)."""
    sets = {"train": [cfg.data.train], "validation": [cfg.data.val], "test": list(cfg.compare.eval_data)}
    limits = {"train": None, "validation": cfg.data.val_max_images, "test": cfg.compare.eval_max_images}
    files = {role: {p.resolve() for spec in specs for p in resolve_image_files(spec)[:limits[role]]}
             for role, specs in sets.items()}  # the images actually used: the first N where a limit is set
    shared = {f"{a}&{b}": len(files[a] & files[b])
              for a, b in (("train", "validation"), ("train", "test"), ("validation", "test"))}
    return {"specs": {role: [active_spec(s) for s in specs] for role, specs in sets.items()},
            "images": {role: len(f) for role, f in files.items()}, "shared_images": shared}


def _finish(run: Run) -> tuple[str, dict | None]:
    """The run's finish state, and for a plateau run the validation at which it first met the converged rule."""
    t, records = run.cfg.train, read_val_records(run.run_dir)
    state = str(finish_state(records, t.schedule, t.steps, run.cfg.optim.lr))
    at = converged_at(records, run.cfg.optim.lr) if t.schedule == "plateau" else None
    return state, ({"step": at["step"], "train_time": at["train_time"]} if at else None)


def _bd_rate(anchor: list, test: list, method: str) -> float:
    """BD-rate between two curves given as lists of (lmbda, bpp, psnr) points."""
    return bd_rate(([p[1] for p in anchor], [p[2] for p in anchor]), ([p[1] for p in test], [p[2] for p in test]),
                   method)


def quality_overlap(anchor: list, test: list) -> tuple[float, float]:
    """The quality range (dB) two curves of (lmbda, bpp, quality) points share: where a BD-rate between them is an
    average over."""
    return max(min(p[2] for p in anchor), min(p[2] for p in test)), min(max(p[2] for p in anchor),
                                                                       max(p[2] for p in test))


def summarize(runs: list[Run], points: dict, recipes: list[str], eval_sets: list[str], method: str) -> dict:
    anchor = recipes[0]
    seeds = sorted({r.seed for r in runs})
    curves = {(r.recipe, r.lmbda, r.seed): read_val_curve(r.run_dir) for r in runs}
    rows = []
    for name in recipes:
        per_point = []
        for r in runs:
            if r.recipe != name:
                continue
            finish, at = _finish(r)
            point = {"lmbda": r.lmbda, "seed": r.seed, "steps_to_anchor": None, "time_to_anchor": None,
                     "final_gap": None, "target": None, "final_val_loss": curves[(name, r.lmbda, r.seed)][-1].loss,
                     "finish": finish, "converged_at": at,
                     "time_spread": time_spread(curves[(name, r.lmbda, r.seed)])}
            anchor_curve = curves.get((anchor, r.lmbda, r.seed))
            if anchor_curve is not None:  # a recipe on its own lambda grid has no anchor loss to reach elsewhere
                ta = to_anchor(curves[(name, r.lmbda, r.seed)], anchor_curve)
                point.update(steps_to_anchor=ta.steps, time_to_anchor=ta.time, final_gap=ta.final_gap,
                             undefined=ta.undefined, target=converged_loss(anchor_curve))
            per_point.append(point)
        row = {"recipe": name, "points": per_point,
               "own_lambdas": not any(p["target"] is not None for p in per_point) and name != anchor}
        for key in ("steps_to_anchor", "time_to_anchor"):
            values = [p[key] for p in per_point if p["target"] is not None]
            row[key] = None if not values or any(v is None for v in values) else dict(
                zip(("mean", "std"), mean_and_spread(values)))
            row[key + "_reached"] = f"{sum(v is not None for v in values)}/{len(values)}"
        row["bd_rate"], row["bd_rate_unavailable"], row["bd_rate_overlap"] = {}, {}, {}
        for spec in eval_sets:
            values, spans = [], []
            for seed in seeds:
                a, t = points[(anchor, seed, spec)], points[(name, seed, spec)]
                try:
                    values.append(_bd_rate(a, t, method))
                    spans.append(quality_overlap(a, t))
                except BDRateUnavailable as why:
                    row["bd_rate_unavailable"][spec] = str(why)
            ok = spec not in row["bd_rate_unavailable"]
            row["bd_rate"][spec] = float(np.mean(values)) if ok else None
            # the quality range the BD-rate averages over (bjontegaard integrates over the curves' overlap): the
            # narrowest over the seeds
            row["bd_rate_overlap"][spec] = [max(s[0] for s in spans), min(s[1] for s in spans)] if ok else None
            row.setdefault("bd_rate_std", {})[spec] = mean_and_spread(values)[1] if ok and len(values) > 1 else None
        available = [v for v in row["bd_rate"].values() if v is not None]
        row["bd_rate_average"] = float(np.mean(available)) if len(available) == len(eval_sets) else None
        rows.append(row)
    _converge_ratios(rows)
    rd_points = [{"recipe": name, "seed": seed, "set": spec, "lmbda": lmbda, "bpp": bpp, "quality": quality}
                 for name in recipes for seed in seeds for spec in eval_sets
                 for lmbda, bpp, quality in points[(name, seed, spec)]]
    return {"anchor": anchor, "eval_sets": eval_sets, "bd_method": method, "rows": rows,
            "lambdas": sorted({r.lmbda for r in runs}), "seeds": seeds, "rd_points": rd_points,
            "noise_floor": noise_floor(points, recipes, seeds, eval_sets, method)}


def _converge_ratios(rows: list[dict]) -> None:
    """Steps and time at which each recipe's plateau runs met the converged rule, over the anchor's (rows[0]) at the
    same lambda and seed; row["converge_ratio"] is None where no run of the row or of the anchor converged."""
    anchor_at = {(p["lmbda"], p["seed"]): p.get("converged_at") for p in rows[0]["points"]}
    for row in rows:
        pairs = [(p["converged_at"], anchor_at.get((p["lmbda"], p["seed"]))) for p in row["points"]]
        both = [(c, a) for c, a in pairs if c and a and a["step"] and a["train_time"]]
        row["converge_ratio"] = None if not both else {
            "steps": mean_and_spread([c["step"] / a["step"] for c, a in both]),
            "time": mean_and_spread([c["train_time"] / a["train_time"] for c, a in both]),
            "converged": f"{sum(c is not None for c, _ in pairs)}/{len(pairs)}", "pairs": len(both)}


def converge_lines(summary: dict) -> list[str]:
    rows = [r for r in summary["rows"] if r.get("converge_ratio")]
    if not rows:
        return []
    lines = ["", f"Converged by the rule (the first validation at which it holds), relative to {summary['anchor']} at "
                 "the same λ and seed:"]
    for row in rows:
        c = row["converge_ratio"]
        lines.append(f"- {row['recipe']}: steps {c['steps'][0]:.2f} ± {c['steps'][1]:.2f}, time {c['time'][0]:.2f} ± "
                     f"{c['time'][1]:.2f} ({c['pairs']} pairs; its runs converged: {c['converged']})")
    return lines


def rd_table(summary: dict) -> list[str]:
    """The R-D points behind the BD-rates: per evaluation set, λ and seed, each recipe's real bpp / quality."""
    recipes = [row["recipe"] for row in summary["rows"]]
    quality = summary.get("quality", "PSNR-RGB (dB)")
    lines = []
    for spec in summary["eval_sets"]:
        at = {(p["recipe"], p["lmbda"], p["seed"]): p for p in summary.get("rd_points", []) if p["set"] == spec}
        if not at:
            continue
        lines += ["", f"Real bitstreams on {set_name(spec)} (bpp / {quality}):", "",
                  "| λ | seed | " + " | ".join(recipes) + " |", "|---:|---:|" + "---|" * len(recipes)]
        for lmbda in summary["lambdas"]:
            for seed in summary["seeds"]:
                cells = [f"{at[(r, lmbda, seed)]['bpp']:.4f} / {number(at[(r, lmbda, seed)]['quality'], '.3f')}"
                         if (r, lmbda, seed) in at else "-" for r in recipes]
                lines.append(f"| {lmbda:g} | {seed} | " + " | ".join(cells) + " |")
    return lines


def noise_floor(points: dict, recipes: list[str], seeds: list[int], eval_sets: list[str], method: str) -> dict:
    """Per evaluation set and recipe, the BD-rate of each seed's curve against each earlier seed's: the same recipe,
    so any number here is seed noise, and a BD-rate between recipes must exceed it to mean something. With the
    pairs, their rms and sigma = rms / sqrt(2), the seed-to-seed spread of one curve's BD-rate if seeds are
    independent (a difference of two curves has twice one curve's variance)."""
    out = {}
    for spec in eval_sets:
        per_recipe = {}
        for name in recipes:
            pairs, values = {}, []
            for j, b in enumerate(seeds):
                for a in seeds[:j]:
                    try:
                        v = _bd_rate(points[(name, a, spec)], points[(name, b, spec)], method)
                        pairs[f"{b} vs {a}"] = v
                        values.append(v)
                    except BDRateUnavailable as why:
                        pairs[f"{b} vs {a}"] = f"unavailable ({why})"
            if pairs:
                rms = float(np.sqrt(np.mean(np.square(values)))) if values else None
                sigma = rms / float(np.sqrt(2)) if rms is not None else None
                per_recipe[name] = {"pairs": pairs, "rms": rms, "sigma": sigma}
        out[spec] = per_recipe
    return out


def floor_lines(summary: dict) -> list[str]:
    """The noise floor per recipe, and for each recipe's mean BD-rate against the anchor the standard error the
    floors imply, sqrt((sigma_anchor^2 + sigma_recipe^2) / seeds)."""
    lines = []
    n = len(summary["seeds"])
    for spec, per_recipe in (summary.get("noise_floor") or {}).items():
        if not per_recipe:
            continue
        lines += ["", f"Noise floor ({set_name(spec)}): BD-rate between seeds of the same recipe (seed b vs seed a):"]
        for name, f in per_recipe.items():
            cells = ", ".join(f"{k} " + (f"{v:+.2f}%" if isinstance(v, float) else v) for k, v in f["pairs"].items())
            spread = f" (rms {f['rms']:.2f}%, one curve's σ ≈ {f['sigma']:.2f}%)" if f["sigma"] is not None else ""
            lines.append(f"- {name}: {cells}{spread}")
        anchor = per_recipe.get(summary["anchor"], {}).get("sigma")
        for row in summary["rows"]:
            own = per_recipe.get(row["recipe"], {}).get("sigma")
            bd = row["bd_rate"].get(spec)
            if row["recipe"] == summary["anchor"] or anchor is None or own is None or bd is None:
                continue
            se = float(np.sqrt((anchor ** 2 + own ** 2) / n))
            lines.append(f"- {row['recipe']} against {summary['anchor']}: {bd:+.2f}% over {n} seeds, standard error "
                         f"from the floors ≈ {se:.2f}% ({abs(bd) / se:.1f} standard errors)")
    return lines


def _cell_ratio(row: dict, key: str) -> str:
    v = row[key]
    if v is None and row.get("own_lambdas"):
        return "n/a (own λ grid)"
    if v is None:  # the largest final gap to the target, relative to it, and where
        gaps = [(p["final_gap"] / p["target"], p["lmbda"]) for p in row["points"] if p["final_gap"] is not None]
        if not gaps:
            undefined = next((p["undefined"] for p in row["points"] if p.get("undefined")), None)
            return f"undefined ({undefined})" if undefined else "n/a"
        rel, lmbda = max(gaps)
        return f"not reached ({row[key + '_reached']}; largest gap {100 * rel:+.1f}% at λ {lmbda:g})"
    return f"{v['mean']:.2f}" + (f" ± {v['std']:.2f}" if v["std"] else "")


def summary_markdown(summary: dict) -> str:
    sets = summary["eval_sets"]
    lines = [
        f"Anchor: **{summary['anchor']}**; lambdas {summary['lambdas']}; seeds {summary['seeds']}; "
        f"BD-rate ({summary['bd_method']}) of {summary.get('quality', 'PSNR-RGB (dB)')} vs bpp from real "
        "bitstreams, negative is better.",
        "",
        "| recipe | Steps-to-" + summary["anchor"] + " | Time-to-" + summary["anchor"] + " | "
        + " | ".join(f"BD-rate {set_name(s)}" for s in sets) + " | BD-rate avg |",
        "|---|---:|---:|" + "---:|" * len(sets) + "---:|",
    ]
    def bd_cell(row: dict, s: str) -> str:
        if row["bd_rate"][s] is None:
            return f"unavailable ({row['bd_rate_unavailable'].get(s, '')})"
        std = (row.get("bd_rate_std") or {}).get(s)
        span = (row.get("bd_rate_overlap") or {}).get(s)
        over = f" (over {span[0]:.2f}-{span[1]:.2f} dB)" if span and row["recipe"] != summary["anchor"] else ""
        return f"{row['bd_rate'][s]:+.2f}%" + (f" ± {std:.2f}" if std else "") + over

    for row in summary["rows"]:
        bd_cells = [bd_cell(row, s) for s in sets]
        avg = row["bd_rate_average"]
        lines.append(f"| {row['recipe']} | {_cell_ratio(row, 'steps_to_anchor')} | {_cell_ratio(row, 'time_to_anchor')}"
                     f" | {' | '.join(bd_cells)} | {f'{avg:+.2f}%' if avg is not None else 'unavailable'} |")
    lines += converge_lines(summary)
    lines += rd_table(summary)
    lines += field_markdown(summary.get("field") or {})
    lines += floor_lines(summary)
    data = summary.get("data")
    if data:
        shared = [f"{k.replace('&', ' and ')}: {v}" for k, v in data["shared_images"].items() if v]
        lines += ["", f"Validation (LR schedule, target loss, Steps/Time-to-{summary['anchor']}): "
                      f"{'; '.join(data['specs']['validation'])} ({data['images']['validation']} images). "
                      f"Test (BD-rate, R-D plots, real bitstreams): {'; '.join(data['specs']['test'])} "
                      f"({data['images']['test']} images). Training: {data['images']['train']} images. "
                      + ("Images shared between roles: " + ", ".join(shared) + "." if shared else
                         "No image plays two roles.")]
    lines += ["", "Per lambda and seed (finish: annealed = a fixed-budget schedule ended at <= lr0/10; converged = the "
                  "plateau scheduler cut the LR >= 2 times and the validation loss moved < 1% over the last fifth; "
                  "see lictrain/schedule.py):", "",
              "| recipe | λ | seed | target | final val loss | steps | time | finish |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in summary["rows"]:
        for p in row["points"]:
            fmt = lambda v: f"{v:.2f}" if v is not None else ("undefined" if p.get("undefined") else  # noqa: E731
                                                               "not reached" if p["target"] is not None else "-")
            target = f"{p['target']:.4f}" if p["target"] is not None else "-"
            at = p.get("converged_at")
            finish = p.get("finish", "") + (f"; met at step {at['step']}" if at else "")
            lines.append(f"| {row['recipe']} | {p['lmbda']:g} | {p['seed']} | {target} | "
                         f"{p['final_val_loss']:.4f} | {fmt(p['steps_to_anchor'])} | {fmt(p['time_to_anchor'])} | "
                         f"{finish} |")
    loaded = [f"{row['recipe']} λ {p['lmbda']:g} seed {p['seed']} ({p['time_spread']:.1f}x)" for row in summary["rows"]
              for p in row["points"] if (p.get("time_spread") or 0) > TIME_SPREAD_FLAG]
    if loaded:
        lines += ["", f"Timing: the slowest validation interval took more than {TIME_SPREAD_FLAG:g}x the median seconds "
                      f"per step in {', '.join(loaded)}: the machine was busy with something else part of the time, so "
                      "these runs' Time-to-" + summary["anchor"] + " is uncertain (Steps-to- is not affected)."]
    return "\n".join(lines) + "\n"
