"""Weights saved by the papers' public code, renamed to lictrain's modules (`lictrain import`).

A key map takes a parameter or buffer name of the public model (and the set of all its names, where the meaning of
a name depends on its siblings) and returns lictrain's name for it; or None for entries lictrain does not keep
(index buffers it builds itself, fixed filters, the coder's tables that update() derives, unused parameters); or
(name, function) where the tensor changes shape (a linear layer that lictrain writes as a 1x1 convolution).
CompressAI's own models need no map: lictrain builds them from CompressAI's classes.

Maps so far, each checked by running the public classes on the same weights (benchmarks/RESULTS.md) and in the
tests against outputs of the public blocks saved in tests/data:
- flic: qingshi9974/ICLR2024-FTIC (class FrequencyAwareTransFormer).
- tcm: jmliu206/LIC_TCM (class TCM; TCM-S is TCM(N=64)).
- tcm-auxt: qingshi9974/AuxT (class TCM_AUXT): TCM's map plus the wavelet shortcuts.
- dcae: LabShuHangGU/DCAE (class DCAE).
Not yet: LALIC.
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


def _flic_key(key: str, keys=()) -> str | None:
    if "relative_position_index" in key or key.startswith("gaussian_conditional.") or key == "tca.TCA.start_token":
        return None  # built by lictrain / derived by update() / never used by the public forward
    for old, new in _FLIC_RENAMES:
        key = key.replace(old, new)
    return re.sub(r"(tca\.blocks\.\d+)\.(q|k|v)1\.", r"\1.\2.", key)


_TCM_RENAMES = [
    ("_transforms.", "."),  # cc_mean_transforms, cc_scale_transforms, lrp_transforms
    (".conv1_1.", ".split."), (".conv1_2.", ".join."), (".conv_block.", ".conv."), (".trans_block.", ".swin."),
    (".non_local_block.block_1.", ".swin.0."), (".non_local_block.block_2.", ".swin.1."),
    (".in_conv.", ".inp."), (".out_conv.", ".out."), (".conv_a.", ".trunk."), (".conv_b.", ".mask."),
    (".ln1.", ".norm1."), (".ln2.", ".norm2."), (".msa.embedding_layer.", ".attn.qkv."),
    (".msa.linear.", ".attn.proj."), (".msa.relative_position_params", ".attn.bias_table"),
]


def _tcm_key(key: str, keys=()) -> str | None:
    key = re.sub(r"^(atten_mean|atten_scale)\.(\d+)\.0\.", r"\1.\2.", key)  # the public code wraps them in a Sequential
    for old, new in _TCM_RENAMES:
        key = key.replace(old, new)
    return key


def _auxt_key(key: str, keys=()):
    shortcut = re.match(r"^AuxT_(enc|dec)\.(\d+)\.(.*)$", key)
    if shortcut is None:
        return re.sub(r"^(g_a|g_s)\.", r"\1.layers.", _tcm_key(key))  # lictrain wraps the transforms
    side, k, rest = shortcut.groups()
    prefix = f"{'g_a' if side == 'enc' else 'g_s'}.shortcuts.{k}."
    if rest == "scaling_factors":  # (1, 1, 4C) per token -> (1, 4C, 1, 1) per channel
        return prefix + "log_gain", lambda v: v.reshape(1, -1, 1, 1)
    if rest == "OLP.linear.weight":  # nn.Linear on tokens -> 1x1 convolution
        return prefix + "proj.weight", lambda v: v[:, :, None, None]
    if rest == "OLP.linear.bias":
        return prefix + "proj.bias"
    return None  # the fixed Haar filters (dwt.w_*, idwt.filters): lictrain computes the transform directly


_DCAE_RENAMES = [
    ("dt_cross_attention.", "dca."), (".x_trans.", ".inp."), (".ln_scale.", ".norm_a."), (".msa.s.", ".aggregate.inp."),
    (".msa.spatial_atte.conv1.", ".aggregate.gate."), (".msa.dense.proj.", ".aggregate.fuse."),
    (".lnx.", ".norm_q."), (".q_trans.", ".query."), (".dict_ln.", ".norm_d."), (".k.", ".key."),
    (".ln_mlp.", ".norm_m."), (".output_trans.0.", ".out."), (".mlp.dwconv.dwconv.", ".mlp.dw."),
    (".ln1.", ".norm1."), (".ln2.", ".norm2."), (".msa.embedding_layer.", ".attn.qkv."),
    (".msa.linear.", ".attn.proj."), (".msa.relative_position_params", ".attn.bias_table"),
    ("h_z_s1.", "h_scale_s."), ("h_z_s2.", "h_mean_s."), ("_transforms.", "."),
]
_DCAE_SUBSTITUTIONS = [
    (r"\.msa\.dense\.conv_layers\.(\d+)\.1\.in_trans\.", r".aggregate.units.\1.body.0."),
    (r"\.msa\.dense\.conv_layers\.(\d+)\.1\.dw_conv\.", r".aggregate.units.\1.body.2."),
    (r"\.msa\.dense\.conv_layers\.(\d+)\.1\.out_trans\.", r".aggregate.units.\1.body.4."),
    (r"\.res_scale_(\d)\.scale$", r".gamma\1"),
]


def _dcae_key(key: str, keys=()) -> str | None:
    if key == "dt":
        return "dictionary"
    # a residual-bottleneck stage (conv + res1..3 down, res1..3 + conv up) is a Sequential in lictrain; a Swin stage
    # keeps its `conv` name
    stage = re.match(r"^(g_a|g_s|h_a|h_z_s1|h_z_s2)\.(\d+)\.(conv|res(\d))\.(.*)$", key)
    if stage and f"{stage[1]}.{stage[2]}.res1.conv1.weight" in keys:
        down = stage[1] in ("g_a", "h_a")
        index = (0 if down else 3) if stage[3] == "conv" else int(stage[4]) - (0 if down else 1)
        key = f"{stage[1]}.{stage[2]}.{index}.{stage[5]}"
    for pattern, new in _DCAE_SUBSTITUTIONS:
        key = re.sub(pattern, new, key)
    for old, new in _DCAE_RENAMES:
        key = key.replace(old, new)
    key = re.sub(r"^dca\.(\d+)\.scale$", r"dca.\1.temperature", key)
    return re.sub(r"^dca\.(\d+)\.linear\.", r"dca.\1.proj.", key)


KEY_MAPS = {"flic": _flic_key, "tcm": _tcm_key, "tcm-auxt": _auxt_key, "dcae": _dcae_key}
# a key only the public model's state dict has
SIGNATURES = {"flic": "tca.TCA.lift.weight", "tcm": "cc_mean_transforms.0.0.weight",
              "tcm-auxt": "AuxT_enc.0.OLP.linear.weight", "dcae": "dt"}


def from_public(name: str, state: dict) -> dict:
    """`state` in lictrain's names: renamed by the model's key map when it carries the public code's names, as
    it is otherwise."""
    if name not in KEY_MAPS or SIGNATURES[name] not in state:
        return state
    out, keys = {}, set(state)
    for key, value in state.items():
        new = KEY_MAPS[name](key, keys)
        if new is None:
            continue
        if isinstance(new, tuple):
            new, change = new
            value = change(value)
        if new in out:
            raise LictrainError(f"two public weights map to {new} ({key})")
        out[new] = value
    return out
