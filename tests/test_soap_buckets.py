"""SOAP's stacked state (lictrain/optim/soap_buckets.py) against independent references: the explicit Kronecker
product acting on the vectorised tensor, the Gram matrix of the raw gradient with its dimension moved first, and
the per-tensor refresh of soap.py."""

import copy
import math

import pytest
import torch

from lictrain.optim.common import pack_symmetric, unpack_symmetric
from lictrain.optim.soap import SOAP
from lictrain.optim.soap_buckets import Bucket

# (shape, dimensions without a factor): conv kernels (trailing kh x kw merged into one Kronecker step), three
# trailing small dimensions (the general partial trace), size-1 dimensions, a dimension kept diagonal (as one larger
# than max_precond_dim is) in the middle and at the end, a matrix, a vector with a factor (precondition_1d)
SHAPES = [((4, 3, 2, 3), ()), ((3, 2, 2, 2), ()), ((6, 1, 3), ()), ((5, 4, 1, 1), ()), ((4, 7, 3), (1,)),
          ((3, 5, 9), (2,)), ((6, 5), ()), ((7,), ())]


def _bucket(shape, diagonal, n=3, seed=0, step=4):
    gen = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(n):
        gg = [None if (i in diagonal or d == 1) else _spd(d, gen) for i, d in enumerate(shape)]
        qs = [None if f is None else torch.linalg.qr(torch.randn(f.shape, generator=gen, dtype=torch.float64))[0]
              for f in gg]
        states.append({"step": step, "exp_avg": torch.randn(shape, generator=gen, dtype=torch.float64),
                       "exp_avg_sq": torch.rand(shape, generator=gen, dtype=torch.float64),
                       "GG": [None if f is None else pack_symmetric(f) for f in gg], "Q": qs})
    reference = copy.deepcopy(states)
    return Bucket([None] * n, states), reference, gen


def _spd(d, gen):
    a = torch.randn(d, d + 2, generator=gen, dtype=torch.float64)
    return a @ a.T / d


def _kron(qs, shape):
    k = torch.ones(1, 1, dtype=torch.float64)
    for q, d in zip(qs, shape):
        k = torch.kron(k, torch.eye(d, dtype=torch.float64) if q is None else q.contiguous()).contiguous()
    return k


