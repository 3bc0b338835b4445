"""The one training loop. Methods (methods/) and hooks plug into it; nothing else copies it.

`Trainer.__init__` sets up (model, optimizers, EMA, data, method) and restores a checkpoint when resuming;
`Trainer.fit` is the loop, one screen long; `Trainer.train_step` is one step: LR -> forward -> R and D -> hooks ->
method.backward -> finite check -> clip -> optimizer.step -> method.after_step -> auxiliary (quantile) step -> EMA.
Every `val_every` steps a validation of the EMA model (and `checkpoint_best.pt` when it is the best so far), every
`ckpt_every` an atomic checkpoint.

Timing is honest and comparable across runs: `train_time` counts only the training steps (data loading included,
validation, checkpointing and logging of validation excluded), measured in segments between validations, with a
device synchronisation at each segment boundary on GPUs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from compressai.layers import GDN
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm import tqdm

from .checkpoint import checkpoint_config, checkpoint_dict, load_checkpoint, load_state_dict_checked, load_weights
from .io import remove_stale_temporaries, save_atomic, strict_json, write_atomic
from . import rundir
from .config import RunConfig, check_resume, dump_config
from . import distributed
from .data import EvalImages, ImageList, crop_to, pad_to_multiple, train_loader
from .ema import EMA
from .errors import LictrainError
from .losses import MS_SSIM_MIN_SIDE, RateDistortionLoss, ms_ssim_db, ms_ssim_value, psnr_from_mse
from .methods import RunContext, StepContext, StepHook, build_method
from .models import build_model, check_compression_model, downsampling, downsampling_of, video_frames
from .models.numerics import keep_in_fp32, prepare_entropy_models
from .optim import build_optimizer, kernel_parameters, split_parameters, unwrap
from .rundir import MetricsLog
from .precision import compile_model, grad_scaler, numeric_flags, training_forward
from .schedule import finish_state, lr_factor

log = logging.getLogger("lictrain")

MAX_BACKOFFS = 32  # fp16: loss-scale back-offs in a row before an overflow counts as a non-finite step


@dataclass
class RunResult:
    run_dir: Path
    step: int
    train_time: float
    skipped_steps: int
    skipped_images: int
    last_val: dict
    interrupted: int = 0  # the signal (SIGINT 2, SIGTERM 15) that stopped the run before train.steps, else 0
    converged_stop: bool = False  # train.stop_when_converged ended it before train.steps


def nothing_to_resume(run_dir: Path) -> str:
    """The message for --resume of a folder without a checkpoint (a run stopped before its first one)."""
    run_dir = Path(run_dir)
    if (run_dir / rundir.CONFIG).exists():
        return (f"nothing to resume: {run_dir} has no checkpoint yet (the run stopped before its first one); start "
                f"it again with: lictrain train --config {run_dir / rundir.CONFIG}")
    return f"nothing to resume: {run_dir} holds no run (no {rundir.CHECKPOINT})"


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
    """Mean over images of the R-D loss, bpp (estimated from likelihoods) and PSNR, in eval mode (no noise); for
    MS-SSIM runs also MS-SSIM and MS-SSIM in dB, -10 log10(1 - MS-SSIM), on images large enough for its 5 scales."""
    was_training = model.training
    model.eval()
    sums = dict(loss=0.0, bpp=0.0, mse=0.0, psnr=0.0)
    ms_values = []
    for i in range(len(dataset)):
        x = dataset[i].unsqueeze(0).to(device)
        h, w = x.shape[-2:]
        out = model(pad_to_multiple(x, multiple))
        out["x_hat"] = crop_to(out["x_hat"], h, w)
        if "target" in out:  # (a video stage's frame)
            out["target"] = crop_to(out["target"], h, w)
        terms = criterion(out, x)  # bits of the padded latents, per pixel of the original image
        sums["loss"] += terms.loss.item()
        sums["bpp"] += terms.rate.item()
        sums["mse"] += terms.mse.item()
        sums["psnr"] += psnr_from_mse(terms.mse.item())
        if criterion.metric == "ms-ssim" and min(h, w) >= MS_SSIM_MIN_SIDE:
            ms_values.append(ms_ssim_value(out["x_hat"].clamp(0, 1), out.get("target", x)).item())
    model.train(was_training)
    result = {k: v / len(dataset) for k, v in sums.items()}
    if ms_values:
        result["ms_ssim"] = sum(ms_values) / len(ms_values)
        result["ms_ssim_db"] = ms_ssim_db(result["ms_ssim"])
    return result


@dataclass
class StepResult:
    """What one training step gives the loop."""

    terms: object  # the R-D terms of the step's forward pass
    logs: dict  # the method's logs
    probe_logs: dict  # the hooks' measurements (already written to metrics.jsonl)
    ok: torch.Tensor  # on the device: loss and gradient were finite (zero mode: on every rank)
    skipped: bool  # no step was taken (skip mode; zero mode always steps, on a zeroed gradient if need be)
    grad_norm: torch.Tensor  # before clipping; NaN where no backward ran
    backoff: bool = False  # fp16: the loss scale backed off (not counted as a non-finite step)


@contextmanager
def _graceful_interrupt():
    """First Ctrl-C (or SIGTERM: a scheduler's pre-emption, torchrun stopping its workers) asks the loop to stop at
    the next step boundary and checkpoint; a second one aborts."""
    flag = {"stop": False, "signal": 0}
    previous = {}

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"], flag["signal"] = True, int(signum)
        log.warning("interrupt: finishing this step, then a checkpoint and a last validation (Ctrl-C again aborts "
                    "at once; once the checkpoint is written, it only skips the validation)")

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


def _load_initial_weights(model, cfg: RunConfig) -> dict | None:
    """Fine-tuning (train.init_from), before anything copies the weights (EMA, SMA's average). From a plain state
    dict (CompressAI's or any `torch.save(model.state_dict())` of the same architecture and width): its weights.
    From a lictrain checkpoint: by default the weights a run is evaluated with (its EMA when it kept one), the
    optimizer, step count and schedule afresh; with train.init_state=weights+optimizer its raw weights, whose
    optimizer state _load_initial_optimizer then loads. Returns the checkpoint (None for a plain state dict)."""
    ckpt = load_weights(cfg.train.init_from)  # on the CPU: see Trainer._restore
    if isinstance(ckpt, tuple):
        if cfg.train.init_state != "weights":
            raise LictrainError(f"{cfg.train.init_from} is a plain state dict: it holds no optimizer state "
                                "(train.init_state must be weights)")
        load_state_dict_checked(model, ckpt[1], cfg.train.init_from)
        log.info("initialised from the state dict %s", cfg.train.init_from)
        return None
    src = ckpt["config"]
    if (src["model"]["name"], src["model"]["preset"]) != (cfg.model.name, cfg.model.preset):
        raise LictrainError(f"train.init_from holds a {src['model']['name']} ({src['model']['preset']}) model but this "
                            f"run builds {cfg.model.name} ({cfg.model.preset})")
    with_optimizer = cfg.train.init_state == "weights+optimizer"
    if with_optimizer:
        if src["optim"]["name"] != cfg.optim.name:
            raise LictrainError(f"train.init_state=weights+optimizer needs the same optimizer: {cfg.train.init_from} "
                                f"was trained with {src['optim']['name']}, this run uses {cfg.optim.name}")
        if not ckpt.get("optimizer"):
            raise LictrainError(f"{cfg.train.init_from} holds no optimizer state (checkpoint_best.pt keeps weights "
                                "only: use the run folder's checkpoint.pt)")
    use_ema = ckpt.get("ema") and not with_optimizer
    model.load_state_dict(ckpt["ema"]["model"] if use_ema else ckpt["model"])
    log.info("initialised from %s (step %d, %s)", cfg.train.init_from, ckpt["state"]["step"], cfg.train.init_state)
    return ckpt


def _load_initial_optimizer(trainer: "Trainer", ckpt: dict) -> None:
    """The source run's optimizer state (moments, SOAP's bases, SMA's average) under this run's settings: every
    group setting (lr, betas, ...) stays as this run's config made it; only the state comes from the source."""
    cfg = trainer.cfg
    for opt, saved in ((trainer.optimizer, ckpt["optimizer"]), (trainer.aux_optimizer, ckpt.get("aux_optimizer"))):
        if opt is None or not saved:
            continue
        settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        try:
            opt.load_state_dict(saved)
        except (ValueError, KeyError) as e:
            raise LictrainError(f"the optimizer state in {cfg.train.init_from} does not fit this run's optimizer: "
                                f"{str(e).splitlines()[0][:160]}") from None
        for g, kept in zip(opt.param_groups, settings):
            g.update(kept)


def _probes(cfg: RunConfig, model, main_named, val_set: EvalImages, multiple: int) -> tuple[StepHook, ...]:
    """The measurement hooks the config's probe section asks for."""
    probes: list[StepHook] = []
    if cfg.probe.conflicts_every:
        from .probes.conflicts import ConflictProbe

        probes.append(ConflictProbe(cfg.probe.conflicts_every, cfg.train.clip_max_norm, cfg.probe.conflicts_per_layer,
                                    names=[n for n, _ in main_named]))
    if cfg.probe.outliers_every:
        from .probes.outliers import OutlierProbe

        n = min(cfg.probe.outliers_images, len(val_set))
        images = [pad_to_multiple(val_set[i].unsqueeze(0), multiple)[0] for i in range(n)]
        probes.append(OutlierProbe(images, cfg.probe.outliers_every))
    return tuple(probes)


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a container's limit, which
    os.cpu_count() does not see: 8 workers on a 2-CPU container only queue behind each other)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    quotas = ((cgroup / "cpu.max", None), (cgroup / "cpu" / "cpu.cfs_quota_us", cgroup / "cpu" / "cpu.cfs_period_us"))
    for quota_file, period_file in quotas:  # cgroup v2, then v1
        try:
            if period_file is None:
                quota, period = quota_file.read_text().split()[:2]
            else:
                quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
            if quota not in ("max", "-1"):
                return max(1, min(n, math.ceil(int(quota) / int(period))))
        except (OSError, ValueError):
            continue
    return n


def data_workers(setting: int | None, device: torch.device, world: int = 1) -> int:
    """data.workers, or its default: none on the CPU (the step itself uses every core); on CUDA enough processes
    to crop and batch while the GPU steps, up to 8 per training process, one CPU left to the training process."""
    if setting is not None:
        return setting
    if device.type != "cuda":
        return 0
    return max(1, min(8, usable_cpus() // world - 1))


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _reevaluator(model, criterion, x, rng, device, precision: str = "fp32", deterministic: bool = False):
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
            with training_forward(device, precision, deterministic):  # as the step's own forward pass
                out = model(x)
            return criterion(out, x)

    return reevaluate


def _is_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _zero_unless(ok: torch.Tensor, params) -> None:
    """Gradients left as they are when `ok` (a device bool), all zero otherwise, decided on the device: NaN/Inf
    entries are cleared first (NaN * 0 is NaN), then everything is multiplied by ok."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    for g in grads:
        g.nan_to_num_(0.0, 0.0, 0.0)
    torch._foreach_mul_(grads, ok.to(grads[0].dtype))


def _disable_optimizer_finite_checks(optimizer) -> None:
    """The loop guarantees finite gradients before every step: an optimizer whose record says it checks on its own
    (SOAP, reading a flag from the device each step) need not."""
    base, spec = unwrap(optimizer)
    if spec is not None and spec.checks_finite:
        base.check_finite = False


def train(cfg: RunConfig, resume: bool = False, hooks: tuple[StepHook, ...] = (),
          model: torch.nn.Module | None = None) -> RunResult:
    """Train (or resume) the run `cfg` describes, or the given CompressAI `model` (trained in place) under cfg's
    settings. Under torchrun every process calls this; see distributed.py."""
    for h in hooks:  # before anything is built or written: the loop gives hooks the run through StepHook.attach
        if not isinstance(h, StepHook):
            raise LictrainError(f"a training hook must subclass lictrain.methods.StepHook, got {type(h).__name__}")
    device = distributed.local_device(resolve_device(cfg.device))
    dist = distributed.setup(device)
    try:
        return Trainer(cfg, resume, hooks, device, dist, model=model).fit()
    finally:
        dist.close()


class Trainer:
    """One run: `__init__` sets up (and restores), `fit` is the loop; `train_step`, `validate`, `save` are its parts.

    `state` (step, images_seen, train_time, skipped_steps, consecutive_skips, best_val) is all the loop's
    bookkeeping and goes into every checkpoint with the model, EMA, optimizers, scheduler, method state and every
    rank's RNG state. `checkpoint_best.pt` holds the weights of the best regular validation.
    """

    def __init__(self, cfg: RunConfig, resume: bool, hooks: tuple[StepHook, ...], device: torch.device,
                 dist: distributed.Dist, model: torch.nn.Module | None = None):
        self.cfg, self.resume, self.device, self.dist = cfg, resume, device, dist
        self.user_model = (check_compression_model(model, f"train(model=...): {type(model).__name__}")
                           if model is not None else None)
        if model is not None:  # the checkpoint's config says it was not a registered model (eval cannot rebuild it)
            cfg.model.name, cfg.model.preset = "custom", type(model).__name__
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_path = self.run_dir / rundir.CHECKPOINT
        self.best_path = self.run_dir / rundir.BEST  # the weights of the best validation so far
        self.metrics_path = self.run_dir / rundir.METRICS
        if resume and not self.ckpt_path.exists():
            raise LictrainError(nothing_to_resume(self.run_dir))
        if not resume and self.ckpt_path.exists():
            raise LictrainError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another "
                                "run_dir")
        if cfg.data.batch_size % dist.world:
            raise LictrainError(f"data.batch_size is the global batch and must be divisible by the {dist.world} "
                                f"processes, got {cfg.data.batch_size}")
        dist.barrier()  # every rank has checked the run folder before rank 0 writes into it
        self._flags = contextlib.ExitStack()
        self.state = dict(step=0, images_seen=0, train_time=0.0, skipped_steps=0, consecutive_skips=0,
                          best_val=math.inf, scale_backoffs=0, consecutive_backoffs=0, converged_stop=False)
        self.val_history: list[dict] = []  # step, loss and lr of each regular validation (the converged rule's input)
        try:  # from here on the process-global flags are set (_build): a failure puts them back
            self._build()
            if dist.is_main:  # what a process killed while writing a checkpoint left beside it
                for path in (self.ckpt_path, self.best_path):
                    remove_stale_temporaries(path)
            if resume:
                self._restore()
            elif dist.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.metrics_path.unlink(missing_ok=True)
            if dist.is_main:
                dump_config(cfg, self.run_dir / rundir.CONFIG)
            # TensorBoard drops the events a crashed run logged after the checkpoint it resumes from (metrics.jsonl
            # is rewound by _restore); a fresh run starts its event file afresh too
            self.metrics = MetricsLog(self.metrics_path, self.run_dir / "tb" if cfg.train.tensorboard else None,
                                      enabled=dist.is_main, purge_step=self.state["step"] + 1)
            self.hooks = tuple(hooks) + _probes(cfg, self.model, self.main_named, self.val_set, self.multiple)
            for h in self.hooks:
                h.attach(self.run_context)
        except BaseException:
            self.close()
            raise
        if dist.is_main:
            self._describe()
        self.saved_any = False  # the end-of-run checkpoint decision must be the same on every rank (not a file test)
        self.interrupted = 0
        self.report = log.info if dist.is_main else (lambda msg: None)

    def close(self) -> None:
        """Put back the process-global numeric flags this run set (TF32, cuDNN, determinism); fit() ends with it.
        Trainers used side by side without fit() must be closed in the reverse order of their creation, as nested
        contexts are. (CUBLAS_WORKSPACE_CONFIG, once set by a deterministic run, stays: cuBLAS reads it once.)"""
        self._flags.close()

    def _build(self) -> None:
        """The run's parts, in the order that keeps a run a function of its seed: the initial weights are drawn
        first, then the optimizers, the method and the forward path, then each rank's own noise stream and the
        data."""
        cfg, dist = self.cfg, self.dist
        torch.manual_seed(cfg.seed)
        # TF32, cuDNN autotuning, determinism: process-global, restored by close() (fit() ends with it)
        self._flags = numeric_flags(self.device, cfg.train.tf32, cfg.train.deterministic)
        source = self._setup_model(cfg.model, cfg.train, cfg.data.crop)
        self._setup_optimizers(cfg.optim, cfg.train, source)
        self._setup_method(cfg.method, cfg.train, cfg.loss)
        if dist.enabled:  # same initial weights everywhere (seeded above), but each rank its own quantization noise
            torch.manual_seed(cfg.seed + 1_000_003 * (dist.rank + 1))
        self._setup_data(cfg.data)

    def _setup_model(self, mc, tc, crop: int):
        """The model (built, or the user's), prepared for the run's precision, with its initial weights; returns
        the checkpoint those came from (fine-tuning), if any."""
        device = self.device
        if self.user_model is not None:
            self.model = model = self.user_model.to(device)
        else:
            frames, have = video_frames(mc.name), self.cfg.data.frames
            if frames and have < frames:
                raise LictrainError(f"model {mc.name} is a video model: it trains on sequences of at least {frames} "
                                    f"frames (data.frames: {frames}, data.train/val: frame sequences)")
            if have and not frames:
                raise LictrainError(f"data.frames={have} trains on frame sequences, and {mc.name} is an image model "
                                    f"(video models: lictrain list)")
            self.model = model = build_model(mc.name, mc.preset, mc.kwargs).to(device)
        # before the EMA copies the model: the entropy models in fp32 and their bottlenecks without host reads
        prepare_entropy_models(model)
        if tc.precision == "fp16":  # GDN's x^2 overflows fp16 once |x| >= 256
            keep_in_fp32(model, (GDN,))
        self.scaler = grad_scaler(device, tc.precision)
        source = _load_initial_weights(model, self.cfg) if tc.init_from and not self.resume else None
        # a user's model: its own `downsampling_factor` if it has one, else 64 (the largest total stride of
        # CompressAI's models; padding to a multiple of it is safe for all of them)
        self.multiple = downsampling_of(model) if self.user_model is not None else downsampling(mc.name)
        if crop % self.multiple:
            raise LictrainError(f"data.crop must be a multiple of {self.multiple} for {mc.name}, got {crop}")
        self.main_named, self.aux_named = split_parameters(model)
        self.params = [p for _, p in self.main_named]
        return source

    def _setup_optimizers(self, oc, tc, source) -> None:
        """The main optimizer (its record's capabilities applied), CompressAI's auxiliary Adam on the quantiles,
        the LR scheduler and the EMA of the weights."""
        self.optimizer = build_optimizer(oc.name, self.params, oc.lr, oc.options, kernels=kernel_parameters(self.model))
        aux = [p for _, p in self.aux_named]
        self.aux_optimizer = torch.optim.Adam(aux, lr=oc.aux_lr) if aux else None
        _disable_optimizer_finite_checks(self.optimizer)
        for g in self.optimizer.param_groups:
            g["initial_lr"] = g["lr"]
        if source is not None and tc.init_state == "weights+optimizer":
            _load_initial_optimizer(self, source)
        self.scheduler = ReduceLROnPlateau(self.optimizer, mode="min", factor=tc.plateau_factor,
                                           patience=tc.plateau_patience, threshold=tc.plateau_threshold,
                                           min_lr=tc.min_lr)
        self.fixed_schedule = tc.schedule != "plateau"  # lr a function of the step alone (schedule.py)
        self.ema = EMA(self.model, tc.ema_decay) if tc.ema_decay > 0 else None

    def _setup_method(self, mc, tc, lc) -> None:
        """The R-D loss; the method, checked against what the run asks of it (its flags), attached; the forward path
        (DDP, compile); how non-finite steps are handled."""
        device, dist = self.device, self.dist
        self.criterion = RateDistortionLoss(lc.lmbda, lc.metric)
        self.method = build_method(mc.name, mc.options)
        if self.scaler is not None and not self.method.supports_loss_scaling:
            raise LictrainError(f"train.precision=fp16 needs loss scaling, which the standard method supports and the "
                                f"{mc.name} method does not (its update is not the backward of one loss): use bf16")
        self.run_context = RunContext(self.model, self.optimizer, self.params, tc.steps, self.criterion,
                                      reduce_mean=dist.mean_, broadcast_=dist.broadcast_)
        self.method.attach(self.run_context)
        # Under torchrun the forward pass goes through DistributedDataParallel, which averages gradients during the
        # backward pass; methods that need each objective's gradient separately run the plain module and average
        # their gradients themselves (RunContext.reduce_mean). The quantiles stay out of DDP: their auxiliary loss
        # depends only on parameters that are identical on every rank, so every rank computes the same update.
        self.forward_model = self.model
        if dist.enabled and not self.method.reduces_gradients:
            from torch.nn.parallel import DistributedDataParallel as DDP

            DDP._set_params_and_buffers_to_ignore_for_model(self.model, [n for n, _ in self.aux_named])
            self.forward_model = DDP(self.model, device_ids=[device] if device.type == "cuda" else None,
                                     broadcast_buffers=False)
        self.forward_model = compile_model(self.forward_model, tc.compile, eager_random=self.method.needs_reevaluation)
        mode = tc.nonfinite
        if mode == "auto":
            mode = "zero" if device.type == "cuda" and self.method.host_sync_free else "skip"
        if mode == "zero" and not self.method.host_sync_free:
            raise LictrainError(f"train.nonfinite=zero needs the standard method or another host-synchronisation-free "
                                f"one (the {mc.name} method reads this step's losses after the update): use skip")
        self.nonfinite = "skip" if self.scaler is not None else mode  # fp16: the GradScaler decides, on the host
        # zero mode's counts live on the device and reach self.state at log, validation and checkpoint steps
        self.device_skips = torch.zeros((), dtype=torch.int64, device=device)
        self.device_consecutive = torch.zeros((), dtype=torch.int64, device=device)
        # a step's result before its backward (a non-finite loss in skip mode): made once, not in every step
        self._not_ok = torch.zeros((), dtype=torch.bool, device=device)
        self._no_norm = torch.full((), math.nan, device=device)

    def _setup_data(self, dc) -> None:
        """The training images and the validation set."""
        if dc.frames:  # video: sequences of frames (lictrain/video/data.py)
            from .video.data import EvalSequences, SequenceSet

            self.train_images = SequenceSet.scan(dc.train)
            self.val_set = EvalSequences(dc.val, dc.frames, dc.val_crop, dc.val_max_images)
            return
        self.train_images = ImageList.scan(dc.train, dc.cache_mb)
        self.val_set = EvalImages(dc.val, dc.val_crop, dc.val_max_images)

    def _describe(self) -> None:
        """What this run trains, on what, where: one line, and a warning for an image in both data sets."""
        cfg = self.cfg
        val_files = self.val_set.files
        shared = sorted({p.resolve() for p in self.train_images.files} & {p.resolve() for p in val_files})
        params = sum(p.numel() for p in self.params) / 1e6
        log.info("%s (%s, %.2f M parameters) on %s, %s; %s at lr %g; %d training images, %d validation images",
                 cfg.model.name, cfg.model.preset, params, self.device, cfg.train.precision, cfg.optim.name,
                 cfg.optim.lr, len(self.train_images), len(self.val_set))
        if log.isEnabledFor(logging.DEBUG):  # -v: where the images come from, how they are drawn, what is fixed
            by_folder: dict[str, int] = {}
            for p in self.train_images.files:
                by_folder[str(p.parent)] = by_folder.get(str(p.parent), 0) + 1
            log.debug("training images by folder: %s", ", ".join(f"{k} {v}" for k, v in sorted(by_folder.items())))
            log.debug("data: %d² crops, batch %d, order %s, %d loader workers; validation every %d steps, checkpoint "
                      "every %d; schedule %s; seed %d; run folder %s", cfg.data.crop, cfg.data.batch_size,
                      cfg.data.order, data_workers(cfg.data.workers, self.device, self.dist.world),
                      cfg.train.val_every, cfg.train.ckpt_every, cfg.train.schedule, cfg.seed, self.run_dir)
        if shared:
            log.warning("%d of the %d validation images are training images too (%s%s): the validation loss and "
                        "everything measured against it (the LR schedule, Steps-to-X) see training data",
                        len(shared), len(val_files), ", ".join(p.name for p in shared[:3]),
                        ", ..." if len(shared) > 3 else "")

    def _restore(self) -> None:
        dist, device = self.dist, self.device
        # Read on the CPU: load_state_dict moves each tensor to its parameter's device, except the non-fused Adam's
        # step counters, which torch leaves where they were read; on CUDA each would cost two host reads per
        # parameter tensor per step (its bias corrections), slowing every resumed Adam run and so biasing
        # Time-to-Adam. A fresh run keeps them on the CPU; so does a resumed one.
        ckpt = load_checkpoint(self.ckpt_path)
        check_resume(checkpoint_config(ckpt), self.cfg)  # however the run was resumed: CLI, API or compare
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.aux_optimizer is not None:
            self.aux_optimizer.load_state_dict(ckpt["aux_optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.method.load_state_dict(ckpt["method"])
        self.state.update(ckpt["state"])
        before = ckpt["config"]["train"]["steps"]
        if self.fixed_schedule and before != self.cfg.train.steps:
            log.warning("train.steps changed from %d to %d under the %s schedule: the learning rate follows the new "
                        "budget from here (it rises again if the decay had begun)", before, self.cfg.train.steps,
                        self.cfg.train.schedule)
        rng = ckpt["rng"]
        ranks = rng.get("ranks")  # every rank's RNG state, when the run was distributed
        if dist.enabled and ranks is not None and len(ranks) == dist.world:
            rng = ranks[dist.rank]
        elif dist.enabled:
            log.warning("the number of processes changed since the checkpoint: random streams start afresh")
            torch.manual_seed(self.cfg.seed + 1_000_003 * (dist.rank + 1) + self.state["step"])
            rng = None
        if rng is not None:
            torch.set_rng_state(rng["torch"].cpu())
            if device.type == "cuda" and rng.get("cuda") is not None:
                torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
        if dist.is_main:
            MetricsLog.truncate_after(self.metrics_path, self.state["step"])
            log.info("resuming %s at step %d", self.run_dir, self.state["step"])
        self.val_history = dist.broadcast_object(
            [{k: r[k] for k in ("step", "loss", "lr")} for r in rundir.read_records(self.metrics_path, "val")
             if not r.get("interrupted")] if dist.is_main else None)

    def save(self) -> None:
        """An atomic checkpoint of everything a resumed run needs to continue bit-identically."""
        device, dist = self.device, self.dist
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        ranks = dist.all_gather_object(dict(rng)) if dist.enabled else None  # every rank calls
        optimizer = self.optimizer.state_dict()  # every rank calls too: a sharded SOAP gathers its state here
        self.saved_any = True
        if not dist.is_main:
            return
        save_atomic(checkpoint_dict(
            self.cfg, self.model.state_dict(), self.ema.state_dict() if self.ema is not None else None, self.state,
            optimizer=optimizer,
            aux_optimizer=self.aux_optimizer.state_dict() if self.aux_optimizer is not None else None,
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,  # fp16's loss scale
            method=self.method.state_dict(),
            rng={**rng, "ranks": ranks},
        ), self.ckpt_path)

    def save_best(self) -> None:
        """The weights (and EMA) of the best regular validation so far, for `lictrain eval` and fine-tuning; not
        for resuming (no optimizer or RNG state)."""
        if self.dist.is_main:
            save_atomic(checkpoint_dict(self.cfg, self.model.state_dict(),
                                        self.ema.state_dict() if self.ema is not None else None, self.state),
                        self.best_path)

    def validate(self, step_scheduler: bool, track_best: bool = False, extra: dict | None = None) -> dict:
        """Rank 0 validates the EMA model; every rank steps its LR scheduler on rank 0's numbers (equal LRs)."""
        state, dist = self.state, self.dist
        val = validate(self.ema.model if self.ema is not None else self.model, self.val_set, self.criterion,
                       self.device, self.multiple) if dist.is_main else None
        val = dist.broadcast_object(val)
        if step_scheduler and not self.fixed_schedule and state["step"] > self.cfg.train.warmup_steps:
            self.scheduler.step(val["loss"])
        if track_best and state["step"] > 0 and val["loss"] < state["best_val"]:
            state["best_val"] = val["loss"]
            self.save_best()
        if not extra:
            self.val_history.append({"step": state["step"], "loss": val["loss"],
                                     "lr": self.optimizer.param_groups[0]["lr"]})
        self.metrics.write({"kind": "val", "step": state["step"], "images_seen": state["images_seen"],
                        "train_time": state["train_time"], "lr": self.optimizer.param_groups[0]["lr"], **val,
                        **(extra or {})})
        quality = f"  MS-SSIM {val['ms_ssim_db']:.2f} dB" if "ms_ssim_db" in val else ""
        self.report(f"step {state['step']:>7d}  val loss {val['loss']:.4f}  bpp {val['bpp']:.4f}  PSNR {val['psnr']:.2f} dB"
                    f"{quality}  train time {state['train_time']:.1f}s")
        return val

    def _set_lr(self, step: int) -> None:
        t = self.cfg.train
        if self.fixed_schedule or (t.warmup_steps and step < t.warmup_steps):
            factor = lr_factor(step, t.steps, t.schedule, t.decay_start, t.final_lr_factor, t.warmup_steps)
            for g in self.optimizer.param_groups:
                g["lr"] = g["initial_lr"] * factor

    def train_step(self, x: torch.Tensor) -> StepResult:
        """One step on batch x: forward, hooks, backward (the method's, or fp16's scaled loss), clip, the finiteness
        decision, optimizer step, method and auxiliary steps, EMA.

        Finiteness is decided once, on the device: loss and gradient norm finite. Skip mode (train.nonfinite) reads
        that decision (one host synchronisation; a non-finite loss is caught before the backward pass, on every rank,
        since DDP would hang on a partial one) and takes no step; zero mode multiplies the gradient by it and steps,
        counting on the device (no synchronisation). fp16's GradScaler makes its own decision, which skip mode
        reads."""
        model, state, dist = self.model, self.state, self.dist
        step = state["step"]
        self._set_lr(step)
        model.train()
        rng = _rng_state(self.device) if self.method.needs_reevaluation else None
        with training_forward(self.device, self.cfg.train.precision, self.cfg.train.deterministic):
            out = self.forward_model(x)
        terms = self.criterion(out, x)  # in fp32: the entropy models' likelihoods are fp32, x_hat is cast
        will_log = (step + 1) % self.cfg.train.log_every == 0 or step + 1 == self.cfg.train.steps
        ctx = StepContext(step, terms, x, will_log,
                          _reevaluator(model, self.criterion, x, rng, self.device, self.cfg.train.precision,
                                       self.cfg.train.deterministic))
        result = StepResult(terms, {}, {}, self._not_ok, True, self._no_norm)  # until a backward runs
        for h in self.hooks:
            result.probe_logs.update(h.before_backward(ctx) or {})
        zero_mode = self.nonfinite == "zero"
        if zero_mode or not dist.any([not _is_finite(terms.loss.detach())], self.device)[0]:
            result.logs.update(self._backward(ctx))
            clip = self.cfg.train.clip_max_norm if self.cfg.train.clip_max_norm > 0 else math.inf
            result.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
            # (skip mode: every rank agreed on the loss above, and the averaged gradient's norm is the same on all)
            ok = torch.isfinite(terms.loss.detach()) & torch.isfinite(result.grad_norm)
            result.ok = dist.all_on_device(ok) if zero_mode else ok
            if zero_mode:
                _zero_unless(result.ok, self.params)
                self.optimizer.step()
                result.skipped = False  # counted on the device
                bad = (~result.ok).to(torch.int64)
                self.device_skips += bad
                self.device_consecutive.add_(1).mul_(bad)
            else:
                result.skipped = not bool(result.ok)  # skip mode's one read
                if self.scaler is not None:
                    scale = self.scaler.get_scale()
                    self.scaler.step(self.optimizer)  # steps only if the unscaled gradients are finite (as ok)
                    self.scaler.update()  # a smaller loss scale after an overflow
                    # A finite loss whose scaled gradients overflowed while the scale was above 1 is the scaler
                    # finding its scale (the first steps at high lambda, or a back-off after the scale has grown):
                    # not taken, but not a non-finite step. Below a scale of 1, or after MAX_BACKOFFS back-offs in a
                    # row (enough to bring any scale a run reaches down to 1), the gradients themselves overflow:
                    # counted, so a stuck run still stops.
                    result.backoff = (result.skipped and scale > 1
                                      and state["consecutive_backoffs"] < MAX_BACKOFFS)
                elif not result.skipped:
                    self.optimizer.step()
            if not result.skipped:  # zero mode: a zeroed step is still a step (its after_step runs)
                result.logs.update(self.method.after_step(ctx))
        self._count(result)
        self.optimizer.zero_grad(set_to_none=True)
        self._aux_step()
        if self.ema is not None and not result.skipped:
            self.ema.update(model)
        for h in self.hooks:
            result.probe_logs.update(h.after_step(ctx) or {})
        state["step"] += 1
        if result.probe_logs:
            self.metrics.write({"kind": "probe", "step": state["step"], **result.probe_logs})
        state["images_seen"] += x.shape[0] * dist.world
        return result

    def _backward(self, ctx: StepContext) -> dict:
        """The update direction into .grad: fp16's scaled loss (methods that support loss scaling: one loss), else
        the method's backward."""
        if self.scaler is not None:
            self.scaler.scale(ctx.terms.loss).backward()
            self.scaler.unscale_(self.optimizer)
            return {}
        return self.method.backward(ctx)

    def _count(self, result: "StepResult") -> None:
        """Skip mode's host counters (zero mode counts on the device, read by _read_device_skips)."""
        state = self.state
        state["consecutive_backoffs"] = state["consecutive_backoffs"] + 1 if result.backoff else 0
        if result.backoff:
            state["scale_backoffs"] += 1
        elif result.skipped:
            state["skipped_steps"] += 1
            state["consecutive_skips"] += 1
        elif self.nonfinite != "zero":  # zero mode's run of skips is counted on the device
            state["consecutive_skips"] = 0

    def _aux_step(self) -> None:
        """CompressAI's auxiliary step on the entropy bottlenecks' quantiles, in every mode. A non-finite auxiliary
        loss's gradient is zeroed on the device (no synchronisation): its Adam step then runs on a zero gradient,
        so the moments decay and the quantiles move by the momentum alone (before, skip mode took no step)."""
        if self.aux_optimizer is None:
            return
        aux_loss = self.model.aux_loss()
        aux_loss.backward()
        aux_params = [p for g in self.aux_optimizer.param_groups for p in g["params"]]
        _zero_unless(torch.isfinite(aux_loss.detach()), aux_params)
        self.aux_optimizer.step()
        self.aux_optimizer.zero_grad(set_to_none=True)

    def _read_device_skips(self) -> None:
        """zero mode: the device's counts of non-finite steps into self.state (one synchronisation)."""
        if self.nonfinite != "zero":
            return
        new, run = (int(v) for v in torch.stack([self.device_skips, self.device_consecutive]).tolist())
        self.state["skipped_steps"] += new
        self.state["consecutive_skips"] = run
        self.device_skips.zero_()

    def _stop_if_stuck(self) -> None:
        state = self.state
        if state["consecutive_skips"] >= self.cfg.train.max_consecutive_skips:
            self.metrics.close()
            kept = (f"the last good checkpoint {self.ckpt_path} is kept" if self.ckpt_path.exists()
                    else "no checkpoint yet")
            raise LictrainError(
                f"stopped at step {state['step']}: {state['consecutive_skips']} consecutive steps with a non-finite "
                f"loss or gradient ({kept}); try a lower optim.lr or train.clip_max_norm")

    def _write_train_log(self, window: dict, logs: dict, bar, grad_norm: torch.Tensor) -> None:
        # skipped steps are the same on every rank, so the windows have equal lengths
        means = self.dist.mean(torch.stack([torch.stack(v).nanmean() for v in window.values()]))
        mean = dict(zip(window, means.tolist()))
        record = {"kind": "train", "step": self.state["step"], "loss": mean["loss"], "bpp": mean["bpp"],
                  "psnr": psnr_from_mse(mean["mse"]), "grad_norm": float(grad_norm),
                  "lr": self.optimizer.param_groups[0]["lr"], "skipped_steps": self.state["skipped_steps"], **logs}
        if self.scaler is not None:
            record.update(loss_scale=self.scaler.get_scale(), scale_backoffs=self.state["scale_backoffs"])
        self.metrics.write(record)
        if log.isEnabledFor(logging.DEBUG):  # -v: the training line the progress bar shows, kept in the log
            log.debug("step %7d  train loss %.4f  bpp %.4f  PSNR %.2f dB  grad norm %.3g  lr %.2e%s",
                      record["step"], record["loss"], record["bpp"], record["psnr"], record["grad_norm"], record["lr"],
                      f"  skipped {record['skipped_steps']}" if record["skipped_steps"] else "")
        bar.set_postfix(loss=f"{mean['loss']:.3f}", bpp=f"{mean['bpp']:.3f}", psnr=f"{record['psnr']:.2f}",
                        lr=f"{record['lr']:.1e}")

    def fit(self) -> RunResult:
        cfg, state, dist, device = self.cfg, self.state, self.dist, self.device
        total = cfg.train.steps
        bar = tqdm(total=total, initial=state["step"], desc="train", dynamic_ncols=True,
                   disable=None if cfg.train.progress and dist.is_main else True)
        if dist.is_main and not bar.disable:
            self.report = bar.write
        last_val: dict = {}
        if state["step"] == 0 and not self.resume:
            last_val = self.validate(step_scheduler=False)  # the untrained starting point of every curve
        # Each rank takes its share of every global batch (data.RunSampler): the same crops one process would see.
        samples = None
        if cfg.data.frames:  # video: sequences of data.frames frames, one crop and flip shared (video/data.py)
            from .video.data import SequenceCrops

            samples = SequenceCrops(self.train_images.sequences, cfg.data.frames, cfg.data.crop, cfg.seed)
        loader = train_loader(self.train_images, cfg.data.crop, cfg.data.batch_size // dist.world, cfg.seed,
                              state["step"], data_workers(cfg.data.workers, device, dist.world), rank=dist.rank,
                              world=dist.world, pin_memory=device.type == "cuda", order=cfg.data.order,
                              dataset=samples)
        batches = iter(loader)
        window: dict[str, list] = {"loss": [], "bpp": [], "mse": []}
        # The method's logs since the last train line: an event between log steps (CMD-LIC's decomposition, an
        # embedding) reaches the next line; per-step values (Balanced R-D's weights) are the latest step's.
        pending: dict = {}
        grad_norm = torch.zeros(())  # the last step's, for the train log
        self.device_consecutive.fill_(state["consecutive_skips"])  # zero mode continues a resumed run's count
        tick = time.perf_counter()
        try:
            with _graceful_interrupt() as interrupt:
                while state["step"] < total and not state["converged_stop"]:
                    result = self.train_step(next(batches).to(device, non_blocking=True))
                    pending.update(result.logs)
                    grad_norm = result.grad_norm
                    bar.update(1)
                    if not result.skipped:
                        terms = result.terms
                        for k, v in (("loss", terms.loss), ("bpp", terms.rate), ("mse", terms.mse)):
                            # zero mode: a non-finite step's terms are left out of the means (NaN, nanmean)
                            v = v.detach()
                            window[k].append(v if self.nonfinite != "zero" else torch.where(result.ok, v, math.nan))
                    boundary = (state["step"] % cfg.train.log_every == 0 or state["step"] % cfg.train.val_every == 0
                                or state["step"] % cfg.train.ckpt_every == 0 or state["step"] == total)
                    # A stop on any rank stops all, decided at boundaries (a collective every step would synchronise)
                    stop_requested = (dist.any([interrupt["stop"]], device)[0] if boundary or not dist.enabled
                                      else False)
                    if boundary or stop_requested:
                        self._read_device_skips()  # zero mode: its device counters, here and only here
                    self._stop_if_stuck()
                    at_end = state["step"] == total or stop_requested
                    if (state["step"] % cfg.train.log_every == 0 or at_end) and window["loss"]:
                        self._write_train_log(window, pending, bar, grad_norm)
                        window, pending = {k: [] for k in window}, {}
                    regular_val = state["step"] % cfg.train.val_every == 0
                    regular_ckpt = state["step"] % cfg.train.ckpt_every == 0
                    if regular_val or regular_ckpt or at_end:
                        _sync(device)
                        state["train_time"] += dist.max(time.perf_counter() - tick, device)  # the slowest rank's time
                        if at_end and not regular_val and state["step"] != total:
                            # Interrupted between validations: the checkpoint first, so that a second Ctrl-C
                            # during this extra validation skips it and loses nothing. The validation is marked:
                            # compared curves leave it out (no extra resolution in Steps-to-anchor).
                            self.save()
                            last_val = self.validate(step_scheduler=False, extra={"interrupted": True})
                        else:
                            if regular_val or at_end:
                                last_val = self.validate(step_scheduler=regular_val, track_best=True)
                            if regular_val and self._stop_converged():
                                at_end = state["converged_stop"] = True
                            if regular_ckpt or at_end:
                                self.save()
                        tick = time.perf_counter()
                    if stop_requested:
                        # (another rank's signal when this one saw none: reported as SIGTERM, torchrun's). How to
                        # continue is the caller's to say: `train --resume` for train, the same command for compare.
                        self.interrupted = interrupt["signal"] or int(signal.SIGTERM)
                        break
        finally:
            bar.close()
            if not self.metrics.closed:
                self.metrics.close()
            self.close()
        return self._finish(last_val)

    def _stop_converged(self) -> bool:
        """train.stop_when_converged: the run so far meets the converged rule (every rank holds the same history)."""
        cfg = self.cfg
        if not (cfg.train.stop_when_converged and cfg.train.schedule == "plateau"):
            return False
        rule = finish_state(self.val_history, "plateau", self.state["step"], cfg.optim.lr)
        if rule.state == "converged":
            self.report(f"step {self.state['step']}: converged ({rule.detail}); stopping before the cap of "
                        f"{cfg.train.steps} steps (train.stop_when_converged)")
        return rule.state == "converged"

    def _finish(self, last_val: dict) -> RunResult:
        state, total = self.state, self.cfg.train.steps
        done_before = self.resume and (state["step"] >= total or state["converged_stop"])
        if not self.saved_any and not done_before:  # train.steps = 0: initial weights
            self.save()
        if not last_val and (self.run_dir / rundir.SUMMARY).exists():  # a finished run resumed: nothing new
            last_val = json.loads((self.run_dir / rundir.SUMMARY).read_text()).get("last_val", {})
        result = RunResult(self.run_dir, state["step"], state["train_time"], state["skipped_steps"],
                           len(self.train_images.skipped), last_val, self.interrupted, state["converged_stop"])
        summary = {"step": result.step, "train_time": result.train_time, "skipped_steps": result.skipped_steps,
                   "skipped_images": [str(p) for p, _ in self.train_images.skipped + self.val_set.skipped],
                   "last_val": last_val, "converged_stop": state["converged_stop"]}
        if self.dist.is_main:
            write_atomic(self.run_dir / rundir.SUMMARY, strict_json(summary, indent=2))
        self.dist.barrier()  # no rank leaves before rank 0 has written the run's last files
        return result
