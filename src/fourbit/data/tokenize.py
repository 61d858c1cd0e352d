"""Examples -> token ids and labels, with the loss on responses only (QLoRA §5; qlora.py's DataCollatorForCausalLM).

An example becomes a list of segments (text, trained?). Prompt segments get label -100 (IGNORE);
response segments keep their token ids as labels, so the loss covers every assistant turn of a
multi-turn conversation and nothing else (`train_on_inputs=True` trains on every token).

- alpaca / io / oasst: the turns' text verbatim, BOS first when the tokenizer adds one itself,
  EOS appended to every response. Segments are tokenized separately (as QLoRA does), so a prompt
  always tokenizes the same way at training and at generation time.
- chat: rendered with the tokenizer's own chat template, incrementally: the text up to the
  generation prompt of assistant turn i is prompt, the text the template adds for that turn
  (content and end-of-turn marker, e.g. "Paris.<|im_end|>\\n") is response. System and user turns
  and any default system prompt the template inserts are masked. If a response carries no special
  token at all (a template without an end-of-turn marker) EOS is appended. A tokenizer without a
  chat template gets the OASST layout ("### Human: ...### Assistant: ...", noted in the report).
- text: BOS? + text + EOS, split into chunks of source_max_len + target_max_len tokens, all trained.

Length limits. A single-response example keeps the last `source_max_len` prompt tokens (cut from
the left, keeping BOS, so the "### Response:" / assistant header the answer follows survives)
and the first `target_max_len` response tokens. A multi-turn example keeps its first
source_max_len + target_max_len tokens. Every cut is counted and described in the DataReport; an
example left with no response token is dropped and reported, never used silently; if that
happens to every example, tokenize_examples raises a UserError naming the limits to raise.
Conversations the chat template refuses (or cannot render incrementally) are skipped and
reported like bad rows.

The model's context. Given `context_len` (the model's max_position_embeddings), no sequence is
longer: a single-response example that still does not fit keeps the end of its prompt and the
start of its response, the response getting what the prompt leaves and at least half the context;
a multi-turn example keeps its first context_len tokens; text is chunked at context_len. Each cut
is counted in DataReport.context_truncated (positions past the context would otherwise reach the
model unnoticed: garbage for RoPE models trained shorter, an index error for learned positions).
Examples left out (refused, or emptied by truncation) count against the report's
max_bad_fraction together with the rows load_examples skipped.
"""

from __future__ import annotations

from fourbit.data.example import DataReport, Example
from fourbit.errors import UserError

IGNORE = -100  # label of a token the loss skips (torch's cross_entropy ignore_index)

# The layout for chat data when the tokenizer has no chat template (the OASST/Guanaco one).
_FALLBACK_NOTE = "the tokenizer has no chat template: chat turns rendered as '### Human: ...### Assistant: ...'"


