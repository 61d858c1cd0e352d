"""Screenshots of `fourbit serve`'s pages for the README, taken by the headless browser the tests use.

    python bench/serve_screenshots.py [--data ../shared/data] [--out docs]

Serves the embedded SmolLM2-135M (NF4) with two demo LoRA adapters (random, r=8, as in
bench/serve.py), an arena of the QLoRA paper's Guanaco-65B generations against ChatGPT's Vicuna
answers, and a judgments file seeded with the paper's own GPT-4 pairwise judgments between its eight
systems (converted row by row to fourbit judge's format, judge "gpt-4 (QLoRA paper)"), so the
leaderboard shows real ratings. Writes docs/serve-chat.png, docs/serve-arena.png and
docs/serve-leaderboard.png. Chromium is Debian's (/usr/bin/chromium), driven by Playwright.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

PAPER = "qlora_paper/ratings-gpt4/vicuna/pairwise"
SHORT = {"65b-guanaco-vicuna-generations-topp0.9-temp0.7": "guanaco-65b",
          "30b-guanaco-vicuna-generations-topp0.9-temp0.7": "guanaco-33b",
         "13b-guanaco-vicuna-generations-topp0.9-temp0.7": "guanaco-13b",
         "7b-guanaco-vicuna-generations-topp0.9-temp0.7": "guanaco-7b",
         "answer-gpt35": "chatgpt", "answer-bard": "bard", "answer-gpt4": "gpt-4", "answer-vicuna-13b": "vicuna-13b"}
KEEP = set(SHORT.values())  # all eight systems of the paper's Vicuna-benchmark tournament
_NAME = re.compile(r"^(?P<a>.+?)-vs-(?P<b>.+?)-gpt-4-reviewer-threeclass\.jsonl$")


def seed_judgments(data: Path, out: Path) -> int:
    """The paper's GPT-4 judgments between the KEEP systems, as fourbit judge rows; the row count."""
    rows = []
    for f in sorted((data / PAPER).glob("*.jsonl")):
        m = _NAME.match(f.name)
        a, b = SHORT.get(m["a"]) if m else None, SHORT.get(m["b"]) if m else None
        if a not in KEEP or b not in KEEP:
            continue
        for line in f.read_text().splitlines():
            r = json.loads(line)
            rows.append({"question_id": str(r["question_id"]), "first": a, "second": b, "score": r["score"],
                         "judge": "gpt-4 (QLoRA paper)", "raw": str(r["score"])})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the public data folder")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    a = ap.parse_args()
    data, out = Path(a.data), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import expect, sync_playwright
    from serve import make_adapters
    from serve_helpers import CHROMIUM, CHROMIUM_ARGS

    from fourbit.models import load_model, resolve_source
    from fourbit.serve import Arena, Limits, ServerThread, build_app

    with tempfile.TemporaryDirectory(prefix="fourbit-shots-") as tmp:
        tmp = Path(tmp)
        adapters = make_adapters(resolve_source("smollm2-135m"), tmp)
        adapters = {"lora-demo-1": adapters["adapter1"], "lora-demo-2": adapters["adapter2"]}
        judgments = tmp / "judgments.jsonl"
        print(f"seeded {seed_judgments(data, judgments)} GPT-4 judgments from the QLoRA paper", file=sys.stderr)
        gens = data / "qlora_paper/generations/vicuna/65b-guanaco-vicuna-generations-topp0.9-temp0.7.jsonl"
        arena = Arena(judgments, [str(gens), str(data / "vicuna/answers/answer_gpt35.jsonl")],
                      questions=str(data / "vicuna/question.jsonl"))
        model, tok = load_model("smollm2-135m", quant="nf4", device="cpu")
        app, scheduler = build_app(model, tok, "smollm2-135m", adapters={k: str(v) for k, v in adapters.items()},
                                   arena=arena, limits=Limits(max_new_tokens=512, context_length=2048))
        try:
            with ServerThread(app) as url, sync_playwright() as p:
                browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1200, "height": 760}, device_scale_factor=1)
                page.set_default_timeout(600_000)
                page.goto(url + "/")
                page.fill("#temperature", "0")
                page.fill("#max-tokens", "160")
                page.fill("#input", "Give me three tips for staying focused while studying.")
                page.click("#send")
                expect(page.locator(".msg.assistant").last).to_have_attribute("data-state", "done", timeout=900_000)
                page.screenshot(path=str(out / "serve-chat.png"))
                page.goto(url + "/arena")
                expect(page.locator("#choose-a")).to_be_enabled(timeout=120_000)
                page.screenshot(path=str(out / "serve-arena.png"))
                page.goto(url + "/leaderboard")
                expect(page.locator("#rows tr")).to_have_count(len(KEEP), timeout=300_000)
                page.screenshot(path=str(out / "serve-leaderboard.png"))
                browser.close()
        finally:
            scheduler.close()
    print(f"wrote {out}/serve-chat.png, serve-arena.png, serve-leaderboard.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
