"""Time per training step of the mean-scale hyperprior at several widths, Adam and SOAP side by side.

Used to size the deciding benchmark (configs/bench.yaml): one full step (forward, R-D loss, backward, clipping,
optimizer step, auxiliary quantile step) on batch 8 x 64x64, mean over 40 steps after 10 warm-up steps.

    .venv/bin/python benchmarks/preset_step.py
"""

from __future__ import annotations

import time

import torch

from lictrain.losses import RateDistortionLoss
from lictrain.models import build_model
from lictrain.optim import build_optimizer, split_parameters

WIDTHS = {"small (48/64)": "small", "bench (32/64)": "bench"}


def step_ms(model, optimizer_name: str, warmup: int = 10, steps: int = 40) -> float:
    main, aux = split_parameters(model)
    params = [p for _, p in main]
    opt = build_optimizer(optimizer_name, params, 1e-3)
    aux_opt = torch.optim.Adam([p for _, p in aux], lr=1e-3)
    criterion, x = RateDistortionLoss(0.013), torch.rand(8, 3, 64, 64)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        criterion(model(x), x).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        model.aux_loss().backward()
        aux_opt.step()
        aux_opt.zero_grad()
    return (time.perf_counter() - t0) / steps * 1000


def main() -> None:
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, batch 8 x 64x64, mbt2018-mean")
    print("| width (N/M) | parameters | Adam (ms) | SOAP (ms) | SOAP / Adam |")
    print("|---|---:|---:|---:|---:|")
    for label, preset in WIDTHS.items():
        torch.manual_seed(0)
        adam = step_ms(build_model("mbt2018-mean", preset), "adam")
        torch.manual_seed(0)
        model = build_model("mbt2018-mean", preset)
        soap = step_ms(model, "soap")
        n = sum(p.numel() for p in model.parameters())
        print(f"| {label} | {n:,} | {adam:.1f} | {soap:.1f} | {soap / adam:.2f} |")


if __name__ == "__main__":
    main()
