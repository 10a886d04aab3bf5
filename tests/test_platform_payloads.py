"""Platform payloads as they really come (DESIGN.md, issue #11 items 13-18): bodies shaped as
the platforms document and send them, signed as they sign, posted over HTTP to the real app;
platform APIs and the http flow are recording fakes on 127.0.0.1 port 0; real SQLite.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway, make_settings
from tests.fakeplatform import Answer, FakePlatform
from tests.kits import KITS, MESSENGER, SLACK, TWILIO, Kit
from tests.kits.messenger import PAGE, SEND_PATH, now_ms, page_body, text_item
from tests.kits.slack import POST as SLACK_POST
from tests.kits.slack import callback, encode, message
from tests.kits.twilio import ACCOUNT_SID, FROM_NUMBER, MESSAGES_PATH, USER, form_request, inbound_form, new_sid

FLOW = "/flow"


@pytest.fixture
async def api() -> AsyncIterator[FakePlatform]:
    """One fake for every platform API and for the http flow (each on its own path)."""
    async with FakePlatform() as platform:
        for kit in KITS:
            kit.install(platform)
        platform.respond(FLOW, Answer(json_body={"replies": []}))
        yield platform


def sent_sms(api: FakePlatform) -> list[dict[str, str]]:
    return [r.form() for r in api.to(MESSAGES_PATH)]


async def sessions_of(gateway: Gateway, kit: Kit, conversation: str) -> list[dict[str, Any]]:
    """The conversation's sessions, newest first; none when it has no contact."""
    found = await kit.contact(gateway, conversation)
    return [] if found is None else list(found["conversations"])


async def sms_post(gateway: Gateway, params: dict[str, str]) -> int:
    """POST Twilio's form, signed by the kit over the URL the gateway rebuilds; the status."""
    return (await TWILIO.post(gateway, form_request(params))).status


# -- 13. Messenger: each messaging item stands alone ----------------------------------------------


