import json
import math
import os
import signal
from pathlib import Path
import time

import pytest
import torch

import lictrain.trainer as train_mod
from lictrain.checkpoint import load_checkpoint
from lictrain.errors import LictrainError
from lictrain.methods import StepHook
from lictrain.models import build_model
from lictrain.trainer import train
from tests.conftest import tiny_config


def read_jsonl(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            assert_same_state(a[k], b[k])
        elif isinstance(a[k], (list, tuple)):
            assert len(a[k]) == len(b[k])
            for x, y in zip(a[k], b[k]):
                assert_same_state({"_": x}, {"_": y})
        elif k not in ("train_time",):
            assert a[k] == b[k], k


def test_validation_loss_drops_on_samples(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=300", "train.val_every=100", "data.batch_size=8")
    train(cfg)
    val = {r["step"]: r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "val"}
    assert set(val) == {0, 100, 200, 300}
    assert val[300]["loss"] < 0.9 * val[100]["loss"] < 0.2 * val[0]["loss"]
    assert val[300]["psnr"] > val[100]["psnr"]
    for r in val.values():
        assert r["images_seen"] == 8 * r["step"]


@pytest.mark.parametrize("optimizer", ["adam", "soap"])
def test_resume_is_bit_identical(tmp_path, optimizer):
    common = ("train.val_every=3", "train.ckpt_every=3", "train.ema_decay=0.9", "train.warmup_steps=2",
              f"optim.name={optimizer}", "optim.options={precondition_frequency: 2}" if optimizer == "soap" else "seed=0")
    train(tiny_config(tmp_path, "train.steps=6", *common, name="straight"))
    train(tiny_config(tmp_path, "train.steps=3", *common, name="split"))
    train(tiny_config(tmp_path, "train.steps=6", *common, name="split"), resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for key in ("model", "ema", "optimizer", "aux_optimizer", "scheduler", "state"):
        assert_same_state(a[key], b[key])
    # the log of the resumed run reads like the straight one (same steps, same values)
    la = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl")]
    lb = [r for r in read_jsonl(tmp_path / "split" / "metrics.jsonl")]
    assert [(r["kind"], r["step"], r["loss"]) for r in la] == [(r["kind"], r["step"], r["loss"]) for r in lb]


def test_interrupt_checkpoints_and_resumes_exactly(tmp_path):
    class CtrlC(StepHook):
        def after_step(self, ctx):
            if ctx.step == 1:
                os.kill(os.getpid(), signal.SIGINT)

    common = ("train.val_every=100", "train.ckpt_every=100")
    train(tiny_config(tmp_path, "train.steps=5", *common, name="straight"))
    res = train(tiny_config(tmp_path, "train.steps=5", *common, name="cut"), hooks=(CtrlC(),))
    assert res.step == 2 and load_checkpoint(tmp_path / "cut")["state"]["step"] == 2
    assert res.interrupted == signal.SIGINT
    train(tiny_config(tmp_path, "train.steps=5", *common, name="cut"), resume=True)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "cut")
    assert_same_state(a["model"], b["model"])
    from lictrain.comparison.figures import read_val_curve

    # the validation made only because of Ctrl-C is logged but left out of compared curves
    assert [p.step for p in read_val_curve(tmp_path / "cut" / "metrics.jsonl")] == [0, 5]
    assert any(r.get("interrupted") for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl"))


def test_a_second_ctrl_c_during_the_last_validation_loses_nothing(tmp_path, monkeypatch, caplog):
    """Interrupted between validations, the run writes its checkpoint before the extra validation, so a second
    Ctrl-C there (which aborts) keeps every step; the trainer leaves the "how to continue" line to its caller."""
    class CtrlC(StepHook):
        def after_step(self, ctx):
            if ctx.step == 1:
                os.kill(os.getpid(), signal.SIGINT)

    real_validate = train_mod.validate
    calls = {"n": 0}

    def validate_then_ctrl_c(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the validation after the interrupt (the first is step 0's)
            os.kill(os.getpid(), signal.SIGINT)
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(train_mod, "validate", validate_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path, "train.steps=5", "train.val_every=100", "train.ckpt_every=100", name="cut"),
              hooks=(CtrlC(),))
    assert load_checkpoint(tmp_path / "cut")["state"]["step"] == 2
    assert not any("continue with" in r.getMessage() for r in caplog.records)


def _nan_model_factory(nan_steps):
    """build_model whose reconstruction is NaN during the given training forward passes."""
    calls = {"n": 0}

    def factory(name, preset, kwargs=None):
        model = build_model(name, preset, kwargs)

        def hook(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] - 1 in nan_steps:
                    return output * float("nan")
            return output

        model.g_s.register_forward_hook(hook)
        return model

    return factory


def test_nan_loss_skips_the_step_and_never_reaches_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "build_model", _nan_model_factory({0}))
    res = train(tiny_config(tmp_path, "train.steps=1", "train.ema_decay=0"))
    assert res.skipped_steps == 1
    torch.manual_seed(0)
    initial = build_model("mbt2018-mean", "tiny").state_dict()
    final = load_checkpoint(tmp_path / "run")["model"]
    for k, v in initial.items():
        if not k.endswith("quantiles"):  # the auxiliary quantile step does not depend on the image
            assert torch.equal(v, final[k]), k


def test_a_non_finite_metric_is_logged_as_null_and_read_back_as_nan(tmp_path):
    from lictrain.comparison.figures import read_val_curve
    from lictrain.rundir import MetricsLog, parse_record as metrics_record

    def refuse(name):
        raise ValueError(name)

    log = MetricsLog(tmp_path / "metrics.jsonl", None)
    log.write({"kind": "val", "step": 5, "train_time": 1.0, "loss": float("nan"), "bpp": float("inf")})
    log.write({"kind": "val", "step": 6, "train_time": 2.0, "loss": 0.5, "bpp": 0.2})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0], parse_constant=refuse)["loss"] is None  # strict JSON Lines: no NaN literal
    assert math.isnan(metrics_record(lines[0])["loss"]) and math.isnan(metrics_record(lines[0])["bpp"])
    curve = read_val_curve(tmp_path / "metrics.jsonl")
    assert math.isnan(curve[0].loss) and curve[1].loss == 0.5


def test_isolated_nan_steps_are_counted_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "build_model", _nan_model_factory({2, 3, 7}))
    res = train(tiny_config(tmp_path, "train.steps=10", "train.max_consecutive_skips=3"))
    assert res.step == 10 and res.skipped_steps == 3
    ckpt = load_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    train_lines = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert train_lines[-1]["skipped_steps"] == 3


