"""fourbit.eval.general: the general-ability check the demo prints beside its task score, and the
base model's answers it measures once and keeps for replay."""

import json
import math

import pytest
import torch

import fourbit.eval.general as G
from conftest import requires_smollm2, tiny_model
from fourbit.eval.general import (ANSWER_TOKENS, GENERAL_QUESTIONS, GENERAL_TEXT, REPLAY_TEMPERATURE, base_answers,
                                  general_perplexity)
from fourbit.generate import generate_batch

pytestmark = requires_smollm2


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def model(tok):
    """A tiny random Llama on SmolLM2's tokenizer, with context for the whole general text."""
    return tiny_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)


def test_the_general_text_is_a_short_slice_of_prose(tok):
    text = GENERAL_TEXT.read_text(encoding="utf-8")
    assert 1000 <= len(tok(text)["input_ids"]) <= 2000 and text.isascii() and text.count("\n\n") >= 5


def test_general_perplexity_is_transformers_own_loss(model, tok):
    """One window over the whole text: exp of the mean next-token loss transformers computes itself."""
    ids = tok(GENERAL_TEXT.read_text(encoding="utf-8"), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = math.exp(float(model.double()(input_ids=ids, labels=ids).loss))  # float64 reference
    model.float()
    assert general_perplexity(model, tok) == pytest.approx(ref, rel=1e-4)  # fp32 vs fp64 over ~1,060 tokens


def test_base_answers_are_measured_once_and_kept(model, tok, tmp_path, monkeypatch):
    path, prompts = tmp_path / "base_answers.json", ["Why is grass green?", "Say hello."]
    state = torch.random.get_rng_state()
    answers, check = base_answers(model, tok, prompts, path)
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's own random stream is left alone
    torch.manual_seed(0)  # sampled as `fourbit chat --temperature` would, from seed 0
    direct = generate_batch(model, tok, prompts, max_new_tokens=ANSWER_TOKENS, temperature=REPLAY_TEMPERATURE)
    assert answers == [a.strip() for a in direct]
    greedy = generate_batch(model, tok, list(GENERAL_QUESTIONS), max_new_tokens=ANSWER_TOKENS)
    assert list(check.answers.values()) == [a.strip() for a in greedy]  # the check itself is greedy
    assert check.perplexity == general_perplexity(model, tok)
    saved = json.loads(path.read_text())
    assert saved["prompts"] == prompts and saved["answers"] == answers and not list(tmp_path.glob("*.tmp"))

    def fail(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(G, "answer", fail)  # a resumed run's model is no longer the base: read, never measure
    monkeypatch.setattr(G, "general_perplexity", fail)
    assert base_answers(model, tok, prompts, path) == (answers, check)
    with pytest.raises(AssertionError, match="measured again"):  # the file holds other prompts: measured anew
        base_answers(model, tok, ["Another question?"], path)
    with pytest.raises(AssertionError, match="measured again"):  # or another seed (--seed)
        base_answers(model, tok, prompts, path, seed=1)
    monkeypatch.undo()
    base_answers(model, tok, prompts, tmp_path / "other.json", save=False)  # torchrun's other ranks
    assert not (tmp_path / "other.json").exists()
