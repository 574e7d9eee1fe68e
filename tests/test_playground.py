"""The playground page in a real browser: Debian's chromium driven by playwright (no browser download).
Loads /, sends a prompt, sees tokens coloured by who produced them (a draft's accepted tokens and the
target's own) and the stats update, and takes a screenshot into the test's temp folder."""
from __future__ import annotations

import shutil

import httpx
import pytest

from tests.test_server import Server, wait_idle

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_plain_clients_get_no_provenance_and_asking_gets_it(llama_dir):
    from afford.config import SpeculativeConfig
    s = Server(llama_dir, speculative=SpeculativeConfig(draft=str(llama_dir), num_speculative_tokens=3))
    try:
        body = {"prompt": "The king said", "max_tokens": 12, "temperature": 0}
        plain = httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()
        assert "afford" not in plain["choices"][0]
        lines = httpx.post(s.url + "/v1/completions", json={**body, "stream": True}, timeout=60).text.splitlines()
        assert not any('"afford"' in x for x in lines)
        asked = httpx.post(s.url + "/v1/completions", json={**body, "provenance": True}, timeout=60).json()
        toks = asked["choices"][0]["afford"]["tokens"]
        assert "".join(t for t, _ in toks) == asked["choices"][0]["text"] == plain["choices"][0]["text"]
        assert {src for _, src in toks} == {"draft", "target"}     # the draft is the target itself: it accepts
        assert asked["choices"][0]["afford"]["accepted"] > 0
        page = httpx.get(s.url + "/", timeout=30)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "http://" not in page.text and "https://" not in page.text          # no external assets
        assert wait_idle(s)
    finally:
        s.stop()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine: .ci/run installs Debian's package "
                    "(apt-get install chromium); without it the browser test cannot run")
def test_playground_in_chromium(llama_dir, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra: "
                                   "pip install -e '.[test]'")
    from afford.config import SpeculativeConfig
    s = Server(llama_dir, speculative=SpeculativeConfig(draft=str(llama_dir), num_speculative_tokens=3))
    errors = []
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(s.url + "/")
            page.fill("#prompt", "The king said to the")
            page.fill("#max_tokens", "40")
            page.click("#go")
            page.wait_for_selector("#out .src-draft", state="attached", timeout=30_000)
            page.wait_for_selector("#out .src-target", state="attached", timeout=30_000)
            page.wait_for_function("document.getElementById('go').disabled === false", timeout=30_000)
            assert page.text_content("#tps") not in ("-", "")
            assert page.text_content("#acc").endswith("%")
            assert page.text_content("#usd").startswith("$") or "cost-hardware" in page.text_content("#usd")
            shown = "".join(page.eval_on_selector_all("#out .tok", "els => els.map(e => e.textContent)"))
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.stat().st_size > 10_000
        ref = httpx.post(s.url + "/v1/completions", json={"prompt": "The king said to the", "max_tokens": 40,
                                                          "temperature": 0}, timeout=60).json()
        assert shown == ref["choices"][0]["text"]          # the coloured tokens are the completion, whole
        assert not errors, errors
        assert wait_idle(s)
    finally:
        s.stop()


def test_streamed_provenance_holds_back_what_a_stop_string_cuts(llama_dir):
    """Provenance follows the text deltas: a token whose text could still start a stop string waits, and
    the tokens' texts joined are exactly the final text."""
    from afford.config import SpeculativeConfig
    s = Server(llama_dir, speculative=SpeculativeConfig(draft=str(llama_dir), num_speculative_tokens=3))
    try:
        body = {"prompt": "The king said", "max_tokens": 30, "temperature": 0}
        full = httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        stop = full[8:11]                            # a stop string the output reaches mid-way
        assert stop and stop in full
        import json as _json
        lines = httpx.post(s.url + "/v1/completions", json={**body, "stop": stop, "stream": True, "provenance": True},
                           timeout=60).text.splitlines()
        chunks = [_json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        text = "".join(c["choices"][0]["text"] for c in chunks)
        shown = "".join(t for c in chunks for t, _ in c["choices"][0]["afford"]["tokens"])
        assert text == full[:full.index(stop)] and shown == text
        assert wait_idle(s)
    finally:
        s.stop()
