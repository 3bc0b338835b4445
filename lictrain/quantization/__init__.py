"""W8A8 post-training quantization: 8-bit dynamic per-channel activations (activations.py), int8 per-channel
weights by nearest rounding or AdaRound (weights.py), whole checkpoints and the ptq command's pipeline (ptq.py)."""

from ..models.quantized_activations import attach_activation_quantizers, quantize_activation
from .weights import adaround, quantize_nearest, weight_scales

__all__ = ["adaround", "attach_activation_quantizers", "quantize_activation", "quantize_nearest", "weight_scales"]
