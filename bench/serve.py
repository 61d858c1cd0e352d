"""`fourbit serve` under load, on loopback: concurrent streaming clients over two adapters and the
base, against the same requests served one at a time and against transformers' own generate.

    python bench/serve.py            # 32 clients, 64 tokens each, concurrency 8 and 32, A-B-B-A
    python bench/serve.py --quick    # 9 clients, 8 tokens: a smoke run (about a minute on 2 cores)

The server is the real command (`fourbit serve`, the embedded SmolLM2-135M in NF4, two random
LoRA adapters r=8 written to a temporary directory, --max-batch 32, an API key) in its own
process, so the clients below do not share its interpreter. Each client is a thread with a plain
http.client connection that reads the server-sent events as they come: time to first token is
from sending the request to the first content chunk; time per output token is (last chunk - first
chunk) / (tokens - 1) per request. Requests are greedy, so every response is checked against the
same request served alone (the sequential pass): any difference is a lost or mixed-up token and
fails the run. transformers' generate (batch 1, greedy, the same 4-bit model with the adapter
loaded) is the baseline a user would otherwise run; its tokens are compared too (reported, not
asserted: a kv-cached path may break a near-tie differently).

Then the faults, each with its HTTP status and OpenAI error code, and after them one normal
request that must still be answered: malformed JSON, unknown model, prompt longer than the
context, max_tokens over the cap, body over the size limit, missing and wrong API key, and a
client that drops a stream mid-answer (its batch slot must be free within a second).
Timings on a shared CPU are noisy: the sequential and concurrent passes run A-B-B-A and each
figure is the mean of its two passes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ROOT.parent / "shared" / "data" / "vicuna" / "question.jsonl"
FALLBACK = ["Explain why the sky is blue.", "Give three tips for better sleep.", "What is a hash table?",
            "Write a haiku about autumn.", "How do vaccines work?", "Summarize the plot of Hamlet.",
            "What is the difference between weather and climate?", "How do I boil an egg?"]
KEY_ENV, KEY = "FOURBIT_BENCH_KEY", "bench-" + os.urandom(6).hex()


@dataclass
class Result:
    status: int = 0
    text: str = ""
    tokens: int = 0
    ttft: float = 0.0  # s, send -> first content chunk
    chunk_times: list[float] = field(default_factory=list)
    seconds: float = 0.0  # s, send -> [DONE]
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """s per output token after the first."""
        if self.tokens < 2 or len(self.chunk_times) < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.tokens - 1)


def stream(port: int, body: dict, key: str | None = KEY, timeout: float = 600) -> Result:
    """One streamed chat completion over a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    res = Result()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True,
                                                              "stream_options": {"include_usage": True}}), headers)
    r = conn.getresponse()
    res.status = r.status
    if r.status != 200:
        res.error = r.read().decode()
        conn.close()
        return res
    pieces = []
    for line in r:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        obj = json.loads(data)
        if "error" in obj:
            res.error = obj["error"]["message"]
            break
        if obj.get("usage"):
            res.tokens = obj["usage"]["completion_tokens"]
        for ch in obj.get("choices", []):
            if ch["delta"].get("content"):
                now = time.perf_counter()
                res.ttft = res.ttft or now - t0
                res.chunk_times.append(now)
                pieces.append(ch["delta"]["content"])
    res.seconds = time.perf_counter() - t0
    res.text = "".join(pieces)
    conn.close()
    return res


def request(port: int, method: str, path: str, raw: bytes | None = None, key: str | None = KEY) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request(method, path, raw, headers)
    r = conn.getresponse()
    status, text = r.status, r.read().decode()
    conn.close()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, {"raw": text[:200]}


