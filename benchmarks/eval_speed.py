"""Encode/decode time per image with real bitstreams, for ELIC's tiny and paper presets (CPU).

    .venv/bin/python benchmarks/eval_speed.py [--images 3] [--data ../shared/data/kodak]

The weights are freshly initialised (a paper-size ELIC cannot be trained on these CPUs); entropy-coding time
depends on the latents' statistics, so times for trained weights differ somewhat. The transforms' cost does not.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch

from lictrain.data import EvalImages
from lictrain.evaluation import Codec, evaluate_image
from lictrain.models import build_model

KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(KODAK) if KODAK.is_dir() else "samples:val")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--model", default="elic")
    ap.add_argument("--presets", default="tiny,paper")
    args = ap.parse_args()
    torch.manual_seed(0)
    ds = EvalImages(args.data, max_images=args.images)
    print(f"# {args.model} on {args.data} ({len(ds)} images), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| preset | parameters | image | encode (s) | decode (s) | bpp |")
    print("|---|---:|---|---:|---:|---:|")
    for preset in args.presets.split(","):
        model = build_model(args.model, preset)
        codec = Codec(model, args.model, preset)
        n_params = sum(p.numel() for p in model.parameters())
        enc, dec = [], []
        for i in range(len(ds)):
            res, _ = evaluate_image(codec, ds[i], ds.name(i))
            enc.append(res.encoding_time)
            dec.append(res.decoding_time)
            print(f"| {preset} | {n_params:,} | {res.image} {res.width}x{res.height} | {res.encoding_time:.2f} | "
                  f"{res.decoding_time:.2f} | {res.bpp:.3f} |", flush=True)
        print(f"| **{preset} mean** | | | **{np.mean(enc):.2f}** | **{np.mean(dec):.2f}** | |")


if __name__ == "__main__":
    main()
