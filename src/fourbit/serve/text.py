"""Token ids to streamed text: incremental detokenization and stop strings.

Note: Incremental detokenization. A byte-level BPE token may hold part of a UTF-8 character
(an emoji is often three or four tokens), so decoding each token alone yields U+FFFD. We decode
a short window of recent tokens and hand out only what it adds once it no longer ends in a
broken character: the method of text-generation-inference's `decode_token` and vLLM's
detokenizer. Each step costs a decode of a few tokens, not of the whole answer, and the pieces
handed out concatenate to the decode of all tokens at once (tested on emoji and CJK).

Stop strings are matched on the decoded text, not on tokens (a stop string may span tokens, or
sit inside one). Text that could still become the start of a stop string is held back until
the next token settles it, so a stop string is never sent, not even its first half.
"""

from __future__ import annotations

_BROKEN = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class TextDecoder:
    """Decodes one request's tokens as they come; `push` and `finish` return text safe to send."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # first token of the context window (decoded again for the spacing it gives)
        self._read = 0  # tokens before this index are in self.text
        self._stop = [s for s in stop if s]
        self._longest_stop = max(map(len, self._stop), default=0)
        self.text = ""  # everything decoded so far, cut before the stop string when one appeared
        self._sent = 0  # characters of self.text handed out
        self.stopped = False  # a stop string appeared: the request is over

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one generated token; the newly settled text (often "", never a partial character)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(_BROKEN):
            self._grow(after[len(before):])
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The request ended: whatever is still held back (a trailing partial character stays U+FFFD)."""
        if not self.stopped and self._read < len(self._ids):
            before = self._decode(self._ids[self._prefix:self._read])
            self._grow(self._decode(self._ids[self._prefix:])[len(before):])
            self._read = len(self._ids)
        return self._release(final=True)

    def _grow(self, piece: str) -> None:
        start = max(0, len(self.text) - self._longest_stop + 1)  # a stop string may straddle the seam
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        out = self.text[self._sent:end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for n in range(min(self._longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0
