"""LALIC (lictrain/models/lalic.py): the published configuration's parameter count, the folded omni-shift against
its four convolutions, the Bi-RWKV block against a direct evaluation, and training. (Bit-exact coding: the all-model
test in tests/test_codecs.py.)"""

import pytest
import torch
import torch.nn.functional as F

from lictrain.models import build_model
from lictrain.models.lalic import BiRWKVBlock, OmniShift
from tests.conftest import adam_losses, decoded_and_encoder_side, smooth_batch
from tests.test_wkv import reference_bi_wkv


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _block(d: int, r: int) -> int:
    # LN 4d, scales 2d, 2 omni-shifts 2(35d + 4), k/v/r/o 4d^2, decay and boost 2d, channel mix (2r + 1) d^2
    return (2 * r + 5) * d * d + 78 * d + 8


def test_paper_preset_has_the_hand_counted_parameters():
    model = build_model("lalic", "paper")
    n = _count(model)
    assert n == 65_621_045  # the hand count of the public code's layers (no published figure found)
    blocks = [m for m in model.modules() if isinstance(m, BiRWKVBlock)]
    assert len(blocks) == 2 * (2 + 4 + 6) + 2 * 6 + 2 * 4  # transforms, hyper transforms, channel contexts
    assert sum(_count(b) for b in blocks if b.channel.key.out_features == 4 * 96) == 4 * _block(96, 4)
    assert _count(blocks[0]) == _block(96, 4)
    assert model.groups == [16, 16, 32, 64, 192]


def test_omni_shift_equals_its_four_depthwise_convolutions():
    torch.manual_seed(0)
    s = OmniShift(3)
    x = torch.randn(2, 3, 7, 9)
    a = s.alpha
    want = (a[0] * x + a[1] * F.conv2d(x, s.k1, groups=3) + a[2] * F.conv2d(x, s.k3, padding=1, groups=3)
            + a[3] * F.conv2d(x, s.k5, padding=2, groups=3))
    torch.testing.assert_close(s(x), want, rtol=1e-5, atol=1e-6)


def test_bi_rwkv_block_equals_a_direct_evaluation():
    torch.manual_seed(0)
    blk = BiRWKVBlock(8, hidden_rate=4).double()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    t = x.flatten(2).transpose(1, 2)  # raster order

    def shifted(shift, tokens):
        return shift(tokens.transpose(1, 2).reshape(2, 8, 3, 5)).flatten(2).transpose(1, 2)

    sm, cm = blk.spatial, blk.channel
    h = shifted(sm.shift, blk.norm1(t))
    wkv = reference_bi_wkv(sm.decay / 15, sm.boost / 15, sm.key(h), sm.value(h))
    t = t + blk.gamma1 * sm.output(torch.sigmoid(sm.receptance(h)) * wkv)
    h = shifted(cm.shift, blk.norm2(t))
    t = t + blk.gamma2 * torch.sigmoid(cm.receptance(h)) * cm.value(torch.relu(cm.key(h)) ** 2)
    torch.testing.assert_close(blk(x), t.transpose(1, 2).reshape(2, 8, 3, 5), rtol=1e-9, atol=1e-10)


def test_tiny_preset_shapes_and_a_few_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_model("lalic", "tiny")
    x = smooth_batch(4, (64, 64))
    out = model(x)
    assert out["x_hat"].shape == x.shape and out["likelihoods"]["y"].shape == (4, 40, 4, 4)
    losses = adam_losses(model, x, steps=12)
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("size", [(64, 64), (100, 130)])
def test_decoder_rebuilds_the_encoder_side_reconstruction_at_several_sizes(size):
    torch.manual_seed(0)
    x_hat, ref = decoded_and_encoder_side(build_model("lalic", "tiny"), "lalic", size)
    assert x_hat.shape == ref.shape and (x_hat - ref).abs().max().item() < 1e-4
