"""The GPU path made right before it runs, checked on the CPU: no host synchronisation in the training forward (a
host read is a graph break under torch.compile), exact resume (optimizer step counters, fp16's loss scale), fp16
at high lambda, the TF32 flags under both of torch's APIs, decoding that refuses instead of corrupting, and reduced
precision kept out of the computations it would break."""

import copy
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import GDN

import lictrain.trainer as train_mod
from lictrain import distributed
from lictrain.checkpoint import load_checkpoint
from lictrain.errors import LictrainError
from lictrain.evaluation import Codec
from lictrain.losses import RateDistortionLoss
from lictrain.models import build_model, downsampling
from lictrain.models.auxt import orthogonality_penalty
from lictrain.models.numerics import keep_in_fp32, prepare_entropy_models
from lictrain.optim import build_optimizer
from lictrain.precision import compile_model, numeric_flags
from lictrain.registry import MODELS
from lictrain.trainer import Trainer, train, usable_cpus
from tests.conftest import tiny_config


def _lines(run_dir, kind="train"):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(ln)["kind"] == kind]


# ---- no host synchronisation in the training forward ------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n, spec in MODELS.items() if not spec.frames])  # (video: test_video.py)
def test_training_forward_and_loss_compile_without_a_graph_break(name):
    """Every registered model's training forward and R-D loss, as the trainer runs them (entropy models prepared):
    torch.compile sees one graph. CompressAI's own entropy bottleneck reads its permutation from the device (13 host
    reads a step, 6-9 graph breaks), LALIC's WKV chose its path by a host read (40 breaks)."""
    torch.manual_seed(0)
    model = build_model(name, "tiny").train()
    prepare_entropy_models(model)
    side = max(64, downsampling(name))
    x = torch.rand(2, 3, side, side)
    criterion = RateDistortionLoss(0.0483)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda x: criterion(model(x), x).loss)(x)
    assert explained.graph_break_count == 0, sorted({b.reason.splitlines()[0] for b in explained.break_reasons})


@pytest.mark.parametrize("training", [True, False])
def test_the_sync_free_bottleneck_computes_what_compressais_does(training):
    torch.manual_seed(0)
    reference = EntropyBottleneck(6).train(training)
    with torch.no_grad():
        reference.quantiles.add_(torch.randn_like(reference.quantiles))  # medians away from zero
    ours = copy.deepcopy(reference)
    assert prepare_entropy_models(ours) == 1 and isinstance(ours, EntropyBottleneck)
    for shape in ((3, 6, 5, 7), (2, 6, 9)):  # images and 1-D signals
        x = (torch.randn(shape) * 4).requires_grad_()
        outputs = []
        for m in (reference, ours):
            torch.manual_seed(1)  # the same noise draw
            y, lik = m(x)
            grad, = torch.autograd.grad(lik.log().sum() + y.square().sum(), x)
            outputs.append((y, lik, grad))
        for a, b in zip(*outputs):
            assert torch.equal(a, b)
    x = torch.randn(3, 6, 5, 7)
    assert torch._dynamo.explain(ours)(x).graph_break_count == 0
    torch._dynamo.reset()
    assert torch._dynamo.explain(reference)(x).graph_break_count > 0  # the reason the subclass exists


def test_prepared_models_pickle_copy_and_keep_float64():
    model = build_model("mbt2018-mean", "tiny").eval()
    assert prepare_entropy_models(model) == 2 and keep_in_fp32(model, (GDN,)) == 6
    assert prepare_entropy_models(model) == 0  # idempotent
    buffer = io.BytesIO()
    torch.save(model, buffer)  # a whole model, as users save them: the subclasses must be found again
    buffer.seek(0)
    back = torch.load(buffer, weights_only=False)
    for a, b in ((model.entropy_bottleneck, back.entropy_bottleneck), (model.g_a[1], back.g_a[1])):
        assert type(a) is type(b) and type(b).__name__ == type(b).__mro__[1].__name__
    assert type(copy.deepcopy(model).gaussian_conditional) is type(model.gaussian_conditional)
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(model(x)["x_hat"], back(x)["x_hat"])
    # only half precision is raised to fp32: a float64 model stays float64
    gc = GaussianConditional(None).double()
    prepare_entropy_models(gc)
    _, lik = gc(torch.randn(1, 2, 3, 3, dtype=torch.float64), torch.rand(1, 2, 3, 3, dtype=torch.float64) + 0.2)
    assert lik.dtype == torch.float64


