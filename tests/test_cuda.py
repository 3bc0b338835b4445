"""The GPU path on a GPU: run only where CUDA is present (marked `cuda`; elsewhere they are reported as skipped,
and the session header says so). Each compares the CUDA result with an independent reference: the CPU's numbers,
the eager model, or the host-synchronising guard."""

import json

import pytest
import torch

import lictrain.trainer as train_mod
from lictrain.optim import build_optimizer
from lictrain.trainer import train
from tests.conftest import tiny_config
from tests.test_precision import skip_and_zero_runs

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: CUDA tests not run")]


def _losses(run_dir):
    return [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(ln)["kind"] == "train"]


def test_first_step_loss_on_cuda_matches_the_cpu(tmp_path):
    # same initial weights (seeded on the CPU, then moved) and the same crops; the noise differs (CUDA's generator),
    # so only the first step's loss is compared loosely and the TF32-free run must stay finite and learn
    cpu = train(tiny_config(tmp_path, "train.steps=20", "device=cpu", name="cpu"))
    gpu = train(tiny_config(tmp_path, "train.steps=20", "device=cuda", "train.tf32=false", name="gpu"))
    a, b = _losses(cpu.run_dir), _losses(gpu.run_dir)
    assert abs(a[0] - b[0]) / a[0] < 0.05
    assert b[-1] < b[0] and a[-1] < a[0]


def test_soap_on_cuda_with_tf32_enabled_matches_the_cpu():
    """SOAP's factors and bases are computed in full fp32 even when TF32 is on for the rest of the run."""
    torch.manual_seed(0)
    w0 = torch.randn(48, 40, dtype=torch.float32)
    target = torch.randn(48, 40)
    results = {}
    for dev in ("cpu", "cuda"):
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = dev == "cuda"
        try:
            w = torch.nn.Parameter(w0.clone().to(dev))
            opt = build_optimizer("soap", [w], 1e-2)
            t = target.to(dev)
            for _ in range(25):
                opt.zero_grad()
                ((w @ w.T - t @ t.T) ** 2).mean().backward()
                opt.step()
            results[dev] = w.detach().cpu()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    assert (results["cpu"] - results["cuda"]).abs().max() / results["cpu"].abs().max() < 1e-3


def test_bf16_and_fp16_training_on_cuda(tmp_path):
    fp32 = train(tiny_config(tmp_path, "train.steps=20", "device=cuda", name="fp32"))
    for precision in ("bf16", "fp16"):
        run = train(tiny_config(tmp_path, "train.steps=20", "device=cuda", f"train.precision={precision}",
                                name=precision))
        losses, ref = _losses(run.run_dir), _losses(fp32.run_dir)
        assert all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]
        assert abs(losses[-1] - ref[-1]) / ref[-1] < 0.15, precision
        assert run.skipped_steps <= 5  # fp16: a few loss-scale overflows at the start at most


def test_sync_free_guard_on_cuda_equals_skipping_with_a_memoryless_optimizer(tmp_path, monkeypatch):
    runs = skip_and_zero_runs(tmp_path, monkeypatch, {2, 5}, "device=cuda")
    assert runs["skip"].skipped_steps == runs["zero"].skipped_steps == 2


def test_auto_guard_is_sync_free_on_cuda(tmp_path):
    """With the defaults on CUDA (nonfinite auto -> zero, SOAP's own check off) a step reads nothing from the
    device: torch's sync debug mode raises on any synchronising call inside the step."""
    cfg = tiny_config(tmp_path, "train.steps=30", "device=cuda", "optim.name=soap", "train.log_every=1000")
    trainer = train_mod.Trainer(cfg, False, (), torch.device("cuda"), train_mod.distributed.Dist())
    assert trainer.nonfinite == "zero"
    x = torch.rand(4, 3, 64, 64, device="cuda")
    for _ in range(3):
        trainer.train_step(x)  # SOAP's first steps build its bases (eigh: synchronising, once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):  # steps 4-8: no basis refresh (every 10 steps)
            trainer.train_step(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_compiled_forward_on_cuda_gives_the_eager_losses(tmp_path):
    eager = train(tiny_config(tmp_path, "train.steps=3", "device=cuda", "train.tf32=false", name="eager"))
    compiled = train(tiny_config(tmp_path, "train.steps=3", "device=cuda", "train.tf32=false",
                                 "train.compile=true", name="compiled"))
    assert _losses(eager.run_dir) == pytest.approx(_losses(compiled.run_dir), rel=1e-3)
