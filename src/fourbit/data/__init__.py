"""Instruction data: formats, tokens and labels (loss on responses only), batching, the demo task.

    examples, report = load_examples("data.jsonl")           # alpaca / oasst / chat / io / text
    train, held = split_eval(examples, 0.02, seed=0)
    tokenized, stats = tokenize_examples(train, tokenizer, source_max_len=512, target_max_len=512)
    for idx in batch_order([len(e["input_ids"]) for e in tokenized], 4, seed=0, epoch=0):
        batch = collate([tokenized[i] for i in idx], tokenizer.pad_token_id)
"""

from fourbit.data.batching import batch_order, collate, pack_examples, split_eval
from fourbit.data.builtin import builtin_examples, prompt_text, reference_answer, score_builtin
from fourbit.data.formats import FORMATS, DataReport, Example, detect_format, load_examples, read_rows
from fourbit.data.tokenize import IGNORE, chat_segments, tokenize_examples

__all__ = [
    "FORMATS", "Example", "DataReport", "load_examples", "read_rows", "detect_format", "tokenize_examples",
    "chat_segments", "IGNORE", "split_eval", "batch_order", "collate", "pack_examples", "builtin_examples",
    "prompt_text", "reference_answer", "score_builtin",
]
