"""Optimizer registry: one table of optimizers with their defaults, plus wrappers applied by name.

`build_optimizer("adam", params, lr)` builds Adam with the defaults below; `options` override them. A name such as
"soap+sma" applies the registered wrapper "sma" (CMD-LIC's sampling-then-moving-average, sma.py) around "soap",
with its options under `optim.options.sma`, e.g. {sma: {alpha: 0.8, every: 5}}.

The entropy bottlenecks' `quantiles` never go to these optimizers: they are trained by CompressAI's auxiliary loss
with their own Adam (see `split_parameters` and trainer.py), exactly as CompressAI's reference training script does.
"""

from __future__ import annotations

import inspect
from typing import Iterable

import torch
import torch.nn as nn

from ..errors import LictrainError
from ..registry import OPTIMIZERS, WRAPPERS, OptimizerSpec, register_optimizer, register_wrapper
from .cautious import CautiousAdam
from .muon import MuonWithAdamW
from .shampoo import Shampoo
from .sma import SMA
from .soap import SOAP


ADAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
register_optimizer("adam", dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), "Adam (the LIC baseline)",
                   coordinate_state=ADAM_STATE, preview="adam")(torch.optim.Adam)
register_optimizer("adamw", dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2), "AdamW",
                   coordinate_state=ADAM_STATE, preview="adam")(torch.optim.AdamW)
register_optimizer("sgd", dict(momentum=0.9, weight_decay=0.0), "SGD with momentum",
                   coordinate_state=("momentum_buffer",), preview="sgd")(torch.optim.SGD)
register_optimizer(
    "cautious-adam", dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_scale=10.0),
    "Adam with the update masked where it disagrees in sign with the gradient (Balanced R-D authors' optimizer)",
    coordinate_state=ADAM_STATE,
)(CautiousAdam)
register_optimizer("adagrad", dict(eps=1e-10, weight_decay=0.0), "Adagrad")(torch.optim.Adagrad)
# As in the LIC papers: a drop-in for Adam at Adam's learning rate, weight decay 0, basis refreshed every 10 steps.
register_optimizer(
    "soap",
    dict(betas=(0.95, 0.95), shampoo_beta=None, eps=1e-8, weight_decay=0.0, precondition_frequency=10,
         max_precond_dim=10000, merge_dims=False, precondition_1d=False),
    "SOAP (Shampoo eigenbasis + Adam), lictrain's own implementation",
    preview="precondition", checks_finite=True,  # its moments live in a rotated basis: no coordinate state
)(SOAP)
register_optimizer(
    "shampoo",
    dict(betas=(0.9, 0.999), shampoo_beta=0.999, eps=1e-8, matrix_eps=1e-6, weight_decay=0.0,
         precondition_frequency=10, max_precond_dim=10000),
    "Shampoo (inverse-root Kronecker preconditioner) with Adam grafting, lictrain's own implementation",
)(Shampoo)
register_optimizer(
    "muon",
    dict(momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8),
    "torch.optim.Muon on kernels viewed as out x (in*k*k), AdamW on the rest",
    kernel_groups=True,
)(MuonWithAdamW)
# Wrappers (name -> function(optimizer, **options), options under optim.options.<name>)
register_wrapper("sma")(SMA)  # CMD-LIC's sampling-then-moving-average: alpha 0.8, every 5 (Table 11)


def split_parameters(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(main, aux): trainable parameters for the main optimizer, and the entropy bottlenecks' quantiles."""
    main, aux = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (aux if name.endswith("quantiles") else main).append((name, p))
    return main, aux


def kernel_parameters(model: nn.Module) -> set[int]:
    """ids of the convolution and linear kernels (the weights of nn.Conv*/nn.ConvTranspose*/nn.Linear, masked context
    convolutions included): the tensors weight decay and Muon are meant for. Biases, GDN's beta and gamma and the
    entropy models' density parameters are not kernels."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
    return {id(m.weight) for m in model.modules() if isinstance(m, kinds) and isinstance(m.weight, nn.Parameter)}


def unwrap(optimizer) -> tuple[torch.optim.Optimizer, OptimizerSpec | None]:
    """The optimizer under every wrapper (SMA, ...: each keeps the one it wraps as `.base`), and its registered
    record (None for a class lictrain did not register)."""
    while getattr(optimizer, "base", None) is not None:
        optimizer = optimizer.base
    spec = next((s for s in OPTIMIZERS.values() if type(optimizer) is s.cls), None)
    return optimizer, spec


def _groups(params: list, kernels: set[int] | None, weight_decay: float, kernel_groups: bool):
    """Parameter groups as timm builds them: decay (and, for Muon, orthogonalisation) on kernels only. Without
    `kernels`, or when nothing distinguishes the groups, one group (the layout of lictrain's earlier checkpoints)."""
    if kernels is None or (weight_decay == 0 and not kernel_groups):
        return params
    kern = [p for p in params if id(p) in kernels]
    rest = [p for p in params if id(p) not in kernels]
    groups = [{"params": kern, "kernels": True}] if kern else []
    groups += [{"params": rest, "kernels": False, "weight_decay": 0.0}] if rest else []
    return groups


def build_optimizer(name: str, params: Iterable, lr: float, options: dict | None = None,
                    kernels: set[int] | None = None) -> torch.optim.Optimizer:
    """`kernels` (see kernel_parameters): when given, weight decay applies to kernels only and Muon orthogonalises
    kernels only; without it every parameter is treated alike."""
    base, *wrappers = name.split("+")
    OPTIMIZERS.lookup(base)
    for w in wrappers:
        if w not in WRAPPERS:
            raise LictrainError(f"unknown optimizer wrapper '{w}' in '{name}'; valid wrappers: {', '.join(WRAPPERS)}")
    options = dict(options or {})
    wrapper_options = {w: options.pop(w, {}) for w in wrappers}
    spec = OPTIMIZERS[base]
    kwargs = {**spec.defaults, **options}
    accepted = set(inspect.signature(spec.cls).parameters) - {"params", "self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise LictrainError(
            f"optimizer '{base}' has no option {', '.join(unknown)}; valid options: {', '.join(sorted(accepted - {'lr'}))}"
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}  # YAML lists -> betas tuples
    params = _groups(list(params), kernels, float(kwargs.get("weight_decay", 0.0) or 0.0), spec.kernel_groups)
    try:
        opt = spec.cls(params, lr=lr, **kwargs)
    except (ValueError, TypeError) as e:  # torch's own checks of option values (betas, eps, ...)
        raise LictrainError(f"optimizer '{base}': {str(e).splitlines()[0]}") from None
    for w in wrappers:
        accepted = set(inspect.signature(WRAPPERS[w]).parameters) - {"base", "self"}
        unknown = sorted(set(wrapper_options[w]) - accepted)
        if unknown:
            raise LictrainError(f"optimizer wrapper '{w}' has no option {', '.join(unknown)}; "
                                f"valid options: {', '.join(sorted(accepted))}")
        opt = WRAPPERS[w](opt, **wrapper_options[w])
    return opt
