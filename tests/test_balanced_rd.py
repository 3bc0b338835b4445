"""Balanced R-D: the QP against brute force and the KKT system, the weight update by hand, equivalence with the
standard method at neutral weights, a toy problem where balancing provably lands elsewhere, and training runs."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from tests.conftest import tiny_config
from lictrain.checkpoint import load_checkpoint
from lictrain.losses import RDTerms
from lictrain.methods import RunContext, StepContext
from lictrain.methods.balanced_rd import (BalancedRD, BalancedRDQP, cosine_decay, effective_weights,
                                          log_improvement, qp_weight_rate)
from lictrain.methods.standard import Standard
from lictrain.trainer import train


def _gram(g1, g2):
    return float(g1 @ g1), float(g2 @ g2), float(g1 @ g2)


def _gradient_pairs():
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(20):  # generic
        pairs.append((rng.normal(size=50), rng.normal(size=50) * rng.uniform(0.1, 10)))
    for scale in (0.5, 2.0, 30.0):  # near-parallel, different lengths
        g = rng.normal(size=50)
        pairs.append((g, scale * g + 1e-4 * rng.normal(size=50)))
    for scale in (0.3, 1.0, 4.0):  # nearly opposed
        g = rng.normal(size=50)
        pairs.append((g, -scale * g + 1e-3 * rng.normal(size=50)))
    g = rng.normal(size=50)
    pairs.append((g, g.copy()))  # identical: every w gives the same point
    return pairs


@pytest.mark.parametrize("k", range(len(_gradient_pairs())))
def test_qp_weight_matches_brute_force_minimum(k):
    g1, g2 = _gradient_pairs()[k]
    f = lambda w: float(np.sum((w * g1 + (1 - w) * g2) ** 2))  # noqa: E731
    brute = minimize_scalar(f, bounds=(0, 1), method="bounded", options={"xatol": 1e-12})
    grid = np.linspace(0, 1, 20001)
    best_grid = min(f(w) for w in grid)
    w = qp_weight_rate(*_gram(g1, g2))
    assert 0.0 <= w <= 1.0
    scale = f(0) + f(1)
    assert f(w) <= min(brute.fun, best_grid) + 1e-9 * scale
    if np.sum((g1 - g2) ** 2) > 1e-6 * (g1 @ g1 + g2 @ g2):  # strictly convex: the minimiser is unique
        assert w == pytest.approx(brute.x, abs=1e-5)


def test_qp_interior_solution_solves_the_equality_constrained_kkt_system():
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(50):
        g1, g2 = rng.normal(size=30), rng.normal(size=30)
        w = qp_weight_rate(*_gram(g1, g2))
        if not 0 < w < 1:
            continue
        G = np.stack([g1, g2], 1)
        kkt = np.block([[G.T @ G, np.ones((2, 1))], [np.ones((1, 2)), np.zeros((1, 1))]])
        sol = np.linalg.solve(kkt, np.array([0.0, 0.0, 1.0]))
        assert w == pytest.approx(sol[0], abs=1e-9)
        d = w * g1 + (1 - w) * g2
        assert g1 @ d == pytest.approx(g2 @ d, rel=1e-9)  # equal first-order progress of both objectives
        checked += 1
    assert checked >= 10


def test_qp_degenerate_inputs_give_finite_weights():
    assert qp_weight_rate(0.0, 0.0, 0.0) == 0.5  # both gradients zero
    assert qp_weight_rate(1.0, 1.0, 1.0) == 0.5  # identical
    assert qp_weight_rate(float("nan"), 1.0, 0.0) == 0.5
    assert qp_weight_rate(0.0, 4.0, 0.0) == 1.0  # a zero rate gradient is already the min-norm point
    eff = effective_weights(torch.tensor([0.5, 0.5], dtype=torch.float64),
                            torch.tensor([0.0, 3.0], dtype=torch.float64), 1e-8, "log")  # a zero loss is floored
    assert torch.isfinite(eff).all() and eff.sum().item() == pytest.approx(2.0)


def test_effective_weights_neutral_point_is_the_standard_gradient():
    losses = torch.tensor([0.7, 42.0], dtype=torch.float64)
    w = losses / losses.sum()  # both objectives weighted by their size: equal relative progress
    assert effective_weights(w, losses, 1e-8, "log").tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    # equal weights on the logs favour the smaller objective by the ratio of the losses
    eff = effective_weights(torch.tensor([0.5, 0.5], dtype=torch.float64), losses, 1e-8, "log")
    assert eff[0] / eff[1] == pytest.approx(42.0 / 0.7)
    # in space 'loss' the weights act on the objectives directly: (1/2, 1/2) is the standard gradient
    assert effective_weights(torch.tensor([0.5, 0.5]), losses, 1e-8, "loss").tolist() == [1.0, 1.0]
    assert effective_weights(torch.tensor([0.25, 0.75]), losses, 1e-8, "loss").tolist() == [0.5, 1.5]


def test_logit_update_by_hand_and_direction():
    m = BalancedRD(weight_lr=1.0, final_ratio=1.0, gamma=0.0, logit_optimizer="sgd")
    # rate improved by 0.1 (in log), distortion not at all: w = (1/2, 1/2), J = [[1/4, -1/4], [-1/4, 1/4]]
    m.update_logits(torch.tensor([0.1, 0.0], dtype=torch.float64), step=0)
    assert m.logits.detach().tolist() == pytest.approx([-0.025, 0.025], abs=1e-15)
    w = m.weights
    assert w.sum().item() == pytest.approx(1.0) and w[0] < 0.5  # the objective that improved more loses weight
    # gamma pulls the logits back towards equal weights when nothing improves
    m2 = BalancedRD(weight_lr=0.5, final_ratio=1.0, gamma=0.1, logit_optimizer="sgd")
    with torch.no_grad():
        m2.logits.copy_(torch.tensor([1.0, -1.0], dtype=torch.float64))
    m2.update_logits(torch.tensor([0.0, 0.0]), step=0)
    assert m2.logits.detach().tolist() == pytest.approx([0.95, -0.95], abs=1e-15)
    # Adam (default) moves the same way and keeps the weights on the simplex through many steps
    m3 = BalancedRD()
    for t in range(200):
        m3.update_logits(torch.tensor([0.02, 0.001]), step=t)
        w = m3.weights
        assert (w > 0).all() and w.sum().item() == pytest.approx(1.0)
    assert m3.weights[0] < 0.2


def test_cosine_weight_schedule_and_constant_default():
    assert cosine_decay(0, 100, 0.02, 0.1) == pytest.approx(0.02)
    assert cosine_decay(50, 100, 0.02, 0.1) == pytest.approx(0.02 * 0.55)
    assert cosine_decay(100, 100, 0.02, 0.1) == pytest.approx(0.002)
    assert cosine_decay(500, 100, 0.02, 0.1) == pytest.approx(0.002)
    vals = [cosine_decay(t, 100, 1.0, 0.0) for t in range(101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert cosine_decay(7, 0, 0.3, 0.1) == 0.3  # unknown run length: constant
    # the default (the authors' code) keeps the logit step constant: a late step moves the logits as far as an early one
    early, late = BalancedRD(logit_optimizer="sgd", gamma=0.0), BalancedRD(logit_optimizer="sgd", gamma=0.0)
    late.total_steps = early.total_steps = 1000
    early.update_logits(torch.tensor([0.1, 0.0]), step=0)
    late.update_logits(torch.tensor([0.1, 0.0]), step=999)
    assert torch.equal(early.logits, late.logits) and early.logits[0].item() == pytest.approx(-0.025 * 0.025)
    cos = BalancedRD(logit_optimizer="sgd", gamma=0.0, weight_schedule="cosine")
    cos.total_steps = 1000
    cos.update_logits(torch.tensor([0.1, 0.0]), step=999)
    assert abs(cos.logits[0].item()) < 0.11 * abs(early.logits[0].item())


def test_log1p_multipliers_by_hand_and_equal_losses_give_the_standard_gradient():
    losses = torch.tensor([0.3, 1.5], dtype=torch.float64)
    w = torch.tensor([0.4, 0.6], dtype=torch.float64)
    # by hand: a = (0.4 / 1.3, 0.6 / 2.5) = (0.307692..., 0.24); eff = 2 a / sum(a)
    a0, a1 = 0.4 / 1.3, 0.6 / 2.5
    expected = [2 * a0 / (a0 + a1), 2 * a1 / (a0 + a1)]
    assert effective_weights(w, losses, 1e-8, "log1p").tolist() == pytest.approx(expected, rel=1e-12)
    equal = torch.tensor([0.8, 0.8], dtype=torch.float64)
    half = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for space in ("log1p", "log", "loss"):
        assert effective_weights(half, equal, 1e-8, space).tolist() == pytest.approx([1.0, 1.0], abs=1e-15)


def test_log1p_update_is_the_authors_weighted_log_loss_gradient():
    """Against the authors' formulation, built with autograd: loss = sum_i z_i / c * log(L_i + 1) with
    c = sum_j z_j / (L_j + 1) held constant (their FAMO code); its gradient is half of ours (their multipliers sum
    to 1, ours to 2: the standard gradient's scale)."""
    theta = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64, requires_grad=True)
    l_r = (theta**2).sum() * 0.1
    l_d = ((theta - 1) ** 2).sum() * 0.7
    xi = torch.tensor([0.4, -0.2], dtype=torch.float64)
    z = torch.softmax(xi, 0)
    losses = torch.stack([l_r, l_d])
    c = (z / (losses + 1)).sum().detach()
    (theirs,) = torch.autograd.grad((z / c * torch.log(losses + 1)).sum(), theta, retain_graph=True)
    eff = effective_weights(z, losses.detach(), 1e-8, "log1p")
    (ours,) = torch.autograd.grad(eff[0] * l_r + eff[1] * l_d, theta)
    torch.testing.assert_close(ours, 2 * theirs, rtol=1e-12, atol=0)