async def test_messenger_postback_with_only_user_ref_is_ignored_and_the_rest_of_the_batch_answered(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """Meta documents postbacks from the checkbox plugin with ``sender.user_ref`` and no id."""
    gateway = await start_gateway(MESSENGER.settings(tmp_path, api))
    user_ref_postback = {
        "sender": {"user_ref": "UNIQUE_REF_PARAM"},
        "recipient": {"id": PAGE},
        "timestamp": now_ms(),
        "postback": {"title": "Get Started", "payload": "START", "mid": "m_postback_ref"},
    }
    string_stamp_postback = {
        "sender": {"id": "PSID-2"},
        "recipient": {"id": PAGE},
        "timestamp": "yesterday",
        "postback": {"title": "Menu", "payload": "MENU", "mid": "m_postback_str"},
    }
    body = page_body([user_ref_postback, text_item("PSID-1", "still answered", "m_ok"), string_stamp_postback])
    assert (await MESSENGER.post(gateway, body)).status == 200
    await api.wait_for(1, SEND_PATH)
    await gateway.settle()
    assert [r.json()["message"]["text"] for r in api.to(SEND_PATH)] == ["still answered"]
    assert gateway.metrics.value("gateway_events_total", endpoint="fb", outcome="ignored") == 2
    assert await sessions_of(gateway, MESSENGER, "PSID-2") == []


async def test_messenger_postback_with_a_numeric_string_timestamp_is_a_postback(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(MESSENGER.settings(tmp_path, api))
    postback = {
        "sender": {"id": "PSID-3"},
        "recipient": {"id": PAGE},
        "timestamp": str(now_ms()),
        "postback": {"title": "Menu", "payload": "MENU", "mid": "m_postback_numeric"},
    }
    assert (await MESSENGER.post(gateway, page_body([postback]))).status == 200
    await gateway.settle()
    [session] = await sessions_of(gateway, MESSENGER, "PSID-3")
    assert session["state"] == "open" and session["message_count"] == 1


# -- 14, 15. Twilio status callbacks and OptOutType -------------------------------------------------


async def test_twilio_messaging_service_status_callback_with_body_is_not_a_message(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """A Messaging Service status callback carries our own Body and From = our number."""
    gateway = await start_gateway(TWILIO.settings(tmp_path, api))
    sid = new_sid()
    status_callback = {
        "SmsSid": sid,
        "SmsStatus": "sent",
        "MessageStatus": "sent",
        "Body": "This conversation has ended.",
        "To": USER,
        "MessagingServiceSid": "MG" + "a" * 32,
        "MessageSid": sid,
        "AccountSid": ACCOUNT_SID,
        "From": FROM_NUMBER,
        "ApiVersion": "2010-04-01",
    }
    assert await sms_post(gateway, status_callback) == 200
    await gateway.settle()
    assert api.to(MESSAGES_PATH) == []
    assert await TWILIO.contact(gateway, FROM_NUMBER) is None  # 404
    assert (await gateway.admin_get("/admin/sessions"))["sessions"] == []
    assert gateway.metrics.value("gateway_events_total", endpoint="sms", outcome="ignored") == 1


async def test_twilio_help_with_opt_out_type_is_not_echoed(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(TWILIO.settings(tmp_path, api))
    assert await sms_post(gateway, inbound_form("help", OptOutType="HELP")) == 200
    await gateway.settle()
    assert api.to(MESSAGES_PATH) == []
    assert (await gateway.admin_get("/admin/sessions"))["sessions"] == []


async def test_twilio_custom_opt_out_keyword_opts_the_number_out_and_custom_opt_in_back_in(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(TWILIO.settings(tmp_path, api))
    assert await sms_post(gateway, inbound_form("ARRET", OptOutType="STOP")) == 200
    await gateway.settle()
    body = await TWILIO.contact(gateway, USER)
    assert body is not None and body["contact"]["opted_out"] is True  # found: 200
    assert body["conversations"] == [] and api.to(MESSAGES_PATH) == []

    assert await sms_post(gateway, inbound_form("REPRENDRE", OptOutType="START")) == 200
    await gateway.settle()
    body = await TWILIO.contact(gateway, USER)
    assert body is not None and body["contact"]["opted_out"] is False
    assert body["conversations"] == [] and api.to(MESSAGES_PATH) == []


# -- 16. Slack app_mention ------------------------------------------------------------------------------


def mention(text: str, ts: str, channel: str = "C1") -> dict[str, Any]:
    return {"type": "app_mention", "user": "U1", "text": text, "ts": ts, "channel": channel, "event_ts": ts}


async def test_slack_app_mention_alone_is_a_user_message(tmp_path: Path, start_gateway: Any, api: FakePlatform) -> None:
    """An app subscribed only to ``app_mention`` answers the people who mention it."""
    gateway = await start_gateway(SLACK.settings(tmp_path, api))
    ack = await SLACK.post(gateway, encode(callback(mention("<@UBOT> hello", f"{time.time():.6f}"))))
    assert ack.status == 200
    [request] = await api.wait_for(1, SLACK_POST)
    assert request.json()["channel"] == "C1" and request.json()["text"] == "<@UBOT> hello"
    await gateway.settle()
    [session] = await sessions_of(gateway, SLACK, "C1")
    assert session["message_count"] == 1


async def test_slack_message_and_app_mention_of_one_mention_are_one_event(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """Subscribed to both, Slack sends a ``message`` and an ``app_mention`` (other event ids)
    with the same channel and ``ts``: one reply, one counted message."""
    gateway = await start_gateway(SLACK.settings(tmp_path, api))
    plain = message("<@UBOT> once")
    ts = plain["ts"]
    assert (await SLACK.post(gateway, encode(callback(plain, "EvAAAA1")))).status == 200
    assert (await SLACK.post(gateway, encode(callback(mention("<@UBOT> once", ts), "EvBBBB2")))).status == 200
    await api.wait_for(1, SLACK_POST)
    await gateway.settle()
    assert [r.json()["text"] for r in api.to(SLACK_POST)] == ["<@UBOT> once"]
    [session] = await sessions_of(gateway, SLACK, "C1")
    assert session["message_count"] == 1
    assert gateway.metrics.value("gateway_events_total", endpoint="sl", outcome="duplicate") == 1


# -- 17. bot messages to an opted-out contact ---------------------------------------------------------


async def test_admin_message_to_an_opted_out_contact_is_409_and_sends_nothing(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(TWILIO.settings(tmp_path, api))
    assert await sms_post(gateway, inbound_form("STOP")) == 200
    await gateway.settle()
    response = await gateway.client.post(
        "/admin/messages",
        json={"endpoint": "sms", "conversation": USER, "text": "a promotion"},
        headers=gateway.admin_headers(),
    )
    assert response.status == 409
    assert (await response.json())["error"] == "contact opted out"
    await gateway.settle()
    assert sent_sms(api) == []
    opted_out = await TWILIO.contact(gateway, USER)
    assert opted_out is not None and opted_out["conversations"] == []


# -- 18. lazy mode, a flow without intents ---------------------------------------------------------------


class MovableClock:
    """Wall-clock time that a test moves forward (arrival times, deadlines)."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s


async def test_lazy_first_message_after_the_deadline_reaches_the_flow_with_after_expiry(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    clock = MovableClock()
    endpoint = MESSENGER.endpoint(api.url)
    endpoint["session"] = {"expiration_minutes": 1, "mode": "lazy"}
    settings = make_settings(tmp_path, [endpoint], flow={"type": "http", "url": api.url + FLOW})
    gateway = await start_gateway(settings, clock=clock)
    assert (await MESSENGER.post(gateway, page_body([text_item("PSID-L", "first", "m_l1")]))).status == 200
    await api.wait_for(1, FLOW)
    clock.offset_s = 61.0  # past the one-minute deadline; lazy mode closed nothing meanwhile
    assert (await MESSENGER.post(gateway, page_body([text_item("PSID-L", "back", "m_l2")]))).status == 200
    await api.wait_for(2, FLOW)
    await gateway.settle()
    events = [r.json()["event"] for r in api.to(FLOW)]
    assert [(e["text"], e["after_expiry"]) for e in events] == [("first", False), ("back", True)]
    new, old = await sessions_of(gateway, MESSENGER, "PSID-L")
    assert (old["state"], old["close_reason"], old["notice"]) == ("closed", "inactivity", "none")
    assert new["state"] == "open"
    assert api.requests[-1].json()["session"]["id"] == new["id"]
