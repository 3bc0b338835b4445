"""Training methods, registered by name in lictrain.registry.METHODS (see base.py for the interface).

Each method module registers its classes with @register_method; importing them here fills the registry, in the
order `lictrain list` shows (the standard method first).
"""

from __future__ import annotations

import inspect

from ..errors import LictrainError
from ..registry import METHODS
from .base import Method, RunContext, StepContext, StepHook
from . import standard, balanced_rd, cmd  # noqa: F401,E402  (registration; order = listing order)


def build_method(name: str, options: dict | None = None) -> Method:
    cls = METHODS.lookup(name)
    options = options or {}
    parameters = inspect.signature(cls).parameters
    accepted = {n for n, p in parameters.items() if p.kind != p.VAR_KEYWORD}
    unknown = sorted(set(options) - accepted)
    # a method taking **options names its own unknown ones (CMD-LIC: which schedule family an option belongs to)
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        valid = ", ".join(sorted(accepted)) or "none"
        raise LictrainError(f"method '{name}' has no option {', '.join(unknown)}; valid options: {valid}")
    return cls(**options)


__all__ = ["METHODS", "Method", "RunContext", "StepContext", "StepHook", "build_method"]
