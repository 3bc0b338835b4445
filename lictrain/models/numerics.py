"""Modules that training keeps in fp32 under autocast, and CompressAI's entropy bottleneck without host
synchronisation.

`prepare_entropy_models(model)` gives every entropy model inside a model (CompressAI's EntropyBottleneck,
GaussianConditional and their subclasses, a user's included), and the latent codecs that round y - means
themselves (LATENT_CODECS_ROUNDING), a subclass of its own class whose forward

- runs with autocast off on fp32 inputs. Likelihoods of order 1e-9 and the rate's log of them are outside bf16's
  useful range and below fp16's smallest normal number, and a rate computed from rounded likelihoods would bias R
  against D. Only half-precision inputs are cast: a float64 model stays float64.
- for EntropyBottleneck, computes what CompressAI's forward computes without its host synchronisations. CompressAI
  1.2.8 builds the channels-first permutation as a device tensor and unpacks it into `permute(*perm)`: one blocking
  copy and a `.item()` per dimension, three times per call, so 13 host reads per training step on every model
  (a graph break each under torch.compile). Here the permutation is a tuple of Python ints; the arithmetic, the
  noise draw and its order are CompressAI's, so outputs and likelihoods are bit-identical (tested).

`keep_in_fp32(model, classes)` does the first for other modules: under fp16, GDN's x^2 overflows once |x| >= 256
(and its channel sum sooner), so fp16 training keeps CompressAI's GDN layers in fp32.

The subclass keeps the original's name, so state dicts, `isinstance`, deepcopy (EMA) and printing behave as before;
a model holding one pickles and unpickles (whole-model `torch.save`) with the subclass restored. The latent itself is
still the output of a low-precision convolution under autocast (bf16 keeps 8 significant bits: |y| near 50 is
resolved to 0.25), which is what mixed-precision training of these models means.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from compressai.entropy_models import EntropyBottleneck, EntropyModel
from compressai.latent_codecs import CheckerboardLatentCodec, GaussianConditionalLatentCodec

_PREPARED: dict[type, type] = {}  # original class -> its prepared subclass
_HALF = (torch.float16, torch.bfloat16)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """t in fp32 if it is a half-precision tensor (autocast's output), else as it is (a float64 model stays so)."""
    return t.float() if t.dtype in _HALF else t


def _to_fp32(value):
    return at_least_fp32(value) if isinstance(value, torch.Tensor) else value


def _device_type(args, kwargs) -> str:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def bottleneck_forward(self: EntropyBottleneck, x: torch.Tensor, training: bool | None = None):
    """CompressAI 1.2.8's EntropyBottleneck.forward with the permutation as Python ints (no host reads)."""
    if training is None:
        training = self.training
    perm = (1, 0, *range(2, x.dim()))  # B x C x ... -> C x B x ...; swapping two axes is its own inverse
    values = x.permute(perm).contiguous()
    shape = values.shape
    values = values.reshape(shape[0], 1, -1)
    outputs = self.quantize(values, "noise" if training else "dequantize", self._get_medians())
    likelihood = self._likelihood(outputs)[0]
    if self.use_likelihood_bound:
        likelihood = self.likelihood_lower_bound(likelihood)
    outputs = outputs.reshape(shape).permute(perm).contiguous()
    likelihood = likelihood.reshape(shape).permute(perm).contiguous()
    return outputs, likelihood


def _restore(base: type):
    """Unpickling: a bare instance of `base`'s prepared subclass (its state is set by pickle afterwards)."""
    obj = base.__new__(base)
    obj.__class__ = prepared_class(base)
    return obj


def prepared_class(cls: type) -> type:
    """The subclass of module class `cls` that keep_in_fp32 gives its instances (one per class)."""
    if cls in _PREPARED.values():
        return cls
    if cls not in _PREPARED:
        # only a forward that is CompressAI's own is replaced: a subclass's forward is the subclass's business
        sync_free = issubclass(cls, EntropyBottleneck) and cls.forward is EntropyBottleneck.forward

        def forward(self, *args, **kwargs):
            with torch.autocast(_device_type(args, kwargs), enabled=False):
                args, kwargs = tuple(map(_to_fp32, args)), {k: _to_fp32(v) for k, v in kwargs.items()}
                if sync_free:
                    return bottleneck_forward(self, *args, **kwargs)
                return super(sub, self).forward(*args, **kwargs)

        def __reduce_ex__(self, protocol):
            # pickle finds classes by name, and this one's name is the original's: rebuild through _restore
            rv = super(sub, self).__reduce_ex__(protocol)
            return (_restore, (cls,), *rv[2:])

        sub = type(cls.__name__, (cls,), {
            "forward": forward, "__reduce_ex__": __reduce_ex__, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": f"{cls.__name__}, computed in fp32 under autocast" + (", without host synchronisation."
                                                                          if sync_free else ".")})
        _PREPARED[cls] = sub
    return _PREPARED[cls]


def keep_in_fp32(model: nn.Module, classes: tuple[type, ...]) -> int:
    """Give every module of one of `classes` inside `model` its prepared subclass (module docstring); returns how
    many changed. Idempotent."""
    n = 0
    for m in model.modules():
        if isinstance(m, classes) and type(m) not in _PREPARED.values():
            m.__class__ = prepared_class(type(m))
            n += 1
    return n


# CompressAI's latent codecs that round y - means themselves (quantize_ste(y - means) + means, the decoder's input):
# under bf16 autocast that difference would be rounded to bf16 first (spacing 0.25 for |y| >= 32), so they compute in
# fp32 too, their small entropy-parameter networks included (ELIC's and LALIC's entropy models)
LATENT_CODECS_ROUNDING = (GaussianConditionalLatentCodec, CheckerboardLatentCodec)


def prepare_entropy_models(model: nn.Module) -> int:
    """Every entropy model inside `model` (and every latent codec of LATENT_CODECS_ROUNDING) in fp32 under autocast,
    the bottlenecks without host synchronisation. Returns how many modules changed."""
    return keep_in_fp32(model, (EntropyModel,) + LATENT_CODECS_ROUNDING)
