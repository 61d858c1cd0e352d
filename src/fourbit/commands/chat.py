"""`fourbit chat [--adapter DIR]`: talk to a model in the terminal, replies streamed as they come."""

from dataclasses import dataclass, field

SUMMARY = "chat with a model (and adapter) in the terminal"


@dataclass
class ChatOptions:
    system: str | None = field(default=None, metadata={"help": "system prompt"})


def run(argv: list[str]) -> int:
    import sys

    import torch
    from transformers import TextStreamer

    from fourbit.commands.flags import parse_cli
    from fourbit.generate import Sampling, render
    from fourbit.models import ModelArgs, load_model_and_adapter

    (m, sampling, opts), _ = parse_cli((ModelArgs, Sampling, ChatOptions), argv, prog="fourbit chat",
                                       description="Chat with a model in the terminal.")
    model, tok = load_model_and_adapter(m, need_tokenizer="chat")
    system = [{"role": "system", "content": opts.system}] if opts.system else []
    history = list(system)
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
            history = list(system)
            continue
        history.append({"role": "user", "content": line})
        enc = tok(render(tok, history), return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(**enc, **sampling.generate_kwargs(), streamer=streamer,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        history.append({"role": "assistant",
                        "content": tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)})
    return 0
