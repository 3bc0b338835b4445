"""Run a `lictrain compare` as parallel processes (one per recipe x lambda x seed), then summarise it once.

For machines with more cores, or a GPU that one small run leaves mostly idle. Every run is its own
`lictrain compare` restricted to one recipe, lambda and seed into the same --out folder; the runs' folders are
the ones the full compare plans (same configuration hash), so the closing full compare reuses them all and only
summarises. Timings of runs that shared the machine are not comparable with one another: use this for quality
figures (BD-rate, R-D curves, losses), and the plain sequential compare for Time-to-anchor.

    python benchmarks/parallel_compare.py --config configs/bench.yaml --out runs/bench-gpu --jobs 12 \
        --set device=cuda [--recipes adam,soap --lambdas ... --seeds ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from lictrain.config import load_config


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--recipes")
    ap.add_argument("--lambdas")
    ap.add_argument("--seeds")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--no-summary", action="store_true", help="train and evaluate only")
    args = ap.parse_args()

    cfg = load_config(args.config, args.overrides)
    recipes = args.recipes.split(",") if args.recipes else cfg.compare.recipes
    lambdas = args.lambdas.split(",") if args.lambdas else [str(x) for x in cfg.compare.lambdas]
    seeds = args.seeds.split(",") if args.seeds else [str(x) for x in cfg.compare.seeds]
    base = [sys.executable, "-m", "lictrain", "compare", "--config", args.config, "--out", args.out]
    for o in args.overrides:
        base += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    jobs = [(r, lm, s) for s in seeds for lm in lambdas for r in recipes]
    running: list[tuple[subprocess.Popen, str]] = []
    failed = []
    t0 = time.time()
    while jobs or running:
        while jobs and len(running) < args.jobs:
            r, lm, s = jobs.pop(0)
            name = f"{r}-lmbda{lm}-seed{s}"
            cmd = base + ["--recipes", r, "--lambdas", lm, "--seeds", s, "--set", "train.progress=false"]
            running.append((subprocess.Popen(cmd, env=env, stdout=open(logs / f"{name}.log", "w"),
                                             stderr=subprocess.STDOUT), name))
        time.sleep(2)
        for p, name in list(running):
            if p.poll() is not None:
                running.remove((p, name))
                print(f"{time.time() - t0:7.0f}s  {name}: exit {p.returncode}", flush=True)
                if p.returncode:
                    failed.append(name)
    if failed:
        print("failed:", ", ".join(failed), f"(logs in {logs})")
        return 1
    if args.no_summary:
        return 0
    cmd = base + ["--recipes", ",".join(recipes), "--lambdas", ",".join(lambdas), "--seeds", ",".join(seeds)]
    return subprocess.call(cmd, env={**os.environ})


if __name__ == "__main__":
    sys.exit(main())
