"""FLIC (lictrain/models/flic.py, tca.py): parameter counts (CMD-LIC's 70.96M and per-module counts of the public
code's classes), FAT blocks and the T-CA against the public code's outputs, FDWA and the T-CA's channel attention
against token-by-token references, FM against numpy's FFT, the T-CA's causality over slices, the coding tables'
rate against the exact Gaussian pmf and their symbol round trip, decoding at several sizes, training."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from compressai.ans import BufferedRansEncoder, RansDecoder

from lictrain.errors import LictrainError
from lictrain.models import build_model, downsampling
from lictrain.models.flic import FATBlock, FDWALayer, FrequencyModulation, branch_rolls, branch_windows
from lictrain.models.tca import TCA, IntegerGaussianConditional, TCABlock, integer_scale_table
from tests.conftest import (adam_losses, decoded_and_encoder_side, public_block_state, smooth_batch,
                            trained_and_evaluated)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_preset_has_cmd_lics_parameter_count():
    # CMD-LIC (TMLR) Table 1: FLIC 70.96M. The public code's classes, instantiated, count 70,961,036: 64 of them
    # are the T-CA's start token that its forward never uses (left out here). Per module, as counted there.
    m = build_model("flic", "paper")
    assert _count(m) == 70_961_036 - 64
    expected = {"g_a": 5_215_920, "g_s": 13_529_692, "h_a": 3_772_608, "h_mean_s": 9_001_728,
                "h_scale_s": 9_001_728, "tca": 30_427_648 - 64, "entropy_bottleneck": 11_712}
    assert {k: _count(getattr(m, k)) for k in expected} == expected
    # a FAT block by hand: 1x1 convs 2d^2+2d, qkv 3d^2, proj d^2+d, MLP 8d^2+5d, 2 LayerNorms 4d, four bias tables
    # (heads/4)(5s-2)^2 together, FM filter 2 f (f/2+1) d
    for d, h, s in [(96, 8, 8), (256, 32, 2)]:
        f = 2 * s
        hand = 14 * d * d + 12 * d + h // 4 * (5 * s - 2) ** 2 + 2 * f * (f // 2 + 1) * d
        assert _count(FATBlock(d, h, s, False)) == hand


def test_shapes_and_the_size_rule():
    torch.manual_seed(0)
    m = build_model("flic", "tiny").eval()
    assert downsampling("flic") == 128 and downsampling("ftic") == 128
    with torch.no_grad():
        out = m(torch.rand(1, 3, 128, 256))
    assert out["x_hat"].shape == (1, 3, 128, 256)
    assert out["likelihoods"]["y"].shape == (1, 40, 8, 16) and out["likelihoods"]["z"].shape == (1, 16, 2, 4)
    with pytest.raises(ValueError, match="multiples of 128 \\(got 64x64\\)"):
        m(torch.rand(1, 3, 64, 64))


def test_training_with_a_crop_the_windows_do_not_tile_is_refused(tmp_path):
    import lictrain

    with pytest.raises(LictrainError, match="data.crop must be a multiple of 128 for flic, got 64"):
        lictrain.train({"model": {"name": "flic", "preset": "tiny"}, "data": {"crop": 64}},
                       ["run_dir=" + str(tmp_path / "run")])


def _reference_quarter(q, k, v, table, window, before, after):
    """One FDWA quarter, position by position: roll by `before`, attend inside (r x c) windows with the relative
    position bias, roll by `after`. q, k, v: (H, W, heads, hd); table: ((2r-1)(2c-1), heads)."""
    hh, ww, heads, hd = q.shape
    r, c = window
    out = torch.zeros_like(v)
    for i in range(hh):
        for j in range(ww):
            pr, pc = (i - after[0]) % hh, (j - after[1]) % ww  # where (i, j) was before the roll back
            rows = range(pr // r * r, pr // r * r + r)
            cols = range(pc // c * c, pc // c * c + c)
            orig = lambda a, b: ((a - before[0]) % hh, (b - before[1]) % ww)  # noqa: E731
            p = orig(pr, pc)
            keys = [(a, b) for a in rows for b in cols]
            src = torch.tensor([orig(a, b) for a, b in keys])
            rel = torch.tensor([(pr - a + r - 1) * (2 * c - 1) + pc - b + c - 1 for a, b in keys])
            kk, vv = k[src[:, 0], src[:, 1]], v[src[:, 0], src[:, 1]]  # (keys, heads, hd)
            logits = (kk * q[p]).sum(-1) / math.sqrt(hd) + table[rel]  # (keys, heads)
            out[i, j] = (logits.softmax(0)[..., None] * vv).sum(0)
    return out


@pytest.mark.parametrize("window,shifted,public", [(2, False, True), (2, True, True), (2, True, False),
                                                   (4, True, True)])
def test_fdwa_equals_a_token_by_token_reference(window, shifted, public):
    torch.manual_seed(0)
    dim, heads, size = 16, 8, (8, 8)
    layer = FDWALayer(dim, heads, window, shifted, public).double()
    with torch.no_grad():
        for b in layer.branches:
            b.bias_table.normal_()
    x = torch.randn(1, *size, dim, dtype=torch.float64)
    q, k, v = layer.qkv(x)[0].chunk(3, dim=-1)
    quarters = []
    for i, (shape, (before, after)) in enumerate(zip(branch_windows(window), branch_rolls(window, public))):
        sl = slice(i * 4, i * 4 + 4)
        split = [t[..., sl].reshape(*size, 2, 2) for t in (q, k, v)]
        if not shifted:
            before, after = (0, 0), (0, 0)
        quarters.append(_reference_quarter(*split, layer.branches[i].bias_table, shape, before, after).flatten(2))
    want = layer.proj(torch.cat(quarters, dim=-1))
    torch.testing.assert_close(layer.attention(x)[0], want, rtol=1e-10, atol=1e-12)


REFERENCE = Path(__file__).parent / "data" / "flic_public_reference.pt"


@pytest.mark.parametrize("case", ["fat_w2_shifted", "fat_w4_shifted", "fat_w4_plain"])
def test_fat_block_equals_the_public_codes(case):
    """Outputs of the public code's FAT_Block (qingshi9974/ICLR2024-FTIC at e0d4886) on random weights, saved once
    with its state dict in tests/data: lictrain's block loaded through the key map gives them."""
    ref = torch.load(REFERENCE)[case]
    block = FATBlock(16, 8, ref["window"], ref["shifted"]).eval()
    block.load_state_dict(public_block_state("flic", ref["state"], "g_a.1."))
    with torch.no_grad():
        torch.testing.assert_close(block(ref["x"]), ref["out"], rtol=1e-5, atol=1e-5)


