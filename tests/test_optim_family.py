"""The comparison family: registry behaviour, Muon's kernel views, Shampoo's inverse roots."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from lictrain.errors import LictrainError
from lictrain.optim import OPTIMIZERS, build_optimizer
from lictrain.optim.shampoo import Shampoo, inverse_root


def test_unknown_optimizer_and_option_are_one_line_errors():
    p = [torch.nn.Parameter(torch.randn(2))]
    with pytest.raises(LictrainError, match="valid optimizers: adam, adamw, sgd, cautious-adam, adagrad, soap, shampoo, muon"):
        build_optimizer("lion", p, 1e-3)
    with pytest.raises(LictrainError, match="precondition_frequency"):
        build_optimizer("soap", p, 1e-3, {"precondition_freq": 3})
    with pytest.raises(LictrainError, match="wrapper"):
        build_optimizer("adam+ema", p, 1e-3)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_decreases_a_small_conv_regression(name):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.ConvTranspose2d(8, 3, 3, padding=1))
    x = torch.randn(4, 3, 8, 8)
    y = torch.tanh(x.flip(1))
    opt = build_optimizer(name, net.parameters(), lr=0.03 if name == "sgd" else 3e-3)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.7 * first, (name, first, loss.item())


def test_muon_updates_kernels_as_torch_muon_on_the_flattened_matrix():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3)
    flat = torch.nn.Parameter(conv.weight.detach().clone().view(5, -1))
    ours = build_optimizer("muon", [conv.weight, conv.bias], lr=1e-2)
    ref = torch.optim.Muon([flat], lr=1e-2, weight_decay=0.0, momentum=0.95, nesterov=True,
                           adjust_lr_fn="match_rms_adamw")
    bias_ref = torch.nn.Parameter(conv.bias.detach().clone())
    adamw = torch.optim.AdamW([bias_ref], lr=1e-2, weight_decay=0.0)
    for _ in range(5):
        g, gb = torch.randn(5, 3, 3, 3), torch.randn(5)
        conv.weight.grad, conv.bias.grad = g.clone(), gb.clone()
        flat.grad, bias_ref.grad = g.view(5, -1).clone(), gb.clone()
        ours.step()
        ref.step()
        adamw.step()
    assert torch.allclose(conv.weight.view(5, -1), flat, atol=1e-6)
    assert torch.allclose(conv.bias, bias_ref, atol=1e-6)
    ours.param_groups[0]["lr"] = 1e-3  # a scheduler's change reaches the inner optimizers
    state = ours.state_dict()
    assert state["lr"][0] == 1e-3


@pytest.mark.parametrize("name", ["muon", "shampoo", "soap", "adam"])
def test_a_restored_optimizer_continues_exactly(name):
    """3 steps, state_dict into a fresh optimizer on copied weights, 3 more steps with the same gradients: the same
    weights as 6 steps without the interruption (momenta, preconditioners, step counts and lr all restored)."""
    torch.manual_seed(0)
    shapes = [(6, 3, 3, 3), (6,), (4, 5)]
    grads = [[torch.randn(s) for s in shapes] for _ in range(6)]
    options = {"precondition_frequency": 2} if name in ("soap", "shampoo") else {}

    def fresh(values):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        return params, build_optimizer(name, params, 1e-2, options)

    start = [torch.randn(s) for s in shapes]
    straight, opt = fresh(start)
    first, opt1 = fresh(start)
    for i, gs in enumerate(grads):
        for p, g in zip(straight, gs):
            p.grad = g.clone()
        opt.step()
        if i < 3:
            for p, g in zip(first, gs):
                p.grad = g.clone()
            opt1.step()
    opt1.param_groups[0]["lr"] = 1e-2  # unchanged; a different value in the fresh optimizer must be overwritten
    second, opt2 = fresh([p.detach() for p in first])
    opt2.param_groups[0]["lr"] = 5.0
    opt2.load_state_dict(opt1.state_dict())
    for gs in grads[3:]:
        for p, g in zip(second, gs):
            p.grad = g.clone()
        opt2.step()
    for a, b in zip(straight, second):
        assert torch.equal(a, b), name
    # and the interruption is visible if the state is not restored (the test can fail)
    third, opt3 = fresh([p.detach() for p in first])
    for gs in grads[3:]:
        for p, g in zip(third, gs):
            p.grad = g.clone()
        opt3.step()
    assert not all(torch.equal(a, b) for a, b in zip(straight, third))


def test_inverse_root_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 9))
    f = a @ a.T
    ours = inverse_root(torch.tensor(f), 4, 0.0).numpy()
    ref = np.real(scipy.linalg.fractional_matrix_power(f, -0.25))
    assert np.allclose(ours, ref, rtol=1e-6, atol=1e-8)


def test_shampoo_direction_is_the_kronecker_preconditioned_momentum_grafted_to_adam():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(4, 6, dtype=torch.float64))
    opt = Shampoo([p], lr=1.0, betas=(0.0, 0.0), shampoo_beta=0.0, eps=0.0, matrix_eps=1e-9, precondition_frequency=1)
    g = torch.randn(4, 6, dtype=torch.float64)
    p.grad = g.clone()
    opt.step()
    L, R = g @ g.T, g.T @ g
    lp = np.real(scipy.linalg.fractional_matrix_power(L.numpy() + 1e-9 * np.linalg.eigvalsh(L.numpy()).max() * np.eye(4), -0.25))
    rp = np.real(scipy.linalg.fractional_matrix_power(R.numpy() + 1e-9 * np.linalg.eigvalsh(R.numpy()).max() * np.eye(6), -0.25))
    direction = lp @ g.numpy() @ rp
    adam = np.sign(g.numpy())  # Adam's first step with betas 0 and eps 0
    expected = -direction * np.linalg.norm(adam) / np.linalg.norm(direction)
    assert np.allclose(p.detach().numpy(), expected, rtol=1e-4, atol=1e-6)


def test_cautious_adam_two_steps_by_hand():
    from lictrain.optim.cautious import CautiousAdam

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64))
    opt = build_optimizer("cautious-adam", [p], lr=0.01, options={"eps": 0.0})  # eps 0: exact hand values
    assert isinstance(opt, CautiousAdam)
    g1 = torch.tensor([0.1, -0.2, 0.3, -0.4], dtype=torch.float64)
    g2 = torch.tensor([0.2, 0.1, -0.5, -0.1], dtype=torch.float64)
    p.grad = g1.clone()
    opt.step()
    # step 1: m = 0.1 g1 agrees with g1 everywhere (mask of ones, scale 1): Adam's first step, lr * sign(g)
    expected = torch.tensor([1.0 - 0.01, -2.0 + 0.01, 0.5 - 0.01, 3.0 + 0.01], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-15)
    after_first = p.detach().clone()
    p.grad = g2.clone()
    opt.step()
    # step 2 by hand: m = 0.09 g1 + 0.1 g2 = (0.029, -0.008, -0.023, -0.046); m * g2 > 0 -> mask (1, 0, 1, 1),
    # mean 3/4, scale 4/3; v = 0.999 * 0.001 g1^2 + 0.001 g2^2; step = lr / (1 - 0.81) * scale * mask * m / sqrt(v_hat)
    m = torch.tensor([0.029, -0.008, -0.023, -0.046], dtype=torch.float64)
    v = 0.999 * 0.001 * g1**2 + 0.001 * g2**2
    v_hat = v / (1 - 0.999**2)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    step = 0.01 / (1 - 0.9**2) * (4 / 3) * mask * m / v_hat.sqrt()
    torch.testing.assert_close(p.detach(), after_first - step, rtol=0, atol=1e-12)
    assert p[1].item() == after_first[1].item()  # the disagreeing coordinate did not move


def test_cautious_adam_scale_is_capped():
    # one coordinate in twenty agrees: the mask mean is 0.05, the rescaling is capped at max_scale = 10 (not 20)
    p = torch.nn.Parameter(torch.zeros(20, dtype=torch.float64))
    opt = build_optimizer("cautious-adam", [p], lr=1.0, options={"betas": (0.5, 0.999), "eps": 0.0})
    p.grad = torch.ones(20, dtype=torch.float64)
    opt.step()
    before = p.detach().clone()
    g = -torch.ones(20, dtype=torch.float64) * 0.2  # m = 0.15 > 0 but g < 0: disagreement, except coordinate 0
    g[0] = 1.0
    p.grad = g
    opt.step()
    moved = (p.detach() - before)
    assert (moved[1:] == 0).all()
    st = opt.state[p]
    m0, v0 = st["exp_avg"][0].item(), st["exp_avg_sq"][0].item()
    expected = -1.0 / (1 - 0.25) * 10 * m0 / math.sqrt(v0 / (1 - 0.999**2))
    assert moved[0].item() == pytest.approx(expected, rel=1e-12)


def test_weight_decay_and_muon_act_on_kernels_only():
    import lictrain
    from lictrain.models import build_model

    torch.manual_seed(0)
    model = build_model("mbt2018-mean", "tiny")
    named = [(n, p) for n, p in model.named_parameters() if not n.endswith("quantiles")]
    opt = lictrain.build_optimizer(model, "adamw", lr=0.1)  # weight decay 1e-2 by default
    before = {n: p.detach().clone() for n, p in named}
    for _, p in named:
        p.grad = torch.zeros_like(p)  # Adam's part is zero: only the decoupled decay moves anything
    opt.step()
    kernels = {n for n, _ in named if n.endswith("weight") and not n.startswith("entropy_bottleneck")
               and ".beta" not in n and ".gamma" not in n}
    assert "g_a.0.weight" in kernels and "g_a.1.gamma" not in kernels and "h_s.0.bias" not in kernels
    for n, p in named:
        if n in kernels:
            assert torch.equal(p.detach(), before[n] * (1 - 0.1 * 1e-2)), n
        else:  # biases, GDN beta/gamma, the entropy bottleneck's density parameters
            assert torch.equal(p.detach(), before[n]), n
    muon = lictrain.build_optimizer(model, "muon", lr=0.01)
    muon_ids = {id(p) for p in muon.param_groups[0]["params"]}
    assert muon.param_groups[0]["part"] == "muon"
    assert {n for n, p in named if id(p) in muon_ids} == kernels  # GDN's gamma and the bottleneck's matrices: AdamW
    # without a model (plain parameters) every parameter is treated alike: one group, as before
    assert len(lictrain.build_optimizer([p for _, p in named], "adamw", lr=0.1).param_groups) == 1