def test_the_fp32_wrapper_finds_the_device_among_keyword_arguments():
    """Called with keywords only, the wrapper must turn off the autocast of the tensors' device (on CUDA the CPU's
    would leave CUDA's on): the device is read from keyword arguments too."""
    from lictrain.models.numerics import _device_type

    assert _device_type((), {"inputs": torch.empty(1, device="meta")}) == "meta"
    gc = GaussianConditional(None).eval()
    prepare_entropy_models(gc)
    y, scales, means = torch.randn(1, 4, 5, 5) * 20, torch.rand(1, 4, 5, 5) * 5 + 0.1, torch.randn(1, 4, 5, 5)
    _, reference = gc(y, scales, means=means)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, lik = gc(inputs=y.bfloat16(), scales=scales.bfloat16(), means=means.bfloat16())
    _, exact = gc(y.bfloat16().float(), scales.bfloat16().float(), means=means.bfloat16().float())
    assert torch.equal(lik, exact) and lik.dtype == torch.float32 and not torch.equal(lik, reference)


def test_gdn_is_kept_in_fp32_under_fp16():
    gdn = GDN(4)
    x = torch.full((1, 4, 2, 2), 300.0)  # x^2 = 9e4 is beyond fp16's 65504
    reference = gdn(x)
    with torch.autocast("cpu", dtype=torch.float16):
        plain = gdn(x.half())
    assert not torch.allclose(plain.float(), reference, rtol=1e-2)  # the hazard is real
    keep_in_fp32(gdn, (GDN,))
    with torch.autocast("cpu", dtype=torch.float16):
        kept = gdn(x.half())
    torch.testing.assert_close(kept, reference, rtol=1e-3, atol=1e-3)


# ---- exact resume and fp16 ----------------------------------------------------------------------------------------
def test_checkpoints_are_read_on_the_cpu_so_adams_step_counters_stay_there(tmp_path, monkeypatch):
    """torch leaves a non-fused Adam's step counters where the checkpoint was read; read onto a GPU, each costs two
    host reads per parameter tensor per step. Both resume and fine-tuning read on the CPU (load_state_dict moves the
    moments to the parameters)."""
    src = train(tiny_config(tmp_path, "train.steps=2", name="src"))
    seen = []
    for fn in ("load_checkpoint", "load_weights"):
        real = getattr(train_mod, fn)
        monkeypatch.setattr(train_mod, fn, lambda path, _real=real, **kw: seen.append(kw) or _real(path, **kw))
    resumed = Trainer(tiny_config(tmp_path, "train.steps=4", name="src"), True, (), torch.device("cpu"),
                      distributed.Dist())
    tuned = Trainer(tiny_config(tmp_path, "train.steps=4", f"train.init_from={src.run_dir}",
                                "train.init_state=weights+optimizer", name="tuned"), False, (),
                    torch.device("cpu"), distributed.Dist())
    assert seen == [{}, {}]  # map_location left at its default, the CPU
    for trainer in (tuned, resumed):  # (closed in the reverse order of their creation, as nested contexts)
        counters = [s["step"] for opt in (trainer.optimizer, trainer.aux_optimizer) for s in opt.state.values()]
        assert counters and all(c.device.type == "cpu" and c.dtype == torch.float32 and c.item() == 2
                                for c in counters)
        trainer.close()


