"""Model registry: names -> CompressAI architectures, each with size presets.

`paper` is the published width (the high-rate configuration where a paper gives two), `small` a CPU benchmark
width, `tiny` a CPU test width; all presets keep the architecture's structure (layers, context models, groups).
Everything is built from CompressAI's classes: lictrain adds no layers of its own here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]
    presets: dict[str, dict]
    downsampling: int  # input sides must be multiples of this (the hyper-latent's stride)
    description: str


def _elic_groups(m: int) -> list[int]:
    """ELIC's uneven channel groups [16, 16, 32, 64, M-128] for M=320, scaled to other M (same 5 groups)."""
    g = [m // 20, m // 20, m // 10, m // 5]
    return g + [m - sum(g)]


def _elic(N: int, M: int) -> nn.Module:
    return Elic2022Official(N=N, M=M, groups=_elic_groups(M))


# bench: the deciding benchmark's width (configs/bench.yaml). The latent keeps small's 64 channels, which is what
# lets the lambdas separate (tiny's 24 do not); the transforms are narrower (N=32), 0.7x small's time per step.
_NM = {"paper": dict(N=192, M=320), "small": dict(N=48, M=64), "bench": dict(N=32, M=64), "tiny": dict(N=16, M=24)}

MODELS: dict[str, ModelSpec] = {
    "bmshj2018-factorized": ModelSpec(FactorizedPrior, _NM, 16, "Ballé et al. 2018, factorized prior"),
    "bmshj2018-hyperprior": ModelSpec(ScaleHyperprior, _NM, 64, "Ballé et al. 2018, scale hyperprior"),
    "mbt2018-mean": ModelSpec(MeanScaleHyperprior, _NM, 64, "Minnen et al. 2018, mean-scale hyperprior"),
    "mbt2018": ModelSpec(
        JointAutoregressiveHierarchicalPriors, _NM, 64, "Minnen et al. 2018, joint autoregressive + hyperprior"
    ),
    "cheng2020-anchor": ModelSpec(
        Cheng2020Anchor, {"paper": dict(N=192), "small": dict(N=48), "tiny": dict(N=16)}, 64,
        "Cheng et al. 2020, anchor (residual blocks, autoregressive context)",
    ),
    "elic": ModelSpec(
        _elic, {"paper": dict(N=192, M=320), "small": dict(N=48, M=80), "tiny": dict(N=16, M=40)}, 64,
        "He et al. 2022, ELIC (CompressAI's Elic2022Official; 5 uneven channel groups, checkerboard context)",
    ),
}
ALIASES = {"elic2022-official": "elic", "elic2022": "elic"}


def get_spec(name: str) -> ModelSpec:
    key = ALIASES.get(name, name)
    if key not in MODELS:
        raise LictrainError(f"unknown model '{name}'; valid models: {', '.join(MODELS)}")
    return MODELS[key]


def canonical_name(name: str) -> str:
    get_spec(name)
    return ALIASES.get(name, name)


def build_model(name: str, preset: str = "tiny") -> nn.Module:
    spec = get_spec(name)
    if preset not in spec.presets:
        raise LictrainError(f"unknown preset '{preset}' for model '{name}'; valid presets: {', '.join(spec.presets)}")
    return spec.build(**spec.presets[preset])


def downsampling(name: str) -> int:
    return get_spec(name).downsampling
