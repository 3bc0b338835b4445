"""The Python API: what the command line does, as functions (also reachable as `lictrain.train`, ...).

    import lictrain

    result = lictrain.train("demo", overrides=["train.steps=200", "run_dir=runs/api"])   # a config name, path or dict
    summary = lictrain.evaluate([result.run_dir], "samples:val", "runs/api/eval")       # real bitstreams
    model = lictrain.build_model("mbt2018-mean", "small")
    optimizer = lictrain.build_optimizer(model, "soap", lr=1e-4)  # the entropy bottlenecks' quantiles left out

Everything here is a thin layer over the modules the command line uses; the config keys are the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

from . import evaluation as _evaluate
from . import optim as _optim
from .config import RunConfig, config_from_dict, load_config, parse_override, set_key, validate
from .models import build_model
from .trainer import RunResult
from .trainer import train as _train

__all__ = ["train", "evaluate", "build_model", "build_optimizer", "load_config", "make_config"]


def make_config(config: RunConfig | dict | str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """A checked RunConfig from a RunConfig, a dict of config sections, a YAML path or a built-in config's name,
    then `key=value` overrides (as `--set`)."""
    overrides = list(overrides)
    if isinstance(config, RunConfig):
        cfg = config_from_dict(config.to_dict())
        for text in overrides:
            set_key(cfg, *parse_override(text))
        validate(cfg)
        return cfg
    if isinstance(config, dict):
        return load_config(None, overrides, base=config)
    return load_config(None if config is None else str(config), overrides)


def train(config: RunConfig | dict | str | Path | None = None, overrides: Iterable[str] = (),
          resume: bool = False, model: nn.Module | None = None) -> RunResult:
    """Train (or, with resume=True, continue) one run; returns its RunResult (run_dir, step, train_time, last_val).

    `model`: a CompressAI compression model you built (any class with forward -> x_hat/likelihoods and aux_loss()),
    trained in place under the config's data, optimizer, method and schedule instead of the config's registered
    model. Its checkpoints hold its state dict (load it with model.load_state_dict(torch.load(...)["model"])) and
    name it `custom`: `lictrain eval` cannot rebuild an unregistered class (register it with
    lictrain.registry.register_model to get the command line's evaluation). Resuming needs the same model again."""
    return _train(make_config(config, overrides), resume=resume, model=model)


def evaluate(checkpoints: list[str | Path], data: str, out_dir: str | Path, **options) -> dict:
    """Real compress/decompress of every image of `data` with each checkpoint (one R-D point each); writes
    per_image.csv and results.json (CompressAI's format) into out_dir and returns the summary."""
    return _evaluate.evaluate(checkpoints, data, out_dir, **options)


def build_optimizer(model_or_params: nn.Module | Iterable[torch.Tensor], name: str = "adam", lr: float = 1e-4,
                    **options) -> torch.optim.Optimizer:
    """An optimizer from lictrain's registry ('adam', 'soap', 'soap+sma', ...). Given a model, its trainable
    parameters without the entropy bottlenecks' quantiles (those belong to CompressAI's auxiliary optimizer), with
    weight decay (and Muon) on the convolution and linear kernels only."""
    if isinstance(model_or_params, nn.Module):
        params = [p for _, p in _optim.split_parameters(model_or_params)[0]]
        kernels = _optim.kernel_parameters(model_or_params)
    else:
        params, kernels = list(model_or_params), None
    return _optim.build_optimizer(name, params, lr, options, kernels=kernels)
