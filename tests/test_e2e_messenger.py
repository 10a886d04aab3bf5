"""Messenger end to end, what only Messenger does: webhooks signed as Meta signs them go to the
real app over HTTP; the Send API is a recording fake Graph API on 127.0.0.1 port 0.

Covers the verification handshake, batches of entries and messaging items (dedup and order
within one webhook), housekeeping (S16), images and postbacks, the 24 h messaging window and
the Graph API's permanent errors. The contract every platform keeps (signatures, bodies,
redelivery, closure notices, send retries) is in ``tests/test_webhook_contract.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway
from tests.fakeplatform import Answer, FakePlatform
from tests.kits import Kit
from tests.kits.messenger import BYE, MESSENGER, PAGE, PAGE_TOKEN, SEND_PATH, VERIFY_TOKEN, now_ms, page_body, text_item

WEBHOOK = MESSENGER.webhook_path


async def post(gateway: Gateway, body: bytes) -> None:
    """POST ``body`` signed; assert Meta's answer."""
    assert await MESSENGER.post(gateway, body) == MESSENGER.ack


async def say(gateway: Gateway, psid: str, text: str, mid: str) -> None:
    await MESSENGER.say(gateway, MESSENGER.text(text, user=psid, event_id=mid))


def sent_texts(api: FakePlatform, psid: str | None = None) -> list[str]:
    return MESSENGER.sent_texts(api, psid)