def test_consecutive_nan_steps_stop_the_run_and_keep_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "build_model", _nan_model_factory(set(range(4, 100))))
    with pytest.raises(LictrainError, match="3 consecutive") as e:
        train(tiny_config(tmp_path, "train.steps=20", "train.ckpt_every=4", "train.max_consecutive_skips=3"))
    assert "checkpoint" in str(e.value) and "\n" not in str(e.value)
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["state"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_training_time_excludes_validation(tmp_path, monkeypatch):
    real_validate = train_mod.validate

    def slow_validate(*args, **kwargs):
        time.sleep(0.5)
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(train_mod, "validate", slow_validate)
    t0 = time.perf_counter()
    train(tiny_config(tmp_path, "train.steps=6", "train.val_every=2"))
    wall = time.perf_counter() - t0
    val = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "val"]
    times = [r["train_time"] for r in val]
    assert len(val) == 4 and times == sorted(times) and times[0] == 0.0
    assert wall - times[-1] > 4 * 0.5  # the four validations' sleeps are outside the training time


def test_existing_run_is_not_overwritten_and_resume_needs_a_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=1")
    train(cfg)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(LictrainError, match="already holds a run"):
        train(cfg)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    with pytest.raises(LictrainError, match="nothing to resume"):
        train(tiny_config(tmp_path, name="other"), resume=True)


def test_crop_must_fit_the_model_stride(tmp_path):
    with pytest.raises(LictrainError, match="multiple of 64"):
        train(tiny_config(tmp_path, "data.crop=96"))


