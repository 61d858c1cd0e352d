"""`fourbit serve` over HTTP on 127.0.0.1, driven by the official `openai` client and raw requests.

Oracles: transformers' own greedy `generate` on the same 4-bit model with the same adapter
loaded (token-for-token text), the same request served alone (batch invariance), the OpenAI
error shape, and `fourbit judge`'s endpoint judge as a real consumer. A tiny random Llama with
SmolLM2's tokenizer and chat template keeps every test to seconds; request counts are bounded.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import requires_smollm2

pytest.importorskip("starlette", reason="fourbit serve needs the 'serve' extra: pip install 'fourbit[serve]'")
pytest.importorskip("uvicorn", reason="fourbit serve needs the 'serve' extra: pip install 'fourbit[serve]'")
openai = pytest.importorskip("openai", reason="the official openai client is a test extra: pip install -e '.[test]'")
pytest.importorskip("fourbit.engine", reason="fourbit.engine (the batched decoding engine) is not in this tree")

from serve_helpers import BASE, hf_greedy, http, make_adapter, running_server  # noqa: E402

pytestmark = requires_smollm2
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def dirs(tiny_chat_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"model": tiny_chat_dir, "root": root,
            "alpha": make_adapter(tiny_chat_dir, root / "alpha", seed=1),
            "beta": make_adapter(tiny_chat_dir, root / "beta", seed=2)}


@pytest.fixture(scope="module")
def server(dirs):
    """(url, scheduler) serving the base, alpha and beta, 4 rows per step, max_tokens capped at 32."""
    from fourbit.serve import Limits

    with running_server(dirs["model"], {"alpha": dirs["alpha"], "beta": dirs["beta"]}, max_batch=4,
                        limits=Limits(max_new_tokens=32, context_length=128, max_body_bytes=64 * 1024),
                        adapter_dir=dirs["root"]) as s:
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_base_and_each_adapter(client):
    cards = client.models.list().data
    assert [m.id for m in cards] == [BASE, "alpha", "beta"]
    assert client.models.retrieve("alpha").id == "alpha"


def test_greedy_chat_matches_transformers_generate_for_base_and_each_adapter(client, dirs):
    answers = {}
    for model in (BASE, "alpha", "beta"):
        r = client.chat.completions.create(model=model, messages=HELLO, max_tokens=12, temperature=0)
        expected = hf_greedy(dirs["model"], dirs.get(model), HELLO, 12)
        assert r.choices[0].message.content == expected, model
        assert r.choices[0].message.role == "assistant"
        assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
        answers[model] = expected
    assert len(set(answers.values())) == 3  # the model field really picks the adapter


def test_streaming_chat_equals_the_whole_answer_and_ends_with_done(client, server):
    whole = client.chat.completions.create(model="alpha", messages=HELLO, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="alpha", messages=HELLO, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # streamed, not one blob
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 16
    status, raw = http("POST", server[0] + "/v1/chat/completions",
                       {"model": BASE, "messages": HELLO, "max_tokens": 3, "stream": True})
    assert status == 200 and raw.startswith("data: {") and raw.endswith("data: [DONE]\n\n")


def test_completions_endpoint_and_usage(client):
    r = client.completions.create(model="beta", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.prompt_tokens == 4
    s = list(client.completions.create(model="beta", prompt="Once upon a time", max_tokens=6, temperature=0,
                                       stream=True))
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text


def test_stop_string_cuts_the_answer_streamed_or_not(client):
    full = client.chat.completions.create(model="alpha", messages=HELLO, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = text[:text.find(stop)]
    r = client.chat.completions.create(model="alpha", messages=HELLO, max_tokens=16, temperature=0, stop=[stop])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (cut, "stop")
    chunks = list(client.chat.completions.create(model="alpha", messages=HELLO, max_tokens=16, temperature=0,
                                                 stop=stop, stream=True))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_greedy_output_is_the_same_alone_and_in_a_full_batch_of_other_adapters(client, server):
    """Batch invariance: one request's greedy tokens do not depend on what it is batched with."""
    probe = dict(model="beta", messages=[{"role": "user", "content": "Name three colours."}], max_tokens=20,
                 temperature=0)
    alone = client.chat.completions.create(**probe).choices[0].message.content
    others = [dict(model=m, messages=[{"role": "user", "content": f"Question {i}: why?"}], max_tokens=20,
                   temperature=0.8 if i % 2 else 0, seed=i)
              for i, m in enumerate([BASE, "alpha", "beta", BASE, "alpha", "beta", "alpha"])]
    server[1].widest_step = 0
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(client.chat.completions.create, **kw) for kw in [*others[:3], probe, *others[3:]]]
        results = [f.result(timeout=120) for f in futs]
    assert results[3].choices[0].message.content == alone
    assert all(r.usage.completion_tokens >= 1 for r in results)
    assert server[1].widest_step == 4  # 4 requests (max_batch) got a token from one step


