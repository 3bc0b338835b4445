"""TCM with AuxT (lictrain/models/auxt.py): the Haar transform against hand-computed values, the shortcut positions
against a step-by-step reference, the added parameters against the hand formula, the orthogonality regulariser in
the loss, bit-exact coding and training."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lictrain import bitstream
from lictrain.evaluation import Codec
from lictrain.losses import RateDistortionLoss
from lictrain.models import build_model
from lictrain.models.auxt import InverseWaveletShortcut, WaveletShortcut, haar, inverse_haar, orthogonality_penalty
from tests.conftest import public_block_state, smooth_batch, trained_and_evaluated


def test_haar_of_one_block_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]]).view(1, 1, 2, 2)  # a b / c d
    got = haar(x).flatten().tolist()
    # LL = (a+b+c+d)/2, LH = (a+b-c-d)/2 (top minus bottom), HL = (a-b+c-d)/2 (left minus right), HH = (a-b-c+d)/2
    assert got == [5.5, -2.5, -1.5, 0.5]


def test_haar_is_orthonormal_and_inverted_by_its_transpose():
    torch.manual_seed(0)
    x, z = torch.randn(2, 3, 8, 6), torch.randn(2, 12, 4, 3)
    assert torch.allclose(haar(x).norm(), x.norm())  # energy preserved
    assert torch.allclose(inverse_haar(haar(x)), x, atol=1e-6)
    assert torch.allclose((haar(x) * z).sum(), (x * inverse_haar(z)).sum(), atol=1e-4)  # <Hx, z> = <x, H^T z>
    # subband-major channels: channel s*C + c is subband s of input channel c
    for c in range(3):
        assert torch.allclose(haar(x)[:, [c, 3 + c, 6 + c, 9 + c]], haar(x[:, c:c + 1]))


def test_orthogonality_penalty_by_hand():
    assert orthogonality_penalty(torch.eye(3)).item() == 0
    assert orthogonality_penalty(2 * torch.eye(2)).item() == pytest.approx(4.5)  # G = 4I: (3^2 + 3^2) / 4
    assert orthogonality_penalty(torch.tensor([[1.0, 1.0]])).item() == pytest.approx(1.0)  # W W^T = [[2]]
    assert orthogonality_penalty(torch.tensor([[1.0], [1.0]])).item() == pytest.approx(1.0)  # W^T W = [[2]]


def _wls(i, o):  # gains 4i, projection 4i*o + o
    return 4 * i + 4 * i * o + o


def _iwls(i, o):  # gains 4o, projection i*4o + 4o
    return 4 * o + 4 * i * o + 4 * o


def test_auxt_adds_the_hand_counted_parameters_to_tcm_s():
    n2, m = 128, 320  # TCM-S: 2N = 128, M = 320
    extra = (_wls(3, n2) + 2 * _wls(n2, n2) + _wls(n2, m)) + (_iwls(m, n2) + 2 * _iwls(n2, n2) + _iwls(n2, 3))
    assert extra == 598_244
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(build_model("tcm+auxt", "paper")) - count(build_model("tcm", "paper")) == extra


def _reference_transform(wrapped, x, after):
    """The main layers one by one, the k-th shortcut's output (fed by the previous shortcut) added after after[k]."""
    aux = x
    shortcuts = iter(wrapped.shortcuts)
    for i, layer in enumerate(wrapped.layers):
        x = layer(x)
        if i in after:
            aux = next(shortcuts)(aux)
            x = x + aux
    return x


def test_shortcuts_join_where_the_public_code_adds_them():
    torch.manual_seed(0)
    model = build_model("tcm+auxt", "tiny").eval()
    x = torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        y = model.g_a(x)
        assert torch.allclose(y, _reference_transform(model.g_a, x, {0, 3, 6, 9}), atol=1e-6)
        assert torch.allclose(model.g_s(y), _reference_transform(model.g_s, y, {2, 5, 8, 9}), atol=1e-6)
        without = model.g_a.layers(x)
        assert (y - without).abs().max() > 1e-2  # the shortcuts contribute


