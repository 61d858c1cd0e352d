"""Examples -> token ids and labels, with the loss on responses only (QLoRA §5).

An example becomes a list of segments (text, trained?). Prompt segments get label -100; response
segments keep their token ids as labels, so the loss covers every assistant turn of a multi-turn
conversation and nothing else (`train_on_inputs=True` trains on everything). Chat examples are
rendered with the tokenizer's own chat template; their assistant segment runs to the end-of-turn
token, which the model thereby learns to emit. Other formats get EOS appended to every response.

Length limits (SPEC §8's source/target max lengths): a single-turn example keeps the last
`source_max_len` prompt tokens and the first `target_max_len` response tokens; a multi-turn one is
cut from the right at source_max_len + target_max_len. Every cut is counted in the DataReport, and
an example left with no response token is dropped and counted, never used silently.
Plain text is split into chunks of source_max_len + target_max_len tokens, all trained.
"""

from __future__ import annotations

from fourbit.data.formats import DataReport, Example

IGNORE = -100


def chat_segments(turns: list[tuple[str, str]], tokenizer) -> list[tuple[str, bool]]:
    """Render a conversation with the chat template, split into (text, is_assistant) spans."""
    msgs = [{"role": r, "content": t} for r, t in turns]
    segs, done = [], ""
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        after = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise ValueError("the chat template does not render conversations incrementally; "
                             "cannot tell assistant tokens from prompt tokens")
        segs += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    return segs


def _segments(ex: Example, tokenizer) -> list[tuple[list[int], bool]]:
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if ex.chat:
        return [(enc(t), trained) for t, trained in chat_segments(ex.turns, tokenizer) if t]
    out = []
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("x")["input_ids"][:1] == [bos]:  # the tokenizer adds BOS itself
        out.append(([bos], False))
    for role, text in ex.turns:
        if role == "assistant":
            out.append((enc(text) + [tokenizer.eos_token_id], True))
        else:
            out.append((enc(text), role == "text"))
    return out


def _truncate(segs: list[tuple[list[int], bool]], src_max: int, tgt_max: int) -> tuple[list, bool]:
    """Apply the length limits; returns (segments, whether anything was cut)."""
    trained = [i for i, (_, t) in enumerate(segs) if t]
    if trained == [len(segs) - 1]:  # one prompt, one response: cut each to its own limit
        prompt = [t for s, _ in segs[:-1] for t in s]
        resp = segs[-1][0]
        cut = len(prompt) > src_max or len(resp) > tgt_max
        return [(prompt[max(0, len(prompt) - src_max):], False), (resp[:tgt_max], True)], cut
    room, out = src_max + tgt_max, []  # multi-turn: keep the first src_max + tgt_max tokens
    for ids, t in segs:
        out.append((ids[:room], t))
        room -= len(ids)
        if room < 0:
            return out, True
    return out, False


def tokenize_examples(examples: list[Example], tokenizer, source_max_len: int = 512, target_max_len: int = 512,
                      train_on_inputs: bool = False, report: DataReport | None = None) -> tuple[list[dict], dict]:
    """[{input_ids, labels}] for the examples that keep at least one trained token; and counts."""
    report = report if report is not None else DataReport()
    out, truncated, dropped = [], 0, 0
    for ex in examples:
        segs = _segments(ex, tokenizer)
        if ex.turns and ex.turns[0][0] == "text":  # continued pretraining: chunk, do not cut
            ids = [t for s, _ in segs for t in s]
            n = source_max_len + target_max_len
            out += [{"input_ids": ids[i:i + n], "labels": list(ids[i:i + n])} for i in range(0, len(ids), n)
                    if len(ids[i:i + n]) > 1]
            continue
        segs, cut = _truncate(segs, source_max_len, target_max_len)
        ids = [t for s, _ in segs for t in s]
        labels = [t if (trained or train_on_inputs) else IGNORE for s, trained in segs for t in s]
        truncated += cut
        if not any(lab != IGNORE for lab in labels[1:]):
            dropped += 1
            continue
        out.append({"input_ids": ids, "labels": labels})
    report.truncated += truncated
    report.dropped_truncated += dropped
    return out, {"examples": len(out), "truncated": truncated, "dropped": dropped,
                 "tokens": sum(len(e["input_ids"]) for e in out)}
