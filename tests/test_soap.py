"""SOAP against independent references: a slow reference from the paper's equations, torch's Adam, a quadratic."""

import copy
import math

import pytest
import torch

from lictrain.optim import build_optimizer
from lictrain.optim.common import clear_index_cache, index_cache_bytes, pack_symmetric, unpack_symmetric
from lictrain.optim.soap import SOAP, assign_refresh_phases, merged_shape


class ReferenceSOAP:
    """The SOAP equations written out: one factor per dimension, exact eigh of every factor after every step,
    the rotation as an explicit Kronecker product acting on the row-major vectorised gradient, Adam moments:

        F_i <- beta_s F_i + (1 - beta_s) G_(i) G_(i)^T          (first step: from the first gradient)
        K    = Q_1 (x) Q_2 (x) ... (x) Q_k,  Q_i = eigenvectors of F_i (descending eigenvalues)
        m   <- b1 m + (1 - b1) g                              (original space)
        v   <- b2 v + (1 - b2) (K^T g)^2                      (rotated space)
        w   <- w - lr / (1 - b1^t) * K [ K^T m / (sqrt(v / (1 - b2^t)) + eps) ]
    """

    def __init__(self, shape, lr, betas, eps):
        self.shape, self.lr, (self.b1, self.b2), self.eps = shape, lr, betas, eps
        self.F = [torch.zeros(d, d, dtype=torch.float64) for d in shape]
        self.m = torch.zeros(math.prod(shape), dtype=torch.float64)
        self.v = torch.zeros(math.prod(shape), dtype=torch.float64)
        self.t = 0
        self.Q = None

    def _accumulate(self, G):
        for i, d in enumerate(self.shape):
            Gi = G.movedim(i, 0).reshape(d, -1)
            self.F[i] = self.b2 * self.F[i] + (1 - self.b2) * (Gi @ Gi.T)

    def _eigenbases(self):
        self.Q = [torch.linalg.eigh(F)[1].flip(1) for F in self.F]

    def step(self, w, G):
        self.t += 1
        if self.t == 1:
            self._accumulate(G)
            self._eigenbases()
        K = self.Q[0]
        for q in self.Q[1:]:
            K = torch.kron(K, q)
        g = G.reshape(-1)
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * (K.T @ g) ** 2
        bc1, bc2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        n = (K.T @ self.m) / (torch.sqrt(self.v / bc2) + self.eps)
        w = w - self.lr / bc1 * (K @ n).reshape(self.shape)
        if self.t > 1:
            self._accumulate(G)
        self._eigenbases()
        return w


def _grad_fn(shape, seed):
    """A fixed smooth non-quadratic loss, so gradients depend on the trajectory."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(*shape, generator=gen, dtype=torch.float64)
    B = torch.randn(math.prod(shape), math.prod(shape), generator=gen, dtype=torch.float64) / math.prod(shape)

    def grad(w):
        w = w.detach().requires_grad_(True)
        x = w.reshape(-1)
        loss = ((w - A) ** 2).sum() + torch.tanh(B @ x).pow(2).sum() + 0.1 * (x**4).sum()
        (g,) = torch.autograd.grad(loss, w)
        return g

    return grad


# Shapes whose factors are full rank from the first gradient: a factor of rank r < d leaves a null space whose basis
# eigh picks by rounding, and the next gradient's second moment in those directions depends on that pick, in any
# implementation (SOAP's own ambiguity, not a bug).
@pytest.mark.parametrize("shape", [(6, 6), (3, 4, 2, 3)])
def test_matches_the_reference_with_exact_eigh_every_step(shape):
    grad = _grad_fn(shape, seed=1)
    w0 = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # In the exact eigenbasis the first rotated gradient is diagonal (it is the SVD); its off-diagonal entries are
    # rounding noise that Adam's first step divides by eps. eps=1e-4 keeps that noise below the tolerance.
    ref = ReferenceSOAP(shape, lr=0.01, betas=(0.9, 0.95), eps=1e-4)
    p = torch.nn.Parameter(w0.clone())
    opt = SOAP([p], lr=0.01, betas=(0.9, 0.95), eps=1e-4, precondition_frequency=1, basis_refresh="eigh")
    w_ref = w0.clone()
    for _ in range(40):
        g = grad(w_ref)
        w_ref = ref.step(w_ref, g)
        p.grad = g.clone()
        opt.step()
        assert torch.allclose(p.data, w_ref, rtol=1e-9, atol=1e-10)
    assert (w_ref - w0).abs().max() > 0.1  # the trajectory went somewhere


def test_qr_refresh_converges_to_the_exact_eigenbasis():
    """With a steady gradient the factor converges, and power iteration + QR must converge to its eigenbasis."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(6, 5, dtype=torch.float64))
    opt = SOAP([p], lr=1e-12, precondition_frequency=1, shampoo_beta=0.5)
    U = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    scales = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    G = (U * scales) @ torch.randn(6, 5, dtype=torch.float64)
    p.grad = G
    opt.step()
    exact = torch.linalg.eigh(G @ G.T)[1].flip(1)
    first = opt.state[p]["Q"][0].clone()
    opt.state[p]["Q"][0] = torch.linalg.qr(first + 0.3 * torch.randn(6, 6, dtype=torch.float64))[0]  # disturb it
    for _ in range(40):
        p.grad = G.clone()
        opt.step()
    q = opt.state[p]["Q"][0]
    # the same eigenvectors up to sign, in descending order: |Q^T Q_exact| is the identity
    # (the sixth eigenvalue is 0: G has rank 5, so only the first five columns are determined)
    overlap = (q.T @ exact).abs()[:5, :5]
    assert torch.allclose(overlap, torch.eye(5, dtype=torch.float64), atol=1e-6)


