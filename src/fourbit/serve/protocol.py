"""The OpenAI wire format: request bodies checked into typed requests, errors, response objects.

Checks follow OpenAI's own: a bad field is a 400 whose error names it in `param`, an unknown
model a 404 with code `model_not_found`, a prompt that does not fit a 400 with code
`context_length_exceeded`. Fields a client may send that change nothing here (`user`,
`frequency_penalty: 0`, `logprobs: false`, ...) are accepted; fields that would change the answer
and that we do not implement (`n > 1`, `logprobs: true`, tools, nonzero penalties) are refused
by name, so a client never gets silently different behaviour. Error messages never echo header
values (the API key) and quote request values only when they are short.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

MAX_STOP_STRINGS = 4  # OpenAI's limit
_ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Sampling:
    """How to decode one request (the engine's submit arguments, less the prompt and adapter)."""

    max_tokens: int | None = None  # None: as many as the context and the server's cap allow
    temperature: float = 1.0  # OpenAI's default; 0 is greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenerationRequest:
    """A checked /v1/chat/completions or /v1/completions body."""

    model: str
    messages: list[dict] | None = None  # chat: [{"role", "content": str}]
    prompt: str | list[int] | None = None  # completions: text or token ids
    sampling: Sampling = field(default_factory=Sampling)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts


def short(value) -> str:
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False, open_lo: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool) or not lo <= v <= hi or (open_lo and v == lo):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"{name} must be {kind} in {'(' if open_lo else '['}{lo:g}, {hi:g}], got {short(v)}",
                       param=name)
    return v


def _refuse_unless(body: dict, name: str, allowed: tuple, what: str) -> None:
    if name in body and body[name] not in allowed:
        raise ApiError(400, f"{name}={short(body[name])} is not supported by this server ({what})", param=name)


def _sampling(body: dict, max_tokens_cap: int) -> Sampling:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, f"{name} must be a positive integer, got {short(max_tokens)}", param=name)
        if max_tokens > max_tokens_cap:
            raise ApiError(400, f"{name} is {max_tokens}, over this server's cap of {max_tokens_cap} "
                                f"(fourbit serve --max-new-tokens)", param=name)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or \
            not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop):
        raise ApiError(400, f"stop must be a string or a list of up to {MAX_STOP_STRINGS} non-empty strings "
                            f"(at most 256 characters each)", param="stop")
    for name in ("frequency_penalty", "presence_penalty"):
        _refuse_unless(body, name, (0, 0.0, None), "no penalties")
    _refuse_unless(body, "n", (1, None), "one choice per request")
    _refuse_unless(body, "logit_bias", (None, {}), "no logit bias")
    return Sampling(max_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
                    top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, open_lo=True)),
                    seed=_number(body, "seed", None, 0, 2**63 - 1, integer=True), stop=stop)


def _common(body: dict) -> tuple[str, bool, bool]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: the base model's name or an adapter's (GET /v1/models lists them)",
                       param="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(400, f"stream must be true or false, got {short(stream)}", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    return model, bool(stream), bool(opts.get("include_usage", False))


def _content(msg: dict, i: int) -> str:
    c = msg.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: only text is understood
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
            return "".join(p["text"] for p in c)
        raise ApiError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
    if c is None and msg.get("role") == "assistant":
        return ""
    raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")


def parse_chat(body: dict, max_tokens_cap: int) -> GenerationRequest:
    model, stream, include_usage = _common(body)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
    checked = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            got = m.get("role") if isinstance(m, dict) else m
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {short(got)}",
                           param=f"messages[{i}].role")
        checked.append({"role": m["role"], "content": _content(m, i)})
    _refuse_unless(body, "tools", (None, []), "no tool calls")
    _refuse_unless(body, "logprobs", (None, False), "no log-probabilities")
    return GenerationRequest(model, messages=checked, sampling=_sampling(body, max_tokens_cap), stream=stream,
                             include_usage=include_usage)


def parse_completion(body: dict, max_tokens_cap: int) -> GenerationRequest:
    model, stream, include_usage = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    is_ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not (isinstance(prompt, str) and prompt) and not is_ids:
        raise ApiError(400, "prompt must be a non-empty string or a list of token ids (one prompt per request)",
                       param="prompt")
    for name in ("echo", "logprobs", "suffix", "best_of"):
        _refuse_unless(body, name, (None, False, 1) if name == "best_of" else (None, False, ""), "not implemented")
    return GenerationRequest(model, prompt=prompt, sampling=_sampling(body, max_tokens_cap), stream=stream,
                             include_usage=include_usage)


# -- responses -----------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish: str | None, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None, "usage": use,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}]}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, use: dict | None = None) -> dict:
    choices = [] if use is not None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "system_fingerprint": None, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def completion_response(rid: str, model: str, text: str, finish: str | None, use: dict | None) -> dict:
    """A text_completion: the whole answer, or (stream) one chunk of it; use=None in chunks."""
    out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
           "system_fingerprint": None,
           "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if use is not None:
        out["usage"] = use
    return out