def test_fp16_at_high_lambda_backs_off_without_skipping_and_resumes_exactly(tmp_path):
    """At lambda 0.0483 fp16's first steps overflow until the loss scale has come down from 2^16: back-offs, not
    non-finite steps (10 of those used to stop the run). The scale is checkpointed, so a resumed run continues
    bit for bit."""
    common = ("train.precision=fp16", "loss.lmbda=0.0483", "train.ckpt_every=7", "train.steps=16")
    whole = train(tiny_config(tmp_path, *common, name="whole"))
    assert whole.step == 16 and whole.skipped_steps == 0
    last = _lines(whole.run_dir)[-1]
    assert last["scale_backoffs"] >= 5 and last["loss_scale"] <= 2**16 / 2**last["scale_backoffs"] * 2
    part = train(tiny_config(tmp_path, *common[:-1], "train.steps=7", name="part"))
    saved = load_checkpoint(part.run_dir)["scaler"]
    assert saved["scale"] < 2**16
    resumed = train(tiny_config(tmp_path, *common, name="part"), resume=True)
    a, b = load_checkpoint(whole.run_dir), load_checkpoint(resumed.run_dir)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["scaler"] == b["scaler"] and a["state"]["scale_backoffs"] == b["state"]["scale_backoffs"]


def test_a_stuck_fp16_run_still_stops(tmp_path, monkeypatch):
    """Below a loss scale of 1 an overflow is the gradients' own: counted, so max_consecutive_skips still ends a run
    whose gradients never become finite (here: a finite loss with infinite gradients, from 16 back-offs on)."""
    def infinite_gradients(name, preset, kwargs=None):
        model = build_model(name, preset, kwargs)
        model.g_s[0].weight.register_hook(lambda g: g * float("inf"))
        return model

    monkeypatch.setattr(train_mod, "build_model", infinite_gradients)
    with pytest.raises(LictrainError, match="stopped at step 19: 3 consecutive"):
        train(tiny_config(tmp_path, "train.steps=40", "train.precision=fp16", "train.max_consecutive_skips=3"))


# ---- process-global flags -----------------------------------------------------------------------------------------
_FLAG_SCRIPT = r"""
import json, sys, torch
from lictrain.optim import build_optimizer
from lictrain.optim.soap import SOAP

b = torch.backends
def flags():
    out = [b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision, b.cudnn.conv.fp32_precision]
    try:
        out.append(torch.get_float32_matmul_precision())
    except RuntimeError:
        out.append("raises")
    return out
setting = sys.argv[1]
if setting == "legacy":
    b.cuda.matmul.allow_tf32 = True
elif setting == "new":
    b.cuda.matmul.fp32_precision = "tf32"
else:
    torch.set_float32_matmul_precision("medium")
before, inside = flags(), []
real = SOAP._step_group
SOAP._step_group = lambda self, group, *rest: inside.append(flags()[:2]) or real(self, group, *rest)
w = torch.nn.Parameter(torch.randn(12, 10))
opt = build_optimizer("soap", [w], 1e-2)
for _ in range(12):  # through a basis refresh
    opt.zero_grad()
    (w @ w.T).square().mean().backward()
    opt.step()
opt.precondition([torch.randn(12, 10)])
print(json.dumps({"before": before, "after": flags(), "inside": inside}))
"""


