"""The field's anchors: classical codecs measured against Pillow's own encodes, published curves, BD-rate against a
hand computation, weights out to CompressAI's own classes and back, kMACs by hand, strict JSON."""

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from lictrain.anchors.codecs import CODECS, get_codec, split_available
from lictrain.anchors.curves import Curve, load_results, published, resolve
from lictrain.anchors.measure import code_image, measure, write_results
from lictrain.cli import main
from lictrain.comparison.figures import bd_rate
from lictrain.errors import LictrainError
from lictrain.io import strict_json


def _refuse_constant(name):
    raise ValueError(f"not JSON: {name}")


def strict_load(text: str):
    return json.loads(text, parse_constant=_refuse_constant)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return skdata.astronaut()[:256, :320].copy()  # 256 x 320 RGB: MS-SSIM defined, not a multiple of 16 wide


def numpy_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255.0**2 / mse)


@pytest.mark.parametrize("name, fmt", [("jpeg", "JPEG"), ("webp", "WEBP"), ("avif", "AVIF")])
def test_pillow_codecs_give_pillows_own_bytes_and_psnr(photo, name, fmt):
    codec = get_codec(name)
    if not codec.available():
        pytest.skip(f"this Pillow has no {fmt}")
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format=fmt, quality=40)
    reference = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    coded = code_image(codec, photo, 40, "astronaut")
    assert coded.bytes == len(buf.getvalue())
    assert coded.bpp == pytest.approx(len(buf.getvalue()) * 8 / (256 * 320))
    assert coded.psnr_rgb == pytest.approx(numpy_psnr(photo, reference), abs=1e-4)
    assert 0.5 < coded.ms_ssim_rgb < 1


def test_jpeg2000_codes_at_the_rate_asked_for_and_is_lossy(photo):
    codec = get_codec("jpeg2000")
    if not codec.available():
        pytest.skip("this Pillow has no JPEG 2000")
    for target in (0.25, 1.0):
        coded = code_image(codec, photo, target)
        assert coded.bpp == pytest.approx(target, rel=0.1)  # OpenJPEG's rate control, headers included
        assert 20 < coded.psnr_rgb < 45  # lossy: Pillow's default would be lossless


def test_a_sweep_is_the_mean_over_images_and_writes_strict_json(tmp_path):
    results, rows = measure(get_codec("jpeg"), "samples:val", qualities=[20, 60], progress=False)
    r = results["results"]
    assert r["quality"] == [20, 60] and r["bpp"][0] < r["bpp"][1]
    for key, field in (("bpp", "bpp"), ("psnr-rgb", "psnr_rgb")):
        assert r[key][0] == pytest.approx(np.mean([getattr(x, field) for x in rows if x.quality == 20]))
    path = write_results(results, rows, tmp_path, "jpeg")
    assert strict_load(path.read_text())["results"]["bpp"] == r["bpp"]
    assert load_results(path).label == "JPEG"


def test_matching_finds_the_quality_closest_to_the_target_as_an_exhaustive_search_does(photo, tmp_path):
    Image.fromarray(photo).save(tmp_path / "a.png")
    codec = get_codec("jpeg")
    results, rows = measure(codec, str(tmp_path / "a.png"), match=[0.8], by="bpp", progress=False)
    every = {q: code_image(codec, photo, q, ms_ssim=False).bpp for q in range(1, 96)}
    best = min(every, key=lambda q: abs(every[q] - 0.8))
    assert rows[0].quality == best and rows[0].bpp == pytest.approx(every[best])
    results, rows = measure(codec, str(tmp_path / "a.png"), match=[30.0], by="psnr", progress=False)
    psnr = {q: code_image(codec, photo, q, ms_ssim=False).psnr_rgb for q in range(1, 96)}
    assert rows[0].quality == min(psnr, key=lambda q: abs(psnr[q] - 30.0))


