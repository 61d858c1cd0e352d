"""The 4-bit quantization core: code books, blockwise NF4/FP4 + double quantization, QuantState.

Pure functions over tensors; imports nothing from the rest of fourbit. Bit-compatible with
bitsandbytes (tests/test_quant_*.py use it as the oracle).
"""

from fourbit.quant.blockwise import (
    bits_per_parameter,
    dequantize_4bit,
    dequantize_absmax,
    dequantize_blockwise_8bit,
    quantize_4bit,
    quantize_blockwise_8bit,
    quantized_nbytes,
    triton_kernels,
)
from fourbit.quant.codebook import (DTYPES, QUANT_TYPES, dynamic_map, fp4_values, get_code, get_dynamic_map,
                                    nf4_values, zero_code)
from fourbit.quant.matmul import SKINNY_MAX_ROWS, batch_invariant_linear, matmul_4bit, matmul_4bit_reference
from fourbit.quant.state import NestedState, QuantState, QuantStateError

__all__ = [
    "quantize_4bit", "dequantize_4bit", "quantize_blockwise_8bit", "dequantize_blockwise_8bit",
    "matmul_4bit", "matmul_4bit_reference", "batch_invariant_linear", "SKINNY_MAX_ROWS", "bits_per_parameter",
    "quantized_nbytes",
    "QuantState", "NestedState", "QuantStateError",
    "nf4_values", "fp4_values", "dynamic_map", "get_code", "get_dynamic_map", "zero_code", "dequantize_absmax",
    "triton_kernels", "QUANT_TYPES", "DTYPES",
]
