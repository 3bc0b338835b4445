"""`lictrain demo`, the main job: a small compare, Adam against SOAP on the bundled photos (about 10 minutes on two
CPU cores), with the Table-1-style summary printed and the plots written under runs/demo/."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .compare import compare, evaluate_or_reuse, plan_runs, summary_markdown
from ..config import load_config
from .plots import plot_run
from .. import rundir
from ..io import number

log = logging.getLogger("lictrain")


def run_demo(config: str, overrides: list[str], out_dir: str) -> dict:
    out = Path(out_dir)
    cfg = load_config(config, list(overrides))
    cc = cfg.compare
    log.info("demo: %s vs %s on %s, %s/%s, %d steps (crop %d, batch %d), lambda %s; finished runs are reused",
             cc.recipes[0], ", ".join(cc.recipes[1:]), cfg.data.train, cfg.model.name, cfg.model.preset,
             cfg.train.steps, cfg.data.crop, cfg.data.batch_size, ", ".join(f"{x:g}" for x in cc.lambdas))
    t0 = time.perf_counter()
    summary = compare(cfg, out)
    for run in plan_runs(cfg, out):  # one curve plot per run, beside its logs
        plot_run(run.run_dir / rundir.METRICS, run.run_dir / rundir.CURVES,
                 title=f"{run.recipe}, {cfg.model.name}/{cfg.model.preset}, λ={run.lmbda:g}")
    print()
    print(summary_markdown(summary))
    print("Evaluation with real bitstreams:")
    print("| recipe | λ | bpp | PSNR-RGB (dB) | MS-SSIM |")
    print("|---|---:|---:|---:|---:|")
    for run in plan_runs(cfg, out):
        for spec in cc.eval_data:
            r = evaluate_or_reuse(run, spec, cc.eval_max_images)["results"]  # made by compare(): read back
            print(f"| {run.recipe} | {run.lmbda:g} | {r['bpp'][0]:.4f} | {r['psnr-rgb'][0]:.2f} | "
                  f"{number(r['ms-ssim-rgb'][0], '.4f')} |")
    print(f"\n{time.perf_counter() - t0:.0f} s. Plots: " + ", ".join(summary["plots"]))
    print(f"Summary: {out / 'summary.md'}, {out / 'summary.json'}")
    return summary