@pytest.mark.parametrize("setting", ["legacy", "new", "medium"])
def test_soap_runs_under_either_tf32_api_and_restores_every_flag(setting):
    """SOAP used to toggle the legacy flag: after the new API set TF32 its first step raised, and after
    set_float32_matmul_precision("medium") the precision could no longer be read. (A fresh process each: these
    flags are process-global and the API mix is sticky.)"""
    run = subprocess.run([sys.executable, "-c", _FLAG_SCRIPT, setting], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["after"] == seen["before"]  # (after the new API's "tf32" torch itself cannot report a precision)
    assert setting == "new" or "raises" not in seen["after"]
    assert seen["inside"] and all(x == ["ieee", "ieee"] for x in seen["inside"])  # cuBLAS and oneDNN in full fp32


def test_the_runs_flags_are_set_for_cuda_and_put_back():
    b = torch.backends
    before = (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.benchmark, b.cudnn.deterministic,
              torch.are_deterministic_algorithms_enabled())
    stack = numeric_flags(torch.device("cuda"), tf32=True, deterministic=False)  # sets flags only: no CUDA needed
    assert (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.benchmark) == ("tf32", "tf32", True)
    stack.close()
    stack = numeric_flags(torch.device("cuda"), tf32=False, deterministic=True)
    assert (b.cuda.matmul.fp32_precision, b.cudnn.benchmark, b.cudnn.deterministic) == ("ieee", False, True)
    assert torch.are_deterministic_algorithms_enabled()
    stack.close()
    assert (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.benchmark, b.cudnn.deterministic,
            torch.are_deterministic_algorithms_enabled()) == before


def test_a_deterministic_run_is_deterministic_inside_and_leaves_no_flag_behind(tmp_path):
    class Watch(train_mod.StepHook):
        seen: list = []

        def before_backward(self, ctx):
            self.seen.append(torch.are_deterministic_algorithms_enabled())

    train(tiny_config(tmp_path, "train.steps=2", "train.deterministic=true"), hooks=(Watch(),))
    assert Watch.seen == [True, True] and not torch.are_deterministic_algorithms_enabled()


def test_soap_preconditions_in_full_precision_under_autocast():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(24, 20))
    opt = build_optimizer("soap", [w], 1e-2)
    for _ in range(3):
        opt.zero_grad()
        (w @ w.T).square().mean().backward()
        opt.step()
    g = torch.randn(24, 20)
    plain = opt.precondition([g])[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = opt.precondition([g])[0]
    assert under.dtype == torch.float32 and torch.equal(plain, under)


def test_compiled_forwards_draw_the_eager_noise_when_a_method_needs_it():
    """Balanced R-D re-evaluates a step's batch with the step's noise on the eager model: a compiled forward must
    then draw what the eager one draws (Inductor's own generator does not)."""
    from torch._inductor import config as inductor_config

    class Noisy(nn.Module):
        def forward(self, x):
            return x + torch.empty_like(x).uniform_(-0.5, 0.5)

    model, x = Noisy(), torch.zeros(256)
    with inductor_config.patch(fallback_random=False):  # (put back afterwards: compile_model sets it for the process)
        compiled = compile_model(model, True, eager_random=True)
        torch.manual_seed(3)
        a = compiled(x)
        assert inductor_config.fallback_random
    torch.manual_seed(3)
    assert torch.equal(a, model(x))


# ---- coding ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def codec_and_file():
    torch.manual_seed(0)
    model = build_model("mbt2018-mean", "tiny")
    with torch.no_grad():  # latents of tens, as a trained model's (bf16 then moves their rounding)
        model.g_a[-1].weight.mul_(40)
    codec = Codec(model, "mbt2018-mean", "tiny")
    x = torch.rand(3, 64, 80)
    return codec, x, codec.compress(x)


def test_a_file_from_another_device_kind_is_refused_before_decoding(codec_and_file):
    codec, _, bs = codec_and_file
    other = copy.deepcopy(bs)
    other.header.update(device="cuda", device_name="NVIDIA H200")
    with pytest.raises(LictrainError, match=r"encoded on NVIDIA H200 \(cuda, fp32\); decoding on cpu \(cpu, fp32\) "
                                            r"would desynchronise .* --device cuda") as e:
        codec.decompress(other)
    assert "\n" not in str(e.value)
    other.header.update(device="cpu", device_name="cpu", numeric="bf16")
    with pytest.raises(LictrainError, match=r"cpu \(cpu, bf16\).*a decoder that codes in bf16"):
        codec.decompress(other)


def test_a_decoder_whose_table_choices_differ_refuses_its_output(codec_and_file, monkeypatch):
    """One table index chosen differently (as another GPU's last bits can cause) desynchronises rANS silently:
    the digest of the choices catches it."""
    codec, x, bs = codec_and_file
    assert torch.equal(codec.decompress(bs), codec.decompress(copy.deepcopy(bs)))
    gc = codec.model.gaussian_conditional
    real = type(gc).build_indexes

    def one_off(self, scales):
        idx = real(self, scales).clone()
        idx.view(-1)[7] = (idx.view(-1)[7] + 1) % len(self.scale_table)
        return idx

    monkeypatch.setattr(type(gc), "build_indexes", one_off)
    with pytest.raises(LictrainError, match="table choices or symbols differ from the encoder.s"):
        codec.decompress(bs)


def test_a_decoder_with_other_tables_refuses_the_file_or_its_output(codec_and_file):
    """Tables that differ (another library version builds them otherwise) are refused before decoding by their
    fingerprint; tables changed behind the fingerprint's back decode other symbols from the same choices, which
    the digest of the symbols catches."""
    codec, _, bs = codec_and_file
    other = copy.deepcopy(bs)
    other.header["tables"] = bytes(8)
    with pytest.raises(LictrainError, match="other entropy-coder tables"):
        codec.decompress(other)
    changed = copy.deepcopy(codec)
    cdf = changed.model.gaussian_conditional._quantized_cdf
    cdf[:, 1:-1] = cdf[:, 1:-1].flip(0)  # the scales' tables swapped around (their lengths and offsets kept)
    with pytest.raises(LictrainError, match="table choices or symbols differ"):
        changed.decompress(copy.deepcopy(bs))


def test_elic_and_lalic_round_y_minus_mu_in_fp32_under_bf16_autocast():
    """CompressAI's latent codecs round y - means themselves (ELIC's and LALIC's entropy models): kept in fp32, the
    synthesis transform receives fp32 y_hat (bf16 before)."""
    for name in ("elic", "lalic"):
        torch.manual_seed(0)
        model = build_model(name, "tiny").train()
        prepare_entropy_models(model)
        seen = []
        model.g_s.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.rand(1, 3, 64, 64))
        assert seen == [torch.float32], name