def test_sampling_with_a_seed_is_reproducible(client):
    kw = dict(model="alpha", messages=HELLO, max_tokens=12, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


@pytest.mark.parametrize("case", ["malformed", "not-object", "no-model", "unknown-model", "too-long", "over-cap",
                                  "bad-temperature", "bad-top-p", "bad-role", "n", "body-too-large", "no-route", "wrong-method"])
def test_errors_have_the_openai_shape_and_status_and_the_server_keeps_serving(server, case):
    url = server[0]
    too_long = [{"role": "user", "content": "word " * 200}]
    req = {
        "malformed": ("POST", "/v1/chat/completions", None, b'{"model": "x", "messages": [', 400),
        "not-object": ("POST", "/v1/chat/completions", None, b"[1, 2]", 400),
        "no-model": ("POST", "/v1/chat/completions", {"messages": HELLO}, None, 400),
        "unknown-model": ("POST", "/v1/chat/completions", {"model": "gpt-9", "messages": HELLO}, None, 404),
        "too-long": ("POST", "/v1/chat/completions", {"model": BASE, "messages": too_long}, None, 400),
        "over-cap": ("POST", "/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": 33}, None, 400),
        "bad-temperature": ("POST", "/v1/chat/completions", {"model": BASE, "messages": HELLO, "temperature": -1},
                            None, 400),
        "bad-top-p": ("POST", "/v1/chat/completions", {"model": BASE, "messages": HELLO, "top_p": 0}, None, 400),
        "bad-role": ("POST", "/v1/chat/completions", {"model": BASE, "messages": [{"role": "x", "content": "y"}]},
                     None, 400),
        "n": ("POST", "/v1/chat/completions", {"model": BASE, "messages": HELLO, "n": 2}, None, 400),
        "body-too-large": ("POST", "/v1/chat/completions", None, b" " * (64 * 1024 + 1), 413),
        "no-route": ("GET", "/v1/nothing-here", None, None, 404),
        "wrong-method": ("GET", "/v1/chat/completions", None, None, 405),
    }[case]
    method, path, body, raw, expected = req
    status, out = http(method, url + path, body, raw=raw)
    assert status == expected, out
    assert set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}
    assert out["error"]["message"] and out["error"]["type"] == "invalid_request_error"
    if case == "too-long":
        assert out["error"]["code"] == "context_length_exceeded"
    if case == "over-cap":
        assert out["error"]["param"] == "max_tokens"
    status, ok = http("POST", url + "/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": 2})
    assert status == 200 and ok["usage"]["completion_tokens"] == 2


def test_a_failing_engine_step_ends_its_requests_with_a_500_and_the_server_keeps_serving(server, monkeypatch):
    url, scheduler = server
    real_step, calls = scheduler.engine.step, []

    def step_that_fails_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated device failure")
        return real_step()

    monkeypatch.setattr(scheduler.engine, "step", step_that_fails_once)
    status, out = http("POST", url + "/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": 4})
    assert status == 500 and out["error"]["type"] == "server_error"
    assert "simulated device failure" in out["error"]["message"]
    status, out = http("POST", url + "/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": 4})
    assert status == 200 and out["usage"]["completion_tokens"] == 4
    assert scheduler.running == 0


def test_openai_client_raises_its_own_exception_types(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-adapter", messages=HELLO)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=HELLO, max_tokens=10_000)
    assert e.value.body["param"] == "max_tokens"


def test_a_client_that_disconnects_mid_stream_frees_its_slot_at_once(dirs):
    """One batch slot: a long stream is dropped after two chunks; the next request runs right away."""
    from fourbit.serve import Limits

    with running_server(dirs["model"], max_batch=1, limits=Limits(max_new_tokens=20_000, context_length=20_000)
                        ) as (url, scheduler):
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"model": BASE, "prompt": "x", "max_tokens": 19_000, "stream": True}).encode()
        steps0 = scheduler.steps
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            got = b""
            while got.count(b"data: ") < 2:
                got += s.recv(4096)
            assert scheduler.running == 1
        t0 = time.monotonic()
        while scheduler.running and time.monotonic() - t0 < 5:
            time.sleep(0.002)
        assert scheduler.running == 0 and not scheduler.engine.has_work()
        assert time.monotonic() - t0 < 2 and scheduler.steps - steps0 < 2_000  # cancelled, not run to 19,000
        status, out = http("POST", url + "/v1/completions", {"model": BASE, "prompt": "y", "max_tokens": 4},
                           timeout=30)
        assert status == 200 and out["usage"]["completion_tokens"] == 4


