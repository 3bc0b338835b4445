"""Run configuration: typed dataclasses, loaded from YAML plus `--set key=value` overrides.

Every key a user can write is a dataclass field below, so an unknown key or a value of the wrong type is caught
before anything runs, with a one-line error naming the key and listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import LictrainError

LAMBDAS_MSE = (0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483)  # CompressAI's six quality points (MSE)


def setting(default: Any = dataclasses.MISSING, *, factory: Any = None, identity: bool = True, resume: bool = False,
            absent: Any = dataclasses.MISSING, unused_if: Any = None) -> Any:
    """A config field that carries its own policy (read by identity() and check_resume()):
    - identity: the value changes what a run computes, so it is part of the run's identity (compare reuses a stored
      run only when its identity matches);
    - resume: the value may change when a run is resumed (how long it runs and how it is watched, not what a step
      computes);
    - absent: what a config written before this key existed meant (a saved checkpoint's config without it). By
      default the default; a key whose default changes must pin its old default here, so that stored runs keep
      their meaning and their identity (tests/test_config.py checks the pins against tests/data/config_baselines.json);
    - unused_if: a function of the config saying when the key has no effect (a fixed schedule's shape under the
      plateau scheduler): then it is neither identity nor a reason to refuse a resume.
    A section (a dataclass field of RunConfig) may carry identity/resume for all its keys."""
    meta = {"identity": identity, "resume": resume, "unused_if": unused_if}
    if absent is not dataclasses.MISSING:
        meta["absent"] = absent
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = "mbt2018-mean"  # a registered model (lictrain list) or an import path package.module:ClassName
    preset: str = "tiny"
    kwargs: dict = field(default_factory=dict)  # constructor arguments: override a preset's, or build an import path


@dataclass
class DataConfig:
    train: str = "samples:train"  # a folder of images, or samples / samples:train / samples:val
    val: str = "samples:val"
    crop: int = 256  # training crop side (images smaller than this are reflection-padded)
    batch_size: int = 8
    val_crop: int | None = None  # centre-crop validation images to this side (None: whole images)
    val_max_images: int | None = None  # validate on the first N images only (None: all)
    workers: int | None = setting(None, identity=False, resume=True)  # DataLoader worker processes; None: 0 on the CPU, up to 8 per process on CUDA
    # which image each training sample crops: iid (drawn uniformly for every sample) or shuffle (a fresh permutation
    # every epoch, as DataLoader(shuffle=True)). iid by measurement: on a small training set (the benchmark's 136
    # photos) it trains Adam 8-12% better at three of four lambdas (within noise at the fourth); on a large one
    # the two agree. See README, "Data order"
    order: str = setting("iid", absent="shuffle")  # configs saved before this key trained on the shuffle
    cache_mb: int = setting(2048, identity=False, resume=True)  # decode training images once and keep them in RAM when they fit in this budget
    # video (a P-frame model such as dcvc): 0 trains on images; N >= 2 on sequences of N consecutive frames (train/val
    # name Vimeo-90k roots, ROOT[train] / ROOT[test], or folders of frame folders; lictrain/video/data.py)
    frames: int = 0


@dataclass
class LossConfig:
    lmbda: float = 0.0130
    metric: str = "mse"  # mse | ms-ssim


@dataclass
class OptimConfig:
    name: str = "adam"  # see lictrain.optim.OPTIMIZERS
    lr: float = 1e-4
    options: dict = field(default_factory=dict)  # extra keyword arguments for the optimizer (betas, weight_decay, ...)
    aux_lr: float = 1e-3  # Adam on the entropy bottlenecks' quantiles (CompressAI's auxiliary loss)


@dataclass
class MethodConfig:
    name: str = "standard"  # see lictrain.methods.METHODS
    options: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    steps: int = setting(2000, resume=True)
    clip_max_norm: float = 1.0  # 0 disables clipping (the norm is still checked for NaN/Inf)
    ema_decay: float = 0.999  # 0 disables the EMA; validation and the saved model use the EMA weights
    warmup_steps: int = 0  # linear learning-rate warm-up
    # fine-tune: start from this checkpoint's (EMA) weights (file or run folder), or from a plain state-dict file
    init_from: str | None = None
    # what init_from carries over: "weights" (its EMA weights when it kept one; fresh optimizer) or
    # "weights+optimizer" (its raw weights with the optimizer moments that belong to them; same optimizer needed)
    init_state: str = "weights"
    val_every: int = setting(100, resume=True)
    ckpt_every: int = setting(500, resume=True)
    log_every: int = setting(10, resume=True)  # training-loss lines in metrics.jsonl
    schedule: str = "plateau"  # plateau | cosine | step (lictrain/schedule.py)
    # cosine/step: the decay begins at this fraction of train.steps; the last step's lr is lr0 times final_lr_factor
    decay_start: float = setting(0.8, unused_if=lambda cfg: cfg.train.schedule == "plateau")
    final_lr_factor: float = setting(0.1, unused_if=lambda cfg: cfg.train.schedule == "plateau")
    plateau_patience: int = 10  # ReduceLROnPlateau on the validation loss, counted in validations
    plateau_factor: float = 0.5
    # the relative improvement of the validation loss that counts as one (torch's default 1e-4): a larger one cuts the
    # LR once progress is slower than that per validation (configs/converge.yaml)
    plateau_threshold: float = 1e-4
    min_lr: float = 0.0
    # plateau: end the run at the first validation at which it meets the converged rule (lictrain/schedule.py) rather
    # than at train.steps, which becomes a cap; a cut-short run counts as finished (compare evaluates it)
    stop_when_converged: bool = setting(False, resume=True, unused_if=lambda cfg: cfg.train.schedule != "plateau")
    max_consecutive_skips: int = setting(10, resume=True)  # stop after this many non-finite steps in a row
    # GPU path (lictrain/precision.py). precision: fp32 | bf16 | fp16 (autocast for the transforms; parameters,
    # gradients, optimizer states and the entropy models stay fp32; fp16 adds a GradScaler, standard method only)
    precision: str = "fp32"
    tf32: bool = True  # TF32 for fp32 convolutions and matrix products on CUDA (SOAP's own products stay full fp32)
    # deterministic algorithms (cuDNN, cuBLAS, attention): a resumed run repeats the uninterrupted one bit for bit on
    # CUDA too, at some speed (see README, "Exact resume"); an op with no deterministic form raises
    deterministic: bool = setting(False, resume=True)
    compile: bool | str = setting(False, resume=True)  # torch.compile the model's training forward: true (inductor) or a backend name
    # what a non-finite loss or gradient does: skip (the step is not taken; one host synchronisation per step) or
    # zero (decided on the device: the gradient is zeroed, so the optimizer takes a step on a zero gradient, and
    # the count is read at log steps: no synchronisation); auto: zero on CUDA with the standard method, else skip
    nonfinite: str = "auto"
    tensorboard: bool = setting(False, identity=False, resume=True)
    progress: bool = setting(True, identity=False, resume=True)  # progress bar (only drawn on a terminal)


@dataclass
class ProbeConfig:
    """Read-only measurements during training, logged as `kind: probe` lines of metrics.jsonl (0 = off)."""

    conflicts_every: int = 0  # intra/inter-step cosines of the optimizer's updates (lictrain.probes.conflicts)
    conflicts_per_layer: bool = False
    outliers_every: int = 0  # Kurt / MaxMed of the latent on a fixed validation batch (lictrain.probes.outliers)
    outliers_images: int = 4  # the first N validation images (centre-cropped to data.val_crop when set)


@dataclass
class CompareConfig:
    """`lictrain compare`: every recipe at every lambda and seed, from the same initial weights and data order."""

    recipes: list = field(default_factory=lambda: ["adam", "soap"])  # the first one is the anchor
    recipe_sets: dict = field(default_factory=dict)  # custom recipes: name -> {config key: value}
    lambdas: list = field(default_factory=lambda: [0.0130])
    # a recipe's own lambda grid, for recipes that move the rate-distortion balance (Balanced R-D): chosen so that its
    # bpp range overlaps the anchor's; BD-rate is then reported over the overlap, Steps/Time-to-anchor only where the
    # anchor ran the same lambda
    lambdas_for: dict = field(default_factory=dict)
    seeds: list = field(default_factory=lambda: [0])
    eval_data: list = field(default_factory=lambda: ["samples:val"])  # folders (or samples specs) for BD-rate
    eval_max_images: int | None = None
    bd_method: str = "akima"  # akima | pchip
    # the field's anchors on every R-D plot and in a BD-rate table: classical codecs measured on each evaluation set
    # (lictrain anchors --list), and published curves (vtm, bpg, ...: where published on the same set) or results
    # files (.json, CompressAI's format)
    codecs: list = field(default_factory=lambda: ["jpeg"])
    references: list = field(default_factory=list)


@dataclass
class RunConfig:
    run_dir: str = setting("runs/default", identity=False, resume=True)
    seed: int = 0
    device: str = setting("auto", resume=True)  # auto | cpu | cuda | cuda:N
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # read-only measurements, and what compare does with runs: neither changes what a run computes
    probe: ProbeConfig = setting(factory=ProbeConfig, identity=False, resume=True)
    compare: CompareConfig = setting(factory=CompareConfig, identity=False, resume=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def valid_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """All dotted keys a config may set, e.g. ['run_dir', ..., 'optim.lr', ...]."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys += valid_keys(t, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _policies(cls: type = RunConfig, prefix: str = "", inherited: dict | None = None) -> dict[str, dict]:
    """Every dotted key's policy: {identity, resume, baseline} (setting()'s metadata, a section's for its keys)."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = {"identity": True, "resume": False, "unused_if": None, **(inherited or {}),
                **{k: v for k, v in f.metadata.items() if k in ("identity", "resume", "unused_if")}}
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(_policies(t, prefix + f.name + ".", meta))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[prefix + f.name] = {**meta, "baseline": f.metadata.get("absent", default), "pinned": "absent" in f.metadata}
    return out


POLICIES = _policies()


def get_key(cfg: RunConfig, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _canonical(key: str, value: Any) -> Any:
    """A value as identity compares it: a data spec by the alternative in use, in its first spelling."""
    if key in ("data.train", "data.val") and isinstance(value, str):
        from .data import active_spec, canonical_split_spelling

        return canonical_split_spelling(active_spec(value))
    return value


def identity(cfg: RunConfig) -> dict:
    """What makes a run what it is: every identity key whose value differs from its baseline (so a key added later,
    at its default, leaves every stored run's identity as it was)."""
    out = {}
    for key, policy in POLICIES.items():
        if not policy["identity"] or (policy["unused_if"] and policy["unused_if"](cfg)):
            continue
        value = _canonical(key, get_key(cfg, key))
        if value != _canonical(key, policy["baseline"]):
            out[key] = value
    return out


def identity_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(identity(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]


def resumable_keys() -> list[str]:
    return sorted(k for k, p in POLICIES.items() if p["resume"] and not k.startswith(("compare.", "probe.")))


def check_resume(saved: RunConfig, new: RunConfig) -> None:
    """A resumed run continues the computation its checkpoint began: only keys marked resume may differ."""
    same = lambda a, b: json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)  # noqa: E731
    for key, policy in POLICIES.items():
        unused = policy["unused_if"] and policy["unused_if"](saved) and policy["unused_if"](new)
        if policy["resume"] or unused:
            continue
        before, after = _canonical(key, get_key(saved, key)), _canonical(key, get_key(new, key))
        if not same(before, after):  # a tuple and the list YAML gives for it are the same value
            raise LictrainError(f"'{key}' cannot change when resuming (the checkpoint was made with {before!r}, "
                                f"asked {after!r}); keys that can: {', '.join(resumable_keys())} (and probe.*, "
                                "compare.*)")


def config_from_saved(d: dict) -> RunConfig:
    """The config of a saved run: keys it lacks (written before they existed) take what they meant then."""
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    for key, policy in POLICIES.items():
        if policy["pinned"]:
            section, _, name = key.rpartition(".")
            holder = d.setdefault(section, {}) if section else d
            holder.setdefault(name, policy["baseline"])
    return config_from_dict(d)


def _coerce(value: Any, t: Any, key: str) -> Any:
    """Check `value` against the annotation `t`; ints are accepted where floats are expected."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except LictrainError:
                pass
        raise LictrainError(f"config key '{key}': {value!r} is not a valid {t}")
    if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if t is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if t is bool and isinstance(value, bool):
        return value
    if t is str and isinstance(value, str):
        return value
    if t is dict and isinstance(value, dict):
        return value
    if t is list and isinstance(value, (list, tuple)):
        return list(value)
    name = getattr(t, "__name__", str(t))
    raise LictrainError(f"config key '{key}': {value!r} is not a valid {name}")


def unknown_key_message(key: str) -> str:
    """The closest valid keys, else the keys of its section, else the sections (`lictrain list` shows all keys)."""
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    guess = f" did you mean {' or '.join(close)}?" if close else ""
    section = key.split(".")[0] + "."
    same = [k for k in keys if k.startswith(section)]
    if same:
        return f"unknown config key '{key}';{guess} keys of {section[:-1]}: {', '.join(same)}"
    if close:
        return f"unknown config key '{key}';{guess}"
    return (f"unknown config key '{key}'; top-level keys: {', '.join(sorted({k.split('.')[0] for k in keys}))} "
            "(lictrain list shows every key)")


def _apply(cfg: Any, data: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for k, v in data.items():
        key = prefix + str(k)
        if k not in names:
            raise LictrainError(unknown_key_message(key))
        t = hints[k]
        if dataclasses.is_dataclass(t):
            if not isinstance(v, dict):
                raise LictrainError(f"config key '{key}' must be a mapping of {', '.join(valid_keys(t))}")
            _apply(getattr(cfg, k), v, key + ".")
        else:
            setattr(cfg, k, _coerce(v, t, key))


def set_key(cfg: RunConfig, key: str, value: Any) -> None:
    """Set one dotted key, e.g. set_key(cfg, 'optim.lr', 2e-4). A key that goes into a mapping field
    ('optim.options.betas') changes that entry only; the mapping's other entries stay."""
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts[:-1]):
        field_value = getattr(obj, part, None) if dataclasses.is_dataclass(obj) else None
        if isinstance(field_value, dict):
            if part not in {f.name for f in dataclasses.fields(obj)}:
                break
            target = field_value
            for sub in parts[i + 1 : -1]:
                target = target.setdefault(sub, {})
                if not isinstance(target, dict):
                    raise LictrainError(f"config key '{key}': '{sub}' is not a mapping")
            target[parts[-1]] = value
            return
        if not dataclasses.is_dataclass(field_value):
            break
        obj = field_value
    nested: dict = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        nested = {p: nested}
    _apply(cfg, nested)


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=2e-4' -> ('optim.lr', 0.0002); values are read as YAML scalars."""
    if "=" not in text:
        raise LictrainError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), _yaml_numbers(value)


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the package; configs/ in the checkout links here


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of one of lictrain's own configs ('demo', 'mini', 'bench', ...)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    raise LictrainError(f"config not found: {name_or_path}")


