"""`fourbit chat [--adapter DIR]`: talk to a model in the terminal, replies streamed as they come."""

from dataclasses import dataclass, field

SUMMARY = "chat with a model (and adapter) in the terminal"


@dataclass
class ChatOptions:
    system: str | None = field(default=None, metadata={"help": "system prompt"})


def run(argv: list[str]) -> int:
    import sys

    from fourbit.commands.flags import parse_cli
    from fourbit.generate import Sampling, render
    from fourbit.models import ModelArgs, load_model_and_adapter

    (m, sampling, opts), _ = parse_cli((ModelArgs, Sampling, ChatOptions), argv, prog="fourbit chat",
                                       description="Chat with a model in the terminal.")
    model, tok = load_model_and_adapter(m, need_tokenizer="chat")
    reply = _replier(model, tok, sampling)
    system = [{"role": "system", "content": opts.system}] if opts.system else []
    history = list(system)
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
        text = reply(render(tok, history))
        if text is None:  # the conversation no longer fits the context
            history.pop()
            continue
        history.append({"role": "assistant", "content": text})
    return 0


def _replier(model, tok, sampling):
    """prompt text -> the reply, printed as it is generated; None (after saying why) when the prompt
    does not fit. fourbit.engine where it runs the model (a CPU: the 4-bit C kernels, a static KV
    cache), transformers' generate elsewhere."""
    import sys

    import torch

    from fourbit.errors import UserError
    from fourbit.generate import use_engine

    if use_engine(model):
        from fourbit.engine import Engine

        engine = Engine(model, tok, max_batch=1)

        def reply(prompt: str) -> str | None:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            try:
                rid = engine.submit(ids, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                    top_p=sampling.top_p)
            except UserError as e:
                print(f"fourbit chat: {e}; /reset starts a new conversation", file=sys.stderr)
                return None
            new: list[int] = []
            shown = ""
            try:
                while engine.has_work():
                    for ev in engine.step():
                        if ev.request_id == rid and ev.token_id not in engine.default_stop:
                            new.append(ev.token_id)
                    text = tok.decode(new, skip_special_tokens=True)
                    if not text.endswith("\ufffd"):  # a character still being spelled out in bytes
                        print(text[len(shown):], end="", flush=True)
                        shown = text
            finally:
                engine.cancel(rid)  # Ctrl-C mid-reply frees the row
            print(tok.decode(new, skip_special_tokens=True)[len(shown):], flush=True)
            return tok.decode(new, skip_special_tokens=True)

        return reply

    from transformers import TextStreamer

    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)

    def reply(prompt: str) -> str:
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(**enc, **sampling.generate_kwargs(), streamer=streamer,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    return reply