def test_a_codec_that_needs_a_missing_binary_is_named_not_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bpgenc here
    available, missing = split_available(["jpeg", "bpg"])
    assert [c.name for c in available] == ["jpeg"] and [c.name for c in missing] == ["bpg"]
    assert main(["anchors", "--codecs", "bpg", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "warning: unavailable here: bpg (needs bpgenc and bpgdec on PATH (https://bellard.org/bpg/))"
    assert err[-1] == "error: none of the codecs asked for is available here"
    with pytest.raises(LictrainError, match="unknown codec 'vvc'"):
        get_codec("vvc")


def test_bd_rate_of_a_curve_against_itself_is_zero_and_against_a_rate_shift_is_the_shift():
    vtm = published("vtm", "kodak").points()
    assert bd_rate(vtm, vtm) == pytest.approx(0, abs=1e-9)
    # the same PSNRs at 0.9x the rate: log-rate moves by log(0.9) everywhere, so BD-rate = 0.9 - 1 = -10%
    assert bd_rate(vtm, ([0.9 * b for b in vtm[0]], vtm[1])) == pytest.approx(-10.0, abs=1e-6)


def test_published_curves_carry_compressais_numbers_and_their_source(tmp_path):
    vtm = resolve("vtm", "kodak")
    # CompressAI's results/image/kodak/vtm.json, first point, copied by hand
    assert vtm.bpp[0] == pytest.approx(0.04824490017361111) and vtm.psnr[0] == pytest.approx(26.14484539430146)
    assert "InterDigitalInc/CompressAI" in vtm.source and vtm.images == 24 and vtm.published
    assert resolve("bpg@clic2020-professional").dataset == "clic2020-professional"
    assert all(v is None for v in resolve("elic-paper", "kodak").ms_ssim)  # the paper gives PSNR only
    with pytest.raises(LictrainError, match="no published 'vvc' curve on kodak"):
        resolve("vvc", "kodak")
    with pytest.raises(LictrainError, match="no published curves for 'samples-val'"):
        resolve("vtm", "samples-val")
    from lictrain.comparison.plots import plot_curves

    mine = Curve("mine", (0.2, 0.4, 0.8), (28.0, 30.0, 32.0), (None,) * 3, "test")
    png = plot_curves([mine, vtm, resolve("jpeg", "kodak")], tmp_path / "rd.png", focus=[mine])
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plot_command_prints_bd_rate_against_the_anchor(tmp_path, capsys):
    vtm = published("vtm", "kodak")
    doc = {"name": "shifted", "results": {"bpp": [1.25 * b for b in vtm.bpp], "psnr-rgb": list(vtm.psnr),
                                          "ms-ssim-rgb": list(vtm.ms_ssim)}}
    (tmp_path / "r.json").write_text(json.dumps(doc))
    assert main(["plot", str(tmp_path / "r.json"), "--with", "vtm,bpg", "--anchor", "vtm",
                 "-o", str(tmp_path / "rd.png")]) == 0
    out = capsys.readouterr().out
    assert "BD-rate (PSNR) of shifted vs VTM (published, Kodak): +25.00%" in out
    assert (tmp_path / "rd.png").exists()


def test_strict_json_writes_null_for_what_does_not_exist():
    text = strict_json({"ms-ssim-rgb": [float("nan"), 0.9], "psnr": float("inf"), "n": 3})
    assert strict_load(text) == {"ms-ssim-rgb": [None, 0.9], "psnr": None, "n": 3}
    with pytest.raises(ValueError):
        strict_load(json.dumps({"x": float("nan")}))  # what Python's json writes by default


def test_evaluating_images_too_small_for_ms_ssim_writes_valid_json(tmp_path, capsys):
    import lictrain
    from tests.conftest import tiny_config

    Image.fromarray(skdata.astronaut()[:96, :128].copy()).save(tmp_path / "small.png")
    torch.manual_seed(0)
    lictrain.train(tiny_config(tmp_path, "train.steps=2", "train.val_every=2"))
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "small.png"),
                 "--out", str(tmp_path / "ev")]) == 0
    data = strict_load((tmp_path / "ev" / "results.json").read_text())
    assert data["results"]["ms-ssim-rgb"] == [None]
    # a results file as the anchor: the BD-rate line (one point: unavailable, not extrapolated) and the R-D plot
    (tmp_path / "ref.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "small.png"), "--out", str(tmp_path / "ev2"),
                 "--anchor", str(tmp_path / "ref.json")]) == 0
    assert "vs mbt2018-mean-tiny: unavailable (<4 λ)" in capsys.readouterr().out
    assert (tmp_path / "ev2" / "rd.png").exists()
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "small.png"), "--anchor", "vtm"]) == 2
    assert "no published curves for 'small.png'" in capsys.readouterr().err
    t = data["timing"]
    assert t["threads"] == torch.get_num_threads() and t["warmup_images"] == 1 and t["device_kind"] == "cpu"
    r = data["results"]
    assert 0 < r["encoding_time_coder"][0] < r["encoding_time"][0]
    assert 0 < r["decoding_time_coder"][0] < r["decoding_time"][0]


