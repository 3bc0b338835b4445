import logging

import numpy as np
import pytest
import torch
from PIL import Image

from lictrain.config import load_config

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _lictrain_logs_propagate():
    """Let caplog see lictrain's warnings even after a CLI test replaced its handlers."""
    logger = logging.getLogger("lictrain")
    logger.propagate = True
    logger.setLevel(logging.INFO)
    yield


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image (gradients plus a few blobs), compressible like a photo rather than like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.01, 0.08, 2).tolist() + [rng.uniform(0, 6)]
        img[..., c] = 0.5 + 0.35 * np.sin(fx * xx + ph) * np.cos(fy * yy)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture
def image_folder(tmp_path):
    """A folder of small generated images: RGB, grey, RGBA, palette, one smaller than a crop, one corrupt."""
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(smooth_image(80, 96, 1)).save(d / "a.png")
    Image.fromarray(smooth_image(72, 72, 2)).save(d / "sub" / "b.jpg", quality=95)
    Image.fromarray(smooth_image(70, 90, 3)[..., 0]).save(d / "grey.png")
    rgba = np.concatenate([smooth_image(66, 66, 4), np.full((66, 66, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray(smooth_image(64, 80, 5)).convert("P").save(d / "palette.png")
    Image.fromarray(smooth_image(20, 30, 6)).save(d / "small.png")
    good = (d / "a.png").read_bytes()
    (d / "corrupt.png").write_bytes(good[: len(good) // 3])
    (d / "notes.txt").write_text("not an image")
    return d


def tiny_config(tmp_path, *overrides, name="run"):
    """A seconds-long training config on the bundled sample photos."""
    return load_config(None, [
        f"run_dir={tmp_path / name}", "model.name=mbt2018-mean", "model.preset=tiny", "data.crop=64",
        "data.batch_size=4", "data.val_crop=128", "train.progress=false", "optim.lr=1e-3", "train.log_every=1",
        *overrides,
    ])


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped, and reported as such, without one)")


def pytest_report_header(config):
    if torch.cuda.is_available():
        return f"CUDA: {torch.cuda.get_device_name(0)} (tests marked cuda run)"
    return "CUDA: not available (tests marked cuda are skipped: the GPU path is not verified in this session)"


def adam_losses(model, x: torch.Tensor, steps: int, lmbda: float = 0.01, lr: float = 1e-3) -> list[float]:
    """The R-D loss before each of `steps` plain Adam steps on the fixed batch x (quantiles left alone)."""
    from lictrain.losses import RateDistortionLoss

    loss_fn = RateDistortionLoss(lmbda)
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if not n.endswith("quantiles")], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        terms = loss_fn(model(x), x)
        terms.loss.backward()
        opt.step()
        losses.append(terms.loss.item())
    return losses


def smooth_batch(n: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """n smooth random colour images (bicubic upsampling of 6 x 8 noise), (n, 3, *size) in [0, 1]."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 6, 8, generator=g), size=size, mode="bicubic").clamp(0, 1)


def trained_and_evaluated(tmp_path, config: dict) -> dict:
    """Train a run from `config` (a few steps) and evaluate it with real bitstreams on the bundled samples: the
    results row (bpp, psnr-rgb, ... per checkpoint)."""
    import lictrain

    torch.manual_seed(0)
    config = {**config, "train": {"progress": False, **config.get("train", {})}}
    result = lictrain.train(config, ["run_dir=" + str(tmp_path / "run")])
    return lictrain.evaluate([result.run_dir], "samples:val", tmp_path / "eval")["results"]


def public_block_state(model: str, state: dict, prefix: str, target: str | None = None) -> dict:
    """A block's state dict saved from the public code, through `lictrain import`'s key map for the whole model: its
    keys placed under `prefix` (the block's place in the public model), mapped, and read back from under `target`
    (its place in lictrain's model; default: the same)."""
    from lictrain.models.public_weights import SIGNATURES, from_public

    marker = {SIGNATURES[model]: torch.zeros(1, 1)}  # marks the state as the public code's (the block's own wins)
    mapped = from_public(model, {**marker, **{prefix + k: v for k, v in state.items()}})
    target = prefix if target is None else target
    return {k.removeprefix(target): v for k, v in mapped.items() if k.startswith(target)}


def decoded_and_encoder_side(model, name: str, size: tuple[int, int], seed: int | None = None, device: str = "cpu"):
    """(decoded image, encoder-side reconstruction) of a smooth test image of `size` through lictrain's codec and
    file format, for a model whose eval forward rounds the latents as its encoder does (the channel-wise and
    checkerboard models). The analysis transform's last layer is scaled first so the latents spread over several
    integers (checked), else the comparison would be vacuous."""
    import torch.nn.functional as F

    from lictrain import bitstream
    from lictrain.coding import coding_numerics
    from lictrain.evaluation import Codec
    from lictrain.models import downsampling

    x = smooth_batch(1, size, size[1] if seed is None else seed)[0]
    h, w = size
    m = downsampling(name)
    padded = F.pad(x[None], (0, (-w) % m, 0, (-h) % m), mode="replicate")
    with torch.no_grad():
        last = model.g_a[-1]
        gain = 4 / model.g_a(padded).std()
        last.weight.mul_(gain)
        last.bias.mul_(gain)
    codec = Codec(model, name, "tiny", device=device)
    with coding_numerics(torch.device(device)):  # the reference in the coder's numerics too (no TF32 on CUDA)
        assert len(torch.unique(torch.round(codec.model.g_a(padded.to(device))))) >= 5, "latents too concentrated"
        ref = codec.model(padded.to(device))["x_hat"][0, :, :h, :w].clamp(0, 1).cpu()
    return codec.decompress(bitstream.decode(bitstream.encode(codec.compress(x)))).cpu(), ref
