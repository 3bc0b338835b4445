"""Learning-rate schedules of a fixed budget, and the rule that says whether a run has finished learning.

`plateau` (the default) is ReduceLROnPlateau on the validation loss, stepped in trainer.py. The fixed-budget schedules
are pure functions of the step, so a resumed run needs no scheduler state:

- `cosine`: lr0 until `decay_start * steps`, then half a cosine down to `final_lr_factor * lr0` at the last step;
- `step`: lr0 until `decay_start * steps`, then `final_lr_factor * lr0` (CompressAI's and most LIC papers' habit of
  one drop by 10 near the end).

Both keep the linear warm-up of `train.warmup_steps` in front.

A run has *finished learning* (the anchor of a comparison must have, or Steps-to-anchor measures against a moving
target) when either
- it was **annealed**: a fixed-budget schedule that ended at <= lr0/10 and ran to its last step, or
- it **converged**: the plateau scheduler cut the learning rate at least twice, and the validation loss moved less
  than 1% over the last fifth of the run (|L(first point in the last fifth) - L(last point)| / L(last point)).
Otherwise it has "not converged", and summaries say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("plateau", "cosine", "step")
ANNEALED_MAX_FACTOR = 0.1  # an annealed run ends at or below lr0/10
CONVERGED_MIN_CUTS = 2
CONVERGED_MAX_MOVE = 0.01  # relative change of the validation loss over the last fifth of the run
LAST_FRACTION = 0.2


def lr_factor(step: int, total: int, schedule: str, decay_start: float = 0.8, final_factor: float = 0.1,
              warmup: int = 0) -> float:
    """The learning rate of step `step` (0-based) as a fraction of lr0, for the fixed-budget schedules.

    `plateau` gets only the warm-up here (its cuts come from the validation loss, not from the step).
    """
    w = (step + 1) / warmup if warmup and step < warmup else 1.0
    if schedule == "plateau" or total <= 0:
        return w
    start = int(round(decay_start * total))
    if step < start:
        return w
    if schedule == "step":
        return w * final_factor
    if schedule == "cosine":
        span = max(1, total - 1 - start)  # the last step (total - 1) gets exactly final_factor
        t = min(1.0, (step - start) / span)
        return w * (final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * t)))
    raise ValueError(f"unknown schedule '{schedule}'")


@dataclass(frozen=True)
class FinishState:
    state: str  # "annealed" | "converged" | "not converged"
    detail: str

    def __str__(self) -> str:
        return f"{self.state} ({self.detail})"


def finish_state(val_records: list[dict], schedule: str, total_steps: int, lr0: float) -> FinishState:
    """Apply the rule of the module docstring to a run's validation records (metrics.jsonl lines of kind "val",
    each with step, loss and lr, in step order)."""
    if not val_records:
        return FinishState("not converged", "no validation")
    last = val_records[-1]
    end_factor = last["lr"] / lr0
    if schedule != "plateau":
        if last["step"] >= total_steps and end_factor <= ANNEALED_MAX_FACTOR * (1 + 1e-9):
            return FinishState("annealed", f"{schedule} to lr0×{end_factor:.3g}")
        return FinishState("not converged", f"{schedule} schedule ended at lr0×{end_factor:.3g}, step {last['step']}")
    lrs = [r["lr"] for r in val_records]
    cuts = sum(1 for a, b in zip(lrs, lrs[1:]) if b < a * (1 - 1e-9))
    tail = [r for r in val_records if r["step"] >= (1 - LAST_FRACTION) * last["step"]]
    move = abs(tail[0]["loss"] - last["loss"]) / abs(last["loss"]) if last["loss"] else math.inf
    detail = f"{cuts} LR cuts, moved {100 * move:.2f}% over the last fifth"
    if cuts >= CONVERGED_MIN_CUTS and move < CONVERGED_MAX_MOVE:
        return FinishState("converged", detail)
    return FinishState("not converged", detail)


def converged_at(val_records: list[dict], lr0: float) -> dict | None:
    """The first validation record at which the plateau rule above holds for the run up to it: when a plateau run
    converged (its step and train_time), by the same rule that finish_state applies to the whole run; None if it
    never did. Compares recipes' speed of convergence, not only their loss at a fixed step."""
    for i in range(1, len(val_records) + 1):
        prefix = val_records[:i]
        if finish_state(prefix, "plateau", prefix[-1]["step"], lr0).state == "converged":
            return prefix[-1]
    return None
