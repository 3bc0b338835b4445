import pytest
import torch

from lictrain.errors import LictrainError
from lictrain.losses import RateDistortionLoss
from lictrain.models import MODELS, build_model, downsampling


@pytest.mark.parametrize("name", [n for n, spec in MODELS.items() if not spec.frames])  # (video: test_video.py)
def test_tiny_presets_train_one_step(name):
    torch.manual_seed(0)
    model = build_model(name, "tiny")
    side = max(64, downsampling(name))  # FLIC's windows need 128
    x = torch.rand(2, 3, side, side)
    out = model(x)
    assert out["x_hat"].shape == x.shape
    terms = RateDistortionLoss(0.01)(out, x)
    terms.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if not n.endswith("quantiles")]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)  # every weight takes part in R + lambda D
    # downsampling() is the side of the coarsest latent's cell, except for FLIC, whose 4x4 windows on that latent
    # need twice it
    with torch.no_grad():
        y = model.g_a(torch.rand(1, 3, 2 * side, 2 * side))
        h_a = model.latent_codec["hyper"].h_a if hasattr(model, "latent_codec") else getattr(model, "h_a", None)
        coarsest = h_a(y) if h_a is not None else y
    cell = downsampling(name) // (2 if name == "flic" else 1)
    assert coarsest.shape[-2:] == (2 * side // cell,) * 2


def test_paper_presets_have_published_widths():
    # Published widths: mean-scale hyperprior N=192, M=320; ELIC N=192, M=320 with groups 16,16,32,64,192.
    m = build_model("mbt2018-mean", "paper")
    assert m.g_a[0].out_channels == 192 and m.g_a[-1].out_channels == 320
    elic = build_model("elic", "paper")
    assert elic.groups == [16, 16, 32, 64, 192]
    assert build_model("elic2022-official", "tiny").groups == [2, 2, 4, 8, 24]
    assert build_model("cheng2020-anchor", "paper").g_a[0].conv1.out_channels == 192


def test_unknown_model_or_preset_lists_valid_ones():
    with pytest.raises(LictrainError, match="valid models: bmshj2018-factorized"):
        build_model("resnet50")
    with pytest.raises(LictrainError, match="valid presets: paper, small, bench, tiny"):
        build_model("mbt2018", "huge")


def test_elic_context_scales_with_the_preset_and_paper_is_compressais():
    """CompressAI fixes ELIC's channel-context widths at 224/128 whatever M is, which made `tiny` 3.55 M parameters
    (more than mbt2018-mean's `small`); the small presets scale them with M/320, the paper preset keeps CompressAI's
    module, parameter for parameter."""
    from compressai.models.sensetime import Elic2022Official

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    tiny = build_model("elic", "tiny")
    ctx = tiny.latent_codec.latent_codec["y"].channel_context
    assert [ctx["y1"][0].out_channels, ctx["y1"][2].out_channels] == [28, 16]  # 224 * 40 / 320, 128 * 40 / 320
    assert count(tiny) < count(build_model("mbt2018-mean", "small")) and count(tiny) < 0.5e6
    ours, theirs = build_model("elic", "paper"), Elic2022Official(N=192, M=320)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
