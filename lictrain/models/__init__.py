"""The models: CompressAI architectures registered by name (lictrain.registry.MODELS), each with size presets.

`paper` is the published width (the high-rate configuration where a paper gives two), `small` and `bench` CPU
benchmark widths, `tiny` a CPU test width; all presets keep the architecture's structure (layers, context models, groups).
Everything is built from CompressAI's classes: lictrain adds no layers of its own here.
"""

from __future__ import annotations

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


@register_model("elic", {"paper": dict(N=192, M=320), "small": dict(N=48, M=80), "tiny": dict(N=16, M=40)}, 64,
                "He et al. 2022, ELIC (CompressAI's Elic2022Official; 5 uneven channel groups, checkerboard context)")
def _elic(N: int, M: int) -> nn.Module:
    return Elic2022Official(N=N, M=M, groups=_elic_groups(M))


ALIASES = {"elic2022-official": "elic", "elic2022": "elic"}


def get_spec(name: str) -> ModelSpec:
    if name not in ALIASES and name not in MODELS:
        MODELS.lookup(name)  # the one-line error listing the valid models
    return MODELS[ALIASES.get(name, name)]


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
