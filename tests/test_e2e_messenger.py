"""Messenger end to end: webhooks signed as Meta signs them (HMAC-SHA256 of the raw bytes) go to
the real app over HTTP; the Send API is a recording fake Graph API on 127.0.0.1 port 0.

Covers the verification handshake, rejected requests (nothing stored, never a 5xx), redelivery
(also across a restart on the same database), batches, housekeeping (S16), closure notices on
expiry (S7, S9) and the 24 h messaging window, non-text messages and send retries.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.wire import parse_iso
from tests.conftest import Gateway, make_settings
from tests.fakeplatform import Answer, FakePlatform

APP_SECRET = "e2e-app-secret"
VERIFY_TOKEN = "e2e-verify-token"
PAGE_TOKEN = "e2e-page-access-token"
PAGE = "PAGE-100"
SEND_PATH = "/v21.0/me/messages"
WEBHOOK = "/webhooks/fb"
SENT = Answer(json_body={"recipient_id": "ignored", "message_id": "m_sent"})
BYE = "This conversation has ended."


# -- building and signing webhooks as Meta does -------------------------------------------------


def fb_endpoint(api_url: str, minutes: float = 0, **on_close: Any) -> dict[str, Any]:
    """The ``fb`` endpoint; ``minutes=0`` never expires (tests that do not wait for a close)."""
    return {
        "name": "fb",
        "channel": "messenger",
        "api_base_url": api_url,
        "credentials": {"app_secret": APP_SECRET, "verify_token": VERIFY_TOKEN, "page_access_token": PAGE_TOKEN},
        "session": {"expiration_minutes": minutes, "on_close": {"messages": [BYE], **on_close}},
    }


def now_ms() -> int:
    return int(time.time() * 1000)


def text_item(psid: str, text: str, mid: str, ts_ms: int | None = None) -> dict[str, Any]:
    """One ``messaging`` item: a user's text message."""
    return {
        "sender": {"id": psid},
        "recipient": {"id": PAGE},
        "timestamp": ts_ms if ts_ms is not None else now_ms(),
        "message": {"mid": mid, "text": text},
    }


def page_body(*entries: list[dict[str, Any]]) -> bytes:
    """Meta's serialisation of a page webhook: one entry per list of items, \\uXXXX escapes."""
    payload = {
        "object": "page",
        "entry": [{"id": PAGE, "time": now_ms(), "messaging": items} for items in entries],
    }
    return json.dumps(payload, ensure_ascii=True).encode("ascii")


