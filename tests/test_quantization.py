"""W8A8 post-training quantization: the activation quantizer by hand, the weight grid, AdaRound against nearest
rounding, real bitstreams of quantized models, saved checkpoints, and bad calibration folders."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from lictrain.checkpoint import load_checkpoint, model_from_checkpoint
from lictrain.errors import LictrainError
from lictrain.evaluation import Codec
from lictrain.models import build_model
from lictrain.quantization import adaround, quantize_activation, quantize_nearest, weight_scales
from lictrain.quantization.ptq import calibration_batch, quantize_checkpoint, quantize_model
from lictrain.quantization.weights import reconstruction_error
from lictrain.trainer import train
from tests.conftest import smooth_image, tiny_config
from tests.test_codecs import _image, _spread_latents, round_trip


def test_activation_quantizer_by_hand():
    # channels: (-1, .5, 1), (2, 2, 2), (0, 1, 3)
    x = torch.tensor([[[-1.0, 0.5, 1.0]], [[2.0, 2.0, 2.0]], [[0.0, 1.0, 3.0]]]).reshape(1, 3, 1, 3)
    q = quantize_activation(x)
    # channel 0: min -1, scale 2/255; 0.5 -> round(1.5 * 127.5) = round(191.25) = 191 -> 191 * 2/255 - 1
    assert q[0, 0, 0].tolist() == pytest.approx([-1.0, 191 * 2 / 255 - 1, 1.0], abs=1e-6)
    assert torch.equal(q[0, 1], x[0, 1])  # a constant channel is kept exactly (no division by zero)
    # channel 2: min 0, scale 3/255: 1.0 -> round(85.0) = 85 -> 1.0 exactly; the ends map to 0 and 255
    assert q[0, 2, 0].tolist() == pytest.approx([0.0, 85 * 3 / 255, 3.0], abs=1e-6)
    assert not torch.equal(q[0, 0], x[0, 0])


def test_activation_quantizer_has_256_levels_per_channel():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16) * torch.tensor([0.1, 1.0, 10.0, 100.0]).view(1, 4, 1, 1)
    q = quantize_activation(x)
    for c in range(4):
        lo, hi = x[:, c].min(), x[:, c].max()
        steps = (q[:, c] - lo) / ((hi - lo) / 255)
        assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.min() >= -1e-4 and steps.max() <= 255 + 1e-3
        assert (q[:, c] - x[:, c]).abs().max() <= (hi - lo) / 255 / 2 * 1.001


@pytest.mark.parametrize("layer", [nn.Conv2d(6, 5, 3), nn.ConvTranspose2d(6, 5, 3), nn.Linear(6, 5)])
def test_int8_weights_per_output_channel(layer):
    axis = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
    w = layer.weight.detach()
    scale = weight_scales(w, axis)
    q = quantize_nearest(w, scale)
    assert scale.numel() == 5 and scale.shape[axis] == 5
    assert q.min() >= -127 and q.max() <= 127 and torch.equal(q, q.round())
    peaks = (q.abs().amax(dim=[d for d in range(w.dim()) if d != axis]))
    assert torch.equal(peaks, torch.full_like(peaks, 127))  # each channel's largest weight uses the whole range
    assert ((q * scale - w).abs() <= scale / 2 + 1e-7).all()


def test_adaround_beats_nearest_rounding_on_a_toy_layer():
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(16, 8, 12, 12)
    target = layer(x).detach()
    xq = quantize_activation(x)  # the inputs the quantized model gives it
    scale = weight_scales(layer.weight, 0)
    with torch.no_grad():
        nearest = reconstruction_error(F.conv2d(xq, quantize_nearest(layer.weight.detach(), scale) * scale,
                                                layer.bias, padding=1), target)
    q = adaround(layer, xq, target, iters=600, batch=8, progress=False)
    with torch.no_grad():
        learned = reconstruction_error(F.conv2d(xq, q * scale, layer.bias, padding=1), target)
    assert q.min() >= -127 and q.max() <= 127 and torch.equal(q, q.round())
    # every weight rounded down or up (never further than one step from the float weight)
    assert ((q - layer.weight.detach() / scale).abs() < 1 + 1e-5).all()
    # 8-bit grids leave little to choose: a few percent, but a real decrease, from changed roundings
    assert (q != quantize_nearest(layer.weight.detach(), scale)).sum() >= 5
    assert learned < 0.99 * nearest, (float(learned), float(nearest))


@pytest.mark.parametrize("name", ["bmshj2018-factorized", "bmshj2018-hyperprior", "mbt2018-mean"])
def test_quantized_model_round_trip_is_exact(name):
    torch.manual_seed(0)
    model = build_model(name, "tiny").eval()
    _spread_latents(model)
    calib = F.interpolate(torch.rand(2, 3, 8, 8), size=(64, 64), mode="bicubic").clamp(0, 1)
    record = quantize_model(model, calib, "nearest", progress=False)
    assert len(record["layers"]) >= 6 and all(v.dtype == torch.int8 for v in record["int8"].values())
    x_hat, ref, _ = round_trip(name, Codec(model, name, "tiny"))
    assert (x_hat - ref).abs().max().item() < 1e-4
    x = _image()[0]
    # the activation quantizers are really in the coding path: without them the same weights decode differently
    plain = build_model(name, "tiny").eval()
    plain.load_state_dict(model.state_dict())
    other = Codec(plain, name, "tiny").decompress(Codec(plain, name, "tiny").compress(x))
    assert (other - x_hat).abs().max().item() > 1e-3


def test_saved_quantized_checkpoint_reloads_with_its_activation_quantizers(tmp_path):
    run = train(tiny_config(tmp_path, "train.steps=2"))
    calib = calibration_batch("samples:train", 2, 64, 16)
    out = quantize_checkpoint(run.run_dir / "checkpoint.pt", calib, tmp_path / "q.pt", "nearest", progress=False)
    ckpt = load_checkpoint(out)
    reloaded, fresh = model_from_checkpoint(ckpt), build_model("mbt2018-mean", "tiny").eval()
    fresh.load_state_dict(ckpt["model"])
    for name, q in ckpt["ptq"]["int8"].items():  # stored weights are exactly int8 x scale
        w = dict(reloaded.named_modules())[name].weight
        assert torch.equal(w, q.float() * ckpt["ptq"]["scales"][name].view(
            [-1 if d == (1 if isinstance(dict(reloaded.named_modules())[name], nn.ConvTranspose2d) else 0) else 1
             for d in range(w.dim())]))
    x = calib[:1]
    with torch.no_grad():
        a, b = reloaded(x)["x_hat"], fresh(x)["x_hat"]
    assert (a - b).abs().max() > 1e-5  # the reloaded model quantizes its activations, the plain one does not
    with pytest.raises(LictrainError, match="already quantized"):
        quantize_checkpoint(out, calib, tmp_path / "qq.pt", "nearest", progress=False)


def test_bad_calibration_folders_get_one_line_errors(tmp_path):
    with pytest.raises(LictrainError) as e:
        calibration_batch(str(tmp_path / "missing"), 4, 64, 16)
    assert "\n" not in str(e.value)
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(LictrainError, match="no readable images"):
        calibration_batch(str(bad), 4, 64, 16)
    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(smooth_image(40, 48)).save(small / "s.png")
    with pytest.raises(LictrainError, match="at least 64x64") as e:
        calibration_batch(str(small), 4, 64, 16)
    assert "\n" not in str(e.value)
    with pytest.raises(LictrainError, match="multiple of 16"):
        calibration_batch(str(small), 4, 40, 16)
    assert np.isfinite(calibration_batch(str(small), 4, 32, 16).numpy()).all()


def test_ptq_command_quantizes_evaluates_and_reports(tmp_path, capsys):
    import json

    from lictrain.cli import main

    run = train(tiny_config(tmp_path, "train.steps=2"))
    out = tmp_path / "ptq"
    args = ["ptq", str(run.run_dir), "--calib", "samples:train", "--data", "samples:val", "--max-images", "1",
            "--calib-images", "2", "--calib-crop", "64", "--weights", "nearest", "--outliers", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    (row,) = summary["rows"]
    assert row["curve"] == "adam" and row["delta_bd_rate"] is None and "<4" in row["unavailable"]
    (lf, bf, pf), (lq, bq, pq) = row["float"][0], row["w8a8"][0]
    assert lf == lq == pytest.approx(0.013) and (bf, pf) != (bq, pq)
    # the float point is the checkpoint's own evaluation; the W8A8 point is its quantized file's
    float_eval = json.loads(next((out / "eval").glob("*-float")).joinpath("results.json").read_text())
    assert float_eval["results"]["bpp"][0] == bf
    assert load_checkpoint(next(out.glob("*-w8a8-nearest.pt")))["ptq"]["weights"] == "nearest"
    # the outlier columns are those of `lictrain analyze outliers` on the same float checkpoint and images
    from lictrain.analysis.commands import outliers

    ref = outliers([str(run.run_dir / "checkpoint.pt")], "samples:val", tmp_path / "out", max_images=1, maps=0)[0]
    assert summary["outliers"]["adam"]["latent_kurt"] == pytest.approx(ref["latent_kurt"])
    assert summary["outliers"]["adam"]["act_maxmed"] == pytest.approx(ref["act_maxmed"])
    assert "Table 2" in (out / "summary.md").read_text()
    assert main(args) == 0  # a rerun reuses the quantized files and evaluations
    assert main(args[:-5] + ["--weights", "floor", "--out", str(out)]) == 2
    assert "adaround, nearest or both" in capsys.readouterr().err


def test_adaround_only_where_the_calibration_outputs_outnumber_the_weights():
    torch.manual_seed(0)
    calib = F.interpolate(torch.rand(2, 3, 8, 8), size=(64, 64), mode="bicubic").clamp(0, 1)
    record = quantize_model(build_model("mbt2018-mean", "tiny").eval(), calib, "adaround", iters=3,
                            progress=False)
    # by hand for the tiny preset (N=16, M=24) on 2 crops of 64²: g_a.0 (3 -> 16, 5x5: 1200 weights) gives
    # 2 x 16 x 32 x 32 = 32768 outputs (27 per weight); h_s.4 (36 -> 48, 3x3: 15552 weights) gives
    # 2 x 48 x 4 x 4 = 1536 (0.1 per weight)
    assert record["rounding"]["g_a.0"] == "adaround"
    assert all(record["rounding"][n] == "nearest" for n in record["layers"] if n.startswith(("h_a", "h_s")))
    forced = quantize_model(build_model("mbt2018-mean", "tiny").eval(), calib, "adaround", iters=3, progress=False,
                            min_targets_per_weight=0)
    assert set(forced["rounding"].values()) == {"adaround"}


def test_adaround_draws_no_progress_bar_into_a_log(capsys):
    """progress=True means "on a terminal": a log file (pytest's captured stderr is not a terminal) stays clean."""
    from lictrain.quantization.weights import adaround

    torch.manual_seed(0)
    layer = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        target = layer(x)
    adaround(layer, x, target, iters=5, batch=2, progress=True, desc="adaround-bar")
    assert "adaround-bar" not in capsys.readouterr().err