@pytest.mark.parametrize("shape,diagonal", SHAPES)
def test_rotation_equals_the_explicit_kronecker_product(shape, diagonal):
    bucket, ref, gen = _bucket(shape, diagonal)
    x = torch.randn(bucket.n, *shape, generator=gen, dtype=torch.float64)
    into, back = bucket.rotate(x), bucket.rotate(x, back=True)
    for j, st in enumerate(ref):
        k = _kron(st["Q"], shape)
        torch.testing.assert_close(into[j].reshape(-1), k.T @ x[j].reshape(-1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(back[j].reshape(-1), k @ x[j].reshape(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,diagonal", SHAPES)
def test_factors_accumulated_on_the_way_equal_the_gram_of_the_raw_gradient(shape, diagonal):
    """The factor of dimension i is taken from the partly rotated gradient; it must equal G_(i) G_(i)^T of the
    gradient itself (rotations of the other dimensions are orthogonal and cancel)."""
    bucket, ref, gen = _bucket(shape, diagonal)
    g = torch.randn(bucket.n, *shape, generator=gen, dtype=torch.float64)
    beta = 0.9
    bucket.rotate(g, accumulate=beta)
    for j, st in enumerate(ref):
        for i, f0 in enumerate(st["GG"]):
            if f0 is None:
                assert bucket.gg[i] is None
                continue
            gi = g[j].movedim(i, 0).reshape(shape[i], -1)
            expected = beta * unpack_symmetric(f0) + (1 - beta) * gi @ gi.T
            torch.testing.assert_close(unpack_symmetric(bucket.gg[i][j]), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape,diagonal", SHAPES)
def test_refresh_equals_the_per_tensor_refresh(shape, diagonal):
    """Batched power iteration + QR, the second moment permuted by each item's own order (row moves and the
    elementwise gather both), the first moment moved to the new bases in one pass: against soap.py's per-tensor
    refresh on copies of the same states."""
    bucket, ref, _ = _bucket(shape, diagonal, n=4, seed=1)
    v0 = [st["exp_avg_sq"].clone() for st in ref]
    bucket.refresh(exact=False)
    moved = 0
    for j, st in enumerate(ref):
        SOAP._refresh_basis(st, exact=False)
        for i, q in enumerate(st["Q"]):
            if q is not None:
                torch.testing.assert_close(bucket.q[i][j], q, rtol=1e-9, atol=1e-9)
        assert torch.equal(bucket.v[j], st["exp_avg_sq"])  # a permutation: exact
        torch.testing.assert_close(bucket.m[j], st["exp_avg"], rtol=1e-9, atol=1e-9)
        moved += not torch.equal(st["exp_avg_sq"], v0[j])
    if any(d > 1 and i not in diagonal for i, d in enumerate(shape)) and math.prod(shape) > 7:
        assert moved > 0  # (random bases: the orders did change, so the permutation was exercised)


def test_a_non_finite_factor_keeps_its_basis_and_its_moments_alone():
    bucket, ref, _ = _bucket((4, 3, 2, 3), (), n=3, seed=2)
    bucket.gg[0][1, 0] = float("nan")  # (packed: the factor's first diagonal entry)
    bucket.refresh(exact=False)
    torch.testing.assert_close(bucket.q[0][1], ref[1]["Q"][0], rtol=0, atol=0)  # kept
    SOAP._refresh_basis(ref[0], exact=False)
    torch.testing.assert_close(bucket.q[0][0], ref[0]["Q"][0], rtol=1e-9, atol=1e-9)  # the neighbour refreshed
    assert all(torch.isfinite(q).all() for q in bucket.q if q is not None)


def test_parameter_state_is_views_of_the_stacks_and_a_replaced_entry_is_honoured():
    gen = torch.Generator().manual_seed(4)
    ps = [torch.nn.Parameter(torch.randn(4, 4, 3, 3, generator=gen)) for _ in range(3)]
    opt = SOAP(ps, lr=1e-3, precondition_frequency=2)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    (bucket,) = opt._buckets[id(opt.param_groups[0])][1]
    for j, p in enumerate(ps):
        assert opt.state[p]["exp_avg_sq"].data_ptr() == bucket.v[j].data_ptr()
    # a user (or load_state_dict) replaces one entry: the next step must use it, not the stale stack
    opt.state[ps[1]]["exp_avg"] = torch.zeros(4, 4, 3, 3)
    for p in ps:
        p.grad = torch.zeros(p.shape)
    before = ps[1].detach().clone()
    opt.step()
    assert torch.equal(ps[1], before)  # zero gradient and zero first moment: no step
    (rebuilt,) = opt._buckets[id(opt.param_groups[0])][1]
    assert rebuilt is not bucket and opt.state[ps[1]]["exp_avg"].data_ptr() == rebuilt.m[1].data_ptr()


# ---- the refresh's QR: Householder (LAPACK) against CholeskyQR2 (issue 34) ----------------------------------------
def _stack_with_condition(n, d, cond, gen):
    """Matrices U diag(s) V^T with singular values spread log-uniformly over [1/cond, 1]."""
    u = torch.linalg.qr(torch.randn(n, d, d, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, d, d, generator=gen, dtype=torch.float64))[0]
    s = torch.logspace(0, -math.log10(cond), d, dtype=torch.float64)
    return u @ torch.diag_embed(s.expand(n, d)) @ v.mT


def _equal_up_to_column_signs(q, ref, tol):
    signs = torch.sign((q * ref).sum(-2, keepdim=True))
    torch.testing.assert_close(q * signs, ref, rtol=0, atol=tol)


@pytest.mark.parametrize("cond,tol", [(10.0, 1e-12), (1e5, 1e-9)])
def test_cholesky_qr2_equals_householder_up_to_column_signs(cond, tol):
    from lictrain.optim.common import cholesky_qr2

    a = _stack_with_condition(6, 12, cond, torch.Generator().manual_seed(5))
    q, failed = cholesky_qr2(a)
    assert not failed.any()
    _equal_up_to_column_signs(q, torch.linalg.qr(a)[0], tol)
    torch.testing.assert_close(q.mT @ q, torch.eye(12, dtype=torch.float64).expand(6, 12, 12), rtol=0, atol=1e-13)


def test_cholesky_fails_exactly_on_singular_items_and_the_shifted_redo_takes_them():
    from lictrain.optim.common import CHOLESKY_SHIFT, cholesky_qr2, power_step_basis

    gen = torch.Generator().manual_seed(6)
    n, d = 5, 8
    x = torch.randn(n, d, d + 3, generator=gen, dtype=torch.float64)
    x[1, :3] = 0  # a factor with three dead rows (a dead channel's zero gradient): rank d - 3
    x[3, -1] = 0
    fs = x @ x.mT
    fs = fs / fs.abs().amax(dim=(1, 2), keepdim=True)
    q_old = torch.linalg.qr(torch.randn(n, d, d, generator=gen, dtype=torch.float64))[0]
    _, failed = cholesky_qr2(fs @ q_old)
    assert failed.tolist() == [False, True, False, True, False]
    q, still = power_step_basis(fs, q_old, "cholesky")
    assert not still.any()
    torch.testing.assert_close(q.mT @ q, torch.eye(d, dtype=torch.float64).expand(n, d, d), rtol=0, atol=1e-12)
    reference = torch.linalg.qr(fs @ q_old)[0]  # the unshifted product where Cholesky succeeded
    shifted = torch.linalg.qr(fs @ q_old + CHOLESKY_SHIFT * q_old)[0]  # (F + shift I) Q_old where it failed
    for j in range(n):
        _equal_up_to_column_signs(q[j], (shifted if failed[j] else reference)[j], 1e-6 if failed[j] else 1e-10)
    # the shift keeps the factor's eigenvectors: the redone basis still diagonalises the live part of the factor
    # as well as Householder's does after one step from the same start
    hq = torch.linalg.qr(fs[1] @ q_old[1])[0]
    off = lambda m: float((m - torch.diag_embed(m.diagonal())).norm())  # noqa: E731
    assert off(q[1].mT @ fs[1] @ q[1]) == pytest.approx(off(hq.mT @ fs[1] @ hq), rel=1e-3)


@pytest.mark.parametrize("batched", [True, False])
def test_soap_with_cholesky_qr2_follows_soap_with_householder(batched):
    def run(qr):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(), torch.nn.Conv2d(8, 8, 3),
                                    torch.nn.GELU(), torch.nn.Conv2d(8, 3, 1))
        opt = SOAP(model.parameters(), lr=3e-3, precondition_frequency=3, batched=batched, refresh_qr=qr)
        gen = torch.Generator().manual_seed(1)
        for _ in range(30):  # 10 refreshes
            x = torch.randn(4, 3, 10, 10, generator=gen)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), x[:, :, 1:-1, 1:-1]).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()], opt

    (householder, _), (cholesky, opt) = run("householder"), run("cholesky")
    for a, b in zip(householder, cholesky):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert SOAP._qr(opt.param_groups[0], torch.device("cpu")) == "cholesky"
    assert SOAP._qr({"refresh_qr": "auto"}, torch.device("cuda")) == "cholesky"
    assert SOAP._qr({}, torch.device("cpu")) == "householder"  # a checkpoint's group from before the option
    with pytest.raises(ValueError, match="refresh_qr"):
        SOAP(householder, refresh_qr="qr")


def test_batched_exact_refresh_equals_eigh_per_factor():
    """basis_refresh="eigh" refreshes a stack by one batched eigh (issue 34: no per-factor host reads): the same
    bases as eigh_descending factor by factor, a zero factor's identity, a non-finite factor's old basis kept."""
    from lictrain.optim.common import eigh_descending, eigh_descending_batched

    bucket, ref, _ = _bucket((5, 4, 3, 3), (), n=4, seed=3)
    bucket.gg[1][2].zero_()
    bucket.gg[0][3, 1] = float("nan")
    factors = [unpack_symmetric(f.clone()) if f is not None else None for f in bucket.gg]
    old = [q.clone() for q in bucket.q]
    bucket.refresh(exact=True)
    for i, f in enumerate(factors):
        for j in range(4):
            expected = eigh_descending(f[j])
            if expected is None:
                assert (i, j) == (0, 3)
                torch.testing.assert_close(bucket.q[i][j], old[i][j], rtol=0, atol=0)
            else:
                torch.testing.assert_close(bucket.q[i][j], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(bucket.q[1][2], torch.eye(4, dtype=torch.float64), rtol=0, atol=0)
    q, ok = eigh_descending_batched(factors[0])
    assert ok.tolist() == [True, True, True, False]


def test_first_bases_batched_equal_eigh_per_factor():
    """soap.first_bases (one batched eigh per factor size) against common.eigh_descending on each factor: the same
    bases (up to column signs), a zero factor gets the identity, a non-finite one no basis (as the per-tensor
    path leaves it)."""
    from lictrain.optim.common import eigh_descending
    from lictrain.optim.soap import first_bases

    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 3, 3, 3), (4, 3, 3, 3), (6, 4), (3, 3)]
    states = [{"GG": [pack_symmetric(_spd(d, gen).float()) for d in shape], "Q": [None] * len(shape)}
              for shape in shapes]
    states[2]["GG"][1].zero_()
    states[3]["GG"][0][1] = float("nan")
    first_bases(states)
    for st in states:
        for f, q in zip(st["GG"], st["Q"]):
            want = eigh_descending(unpack_symmetric(f))
            if want is None:
                assert q is None
                continue
            torch.testing.assert_close(q.abs(), want.abs(), rtol=1e-4, atol=1e-5)
    assert torch.equal(states[2]["Q"][1], torch.eye(4))
    assert states[3]["Q"][0] is None and states[3]["Q"][1] is not None