def meta_signature(body: bytes, secret: str = APP_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def post(gateway: Gateway, body: bytes, signature: str | None = "compute") -> tuple[int, str]:
    """POST ``body`` to the webhook, signed unless ``signature`` says otherwise."""
    headers = {"Content-Type": "application/json"}
    if signature == "compute":
        headers["X-Hub-Signature-256"] = meta_signature(body)
    elif signature is not None:
        headers["X-Hub-Signature-256"] = signature
    response = await gateway.client.post(WEBHOOK, data=body, headers=headers)
    return response.status, await response.text()


async def say(gateway: Gateway, psid: str, text: str, mid: str) -> None:
    status, _ = await post(gateway, page_body([text_item(psid, text, mid)]))
    assert status == 200


# -- reading what happened ----------------------------------------------------------------------


def sent_texts(api: FakePlatform, psid: str | None = None) -> list[str]:
    return [
        r.json()["message"]["text"] for r in api.to(SEND_PATH) if psid is None or r.json()["recipient"]["id"] == psid
    ]


async def contact_status(gateway: Gateway, psid: str) -> int:
    response = await gateway.client.get(f"/admin/contacts/fb:{psid}", headers=gateway.admin_headers())
    return response.status


async def conversations(gateway: Gateway, psid: str) -> list[dict[str, Any]]:
    body = await gateway.admin_get(f"/admin/contacts/fb:{psid}")
    return list(body["conversations"])


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Poll ``check`` until it holds (for state with no platform request to wait on)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


async def wait_closed(gateway: Gateway, psid: str) -> dict[str, Any]:
    """The newest session of ``psid`` once it is closed and its notice outcome is final."""

    async def closed() -> bool:
        sessions = await conversations(gateway, psid)
        return bool(sessions) and sessions[0]["state"] == "closed" and sessions[0]["notice"] != "queued"

    await wait_until(closed)
    return (await conversations(gateway, psid))[0]


def rejected(gateway: Gateway, status: int) -> float:
    return gateway.metrics.value("gateway_webhook_requests_total", endpoint="fb", outcome=f"rejected_{status}")


class ShiftedClock:
    """Wall-clock time plus an offset the test moves ("a day passes"). Loop timers still fire
    on real time; deadlines and the adapter's 24 h window check read this clock."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s


@pytest.fixture
async def api() -> AsyncIterator[FakePlatform]:
    async with FakePlatform() as platform:
        platform.respond(SEND_PATH, SENT)
        yield platform


# -- handshake ------------------------------------------------------------------------------------


async def test_handshake_with_the_verify_token_answers_the_challenge(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url)]))
    query = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"}
    response = await gateway.client.get(WEBHOOK, params=query)
    assert response.status == 200
    assert await response.text() == "1158201444"


@pytest.mark.parametrize(
    "query",
    [
        {"hub.mode": "subscribe", "hub.verify_token": "guess", "hub.challenge": "chal-7731"},
        {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN.upper(), "hub.challenge": "chal-7731"},
        {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "chal-7731"},
    ],
    ids=["wrong-token", "token-case", "wrong-mode"],
)
async def test_handshake_with_a_wrong_token_is_403(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, query: dict[str, str]
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url)]))
    response = await gateway.client.get(WEBHOOK, params=query)
    assert response.status == 403
    assert "chal-7731" not in await response.text()


# -- text in, echo out ------------------------------------------------------------------------------


async def test_text_is_echoed_through_the_send_api_as_a_response(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url)]))
    status, _ = await post(gateway, page_body([text_item("U1", "héllo wörld ✓", "m_1")]))
    assert status == 200
    [request] = await api.wait_for(1, SEND_PATH)
    assert request.method == "POST"
    assert request.query == {"access_token": PAGE_TOKEN}
    assert request.json() == {
        "recipient": {"id": "U1"},
        "messaging_type": "RESPONSE",
        "message": {"text": "héllo wörld ✓"},
    }
    await gateway.settle()
    [session] = await conversations(gateway, "U1")
    assert session["state"] == "open"
    assert session["channel"] == "messenger"
    assert session["conversation"] == "U1"
    assert session["contact_id"] == "fb:U1"
    assert session["message_count"] == 1
    assert session["interactive"] is True


# -- rejected requests: nothing stored, never a 5xx ----------------------------------------------------


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "sha256=" + "0" * 64,
        meta_signature(b"another body"),
        "COMPUTE-WITH-WRONG-SECRET",
        "sha1=" + "0" * 40,
        "sha256=not-hex",
        "",
    ],
    ids=["missing", "zeros", "other-body", "wrong-secret", "sha1-only", "not-hex", "empty"],
)
async def test_forged_or_missing_signature_is_401_and_stores_nothing(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, signature: str | None
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url)]))
    body = page_body([text_item("U1", "let me in", "m_forged")])
    if signature == "COMPUTE-WITH-WRONG-SECRET":
        signature = meta_signature(body, secret="not-the-app-secret")
    status, _ = await post(gateway, body, signature=signature)
    assert status in (401, 403)
    await gateway.settle()
    assert rejected(gateway, status) == 1
    assert await contact_status(gateway, "U1") == 404
    assert (await gateway.admin_get("/admin/sessions"))["sessions"] == []
    assert gateway.metrics.total("gateway_events_total") == 0
    assert api.requests == []
    # The same body, correctly signed afterwards, is new: the rejection left no dedup id behind.
    status, _ = await post(gateway, body)
    assert status == 200
    await api.wait_for(1, SEND_PATH)
    assert sent_texts(api, "U1") == ["let me in"]


async def test_a_body_changed_after_signing_is_rejected(tmp_path: Path, start_gateway: Any, api: FakePlatform) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url)]))
    body = page_body([text_item("U1", "pay 10", "m_1")])
    tampered = body.replace(b"pay 10", b"pay 99")
    status, _ = await post(gateway, tampered, signature=meta_signature(body))
    assert status == 401
    await gateway.settle()
    assert await contact_status(gateway, "U1") == 404
    assert api.requests == []


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe\x00garbage",
        b"",
        b"[]",
        b'{"object": "instagram", "entry": []}',
        b'{"object": "page"}',
        b'{"object": "page", "entry": {"id": "x"}}',
        b"[" * 50_000 + b"]" * 50_000,
    ],
    ids=[
        "not-json",
        "not-utf8",
        "empty",
        "array",
        "other-object",
        "no-entry",
        "entry-not-list",
        "deeply-nested",
    ],
)
async def test_malformed_body_with_a_valid_signature_is_400(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, body: bytes
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url)]))
    status, _ = await post(gateway, body)
    assert status == 400
    await gateway.settle()
    assert rejected(gateway, 400) == 1
    assert (await gateway.admin_get("/admin/sessions"))["sessions"] == []
    assert api.requests == []


@pytest.mark.parametrize(
    "body",
    [
        b'{"object": "page", "entry": ["x"]}',
        b'{"object": "page", "entry": [{"messaging": "x"}]}',
        b'{"object": "page", "entry": [{"messaging": [{"timestamp": 1, "message": {"mid": "m", "text": "t"}}]}]}',
        b'{"object": "page", "entry": [{"messaging": [{"sender": {"id": "U"}, "message": {"mid": "m"}}]}]}',
        b'{"object": "page", "entry": [{"messaging": [{"sender": {"id": "U"}, "timestamp": 1, "message": {}}]}]}',
    ],
    ids=["entry-item-not-object", "messaging-not-list", "no-sender", "no-timestamp", "no-mid"],
)
async def test_an_item_the_gateway_cannot_handle_is_200_counted_and_opens_nothing(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, body: bytes
) -> None:
    """DESIGN.md "Platform payloads as they really come": each messaging item stands alone."""
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url)]))
    status, _ = await post(gateway, body)
    assert status == 200
    await gateway.settle()
    assert gateway.metrics.value("gateway_events_total", endpoint="fb", outcome="ignored") == 1
    assert (await gateway.admin_get("/admin/sessions"))["sessions"] == []
    assert api.requests == []


@pytest.mark.parametrize("signature", [None, "sha256=" + "0" * 64, "compute"], ids=["unsigned", "forged", "valid"])
async def test_oversized_body_is_413_whatever_its_signature(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, signature: str | None
) -> None:
    settings = make_settings(tmp_path, [fb_endpoint(api.url)], server={"max_body_bytes": 2048})
    gateway = await start_gateway(settings)
    big = page_body([text_item("U1", "x" * 4000, "m_big")])
    status, _ = await post(gateway, big, signature=signature)
    assert status == 413
    # Just under the limit is still served: the limit is the configured one.
    small = page_body([text_item("U1", "x" * 1500, "m_small")])
    assert len(small) < 2048
    status, _ = await post(gateway, small)
    assert status == 200
    await api.wait_for(1, SEND_PATH)
    await gateway.settle()
    [session] = await conversations(gateway, "U1")
    assert session["message_count"] == 1


# -- redelivery -------------------------------------------------------------------------------------------


async def test_redelivered_mid_gets_200_and_exactly_one_reply(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url)]))
    body = page_body([text_item("U1", "once", "m_dup")])
    for _ in range(3):
        status, _ = await post(gateway, body)
        assert status == 200
    # Meta may redeliver with a new envelope (entry time, item order): the mid decides.
    status, _ = await post(gateway, page_body([text_item("U1", "once", "m_dup", ts_ms=now_ms() + 5)]))
    assert status == 200
    await api.wait_for(1, SEND_PATH)
    await gateway.settle()
    assert sent_texts(api) == ["once"]
    assert gateway.metrics.value("gateway_events_total", endpoint="fb", outcome="duplicate") == 3
    [session] = await conversations(gateway, "U1")
    assert session["message_count"] == 1


async def test_concurrent_redeliveries_of_one_mid_get_exactly_one_reply(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """Meta retries a delivery it thinks timed out while the first is still in flight."""
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url)]))
    body = page_body([text_item("U1", "race", "m_race")])
    answers = await asyncio.gather(*(post(gateway, body) for _ in range(5)))
    assert [status for status, _ in answers] == [200] * 5
    await api.wait_for(1, SEND_PATH)
    await gateway.settle()
    assert sent_texts(api) == ["race"]
    assert gateway.metrics.value("gateway_events_total", endpoint="fb", outcome="duplicate") == 4


async def test_same_mid_twice_in_one_batch_is_answered_once(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url)]))
    item = text_item("U1", "twice", "m_twice")
    assert (await post(gateway, page_body([item], [item])))[0] == 200
    await api.wait_for(1, SEND_PATH)
    await gateway.settle()
    assert sent_texts(api) == ["twice"]


async def test_batch_mixing_a_redelivered_and_a_new_message_answers_only_the_new_one(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url)]))
    first = text_item("U1", "first", "m_a", ts_ms=now_ms())
    await post(gateway, page_body([first]))
    await api.wait_for(1, SEND_PATH)
    status, _ = await post(gateway, page_body([first, text_item("U1", "second", "m_b", ts_ms=now_ms() + 1)]))
    assert status == 200
    await api.wait_for(2, SEND_PATH)
    await gateway.settle()
    assert sent_texts(api, "U1") == ["first", "second"]
    [session] = await conversations(gateway, "U1")
    assert session["message_count"] == 2


async def test_redelivery_after_a_restart_on_the_same_database_is_not_answered_again(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    settings = make_settings(tmp_path, [fb_endpoint(api.url)])
    body = page_body([text_item("U1", "before restart", "m_restart")])
    first = await start_gateway(settings)
    assert (await post(first, body))[0] == 200
    await api.wait_for(1, SEND_PATH)
    await first.settle()
    await first.client.close()

    second = await start_gateway(settings)
    assert (await post(second, body))[0] == 200
    await second.settle()
    assert sent_texts(api) == ["before restart"]
    assert second.metrics.value("gateway_events_total", endpoint="fb", outcome="duplicate") == 1
    # The restored session carries on with the next new message.
    await say(second, "U1", "after restart", "m_next")
    await api.wait_for(2, SEND_PATH)
    await second.settle()
    assert sent_texts(api) == ["before restart", "after restart"]
    [session] = await conversations(second, "U1")
    assert session["state"] == "open" and session["message_count"] == 2


async def test_long_text_is_echoed_in_parts_of_at_most_2000_characters_in_order(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url)]))
    words = [f"w{n:04d}" for n in range(900)]  # 5399 characters
    await say(gateway, "U1", " ".join(words), "m_long")
    await api.wait_for(3, SEND_PATH)
    await gateway.settle()
    parts = sent_texts(api, "U1")
    assert len(parts) == 3
    assert all(len(part) <= 2000 for part in parts)
    assert " ".join(parts).split() == words


# -- batches ----------------------------------------------------------------------------------------------


async def test_batch_of_two_entries_by_two_messaging_items_gets_four_replies_in_per_user_order(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url)]))
    t = now_ms()
    body = page_body(
        [text_item("A", "a1", "m_a1", t), text_item("B", "b1", "m_b1", t + 1)],
        [text_item("A", "a2", "m_a2", t + 2), text_item("B", "b2", "m_b2", t + 3)],
    )
    status, _ = await post(gateway, body)
    assert status == 200
    await api.wait_for(4, SEND_PATH)
    await gateway.settle()
    assert sent_texts(api, "A") == ["a1", "a2"]
    assert sent_texts(api, "B") == ["b1", "b2"]
    assert all(r.json()["messaging_type"] == "RESPONSE" for r in api.to(SEND_PATH))
    for psid in ("A", "B"):
        [session] = await conversations(gateway, psid)
        assert session["message_count"] == 2


async def test_batch_items_out_of_order_are_answered_in_timestamp_order(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """Meta does not guarantee order: the later entry may carry the earlier message."""
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url)]))
    t = now_ms()
    body = page_body(
        [text_item("A", "a3", "m_a3", t + 20), text_item("A", "a2", "m_a2", t + 10)],
        [text_item("A", "a1", "m_a1", t)],
    )
    assert (await post(gateway, body))[0] == 200
    await api.wait_for(3, SEND_PATH)
    assert sent_texts(api, "A") == ["a1", "a2", "a3"]


async def test_many_webhooks_of_one_user_are_answered_in_order(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url)]))
    api.respond(SEND_PATH, Answer(json_body={"recipient_id": "A", "message_id": "m"}, delay_s=0.01))
    for n in range(8):
        await say(gateway, "A", f"m{n}", f"m_{n}")
    await api.wait_for(8, SEND_PATH)
    assert sent_texts(api, "A") == [f"m{n}" for n in range(8)]


# -- housekeeping (S16) -----------------------------------------------------------------------------------


async def test_echoes_deliveries_and_reads_are_200_and_open_nothing(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """S16: our own echoes and delivery/read receipts are housekeeping: no session, no reply."""
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url)]))
    t = now_ms()
    echo = {
        "sender": {"id": PAGE},
        "recipient": {"id": "U1"},
        "timestamp": t,
        "message": {"mid": "m_echo", "is_echo": True, "app_id": 1517776481860111, "text": "hello"},
    }
    delivery = {
        "sender": {"id": "U1"},
        "recipient": {"id": PAGE},
        "timestamp": t,
        "delivery": {"mids": ["m_echo"], "watermark": t},
    }
    read = {"sender": {"id": "U1"}, "recipient": {"id": PAGE}, "timestamp": t, "read": {"watermark": t}}
    status, _ = await post(gateway, page_body([echo, delivery], [read]))
    assert status == 200
    await gateway.settle()
    assert api.requests == []
    assert await contact_status(gateway, "U1") == 404
    assert await contact_status(gateway, PAGE) == 404
    assert (await gateway.admin_get("/admin/sessions"))["sessions"] == []
    assert gateway.metrics.value("gateway_events_total", endpoint="fb", outcome="ignored") == 3
    assert gateway.metrics.value("gateway_events_total", endpoint="fb", outcome="accepted") == 0


async def test_housekeeping_does_not_extend_an_open_session(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url, minutes=30)]))
    await say(gateway, "U1", "hi", "m_1")
    await api.wait_for(1, SEND_PATH)
    await gateway.settle()
    [before] = await conversations(gateway, "U1")
    t = now_ms()
    read = {"sender": {"id": "U1"}, "recipient": {"id": PAGE}, "timestamp": t, "read": {"watermark": t}}
    assert (await post(gateway, page_body([read])))[0] == 200
    await gateway.settle()
    [after] = await conversations(gateway, "U1")
    assert after["last_activity_at"] == before["last_activity_at"]
    assert after["expires_at"] == before["expires_at"]
    assert after["message_count"] == 1


# -- non-text messages (S16) ---------------------------------------------------------------------------


def image_item(psid: str, mid: str) -> dict[str, Any]:
    return {
        "sender": {"id": psid},
        "recipient": {"id": PAGE},
        "timestamp": now_ms(),
        "message": {
            "mid": mid,
            "attachments": [{"type": "image", "payload": {"url": "https://scontent.example/cat.jpg"}}],
        },
    }


async def test_image_opens_and_extends_the_session_without_an_echo(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """S16: an image is an interaction (opens, extends, counts); echo does not answer it."""
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url, minutes=30)]))
    assert (await post(gateway, page_body([image_item("U1", "m_img1")])))[0] == 200
    await gateway.settle()
    [opened] = await conversations(gateway, "U1")
    assert opened["state"] == "open" and opened["interactive"] is True and opened["message_count"] == 1
    live = gateway.manager.open_session("fb", "U1")
    assert live is not None
    first_deadline = live.expires_at
    assert (await post(gateway, page_body([image_item("U1", "m_img2")])))[0] == 200
    await gateway.settle()
    [extended] = await conversations(gateway, "U1")
    assert extended["id"] == opened["id"]
    assert extended["message_count"] == 2
    assert live.expires_at is not None and first_deadline is not None
    assert live.expires_at > first_deadline  # the deadline moved: the image extended the session
    assert live.expires_at - live.last_activity_at == pytest.approx(1800)
    assert api.requests == []


async def test_s7_s9_image_only_session_still_gets_its_closure_notice(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """S13/S16: a session with only an image is interactive, so S9's notice goes out."""
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url, minutes=0.01)]))
    assert (await post(gateway, page_body([image_item("U1", "m_img")])))[0] == 200
    [notice] = await api.wait_for(1, SEND_PATH)
    assert notice.json() == {"recipient": {"id": "U1"}, "messaging_type": "UPDATE", "message": {"text": BYE}}
    session = await wait_closed(gateway, "U1")
    assert session["close_reason"] == "inactivity" and session["notice"] == "sent"


