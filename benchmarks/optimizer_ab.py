"""SOAP's optimizer.step() before and after a change, both versions in one process (CPU).

    .venv/bin/python benchmarks/optimizer_ab.py --before 822f4fa [--models mbt2018-mean --presets tiny,small]

The `lictrain` package of git revision BEFORE is exported (`git archive`) to a temporary folder and imported beside
the working tree's; each version's SOAP steps copies of the same parameters on the same fixed gradients (batch 8 of
64x64 crops), one refresh period (10 steps) at a time, the versions' periods interleaved so that machine noise hits
both alike. Prints the median ms per step of each and their ratio. Machine noise between separate runs on these
2-core machines is 15-45%, larger than the changes this measures; interleaving in one process is what makes a
before/after figure meaningful.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def export_revision(rev: str, dest: str) -> None:
    """The lictrain package of git revision `rev` into folder `dest` (model_ab.py uses it too)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "lictrain"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)


def forget_lictrain() -> None:
    """Drop every imported lictrain module, so that the next import takes the package first on sys.path."""
    for name in [n for n in sys.modules if n == "lictrain" or n.startswith("lictrain.")]:
        del sys.modules[name]


def load(root: Path):
    """SOAP and build_model from the lictrain package under `root` (drops any lictrain already imported)."""
    forget_lictrain()
    sys.path.insert(0, str(root))
    try:
        soap = importlib.import_module("lictrain.optim.soap")
        models = importlib.import_module("lictrain.models")
        losses = importlib.import_module("lictrain.losses")
    finally:
        sys.path.pop(0)
    return soap.SOAP, models.build_model, losses.RateDistortionLoss


def period_ms(params, grads, opt, steps: int = 10) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="a git revision of this repository")
    ap.add_argument("--models", default="mbt2018-mean")
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--periods", type=int, default=8, help="measured refresh periods per version (paper: 3)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        export_revision(args.before, tmp)
        old_soap, _, _ = load(Path(tmp))
        new_soap, build_model, loss = load(ROOT)
        print(f"# torch {torch.__version__}, 2 threads; before = {args.before}, after = the working tree\n")
        print("| model | preset | before (ms) | after (ms) | after / before |")
        print("|---|---|---:|---:|---:|")
        for name in args.models.split(","):
            for preset in args.presets.split(","):
                torch.manual_seed(0)
                model = build_model(name, preset)
                x = torch.rand(8, 3, 64, 64)
                loss(0.013)(model(x), x).loss.backward()
                base = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
                grads = [p.grad.detach().clone() for p in base]
                runs = {}
                for label, cls in (("before", old_soap), ("after", new_soap)):
                    params = [torch.nn.Parameter(p.detach().clone()) for p in base]
                    runs[label] = (params, cls(params, lr=2e-4, betas=(0.95, 0.95), precondition_frequency=10))
                periods = min(args.periods, 3) if preset == "paper" else args.periods
                times: dict = {k: [] for k in runs}
                for r in range(1 + periods):  # the first period of each warms up (first eigh, allocations)
                    for label, (params, opt) in runs.items():
                        t = period_ms(params, grads, opt)
                        if r:
                            times[label].append(t)
                b, a = statistics.median(times["before"]), statistics.median(times["after"])
                print(f"| {name} | {preset} | {b:.2f} | {a:.2f} | {a / b:.3f} |", flush=True)


if __name__ == "__main__":
    main()