def test_run_folder_contents(tmp_path):
    train(tiny_config(tmp_path, "train.steps=2", "train.tensorboard=true"))
    run = tmp_path / "run"
    assert {"checkpoint.pt", "config.yaml", "metrics.jsonl", "summary.json", "tb"} <= {p.name for p in run.iterdir()}
    assert "mbt2018-mean" in (run / "config.yaml").read_text()
    assert not list(run.glob("*.tmp"))


@pytest.mark.parametrize("name", ["bmshj2018-factorized", "bmshj2018-hyperprior", "mbt2018-mean", "mbt2018",
                                  "cheng2020-anchor", "elic"])
def test_soap_trains_every_model(tmp_path, name):
    cfg = tiny_config(tmp_path, f"model.name={name}", "optim.name=soap", "train.steps=3", "data.batch_size=2",
                      "train.val_every=3", "data.val_max_images=1", "data.val_crop=64", "train.ema_decay=0",
                      "optim.options={precondition_frequency: 2}")
    res = train(cfg)
    assert res.skipped_steps == 0
    ckpt = load_checkpoint(tmp_path / "run")
    torch.manual_seed(0)
    initial = dict(build_model(name, "tiny").named_parameters())
    changed = [k for k, v in initial.items() if not torch.equal(v, ckpt["model"][k])]
    assert len(changed) > 0.9 * len(initial)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    state = ckpt["optimizer"]["state"]
    assert any(any(f is not None for f in s["GG"]) for s in state.values())  # conv kernels got Kronecker factors


def test_resume_drops_log_lines_after_the_checkpoint_and_a_line_cut_by_a_crash(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=4", "train.val_every=2", "train.ckpt_every=2")
    train(cfg)
    log = tmp_path / "run" / "metrics.jsonl"
    ckpt = load_checkpoint(tmp_path / "run")
    # pretend the run crashed after logging step 5 (and half a line), with its last checkpoint at step 4
    log.write_text(log.read_text() + json.dumps({"kind": "train", "step": 5, "loss": 1.0}) + "\n" + '{"kind": "tr')
    train(tiny_config(tmp_path, "train.steps=6", "train.val_every=2", "train.ckpt_every=2"), resume=True)
    steps = [r["step"] for r in read_jsonl(log) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6] and ckpt["state"]["step"] == 4


def test_zero_steps_keeps_the_initial_weights_and_a_finished_resume_keeps_its_summary(tmp_path):
    train(tiny_config(tmp_path, "train.steps=0", name="zero"))
    torch.manual_seed(0)
    initial = build_model("mbt2018-mean", "tiny").state_dict()
    saved = load_checkpoint(tmp_path / "zero")
    assert saved["state"]["step"] == 0 and torch.equal(saved["model"]["g_a.0.weight"], initial["g_a.0.weight"])
    train(tiny_config(tmp_path, "train.steps=2", "train.val_every=2"))
    before = json.loads((tmp_path / "run" / "summary.json").read_text())["last_val"]
    train(tiny_config(tmp_path, "train.steps=2", "train.val_every=2"), resume=True)  # nothing left to do
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["last_val"] == before != {}


def test_init_from_starts_from_the_source_runs_evaluated_weights(tmp_path):
    train(tiny_config(tmp_path, "train.steps=4", "train.ema_decay=0.9", name="src"))
    train(tiny_config(tmp_path, "train.steps=0", f"train.init_from={tmp_path / 'src'}", name="ft"))
    src, ft = load_checkpoint(tmp_path / "src"), load_checkpoint(tmp_path / "ft")
    for k, v in src["ema"]["model"].items():
        assert torch.equal(ft["model"][k], v), k
    assert not torch.equal(src["model"]["g_a.0.weight"], src["ema"]["model"]["g_a.0.weight"])  # EMA, not raw
    with pytest.raises(LictrainError, match="holds a mbt2018-mean"):
        train(tiny_config(tmp_path, "model.name=bmshj2018-hyperprior", f"train.init_from={tmp_path / 'src'}",
                          name="other"))
    with pytest.raises(LictrainError, match="checkpoint not found"):
        train(tiny_config(tmp_path, f"train.init_from={tmp_path / 'nowhere'}", name="missing"))


@pytest.mark.parametrize("optimizer", ["adam", "soap"])
def test_init_from_with_optimizer_state_continues_the_source_run(tmp_path, optimizer):
    """weights+optimizer: the raw weights and the optimizer state that belongs to them (moments, step counts), at
    the new learning rate."""
    common = (f"optim.name={optimizer}", "train.ema_decay=0.9", "train.clip_max_norm=0")
    train(tiny_config(tmp_path, "train.steps=4", *common, name="src"))
    train(tiny_config(tmp_path, "train.steps=0", *common, f"train.init_from={tmp_path / 'src'}",
                      "train.init_state=weights+optimizer", "optim.lr=5e-5", name="ft"))
    src, ft = load_checkpoint(tmp_path / "src"), load_checkpoint(tmp_path / "ft")
    for k, v in src["model"].items():
        assert torch.equal(ft["model"][k], v), k  # raw weights, not the EMA
    assert [g["lr"] for g in ft["optimizer"]["param_groups"]] == [5e-5] * len(ft["optimizer"]["param_groups"])
    a, b = src["optimizer"]["state"], ft["optimizer"]["state"]
    assert a.keys() == b.keys() and len(a) > 0
    for i in a:
        assert torch.equal(torch.as_tensor(a[i]["step"]), torch.as_tensor(b[i]["step"]))
        assert torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) and torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"])
    with pytest.raises(LictrainError, match="needs the same optimizer"):
        train(tiny_config(tmp_path, "optim.name=sgd", f"train.init_from={tmp_path / 'src'}",
                          "train.init_state=weights+optimizer", name="other"))
    with pytest.raises(LictrainError, match="train.init_state must be"):
        train(tiny_config(tmp_path, f"train.init_from={tmp_path / 'src'}", "train.init_state=all", name="bad"))


