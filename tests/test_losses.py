import math

import pytest
import torch

from lictrain.losses import RateDistortionLoss, bpp_from_likelihoods, psnr_from_mse


def test_bpp_by_hand():
    # 8 latents of probability 1/2 (1 bit each) + 1 latent of probability 1/4 (2 bits) = 10 bits over 4x4 pixels.
    lk = {"y": torch.full((1, 2, 2, 2), 0.5), "z": torch.full((1, 1, 1, 1), 0.25)}
    assert bpp_from_likelihoods(lk, 16).item() == pytest.approx(10 / 16)
    # nested containers (ELIC-style groups) are summed too
    nested = {"y": [torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), 0.5)], "z": torch.full((1, 1, 1, 1), 0.25)}
    assert bpp_from_likelihoods(nested, 16).item() == pytest.approx(10 / 16)


def test_mse_loss_terms_by_hand():
    x = torch.full((2, 3, 4, 4), 0.5)
    out = {"x_hat": x + 0.1, "likelihoods": {"y": torch.full((2, 1, 2, 2), 0.5)}}  # 8 bits over 2*16 pixels
    terms = RateDistortionLoss(lmbda=0.01)(out, x)
    assert terms.rate.item() == pytest.approx(8 / 32)
    assert terms.distortion.item() == pytest.approx(255**2 * 0.01, rel=1e-5)  # 650.25
    assert terms.loss.item() == pytest.approx(0.25 + 0.01 * 650.25, rel=1e-5)
    assert terms.weighted_distortion.item() == pytest.approx(6.5025, rel=1e-5)
    assert psnr_from_mse(terms.mse.item()) == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.01)


def test_terms_are_separately_differentiable():
    x = torch.rand(1, 3, 8, 8)
    y = torch.tensor(0.3, requires_grad=True)
    out = {"x_hat": x + y, "likelihoods": {"y": torch.sigmoid(y).expand(1, 1, 2, 2)}}
    terms = RateDistortionLoss(0.01)(out, x)
    (g_rate,) = torch.autograd.grad(terms.rate, y, retain_graph=True)
    (g_dist,) = torch.autograd.grad(terms.distortion, y)
    s = torch.sigmoid(torch.tensor(0.3))
    assert g_rate.item() == pytest.approx(-4 * (1 - s.item()) / (math.log(2) * 64), rel=1e-4)
    assert g_dist.item() == pytest.approx(255**2 * 2 * 0.3, rel=1e-4)


def test_msssim_distortion_is_zero_for_identical_images():
    x = torch.rand(1, 3, 176, 176)
    out = {"x_hat": x.clone(), "likelihoods": {"y": torch.full((1, 1, 1, 1), 0.5)}}
    terms = RateDistortionLoss(5.0, "ms-ssim")(out, x)
    assert terms.distortion.item() == pytest.approx(0.0, abs=1e-5)


def test_ms_ssim_db_by_hand():
    from lictrain.losses import ms_ssim_db

    assert ms_ssim_db(0.99) == pytest.approx(20.0)  # -10 log10(0.01)
    assert ms_ssim_db(0.9) == pytest.approx(10.0)
    assert ms_ssim_db(1.0) == float("inf")


def test_ms_ssim_runs_validate_and_compare_on_ms_ssim(tmp_path):
    """Validation of an MS-SSIM run logs MS-SSIM (against pytorch-msssim directly); a compare of such runs reads
    MS-SSIM in dB from the results and says so."""
    from pytorch_msssim import ms_ssim

    from lictrain.comparison.compare import QUALITY_LABELS, quality
    from lictrain.data import EvalImages, crop_to, pad_to_multiple
    from lictrain.losses import RateDistortionLoss, ms_ssim_db
    from lictrain.models import build_model
    from lictrain.trainer import validate

    torch.manual_seed(0)
    model = build_model("mbt2018-mean", "tiny").eval()
    ds = EvalImages("samples:val", 192)
    val = validate(model, ds, RateDistortionLoss(0.013, "ms-ssim"), torch.device("cpu"), 64)
    values = []
    with torch.no_grad():
        for i in range(len(ds)):
            x = ds[i][None]
            x_hat = crop_to(model(pad_to_multiple(x, 64))["x_hat"], *x.shape[-2:]).clamp(0, 1)
            values.append(ms_ssim(x_hat, x, data_range=1.0).item())
    assert val["ms_ssim"] == pytest.approx(sum(values) / len(values), rel=1e-5)
    assert val["ms_ssim_db"] == pytest.approx(ms_ssim_db(val["ms_ssim"]))
    assert "ms_ssim" not in validate(model, ds, RateDistortionLoss(0.013, "mse"), torch.device("cpu"), 64)
    results = {"psnr-rgb": [31.0], "ms-ssim-rgb": [0.99]}
    assert quality(results, "mse") == 31.0 and quality(results, "ms-ssim") == pytest.approx(20.0)
    assert QUALITY_LABELS["ms-ssim"] == "MS-SSIM-RGB (dB)"
