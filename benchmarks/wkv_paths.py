"""LALIC's bidirectional WKV by its two paths, side by side: the chunked products (the CPU's path; it chooses
between products and pair-by-pair sums by one host read per call) and the log-space scan (the CUDA and compiled
path: no host read, float64 inside). Forward + backward time on the CPU, and each path's float32 error against the
float64 products, on LALIC-like inputs (decay / T, keys of unit scale).

    .venv/bin/python benchmarks/wkv_paths.py [--batch 2 --tokens 4096 --channels 64 --reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lictrain.models import wkv


def ms(fn, leaves, reps: int) -> float:
    fn(*leaves).sum().backward()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*leaves).sum().backward()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    b, t, c = args.batch, args.tokens, args.channels
    w, u = torch.randn(c) / t, torch.randn(c) / t
    k, v = torch.randn(b, t, c), torch.randn(b, t, c)
    exact = wkv.bi_wkv(*(x.double() for x in (w, u, k, v)))  # the products in float64 (the CPU's path)
    # the scan returned in the inputs' dtype, as bi_wkv returns it on CUDA
    paths = {"products (the CPU's path)": wkv.bi_wkv,
             "scan (the CUDA path, run here)": lambda *a: wkv.bi_wkv_scan(*a).to(a[2].dtype)}
    print(f"# torch {torch.__version__}, 2 threads; B {b}, T {t}, C {c}; forward + backward, median of {args.reps}\n")
    print("| path | ms | max abs error in float32 |")
    print("|---|---:|---:|")
    for name, fn in paths.items():
        leaves = [x.clone().requires_grad_() for x in (w, u, k, v)]
        err = (fn(w, u, k, v).double() - exact).abs().max().item()
        print(f"| {name} | {ms(fn, leaves, args.reps):.0f} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
