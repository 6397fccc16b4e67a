"""Fast kernels for the online activation side and a real low-bit (W8A8) inference path.

* :mod:`.act_quant`: one Triton kernel per token ``x -> vec(P_l^T X P_r) * mask[type]`` then per-token
  symmetric fake quantization (or int8 codes + scales); the eager torch reference of the same math is
  the fallback on CPU. :class:`~.act_quant.KronActQuant` holds prepared operands for repeated calls;
  :func:`~.act_quant.fuse_input_quantizers` swaps the kernel into a model's input pipelines.
* :mod:`.hadamard`: the normalized Walsh-Hadamard transform of power-of-two widths on tensor cores.
* :mod:`.int8`: ``Int8Linear`` (int8 per-token activations x int8 per-channel weights, int32
  accumulation, rescale), with the online transform applied before activation quantization.

Everything here imports without Triton or CUDA: ``backend="auto"`` then picks the eager path.
"""
from .act_quant import (FusedInputQuantizer, KronActQuant, act_quant_eager, act_quant_int8, fuse_input_quantizers,
                        fused_act_quant, kron_spec, triton_available)
from .hadamard import hadamard_transform
from .int8 import Int8Linear, int_mm, quantize_rows_int8

__all__ = ["fused_act_quant", "act_quant_eager", "act_quant_int8", "KronActQuant", "FusedInputQuantizer",
           "fuse_input_quantizers", "kron_spec", "triton_available", "hadamard_transform", "Int8Linear", "int_mm",
           "quantize_rows_int8"]