def test_without_preconditioning_it_is_torch_adam_step_for_step():
    torch.manual_seed(0)
    shapes = [(8, 4, 3, 3), (16,), (5, 7), ()]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    soap = SOAP(ps, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, max_precond_dim=0)
    adam = torch.optim.Adam(qs, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    for step in range(30):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape) * (1 + step % 3)
            p.grad, q.grad = g.clone(), g.clone()
        soap.step()
        adam.step()
        for p, q in zip(ps, qs):
            assert torch.equal(p, q)


def _rotated_quadratic(n=12, m=10, cond=200.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(m, m, generator=gen))[0]
    a = torch.logspace(0, math.log10(cond), n)
    b = torch.logspace(0, math.log10(cond), m)
    A, B = U @ torch.diag(a) @ U.T, V @ torch.diag(b) @ V.T
    W_star = torch.randn(n, m, generator=gen)

    def loss(W):  # 1/2 tr((W - W*)^T A (W - W*) B): a Kronecker-structured, rotated, ill-conditioned Hessian
        E = W - W_star
        return 0.5 * torch.trace(E.T @ A @ E @ B)

    return loss, torch.zeros(n, m)


def _steps_to(make_opt, loss_fn, w0, target, max_steps=3000):
    p = torch.nn.Parameter(w0.clone())
    opt = make_opt([p])
    for t in range(1, max_steps + 1):
        opt.zero_grad()
        loss = loss_fn(p)
        loss.backward()
        opt.step()
        if loss_fn(p).item() <= target:
            return t
    return max_steps + 1


def test_rotated_ill_conditioned_quadratic_is_solved_in_several_times_fewer_steps_than_adam():
    # Measured when written: Adam needs 718 steps at its best lr, SOAP (defaults, frequency 10) 181: about 4x.
    loss_fn, w0 = _rotated_quadratic(cond=1000.0)
    target = 1e-4 * loss_fn(w0).item()
    lrs = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]  # each optimizer at its best learning rate on this grid
    adam = min(_steps_to(lambda ps, lr=lr: torch.optim.Adam(ps, lr=lr), loss_fn, w0, target) for lr in lrs)
    soap = min(_steps_to(lambda ps, lr=lr: SOAP(ps, lr=lr), loss_fn, w0, target) for lr in lrs)
    assert soap * 3 <= adam, (soap, adam)


