"""The models: CompressAI architectures registered by name (lictrain.registry.MODELS), each with size presets.

`paper` is the published width (the high-rate configuration where a paper gives two), `small` and `bench` CPU
benchmark widths, `tiny` a CPU test width; all presets keep the architecture's structure (layers, context models,
groups).
Everything is built from CompressAI's classes, except TCM, TCM + AuxT, LALIC, DCAE and FLIC (tcm.py, auxt.py, lalic.py,
dcae.py, flic.py: lictrain's own implementations on CompressAI's layers, entropy models and latent codecs).

A model may also be named by import path, `package.module:ClassName` (config `model.name`, with its constructor's
arguments in `model.kwargs`): the class must be a CompressAI-style compression model (CompressionModel-like: forward
returning x_hat and likelihoods, compress, decompress, update, aux_loss). The path and kwargs are recorded in the
checkpoint's config, so eval, compress and decompress rebuild it (the module must be importable there too). Its
`downsampling_factor` class attribute, if any, is the multiple images are padded to (else 64). `model.kwargs` also
overrides a registered model's preset values (e.g. {N: 96}).

The analyses (latent outliers) and CMD-LIC's layer ranking need the model's analysis transform (whose output is the
latent y) and synthesis transform (whose input is y_hat): CompressAI's `g_a` and `g_s` unless the model names its
own in a class attribute `lictrain_transforms = ("encoder", "decoder")`.
"""

from __future__ import annotations

import importlib
import warnings

import torch.nn as nn

with warnings.catch_warnings():  # compressai 1.2.8 uses torch.jit.script, deprecated in torch 2.14
    warnings.simplefilter("ignore", FutureWarning)
    import compressai.models  # noqa: F401

from compressai.models import (
    Cheng2020Anchor,
    Elic2022Official,
    FactorizedPrior,
    JointAutoregressiveHierarchicalPriors,
    MeanScaleHyperprior,
    ScaleHyperprior,
)

from ..errors import LictrainError
from ..registry import MODELS, ModelSpec, register_model
from .auxt import TCMAuxT
from .dcae import DCAE
from .flic import FLIC
from .lalic import LALIC
from .tcm import TCM
from .video_stage import DCVC_PRESETS, dcvc_stage, scale_space_flow


def _elic_groups(m: int) -> list[int]:
    """ELIC's uneven channel groups [16, 16, 32, 64, M-128] for M=320, scaled to other M (same 5 groups)."""
    g = [m // 20, m // 20, m // 10, m // 5]
    return g + [m - sum(g)]


# bench: the deciding benchmark's width (configs/bench.yaml). The latent keeps small's 64 channels, which is what
# lets the lambdas separate (tiny's 24 do not); the transforms are narrower (N=32), 0.7x small's time per step.
_NM = {"paper": dict(N=192, M=320), "small": dict(N=48, M=64), "bench": dict(N=32, M=64), "tiny": dict(N=16, M=24)}

register_model("bmshj2018-factorized", _NM, 16, "Ballé et al. 2018, factorized prior")(FactorizedPrior)
register_model("bmshj2018-hyperprior", _NM, 64, "Ballé et al. 2018, scale hyperprior")(ScaleHyperprior)
register_model("mbt2018-mean", _NM, 64, "Minnen et al. 2018, mean-scale hyperprior")(MeanScaleHyperprior)
register_model("mbt2018", _NM, 64, "Minnen et al. 2018, joint autoregressive + hyperprior")(
    JointAutoregressiveHierarchicalPriors)
register_model("cheng2020-anchor", {"paper": dict(N=192), "small": dict(N=48), "tiny": dict(N=16)}, 64,
               "Cheng et al. 2020, anchor (residual blocks, autoregressive context)")(Cheng2020Anchor)


@register_model("elic", {"paper": dict(N=192, M=320), "small": dict(N=48, M=80, context=(56, 32)),
                         "tiny": dict(N=16, M=40, context=(28, 16))}, 64,
                "He et al. 2022, ELIC (CompressAI's Elic2022Official; 5 uneven channel groups, checkerboard context)")
def _elic(N: int, M: int, context: tuple[int, int] = (224, 128)) -> nn.Module:
    """`context`: the hidden widths of the channel context g_ch (ELIC's 224, 128, which CompressAI fixes whatever
    M is). The small presets scale them with M (x M/320): fixed, they made `tiny` 3.55 M parameters, 3.39 M of
    them in the context, larger than mbt2018-mean's `small`."""
    model = Elic2022Official(N=N, M=M, groups=_elic_groups(M))
    if tuple(context) != (224, 128):
        groups, (c1, c2) = model.groups, context
        contexts = model.latent_codec.latent_codec["y"].channel_context
        for k in range(1, len(groups)):  # the same three 5x5 convolutions, narrower
            contexts[f"y{k}"] = nn.Sequential(
                nn.Conv2d(sum(groups[:k]), c1, 5, padding=2), nn.ReLU(inplace=True),
                nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True),
                nn.Conv2d(c2, groups[k] * 2, 5, padding=2))
    return model


