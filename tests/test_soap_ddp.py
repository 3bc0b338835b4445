"""SOAP under DistributedDataParallel (2 CPU processes, gloo): identical parameters on every rank, and the same
trajectory as one process on the whole batch."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lictrain.optim import build_optimizer


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(),
                               torch.nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1))


def _data(steps=6, batch=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, 8, 8, generator=g), torch.randn(batch, 3, 16, 16, generator=g)) for _ in range(steps)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    opt = build_optimizer("soap", model.parameters(), lr=1e-2, options={"precondition_frequency": 2})
    per = 8 // world
    _train(model, opt, [(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]) for x, y in _data()])
    torch.save({k: v.detach() for k, v in model.module.state_dict().items()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_end_identical_and_track_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    single = _model()
    opt = build_optimizer("soap", single.parameters(), lr=1e-2, options={"precondition_frequency": 2})
    _train(single, opt, _data())
    moved = False
    for k, v in single.state_dict().items():
        assert torch.equal(r0[k], r1[k]), k  # bit-identical across ranks
        assert torch.allclose(r0[k], v, atol=1e-5, rtol=1e-4), k  # averaged gradients = the whole batch's
        moved |= not torch.equal(v, _model().state_dict()[k])
    assert moved
