"""lictrain's Adam anchor beside the field's reference training step, on the same stream of crops (issue 29).

The reference step is written here after the description of CompressAI's examples/train.py (not copied from it):
zero both optimizers' gradients; forward; CompressAI's own RateDistortionLoss (R + lambda 255^2 MSE); backward; the
main parameters' gradient norm clipped to 1; Adam step; the auxiliary (quantile) loss backward; auxiliary Adam
step; no EMA. Both train the deciding benchmark's model and data (configs/bench.yaml: mean-scale hyperprior N=32,
M=64, 64x64 crops, batch 8) at lambda 0.0067 with Adam at lr 1e-3 and the benchmark's cosine anneal to 1e-4 over
the last 20% of the steps (lictrain's schedule function for both: the schedule is not what is compared), from the
same initial weights (seeded) and on the same crops (lictrain's train_loader for the order asked). One validation
function scores every run: the benchmark's held-out photos (256^2 centre crops), eval-mode forward, R + lambda
255^2 MSE, with the raw weights (lictrain's EMA beside them).

    .venv/bin/python benchmarks/anchor_fidelity.py --seeds 0,1 --orders shuffle,iid        # ~55 min on 2 cores

lictrain must be no worse than the reference beyond the seed spread.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from compressai.losses import RateDistortionLoss as CompressAILoss

from lictrain.checkpoint import load_checkpoint
from lictrain.config import load_config
from lictrain.data import EvalImages, ImageList, pad_to_multiple, train_loader
from lictrain.models import build_model
from lictrain.schedule import lr_factor
from lictrain.trainer import train


@torch.no_grad()
def validation_loss(model, cfg) -> float:
    """Mean over the held-out images of R + lambda 255^2 MSE, eval-mode forward (no noise)."""
    was_training = model.training
    model.eval()
    images, loss = EvalImages(cfg.data.val, cfg.data.val_crop), CompressAILoss(lmbda=cfg.loss.lmbda)
    total = 0.0
    for i in range(len(images)):
        x = pad_to_multiple(images[i][None], 64)
        total += loss(model(x), x)["loss"].item()
    model.train(was_training)
    return total / len(images)


def reference_run(cfg, steps: int) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.model.name, cfg.model.preset).train()
    main = [p for n, p in net.named_parameters() if not n.endswith(".quantiles")]
    quantiles = [p for n, p in net.named_parameters() if n.endswith(".quantiles")]
    optimizer, aux_optimizer = torch.optim.Adam(main, lr=cfg.optim.lr), torch.optim.Adam(quantiles, lr=cfg.optim.aux_lr)
    criterion = CompressAILoss(lmbda=cfg.loss.lmbda)
    loader = train_loader(ImageList.scan(cfg.data.train), cfg.data.crop, cfg.data.batch_size, cfg.seed,
                          order=cfg.data.order)
    for step, x in zip(range(steps), loader):
        for g in optimizer.param_groups:
            g["lr"] = cfg.optim.lr * lr_factor(step, steps, "cosine", cfg.train.decay_start, cfg.train.final_lr_factor)
        optimizer.zero_grad()
        aux_optimizer.zero_grad()
        criterion(net(x), x)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(main, 1.0)
        optimizer.step()
        net.aux_loss().backward()
        aux_optimizer.step()
    return net


def lictrain_run(cfg, tmp: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """lictrain's own loop (compare's Adam anchor); returns (raw weights, EMA weights)."""
    result = train(cfg)
    ckpt = load_checkpoint(result.run_dir)
    raw, ema = (build_model(cfg.model.name, cfg.model.preset) for _ in range(2))
    raw.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"]["model"])
    return raw, ema


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--orders", default="shuffle,iid")
    ap.add_argument("--lmbda", type=float, default=0.0067)
    ap.add_argument("--steps", type=int, default=8000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"# torch {torch.__version__}, 2 threads; configs/bench.yaml at lambda {args.lmbda}, {args.steps} steps; "
          "validation loss on the held-out photos (raw weights; lictrain's EMA weights beside)\n")
    print("| order | seed | reference step | lictrain | lictrain EMA | minutes (ref / lictrain) |")
    print("|---|---:|---:|---:|---:|---|")
    results: dict = {}
    for order in args.orders.split(","):
        for seed in map(int, args.seeds.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = load_config("bench", [f"run_dir={tmp}/run", f"seed={seed}", f"loss.lmbda={args.lmbda}",
                                            f"data.order={order}", f"train.steps={args.steps}",
                                            f"train.val_every={args.steps}", f"train.ckpt_every={args.steps}",
                                            "train.progress=false"])
                t0 = time.perf_counter()
                ref = validation_loss(reference_run(cfg, args.steps), cfg)
                t1 = time.perf_counter()
                raw, ema = (validation_loss(m, cfg) for m in lictrain_run(cfg, tmp))
                t2 = time.perf_counter()
            results.setdefault(order, []).append((ref, raw, ema))
            print(f"| {order} | {seed} | {ref:.4f} | {raw:.4f} | {ema:.4f} | {(t1 - t0) / 60:.1f} / "
                  f"{(t2 - t1) / 60:.1f} |", flush=True)
    print()
    for order, rows in results.items():
        refs, raws = [r[0] for r in rows], [r[1] for r in rows]
        spread = max(refs + raws) - min(refs + raws)
        gap = statistics.fmean(raws) - statistics.fmean(refs)
        print(f"{order}: reference mean {statistics.fmean(refs):.4f} (range {min(refs):.4f}-{max(refs):.4f}), "
              f"lictrain mean {statistics.fmean(raws):.4f} (range {min(raws):.4f}-{max(raws):.4f}); lictrain - "
              f"reference = {gap:+.4f}, all runs' spread {spread:.4f}: "
              f"{'no worse beyond the spread' if gap <= spread else 'WORSE beyond the spread'}")


if __name__ == "__main__":
    main()