_TCM_TINY = dict(N=16, M=40, Z=16, head_dims=(8,) * 6, hyper_head_dim=8, atten_inner=16, atten_head_dim=8,
                 param_hidden=(32, 16))
register_model("tcm", {"paper": dict(N=64), "large": dict(N=128), "small": dict(N=32, M=160, Z=96, atten_inner=64,
                                                                              param_hidden=(112, 64)),
                       "tiny": _TCM_TINY}, 64,
               "Liu et al. 2023, TCM (Transformer-CNN mixture blocks, channel-wise Swin-attention entropy model); "
               "paper = TCM-S")(TCM)
register_model("tcm-auxt", {k: MODELS["tcm"].presets[k] for k in ("paper", "small", "tiny")}, 64,
               "TCM with Li et al. 2025's auxiliary transform (AuxT: wavelet-based linear shortcuts, "
               "orthogonality regulariser); paper = TCM-S + AuxT")(TCMAuxT)

register_model("lalic", {"paper": {}, "tiny": dict(dims=(16, 16, 32, 40, 32, 16), depths=(1, 1, 1, 1),
                                                  groups=tuple(_elic_groups(40)), min_params=16)}, 64,
               "Feng et al. 2025, LALIC (Bi-RWKV linear attention transforms, ELIC entropy model with an RWKV "
               "channel context)")(LALIC)

register_model("dcae", {"paper": {}, "tiny": dict(N=16, M=40, Z=16, dims=(16, 16, 32), blocks=(1, 1, 1),
                                                 head_dims=(8,) * 6, hyper_head_dim=8, dict_entries=8, dict_heads=2,
                                                 dict_head_dim=8, param_hidden=(32, 16))}, 64,
               "Lu et al. 2025, DCAE (Swin transforms, dictionary cross-attention entropy model)")(DCAE)

register_model("flic", {"paper": {}, "tiny": dict(dims=(16, 16, 32), M=40, Z=16, hyper_dim=32, heads=(4,) * 6,
                                                 hyper_heads=4, tca_depth=2, tca_heads=4)}, 128,
               "Li et al. 2024, FLIC/FTIC (frequency-decomposition window attention, frequency modulation, "
               "transformer channel-wise entropy model T-CA); images padded to multiples of 128")(FLIC)

ALIASES = {"elic2022-official": "elic", "elic2022": "elic", "tcm-s": "tcm", "tcm+auxt": "tcm-auxt", "ftic": "flic"}


REQUIRED = ("forward", "compress", "decompress", "update", "aux_loss")


def is_import_path(name: str) -> bool:
    return ":" in name