def test_odd_parameters_behave():
    torch.manual_seed(0)
    conv_t = torch.nn.ConvTranspose2d(4, 6, 5)  # weight (in, out, kh, kw)
    params = {
        "conv_t": conv_t.weight, "bias": torch.nn.Parameter(torch.randn(6)), "scalar": torch.nn.Parameter(torch.randn(())),
        "unused": torch.nn.Parameter(torch.randn(3, 3)), "big": torch.nn.Parameter(torch.randn(3, 40)),
    }
    opt = SOAP(params.values(), lr=1e-2, max_precond_dim=32)
    before = {k: v.detach().clone() for k, v in params.items()}
    for _ in range(12):
        for k, v in params.items():
            v.grad = None if k == "unused" else torch.randn_like(v)
        opt.step()
    st = opt.state
    # factors are stored as upper triangles: d (d + 1) / 2 numbers for a d x d factor
    assert [None if f is None else f.shape for f in st[params["conv_t"]]["GG"]] == [(10,), (21,), (15,), (15,)]
    assert st[params["bias"]]["GG"] == [None]  # 1-D: plain Adam
    assert st[params["big"]]["GG"][1] is None and st[params["big"]]["GG"][0].shape == (6,)  # 40 > max: diagonal
    assert params["unused"] not in st and torch.equal(params["unused"], before["unused"])
    for k in ("conv_t", "bias", "scalar", "big"):
        assert not torch.equal(params[k], before[k]) and torch.isfinite(params[k]).all()
    sparse = torch.nn.Parameter(torch.randn(4, 3))
    sparse.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        SOAP([sparse]).step()


def test_merge_dims_never_builds_a_factor_larger_than_max():
    assert merged_shape((192, 192, 5, 5), 10000) == (192, 4800)
    assert merged_shape((64, 3, 5, 5), 10000) == (4800,)  # 64*3*5*5 = 4800 fits: one dimension
    assert merged_shape((64, 3, 5, 5), 1000) == (960, 5)  # 64*3*5 = 960 fits, *5 = 4800 does not
    assert merged_shape((10, 10, 3), 100) == (100, 3)  # a product equal to the cap still merges ("<=")
    for shape in [(7, 1, 9, 2), (100, 100, 3), (5,), (3, 3, 3, 3)]:
        for cap in (8, 50, 1000):
            merged = merged_shape(shape, cap)
            assert math.prod(merged) == math.prod(shape)
            assert all(d <= cap or d in shape for d in merged)
    p = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    opt = SOAP([p], merge_dims=True, max_precond_dim=40)
    p.grad = torch.randn_like(p)
    opt.step()
    assert all(f is None or unpack_symmetric(f).shape[0] <= 40 for f in opt.state[p]["GG"])


def test_non_finite_gradient_never_reaches_weights_or_state():
    p = torch.nn.Parameter(torch.randn(4, 5))
    opt = SOAP([p], lr=0.1)
    p.grad = torch.randn(4, 5)
    opt.step()
    state = copy.deepcopy(opt.state[p])
    w = p.detach().clone()
    p.grad = torch.full((4, 5), float("nan"))
    opt.step()
    assert torch.equal(p, w) and state["step"] == opt.state[p]["step"]
    assert torch.equal(state["GG"][0], opt.state[p]["GG"][0])


def test_eigh_failure_keeps_the_last_good_basis(monkeypatch):
    p = torch.nn.Parameter(torch.randn(4, 5))
    opt = SOAP([p], lr=0.1, precondition_frequency=1, basis_refresh="eigh")
    p.grad = torch.randn(4, 5)
    opt.step()
    q = [x.clone() for x in opt.state[p]["Q"]]

    def broken(*a, **k):
        raise torch.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    p.grad = torch.randn(4, 5)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(q, opt.state[p]["Q"]))
    assert torch.isfinite(p).all()


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    make = lambda: [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(3, 2, 3, 3))]
    a, b = make(), None
    opt_a = SOAP(a, lr=1e-2, precondition_frequency=3)
    grads = [[torch.randn_like(p) for p in a] for _ in range(12)]
    for g in grads[:7]:
        for p, x in zip(a, g):
            p.grad = x.clone()
        opt_a.step()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = SOAP(b, lr=1e-2, precondition_frequency=3)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for g in grads[7:]:
        for p, q, x in zip(a, b, g):
            p.grad, q.grad = x.clone(), x.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_bf16_parameters_keep_fp32_state_after_loading():
    p = torch.nn.Parameter(torch.randn(4, 5, dtype=torch.bfloat16))
    opt = SOAP([p])
    p.grad = torch.randn(4, 5, dtype=torch.bfloat16)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(saved)
    st = opt.state[p]
    assert st["GG"][0].dtype == st["Q"][1].dtype == st["exp_avg_sq"].dtype == torch.float32
    # not merely cast back: the exact saved values (torch's load would have rounded them through bf16)
    assert torch.equal(st["Q"][1], saved["state"][0]["Q"][1]) and torch.equal(st["GG"][0], saved["state"][0]["GG"][0])


