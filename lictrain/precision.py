"""Numeric precision of training: autocast (bf16 / fp16), the entropy models kept in fp32, TF32, torch.compile.

Mixed precision runs the analysis/synthesis transforms and the hyperprior networks in bf16 or fp16 under
`torch.autocast`; the parameters, their gradients and every optimizer state (SOAP's factors and eigenbases included)
stay fp32. The entropy models (CompressAI's EntropyBottleneck, GaussianConditional and their subclasses) run with
autocast off on fp32 inputs: likelihoods of order 1e-9 and the rate's log of them are outside bf16's useful range and
below fp16's smallest normal number, and a rate computed from rounded likelihoods would bias R against D. The latent
itself is still the output of a low-precision convolution (bf16 keeps 8 significant bits: |y| near 50 is resolved
to 0.25), which is what mixed-precision training of these models means; validation and evaluation run in fp32.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from compressai.entropy_models import EntropyModel

from .errors import LictrainError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

_FP32_CLASSES: dict[type, type] = {}


def _to_fp32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _fp32_class(cls: type) -> type:
    """A subclass of an entropy model whose forward runs outside autocast on fp32 inputs (one per class, so
    deepcopy (EMA), state_dict and isinstance behave as for the original)."""
    if cls not in _FP32_CLASSES:
        def forward(self, *args, **kwargs):
            device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
            with torch.autocast(device_type=device_type, enabled=False):
                return super(sub, self).forward(*map(_to_fp32, args), **{k: _to_fp32(v) for k, v in kwargs.items()})

        sub = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                           "__doc__": f"{cls.__name__}, evaluated in fp32 under autocast."})
        _FP32_CLASSES[cls] = sub
    return _FP32_CLASSES[cls]


def keep_entropy_models_fp32(model: nn.Module) -> int:
    """Make every entropy model inside `model` compute in fp32 under autocast; returns how many were changed."""
    n = 0
    for m in model.modules():
        if isinstance(m, EntropyModel) and type(m) not in _FP32_CLASSES.values():
            m.__class__ = _fp32_class(type(m))
            n += 1
    return n


def autocast(device: torch.device, precision: str):
    """The forward pass's context for train.precision (a no-op context for fp32)."""
    if precision not in PRECISIONS:
        raise LictrainError(f"train.precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str):
    """fp16 needs loss scaling (gradients below 6e-8 flush to zero); bf16 has fp32's exponent range and does not."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def configure_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 tensor cores for fp32 convolutions and matrix products on CUDA (Ampere and later): ~10 significant bits
    inside the products, fp32 accumulation. SOAP computes its factors and eigenbases with TF32 off regardless
    (optim/common.py: full_fp32_matmul)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


def compile_model(model: nn.Module, setting: bool | str):
    """train.compile: false, true (torch.compile's default backend, inductor) or a backend name ('aot_eager', ...).
    Returns the module the training step calls; the model itself (EMA, checkpoints, methods) stays uncompiled."""
    if setting is False or setting in ("false", "off", "none"):
        return model
    backend = "inductor" if setting is True else str(setting)
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise LictrainError(f"train.compile: unknown backend '{backend}'; use true, false or one of "
                            f"{', '.join(sorted(torch._dynamo.list_backends()))}")
    return torch.compile(model, backend=backend)