def _has_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def _fallback_segments(turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    segs, prompt = [], ""
    for role, text in turns:
        if role == "assistant":
            segs += [(prompt + "### Assistant:", False), (" " + text, True)]
            prompt = ""
        else:
            prompt += f"### Human: {text}" if role == "user" else f"{text}\n\n"
    return segs


def _render(tokenizer, msgs: list[dict], **kw) -> str:
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, **kw)
    except Exception as e:  # jinja errors, e.g. "System role not supported"
        raise ValueError(f"the tokenizer's chat template refused this conversation ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None


def chat_segments(turns: list[tuple[str, str]], tokenizer) -> list[tuple[str, bool]]:
    """A conversation rendered with the chat template, as (text, is_assistant) spans whose
    concatenation is the template's rendering of the whole conversation (up to the last reply).
    Raises ValueError when the template does not render conversations incrementally."""
    if not _has_template(tokenizer):
        return _fallback_segments(turns)
    msgs = [{"role": r, "content": t} for r, t in turns]
    segs, done = [], ""
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before = _render(tokenizer, msgs[:i], add_generation_prompt=True)
        after = _render(tokenizer, msgs[: i + 1])
        if not (before.startswith(done) and after.startswith(before)):
            raise ValueError("the chat template does not render this conversation incrementally (turn "
                             f"{i} changes earlier text), so prompt and reply tokens cannot be told apart; "
                             "use --format oasst or io with pre-rendered text")
        segs += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    return segs


def prompt_text(example: Example, tokenizer) -> str:
    """The text a model is given to write the example's last response: what the training sequence
    holds before that response (chat-templated with the generation prompt for chat examples)."""
    last = max(i for i, (r, _) in enumerate(example.turns) if r == "assistant")
    turns = example.turns[:last]
    eos = tokenizer.eos_token or ""
    if example.chat and _has_template(tokenizer):
        msgs = [{"role": r, "content": t} for r, t in turns]
        return _render(tokenizer, msgs, add_generation_prompt=True)
    if example.chat:
        segs = _fallback_segments(turns + [("assistant", "")])[:-1]
        return "".join(t + (eos if trained else "") for t, trained in segs)
    return "".join(t + (eos if r == "assistant" else "") for r, t in turns)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Messages ({role, content}) as the text a model reads: the tokenizer's chat template, or, when
    it has none, the layout fourbit trains with (see _FALLBACK_NOTE), so generation reads like training."""
    if _has_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    turns = [(m["role"], m["content"]) for m in messages]
    if add_generation_prompt:
        return "".join(t for t, _ in _fallback_segments(turns + [("assistant", "")])[:-1])
    return "".join(t for t, _ in _fallback_segments(turns))


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x")["input_ids"][:1] == [bos]


def _segments(ex: Example, tokenizer, bos: bool, specials: set[int]) -> list[tuple[list[int], bool]]:
    """The example as (token ids, trained?) spans, EOS included where it belongs."""
    eos = tokenizer.eos_token_id
    if ex.chat:
        texts = [(t, trained) for t, trained in chat_segments(ex.turns, tokenizer) if t]
    else:
        texts = [(t, r in ("assistant", "text")) for r, t in ex.turns]
    ids = tokenizer([t for t, _ in texts], add_special_tokens=False)["input_ids"]
    segs = [([tokenizer.bos_token_id], False)] if bos and not ex.chat else []
    for (_, trained), seg in zip(texts, ids):
        if trained and (not ex.chat or not specials.intersection(seg)):
            seg = seg + [eos]  # the end of a response (or of a document)
        segs.append((seg, trained))
    return segs


def _truncate(segs: list[tuple[list[int], bool]], src_max: int, tgt_max: int,
              bos: int | None) -> tuple[list[tuple[list[int], bool]], str]:
    """Apply the length limits; returns (segments, a description of what was cut or "")."""
    trained = [i for i, (_, t) in enumerate(segs) if t]
    if trained == [len(segs) - 1]:  # one prompt, one response: each to its own limit
        prompt, resp = [t for s, _ in segs[:-1] for t in s], segs[-1][0]
        why = []
        if len(prompt) > src_max:
            why.append(f"prompt cut from {len(prompt)} to {src_max} tokens (kept the end)")
            prompt = _cut_prompt(prompt, src_max, bos)
        if len(resp) > tgt_max:
            why.append(f"response cut from {len(resp)} to {tgt_max} tokens")
            resp = resp[:tgt_max]
        return [(prompt, False), (resp, True)], ", ".join(why)
    total, budget = sum(len(s) for s, _ in segs), src_max + tgt_max
    if total <= budget:  # several responses: keep the first source + target max tokens
        return segs, ""
    out, hit = _keep_first(segs, budget)
    return out, f"conversation cut from {total} to {budget} tokens ({hit} of {len(trained)} replies cut or dropped)"


def _keep_first(segs: list[tuple[list[int], bool]], budget: int) -> tuple[list[tuple[list[int], bool]], int]:
    """The first `budget` tokens, and how many trained segments lost tokens."""
    out, room, hit = [], budget, 0
    for ids, t in segs:
        out.append((ids[:room], t))
        hit += t and len(ids) > room
        room = max(0, room - len(ids))
    return out, hit


def _cut_prompt(prompt: list[int], keep: int, bos: int | None) -> list[int]:
    """The last `keep` tokens of a prompt, its BOS kept first when it has one."""
    if len(prompt) <= keep:
        return prompt
    head = prompt[:1] if bos is not None and prompt[:1] == [bos] and keep > 1 else []
    return head + prompt[len(prompt) - keep + len(head):]


def _fit_context(segs: list[tuple[list[int], bool]], ctx: int,
                 bos: int | None) -> tuple[list[tuple[list[int], bool]], str]:
    """Cut to the model's context (see the module docstring); returns (segments, what was cut or "")."""
    total = sum(len(s) for s, _ in segs)
    if total <= ctx:
        return segs, ""
    why = f"cut from {total} to the model's context of {ctx} tokens"
    if len(segs) == 2 and not segs[0][1] and segs[1][1]:  # one prompt, one response (after _truncate)
        (prompt, _), (resp, _) = segs
        keep_resp = min(len(resp), max(ctx - len(prompt), ctx // 2))
        return [(_cut_prompt(prompt, ctx - keep_resp, bos), False), (resp[:keep_resp], True)], why
    return _keep_first(segs, ctx)[0], why


def tokenize_examples(examples: list[Example], tokenizer, source_max_len: int = 512, target_max_len: int = 512,
                      train_on_inputs: bool = False, report: DataReport | None = None,
                      progress: bool | None = None, context_len: int | None = None) -> tuple[list[dict], dict]:
    """[{input_ids, labels}] (lists of ints, same length) for every example that keeps at least one
    response token, and counts {examples, truncated, dropped, tokens, trained_tokens}.

    context_len: the model's context (max_position_embeddings); no sequence is longer (None: no
    limit beyond source_max_len + target_max_len). Truncations and drops are added to `report`
    (used is decreased by the drops). Raises UserError when examples were given but none
    survives, or when the report's rows left out so far exceed its max_bad_fraction.
    """
    from tqdm.auto import tqdm

    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; set tokenizer.eos_token (responses must end with one)")
    if context_len is not None and context_len < 2:
        raise UserError(f"context_len must be >= 2, got {context_len} (a sequence needs a token to predict from)")
    report = report if report is not None else DataReport()
    if context_len is not None:
        report.context_len = context_len
    ctx = context_len if context_len is not None else source_max_len + target_max_len
    bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    specials = set(tokenizer.all_special_ids)
    if any(e.chat for e in examples) and not _has_template(tokenizer) and _FALLBACK_NOTE not in report.notes:
        report.notes.append(_FALLBACK_NOTE)
    out, truncated, to_context, dropped, chunked, refused = [], 0, 0, 0, 0, []
    show = progress if progress is not None else len(examples) >= 2000
    for ex in tqdm(examples, desc="tokenizing", unit="ex", disable=not show):
        try:
            segs = _segments(ex, tokenizer, bos is not None, specials)
        except ValueError as e:  # the chat template refused it: a bad row for this tokenizer
            refused.append(f"{ex.where}: {e}")
            continue
        if ex.turns[0][0] == "text":  # continued pretraining: chunk, never cut
            ids, n = [t for s, _ in segs for t in s], min(source_max_len + target_max_len, ctx)
            chunks = [ids[i:i + n] for i in range(0, len(ids), n) if len(ids[i:i + n]) > 1]
            chunked += len(chunks) > 1
            out += [{"input_ids": c, "labels": list(c)} for c in chunks]
            continue
        segs, why = _truncate(segs, source_max_len, target_max_len, bos)
        segs, why_ctx = _fit_context(segs, ctx, bos)
        to_context += bool(why_ctx) and context_len is not None
        why = ", then ".join(w for w in (why, why_ctx) if w)
        ids = [t for s, _ in segs for t in s]
        labels = [t if (trained or train_on_inputs) else IGNORE for s, trained in segs for t in s]
        is_response = [trained for s, trained in segs for _ in s]
        if not any(is_response[1:]):  # position 0 is never predicted
            dropped += 1
            report.dropped_examples.append(f"{ex.where}: no response token left ({why}); raise --source-max-len "
                                           f"or --target-max-len (now {source_max_len}/{target_max_len})"
                                           + (f", or use a model with a longer context than {context_len}"
                                              if why_ctx and context_len is not None else ""))
            continue
        if why:
            truncated += 1
            report.truncated_examples.append(f"{ex.where}: {why}")
        out.append({"input_ids": ids, "labels": labels})
    report.truncated += truncated
    report.context_truncated += to_context
    report.dropped_truncated += dropped
    report.skipped += refused
    report.used = max(0, report.used - dropped - len(refused))
    if chunked:
        report.notes.append(f"{chunked} text rows longer than {min(source_max_len + target_max_len, ctx)} tokens "
                            f"were split into chunks")
    if examples and not out:
        raise UserError(f"no training examples left: all {len(examples)} examples were "
                        + (f"skipped, e.g. {refused[0]}" if refused else
                           f"dropped because truncation left no response, e.g. {report.dropped_examples[-1]}"))
    report.check_left_out()
    return out, {"examples": len(out), "truncated": truncated, "dropped": dropped,
                 "tokens": sum(len(e["input_ids"]) for e in out),
                 "trained_tokens": sum(lab != IGNORE for e in out for lab in e["labels"][1:])}
