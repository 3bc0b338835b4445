"""The GPU path's options, checked on the CPU: precision (bf16 autocast with fp32 entropy models), the
synchronisation-free handling of non-finite steps, torch.compile, data workers, and hash stability."""

import json

import pytest
import torch
from compressai.entropy_models import GaussianConditional

import lictrain.trainer as train_mod
from lictrain.checkpoint import load_checkpoint
from lictrain.comparison.compare import legacy_hash as config_hash
from lictrain.config import load_config
from lictrain.errors import LictrainError
from lictrain.models import build_model
from lictrain.models.numerics import prepare_entropy_models
from lictrain.precision import autocast, compile_model
from lictrain.trainer import data_workers, train
from tests.conftest import tiny_config
from tests.test_train import _nan_model_factory


def _lines(run_dir, kind="train"):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(ln)["kind"] == kind]


def _likelihood_dtypes(model, x):
    with autocast(torch.device("cpu"), "bf16"):
        out = model(x)
    return {k: v.dtype for k, v in out["likelihoods"].items()}, out["x_hat"].dtype


def test_bf16_autocast_keeps_the_likelihoods_fp32():
    torch.manual_seed(0)
    model = build_model("mbt2018-mean", "tiny").train()
    x = torch.rand(2, 3, 64, 64)
    assert prepare_entropy_models(model) == 2  # the bottleneck and the Gaussian conditional
    kept, x_hat_dtype = _likelihood_dtypes(model, x)
    assert set(kept.values()) == {torch.float32} and x_hat_dtype == torch.bfloat16  # the transforms stay bf16
    assert prepare_entropy_models(model) == 0  # idempotent
    assert isinstance(model.gaussian_conditional, GaussianConditional)


def test_wrapped_gaussian_conditional_equals_fp32_on_the_same_inputs():
    gc = GaussianConditional(None).eval()
    torch.manual_seed(0)
    y = (torch.randn(1, 8, 6, 6) * 20).bfloat16()
    scales = (torch.rand(1, 8, 6, 6) * 5 + 0.05).bfloat16()
    means = torch.randn(1, 8, 6, 6).bfloat16()
    ref_hat, ref_lk = gc(y.float(), scales.float(), means=means.float())  # fp32 outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, plain = gc(y, scales, means=means)
    # the hazard is real: unwrapped, the likelihoods come out fp32 (a fp32 lower bound promotes them) but were
    # computed in bf16
    assert plain.dtype == torch.float32 and (plain - ref_lk).abs().max() > 1e-3
    prepare_entropy_models(gc)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_hat, lk = gc(y, scales, means=means)
    assert lk.dtype == torch.float32 and torch.equal(lk, ref_lk) and torch.equal(y_hat, ref_hat)
    # tiny likelihoods survive: bf16 would round them (8 significant bits), fp16 would flush them below 6e-8
    assert lk.min() < 1e-4 and not torch.equal(lk.bfloat16().float(), lk)


def test_bf16_training_runs_in_bf16_and_keeps_fp32_weights(tmp_path):
    fp32 = train(tiny_config(tmp_path, "train.steps=3", name="fp32"))
    bf16 = train(tiny_config(tmp_path, "train.steps=3", "train.precision=bf16", name="bf16"))
    a, b = _lines(tmp_path / "fp32")[0]["loss"], _lines(tmp_path / "bf16")[0]["loss"]
    # same weights, batch and noise at step 1: the difference is bf16's rounding alone, small but not zero
    assert a != b and abs(a - b) / a < 0.05
    ckpt = load_checkpoint(bf16.run_dir)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())


def test_fp16_is_refused_for_methods_that_backpropagate_on_their_own(tmp_path):
    with pytest.raises(LictrainError, match="standard method") as e:
        train(tiny_config(tmp_path, "train.precision=fp16", "method.name=balanced-rd"))
    assert "\n" not in str(e.value)
    with pytest.raises(LictrainError, match="fp32, bf16 or fp16"):
        load_config(None, ["train.precision=fp8"])


