"""The one training loop. Methods (methods/) and hooks plug into it; nothing else copies it.

Read top to bottom: set-up (model, optimizers, EMA, data, method), optional resume, then the loop:
forward -> R and D -> hooks -> method.backward -> finite check -> clip -> optimizer.step -> method.after_step ->
auxiliary (quantile) step -> EMA -> logs; every `val_every` steps a validation of the EMA model, every `ckpt_every`
an atomic checkpoint.

Timing is honest and comparable across runs: `train_time` counts only the training steps (data loading included,
validation, checkpointing and logging of validation excluded), measured in segments between validations, with a
device synchronisation at each segment boundary on GPUs.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm import tqdm

from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from .io import save_atomic, write_atomic
from .config import RunConfig, dump_config
from . import distributed
from .data import EvalImages, ImageList, crop_to, pad_to_multiple, train_loader
from .ema import EMA
from .errors import LictrainError
from .losses import RateDistortionLoss, psnr_from_mse
from .methods import StepContext, StepHook, build_method
from .models import build_model, downsampling
from .optim import build_optimizer, split_parameters
from .schedule import lr_factor

log = logging.getLogger("lictrain")


@dataclass
class RunResult:
    run_dir: Path
    step: int
    train_time: float
    skipped_steps: int
    skipped_images: int
    last_val: dict


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LictrainError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LictrainError(f"device '{name}' requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LictrainError(f"device '{name}' requested but there are {torch.cuda.device_count()} CUDA devices")
    return dev


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def validate(model, dataset: EvalImages, criterion: RateDistortionLoss, device, multiple: int) -> dict:
    """Mean over images of the R-D loss, bpp (estimated from likelihoods) and PSNR, in eval mode (no noise)."""
    was_training = model.training
    model.eval()
    sums = dict(loss=0.0, bpp=0.0, mse=0.0, psnr=0.0)
    for i in range(len(dataset)):
        x = dataset[i].unsqueeze(0).to(device)
        h, w = x.shape[-2:]
        out = model(pad_to_multiple(x, multiple))
        out["x_hat"] = crop_to(out["x_hat"], h, w)
        terms = criterion(out, x)  # bits of the padded latents, per pixel of the original image
        sums["loss"] += terms.loss.item()
        sums["bpp"] += terms.rate.item()
        sums["mse"] += terms.mse.item()
        sums["psnr"] += psnr_from_mse(terms.mse.item())
    model.train(was_training)
    return {k: v / len(dataset) for k, v in sums.items()}


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and, optionally, TensorBoard. `enabled=False` (ranks other than
    0 under torchrun) writes nothing."""

    def __init__(self, path: Path, tensorboard_dir: Path | None, enabled: bool = True):
        self.path = path
        self.file = open(path, "a", buffering=1) if enabled else None
        self.tb = None
        if tensorboard_dir is not None and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard_dir))

    @property
    def closed(self) -> bool:
        return self.file is None or self.file.closed

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            kind = record["kind"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "kind"):
                    self.tb.add_scalar(f"{kind}/{k}", v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()

    @staticmethod
    def truncate_after(path: Path, step: int) -> None:
        """Drop lines logged after `step` (written after the checkpoint a run resumes from)."""
        if not path.exists():
            return
        keep = []
        for ln in path.read_text().splitlines():
            try:
                if json.loads(ln)["step"] <= step:
                    keep.append(ln)
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                continue
        write_atomic(path, "".join(ln + "\n" for ln in keep))


@contextmanager
def _graceful_interrupt():
    """First Ctrl-C (or SIGTERM: a scheduler's pre-emption, torchrun stopping its workers) asks the loop to stop at
    the next step boundary and checkpoint; a second one aborts."""
    flag = {"stop": False}
    previous = {}

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        log.warning("interrupt: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)
    except ValueError:  # not the main thread: no signal handling
        pass
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _load_initial_weights(model, cfg: RunConfig) -> None:
    """Fine-tuning starts from the weights a run is evaluated with (its EMA when it kept one); optimizer state,
    step count and schedule start afresh."""
    ckpt = load_checkpoint(cfg.train.init_from)
    src = ckpt["config"]["model"]
    if (src["name"], src["preset"]) != (cfg.model.name, cfg.model.preset):
        raise LictrainError(f"train.init_from holds a {src['name']} ({src['preset']}) model but this run builds "
                            f"{cfg.model.name} ({cfg.model.preset})")
    model.load_state_dict(ckpt["ema"]["model"] if ckpt.get("ema") else ckpt["model"])
    log.info("initialised from %s (step %d)", cfg.train.init_from, ckpt["state"]["step"])


def _probes(cfg: RunConfig, model, main_named, val_set: EvalImages, multiple: int) -> tuple[StepHook, ...]:
    """The measurement hooks the config's probe section asks for."""
    probes: list[StepHook] = []
    if cfg.probe.conflicts_every:
        from .analysis.conflicts import ConflictProbe

        probes.append(ConflictProbe(cfg.probe.conflicts_every, cfg.train.clip_max_norm, cfg.probe.conflicts_per_layer,
                                    names=[n for n, _ in main_named]))
    if cfg.probe.outliers_every:
        from .analysis.outliers import OutlierProbe

        n = min(cfg.probe.outliers_images, len(val_set))
        images = [pad_to_multiple(val_set[i].unsqueeze(0), multiple)[0] for i in range(n)]
        probes.append(OutlierProbe(images, cfg.probe.outliers_every))
    return tuple(probes)


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _reevaluator(model, criterion, x, rng, device):
    """The R-D terms of batch x under the current weights and the same noise draw as the step's forward pass.

    Same noise, so the difference to the step's terms is the effect of the update alone; the global RNG is restored
    afterwards, so asking for it does not change the random numbers the rest of the run sees.
    """
    if rng is None:
        return None

    @torch.no_grad()
    def reevaluate():
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state(rng[1], device)
            return criterion(model(x), x)

    return reevaluate


def _is_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def train(cfg: RunConfig, resume: bool = False, hooks: tuple[StepHook, ...] = ()) -> RunResult:
    """Train (or resume) the run `cfg` describes. Under torchrun every process calls this; see distributed.py."""
    device = distributed.local_device(resolve_device(cfg.device))
    dd = distributed.setup(device)
    try:
        return _train(cfg, resume, hooks, device, dd)
    finally:
        dd.close()


def _train(cfg: RunConfig, resume: bool, hooks: tuple[StepHook, ...], device: torch.device,
           dd: distributed.Dist) -> RunResult:
    run_dir = Path(cfg.run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    metrics_path = run_dir / "metrics.jsonl"
    if resume and not ckpt_path.exists():
        raise LictrainError(f"nothing to resume: {ckpt_path} does not exist")
    if not resume and ckpt_path.exists():
        raise LictrainError(f"{run_dir} already holds a run; pass --resume to continue it or choose another run_dir")

    if cfg.data.batch_size % dd.world:
        raise LictrainError(f"data.batch_size is the global batch and must be divisible by the {dd.world} processes, "
                            f"got {cfg.data.batch_size}")
    dd.barrier()  # every rank has checked the run folder before rank 0 writes into it

    # ---- set-up -------------------------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, cfg.model.preset).to(device)
    if cfg.train.init_from and not resume:
        _load_initial_weights(model, cfg)
    multiple = downsampling(cfg.model.name)
    if cfg.data.crop % multiple:
        raise LictrainError(f"data.crop must be a multiple of {multiple} for {cfg.model.name}, got {cfg.data.crop}")
    main_named, aux_named = split_parameters(model)
    params = [p for _, p in main_named]
    optimizer = build_optimizer(cfg.optim.name, params, cfg.optim.lr, cfg.optim.options)
    aux_optimizer = torch.optim.Adam([p for _, p in aux_named], lr=cfg.optim.aux_lr) if aux_named else None
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]
    scheduler = ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.train.plateau_factor, patience=cfg.train.plateau_patience,
        min_lr=cfg.train.min_lr,
    )
    fixed_schedule = cfg.train.schedule != "plateau"  # lr a function of the step alone (schedule.py)
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    method = build_method(cfg.method.name, cfg.method.options)
    method.attach(model, optimizer, params, total_steps=cfg.train.steps)
    # Under torchrun the forward pass goes through DistributedDataParallel, which averages gradients during the
    # backward pass; methods that need each objective's gradient separately run the plain module and average
    # their gradients themselves (StepContext.reduce_mean). The quantiles stay out of DDP: their auxiliary loss
    # depends only on parameters that are identical on every rank, so every rank computes the same update.
    forward_model = model
    if dd.enabled and not method.reduces_gradients:
        from torch.nn.parallel import DistributedDataParallel as DDP

        DDP._set_params_and_buffers_to_ignore_for_model(model, [n for n, _ in aux_named])
        forward_model = DDP(model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
    if dd.enabled:  # same initial weights everywhere (seeded above), but each rank its own quantization noise
        torch.manual_seed(cfg.seed + 1_000_003 * (dd.rank + 1))
    criterion = RateDistortionLoss(cfg.loss.lmbda, cfg.loss.metric)
    train_images = ImageList.scan(cfg.data.train, cfg.data.cache_mb)
    val_set = EvalImages(cfg.data.val, cfg.data.val_crop, cfg.data.val_max_images)

    st = dict(step=0, images_seen=0, train_time=0.0, skipped_steps=0, consecutive_skips=0)
    if resume:
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if aux_optimizer is not None:
            aux_optimizer.load_state_dict(ckpt["aux_optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        method.load_state_dict(ckpt["method"])
        st.update(ckpt["state"])
        rng = ckpt["rng"]
        ranks = rng.get("ranks")  # every rank's RNG state, when the run was distributed
        if dd.enabled and ranks is not None and len(ranks) == dd.world:
            rng = ranks[dd.rank]
        elif dd.enabled:
            log.warning("the number of processes changed since the checkpoint: random streams start afresh")
            torch.manual_seed(cfg.seed + 1_000_003 * (dd.rank + 1) + st["step"])
            rng = None
        if rng is not None:
            torch.set_rng_state(rng["torch"].cpu())  # map_location moved it; RNG states live on the CPU
            if device.type == "cuda" and rng.get("cuda") is not None:
                torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
        if dd.is_main:
            MetricsLog.truncate_after(metrics_path, st["step"])
            log.info("resuming %s at step %d", run_dir, st["step"])
    elif dd.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)
    if dd.is_main:
        dump_config(cfg, run_dir / "config.yaml")
    mlog = MetricsLog(metrics_path, run_dir / "tb" if cfg.train.tensorboard else None, enabled=dd.is_main)
    hooks = tuple(hooks) + _probes(cfg, model, main_named, val_set, multiple)
    saved = {"any": False}  # the end-of-run checkpoint decision must be the same on every rank (not a file test)

    def save_checkpoint() -> None:
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        ranks = dd.all_gather_object({k: v for k, v in rng.items()}) if dd.enabled else None  # every rank calls
        saved["any"] = True
        if not dd.is_main:
            return
        save_atomic(
            {
                "format": CHECKPOINT_FORMAT,
                "config": cfg.to_dict(),
                "model": model.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(),
                "aux_optimizer": aux_optimizer.state_dict() if aux_optimizer is not None else None,
                "scheduler": scheduler.state_dict(),
                "method": method.state_dict(),
                "state": dict(st),
                "rng": {**rng, "ranks": ranks},
            },
            ckpt_path,
        )

    def run_validation(step_scheduler: bool, extra: dict | None = None) -> dict:
        # Rank 0 validates; every rank steps its LR scheduler on rank 0's numbers, so learning rates stay equal.
        val = validate(ema.model if ema is not None else model, val_set, criterion, device, multiple) \
            if dd.is_main else None
        val = dd.broadcast_object(val)
        if step_scheduler and not fixed_schedule and st["step"] > cfg.train.warmup_steps:
            scheduler.step(val["loss"])
        record = {"kind": "val", "step": st["step"], "images_seen": st["images_seen"],
                  "train_time": st["train_time"], "lr": optimizer.param_groups[0]["lr"], **val, **(extra or {})}
        mlog.write(record)
        say(f"step {st['step']:>7d}  val loss {val['loss']:.4f}  bpp {val['bpp']:.4f}  PSNR {val['psnr']:.2f} dB  "
            f"train time {st['train_time']:.1f}s")
        return val

    total = cfg.train.steps
    bar = tqdm(total=total, initial=st["step"], desc="train", dynamic_ncols=True,
               disable=None if cfg.train.progress and dd.is_main else True)
    say = (bar.write if not bar.disable else log.info) if dd.is_main else (lambda msg: None)
    last_val: dict = {}
    if st["step"] == 0 and not resume:
        last_val = run_validation(step_scheduler=False)  # the untrained starting point of every curve

    # Each rank takes its share of every global batch (data.RunSampler): the same crops as one process would see.
    loader = train_loader(train_images, cfg.data.crop, cfg.data.batch_size // dd.world, cfg.seed, st["step"],
                          cfg.data.workers, rank=dd.rank, world=dd.world)
    batches = iter(loader)
    window: dict[str, list] = {"loss": [], "bpp": [], "mse": []}
    grad_norm = torch.zeros(())
    tick = time.perf_counter()
    try:
        with _graceful_interrupt() as interrupt:
            while st["step"] < total:
                x = next(batches).to(device, non_blocking=True)
                step = st["step"]
                if fixed_schedule or (cfg.train.warmup_steps and step < cfg.train.warmup_steps):
                    factor = lr_factor(step, total, cfg.train.schedule, cfg.train.decay_start,
                                       cfg.train.final_lr_factor, cfg.train.warmup_steps)
                    for g in optimizer.param_groups:
                        g["lr"] = g["initial_lr"] * factor
                model.train()
                rng = _rng_state(device) if method.needs_reevaluation else None
                terms = criterion(forward_model(x), x)
                will_log = (step + 1) % cfg.train.log_every == 0 or step + 1 == total
                ctx = StepContext(step=step, model=model, optimizer=optimizer, params=params, terms=terms,
                                  will_log=will_log, reevaluate=_reevaluator(model, criterion, x, rng, device),
                                  reduce_mean=dd.mean_, broadcast_=dd.broadcast_, batch=x, criterion=criterion)
                logs: dict = {}
                probe_logs: dict = {}  # hooks' measurements: written at their own steps, not only at log steps
                for h in hooks:
                    probe_logs.update(h.before_backward(ctx) or {})
                # A non-finite loss on any rank skips the step on every rank (DDP would hang on a partial backward).
                skipped = dd.any([not _is_finite(terms.loss.detach())], device)[0]
                if not skipped:
                    logs.update(method.backward(ctx))
                    clip = cfg.train.clip_max_norm if cfg.train.clip_max_norm > 0 else math.inf
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
                    skipped = not _is_finite(grad_norm)
                if skipped:
                    st["skipped_steps"] += 1
                    st["consecutive_skips"] += 1
                else:
                    optimizer.step()
                    st["consecutive_skips"] = 0
                    logs.update(method.after_step(ctx))
                optimizer.zero_grad(set_to_none=True)
                if aux_optimizer is not None:
                    aux_loss = model.aux_loss()
                    if _is_finite(aux_loss.detach()):
                        aux_loss.backward()
                        aux_optimizer.step()
                    aux_optimizer.zero_grad(set_to_none=True)
                if ema is not None and not skipped:
                    ema.update(model)
                for h in hooks:
                    probe_logs.update(h.after_step(ctx) or {})
                st["step"] += 1
                if probe_logs:
                    mlog.write({"kind": "probe", "step": st["step"], **probe_logs})
                st["images_seen"] += x.shape[0] * dd.world
                bar.update(1)
                if not skipped:
                    for k, v in (("loss", terms.loss), ("bpp", terms.rate), ("mse", terms.mse)):
                        window[k].append(v.detach())

                if st["consecutive_skips"] >= cfg.train.max_consecutive_skips:
                    mlog.close()
                    kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.exists() else "no checkpoint yet"
                    raise LictrainError(
                        f"stopped at step {st['step']}: {st['consecutive_skips']} consecutive steps with a non-finite "
                        f"loss or gradient ({kept}); try a lower optim.lr or train.clip_max_norm"
                    )

                stop_requested = dd.any([interrupt["stop"]], device)[0]  # a stop on any rank stops all, here
                at_end = st["step"] == total or stop_requested
                if st["step"] % cfg.train.log_every == 0 or at_end:
                    if window["loss"]:  # skipped steps are the same on every rank, so windows have equal lengths
                        means = dd.mean(torch.stack([torch.stack(v).mean() for v in window.values()]))
                        mean = dict(zip(window, means.tolist()))
                        record = {"kind": "train", "step": st["step"], "loss": mean["loss"], "bpp": mean["bpp"],
                                  "psnr": psnr_from_mse(mean["mse"]), "grad_norm": float(grad_norm),
                                  "lr": optimizer.param_groups[0]["lr"], "skipped_steps": st["skipped_steps"], **logs}
                        mlog.write(record)
                        bar.set_postfix(loss=f"{mean['loss']:.3f}", bpp=f"{mean['bpp']:.3f}",
                                        psnr=f"{record['psnr']:.2f}", lr=f"{record['lr']:.1e}")
                        window = {k: [] for k in window}
                regular_val = st["step"] % cfg.train.val_every == 0
                regular_ckpt = st["step"] % cfg.train.ckpt_every == 0
                if regular_val or regular_ckpt or at_end:
                    _sync(device)
                    st["train_time"] += dd.max(time.perf_counter() - tick, device)  # the slowest rank's time
                    if regular_val or at_end:
                        # A validation only because of Ctrl-C is marked: curves compared between runs leave it out,
                        # so an interrupted run gains no extra resolution in Steps-to-anchor.
                        off_schedule = not regular_val and st["step"] != total
                        last_val = run_validation(step_scheduler=regular_val,
                                                  extra={"interrupted": True} if off_schedule else None)
                    if regular_ckpt or at_end:
                        save_checkpoint()
                    tick = time.perf_counter()
                if stop_requested:
                    say(f"interrupted at step {st['step']}; continue with: lictrain train --resume {run_dir}")
                    break
    finally:
        bar.close()
        if not mlog.closed:
            mlog.close()

    if not saved["any"] and not (resume and st["step"] >= total):  # train.steps = 0: keep the initial weights
        save_checkpoint()
    if not last_val and (run_dir / "summary.json").exists():  # a finished run resumed: nothing new to report
        last_val = json.loads((run_dir / "summary.json").read_text()).get("last_val", {})
    result = RunResult(run_dir, st["step"], st["train_time"], st["skipped_steps"], len(train_images.skipped), last_val)
    summary = {"step": result.step, "train_time": result.train_time, "skipped_steps": result.skipped_steps,
               "skipped_images": [str(p) for p, _ in train_images.skipped + val_set.skipped], "last_val": last_val}
    if dd.is_main:
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    dd.barrier()  # no rank leaves before rank 0 has written the run's last files
    return result
