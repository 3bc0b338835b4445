"""Full training-step time of Adam and SOAP through lictrain's own training step, precision by precision.

One step is everything `Trainer.train_step` does: forward (under autocast for bf16/fp16), R-D loss, backward,
the non-finite guard, clipping, the optimizer step, the auxiliary quantile step and the EMA update, plus (with the
default `--data loader`) taking the next batch from the trainer's own DataLoader and copying it to the device, as
`Trainer.fit` does; `--data cached` reuses four batches already on the device instead.

Precisions: `fp32` is true fp32 (TF32 off), `tf32` is fp32 with TF32 tensor cores (lictrain's default on CUDA),
`bf16` and `fp16` autocast (TF32 on for what stays fp32). Each configuration is timed in the same process: --warmup
steps, then --steps steps each timed by CUDA events without synchronising in between (the host runs ahead as in
training); reported are the median step, the slowest (SOAP's basis-refresh step, every 10 steps), the mean, and
the CUDA allocator's peak allocated and reserved memory over the timed steps.

The papers' workload (issue 28; configs/soap-lic.yaml trains at batch 64):

    python benchmarks/gpu_step.py --models elic,tcm --preset paper --batches 16,64 --crop 256 \\
        --precisions fp32,tf32,bf16

On the CPU (no asynchrony; perf_counter per step), e.g. the dry run of benchmarks/gpu_check.py:

    .venv/bin/python benchmarks/gpu_step.py --device cpu --models mbt2018-mean --preset tiny --batches 2 --crop 64 \\
        --precisions fp32 --warmup 1 --steps 3
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from lictrain import distributed
from lictrain.config import load_config
from lictrain.data import ImageList, train_loader
from lictrain.trainer import Trainer, data_workers, resolve_device

# what a benchmark precision means in config keys
PRECISION_KEYS = {"fp32": ("fp32", False), "tf32": ("fp32", True), "bf16": ("bf16", True), "fp16": ("fp16", True)}


@dataclass
class StepTimes:
    model: str
    batch: int
    precision: str
    optimizer: str
    median_ms: float
    max_ms: float
    mean_ms: float
    peak_alloc_gib: float
    peak_reserved_gib: float


def make_trainer(device: str, model: str, preset: str, batch: int, crop: int, optimizer: str, precision: str,
                 steps: int, run_dir: str, compile_: str = "false", nonfinite: str = "auto",
                 extra: tuple = ()) -> Trainer:
    amp, tf32 = PRECISION_KEYS[precision]
    cfg = load_config(None, [
        f"run_dir={run_dir}", f"device={device}", f"model.name={model}", f"model.preset={preset}",
        f"data.batch_size={batch}", f"data.crop={crop}", "data.val_max_images=1", f"optim.name={optimizer}",
        "optim.lr=1e-4", f"train.precision={amp}", f"train.tf32={str(tf32).lower()}", f"train.nonfinite={nonfinite}",
        f"train.compile={compile_}", f"train.steps={steps}", "train.log_every=1000000", "train.progress=false",
        *extra,
    ])
    return Trainer(cfg, False, (), resolve_device(cfg.device), distributed.Dist())


def batch_source(trainer: Trainer, mode: str):
    """Batches as the loop gets them (the trainer's loader, pinned, copied asynchronously) or four cached ones."""
    cfg, dev = trainer.cfg, trainer.device
    loader = train_loader(trainer.train_images, cfg.data.crop, cfg.data.batch_size, cfg.seed, 0,
                          data_workers(cfg.data.workers, dev), pin_memory=dev.type == "cuda", order=cfg.data.order)
    if mode == "cached":
        xs = [b.to(dev) for b in itertools.islice(iter(loader), 4)]
        return (xs[i % len(xs)] for i in itertools.count())
    return (b.to(dev, non_blocking=True) for b in loader)


def time_steps(trainer: Trainer, batches, warmup: int, steps: int) -> list[float]:
    """Per-step milliseconds of `steps` steps after `warmup`."""
    dev = trainer.device
    for _ in range(warmup):
        trainer.train_step(next(batches))
    if dev.type != "cuda":
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.train_step(next(batches))
            out.append((time.perf_counter() - t0) * 1000)
        return out
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        trainer.train_step(next(batches))
        events[i + 1].record()
    torch.cuda.synchronize(dev)
    return [a.elapsed_time(b) for a, b in zip(events, events[1:])]


def measure(device: str, model: str, preset: str, batch: int, crop: int, optimizer: str, precision: str,
            warmup: int, steps: int, data: str = "loader", nonfinite: str = "auto", extra: tuple = ()) -> StepTimes:
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        trainer = make_trainer(device, model, preset, batch, crop, optimizer, precision, warmup + steps, tmp,
                               nonfinite=nonfinite, extra=extra)
        try:
            ms = time_steps(trainer, batch_source(trainer, data), warmup, steps)
            dev = trainer.device
            alloc = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
            reserved = torch.cuda.max_memory_reserved(dev) / 2**30 if dev.type == "cuda" else float("nan")
        finally:
            trainer.close()
            del trainer
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return StepTimes(model, batch, precision, optimizer, statistics.median(ms), max(ms), statistics.fmean(ms),
                     alloc, reserved)


def table(rows: list[StepTimes]) -> str:
    """Markdown table; the SOAP/Adam ratio is per model, batch and precision, of the medians."""
    adam = {(r.model, r.batch, r.precision): r.median_ms for r in rows if r.optimizer == "adam"}
    lines = ["| model | batch | precision | optimizer | median ms | slowest ms | mean ms | vs adam | peak GiB "
             "(alloc / reserved) |", "|---|---:|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        ref = adam.get((r.model, r.batch, r.precision))
        vs = f"{r.median_ms / ref:.2f}" if ref else "-"
        lines.append(f"| {r.model} | {r.batch} | {r.precision} | {r.optimizer} | {r.median_ms:.1f} | {r.max_ms:.1f} | "
                     f"{r.mean_ms:.1f} | {vs} | {r.peak_alloc_gib:.2f} / {r.peak_reserved_gib:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="elic,tcm")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--optimizers", default="adam,soap")
    ap.add_argument("--precisions", default="fp32,tf32,bf16")
    ap.add_argument("--data", default="loader", choices=["loader", "cached"])
    ap.add_argument("--nonfinite", default="auto", help="train.nonfinite for every configuration (skip, zero, auto)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}; torch {torch.__version__}; preset {args.preset}, crop {args.crop}; {args.steps} steps after "
          f"{args.warmup}; data {args.data}; nonfinite {args.nonfinite}")
    rows = []
    for model, batch, precision, opt in itertools.product(args.models.split(","), map(int, args.batches.split(",")),
                                                          args.precisions.split(","), args.optimizers.split(",")):
        r = measure(args.device, model, args.preset, batch, args.crop, opt, precision, args.warmup, args.steps,
                    args.data, args.nonfinite)
        rows.append(r)
        print(f"  {model} b{batch} {precision} {opt}: median {r.median_ms:.1f} ms, slowest {r.max_ms:.1f} ms, "
              f"peak {r.peak_reserved_gib:.2f} GiB reserved", flush=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