def skip_and_zero_runs(tmp_path, monkeypatch, nan_steps, *overrides):
    """The same 8-step SGD run (no momentum, no decay, no EMA) with NaN reconstructions at nan_steps under both
    guards; asserts their final weights are identical and returns both results."""
    runs = {}
    for mode in ("skip", "zero"):
        monkeypatch.setattr(train_mod, "build_model", _nan_model_factory(nan_steps))
        runs[mode] = train(tiny_config(tmp_path, "train.steps=8", "optim.name=sgd", "optim.options.momentum=0",
                                       "optim.lr=0.1", "train.ema_decay=0", f"train.nonfinite={mode}", *overrides,
                                       name=mode))
    a, b = load_checkpoint(runs["skip"].run_dir), load_checkpoint(runs["zero"].run_dir)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    return runs


def test_zero_mode_with_a_memoryless_optimizer_equals_skipping(tmp_path, monkeypatch):
    """Plain SGD (no momentum, no decay) makes a zero-gradient step a no-op, so the device-side mode must then
    produce exactly the weights, counts and logged losses of the host-side skip."""
    runs = skip_and_zero_runs(tmp_path, monkeypatch, {2, 3, 6}, "train.log_every=4")
    assert runs["skip"].skipped_steps == runs["zero"].skipped_steps == 3
    la, lb = _lines(runs["skip"].run_dir), _lines(runs["zero"].run_dir)
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-6)
    assert [r["skipped_steps"] for r in lb] == [2, 3]


def test_zero_mode_with_adam_keeps_weights_finite_and_stops_when_stuck(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "build_model", _nan_model_factory({1}))
    res = train(tiny_config(tmp_path, "train.steps=4", "train.nonfinite=zero", name="one"))
    assert res.skipped_steps == 1
    ckpt = load_checkpoint(res.run_dir)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(s["exp_avg"]).all() for s in ckpt["optimizer"]["state"].values())
    monkeypatch.setattr(train_mod, "build_model", _nan_model_factory(set(range(4, 100))))
    with pytest.raises(LictrainError, match="3 consecutive"):
        train(tiny_config(tmp_path, "train.steps=20", "train.ckpt_every=4", "train.max_consecutive_skips=3",
                          "train.nonfinite=zero", name="stuck"))


def test_zero_mode_is_refused_for_other_methods(tmp_path):
    with pytest.raises(LictrainError, match="nonfinite=zero needs the standard method"):
        train(tiny_config(tmp_path, "train.nonfinite=zero", "method.name=balanced-rd"))


def test_compiled_forward_gives_the_eager_losses(tmp_path):
    eager = train(tiny_config(tmp_path, "train.steps=3", name="eager"))
    compiled = train(tiny_config(tmp_path, "train.steps=3", "train.compile=aot_eager", name="compiled"))
    la, lb = _lines(eager.run_dir), _lines(compiled.run_dir)
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-4)
    with pytest.raises(LictrainError, match="unknown backend 'nope'"):
        compile_model(torch.nn.Linear(2, 2), "nope")


def test_data_workers_default_by_device():
    assert data_workers(None, torch.device("cpu")) == 0
    assert 1 <= data_workers(None, torch.device("cuda")) <= 8
    assert data_workers(3, torch.device("cpu")) == 3


def test_new_train_keys_at_their_defaults_keep_the_configuration_hash():
    # hashes computed with the code before train.precision/tf32/compile/nonfinite and data.workers=None existed:
    # benchmark run folders made then must still be found by compare
    # (data.order=shuffle: the order those runs had; the default is iid now, another run with another hash)
    base = ["model.preset=bench", "loss.lmbda=0.0067", "optim.lr=1e-3", "train.steps=8000", "data.order=shuffle"]
    assert config_hash(load_config(None, base)) == "4b71b681"
    assert config_hash(load_config(None, base[:-1])) != "4b71b681"
    assert config_hash(load_config(None, base + ["train.schedule=cosine", "optim.name=soap"])) == "14c78375"
    assert config_hash(load_config(None, base + ["data.workers=4"])) == "4b71b681"  # workers change nothing
    assert config_hash(load_config(None, base + ["train.precision=bf16"])) != "4b71b681"
    assert config_hash(load_config(None, base + ["data.order=shuffle", "train.deterministic=false"])) == "4b71b681"
    assert config_hash(load_config(None, base + ["data.order=iid"])) == config_hash(load_config(None, base[:-1]))
