"""Shared by the `fourbit serve` tests: tiny adapters, a server on a free loopback port, the HF oracle."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from pathlib import Path

import torch

BASE = "tiny-chat"  # the base model's name as the server reports it
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


def make_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A PEFT-format LoRA adapter for the model in model_dir whose B is random (a zero B is the base)."""
    from transformers import AutoModelForCausalLM

    from fourbit.nn import add_lora, lora_modules, save_adapter

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    add_lora(model, r=4, alpha=8, dropout=0.0, verbose=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.5)
    return save_adapter(model, out)


def load(model_dir: Path):
    from fourbit.models import load_model

    return load_model(model_dir, quant="nf4", device="cpu")


@contextlib.contextmanager
def running_server(model_dir: Path, adapters: dict[str, Path] | None = None, **kw):
    """(url, scheduler): the app of `fourbit serve` on 127.0.0.1:<free port>; stopped on exit."""
    from fourbit.serve import ServerThread, build_app

    model, tok = load(model_dir)
    app, scheduler = build_app(model, tok, BASE, adapters={k: str(v) for k, v in (adapters or {}).items()}, **kw)
    try:
        with ServerThread(app) as url:
            yield url, scheduler
    finally:
        scheduler.close()


def http(method: str, url: str, body=None, headers: dict | None = None, raw: bytes | None = None,
         timeout: float = 60) -> tuple[int, dict | str]:
    """(status, parsed JSON or text) without raising on 4xx/5xx."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


@torch.no_grad()
def hf_greedy(model_dir: Path, adapter: Path | None, messages: list[dict], max_new_tokens: int) -> str:
    """The oracle: transformers' own generate (greedy) on the same 4-bit model with the adapter loaded."""
    from fourbit.generate import render
    from fourbit.nn import load_adapter

    model, tok = load(model_dir)
    if adapter is not None:
        load_adapter(model, adapter)
    ids = tok(render(tok, messages), return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True, clean_up_tokenization_spaces=False)
