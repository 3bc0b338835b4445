"""SOAP's captured step (lictrain/optim/soap_graph.py) against the eager step it replaces: the same weights, bit
for bit, over runs with many basis refreshes, with and without weight decay, in both semantics, under a changing
learning rate, across a state-dict reload (new buckets, a new graph). On the CPU `capture=True` runs the graph's body
eagerly; tests/test_cuda.py runs the same comparison with real CUDA graphs."""

import pytest
import torch

from lictrain.optim.soap import SOAP


def soap_run(device: str, capture: bool, steps: int = 30, reload_at: int | None = None, **options):
    """A small conv net (4-D kernels: Kronecker units of kh x kw; a 1x1 kernel; biases, plain Adam) trained by SOAP
    with a refresh every 3 steps and a learning rate changed every 7; returns the weights and the optimizer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.GELU(), torch.nn.Conv2d(8, 3, 1)).to(device)
    opt = SOAP(model.parameters(), lr=3e-3, precondition_frequency=3, capture=capture, **options)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(4, 3, 10, 10, generator=gen).to(device)
        opt.zero_grad(set_to_none=step % 2 == 0)  # fresh gradient tensors on some steps, reused on others
        torch.nn.functional.mse_loss(model(x), x[:, :, 1:-1, 1:-1]).backward()
        opt.step()
        if step % 7 == 6:
            for group in opt.param_groups:
                group["lr"] *= 0.7
        if reload_at is not None and step == reload_at:
            state = opt.state_dict()
            opt = SOAP(model.parameters(), lr=3e-3, precondition_frequency=3, capture=capture, **options)
            opt.load_state_dict(state)
    return [p.detach().cpu().clone() for p in model.parameters()], opt


CASES = [dict(), dict(weight_decay=0.1), dict(semantics="authors"), dict(semantics="authors", weight_decay=0.1),
         dict(bias_correction=False)]


@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_the_captured_body_equals_the_eager_step_bit_for_bit(options):
    eager, _ = soap_run("cpu", False, **options)
    captured, opt = soap_run("cpu", True, **options)
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)
    assert opt._graphs, "the captured path was never taken"


def test_a_reloaded_state_gets_new_buckets_and_a_new_graph_with_the_same_result():
    eager, _ = soap_run("cpu", False, reload_at=13)
    captured, opt = soap_run("cpu", True, reload_at=13)
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)
    (graph,) = opt._graphs.values()
    assert graph.buckets is opt._buckets[id(opt.param_groups[0])][1]


def test_a_refresh_keeps_the_storage_the_graph_reads():
    """Bases, moments, factors and Kronecker unit matrices are updated in place by a refresh (a graph holds their
    addresses); the captured step would otherwise read stale matrices. Checked on the buckets after a run."""
    _, opt = soap_run("cpu", True, steps=4)
    buckets = opt._buckets[id(opt.param_groups[0])][1]
    before = [[None if t is None else t.data_ptr() for t in (b.m, b.v, *b.gg, *b.q, *b.mats)] for b in buckets]
    values = [[None if t is None else t.clone() for t in b.mats] for b in buckets]
    for b in buckets:
        b.refresh(exact=False)
    after = [[None if t is None else t.data_ptr() for t in (b.m, b.v, *b.gg, *b.q, *b.mats)] for b in buckets]
    assert before == after
    assert any(not torch.equal(a, b) for vs, b_ in zip(values, buckets) for a, b in zip(vs, b_.mats)
               if a is not None), "the refresh changed no unit matrix: nothing was checked"
