"""Sharded against replicated SOAP under data parallelism on the CPU: per-rank optimizer step time and state bytes,
next to Adam, measured side by side in one torchrun job (2 processes, gloo, 1 thread each).

Every rank holds the model's main parameters with the same fixed gradients (as after DDP's all-reduce) and steps
three optimizers in turn over the same parameters: Adam, SOAP with shard=False (every rank repeats the whole
step), SOAP sharded (each rank steps its share, then one all-gather of the parameters). Each timed segment is a
whole refresh period (10 steps, the refresh included), segments interleaved over rounds so that machine noise hits
all three alike; a segment's time is the slowest rank's (the one the others wait for), the figure the median over
rounds. State bytes: the optimizer's state tensors held by each rank (the largest rank's).

    .venv/bin/torchrun --nproc_per_node=2 benchmarks/soap_shard.py [--models mbt2018-mean:small,elic:small]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from lictrain.models import build_model
from lictrain.optim import build_optimizer, split_parameters

PERIOD = 10


def state_bytes(opt) -> int:
    seen, total = set(), 0
    for st in opt.state.values():
        for v in st.values():
            for t in v if isinstance(v, list) else [v]:
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mbt2018-mean:small,elic:small")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        print(f"{world} processes (gloo), {torch.get_num_threads()} thread(s) each; optimizer.step() per step, mean "
              f"over a refresh period of {PERIOD} steps, slowest rank, median of {args.rounds} rounds")
    for spec in args.models.split(","):
        name, preset = spec.split(":")
        torch.manual_seed(0)
        model = build_model(name, preset=preset)
        params = [p for _, p in split_parameters(model)[0]]
        gen = torch.Generator().manual_seed(1)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        kinds = {"adam": ("adam", {}), "soap replicated": ("soap", {"shard": False}),
                 "soap sharded": ("soap", {"shard": True})}
        opts = {k: build_optimizer(n, params, 1e-4, options=o) for k, (n, o) in kinds.items()}
        times: dict = {k: [] for k in kinds}
        for r in range(args.rounds + 1):  # round 0: warm-up (SOAP's first eigh, the buckets)
            for k, opt in opts.items():
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(PERIOD):
                    opt.step()
                elapsed = slowest(time.perf_counter() - t0)
                if r:
                    times[k].append(1e3 * elapsed / PERIOD)
        sizes = {k: torch.tensor([state_bytes(o)], dtype=torch.float64) for k, o in opts.items()}
        for t in sizes.values():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if rank == 0:
            med = {k: statistics.median(v) for k, v in times.items()}
            pbytes = sum(p.numel() * p.element_size() for p in params)
            print(f"\n{name}:{preset}: {len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.2f} M parameters")
            print(f"  {'optimizer':<16} {'step ms':>8} {'vs adam':>8} {'state MB/rank':>14} {'state/params':>13}")
            for k in kinds:
                mb = float(sizes[k]) / 1e6
                print(f"  {k:<16} {med[k]:8.2f} {med[k] / med['adam']:8.2f} {mb:14.2f} {float(sizes[k]) / pbytes:13.2f}")
            print(f"  sharded / replicated: step {med['soap sharded'] / med['soap replicated']:.2f}x, state "
                  f"{float(sizes['soap sharded']) / float(sizes['soap replicated']):.2f}x; SOAP's overhead over Adam "
                  f"{med['soap replicated'] - med['adam']:.2f} -> {med['soap sharded'] - med['adam']:.2f} ms")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
