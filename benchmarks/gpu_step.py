"""Full training-step time of Adam and SOAP through lictrain's own training step, precision by precision.

One step is everything `Trainer.train_step` does: forward (under autocast for bf16/fp16), R-D loss, backward,
the non-finite guard, clipping, the optimizer step, the auxiliary quantile step and the EMA update. Every
configuration is timed in the same process on the same batches (real crops of the bundled sample photos, moved to
the device once), as the mean over --steps steps after --warmup steps, with a device synchronisation around the
timed block only. Peak memory is the CUDA allocator's peak over the timed steps.

The papers' workload (issue 18), on a GPU:

    python benchmarks/gpu_step.py --device cuda --model elic --preset paper --batch 16 --crop 256
    python benchmarks/gpu_step.py --device cuda --model tcm --preset paper --batch 16 --crop 256   # TCM-S

`--nonfinite skip,zero` puts the host-synchronising guard beside the synchronisation-free one; on the CPU (no
asynchrony to lose) the same comparison shows what the hot-path change costs there:

    .venv/bin/python benchmarks/gpu_step.py --device cpu --model mbt2018-mean --preset tiny --batch 8 --crop 64 \\
        --precisions fp32 --nonfinite skip,zero
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time

import torch

from lictrain import distributed
from lictrain.config import load_config
from lictrain.data import ImageList, train_loader
from lictrain.trainer import Trainer, resolve_device


def make_trainer(args, optimizer: str, precision: str, nonfinite: str, run_dir: str) -> Trainer:
    cfg = load_config(None, [
        f"run_dir={run_dir}", f"device={args.device}", f"model.name={args.model}", f"model.preset={args.preset}",
        f"data.batch_size={args.batch}", f"data.crop={args.crop}", "data.val_max_images=1", f"optim.name={optimizer}",
        "optim.lr=1e-4", f"train.precision={precision}", f"train.nonfinite={nonfinite}", f"train.compile={args.compile}",
        f"train.steps={args.warmup + args.steps}", "train.log_every=1000000", "train.progress=false",
    ])
    device = resolve_device(cfg.device)
    return Trainer(cfg, False, (), device, distributed.Dist())


def batches(args, device, n: int = 4) -> list[torch.Tensor]:
    loader = train_loader(ImageList.scan("samples:train"), args.crop, args.batch, seed=0)
    return [b.to(device) for b in itertools.islice(iter(loader), n)]


def time_steps(trainer: Trainer, xs: list[torch.Tensor], warmup: int, steps: int) -> tuple[float, float]:
    dev = trainer.device
    for i in range(warmup):
        trainer.train_step(xs[i % len(xs)])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for i in range(steps):
        trainer.train_step(xs[i % len(xs)])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    ms = (time.perf_counter() - t0) / steps * 1000
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    return ms, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="elic")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--optimizers", default="adam,soap")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--nonfinite", default="auto", help="comma-separated guards to compare: skip, zero, auto")
    ap.add_argument("--compile", default="false", help="train.compile for every configuration")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}; torch {torch.__version__}; {args.model} ({args.preset}), batch {args.batch} x {args.crop}^2; "
          f"mean of {args.steps} steps after {args.warmup}; compile={args.compile}")
    xs = batches(args, device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision, guard, opt in itertools.product(args.precisions.split(","), args.nonfinite.split(","),
                                                       args.optimizers.split(",")):
            torch.manual_seed(0)
            trainer = make_trainer(args, opt, precision, guard, f"{tmp}/{opt}-{precision}-{guard}")
            ms, peak = time_steps(trainer, xs, args.warmup, args.steps)
            rows.append((precision, trainer.nonfinite, opt, ms, peak))
            print(f"  {precision} {trainer.nonfinite} {opt}: {ms:.1f} ms/step, peak {peak:.2f} GiB", flush=True)
            del trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    anchor = {(p, g): ms for p, g, o, ms, _ in rows if o == args.optimizers.split(",")[0]}
    fp32 = {(g, o): ms for p, g, o, ms, _ in rows if p == "fp32"}
    skip = {(p, o): ms for p, g, o, ms, _ in rows if g == "skip"}
    print("\n| precision | non-finite guard | optimizer | ms/step | vs first optimizer | vs fp32 | vs skip | peak GiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for p, g, o, ms, peak in rows:
        vs_fp32 = f"{ms / fp32[(g, o)]:.2f}" if (g, o) in fp32 else "-"
        vs_skip = f"{ms / skip[(p, o)]:.2f}" if (p, o) in skip else "-"
        print(f"| {p} | {g} | {o} | {ms:.1f} | {ms / anchor[(p, g)]:.2f} | {vs_fp32} | {vs_skip} | {peak:.2f} |")


if __name__ == "__main__":
    main()