def test_adapters_load_and_unload_at_run_time_only_from_the_adapter_dir(client, server, dirs, tmp_path):
    url = server[0]
    status, card = http("POST", url + "/v1/adapters", {"name": "gamma", "path": "alpha"})
    assert status == 201 and card["id"] == "gamma"
    assert "gamma" in [m.id for m in client.models.list().data]
    same = [client.chat.completions.create(model=m, messages=HELLO, max_tokens=8, temperature=0)
            .choices[0].message.content for m in ("gamma", "alpha")]
    assert same[0] == same[1]  # gamma is alpha's directory
    (dirs["root"] / "escape").symlink_to(tmp_path, target_is_directory=True)
    for bad, status_expected in [({"name": "x", "path": str(dirs["alpha"])}, 400),  # absolute
                                 ({"name": "x", "path": "../"}, 400),  # climbs out
                                 ({"name": "x", "path": "escape"}, 400),  # symlink out of the root
                                 ({"name": "x", "path": "missing"}, 404),
                                 ({"name": "gamma", "path": "beta"}, 409),  # name taken
                                 ({"name": "../x", "path": "beta"}, 400),
                                 ({"name": BASE, "path": "beta"}, 400)]:
        status, out = http("POST", url + "/v1/adapters", bad)
        assert status == status_expected, (bad, out)
        assert "error" in out and str(tmp_path) not in out["error"]["message"]
    status, _ = http("DELETE", url + "/v1/adapters/gamma")
    assert status == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gamma", messages=HELLO, max_tokens=2)
    assert http("DELETE", url + "/v1/adapters/gamma")[0] == 404


def test_unloading_an_adapter_lets_its_running_stream_finish_with_its_weights(client, server, monkeypatch):
    url, scheduler = server
    assert http("POST", url + "/v1/adapters", {"name": "delta", "path": "beta"})[0] == 201
    kw = dict(model="delta", messages=HELLO, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    real_step = scheduler.engine.step
    monkeypatch.setattr(scheduler.engine, "step", lambda: (time.sleep(0.03), real_step())[1])  # ~0.7 s of decoding
    chunks = client.chat.completions.create(**kw, stream=True)
    pieces = [next(chunks).choices[0].delta.content for _ in range(3)]  # role chunk, then two pieces
    assert scheduler.running == 1
    assert http("DELETE", url + "/v1/adapters/delta")[0] == 200  # while the stream is running
    assert scheduler.running == 1
    pieces += [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(p or "" for p in pieces) == whole
    assert http("POST", url + "/v1/chat/completions", kw)[0] == 404  # no new request can pick it


def test_run_time_loading_is_off_without_an_adapter_dir(dirs):
    with running_server(dirs["model"]) as (url, _):
        status, out = http("POST", url + "/v1/adapters", {"name": "a", "path": "alpha"})
        assert status == 403 and out["error"]["code"] == "adapter_loading_disabled"


def test_api_key_is_required_when_set_and_never_logged_or_echoed(dirs, caplog):
    key = "sk-test-" + os.urandom(8).hex()
    caplog.set_level(logging.DEBUG)
    with running_server(dirs["model"], api_key=key, adapter_dir=dirs["root"]) as (url, _):
        chat = {"model": BASE, "messages": HELLO, "max_tokens": 2}
        seen = []
        for headers, expected in [({}, 401), ({"Authorization": "Bearer wrong-" + key}, 401),
                                  ({"Authorization": key}, 401), ({"Authorization": f"Bearer {key}"}, 200)]:
            status, out = http("POST", url + "/v1/chat/completions", chat, headers=headers)
            assert status == expected, out
            seen.append(json.dumps(out))
        assert http("GET", url + "/v1/models")[0] == 401
        assert http("POST", url + "/v1/adapters", {"name": "a", "path": "alpha"})[0] == 401
        assert http("DELETE", url + "/v1/adapters/a")[0] == 401
        assert http("POST", url + "/v1/adapters", {"name": "a", "path": "alpha"},
                    headers={"Authorization": f"Bearer {key}"})[0] == 201
        assert http("GET", url + "/health")[0] == 200  # holds no data
        assert http("GET", url + "/")[0] == 200  # the page asks for the key itself
        c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        assert c.chat.completions.create(model=BASE, messages=HELLO, max_tokens=2).choices[0].message.content \
            is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    assert key not in caplog.text and not any(key in s for s in seen)


def test_fourbit_judge_endpoint_against_the_server(dirs, tmp_path, monkeypatch):
    """fourbit judge --judge endpoint, pointed at fourbit serve, writes a judgment per ordered pair."""
    from fourbit.commands import judge
    from fourbit.eval.judge import judge_prompt
    from fourbit.serve import Limits

    for name in ("a", "b"):
        rows = [{"question_id": q, "model_id": name, "prompt": f"Question {q}?", "text": f"{name} says {q}"}
                for q in (1, 2)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "judgments.jsonl"
    # the endpoint judge asks for max_tokens=512: the server's cap must allow it (fourbit serve's default)
    with running_server(dirs["model"], {"alpha": dirs["alpha"]},
                        limits=Limits(max_new_tokens=512, context_length=1024)) as (url, _):
        monkeypatch.setenv("OPENAI_BASE_URL", url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "unused")
        assert judge.run([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--judge", "endpoint",
                           "--judge-model", "alpha", "--output", str(out), "--limit", "1"]) == 0
        system, user = judge_prompt("Question 1?", "a says 1", "b says 1", None)
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        direct = c.chat.completions.create(model="alpha", temperature=0, max_tokens=512,
                                           messages=[{"role": "system", "content": system},
                                                     {"role": "user", "content": user}]).choices[0].message.content
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and {(r["first"], r["second"]) for r in rows} == {("a", "b"), ("b", "a")}
    assert all(r["judge"] == "alpha" and r["score"] in (-1, 1, 2, 3) for r in rows)
    first = next(r for r in rows if r["first"] == "a")
    assert first["raw"] == direct  # the judge got exactly what the server answers (greedy)


def test_live_arena_answers_are_the_served_models_greedy_answers(dirs, tmp_path):
    from fourbit.serve import Arena, Limits

    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "turns": [t]}) + "\n" for i, t in [(1, "Hi?"), (2, "Why?")]))
    arena = Arena(tmp_path / "j.jsonl", [f"live:{BASE}", "live:alpha"], str(q))
    with running_server(dirs["model"], {"alpha": dirs["alpha"]}, arena=arena,
                        limits=Limits(max_new_tokens=8, context_length=128)) as (url, _):
        status, pair = http("GET", url + "/arena/api/next?rater=tester")
        assert status == 200 and not pair["done"] and pair["total"] == 2
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        expected = {m: c.chat.completions.create(model=m, temperature=0, max_tokens=8,
                                                 messages=[{"role": "user", "content": pair["question"]}])
                    .choices[0].message.content.strip() for m in (BASE, "alpha")}
        assert sorted([pair["a"], pair["b"]]) == sorted(expected.values())


