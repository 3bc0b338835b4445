"""Run a `lictrain compare` as parallel processes (one per recipe x lambda x seed), then summarise it once.

For machines with more cores, or a GPU that one small run leaves mostly idle. Every run is its own
`lictrain compare` restricted to one recipe, lambda and seed into the same --out folder; the runs' folders are
the ones the full compare plans (same configuration hash), so the closing full compare reuses them all and only
summarises. Timings of runs that shared the machine are not comparable with one another: use this for quality
figures (BD-rate, R-D curves, losses), and the plain sequential compare for Time-to-anchor.

    python benchmarks/parallel_compare.py --config configs/bench.yaml --out runs/bench-gpu --jobs 12 \
        --set device=cuda [--recipes adam,soap --lambdas ... --seeds ...] [--deadline SECONDS]

--lambdas-for RECIPE=L1,L2,... (repeatable, as in `lictrain compare`): that recipe runs at its own lambdas, e.g. a
recipe that moves the rate (Balanced R-D) at a grid chosen so that its bpp range overlaps the anchor's.

--deadline: after that many seconds the running jobs are asked to stop (SIGTERM: each checkpoints and exits, the
same command resumes them), the waiting ones are not started, and the runs' progress is printed (exit 3).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lictrain.cli import parse_lambdas_for
from lictrain.config import load_config
from lictrain.errors import LictrainError
from lictrain.rundir import CONFIG, METRICS, SUMMARY, read_records


def plan_jobs(recipes: list[str], lambdas: list, seeds: list[str], own: dict[str, list]) -> list[tuple[str, str, str]]:
    """(recipe, lambda, seed) of every run, a recipe named in `own` at its own lambdas; seed by seed, so that the
    first jobs to finish give whole curves (a BD-rate needs every lambda of one seed)."""
    grid = lambda r: [float(v) for v in own.get(r, lambdas)]  # noqa: E731
    every = sorted({v for r in recipes for v in grid(r)})
    return [(r, str(lm), s) for s in seeds for lm in every for r in recipes if lm in grid(r)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--recipes")
    ap.add_argument("--lambdas")
    ap.add_argument("--seeds")
    ap.add_argument("--lambdas-for", action="append", default=[], metavar="RECIPE=L1,L2,...")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--no-summary", action="store_true", help="train and evaluate only")
    ap.add_argument("--deadline", type=float, help="seconds after which running jobs checkpoint and stop")
    args = ap.parse_args()

    cfg = load_config(args.config, args.overrides)
    recipes = args.recipes.split(",") if args.recipes else cfg.compare.recipes
    lambdas = args.lambdas.split(",") if args.lambdas else [str(x) for x in cfg.compare.lambdas]
    seeds = args.seeds.split(",") if args.seeds else [str(x) for x in cfg.compare.seeds]
    try:
        own = {**cfg.compare.lambdas_for, **parse_lambdas_for(args.lambdas_for)}
    except LictrainError as e:
        ap.error(str(e))
    base = [sys.executable, "-m", "lictrain", "compare", "--config", args.config, "--out", args.out]
    for o in args.overrides:
        base += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # each job names its one lambda outright, so it needs no per-recipe grid of its own
    base += ["--set", "compare.lambdas_for={}"]
    jobs = plan_jobs(recipes, lambdas, seeds, own)
    running: list[tuple[subprocess.Popen, str]] = []
    failed = []
    t0 = time.time()
    stopping = False
    while jobs or running:
        if args.deadline is not None and not stopping and time.time() - t0 > args.deadline:
            stopping = True
            print(f"{time.time() - t0:7.0f}s  deadline: stopping {len(running)} running jobs (they checkpoint), "
                  f"{len(jobs)} not started", flush=True)
            for p, _ in running:
                p.send_signal(signal.SIGTERM)
            jobs = []
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
    if stopping:
        progress(Path(args.out))
        return 3
    if failed:
        print("failed:", ", ".join(failed), f"(logs in {logs})")
        return 1
    if args.no_summary:
        return 0
    cmd = base[:-2] + ["--recipes", ",".join(recipes), "--lambdas", ",".join(lambdas), "--seeds", ",".join(seeds)]
    cmd += [f"--lambdas-for={r}={','.join(str(v) for v in vs)}" for r, vs in own.items() if r in recipes]
    return subprocess.call(cmd, env={**os.environ})


def progress(out: Path) -> None:
    """Each run folder's last validation (step, loss) and whether it finished (its steps, or stopped converged)."""
    for run in sorted((out / "runs").glob("*")):
        vals = [r for r in read_records(run, "val") if not r.get("interrupted")] if (run / METRICS).exists() else []
        summary = json.loads((run / SUMMARY).read_text()) if (run / SUMMARY).exists() else {}
        steps = load_config(run / CONFIG).train.steps if (run / CONFIG).exists() else None
        done = summary.get("converged_stop") or (steps is not None and summary.get("step", -1) >= steps)
        last = f"step {vals[-1]['step']}, val loss {vals[-1]['loss']:.4f}" if vals else "no validation yet"
        print(f"  {run.name}: {last}; {'finished' if done else 'not finished'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
