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
    # Both ranks past their last collective before either tears gloo down: twice in clean-clone CI (never alone) a
    # rank aborted in teardown ("terminate called without an active exception") when its peer had already exited.
    dist.barrier()
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


# ---- sharded SOAP (issue 34): each rank owns a share of the parameters ------------------------------------------
def test_owners_hand_derived():
    from lictrain.optim.soap_shard import assign_owners

    # total 4*10 + 25 + 2*5 = 75, a rank's fair share 37.5: the first unit (40) is cut in two slices of 20; then
    # costliest first to the least-loaded rank: [4] (25) -> 0, [0, 1] (20) -> 1, [2, 3] (20) -> 1, [5, 6] (10) -> 0
    owner = assign_owners([([0, 1, 2, 3], 10.0), ([4], 25.0), ([5, 6], 5.0)], world=2)
    assert owner == {4: 0, 0: 1, 1: 1, 2: 1, 3: 1, 5: 0, 6: 0}
    assert set(assign_owners([([0, 1, 2], 1.0)], world=1).values()) == {0}


def _deep_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                               torch.nn.GELU(), torch.nn.Conv2d(8, 8, 1), torch.nn.GELU(),
                               torch.nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1))


SHARD_OPTIONS = {"precondition_frequency": 3}


def _state_bytes(opt):
    return sum(t.numel() * t.element_size() for st in opt.state.values() for v in st.values()
               for t in (v if isinstance(v, list) else [v]) if isinstance(t, torch.Tensor))


def _shard_worker(rank, world, init_file, out_dir, shard, start, steps, resume):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    net = _deep_model()
    opt = build_optimizer("soap", net.parameters(), lr=1e-2, options={**SHARD_OPTIONS, "shard": shard})
    if resume:
        saved = torch.load(resume)
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
    model = torch.nn.parallel.DistributedDataParallel(net)
    per = 8 // world
    data = _data(steps=start + steps)[start:]
    _train(model, opt, [(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]) for x, y in data])
    g = torch.Generator().manual_seed(7)
    probe = [torch.randn(p.shape, generator=g) for p in net.parameters()]
    preview = opt.precondition(probe)
    full = opt.state_dict()  # every rank calls (collective when sharded)
    out = {"model": {k: v.detach().clone() for k, v in net.state_dict().items()}, "state_bytes": _state_bytes(opt),
           "preview": preview, "optimizer": full}
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # as in _worker
    dist.destroy_process_group()


def _spawn(tmp_path, name, world, shard, start=0, steps=12, resume=None):
    out = tmp_path / name
    out.mkdir()
    mp.spawn(_shard_worker, args=(world, str(out / "init"), str(out), shard, start, steps, resume), nprocs=world,
             join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def test_sharded_soap_equals_replicated_with_half_the_state_and_resumes_at_any_world_size(tmp_path):
    steps = 12  # 4 refreshes at frequency 3
    sharded = _spawn(tmp_path, "sharded", 2, True, steps=steps)
    replicated = _spawn(tmp_path, "replicated", 2, False, steps=steps)
    for k, v in replicated[0]["model"].items():
        assert torch.equal(sharded[0]["model"][k], sharded[1]["model"][k]), k  # bit-identical across ranks
        torch.testing.assert_close(sharded[0]["model"][k], v, rtol=1e-5, atol=1e-6)
    for a, b, c in zip(sharded[0]["preview"], sharded[1]["preview"], replicated[0]["preview"]):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)
    # each rank keeps its share of the state; together exactly the replicated state
    full = replicated[0]["state_bytes"]
    assert sharded[0]["state_bytes"] + sharded[1]["state_bytes"] == full
    assert all(0.3 * full < s["state_bytes"] < 0.7 * full for s in sharded)
    # rank 0's state dict is the full one: the same entries as the replicated run's
    assert sorted(sharded[0]["optimizer"]["state"]) == sorted(replicated[0]["optimizer"]["state"])
    for i, st in replicated[0]["optimizer"]["state"].items():
        torch.testing.assert_close(sharded[0]["optimizer"]["state"][i]["exp_avg_sq"], st["exp_avg_sq"],
                                   rtol=1e-4, atol=1e-9)

    # a checkpoint after 6 steps at 2 processes, resumed at 2 (exactly the uninterrupted run) and at 1 process
    first = _spawn(tmp_path, "first", 2, True, steps=6)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": first[0]["model"], "optimizer": first[0]["optimizer"]}, ckpt)
    again = _spawn(tmp_path, "again", 2, True, start=6, steps=6, resume=str(ckpt))
    for k, v in sharded[0]["model"].items():
        assert torch.equal(again[0]["model"][k], v), k
    single = _deep_model()
    opt = build_optimizer("soap", single.parameters(), lr=1e-2, options=SHARD_OPTIONS)
    saved = torch.load(ckpt)
    single.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    _train(single, opt, _data(steps=12)[6:])
    for k, v in single.state_dict().items():
        torch.testing.assert_close(v, sharded[0]["model"][k], rtol=1e-4, atol=1e-6)
