"""Merging a LoRA adapter into its base model and measuring what that cost (`fourbit merge`).

`merge_adapter` loads the base the way the adapter was trained (4-bit NF4 by default), loads the
adapter, and records the logits of this unmerged model on a few texts. It then folds
`scaling * B @ A` into each base weight, in float32 from the dequantized 4-bit weight, casts the
result to the output dtype (and, with `quantize`, quantizes it to 4-bit again in bitsandbytes'
format), writes a directory that `AutoModelForCausalLM.from_pretrained` loads, reloads what it
wrote and compares: max |logit difference| and perplexity, merged vs unmerged, on the same
tokens. See Note: What merging costs. With `gguf` it also writes a GGUF file
(fourbit.export.gguf) and, when affordable, reads it back with transformers and measures it too.
`MergeArgs` is the one statement of the options: `fourbit merge`'s flags, checked once.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fourbit.config import option, validate
from fourbit.errors import UserError
from fourbit.export.gguf import GGUF_TYPES, check_gguf_supported, write_gguf
from fourbit.models import (QUANT_CHOICES, ModelArgs, bnb_quantization_config, bnb_skip_modules, load_config,
                            load_model, load_model_and_adapter, normalize_quant, parse_dtype, resolve_source,
                            save_model)
from fourbit.models.load import choice_problems
from fourbit.models.source import TOKENIZER_FILES
from fourbit.nn import dequantize_linears, merge_lora, quantize_linears
from fourbit.quant import DTYPES, QUANT_TYPES

GGUF_CHECK_MAX_PARAMS = 1_500_000_000  # reading a GGUF back with transformers takes 4 bytes/parameter
MAX_EVAL_TEXTS = 64  # the unmerged logits of every text are kept in memory: texts * tokens * vocab * 4 bytes
REPORT_NAME = "merge_report.json"
CHECK_GGUF = {"auto": None, "yes": True, "no": False}

# Short texts of different kinds (prose, code, numbers, a dialogue) for measuring the merge.
DEFAULT_EVAL_TEXTS = (
    "The river ran high after a week of rain, and the old stone bridge, built in 1887, was closed "
    "until engineers could check its arches for cracks.",
    "def mean(xs):\n    total = 0.0\n    for x in xs:\n        total += x\n    return total / len(xs)\n",
    "Plants turn light into chemical energy: they take in carbon dioxide and water and give off oxygen, "
    "storing the energy as sugar.",
    None,  # a short dialogue in the tokenizer's chat template (Guanaco's format when it has none)
)
_DIALOGUE = [{"role": "user", "content": "How many legs does a spider have?"},
             {"role": "assistant", "content": "A spider has eight legs."}]


@dataclass
class MergeArgs:
    """fourbit merge --model M --adapter A --output DIR"""

    model: str = option(ModelArgs, "model", help="base model the adapter was trained on: model directory, .gguf "
                                                 "file, hub id (owner/name), or the embedded smollm2-135m")
    adapter: str | None = option(ModelArgs, "adapter", help="LoRA adapter directory (PEFT format; required)")
    output: str = field(default="", metadata={"help": "directory to write the merged model to (required)"})
    dtype: str = field(default="bf16", metadata={"help": f"dtype of the merged weights: {', '.join(DTYPES)}"})
    quantize: str | None = field(default=None, metadata={"help": f"quantize the merged weights to 4-bit "
                                                                 f"({' or '.join(QUANT_TYPES)}, bitsandbytes' format); "
                                                                 f"default: keep them 16-bit"})
    gguf: str | None = field(default=None, metadata={"help": f"also write DIR/model-<type>.gguf "
                                                             f"({' or '.join(GGUF_TYPES)}) from the 16-bit merge; "
                                                             f"Llama architecture only"})
    base_quant: str = field(default="nf4", metadata={"help": f"how the adapter's base was loaded in training: "
                                                             f"{', '.join(QUANT_CHOICES)}"})
    double_quant: bool = option(ModelArgs, "double_quant", help="double quantization for the 4-bit base and for "
                                                                "--quantize (--no-double-quant: off)")
    eval_file: str | None = field(default=None, metadata={"help": "texts to measure the merge on: .jsonl with a "
                                                                  "\"text\" field, or one text per line (default: "
                                                                  "4 built-in texts)"})
    max_tokens: int = field(default=256, metadata={"help": "tokens per evaluation text (longer texts are cut)"})
    check_gguf: str = field(default="auto", metadata={"help": "read the GGUF back with transformers (fp32, 4 bytes "
                                                              "per parameter) and measure it too: yes, no, or auto "
                                                              "(yes up to 1.5B parameters)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output directory"})
    device: str | None = option(ModelArgs, "device")

    def validate(self) -> list[str]:
        p = [] if self.adapter else ["--adapter DIR is required"]
        p += [] if self.output else ["--output DIR is required"]
        p += choice_problems(self.dtype, DTYPES, "--dtype")
        if self.quantize not in (None, *QUANT_CHOICES):
            p.append(f"--quantize must be {' or '.join(QUANT_TYPES)}, got {self.quantize!r}")
        p += choice_problems(self.gguf, (None, *GGUF_TYPES), "--gguf")
        p += choice_problems(self.base_quant, QUANT_CHOICES, "--base-quant")
        p += choice_problems(self.check_gguf, CHECK_GGUF, "--check-gguf")
        if self.max_tokens < 2:
            p.append(f"--max-tokens must be at least 2 (one token predicts the next), got {self.max_tokens}")
        return p


# -- merging ----------------------------------------------------------------------------------------
@dataclass
class MergeReport:
    """What merging cost, measured on `texts` texts (`tokens` predicted tokens) against the unmerged model.

    Logit differences are max/mean |merged - unmerged| over every position and vocabulary entry;
    perplexities are exp(mean NLL) over the same tokens; `top1_agreement` is the fraction of
    positions where both models rank the same token first. All computed in float32 from the
    weights as written to `output`.
    """

    model: str
    adapter: str
    output: str
    dtype: str
    base_quant: str | None
    quantize: str | None
    texts: int = 0
    tokens: int = 0
    max_abs_logit_diff: float = 0.0
    mean_abs_logit_diff: float = 0.0
    top1_agreement: float = 1.0
    ppl_unmerged: float = 0.0
    ppl_merged: float = 0.0
    ppl_change_pct: float = 0.0
    gguf: dict | None = None
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


def merge_adapter(model: str | os.PathLike, adapter: str | os.PathLike, output: str | os.PathLike,
                  eval_texts: list[str] | None = None, **options) -> MergeReport:
    """Merge a LoRA adapter into its base model and write the result to `output`; returns a MergeReport.

    `options` are MergeArgs' fields: the base is loaded as the adapter was trained (`base_quant`);
    the merged weights are computed in float32 and stored as `dtype`, or quantized to 4-bit
    (`quantize`); `gguf` also writes `output/model-<type>.gguf` from the 16-bit merge, read back
    and measured when `check_gguf` says so (True/False/None also work: None is "auto", up to
    GGUF_CHECK_MAX_PARAMS parameters). The texts measured are `eval_texts`, else the `eval_file`'s,
    else DEFAULT_EVAL_TEXTS. The report is also written to `output/merge_report.json`.
    """
    if not isinstance(options.get("check_gguf", "auto"), str):
        options["check_gguf"] = {v: k for k, v in CHECK_GGUF.items()}[options["check_gguf"]]
    a = validate(MergeArgs(model=str(model), adapter=str(adapter), output=str(output), **options))
    t0 = time.perf_counter()
    out_dtype = parse_dtype(a.dtype)
    quantize = normalize_quant(a.quantize)
    out = Path(output)
    _check_output(out, a.overwrite, model, adapter)
    if a.gguf is not None:
        _check_gguf_source(model)
    if eval_texts is None and a.eval_file:
        eval_texts = read_eval_file(a.eval_file)
    base = ModelArgs(model=str(model), adapter=str(adapter), quant=a.base_quant,
                     double_quant=a.double_quant, device=a.device, dtype="fp32")
    m, tok = load_model_and_adapter(base, need_tokenizer="merge (to measure the merge and to copy it next to "
                                                         "the merged weights)")
    if a.gguf is not None:
        check_gguf_supported(m.config)
    texts = resolve_eval_texts(eval_texts, tok)
    ids = [tokenize_text(tok, t, a.max_tokens) for t in texts]
    reference = [_logits(m, x) for x in ids]  # the unmerged adapter model, fp32 compute

    merge_lora(m, dtype=out_dtype)  # W + scaling * B @ A in float32, then cast (see LoraLinear.merge)
    dequantize_linears(m, out_dtype)  # base layers the adapter did not touch
    m.to(out_dtype)
    m.config.dtype = out_dtype
    report = MergeReport(model=str(model), adapter=str(adapter), output=str(out), dtype=a.dtype,
                         base_quant=normalize_quant(a.base_quant), quantize=quantize)
    n_params = sum(p.numel() for p in m.parameters())
    _clear_output(out)
    gguf_path = None
    if a.gguf is not None:  # from the 16-bit merge, before any 4-bit rounding
        gguf_path = out / f"model-{a.gguf}.gguf"
        warnings = write_gguf(m, tok, gguf_path, a.gguf)
        report.gguf = {"type": a.gguf, "path": str(gguf_path), "bytes": gguf_path.stat().st_size, "warnings": warnings}
    _save_merged(m, tok, out, quantize, a.double_quant, out_dtype)
    del m

    merged, _ = load_model(out, quant=quantize, compute_dtype=torch.float32, device=a.device, load_tokenizer=False)
    _fill_costs(report, reference, [_logits(merged, x) for x in ids], ids)
    del merged
    if gguf_path is not None:
        check = CHECK_GGUF[a.check_gguf]
        if check or (check is None and n_params <= GGUF_CHECK_MAX_PARAMS):
            report.gguf.update(_gguf_costs(gguf_path, reference, ids))
        else:
            report.gguf["warnings"].append(f"not read back: transformers' GGUF loader would need "
                                           f"{4 * n_params / 2**30:.1f} GiB (fp32); --check-gguf yes to force")
    report.files = sorted(p.name for p in out.iterdir()) + [REPORT_NAME]
    report.seconds = round(time.perf_counter() - t0, 2)
    (out / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def _check_output(out: Path, overwrite: bool, *inputs) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is a file; pass a directory")
    for src in inputs:
        if Path(src).exists() and out.resolve() == Path(src).resolve():
            raise UserError(f"output {out} is the input directory {src}; write the merged model somewhere else")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output directory {out} is not empty; pass --overwrite to replace the model files in it, "
                        f"or choose another directory")


def _clear_output(out: Path) -> None:
    """`out` without the files a merge writes (--overwrite: an old .gguf or shards must not mix with the
    new model); files of other names are left alone."""
    out.mkdir(parents=True, exist_ok=True)
    patterns = ("model*.safetensors", "model.safetensors.index.json", "model-*.gguf", "config.json", REPORT_NAME,
                *TOKENIZER_FILES)
    for pattern in patterns:
        for p in out.glob(pattern):
            if p.is_file():
                p.unlink()


def _save_merged(model: nn.Module, tok, out: Path, quantize: str | None, double_quant: bool,
                 dtype: torch.dtype) -> None:
    quant_info = None
    if quantize is not None:
        quantize_linears(model, quantize, double_quant, compute_dtype=dtype)
        quant_info = bnb_quantization_config(quantize, double_quant, dtype, bnb_skip_modules(model))
    save_model(model, out, tok, quant_info)


def _check_gguf_source(model_name_or_path) -> None:
    """Refuse --gguf for a non-Llama model before spending minutes loading it (directories only)."""
    src = resolve_source(model_name_or_path)
    if src.is_dir():
        check_gguf_supported(load_config(src))



# -- measuring ---------------------------------------------------------------------------------------
# Note: What merging costs
# In exact arithmetic a merged model equals the unmerged one. Three things make them differ, and the
# report measures their sum on the same tokens: (1) float32 rounding of W + s*B@A (~1e-6 relative),
# (2) rounding the merged weights to the stored dtype (bf16 keeps 8 mantissa bits: ~0.4% per weight),
# (3) with --quantize, rounding them to 16 NF4 levels per block again, which is the big one: the
# adapter's update is small next to a 4-bit step, so part of it is rounded away. Both models are
# evaluated in float32 from the weights as written, so the numbers are about the files, not the
# compute dtype of whoever runs them.
def resolve_eval_texts(texts: list[str] | None, tok) -> list[str]:
    if texts is None:
        texts = [t if t is not None else _dialogue(tok) for t in DEFAULT_EVAL_TEXTS]
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise UserError("no evaluation texts: the eval file has no non-empty texts")
    if len(texts) > MAX_EVAL_TEXTS:
        raise UserError(f"{len(texts)} evaluation texts; at most {MAX_EVAL_TEXTS} (the unmerged model's logits for "
                        f"every text are kept in memory), so pass a shorter --eval-file")
    return texts


def _dialogue(tok) -> str:
    from fourbit.data import render_chat

    return render_chat(tok, _DIALOGUE, add_generation_prompt=False)


def read_eval_file(path: str | os.PathLike) -> list[str]:
    """Texts from a .jsonl file (a "text" field per line) or a text file (one text per non-empty line)."""
    from fourbit.data import iter_jsonl

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--eval-file {p}: no such file")
    if p.suffix != ".jsonl":
        return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = []
    for i, row in iter_jsonl(p):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f"--eval-file {p}, line {i}: expected an object with a string \"text\" field")
        texts.append(row["text"])
    return texts


def tokenize_text(tok, text: str, max_tokens: int) -> torch.Tensor:
    ids = tok(text, return_tensors="pt")["input_ids"][:, :max_tokens]  # (1, T)
    if ids.shape[1] < 2:
        raise UserError(f"evaluation text {text[:40]!r} is shorter than 2 tokens; nothing to predict")
    return ids


@torch.inference_mode()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits[0].float().cpu()  # (T, V)


def compare_logits(reference: list[torch.Tensor], other: list[torch.Tensor], ids: list[torch.Tensor] | None = None
                   ) -> dict:
    """max/mean |difference|, top-1 agreement, and both perplexities (when `ids` are given)."""
    diffs = [(a - b).abs() for a, b in zip(reference, other)]
    n = sum(d.numel() for d in diffs)
    res = {"max_abs_logit_diff": max(d.max().item() for d in diffs),
           "mean_abs_logit_diff": sum(d.sum().item() for d in diffs) / n,
           "top1_agreement": sum((a.argmax(-1) == b.argmax(-1)).sum().item() for a, b in zip(reference, other))
           / sum(a.shape[0] for a in reference)}
    if ids is not None:
        res["ppl_reference"], res["tokens"] = _perplexity(reference, ids)
        res["ppl"], _ = _perplexity(other, ids)
        res["ppl_change_pct"] = 100 * (res["ppl"] / res["ppl_reference"] - 1)
    return res


def _perplexity(logits: list[torch.Tensor], ids: list[torch.Tensor]) -> tuple[float, int]:
    """exp(mean NLL) of each next token, pooled over texts; and how many tokens were predicted."""
    nll, count = 0.0, 0
    for lg, x in zip(logits, ids):
        targets = x[0, 1:]  # (T-1,)
        nll += torch.nn.functional.cross_entropy(lg[:-1].double(), targets, reduction="sum").item()
        count += targets.numel()
    return float(np.exp(nll / count)), count


def _fill_costs(report: MergeReport, reference: list[torch.Tensor], merged: list[torch.Tensor],
                ids: list[torch.Tensor]) -> None:
    c = compare_logits(reference, merged, ids)
    report.texts, report.tokens = len(reference), c["tokens"]
    report.max_abs_logit_diff, report.mean_abs_logit_diff = c["max_abs_logit_diff"], c["mean_abs_logit_diff"]
    report.top1_agreement = c["top1_agreement"]
    report.ppl_unmerged, report.ppl_merged, report.ppl_change_pct = c["ppl_reference"], c["ppl"], c["ppl_change_pct"]


def _gguf_costs(path: Path, reference: list[torch.Tensor], ids: list[torch.Tensor]) -> dict:
    """The GGUF file read back by transformers' GGUF loader, measured like the merge."""
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as alone:  # the GGUF alone: nothing may come from config.json beside it
        (Path(alone) / path.name).symlink_to(path.resolve())
        m = AutoModelForCausalLM.from_pretrained(alone, gguf_file=path.name, dtype=torch.float32).eval()
    c = compare_logits(reference, [_logits(m, x) for x in ids], ids)
    return {k: c[k] for k in ("max_abs_logit_diff", "mean_abs_logit_diff", "top1_agreement", "ppl", "ppl_change_pct")}
