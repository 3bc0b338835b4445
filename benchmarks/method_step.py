"""Per-step cost of the training methods relative to the standard one, measured side by side in one process.

Each method trains the same model on the same crops through the real loop (lictrain.trainer.train), and the
loop's own honest training time (validation and checkpoints excluded) is divided by the step count. Methods are
interleaved in rounds so that machine noise hits all of them alike; the median over rounds is reported.

    .venv/bin/python benchmarks/method_step.py [--steps 40] [--rounds 3] [--models mbt2018-mean,elic] [--preset tiny]

The deciding benchmark's model: --models mbt2018-mean --preset bench.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from lictrain.config import load_config
from lictrain.trainer import train

METHODS = {  # log_every 10 (the default): Balanced R-D's gradient diagnostics run on every 10th step
    "standard": [],
    "cautious-adam": ["optim.name=cautious-adam"],
    "balanced-rd": ["method.name=balanced-rd"],
    "balanced-rd-cautious": ["method.name=balanced-rd", "optim.name=cautious-adam"],
    "balanced-rd (diagnostics every step)": ["method.name=balanced-rd", "train.log_every=1"],
    "balanced-rd-qp": ["method.name=balanced-rd-qp"],
}


def step_time(model: str, preset: str, overrides: list[str], steps: int, run_dir: Path) -> float:
    cfg = load_config(None, [
        f"run_dir={run_dir}", f"model.name={model}", f"model.preset={preset}", "data.crop=64", "data.batch_size=8",
        f"train.steps={steps}", f"train.val_every={10 * steps}", f"train.ckpt_every={10 * steps}",
        "train.progress=false", "data.val_max_images=1", "data.val_crop=64", "optim.lr=1e-3", *overrides,
    ])
    return train(cfg).train_time / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="mbt2018-mean,elic")
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {args.preset} presets, batch 8, 64x64 crops, "
          f"{args.steps} steps x {args.rounds} rounds (median)\n")
    print("| model | method | ms / step | / standard |")
    print("|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            times: dict[str, list[float]] = {m: [] for m in METHODS}
            for r in range(args.rounds):
                for i, (name, overrides) in enumerate(METHODS.items()):
                    times[name].append(step_time(model, args.preset, overrides, args.steps, Path(tmp) / f"{model}-{r}-{i}"))
            base = statistics.median(times["standard"])
            for name, ts in times.items():
                t = statistics.median(ts)
                print(f"| {model} | {name} | {1000 * t:.1f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
