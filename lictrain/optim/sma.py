"""SMA, Sampling-then-Moving-Average (CMD-LIC, Zhang et al., TMLR 2025, Section 3.3.2, Eq. 9), as an optimizer
wrapper: `adam+sma`, `soap+sma`, options under `optim.options.sma` (alpha, every).

Every `every` (the paper's l) steps of the wrapped optimizer, the current weights are sampled into a moving
average and the weights are synchronised to it:

    w_SMA <- (1 - alpha) * w_SMA + alpha * w;    w <- w_SMA          (w_SMA starts at the weights at wrap time)

The paper treats "the sampling and updating as a single optimizer step, ensuring that the total number of
iterations within each epoch remains unchanged": the sync is done inside the step() call whose base update
completes a group of l, not as an extra iteration. So with l = 1 and alpha = 1 SMA is the bare optimizer, exactly.
Defaults are Table 11's: alpha 0.8, l 5. The optimizer state of the wrapped optimizer is left as it is (only the
weights are synchronised), like Lookahead, of which SMA is a simplified form.
"""

from __future__ import annotations

import torch

from ..errors import LictrainError


class SMA(torch.optim.Optimizer):
    """The wrapper. `base` is the wrapped optimizer (code that needs its type, such as the conflict analysis,
    looks there); `param_groups` and `state` are the base's own objects, so LR schedules, warm-up and
    checkpoints act on one optimizer."""

    def __init__(self, base: torch.optim.Optimizer, alpha: float = 0.8, every: int = 5):
        if not 0 < alpha <= 1:
            raise LictrainError(f"sma: alpha must be in (0, 1], got {alpha}")
        if every < 1:
            raise LictrainError(f"sma: every must be at least 1, got {every}")
        super().__init__(base.param_groups, base.defaults)  # torch's bookkeeping: step hooks, profiling
        self.param_groups, self.state = base.param_groups, base.state  # shared, not copied
        self.base, self.alpha, self.every = base, float(alpha), int(every)
        self.count = 0
        with torch.no_grad():
            self.average = [p.detach().clone() for g in base.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.base.step(closure)
        self.count += 1
        if self.count % self.every == 0:
            params = [p for g in self.param_groups for p in g["params"]]
            torch._foreach_lerp_(self.average, [p.detach() for p in params], self.alpha)
            for p, a in zip(params, self.average):
                p.copy_(a)
        return loss

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict(), "sma": {"count": self.count, "average": [a.clone() for a in self.average]}}

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state["base"])
        # torch's load_state_dict gives the base new param_groups and state objects: share those, or LR schedules
        # would from now on set the lr of orphaned groups
        self.param_groups, self.state = self.base.param_groups, self.base.state
        self.count = int(state["sma"]["count"])
        with torch.no_grad():
            for a, s in zip(self.average, state["sma"]["average"]):
                a.copy_(s)

    def __repr__(self) -> str:
        return f"SMA(alpha={self.alpha}, every={self.every}, base={self.base!r})"
