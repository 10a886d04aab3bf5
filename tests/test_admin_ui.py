"""The management page in a real browser (headless Chromium): an operator logs in with the
token, re-arms an open session by editing its endpoint's expiration, closes a session, reads a
contact's transcript, retries and deletes dead letters; screenshots at desktop and phone width."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, Page, expect

from gateway.wire import parse_iso
from tests.conftest import ADMIN_TOKEN, make_settings, webchat_endpoint
from tests.fakeplatform import FakePlatform
from tests.test_delivery import DELIVERY, POST, ScriptedSlack, slack_endpoint, slack_error, slack_say

TIMEOUT_MS = 10_000


def shots_dir(tmp_path: Path) -> Path:
    """Where screenshots go: $ADMIN_UI_SCREENSHOTS (to look at them), else the test's tmp dir."""
    directory = Path(os.environ.get("ADMIN_UI_SCREENSHOTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


async def log_in(page: Page, url: str) -> None:
    await page.goto(url)
    await expect(page.get_by_test_id("login")).to_be_visible()
    await expect(page.get_by_test_id("sessions")).to_be_hidden()  # nothing of the app before login
    await page.get_by_test_id("token").fill("wrong")
    await page.get_by_test_id("login-button").click()
    await expect(page.get_by_test_id("login-error")).to_have_text("The token was refused.", timeout=TIMEOUT_MS)
    await page.get_by_test_id("token").fill(ADMIN_TOKEN)
    await page.get_by_test_id("login-button").click()
    await expect(page.get_by_test_id("sessions")).to_be_visible(timeout=TIMEOUT_MS)


async def test_operator_manages_sessions_settings_and_dead_letters(
    tmp_path: Path, start_gateway: Any, open_chat: Any, browser: Browser
) -> None:
    script = ScriptedSlack()
    async with FakePlatform() as api:
        api.respond(POST, script)
        script.fail("CGONE", slack_error("channel_not_found"), slack_error("is_archived"))
        endpoints = [
            webchat_endpoint("web", minutes=10, on_close={"messages": ["closed by staff"]}),
            slack_endpoint(api.url),
        ]
        gateway = await start_gateway(make_settings(tmp_path, endpoints, delivery=DELIVERY))
        chat = await open_chat(gateway, "visitor")
        await chat.say("hello admin")
        await chat.wait_messages(1, "reply")
        await slack_say(gateway, "CGONE", "first")
        await slack_say(gateway, "CGONE", "second")
        await api.wait_for(2, POST)
        await gateway.settle()
        [dead_first, dead_second] = sorted(
            (await gateway.admin_get("/admin/dead-letters"))["dead_letters"], key=lambda m: m["id"]
        )
        web_session = gateway.manager.open_session("web", chat.conversation)
        assert web_session is not None and web_session.expires_at is not None
        armed_before = web_session.expires_at

        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await log_in(page, str(gateway.client.make_url("/admin/ui")))
        # The token lives in this tab's sessionStorage only.
        assert await page.evaluate("sessionStorage.getItem('chat-gateway.admin-token')") == ADMIN_TOKEN
        assert await page.evaluate("localStorage.length") == 0

        # Endpoints with their effective expiration; the open session with its time left.
        web_row = page.locator("[data-testid=endpoints] tr[data-endpoint=web]")
        await expect(web_row.get_by_test_id("effective")).to_have_text("10 min")
        session_row = page.locator(f"[data-testid=sessions] tr[data-session='{web_session.id}']")
        await expect(session_row.get_by_test_id("time-left")).to_contain_text("9m", timeout=TIMEOUT_MS)
        # The chart counts today's sessions by kind.
        await expect(page.locator("#chart rect[data-kind=interactive][data-value='2']")).to_have_count(1)
        await page.screenshot(path=str(shots_dir(tmp_path) / "admin-desktop.png"), full_page=True)

        # Edit the endpoint's expiration: the open session is re-armed at once.
        await web_row.get_by_test_id("edit-endpoint").click()
        await page.get_by_test_id("expiration").fill("60")
        await page.get_by_test_id("save-endpoint").click()
        await expect(web_row.get_by_test_id("effective")).to_have_text("60 min", timeout=TIMEOUT_MS)
        await expect(session_row.get_by_test_id("time-left")).to_contain_text("59m", timeout=TIMEOUT_MS)
        shown = await session_row.get_by_test_id("time-left").get_attribute("data-expires-at")
        live = gateway.manager.open_session("web", chat.conversation)
        assert live is not None and live.expires_at is not None
        assert abs(live.expires_at - armed_before - 50 * 60) < 1.0
        assert shown is not None and abs(parse_iso(shown) - live.expires_at) < 0.01
        stored = await gateway.admin_get("/admin/endpoints/web/session")
        assert stored["override"] == {
            "expiration_minutes": 60.0,
            "mode": "proactive",
            "on_close": {"notify": True, "messages": ["closed by staff"]},
        }

        # A contact's conversations and transcript, from the session's row.
        await session_row.get_by_role("link", name=chat.conversation).click()
        transcript = page.get_by_test_id("transcript")
        await expect(transcript.locator("li.user, li.bot")).to_have_count(2, timeout=TIMEOUT_MS)
        await expect(transcript.locator("li.divider")).to_have_text([f"session {web_session.id[:8]}"])
        await expect(transcript.locator("li.user")).to_contain_text("hello admin")
        await expect(transcript.locator("li.bot")).to_contain_text("hello admin")
        await expect(page.get_by_test_id("conversations").locator("tbody tr")).to_have_count(1)
        await page.get_by_test_id("contact").screenshot(path=str(shots_dir(tmp_path) / "admin-contact.png"))

        # Close the session: it leaves the list, the visitor gets the closure notice.
        await session_row.get_by_test_id("close-session").click()
        await expect(session_row).to_have_count(0, timeout=TIMEOUT_MS)
        assert await chat.wait_messages(1, "closure") == ["closed by staff"]
        closed = await gateway.admin_get(f"/admin/sessions/{web_session.id}")
        assert (closed["state"], closed["close_reason"]) == ("closed", "admin")

        # Dead letters: retry one (the platform takes it now), delete the other.
        dead_rows = page.get_by_test_id("dead-letters").locator("tbody tr")
        await expect(dead_rows).to_have_count(2)
        await page.locator(f"tr[data-message='{dead_first['id']}']").get_by_test_id("retry-dead").click()
        await expect(dead_rows).to_have_count(1, timeout=TIMEOUT_MS)
        [*_, resent] = await api.wait_for(3, POST)
        assert resent.json() == {"channel": "CGONE", "text": "first"}
        await page.locator(f"tr[data-message='{dead_second['id']}']").get_by_test_id("delete-dead").click()
        await expect(dead_rows).to_have_count(0, timeout=TIMEOUT_MS)
        assert await gateway.store.get_outbound(dead_second["id"]) is None
        await gateway.settle()
        first = await gateway.store.get_outbound(dead_first["id"])
        assert first is not None and first.state.value == "sent"

        # Phone width: the same page, readable.
        phone = await browser.new_page(viewport={"width": 390, "height": 844})
        await phone.goto(str(gateway.client.make_url("/admin/ui")))
        await phone.get_by_test_id("token").fill(ADMIN_TOKEN)
        await phone.get_by_test_id("login-button").click()
        await expect(phone.get_by_test_id("sessions")).to_be_visible(timeout=TIMEOUT_MS)
        await expect(phone.locator("#chart rect[data-kind=interactive][data-value='2']")).to_have_count(1)
        width = await phone.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page is {width} px wide on a 390 px screen"
        await phone.screenshot(path=str(shots_dir(tmp_path) / "admin-phone.png"), full_page=True)


async def test_the_page_is_404_without_an_admin_token(tmp_path: Path, start_gateway: Any) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint()], admin={"token": ""}))
    assert (await gateway.client.get("/admin/ui")).status == 404
    (tmp_path / "on").mkdir()
    on = await start_gateway(make_settings(tmp_path / "on", [webchat_endpoint()]))
    page = await on.client.get("/admin/ui")  # no bearer: the page asks for the token itself
    assert page.status == 200 and "text/html" in page.headers["Content-Type"]
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert "sessionStorage" in await page.text()
