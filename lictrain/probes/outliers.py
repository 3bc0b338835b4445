"""Latent and activation outliers (SOAP-for-LIC, Section 5.1, Eq. 8; Figures 4 and 14; Table 2).

For each image, in eval mode: the latent y (output of the analysis transform g_a), the quantized latent y_hat (the
input of the synthesis transform g_s, so each model's own rounding, around the means for mean-scale models), and
the activations of one chosen module (default: the fourth layer of the encoder, `g_a.3`), all captured with
forward hooks. Each is flattened to n x d (positions x channels); Kurt and MaxMed (stats.py) are averaged over
images.

Scaled deviation map (Figure 4): the paper writes eps = |y_hat - y| / sum y. We read the sum as running over the
whole latent of the image and take absolute values, eps(h, w) = sum_c |y_hat - y|(c, h, w) / sum_{c,h,w} |y|,
because a signed sum of a roughly zero-mean latent can be near zero (and change sign) and would make the map
meaningless; one map per image (channels summed), one colour scale shared by all checkpoints for that image.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from ..data import EvalImages, pad_to_multiple
from ..errors import LictrainError
from ..methods.base import StepContext, StepHook
from ..models import transforms
from .stats import channels_last_matrix, kurtosis, max_median

DEFAULT_LAYER = "g_a.3"


def find_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        near = [n for n in modules if n.startswith(name.split(".")[0])][:20]
        raise LictrainError(f"the model has no module '{name}'; some that it has: {', '.join(near) or 'none'}")
    return modules[name]


@contextmanager
def capture(model: nn.Module, layer: str | None):
    """Record the analysis transform's output (y), the synthesis transform's input (y_hat) and `layer`'s output
    while the block runs (g_a and g_s, or the transforms the model names: lictrain.models.transforms)."""
    found: dict[str, torch.Tensor] = {}
    analysis, synthesis = transforms(model)
    handles = [
        find_module(model, analysis).register_forward_hook(lambda m, i, o: found.__setitem__("y", o)),
        find_module(model, synthesis).register_forward_pre_hook(lambda m, i: found.__setitem__("y_hat", i[0])),
    ]
    if layer:
        handles.append(find_module(model, layer).register_forward_hook(
            lambda m, i, o: found.__setitem__("act", o[0] if isinstance(o, tuple) else o)))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def deviation_map(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """eps(h, w) = sum_c |y_hat - y| / sum |y| (see the module docstring), as an (H, W) tensor."""
    y, y_hat = y.detach().double()[0], y_hat.detach().double()[0]
    total = y.abs().sum()
    return (y_hat - y).abs().sum(0) / (total if total > 0 else 1.0)


@torch.no_grad()
def image_features(model: nn.Module, x: torch.Tensor, multiple: int, layer: str | None) -> dict[str, torch.Tensor]:
    model.eval()
    h, w = x.shape[-2:]
    with capture(model, layer) as found:
        model(pad_to_multiple(x, multiple))
    if "y" not in found or "y_hat" not in found:
        raise LictrainError("the model's forward pass did not run g_a and g_s; outlier analysis needs both")
    return found


def outlier_stats(model: nn.Module, images: EvalImages, multiple: int, layer: str | None = DEFAULT_LAYER,
                  device: torch.device | str = "cpu", maps: bool = False) -> dict:
    """Kurt / MaxMed of the latent and of `layer`'s activations, averaged over images (+ deviation maps)."""
    sums = {"latent_kurt": 0.0, "latent_maxmed": 0.0, "act_kurt": 0.0, "act_maxmed": 0.0}
    out_maps = []
    for i in range(len(images)):
        x = images[i].unsqueeze(0).to(device)
        f = image_features(model, x, multiple, layer)
        y = channels_last_matrix(f["y"])
        sums["latent_kurt"] += kurtosis(y)
        sums["latent_maxmed"] += max_median(y)
        if layer:
            a = channels_last_matrix(f["act"])
            sums["act_kurt"] += kurtosis(a)
            sums["act_maxmed"] += max_median(a)
        if maps:
            out_maps.append(deviation_map(f["y"], f["y_hat"]).cpu())
    n = len(images)
    result = {k: v / n for k, v in sums.items() if layer or not k.startswith("act")}
    result["images"] = n
    if maps:
        result["maps"] = out_maps
    return result


class OutlierProbe(StepHook):
    """Every `every` steps, Kurt and MaxMed of the latent on a fixed batch of images (Figure 14); read-only: it runs
    a copy-free eval-mode forward pass under no_grad and restores the training mode and the RNG."""

    def __init__(self, images: torch.Tensor, every: int, layer: str | None = None):
        if every < 1:
            raise LictrainError("the outlier probe's interval must be at least 1")
        self.images, self.every, self.layer = images, every, layer

    def after_step(self, ctx: StepContext):
        if (ctx.step + 1) % self.every:
            return None
        model = self.run.model
        was_training = model.training
        logs = {"latent_kurt": 0.0, "latent_maxmed": 0.0}
        with torch.random.fork_rng(devices=[]):
            for x in self.images:
                f = image_features(model, x.unsqueeze(0).to(next(model.parameters()).device), 1, self.layer)
                y = channels_last_matrix(f["y"])
                logs["latent_kurt"] += kurtosis(y) / len(self.images)
                logs["latent_maxmed"] += max_median(y) / len(self.images)
        model.train(was_training)
        return logs


def save_deviation_figure(path: Path, image: torch.Tensor, maps: dict[str, torch.Tensor], title: str = "") -> None:
    """The input beside each checkpoint's deviation map, one colour scale (Figure 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vmax = max(float(m.max()) for m in maps.values())
    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(3.2 * (1 + len(maps)), 3))
    axes[0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    axes[0].set_title(title or "input")
    for ax, (name, m) in zip(axes[1:], maps.items()):
        im = ax.imshow(m.numpy(), cmap="inferno", vmin=0, vmax=vmax)
        ax.set_title(f"{name} (max {float(m.max()):.2e})")
    for ax in axes:
        ax.axis("off")
    fig.colorbar(im, ax=list(axes[1:]), shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