# -- closure notice on expiry (S7, S9) and the 24 h window ----------------------------------------------


async def test_s7_s9_closure_notice_goes_to_the_same_user_as_an_update_exactly_once(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url, minutes=0.01)]))
    await say(gateway, "U1", "hello", "m_1")
    await say(gateway, "U2", "other user", "m_2")
    requests = await api.wait_for(4, SEND_PATH)
    to_u1 = [r for r in requests if r.json()["recipient"]["id"] == "U1"]
    assert [r.json()["messaging_type"] for r in to_u1] == ["RESPONSE", "UPDATE"]
    assert [r.json()["message"]["text"] for r in to_u1] == ["hello", BYE]
    assert all(r.query == {"access_token": PAGE_TOKEN} for r in requests)
    session = await wait_closed(gateway, "U1")
    assert session["close_reason"] == "inactivity"
    assert session["notice"] == "sent"
    # On time: committed within 100 ms of the deadline.
    assert 0 <= parse_iso(session["closed_at"]) - parse_iso(session["expires_at"]) < 0.1
    await gateway.settle()
    await asyncio.sleep(0.3)  # a negative check: nothing more arrives
    assert sent_texts(api, "U1") == ["hello", BYE]
    assert sent_texts(api, "U2") == ["other user", BYE]


