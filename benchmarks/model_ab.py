"""A model's training forward + R-D loss + backward before and after a change, both versions in one process (CPU).

    .venv/bin/python benchmarks/model_ab.py --before 569ee26 --models tcm,dcae,mbt2018-mean --presets tiny,small

As benchmarks/optimizer_ab.py does for SOAP's step: the `lictrain` package of git revision BEFORE is exported to a
temporary folder and imported beside the working tree's; each version builds the model from the same seed and runs
it as its trainer would (the working tree's with its entropy models prepared, models/numerics.py, where that
exists), on the same batch (4 x 128^2 random crops), the versions' repetitions interleaved so that machine noise
hits both alike. Prints the median ms per forward + backward of each and their ratio.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from optimizer_ab import ROOT, export_revision, forget_lictrain  # (benchmarks/, beside this script)


def load(root: Path):
    """build_model, RateDistortionLoss and the entropy-model preparation (None before it existed) under `root`."""
    forget_lictrain()
    sys.path.insert(0, str(root))
    try:
        models = importlib.import_module("lictrain.models")
        losses = importlib.import_module("lictrain.losses")
        try:
            prepare = importlib.import_module("lictrain.models.numerics").prepare_entropy_models
        except ImportError:
            prepare = None
    finally:
        sys.path.pop(0)
    return models.build_model, losses.RateDistortionLoss, prepare


def step_ms(model, loss, x, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        loss(model(x), x).loss.backward()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="a git revision of this repository")
    ap.add_argument("--models", default="tcm,dcae")
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--rounds", type=int, default=6, help="measured rounds per version (each 2 passes)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        export_revision(args.before, tmp)
        versions = {"before": load(Path(tmp)), "after": load(ROOT)}
        print(f"# torch {torch.__version__}, 2 threads; before = {args.before}, after = the working tree; "
              "forward + loss + backward, batch 4 x 128^2\n")
        print("| model | preset | before (ms) | after (ms) | after / before |")
        print("|---|---|---:|---:|---:|")
        x = torch.rand(4, 3, 128, 128)
        for name in args.models.split(","):
            for preset in args.presets.split(","):
                runs = {}
                for label, (build_model, loss, prepare) in versions.items():
                    torch.manual_seed(0)
                    model = build_model(name, preset).train()
                    if prepare is not None:
                        prepare(model)
                    runs[label] = (model, loss(0.013))
                times: dict = {k: [] for k in runs}
                for r in range(1 + args.rounds):  # the first round warms up
                    for label, (model, loss) in runs.items():
                        t = step_ms(model, loss, x, 2)
                        if r:
                            times[label].append(t)
                b, a = statistics.median(times["before"]), statistics.median(times["after"])
                print(f"| {name} | {preset} | {b:.1f} | {a:.1f} | {a / b:.3f} |", flush=True)


if __name__ == "__main__":
    main()
