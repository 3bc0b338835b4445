"""The training loop under torch.distributed (2 CPU processes, gloo, environment as torchrun sets it).

Two ranks with per-rank batch 4 follow one process with batch 8 on the same crops; ranks end bit-identical;
a run interrupted and resumed under DDP continues identically; a non-finite loss on one rank skips the step on all.
"""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lictrain.checkpoint import load_checkpoint
from lictrain.config import config_from_dict
from lictrain.methods import StepHook
from lictrain.models import build_model
from tests.conftest import tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _noise_free_quantization():
    """Replace the training-time uniform noise by none, so that a step is a deterministic function of its crops
    (the noise draws of 2 x 4 and 1 x 8 images cannot be the same numbers); everything else is unchanged."""
    import compressai.entropy_models as em

    original = em.EntropyModel.quantize

    def quantize(self, inputs, mode, means=None):
        return inputs.clone() if mode == "noise" else original(self, inputs, mode, means)

    em.EntropyModel.quantize = quantize
    return original


class _DumpWeights(StepHook):
    """A read-only hook that saves this rank's live weights after its last step (only rank 0 checkpoints)."""

    def __init__(self, path, last_step):
        self.path, self.last_step = path, last_step

    def after_step(self, ctx):
        if ctx.step == self.last_step:
            torch.save({k: v.detach().clone() for k, v in self.run.model.state_dict().items()}, self.path)


def _poison_rate_once(rank_and_call):
    """Make the training forward pass number `call` (0-based) of this process return a NaN rate."""
    import lictrain.losses as losses

    forward, calls = losses.RateDistortionLoss.forward, [0]

    def poisoned(self, output, target):
        terms = forward(self, output, target)
        if output["x_hat"].requires_grad:  # training forward passes only (validation runs without a graph)
            if calls[0] == rank_and_call[1]:
                terms.rate = terms.rate * float("nan")
            calls[0] += 1
        return terms

    losses.RateDistortionLoss.forward = poisoned


def _worker(rank, world, port, cfg_dict, resume, noise_free, nan_rank_call, out_dir):
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
    if noise_free:
        _noise_free_quantization()
    if nan_rank_call is not None and rank == nan_rank_call[0]:
        _poison_rate_once(nan_rank_call)
    from lictrain.trainer import train

    cfg = config_from_dict(cfg_dict)
    result = train(cfg, resume=resume, hooks=(_DumpWeights(f"{out_dir}/weights{rank}.pt", cfg.train.steps - 1),))
    torch.save({"skipped": result.skipped_steps, "step": result.step, "train_time": result.train_time},
               f"{out_dir}/result{rank}.pt")


def _spawn(cfg, tmp_path, resume=False, noise_free=False, nan_rank_call=None, world=2):
    mp.spawn(_worker, args=(world, _free_port(), cfg.to_dict(), resume, noise_free, nan_rank_call, str(tmp_path)),
             nprocs=world, join=True)


def _assert_ranks_identical(tmp_path):
    w0, w1 = torch.load(tmp_path / "weights0.pt"), torch.load(tmp_path / "weights1.pt")
    for k, v in w0.items():
        assert torch.equal(v, w1[k]), k


COMMON = ("train.val_every=2", "train.ckpt_every=2", "train.log_every=1", "train.ema_decay=0.9", "data.batch_size=8",
          "data.val_max_images=1", "data.val_crop=64")


@pytest.mark.parametrize("optimizer,method", [("adam", "standard"), ("soap", "standard"),
                                              ("adam", "balanced-rd-qp"), ("sgd", "standard")])
