"""Video building blocks (issue 33) against independent references: hand-made shifts for warping and the dataset's
shared crop, torch.distributions.Laplace for the Laplace likelihoods, a BT.709 forward conversion written here for
the YUV reader, hand-counted parameters, and a synthetic translation for the motion estimator."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lictrain.errors import LictrainError
from lictrain.models.laplace import LaplaceConditional
from lictrain.models.motion import ME_Spynet, flow_warp
from lictrain.video.data import SequenceCrops, read_yuv420, resolve_sequences, yuv420_to_rgb, yuv_format


def _smooth(h, w, seed=0, channels=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, h // 8, w // 8, generator=g)
    return torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)


# ---- warping ------------------------------------------------------------------------------------------------------
def test_integer_flow_moves_whole_pixels_and_half_pixel_flow_averages_neighbours():
    x = torch.randn(2, 3, 12, 16)
    flow = torch.zeros(2, 2, 12, 16)
    flow[:, 0], flow[:, 1] = 2.0, -1.0  # out[i, j] = x[i - 1, j + 2]
    out = flow_warp(x, flow)
    torch.testing.assert_close(out[:, :, 1:, :-2], x[:, :, :-1, 2:], rtol=0, atol=2e-5)
    torch.testing.assert_close(out[:, :, 0, :-2], x[:, :, 0, 2:], rtol=0, atol=2e-5)  # border repeated above
    flow = torch.zeros(2, 2, 12, 16)
    flow[:, 0] = 0.5
    out = flow_warp(x, flow)
    torch.testing.assert_close(out[..., :-1], (x[..., :-1] + x[..., 1:]) / 2, rtol=0, atol=2e-5)


# ---- the Laplace conditional --------------------------------------------------------------------------------------
def test_laplace_likelihoods_equal_torch_distributions_laplace():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(-20, 21, (4, 8, 6, 6), generator=g).double()
    mu = torch.randn(y.shape, generator=g, dtype=torch.float64) * 3
    b = torch.rand(y.shape, generator=g, dtype=torch.float64) * 4 + 0.2
    ours = LaplaceConditional(None)._likelihood(y, b, mu)
    lap = torch.distributions.Laplace(mu, b)
    reference = lap.cdf(y + 0.5) - lap.cdf(y - 0.5)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12)
    assert LaplaceConditional._standardized_quantile(0.1) == pytest.approx(float(torch.distributions.Laplace(
        0.0, 1.0).icdf(torch.tensor(0.1, dtype=torch.float64))), rel=1e-12)


def test_laplace_conditional_codes_real_bits_close_to_its_estimate():
    torch.manual_seed(0)
    em = LaplaceConditional(None)
    em.update_scale_table(torch.exp(torch.linspace(math.log(0.11), math.log(64), 64)))
    scales = torch.rand(1, 16, 16, 16) * 3 + 0.3
    means = torch.randn(1, 16, 16, 16)
    y = torch.distributions.Laplace(means, scales).sample()
    idx = em.build_indexes(scales)
    strings = em.compress(y, idx, means)
    decoded = em.decompress(strings, idx, means=means)
    torch.testing.assert_close(decoded, torch.round(y - means) + means, rtol=0, atol=1e-5)
    em.eval()
    _, lik = em(y, scales, means)
    estimated = float(-torch.log2(lik).sum())
    real = 8 * len(strings[0])
    assert abs(real - estimated) / estimated < 0.05, (real, estimated)


# ---- motion estimation -------------------------------------------------------------------------------------------
def test_spynet_parameter_count_by_hand():
    # per level: 7x7 convs 8->32, 32->64, 64->32, 32->16, 16->2 with biases
    level = sum(a * b * 49 + b for a, b in [(8, 32), (32, 64), (64, 32), (32, 16), (16, 2)])
    assert level == 240_050
    assert sum(p.numel() for p in ME_Spynet().parameters()) == 4 * level
    # a quarter of the inner widths (the tiny preset's): 8->8, 8->16, 16->8, 8->4, 4->2
    quarter = sum(a * b * 49 + b for a, b in [(8, 8), (8, 16), (16, 8), (8, 4), (4, 2)])
    assert sum(p.numel() for p in ME_Spynet(width=0.25).parameters()) == 4 * quarter == 4 * 17_678


def test_spynet_learns_a_synthetic_translation():
    """A few dozen steps on the warping loss (DCVC's stage 1 without the rate) move the mean flow towards the shift
    (frame 2 = frame 1 moved 3 right and 2 down, so warping frame 2 by (3, 2) gives frame 1)."""
    torch.manual_seed(0)
    big = _smooth(96, 96, seed=1)
    im1 = big[..., 8:72, 8:72]
    im2 = big[..., 6:70, 5:69]  # im2[i, j] = big[i + 6, j + 5] = im1[i - 2, j - 3]
    net = ME_Spynet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(60):
        flow = net(im1, im2)
        loss = torch.nn.functional.mse_loss(flow_warp(im2, flow)[..., 8:-8, 8:-8], im1[..., 8:-8, 8:-8])
        opt.zero_grad()
        loss.backward()
        opt.step()
    mean = net(im1, im2).detach()[..., 8:-8, 8:-8].mean(dim=(0, 2, 3))
    assert 1.5 < float(mean[0]) < 4.5 and 0.8 < float(mean[1]) < 3.2, mean


# ---- sequences ---------------------------------------------------------------------------------------------------
def _write_sequence(folder, frames=5, size=(40, 48), shift=1, names="im{}.png"):
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    base = (g.random((size[0], size[1] + shift * frames, 3)) * 255).astype(np.uint8)
    for t in range(frames):  # frame t+1 is frame t moved `shift` pixels left
        Image.fromarray(base[:, shift * t : shift * t + size[1]]).save(folder / names.format(t + 1))


def test_vimeo_layout_lists_and_plain_folders(tmp_path):
    root = tmp_path / "vimeo"
    for seq in ("00001/0001", "00001/0002", "00002/0001"):
        _write_sequence(root / "sequences" / seq, frames=3)
    (root / "sep_trainlist.txt").write_text("00001/0001\n00002/0001\n")
    (root / "sep_testlist.txt").write_text("00001/0002\n")
    assert [s[0].parent.name for s in resolve_sequences(f"{root}[train]")] == ["0001", "0001"]
    assert len(resolve_sequences(f"{root}[test]")) == 1 and len(resolve_sequences(str(root))) == 3
    plain = tmp_path / "plain" / "clip"
    _write_sequence(plain, frames=11, names="frame{}.png")
    (seq,) = resolve_sequences(str(tmp_path / "plain"))
    assert [p.name for p in seq][:3] == ["frame1.png", "frame2.png", "frame3.png"] and seq[-1].name == "frame11.png"
    with pytest.raises(LictrainError, match="sep_trainlist"):
        resolve_sequences(f"{tmp_path / 'plain'}[train]")
    with pytest.raises(LictrainError, match="not found"):
        resolve_sequences(str(tmp_path / "nowhere"))


def test_one_crop_and_flip_shared_by_all_frames(tmp_path):
    _write_sequence(tmp_path / "clip", frames=6, size=(40, 48), shift=2)
    ds = SequenceCrops(resolve_sequences(str(tmp_path)), frames=3, crop=32, seed=5)
    flips = set()
    for k in range(12):
        x = ds[k]
        assert x.shape == (3, 3, 32, 32)
        assert torch.equal(x, ds[k])  # a pure function of (seed, k)
        left = torch.equal(x[1][..., :-2], x[0][..., 2:])  # content moved left by 2: not flipped
        right = torch.equal(x[1][..., 2:], x[0][..., :-2])  # flipped: it moved right
        assert left != right and torch.equal(x[2][..., :-2] if left else x[2][..., 2:],
                                             x[1][..., 2:] if left else x[1][..., :-2])
        flips.add(right)
    assert flips == {True, False}
    with pytest.raises(LictrainError, match="7 frames"):
        SequenceCrops(resolve_sequences(str(tmp_path)), frames=7, crop=32, seed=0)


# ---- raw YUV 4:2:0 -----------------------------------------------------------------------------------------------
def _rgb_to_yuv709_limited(rgb, bits):
    """BT.709 forward (Kr 0.2126, Kb 0.0722), limited range: Y = 16 + 219 Y', C = 128 + 224 C' (x 2^(bits-8))."""
    r, g, b = rgb
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    cb, cr = (b - y) / 1.8556, (r - y) / 1.5748
    s = 2 ** (bits - 8)
    return np.round((16 + 219 * y) * s), np.round((128 + 224 * cb) * s), np.round((128 + 224 * cr) * s)


@pytest.mark.parametrize("bits,name", [(8, "clip_16x8_25fps.yuv"), (10, "clip_16x8_50fps_10bit_420.yuv")])
def test_yuv420_reader_and_bt709_conversion(tmp_path, bits, name):
    g = np.random.default_rng(1)
    frames = []
    raw = []
    for _ in range(3):
        rgb = g.random((3, 4, 8)).repeat(2, 1).repeat(2, 2) * 0.8 + 0.1  # constant over 2x2: 4:2:0 loses nothing
        y, u, v = _rgb_to_yuv709_limited(rgb, bits)
        frames.append(rgb)
        raw += [y.ravel(), u[::2, ::2].ravel(), v[::2, ::2].ravel()]
    dtype = np.uint8 if bits == 8 else np.dtype("<u2")
    np.concatenate(raw).astype(dtype).tofile(tmp_path / name)
    fmt = yuv_format(tmp_path / name)
    assert (fmt.width, fmt.height, fmt.bitdepth) == (16, 8, bits)
    got = read_yuv420(tmp_path / name)
    assert len(got) == 3
    for (y, u, v), rgb in zip(got, frames):
        back = yuv420_to_rgb(y, u, v, bitdepth=bits)
        np.testing.assert_allclose(back.numpy(), rgb, atol=3 / (219 * 2 ** (bits - 8)))  # (integer rounding of Y, Cb, Cr)
    with open(tmp_path / name, "ab") as f:
        f.write(b"\0" * 5)
    with pytest.raises(LictrainError, match="whole number"):
        read_yuv420(tmp_path / name)


# ---- DCVC ----------------------------------------------------------------------------------------------------------
def _conv(a, b, k):
    return a * b * k * k + b


def test_dcvc_parameter_count_is_the_published_one_and_per_module_by_hand():
    from lictrain.models.dcvc import DCVC, PRESETS

    model = DCVC(**PRESETS["paper"])
    counts = {name: sum(p.numel() for n, p in mod.named_parameters() if not n.endswith("quantiles"))
              for name, mod in model.named_children()}
    assert sum(counts.values()) == 7_944_448  # DCVC's published count (the quantiles are CompressAI's aux ones)
    gdn = lambda c: c + c * c  # noqa: E731  (beta, gamma)
    mv, n, m = 128, 64, 96
    assert counts["opticFlow"] == 4 * 240_050
    assert counts["mvEncoder"] == _conv(2, mv, 3) + 3 * _conv(mv, mv, 3) + 3 * gdn(mv)
    assert counts["auto_regressive_mv"] == _conv(mv, 2 * mv, 5)
    assert counts["entropy_parameters_mv"] == _conv(4 * mv, 10 * mv // 3, 1) + _conv(10 * mv // 3, 8 * mv // 3, 1) \
        + _conv(8 * mv // 3, 2 * mv, 1)
    assert counts["contextualEncoder"] == _conv(n + 3, n, 5) + 2 * _conv(n, n, 5) + _conv(n, m, 5) + 3 * gdn(n) \
        + 2 * 2 * _conv(n, n, 3)
    assert counts["bitEstimator_z"] == counts["bitEstimator_z_mv"] == 11 * n  # 4 scales, 4 biases, 3 factors
    assert counts["gaussian_encoder"] == 0


def test_dcvc_p_frame_decodes_bit_exactly_and_forward_warps_the_reference():
    from lictrain.models.dcvc import DCVC, PRESETS

    torch.manual_seed(0)
    model = DCVC(**PRESETS["tiny"]).eval()
    ref = _smooth(64, 64, seed=2).sigmoid()
    x = torch.roll(ref, 2, dims=-1)
    out = model(ref, x)
    assert out["x_hat"].shape == x.shape and set(out["likelihoods"]) == {"mv_y", "mv_z", "y", "z"}
    torch.testing.assert_close(out["warped"], flow_warp(ref, out["flow"]))
    model.update(force=True)
    coded = model.compress(ref, x)
    decoded = model.decompress(ref, coded["strings"], coded["shape"])
    assert torch.equal(decoded["x_hat"], coded["x_hat"])  # the decoder's reference equals the encoder's
    with pytest.raises(ValueError, match="batch 1"):
        model.compress(ref.repeat(2, 1, 1, 1), x.repeat(2, 1, 1, 1))


# ---- DCVC's stages in the one training loop ------------------------------------------------------------------------
def test_each_stage_trains_exactly_its_parts_and_its_loss_reaches_every_one():
    """The parts each stage trains, and (what DistributedDataParallel needs) every trainable parameter gets a
    gradient from the stage's loss, no frozen one does."""
    from lictrain.losses import RateDistortionLoss
    from lictrain.models import build_model
    from lictrain.models.video_stage import FRAME_ENTROPY_PARTS, MOTION_PARTS

    all_parts = {n for n, _ in build_model("dcvc", "tiny").pframe.named_children()} - {"gaussian_encoder"}
    frame = all_parts - set(MOTION_PARTS)
    expected = {1: set(MOTION_PARTS), 2: frame - set(FRAME_ENTROPY_PARTS), 3: frame, 4: all_parts}
    x = _smooth(64, 64, seed=6).sigmoid().unsqueeze(1).repeat(2, 2, 1, 1, 1)
    x[:, 1] = x[:, 1].roll(2, dims=-1)
    for stage, parts in expected.items():
        torch.manual_seed(0)
        model = build_model("dcvc", "tiny", {"stage": stage})
        trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == parts, stage
        RateDistortionLoss(0.01)(model(x), x).loss.backward()
        for n, p in model.named_parameters():
            if not n.endswith("quantiles"):
                assert (p.grad is not None and bool(p.grad.abs().sum() > 0)) == p.requires_grad, (stage, n)


def test_the_cascaded_stage_chains_p_frames_through_their_reconstructions():
    """Stage 5 on 3-frame sequences: frame 2 is predicted from frame 1's reconstruction (the very tensor, so the
    gradient flows back through the chain), targets are frames 1 and 2 frame-major, and the R-D loss's bpp is every
    P-frame's bits over all their pixels; 2-frame sequences are refused."""
    from lictrain.losses import RateDistortionLoss
    from lictrain.models import build_model

    torch.manual_seed(0)
    model = build_model("dcvc", "tiny", {"stage": 5})
    x = _smooth(64, 64, seed=7).sigmoid().unsqueeze(1).repeat(2, 3, 1, 1, 1)
    x[:, 1], x[:, 2] = x[:, 1].roll(2, dims=-1), x[:, 2].roll(4, dims=-1)
    calls, real = [], model.pframe.forward
    model.pframe.forward = lambda ref, frame: calls.append((ref, real(ref, frame))) or calls[-1][1]
    out = model(x)
    assert len(calls) == 2 and calls[1][0] is calls[0][1]["x_hat"]
    (grad,) = torch.autograd.grad(calls[1][1]["x_hat"].sum(), calls[0][1]["x_hat"], retain_graph=True)
    assert bool(grad.abs().sum() > 0)
    torch.testing.assert_close(out["target"], torch.cat([x[:, 1], x[:, 2]]), rtol=0, atol=0)
    bits = sum(-torch.log2(v).sum() for _, o in calls for v in o["likelihoods"].values())
    terms = RateDistortionLoss(0.01)(out, x)
    torch.testing.assert_close(terms.rate, bits / (2 * 2 * 64 * 64))
    with pytest.raises(LictrainError, match="at least 3 frames"):
        model(x[:, :2])


def test_warping_under_bf16_autocast_keeps_pixels_in_place():
    x = torch.rand(1, 3, 8, 512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flow_warp(x.bfloat16(), torch.zeros(1, 2, 8, 512, dtype=torch.bfloat16))
    torch.testing.assert_close(out.float(), x.bfloat16().float(), rtol=0, atol=1e-2)


def test_dcvc_stages_train_and_chain_in_the_one_loop(tmp_path):
    """Stage 1 with SOAP, then stage 2 from its weights with Adam, on synthetic moving sequences: the losses are
    the stages' own (stage 1 scores the warped reference and motion bits, stage 2 no bits at all), and stage 2
    leaves the motion parts as stage 1 left them."""
    from lictrain.checkpoint import load_checkpoint
    from lictrain.config import load_config
    from lictrain.models.video_stage import MOTION_PARTS
    from lictrain.trainer import train

    for k in range(3):
        _write_sequence(tmp_path / "clips" / f"c{k}", frames=4, size=(72, 80), shift=k + 1)
    common = [f"data.train={tmp_path / 'clips'}", f"data.val={tmp_path / 'clips'}", "data.frames=2", "data.crop=64",
              "data.batch_size=2", "data.val_crop=64", "data.val_max_images=1", "model.name=dcvc",
              "model.preset=tiny", "train.val_every=3", "train.ckpt_every=3", "train.log_every=1",
              "train.progress=false", "train.ema_decay=0", "optim.lr=1e-3", "loss.lmbda=0.01"]
    one = train(load_config(None, [*common, f"run_dir={tmp_path / 's1'}", "model.kwargs={stage: 1}",
                                   "optim.name=soap", "train.steps=3"]))
    two = train(load_config(None, [*common, f"run_dir={tmp_path / 's2'}", "model.kwargs={stage: 2}",
                                   "optim.name=adam", "train.steps=3", f"train.init_from={one.run_dir}"]))
    logs = [json.loads(ln) for ln in (two.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["bpp"] == 0 for r in logs if r["kind"] == "train")  # stage 2: distortion only
    first = [json.loads(ln) for ln in (one.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["bpp"] > 0 for r in first if r["kind"] == "train")
    a, b = load_checkpoint(one.run_dir / "checkpoint.pt")["model"], load_checkpoint(two.run_dir / "checkpoint.pt")["model"]
    moved = 0
    for k, v in a.items():
        part = k.split(".")[1]
        if part in MOTION_PARTS and not k.endswith("quantiles") and v.is_floating_point():
            assert torch.equal(v, b[k]), k
        elif part not in MOTION_PARTS and v.is_floating_point() and not k.endswith(("_quantized_cdf", "quantiles")):
            moved += int(not torch.equal(v, b[k]))
    assert moved > 10


def test_a_group_of_pictures_decodes_bit_exactly(tmp_path):
    """I P P I (intra period 3) on a synthetic moving sequence whose width is not a multiple of 64: the decoder's
    frames equal the encoder's, every packet's bits are counted, a truncated P-frame packet is refused."""
    from lictrain.evaluation import Codec
    from lictrain.models import build_model
    from lictrain.models.dcvc import DCVC, PRESETS
    from lictrain.video.coding import decode_sequence, encode_sequence, sequence_metrics, unpack_pframe

    torch.manual_seed(0)
    iframe = Codec(build_model("mbt2018-mean", "tiny"), "mbt2018-mean", "tiny")
    pframe = DCVC(**PRESETS["tiny"]).eval()
    pframe.update(force=True)
    big = _smooth(80, 120, seed=4).sigmoid()[0]
    frames = [big[:, 8:72, 4 + 2 * t : 84 + 2 * t].contiguous() for t in range(4)]  # 64 x 80
    coded = encode_sequence(iframe, pframe, frames, intra_period=3)
    assert coded.kinds == ["I", "P", "P", "I"]
    decoded = decode_sequence(iframe, pframe, coded)
    for a, b in zip(decoded, coded.recon):
        assert a.shape == (3, 64, 80) and torch.equal(a, b)
    m = sequence_metrics(frames, coded)
    assert m["bpp"] == pytest.approx(sum(coded.bits()) / (64 * 80 * 4)) and len(m["frames"]) == 4
    with pytest.raises(LictrainError, match="truncated"):
        unpack_pframe(coded.packets[1][:-3])


def test_real_bits_of_a_gop_are_its_estimated_bits_plus_the_coders_overhead():
    """Each frame's estimated bits are its models' likelihoods on the reference the decoder has (recomputed here from
    the decoded I-frame and the model's own forward pass); a P-frame's four strings spend those bits plus at most
    the coder's flush per string (<= 96 bits; measured 32-64), and never fewer than 95% of them."""
    from lictrain.data import pad_to_multiple
    from lictrain.evaluation import Codec
    from lictrain.models import build_model
    from lictrain.models.dcvc import DCVC, PRESETS
    from lictrain.video.coding import encode_sequence, sequence_metrics, unpack_pframe

    torch.manual_seed(0)
    iframe = Codec(build_model("mbt2018-mean", "tiny"), "mbt2018-mean", "tiny")
    pframe = DCVC(**PRESETS["tiny"]).eval()
    pframe.update(force=True)
    big = _smooth(144, 232, seed=4).sigmoid()[0]
    frames = [(big[:, 8:136, 4 + 2 * t : 196 + 2 * t] + 0.1 * torch.rand(3, 128, 192)).clamp(0, 1) for t in range(3)]
    coded = encode_sequence(iframe, pframe, frames, intra_period=3)
    assert coded.kinds == ["I", "P", "P"]
    assert coded.estimated_bits[0] == pytest.approx(iframe.estimated_bpp(frames[0]) * 128 * 192)
    with torch.no_grad():
        out = pframe(pad_to_multiple(coded.recon[0][None], 64), pad_to_multiple(frames[1][None], 64))
    expected = sum(float(-torch.log2(v).sum()) for v in out["likelihoods"].values())
    assert coded.estimated_bits[1] == pytest.approx(expected, rel=1e-5)
    for packet, estimate in zip(coded.packets[1:], coded.estimated_bits[1:]):
        strings, _ = unpack_pframe(packet)
        payload = sum(8 * len(s[0]) for s in strings)
        assert 0.95 * estimate <= payload <= estimate + 4 * 96, (payload, estimate)
    m = sequence_metrics(frames, coded)
    assert m["bpp_estimated"] == pytest.approx(sum(coded.estimated_bits) / (128 * 192 * 3))


def test_rgb_to_yuv_is_the_published_bt709_formula_and_inverts_the_reader():
    from lictrain.video.evaluate import rgb_to_yuv

    white, red = torch.ones(3, 1, 1), torch.tensor([1.0, 0, 0]).view(3, 1, 1)
    # limited range: white is Y 235, chroma 128; red: Y = 16 + 219 * 0.2126, Cr = 128 + 224 / 2 = 240
    assert rgb_to_yuv(white).flatten().tolist() == pytest.approx([235 / 255, 128 / 255, 128 / 255], abs=1e-12)
    assert rgb_to_yuv(red).flatten().tolist() == pytest.approx(
        [(16 + 219 * 0.2126) / 255, (128 - 112 * 0.2126 / 0.9278) / 255, 240 / 255], abs=1e-12)
    assert rgb_to_yuv(red, "bt709", full_range=True)[0].item() == pytest.approx(0.2126, abs=1e-12)
    # the reader's 4:2:0 -> RGB, then back: the same codes (chroma averaged over its 2x2 repetition)
    g = np.random.default_rng(3)
    y = g.integers(70, 170, (8, 12)).astype(np.uint8)
    u, v = (g.integers(112, 144, (4, 6)).astype(np.uint8) for _ in range(2))
    for matrix in ("bt709", "bt601"):
        back = rgb_to_yuv(yuv420_to_rgb(y, u, v, matrix=matrix).double(), matrix)
        np.testing.assert_allclose(back[0].numpy() * 255, y, atol=2e-4)  # (the reader's float32 output)
        chroma = torch.nn.functional.avg_pool2d(back[1:].unsqueeze(0), 2)[0].numpy() * 255
        np.testing.assert_allclose(chroma, np.stack([u, v]), atol=2e-4)


def test_lictrain_eval_codes_a_video_checkpoint_with_real_bits_and_reports_yuv_psnr(tmp_path, capsys, monkeypatch):
    """An I-frame checkpoint and a DCVC stage-4 checkpoint on top of it (one step each), evaluated by `lictrain
    eval` on a raw 4:2:0 file: frame kinds follow the intra period, every row's PSNR-YUV is (6 Y + U + V) / 8, the
    bpp are the packets' bytes, and a decoder that differs from the encoder is refused instead of reported."""
    import csv

    from lictrain.cli import main
    from lictrain.config import load_config
    from lictrain.trainer import train
    from lictrain.video import coding

    _write_sequence(tmp_path / "clips" / "c0", frames=3, size=(72, 80), shift=2)
    quiet = ["train.progress=false", "train.ema_decay=0", "train.steps=1", "train.val_every=1", "data.crop=64",
             "data.batch_size=1", "data.val_crop=64", "data.val_max_images=1"]
    frames_dir = tmp_path / "clips" / "c0"
    iframe = train(load_config(None, [*quiet, f"run_dir={tmp_path / 'iframe'}", "model.name=mbt2018-mean",
                                      "model.preset=tiny", f"data.train={frames_dir}", f"data.val={frames_dir}"]))
    video = train(load_config(None, [*quiet, f"run_dir={tmp_path / 'p'}", "model.name=dcvc", "model.preset=tiny",
                                     f"model.kwargs={{stage: 4, iframe: {iframe.run_dir}}}", "data.frames=2",
                                     f"data.train={tmp_path / 'clips'}", f"data.val={tmp_path / 'clips'}"]))
    planes = [_yuv_planes(t, h=40, w=72) for t in range(4)]
    raw = tmp_path / "test" / "clip_72x40.yuv"
    raw.parent.mkdir()
    np.concatenate([np.concatenate([p.ravel() for p in yuv]) for yuv in planes]).tofile(raw)
    out = tmp_path / "eval"
    assert main(["eval", str(video.run_dir), "--data", str(raw.parent), "--intra-period", "3", "--out", str(out)]) == 0
    assert "clip_72x40" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "per_frame.csv").open()))
    assert [r["kind"] for r in rows] == ["I", "P", "P", "I"]
    for r in rows:
        assert float(r["psnr_yuv"]) == pytest.approx((6 * float(r["psnr_y"]) + float(r["psnr_u"])
                                                      + float(r["psnr_v"])) / 8)
    result = json.loads((out / "results.json").read_text())
    assert result["results"]["bpp"][0] == pytest.approx(np.mean([float(r["bpp"]) for r in rows]))
    assert result["results"]["bpp_estimated"][0] == pytest.approx(np.mean([float(r["bpp_estimated"]) for r in rows]))
    assert result["sequences"][0]["frames"] == 4
    # the I-frame row's PSNR-Y, from the image codec's own decode and the BT.709 conversion written here
    from lictrain.checkpoint import load_checkpoint
    from lictrain.evaluation import Codec

    codec = Codec.from_checkpoint(load_checkpoint(iframe.run_dir / "checkpoint.pt"))
    rec = codec.decompress(codec.compress(yuv420_to_rgb(*planes[0]))).clamp(0, 1).double().numpy()
    y_rec = _rgb_to_yuv709_limited(rec, 8)[0]
    psnr_y = 10 * math.log10(255**2 / np.mean((y_rec - planes[0][0].astype(np.float64)) ** 2))
    assert float(rows[0]["psnr_y"]) == pytest.approx(psnr_y, abs=1e-6)
    real_decode = coding.decode_sequence
    monkeypatch.setattr(coding, "decode_sequence", lambda *a: [f + 1 / 255 for f in real_decode(*a)])
    assert main(["eval", str(video.run_dir), "--data", str(raw), "--intra-period", "3", "--out", str(out)]) == 2
    assert "not bit-exact" in capsys.readouterr().err


# ---- video-prepare: sequences cut from clips ----------------------------------------------------------------------
def _yuv_planes(t, h=48, w=64):
    g = np.random.default_rng(t)
    y = g.integers(16, 236, (h, w)).astype(np.uint8)
    u = g.integers(16, 241, (h // 2, w // 2)).astype(np.uint8)
    v = g.integers(16, 241, (h // 2, w // 2)).astype(np.uint8)
    return y, u, v


def test_video_prepare_cuts_windows_holds_test_clips_out_and_converts_colours_as_stated(tmp_path, capsys):
    from lictrain.cli import main

    planes = [_yuv_planes(t) for t in range(10)]
    raw = tmp_path / "cam_64x48_25fps.yuv"  # no bit-depth token: 8-bit
    np.concatenate([np.concatenate([y.ravel(), u.ravel(), v.ravel()]) for y, u, v in planes]).tofile(raw)
    other = tmp_path / "held_64x48.yuv"
    np.concatenate([np.concatenate([p.ravel() for p in _yuv_planes(50 + t)]) for t in range(4)]).tofile(other)
    out = tmp_path / "seqs"
    assert main(["video-prepare", str(raw), str(other), "-o", str(out), "--frames", "3", "--every", "2",
                 "--size", "none", "--test", "held_64x48.yuv"]) == 0
    # windows start at 0, 2, 4, 6 (overlapping) in the 10-frame clip; the 4-frame test clip gives one
    assert (out / "sep_trainlist.txt").read_text().split() == ["00001/0001", "00001/0002", "00001/0003", "00001/0004"]
    assert (out / "sep_testlist.txt").read_text().split() == ["00002/0001"]
    third = np.asarray(Image.open(out / "sequences" / "00001" / "0002" / "im2.png"))  # frame 3 of the clip
    expected = (yuv420_to_rgb(*planes[3]).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(third, expected)
    assert len(resolve_sequences(f"{out}[train]")) == 4 and len(resolve_sequences(f"{out}[test]")) == 1
    with pytest.raises(LictrainError, match="not among"):
        from lictrain.video.prepare import prepare

        prepare([raw], tmp_path / "x", test=("nope.mp4",))
    # a clip too narrow for --size fails before anything is cut or written, naming itself
    narrow = tmp_path / "narrow_16x32.yuv"
    np.concatenate([np.concatenate([p.ravel() for p in _yuv_planes(9, h=32, w=16)])]).tofile(narrow)
    assert main(["video-prepare", str(raw), str(narrow), "-o", str(tmp_path / "y"), "--size", "64x48"]) == 2
    assert "narrow_16x32.yuv" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_video_prepare_decodes_a_container_with_pyav_to_the_same_colours(tmp_path):
    av = pytest.importorskip("av")  # (an optional extra; the test extra installs it)
    from lictrain.video.prepare import decode_clip

    planes = [_yuv_planes(t) for t in range(3)]
    path = tmp_path / "clip.mkv"
    with av.open(str(path), "w") as container:  # FFV1 is lossless: the decoder returns these planes exactly
        stream = container.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for y, u, v in planes:
            frame = av.VideoFrame.from_ndarray(np.concatenate([y, u.reshape(-1, 64), v.reshape(-1, 64)]),
                                               format="yuv420p")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    decoded = list(decode_clip(path))
    assert len(decoded) == 3
    for img, (y, u, v) in zip(decoded, planes):
        expected = (yuv420_to_rgb(y, u, v).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(img, expected)


def test_video_compare_chains_each_recipes_stages_and_reports_per_stage(tmp_path, capsys):
    """Two recipes through stages 1 and 2 (3 steps each): every stage of a recipe starts from that recipe's previous
    stage, the table has a row per stage and recipe with the anchor at 1.00, the figure is written, a rerun reuses."""
    import yaml

    from lictrain.checkpoint import load_checkpoint
    from lictrain.cli import main

    for k in range(2):
        _write_sequence(tmp_path / "clips" / f"c{k}", frames=3, size=(72, 80), shift=k + 1)
    stages = []
    for s in (1, 2):
        cfg = {"model": {"name": "dcvc", "preset": "tiny", "kwargs": {"stage": s}},
               "data": {"train": str(tmp_path / "clips"), "val": str(tmp_path / "clips"), "frames": 2, "crop": 64,
                        "batch_size": 2, "val_crop": 64, "val_max_images": 1},
               "loss": {"lmbda": 0.01}, "optim": {"lr": 1e-3},
               "train": {"steps": 3, "val_every": 1, "ckpt_every": 3, "ema_decay": 0}}
        (tmp_path / f"s{s}.yaml").write_text(yaml.safe_dump(cfg))
        stages.append(str(tmp_path / f"s{s}.yaml"))
    args = ["video-compare", "--stages", ",".join(stages), "--recipes", "adam,soap", "--out", str(tmp_path / "vc")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| 1 | adam | 1.00 | 1.00 |" in out and "| 2 | adam | 1.00 | 1.00 |" in out and "| 2 | soap |" in out
    assert (tmp_path / "vc" / "loss_by_stage.png").read_bytes()[:4] == b"\x89PNG"
    for recipe in ("adam", "soap"):
        cfg = load_checkpoint(tmp_path / "vc" / f"{recipe}-stage2" / "checkpoint.pt")["config"]
        assert cfg["train"]["init_from"] == str(tmp_path / "vc" / f"{recipe}-stage1")
        assert cfg["optim"]["name"] == recipe
    before = (tmp_path / "vc" / "soap-stage2" / "metrics.jsonl").read_text()
    assert main(args) == 0  # reused: nothing retrained
    assert (tmp_path / "vc" / "soap-stage2" / "metrics.jsonl").read_text() == before


def test_scale_space_flow_loss_is_compressais_video_training_loss():
    """lictrain's R-D loss on the ScaleSpaceFlow wrapper's output against CompressAI's examples/train_video.py
    formula written out here: lambda * mean over frames of 255^2 * (mean over channels of each channel's MSE)
    + the sum over frames and latents of -log2 p, over N * H * W * frames pixels."""
    from lictrain.losses import RateDistortionLoss
    from lictrain.models import build_model

    torch.manual_seed(0)
    model = build_model("ssf2020", "paper")
    x = _smooth(128, 128, seed=5).sigmoid().unsqueeze(1).repeat(2, 3, 1, 1, 1)  # N 2, T 3
    x[1] = x[1].roll(3, dims=-1)
    out = model(x)
    terms = RateDistortionLoss(0.01)(out, x)
    n, t, _, h, w = x.shape
    distortion = sum(255**2 * torch.stack([torch.mean((xh[:, c] - x[:, k, c]) ** 2) for c in range(3)]).mean()
                     for k, xh in enumerate(out["x_hat"].chunk(t))) / t
    bits = sum(-torch.log2(v).sum() for v in out["likelihoods"].values())
    expected = 0.01 * distortion + bits / (n * h * w * t)
    torch.testing.assert_close(terms.loss, expected, rtol=1e-5, atol=1e-5)
    assert out["x_hat"].shape == (n * t, 3, h, w) and len(out["likelihoods"]) >= 3 * t
