"""Fast kernels for the online activation side and a real low-bit (W8A8) inference path.

* :mod:`.act_quant`: one Triton kernel per token ``x -> vec(P_l^T X P_r) * mask[type]`` then per-token
  symmetric fake quantization (or int8 codes + scales); the eager torch reference of the same math is
  the fallback on CPU. :class:`~.act_quant.KronActQuant` holds prepared operands for repeated calls;
  :func:`~.act_quant.fuse_input_quantizers` swaps the kernel into a model's input pipelines
  (:func:`~.act_quant.input_quantizers_fused` for a ``with`` block: ``eval.kernels``);
  :func:`~.act_quant.fused_row_quant` is the per-token quantizer alone, for inputs without a transform.
* :mod:`.hadamard`: the normalized Walsh-Hadamard transform of power-of-two widths on tensor cores.
* :mod:`.int8`: ``Int8Linear`` (int8 per-token activations x int8 per-channel weights, int32
  accumulation, rescale), with the online transform applied before activation quantization.

Everything here imports without Triton or CUDA: ``backend="auto"`` then picks the eager path.
"""
from .act_quant import (FusedInputQuantizer, KronActQuant, act_quant_eager, act_quant_int8, fuse_input_quantizers,
                        fused_act_quant, fused_row_quant, input_quantizers_fused, kron_spec, triton_available)
from .hadamard import hadamard_transform
from .int8 import Int8Linear, int_mm, quantize_rows_int8

__all__ = ["fused_act_quant", "act_quant_eager", "act_quant_int8", "KronActQuant", "FusedInputQuantizer",
           "fuse_input_quantizers", "input_quantizers_fused", "fused_row_quant", "kron_spec", "triton_available",
           "hadamard_transform", "Int8Linear", "int_mm", "quantize_rows_int8"]