@pytest.mark.parametrize("fresh", [True, False])
def test_precondition_is_side_effect_free_and_predicts_the_next_update(fresh):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 4, 3, 3, dtype=torch.float64))
    opt = SOAP([p], lr=1e-2, precondition_frequency=2, weight_decay=0.01)
    if not fresh:
        for _ in range(5):
            p.grad = torch.randn_like(p)
            opt.step()
    snapshot = copy.deepcopy(opt.state_dict())
    g = torch.randn_like(p)
    (pred,) = opt.precondition([g])
    after = opt.state_dict()
    assert torch.equal(snapshot["state"].get(0, {}).get("exp_avg", torch.zeros(1)),
                       after["state"].get(0, {}).get("exp_avg", torch.zeros(1)))
    if not fresh:
        assert all(torch.equal(a, b) for a, b in zip(snapshot["state"][0]["GG"], after["state"][0]["GG"]))
    else:
        assert len(opt.state) == 0
    w = p.detach().clone()
    p.grad = g
    opt.step()
    assert torch.allclose(p - w, pred, atol=1e-13, rtol=1e-10)


def test_registry_defaults_follow_the_lic_papers():
    opt = build_optimizer("soap", [torch.nn.Parameter(torch.randn(2, 2))], lr=2e-4)
    g = opt.param_groups[0]
    assert isinstance(opt, SOAP)
    assert (g["lr"], g["weight_decay"], g["precondition_frequency"], g["betas"]) == (2e-4, 0.0, 10, (0.95, 0.95))


def test_tiny_factors_get_a_finite_basis():
    """A real clipped gradient of a 1x1 conv in tiny ELIC's entropy parameters (tests/data): half its input channels
    get no gradient and its singular values span 1e-4..1e-13. fp32 LAPACK eigh returns NaN eigenvectors for its
    factor without raising; SOAP must still produce a finite basis and finite weights."""
    from pathlib import Path

    g = torch.load(Path(__file__).parent / "data" / "elic_tiny_clipped_grad.pt")
    p = torch.nn.Parameter(torch.zeros_like(g))
    opt = SOAP([p], lr=1e-3, precondition_frequency=1)
    for _ in range(3):
        p.grad = g.clone()
        opt.step()
    assert all(torch.isfinite(q).all() for q in opt.state[p]["Q"] if q is not None)
    assert torch.isfinite(p).all() and p.abs().max() > 0


def test_qr_refresh_keeps_second_moments_with_their_eigenvectors_when_the_order_changes():
    """Energy first along e1, then (more) along e2: the refresh re-sorts the basis, and Adam's second moment must be
    permuted with it, so each entry keeps the history of its own direction (the EMA computed by hand below)."""
    b2 = 0.999
    p = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    opt = SOAP([p], lr=1e-9, betas=(0.9, b2), shampoo_beta=0.5, precondition_frequency=1)
    e1, e2 = torch.tensor([[1.0], [0.0]], dtype=torch.float64), torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    r = torch.tensor([[1.0, -0.5, 0.25]], dtype=torch.float64)
    phases = [(1.0, 0.01)] * 20 + [(0.01, 10.0)] * 6  # (component along e1, along e2)
    for a1, a2 in phases:
        p.grad = (a1 * e1 + a2 * e2) @ r
        opt.step()
    expect = {1: 0.0, 2: 0.0}
    for a1, a2 in phases:
        expect[1] = b2 * expect[1] + (1 - b2) * (a1**2) * (r**2).sum().item()
        expect[2] = b2 * expect[2] + (1 - b2) * (a2**2) * (r**2).sum().item()
    st = opt.state[p]
    assert abs(st["Q"][0][1, 0]) > 0.99  # e2 now has the largest eigenvalue: first column
    v = st["exp_avg_sq"][:, 0]  # the r direction is the second factor's first eigenvector
    assert v[0].item() == pytest.approx(expect[2], rel=0.01) and v[1].item() == pytest.approx(expect[1], rel=0.01)