def test_init_from_with_sma_starts_its_average_from_the_loaded_weights(tmp_path):
    """SMA copies the weights when it wraps the optimizer: the fine-tune's weights, not the random initialisation;
    with weights+optimizer the source's average and the new lr reach the wrapped optimizer."""
    common = ("optim.name=adam+sma", "train.ema_decay=0")
    train(tiny_config(tmp_path, "train.steps=7", *common, name="src"))
    src = load_checkpoint(tmp_path / "src")
    train(tiny_config(tmp_path, "train.steps=0", *common, f"train.init_from={tmp_path / 'src'}", name="ft"))
    ft = load_checkpoint(tmp_path / "ft")
    from lictrain.models import build_model

    names = [n for n, _ in build_model("mbt2018-mean", "tiny").named_parameters() if not n.endswith("quantiles")]
    average = dict(zip(names, ft["optimizer"]["sma"]["average"]))
    for n in ("g_a.0.weight", "h_s.0.weight", "entropy_bottleneck._matrix0"):
        if n in average:
            assert torch.equal(average[n], src["model"][n]), n
    assert torch.equal(average["g_a.0.weight"], src["model"]["g_a.0.weight"])
    train(tiny_config(tmp_path, "train.steps=0", *common, f"train.init_from={tmp_path / 'src'}",
                      "train.init_state=weights+optimizer", "optim.lr=5e-5", name="ft2"))
    ft2 = load_checkpoint(tmp_path / "ft2")
    for a, b in zip(ft2["optimizer"]["sma"]["average"], src["optimizer"]["sma"]["average"]):
        assert torch.equal(a, b)
    assert {g["lr"] for g in ft2["optimizer"]["base"]["param_groups"]} == {5e-5}


def test_sma_shares_the_groups_of_its_optimizer_after_loading():
    from lictrain.optim import build_optimizer

    p = torch.nn.Parameter(torch.zeros(3))
    a = build_optimizer("adam+sma", [p], 0.1)
    p.grad = torch.ones(3)
    a.step()
    b = build_optimizer("adam+sma", [p], 0.1)
    b.load_state_dict(a.state_dict())
    assert b.param_groups is b.base.param_groups and b.state is b.base.state
    b.param_groups[0]["lr"] = 0.5  # what a scheduler does
    assert b.base.param_groups[0]["lr"] == 0.5


