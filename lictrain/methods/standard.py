"""The standard method: one backward pass of L = R + lmbda * D."""

from __future__ import annotations

from .base import Method, StepContext


class Standard(Method):
    name = "standard"

    def backward(self, ctx: StepContext) -> dict[str, float]:
        ctx.terms.loss.backward()
        return {}
