"""Weights saved by the papers' public code, renamed to lictrain's modules (`lictrain import`).

A key map takes a parameter or buffer name of the public model and returns lictrain's name for it, or None for
entries lictrain does not keep (index buffers it builds itself, the coder's tables that update() derives, unused
parameters). CompressAI's own models need no map: lictrain builds them from CompressAI's classes.

Maps so far (each checked by loading the public classes' outputs in tests/test_flic.py):
- flic: qingshi9974/ICLR2024-FTIC (class FrequencyAwareTransFormer).
Not yet: TCM (jmliu206/LIC_TCM), DCAE, LALIC, AuxT; their module layouts differ from lictrain's more than by names.
"""

from __future__ import annotations

import re

from ..errors import LictrainError

_FLIC_RENAMES = [  # applied in order, as plain substring replacements
    ("trans_block.attns.", "layer.branches."), ("relative_position_bias_table", "bias_table"),
    ("trans_block.fm.complex_weight", "layer.fm.weight"), ("trans_block.ffn.", "layer.mlp."),
    ("trans_block.", "layer."), ("conv1_1.", "inp."), ("conv1_2.", "out."),
    ("tca.TCA.start_token_from_hyperprior.", "tca.start."), ("tca.TCA.layers.", "tca.blocks."),
    ("tca.TCA.lift.", "tca.lift."), (".cpe.0.proj.", ".pos."), (".cpe.0.norm.", ".pos_norm."),
    (".attn.proj.", ".proj."), (".mlp.fc1.", ".fc1."), (".mlp.fc2.", ".fc2."),
    ("tca.hyper_trans.", "tca.hyper_linear."), ("tca.entropy_parameters_net.", "tca.params."),
]


def _flic_key(key: str) -> str | None:
    if "relative_position_index" in key or key.startswith("gaussian_conditional.") or key == "tca.TCA.start_token":
        return None  # built by lictrain / derived by update() / never used by the public forward
    for old, new in _FLIC_RENAMES:
        key = key.replace(old, new)
    return re.sub(r"(tca\.blocks\.\d+)\.(q|k|v)1\.", r"\1.\2.", key)


KEY_MAPS = {"flic": _flic_key}
SIGNATURES = {"flic": "tca.TCA.lift.weight"}  # a key only the public model's state dict has


def from_public(name: str, state: dict) -> dict:
    """`state` in lictrain's names: renamed by the model's key map when it carries the public code's names, as
    it is otherwise."""
    if name not in KEY_MAPS or SIGNATURES[name] not in state:
        return state
    out = {}
    for key, value in state.items():
        new = KEY_MAPS[name](key)
        if new is not None:
            if new in out:
                raise LictrainError(f"two public weights map to {new} ({key})")
            out[new] = value
    return out