def test_delta_by_hand():
    before = torch.tensor([0.5, 2.0], dtype=torch.float64)
    after = torch.tensor([0.4, 1.9], dtype=torch.float64)
    assert log_improvement(before, after, "log1p", 1e-8).tolist() == pytest.approx(
        [math.log(1.5 / 1.4), math.log(3.0 / 2.9)], rel=1e-12)
    assert log_improvement(before, after, "log", 1e-8).tolist() == pytest.approx(
        [math.log(0.5 / 0.4), math.log(2.0 / 1.9)], rel=1e-12)
    assert log_improvement(before, after, "loss", 1e-8).tolist() == log_improvement(before, after, "log", 1e-8).tolist()


@pytest.mark.parametrize("space", ["log", "log1p"])
def test_qp_in_normalised_space_matches_brute_force(space):
    rng = np.random.default_rng(3)
    for _ in range(10):
        g_r, g_d = rng.normal(size=40) * 0.1, rng.normal(size=40) * 3
        losses = torch.tensor([rng.uniform(0.05, 0.8), rng.uniform(0.3, 3.0)], dtype=torch.float64)
        shift = 1.0 if space == "log1p" else 0.0
        n_r, n_d = g_r / (float(losses[0]) + shift), g_d / (float(losses[1]) + shift)
        f = lambda w: float(np.sum((w * n_r + (1 - w) * n_d) ** 2))  # noqa: E731
        brute = minimize_scalar(f, bounds=(0, 1), method="bounded", options={"xatol": 1e-12}).x
        w, eff = BalancedRDQP(space=space).weights_for(losses, *_gram(g_r, g_d))
        assert float(w[0]) == pytest.approx(brute, abs=1e-5)
        # the update is the QP's direction brought back to the loss scale: parallel to w_R n_R + w_D n_D
        d_qp = float(w[0]) * n_r + float(w[1]) * n_d
        d = float(eff[0]) * g_r + float(eff[1]) * g_d
        assert abs(d @ d_qp) == pytest.approx(np.linalg.norm(d) * np.linalg.norm(d_qp), rel=1e-9)
        assert float(eff.sum()) == pytest.approx(2.0)