@pytest.mark.slow
def test_command_serves_until_interrupted_and_keeps_the_key_out_of_its_output(dirs, tmp_path):
    """`fourbit serve` as a process: flags, key from the environment, SIGINT stops it cleanly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = "sk-cli-" + os.urandom(8).hex()
    env = {**os.environ, "SERVE_KEY": key, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-c", "import sys; from fourbit.commands.serve import run; sys.exit(run(sys.argv[1:]))",
           "--model", str(dirs["model"]), "--adapter", f"alpha={dirs['alpha']}", "--adapter", f"beta={dirs['beta']}",
           "--port", str(port), "--api-key-env", "SERVE_KEY", "--max-new-tokens", "8", "--log-level", "debug"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if http("GET", url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        auth = {"Authorization": f"Bearer {key}"}
        status, models = http("GET", url + "/v1/models", headers=auth)
        assert status == 200 and [m["id"] for m in models["data"]] == [dirs["model"].name, "alpha", "beta"]
        assert http("POST", url + "/v1/completions", {"model": "beta", "prompt": "hi"}, headers=auth)[1][
            "usage"]["completion_tokens"] == 8  # --max-new-tokens is the default
        assert http("GET", url + "/v1/models", headers={"Authorization": "Bearer " + key[:-1]})[0] == 401
    finally:
        proc.send_signal(2)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "GET /v1/models" in out and key not in out  # access log on, key never in it


def test_command_refuses_bad_flags_naming_each(tmp_path):
    from fourbit.commands.serve import run
    from fourbit.errors import UserError

    with pytest.raises(UserError) as e:
        run(["--adapter", "noequals", "--adapter", f"ok={tmp_path / 'missing'}", "--port", "70000",
              "--api-key-env", "FOURBIT_TEST_UNSET_VAR", "--arena", "only-one.jsonl"])
    msg = str(e.value)
    for part in ("--adapter noequals", "is not a directory", "--port", "FOURBIT_TEST_UNSET_VAR", "--arena"):
        assert part in msg


def test_non_loopback_bind_without_a_key_warns():
    from fourbit.commands.serve import bind_warning

    assert bind_warning("127.0.0.1", None) is None and bind_warning("::1", None) is None
    assert bind_warning("localhost", None) is None and bind_warning("0.0.0.0", "k") is None
    assert "WARNING" in bind_warning("0.0.0.0", None) and "WARNING" in bind_warning("192.168.1.5", None)