async def test_s9_on_close_notify_false_closes_silently(tmp_path: Path, start_gateway: Any, api: FakePlatform) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url, minutes=0.01, notify=False)]))
    await say(gateway, "U1", "hello", "m_1")
    await api.wait_for(1, SEND_PATH)
    session = await wait_closed(gateway, "U1")
    assert session["close_reason"] == "inactivity" and session["notice"] == "none"
    await gateway.settle()
    assert sent_texts(api) == ["hello"]


async def test_s6_next_message_after_the_close_opens_a_new_session(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url, minutes=0.01)]))
    await say(gateway, "U1", "first", "m_1")
    await api.wait_for(2, SEND_PATH)
    first = await wait_closed(gateway, "U1")
    await say(gateway, "U1", "again", "m_2")
    await api.wait_for(3, SEND_PATH)
    await gateway.settle()
    assert sent_texts(api, "U1") == ["first", BYE, "again"]
    newest, oldest = await conversations(gateway, "U1")
    assert oldest["id"] == first["id"] and oldest["state"] == "closed"
    assert newest["id"] != first["id"] and newest["state"] == "open" and newest["message_count"] == 1


@pytest.mark.parametrize(("hours_later", "inside"), [(23.0, True), (25.0, False)], ids=["23h-inside", "25h-outside"])
async def test_closure_notice_only_inside_the_24h_messaging_window(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, hours_later: float, inside: bool
) -> None:
    """CHANNELS.md: a proactive notice is allowed only within 24 h of the user's last message;
    outside it the notice is not sent and the session records why (``skipped: ...``)."""
    clock = ShiftedClock()
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url, minutes=0.02)]), clock=clock)
    await say(gateway, "U1", "hello", "m_1")
    await api.wait_for(1, SEND_PATH)  # the reply, inside the window
    clock.offset_s = hours_later * 3600  # the session's close (1.2 s on) happens this much later
    session = await wait_closed(gateway, "U1")
    await gateway.settle()
    assert session["close_reason"] == "inactivity"
    if inside:
        assert session["notice"] == "sent"
        assert sent_texts(api, "U1") == ["hello", BYE]
    else:
        assert session["notice"].startswith("skipped:")
        assert "24 h" in session["notice"]
        assert sent_texts(api, "U1") == ["hello"]


