"""The HTTP app: OpenAI-compatible routes, run-time adapters, the web pages and the arena's API.

Built on Starlette (the core of FastAPI) rather than FastAPI itself: request bodies are checked
by `fourbit.serve.protocol` into OpenAI-shaped errors (FastAPI's validation answers 422 in its
own shape), and FastAPI's schema pages load their scripts from a CDN, which a server that must
work offline should not serve.

Safe by default (the command binds 127.0.0.1 unless told otherwise):
- With an API key, every /v1 and /arena/api route needs `Authorization: Bearer KEY` (compared
  in constant time); the pages and /health hold no data and need none. The key is never logged
  and never echoed in an error.
- A body over `Limits.max_body_bytes` is refused with 413 before it is parsed; max_tokens over
  `Limits.max_new_tokens` is a 400; more than `Limits.max_pending` requests at once get 503.
- No request names a file to read. Chat and completion requests name a model the operator
  loaded. Adapters load at run time only from directories under the operator's adapter root
  (`fourbit serve --adapter-dir DIR`): `POST /v1/adapters {"name", "path"}` takes `path`
  relative to that root, resolved (symlinks included) and refused unless it stays inside it.
  Without a root, loading at run time is off (403); unloading still works.
- Pages are sent with a Content-Security-Policy that allows nothing outside this server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fourbit.errors import UserError, redact
from fourbit.serve import protocol
from fourbit.serve.protocol import ApiError, GenerationRequest
from fourbit.serve.scheduler import Scheduler
from fourbit.serve.text import TextDecoder

log = logging.getLogger("fourbit.serve")
PAGES = Path(__file__).with_name("pages")
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'")


@dataclass
class Limits:
    """What one request may ask of the server."""

    max_new_tokens: int = 512  # cap on max_tokens; also the default when a request gives none
    context_length: int = 2048  # prompt + answer tokens (the engine's max_seq_len)
    max_body_bytes: int = 1 << 20  # request body, bytes
    max_pending: int = 256  # requests decoding or waiting for a batch slot; more get 503


class _Run:
    """One request's generation as text pieces, with its token counts and finish reason."""

    def __init__(self, stream, decoder: TextDecoder, prompt_tokens: int, stop_ids: set[int]):
        self.stream, self.decoder, self.stop_ids = stream, decoder, stop_ids
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        self.finish_reason: str | None = None  # None while running, and when cancelled

    async def pieces(self):
        async for ev in self.stream:
            self.completion_tokens += 1
            stop_token = ev.finished and ev.finish_reason == "stop" and ev.token_id in self.stop_ids
            piece = "" if stop_token else self.decoder.push(ev.token_id)
            if self.decoder.stopped:  # a stop string: cut there, free the slot
                self.finish_reason = "stop"
                self.stream.cancel()
                if piece:
                    yield piece
                return
            if ev.finished:
                piece += self.decoder.finish()
                self.finish_reason = ev.finish_reason or "stop"
            if piece:
                yield piece

    def usage(self) -> dict:
        return protocol.usage(self.prompt_tokens, self.completion_tokens)

    def cancel(self) -> None:
        self.stream.cancel()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error(e: ApiError):
    from starlette.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status)


