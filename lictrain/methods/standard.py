"""The standard method: one backward pass of L = R + lmbda * D."""

from __future__ import annotations

from ..registry import register_method
from .base import Method, StepContext


@register_method("standard")
class Standard(Method):
    name = "standard"
    supports_loss_scaling = True
    host_sync_free = True

    def backward(self, ctx: StepContext) -> dict[str, float]:
        ctx.terms.loss.backward()
        return {}
