"""Method registry: names -> Method classes (see base.py for the interface)."""

from __future__ import annotations

import inspect

from ..errors import LictrainError
from .balanced_rd import BalancedRD, BalancedRDQP
from .base import Method, StepContext, StepHook
from .cmd import CMDLIC
from .standard import Standard

METHODS: dict[str, type[Method]] = {"standard": Standard, "balanced-rd": BalancedRD, "balanced-rd-qp": BalancedRDQP,
                                 "cmd-lic": CMDLIC}


def build_method(name: str, options: dict | None = None) -> Method:
    if name not in METHODS:
        raise LictrainError(f"unknown method '{name}'; valid methods: {', '.join(METHODS)}")
    cls = METHODS[name]
    options = options or {}
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        valid = ", ".join(sorted(accepted)) or "none"
        raise LictrainError(f"method '{name}' has no option {', '.join(unknown)}; valid options: {valid}")
    return cls(**options)


__all__ = ["METHODS", "Method", "StepContext", "StepHook", "build_method"]
