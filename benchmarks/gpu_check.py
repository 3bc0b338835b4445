"""The prepared GPU check (issue 28): what the CPU cannot show about lictrain's GPU path, measured in one call.

Sections, each independent (a failure is recorded and the next one runs; one that would start after --budget
seconds is left out), results in OUT/gpu_check.json and a verdict table in OUT/verdict.md (also printed):

  sync      host synchronisations per training step (torch.cuda.set_sync_debug_mode, warnings counted) for Adam
            and SOAP, fresh and after a resume, eager and compiled; steps with a SOAP basis refresh apart
  amp       fp16 and bf16 at lambda 0.0483 for 30 steps (fp16's loss-scale back-offs are not skips)
  determinism  train.deterministic: two runs and a resumed run give bit-identical weights (TCM: indexed bias
            tables; FLIC: attention), and which ops have no deterministic form (in a process of its own, started
            before CUDA is: cuBLAS reads its workspace setting when it starts)
  coding    compress/decompress of briefly trained tiny models on CUDA (bit-exact, repeatable), a CUDA-encoded file
            on the CPU (refused), and whether the CPU's table choices would have matched (forced decode)
  eval      encode/decode time of a raster-scan autoregressive model (mbt2018) on CUDA against the CPU
  refresh   SOAP's basis refresh on TCM-S's factor stacks, Householder QR against CholeskyQR2
            (benchmarks/refresh_qr.py), the host synchronisations of the CholeskyQR2 path (none expected, fallback
            included), and SOAP's whole step on ELIC with each (mean over steps holding a refresh), and with its
            non-refresh step replayed as a CUDA graph (capture: true; its median against the eager one)
  step      benchmarks/gpu_step.py at the papers' workload (ELIC and TCM-S paper presets, 256^2, batch 16 and
            64): bf16, TF32, true fp32 in that order; median and slowest step, peak memory; then LALIC (paper, bf16,
            batch 8: its WKV scan), within --step-budget seconds
  profile   torch.profiler over SOAP's steps on ELIC (paper, bf16, batch 16): GPU time of its parts (soap.rotate_in,
            soap.adam, soap.rotate_out, soap.refresh), kernel launches, and the host's time against the GPU's

    OUT=/some/folder python benchmarks/gpu_check.py              # on a GPU (benchmarks/gpu_check.sh wraps it)
    python benchmarks/gpu_check.py --dry-run --out /tmp/x          # on the CPU: tiny sizes, a few steps
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_step, beside this file

import gpu_step  # noqa: E402

from lictrain import distributed  # noqa: E402
from lictrain.checkpoint import load_checkpoint  # noqa: E402
from lictrain.config import load_config  # noqa: E402
from lictrain.errors import LictrainError  # noqa: E402
from lictrain.evaluation import Codec  # noqa: E402
from lictrain.trainer import Trainer, train  # noqa: E402

VERDICT: list[tuple[str, str, str]] = []  # (check, verdict, detail)
RESULTS: dict = {}


def record(check: str, ok: bool | None, detail: str) -> None:
    verdict = "info" if ok is None else ("PASS" if ok else "FAIL")
    VERDICT.append((check, verdict, detail))
    print(f"[{verdict}] {check}: {detail}", flush=True)


def section(name: str):
    def wrap(fn):
        def run(args):
            t0 = time.perf_counter()
            try:
                fn(args)
            except Exception as e:  # one broken section must not hide the others
                record(name, False, f"raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                RESULTS.setdefault("tracebacks", {})[name] = traceback.format_exc()
            RESULTS.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        run.section_name = name
        return run
    return wrap


def config(args, run_dir, *overrides):
    return load_config(None, [
        f"run_dir={run_dir}", f"device={args.device}", "model.name=mbt2018-mean", "model.preset=tiny",
        "data.crop=64", "data.batch_size=8", "data.val_crop=128", "data.val_max_images=2", "train.progress=false",
        "optim.lr=1e-3", "train.log_every=1", *overrides])


# ---- sync census ------------------------------------------------------------------------------------------------
def count_syncs(trainer: Trainer, x: torch.Tensor, steps: int) -> dict:
    """Synchronising CUDA calls in each of `steps` training steps (torch's sync debug mode, as warnings), the steps
    after which SOAP refreshes its bases (every 10th) apart from the others."""
    if trainer.device.type != "cuda":
        for _ in range(steps):
            trainer.train_step(x)
        return {}
    counts: dict = {"ordinary": [], "refresh": []}
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                before, refresh = len(caught), (trainer.state["step"] + 1) % 10 == 0
                trainer.train_step(x)
                counts["refresh" if refresh else "ordinary"].append(
                    sum("synchroniz" in str(w.message) for w in caught[before:]))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return counts


@section("sync")
def check_sync(args):
    census = {}
    compiles = ("false", "true") if not args.dry_run else ("false",)
    for model, compile_ in [("mbt2018-mean", c) for c in compiles] + [(m, "false") for m in args.sync_models]:
        for opt in ("adam", "soap"):
            with tempfile.TemporaryDirectory() as tmp:
                torch.manual_seed(0)
                cfg = config(args, tmp, f"model.name={model}", f"optim.name={opt}", f"train.compile={compile_}",
                             "train.steps=40", "train.ckpt_every=1000")
                if model == "flic":
                    cfg.data.crop = 128
                trainer = Trainer(cfg, False, (), torch.device(args.device), distributed.Dist())
                x = torch.rand(cfg.data.batch_size, 3, cfg.data.crop, cfg.data.crop, device=args.device)
                for _ in range(12):  # SOAP's first bases (eigh), a refresh, compilation
                    trainer.train_step(x)
                fresh = count_syncs(trainer, x, 10)  # steps 13-22: the refresh after step 20
                trainer.save()
                trainer.close()
                # (a compiled resume reuses the compiled graphs: Inductor's cache on disk)
                resumed = Trainer(cfg, True, (), torch.device(args.device), distributed.Dist())
                for _ in range(2):
                    resumed.train_step(x)
                after = count_syncs(resumed, x, 10)
                resumed.close()
            key = f"{model} {opt} compile={compile_}"
            census[key] = {"fresh": fresh, "resumed": after}
            if fresh:
                ordinary = fresh["ordinary"] + after["ordinary"]
                record(f"sync {key}", max(ordinary) == 0,
                       f"syncs per ordinary step fresh {fresh['ordinary']}, after resume {after['ordinary']}; per "
                       f"refresh step {fresh['refresh']} / {after['refresh']}")
    RESULTS["sync"] = census
    if args.device != "cuda":
        record("sync", None, "not counted on the CPU (dry run): the steps ran")


# ---- fp16 / bf16 at high lambda ---------------------------------------------------------------------------------
@section("amp")
def check_amp(args):
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp16", "bf16"):
            # fp16 spends its first ~11 steps backing the loss scale off from 2^16 at this lambda: its dry run needs
            # steps after them for the loss to move (bf16 is slow on a CPU: fewer)
            steps = 30 if not args.dry_run else {"fp16": 20, "bf16": 12}[precision]
            try:
                run = train(config(args, f"{tmp}/{precision}", f"train.precision={precision}", "loss.lmbda=0.0483",
                                   f"train.steps={steps}", "train.val_every=1000"))
                lines = [json.loads(ln) for ln in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
                losses = [r["loss"] for r in lines if r["kind"] == "train"]
                backoffs = max([r.get("scale_backoffs", 0) for r in lines if r["kind"] == "train"] or [0])
                out[precision] = dict(steps=run.step, skipped=run.skipped_steps, backoffs=backoffs,
                                      first=losses[0] if losses else None, last=losses[-1] if losses else None)
                ok = run.step == steps and run.skipped_steps == 0 and bool(losses) and losses[-1] < losses[0]
                record(f"amp {precision} lambda 0.0483", ok,
                       f"{run.step} steps, {run.skipped_steps} skipped, {backoffs} scale back-offs, loss "
                       f"{losses[0]:.1f} -> {losses[-1]:.1f}" if losses else "no training line")
            except LictrainError as e:
                out[precision] = {"error": str(e)}
                record(f"amp {precision} lambda 0.0483", False, str(e))
    RESULTS["amp"] = out


# ---- determinism -------------------------------------------------------------------------------------------------
def weights(run_dir) -> dict:
    return load_checkpoint(run_dir)["model"]


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(v, b[k]) for k, v in a.items())


@section("determinism")
def check_determinism(args):
    out = {}
    half = 4 if not args.dry_run else 2
    for model in args.determinism_models:
        crop = "128" if model == "flic" else "64"
        common = (f"model.name={model}", f"data.crop={crop}", "data.batch_size=4", "train.deterministic=true",
                  "train.val_every=1000", f"train.ckpt_every={half}", "train.ema_decay=0")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                a = train(config(args, f"{tmp}/a", *common, f"train.steps={2 * half}"))
                b = train(config(args, f"{tmp}/b", *common, f"train.steps={2 * half}"))
                train(config(args, f"{tmp}/c", *common, f"train.steps={half}"))
                c = train(config(args, f"{tmp}/c", *common, f"train.steps={2 * half}"), resume=True)
                wa, wb, wc = weights(a.run_dir), weights(b.run_dir), weights(c.run_dir)
                out[model] = dict(repeat=same(wa, wb), resume=same(wa, wc))
                record(f"deterministic {model}", same(wa, wb) and same(wa, wc),
                       f"two runs equal: {same(wa, wb)}; {half} + resume + {half} equals {2 * half}: {same(wa, wc)}")
            except Exception as e:  # an op without a deterministic form raises: which one is the finding
                out[model] = {"error": str(e).splitlines()[0][:300]}
                record(f"deterministic {model}", False, str(e).splitlines()[0][:200])
    RESULTS["determinism"] = out


# ---- coding across devices ---------------------------------------------------------------------------------------
def trained_codec(args, model: str, steps: int) -> Codec:
    with tempfile.TemporaryDirectory() as tmp:
        crop = "128" if model == "flic" else "64"
        run = train(config(args, tmp, f"model.name={model}", f"data.crop={crop}", "data.batch_size=4",
                           "loss.lmbda=0.0483", f"train.steps={steps}", "train.val_every=1000"))
        return Codec.from_checkpoint(load_checkpoint(run.run_dir), device=args.device)


@section("coding")
def check_coding(args):
    from lictrain.coding import coding_numerics
    from lictrain.data import EvalImages, crop_to, pad_to_multiple

    image = EvalImages("samples:val", 256)[0]
    out = {}
    for model in args.coding_models:
        codec = trained_codec(args, model, 60 if not args.dry_run else 4)
        t0 = time.perf_counter()
        bs = codec.compress(image)
        encode_s = time.perf_counter() - t0
        first, again = codec.decompress(copy.deepcopy(bs)), codec.decompress(copy.deepcopy(bs))
        # the encoder-side reconstruction: the eval forward of the models that round as their encoder does
        with coding_numerics(codec.device):
            ref = codec.model(pad_to_multiple(image[None].to(codec.device), codec.multiple))["x_hat"]
        ref = crop_to(ref, *image.shape[-2:])[0].clamp(0, 1).cpu()
        row = dict(bytes=bs.payload_bytes(), encode_s=round(encode_s, 3), repeatable=torch.equal(first, again),
                   vs_encoder_side=float((first - ref).abs().max()))
        if args.device == "cuda":
            cpu = copy.deepcopy(codec)
            cpu.model.cpu()
            cpu.device = torch.device("cpu")
            try:
                cpu.decompress(copy.deepcopy(bs))
                row["cpu_decode"] = "decoded (not refused!)"
            except LictrainError as e:
                row["cpu_decode"] = "refused: " + str(e)[:160]
            forced = copy.deepcopy(bs)
            forced.header.update(device="cpu", device_name="cpu")  # past the refusal: would the CPU have matched?
            try:
                x_cpu = cpu.decompress(forced)
                row["cpu_forced"] = f"tables matched; max pixel difference {(x_cpu - first).abs().max().item():.2e}"
            except LictrainError as e:
                row["cpu_forced"] = "tables differ: " + str(e)[:120]
            cpu_bs = cpu.compress(image)  # and the other way: CPU-encoded, decoded on CUDA (forced)
            cpu_bs.header.update(device="cuda", device_name="forced")
            try:
                codec.decompress(cpu_bs)
                row["cuda_forced"] = "tables matched"
            except LictrainError as e:
                row["cuda_forced"] = "tables differ: " + str(e)[:120]
        out[model] = row
        ok = row["repeatable"] and (args.device != "cuda" or row["cpu_decode"].startswith("refused"))
        if model in ("tcm", "elic", "flic"):  # (mbt2018's eval forward rounds without its means: not comparable)
            ok = ok and row["vs_encoder_side"] < 1e-4
        record(f"coding {model}", ok, "; ".join(f"{k} {v}" for k, v in row.items()))
    RESULTS["coding"] = out


@section("eval")
def check_eval(args):
    """mbt2018's coding runs its context model pixel by pixel (CompressAI's loop, a host read per pixel)."""
    from lictrain.models import build_model

    preset = "tiny" if args.dry_run else "paper"
    h, w = (64, 64) if args.dry_run else (512, 768)
    x = torch.rand(3, h, w)
    out = {}
    for dev in (["cpu", "cuda"] if args.device == "cuda" else ["cpu"]):
        torch.manual_seed(0)
        codec = Codec(build_model("mbt2018", preset), "mbt2018", preset, device=dev)
        t0 = time.perf_counter()
        bs = codec.compress(x)
        t1 = time.perf_counter()
        codec.decompress(bs)
        out[dev] = dict(encode_s=round(t1 - t0, 2), decode_s=round(time.perf_counter() - t1, 2))
    RESULTS["eval_mbt2018"] = out
    record(f"eval mbt2018 {preset} {h}x{w}", None, "; ".join(f"{d}: encode {v['encode_s']} s, decode {v['decode_s']} s"
                                                          for d, v in out.items()))


# ---- SOAP's basis refresh: Householder against CholeskyQR2 (issue 34) ----------------------------------------------
@section("refresh")
def check_refresh(args):
    import refresh_qr
    from lictrain.optim.common import power_step_basis

    device = torch.device(args.device)
    name, preset = args.refresh_model
    res = refresh_qr.measure(name, preset, device, rounds=args.refresh_rounds)
    print(refresh_qr.report(name, preset, res), flush=True)
    syncs = None
    if device.type == "cuda":  # the CholeskyQR2 path (its fallback included) must not synchronise
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(32, 64, 60, generator=gen)  # rank 60 < 64: every item fails the first Cholesky
        fs = (x @ x.mT).to(device)
        fs = fs / fs.abs().amax(dim=(1, 2), keepdim=True)
        q = torch.linalg.qr(torch.randn(32, 64, 64, generator=gen))[0].to(device)
        power_step_basis(fs, q, "cholesky")
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _, failed = power_step_basis(fs, q, "cholesky")
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        record("refresh cholesky syncs", syncs == 0 and not bool(failed.any()),
               f"{syncs} host synchronisations in a CholeskyQR2 refresh whose every item took the fallback")
    steps = []
    # SOAP's whole step, the refresh after step 10 inside the timed steps; the last with the non-refresh step
    # replayed as a CUDA graph (SOAP(capture=True), soap_graph.py): the median is the launch overhead's measure
    for label, options in (("householder", "refresh_qr: householder"), ("cholesky", "refresh_qr: cholesky"),
                           ("cholesky+capture", "refresh_qr: cholesky, capture: true")):
        r = gpu_step.measure(args.device, args.step_models[0], args.step_preset, args.batches[0], args.crop, "soap",
                             args.precisions[0], args.warmup, args.steps, extra=(f"optim.options={{{options}}}",))
        steps.append((label, r.mean_ms, r.max_ms, r.median_ms))
    t = res["total_ms"]
    RESULTS["refresh"] = dict(model=f"{name}:{preset}", factors=res["factors"], total_ms=t,
                              per_d={str(d): v for d, v in res["per_d"].items()}, max_sign_diff=res["max_sign_diff"],
                              syncs=syncs, soap_step=steps)
    record(f"refresh {name} {preset}", res["max_sign_diff"] < 1e-2,
           f"{res['factors']} factor QRs: householder {t['householder']:.1f} ms, cholesky {t['cholesky']:.1f} ms "
           f"({t['householder'] / t['cholesky']:.2f}x), bases equal up to signs to {res['max_sign_diff']:.1e}; SOAP "
           f"step on {args.step_models[0]} b{args.batches[0]} {args.precisions[0]} (mean with the refresh, slowest): "
           + ", ".join(f"{qr} {m:.1f}/{x:.1f} ms (median {med:.1f})" for qr, m, x, med in steps))


# ---- step times at the papers' workload ---------------------------------------------------------------------------
@section("step")
def check_step(args):
    rows, skipped = [], []
    deadline = time.perf_counter() + min(args.step_budget, max(30.0, args.deadline - time.perf_counter() - 60))
    # the papers' precision first, both batch sizes before the next precision; LALIC (its WKV scan) last
    plan = [(m, b, p, o) for p in args.precisions for b in args.batches for m in args.step_models
            for o in ("adam", "soap")] + args.step_extra
    for model, batch, precision, opt in plan:
        if time.perf_counter() > deadline:
            skipped.append(f"{model} b{batch} {precision} {opt}")
            continue
        rows.append(gpu_step.measure(args.device, model, args.step_preset, batch, args.crop, opt, precision,
                                     args.warmup, args.steps))
        r = rows[-1]
        print(f"  {model} b{batch} {precision} {opt}: median {r.median_ms:.1f} ms, slowest {r.max_ms:.1f} ms, "
              f"reserved {r.peak_reserved_gib:.2f} GiB", flush=True)
    RESULTS["step"] = [r.__dict__ for r in rows]
    RESULTS["step_not_measured"] = skipped
    RESULTS["step_table"] = gpu_step.table(rows)
    print(RESULTS["step_table"])
    record("step times", None, f"{len(rows)} configurations measured" + (
        f", {len(skipped)} left for lack of time ({skipped[0]}, ...)" if skipped else ""))


@section("profile")
def check_profile(args):
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        trainer = gpu_step.make_trainer(args.device, args.step_models[0], args.step_preset, args.batches[0],
                                        args.crop, "soap", "bf16", 100, tmp)
        batches = gpu_step.batch_source(trainer, "cached")
        for _ in range(args.warmup):
            trainer.train_step(next(batches))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        n = 10
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(n):  # one of them refreshes the bases
                trainer.train_step(next(batches))
            if args.device == "cuda":
                torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1000 / n
        trainer.close()
    events = prof.key_averages()
    parts = {}
    for e in events:
        if e.key.startswith("soap."):
            parts[e.key] = dict(calls=e.count, cpu_ms=round(e.cpu_time_total / 1000 / n, 2),
                                device_ms=round(getattr(e, "device_time_total", 0) / 1000 / n, 2))
    kernels = [e for e in events if getattr(e, "device_type", None) is not None and "cuda" in str(e.device_type).lower()
               and e.key not in parts and not e.key.startswith("ProfilerStep")]
    gpu_busy_ms = sum(getattr(e, "self_device_time_total", 0) for e in kernels) / 1000 / n
    launches = sum(e.count for e in kernels) / n
    RESULTS["profile"] = dict(parts=parts, wall_ms_per_step=round(wall_ms, 2),
                              gpu_busy_ms_per_step=round(gpu_busy_ms, 2), kernels_per_step=launches,
                              table=events.table(sort_by="cpu_time_total", row_limit=25))
    record("profile soap step", None,
           f"per step: wall {wall_ms:.1f} ms, GPU busy {gpu_busy_ms:.1f} ms, {launches:.0f} kernels; " + "; ".join(
               f"{k} host {v['cpu_ms']} ms / device {v['device_ms']} ms" for k, v in sorted(parts.items())))


SECTIONS = [check_sync, check_amp, check_determinism, check_coding, check_eval, check_refresh, check_step, check_profile]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, a few steps (the test suite runs this)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    ap.add_argument("--sections", default=",".join(s.section_name for s in SECTIONS))
    ap.add_argument("--step-budget", type=float, default=150.0, help="seconds for the step-time section")
    ap.add_argument("--budget", type=float, default=390.0,
                    help="seconds for the whole check: a section that would start after it is left out")
    args = ap.parse_args()
    args.device = "cpu" if args.dry_run else "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run on the CPU")
        return 2
    if args.dry_run:
        args.sync_models, args.coding_models, args.determinism_models = [], ["mbt2018-mean"], ["mbt2018-mean"]
        args.step_models, args.step_preset, args.batches, args.crop = ["mbt2018-mean"], "tiny", [2], 64
        args.precisions, args.warmup, args.steps, args.step_extra = ["fp32"], 1, 2, []
        args.refresh_model, args.refresh_rounds = ("tcm", "tiny"), 1
    else:
        args.sync_models, args.coding_models = ["elic", "tcm", "lalic", "flic"], ["tcm", "elic", "flic", "mbt2018"]
        args.determinism_models = ["tcm", "flic"]
        args.step_models, args.step_preset, args.batches, args.crop = ["elic", "tcm"], "paper", [16, 64], 256
        # warm-up past SOAP's first eigh; the timed steps hold the refresh after step 10
        args.precisions, args.warmup, args.steps = ["bf16", "tf32", "fp32"], 4, 10
        args.step_extra = [("lalic", 8, "bf16", "adam"), ("lalic", 8, "bf16", "soap")]
        args.refresh_model, args.refresh_rounds = ("tcm", "paper"), 3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (dry run)"
    RESULTS["environment"] = dict(device=device, torch=torch.__version__, python=sys.version.split()[0],
                                  date=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"# lictrain GPU check on {device}, torch {torch.__version__}", flush=True)
    wanted = set(args.sections.split(","))
    args.deadline = time.perf_counter() + args.budget
    if "determinism" in wanted and len(wanted) > 1:
        # in a process of its own, started before this one touches CUDA: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when
        # it starts, as it does in a fresh `lictrain train --set train.deterministic=true` (also in the dry run, so
        # that this path is exercised)
        wanted.discard("determinism")
        child = subprocess.Popen([sys.executable, __file__, "--sections", "determinism", "--out", str(out / "det")]
                                 + (["--dry-run"] if args.dry_run else []))
    else:
        child = None
    for run in SECTIONS:
        if run.section_name in wanted:
            if time.perf_counter() > args.deadline:
                record(run.section_name, None, "not run: the check's time budget was spent")
                continue
            run(args)
    if child is not None:
        child.wait()
        try:
            det = json.loads((out / "det" / "gpu_check.json").read_text())
            RESULTS["determinism"] = det.get("determinism")
            RESULTS.setdefault("seconds", {}).update(det.get("seconds", {}))
            if "tracebacks" in det:
                RESULTS.setdefault("tracebacks", {}).update(det["tracebacks"])
            VERDICT.extend(tuple(row) for row in det.get("verdict", []))
        except (OSError, ValueError) as e:
            record("determinism", False, f"its process left no results ({e})")
    lines = [f"# lictrain GPU check: {device}, torch {torch.__version__}, {RESULTS['environment']['date']}", "",
             "| check | verdict | detail |", "|---|---|---|"]
    lines += [f"| {c} | {v} | {d.replace('|', '/')} |" for c, v, d in VERDICT]
    if "step_table" in RESULTS:
        lines += ["", RESULTS["step_table"]]
    (out / "verdict.md").write_text("\n".join(lines) + "\n")
    RESULTS["verdict"] = VERDICT
    (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    print("\n" + "\n".join(lines))
    return 1 if any(v == "FAIL" for _, v, _ in VERDICT) else 0


if __name__ == "__main__":
    sys.exit(main())
