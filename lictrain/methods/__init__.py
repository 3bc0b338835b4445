"""Training methods, registered by name in lictrain.registry.METHODS (see base.py for the interface).

Each method module registers its classes with @register_method; importing them here fills the registry, in the
order `lictrain list` shows (the standard method first).
"""

from __future__ import annotations

import inspect

from ..errors import LictrainError
from ..registry import METHODS
from .base import Method, StepContext, StepHook
from . import standard, balanced_rd, cmd  # noqa: F401,E402  (registration; order = listing order)


def build_method(name: str, options: dict | None = None) -> Method:
    cls = METHODS.lookup(name)
    options = options or {}
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        valid = ", ".join(sorted(accepted)) or "none"
        raise LictrainError(f"method '{name}' has no option {', '.join(unknown)}; valid options: {valid}")
    return cls(**options)


__all__ = ["METHODS", "Method", "StepContext", "StepHook", "build_method"]