def test_coding_ignores_the_callers_autocast(codec_and_file):
    codec, x, bs = codec_and_file
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = codec.compress(x)
    assert again.strings == bs.strings and again.header == bs.header


# ---- reduced precision kept out -----------------------------------------------------------------------------------
def test_auxts_orthogonality_penalty_is_fp32_under_autocast():
    torch.manual_seed(0)
    w = torch.eye(32) + 1e-3 * torch.randn(32, 32)  # |G - I| ~ 2e-3: below bf16's spacing near 1
    exact = orthogonality_penalty(w.double()).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = orthogonality_penalty(w)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(exact, rel=1e-4)


def test_tcm_rounds_y_minus_mu_in_fp32_under_bf16_autocast():
    """The decoder's input y_hat = round(y - mu) + mu: in bf16 it would move by up to 0.125 for |y| >= 32."""
    torch.manual_seed(0)
    model = build_model("tcm", "tiny").train()
    prepare_entropy_models(model)
    pairs = []
    real_params, real_refine = model._slice_params, model._refine
    model._slice_params = lambda *a: pairs.append([real_params(*a)[0]]) or real_params(*a)
    model._refine = lambda i, support, y_hat: pairs[i].append(y_hat) or real_refine(i, support, y_hat)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.rand(1, 3, 64, 64))
    for mu, y_hat in pairs:
        offset = y_hat - mu.float()
        assert y_hat.dtype == torch.float32 and (offset - offset.round()).abs().max() < 1e-4


# ---- small things -------------------------------------------------------------------------------------------------
def test_usable_cpus_honours_a_container_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(v1) == 1