class ShiftedClock:
    """Wall-clock time plus an offset the test moves ("a day passes"). Loop timers still fire
    on real time; deadlines and the adapter's 24 h window check read this clock."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s


@pytest.fixture
def kit() -> Kit:
    return MESSENGER


# -- handshake ------------------------------------------------------------------------------------


async def test_handshake_with_the_verify_token_answers_the_challenge(gateway: Gateway, api: FakePlatform) -> None:
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
async def test_handshake_with_a_wrong_token_is_403(gateway: Gateway, api: FakePlatform, query: dict[str, str]) -> None:
    response = await gateway.client.get(WEBHOOK, params=query)
    assert response.status == 403
    assert "chal-7731" not in await response.text()


# -- batches: dedup and order within one webhook ------------------------------------------------------


async def test_same_mid_twice_in_one_batch_is_answered_once(gateway: Gateway, api: FakePlatform) -> None:
    item = text_item("U1", "twice", "m_twice")
    await post(gateway, page_body([item], [item]))
    await api.wait_for(1, SEND_PATH)
    await gateway.settle()
    assert sent_texts(api) == ["twice"]


async def test_batch_mixing_a_redelivered_and_a_new_message_answers_only_the_new_one(
    gateway: Gateway, api: FakePlatform
) -> None:
    first = text_item("U1", "first", "m_a", ts_ms=now_ms())
    await post(gateway, page_body([first]))
    await api.wait_for(1, SEND_PATH)
    await post(gateway, page_body([first, text_item("U1", "second", "m_b", ts_ms=now_ms() + 1)]))
    await api.wait_for(2, SEND_PATH)
    await gateway.settle()
    assert sent_texts(api, "U1") == ["first", "second"]
    assert (await MESSENGER.session(gateway, "U1"))["message_count"] == 2


async def test_batch_of_two_entries_by_two_messaging_items_gets_four_replies_in_per_user_order(
    gateway: Gateway, api: FakePlatform
) -> None:
    t = now_ms()
    body = page_body(
        [text_item("A", "a1", "m_a1", t), text_item("B", "b1", "m_b1", t + 1)],
        [text_item("A", "a2", "m_a2", t + 2), text_item("B", "b2", "m_b2", t + 3)],
    )
    await post(gateway, body)
    await api.wait_for(4, SEND_PATH)
    await gateway.settle()
    assert sent_texts(api, "A") == ["a1", "a2"]
    assert sent_texts(api, "B") == ["b1", "b2"]
    assert all(r.json()["messaging_type"] == "RESPONSE" for r in api.to(SEND_PATH))
    for psid in ("A", "B"):
        assert (await MESSENGER.session(gateway, psid))["message_count"] == 2


async def test_batch_items_out_of_order_are_answered_in_timestamp_order(gateway: Gateway, api: FakePlatform) -> None:
    """Meta does not guarantee order: the later entry may carry the earlier message."""
    t = now_ms()
    body = page_body(
        [text_item("A", "a3", "m_a3", t + 20), text_item("A", "a2", "m_a2", t + 10)],
        [text_item("A", "a1", "m_a1", t)],
    )
    await post(gateway, body)
    await api.wait_for(3, SEND_PATH)
    assert sent_texts(api, "A") == ["a1", "a2", "a3"]


# -- housekeeping (S16) -----------------------------------------------------------------------------------


def read_receipt(psid: str) -> dict[str, Any]:
    t = now_ms()
    return {"sender": {"id": psid}, "recipient": {"id": PAGE}, "timestamp": t, "read": {"watermark": t}}


async def test_echoes_deliveries_and_reads_are_200_and_open_nothing(gateway: Gateway, api: FakePlatform) -> None:
    """S16: our own echoes and delivery/read receipts are housekeeping: no session, no reply."""
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
    await post(gateway, page_body([echo, delivery], [read_receipt("U1")]))
    await gateway.settle()
    assert api.requests == []
    assert await MESSENGER.contact(gateway, "U1") is None
    assert await MESSENGER.contact(gateway, PAGE) is None
    assert (await gateway.admin_get("/admin/sessions"))["sessions"] == []
    assert MESSENGER.events(gateway, "ignored") == 3
    assert MESSENGER.events(gateway, "accepted") == 0


async def test_housekeeping_does_not_extend_an_open_session(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(MESSENGER.settings(tmp_path, api, minutes=30))
    await say(gateway, "U1", "hi", "m_1")
    await api.wait_for(1, SEND_PATH)
    await gateway.settle()
    before = await MESSENGER.session(gateway, "U1")
    await post(gateway, page_body([read_receipt("U1")]))
    await gateway.settle()
    after = await MESSENGER.session(gateway, "U1")
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
    gateway = await start_gateway(MESSENGER.settings(tmp_path, api, minutes=30))
    await post(gateway, page_body([image_item("U1", "m_img1")]))
    await gateway.settle()
    opened = await MESSENGER.session(gateway, "U1")
    assert opened["state"] == "open" and opened["interactive"] is True and opened["message_count"] == 1
    live = gateway.manager.open_session("fb", "U1")
    assert live is not None
    first_deadline = live.expires_at
    await post(gateway, page_body([image_item("U1", "m_img2")]))
    await gateway.settle()
    extended = await MESSENGER.session(gateway, "U1")
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
    gateway = await start_gateway(MESSENGER.settings(tmp_path, api, minutes=0.01))
    await post(gateway, page_body([image_item("U1", "m_img")]))
    [notice] = await api.wait_for(1, SEND_PATH)
    MESSENGER.check_notice(notice, "U1", BYE)
    session = await MESSENGER.wait_closed(gateway, "U1")
    assert session["close_reason"] == "inactivity" and session["notice"] == "sent"


async def test_postback_is_an_interaction_and_is_not_echoed(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """S16: a postback opens the session and counts; echo answers text messages only."""
    gateway = await start_gateway(MESSENGER.settings(tmp_path, api, minutes=30))
    postback = {
        "sender": {"id": "U1"},
        "recipient": {"id": PAGE},
        "timestamp": now_ms(),
        "postback": {"title": "Get Started", "payload": "GET_STARTED", "mid": "m_pb"},
    }
    await post(gateway, page_body([postback]))
    await say(gateway, "U1", "then text", "m_t")
    await api.wait_for(1, SEND_PATH)
    await gateway.settle()
    assert sent_texts(api, "U1") == ["then text"]  # the postback itself got no echo
    assert (await MESSENGER.session(gateway, "U1"))["message_count"] == 2


# -- the 24 h messaging window ----------------------------------------------------------------------------


@pytest.mark.parametrize(("hours_later", "inside"), [(23.0, True), (25.0, False)], ids=["23h-inside", "25h-outside"])
async def test_closure_notice_only_inside_the_24h_messaging_window(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, hours_later: float, inside: bool
) -> None:
    """CHANNELS.md: a proactive notice is allowed only within 24 h of the user's last message;
    outside it the notice is not sent and the session records why (``skipped: ...``)."""
    clock = ShiftedClock()
    settings = MESSENGER.settings(tmp_path, api, minutes=0.02)
    gateway = await start_gateway(settings, clock=clock)
    await say(gateway, "U1", "hello", "m_1")
    await api.wait_for(1, SEND_PATH)  # the reply, inside the window
    clock.offset_s = hours_later * 3600  # the session's close (1.2 s on) happens this much later
    session = await MESSENGER.wait_closed(gateway, "U1")
    await gateway.settle()
    assert session["close_reason"] == "inactivity"
    if inside:
        assert session["notice"] == "sent"
        assert sent_texts(api, "U1") == ["hello", BYE]
    else:
        assert session["notice"].startswith("skipped:")
        assert "24 h" in session["notice"]
        assert sent_texts(api, "U1") == ["hello"]


async def test_bot_message_within_24h_of_the_users_last_message_is_sent_after_the_session_closed(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """CHANNELS.md: free-form messages are allowed within 24 h of the *user's* last message.
    The user wrote a second ago (in a session that has since expired): a bot-initiated message
    (POST /admin/messages, S13) is inside the window and must go out as an UPDATE."""
    gateway = await start_gateway(MESSENGER.settings(tmp_path, api, minutes=0.01))
    await say(gateway, "U1", "track my order", "m_1")
    await api.wait_for(2, SEND_PATH)  # the reply and the closure notice
    await MESSENGER.wait_closed(gateway, "U1")
    opened = await gateway.bot_message("fb", "U1", "Your order shipped")
    assert opened["interactive"] is False
    await gateway.settle()
    assert sent_texts(api, "U1") == ["track my order", BYE, "Your order shipped"]
    MESSENGER.check_notice(api.to(SEND_PATH)[-1], "U1", "Your order shipped")


# -- the Graph API's permanent errors ------------------------------------------------------------------


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
    gateway = await start_gateway(MESSENGER.settings(tmp_path, api, minutes=0.01))
    await say(gateway, "U1", "hello", "m_1")
    await api.wait_for(1, SEND_PATH)
    api.fail_next(SEND_PATH, answer)
    await api.wait_for(2, SEND_PATH)
    session = await MESSENGER.wait_closed(gateway, "U1")
    await gateway.settle()
    assert session["notice"].startswith(notice_prefix)
    assert PAGE_TOKEN not in session["notice"]
    assert len(api.to(SEND_PATH)) == 2  # the reply and one attempt at the notice


@pytest.mark.parametrize("body", list(MESSENGER.unhandled_items.values()), ids=list(MESSENGER.unhandled_items))
async def test_an_item_the_gateway_cannot_handle_is_200_counted_and_opens_nothing(
    gateway: Gateway, api: FakePlatform, body: bytes
) -> None:
    """DESIGN.md "Platform payloads as they really come": each messaging item stands alone."""
    ack = await MESSENGER.post(gateway, body)
    assert ack.status == 200
    await gateway.settle()
    assert gateway.metrics.value("gateway_events_total", endpoint="fb", outcome="ignored") == 1
    assert (await gateway.admin_get("/admin/sessions"))["sessions"] == []
    assert api.requests == []