# -- platform failures ------------------------------------------------------------------------------------


async def test_send_api_500_once_is_retried_and_the_reply_delivered_once(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url)]))
    api.fail_next(SEND_PATH, Answer(status=500, json_body={"error": {"message": "oops", "code": 2}}))
    await say(gateway, "U1", "retry me", "m_1")
    requests = await api.wait_for(2, SEND_PATH)
    await gateway.settle()
    assert [r.json() for r in requests] == [requests[0].json()] * 2  # the same message, twice tried
    assert len(api.to(SEND_PATH)) == 2  # one failure, one delivery, nothing more
    assert gateway.metrics.value("gateway_messages_out_total", endpoint="fb", outcome="retry") == 1
    assert gateway.metrics.value("gateway_messages_out_total", endpoint="fb", outcome="sent") == 1


def _graph_error(code: int, message: str, subcode: int | None = None) -> Answer:
    error: dict[str, Any] = {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "A1"}
    if subcode is not None:
        error["error_subcode"] = subcode
    return Answer(status=400, json_body={"error": error})


@pytest.mark.parametrize(
    ("answer", "notice_prefix"),
    [
        (_graph_error(551, "This person isn't available right now."), "failed:"),
        (_graph_error(10, "(#10) This message is sent outside of allowed window.", 2018278), "skipped:"),
    ],
    ids=["551-user-unavailable", "10-outside-window"],
)
async def test_permanent_send_api_errors_on_the_notice_are_not_retried_and_recorded(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, answer: Answer, notice_prefix: str
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url, minutes=0.01)]))
    await say(gateway, "U1", "hello", "m_1")
    await api.wait_for(1, SEND_PATH)
    api.fail_next(SEND_PATH, answer)
    await api.wait_for(2, SEND_PATH)
    session = await wait_closed(gateway, "U1")
    await gateway.settle()
    assert session["notice"].startswith(notice_prefix)
    assert PAGE_TOKEN not in session["notice"]
    assert len(api.to(SEND_PATH)) == 2  # the reply and one attempt at the notice


