"""Data lifecycle through the admin API and the real store: dead letters deleted, contacts
erased (open session closed silently first), transcripts, and retention pruning by age."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.models import Change, Contact
from tests.conftest import Gateway, make_settings, webchat_endpoint
from tests.fakeplatform import FakePlatform
from tests.test_delivery import POST, ScriptedSlack, settings_for, slack_endpoint, slack_error, slack_say

DAY_S = 24 * 3600.0


async def eventually(check: Callable[[], Any], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def rows(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


async def test_dead_letters_are_deleted_and_show_no_1970_next_attempt(tmp_path: Path, start_gateway: Any) -> None:
    script = ScriptedSlack()
    async with FakePlatform() as api:
        api.respond(POST, script)
        script.fail("CGONE", slack_error("channel_not_found"))
        gateway = await start_gateway(settings_for(tmp_path, [slack_endpoint(api.url)]))
        await slack_say(gateway, "CGONE", "lost")
        await slack_say(gateway, "C1", "fine")
        await api.wait_for(2, POST)
        await gateway.settle()
        [dead] = (await gateway.admin_get("/admin/dead-letters"))["dead_letters"]
        assert dead["next_attempt_at"] is None  # not 1970-01-01: a dead letter has no next attempt
        headers = gateway.admin_headers()
        [(sent_id,)] = rows(tmp_path / "gateway.db", "SELECT id FROM outbox WHERE state = 'sent'")
        assert (await gateway.client.delete(f"/admin/dead-letters/{sent_id}", headers=headers)).status == 409
        response = await gateway.client.delete(f"/admin/dead-letters/{dead['id']}", headers=headers)
        assert response.status == 204
        assert (await gateway.admin_get("/admin/dead-letters"))["dead_letters"] == []
        assert await gateway.store.get_outbound(dead["id"]) is None
        again = await gateway.client.delete(f"/admin/dead-letters/{dead['id']}", headers=headers)
        assert again.status == 404 and (await again.json())["error"] == "no such message"
        assert (await gateway.client.delete("/admin/dead-letters/x", headers=headers)).status == 404
        metrics = await (await gateway.client.get("/metrics")).text()
        assert "gateway_dead_letters 0.0" in metrics


async def test_contact_view_has_the_transcript(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0.005)]))
    chat = await open_chat(gateway, "t1")
    await chat.say("first visit")
    await chat.wait_messages(1, "closure")
    await chat.say("second visit")
    await chat.wait_messages(2, "reply")
    await gateway.settle()
    view = await gateway.admin_get(f"/admin/contacts/web:{chat.conversation}")
    newest, oldest = view["conversations"]
    lines = [(m["from"], m["kind"], m["text"], m["session_id"]) for m in view["transcript"]]
    closure = next(line for line in lines if line[1] == "closure")
    assert lines == [
        ("user", "message", "first visit", oldest["id"]),
        ("bot", "reply", "first visit", oldest["id"]),
        closure,
        ("user", "message", "second visit", newest["id"]),
        ("bot", "reply", "second visit", newest["id"]),
    ]
    assert closure[0] == "bot" and closure[3] == oldest["id"]
    assert all(m["at"].endswith("Z") for m in view["transcript"])
    assert {m.get("state") for m in view["transcript"] if m["from"] == "bot"} == {"sent"}


async def test_erasing_a_contact_closes_silently_and_removes_everything(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    settings = make_settings(tmp_path, [webchat_endpoint(minutes=0, on_close={"messages": ["bye"]})])
    gateway: Gateway = await start_gateway(settings)
    gone, kept = await open_chat(gateway, "gone"), await open_chat(gateway, "kept")
    for chat in (gone, kept):
        await chat.say("my secret")
        await chat.wait_messages(1, "reply")
    await gateway.settle()
    conversation = gone.conversation
    [open_session] = [
        s
        for s in (await gateway.admin_get("/admin/sessions?state=open"))["sessions"]
        if s["conversation"] == conversation
    ]
    db = tmp_path / "gateway.db"
    assert rows(db, "SELECT count(*) FROM outbox WHERE conversation = ?", conversation) == [(1,)]

    response = await gateway.client.delete(f"/admin/contacts/web:{conversation}", headers=gateway.admin_headers())
    assert response.status == 204
    await gone.wait_for(lambda frames: any(f.get("state") == "closed" for f in frames))
    await gateway.settle()
    assert gone.messages("closure") == []  # closed silently
    assert (
        await gateway.client.get(f"/admin/contacts/web:{conversation}", headers=gateway.admin_headers())
    ).status == 404
    missing = await gateway.client.get(f"/admin/sessions/{open_session['id']}", headers=gateway.admin_headers())
    assert missing.status == 404
    assert rows(db, "SELECT count(*) FROM sessions WHERE contact_id = ?", f"web:{conversation}") == [(0,)]
    assert rows(db, "SELECT count(*) FROM contacts WHERE id = ?", f"web:{conversation}") == [(0,)]
    assert rows(db, "SELECT count(*) FROM outbox WHERE conversation = ?", conversation) == [(0,)]
    assert rows(db, "SELECT count(*) FROM inbound WHERE payload LIKE ?", f'%"{conversation}"%') == [(0,)]
    # The other contact is untouched, and the erased one can come back as a new contact.
    assert len((await gateway.admin_get(f"/admin/contacts/web:{kept.conversation}"))["conversations"]) == 1
    await gone.say("back again")
    await gone.wait_messages(2, "reply")
    await gateway.settle()
    view = await gateway.admin_get(f"/admin/contacts/web:{conversation}")
    assert [m["text"] for m in view["transcript"]] == ["back again", "back again"]
    again = await gateway.client.delete("/admin/contacts/web:nobody", headers=gateway.admin_headers())
    assert again.status == 404


async def test_retention_prunes_by_age_in_the_background(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    settings = make_settings(
        tmp_path,
        [webchat_endpoint("short", minutes=0.005), webchat_endpoint("keep", minutes=0)],
        retention={"closed_sessions_days": 90, "messages_days": 7, "dedup_days": 3},
    )
    gateway = await start_gateway(settings)
    short, keep = await open_chat(gateway, "s", endpoint="short"), await open_chat(gateway, "k", endpoint="keep")
    await short.say("old news")
    await short.wait_messages(1, "closure")
    await keep.say("still here")
    await keep.wait_messages(1, "reply")
    await gateway.settle()
    opted_out = Contact(id="keep:stop", endpoint="keep", conversation="stop", created_at=time.time(), opted_out=True)
    await gateway.store.commit(Change(contacts=[opted_out]))
    await gateway.client.close()
    db = tmp_path / "gateway.db"
    assert rows(db, "SELECT count(*) FROM inbound") == [(2,)]

    # Eight days later: the sent messages (7 days) and dedup ids (3 days) go; sessions stay.
    later = await start_gateway(settings, clock=lambda: time.time() + 8 * DAY_S)
    await eventually(lambda: _count(later, "SELECT count(*) FROM outbox", 0))
    assert rows(db, "SELECT count(*) FROM inbound") == [(0,)]
    assert rows(db, "SELECT count(*) FROM sessions") == [(2,)]
    assert rows(db, "SELECT state FROM sessions WHERE endpoint = 'keep'") == [("open",)]
    await later.client.close()

    # Ninety-one days later: the closed session goes, then its contact; the open session, its
    # contact and the opted-out contact stay.
    much_later = await start_gateway(settings, clock=lambda: time.time() + 91 * DAY_S)
    await eventually(lambda: _count(much_later, "SELECT count(*) FROM contacts", 2))
    assert rows(db, "SELECT endpoint, state FROM sessions") == [("keep", "open")]
    assert sorted(rows(db, "SELECT id FROM contacts")) == sorted([(f"keep:{keep.conversation}",), ("keep:stop",)])


async def _count(gateway: Gateway, sql: str, want: int) -> bool:
    def read() -> int:
        return int(rows(Path(gateway.store._path), sql)[0][0])  # type: ignore[attr-defined]

    return await asyncio.to_thread(read) == want
