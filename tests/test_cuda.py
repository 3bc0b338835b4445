"""The GPU path on a GPU: run only where CUDA is present (marked `cuda`; elsewhere they are reported as skipped,
and the session header says so). Each compares the CUDA result with an independent reference: the CPU's numbers,
the eager model, or the host-synchronising guard."""

import copy
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


def test_soap_keeps_its_products_in_full_fp32_on_cuda_under_tf32(monkeypatch):
    """Identical gradients fed to both devices (through the weights, rounding-level differences would be amplified:
    SOAP's first step turns rounding-level components into +-lr steps): the Kronecker factors agree to fp32
    rounding, which 10-bit TF32 products in the factor updates would not give, and inside step() cuBLAS runs in
    full fp32 although the run has TF32 on."""
    from lictrain.optim.common import unpack_symmetric
    from lictrain.optim.soap import SOAP
    from lictrain.precision import numeric_flags

    torch.manual_seed(0)
    grads = [torch.randn(48, 40) * 3 for _ in range(25)]
    inside, factors = [], {}
    real = SOAP._step_group
    monkeypatch.setattr(SOAP, "_step_group", lambda self, group: (
        inside.append(torch.backends.cuda.matmul.fp32_precision) or real(self, group)))
    flags = numeric_flags(torch.device("cuda"), tf32=True, deterministic=False)
    try:
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        for dev in ("cpu", "cuda"):
            w = torch.nn.Parameter(torch.zeros(48, 40, device=dev))
            opt = build_optimizer("soap", [w], 1e-2)
            for g in grads:  # 25 steps: two basis refreshes
                w.grad = g.to(dev)
                opt.step()
            factors[dev] = [unpack_symmetric(f).cpu() for f in opt.state[w]["GG"]]
    finally:
        flags.close()
    for a, b in zip(factors["cpu"], factors["cuda"]):  # (TF32 products would be ~1e-3 off)
        torch.testing.assert_close(b, a, rtol=2e-4, atol=2e-4 * a.abs().max().item())
    assert inside and set(inside) == {"ieee"}


def test_bf16_and_fp16_training_on_cuda(tmp_path):
    fp32 = train(tiny_config(tmp_path, "train.steps=20", "device=cuda", name="fp32"))
    for precision in ("bf16", "fp16"):
        run = train(tiny_config(tmp_path, "train.steps=20", "device=cuda", f"train.precision={precision}",
                                name=precision))
        losses, ref = _losses(run.run_dir), _losses(fp32.run_dir)
        assert all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]
        assert abs(losses[-1] - ref[-1]) / ref[-1] < 0.15, precision
        assert run.skipped_steps == 0  # fp16's loss-scale back-offs are not non-finite steps


def test_sync_free_guard_on_cuda_equals_skipping_with_a_memoryless_optimizer(tmp_path, monkeypatch):
    # (deterministic: two CUDA runs with cuDNN's autotuning need not agree in their last bits)
    runs = skip_and_zero_runs(tmp_path, monkeypatch, {2, 5}, "device=cuda", "train.deterministic=true")
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
        trainer.close()