def test_the_collective_timeout_is_long_and_settable(monkeypatch):
    """torch's NCCL default (10 minutes) can be shorter than rank 0's validation and checkpoint, during which the
    other ranks wait in a collective: the process group is made with 60 minutes, or the variable's."""
    from datetime import timedelta

    import torch.distributed as torch_dist

    made = {}
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch_dist, "init_process_group", lambda **kw: made.update(kw))
    monkeypatch.setattr(torch_dist, "get_rank", lambda: 0)
    monkeypatch.setattr(torch_dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LICTRAIN_COLLECTIVE_TIMEOUT_MIN", raising=False)
    distributed.setup(torch.device("cpu"))
    assert made == {"backend": "gloo", "timeout": timedelta(minutes=60)}
    assert distributed.collective_timeout_minutes() == 60
    monkeypatch.setenv("LICTRAIN_COLLECTIVE_TIMEOUT_MIN", "15")
    assert distributed.collective_timeout_minutes() == 15
    monkeypatch.setenv("LICTRAIN_COLLECTIVE_TIMEOUT_MIN", "soon")
    with pytest.raises(LictrainError, match="positive number of minutes"):
        distributed.collective_timeout_minutes()


def test_the_prepared_gpu_check_runs_dry_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: every section of the GPU check on tiny sizes, so it cannot rot between the
    sessions that are lent a GPU."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable}
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(results["seconds"]) == {"sync", "amp", "determinism", "coding", "eval", "refresh", "step", "profile"}
    assert results["refresh"]["max_sign_diff"] < 1e-3 and len(results["refresh"]["soap_step"]) == 3
    assert "tracebacks" not in results, results.get("tracebacks")
    assert results["amp"]["fp16"]["skipped"] == 0 and results["coding"]["mbt2018-mean"]["repeatable"]
    assert results["determinism"]["mbt2018-mean"] == {"repeat": True, "resume": True}
    assert len(results["step"]) == 2 and "| mbt2018-mean | 2 | fp32 | soap |" in (tmp_path / "verdict.md").read_text()


def test_ms_ssim_equals_pytorch_msssim_and_compiles_without_a_graph_break():
    """lictrain's MS-SSIM keeps the window and weights on the device (pytorch_msssim copies them from the CPU at
    every call: a host synchronisation each on a GPU) and must give the library's number."""
    from pytorch_msssim import ms_ssim

    from lictrain.losses import ms_ssim_value

    torch.manual_seed(0)
    a = torch.rand(2, 3, 176, 200)
    b = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    ours = ms_ssim_value(a, b)
    assert ours.item() == pytest.approx(ms_ssim(a, b, data_range=1.0, size_average=True).item(), abs=1e-7)
    torch._dynamo.reset()
    assert torch._dynamo.explain(ms_ssim_value)(a, b).graph_break_count == 0


def test_tcm_attention_in_chunks_and_its_mask_cache(monkeypatch):
    """Fused attention kernels give the heads x windows axis one grid dimension (at most 65,535 blocks), so TCM
    attends in chunks along it: the result must not depend on the chunk size. The shifted-window mask is kept for
    the last map size only, and not at all when large."""
    import lictrain.models.tcm as tcm

    torch.manual_seed(0)
    block = tcm.WindowAttention(16, 8, 4, shifted=True).eval()
    x = torch.randn(2, 12, 20, 16)
    whole = block(x)
    monkeypatch.setattr(tcm, "ATTENTION_CHUNK", 5)  # 2 heads x 15 windows in 6 chunks
    torch.testing.assert_close(block(x), whole, rtol=0, atol=1e-6)
    assert block._mask_cache[0][:2] == (12, 20)
    block(torch.randn(1, 8, 8, 16))
    assert block._mask_cache[0][:2] == (8, 8)  # only the last size
    monkeypatch.setattr(tcm, "MASK_CACHE_NUMBERS", 10)
    block(torch.randn(1, 16, 16, 16))
    assert block._mask_cache is None


def test_the_gpu_convergence_payload_stops_at_its_deadline_with_checkpoints(tmp_path):
    """benchmarks/gpu_converge.sh --dry-run (parallel_compare with --deadline): runs that cannot finish in time are
    told to stop, each checkpoints (so the same call resumes them), the progress of each is printed, exit 3."""
    from pathlib import Path

    from lictrain.checkpoint import load_checkpoint

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable, "SEEDS": "0", "LAMBDAS_DRY": "0.0067",
           "DEADLINE": "25"}
    run = subprocess.run(["bash", "benchmarks/gpu_converge.sh", "--dry-run", "--set", "train.steps=1000000",
                          "--set", "train.stop_when_converged=false"],  # (the tiny model may converge in seconds)
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 3, run.stdout[-3000:] + run.stderr[-3000:]
    runs = sorted((tmp_path / "converge" / "runs").glob("*"))
    assert [r.name.split("-")[0] for r in runs] == ["adam", "soap"]
    for r in runs:
        step = load_checkpoint(r / "checkpoint.pt")["state"]["step"]
        assert 0 < step < 1000000
        assert f"{r.name}: step " in run.stdout and "not finished" in run.stdout
    assert "deadline: stopping 2 running jobs" in run.stdout
