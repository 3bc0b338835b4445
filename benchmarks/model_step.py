"""CPU time of one training step of a model at its presets, Adam and SOAP side by side (issue 19: the papers' models).

A step is split into its measured parts: forward + R-D loss + backward (the same for both optimizers), Adam's
optimizer.step(), SOAP's ordinary optimizer.step() and the step at which SOAP refreshes its bases (every
`precondition_frequency` = 10 steps). Big presets allow only a few forward/backward passes on 2 cores, so the SOAP
steps after the timed passes reuse the last gradient to reach the first refresh; the full-step ratio is then

    (fwd+bwd + (9 * SOAP step + SOAP refresh step) / 10) / (fwd+bwd + Adam step)

from those medians. The first optimizer step (state allocation; SOAP's first eigendecomposition) is a warm-up and
not timed. Gradient clipping and the auxiliary quantile step are left out (equal for both, and small).

    .venv/bin/python benchmarks/model_step.py --models tcm,tcm-auxt --presets tiny,paper --batch 8 --crop 256
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from lictrain.losses import RateDistortionLoss
from lictrain.models import build_model
from lictrain.optim import build_optimizer, split_parameters


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def measure(name: str, preset: str, optimizer: str, batch: int, crop: int, passes: int) -> dict:
    torch.manual_seed(0)
    model = build_model(name, preset).train()
    params = [p for _, p in split_parameters(model)[0]]
    opt = build_optimizer(optimizer, params, 1e-4)
    criterion, x = RateDistortionLoss(0.013), torch.rand(batch, 3, crop, crop)
    fb, steps = [], []
    for i in range(passes + 1):
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        criterion(model(x), x).loss.backward()
        fb.append(_ms(t0))
        t0 = time.perf_counter()
        opt.step()
        steps.append(_ms(t0))
    refresh, every = [], 1
    if optimizer == "soap":  # on to the first basis refresh with the last gradient
        every = opt.defaults["precondition_frequency"]
        for _ in range(len(steps), every):
            t0 = time.perf_counter()
            opt.step()
            steps.append(_ms(t0))
        refresh = [steps[every - 1]]  # that step refreshes (the 1st built the bases by an eigendecomposition)
        steps = steps[1:every - 1]
    else:
        steps = steps[1:]
    return {"params": sum(p.numel() for p in model.parameters()), "fb": statistics.median(fb[1:]),
            "step": statistics.median(steps), "refresh": refresh[0] if refresh else None, "every": every}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tcm,tcm-auxt")
    ap.add_argument("--presets", default="tiny,paper")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--passes", type=int, default=3, help="timed forward/backward passes per optimizer")
    args = ap.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x {args.crop}^2, "
          f"medians of {args.passes} passes after one warm-up")
    print("| model | preset | parameters | fwd+bwd (s) | Adam step (ms) | SOAP step (ms) | SOAP refresh step (ms) "
          "| full step SOAP / Adam | peak RSS (GB) |")  # the process's running peak
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        for preset in args.presets.split(","):
            adam = measure(name, preset, "adam", args.batch, args.crop, args.passes)
            soap = measure(name, preset, "soap", args.batch, args.crop, args.passes)
            fb = (adam["fb"] + soap["fb"]) / 2
            every = soap["every"]
            ratio = (fb + ((every - 1) * soap["step"] + soap["refresh"]) / every) / (fb + adam["step"])
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
            print(f"| {name} | {preset} | {adam['params'] / 1e6:.2f}M | {fb / 1000:.2f} | {adam['step']:.0f} | "
                  f"{soap['step']:.0f} | {soap['refresh']:.0f} | {ratio:.3f} | {rss:.1f} |", flush=True)


if __name__ == "__main__":
    main()
