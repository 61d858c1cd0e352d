"""Instruction data for `fourbit train`: formats, tokens and labels (loss on responses only),
resumable batching and packing, and the built-in demo task.

    from fourbit.data import load_examples, split_eval, tokenize_examples, batch_order, collate

    examples, report = load_examples("data.jsonl")          # format="auto": alpaca/oasst/chat/io/text
    train, held = split_eval(examples, 0.02, seed=0)         # a fraction (< 1) or a count (>= 1)
    tokenized, stats = tokenize_examples(train, tokenizer, source_max_len=512, target_max_len=512,
                                         context_len=2048,   # the model's max_position_embeddings
                                         report=report)      # labels -100 except responses (+ EOS)
    print(report.summary())                                  # used / skipped / truncated, with file:line
    lengths = [len(e["input_ids"]) for e in tokenized]
    for idx in batch_order(lengths, batch_size=4, seed=0, epoch=0):   # same order on every resume
        batch = collate([tokenized[i] for i in idx], tokenizer.pad_token_id)
        # {"input_ids", "attention_mask", "labels"}: (B, T) int64 tensors

Modules: `example` (Example, DataReport), `formats` (reading files, detecting formats), `tokenize` (templates, label
masking, truncation), `batching` (split, order, collate, packing), `builtin` (the demo task:
`load_examples("builtin")`, `builtin_examples(split, n)`, `score_builtin`). User mistakes
(missing path, empty file, unknown format, a file mixing formats, more than `max_bad_fraction`
(5%) of the rows left out, every example truncated away) raise
`fourbit.errors.UserError` with what was found and what to do; nothing is written to disk.
"""

from fourbit.data.batching import batch_order, collate, pack_examples, split_eval
from fourbit.data.builtin import builtin_examples, reference_answer, score_builtin
from fourbit.data.example import DataReport, Example
from fourbit.data.formats import (ALPACA_NO_INPUT, ALPACA_WITH_INPUT, FORMATS, detect_format, iter_jsonl, load_examples,
                                  partial_last_line, read_rows, truncate_partial_line)
from fourbit.data.tokenize import IGNORE, chat_segments, prompt_text, render_chat, tokenize_examples

__all__ = [
    "FORMATS", "ALPACA_WITH_INPUT", "ALPACA_NO_INPUT", "Example", "DataReport", "load_examples", "read_rows",
    "detect_format", "tokenize_examples", "chat_segments", "prompt_text", "IGNORE", "split_eval", "batch_order",
    "collate", "pack_examples", "builtin_examples", "reference_answer", "score_builtin", "iter_jsonl",
    "render_chat", "partial_last_line", "truncate_partial_line",
]
