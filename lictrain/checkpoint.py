"""Checkpoints: the format, loading with clear errors, the model a checkpoint holds. Writing is atomic (io.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn

from .config import RunConfig, config_from_saved
from .errors import LictrainError
from .models import build_model
from .models.quantized_activations import attach_activation_quantizers
from .rundir import checkpoint_file

CHECKPOINT_FORMAT = "lictrain-checkpoint-v1"


def _read(path: str | Path, map_location, mmap: bool = False) -> tuple[Path, object]:
    path = checkpoint_file(path)
    if not path.is_file():
        raise LictrainError(f"checkpoint not found: {path}")
    try:
        return path, torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise LictrainError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None


def checkpoint_dict(config: RunConfig | dict, model: dict, ema: dict | None = None, state: dict | None = None,
                    **training) -> dict:
    """The layout of a lictrain-checkpoint-v1 file, built in one place: the config, the model's weights, the EMA's
    state (or None), the loop's counters, and what else a writer keeps (a resumable checkpoint's optimizers,
    scheduler, scaler, method state and RNG; a W8A8 checkpoint's `ptq` record; an import's source)."""
    return {"format": CHECKPOINT_FORMAT, "config": config.to_dict() if isinstance(config, RunConfig) else config,
            "model": model, "ema": ema, "state": dict(state or {"step": 0}), **training}


class Checkpoint:
    """A lictrain checkpoint read once (a file or a run folder's last one): its config, its training state and
    its model, with the EMA weights or the raw ones. Pipelines that need several of these take one object instead
    of reading the file again for each."""

    def __init__(self, data: dict, path: Path | None = None):
        self.data, self.path = data, path
        self.config = checkpoint_config(data)

    @classmethod
    def load(cls, path: str | Path) -> "Checkpoint":
        return cls(load_checkpoint(path), checkpoint_file(path))

    @property
    def step(self) -> int:
        return int(self.data.get("state", {}).get("step", 0))

    @property
    def ptq(self) -> dict | None:
        return self.data.get("ptq")

    def model(self, use_ema: bool = True) -> nn.Module:
        return model_from_checkpoint(self.data, use_ema)


def is_lictrain_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def load_checkpoint(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    """mmap: the tensors are mapped from the file, read only where used (a look at the config costs no weights)."""
    path, ckpt = _read(path, map_location, mmap)
    if not is_lictrain_checkpoint(ckpt):
        raise LictrainError(f"{path} is not a lictrain checkpoint")
    return ckpt


def read_config(path: str | Path) -> RunConfig:
    """The config a checkpoint was trained with, without reading its weights."""
    return checkpoint_config(load_checkpoint(path, mmap=True))


def load_weights(path: str | Path, map_location="cpu") -> dict | tuple[str, dict]:
    """A lictrain checkpoint (returned as is), or ("state_dict", tensors) for a plain PyTorch state dict: a
    CompressAI model's `state_dict()` as saved by `torch.save`, or such a dict under 'state_dict' or 'model'
    (CompressAI's example training script), with DataParallel's 'module.' prefixes removed."""
    path, obj = _read(path, map_location)
    if is_lictrain_checkpoint(obj):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LictrainError(f"{path} is neither a lictrain checkpoint nor a state dict of tensors")
    return "state_dict", {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_dict_checked(model: nn.Module, state: dict, source: str) -> None:
    """model.load_state_dict, with one line naming the missing and unexpected keys (and shape mismatches)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    # CompressAI resizes the entropy models' derived tables (update() buffers) itself; any other shape must match
    derived = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")
    wrong = [k for k in own if k in state and not k.endswith(derived) and own[k].shape != state[k].shape]

    def names(keys: list[str], shapes: bool = False) -> str:
        shown = [f"{k} {tuple(state[k].shape)} where {type(model).__name__} has {tuple(own[k].shape)}" if shapes
                 else k for k in keys[:4]]
        return ", ".join(shown) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

    problems = [f"{label} {names(keys, label == 'wrong shape')}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    if problems:
        raise LictrainError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state)


def checkpoint_config(ckpt: dict) -> RunConfig:
    """The run's config; keys added since it was saved take what they meant then (data.order: the shuffle)."""
    return config_from_saved(ckpt["config"])


def model_from_checkpoint(ckpt: dict, use_ema: bool = True) -> nn.Module:
    """The trained model (EMA weights when the run kept an EMA and use_ema), in eval mode on the CPU."""
    cfg = checkpoint_config(ckpt)
    model = build_model(cfg.model.name, cfg.model.preset, cfg.model.kwargs)
    state = ckpt["ema"]["model"] if (use_ema and ckpt.get("ema")) else ckpt["model"]
    model.load_state_dict(state)
    if ckpt.get("ptq"):  # a W8A8 checkpoint (lictrain ptq): its weights are int8 x scale; quantize the activations
        attach_activation_quantizers(model, ckpt["ptq"]["layers"])
    return model.eval()


def weights_fingerprint(model: nn.Module) -> bytes:
    """8 bytes identifying the weights, so a bitstream is never decoded with a different model."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.endswith(("_quantized_cdf", "_offset", "_cdf_length", "scale_table")):
            continue  # derived by update(): not part of the trained weights
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.digest()[:8]


def import_weights(weights: str | Path, model: str, preset: str, out: str | Path, lmbda: float, metric: str = "mse",
                   kwargs: dict | None = None) -> Path:
    """A lictrain checkpoint (for eval, compress, analyze, ptq, or train.init_from) made from weights trained
    elsewhere: a plain state dict of the model, in lictrain's names or, for the models with a key map, in the
    public code's (lictrain/models/public_weights.py). `lmbda` and `metric` record what the weights were trained
    for (evaluation reports them)."""
    from .config import load_config
    from .io import save_atomic
    from .models import canonical_name
    from .models.public_weights import from_public

    loaded = load_weights(weights)
    if not isinstance(loaded, tuple):
        raise LictrainError(f"{weights} is already a lictrain checkpoint")
    name = canonical_name(model)
    built = build_model(name, preset, kwargs)
    state = from_public(name, loaded[1])
    # the coder's tables and bounds that update() derives or the constructor sets, where the weights lack them
    derived = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table", "scale_bound", ".bound")
    state = {**{k: v for k, v in built.state_dict().items() if k.endswith(derived) and k not in state}, **state}
    load_state_dict_checked(built, state, f"{weights} (as {name}, preset {preset})")
    cfg = load_config(None, base={"model": {"name": name, "preset": preset, "kwargs": dict(kwargs or {})},
                                  "loss": {"lmbda": float(lmbda), "metric": metric}, "run_dir": str(Path(out).parent)})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(checkpoint_dict(cfg, built.state_dict(), imported_from=str(weights)), out)
    return out


def export_weights(checkpoint: str | Path, out: str | Path, use_ema: bool = True) -> dict:
    """A plain state dict of the checkpoint's model (EMA weights by default) with its entropy coder's tables built
    (CompressAI's update(), on the CPU in full fp32 as lictrain's coder builds them), for the model's own class
    outside lictrain: for CompressAI's architectures, `compressai.models.<Class>(**arguments).load_state_dict(...)`
    then compress/decompress as in CompressAI's zoo. Returns what to build it with."""
    from .coding import coding_numerics
    from .io import save_atomic
    from .models import get_spec, is_import_path

    ckpt = Checkpoint.load(checkpoint)
    if ckpt.ptq:
        raise LictrainError(f"{checkpoint} is a W8A8 checkpoint (lictrain ptq): its activation quantizers are not "
                            "part of a state dict; export the float checkpoint")
    cfg = ckpt.config
    model = ckpt.model(use_ema)
    with coding_numerics(torch.device("cpu")):
        model.update(force=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    save_atomic(state, Path(out))
    cls = type(model)
    arguments = dict(cfg.model.kwargs) if is_import_path(cfg.model.name) else {
        **get_spec(cfg.model.name).presets[cfg.model.preset], **cfg.model.kwargs}
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "arguments": arguments, "tensors": len(state),
            "weights": "EMA" if use_ema and ckpt.data.get("ema") else "raw", "lmbda": cfg.loss.lmbda}
