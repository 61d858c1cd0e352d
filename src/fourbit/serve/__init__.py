"""`fourbit serve`: one 4-bit base model, many LoRA adapters, an OpenAI-compatible HTTP API.

One property only a 4-bit base with unmerged adapters has: one copy of the base in memory
serves every adapter at once. Requests for different adapters are decoded together, one
batched forward per step, each row applying its own adapter (`fourbit.engine`); this package
puts that engine behind HTTP:

    scheduler.py  the one thread that calls the engine; token streams back to the requests
    text.py       incremental detokenization (never half a character) and stop strings
    protocol.py   OpenAI request checks, error objects and response shapes
    app.py        the Starlette app: /v1 routes, run-time adapters, pages; a background runner
    arena.py      human pairwise judging and its leaderboard (QLoRA §6's raters, then Elo)
    pages/        the chat, arena and leaderboard pages: plain HTML and a little JS

Starlette and uvicorn are the optional extra `serve` (pip install 'fourbit[serve]'), imported
only when an app is built.
"""

from fourbit.serve.app import Limits, ServerThread, build_app, create_app
from fourbit.serve.arena import Arena
from fourbit.serve.scheduler import Scheduler, TokenStream
from fourbit.serve.text import TextDecoder

__all__ = ["build_app", "create_app", "Limits", "ServerThread", "Scheduler", "TokenStream", "Arena", "TextDecoder"]