def test_the_regulariser_joins_the_loss_in_training_only():
    torch.manual_seed(0)
    model = build_model("tcm+auxt", "tiny")
    x = torch.rand(2, 3, 64, 64)
    out = model(x)
    terms = RateDistortionLoss(0.01)(out, x)
    expected = 0.1 * model.orthogonality_loss()
    assert out["regularizer"].item() == pytest.approx(expected.item()) and expected.item() > 0
    rd = terms.rate + terms.lmbda * terms.distortion  # ~100: the difference carries float32 rounding of rd
    assert (terms.loss - rd).item() == pytest.approx(expected.item(), rel=1e-3)
    terms.loss.backward()
    assert model.g_a.shortcuts[0].proj.weight.grad.abs().sum() > 0
    assert "regularizer" not in model.eval()(x)
    assert build_model("tcm+auxt", "tiny", {"ortho_weight": 0})(x).get("regularizer") is None


@pytest.mark.parametrize("size", [(64, 64), (70, 90)])
def test_decoder_rebuilds_the_encoder_side_reconstruction(size):
    torch.manual_seed(0)
    model = build_model("tcm+auxt", "tiny")
    g = torch.Generator().manual_seed(3)
    x = F.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=size, mode="bicubic").clamp(0, 1)[0]
    with torch.no_grad():
        last = model.g_a.shortcuts[-1].proj  # spread the latents over several integers
        gain = 4 / model.g_a(F.pad(x[None], (0, (-size[1]) % 64, 0, (-size[0]) % 64))).std()
        for layer in (last, model.g_a.layers[-1]):  # y = main + shortcut: both scaled
            layer.weight.mul_(gain)
            layer.bias.mul_(gain)
    codec = Codec(model, "tcm+auxt", "tiny")
    h, w = size
    padded = F.pad(x[None], (0, (-w) % 64, 0, (-h) % 64), mode="replicate")
    with torch.no_grad():
        assert len(torch.unique(torch.round(codec.model.g_a(padded)))) >= 5
        ref = codec.model(padded)["x_hat"][0, :, :h, :w].clamp(0, 1)
    x_hat = codec.decompress(bitstream.decode(bitstream.encode(codec.compress(x))))
    assert (x_hat - ref).abs().max().item() < 1e-4


def test_a_few_adam_steps_lower_the_loss_and_the_regulariser():
    torch.manual_seed(0)
    model = build_model("tcm+auxt", "tiny")
    x = smooth_batch(4, (64, 64))
    loss_fn = RateDistortionLoss(0.01)
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if not n.endswith("quantiles")], lr=1e-3)
    losses, regs = [], []
    for _ in range(12):
        opt.zero_grad()
        out = model(x)
        terms = loss_fn(out, x)
        terms.loss.backward()
        opt.step()
        losses.append(terms.loss.item())
        regs.append(out["regularizer"].item())
    assert losses[-1] < 0.7 * losses[0] and regs[-1] < regs[0], (losses, regs)


def test_odd_sides_are_zero_padded_like_the_stride_two_layers():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 3)
    assert haar(x).shape == (1, 8, 3, 2)
    assert torch.equal(haar(x), haar(F.pad(x, (0, 1, 0, 1))))


def test_tcm_auxt_trains_with_balanced_rd_and_evaluates(tmp_path):
    row = trained_and_evaluated(tmp_path, {"model": {"name": "tcm+auxt", "preset": "tiny"}, "train": {"steps": 2},
                                           "data": {"crop": 64, "batch_size": 2}, "method": {"name": "balanced-rd"}})
    assert row["bpp"][0] > 0 and row["psnr-rgb"][0] > 5  # real bitstreams decoded to an image, not noise


@pytest.mark.parametrize("case", ["wls", "iwls"])
def test_wavelet_shortcuts_equal_the_public_codes(case):
    """Outputs of the public code's WLS / iWLS (qingshi9974/AuxT at 11f9c9e) on random weights, saved once with
    their state dicts in tests/data: lictrain's shortcuts, loaded through the key map of `lictrain import` (linear
    layers become 1x1 convolutions, per-token gains per-channel ones), give them. (The public Haar filters are
    0.5 (1 - 6e-8), float32's rounding of 1/sqrt(2) squared: hence the tolerance.)"""
    ref = torch.load(Path(__file__).parent / "data" / "auxt_public_reference.pt")[case]
    side, module = ("enc", WaveletShortcut(3, 8)) if case == "wls" else ("dec", InverseWaveletShortcut(8, 3))
    target = "g_a.shortcuts.0." if side == "enc" else "g_s.shortcuts.0."
    module.load_state_dict(public_block_state("tcm-auxt", ref["state"], f"AuxT_{side}.0.", target))
    with torch.no_grad():
        torch.testing.assert_close(module(ref["x"]), ref["out"], rtol=1e-5, atol=1e-5)
