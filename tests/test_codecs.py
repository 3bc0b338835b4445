"""Real entropy coding of every registered model: what the decoder rebuilds from the bytes must be what the encoder
meant to send.

The reference is the encoder-side reconstruction, computed here without CompressAI's compress(): the latents the
encoder quantises (round(y - mean) + mean, with the means the decoder can know) go through the synthesis transform.
For the autoregressive models (mbt2018, cheng2020-anchor) it is a slow raster-order loop that recomputes the whole
masked context convolution for every latent position, so it shares no code with CompressAI's cropped, sequential
coder. For ELIC (checkerboard + uneven channel groups) the reference is CompressAI's two-pass forward in eval mode,
another code path than its compress(). All six agree to float rounding (measured: at most 1.2e-6).

Random-init models have latents that round to zero almost everywhere, which would make the check vacuous; the last
layer of the analysis transform is scaled so the latents span several quantisation bins.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lictrain import bitstream
from lictrain.evaluation import Codec
from lictrain.models import MODELS, build_model, downsampling


def _medians(entropy_bottleneck) -> torch.Tensor:
    return entropy_bottleneck.quantiles[:, 0, 1].view(1, -1, 1, 1)


def _round_around(v: torch.Tensor, mean: torch.Tensor | float) -> torch.Tensor:
    return torch.round(v - mean) + mean


def _autoregressive_latents(model, y: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """y_hat in raster order: each position's mean from the context of the positions already quantised."""
    y_hat = torch.zeros_like(y)
    for h in range(y.shape[2]):
        for w in range(y.shape[3]):
            ctx = model.context_prediction(y_hat)  # the mask hides (h, w) and everything after it
            scales, means = model.entropy_parameters(torch.cat([params, ctx], 1)).chunk(2, 1)
            y_hat[:, :, h, w] = _round_around(y[:, :, h, w], means[:, :, h, w])
    return y_hat


@torch.no_grad()
def encoder_side_reconstruction(name: str, model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat, y_hat) as the encoder intends them, for a padded batch x."""
    if name in ("elic", "dcae", "flic", "lalic", "tcm", "tcm-auxt"):  # eval forward(): latents as the encoder rounds them
        return model(x)["x_hat"], None
    y = model.g_a(x)
    if name == "bmshj2018-factorized":
        y_hat = _round_around(y, _medians(model.entropy_bottleneck))
        return model.g_s(y_hat), y_hat
    z_hat = _round_around(model.h_a(y), _medians(model.entropy_bottleneck))
    params = model.h_s(z_hat)
    if name == "bmshj2018-hyperprior":
        y_hat = torch.round(y)  # scale-only prior: no means, plain rounding
    elif name == "mbt2018-mean":
        scales, means = params.chunk(2, 1)
        y_hat = _round_around(y, means)
    else:
        y_hat = _autoregressive_latents(model, y, params)
    return model.g_s(y_hat), y_hat


def _spread_latents(model, target_std: float = 4.0, multiple: int = 1) -> None:
    """Scale the analysis transform's last convolution so the latents of the test image have std ~ target_std."""
    convs = [m for m in model.g_a.modules() if isinstance(m, nn.Conv2d)]
    last = convs[-1]
    with torch.no_grad():
        x = _image()
        y = model.g_a(F.pad(x, (0, (-x.shape[-1]) % multiple, 0, (-x.shape[-2]) % multiple), mode="replicate"))
        gain = target_std / y.std().item()
        last.weight.mul_(gain)
        if last.bias is not None:
            last.bias.mul_(gain)


def _image() -> torch.Tensor:
    """A smooth colour image of a size no model's stride divides (exercises padding and cropping)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, 9, 12, generator=g)
    return F.interpolate(noise, size=(70, 90), mode="bicubic", align_corners=False).clamp(0, 1)


def round_trip(name: str, codec: Codec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(decoded image, encoder-side reference, y_hat) of the test image through the file format."""
    x = _image()[0]
    h, w = x.shape[-2:]
    m = downsampling(name)
    padded = F.pad(x[None], (0, (-w) % m, 0, (-h) % m), mode="replicate")
    ref, y_hat = encoder_side_reconstruction(name, codec.model, padded)
    ref = ref[0, :, :h, :w].clamp(0, 1)
    data = bitstream.encode(codec.compress(x))  # through the file format, as `lictrain compress` writes it
    return codec.decompress(bitstream.decode(data)), ref, y_hat


@pytest.mark.parametrize("name", sorted(n for n, spec in MODELS.items() if not spec.frames))  # (video: test_video.py)
def test_decoder_rebuilds_the_encoder_side_reconstruction(name):
    torch.manual_seed(0)
    model = build_model(name, "tiny")
    _spread_latents(model, multiple=downsampling(name))
    x_hat, ref, y_hat = round_trip(name, Codec(model, name, "tiny"))
    x = _image()[0]

    assert x_hat.shape == x.shape
    if y_hat is not None:
        assert len(torch.unique(torch.round(y_hat))) >= 5, "latents too concentrated: the check would be vacuous"
    assert ref.std() > 0.01, "reconstruction nearly constant: the check would be vacuous"
    assert (x_hat - ref).abs().max().item() < 1e-4, (x_hat - ref).abs().max().item()


def test_the_reference_sees_a_wrong_mean():
    """The check can fail: an encoder that quantised around other means decodes to something else."""
    torch.manual_seed(0)
    model = build_model("mbt2018", "tiny")
    _spread_latents(model)
    codec = Codec(model, "mbt2018", "tiny")
    x = _image()[0]
    padded = F.pad(x[None], (0, 128 - 90, 0, 128 - 70), mode="replicate")
    with torch.no_grad():
        y = codec.model.g_a(padded)
        wrong = codec.model.g_s(torch.round(y))[0, :, :70, :90].clamp(0, 1)  # forward()'s context-free rounding
    x_hat = codec.decompress(bitstream.decode(bitstream.encode(codec.compress(x))))
    assert (x_hat - wrong).abs().max().item() > 1e-2
