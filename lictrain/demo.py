"""`lictrain demo`, the main job: train a tiny model on the bundled photos, evaluate with real bitstreams, plot."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .checkpoint import load_checkpoint
from .cli import format_results_table
from .config import load_config
from .evaluate import evaluate
from .plots import plot_run
from .train import train

log = logging.getLogger("lictrain")


def run_demo(config: str, overrides: list[str], run_dir: str) -> dict:
    root = Path(run_dir)
    cfg = load_config(config, list(overrides) + [f"run_dir={root / 'train'}"])
    ckpt_path = root / "train" / "checkpoint.pt"
    t0 = time.perf_counter()
    resume = ckpt_path.exists()
    if resume and load_checkpoint(ckpt_path)["state"]["step"] >= cfg.train.steps:
        log.info("demo: reusing the finished run in %s (delete it to train again)", ckpt_path.parent)
    else:
        log.info("demo: training %s/%s on %s for %d steps (crop %d, batch %d, lmbda %g, %s)", cfg.model.name,
                 cfg.model.preset, cfg.data.train, cfg.train.steps, cfg.data.crop, cfg.data.batch_size,
                 cfg.loss.lmbda, cfg.optim.name)
        train(cfg, resume=resume)
    t1 = time.perf_counter()
    summary = evaluate([ckpt_path], cfg.data.val, root / "eval", name="demo")
    t2 = time.perf_counter()
    png = plot_run(root / "train" / "metrics.jsonl", root / "loss_curve.png",
                   title=f"lictrain demo: {cfg.model.name}/{cfg.model.preset}, {cfg.optim.name}, λ={cfg.loss.lmbda}")
    ckpt = load_checkpoint(ckpt_path)
    print()
    print(f"trained {ckpt['state']['step']} steps in {ckpt['state']['train_time']:.0f} s of training time "
          f"({t1 - t0:.0f} s wall this session); evaluated in {t2 - t1:.0f} s on {cfg.data.val}:")
    print(format_results_table(summary))
    print(f"plot: {png}\nresults: {root / 'eval' / 'results.json'}\nper image: {root / 'eval' / 'per_image.csv'}")
    return summary