def test_init_from_a_plain_state_dict(tmp_path):
    """A CompressAI-style weights file (bare, or under 'state_dict' with DataParallel prefixes); a file of another
    model is refused in one line naming the keys."""
    from lictrain.models import build_model

    torch.manual_seed(5)
    src = build_model("mbt2018-mean", "tiny")
    torch.save(src.state_dict(), tmp_path / "bare.pth")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}},
               tmp_path / "wrapped.pth.tar")
    for name in ("bare.pth", "wrapped.pth.tar"):
        train(tiny_config(tmp_path, "train.steps=0", "train.ema_decay=0", f"train.init_from={tmp_path / name}",
                          name=f"ft-{name}"))
        ft = load_checkpoint(tmp_path / f"ft-{name}")
        for k, v in src.state_dict().items():
            assert torch.equal(ft["model"][k], v), (name, k)
    torch.save(build_model("cheng2020-anchor", "tiny").state_dict(), tmp_path / "other.pth")
    with pytest.raises(LictrainError, match=r"does not fit MeanScaleHyperprior: missing .*; unexpected ") as e:
        train(tiny_config(tmp_path, f"train.init_from={tmp_path / 'other.pth'}", name="other"))
    assert "\n" not in str(e.value)
    torch.save(build_model("mbt2018-mean", "small").state_dict(), tmp_path / "wide.pth")
    with pytest.raises(LictrainError, match=r"does not fit MeanScaleHyperprior: wrong shape .*g_a|\(\+\d+ more\)"):
        train(tiny_config(tmp_path, f"train.init_from={tmp_path / 'wide.pth'}", name="wide"))
    with pytest.raises(LictrainError, match="holds no optimizer state"):
        train(tiny_config(tmp_path, f"train.init_from={tmp_path / 'bare.pth'}", "train.init_state=weights+optimizer",
                          name="opt"))
    torch.save({"a": 1}, tmp_path / "junk.pt")
    with pytest.raises(LictrainError, match="neither a lictrain checkpoint nor a state dict"):
        train(tiny_config(tmp_path, f"train.init_from={tmp_path / 'junk.pt'}", name="junk"))


def test_best_checkpoint_holds_the_best_regular_validation(tmp_path):
    train(tiny_config(tmp_path, "train.steps=6", "train.val_every=2", "data.val_max_images=1"))
    vals = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "val"}
    best_step = min((s for s in vals if s > 0), key=vals.get)  # the untrained step 0 never counts
    best = load_checkpoint(tmp_path / "run" / "checkpoint_best.pt")
    assert best["state"]["step"] == best_step and best["state"]["best_val"] == vals[best_step]
    # it is a model checkpoint that evaluation can load, whose EMA weights give that validation loss again
    from lictrain.checkpoint import model_from_checkpoint
    from lictrain.data import EvalImages
    from lictrain.losses import RateDistortionLoss

    model = model_from_checkpoint(best)
    again = train_mod.validate(model, EvalImages("samples:val", 128, 1), RateDistortionLoss(0.013), "cpu", 64)
    assert again["loss"] == pytest.approx(vals[best_step], rel=1e-5)


def test_tensorboard_forgets_what_was_logged_after_the_checkpoint_a_run_resumes_from(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    real_save = train_mod.save_atomic
    kept = {}

    def save_and_keep_step_2(obj, path):  # a crash after step 4 would leave this checkpoint of step 2 behind
        real_save(obj, path)
        if path.name == "checkpoint.pt" and obj["state"]["step"] == 2:
            kept["bytes"] = path.read_bytes()

    monkeypatch.setattr(train_mod, "save_atomic", save_and_keep_step_2)
    common = ("train.val_every=1", "train.ckpt_every=2", "train.tensorboard=true", "data.val_max_images=1")
    train(tiny_config(tmp_path, "train.steps=4", *common))
    (tmp_path / "run" / "checkpoint.pt").write_bytes(kept["bytes"])
    train(tiny_config(tmp_path, "train.steps=4", *common), resume=True)
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("val/loss")]
    assert steps == [0, 1, 2, 3, 4]  # without the purge, 3 and 4 would appear twice


