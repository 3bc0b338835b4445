"""TCM (lictrain/models/tcm.py): the window attention against a token-by-token reference, the mixture block and
the Swin-attention block against the public code's outputs (through the import key map), every preset's sizes, the
published parameter count, coding round trips of batches and odd sizes, and training."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lictrain import bitstream
from lictrain.evaluation import Codec
from lictrain.models import build_model, downsampling
from lictrain.models.tcm import MixedBlock, SwinAttention, WindowAttention
from tests.conftest import adam_losses, public_block_state, trained_and_evaluated


def _reference_window_attention(attn: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Swin attention written out per token, without the cyclic shift: the map is zero-padded to a multiple of the
    window; a token attends to the tokens of its window, windows being offset by half a window when shifted and cut
    (not wrapped) at the map's edges; the bias is indexed by the two tokens' offset."""
    b, h, w_, c = x.shape
    w, heads, d = attn.window, attn.heads, attn.head_dim
    s = w // 2 if attn.shifted else 0
    x = F.pad(x, (0, 0, 0, (-w_) % w, 0, (-h) % w))
    hp, wp = x.shape[1:3]
    qkv = attn.qkv(x)  # (b, hp, wp, 3c)
    q, k, v = (qkv[..., j * c:(j + 1) * c].reshape(b, hp, wp, heads, d) for j in range(3))
    table = attn.bias_table  # (heads, 2w-1, 2w-1)
    out = torch.zeros(b, hp, wp, heads, d, dtype=x.dtype)
    for i in range(hp):
        for j in range(wp):
            rows = [r for r in range(hp) if (r + s) // w == (i + s) // w]
            cols = [t for t in range(wp) if (t + s) // w == (j + s) // w]
            keys = [(r, t) for r in rows for t in cols]
            kk = torch.stack([k[:, r, t] for r, t in keys], dim=2)  # (b, heads, n, d)
            vv = torch.stack([v[:, r, t] for r, t in keys], dim=2)
            bias = torch.stack([table[:, i - r + w - 1, j - t + w - 1] for r, t in keys], dim=1)  # (heads, n)
            logits = (q[:, i, j, :, None, :] * kk).sum(-1) / math.sqrt(d) + bias
            out[:, i, j] = (logits.softmax(-1)[..., None] * vv).sum(2)
    return attn.proj(out.reshape(b, hp, wp, c))[:, :h, :w_]


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("size", [(8, 8), (6, 11)])
def test_window_attention_equals_the_token_by_token_reference(shifted, size):
    torch.manual_seed(0)
    attn = WindowAttention(dim=8, head_dim=4, window=4, shifted=shifted)
    with torch.no_grad():
        attn.bias_table.normal_()  # a bias large enough to matter
        x = torch.randn(2, *size, 8)
        got, want = attn(x), _reference_window_attention(attn, x)
    assert got.shape == x.shape
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_the_reference_tells_shifted_from_plain_windows():
    torch.manual_seed(0)
    plain = WindowAttention(dim=8, head_dim=4, window=4, shifted=False)
    shifted = WindowAttention(dim=8, head_dim=4, window=4, shifted=True)
    shifted.load_state_dict(plain.state_dict())
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        assert (plain(x) - _reference_window_attention(shifted, x)).abs().max() > 1e-2


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_paper_preset_is_tcm_s_with_the_published_parameter_count():
    # TCM-S: 45.18M parameters in CMD-LIC (TMLR 2025) Table 1; issue 19 quotes 44.9M. Both within 2%.
    model = build_model("tcm-s", "paper")
    n = _count(model)
    assert abs(n / 45.18e6 - 1) < 0.005 and abs(n / 44.9e6 - 1) < 0.02, n
    assert model.g_a[0].conv1.out_channels == 128 and model.g_a[-1].out_channels == 320  # 2N = 128, M = 320
    assert model.entropy_bottleneck.channels == 192 and model.slices == 5
    assert build_model("tcm", "large").g_a[0].conv1.out_channels == 256  # TCM-L: N = 128


@pytest.mark.parametrize("preset,y_channels,z_channels", [("tiny", 40, 16), ("small", 160, 96), ("paper", 320, 192)])
def test_preset_shapes(preset, y_channels, z_channels):
    torch.manual_seed(0)
    model = build_model("tcm", preset).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 128, 192))
    assert out["x_hat"].shape == (1, 3, 128, 192)
    assert out["likelihoods"]["y"].shape == (1, y_channels, 8, 12)
    assert out["likelihoods"]["z"].shape == (1, z_channels, 2, 3)
    assert downsampling("tcm") == 64