def test_export_loads_into_compressais_class_and_codes_the_same_bytes(tmp_path, capsys):
    import compressai.models as cm

    from lictrain.checkpoint import load_checkpoint
    from lictrain.evaluation import Codec
    from lictrain.models import build_model

    torch.manual_seed(0)
    model = build_model("mbt2018-mean", "tiny", {"N": 24, "M": 32})  # widths of no preset
    with torch.no_grad():
        model.g_a[-1].weight.mul_(30)  # latents over several quantisation bins, not all zero
    torch.save(model.state_dict(), tmp_path / "w.pth")
    assert main(["import", str(tmp_path / "w.pth"), "--model", "mbt2018-mean", "--preset", "tiny", "--kwargs",
                 "N=24,M=32", "--lmbda", "0.013", "--out", str(tmp_path / "imp.pt")]) == 0
    assert main(["export", str(tmp_path / "imp.pt"), "-o", str(tmp_path / "exp.pth")]) == 0
    assert "compressai.models.google.MeanScaleHyperprior(N=24, M=32)" in capsys.readouterr().out
    theirs = cm.MeanScaleHyperprior(N=24, M=32)
    theirs.load_state_dict(torch.load(tmp_path / "exp.pth", weights_only=True))
    x = torch.from_numpy(skdata.astronaut()[:128, :192].copy()).permute(2, 0, 1).float() / 255
    ours = Codec.from_checkpoint(load_checkpoint(tmp_path / "imp.pt"))
    mine = ours.compress(x)
    with torch.no_grad():
        out = theirs.compress(x[None])
        x_hat = theirs.decompress(out["strings"], out["shape"])["x_hat"]
    assert out["strings"] == mine.strings and sum(len(s[0]) for s in mine.strings) > 100
    assert torch.equal(x_hat[0].clamp(0, 1), ours.decompress(mine))
    # and back: the exported file imports as the same weights
    assert main(["import", str(tmp_path / "exp.pth"), "--model", "mbt2018-mean", "--kwargs", "N=24,M=32",
                 "--lmbda", "0.013", "--out", str(tmp_path / "again.pt")]) == 0
    again = load_checkpoint(tmp_path / "again.pt")["model"]
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items() if not k.endswith(
        ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")))


def test_import_kwargs_errors_are_one_line(tmp_path, capsys):
    assert main(["import", str(tmp_path / "w.pth"), "--model", "mbt2018-mean", "--kwargs", "N128",
                 "--lmbda", "0.01", "--out", str(tmp_path / "x.pt")]) == 2
    assert "--kwargs takes KEY=VALUE pairs" in capsys.readouterr().err


def test_kmacs_of_a_convolution_by_hand():
    from lictrain.models.complexity import kmacs_per_pixel, macs

    conv = torch.nn.Conv2d(3, 8, 5, stride=2, padding=2)
    # 32 x 32 outputs x 8 channels, each 3 x 5 x 5 multiply-adds
    assert macs(conv, 64, 64) == 32 * 32 * 8 * 3 * 25
    assert kmacs_per_pixel(conv, 64, 64) == pytest.approx(32 * 32 * 8 * 75 / (64 * 64) / 1e3)
    net = torch.nn.Sequential(conv, torch.nn.ConvTranspose2d(8, 3, 5, stride=2, padding=2, output_padding=1))
    assert macs(net, 64, 64) == 2 * 32 * 32 * 8 * 3 * 25  # the transpose does the same products backwards


def test_every_registered_codec_has_a_rising_sweep():
    for codec in CODECS.values():
        q = list(codec.qualities)
        assert q == sorted(q, reverse=not codec.rising) and codec.limits[0] <= min(q) <= max(q) <= codec.limits[1]


def test_missing_measurements_make_bd_rate_unavailable_not_a_crash(tmp_path):
    from lictrain.comparison.compare import rd_table
    from lictrain.comparison.figures import BDRateUnavailable

    pts = ([0.1, 0.2, 0.4, 0.8], [28.0, 30.0, None, 34.0])
    with pytest.raises(BDRateUnavailable, match="not measured"):
        bd_rate(pts, pts)
    summary = {"rows": [{"recipe": "adam"}], "eval_sets": ["s"], "lambdas": [0.01], "seeds": [0],
               "rd_points": [{"recipe": "adam", "seed": 0, "set": "s", "lmbda": 0.01, "bpp": 0.3, "quality": None}]}
    assert "| 0.01 | 0 | 0.3000 / n/a |" in rd_table(summary)
    doc = {"name": "x", "results": {"bpp": [0.1, 0.2], "psnr-rgb": [30.0, None], "ms-ssim-rgb": [None, None]}}
    (tmp_path / "x.json").write_text(json.dumps(doc))
    assert load_results(tmp_path / "x.json").points() == ([0.1], [30.0])  # null read as not measured


def test_a_bad_reference_is_refused_before_any_training(tmp_path, monkeypatch):
    import lictrain.comparison.compare as cmp_mod
    from lictrain.config import load_config

    def fail(*a, **k):
        raise AssertionError("trained before checking the references")

    monkeypatch.setattr(cmp_mod, "train", fail)
    with pytest.raises(LictrainError, match="unknown reference curve 'vvc'"):
        cmp_mod.compare(load_config(None, ["compare.references=[vvc]"]), tmp_path)
    with pytest.raises(LictrainError, match="results file not found"):
        cmp_mod.compare(load_config(None, [f"compare.references=[{tmp_path / 'none.json'}]"]), tmp_path)
