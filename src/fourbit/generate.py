"""Text generation: batched answers to prompts, and answer files that resume where they stopped.

Prompts are rendered with the tokenizer's chat template when it has one (fourbit.data.render_chat)
and decoded greedily unless a temperature is given (`Sampling`, the options `fourbit generate`
and `fourbit chat` share). `write_answers` appends one JSON line per prompt as soon as its batch
finishes, and `answered_ids` reads which ids a file already holds, so an interrupted
`fourbit generate` resumes where it stopped; a line half written when it was killed is cut off
(`prepare_answers`) and that prompt answered again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fourbit.data import iter_jsonl, render_chat, truncate_partial_line
from fourbit.errors import UserError


@dataclass
class Sampling:
    """How to decode: greedy unless a temperature is given."""

    max_new_tokens: int = field(default=256, metadata={"help": "tokens to generate per answer"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy; > 0: sampling at this temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold (with --temperature > 0)"})

    def validate(self) -> list[str]:
        p = [] if self.max_new_tokens >= 1 else [f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"]
        p += [] if self.temperature >= 0 else [f"--temperature must be >= 0, got {self.temperature}"]
        p += [] if 0 < self.top_p <= 1 else [f"--top-p must be in (0, 1], got {self.top_p}"]
        return p

    def generate_kwargs(self) -> dict:
        """The keywords transformers' `generate` takes for this decoding."""
        kw = dict(do_sample=self.temperature > 0, max_new_tokens=self.max_new_tokens)
        if self.temperature > 0:
            kw.update(temperature=self.temperature, top_p=self.top_p)
        return kw


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 8,
                   device: torch.device | str | None = None, chat_template: bool = True, temperature: float = 0.0,
                   top_p: float = 1.0, engine=None) -> list[str]:
    """Answers to `prompts` (new text only). chat_template=False: prompts are already rendered.

    Where fourbit's own decode loop runs the model (a CPU, a Llama/Mistral/Qwen2 layout, not
    sharded: `use_engine`), the answers come from fourbit.engine, whose greedy answers do not depend
    on the batch; elsewhere from transformers' `generate` on left-padded batches. `engine`: one
    built on `model` to reuse across calls."""
    device = torch.device(device or next(model.parameters()).device)
    texts = [render(tokenizer, p) if chat_template else p for p in prompts]
    was_training = model.training
    if engine is not None or use_engine(model, device):
        from fourbit.engine import generate_texts

        try:
            return generate_texts(model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  temperature=temperature, top_p=top_p, engine=engine)
        finally:
            model.train(was_training)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues on the right
    model.eval()
    answers = []
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            kw = Sampling(max_new_tokens, temperature, top_p).generate_kwargs()
            out = model.generate(**enc, **kw, pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def use_engine(model, device: torch.device | str | None = None) -> bool:
    """Whether fourbit.engine's decode loop serves this model here: on a CPU (its 4-bit kernels are
    the C ones; on a GPU transformers' generate with the fused 1-token kernel is the measured path),
    for the layouts fourbit.decoder implements, and not on a model sharded across processes (each
    rank holds a slice of every weight)."""
    from fourbit.decoder import unsupported_reason

    device = torch.device(device or next(model.parameters()).device)
    if device.type != "cpu" or any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return False
    return unsupported_reason(model) is None


def render(tokenizer, prompt: str | list[dict]) -> str:
    """A user prompt (or a message list) as model input, ready for the reply."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return render_chat(tokenizer, msgs, add_generation_prompt=True)


# -- prompt files ---------------------------------------------------------------------------------
def read_prompts(path: str) -> list[tuple[str, str]]:
    """(id, prompt) pairs from JSONL: Vicuna questions (question_id, turns), OASST prompts (input,
    message_id), or rows with prompt/text/instruction (+ optional id)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file {path} does not exist")
    out = []
    for i, row in iter_jsonl(p, objects=True):
        text = (row.get("turns") or [None])[0] if "turns" in row else \
            row.get("prompt") or row.get("input") or row.get("text") or row.get("instruction")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{path}:{i}: no prompt found; expected turns, prompt, input, text or instruction")
        qid = row.get("question_id", row.get("id", row.get("message_id", i)))
        out.append((str(qid), text))
    if not out:
        raise UserError(f"prompt file {path} holds no prompts")
    return out


def answered_ids(path: str | Path) -> set[str]:
    """The question ids an answer file already holds (none when it does not exist yet). A partial
    last line (a run killed mid-write) is skipped; it is cut off before appending (prepare_answers).
    A file whose rows are not answers is refused: we append only to our own kind of file."""
    p = Path(path)
    if not p.exists():
        return set()
    ids = set()
    for i, row in iter_jsonl(p, allow_partial_last=True, objects=True):
        if "question_id" not in row or "text" not in row:
            raise UserError(f"{p}:{i}: not an answer (no question_id/text); --output must be a new file or an "
                            f"answers file fourbit generate wrote, which it continues")
        ids.add(str(row["question_id"]))
    return ids


def prepare_answers(path: str | Path):
    """Make an answers file safe to append to: a partial last line is cut off and returned (a
    fourbit.data.PartialLine, for the caller's warning; None when there was none)."""
    p = Path(path)
    return truncate_partial_line(p) if p.is_file() else None


def write_answers(model, tokenizer, prompts: list[tuple[str, str]], path: str | Path, model_id: str,
                  sampling: Sampling, batch_size: int = 8) -> None:
    """Append {question_id, model_id, prompt, text} per (id, prompt) to `path`, flushed batch by batch."""
    from tqdm.auto import tqdm

    out = Path(path)
    answered_ids(out)  # an existing file must be an answers file: we append only to our own kind
    prepare_answers(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existed = out.exists()
    engine = None
    if prompts and use_engine(model):  # one engine (KV cache, screened lm_head) for every batch
        from fourbit.engine import Engine

        rendered = [render(tokenizer, t) for _, t in prompts]
        longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in rendered)
        limit = getattr(model.config, "max_position_embeddings", None) or longest + sampling.max_new_tokens
        engine = Engine(model, tokenizer, max_batch=min(batch_size, len(prompts)),
                        max_seq_len=min(limit, longest + sampling.max_new_tokens))
    try:
        with open(out, "a", encoding="utf-8") as f, \
                tqdm(total=len(prompts), desc="generating", unit="prompt") as bar:
            for i in range(0, len(prompts), batch_size):
                chunk = prompts[i:i + batch_size]
                answers = generate_batch(model, tokenizer, [t for _, t in chunk], sampling.max_new_tokens,
                                         batch_size, temperature=sampling.temperature, top_p=sampling.top_p,
                                         engine=engine)
                for (qid, text), ans in zip(chunk, answers):
                    f.write(json.dumps({"question_id": qid, "model_id": model_id, "prompt": text,
                                        "text": ans.strip()}, ensure_ascii=False) + "\n")
                f.flush()
                bar.update(len(chunk))
    finally:
        if not existed and out.exists() and out.stat().st_size == 0:  # nothing answered: leave nothing behind
            out.unlink()
