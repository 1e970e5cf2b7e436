"""The web UI in a real browser (Playwright driving Debian's Chromium) against the fake scheduler.

Needs `/usr/bin/chromium` (`apt-get install chromium`) and the `playwright` Python package; the
browser Playwright would download is not used. Screenshots land in `test-artifacts/`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require, require_module
from fake_scheduler import XSS, FakeScheduler, serving

from parallax.chat.server import build_chat_app
from parallax.config import ChatConfig
from parallax.web import mount_web_ui

CHROMIUM = Path(os.environ.get("PARALLAX_CHROMIUM", "/usr/bin/chromium"))
pytestmark = pytest.mark.slow  # a browser, and servers
require(CHROMIUM.exists(), f"browser tests need Chromium at {CHROMIUM} (apt-get install chromium)")
sync_api = require_module("playwright.sync_api", "browser tests need the playwright Python package")

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               "--disable-dev-shm-usage"]
TIMEOUT_MS = 10_000

# records every text the newest reply shows, to prove it grows token by token
WATCH_REPLY = """() => {
  window.__seen = [];
  new MutationObserver(() => {
    const all = document.querySelectorAll('.msg.assistant .content');
    if (all.length) window.__seen.push(all[all.length - 1].textContent);
  }).observe(document.getElementById('messages'),
             {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        yield b
        b.close()


def _fake(**kwargs) -> FakeScheduler:
    fake = FakeScheduler(**kwargs)
    mount_web_ui(fake.app)  # the real scheduler mounts the same UI at /
    return fake.start()


@pytest.fixture
def page_factory(browser) -> Iterator:
    contexts = []

    def make(url: str, **context_kwargs):
        context = browser.new_context(**context_kwargs)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.dialogs = []
        page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.goto(url + "/")
        return page

    yield make
    for context in contexts:
        context.close()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _ask(page, prompt: str) -> object:
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")
    reply = page.locator(".msg.assistant").last
    page.wait_for_function(
        "() => { const r = [...document.querySelectorAll('.msg.assistant')].pop();"
        " return r && ['done', 'stopped', 'error'].includes(r.dataset.state); }")
    return reply


def test_setup_join_chat_flow(page_factory) -> None:
    fake = _fake(model_name=None)
    try:
        page = page_factory(fake.url)
        page.wait_for_selector("#page-setup:not([hidden])")
        page.wait_for_selector("text=needs 0.5 GB")
        _shot(page, "1-setup")
        page.fill("#nodes-num", "2")
        page.check('input[name="local"][value="no"]')
        page.click("#setup-submit")
        page.wait_for_selector("#page-join:not([hidden])")
        assert fake.init_bodies == [{"model_name": "tiny-model", "init_nodes_num": 2,
                                     "is_local_network": False}]
        page.wait_for_selector("#join-command:text('parallax join -s 127.0.0.1:3001')")
        page.wait_for_selector("#need-more:not([hidden])")
        page.click("#copy-command")
        page.wait_for_selector("#copy-command:text('Copied')")
        fake.add_node("Fake GPU A")
        page.wait_for_selector(".node-card:has-text('Fake GPU A')")
        _shot(page, "2-join")
        assert page.is_visible("#page-join")  # one of two nodes: still waiting
        fake.add_node("Fake GPU B")
        page.wait_for_selector("#page-chat:not([hidden])")  # moves on by itself
        page.wait_for_selector("#pipelines:has-text('layers [12, 24)')")

        page.evaluate(WATCH_REPLY)
        reply = _ask(page, "hi")
        assert reply.get_attribute("data-state") == "done"
        assert reply.locator(".content").inner_text() == \
            "Hello world, this is a streamed answer."
        assert reply.locator(".content strong").inner_text() == "world"
        seen = [s for s in page.evaluate("window.__seen") if s and s != "…"]
        distinct = list(dict.fromkeys(seen))
        assert len(distinct) >= 4, distinct  # grew token by token, not all at once
        assert distinct[0].startswith("Hello") and len(distinct[0]) < len(distinct[-1])
        metrics = reply.locator(".metrics").inner_text()
        assert "TTFT 13 ms" in metrics and "42.0 tok/s" in metrics
        _shot(page, "3-chat")
        assert page.errors == []
    finally:
        fake.stop()


def test_stop_button_aborts_through_the_chat_proxy(page_factory) -> None:
    fake = FakeScheduler().start()
    fake.add_node()
    try:
        app = build_chat_app(ChatConfig(scheduler=fake.url.removeprefix("http://"), port=0))
        with serving(app) as chat_url:
            page = page_factory(chat_url)
            page.wait_for_selector("#page-chat:not([hidden])")
            page.fill("#prompt", "endless please")
            page.press("#prompt", "Enter")
            page.wait_for_selector(".msg.assistant .content:has-text('tok3')")
            assert page.is_visible("#stop") and not page.is_visible("#send")
            page.click("#stop")
            page.wait_for_selector(".msg.assistant[data-state='stopped']")
            assert fake.endless_closed.wait(5), "the scheduler never saw the abort"
            assert fake.endless_sent < 200
            assert page.is_visible("#send")
            assert "stopped" in page.locator(".msg.assistant .metrics").inner_text()
            # the conversation goes on: the partial answer stays and a new question works
            reply = _ask(page, "hi again")
            assert reply.get_attribute("data-state") == "done"
            assert page.locator(".msg").count() == 4
    finally:
        fake.stop()


def test_thinking_collapses_and_untrusted_text_stays_text(page_factory) -> None:
    fake = _fake()
    fake.add_node()
    try:
        page = page_factory(fake.url)
        page.wait_for_selector("#page-chat:not([hidden])")
        reply = _ask(page, "think first")
        details = reply.locator("details.thinking")
        assert details.is_visible()
        assert details.evaluate("d => d.open") is False  # folded once the answer started
        assert "Thinking (" in details.locator("summary").inner_text()
        details.locator("summary").click()
        assert details.locator(".thinking-body").inner_text() == "Let me think about it."
        _shot(page, "4-thinking")

        reply = _ask(page, "xss")
        assert XSS in reply.locator(".content").inner_text()
        assert page.locator("#messages img").count() == 0
        reply = _ask(page, "markdown")
        assert reply.locator("pre code").inner_text() == "print('<b>hi</b>')"
        assert reply.locator("li").count() == 2 and reply.locator("em").inner_text() == "two"
        assert reply.locator("td code").inner_text() == "x"
        assert page.locator("#messages b, #messages img, #messages script").count() == 0
        assert page.dialogs == [] and page.errors == []
        _shot(page, "5-markdown-xss")
    finally:
        fake.stop()


def test_api_key_busy_and_not_ready_messages(page_factory) -> None:
    fake = _fake(api_key="k-123")
    fake.add_node()
    try:
        page = page_factory(fake.url)
        page.wait_for_selector("#page-chat:not([hidden])")
        page.fill("#prompt", "hi")
        page.press("#prompt", "Enter")
        page.wait_for_selector("#key-dialog[open]")
        _shot(page, "6-api-key")
        page.fill("#key-input", "k-123")
        page.click("#key-save")
        page.wait_for_selector(".msg.assistant[data-state='done']")
        assert fake.auth_headers == [None, "Bearer k-123"]
        assert page.evaluate("sessionStorage.getItem('parallax-api-key')") == "k-123"

        fake.force_status = 429
        reply = _ask(page, "again")
        assert "busy" in reply.inner_text()
        fake.force_status = 503
        reply = _ask(page, "again")
        assert "not ready" in reply.inner_text()
    finally:
        fake.stop()


def test_phone_sized_screen(page_factory) -> None:
    fake = _fake()
    fake.add_node()
    try:
        page = page_factory(fake.url, viewport={"width": 390, "height": 844},
                            is_mobile=True, has_touch=True)
        page.wait_for_selector("#page-chat:not([hidden])")
        _ask(page, "markdown")
        assert not page.is_visible("#side-panel") and page.is_visible("#toggle-panel")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.click("#toggle-panel")
        page.wait_for_selector("#side-panel:has-text('Pipeline 1')")
        _shot(page, "7-phone")
        page.click("#side-panel")
        page.wait_for_selector("#side-panel", state="hidden")
        assert page.is_visible("#prompt")
    finally:
        fake.stop()


def test_pipeline_panel_shows_ms_per_token_and_marks_the_slowest_stage(page_factory) -> None:
    fake = _fake(init_nodes_num=3)
    for name in ("Fake GPU A", "Fake GPU B", "Fake GPU C"):
        fake.add_node(name)
    for node, ms in zip(fake.nodes, (4.0, 61.5, 7.25), strict=True):
        node["ms_per_token"] = ms
    try:
        page = page_factory(fake.url)
        page.wait_for_selector("#page-chat:not([hidden])")
        rows = page.locator("#pipelines .pipeline-node")
        rows.nth(2).locator(".stage-speed").wait_for()
        assert [rows.nth(i).locator(".stage-speed").inner_text() for i in range(3)] == \
            ["4.0 ms/token", "61.5 ms/token · slowest", "7.3 ms/token"]
        assert page.locator(".pipeline-node.slowest").get_attribute("data-node-id") == "node-2"
        fake.nodes[2]["ms_per_token"] = 90.0  # the live status moves the mark
        page.wait_for_selector(".pipeline-node.slowest[data-node-id='node-3']")
        assert page.locator(".pipeline-node.slowest").count() == 1
        _shot(page, "8-pipeline-speeds")
        assert page.errors == []
    finally:
        fake.stop()
