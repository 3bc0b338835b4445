"""Plug-ins need no edit outside their own file and registration: an optimizer's record carries what the loop,
CMD-LIC and the probes ask of it; a method's flags carry what the loop asks of it (no name or class checks)."""

import pytest
import torch

from lictrain.errors import LictrainError
from lictrain.registry import METHODS, OPTIMIZERS, register_method, register_optimizer
from lictrain.trainer import train
from tests.conftest import tiny_config


class HeavyBall(torch.optim.Optimizer):
    """A toy optimizer defined only here: momentum SGD keeping its buffer under its own name."""

    def __init__(self, params, lr=1e-3, beta=0.9):
        super().__init__(params, dict(lr=lr, beta=beta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                v = self.state[p].setdefault("velocity", torch.zeros_like(p))
                v.mul_(group["beta"]).add_(p.grad)
                p.add_(v, alpha=-group["lr"])


@pytest.fixture
def heavy_ball():
    register_optimizer("test-heavy-ball", dict(beta=0.9), "a toy", coordinate_state=("velocity",))(HeavyBall)
    yield
    del OPTIMIZERS["test-heavy-ball"]


def test_a_new_optimizer_is_a_class_and_a_record(tmp_path, heavy_ball):
    from lictrain.probes.conflicts import preview_update
    from lictrain.methods.cmd import _zero_moments
    from lictrain.optim import build_optimizer, unwrap

    res = train(tiny_config(tmp_path, "train.steps=2", "train.val_every=2", "optim.name=test-heavy-ball+sma"))
    assert res.step == 2
    p = torch.nn.Parameter(torch.ones(6))
    opt = build_optimizer("test-heavy-ball+sma", [p], 0.1)
    assert unwrap(opt)[1] is OPTIMIZERS["test-heavy-ball"]  # through the wrapper
    p.grad = torch.ones(6)
    opt.step()
    _zero_moments(opt, p, torch.tensor([1, 4]))  # CMD-LIC zeroes the buffer the record names, at those entries
    assert opt.base.state[p]["velocity"].tolist() == [1, 0, 1, 1, 0, 1]
    with pytest.raises(LictrainError, match="supports the optimizers adam, adamw, sgd, soap, not HeavyBall"):
        preview_update(opt, [torch.ones(6)])  # no preview in its record: refused in one line


def test_a_new_method_is_asked_for_its_flags_not_its_name(tmp_path):
    from lictrain.methods.standard import Standard

    @register_method("test-plain")
    class Plain(Standard):  # the standard backward under another name, flags off
        name = "test-plain"
        host_sync_free = False
        supports_loss_scaling = False

    @register_method("test-sync-free")
    class SyncFree(Plain):
        name = "test-sync-free"
        host_sync_free = True

    try:
        with pytest.raises(LictrainError, match="the test-plain method reads this step's losses"):
            train(tiny_config(tmp_path, "train.nonfinite=zero", "method.name=test-plain"))
        res = train(tiny_config(tmp_path, "train.steps=2", "train.val_every=2", "train.nonfinite=zero",
                                "method.name=test-sync-free", name="free"))
        assert res.step == 2
    finally:
        del METHODS["test-plain"], METHODS["test-sync-free"]


def test_a_new_metrics_field_is_written_by_its_plug_in_and_read_back_with_no_other_edit(tmp_path):
    """A hook's measurement lands in metrics.jsonl as a probe record and comes back through the run folder's one
    reader (rundir.read_records), NaN included."""
    import math

    from lictrain import rundir
    from lictrain.methods.base import StepHook

    class Sharpness(StepHook):
        def after_step(self, ctx):
            return {"test_field": float(ctx.step), "test_nan": math.nan}

    train(tiny_config(tmp_path, "train.steps=3", "train.val_every=3"), hooks=(Sharpness(),))
    probes = rundir.read_records(tmp_path / "run", "probe")
    assert [r["test_field"] for r in probes] == [0.0, 1.0, 2.0] and [r["step"] for r in probes] == [1, 2, 3]
    assert all(math.isnan(r["test_nan"]) for r in probes)


def test_a_hook_that_is_not_a_step_hook_is_refused_before_anything_is_written(tmp_path):
    """The loop hands hooks the run through StepHook.attach: an object that does not subclass it gets a one-line
    error naming the type before the run folder is touched."""
    class Duck:
        def after_step(self, ctx):
            return None

    with pytest.raises(LictrainError, match="must subclass lictrain.methods.StepHook, got Duck"):
        train(tiny_config(tmp_path, "train.steps=1"), hooks=(Duck(),))
    assert not (tmp_path / "run").exists()