def _import_class(path: str) -> type:
    """The class named by 'package.module:ClassName', checked to be a CompressAI-style compression model."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise LictrainError(f"model '{path}': an import path is written package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises on import
        raise LictrainError(f"model '{path}': cannot import {module_name} ({type(e).__name__}: {e})") from None
    cls = module
    for part in attr.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            raise LictrainError(f"model '{path}': {module_name} has no attribute {attr}")
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise LictrainError(f"model '{path}': {attr} is not an nn.Module class")
    return check_compression_model(cls, f"model '{path}': {attr}")


def check_compression_model(model, what: str):
    """`model` (a class or an instance) if it has CompressAI's CompressionModel interface, else a one-line error
    that starts with `what`."""
    cls = model if isinstance(model, type) else type(model)
    missing = [m for m in REQUIRED if not callable(getattr(model, m, None))]
    if not issubclass(cls, nn.Module) or missing:
        lacks = f"missing {', '.join(missing)}" if missing else "not an nn.Module"
        raise LictrainError(f"{what} is not a CompressAI-style compression model ({lacks}; see "
                            "compressai.models.CompressionModel)")
    return model


def downsampling_of(model) -> int:
    """The multiple a model (class or instance) pads images to: its `downsampling_factor`, else 64."""
    return int(getattr(model, "downsampling_factor", 64))


def transforms(model: nn.Module) -> tuple[str, str]:
    """Module names of the model's analysis and synthesis transforms (see the module docstring)."""
    names = tuple(getattr(model, "lictrain_transforms", ("g_a", "g_s")))
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if len(names) != 2 or missing:
        raise LictrainError(f"{type(model).__name__} has no module {', '.join(missing) or names}: name its analysis "
                            "and synthesis transforms in a class attribute lictrain_transforms = (\"enc\", \"dec\")")
    return names


def get_spec(name: str) -> ModelSpec:
    if name not in ALIASES and name not in MODELS:
        MODELS.lookup(name)  # the one-line error listing the valid models
    return MODELS[ALIASES.get(name, name)]


def canonical_name(name: str) -> str:
    if is_import_path(name):
        return name
    get_spec(name)
    return ALIASES.get(name, name)


def build_model(name: str, preset: str = "tiny", kwargs: dict | None = None) -> nn.Module:
    """A registered model at a preset (kwargs override the preset's values), or the class at an import path built
    with kwargs (the preset is then only a label)."""
    kwargs = dict(kwargs or {})
    if name == "custom":  # what train(model=...) records: the class is not known here
        raise LictrainError("this checkpoint holds a model passed to lictrain.train(model=...): build that model "
                            "yourself and load the checkpoint's 'model' state dict, or name it by import path "
                            "(model.name=package.module:ClassName) when training")
    if is_import_path(name):
        cls = _import_class(name)
        build, what = cls, name
    else:
        spec = get_spec(name)
        if preset not in spec.presets:
            raise LictrainError(f"unknown preset '{preset}' for model '{name}'; valid presets: "
                                f"{', '.join(spec.presets)}")
        kwargs = {**spec.presets[preset], **kwargs}
        build, what = spec.build, f"{name} ({preset})"
    try:
        return build(**kwargs)
    except (TypeError, ValueError) as e:  # a wrong keyword, a missing argument, or values that do not fit together
        raise LictrainError(f"cannot build model {what} with {kwargs or 'no arguments'}: {e}") from None


def parameter_count(name: str, preset: str) -> int:
    """Trainable parameters of a registered model at a preset (the entropy bottleneck's quantiles included, as
    papers count them)."""
    return sum(p.numel() for p in build_model(name, preset).parameters())


def video_frames(name: str) -> int:
    """The frames a training sample of this model needs (data.frames): 0 for an image model."""
    return 0 if is_import_path(name) else get_spec(name).frames


def downsampling(name: str) -> int:
    if is_import_path(name):
        return downsampling_of(_import_class(name))
    return get_spec(name).downsampling


# Video (issue 33): a P-frame model inside one of DCVC's training stages (video_stage.py); trained on frame sequences
# (data.frames >= 2), model.kwargs {stage: 1..4, iframe: an image checkpoint coding the reference}
register_model("dcvc", DCVC_PRESETS, 64,
               "Li et al. 2021, DCVC (video, P-frames; data.frames >= 2; model.kwargs stage 1-4, iframe)",
               frames=2)(dcvc_stage)
# CompressAI's ScaleSpaceFlow, its fixed published widths only (CompressAI builds them inside the class)
register_model("ssf2020", {"paper": {}}, 128,
               "Agustsson et al. 2020, scale-space flow (CompressAI's ScaleSpaceFlow; video, whole sequences; "
               "data.frames >= 2)", frames=2)(scale_space_flow)
