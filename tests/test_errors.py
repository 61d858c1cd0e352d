"""fourbit.errors.redact: credentials never reach a message, ordinary text is left alone."""

import http.server
import json
import threading

import pytest

from fourbit.errors import UserError, redact

KEY = "sk-proj-Abc123def456GHI789jkl012MNO345"


@pytest.mark.parametrize("text,secret_part", [
    (f'{{"error": "bad key {KEY}"}}', KEY),
    (f"Authorization: Bearer {KEY}", KEY),
    ("authorization: Basic dXNlcjpwYXNzd29yZDEyMw==", "dXNlcjpwYXNzd29yZDEyMw=="),
    ("we got header 'Bearer abc.def-ghi_jkl~123' from you", "abc.def-ghi_jkl~123"),
    ('{"api_key": "zz-not-a-known-shape-1234", "model": "x"}', "zz-not-a-known-shape-1234"),
    ("GET /v1/models?api-key=qwertyuiop1234&x=1", "qwertyuiop1234"),
    ('{"access_token":"tok_9f8e7d6c5b4a", "ok": true}', "tok_9f8e7d6c5b4a"),
    ("x-api-key: 0123456789abcdef0123", "0123456789abcdef0123"),
    ("upstream https://alice:s3cr3t-pass@proxy.example/v1 refused", "s3cr3t-pass"),
    ("token hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345 expired", "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345"),
    ("github ghp_0123456789abcdefghij0123456789abcdef", "ghp_0123456789abcdefghij0123456789abcdef"),
    ("aws AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE"),
    ("anthropic sk-ant-api03-abcdefghijklmnopqrstuv", "sk-ant-api03-abcdefghijklmnopqrstuv"),
])
def test_credentials_are_redacted(text, secret_part):
    out = redact(text)
    assert secret_part not in out and "[redacted]" in out


def test_the_callers_own_secret_is_redacted_wherever_it_appears():
    key = "plain-looking-key-42"  # no known shape: only the caller knows it is a secret
    out = redact(f"echo: {key} / {key.upper()} / quoted {key!r} / url-encoded plain%2Dlooking%2Dkey%2D42",
                 secrets=[key, None, ""])
    assert key not in out and out.count("[redacted]") == 3 and key.upper() in out  # case matters: not the key
    assert "plain%2Dlooking%2Dkey%2D42" in redact("plain%2Dlooking%2Dkey%2D42")  # untouched without the secret


@pytest.mark.parametrize("text", [
    '{"model": "gpt-4", "max_tokens": 512, "temperature": 0}',
    "the tokens per second were 12.5; token usage: 300",
    "Rate limit reached for requests. Please try again in 20s.",
    "see https://platform.openai.com/account/api-keys for your API key",
    "skip-connection sk-short",
])
def test_ordinary_text_is_left_alone(text):
    assert redact(text) == text


class _Echo(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"error": {"message": f"invalid key; you sent {self.headers['Authorization']}"}}).encode()
        self.send_response(401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_an_endpoints_error_body_never_prints_the_callers_key():
    from fourbit.eval.judge import EndpointJudge

    server = http.server.HTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    key = "my-own-key-0000"
    judge = EndpointJudge("m", base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key=key)
    try:
        with pytest.raises(UserError, match=r"HTTP 401") as e:
            judge("s", "u")
    finally:
        server.shutdown()
    assert key not in str(e.value) and "[redacted]" in str(e.value)


class _Slow(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        import time

        time.sleep(1.0)

    def log_message(self, *a):
        pass


def test_an_endpoint_timeout_is_called_a_timeout_not_unreachable():
    from fourbit.eval.judge import EndpointJudge

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    judge = EndpointJudge("m", base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="k" * 8, timeout=0.2)
    try:
        with pytest.raises(UserError, match=r"did not answer within 0.2 s \(a timeout"):
            judge("s", "u")
    finally:
        server.shutdown()