def load_config(path: str | None = None, overrides: list[str] | tuple = (), base: dict | None = None) -> RunConfig:
    """Defaults, then `base`, then the YAML file, then `--set` overrides, each checked."""
    cfg = RunConfig()
    if base:
        _apply(cfg, base)
    if path is not None:
        p = resolve_config_path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except UnicodeDecodeError:
            raise LictrainError(f"config {p} is not a text file") from None
        except yaml.YAMLError as e:
            raise LictrainError(f"config {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise LictrainError(f"config {p} must be a mapping of keys to values")
        data = {k: _yaml_numbers(v) for k, v in data.items()}
        _apply(cfg, data)
    for o in overrides:
        key, value = parse_override(o)
        set_key(cfg, key, value)
    validate(cfg)
    return cfg


def _yaml_numbers(v: Any) -> Any:
    """YAML 1.1 reads '1e-4' (no dot) as a string; read such strings as the numbers users meant."""
    if isinstance(v, dict):
        return {k: _yaml_numbers(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_yaml_numbers(x) for x in v]
    if isinstance(v, str) and _looks_numeric(v) and any(c in v for c in "eE") and "inf" not in v.lower():
        return float(v)
    return v


def _codec_names() -> list[str]:
    from .anchors.codecs import CODECS

    return list(CODECS)


def _supports_loss_scaling(method: str) -> bool:
    """The method's own flag (methods/base.py); an unknown name passes here and fails where the method is built."""
    from .methods import METHODS

    return getattr(METHODS.get(method), "supports_loss_scaling", True)


def validate(cfg: RunConfig) -> None:
    """Range checks that types alone cannot express."""
    own_grid = cfg.compare.lambdas_for if isinstance(cfg.compare.lambdas_for, dict) else {}
    checks = [
        (cfg.train.precision != "fp16" or _supports_loss_scaling(cfg.method.name),
         f"train.precision=fp16 needs loss scaling, which the standard method supports and the {cfg.method.name} "
         "method does not (its update is not the backward of one loss): use bf16"),
        (cfg.data.crop >= 16, "data.crop must be at least 16"),
        (cfg.data.batch_size >= 1, "data.batch_size must be at least 1"),
        (cfg.data.workers is None or cfg.data.workers >= 0, "data.workers must be >= 0"),
        (cfg.data.order in ("shuffle", "iid"), f"data.order must be shuffle or iid, got '{cfg.data.order}'"),
        (cfg.loss.lmbda > 0, "loss.lmbda must be positive"),
        (cfg.loss.metric in ("mse", "ms-ssim"), f"loss.metric must be mse or ms-ssim, got '{cfg.loss.metric}'"),
        (cfg.loss.metric != "ms-ssim" or cfg.data.crop >= 161, "loss.metric ms-ssim needs data.crop >= 161"),
        (cfg.optim.lr > 0, "optim.lr must be positive"),
        (cfg.optim.aux_lr > 0, "optim.aux_lr must be positive"),
        (cfg.data.val_max_images is None or cfg.data.val_max_images >= 1, "data.val_max_images must be at least 1"),
        (cfg.data.val_crop is None or cfg.data.val_crop >= 16, "data.val_crop must be at least 16"),
        (cfg.train.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (cfg.train.init_state in ("weights", "weights+optimizer"),
         "train.init_state must be weights or weights+optimizer"),
        (cfg.compare.eval_max_images is None or cfg.compare.eval_max_images >= 1,
         "compare.eval_max_images must be at least 1"),
        (cfg.train.steps >= 0, "train.steps must be >= 0"),
        (cfg.train.val_every >= 1, "train.val_every must be at least 1"),
        (cfg.train.ckpt_every >= 1, "train.ckpt_every must be at least 1"),
        (cfg.train.log_every >= 1, "train.log_every must be at least 1"),
        (0 <= cfg.train.ema_decay < 1, "train.ema_decay must be in [0, 1)"),
        (cfg.train.clip_max_norm >= 0, "train.clip_max_norm must be >= 0"),
        (cfg.data.frames == 0 or cfg.data.frames >= 2,
         f"data.frames must be 0 (images) or at least 2 (a reference and a frame to code), got {cfg.data.frames}"),
        (cfg.data.frames == 0 or cfg.data.order == "iid",
         "video samples (data.frames) are drawn iid: data.order=shuffle is for images"),
        (0 < cfg.train.plateau_factor < 1, "train.plateau_factor must be in (0, 1)"),
        (0 <= cfg.train.plateau_threshold < 1, "train.plateau_threshold must be in [0, 1)"),
        (cfg.train.schedule in ("plateau", "cosine", "step"),
         f"train.schedule must be plateau, cosine or step, got '{cfg.train.schedule}'"),
        (0 <= cfg.train.decay_start < 1, "train.decay_start must be in [0, 1)"),
        (0 < cfg.train.final_lr_factor <= 1, "train.final_lr_factor must be in (0, 1]"),
        (cfg.train.precision in ("fp32", "bf16", "fp16"),
         f"train.precision must be fp32, bf16 or fp16, got '{cfg.train.precision}'"),
        (cfg.train.nonfinite in ("auto", "skip", "zero"),
         f"train.nonfinite must be auto, skip or zero, got '{cfg.train.nonfinite}'"),
        (cfg.train.max_consecutive_skips >= 1, "train.max_consecutive_skips must be at least 1"),
        (cfg.probe.conflicts_every >= 0 and cfg.probe.outliers_every >= 0, "probe intervals must be >= 0"),
        (cfg.probe.outliers_images >= 1, "probe.outliers_images must be at least 1"),
        (len(cfg.compare.recipes) >= 1, "compare.recipes needs at least one recipe (the anchor)"),
        (all(isinstance(x, (int, float)) and x > 0 for x in cfg.compare.lambdas), "compare.lambdas must be positive"),
        (all(isinstance(x, int) for x in cfg.compare.seeds), "compare.seeds must be integers"),
        (isinstance(cfg.compare.lambdas_for, dict) and all(
            isinstance(v, list) and v and all(isinstance(x, (int, float)) and x > 0 for x in v)
            for v in cfg.compare.lambdas_for.values()),
         "compare.lambdas_for maps a recipe to a list of positive lambdas, e.g. {balanced-rd: [0.004, 0.008]}"),
        (not set(own_grid) - set(cfg.compare.recipes),
         f"compare.lambdas_for names recipes not in compare.recipes: "
         f"{', '.join(sorted(set(own_grid) - set(cfg.compare.recipes)))}"),
        (not cfg.compare.recipes or cfg.compare.recipes[0] not in own_grid,
         "compare.lambdas_for cannot give the anchor (the first recipe) its own grid: set compare.lambdas"),
        (cfg.compare.bd_method in ("akima", "pchip"), "compare.bd_method must be akima or pchip"),
        (all(c in _codec_names() for c in cfg.compare.codecs),
         f"compare.codecs: unknown codec in {cfg.compare.codecs}; codecs: {', '.join(_codec_names())}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise LictrainError(msg)


def config_from_dict(d: dict) -> RunConfig:
    cfg = RunConfig()
    _apply(cfg, d)
    return cfg


def dump_config(cfg: RunConfig, path: Path) -> None:
    from .io import write_atomic

    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
