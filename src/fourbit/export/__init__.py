"""Export: merging an adapter into its base (`merge`) and writing GGUF files (`gguf`)."""

from fourbit.export.gguf import GGUF_TYPES, check_gguf_supported, rotary_to_interleaved, write_gguf
from fourbit.export.merge import (DEFAULT_EVAL_TEXTS, MergeArgs, MergeReport, compare_logits, merge_adapter,
                                  read_eval_file, resolve_eval_texts, tokenize_text)
from fourbit.nn import dequantize_linears  # the name export had before it moved to fourbit.nn

__all__ = ["merge_adapter", "MergeArgs", "MergeReport", "read_eval_file", "resolve_eval_texts", "tokenize_text",
           "compare_logits", "DEFAULT_EVAL_TEXTS", "write_gguf", "check_gguf_supported", "rotary_to_interleaved",
           "GGUF_TYPES", "dequantize_linears"]