# -- setup --------------------------------------------------------------------------------------
def make_adapters(model_dir: Path, out: Path, n: int = 2) -> dict[str, Path]:
    """Random LoRA adapters (r=8, every linear layer); B ~ N(0, 0.02) so answers stay fluent but differ."""
    import torch
    from transformers import AutoModelForCausalLM

    from fourbit.nn import add_lora, lora_modules, save_adapter

    paths = {}
    for i in range(n):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        add_lora(model, r=8, alpha=16, dropout=0.0, verbose=False)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.02)
        paths[f"adapter{i + 1}"] = save_adapter(model, out / f"adapter{i + 1}")
    return paths


def prompts(n: int) -> list[str]:
    if QUESTIONS.is_file():
        qs = [json.loads(line)["turns"][0] for line in QUESTIONS.read_text().splitlines() if line.strip()]
    else:
        qs = FALLBACK
    return [qs[i % len(qs)] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, adapters: dict[str, Path], port: int, max_batch: int, cap: int, context: int):
    env = {**os.environ, KEY_ENV: KEY, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-c", "import sys; from fourbit.commands.serve import run; sys.exit(run(sys.argv[1:]))",
           "--model", model, "--port", str(port), "--api-key-env", KEY_ENV, "--max-batch", str(max_batch),
           "--max-new-tokens", str(cap), "--max-seq-len", str(context), "--log-level", "warning",
           *[f"--adapter={k}={v}" for k, v in adapters.items()]]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if request(port, "GET", "/health", key=None)[0] == 200:
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


# -- passes -------------------------------------------------------------------------------------
def run_pass(port: int, bodies: list[dict], concurrency: int) -> tuple[list[Result], float]:
    """All bodies, `concurrency` clients at a time (each client takes the next body when done)."""
    results: list[Result | None] = [None] * len(bodies)
    nxt = iter(range(len(bodies)))
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)

    def client():
        start.wait()
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            try:
                results[i] = stream(port, bodies[i])
            except Exception as e:  # noqa: BLE001 - counted as a failed request
                results[i] = Result(error=f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


@dataclass
class Row:
    name: str
    wall: float
    results: list[Result]

    def figures(self) -> dict:
        ok = [r for r in self.results if r.status == 200 and not r.error]
        tokens = sum(r.tokens for r in ok)
        ttft = sorted(r.ttft for r in ok)
        tpot = sorted(t for r in ok if (t := r.tpot) is not None)
        q = (lambda xs, p: xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))] if xs else float("nan"))
        return {"requests": len(self.results), "ok": len(ok), "req_s": len(ok) / self.wall, "tok_s": tokens / self.wall,
                "ttft_p50": q(ttft, 0.5), "ttft_p99": q(ttft, 0.99), "tpot_p50": q(tpot, 0.5), "tpot_p99": q(tpot, 0.99),
                "tokens": tokens, "wall": self.wall}


def mean_rows(name: str, a: Row, b: Row) -> dict:
    fa, fb = a.figures(), b.figures()
    return {"name": name, **{k: (fa[k] + fb[k]) / 2 for k in fa}}


