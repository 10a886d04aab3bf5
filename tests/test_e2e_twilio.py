"""Twilio SMS end to end, what only Twilio does: form webhooks signed with the SDK's own
``RequestValidator`` over the URL the gateway rebuilds go to the real app over HTTP; the REST
API is a recording fake on 127.0.0.1 port 0, reached by the real async Twilio client.

Covers the signed URL (the public URL behind a proxy, the query string, X-Forwarded-*), the
form-only webhook, status callbacks and opt-out keywords (S16), MMS without text and the 21610
refusal. The contract every platform keeps (signatures, bodies, redelivery, closure notices,
send retries) is in ``tests/test_webhook_contract.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway
from tests.fakeplatform import FakePlatform
from tests.kits import Kit
from tests.kits.twilio import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    FROM_NUMBER,
    MESSAGES_PATH,
    OTHER_USER,
    TWILIO,
    UNSUBSCRIBED,
    USER,
    form_request,
    inbound_form,
    twilio_signature,
)

WEBHOOK = TWILIO.webhook_path
BYE = TWILIO.bye


async def say(gateway: Gateway, text: str, sender: str = USER) -> None:
    await TWILIO.say(gateway, TWILIO.text(text, user=sender))


def sent(api: FakePlatform, to: str | None = None) -> list[str]:
    return TWILIO.sent_texts(api, to)


@pytest.fixture
def kit() -> Kit:
    return TWILIO


# -- the signed URL: a configured public URL, the query string, or X-Forwarded-* ----------------------


async def test_public_url_behind_a_proxy_is_the_signed_url(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(TWILIO.settings(tmp_path, api, server={"public_url": "https://sms.example.com/"}))
    ack = await TWILIO.post(gateway, TWILIO.text("via proxy"), signed_for="https://sms.example.com/webhooks/sms")
    assert ack == TWILIO.ack
    # A signature over the URL the request reached locally is not the one Twilio computes.
    assert (await TWILIO.post(gateway, TWILIO.text("local url"))).status == 401
    await api.wait_for(1, MESSAGES_PATH)
    await gateway.settle()
    assert sent(api) == ["via proxy"]


async def test_query_string_of_the_registered_url_is_signed(gateway: Gateway, api: FakePlatform) -> None:
    path = WEBHOOK + "?tenant=a&x=1"
    assert await TWILIO.post(gateway, TWILIO.text("with query"), path=path) == TWILIO.ack
    # Signed without the query string: not what Twilio signs for this URL.
    unsigned_query = TWILIO.webhook_url(gateway)
    ack = await TWILIO.post(gateway, TWILIO.text("query dropped"), path=path, signed_for=unsigned_query)
    assert ack.status == 401
    await api.wait_for(1, MESSAGES_PATH)
    await gateway.settle()
    assert sent(api) == ["with query"]


async def test_without_public_url_the_forwarded_host_and_proto_of_a_trusted_proxy_are_signed(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """From a peer in ``server.trusted_proxies`` (tests/test_hostile_input.py: from anyone else
    X-Forwarded-* are ignored)."""
    gateway = await start_gateway(TWILIO.settings(tmp_path, api, server={"trusted_proxies": ["127.0.0.1"]}))
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "bots.example.com"}
    ack = await TWILIO.post(
        gateway,
        TWILIO.text("forwarded"),
        signed_for="https://bots.example.com/webhooks/sms",
        extra_headers=forwarded,
    )
    assert ack == TWILIO.ack
    await api.wait_for(1, MESSAGES_PATH)
    assert sent(api) == ["forwarded"]


async def test_json_body_is_a_client_error_not_5xx(gateway: Gateway, api: FakePlatform) -> None:
    """Twilio posts forms only: a JSON body (even with a signature) is refused with a 4xx."""
    url = TWILIO.webhook_url(gateway)
    response = await gateway.client.post(
        WEBHOOK,
        data=b'{"MessageSid": "SM1", "Body": "hi"}',
        headers={"Content-Type": "application/json", "X-Twilio-Signature": twilio_signature(url, {})},
    )
    assert 400 <= response.status < 500
    await gateway.settle()
    assert api.requests == []
    assert await TWILIO.contact(gateway, USER) is None


# -- housekeeping (S16): status callbacks and opt-out keywords ---------------------------------------------


async def test_status_callback_is_200_twiml_and_opens_nothing(gateway: Gateway, api: FakePlatform) -> None:
    callback = {
        "SmsSid": "SM" + "c" * 32,
        "SmsStatus": "delivered",
        "MessageStatus": "delivered",
        "To": USER,
        "MessageSid": "SM" + "c" * 32,
        "AccountSid": ACCOUNT_SID,
        "From": FROM_NUMBER,
        "ApiVersion": "2010-04-01",
    }
    assert await TWILIO.post(gateway, form_request(callback)) == TWILIO.ack
    await gateway.settle()
    assert api.requests == []
    assert await TWILIO.contact(gateway, USER) is None
    assert await TWILIO.contact(gateway, FROM_NUMBER) is None
    assert (await gateway.admin_get("/admin/sessions"))["sessions"] == []
    assert TWILIO.events(gateway, "ignored") == 1


async def test_stop_opts_out_without_a_reply_and_skips_the_closure_sms_and_start_clears_it(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """CHANNELS.md opt-out: STOP is no interaction (S16) and gets no reply; the number's
    closure SMS is not sent (notice "skipped: opted out"); START opts back in."""
    gateway = await start_gateway(TWILIO.settings(tmp_path, api, minutes=0.01))
    await say(gateway, "hello")
    await api.wait_for(1, MESSAGES_PATH)
    await say(gateway, "Stop")
    await gateway.settle()
    body = await TWILIO.contact(gateway, USER)
    assert body is not None and body["contact"]["opted_out"] is True
    [session] = body["conversations"]
    assert session["message_count"] == 1  # STOP neither counts nor extends the session
    closed = await TWILIO.wait_closed(gateway, USER)
    await gateway.settle()
    assert closed["close_reason"] == "inactivity"
    assert closed["notice"] == "skipped: opted out"
    assert sent(api) == ["hello"]

    await say(gateway, "START")
    await gateway.settle()
    body = await TWILIO.contact(gateway, USER)
    assert body is not None and body["contact"]["opted_out"] is False
    assert len(body["conversations"]) == 1  # START opened no session either
    assert sent(api) == ["hello"]
    # Opted back in: the next conversation gets its reply and its closure SMS again.
    await say(gateway, "back again")
    await api.wait_for(3, MESSAGES_PATH)
    closed = await TWILIO.wait_closed(gateway, USER, count=2)
    assert closed["notice"] == "sent"
    assert sent(api, USER) == ["hello", "back again", BYE]


async def test_stop_from_an_unknown_number_records_the_opt_out(gateway: Gateway, api: FakePlatform) -> None:
    await say(gateway, "UNSUBSCRIBE", sender=OTHER_USER)
    await gateway.settle()
    body = await TWILIO.contact(gateway, OTHER_USER)
    assert body is not None
    assert body["contact"]["opted_out"] is True
    assert body["conversations"] == []
    assert api.requests == []


# -- non-text (S16) ------------------------------------------------------------------------------------


async def test_mms_without_text_opens_and_extends_the_session_without_an_echo(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(TWILIO.settings(tmp_path, api, minutes=30))
    media = {"NumMedia": "1", "MediaUrl0": "https://api.twilio.com/media/ME1", "MediaContentType0": "image/jpeg"}
    assert await TWILIO.post(gateway, form_request(inbound_form("", **media))) == TWILIO.ack
    await gateway.settle()
    opened = await TWILIO.session(gateway, USER)
    assert opened["state"] == "open" and opened["interactive"] is True and opened["message_count"] == 1
    live = gateway.manager.open_session("sms", USER)
    assert live is not None and live.expires_at is not None
    first_deadline = live.expires_at
    assert await TWILIO.post(gateway, form_request(inbound_form("", **media))) == TWILIO.ack
    await gateway.settle()
    [extended] = await TWILIO.sessions(gateway, USER)
    assert extended["id"] == opened["id"] and extended["message_count"] == 2
    assert live.expires_at > first_deadline  # the deadline moved: the MMS extended the session
    assert api.requests == []


# -- 21610: refused by Twilio ------------------------------------------------------------------------------


async def test_21610_unsubscribed_is_never_retried_and_recorded_as_skipped(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """The number opted out at Twilio (we never saw its STOP): reply and notice are tried once
    each, not retried, and recorded as skipped."""
    gateway = await start_gateway(TWILIO.settings(tmp_path, api, minutes=0.01))
    api.respond(MESSAGES_PATH, UNSUBSCRIBED)
    await say(gateway, "hello")
    await api.wait_for(1, MESSAGES_PATH)
    await gateway.settle()  # no retry is pending: the outbox is idle
    assert len(api.to(MESSAGES_PATH)) == 1
    # Twilio's own refusal: a dead letter operators can see; the notice outcome says skipped.
    assert TWILIO.messages_out(gateway, "dead") == 1
    assert TWILIO.messages_out(gateway, "retry") == 0
    closed = await TWILIO.wait_closed(gateway, USER)
    await gateway.settle()
    assert closed["notice"].startswith("skipped:") and "21610" in closed["notice"]
    assert AUTH_TOKEN not in closed["notice"]
    assert len(api.to(MESSAGES_PATH)) == 2  # the reply once, the notice once
    assert TWILIO.messages_out(gateway, "retry") == 0
    assert sent(api) == []  # nothing was accepted
