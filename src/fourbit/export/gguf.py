"""Writing a merged Llama-architecture model as a GGUF file (f16 or q8_0) for llama.cpp-style runtimes.

With the `gguf` package's writer: llama.cpp's metadata keys, the byte-level BPE tokenizer
(`tokenizer.ggml.model = gpt2`), and the tensors under llama.cpp's names with q/k rows permuted
to its rotary layout (see Note: Rotary layout in GGUF). Other architectures and tokenizers are
refused rather than written half right. fourbit.export.merge reads the file back and measures it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fourbit.errors import UserError

GGUF_TYPES = ("f16", "q8_0")


# Note: Rotary layout in GGUF
# transformers' Llama rotates each head's dims in two halves (dim i pairs with dim i + D/2,
# `rotate_half`); llama.cpp's Llama rope pairs neighbours (dim 2i with 2i + 1). llama.cpp's HF
# converter therefore reorders the output rows of W_q and W_k within each head so that pair
# (i, i + D/2) lands on rows (2i, 2i + 1); q.k is unchanged because both sides move alike.
# transformers' GGUF loader applies the inverse, so a round trip gives back the same model. With
# grouped-query attention W_k has n_kv_heads heads, so it is reordered per KV head.
def rotary_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection (n_heads * D, ...) from half-split to interleaved pairs."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (H, 2, D/2) -> (H, D/2, 2)


def _rope(config) -> tuple[float, str]:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), kind


def check_gguf_supported(config) -> None:
    """UserError unless fourbit can write this model as a GGUF llama.cpp and transformers read back."""
    arch = getattr(config, "model_type", "?")
    if arch != "llama":
        raise UserError(f"--gguf writes Llama-architecture models only (llama.cpp's 'llama' layout, e.g. SmolLM2, "
                        f"Llama 2); this model is {arch!r}. Merge without --gguf, or convert the merged directory "
                        f"with llama.cpp's convert_hf_to_gguf.py")
    problems = []
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("it has attention/MLP biases")
    _, kind = _rope(config)
    if kind != "default":
        problems.append(f"its RoPE is scaled ({kind!r})")
    if problems:
        raise UserError(f"--gguf cannot export this Llama model: {'; '.join(problems)}. Merge without --gguf, or "
                        f"convert the merged directory with llama.cpp's convert_hf_to_gguf.py")


def write_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, gguf_type: str = "f16") -> list[str]:
    """Write a (merged, unquantized) Llama model + its tokenizer as a GGUF file; returns warnings.

    `gguf_type` "f16": 2-D weights in float16; "q8_0": in llama.cpp's Q8_0 (blocks of 32 int8 with an
    fp16 scale), falling back to f16 for rows not a multiple of 32. Norm weights stay float32, as
    llama.cpp's converter writes them. Tensors are converted and written one at a time.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise UserError(f"gguf type must be one of {GGUF_TYPES}, got {gguf_type!r}")
    config = model.config
    check_gguf_supported(config)
    path = Path(path)
    warnings: list[str] = []
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _add_llama_metadata(writer, config, gguf_type, path)
        warnings += _add_tokenizer(writer, tokenizer, config)
        plan = _tensor_plan(model, gguf_type, warnings)
        for name, _, shape, qtype in plan:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        from tqdm.auto import tqdm

        state = model.state_dict()
        for name, key, _, qtype in tqdm(plan, desc=f"writing gguf {gguf_type}", unit="tensor", leave=False,
                                        disable=len(plan) < 50):
            writer.write_tensor_data(_gguf_array(name, state[key], qtype, config).view(np.uint8))
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    return warnings


def _add_llama_metadata(writer, config, gguf_type: str, path: Path) -> None:
    import gguf

    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    theta, _ = _rope(config)
    writer.add_name(Path(str(getattr(config, "_name_or_path", "") or path.parent.name)).name or path.stem)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:  # llama.cpp assumes hidden / heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)


