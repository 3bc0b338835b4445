"""What FLIC's coding of round(y) costs in real rANS bits against -log2 of its likelihood (the exact Gaussian pmf at
the exact mean), for several numbers of mean-fraction bins (lictrain/models/tca.py, IntegerGaussianConditional).
1 bin is a zero-centred table per scale, what CompressAI's own tables would give for round(y) - round(mean).

Synthetic symbols: means uniform in [-6, 6], scales log-uniform in [0.05, 8], y ~ N(mean, scale).

    .venv/bin/python benchmarks/integer_coding.py [--symbols 20000]
"""

from __future__ import annotations

import argparse
import math

import torch
from compressai.ans import BufferedRansEncoder

from lictrain.models.tca import IntegerGaussianConditional, integer_scale_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--symbols", type=int, default=20000)
    ap.add_argument("--bins", default="16,8,4,1")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    n = args.symbols
    scales = torch.exp(torch.empty(n).uniform_(math.log(0.05), math.log(8), generator=g))
    means = torch.empty(n).uniform_(-6, 6, generator=g)
    y = means + scales * torch.randn(n, generator=g)
    print(f"# {n} symbols, {len(integer_scale_table())} scales from 0.01")
    print("| fraction bins | rANS bits | -log2 likelihood | excess | table rows x longest |")
    print("|---:|---:|---:|---:|---|")
    for bins in (int(b) for b in args.bins.split(",")):
        gc = IntegerGaussianConditional(offsets=bins).eval()
        gc.update_scale_table(integer_scale_table())
        ideal = -gc(y, scales, means)[1].log2().sum().item()
        encoder = BufferedRansEncoder()
        encoder.encode_with_indexes((torch.round(y) - torch.round(means)).int().tolist(),
                                    gc.coding_indexes(scales, means).tolist(), *gc.coding_tables())
        bits = 8 * len(encoder.flush())
        rows, longest = gc.quantized_cdf.shape
        print(f"| {bins} | {bits} | {ideal:.0f} | {100 * (bits / ideal - 1):+.2f}% | {rows} x {longest} |")


if __name__ == "__main__":
    main()
