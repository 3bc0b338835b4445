"""The plug-in registries: models, optimizers, optimizer wrappers, training methods and recipes.

Each is a name -> entry mapping filled where the plug-in is defined, by a decorator (or the same call on a class
from another library):

    @register_method("balanced-rd")
    class BalancedRD(Method): ...

    register_optimizer("adam", defaults=dict(betas=(0.9, 0.999)), description="Adam")(torch.optim.Adam)

A registry fills when the package that defines its plug-ins is imported (lictrain.models, lictrain.optim,
lictrain.methods, lictrain.recipes), as their build functions do. Entries keep registration order (it is the order `lictrain list` shows), a name is registered once, and looking up
an unknown name is a one-line error that lists the valid ones. This module imports nothing else of lictrain but
its error type, so any module may register without creating an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import LictrainError


class Registry(dict):
    """A dict of name -> entry with a one-line error for unknown names (`lookup`)."""

    def __init__(self, kind: str, plural: str | None = None):
        super().__init__()
        self.kind, self.plural = kind, plural or kind + "s"

    def add(self, name: str, entry: Any) -> Any:
        if name in self:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self[name] = entry
        return entry

    def lookup(self, name: str) -> Any:
        if name not in self:
            raise LictrainError(f"unknown {self.kind} '{name}'; valid {self.plural}: {', '.join(self) or 'none yet'}")
        return self[name]


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., Any]  # build(**preset) -> nn.Module
    presets: dict[str, dict]
    downsampling: int  # input sides must be multiples of this (the coarsest latent's stride)
    description: str
    frames: int = 0  # video models: the frames a training sample needs (data.frames); 0: an image model


@dataclass(frozen=True)
class OptimizerSpec:
    cls: Callable[..., Any]  # cls(params, lr=..., **defaults) -> torch.optim.Optimizer
    defaults: dict = field(default_factory=dict)
    description: str = ""
    # Capabilities: what the loop, CMD-LIC and the probes ask the record, never a class or a name.
    coordinate_state: tuple = ()  # state buffers with one entry per parameter entry (CMD-LIC zeroes embedded ones)
    preview: str | None = None  # how the conflict probe previews an update: adam | sgd | precondition; None: it cannot
    checks_finite: bool = False  # checks its gradients' finiteness itself (`check_finite`); the loop already does
    kernel_groups: bool = False  # needs kernel / non-kernel parameter groups even without weight decay (Muon)


MODELS = Registry("model")
OPTIMIZERS = Registry("optimizer")
WRAPPERS = Registry("optimizer wrapper")  # name -> wrapper(optimizer, **options); used as "base+name"
METHODS = Registry("method")
RECIPES = Registry("recipe")  # name -> {config key: value}


def register_model(name: str, presets: dict[str, dict], downsampling: int, description: str, frames: int = 0):
    """Register a model builder (a class or function taking a preset's keyword arguments); `frames` > 0 for a
    video model (the frames each training sample needs)."""

    def decorate(build):
        MODELS.add(name, ModelSpec(build, presets, downsampling, description, frames))
        return build

    return decorate


def register_optimizer(name: str, defaults: dict | None = None, description: str = "", **capabilities):
    """Register an optimizer class with its defaults and capabilities (OptimizerSpec's fields)."""
    def decorate(cls):
        OPTIMIZERS.add(name, OptimizerSpec(cls, dict(defaults or {}), description, **capabilities))
        return cls

    return decorate


def register_wrapper(name: str):
    def decorate(wrapper):
        WRAPPERS.add(name, wrapper)
        return wrapper

    return decorate


def register_method(name: str):
    def decorate(cls):
        METHODS.add(name, cls)
        return cls

    return decorate


def register_recipe(name: str, overrides: dict) -> None:
    """A named set of config overrides (`lictrain train --recipe NAME`, `compare.recipes`)."""
    RECIPES.add(name, dict(overrides))
