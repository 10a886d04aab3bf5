"""The web chat page in a real browser (headless Chromium): what a visitor sees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from playwright.async_api import Browser, expect

from tests.conftest import make_settings, webchat_endpoint


async def test_visitor_types_and_sees_the_echo(tmp_path: Path, start_gateway: Any, browser: Browser) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=5)]))
    page = await browser.new_page()
    await page.goto(str(gateway.client.make_url("/webchat/web")))
    await page.get_by_test_id("input").fill("hello from the browser")
    await page.get_by_test_id("send").click()
    transcript = page.get_by_test_id("transcript")
    await expect(transcript).to_contain_text("hello from the browser", timeout=10_000)
    # The echo: the same text once from the user and once from the bot.
    await expect(transcript.locator("li")).to_have_count(2, timeout=10_000)
