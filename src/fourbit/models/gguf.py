"""Loading a GGUF file: through transformers' own reader, which dequantizes the whole file to the
compute dtype first; the linear layers are quantized to 4-bit afterwards (so peak memory is the
16-bit model, unlike the streaming safetensors loader)."""

from __future__ import annotations

from pathlib import Path

import torch

from fourbit.nn import quantize_linears


def load_gguf(path: Path, quant: str | None, double_quant: bool, compute_dtype: torch.dtype, device: torch.device,
              blocksize: int = 64, load_tokenizer: bool = True):
    """(model, tokenizer or None, number of linear layers quantized) from a .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=compute_dtype)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.requires_grad_(False)
    quantized = 0
    if quant is not None:
        quantized = quantize_linears(model, quant, double_quant, compute_dtype, blocksize, device)
    model.to(device)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if load_tokenizer else None
    return model, tok, quantized