def test_factors_and_refresh_stay_fp32_under_autocast():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = SOAP([p], lr=1e-2, precondition_frequency=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(4):
            p.grad = torch.randn(6, 5)
            opt.step()
    st = opt.state[p]
    assert st["GG"][0].dtype == st["Q"][0].dtype == torch.float32 and st["step"] == 4
    q = st["Q"][0]
    assert torch.allclose(q.T @ q, torch.eye(6), atol=1e-5)  # a real (orthogonal, fp32) basis after the refreshes


# ---- against an independent implementation: pytorch_optimizer's SOAP (follows the authors' code) -----------------
# Checked when written: each of the three documented differences (first call, epsilon, weight-decay order) put back
# to our default in the authors' mode makes these tests fail.
def _conv_params(seed):
    """Conv kernels whose factors are all full rank from one gradient (see above), a square matrix and biases."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 4, 3, 3), (4, 8, 3, 3), (6, 6), (8,), (4,)]
    return [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.3) for s in shapes]


def _pair(semantics, **kw):
    import pytorch_optimizer as po  # a test dependency (pyproject.toml [test])
    a, b = _conv_params(0), _conv_params(0)
    ours = SOAP(a, semantics=semantics, **kw)
    theirs = po.SOAP(b, max_precondition_dim=kw.pop("max_precond_dim"), merge_dims=False, precondition_1d=False,
                     correct_bias=True, **kw)
    return a, b, ours, theirs


def _gradient_stream(params, n, seed=1):
    """Gradients that do not depend on the weights: the trajectories can only differ by the optimizers."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) * (1 + 0.5 * math.sin(k)) for p in params] for k in range(n)]


# eps large enough for its placement to show (it is checked to matter: see test_authors_... failing when changed)
SOAP_KW = dict(lr=1e-2, betas=(0.9, 0.95), shampoo_beta=0.9, eps=1e-3, precondition_frequency=3, max_precond_dim=10000)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_authors_semantics_follow_pytorch_optimizer_step_for_step(weight_decay):
    a, b, ours, theirs = _pair("authors", weight_decay=weight_decay, **SOAP_KW)
    start = [p.detach().clone() for p in a]
    for grads in _gradient_stream(a, 40):  # 40 steps: 13 basis refreshes by power iteration + QR, with sorting
        for pa, pb, gr in zip(a, b, grads):
            pa.grad, pb.grad = gr.clone(), gr.clone()
        ours.step()
        theirs.step()
        for pa, pb, p0 in zip(a, b, start):
            moved = (pb - p0).norm()
            assert (pa - pb).norm() <= 1e-4 * moved + 1e-12, ((pa - pb).norm(), moved)
    assert all((pa - p0).norm() > 0.1 for pa, p0 in zip(a, start))


def test_default_semantics_differ_from_the_authors_where_documented():
    """The comparison can fail: our default (Adam's first step and epsilon) is measurably off the authors' code."""
    a, b, ours, theirs = _pair("adam", weight_decay=0.0, **SOAP_KW)
    for grads in _gradient_stream(a, 5):
        for pa, pb, gr in zip(a, b, grads):
            pa.grad, pb.grad = gr.clone(), gr.clone()
        ours.step()
        theirs.step()
    assert max(((pa - pb).norm() / pb.norm()).item() for pa, pb in zip(a, b)) > 1e-2


def test_authors_semantics_train_like_pytorch_optimizer():
    """With feedback (gradients from the weights): a small conv net fitting a fixed target, 30 steps."""
    import pytorch_optimizer as po  # a test dependency (pyproject.toml [test])
    torch.manual_seed(0)
    x = torch.rand(2, 3, 12, 12)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(8, 3, 3, padding=1))
    target = torch.rand(2, 3, 12, 12)
    nets = [copy.deepcopy(net), copy.deepcopy(net)]
    opts = [SOAP(nets[0].parameters(), lr=3e-3, precondition_frequency=5, semantics="authors"),
            po.SOAP(nets[1].parameters(), lr=3e-3, weight_decay=0.0, precondition_frequency=5)]
    losses = [[], []]
    for _ in range(30):
        for k in range(2):
            opts[k].zero_grad()
            loss = ((nets[k](x) - target) ** 2).mean()
            loss.backward()
            opts[k].step()
            losses[k].append(loss.item())
    assert losses[0][-1] < 0.8 * losses[0][0]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_authors_semantics_precondition_predicts_the_step():
    p = torch.nn.Parameter(torch.randn(5, 5))
    opt = SOAP([p], lr=1e-2, weight_decay=0.1, precondition_frequency=2, semantics="authors")
    for k in range(4):
        g = torch.randn(5, 5)
        (predicted,) = opt.precondition([g])
        before = p.detach().clone()
        p.grad = g
        opt.step()
        assert torch.allclose(p - before, predicted, atol=1e-6), k
    assert k == 3 and opt.state[p]["step"] == 3  # the first call only initialised


