"""`fourbit serve --model M [--adapter NAME=PATH ...]`: one 4-bit base and its LoRA adapters over an
OpenAI-compatible API, with a web chat (/) and a web arena for human judges (/arena).

This module parses and checks the flags, loads the model, and runs uvicorn; everything with
behaviour lives in `fourbit.serve`. `--adapter NAME=PATH` may be repeated (or list several
after one flag); it is the serve-only spelling of the model flags' single `--adapter DIR`.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

SUMMARY = "serve a base and its adapters: OpenAI-compatible API, web chat and arena"
_REPEATABLE = {"--adapter": "--adapters", "--arena": "--arena"}  # flags given repeatedly -> one list flag


@dataclass
class ServeOptions:
    adapters: list[str] = field(default_factory=list, metadata={
        "help": "NAME=PATH ...: PEFT-format adapter directories served under NAME (also --adapter NAME=PATH, "
                "repeatable)"})
    adapter_dir: str | None = field(default=None, metadata={
        "help": "root for adapters loaded at run time (POST /v1/adapters {name, path}, path relative to this "
                "root); without it, run-time loading is off"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; anything but loopback wants "
                                                             "--api-key-env"})
    port: int = field(default=8000, metadata={"help": "TCP port (0: any free port)"})
    api_key_env: str | None = field(default=None, metadata={
        "help": "name of the environment variable that holds the API key clients must send (the key itself "
                "never goes on the command line)"})
    max_batch: int = field(default=8, metadata={"help": "requests decoded together per step"})
    max_new_tokens: int = field(default=512, metadata={"help": "cap on max_tokens per request (and its default)"})
    max_seq_len: int | None = field(default=None, metadata={
        "help": "prompt + answer tokens per request; the KV cache holds --max-batch rows of it (default: the "
                "model's context, at most 2048)"})
    max_body_kb: int = field(default=1024, metadata={"help": "largest request body, KiB (413 above)"})
    arena: list[str] = field(default_factory=list, metadata={
        "help": "systems for /arena: answer files (fourbit generate's JSONL, the QLoRA paper's generation "
                "files) and/or live:NAME for a served model answering --questions itself"})
    questions: str | None = field(default=None, metadata={"help": "prompt file for the arena (e.g. Vicuna's "
                                                                  "question.jsonl)"})
    judgments: str = field(default="arena-judgments.jsonl", metadata={
        "help": "the arena's judgments JSONL (appended; `fourbit elo` reads it)"})
    log_level: str = field(default="info", metadata={"help": "uvicorn log level: warning, info, debug"})

    def validate(self) -> list[str]:
        p = []
        p += [] if 0 <= self.port <= 65535 else [f"--port must be in [0, 65535], got {self.port}"]
        p += [] if self.max_batch >= 1 else [f"--max-batch must be >= 1, got {self.max_batch}"]
        p += [] if self.max_new_tokens >= 1 else [f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"]
        p += [] if self.max_seq_len is None or self.max_seq_len >= 2 else [
            f"--max-seq-len must be >= 2, got {self.max_seq_len}"]
        p += [] if self.max_body_kb >= 1 else [f"--max-body-kb must be >= 1, got {self.max_body_kb}"]
        for spec in self.adapters:
            name, eq, path = spec.partition("=")
            from fourbit.serve.app import ADAPTER_NAME

            if not eq or not ADAPTER_NAME.match(name) or not path:
                p.append(f"--adapter {spec}: expected NAME=PATH, NAME of letters, digits, '.', '_', '-'")
            elif not Path(path).is_dir():
                p.append(f"--adapter {spec}: {path} is not a directory")
        names = [s.partition("=")[0] for s in self.adapters]
        p += [f"--adapter: the name {n!r} is given twice" for n in sorted({n for n in names if names.count(n) > 1})]
        if self.adapter_dir and not Path(self.adapter_dir).is_dir():
            p.append(f"--adapter-dir {self.adapter_dir}: not a directory")
        if self.api_key_env and not os.environ.get(self.api_key_env):
            p.append(f"--api-key-env {self.api_key_env}: that environment variable is empty or unset; "
                     f"export {self.api_key_env}=<key> first")
        if self.arena and len(self.arena) < 2:
            p.append(f"--arena needs at least two systems (answer files or live:NAME), got {self.arena}")
        for src in self.arena:
            if not src.startswith("live:") and not Path(src).is_file():
                p.append(f"--arena {src}: no such file (a served model is written live:NAME)")
        if self.questions and not Path(self.questions).is_file():
            p.append(f"--questions {self.questions}: no such file")
        return p


def _merge_repeated(argv: list[str]) -> list[str]:
    """`--adapter a=x --adapter b=y` -> `--adapters a=x b=y` (the parser keeps only the last otherwise)."""
    out, merged, current = [], {}, None
    for arg in argv:
        flag, eq, value = arg.partition("=")
        flag = _REPEATABLE.get(flag.replace("_", "-"), flag.replace("_", "-"))
        if arg.startswith("--") and flag in _REPEATABLE.values():
            current = flag
            merged.setdefault(flag, []).extend([value] if eq else [])
        elif current and not arg.startswith("--"):
            merged[current].append(arg)
        else:
            current = None
            out.append(arg)
    for flag, values in merged.items():
        out += [flag, *values]
    return out


def bind_warning(host: str, api_key: str | None) -> str | None:
    """What to tell an operator who binds beyond loopback without an API key (None: nothing)."""
    if api_key or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to anything
        pass
    return (f"WARNING: binding {host} without --api-key-env: anyone who can reach this address can use the "
            f"model, the arena and the adapter endpoints")


def run(argv: list[str]) -> int:
    import sys

    from fourbit.commands.flags import parse_cli
    from fourbit.errors import UserError
    from fourbit.models import ModelArgs, load_model_and_adapter

    (m, a), _ = parse_cli((ModelArgs, ServeOptions), _merge_repeated(list(argv)), prog="fourbit serve",
                          description=__doc__.split("\n\n")[0].replace("\n", " "))
    if m.adapter:
        raise UserError(f"fourbit serve names its adapters: --adapter NAME={m.adapter}")
    api_key = os.environ.get(a.api_key_env) if a.api_key_env else None
    warning = bind_warning(a.host, api_key)
    if warning:
        print(f"fourbit serve: {warning}", file=sys.stderr)
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("fourbit serve needs starlette and uvicorn: pip install 'fourbit[serve]'") from None
    from fourbit.nn import check_adapter
    from fourbit.serve import Arena, Limits, build_app
    from fourbit.serve.app import bind, default_context

    adapters = dict(spec.partition("=")[::2] for spec in a.adapters)
    for name, path in adapters.items():  # a bad adapter fails in a second, not after the model loads
        check_adapter(path)
    arena = Arena(a.judgments, a.arena, a.questions) if a.arena else None
    sock, url = bind(a.host, a.port)  # a port in use fails now, not after the model loads
    scheduler = None
    try:
        model, tok = load_model_and_adapter(m, need_tokenizer="fourbit serve")
        base = Path(str(m.model).rstrip("/")).name
        context = a.max_seq_len or default_context(model)
        limits = Limits(max_new_tokens=a.max_new_tokens, context_length=context,
                        max_body_bytes=a.max_body_kb * 1024, max_pending=64 * a.max_batch)
        app, scheduler = build_app(model, tok, base, adapters=adapters, max_batch=a.max_batch, limits=limits,
                                   api_key=api_key, adapter_dir=a.adapter_dir, arena=arena, start=False)
        print(f"fourbit serve: {base} ({m.quant}) with adapters {list(adapters) or 'none'}; OpenAI API at "
              f"{url}/v1, chat at {url}/" + (f", arena at {url}/arena (judgments -> {a.judgments})" if arena else "")
              + ("; API key required" if api_key else ""), file=sys.stderr)
        server = uvicorn.Server(uvicorn.Config(app, log_level=a.log_level, timeout_graceful_shutdown=5))
        _serve_http_beside(server, sock, scheduler)
    finally:
        if scheduler is not None:
            scheduler.close()
        sock.close()
    return 0


def _serve_http_beside(server, sock, scheduler) -> None:
    """uvicorn on a second thread, the engine on this (the main) thread, until Ctrl-C, SIGTERM or
    the HTTP server stops (see Note: The engine on the main thread in fourbit.serve.scheduler)."""
    import signal
    import threading

    def http():
        try:
            server.run(sockets=[sock])  # off the main thread uvicorn installs no signal handlers
        finally:
            scheduler.close()  # the HTTP side is gone (stopped or failed): so is the engine loop

    def stop(signum, frame):
        raise KeyboardInterrupt

    # both, as uvicorn does on the main thread: a SIGINT ignored by the parent (a background job)
    # must still stop the server
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="fourbit-http", daemon=True)
    thread.start()
    try:
        scheduler.run_here()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.should_exit = True  # graceful: open streams end (the scheduler ended them), then exit
        thread.join(10)
