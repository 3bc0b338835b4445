"""The fixed-budget learning-rate schedules and the finished-learning rule (lictrain/schedule.py)."""

import json
import math

import pytest

from lictrain.errors import LictrainError
from lictrain.schedule import finish_state, lr_factor
from lictrain.trainer import train
from tests.conftest import tiny_config


def test_cosine_hand_values():
    # 100 steps, decay from step 80 to the last step 99 (span 19), to 0.1
    f = lambda s: lr_factor(s, 100, "cosine", decay_start=0.8, final_factor=0.1)
    assert f(0) == 1.0 and f(79) == 1.0 and f(80) == pytest.approx(1.0)
    assert f(99) == pytest.approx(0.1)
    # 11 steps, decay from step 2 (0.2 * 11 rounded) to step 10: step 6 is half-way, where the half cosine is at
    # its middle, 0.1 + 0.9 / 2; step 4 is a quarter of the way: 0.1 + 0.9 * (1 + cos(pi/4)) / 2
    assert lr_factor(6, 11, "cosine", 0.2, 0.1) == pytest.approx(0.55)
    assert lr_factor(4, 11, "cosine", 0.2, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))
    values = [f(s) for s in range(100)]
    assert all(b <= a for a, b in zip(values, values[1:]))  # never rises


def test_step_schedule_and_warmup():
    assert lr_factor(79, 100, "step", 0.8, 0.1) == 1.0
    assert lr_factor(80, 100, "step", 0.8, 0.1) == 0.1
    assert lr_factor(0, 100, "step", 0.8, 0.1, warmup=4) == pytest.approx(0.25)
    assert lr_factor(3, 100, "step", 0.8, 0.1, warmup=4) == 1.0
    assert lr_factor(2, 100, "plateau", warmup=4) == pytest.approx(0.75)  # plateau: warm-up only
    assert lr_factor(90, 100, "plateau") == 1.0


def val(step, loss, lr):
    return {"step": step, "loss": loss, "lr": lr}


def test_annealed_needs_the_end_of_the_budget_and_a_tenth_of_lr0():
    recs = [val(0, 9.0, 1e-3), val(50, 2.0, 1e-3), val(100, 1.5, 1e-4)]
    assert finish_state(recs, "cosine", 100, 1e-3).state == "annealed"
    assert finish_state(recs, "cosine", 200, 1e-3).state == "not converged"  # stopped early
    recs[-1]["lr"] = 2e-4
    assert finish_state(recs, "step", 100, 1e-3).state == "not converged"  # ended at lr0/5 only


def test_converged_needs_two_cuts_and_less_than_one_percent():
    base = [val(s, 3.0 - s / 1000, 1e-3) for s in range(0, 800, 100)]
    # last fifth of 1000 steps: points at 800, 900, 1000
    tail = [val(800, 2.0, 5e-4), val(900, 1.995, 2.5e-4), val(1000, 1.99, 2.5e-4)]  # moved 0.50%, 2 cuts
    assert finish_state(base + tail, "plateau", 1000, 1e-3).state == "converged"
    one_cut = [dict(r, lr=5e-4) for r in tail]
    assert finish_state(base + one_cut, "plateau", 1000, 1e-3).state == "not converged"
    moving = [val(800, 2.05, 5e-4), val(900, 2.02, 2.5e-4), val(1000, 2.0, 2.5e-4)]  # 2.05 -> 2.0: 2.50%
    s = finish_state(base + moving, "plateau", 1000, 1e-3)
    assert s.state == "not converged" and "2.50%" in s.detail


def test_training_follows_the_cosine_schedule(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=10", "train.val_every=5", "train.schedule=cosine",
                      "train.decay_start=0.5", "train.final_lr_factor=0.1", "data.val_max_images=1")
    train(cfg)
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in recs if r["kind"] == "train"}  # the lr of the step just taken (step - 1)
    for step, lr in lrs.items():
        assert lr == pytest.approx(1e-3 * lr_factor(step - 1, 10, "cosine", 0.5, 0.1)), step
    assert lrs[10] == pytest.approx(1e-4)
    vals = [r for r in recs if r["kind"] == "val"]
    assert finish_state(vals, "cosine", 10, 1e-3).state == "annealed"


def test_schedule_name_is_checked(tmp_path):
    with pytest.raises(LictrainError, match="train.schedule must be plateau, cosine or step"):
        tiny_config(tmp_path, "train.schedule=linear")