# ---- batched over same-shape tensors ------------------------------------------------------------------------------
# Shapes whose factors are full rank from the first gradient (see above: otherwise the basis of a null space is
# picked by rounding, and two correct implementations, or one batched and one not, may differ by O(lr) there).
REPEATED = [(8, 8, 3, 3), (8, 8, 3, 3), (8, 8, 3, 3), (8, 4, 3, 3), (8, 4, 3, 3), (6, 6), (6, 6), (6, 6), (8,), (8,),
            (4, 8, 5, 5), (4, 8, 5, 5), (3, 4, 2, 3)]


def test_batched_and_per_tensor_paths_agree_over_50_steps():
    """Repeated shapes (as a LIC model has: N x N x k x k kernels, GDN gammas): rotations and factor updates done
    together must give the per-tensor results to fp32 rounding, through 16 basis refreshes."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in REPEATED]
    a = [torch.nn.Parameter(v.clone()) for v in start]
    b = [torch.nn.Parameter(v.clone()) for v in start]
    # The authors' semantics: our default's first step is taken in the basis of its own gradient, where the rotated
    # gradient has exact zeros (for a matrix, the off-diagonal of its SVD) whose rounding-level values Adam turns
    # into +-lr/2 steps of arbitrary sign, so any two orders of summation differ there (see soap.py). Measured
    # with it: batched and per-tensor agree to ~4e-6 over 50 steps.
    opt_a = SOAP(a, lr=1e-3, precondition_frequency=3, batched=True, semantics="authors")
    opt_b = SOAP(b, lr=1e-3, precondition_frequency=3, batched=False, semantics="authors")
    for _ in range(50):
        for pa, pb in zip(a, b):
            g = torch.randn(pa.shape, generator=gen)
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    buckets = opt_a._buckets[id(opt_a.param_groups[0])][1]
    assert sorted(b.n for b in buckets) == [1, 2, 2, 2, 3, 3]
    for pa, pb, p0 in zip(a, b, start):
        moved = (pb - p0).norm()
        assert moved > 0.01 and (pa - pb).norm() <= 1e-4 * moved, ((pa - pb).norm(), moved)
        for fa, fb in zip(opt_a.state[pa]["GG"], opt_b.state[pb]["GG"]):
            if fa is not None:
                torch.testing.assert_close(fa, fb, rtol=1e-4, atol=1e-6)


def test_batched_resume_is_bit_exact():
    shapes = [(8, 8, 3, 3), (8, 8, 3, 3), (8, 8, 3, 3), (8,), (5, 5), (5, 5)]
    gen = torch.Generator().manual_seed(2)
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(8)]
    start = [torch.randn(s, generator=gen) for s in shapes]

    def run(params, opt, gs):
        for g_step in gs:
            for p, g in zip(params, g_step):
                p.grad = g.clone()
            opt.step()

    straight = [torch.nn.Parameter(v.clone()) for v in start]
    run(straight, SOAP(straight, lr=1e-2, precondition_frequency=3), grads)
    first = [torch.nn.Parameter(v.clone()) for v in start]
    opt1 = SOAP(first, lr=1e-2, precondition_frequency=3)
    run(first, opt1, grads[:4])
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = SOAP(second, lr=1e-2, precondition_frequency=3)
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    run(second, opt2, grads[4:])
    for a, b in zip(straight, second):
        assert torch.equal(a, b)


def test_factors_are_kept_as_upper_triangles_and_full_factor_checkpoints_still_load():
    """A factor is symmetric: only d (d + 1) / 2 numbers are stored (issue 16, state memory). A checkpoint saved
    with full d x d factors (lictrain before the packing) resumes bit-exactly like the packed one."""
    s = torch.randn(5, 5, dtype=torch.float64)
    s = s + s.T  # exactly symmetric (a product a @ a.T need not be, to the last bit)
    packed = pack_symmetric(s)
    assert torch.equal(packed, torch.stack([s[i, j] for i in range(5) for j in range(i, 5)]))  # row by row
    assert torch.equal(unpack_symmetric(packed), s)
    with pytest.raises(ValueError, match="upper triangle"):
        unpack_symmetric(torch.zeros(4))
    # the packing's index: int32, one entry per packed number, counted by index_cache_bytes (the benchmark's state)
    clear_index_cache()
    assert index_cache_bytes() == 0
    pack_symmetric(torch.zeros(7, 7))
    assert index_cache_bytes() == 4 * 28

    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 4, 3, 3), (6, 4, 3, 3), (5, 5), (7,)]
    grads = [[torch.randn(sh, generator=gen) for sh in shapes] for _ in range(7)]
    start = [torch.randn(sh, generator=gen) for sh in shapes]
    params = [torch.nn.Parameter(v.clone()) for v in start]
    opt = SOAP(params, lr=1e-2, precondition_frequency=2)
    for g_step in grads[:3]:
        for p, g in zip(params, g_step):
            p.grad = g.clone()
        opt.step()
    # state bytes by hand: two moments, and per dimension a packed factor and a d x d basis (1-D: moments only)
    floats = sum(v.numel() for st in opt.state.values() for k, v in st.items() if k.startswith("exp_avg"))
    floats += sum(t.numel() for st in opt.state.values() for k in ("GG", "Q") for t in st[k] if t is not None)
    assert floats == 2 * (2 * 216 + 25 + 7) + 2 * (21 + 36 + 10 + 16 + 6 + 9 + 6 + 9) + (15 + 25) * 2

    saved = opt.state_dict()
    old_format = copy.deepcopy(saved)
    for st in old_format["state"].values():
        # full factors as the old code saved them: a product G G^T need not be symmetric in its last bits, so the
        # lower triangles here are perturbed; the loader must keep the upper one, as the packed state does
        st["GG"] = [None if f is None else unpack_symmetric(f) + 1e-3 * torch.ones_like(unpack_symmetric(f)).tril(-1)
                    for f in st["GG"]]
    runs = []
    for sd in (saved, old_format):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        o = SOAP(ps, lr=1e-2, precondition_frequency=2)
        o.load_state_dict(copy.deepcopy(sd))
        for p_new, p_old in zip(ps, params):  # loaded factors: the upper triangles of the saved ones
            assert all(torch.equal(f, g) for f, g in zip(o.state[p_new]["GG"], opt.state[p_old]["GG"]) if f is not None)
        for g_step in grads[3:]:
            for p, g in zip(ps, g_step):
                p.grad = g.clone()
            o.step()
        runs.append(ps)
    for for_packed, for_full in zip(*runs):
        assert torch.equal(for_packed, for_full)


def test_a_failing_basis_inside_a_group_falls_back_alone():
    """Two same-shape tensors, one with a gradient whose fp32 eigh misbehaves (tests/data, see above), in one batch:
    both stay finite, and the healthy tensor gets its bases and moves as it would alone."""
    from pathlib import Path

    bad = torch.load(Path(__file__).parent / "data" / "elic_tiny_clipped_grad.pt")
    good = torch.randn(bad.shape, generator=torch.Generator().manual_seed(3))
    ps = [torch.nn.Parameter(torch.zeros_like(bad)), torch.nn.Parameter(torch.zeros_like(bad))]
    opt = SOAP(ps, lr=1e-3, precondition_frequency=1, batched=True, semantics="authors")
    alone = torch.nn.Parameter(torch.zeros_like(bad))
    opt_alone = SOAP([alone], lr=1e-3, precondition_frequency=1, semantics="authors")
    for k in range(4):
        ps[0].grad, ps[1].grad, alone.grad = bad.clone(), good.clone(), good.clone()
        opt.step()
        opt_alone.step()
        if k == 1:  # the first update: the healthy tensor's step does not depend on its batch neighbour
            assert (ps[1] - alone).norm() <= 1e-5 * alone.norm()
    # (later steps are compared in norm only: a factor of rank 48 < 74 after one gradient leaves a null space whose
    # basis the QR refresh completes from rounding-level columns, so two orders of summation pick different bases
    # there, batched or not; tests above use full-rank shapes for step-by-step agreement)
    assert all(torch.isfinite(p).all() for p in ps)
    assert all(torch.isfinite(q).all() for p in ps for q in opt.state[p]["Q"] if q is not None)
    assert all(q is not None for q, f in zip(opt.state[ps[1]]["Q"], opt.state[ps[1]]["GG"]) if f is not None)
    assert 0.3 < ps[1].norm() / alone.norm() < 3


def test_assign_refresh_phases_balances_by_hand():
    units = [([{}], 10), ([{}], 7), ([{}], 5), ([{}], 3), ([{}], 1)]
    assign_refresh_phases(units, 2)  # costliest first to the least-loaded phase: 10->0, 7->1, 5->1, 3->0, 1->1
    assert [u[0][0]["refresh_phase"] for u in units] == [0, 1, 1, 0, 1]
    kept = [([{"refresh_phase": 1}], 20), ([{}], 4), ([{}], 4)]  # an existing phase stays and counts as load
    assign_refresh_phases(kept, 3)
    assert [u[0][0]["refresh_phase"] for u in kept] == [1, 0, 2]


@pytest.mark.parametrize("batched", [True, False])
def test_staggered_refreshes_happen_once_per_period_at_each_tensors_phase_and_resume_exactly(batched):
    shapes = [(6, 5, 3, 3), (6, 5, 3, 3), (4, 4), (4, 4), (4, 4), (7, 3), (5,)]
    gen = torch.Generator().manual_seed(5)
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(13)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    freq = 4

    def run(params, opt, steps, changes=None):
        for g_step in steps:
            before = [[q.clone() for q in opt.state[p]["Q"] if q is not None] if p in opt.state else [] for p in params]
            for p, g in zip(params, g_step):
                p.grad = g.clone()
            opt.step()
            if changes is not None:
                for k, p in enumerate(params):
                    after = [q for q in opt.state[p]["Q"] if q is not None]
                    if before[k] and any(not torch.equal(a, b) for a, b in zip(before[k], after)):
                        changes[k].append(opt.state[p]["step"])

    params = [torch.nn.Parameter(v.clone()) for v in start]
    opt = SOAP(params, lr=1e-2, precondition_frequency=freq, stagger_refresh=True, batched=batched)
    changes = [[] for _ in params]
    run(params, opt, grads, changes)
    phases = [opt.state[p].get("refresh_phase") for p in params]
    assert phases[-1] is None and len(set(phases[:-1])) >= 3  # the vector has no bases; the rest are spread
    for k, phase in enumerate(phases[:-1]):
        assert changes[k] == [t for t in range(2, 14) if t % freq == phase], (k, phase, changes[k])
    if batched:  # a bucket's tensors share their phase
        assert phases[0] == phases[1] and phases[2] == phases[3] == phases[4]

    first = [torch.nn.Parameter(v.clone()) for v in start]
    opt1 = SOAP(first, lr=1e-2, precondition_frequency=freq, stagger_refresh=True, batched=batched)
    run(first, opt1, grads[:6])
    saved = copy.deepcopy(opt1.state_dict())
    assert [saved["state"][k].get("refresh_phase") for k in range(len(shapes))] == phases  # kept in checkpoints
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = SOAP(second, lr=1e-2, precondition_frequency=freq, stagger_refresh=True, batched=batched)
    opt2.load_state_dict(saved)
    run(second, opt2, grads[6:])
    for a, b in zip(params, second):
        assert torch.equal(a, b)
    # a phase from a checkpoint is honoured, not given anew: move the matrices' phase and watch their refreshes
    moved = copy.deepcopy(opt1.state_dict())
    new_phase = (phases[2] + 1) % freq
    for k in (2, 3, 4):
        moved["state"][k]["refresh_phase"] = new_phase
    third = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt3 = SOAP(third, lr=1e-2, precondition_frequency=freq, stagger_refresh=True, batched=batched)
    opt3.load_state_dict(moved)
    changes = [[] for _ in third]
    run(third, opt3, grads[6:], changes)
    assert changes[2] == [t for t in range(7, 14) if t % freq == new_phase]


def test_staggered_phases_are_spread_over_parameter_groups_and_follow_a_lowered_frequency():
    gen = torch.Generator().manual_seed(6)
    a, b = (torch.nn.Parameter(torch.randn(8, 8, 3, 3, generator=gen)) for _ in range(2))
    opt = SOAP([{"params": [a]}, {"params": [b], "weight_decay": 0.1}], lr=1e-2, precondition_frequency=4,
               stagger_refresh=True)
    for _ in range(2):
        a.grad, b.grad = torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen)
        opt.step()
    phases = [opt.state[a]["refresh_phase"], opt.state[b]["refresh_phase"]]
    assert phases[0] != phases[1]  # each group alone would put its only bucket on phase 0
    # the frequency lowered below a phase: refreshes go on, at the phase modulo the new frequency
    for group in opt.param_groups:
        group["precondition_frequency"] = 2
    opt.state[b]["refresh_phase"] = 3
    seen = []
    for _ in range(4):
        before = opt.state[b]["Q"][0].clone()
        a.grad, b.grad = torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen)
        opt.step()
        if not torch.equal(before, opt.state[b]["Q"][0]):
            seen.append(opt.state[b]["step"])
    assert seen == [3, 5]
