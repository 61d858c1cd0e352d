"""Loading a GGUF file: through transformers' own reader, which dequantizes the whole file to the
compute dtype first; the linear layers are quantized to 4-bit afterwards (so peak memory is the
16-bit model, unlike the streaming safetensors loader)."""

from __future__ import annotations

from pathlib import Path

import torch

from fourbit.errors import UserError
from fourbit.models.source import check_finite, first_non_finite
from fourbit.nn import quantize_linears


def gguf_tokenizer_and_config(path: Path):
    """(tokenizer, transformers config) of a .gguf file, without its weights."""
    from transformers import AutoConfig, AutoTokenizer

    from fourbit.files import check_gguf

    check_gguf(path)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name), config
    except (ValueError, KeyError, NotImplementedError) as e:
        raise UserError(f"{path}: transformers cannot load this GGUF file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def load_gguf(path: Path, quant: str | None, double_quant: bool, compute_dtype: torch.dtype, device: torch.device,
              blocksize: int = 64, load_tokenizer: bool = True):
    """(model, tokenizer or None, number of linear layers quantized) from a .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fourbit.files import check_gguf

    check_gguf(path)  # a truncated or non-GGUF file: one line naming it, not "cannot reshape array"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=compute_dtype)
    except (ValueError, KeyError, NotImplementedError) as e:  # an architecture transformers cannot read from GGUF
        raise UserError(f"{path}: transformers cannot load this GGUF file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.requires_grad_(False)
    bad = first_non_finite(model)
    if bad is not None:
        check_finite(bad, dict(list(model.named_parameters()) + list(model.named_buffers()))[bad], path)
    quantized = 0
    if quant is not None:
        quantized = quantize_linears(model, quant, double_quant, compute_dtype, blocksize, device)
    model.to(device)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if load_tokenizer else None
    return model, tok, quantized
