"""The pure-PyTorch bidirectional WKV (lictrain/models/wkv.py) against the formula evaluated token by token."""

import math

import pytest
import torch

from lictrain.models.wkv import bi_wkv


def reference_bi_wkv(w, u, k, v):
    """wkv_t per the Vision-RWKV formula, every weight written out (float64, with the largest exponent of each
    (b, t, c) subtracted so that extreme k cannot overflow)."""
    b, t_len, c = k.shape
    out = torch.empty(b, t_len, c, dtype=torch.float64)
    for t in range(t_len):
        expo = torch.empty(b, t_len, c, dtype=torch.float64)
        for i in range(t_len):
            expo[:, i] = (u + k[:, t]) if i == t else (-(abs(t - i) - 1) * w + k[:, i])
        weights = torch.exp(expo - expo.amax(1, keepdim=True))
        out[:, t] = (weights * v).sum(1) / weights.sum(1)
    return out


def assert_formula_and_gradients(fn, inputs, rtol=1e-10, grad_rtol=1e-8):
    """fn(w, u, k, v) against the token-by-token formula in float64: values, and gradients of a random weighting."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    ref_leaves = [x.clone().requires_grad_() for x in inputs]
    weights = torch.randn(inputs[2].shape, dtype=torch.float64)
    got = fn(*leaves)
    (got * weights).sum().backward()
    want = reference_bi_wkv(*ref_leaves)
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol / 100)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=grad_rtol, atol=grad_rtol / 100)


def _inputs(t_len, c, k_scale, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(c, generator=g, dtype=dtype) * 2  # decays 0..2 per step
    u = torch.randn(c, generator=g, dtype=dtype)
    k = torch.randn(2, t_len, c, generator=g, dtype=dtype) * k_scale
    v = torch.randn(2, t_len, c, generator=g, dtype=dtype)
    return w, u, k, v


@pytest.mark.parametrize("t_len,chunk", [(1, 4), (7, 4), (16, 4), (37, 8), (37, 64)])
def test_bi_wkv_equals_the_token_by_token_formula(t_len, chunk):
    w, u, k, v = _inputs(t_len, 3, 1.0)
    torch.testing.assert_close(bi_wkv(w, u, k, v, chunk=chunk), reference_bi_wkv(w, u, k, v), rtol=1e-10, atol=1e-12)


def test_extreme_keys_and_decays_stay_exact_in_float32():
    w, u, k, v = _inputs(29, 4, 60.0, seed=1)  # keys spread over hundreds of nats: exp() alone would overflow
    w = w * 20  # and decays that underflow any unscaled sum
    got = bi_wkv(w.float(), u.float(), k.float(), v.float(), chunk=8)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), reference_bi_wkv(w, u, k, v), rtol=1e-4, atol=1e-5)


def test_lalic_like_inputs_in_float32():
    """LALIC's regime (decay / T, keys of layer-normed tokens): the products' path, in float32."""
    w, u, k, v = _inputs(300, 4, 3.0, seed=4)
    w, u = torch.randn(4, dtype=torch.float64) / 300, u / 300
    got = bi_wkv(w.float(), u.float(), k.float(), v.float())
    torch.testing.assert_close(got.double(), reference_bi_wkv(w, u, k, v), rtol=1e-4, atol=1e-5)


def test_negative_decays_as_lalic_may_learn_them():
    w, u, k, v = _inputs(23, 3, 1.0, seed=3)
    w = -3 * w  # weights grow with distance, up to exp(6 * 21) over the sequence
    got = bi_wkv(w.float(), u.float(), k.float(), v.float(), chunk=8)
    torch.testing.assert_close(got.double(), reference_bi_wkv(w, u, k, v), rtol=1e-4, atol=1e-5)


def test_gradients_equal_the_references():
    assert_formula_and_gradients(lambda *a: bi_wkv(*a, chunk=4), _inputs(13, 2, 2.0, seed=2))


def test_two_tokens_by_hand():
    # T = 2: wkv_0 = (e^{k1} v1 + e^{u + k0} v0) / (e^{k1} + e^{u + k0}) (neighbours: no decay)
    w, u = torch.tensor([0.7], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64)
    k = torch.tensor([[[0.2], [-0.5]]], dtype=torch.float64)
    v = torch.tensor([[[1.0], [3.0]]], dtype=torch.float64)
    a, b = math.exp(-0.5), math.exp(0.3 + 0.2)
    assert bi_wkv(w, u, k, v)[0, 0, 0].item() == pytest.approx((a * 3 + b * 1) / (a + b), rel=1e-12)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="bi_wkv needs"):
        bi_wkv(torch.zeros(3), torch.zeros(3), torch.zeros(1, 4, 2), torch.zeros(1, 4, 2))


@pytest.mark.parametrize("spread", [-1.0, 1e9])  # every call down the pair-by-pair path, or every call by products
def test_both_paths_give_the_formula_and_its_gradients(monkeypatch, spread):
    import lictrain.models.wkv as wkv

    monkeypatch.setattr(wkv, "_FAST_SPREAD", spread)
    assert_formula_and_gradients(lambda *a: bi_wkv(*a, chunk=4), _inputs(19, 3, 1.5, seed=5))


def test_autocast_does_not_lower_the_precision():
    w, u, k, v = _inputs(40, 4, 1.0, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bi_wkv(w.float(), u.float(), k.float(), v.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_bi_wkv(w, u, k, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["plain", "extreme", "negative"])
def test_the_sync_free_scan_gives_the_formula_and_its_gradients(case):
    """bi_wkv_scan (the CUDA and compiled path: no host read) against the token-by-token formula, values and
    gradients, over the ranges the product path is tested on."""
    from lictrain.models.wkv import bi_wkv_scan

    w, u, k, v = _inputs(21, 3, 60.0 if case == "extreme" else 1.5, seed=7)
    w = w * 20 if case == "extreme" else (-3 * w if case == "negative" else w)
    assert_formula_and_gradients(bi_wkv_scan, (w, u, k, v), rtol=1e-9, grad_rtol=1e-7)
    # float32 inputs (computed in float64 inside) keep float32's accuracy in LALIC's regime
    w, u, k, v = _inputs(300, 4, 3.0, seed=4)
    w, u = torch.randn(4, dtype=torch.float64) / 300, u / 300
    got = bi_wkv_scan(w.float(), u.float(), k.float(), v.float())
    torch.testing.assert_close(got, reference_bi_wkv(w, u, k, v), rtol=1e-5, atol=1e-6)


def test_bi_wkv_compiles_without_a_graph_break():
    """Under torch.compile bi_wkv takes the scan (no host read, so no graph break) and gives the formula."""
    w, u, k, v = _inputs(17, 3, 1.0, seed=8)
    explained = torch._dynamo.explain(bi_wkv)(w, u, k, v)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_the_scan_path_recomputes_in_backward_and_gives_the_formulas_gradients(monkeypatch):
    """bi_wkv as CUDA runs it (the scan, its intermediates recomputed in the backward pass): values and gradients of
    the formula. (The CPU takes the scan only under torch.compile, which is faked here.)"""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    inputs = _inputs(15, 3, 2.0, seed=9)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        bi_wkv(*(x.clone().requires_grad_() for x in inputs))
    assert len(saved) <= 6  # the inputs (and their casts), not the scan's intermediates (13 saved without it)
    assert_formula_and_gradients(bi_wkv, inputs, rtol=1e-9, grad_rtol=1e-7)