def hf_generate(model: str, adapters: dict[str, Path], bodies: list[dict], tok_budget: int) -> tuple[dict, list[str]]:
    """transformers' generate, batch 1, greedy, on fourbit's 4-bit model with the adapter loaded."""
    import torch

    from fourbit.generate import render
    from fourbit.models import load_model
    from fourbit.nn import load_adapter

    models, tok = {}, None
    for name in sorted({b["model"] for b in bodies}):
        m, tok = load_model(model, quant="nf4", device="cpu")
        if name in adapters:
            load_adapter(m, adapters[name])
        models[name] = m
    texts, tokens, ttfts = [], 0, []
    with torch.no_grad():
        for name, m in models.items():  # warm-up
            ids = tok(render(tok, bodies[0]["messages"]), return_tensors="pt", add_special_tokens=False)["input_ids"]
            m.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
        t0 = time.perf_counter()
        for b in bodies:
            ids = tok(render(tok, b["messages"]), return_tensors="pt", add_special_tokens=False)["input_ids"]
            s = time.perf_counter()
            models[b["model"]].generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
            ttfts.append(time.perf_counter() - s)
            out = models[b["model"]].generate(ids, max_new_tokens=b["max_tokens"], do_sample=False,
                                              pad_token_id=tok.pad_token_id)
            new = out[0, ids.shape[1]:]
            tokens += len(new)
            texts.append(tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False))
        wall = time.perf_counter() - t0 - sum(ttfts)  # the max_new_tokens=1 probes measured TTFT only
    ttfts.sort()
    return {"name": "transformers generate, batch 1", "requests": len(bodies), "ok": len(bodies),
            "req_s": len(bodies) / wall, "tok_s": tokens / wall, "ttft_p50": ttfts[len(ttfts) // 2],
            "ttft_p99": ttfts[-1], "tpot_p50": float("nan"), "tpot_p99": float("nan"), "tokens": tokens,
            "wall": wall}, texts


# -- faults -------------------------------------------------------------------------------------
def faults(port: int, base: str, context: int, cap: int) -> list[tuple[str, int, int, str]]:
    """(what, expected status, got status, error code) per fault; each followed by a normal request."""
    chat = lambda **kw: json.dumps({"model": base, "messages": [{"role": "user", "content": "Hi"}],  # noqa: E731
                                    "max_tokens": 4, **kw}).encode()
    cases = [
        ("malformed JSON", 400, dict(raw=b'{"model": ')),
        ("unknown model", 404, dict(raw=chat(model="no-such-adapter"))),
        (f"prompt longer than the context ({context} tokens)", 400,
         dict(raw=chat(messages=[{"role": "user", "content": "word " * (context + 16)}]))),
        (f"max_tokens over the cap ({cap})", 400, dict(raw=chat(max_tokens=cap + 1))),
        ("body over the size limit (1 MiB)", 413, dict(raw=b" " * (1024 * 1024 + 1))),
        ("missing API key", 401, dict(raw=chat(), key=None)),
        ("wrong API key", 401, dict(raw=chat(), key=KEY + "x")),
    ]
    rows = []
    for what, expected, kw in cases:
        status, body = request(port, "POST", "/v1/chat/completions", **kw)
        err = body.get("error") or {}
        code = err.get("code") or (f"param {err['param']}" if err.get("param") else err.get("type", "-"))
        ok_status, _ = request(port, "POST", "/v1/chat/completions", raw=chat())
        rows.append((what, expected, status if ok_status == 200 else -ok_status, f"{code}; next request {ok_status}"))
    rows.append(dropped_stream(port, base))
    return rows


def dropped_stream(port: int, base: str) -> tuple[str, int, int, str]:
    """A client reads two chunks of a long stream and hangs up: how long until its slot is free."""
    body = json.dumps({"model": base, "messages": [{"role": "user", "content": "Tell me a long story."}],
                       "max_tokens": 256, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        got = b""
        while got.count(b"data: ") < 3:
            got += s.recv(4096)
    t0 = time.perf_counter()
    while request(port, "GET", "/health", key=None)[1].get("running", 1) and time.perf_counter() - t0 < 30:
        time.sleep(0.005)
    freed = time.perf_counter() - t0
    return ("client drops a stream after 2 chunks", 200, 200, f"slot free after {freed * 1000:.0f} ms")


# -- report -------------------------------------------------------------------------------------
def table(rows: list[dict], base_tok_s: float) -> str:
    out = ["| run | requests (ok) | requests/s | tokens/s | vs one at a time | TTFT p50 / p99 (s) | "
           "time per token p50 / p99 (ms) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tp = "-" if r["tpot_p50"] != r["tpot_p50"] else f"{r['tpot_p50'] * 1e3:.0f} / {r['tpot_p99'] * 1e3:.0f}"
        out.append(f"| {r['name']} | {r['requests']} ({r['ok']}) | {r['req_s']:.2f} | {r['tok_s']:.1f} | "
                   f"{r['tok_s'] / base_tok_s:.2f}x | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | {tp} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="9 requests of 8 tokens, concurrency 9: a smoke run")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens per request (greedy)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' generate baseline")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    a = ap.parse_args()
    if a.quick:
        a.requests, a.tokens, a.concurrency = 9, 8, [9]
    sys.path.insert(0, str(ROOT / "src"))
    from fourbit.models import resolve_source

    model_dir = resolve_source(a.model)
    base = Path(str(a.model).rstrip("/")).name
    context, cap = 512, 256
    with tempfile.TemporaryDirectory(prefix="fourbit-bench-serve-") as tmp:
        adapters = make_adapters(model_dir, Path(tmp))
        names = [base, *adapters]
        bodies = [{"model": names[i % 3], "messages": [{"role": "user", "content": p}], "max_tokens": a.tokens,
                   "temperature": 0} for i, p in enumerate(prompts(a.requests))]
        port = free_port()
        t_start = time.perf_counter()
        proc = start_server(a.model, adapters, port, a.max_batch, cap, context)
        print(f"server up in {time.perf_counter() - t_start:.1f} s (pid {proc.pid}, port {port}); "
              f"{len(bodies)} requests x {a.tokens} tokens over {names}", file=sys.stderr)
        try:
            run_pass(port, bodies[:3], 3)  # warm-up: every model once
            passes: dict[str, list[Row]] = {}
            order = ["seq", *[f"c{c}" for c in a.concurrency]]
            for name in order + order[::-1] if not a.quick else order:  # A-B-B-A: drift cancels in the means
                conc = 1 if name == "seq" else int(name[1:])
                results, wall = run_pass(port, bodies, conc)
                passes.setdefault(name, []).append(Row(name, wall, results))
                print(f"  pass {name}: {wall:.1f} s", file=sys.stderr)
            seq = passes["seq"][0].results
            mismatched = [(i, b["model"]) for name, rows in passes.items() for row in rows
                          for i, (r, b) in enumerate(zip(row.results, bodies))
                          if r.error or r.text != seq[i].text or r.tokens != seq[i].tokens]
            fault_rows = faults(port, base, context, cap)
            health = request(port, "GET", "/health", key=None)[1]
        finally:
            proc.terminate()
            proc.wait(30)
        rows = []
        for name, rs in passes.items():
            label = "one at a time" if name == "seq" else f"{name[1:]} concurrent clients"
            rows.append(mean_rows(label, rs[0], rs[-1]) if len(rs) > 1 else {"name": label, **rs[0].figures()})
        hf_texts = []
        if not a.no_hf:
            hf_row, hf_texts = hf_generate(a.model, adapters, bodies, a.tokens)
            rows.append(hf_row)
    seq_tok_s = rows[0]["tok_s"]
    print(f"\n## fourbit serve: {a.model} NF4, base + 2 adapters, {a.requests} streamed greedy requests of "
          f"{a.tokens} tokens, --max-batch {a.max_batch}\n")
    print(table(rows, seq_tok_s))
    print(f"\nResponses identical to the one-at-a-time pass: {sum(len(r) for r in passes.values()) * len(bodies) - len(mismatched)}"
          f" of {sum(len(r) for r in passes.values()) * len(bodies)}"
          + (f"; MISMATCHES: {mismatched[:10]}" if mismatched else ""))
    if hf_texts:
        same = sum(t == r.text for t, r in zip(hf_texts, seq))
        print(f"Server text equal to transformers' generate: {same} of {len(seq)}")
    print(f"Widest step seen by the server: {health.get('widest_step')} requests decoded together\n")
    print("| fault | expected | got | error code; what followed |\n|---|---:|---:|---|")
    for what, expected, got, code in fault_rows:
        print(f"| {what} | {expected} | {got}{'' if got == expected else ' (WRONG)'} | {code} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "faults": fault_rows, "mismatched": mismatched}, indent=2))
    bad = mismatched or any(g != e for _, e, g, _ in fault_rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
