"""fourbit.serve.text: streamed pieces against the tokenizer's own decode of all tokens at once.

Oracle: `tokenizer.decode(all ids)` of SmolLM2's byte-level BPE (emoji and CJK split across
tokens), and plain `str.find` for stop strings."""

from __future__ import annotations

import pytest

from conftest import requires_smollm2

from fourbit.serve.text import TextDecoder

TEXTS = [
    "Hello, world! Plain ASCII with  two spaces.",
    "Emoji split over byte tokens: 👩‍🔬🧪🎉 and flags 🇫🇷🇯🇵.",
    "CJK: 四位量化の微調整。한국어 텍스트. Ελληνικά. 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "Lines\nwith\ttabs and trailing spaces   \n\n",
]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _stream(tok, text: str, stop=()) -> tuple[list[str], TextDecoder]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    dec = TextDecoder(tok, stop)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.finish())
    return [p for p in pieces if p], dec


@requires_smollm2
@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_the_full_decode_and_never_hold_a_broken_character(tok, text):
    pieces, _ = _stream(tok, text)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) == text
    assert not any("\ufffd" in p for p in pieces)
    if any(ord(c) > 0xFFFF for c in text):  # the split characters really were split across tokens
        singles = [tok.decode([i]) for i in ids]
        assert any("\ufffd" in s for s in singles)


@requires_smollm2
@pytest.mark.parametrize("stop", ["world", "o, w", "🧪", "。한", "\n\n"])
def test_stop_string_cuts_the_text_and_is_never_sent(tok, stop):
    text = next(t for t in TEXTS if stop in t)
    pieces, dec = _stream(tok, text + " tail after the stop", stop=[stop, "never-there"])
    assert "".join(pieces) == text[:text.find(stop)]
    assert dec.stopped
    assert not any(stop in p for p in pieces)
    sent = ""
    for p in pieces:  # no prefix of the stop string was sent ahead of it either
        sent += p
    assert sent == text[:text.find(stop)]


@requires_smollm2
def test_held_back_prefix_is_released_when_no_stop_follows(tok):
    pieces, dec = _stream(tok, "answer: wor", stop=["world"])  # ends in a prefix of the stop string
    assert "".join(pieces) == "answer: wor" and not dec.stopped
    assert pieces[-1].endswith("wor")  # released only by finish()


@requires_smollm2
def test_push_after_stop_adds_nothing(tok):
    dec = TextDecoder(tok, ["b"])
    out = [dec.push(i) for i in tok("a b c d", add_special_tokens=False)["input_ids"]]
    assert "".join(out) + dec.finish() == "a " and dec.text == "a "