def test_converged_at_is_the_first_validation_meeting_the_rule():
    """Hand-made plateau run: LR cut at steps 500 and 800. At 700 only one cut; at 800 two cuts and the last fifth
    (steps >= 640: 4.05 -> 4.02) moved 0.75% < 1%: converged there, though the run goes on to 1300."""
    from lictrain.schedule import converged_at

    lrs = [1e-3] * 5 + [5e-4] * 3 + [2.5e-4] * 6
    losses = [10, 8, 6, 5, 4.5, 4.2, 4.1, 4.05, 4.02, 4.01, 4.0, 4.0, 4.0, 4.0]
    recs = [{"step": 100 * i, "loss": l, "lr": lr, "train_time": 2.0 * i} for i, (l, lr) in enumerate(zip(losses, lrs))]
    at = converged_at(recs, 1e-3)
    assert at["step"] == 800 and at["train_time"] == 16.0
    assert finish_state(recs, "plateau", 1300, 1e-3).state == "converged"
    assert converged_at(recs[:8], 1e-3) is None  # one cut only
    still_falling = [dict(r, loss=10 - 0.5 * i) for i, r in enumerate(recs)]  # 2 cuts, but never flat
    assert converged_at(still_falling, 1e-3) is None


def test_the_plateau_threshold_decides_what_counts_as_progress(tmp_path):
    """ReduceLROnPlateau (patience 0) with the run's threshold, recomputed by hand from the validation losses: a
    validation counts as progress only when it beats the best so far by the relative threshold; otherwise the LR
    halves. With threshold 0.9 almost nothing is progress; with 1e-4 (the default) a falling loss is."""
    for threshold in (0.9, 1e-4):
        run = tmp_path / f"t{threshold}"
        train(tiny_config(tmp_path, "train.steps=6", "train.val_every=1", "train.plateau_patience=0",
                          f"train.plateau_threshold={threshold}", "data.val_max_images=1", f"run_dir={run}"))
        vals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        vals = [r for r in vals if r["kind"] == "val"]
        best, lr, want = math.inf, 1e-3, []
        for r in vals[1:]:  # the untrained step-0 validation does not step the scheduler
            if r["loss"] < best * (1 - threshold):
                best = r["loss"]
            else:  # (the best stays: only progress by the threshold replaces it)
                lr *= 0.5
            want.append(lr)
        assert [r["lr"] for r in vals[1:]] == pytest.approx(want), threshold
        if threshold == 0.9:
            assert want[-1] <= 1e-3 * 0.5 ** 4  # the first validation is progress over inf; none after it is


def test_stop_when_converged_ends_the_run_at_the_first_validation_meeting_the_rule(tmp_path):
    """A plateau run that barely learns (lr 1e-6) and counts nothing as progress (threshold 0.9, patience 0): the LR
    is cut at every validation after the first, the loss stays flat, so the rule holds at the second cut. With
    train.stop_when_converged the run ends there (checked against converged_at of its own metrics, an independent
    reading), counts as finished, and resuming it trains nothing; without it, the same run goes on to the cap."""
    from lictrain.comparison.figures import read_val_records
    from lictrain.schedule import converged_at

    common = ("train.steps=12", "train.val_every=1", "train.ckpt_every=100", "train.plateau_patience=0",
              "train.plateau_threshold=0.9", "optim.lr=1e-6", "data.val_max_images=1")
    stopped = tmp_path / "stopped"
    cfg = tiny_config(tmp_path, *common, "train.stop_when_converged=true", f"run_dir={stopped}")
    result = train(cfg)
    records = read_val_records(stopped)
    at = converged_at(records, 1e-6)
    assert at is not None and result.step == at["step"] == records[-1]["step"] < 12
    assert [r["lr"] for r in records].count(1e-6) == 2  # step 0 and the first validation: no cut yet
    assert result.converged_stop and not result.interrupted
    assert json.loads((stopped / "summary.json").read_text())["converged_stop"] is True
    metrics = (stopped / "metrics.jsonl").read_text()
    again = train(cfg, resume=True)
    assert again.step == result.step and again.converged_stop and (stopped / "metrics.jsonl").read_text() == metrics
    from lictrain.comparison.compare import Run, train_or_reuse

    train_or_reuse(Run("adam", cfg.loss.lmbda, cfg.seed, cfg))  # compare reuses it (no "interrupted" error)
    assert (stopped / "metrics.jsonl").read_text() == metrics

    capped = tmp_path / "capped"
    full = train(tiny_config(tmp_path, *common, f"run_dir={capped}"))
    assert full.step == 12 and not full.converged_stop
    assert converged_at(read_val_records(capped), 1e-6)["step"] == result.step  # the same run, not stopped
