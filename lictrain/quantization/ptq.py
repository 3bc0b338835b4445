"""W8A8 post-training quantization of trained checkpoints (the SOAP-for-LIC paper's Table 2, last column).

Which layers: every Conv2d, ConvTranspose2d and Linear the model's forward pass calls (analysis and synthesis
transforms, hyperprior analysis and synthesis, and the context / entropy-parameter networks of models that have
them), in the order the forward pass calls them; `keep_float` names module prefixes to leave in float (e.g. `h_s`
to keep the network that produces the entropy parameters exact). Not quantized: GDN/IGDN's own parameters (an
activation function), the entropy bottleneck's density model and the Gaussian conditional (tables and CDFs, as in
deployed codecs), the attention blocks' non-linear-layer arithmetic.

Each quantized layer gets int8 weights (per output channel; weights.py) and 8-bit dynamic per-channel inputs
(activations.py). Layers are processed one at a time in forward order; a layer's calibration inputs are taken from
the model quantized so far (so AdaRound also corrects the error arriving from earlier layers) and its targets from
the float model, all in evaluation mode (rounding, no noise), on centre crops of the calibration images.

The result is a lictrain checkpoint: the model's state dict holds the dequantized weights (int8 x scale, exactly
representable), and its `ptq` entry names the quantized layers (eval, compress and decompress re-attach the
activation quantizers from it), the int8 tensors and scales, and how they were made.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import Checkpoint, checkpoint_dict
from ..data import EvalImages
from ..errors import LictrainError
from ..io import save_atomic
from ..models.quantized_activations import attach_activation_quantizers
from .weights import adaround, channel_axis, quantize_nearest, weight_scales

log = logging.getLogger("lictrain")
LAYER_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def quantizable_layers(model: nn.Module, x: torch.Tensor, keep_float: tuple[str, ...] = ()) -> list[str]:
    """Names of the conv/deconv/linear layers model(x) calls, in call order, minus those under keep_float."""
    order: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, LAYER_TYPES) and not any(name == k or name.startswith(k + ".") for k in keep_float):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: order.append(name) if name not in order else None))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order


def _capture(model: nn.Module, layer: nn.Module, x: torch.Tensor, output: bool) -> torch.Tensor:
    """The layer's input (after any pre-hooks, i.e. activation-quantized when it is) or output during model(x)."""
    box = []
    if output:
        h = layer.register_forward_hook(lambda m, args, out: box.append(out.detach()))
    else:
        h = layer.register_forward_pre_hook(lambda m, args: box.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return box[0]


def quantize_model(model: nn.Module, calib: torch.Tensor, weights: str = "adaround", iters: int = 1000,
                   batch: int = 4, keep_float: tuple[str, ...] = (), progress: bool = True,
                   min_targets_per_weight: float = 10.0) -> dict:
    """Quantize `model` in place (W8 by `weights`: adaround | nearest; A8 dynamic per channel) on the calibration
    batch `calib` (N x 3 x H x W); returns the `ptq` record (layers, int8 tensors, scales, rounding per layer).

    AdaRound decides one rounding per weight from the layer's calibration outputs; where those are fewer than
    `min_targets_per_weight` values per weight it fits the calibration set instead of the layer (measured on the
    deciding benchmark: AdaRound on the hyperprior, which sees 1/16-1/64 of the image's positions, raised the rate
    by 6% where nearest rounding cost 0.4%), so such layers are rounded to nearest (0 forces AdaRound everywhere)."""
    if weights not in ("adaround", "nearest"):
        raise LictrainError(f"weights must be adaround or nearest, got '{weights}'")
    model.eval()
    reference = copy.deepcopy(model).eval()
    names = quantizable_layers(model, calib, keep_float)
    modules, ref_modules = dict(model.named_modules()), dict(reference.named_modules())
    ints, scales, rounding = {}, {}, {}
    for i, name in enumerate(names):
        layer = modules[name]
        attach_activation_quantizers(model, [name])  # before capturing: the layer sees quantized inputs
        scale = weight_scales(layer.weight, channel_axis(layer))
        rounding[name] = "nearest"
        if weights == "adaround":
            targets = _capture(reference, ref_modules[name], calib, output=True)
            if targets.numel() >= min_targets_per_weight * layer.weight.numel():  # else: not worth the inputs
                rounding[name] = "adaround"
                inputs = _capture(model, layer, calib, output=False)
                q = adaround(layer, inputs, targets, iters=iters, batch=batch, progress=progress,
                             desc=f"adaround {i + 1}/{len(names)} {name}")
        if rounding[name] == "nearest":
            q = quantize_nearest(layer.weight.detach(), scale)
        with torch.no_grad():
            layer.weight.copy_(q * scale)
        ints[name] = q.to(torch.int8)
        scales[name] = scale.flatten().clone()
    return {"layers": names, "weights": weights, "activations": "uint8, dynamic, per channel (min/max)",
            "int8": ints, "scales": scales, "rounding": rounding, "iters": iters if weights == "adaround" else 0,
            "min_targets_per_weight": min_targets_per_weight,
            "keep_float": list(keep_float)}


def calibration_batch(spec: str, images: int, crop: int, multiple: int) -> torch.Tensor:
    """Centre crops (crop x crop) of the first `images` readable images of `spec`, stacked."""
    if crop % multiple:
        raise LictrainError(f"--calib-crop must be a multiple of {multiple} for this model, got {crop}")
    data = EvalImages(spec, crop, images)  # one-line errors for missing folders and no readable images
    xs = [data[i] for i in range(len(data))]
    small = [tuple(x.shape[-2:]) for x in xs if tuple(x.shape[-2:]) != (crop, crop)]
    if small:
        raise LictrainError(f"calibration images must be at least {crop}x{crop} (found {small[0][0]}x{small[0][1]} "
                            f"in {spec}); lower --calib-crop")
    return torch.stack(xs)


def quantize_checkpoint(path: str | Path | Checkpoint, calib: torch.Tensor, out: str | Path,
                        weights: str = "adaround", iters: int = 1000, batch: int = 4, keep_float: tuple[str, ...] = (),
                        calib_spec: str = "", progress: bool = True, min_targets_per_weight: float = 10.0) -> Path:
    """Quantize a checkpoint (a path, or one already read) with its EMA weights, as evaluated, and save it as a
    lictrain checkpoint."""
    ckpt = path if isinstance(path, Checkpoint) else Checkpoint.load(path)
    path = ckpt.path
    if ckpt.ptq:
        raise LictrainError(f"{path} is already quantized")
    model = ckpt.model()
    record = quantize_model(model, calib, weights, iters, batch, keep_float, progress, min_targets_per_weight)
    record.update(source=str(path), calib=calib_spec, calib_images=int(calib.shape[0]),
                  calib_crop=int(calib.shape[-1]))
    out = Path(out)
    save_atomic(checkpoint_dict(ckpt.data["config"], model.state_dict(), None, ckpt.data.get("state", {}),
                                ptq=record), out)
    cfg = ckpt.config
    ada = sum(r == "adaround" for r in record["rounding"].values())
    log.info("quantized %s (%s, lambda %g, %d layers, weights %s: %d by AdaRound) -> %s", path, cfg.model.name,
             cfg.loss.lmbda, len(record["layers"]), weights, ada, out)
    return out