def _smooth_image(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(h, w), mode="bicubic").clamp(0, 1)[0]


def _spread_codec() -> Codec:
    """A tiny TCM whose latents spread over several integers (so the round trip codes more than zeros)."""
    torch.manual_seed(0)
    model = build_model("tcm", "tiny")
    with torch.no_grad():
        model.g_a[-1].weight.mul_(4 / model.g_a(_smooth_image(64, 64, 0)[None]).std())
    return Codec(model, "tcm", "tiny")


@pytest.mark.parametrize("size", [(64, 64), (70, 90), (100, 130)])
def test_decoder_rebuilds_the_encoder_side_reconstruction_at_several_sizes(size):
    codec = _spread_codec()
    x = _smooth_image(*size, seed=size[1])
    h, w = size
    padded = F.pad(x[None], (0, (-w) % 64, 0, (-h) % 64), mode="replicate")
    with torch.no_grad():
        y = codec.model.g_a(padded)
        ref = codec.model(padded)["x_hat"][0, :, :h, :w].clamp(0, 1)  # eval forward: the encoder's rounding
    assert len(torch.unique(torch.round(y))) >= 5
    x_hat = codec.decompress(bitstream.decode(bitstream.encode(codec.compress(x))))
    assert x_hat.shape == x.shape
    assert (x_hat - ref).abs().max().item() < 1e-4


def test_a_batch_is_coded_image_by_image():
    model = _spread_codec().model.eval()
    model.update(force=True)
    x = torch.stack([_smooth_image(64, 128, seed) for seed in (1, 2)])
    with torch.no_grad():
        both = model.compress(x)
        single = [model.compress(x[i:i + 1]) for i in range(2)]
        decoded = model.decompress(both["strings"], both["shape"])["x_hat"]
        ref = model(x)["x_hat"].clamp(0, 1)
    assert both["strings"][0] == [s["strings"][0][0] for s in single]
    assert (decoded - ref).abs().max().item() < 1e-4


def test_a_few_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_model("tcm", "tiny")
    x = torch.stack([_smooth_image(64, 64, seed) for seed in range(4)])
    losses = adam_losses(model, x, steps=12)
    assert losses[-1] < 0.7 * losses[0], losses


def test_tcm_s_alias_trains_with_soap_and_evaluates_with_real_bitstreams(tmp_path):
    row = trained_and_evaluated(tmp_path, {"model": {"name": "tcm-s", "preset": "tiny"}, "train": {"steps": 3},
                                           "data": {"crop": 64, "batch_size": 2},
                                           "optim": {"name": "soap", "lr": 1e-3}})
    assert row["bpp"][0] > 0 and row["psnr-rgb"][0] > 5


TCM_REFERENCE = Path(__file__).parent / "data" / "tcm_public_reference.pt"


@pytest.mark.parametrize("case", ["block_plain", "block_shifted"])
def test_mixed_block_equals_the_public_codes(case):
    """Outputs of the public code's ConvTransBlock (jmliu206/LIC_TCM at 6c6d7a3) on random weights (relative
    position tables included), saved once with its state dict in tests/data: lictrain's block, loaded through the
    key map of `lictrain import`, gives them."""
    ref = torch.load(TCM_REFERENCE)[case]
    block = MixedBlock(8, 4, 4, ref["shifted"]).eval()
    block.load_state_dict(public_block_state("tcm", ref["state"], "g_a.1."))
    with torch.no_grad():
        torch.testing.assert_close(block(ref["x"]), ref["out"], rtol=1e-5, atol=1e-5)


def test_swin_attention_equals_the_public_codes():
    ref = torch.load(TCM_REFERENCE)["swatten"]
    att = SwinAttention(24, 24, 16, 8, 4).eval()
    att.load_state_dict(public_block_state("tcm", ref["state"], "atten_mean.0.0.", "atten_mean.0."))
    with torch.no_grad():
        torch.testing.assert_close(att(ref["x"]), ref["out"], rtol=1e-5, atol=1e-5)