def test_two_ranks_of_batch_4_track_one_process_of_batch_8(tmp_path, monkeypatch, optimizer, method):
    opts = [f"optim.name={optimizer}", f"method.name={method}", "train.steps=4", *COMMON]
    if optimizer == "sgd":
        # plain SGD without clipping is not scale-invariant (Adam and clipping are): a gradient summed instead of
        # averaged over the processes, or averaged twice, would move the weights 2x too far or too short
        opts += ["train.clip_max_norm=0", "optim.lr=1.0e-5", "optim.options={momentum: 0.0}"]
    if optimizer == "soap":
        # eps 1e-6 instead of 1e-8 (coordinates of the eigenbasis where the gradient is rounding noise get
        # Adam-normalised to ~10% of a step at 1e-8) and no basis refresh within the 4 steps (its re-ordering of
        # second moments is discontinuous in near-ties): both only reduce SOAP's amplification of rounding
        opts.append("optim.options={precondition_frequency: 100, eps: 1.0e-6}")
    _spawn(tiny_config(tmp_path, *opts, name="ddp"), tmp_path, noise_free=True)
    # the reference runs in a process of its own with the workers' single thread: conv backward sums in an order
    # that depends on the thread count, and SOAP amplifies such rounding differences (see below)
    single = tmp_path / "single-proc"
    single.mkdir()
    _spawn(tiny_config(tmp_path, *opts, name="single"), single, noise_free=True, world=1)
    _assert_ranks_identical(tmp_path)
    a, b = load_checkpoint(tmp_path / "ddp"), load_checkpoint(tmp_path / "single")
    assert a["state"]["step"] == b["state"]["step"] == 4
    assert a["state"]["images_seen"] == b["state"]["images_seen"] == 32
    torch.manual_seed(0)
    start = build_model("mbt2018-mean", "tiny").state_dict()
    floats = [k for k, v in b["model"].items() if v.is_floating_point()]
    moved = sum(int(not torch.equal(b["model"][k], start[k])) for k in floats)
    assert moved > 10
    if optimizer == "soap":
        # SOAP amplifies rounding differences (summation order; even 1 vs 2 threads in one process) through
        # eigenvectors of nearly degenerate factors and the re-ordering of its second moments: single tensors
        # differ by up to a few % of how far they moved. So the test is relative: the 2-process run must be far
        # closer to the batch-8 run than a wrong plumbing is (one process trained on rank 0's 4 crops only).
        wrong = tmp_path / "wrong-proc"
        wrong.mkdir()
        _spawn(tiny_config(tmp_path, *opts, "data.batch_size=4", name="wrong"), wrong, noise_free=True, world=1)
        c = load_checkpoint(tmp_path / "wrong")

        def rel(x):
            num = sum(float((x["model"][k] - b["model"][k]).double().pow(2).sum()) for k in floats)
            den = sum(float((b["model"][k] - start[k]).double().pow(2).sum()) for k in floats)
            return (num / den) ** 0.5

        assert rel(a) < 0.2 and rel(a) < rel(c) / 4, (rel(a), rel(c))  # seen: 0.12 against 0.70
    elif optimizer == "sgd":  # the displacement from the start agrees to 1e-4 of its size
        num = sum(float((a["model"][k] - b["model"][k]).double().pow(2).sum()) for k in floats)
        den = sum(float((b["model"][k] - start[k]).double().pow(2).sum()) for k in floats)
        assert den > 0 and (num / den) ** 0.5 < 1e-4, (num / den) ** 0.5
    else:  # Adam tracks to rounding
        for k in floats:
            torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=2e-5,
                                       msg=lambda m, k=k: f"{k}: {m}")
        for k, v in b["model"].items():
            if not v.is_floating_point():
                assert torch.equal(a["model"][k], v), k
    # rank 0 logged the training loss averaged over the whole global batch

    la = [json.loads(ln) for ln in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(ln) for ln in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    ta = [r["loss"] for r in la if r["kind"] == "train"]
    tb = [r["loss"] for r in lb if r["kind"] == "train"]
    assert ta == pytest.approx(tb, rel=1e-4)


@pytest.mark.parametrize("optimizer,method", [("soap", "balanced-rd"), ("adam", "balanced-rd-qp")])
def test_ranks_stay_bit_identical_and_a_resumed_ddp_run_continues_identically(tmp_path, optimizer, method):
    opts = [f"optim.name={optimizer}", f"method.name={method}", *COMMON]
    if method == "balanced-rd":
        opts.append("method.options={schedule_steps: 4}")
    _spawn(tiny_config(tmp_path, *opts, "train.steps=4", name="straight"), tmp_path)
    _spawn(tiny_config(tmp_path, *opts, "train.steps=2", name="split"), tmp_path)
    _spawn(tiny_config(tmp_path, *opts, "train.steps=4", name="split"), tmp_path, resume=True)
    _assert_ranks_identical(tmp_path)  # the resumed part's ranks
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["ema"]["model"].items():
        assert torch.equal(v, b["ema"]["model"][k]), k


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    cfg = tiny_config(tmp_path, "optim.name=adam", "train.steps=3", *COMMON, name="nan")
    _spawn(cfg, tmp_path, nan_rank_call=(1, 1))  # rank 1's loss at step 1 is NaN
    r0, r1 = torch.load(tmp_path / "result0.pt"), torch.load(tmp_path / "result1.pt")
    assert r0["skipped"] == r1["skipped"] == 1 and r0["step"] == r1["step"] == 3
    assert r0["train_time"] == r1["train_time"]  # both report the slowest rank's time
    assert load_checkpoint(tmp_path / "nan")["state"]["skipped_steps"] == 1
    _assert_ranks_identical(tmp_path)  # rank 0 skipped too: otherwise its weights would differ from rank 1's