class _Server:
    """The routes' shared state: scheduler, tokenizer, adapters, limits, key, arena."""

    def __init__(self, scheduler: Scheduler, tokenizer, base_name: str, limits: Limits, api_key: str | None,
                 adapter_dir: str | Path | None, adapters: list[str], stop_token_ids: list[int], arena):
        self.scheduler, self.tok, self.base_name, self.limits = scheduler, tokenizer, base_name, limits
        self._key = api_key.encode() if api_key else None
        self.adapter_root = Path(adapter_dir).resolve() if adapter_dir else None
        self.adapters = list(adapters)
        self._loading: set[str] = set()  # names being loaded: a second POST for one gets 409
        self.stop_ids = sorted(set(stop_token_ids))
        self.arena = arena

    # -- request plumbing ---------------------------------------------------------------------
    def check_key(self, request) -> None:
        if self._key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
            what = "no API key was given" if not auth else "the API key is wrong"
            raise ApiError(401, f"{what}: send the header 'Authorization: Bearer <key>' with the key this server "
                                f"was started with", code="invalid_api_key")

    async def read_json(self, request) -> dict:
        cap = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise ApiError(413, f"request body of {int(declared)} bytes is over this server's limit of {cap}",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cap:
                raise ApiError(413, f"request body is over this server's limit of {cap} bytes",
                               code="request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e.msg if hasattr(e, 'msg') else e})",
                           code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                           code="invalid_json")
        return data

    def adapter_of(self, model: str) -> str | None:
        if model == self.base_name:
            return None
        if model in self.adapters:
            return model
        raise ApiError(404, f"model {protocol.short(model)} does not exist here; served: "
                            f"{', '.join([self.base_name, *self.adapters])}", param="model", code="model_not_found")

    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        if req.messages is not None:
            from fourbit.generate import render

            try:
                text = render(self.tok, req.messages)
            except Exception as e:  # noqa: BLE001 - the template's own message says what it refused
                raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from None
            return self.tok(text, add_special_tokens=False)["input_ids"]
        if isinstance(req.prompt, str):
            return self.tok(req.prompt, add_special_tokens=False)["input_ids"]
        return list(req.prompt)

    async def start(self, req: GenerationRequest) -> _Run:
        adapter = self.adapter_of(req.model)
        ids = self.prompt_ids(req)
        room = self.limits.context_length - len(ids)
        s = req.sampling
        if room < 1 or (s.max_tokens is not None and s.max_tokens > room):
            raise ApiError(400, f"this model's context is {self.limits.context_length} tokens; the prompt has "
                                f"{len(ids)}" + (f" and max_tokens asks for {s.max_tokens} more" if s.max_tokens
                                                 else "") + ". Shorten the prompt or ask for fewer tokens",
                           param="messages" if req.messages is not None else "prompt",
                           code="context_length_exceeded")
        if self.scheduler.running >= self.limits.max_pending:
            raise ApiError(503, f"the server is busy ({self.scheduler.running} requests running or waiting); "
                                f"retry shortly", code="overloaded")
        try:
            stream = await self.scheduler.submit(
                ids, adapter=adapter, max_new_tokens=s.max_tokens or min(self.limits.max_new_tokens, room),
                temperature=s.temperature, top_p=s.top_p, seed=s.seed, stop_token_ids=self.stop_ids)
        except UserError as e:
            raise ApiError(400, str(e)) from None
        return _Run(stream, TextDecoder(self.tok, s.stop), len(ids), set(self.stop_ids))

    # -- adapters -------------------------------------------------------------------------------
    def adapter_path(self, path) -> Path:
        if self.adapter_root is None:
            raise ApiError(403, "loading adapters at run time is off: start the server with --adapter-dir DIR "
                                "and name a directory under it", code="adapter_loading_disabled")
        if not isinstance(path, str) or not path or Path(path).is_absolute():
            raise ApiError(400, "path must be a directory relative to the server's adapter directory",
                           param="path")
        resolved = (self.adapter_root / path).resolve()
        if not resolved.is_relative_to(self.adapter_root):
            raise ApiError(400, "path must stay inside the server's adapter directory", param="path")
        if not resolved.is_dir():
            raise ApiError(404, f"no adapter directory {protocol.short(path)} under the adapter directory",
                           param="path", code="adapter_not_found")
        return resolved

    async def add_adapter(self, name, path) -> None:
        if not isinstance(name, str) or not ADAPTER_NAME.match(name) or name == self.base_name:
            raise ApiError(400, "name must be 1-64 letters, digits, '.', '_' or '-' (starting with a letter or "
                                "digit) and differ from the base model's name", param="name")
        directory = self.adapter_path(path)
        if name in self.adapters or name in self._loading:
            raise ApiError(409, f"an adapter named {name!r} is loaded already; DELETE /v1/adapters/{name} first",
                           param="name", code="adapter_exists")
        self._loading.add(name)
        try:
            await asyncio.wrap_future(self.scheduler.call(lambda engine: engine.add_adapter(name, str(directory))))
        except UserError as e:
            raise ApiError(400, f"cannot load that adapter: {e}".replace(str(self.adapter_root), "<adapter-dir>"),
                           param="path") from None
        finally:
            self._loading.discard(name)
        self.adapters.append(name)

    async def remove_adapter(self, name: str) -> None:
        """Unlisted at once; requests already submitted with it finish with its weights (the engine's rule)."""
        if name not in self.adapters:
            raise ApiError(404, f"no adapter named {protocol.short(name)} is loaded", code="model_not_found")
        self.adapters.remove(name)  # first, so no new request picks it
        await asyncio.wrap_future(self.scheduler.call(lambda engine: engine.remove_adapter(name)))


async def _cancel_on_disconnect(request, run: _Run) -> None:
    """Cancel `run` when the client goes away (or once the response is complete: then a no-op)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            run.cancel()
            return


def create_app(scheduler: Scheduler, tokenizer, base_name: str, *, limits: Limits | None = None,
               api_key: str | None = None, adapter_dir: str | Path | None = None, adapters: list[str] = (),
               stop_token_ids: list[int] = (), arena=None):
    """The Starlette app. `scheduler` is started by the caller; `adapters` are those already in the engine."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    srv = _Server(scheduler, tokenizer, base_name, limits or Limits(), api_key, adapter_dir, list(adapters),
                  list(stop_token_ids), arena)
    if arena is not None:
        arena.answer_fn = lambda model, question: _answer(srv, model, question)

    def api(auth: bool = True):
        """Route decorator: the key check, and ApiError -> OpenAI-shaped JSON."""
        def wrap(fn):
            async def endpoint(request):
                try:
                    if auth:
                        srv.check_key(request)
                    return await fn(request)
                except ApiError as e:
                    return _error(e)
            return endpoint
        return wrap

    @api(auth=False)
    async def health(request):
        # counts only: /health needs no key, so it names no model or adapter
        return JSONResponse({"status": "ok", "running": scheduler.running, "steps": scheduler.steps,
                             "widest_step": scheduler.widest_step})

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": 0, "owned_by": "fourbit"}
        return card | ({"parent": base_name} if name != base_name else {})

    @api()
    async def models(request):
        return JSONResponse({"object": "list", "data": [model_card(n) for n in [base_name, *srv.adapters]]})

    @api()
    async def model(request):
        name = request.path_params["name"]
        srv.adapter_of(name)
        return JSONResponse(model_card(name))

    async def respond(request, req: GenerationRequest, chat: bool):
        run = await srv.start(req)
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        watch = asyncio.create_task(_cancel_on_disconnect(request, run))
        if not req.stream:
            try:
                text = "".join([p async for p in run.pieces()])
            except RuntimeError as e:
                raise ApiError(500, redact(str(e), [api_key])) from None
            finally:
                watch.cancel()
                run.cancel()
            build = protocol.chat_response if chat else protocol.completion_response
            return JSONResponse(build(rid, req.model, text, run.finish_reason, run.usage()))

        def chunk(piece: str, finish: str | None = None) -> dict:
            if chat:
                return protocol.chat_chunk(rid, req.model, {"content": piece} if piece or finish is None else {},
                                           finish)
            return protocol.completion_response(rid, req.model, piece, finish, None)

        async def events():
            try:
                if chat:
                    yield _sse(protocol.chat_chunk(rid, req.model, {"role": "assistant", "content": ""}, None))
                async for piece in run.pieces():
                    yield _sse(chunk(piece))
                if run.finish_reason is None:  # cancelled: the client is gone
                    return
                yield _sse(chunk("", run.finish_reason))
                if req.include_usage:
                    use = run.usage()
                    yield _sse(protocol.chat_chunk(rid, req.model, {}, None, use) if chat else
                               {"id": rid, "object": "text_completion", "model": req.model, "choices": [],
                                "usage": use})
                yield "data: [DONE]\n\n"
            except RuntimeError as e:  # the engine failed or the adapter was unloaded mid-answer
                yield _sse(ApiError(500, redact(str(e), [api_key])).body())
            finally:
                watch.cancel()
                run.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api()
    async def chat_completions(request):
        req = protocol.parse_chat(await srv.read_json(request), srv.limits.max_new_tokens)
        return await respond(request, req, chat=True)

    @api()
    async def completions(request):
        req = protocol.parse_completion(await srv.read_json(request), srv.limits.max_new_tokens)
        return await respond(request, req, chat=False)

    @api()
    async def add_adapter(request):
        body = await srv.read_json(request)
        await srv.add_adapter(body.get("name"), body.get("path"))
        return JSONResponse(model_card(body["name"]), status_code=201)

    @api()
    async def remove_adapter(request):
        name = request.path_params["name"]
        await srv.remove_adapter(name)
        return JSONResponse({"id": name, "object": "model", "deleted": True})

    def page(name: str):
        async def send(request):
            return FileResponse(PAGES / name, headers={"Content-Security-Policy": _CSP,
                                                       "X-Content-Type-Options": "nosniff",
                                                       "Cache-Control": "no-cache"})
        return send

    routes = [
        Route("/", page("chat.html")),
        Route("/arena", page("arena.html")),
        Route("/leaderboard", page("leaderboard.html")),
        Route("/static/fourbit.css", page("fourbit.css")),
        Route("/static/fourbit.js", page("fourbit.js")),
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/models/{name:path}", model),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/adapters", add_adapter, methods=["POST"]),
        Route("/v1/adapters/{name}", remove_adapter, methods=["DELETE"]),
    ]
    if arena is not None:
        from fourbit.serve.arena import arena_routes

        routes += arena_routes(arena, api, srv.read_json)

    async def http_error(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))

    async def server_error(request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error(ApiError(500, f"internal error ({type(exc).__name__}); the server log has the details"))

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


def build_app(model, tokenizer, base_name: str, *, adapters: dict[str, str] | None = None, max_batch: int = 8,
              limits: Limits | None = None, api_key: str | None = None, adapter_dir: str | Path | None = None,
              arena=None, start: bool = True):
    """(app, scheduler) for a loaded model: the engine with its adapters, its thread started (start=False:
    not started; the caller runs `scheduler.run_here()`), the app.

    What `fourbit serve` runs, and what tests and benchmarks build; call `scheduler.close()` when done.
    `limits.context_length` becomes the engine's max_seq_len, whose KV cache is allocated for
    max_batch rows of that length up front (default: the model's context, at most 2048)."""
    from fourbit.engine import Engine

    limits = limits or Limits(context_length=default_context(model))
    engine = Engine(model, tokenizer, max_batch=max_batch, max_seq_len=limits.context_length)
    for name, path in (adapters or {}).items():
        engine.add_adapter(name, str(path))
    served = {base_name, *(adapters or {})}
    unknown = [s for s in (arena.live if arena else []) if s not in served]
    if unknown:
        raise UserError(f"--arena live:{unknown[0]}: no served model of that name; served: {sorted(served)}")
    scheduler = Scheduler(engine).start() if start else Scheduler(engine)
    app = create_app(scheduler, tokenizer, base_name, limits=limits, api_key=api_key, adapter_dir=adapter_dir,
                     adapters=list(adapters or {}), stop_token_ids=stop_token_ids(model, tokenizer), arena=arena)
    return app, scheduler


def default_context(model, cap: int = 2048) -> int:
    """The model's context, at most `cap` tokens (the KV cache holds max_batch rows of it)."""
    return min(int(getattr(model.config, "max_position_embeddings", None) or cap), cap)


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-turn tokens: the tokenizer's eos and the generation config's (one id or a list)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen) if isinstance(gen, (list, tuple)) else {gen} if gen is not None else set()
    return sorted(ids)


async def _answer(srv: _Server, model: str, question: str) -> str:
    """A greedy answer to one question, for the arena's live systems."""
    req = GenerationRequest(model, messages=[{"role": "user", "content": question}],
                            sampling=protocol.Sampling(temperature=0.0))
    run = await srv.start(req)
    try:
        return "".join([p async for p in run.pieces()]).strip()
    finally:
        run.cancel()


def bind(host: str, port: int):
    """(listening socket, its base URL): bound before uvicorn starts, so port 0 gives a known free port."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port (0: any free one)"
                        ) from None
    sock.listen(2048)
    shown = f"[{host}]" if ":" in host else host
    return sock, f"http://{shown}:{sock.getsockname()[1]}"


class ServerThread:
    """uvicorn serving an app on a background thread, on a free loopback port unless told otherwise.

    For tests, benchmarks and notebooks: `with ServerThread(app) as url: ...` (url like
    http://127.0.0.1:PORT); leaving the block stops uvicorn and waits for its thread."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock, self.url = bind(host, port)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="fourbit-http", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
