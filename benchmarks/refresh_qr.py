"""SOAP's basis refresh: Householder QR (torch.linalg.qr, LAPACK / cuSOLVER) against CholeskyQR2 in fp64
(lictrain.optim.common.cholesky_qr2) on stacks of a model's real factor sizes, side by side in one process.

The stacks are the ones SOAP's buckets refresh: for every group of same-shape tensors of the model and every
dimension with a factor (2..max_precond_dim), n factors of d x d. Each factor is a random PSD matrix scaled to a
largest entry of 1 and each old basis a random orthogonal one, so every QR does the work of a real refresh
(one power-iteration product, the orthonormalisation). Timed: `power_step_basis` over all of a model's stacks, one
full refresh, median of several rounds run in turn (each method once per round). Reported per model and per
factor side d; the CPU default of SOAP(refresh_qr="auto") is the faster one here.

    .venv/bin/python benchmarks/refresh_qr.py [--models tcm:paper,dcae:paper] [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from lictrain.models import build_model
from lictrain.optim import split_parameters
from lictrain.optim.common import power_step_basis

METHODS = ("householder", "cholesky")


def factor_stacks(model: torch.nn.Module, max_dim: int = 10000) -> list[tuple[int, int]]:
    """(n, d) per bucket dimension with a factor: what one full refresh of SOAP (defaults) orthonormalises."""
    shapes = collections.Counter(tuple(p.shape) for _, p in split_parameters(model)[0] if p.dim() > 1)
    return [(n, d) for shape, n in shapes.items() for d in shape if 1 < d <= max_dim]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, preset: str, device: torch.device, rounds: int = 5, seed: int = 0) -> dict:
    """One full refresh of the model's stacks by each method, median over `rounds` (after one warm-up round):
    {"stacks", "factors", "total_ms": {method: ms}, "per_d": {d: (factors, {method: ms})}, "max_sign_diff"}."""
    gen = torch.Generator().manual_seed(seed)
    stacks = factor_stacks(build_model(name, preset=preset))
    inputs = []
    for n, d in stacks:
        x = torch.randn(n, d, d + 8, generator=gen)
        fs = x @ x.mT
        fs = fs / fs.abs().amax(dim=(1, 2), keepdim=True)
        q = torch.linalg.qr(torch.randn(n, d, d, generator=gen, dtype=torch.float64))[0].float()
        inputs.append((fs.to(device), q.to(device)))
    per_d: dict = {m: collections.defaultdict(list) for m in METHODS}
    totals: dict = {m: [] for m in METHODS}
    worst = 0.0
    for r in range(rounds + 1):  # round 0: warm-up
        results = {}
        for m in METHODS:
            sizes: dict = collections.defaultdict(float)
            _sync(device)
            t_all = time.perf_counter()
            for k, ((n, d), (fs, q)) in enumerate(zip(stacks, inputs)):
                t = time.perf_counter()
                results[m, k] = power_step_basis(fs, q, m)[0]
                _sync(device)
                sizes[d] += time.perf_counter() - t
            total = time.perf_counter() - t_all
            if r:
                totals[m].append(total)
                for d, s in sizes.items():
                    per_d[m][d].append(s)
        if r == 0:  # the two bases agree up to column signs (how far, at most, over every factor)
            for k in range(len(stacks)):
                a, b = results["householder", k], results["cholesky", k]
                signs = torch.sign((a * b).sum(-2, keepdim=True))
                worst = max(worst, float((a - b * signs).abs().max()))
    return {"stacks": stacks, "factors": sum(n for n, _ in stacks), "max_sign_diff": worst,
            "total_ms": {m: 1e3 * statistics.median(totals[m]) for m in METHODS},
            "per_d": {d: (sum(n for n, dd in stacks if dd == d), {m: 1e3 * statistics.median(per_d[m][d])
                                                                  for m in METHODS})
                      for d in sorted(per_d["householder"])}}


def report(name: str, preset: str, res: dict) -> str:
    t = res["total_ms"]
    lines = [f"{name}:{preset}: {res['factors']} factor QRs in {len(res['stacks'])} stacks; bases equal up to column "
             f"signs to {res['max_sign_diff']:.1e}",
             f"  full refresh: householder {t['householder']:.1f} ms, cholesky {t['cholesky']:.1f} ms, "
             f"householder / cholesky {t['householder'] / t['cholesky']:.2f}x",
             f"  {'d':>5} {'factors':>8} {'householder ms':>15} {'cholesky ms':>12} {'ratio':>6}"]
    for d, (count, ms) in res["per_d"].items():
        lines.append(f"  {d:5d} {count:8d} {ms['householder']:15.2f} {ms['cholesky']:12.2f} "
                     f"{ms['householder'] / ms['cholesky']:6.2f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tcm:paper,dcae:paper", help="name:preset,... (default: TCM-S and DCAE)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads; one full refresh (all stacks), median of "
          f"{args.rounds} rounds")
    for spec in args.models.split(","):
        name, preset = spec.split(":")
        print("\n" + report(name, preset, measure(name, preset, device, args.rounds)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