def _tensor_plan(model: nn.Module, gguf_type: str, warnings: list[str]) -> list[tuple]:
    """(gguf name, state_dict key, shape, GGML type) for every tensor, in state_dict order."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan, fallback = [], []
    for key, t in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reads the output projection from token_embd when `output` is absent
        if not t.is_floating_point():
            raise UserError(f"tensor {key} is {t.dtype}; --gguf needs an unquantized (16/32-bit) merged model")
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"tensor {key} has no llama.cpp name; is this a standard Llama checkpoint?")
        qtype = gguf.GGMLQuantizationType.F32 if t.dim() == 1 else gguf.GGMLQuantizationType.F16
        if t.dim() == 2 and gguf_type == "q8_0":
            if t.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
                qtype = gguf.GGMLQuantizationType.Q8_0
            else:
                fallback.append(name)
        plan.append((name, key, tuple(t.shape), qtype))
    if fallback:
        warnings.append(f"{len(fallback)} tensor(s) have rows that are not a multiple of 32 and were written as f16 "
                        f"instead of q8_0, e.g. {fallback[0]}")
    return plan


def _gguf_array(name: str, t: torch.Tensor, qtype, config) -> np.ndarray:
    import gguf

    w = t.detach().to("cpu", torch.float32)
    heads = config.num_attention_heads
    if name.endswith("attn_q.weight"):
        w = rotary_to_interleaved(w, heads)
    elif name.endswith("attn_k.weight"):
        w = rotary_to_interleaved(w, getattr(config, "num_key_value_heads", None) or heads)
    a = w.contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        big = float(np.abs(a).max(initial=0.0))
        if big > float(np.finfo(np.float16).max):
            raise UserError(f"tensor {name} holds a value of magnitude {big:.3g}, beyond float16's range "
                            f"(65504); write --gguf q8_0 instead")
    return gguf.quants.quantize(a, qtype)


def _add_tokenizer(writer, tok, config) -> list[str]:
    """tokenizer.ggml.* for a byte-level BPE tokenizer; returns warnings."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"--gguf needs a fast (tokenizers) tokenizer; got {type(tok).__name__}")
    spec = json.loads(backend.to_str())
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise UserError(f"--gguf writes byte-level BPE tokenizers (llama.cpp's 'gpt2' tokenizer model, as in GPT-2, "
                        f"SmolLM, Llama 3); this one is a {bpe.get('type')} model"
                        f"{' with byte fallback (sentencepiece style)' if bpe.get('byte_fallback') else ''}. "
                        f"Merge without --gguf and convert with llama.cpp's convert_hf_to_gguf.py")
    warnings = []
    tokens, types = _vocab_table(tok, spec, config.vocab_size)
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        pre = "default"
        warnings.append("the tokenizer's pre-tokenizer is not one fourbit recognises (GPT-2's byte-level regex, or "
                        "SmolLM's digit split + byte-level); wrote tokenizer.ggml.pre = 'default', with which "
                        "llama.cpp may split text differently than transformers")
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{kind}_token_id", None)
        if tid is None and kind != "unk":
            tid = getattr(config, f"{kind}_token_id", None)
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if tid is not None:
            getattr(writer, f"add_{kind}_token_id")(int(tid))
    add_bos, add_eos = _adds_special_tokens(tok)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = getattr(tok, "chat_template", None)
    if template:
        writer.add_chat_template(template)
    return warnings


def _vocab_table(tok, spec: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0..vocab_size-1 (ids no token uses: [PADn], UNUSED)."""
    import gguf

    by_id = {i: t for t, i in tok.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}; "
                        f"is this the tokenizer the model was trained with?")
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for the pre-tokenizers we can recognise exactly, else None."""
    def byte_level(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if not pre:
        return None
    if byte_level(pre):
        return "gpt-2"  # GPT-2's split regex, then bytes to the byte alphabet
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and byte_level(steps[1])):
        return "smollm"  # every digit alone, then GPT-2's regex
    return None


def _adds_special_tokens(tok) -> tuple[bool, bool]:
    """Whether encoding text puts BOS in front / EOS at the end, observed rather than read from config."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    add_bos = len(full) > len(plain) and bos is not None and full[0] == bos
    add_eos = len(full) > len(plain) and eos is not None and full[-1] == eos
    return add_bos, add_eos