def test_tca_equals_the_public_codes():
    ref = torch.load(REFERENCE)["tca"]
    tca = TCA(M=40, slices=5, ratio=4, depth=2, heads=16, window=8).eval()
    tca.load_state_dict(public_block_state("flic", ref["state"], "tca."))
    with torch.no_grad():
        for got, want in zip(tca(ref["hyper"], ref["y"]), (ref["means"], ref["scales"], ref["lrp"])):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_public_codes_hyper_shift_translates_three_quarters():
    """With window 2 the 1x1-window quarter's attention is v itself; the public code's rolls (-1, then 0) leave it
    translated by one pixel, exact rolls do not."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 8, 16)
    for public, shift in [(True, (-1, -1)), (False, (0, 0))]:
        layer = FDWALayer(16, 8, 2, shifted=True, public_shifts=public)
        captured = {}
        layer.proj.register_forward_hook(lambda mod, inp, out: captured.setdefault("in", inp[0]))
        layer.attention(x)
        v = layer.qkv(x).chunk(3, dim=-1)[2][..., 4:8]
        torch.testing.assert_close(captured["in"][..., 4:8], torch.roll(v, shift, dims=(1, 2)))


def test_frequency_modulation_equals_numpys_block_fft():
    torch.manual_seed(0)
    fm = FrequencyModulation(dim=3, f=4)
    x = torch.randn(2, 8, 12, 3)
    torch.testing.assert_close(fm(x), x, atol=1e-6, rtol=0)  # the identity at init
    with torch.no_grad():
        fm.weight.normal_()
    w = fm.weight.detach().numpy()
    w = w[..., 0] + 1j * w[..., 1]  # (4, 3, C)
    xn, want = x.numpy(), np.zeros(x.shape)
    for b in range(2):
        for i in range(0, 8, 4):
            for j in range(0, 12, 4):
                for c in range(3):
                    block = np.fft.rfft2(xn[b, i:i + 4, j:j + 4, c], norm="ortho") * w[..., c]
                    want[b, i:i + 4, j:j + 4, c] = np.fft.irfft2(block, s=(4, 4), norm="ortho")
    np.testing.assert_allclose(fm(x).detach().numpy(), want, atol=1e-5)


def test_tca_channel_attention_equals_a_channel_by_channel_reference():
    """Channel i (of slice i // (C/slices), head i % heads) attends to its head's channels of the same or earlier
    slices, with scores scaled by (C/heads)^-1/2, the channel's whole window as its vector."""
    torch.manual_seed(0)
    block = TCABlock(dim=40, slices=5, heads=4, window=4).double()
    t = torch.randn(3, 40, 4, 4, dtype=torch.float64)
    n = block.norm1(t)
    n = n + F.gelu(block.pos_norm(block.pos(n)))
    q, k, v = (conv(n).flatten(2) for conv in (block.q, block.k, block.v))
    out = torch.zeros_like(v)
    for i in range(40):
        keys = [j for j in range(40) if j % 4 == i % 4 and j // 8 <= i // 8]
        weights = torch.stack([(q[:, i] * k[:, j]).sum(-1) for j in keys], -1).mul(10 ** -0.5).softmax(-1)
        out[:, i] = sum(weights[:, e, None] * v[:, j] for e, j in enumerate(keys))
    want = block.proj(out.view(3, 40, 4, 4))
    torch.testing.assert_close(block.attention(t), want, rtol=1e-10, atol=1e-12)


def test_tca_slice_s_depends_on_the_slices_before_it_only():
    torch.manual_seed(0)
    tca = TCA(M=40, slices=5, ratio=4, depth=2, heads=4, window=4).eval()
    hyper, y = torch.randn(1, 80, 8, 8), torch.randn(1, 40, 8, 8).round()
    with torch.no_grad():
        full = tca(hyper, y)
        for s in range(5):
            cut = y.clone()
            cut[:, 8 * s:] = 0
            part = tca(hyper, cut)
            for a, b in zip(full, part):
                assert torch.equal(a[:, :8 * (s + 1)], b[:, :8 * (s + 1)])  # slices <= s: bit-identical
                if s < 4:
                    assert not torch.allclose(a[:, 8 * (s + 1):], b[:, 8 * (s + 1):])  # later ones see the cut


def _coded_bits(gc, y, scales, means) -> int:
    symbols = (torch.round(y) - torch.round(means)).int().flatten().tolist()
    indexes = gc.coding_indexes(scales, means).flatten().tolist()
    enc = BufferedRansEncoder()
    enc.encode_with_indexes(symbols, indexes, *gc.coding_tables())
    return 8 * len(enc.flush())


def test_symbols_decode_to_what_was_coded_outliers_included():
    """round(y) - round(mean) back from the bytes, with values far in the tails (the coder's escape path), scales
    at and below the 0.01 bound, large means and fractions at +-0.5."""
    g = torch.Generator().manual_seed(0)
    n = 3000
    scales = torch.exp(torch.empty(n).uniform_(math.log(0.001), math.log(300), generator=g))
    means = torch.empty(n).uniform_(-500, 500, generator=g)
    means[:20] = torch.arange(20) + 0.5  # ties
    y = means + scales * torch.randn(n, generator=g)
    y[::50] += torch.empty(60).uniform_(-3000, 3000, generator=g)  # far outside every table
    gc = IntegerGaussianConditional().eval()
    gc.update_scale_table(integer_scale_table())
    symbols = (torch.round(y) - torch.round(means)).int().tolist()
    indexes = gc.coding_indexes(scales, means).tolist()
    enc = BufferedRansEncoder()
    enc.encode_with_indexes(symbols, indexes, *gc.coding_tables())
    dec = RansDecoder()
    dec.set_stream(enc.flush())
    assert dec.decode_stream(indexes, *gc.coding_tables()) == symbols
    gc.offsets = 8  # tables built for 16 fraction bins, e.g. loaded into a model built with other settings
    with pytest.raises(ValueError, match="run update\\(force=True\\)"):
        gc.coding_indexes(scales, means)


def test_coding_tables_cost_what_the_likelihood_says():
    """Real rANS bits of round(y) against -log2 of the evaluation likelihood: within 1% with 16 mean-fraction bins;
    a table that ignores the mean's fraction (1 bin) costs far more."""
    g = torch.Generator().manual_seed(0)
    n = 20000
    scales = torch.exp(torch.empty(n).uniform_(math.log(0.05), math.log(8), generator=g))
    means = torch.empty(n).uniform_(-6, 6, generator=g)
    y = means + scales * torch.randn(n, generator=g)
    costs = {}
    for offsets in (16, 1):
        gc = IntegerGaussianConditional(offsets=offsets).eval()
        gc.update_scale_table(integer_scale_table())
        _, lik = gc(y, scales, means)
        costs[offsets] = (_coded_bits(gc, y, scales, means), -lik.log2().sum().item())
    bits, ideal = costs[16]
    assert abs(bits / ideal - 1) < 0.01, costs
    assert costs[1][0] > 1.05 * ideal, costs


@pytest.mark.parametrize("size", [(128, 128), (100, 200)])
def test_decoder_rebuilds_the_encoder_side_reconstruction_at_several_sizes(size):
    torch.manual_seed(0)
    x_hat, ref = decoded_and_encoder_side(build_model("flic", "tiny"), "flic", size)
    assert x_hat.shape == ref.shape and (x_hat - ref).abs().max().item() < 1e-4


def test_batch_coding_equals_image_by_image():
    torch.manual_seed(0)
    m = build_model("flic", "tiny").eval()
    with torch.no_grad():
        m.g_a[-1].weight.mul_(20)
        m.update(force=True)
        x = smooth_batch(2, (128, 128))
        both = m.compress(x)
        single = [m.compress(x[i:i + 1]) for i in range(2)]
        decoded = m.decompress(both["strings"], both["shape"])["x_hat"]
        ref = m(x)["x_hat"].clamp(0, 1)
    assert both["strings"][0] == [s["strings"][0][0] for s in single]
    assert (decoded - ref).abs().max().item() < 1e-4


def test_a_few_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_model("flic", "tiny")
    x = smooth_batch(2, (128, 128))
    losses = adam_losses(model, x, steps=10)
    assert losses[-1] < 0.7 * losses[0], losses


def test_trains_with_soap_and_evaluates_with_real_bitstreams(tmp_path):
    row = trained_and_evaluated(tmp_path, {"model": {"name": "ftic", "preset": "tiny"}, "train": {"steps": 2},
                                           "data": {"crop": 128, "batch_size": 2},
                                           "optim": {"name": "soap", "lr": 1e-3}})
    assert row["bpp"][0] > 0 and row["psnr-rgb"][0] > 5


def test_bf16_autocast_forward_is_finite_and_frequency_modulation_keeps_the_dtype():
    torch.manual_seed(0)
    m = build_model("flic", "tiny")
    fm = m.g_a[1].layer.fm
    x = torch.randn(1, 32, 32, 16, dtype=torch.bfloat16)
    assert fm(x).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.rand(1, 3, 128, 128))
    assert torch.isfinite(out["x_hat"].float()).all() and torch.isfinite(out["likelihoods"]["y"]).all()


def test_window_sizes_that_need_more_padding_are_refused_at_build():
    with pytest.raises(LictrainError, match="need images padded to multiples of 256"):
        build_model("flic", "tiny", {"window": 16})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: CUDA tests not run")
def test_coding_on_cuda():
    torch.manual_seed(0)
    x_hat, ref = decoded_and_encoder_side(build_model("flic", "tiny"), "flic", (128, 128), device="cuda")
    assert (x_hat - ref).abs().max().item() < 1e-4


def test_weights_saved_by_the_public_code_import_into_a_checkpoint_that_evaluates(tmp_path, capsys):
    """A FLIC state dict in the public code's names (lictrain's renamed back, plus the entries the public model
    has and lictrain does not) -> `lictrain import` -> a checkpoint whose model holds the same weights."""
    from lictrain.checkpoint import load_checkpoint, model_from_checkpoint
    from lictrain.cli import main

    torch.manual_seed(0)
    model = build_model("flic", "tiny")
    state = {}  # lictrain's names written back as the public code's (FrequencyAwareTransFormer's state_dict keys)
    for k, v in model.state_dict().items():
        if k.startswith("gaussian_conditional."):
            continue
        p = k
        for new, old in [("layer.fm.weight", "trans_block.fm.complex_weight"), ("layer.mlp.", "trans_block.ffn."),
                         ("layer.branches.", "trans_block.attns."), ("bias_table", "relative_position_bias_table"),
                         ("layer.", "trans_block."), (".inp.", ".conv1_1."), (".out.", ".conv1_2."),
                         ("tca.start.", "tca.TCA.start_token_from_hyperprior."), ("tca.lift.", "tca.TCA.lift."),
                         ("tca.hyper_linear.", "tca.hyper_trans."), ("tca.params.", "tca.entropy_parameters_net."),
                         (".pos.", ".cpe.0.proj."), (".pos_norm.", ".cpe.0.norm."), (".fc1.", ".mlp.fc1."),
                         (".fc2.", ".mlp.fc2.")]:
            p = p.replace(new, old)
        if p.startswith("tca.blocks."):
            p = re.sub(r"^tca\.blocks\.(\d+)\.(q|k|v)\.", r"tca.TCA.layers.\1.\g<2>1.", p)
            p = re.sub(r"^tca\.blocks\.(\d+)\.proj\.", r"tca.TCA.layers.\1.attn.proj.", p)
            p = p.replace("tca.blocks.", "tca.TCA.layers.")
        state[p] = v
    state["tca.TCA.start_token"] = torch.zeros(1, 8, 1, 1)
    state["g_a.1.trans_block.attns.0.relative_position_index"] = torch.zeros(1, dtype=torch.long)
    assert "tca.TCA.lift.weight" in state and "g_a.1.conv1_1.weight" in state
    torch.save({"state_dict": state}, tmp_path / "public.pth")
    out = tmp_path / "imported" / "flic-0.0483.pt"
    assert main(["import", str(tmp_path / "public.pth"), "--model", "ftic", "--preset", "tiny",
                 "--lmbda", "0.0483", "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["config"]["model"]["name"] == "flic" and ckpt["config"]["loss"]["lmbda"] == 0.0483
    loaded = model_from_checkpoint(ckpt)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert main(["import", str(tmp_path / "public.pth"), "--model", "tcm", "--preset", "tiny", "--lmbda", "0.01",
                 "--out", str(tmp_path / "x.pt")]) == 2  # not a TCM: one line naming missing/unexpected keys
    assert "does not fit TCM: missing" in capsys.readouterr().err


def test_the_coders_table_lists_follow_tables_loaded_in_place():
    """coding_tables() caches the lists it hands the coder; tables copied into the buffers in place (as
    load_state_dict does) must not be served from a stale cache."""
    gc = IntegerGaussianConditional(offsets=2)
    gc.update_scale_table(integer_scale_table(levels=4))
    before = gc.coding_tables()[2]
    gc._offset.sub_(1)  # in place: same tensor object, new values
    assert gc.coding_tables()[2] == [o - 1 for o in before]
