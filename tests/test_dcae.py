"""DCAE (lictrain/models/dcae.py): parameter counts against the hand count of the public code's layers, the
dictionary cross-attention against a direct evaluation, bit-exact coding at several sizes, training."""

from pathlib import Path

import pytest
import torch

from lictrain.models import build_model
from lictrain.models.dcae import ConvGLU, DictionaryCrossAttention, SwinStage, down_stage, up_stage
from tests.conftest import adam_losses, decoded_and_encoder_side, public_block_state, smooth_batch


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_preset_has_the_hand_counted_parameters():
    # hand counts from the layer shapes of LabShuHangGU/DCAE's models/dcae.py (no published total was found)
    m = build_model("dcae", "paper")
    assert _count(m) == 119_400_351
    expected = {"g_a": 13_637_598, "g_s": 13_637_281, "h_a": 2_936_358, "h_scale_s": 2_936_486,
                "h_mean_s": 2_936_486, "dca": 44_693_390, "cc_mean": 12_628_000, "cc_scale": 12_628_000,
                "lrp": 13_273_120, "entropy_bottleneck": 11_712}
    assert {k: _count(getattr(m, k)) for k in expected} == expected
    assert m.dictionary.shape == (128, 640)
    d = 640  # ConvGLU(d, 4d): fc1 4d^2 + 4d, depthwise 3x3 on 2d channels 20d, fc2 2d^2 + d
    assert _count(ConvGLU(d, 4 * d)) == 6 * d * d + 25 * d


def test_preset_shapes():
    torch.manual_seed(0)
    m = build_model("dcae", "tiny").eval()
    with torch.no_grad():
        out = m(torch.rand(1, 3, 128, 192))
    assert out["x_hat"].shape == (1, 3, 128, 192)
    assert out["likelihoods"]["y"].shape == (1, 40, 8, 12) and out["likelihoods"]["z"].shape == (1, 16, 2, 3)


def test_dictionary_attention_equals_a_direct_evaluation():
    torch.manual_seed(0)
    dca = DictionaryCrossAttention(c_in=6, c_out=5, heads=2, head_dim=4).double()
    with torch.no_grad():
        dca.temperature.copy_(torch.tensor([0.7, 1.9]).view(2, 1, 1))
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    dictionary = torch.randn(7, 8, dtype=torch.float64)
    # per position p and head h: softmax_e(tau_h <q_ph, k_eh>) over the 7 entries, weights on LN(D)'s head slice
    x1 = dca.inp(x.permute(0, 2, 3, 1))
    x2 = dca.aggregate(dca.norm_a(x1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + dca.gamma1 * x1
    q = dca.query(dca.norm_q(x2))
    dn = dca.norm_d(dictionary)
    k = dca.key(dn)
    o = torch.zeros_like(q)
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        logits = dca.temperature[h, 0, 0] * torch.einsum("bijc,ec->bije", q[..., sl], k[:, sl])
        o[..., sl] = torch.einsum("bije,ec->bijc", logits.softmax(-1), dn[:, sl])
    x3 = dca.proj(o) + dca.gamma2 * x2
    want = dca.out(dca.mlp(dca.norm_m(x3)) + dca.gamma3 * x3).permute(0, 3, 1, 2)
    torch.testing.assert_close(dca(x, dictionary), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size", [(64, 64), (100, 130)])
def test_decoder_rebuilds_the_encoder_side_reconstruction_at_several_sizes(size):
    torch.manual_seed(0)
    x_hat, ref = decoded_and_encoder_side(build_model("dcae", "tiny"), "dcae", size)
    assert x_hat.shape == ref.shape and (x_hat - ref).abs().max().item() < 1e-4


def test_a_few_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_model("dcae", "tiny")
    x = smooth_batch(4, (64, 64))
    losses = adam_losses(model, x, steps=12)
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("case,prefix,target,build", [
    ("stage", "g_a.1.", "g_a.1.", lambda: SwinStage(16, 8, 4, 2)),
    ("down", "g_a.0.", "g_a.0.", lambda: down_stage(8, 16)),
    ("up", "g_s.2.", "g_s.2.", lambda: up_stage(16, 8)),
    ("dca", "dt_cross_attention.0.", "dca.0.", lambda: DictionaryCrossAttention(20, 8, heads=2, head_dim=32)),
])
def test_blocks_equal_the_public_codes(case, prefix, target, build):
    """Outputs of the public code's blocks (LabShuHangGU/DCAE at bd00306: SwinBlockWithConvMulti, the residual
    bottleneck stages down and up, the dictionary cross-attention) on random weights, saved once with their state
    dicts in tests/data: lictrain's blocks, loaded through the key map of `lictrain import`, give them."""
    ref = torch.load(Path(__file__).parent / "data" / "dcae_public_reference.pt")[case]
    block = build().eval()
    block.load_state_dict(public_block_state("dcae", ref["state"], prefix, target))
    inputs = ref["inputs"] if case != "dca" else (ref["inputs"][0], ref["inputs"][1][0])  # one shared dictionary
    with torch.no_grad():
        torch.testing.assert_close(block(*inputs), ref["out"], rtol=1e-5, atol=1e-5)