def test_atomic_writes_of_two_processes_do_not_share_a_temporary_file(tmp_path):
    """The parallel compare's processes write the same summary; each must use a temporary name of its own."""
    from lictrain.io import save_atomic, write_atomic

    target = tmp_path / "summary.json"
    others = [target.with_name(target.name + ".tmp"), target.with_name(f"{target.name}.{os.getpid() + 1}.tmp")]
    for other in others:  # another writer's half-written files, under a shared or another process's name
        other.write_text("half written by another process")
    write_atomic(target, "mine")
    save_atomic({"a": 1}, tmp_path / "ckpt.pt")
    assert target.read_text() == "mine" and torch.load(tmp_path / "ckpt.pt") == {"a": 1}
    assert all(o.read_text() == "half written by another process" for o in others)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt.pt", "summary.json"] + [o.name for o in others])


def test_an_interrupted_train_exits_nonzero_and_a_run_without_checkpoint_says_how_to_restart(tmp_path, monkeypatch,
                                                                                             capsys):
    """`lictrain train ... && lictrain eval ...` must not evaluate a half-trained model: an interrupted train exits
    128 + the signal, as shells do; --resume of a run stopped before its first checkpoint names the way to restart;
    a checkpoint's temporary file left by a killed process is cleared when the run starts again."""
    from lictrain import cli
    from lictrain.trainer import RunResult

    monkeypatch.setattr(train_mod, "train", lambda cfg, resume=False: RunResult(Path(cfg.run_dir), 3, 0.1, 0, 0, {},
                                                                               int(signal.SIGINT)))
    assert cli.main(["train", "--run-dir", str(tmp_path / "r"), "--set", "train.steps=9"]) == 130
    monkeypatch.undo()
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "config.yaml").write_text("seed: 0\n")
    assert cli.main(["train", "--resume", str(tmp_path / "early")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint yet" in err and f"lictrain train --config {tmp_path / 'early' / 'config.yaml'}" in err
    stale = tmp_path / "t" / "checkpoint.pt.999999999.tmp"  # no such process
    stale.parent.mkdir()
    stale.write_bytes(b"half a checkpoint")
    live = stale.with_name(f"checkpoint.pt.{os.getpid()}.tmp")
    live.write_bytes(b"being written")
    from lictrain.io import remove_stale_temporaries

    assert remove_stale_temporaries(tmp_path / "t" / "checkpoint.pt") == [stale]
    assert not stale.exists() and live.exists()


def test_train_says_what_it_trains_on_and_warns_about_an_image_in_both_sets(tmp_path, caplog):
    caplog.clear()
    train(tiny_config(tmp_path, "train.steps=1", "data.val=samples:train", "data.val_max_images=2", name="both"))
    lines = [r.getMessage() for r in caplog.records]
    assert any("mbt2018-mean (tiny, " in m and "7 training images, 2 validation images" in m for m in lines)
    assert any("2 of the 2 validation images are training images too" in m for m in lines)
    caplog.clear()
    train(tiny_config(tmp_path, "train.steps=1", name="apart"))
    assert not any("training images too" in r.getMessage() for r in caplog.records)


def test_read_config_reads_the_config_without_the_weights(tmp_path):
    """checkpoint.read_config (mapped, weights unread) gives the config a full load gives; a truncated file fails
    with the one-line error of a full load."""
    from lictrain.checkpoint import Checkpoint, read_config
    from lictrain.errors import LictrainError

    run = tmp_path / "run"
    train(tiny_config(tmp_path, "train.steps=0", f"run_dir={run}", "loss.lmbda=0.02"))
    cfg = read_config(run)
    assert cfg.to_dict() == Checkpoint.load(run).config.to_dict() and cfg.loss.lmbda == 0.02
    broken = tmp_path / "broken.pt"
    broken.write_bytes((run / "checkpoint.pt").read_bytes()[:1000])
    with pytest.raises(LictrainError, match="cannot read checkpoint"):
        read_config(broken)
