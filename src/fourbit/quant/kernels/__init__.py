"""Fast paths for the 4-bit codec: a small C kernel for CPUs and Triton kernels for CUDA.

Every kernel here has a pure-torch reference in `fourbit.quant.blockwise` that it must match
(bit for bit for (de)quantization); `fourbit.quant.blockwise` dispatches to them and falls back
to the reference when a kernel is unavailable.
"""
