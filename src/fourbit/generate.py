"""Text generation: batched answers to a prompt file (`fourbit generate`) and a terminal chat (`fourbit chat`).

Both load a model with `fourbit.models.load_model` (4-bit by default) and optionally a LoRA
adapter, render prompts with the tokenizer's chat template when it has one, and decode greedily
unless a temperature is given. `fourbit generate` writes one JSON line per prompt as soon as its
batch finishes and skips ids already in the output, so an interrupted run resumes where it
stopped.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fourbit.errors import UserError


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 8,
                   device: torch.device | str | None = None, chat_template: bool = True, temperature: float = 0.0,
                   top_p: float = 1.0) -> list[str]:
    """Answers to `prompts` (new text only). chat_template=False: prompts are already rendered."""
    device = torch.device(device or next(model.parameters()).device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues on the right
    was_training = model.training
    model.eval()
    answers = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = [render(tokenizer, p) if chat_template else p for p in prompts[i:i + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            if temperature > 0:
                kw.update(temperature=temperature, top_p=top_p)
            out = model.generate(**enc, **kw)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def render(tokenizer, prompt: str | list[dict]) -> str:
    """A user prompt (or a message list) as model input: chat template if the tokenizer has one."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    text = "".join(f"### {'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in msgs)
    return text + "### Assistant:"


def load_for_generation(model: str, adapter: str | None, quant: str, device: str | None):
    from fourbit.models import load_model
    from fourbit.nn import load_adapter

    m, tok = load_model(model, quant=quant, device=device)
    if tok is None:
        raise UserError(f"model {model} has no tokenizer files; generation needs a tokenizer")
    if adapter:
        load_adapter(m, adapter)
    return m, tok


# -- prompt files ---------------------------------------------------------------------------------
def read_prompts(path: str) -> list[tuple[str, str]]:
    """(id, prompt) pairs from JSONL: Vicuna questions (question_id, turns), OASST prompts (input,
    message_id), or rows with prompt/text/instruction (+ optional id)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file {path} does not exist")
    from fourbit.data.formats import iter_jsonl

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


@dataclass
class GenerateArgs:
    """fourbit generate --model M --prompts FILE --output answers.jsonl"""

    model: str = field(default="smollm2-135m", metadata={"help": "model directory, .gguf, hub id or smollm2-135m"})
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter directory (PEFT format)"})
    prompts: str = field(default="", metadata={"help": "JSONL prompts (Vicuna question.jsonl, OASST, or prompt/text)"})
    output: str = field(default="", metadata={"help": "answers JSONL (appended; ids already there are skipped)"})
    quant: str = field(default="nf4", metadata={"help": "nf4, fp4 or none"})
    max_new_tokens: int = field(default=256, metadata={"help": "tokens to generate per answer"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generation batch"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy; > 0: sampling"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})
    model_id: str | None = field(default=None, metadata={"help": "name recorded in the answers (default: the model)"})
    limit: int = field(default=0, metadata={"help": "answer only the first N prompts (0: all)"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})

    def validate(self) -> list[str]:
        p = [] if self.prompts else ["--prompts FILE is required"]
        p += [] if self.output else ["--output FILE is required"]
        p += [] if self.max_new_tokens >= 1 else [f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"]
        p += [] if self.batch_size >= 1 else [f"--batch-size must be >= 1, got {self.batch_size}"]
        return p


def generate_main(argv: list[str]) -> int:
    from tqdm.auto import tqdm

    from fourbit.config import parse_cli

    a = parse_cli(GenerateArgs, argv, prog="fourbit generate", description="Answer a file of prompts.")
    prompts = read_prompts(a.prompts)[: a.limit or None]
    out = Path(a.output)
    done = set()
    if out.exists():
        done = {str(json.loads(line)["question_id"]) for line in out.read_text().splitlines() if line.strip()}
    todo = [(q, t) for q, t in prompts if q not in done]
    print(f"{len(prompts)} prompts, {len(done)} already answered in {out}, {len(todo)} to go")
    if not todo:
        return 0
    torch.manual_seed(a.seed)
    model, tok = load_for_generation(a.model, a.adapter, a.quant, a.device)
    name = a.model_id or Path(a.adapter or a.model).name
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc="generating", unit="prompt") as bar:
        for i in range(0, len(todo), a.batch_size):
            chunk = todo[i:i + a.batch_size]
            answers = generate_batch(model, tok, [t for _, t in chunk], a.max_new_tokens, a.batch_size,
                                     temperature=a.temperature, top_p=a.top_p)
            for (qid, text), ans in zip(chunk, answers):
                f.write(json.dumps({"question_id": qid, "model_id": name, "prompt": text, "text": ans.strip()},
                                   ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
    return 0


@dataclass
class ChatArgs:
    """fourbit chat [--adapter DIR]"""

    model: str = field(default="smollm2-135m", metadata={"help": "model directory, .gguf, hub id or smollm2-135m"})
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter directory (e.g. a fourbit train output)"})
    quant: str = field(default="nf4", metadata={"help": "nf4, fp4 or none"})
    max_new_tokens: int = field(default=256, metadata={"help": "tokens per reply"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy"})
    system: str | None = field(default=None, metadata={"help": "system prompt"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda"})


def chat_main(argv: list[str]) -> int:
    from transformers import TextStreamer

    from fourbit.config import parse_cli

    a = parse_cli(ChatArgs, argv, prog="fourbit chat", description="Chat with a model in the terminal.")
    model, tok = load_for_generation(a.model, a.adapter, a.quant, a.device)
    history = [{"role": "system", "content": a.system}] if a.system else []
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    print("fourbit chat: empty line or Ctrl-D to quit, /reset to forget the conversation", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = history[:1] if a.system else []
            continue
        history.append({"role": "user", "content": line})
        enc = tok(render(tok, history), return_tensors="pt", add_special_tokens=False).to(model.device)
        kw = dict(max_new_tokens=a.max_new_tokens, do_sample=a.temperature > 0, streamer=streamer,
                  pad_token_id=tok.pad_token_id or tok.eos_token_id)
        if a.temperature > 0:
            kw["temperature"] = a.temperature
        with torch.no_grad():
            out = model.generate(**enc, **kw)
        history.append({"role": "assistant",
                        "content": tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)})
    return 0
