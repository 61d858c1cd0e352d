"""Models: finding one (`source`), loading it 4-bit as it streams (`load`, `gguf`), quantizing one
from disk to disk and saving (`quantize`)."""

from fourbit.models.gguf import load_gguf
from fourbit.models.load import (QUANT_CHOICES, LoadReport, ModelArgs, checkpoint_weight_reader, load_model,
                                 load_model_and_adapter, meta_model, normalize_quant, parse_dtype, peak_rss_bytes)
from fourbit.models.quantize import (QuantizeArgs, QuantizeReport, bnb_quantization_config, bnb_skip_modules,
                                     quantize_checkpoint, save_model)
from fourbit.models.source import (TOKENIZER_FILES, checkpoint_keys, checkpoint_shards, iter_checkpoint, load_config,
                                   load_tokenizer_from, resolve_source)
from fourbit.nn import quantize_linears as quantize_model  # the name it had when models was one module

__all__ = [
    "load_model", "load_model_and_adapter", "ModelArgs", "LoadReport", "meta_model", "normalize_quant", "parse_dtype",
    "peak_rss_bytes", "QUANT_CHOICES", "load_gguf", "quantize_checkpoint", "QuantizeArgs", "QuantizeReport",
    "save_model", "bnb_quantization_config", "bnb_skip_modules", "quantize_model", "resolve_source", "load_config",
    "load_tokenizer_from", "checkpoint_shards", "checkpoint_keys", "iter_checkpoint", "TOKENIZER_FILES",
    "checkpoint_weight_reader",
]
