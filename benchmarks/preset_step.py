"""Time per training step of a model at several widths, Adam and SOAP side by side.

Used to size the deciding benchmark (configs/bench.yaml) and the convergence benchmark (configs/converge.yaml): one
full step (forward, R-D loss, backward, clipping, optimizer step, auxiliary quantile step), mean over 40 steps after
10 warm-up steps. Default: mbt2018-mean, widths small and bench, batch 8 x 64x64.

    .venv/bin/python benchmarks/preset_step.py
    .venv/bin/python benchmarks/preset_step.py --model bmshj2018-factorized --widths N=32/M=64,N=64/M=96 --crop 32
"""

from __future__ import annotations

import argparse
import time

import torch

from lictrain.losses import RateDistortionLoss
from lictrain.models import build_model
from lictrain.optim import build_optimizer, split_parameters

WIDTHS = {"small (48/64)": "small", "bench (32/64)": "bench"}


def step_ms(model, optimizer_name: str, warmup: int = 10, steps: int = 40, batch: int = 8, crop: int = 64) -> float:
    main, aux = split_parameters(model)
    params = [p for _, p in main]
    opt = build_optimizer(optimizer_name, params, 1e-3)
    aux_opt = torch.optim.Adam([p for _, p in aux], lr=1e-3)
    criterion, x = RateDistortionLoss(0.013), torch.rand(batch, 3, crop, crop)
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


def _widths(text: str | None) -> dict[str, tuple[str, dict]]:
    """'small,N=32/M=64' -> {label: (preset, kwargs)}: preset names, or N=../M=.. overrides of the tiny preset."""
    if not text:
        return {label: (preset, {}) for label, preset in WIDTHS.items()}
    out = {}
    for item in text.split(","):
        if "=" in item:
            out[item] = ("tiny", {k: int(v) for k, v in (kv.split("=") for kv in item.split("/"))})
        else:
            out[item] = (item, {})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mbt2018-mean")
    ap.add_argument("--widths", help="comma-separated presets or N=../M=.. widths (default: small,bench)")
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x "
          f"{args.crop}x{args.crop}, {args.model}")
    print("| width (N/M) | parameters | Adam (ms) | SOAP (ms) | SOAP / Adam |")
    print("|---|---:|---:|---:|---:|")
    for label, (preset, kwargs) in _widths(args.widths).items():
        torch.manual_seed(0)
        adam = step_ms(build_model(args.model, preset, kwargs), "adam", batch=args.batch, crop=args.crop)
        torch.manual_seed(0)
        model = build_model(args.model, preset, kwargs)
        soap = step_ms(model, "soap", batch=args.batch, crop=args.crop)
        n = sum(p.numel() for p in model.parameters())
        print(f"| {label} | {n:,} | {adam:.1f} | {soap:.1f} | {soap / adam:.2f} |")


if __name__ == "__main__":
    main()
