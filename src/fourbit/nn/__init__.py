"""Frozen 4-bit linears, LoRA adapters, and putting them into a transformers model."""

from fourbit.nn.adapters import load_adapter, read_adapter_config, save_adapter
from fourbit.nn.inject import (LoraConfig, add_lora, dequantize_linears, find_linear_names, linear4bit_shells,
                               lora_modules, merge_lora, output_embedding_names, prepare_for_training, quantize_linears,
                               set_module, trainable_summary)
from fourbit.nn.linear4bit import Linear4bit, default_compute_dtype, dequantize_hook
from fourbit.nn.lora import LoraLinear

__all__ = [
    "Linear4bit", "LoraLinear", "LoraConfig", "add_lora", "find_linear_names", "lora_modules", "merge_lora",
    "prepare_for_training", "trainable_summary", "save_adapter", "load_adapter", "read_adapter_config",
    "default_compute_dtype", "dequantize_hook", "linear4bit_shells", "dequantize_linears", "set_module",
    "output_embedding_names", "quantize_linears",
]
