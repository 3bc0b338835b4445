"""Numeric settings of training: autocast (bf16 / fp16), loss scaling, TF32 and determinism flags, torch.compile.

Mixed precision runs the analysis/synthesis transforms and the hyperprior networks in bf16 or fp16 under
`torch.autocast`; the parameters, their gradients and every optimizer state (SOAP's factors and eigenbases included)
stay fp32, and so do the entropy models (lictrain/models/numerics.py). Validation and evaluation run in fp32.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn as nn

from .errors import LictrainError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The forward pass's context for train.precision (a no-op context for fp32)."""
    if precision not in PRECISIONS:
        raise LictrainError(f"train.precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def training_forward(device: torch.device, precision: str, deterministic: bool) -> contextlib.ExitStack:
    """The training forward pass's context: autocast, and under train.deterministic on CUDA attention by its plain
    (math) kernel, whose backward is matrix products, instead of the fused kernels, whose backward accumulates
    across thread blocks in no fixed order."""
    stack = contextlib.ExitStack()
    stack.enter_context(autocast(device, precision))
    if deterministic and device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def grad_scaler(device: torch.device, precision: str):
    """fp16 needs loss scaling (gradients below 6e-8 flush to zero); bf16 has fp32's exponent range and does not.
    torch's defaults (initial scale 2^16, halved on an overflow, doubled after 2000 clean steps): at high lambda the
    first steps overflow until the scale has come down (the last synthesis bias's gradient is ~lambda 255^2 2
    mean(x_hat - x), 704 at lambda 0.0483 on mbt2018-mean at initialisation); the trainer counts those back-offs apart
    from non-finite steps (trainer.py)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


# ---- process-global numeric flags -------------------------------------------------------------------------------
# PyTorch 2.9 added per-backend fp32 precision settings ("ieee" | "tf32" | "none"; oneDNN also "bf16") beside the
# legacy allow_tf32 booleans; once the new API has set a flag, reading the legacy one raises ("mix of the legacy and
# new APIs"), and toggling a legacy flag after torch.set_float32_matmul_precision("medium") leaves the process in a
# state where get_float32_matmul_precision() raises. So lictrain sets flags through the new API only, saves what it
# found and restores exactly that (which leaves every later read, legacy or new, as the caller had it).
_NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _matmul_slots() -> list[tuple[object, str]]:
    b = torch.backends
    if _NEW_API:  # cuBLAS and the CPU's oneDNN ("medium" makes the latter bf16)
        return [(b.cuda.matmul, "fp32_precision"), (b.mkldnn.matmul, "fp32_precision")]
    return [(b.cuda.matmul, "allow_tf32")]


def _conv_slots() -> list[tuple[object, str]]:
    b = torch.backends
    if _NEW_API:  # conv and RNN together: with differing values the legacy cudnn.allow_tf32 cannot be read
        return [(b.cudnn.conv, "fp32_precision"), (b.cudnn.rnn, "fp32_precision")]
    return [(b.cudnn, "allow_tf32")]


def _precision_value(tf32: bool):
    return ("tf32" if tf32 else "ieee") if _NEW_API else tf32


@contextlib.contextmanager
def flags_set(assignments: list[tuple[object, str, object]]):
    """Set (object, attribute, value) flags for the block and put back exactly what was there."""
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in assignments]
    try:
        for obj, attr, value in assignments:
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def full_fp32_matmul():
    """Matrix products in full fp32 inside this block (no TF32 on CUDA, no bf16 in oneDNN on the CPU), whatever
    the caller set and through whichever API: eigenbases and Kronecker factors computed with 10-bit products drift
    from the exact ones."""
    return flags_set([(obj, attr, _precision_value(False)) for obj, attr in _matmul_slots()])


def full_fp32():
    """Matrix products and convolutions in full fp32 inside this block, on CUDA (cuBLAS, cuDNN) and on the CPU
    (oneDNN), whatever the caller set (entropy coding: coding.py)."""
    b = torch.backends
    slots = _matmul_slots() + _conv_slots()
    if _NEW_API:
        slots += [(b.mkldnn.conv, "fp32_precision"), (b.mkldnn.rnn, "fp32_precision")]
    return flags_set([(obj, attr, _precision_value(False)) for obj, attr in slots])


def numeric_flags(device: torch.device, tf32: bool, deterministic: bool, warn_only: bool = False
                  ) -> contextlib.ExitStack:
    """The run's process-global settings, entered now; close() restores what was there before.

    tf32 (CUDA, Ampere and later): TF32 tensor cores for fp32 convolutions and matrix products, ~10 significant bits
    inside the products, fp32 accumulation (SOAP's own products stay full fp32: full_fp32_matmul). deterministic:
    torch's deterministic algorithms (an op without one raises; with warn_only it warns), cuDNN's deterministic
    algorithms without autotuning, and cuBLAS's fixed workspace (CUBLAS_WORKSPACE_CONFIG, which cuBLAS reads when it
    starts: set here if unset, so it takes effect when lictrain is the first to use CUDA). Otherwise, on CUDA, cuDNN
    autotunes its convolution algorithms per input shape (the training crops have one shape)."""
    stack = contextlib.ExitStack()
    b = torch.backends
    if device.type == "cuda":
        flags = [(obj, attr, _precision_value(tf32)) for obj, attr in _matmul_slots()[:1] + _conv_slots()]
        flags.append((b.cudnn, "benchmark", not deterministic))
        stack.enter_context(flags_set(flags))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        stack.enter_context(flags_set([(b.cudnn, "deterministic", True), (b.cudnn, "benchmark", False)]))
        was = torch.are_deterministic_algorithms_enabled()
        was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        stack.callback(torch.use_deterministic_algorithms, was, warn_only=was_warn_only)
    return stack


def compile_model(model: nn.Module, setting: bool | str, eager_random: bool = False):
    """train.compile: false, true (torch.compile's default backend, inductor) or a backend name ('aot_eager', ...).
    Returns the module the training step calls; the model itself (EMA, checkpoints, methods) stays uncompiled.

    eager_random: Inductor draws random numbers with its own generator, so a compiled forward's quantization noise
    differs from the eager model's for the same RNG state; methods that re-evaluate a step's batch with the step's
    noise (Balanced R-D) need the eager draws, which Inductor's fallback_random gives (a process-wide setting)."""
    if setting is False or setting in ("false", "off", "none"):
        return model
    backend = "inductor" if setting is True else str(setting)
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise LictrainError(f"train.compile: unknown backend '{backend}'; use true, false or one of "
                            f"{', '.join(sorted(torch._dynamo.list_backends()))}")
    if eager_random:
        from torch._inductor import config as inductor_config

        inductor_config.fallback_random = True
    return torch.compile(model, backend=backend)
