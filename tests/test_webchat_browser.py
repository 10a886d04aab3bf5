"""The web chat page and its widget in a real browser (headless Chromium): what a visitor sees.

Screenshots of the page and the widget, at desktop size and at a phone's 390 px width, are
written to /tmp/webchat-*.png for a person to look at (they are not compared).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, BrowserContext, Page, expect

from tests.conftest import make_settings, webchat_endpoint, write_config
from tests.gateway_process import GatewayProcess, free_port

DEMO = Path(__file__).resolve().parent.parent / "docs" / "widget-demo.html"
DEMO_SCRIPT = "http://127.0.0.1:8080/webchat/web/widget.js"
SHOTS = Path("/tmp")
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 15_000


CLOSED = "This conversation has ended. Write to start a new one."


async def open_page(context: BrowserContext, url: str, status: str = "Connected") -> Page:
    page = await context.new_page()
    await page.goto(url)
    await expect(page.get_by_test_id("status")).to_have_text(status, timeout=WAIT_MS)
    return page


async def say(page: Page, text: str) -> None:
    await page.get_by_test_id("input").fill(text)
    await page.get_by_test_id("send").click()


def lines(page: Page, kind: str) -> Any:
    return page.get_by_test_id("transcript").locator(f"li.msg.{kind}")


async def stored_conversation(page: Page) -> str:
    conversation: str = await page.evaluate("JSON.parse(localStorage.getItem('webchat:web')).conversation")
    return conversation


@pytest.fixture
async def origin_server() -> AsyncIterator[Callable[[str], Any]]:
    """``await origin_server(html)`` -> the base URL of another aiohttp server on 127.0.0.1
    (another port: another origin) serving ``html`` at ``/``."""
    servers: list[TestServer] = []

    async def serve(html: str) -> str:
        async def index(request: web.Request) -> web.StreamResponse:
            return web.Response(text=html, content_type="text/html")

        app = web.Application()
        app.router.add_get("/", index)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield serve
    for server in servers:
        await server.close()


async def test_visitor_types_sees_the_echo_with_speaker_labels_and_the_transcript_after_a_reload(
    tmp_path: Path, start_gateway: Any, browser: Browser
) -> None:
    settings = make_settings(tmp_path, [webchat_endpoint(minutes=5, webchat={"title": "Help desk"})])
    gateway = await start_gateway(settings)
    url = str(gateway.client.make_url("/webchat/web"))
    context = await browser.new_context(viewport=DESKTOP)
    page = await open_page(context, url)
    await expect(page.get_by_role("heading")).to_have_text("Help desk")
    await say(page, "hello from the browser")
    await expect(lines(page, "reply")).to_have_text(["Assistant: hello from the browser"], timeout=WAIT_MS)
    await expect(lines(page, "user")).to_have_text(["You: hello from the browser"])
    await expect(page.get_by_test_id("status")).to_have_text("Conversation open")
    # What assistive technology gets: a log (a live region) whose lines name their speaker,
    # the labels visually hidden; a status line; a labelled input.
    await expect(page.get_by_role("log", name="Conversation")).to_match_aria_snapshot(
        '- log "Conversation":\n'
        '  - listitem: "You: hello from the browser"\n'
        '  - listitem: "Assistant: hello from the browser"'
    )
    label = await page.locator("li.msg.user .sr-only").first.bounding_box()
    assert label is not None and label["width"] <= 1 and label["height"] <= 1  # not on screen
    await expect(page.get_by_role("status")).to_have_text("Conversation open")
    await expect(page.get_by_role("textbox", name="Message")).to_be_visible()
    assert await page.get_by_test_id("input").evaluate("e => getComputedStyle(e).fontSize") == "16px"
    assert "100dvh" in await page.evaluate("Array.from(document.styleSheets[0].cssRules).map(r => r.cssText).join(' ')")
    await say(page, "a second line")
    await expect(lines(page, "reply")).to_have_count(2, timeout=WAIT_MS)
    await page.screenshot(path=SHOTS / "webchat-desktop.png")

    await page.reload()
    await expect(lines(page, "reply")).to_have_text(
        ["Assistant: hello from the browser", "Assistant: a second line"], timeout=WAIT_MS
    )
    await expect(lines(page, "user")).to_have_count(2)

    phone = await browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    small = await open_page(phone, url)
    await say(small, "on a phone")
    await expect(lines(small, "reply")).to_have_count(1, timeout=WAIT_MS)
    card = await small.locator(".card").bounding_box()
    assert card is not None and (card["width"], card["height"]) == (390, 844)  # the whole screen
    await small.screenshot(path=SHOTS / "webchat-phone.png")


async def test_the_closure_notice_live_and_a_clear_state_after_a_closure_while_away(
    tmp_path: Path, start_gateway: Any, browser: Browser
) -> None:
    on_close = {"messages": ["This chat ended after a short silence."]}
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0.01, on_close=on_close)]))
    url = str(gateway.client.make_url("/webchat/web"))
    context = await browser.new_context(viewport=DESKTOP)
    page = await open_page(context, url)
    await say(page, "are you there?")
    await expect(lines(page, "closure")).to_have_text(
        ["Notice: This chat ended after a short silence."], timeout=WAIT_MS
    )
    await expect(page.get_by_test_id("status")).to_have_text(CLOSED)
    await page.screenshot(path=SHOTS / "webchat-closed.png")

    # Away: the next session closes while no page is open; coming back shows it clearly.
    await say(page, "one more thing")
    await expect(lines(page, "reply")).to_have_count(2, timeout=WAIT_MS)
    conversation = await stored_conversation(page)
    await page.close()
    async with asyncio.timeout(10):
        while gateway.manager.open_session("web", conversation) is not None:
            await asyncio.sleep(0.05)
    back = await open_page(context, url, CLOSED)
    await expect(lines(back, "closure")).to_have_count(1, timeout=WAIT_MS)
    await expect(back.get_by_test_id("transcript").locator("li")).to_have_text(
        ["You: one more thing", "Assistant: one more thing", "Notice: This chat ended after a short silence."]
    )
    await expect(back.get_by_test_id("status")).to_have_text(CLOSED)

    await back.get_by_test_id("new-conversation").click()
    await expect(back.get_by_test_id("transcript").locator("li")).to_have_text(["New conversation started"])
    async with asyncio.timeout(10):  # acknowledged: the gateway has it
        while await back.evaluate("JSON.parse(localStorage.getItem('webchat:web')).unacked.length"):
            await asyncio.sleep(0.05)
    await back.reload()  # a fresh start stays fresh
    await expect(back.get_by_test_id("status")).to_have_text("Connected", timeout=WAIT_MS)
    await expect(back.get_by_test_id("transcript").locator("li")).to_have_count(0)


async def test_a_message_typed_while_the_gateway_is_down_is_delivered_once_after_the_restart(
    tmp_path: Path, browser: Browser
) -> None:
    """kill -9 of a real ``chat-gateway serve``; the visitor writes meanwhile; the message,
    unacknowledged, is resent when the page reconnects to the restarted gateway, and answered once."""
    port = free_port()
    config = write_config(tmp_path, [webchat_endpoint(minutes=0)], server={"host": "127.0.0.1", "port": port})
    gateway = GatewayProcess(config, port)
    gateway.start()
    try:
        await gateway.wait_healthy()
        context = await browser.new_context(viewport=DESKTOP)
        page = await open_page(context, f"{gateway.url}/webchat/web")
        await say(page, "before the crash")
        await expect(lines(page, "reply")).to_have_count(1, timeout=WAIT_MS)
        gateway.kill()
        await expect(page.get_by_test_id("status")).to_have_text("Disconnected. Reconnecting…", timeout=WAIT_MS)
        await say(page, "written while it was down")
        await expect(lines(page, "user.pending")).to_have_count(1)
        await page.screenshot(path=SHOTS / "webchat-reconnecting.png")
        gateway.start()
        await gateway.wait_healthy()
        await expect(lines(page, "reply")).to_have_text(
            ["Assistant: before the crash", "Assistant: written while it was down"], timeout=WAIT_MS
        )
        await expect(lines(page, "user.pending")).to_have_count(0)
        await page.reload()  # what the gateway has: each message once
        await expect(lines(page, "reply")).to_have_text(
            ["Assistant: before the crash", "Assistant: written while it was down"], timeout=WAIT_MS
        )
        await expect(lines(page, "user")).to_have_count(2)
    finally:
        gateway.stop()


async def test_the_widget_on_an_allowed_origin_opens_the_chat(
    tmp_path: Path, start_gateway: Any, browser: Browser, origin_server: Callable[[str], Any]
) -> None:
    port = free_port()
    gateway_url = f"http://127.0.0.1:{port}"
    demo = DEMO.read_text().replace(DEMO_SCRIPT, f"{gateway_url}/webchat/web/widget.js")
    shop = await origin_server(demo)
    settings = make_settings(
        tmp_path,
        [webchat_endpoint(minutes=5, webchat={"allowed_origins": [shop], "title": "Shop help"})],
        server={"host": "127.0.0.1", "port": port},
    )
    await start_gateway(settings, port=port)
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        context = await browser.new_context(viewport=viewport)
        page = await context.new_page()
        await page.goto(shop)
        launcher = page.get_by_role("button", name="Chat with us")
        await expect(launcher).to_be_visible(timeout=WAIT_MS)
        await page.screenshot(path=SHOTS / f"widget-{name}-closed.png")
        await launcher.click()
        chat = page.frame_locator("iframe[title='Shop help']")
        await expect(chat.get_by_test_id("status")).to_have_text("Connected", timeout=WAIT_MS)
        await chat.get_by_test_id("input").fill(f"hello from the shop ({name})")
        await chat.get_by_test_id("send").click()
        await expect(chat.locator("li.msg.reply")).to_have_text(
            [f"Assistant: hello from the shop ({name})"], timeout=WAIT_MS
        )
        await page.screenshot(path=SHOTS / f"widget-{name}-open.png")
        await chat.get_by_test_id("close").click()  # the page's own close button, in the frame
        await expect(page.locator("iframe[title='Shop help']")).to_be_hidden()
        await context.close()


async def test_the_widget_and_the_socket_are_refused_on_a_foreign_origin(
    tmp_path: Path, start_gateway: Any, browser: Browser, origin_server: Callable[[str], Any]
) -> None:
    allowed = await origin_server("<!DOCTYPE html><title>allowed</title>")
    port = free_port()
    gateway_url = f"http://127.0.0.1:{port}"
    settings = make_settings(
        tmp_path,
        [webchat_endpoint(minutes=5, webchat={"allowed_origins": [allowed]})],
        server={"host": "127.0.0.1", "port": port},
    )
    gateway = await start_gateway(settings, port=port)
    foreign = await origin_server(
        "<!DOCTYPE html><title>foreign</title><body>"
        f'<iframe id="direct" title="direct" src="{gateway_url}/webchat/web"></iframe>'
        f'<script src="{gateway_url}/webchat/web/widget.js" async></script>'
        "</body>"
    )
    page = await browser.new_page()
    warnings: list[str] = []
    page.on("console", lambda message: warnings.append(message.text) if message.type == "warning" else None)
    await page.goto(foreign)
    await page.wait_for_load_state("load")
    # The widget adds nothing here, and says why.
    assert await page.locator("[data-chat-gateway-widget]").count() == 0
    assert any("not in webchat.allowed_origins" in text for text in warnings), warnings
    # Framing the page directly is refused by the browser (CSP frame-ancestors).
    frame = page.frame_locator("#direct")
    await expect(frame.get_by_test_id("transcript")).to_have_count(0)
    # A socket opened by the foreign page's own script is refused (403): it never opens.
    opened = await page.evaluate(
        """url => new Promise(resolve => {
            const ws = new WebSocket(url);
            ws.onopen = () => resolve("open");
            ws.onerror = () => resolve("refused");
        })""",
        f"ws://127.0.0.1:{port}/webchat/web/ws",
    )
    assert opened == "refused"
    with sqlite3.connect(tmp_path / "gateway.db") as conn:  # the foreign page opened no conversation
        assert conn.execute("SELECT count(*) FROM conversation_secrets").fetchone() == (0,)
    assert gateway.metrics.total("gateway_events_total") == 0
