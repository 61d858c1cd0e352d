"""The pages of `fourbit serve` in a real headless browser: Debian's Chromium driven by Playwright.

Nothing downloads a browser: Playwright launches /usr/bin/chromium (`apt-get install -y chromium`;
.ci/run installs it). Where either is missing the tests skip and say which. Oracles: the API's own
greedy answer for the same messages (what the chat page shows), the judgments file and
`fourbit elo` on it (what the arena records), `elo_ratings` (what the leaderboard shows).
"""

from __future__ import annotations

import io
import json
import re
import time
from contextlib import redirect_stdout

import pytest

from conftest import requires_smollm2

pytest.importorskip("starlette", reason="fourbit serve needs the 'serve' extra: pip install 'fourbit[serve]'")
pytest.importorskip("fourbit.engine", reason="fourbit.engine (the batched decoding engine) is not in this tree")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra: pip install -e '.[test]'")

from serve_helpers import BASE, CHROMIUM, CHROMIUM_ARGS, http, make_adapter, running_server  # noqa: E402

pytestmark = [requires_smollm2,
              pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no browser at {CHROMIUM}: apt-get install -y "
                                                               f"chromium (as root; .ci/run does it)")]
expect = sync_api.expect
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def answer_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("answers")
    out = []
    for model in ("left-model", "right-model"):
        rows = [{"question_id": q, "model_id": model, "prompt": f"Question number {q}?",
                 "text": f"The answer of {model} to question {q}."} for q in (1, 2, 3)]
        (d / f"{model}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out.append(str(d / f"{model}.jsonl"))
    return out


@pytest.fixture(scope="module")
def served(tiny_chat_dir, tmp_path_factory, answer_files):
    """(url, scheduler, judgments path): base + one adapter, and an arena of two answer files."""
    from fourbit.serve import Arena, Limits

    d = tmp_path_factory.mktemp("served")
    alpha = make_adapter(tiny_chat_dir, d / "alpha", seed=1)
    judgments = d / "judgments.jsonl"
    with running_server(tiny_chat_dir, {"alpha": alpha}, arena=Arena(judgments, answer_files),
                        limits=Limits(max_new_tokens=4000, context_length=8192)) as (url, scheduler):
        yield url, scheduler, judgments


@pytest.fixture()
def page(browser):
    ctx = browser.new_context()
    ctx.set_default_timeout(TIMEOUT_MS)
    p = ctx.new_page()
    yield p
    ctx.close()


def _api_greedy(url: str, messages: list[dict], max_tokens: int) -> str:
    status, out = http("POST", url + "/v1/chat/completions", {"model": "alpha", "messages": messages,
                                                              "max_tokens": max_tokens, "temperature": 0})
    assert status == 200, out
    return out["choices"][0]["message"]["content"]


def test_chat_page_streams_replies_over_two_turns(served, page):
    url = served[0]
    page.goto(url + "/")
    expect(page.locator("#model option")).to_have_count(2)
    page.select_option("#model", "alpha")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    history = []
    for turn in ("Hello there", "And then?"):
        page.fill("#input", turn)
        page.click("#send")
        reply = page.locator(".msg.assistant").last
        expect(reply).to_have_attribute("data-state", "done")
        history.append({"role": "user", "content": turn})
        expected = _api_greedy(url, history, 12)
        assert reply.locator(".text").text_content() == expected  # the whole conversation went to the model
        assert int(reply.get_attribute("data-chunks")) >= 2  # it arrived in pieces: streamed
        history.append({"role": "assistant", "content": expected})


def test_chat_stop_button_ends_the_reply_and_frees_the_slot(served, page):
    url, scheduler, _ = served
    page.goto(url + "/")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "4000")
    page.fill("#input", "Tell me a long story")
    page.keyboard.press("Enter")  # Enter sends
    reply = page.locator(".msg.assistant").last
    expect(reply).to_have_attribute("data-chunks", re.compile(r"^([2-9]|\d{2,})$"))  # streaming has begun
    page.click("#stop")
    expect(reply).to_have_attribute("data-state", "stopped")
    deadline = time.monotonic() + 10
    while scheduler.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert scheduler.running == 0  # the server stopped decoding it, long before 4000 tokens


def test_arena_judges_three_pairs_by_clicking_and_fourbit_elo_reads_them(served, page, capsys):
    from fourbit.commands import elo
    from fourbit.eval.elo import elo_ratings

    url, _, judgments = served
    page.goto(url + "/arena")
    expect(page.locator("#total")).to_have_text("3")
    rater = page.evaluate("localStorage.getItem('fourbit-rater')")
    shown = []
    for n, button in enumerate(["#choose-a", "#choose-tie"], start=1):
        expect(page.locator(button)).to_be_enabled()
        shown.append(page.evaluate("document.body.dataset.pair"))
        page.click(button)
        expect(page.locator("#judged")).to_have_text(str(n))
    page.reload()  # the rater comes back: same id, continues at the third pair
    expect(page.locator("#judged")).to_have_text("2")
    expect(page.locator("#choose-b")).to_be_enabled()
    assert page.evaluate("document.body.dataset.pair") not in shown
    page.click("#choose-b")
    expect(page.locator("#judged")).to_have_text("3")
    expect(page.locator("#question")).to_contain_text("All pairs judged")

    rows = [json.loads(line) for line in judgments.read_text().splitlines()]
    assert len(rows) == 3 and {r["rater"] for r in rows} == {rater}
    assert sorted(r["score"] for r in rows) == [1, 2, 3] and len({r["question_id"] for r in rows}) == 3
    assert all({r["first"], r["second"]} == {"left-model", "right-model"} for r in rows)
    out = io.StringIO()
    with redirect_stdout(out):
        assert elo.run([str(judgments), "--orderings", "1000"]) == 0
    assert "3 matches" in out.getvalue() and "left-model" in out.getvalue()

    page.goto(url + "/leaderboard")
    expect(page.locator("#rows tr")).to_have_count(2)
    ratings = elo_ratings([str(judgments)]).ratings
    for i, (name, value) in enumerate(ratings.items()):
        cells = page.locator("#rows tr").nth(i).locator("td")
        expect(cells.nth(1)).to_have_text(name)
        expect(cells.nth(2)).to_have_text(f"{value:.1f}")


def test_arena_keys_judge_too_and_a_second_rater_starts_fresh(tiny_chat_dir, answer_files, tmp_path, page):
    from fourbit.serve import Arena

    judgments = tmp_path / "keys.jsonl"
    with running_server(tiny_chat_dir, arena=Arena(judgments, answer_files)) as (url, _):
        page.goto(url + "/arena")
        for n, key in enumerate(["a", "t", "2"], start=1):
            expect(page.locator("#choose-a")).to_be_enabled()
            page.keyboard.press(key)
            expect(page.locator("#judged")).to_have_text(str(n))
        scores = [json.loads(line)["score"] for line in judgments.read_text().splitlines()]
        assert scores == [1, 3, 2]
        page.evaluate("localStorage.setItem('fourbit-rater', 'second-rater')")
        page.reload()
        expect(page.locator("#judged")).to_have_text("0")
        assert http("GET", url + "/arena/api/next?rater=second-rater")[1]["judged"] == 0
