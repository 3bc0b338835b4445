"""Data order (issue 29): per-epoch reshuffling against i.i.d. draws, read from finished runs.

Reads two `lictrain compare` folders of the same config, one per `data.order`, and optionally pairs of single runs
(e.g. the training set halved), and prints:
  1. per recipe and lambda: the final validation loss under each order, and the final training loss (the mean of
     the last `--tail` steps' logged training losses: crops, raw weights) beside it, so that a worse validation loss
     with an equally worse training loss reads as optimisation, a worse one with a better training loss as
     generalisation;
  2. when the gap opens: Adam's validation loss at a few steps under each order;
  3. the SOAP-vs-Adam verdict under each order (Steps/Time-to-Adam and BD-rate from each compare's summary.json),
     and the BD-rate of each recipe's i.i.d. curve against its reshuffled one (real bitstreams on the test set);
  4. for each extra pair of runs (shuffle, iid): final validation and training losses;
  5. for a pair whose runs logged every step (train.log_every=1): the spread of the per-step training loss and its
     autocorrelation at lag 1, within each order.

    python benchmarks/data_order.py --shuffle runs/bench-shuffle --iid runs/bench-iid \
        --pair half=runs/half-shuffle,runs/half-iid
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lictrain.comparison.figures import bd_rate


def records(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in rows if r.get("kind") == kind and not r.get("interrupted")]


def final_losses(run: Path, tail: int) -> tuple[float, float]:
    """(last validation loss, mean logged training loss over the last `tail` steps)."""
    val = records(run, "val")[-1]["loss"]
    train = records(run, "train")
    last = train[-1]["step"]
    return val, float(np.mean([r["loss"] for r in train if r["step"] > last - tail]))


def compare_runs(folder: Path) -> dict:
    """(recipe, lambda) -> run folder (named RECIPE-lmbdaL-seedS-HASH by compare)."""
    out = {}
    for run in sorted((folder / "runs").iterdir()):
        recipe = run.name.split("-lmbda")[0]
        lmbda = float(run.name.split("-lmbda")[1].split("-seed")[0])
        out[(recipe, lmbda)] = run
    return out


def rd_curve(runs: dict, recipe: str) -> tuple[list[float], list[float]]:
    """(bpp, PSNR) of a recipe's runs on the test set, from each run's own evaluation (eval-*/results.json)."""
    pts = []
    for (name, lmbda), run in sorted(runs.items()):
        if name == recipe:
            (results,) = run.glob("eval-*/results.json")
            r = json.loads(results.read_text())["results"]
            pts.append((lmbda, r["bpp"][0], r["psnr-rgb"][0]))
    return [p[1] for p in pts], [p[2] for p in pts]


def rate_split(run: Path, data: str, crop: int) -> dict:
    """Where a run's bits go on the validation photos (its EMA weights, eval-mode forward as validation runs it):
    bpp of y and of z, and how many of y's channels carry 90% of y's bits."""
    import torch

    from lictrain.checkpoint import load_checkpoint, model_from_checkpoint
    from lictrain.data import EvalImages, pad_to_multiple

    model = model_from_checkpoint(load_checkpoint(run / "checkpoint.pt"))
    images = EvalImages(data, crop)
    bits: dict[str, torch.Tensor] = {}
    pixels = 0
    with torch.no_grad():
        for i in range(len(images)):
            x = images[i].unsqueeze(0)
            out = model(pad_to_multiple(x, 64))
            pixels += x.shape[-2] * x.shape[-1]
            for name, lik in out["likelihoods"].items():
                per_channel = -torch.log2(lik).sum(dim=(0, 2, 3))
                bits[name] = bits.get(name, 0) + per_channel
    y = torch.sort(bits["y"], descending=True).values
    carry = int((torch.cumsum(y, 0) < 0.9 * y.sum()).sum()) + 1
    return {"y_bpp": float(bits["y"].sum()) / pixels, "z_bpp": float(bits["z"].sum()) / pixels,
            "channels_90": carry, "channels": len(y)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shuffle", required=True, type=Path, help="compare folder trained with data.order=shuffle")
    ap.add_argument("--iid", required=True, type=Path, help="compare folder trained with data.order=iid")
    ap.add_argument("--shuffle-summary", type=Path, help="the shuffle compare's summary.json to read the verdict "
                    "from (default SHUFFLE/summary.json; e.g. one of a compare run at fewer lambdas)")
    ap.add_argument("--pair", action="append", default=[], help="NAME=SHUFFLE_RUN,IID_RUN (repeatable)")
    ap.add_argument("--tail", type=int, default=500, help="training-loss steps averaged at the end (default 500)")
    ap.add_argument("--at", default="500,1000,2000,4000,6000,8000", help="steps of the gap-over-training table")
    ap.add_argument("--val", default="../shared/data/cbsd68[val:6], ../shared/data/sun-hays80[val:6]",
                    help="validation photos for the rate split (default the benchmark's)")
    ap.add_argument("--val-crop", type=int, default=256)
    args = ap.parse_args()

    orders = {"shuffle": args.shuffle, "iid": args.iid}
    runs = {o: compare_runs(f) for o, f in orders.items()}
    summaries = {o: json.loads((f / "summary.json").read_text()) for o, f in orders.items()}
    if args.shuffle_summary:
        summaries["shuffle"] = json.loads(args.shuffle_summary.read_text())
    # the runs both orders have (a shuffle compare may have run at fewer lambdas)
    keys = sorted(set(runs["shuffle"]) & set(runs["iid"]), key=lambda k: (k[0] != "adam", k[0], k[1]))

    print("## Final losses (validation: EMA weights on the held-out photos; training: last "
          f"{args.tail} steps' crops, raw weights)\n")
    print("| recipe | λ | val shuffle | val iid | iid / shuffle | train shuffle | train iid | iid / shuffle |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key in keys:
        (vs, ts), (vi, ti) = (final_losses(runs[o][key], args.tail) for o in ("shuffle", "iid"))
        print(f"| {key[0]} | {key[1]:g} | {vs:.4f} | {vi:.4f} | {vi / vs:.3f} | {ts:.4f} | {ti:.4f} | {ti / ts:.3f} |")

    steps = [int(s) for s in args.at.split(",")]
    print("\n## Adam's validation loss over training (shuffle / iid)\n")
    print("| λ | " + " | ".join(str(s) for s in steps) + " |")
    print("|---:|" + "---:|" * len(steps))
    for key in keys:
        if key[0] != "adam":
            continue
        at = {o: {r["step"]: r["loss"] for r in records(runs[o][key], "val")} for o in orders}
        cells = [f"{at['shuffle'][s]:.3f} / {at['iid'][s]:.3f}" if s in at["shuffle"] and s in at["iid"] else "-"
                 for s in steps]
        print(f"| {key[1]:g} | " + " | ".join(cells) + " |")

    print("\n## Where the bits go (validation photos, EMA weights): bpp of y / of z, channels of y carrying 90% "
          "of its bits\n")
    print("| recipe | λ | shuffle: y / z bpp, channels | iid: y / z bpp, channels |")
    print("|---|---:|---|---|")
    for key in keys:
        cells = []
        for o in ("shuffle", "iid"):
            r = rate_split(runs[o][key], args.val, args.val_crop)
            cells.append(f"{r['y_bpp']:.4f} / {r['z_bpp']:.4f}, {r['channels_90']} of {r['channels']}")
        print(f"| {key[0]} | {key[1]:g} | {cells[0]} | {cells[1]} |")

    print("\n## SOAP against Adam under each order (each compare's own summary)\n")
    print("| order | recipe | Steps-to-Adam | Time-to-Adam | BD-rate vs Adam | per λ: steps ratio |")
    print("|---|---|---:|---:|---:|---|")
    for o, s in summaries.items():
        for row in s["rows"]:
            if row["recipe"] == s["anchor"]:
                continue
            fmt = lambda v: f"{v['mean']:.2f}" if v else f"not reached ({row['steps_to_anchor_reached']})"  # noqa
            bd = next(iter(row["bd_rate"].values()))
            per = ", ".join(f"{p['lmbda']:g}: " + (f"{p['steps_to_anchor']:.2f}" if p["steps_to_anchor"] is not None
                                                    else "-") for p in row["points"])
            print(f"| {o} | {row['recipe']} | {fmt(row['steps_to_anchor'])} | {fmt(row['time_to_anchor'])} | "
                  f"{bd:+.1f}% | {per} |" if bd is not None else f"| {o} | {row['recipe']} | ... | unavailable |")

    print("\n## Each recipe's iid curve against its reshuffled one (BD-rate, real bitstreams, test set)\n")
    for recipe in sorted({k[0] for k in keys}):
        a, t = rd_curve(runs["shuffle"], recipe), rd_curve(runs["iid"], recipe)
        if len(a[0]) < 4 or len(t[0]) < 4:
            print(f"- {recipe}: fewer than 4 lambdas under one order, no BD-rate")
            continue
        print(f"- {recipe}: BD-rate of iid vs shuffle {bd_rate(a, t):+.1f}%  (bpp/PSNR shuffle "
              + ", ".join(f"{b:.3f}/{q:.2f}" for b, q in zip(*a)) + "; iid "
              + ", ".join(f"{b:.3f}/{q:.2f}" for b, q in zip(*t)) + ")")

    for pair in args.pair:
        name, paths = pair.split("=", 1)
        shuffle_run, iid_run = (Path(p) for p in paths.split(","))
        (vs, ts), (vi, ti) = final_losses(shuffle_run, args.tail), final_losses(iid_run, args.tail)
        print(f"\n## {name}: val shuffle {vs:.4f}, iid {vi:.4f} (iid / shuffle {vi / vs:.3f}); train shuffle {ts:.4f}, "
              f"iid {ti:.4f} ({ti / ts:.3f})")
        for label, run in (("shuffle", shuffle_run), ("iid", iid_run)):
            losses = np.array([r["loss"] for r in records(run, "train")])
            if len(losses) > 4000:  # logged every step: the noise of the step's loss late in training
                late = losses[-2000:] - np.convolve(losses[-2000:], np.ones(51) / 51, mode="same")
                late = late[25:-25]
                ac1 = float(np.corrcoef(late[:-1], late[1:])[0, 1])
                print(f"   {label}: per-step training loss over the last 2000 steps: std about its running mean "
                      f"{late.std():.4f}, lag-1 autocorrelation {ac1:+.3f}")


if __name__ == "__main__":
    main()