def _toy_run(method, steps=3000, lr=0.004):
    """Two objectives on a point in the plane: L1 = |t - a|^2 + 1, L2 = 100 (|t - b|^2 + 1), a = (-1, 0),
    b = (1, 0), from t0 = (0, 3) on the perpendicular bisector, plain gradient descent.

    The weighted sum L1 + L2 goes to its minimiser (a + 100 b) / 101 = (0.98, 0): L2 is served, L1 barely moves.
    Balanced weights on log L1, log L2: by symmetry the weights stay equal on the bisector (equal relative
    improvements, mirror-image normalised gradients), the update has no x component there, and the run goes to the
    midpoint (0, 0), where both objectives improved by the same factor (11 -> 2).
    """
    theta = torch.nn.Parameter(torch.tensor([0.0, 3.0], dtype=torch.float64))
    a, b = torch.tensor([-1.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    lmbda = 0.5
    opt = torch.optim.SGD([theta], lr=lr)

    def terms():
        l1 = ((theta - a) ** 2).sum() + 1
        l2 = 100 * (((theta - b) ** 2).sum() + 1)
        return RDTerms(rate=l1, distortion=l2 / lmbda, lmbda=lmbda, mse=torch.zeros(()))

    @torch.no_grad()
    def reevaluate():
        return terms()

    method.attach(RunContext(None, opt, [theta], total_steps=steps))
    for step in range(steps):
        ctx = StepContext(step=step, terms=terms(), reevaluate=reevaluate)
        method.backward(ctx)
        opt.step()
        method.after_step(ctx)
        opt.zero_grad(set_to_none=True)
    t = terms()
    return theta.detach(), float(t.rate.detach()), float(t.weighted_distortion.detach())


@pytest.mark.parametrize("cls", [BalancedRD, BalancedRDQP])
def test_balancing_reaches_a_more_balanced_point_than_the_weighted_sum(cls):
    # space 'log': equal weights on log L1, log L2 are symmetric in the two objectives whatever their scales
    t_std, l1_std, l2_std = _toy_run(Standard())
    assert t_std[0].item() == pytest.approx(99 / 101, abs=1e-3)
    t_bal, l1_bal, l2_bal = _toy_run(cls(space="log"))
    assert t_bal.abs().max().item() < 1e-3  # the midpoint
    imbalance = lambda l1, l2: abs(math.log(11 / l1) - math.log(1100 / l2))  # noqa: E731
    assert imbalance(l1_bal, l2_bal) < 1e-3 < 1.0 < imbalance(l1_std, l2_std)


def test_equal_weights_reproduce_the_standard_method_bit_for_bit(tmp_path):
    """Space 'loss' at w = (1/2, 1/2) (weight_lr 0 keeps the logits at 0) is R + lmbda * D exactly: same weights
    after training, so the extra same-noise forward pass did not disturb the RNG either. (The default log1p space
    is the standard gradient only where the two losses are equal: checked above.)"""
    common = ("train.steps=5", "train.val_every=5", "train.log_every=2")
    train(tiny_config(tmp_path, *common, name="std"))
    train(tiny_config(tmp_path, *common, "method.name=balanced-rd", "method.options={weight_lr: 0.0, space: loss}",
                      name="neutral"))
    a, b = load_checkpoint(tmp_path / "std"), load_checkpoint(tmp_path / "neutral")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert b["method"]["logits"].abs().max() == 0


def test_qp_with_neutral_weights_gives_the_standard_gradient():
    torch.manual_seed(0)
    from lictrain.losses import RateDistortionLoss
    from lictrain.models import build_model

    model = build_model("mbt2018-mean", "tiny")
    params = [p for n, p in model.named_parameters() if not n.endswith("quantiles")]
    x = torch.rand(2, 3, 64, 64)
    crit = RateDistortionLoss(0.013)

    def forward():
        torch.manual_seed(1)
        return crit(model(x), x)

    forward().loss.backward()
    ref = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    model.zero_grad(set_to_none=True)

    class NeutralQP(BalancedRDQP):
        def weights_for(self, losses, rr, dd, rd):
            return torch.tensor([0.5, 0.5]), torch.ones(2)

    qp = NeutralQP()
    qp.attach(RunContext(model, None, params))
    qp.backward(StepContext(0, forward()))
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", ["balanced-rd", "balanced-rd-qp"])
def test_methods_train_log_their_weights_and_resume_exactly(tmp_path, method):
    common = ("train.val_every=3", "train.ckpt_every=3", f"method.name={method}", "train.log_every=1")
    if method == "balanced-rd":  # a cosine weight schedule must not depend on where the first part stopped
        common += ("method.options={schedule_steps: 6, weight_schedule: cosine}",)
    train(tiny_config(tmp_path, "train.steps=6", *common, name="straight"))
    train(tiny_config(tmp_path, "train.steps=3", *common, name="split"))
    train(tiny_config(tmp_path, "train.steps=6", *common, name="split"), resume=True)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = [json.loads(ln) for ln in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 6
    for r in train_rows:
        assert r["w_R"] + r["w_D"] == pytest.approx(1.0) and 0 <= r["w_R"] <= 1
        assert -1 <= r["grad_cos"] <= 1 and r["eff_R"] > 0
        assert r["grad_norm_R"] > 0 and r["grad_norm_D"] > 0
    vals = [r["loss"] for r in rows if r["kind"] == "val"]
    assert vals[-1] < vals[0]
    if method == "balanced-rd":  # the logits moved from equal weights and were checkpointed
        assert torch.equal(a["method"]["logits"], b["method"]["logits"]) and a["method"]["logits"].abs().max() > 0


def test_unknown_method_option_is_a_clear_error(tmp_path):
    from lictrain.errors import LictrainError

    with pytest.raises(LictrainError, match="no option gamm"):
        train(tiny_config(tmp_path, "method.name=balanced-rd", "method.options={gamm: 0.1}"))
    with pytest.raises(LictrainError, match="space must be one of log1p, log, loss"):
        train(tiny_config(tmp_path, "method.name=balanced-rd-qp", "method.options={space: exp}"))
    with pytest.raises(LictrainError, match="logit_optimizer"):
        train(tiny_config(tmp_path, "method.name=balanced-rd", "method.options={logit_optimizer: lbfgs}"))


def test_logged_gradient_norms_and_cosine_match_separate_backward_passes():
    theta = torch.nn.Parameter(torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64))
    other = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))  # only in the distortion

    def terms():
        rate = (theta**2).sum() * 0.1
        dist = ((theta - 1) ** 2).sum() * 0.7 + other.sum() ** 2
        return RDTerms(rate=rate, distortion=dist / 0.5, lmbda=0.5, mse=torch.zeros(()))

    t = terms()
    g_r = torch.autograd.grad(t.rate, [theta], retain_graph=True)[0]
    g_d = torch.autograd.grad(t.weighted_distortion, [theta, other])
    m = BalancedRD()
    with torch.no_grad():
        m.logits.copy_(torch.tensor([0.3, -0.1], dtype=torch.float64))
    m.attach(RunContext(None, None, [theta, other]))
    logs = m.backward(StepContext(0, terms(), will_log=True))
    rr, dd = float(g_r @ g_r), float(g_d[0] @ g_d[0] + g_d[1] @ g_d[1])
    assert logs["grad_norm_R"] == pytest.approx(math.sqrt(rr), rel=1e-12)
    assert logs["grad_norm_D"] == pytest.approx(math.sqrt(dd), rel=1e-12)
    assert logs["grad_cos"] == pytest.approx(float(g_r @ g_d[0]) / math.sqrt(rr * dd), rel=1e-12)
    # and the update itself is the multipliers' combination
    torch.testing.assert_close(theta.grad, logs["eff_R"] * g_r + logs["eff_D"] * g_d[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", [BalancedRD, BalancedRDQP])
def test_a_model_regulariser_is_added_outside_the_balancing(method):
    """A model's own training penalty (AuxT's orthogonality term) reaches the gradient with weight 1, and the logged
    distortion gradient stays the distortion's alone."""
    theta = torch.nn.Parameter(torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64))

    def terms(with_reg):
        rate = (theta**2).sum() * 0.1
        dist = ((theta - 1) ** 2).sum() * 0.7
        reg = (theta**4).sum() * 0.05 if with_reg else None
        return RDTerms(rate=rate, distortion=dist / 0.5, lmbda=0.5, mse=torch.zeros(()), regularizer=reg)

    g_reg = 0.2 * theta.detach() ** 3  # d/dtheta of 0.05 theta^4
    m = method()
    m.attach(RunContext(None, None, [theta]))
    plain = m.backward(StepContext(0, terms(False), will_log=True))
    grad_plain, theta.grad = theta.grad.clone(), None
    logs = m.backward(StepContext(0, terms(True), will_log=True))
    torch.testing.assert_close(theta.grad, grad_plain + g_reg, rtol=1e-12, atol=1e-15)
    assert logs["grad_norm_D"] == pytest.approx(plain["grad_norm_D"], rel=1e-12)
    assert logs["eff_R"] == pytest.approx(plain["eff_R"], rel=1e-12)
