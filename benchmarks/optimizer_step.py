"""SOAP's cost against Adam and against other SOAP implementations, measured side by side in one process (CPU).

    .venv/bin/pip install -e '.[bench]'     # the peers: pytorch_optimizer, heavyball (never imported by lictrain)
    .venv/bin/python benchmarks/optimizer_step.py [--quick]

1. optimizer.step() alone: Adam, lictrain's SOAP, pytorch_optimizer's SOAP and heavyball's SOAP (eager: heavyball's
   torch.compile switched off) at equal settings (lr 2e-4, betas 0.95/0.95, shampoo_beta 0.95, weight decay 0,
   refresh every 10 steps, max_precond_dim 10000, no dim merging, 1-D tensors unpreconditioned), on the same fixed
   gradients, as ratios peer / ours. Each figure is the mean over whole refresh periods (so refresh cost is
   included in its share), the median of several rounds run in turn.
2. A full training step (forward, backward, clip, step; batch 8 of 64x64 crops): SOAP / Adam at refresh
   frequency 1, 10 and 100. Tiny presets: measured directly. Paper presets (too slow for 100-step periods here):
   the step time without a refresh (t0) and with one (t1) are measured, and frequency f costs ((f-1) t0 + t1) / f.
3. Optimizer-state bytes / parameter bytes, for Adam and SOAP (with the int32 indices its packed factors use).
4. Inside lictrain's training loop: `Trainer.train_step` (forward, loss, backward, guard, clip, optimizer step, aux
   step, EMA; real crops of the bundled photos, batch 8 of 64x64) for Adam, SOAP and SOAP per tensor (before),
   interleaved in rounds of 20 steps (two refresh periods) so that machine noise hits all alike; median per step.
5. The refresh spike: single optimizer.step() times over whole refresh periods for SOAP on the authors' schedule
   (every basis refreshed after the same step) and with stagger_refresh=True (buckets spread over the period):
   mean, median, and the slowest step of each period (median over periods).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
import warnings

import torch

from lictrain.losses import RateDistortionLoss
from lictrain.models import build_model
from lictrain.optim import split_parameters
from lictrain.optim.common import clear_index_cache, index_cache_bytes
from lictrain.optim.soap import SOAP

warnings.filterwarnings("ignore")
LR, BETAS, FREQ = 2e-4, (0.95, 0.95), 10


def make_optimizer(kind: str, params, freq: int = FREQ):
    if kind == "adam":
        return torch.optim.Adam(params, lr=LR, betas=(0.9, 0.999), foreach=False)
    if kind == "adam-foreach":
        return torch.optim.Adam(params, lr=LR, betas=(0.9, 0.999), foreach=True)
    if kind == "soap":
        return SOAP(params, lr=LR, betas=BETAS, precondition_frequency=freq, max_precond_dim=10000)
    if kind == "soap-staggered":  # refreshes spread over the period (stagger_refresh)
        return SOAP(params, lr=LR, betas=BETAS, precondition_frequency=freq, max_precond_dim=10000,
                    stagger_refresh=True)
    if kind == "soap-per-tensor":  # before issue 16: one tensor at a time
        return SOAP(params, lr=LR, betas=BETAS, precondition_frequency=freq, max_precond_dim=10000, batched=False)
    if kind == "pytorch_optimizer":
        from pytorch_optimizer import SOAP as PSOAP

        return PSOAP(params, lr=LR, betas=BETAS, shampoo_beta=BETAS[1], weight_decay=0.0, precondition_frequency=freq,
                     max_precondition_dim=10000, merge_dims=False, precondition_1d=False)
    if kind == "heavyball":
        import heavyball

        heavyball.utils.compile_mode = None  # eager, like the others
        return heavyball.SOAP(params, lr=LR, betas=BETAS, shampoo_beta=BETAS[1], weight_decay=0.0,
                              precondition_frequency=freq, max_precond_dim=10000, merge_dims=False,
                              precondition_1d=False, use_precond_schedule=False, compile_step=False)
    raise ValueError(kind)


def trainable(model):
    return [p for _, p in split_parameters(model)[0]]


def fixed_gradients(model, crop=64, batch=8):
    torch.manual_seed(0)
    x = torch.rand(batch, 3, crop, crop)
    RateDistortionLoss(0.013)(model(x), x).loss.backward()
    return {p: p.grad.detach().clone() for p in trainable(model)}


def step_only(models: dict, kinds: list[str], rounds: int, periods: int, warm: int = FREQ) -> dict:
    """Mean optimizer.step() time per kind, over `periods` refresh periods, median over rounds (kinds in turn).
    The first `warm` steps (the initial eigendecompositions, allocations) are not measured."""
    times = {k: [] for k in kinds}
    opts = {}
    for k in kinds:
        params = trainable(models[k])
        opts[k] = make_optimizer(k, params)
        grads = models[k]._grads
        for _ in range(warm):
            for p in params:
                p.grad = grads[p]
            opts[k].step()
    for _ in range(rounds):
        for k in kinds:
            pairs = [(p, models[k]._grads[p]) for p in trainable(models[k])]
            t0 = time.perf_counter()
            for _ in range(periods * FREQ):
                for p, g in pairs:  # some optimizers (heavyball) consume .grad: hand it back every step, to all
                    p.grad = g
                opts[k].step()
            times[k].append((time.perf_counter() - t0) / (periods * FREQ))
    return {k: statistics.median(v) for k, v in times.items()}


def step_spread(model, kinds: list[str], periods: int, warm: int = FREQ) -> dict:
    """Per kind: (mean ms, median ms, slowest step of a refresh period in ms, median over periods) of single
    optimizer.step() calls on fixed gradients, the kinds' periods interleaved."""
    params = {k: [torch.nn.Parameter(p.detach().clone()) for p in trainable(model)] for k in kinds}
    grads = [model._grads[p] for p in trainable(model)]
    opts = {k: make_optimizer(k, params[k]) for k in kinds}
    steps: dict = {k: [] for k in kinds}
    for r in range(warm // FREQ + periods):
        for k in kinds:
            period = []
            for _ in range(FREQ):
                for p, g in zip(params[k], grads):
                    p.grad = g
                t0 = time.perf_counter()
                opts[k].step()
                period.append(time.perf_counter() - t0)
            if r >= warm // FREQ:
                steps[k].append(period)
    out = {}
    for k, ps in steps.items():
        flat = [t for period in ps for t in period]
        out[k] = (statistics.mean(flat), statistics.median(flat), statistics.median(max(pd) for pd in ps))
    return out


def full_step_time(model, kind: str, freq: int, steps: int, crop=64, batch=8, warm=2) -> float:
    params = trainable(model)
    opt = make_optimizer(kind, params, freq)
    crit = RateDistortionLoss(0.013)
    torch.manual_seed(0)
    x = torch.rand(batch, 3, crop, crop)
    ts = []
    for i in range(warm + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        crit(model(x), x).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if i >= warm:
            ts.append(time.perf_counter() - t0)
    return sum(ts) / len(ts)


def in_loop(name: str, preset: str, rounds: int, steps: int = 20, warm: int = 10) -> dict:
    """Median ms per Trainer.train_step for each optimizer, the optimizers' rounds interleaved."""
    from lictrain import distributed
    from lictrain.config import load_config
    from lictrain.data import ImageList, train_loader
    from lictrain.trainer import Trainer

    loader = train_loader(ImageList.scan("samples:train"), 64, 8, seed=0)
    xs = list(itertools.islice(iter(loader), 4))
    kinds = {"adam": ["optim.name=adam"], "soap": ["optim.name=soap"],
             "soap-per-tensor": ["optim.name=soap", "optim.options.batched=false"]}
    times: dict = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for k, over in kinds.items():
            torch.manual_seed(0)
            cfg = load_config(None, [f"run_dir={tmp}/{k}", "device=cpu", f"model.name={name}", f"model.preset={preset}",
                                     "data.batch_size=8", "data.crop=64", "data.val_max_images=1", "optim.lr=1e-4",
                                     "train.steps=100000", "train.log_every=1000000", "train.progress=false", *over])
            trainers[k] = Trainer(cfg, False, (), torch.device("cpu"), distributed.Dist())
            for i in range(warm):
                trainers[k].train_step(xs[i % len(xs)])
        for _ in range(rounds):
            for k, tr in trainers.items():
                t0 = time.perf_counter()
                for i in range(steps):
                    tr.train_step(xs[i % len(xs)])
                times[k].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            for t in v if isinstance(v, list) else [v]:
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def table(title: str, columns: list[str], align: str) -> None:
    """A section title and a Markdown table header; `align` has an l or r per column."""
    print(f"\n## {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "".join("---:|" if a == "r" else "---|" for a in align))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    ap.add_argument("--models", default="mbt2018-mean,elic")
    ap.add_argument("--presets", default="tiny,small,paper", help="small = N=48/M=64, issue 16's workload")
    ap.add_argument("--sections", default="1,2,3,4,5", help="which of the five tables to print")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    workloads = list(itertools.product(args.models.split(","), args.presets.split(",")))
    torch.set_num_threads(2)
    rounds = 2 if args.quick else 3
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    peers = ["pytorch_optimizer", "heavyball"]
    available = []
    for peer in peers:
        try:
            __import__(peer)
            available.append(peer)
        except ImportError:
            print(f"# {peer} not installed: pip install -e '.[bench]'")

    if "1" in sections:
        table("1. optimizer.step() alone (ms per step, refresh every 10 included; ratio = peer / lictrain SOAP)",
              ["model", "preset", "params", "Adam", "lictrain SOAP", "per-tensor (before)", *available],
              "llrrrr" + "r" * len(available))
        for name, preset in workloads:
            kinds = ["adam", "soap", "soap-per-tensor"] + available
            models = {}
            for k in kinds:
                torch.manual_seed(0)
                models[k] = build_model(name, preset)
                models[k]._grads = fixed_gradients(models[k])
            n = sum(p.numel() for p in trainable(models["soap"]))
            if preset != "paper":
                t = step_only(models, kinds, rounds, periods=2)
            else:  # one refresh period after the first step: a paper-size model takes seconds per step here
                t = step_only(models, kinds, 1, periods=1, warm=1)
            cells = " | ".join(f"{t[k] * 1e3:.1f} ({t[k] / t['soap']:.2f}x)" for k in ["soap-per-tensor"] + available)
            print(f"| {name} | {preset} | {n:,} | {t['adam'] * 1e3:.1f} | {t['soap'] * 1e3:.1f} | {cells} |",
                  flush=True)

    if "2" in sections:
        table("2. Full training step (batch 8, 64x64): SOAP / Adam",
              ["model", "preset", "Adam (ms)", "SOAP f=1", "SOAP f=10", "SOAP f=100", "per-tensor f=10 (before)",
               "how"], "llrrrrrl")
        for name, preset in workloads:
            def fresh():
                torch.manual_seed(0)
                return build_model(name, preset)

            if preset != "paper":
                n = 40 if args.quick else 100
                adam = statistics.median(full_step_time(fresh(), "adam", 1, n // 2) for _ in range(2))
                soap = {f: full_step_time(fresh(), "soap", f, 100 if f == 100 else n // 2) for f in (1, 10, 100)}
                before = full_step_time(fresh(), "soap-per-tensor", 10, n // 2) / adam
                how = "measured"
            else:
                n = 3 if args.quick else 5
                adam = full_step_time(fresh(), "adam", 1, n, warm=1)
                t1 = full_step_time(fresh(), "soap", 1, n, warm=1)
                t0 = full_step_time(fresh(), "soap", 10**9, n, warm=1)
                soap = {f: ((f - 1) * t0 + t1) / f for f in (1, 10, 100)}
                before = float("nan")
                how = f"amortised from t0={t0 * 1e3:.0f} ms, t1={t1 * 1e3:.0f} ms"
            print(f"| {name} | {preset} | {adam * 1e3:.0f} | " +
                  " | ".join(f"{soap[f] / adam:.2f}" for f in (1, 10, 100)) + f" | {before:.2f} | {how} |", flush=True)

    if "3" in sections:
        table("3. Optimizer state / parameter bytes (SOAP: with its packing indices)",
              ["model", "preset", "Adam", "SOAP"], "llrr")
        for name, preset in workloads:
            row = []
            for k in ("adam", "soap"):
                torch.manual_seed(0)
                m = build_model(name, preset)
                grads = fixed_gradients(m, crop=64, batch=1)
                params = trainable(m)
                clear_index_cache()
                opt = make_optimizer(k, params)
                for p in params:
                    p.grad = grads[p]
                opt.step()
                # (SOAP's packed factors come with one int32 index per distinct factor size, shared: counted here)
                extra = index_cache_bytes() if k == "soap" else 0
                row.append((state_bytes(opt) + extra) / sum(p.numel() * p.element_size() for p in params))
            print(f"| {name} | {preset} | {row[0]:.2f} | {row[1]:.2f} |", flush=True)

    if "4" in sections:
        table("4. Inside lictrain's training loop (Trainer.train_step, batch 8 of 64x64 crops; median of rounds)",
              ["model", "preset", "Adam (ms)", "SOAP (ms)", "SOAP / Adam", "per-tensor (before) / Adam"], "llrrrr")
        for name, preset in workloads:
            if preset == "paper":
                continue  # seconds per step here: the amortised figures of section 2 stand in
            t = in_loop(name, preset, 3 if args.quick else 7)
            print(f"| {name} | {preset} | {t['adam'] * 1e3:.1f} | {t['soap'] * 1e3:.1f} | "
                  f"{t['soap'] / t['adam']:.2f} | {t['soap-per-tensor'] / t['adam']:.2f} |", flush=True)

    if "5" in sections:
        table("5. The refresh spike: single optimizer.step() calls over refresh periods (ms; fixed gradients)",
              ["model", "preset", "schedule", "mean", "median", "slowest of a period"], "lllrrr")
        for name, preset in workloads:
            if preset == "paper":
                continue
            torch.manual_seed(0)
            model = build_model(name, preset)
            model._grads = fixed_gradients(model)
            t = step_spread(model, ["soap", "soap-staggered"], 4 if args.quick else 12)
            for k, label in (("soap", "authors' (all at multiples of 10)"), ("soap-staggered", "stagger_refresh")):
                mean, median, worst = (x * 1e3 for x in t[k])
                print(f"| {name} | {preset} | {label} | {mean:.1f} | {median:.1f} | {worst:.1f} |", flush=True)


if __name__ == "__main__":
    main()