def test_a_resumed_adam_run_is_sync_free_with_its_step_counters_on_the_cpu(tmp_path):
    """Checkpoints are read on the CPU: torch keeps a non-fused Adam's step counters where they were read, and on
    the GPU each would cost two host reads per parameter tensor per step."""
    cfg = tiny_config(tmp_path, "train.steps=30", "device=cuda", "train.log_every=1000")
    trainer = train_mod.Trainer(cfg, False, (), torch.device("cuda"), train_mod.distributed.Dist())
    x = torch.rand(4, 3, 64, 64, device="cuda")
    for _ in range(3):
        trainer.train_step(x)
    trainer.save()
    trainer.close()
    resumed = train_mod.Trainer(cfg, True, (), torch.device("cuda"), train_mod.distributed.Dist())
    counters = [s["step"] for opt in (resumed.optimizer, resumed.aux_optimizer) for s in opt.state.values()]
    assert counters and all(c.device.type == "cpu" for c in counters)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            resumed.train_step(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        resumed.close()


@pytest.mark.parametrize("name", ["tcm", "elic"])  # (FLIC: tests/test_flic.py)
def test_coding_on_cuda_decodes_the_encoders_reconstruction(name):
    """Encoded and decoded on CUDA: the decoded image is the encoder-side reconstruction (the eval forward, which
    rounds the latents as the encoder does) to float rounding."""
    from lictrain.models import build_model
    from tests.conftest import decoded_and_encoder_side

    torch.manual_seed(0)
    decoded, reference = decoded_and_encoder_side(build_model(name, "tiny"), name, (64, 96), device="cuda")
    assert (decoded - reference).abs().max() < 1e-4


def test_a_cuda_encoded_file_decodes_on_cuda_and_is_refused_on_the_cpu():
    from lictrain.errors import LictrainError
    from lictrain.evaluation import Codec
    from lictrain.models import build_model

    torch.manual_seed(0)
    model = build_model("mbt2018-mean", "tiny")
    with torch.no_grad():
        model.g_a[-1].weight.mul_(40)  # latents of tens, as a trained model's
    gpu = Codec(copy.deepcopy(model), "mbt2018-mean", "tiny", device="cuda")
    x = torch.rand(3, 96, 128)
    bs = gpu.compress(x)
    assert bs.header["device"] == "cuda"
    assert torch.equal(gpu.decompress(copy.deepcopy(bs)), gpu.decompress(copy.deepcopy(bs)))
    cpu = Codec(model, "mbt2018-mean", "tiny", device="cpu")
    with pytest.raises(LictrainError, match="--device cuda"):
        cpu.decompress(bs)


def test_compiled_forward_on_cuda_gives_the_eager_losses(tmp_path):
    from torch._inductor import config as inductor_config

    eager = train(tiny_config(tmp_path, "train.steps=3", "device=cuda", "train.tf32=false", name="eager"))
    with inductor_config.patch(fallback_random=True):  # the eager noise draws (Inductor's generator differs)
        compiled = train(tiny_config(tmp_path, "train.steps=3", "device=cuda", "train.tf32=false",
                                     "train.compile=true", name="compiled"))
    assert _losses(eager.run_dir) == pytest.approx(_losses(compiled.run_dir), rel=1e-3)


def test_cholesky_qr2_refresh_on_cuda_equals_householder_on_the_cpu_without_a_sync():
    """SOAP's CUDA default refresh (CholeskyQR2 in fp64, the shifted redo chosen on the device) gives the CPU's
    Householder basis up to column signs, for a stack where some items fail the first Cholesky, and synchronises
    nothing (torch's sync debug mode would raise)."""
    from lictrain.optim.common import CHOLESKY_SHIFT, power_step_basis

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 32, 40, generator=gen)
    x[2, :4] = 0  # a singular factor: the redo's item
    fs = x @ x.mT
    fs = fs / fs.abs().amax(dim=(1, 2), keepdim=True)
    q_old = torch.linalg.qr(torch.randn(6, 32, 32, generator=gen))[0]
    fs_c, q_c = fs.cuda(), q_old.cuda()
    power_step_basis(fs_c, q_c, "cholesky")  # (warm-up: cuSOLVER's handles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        q, failed = power_step_basis(fs_c, q_c, "cholesky")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not failed.any().item()
    reference = torch.linalg.qr(fs.double() @ q_old.double())[0]
    reference[2] = torch.linalg.qr(fs[2].double() @ q_old[2].double() + CHOLESKY_SHIFT * q_old[2].double())[0]
    q = q.double().cpu()
    signs = torch.sign((q * reference).sum(-2, keepdim=True))
    torch.testing.assert_close(q * signs, reference, rtol=0, atol=1e-4)


def test_soap_captured_in_a_cuda_graph_equals_the_eager_step():
    """SOAP(capture=True) on CUDA replays its non-refresh step as a CUDA graph (soap_graph.py): the same weights as
    the eager step over 30 steps with 10 refreshes and changing learning rates (the same kernels: bit-identical
    unless cuBLAS picks other algorithms inside a capture, hence the fp32-rounding tolerance)."""
    from tests.test_soap_graph import soap_run

    for options in (dict(), dict(weight_decay=0.1, semantics="authors")):
        eager, _ = soap_run("cuda", False, **options)
        captured, opt = soap_run("cuda", True, **options)
        for a, b in zip(eager, captured):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        (graph,) = opt._graphs.values()
        assert graph.graph is not None and graph.replays >= 25, graph.replays
