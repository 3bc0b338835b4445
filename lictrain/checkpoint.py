"""Checkpoints: the format, loading with clear errors, the model a checkpoint holds. Writing is atomic (io.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn

from .config import RunConfig, config_from_dict
from .errors import LictrainError
from .models import build_model

CHECKPOINT_FORMAT = "lictrain-checkpoint-v1"


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise LictrainError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise LictrainError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise LictrainError(f"{path} is not a lictrain checkpoint")
    return ckpt


def checkpoint_config(ckpt: dict) -> RunConfig:
    return config_from_dict(ckpt["config"])


def model_from_checkpoint(ckpt: dict, use_ema: bool = True) -> nn.Module:
    """The trained model (EMA weights when the run kept an EMA and use_ema), in eval mode on the CPU."""
    cfg = checkpoint_config(ckpt)
    model = build_model(cfg.model.name, cfg.model.preset)
    state = ckpt["ema"]["model"] if (use_ema and ckpt.get("ema")) else ckpt["model"]
    model.load_state_dict(state)
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