async def test_postback_is_an_interaction_and_is_not_echoed(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """S16: a postback opens the session and counts; echo answers text messages only."""
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url, minutes=30)]))
    postback = {
        "sender": {"id": "U1"},
        "recipient": {"id": PAGE},
        "timestamp": now_ms(),
        "postback": {"title": "Get Started", "payload": "GET_STARTED", "mid": "m_pb"},
    }
    assert (await post(gateway, page_body([postback])))[0] == 200
    await say(gateway, "U1", "then text", "m_t")
    await api.wait_for(1, SEND_PATH)
    await gateway.settle()
    assert sent_texts(api, "U1") == ["then text"]  # the postback itself got no echo
    [session] = await conversations(gateway, "U1")
    assert session["message_count"] == 2


# -- bot-initiated messages and the 24 h window ------------------------------------------------------


async def test_bot_message_within_24h_of_the_users_last_message_is_sent_after_the_session_closed(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """CHANNELS.md: free-form messages are allowed within 24 h of the *user's* last message.
    The user wrote a second ago (in a session that has since expired): a bot-initiated message
    (POST /admin/messages, S13) is inside the window and must go out as an UPDATE."""
    gateway = await start_gateway(make_settings(tmp_path, [fb_endpoint(api.url, minutes=0.01)]))
    await say(gateway, "U1", "track my order", "m_1")
    await api.wait_for(2, SEND_PATH)  # the reply and the closure notice
    await wait_closed(gateway, "U1")
    response = await gateway.client.post(
        "/admin/messages",
        json={"endpoint": "fb", "conversation": "U1", "text": "Your order shipped"},
        headers=gateway.admin_headers(),
    )
    assert response.status == 202
    opened = (await response.json())["session"]
    assert opened["interactive"] is False
    await gateway.settle()
    assert sent_texts(api, "U1") == ["track my order", BYE, "Your order shipped"]
    assert api.to(SEND_PATH)[-1].json()["messaging_type"] == "UPDATE"
