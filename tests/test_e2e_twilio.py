"""Twilio SMS end to end: form webhooks signed with the SDK's own ``RequestValidator`` over the
URL the gateway rebuilds go to the real app over HTTP; the REST API is a recording fake on
127.0.0.1 port 0, reached by the real async Twilio client.

Covers the TwiML answer, rejected requests (nothing stored, never a 5xx), the public URL behind
a proxy, redelivery (also across a restart), closure notices on expiry (S7, S9), status
callbacks and opt-out keywords (S16), MMS without text, and send failures (retry, 21610).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from twilio.request_validator import RequestValidator

from gateway.wire import parse_iso
from tests.conftest import Gateway, make_settings
from tests.fakeplatform import Answer, FakePlatform

ACCOUNT_SID = "AC" + "e" * 32
AUTH_TOKEN = "e2e-twilio-auth-token-0123456789"
FROM_NUMBER = "+15550001111"
USER = "+15557654321"
OTHER_USER = "+447700900123"
MESSAGES_PATH = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
WEBHOOK = "/webhooks/sms"
TWIML_EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
BYE = "Session ended. Text again any time."
_sids = itertools.count(1)


def created() -> Answer:
    return Answer(status=201, json_body={"sid": "SM" + "f" * 32, "status": "queued", "account_sid": ACCOUNT_SID})


def sms_endpoint(api_url: str, minutes: float = 0, **on_close: Any) -> dict[str, Any]:
    """The ``sms`` endpoint; ``minutes=0`` never expires (tests that do not wait for a close)."""
    return {
        "name": "sms",
        "channel": "twilio",
        "api_base_url": api_url,
        "credentials": {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "from_number": FROM_NUMBER},
        "session": {"expiration_minutes": minutes, "on_close": {"messages": [BYE], **on_close}},
        # Twilio's default is 1 send/s per number (tests/test_ratelimit.py covers it); raised so
        # tests that answer a dozen messages do not wait a dozen seconds.
        "rate_limit": {"per_second": 100},
    }


def new_sid() -> str:
    return f"SM{next(_sids):032x}"


def inbound(body: str, sender: str = USER, sid: str | None = None, **extra: str) -> dict[str, str]:
    """The form Twilio posts for an incoming SMS (fields as documented, more may come)."""
    sid = sid or new_sid()
    return {
        "ToCountry": "US",
        "SmsMessageSid": sid,
        "NumMedia": "0",
        "SmsSid": sid,
        "SmsStatus": "received",
        "Body": body,
        "To": FROM_NUMBER,
        "NumSegments": "1",
        "MessageSid": sid,
        "AccountSid": ACCOUNT_SID,
        "From": sender,
        "ApiVersion": "2010-04-01",
        **extra,
    }


def twilio_signature(url: str, params: Mapping[str, str], token: str = AUTH_TOKEN) -> str:
    return str(RequestValidator(token).compute_signature(url, dict(params)))


async def post(
    gateway: Gateway,
    params: Mapping[str, str],
    *,
    signature: str | None = "compute",
    sign_url: str | None = None,
    path: str = WEBHOOK,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, str, str]:
    """POST the form to ``path``, signed (by default) over the URL the gateway will rebuild:
    the test server's own URL, as the client's Host header names it."""
    url = sign_url or str(gateway.client.make_url(path))
    all_headers = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
    if signature == "compute":
        all_headers["X-Twilio-Signature"] = twilio_signature(url, params)
    elif signature is not None:
        all_headers["X-Twilio-Signature"] = signature
    response = await gateway.client.post(path, data=urlencode(params), headers=all_headers)
    return response.status, response.content_type, await response.text()


async def say(gateway: Gateway, text: str, sender: str = USER, sid: str | None = None) -> None:
    status, content_type, answer = await post(gateway, inbound(text, sender, sid))
    assert (status, content_type, answer) == (200, "text/xml", TWIML_EMPTY)


# -- reading what happened ----------------------------------------------------------------------


def sent(api: FakePlatform, to: str | None = None) -> list[str]:
    return [r.form()["Body"] for r in api.to(MESSAGES_PATH) if to is None or r.form()["To"] == to]


async def contact(gateway: Gateway, number: str) -> tuple[int, Any]:
    response = await gateway.client.get(f"/admin/contacts/sms:{number}", headers=gateway.admin_headers())
    return response.status, (await response.json() if response.status == 200 else None)


async def conversations(gateway: Gateway, number: str) -> list[dict[str, Any]]:
    status, body = await contact(gateway, number)
    assert status == 200
    return list(body["conversations"])


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Poll ``check`` until it holds (for state with no platform request to wait on)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


async def wait_closed(gateway: Gateway, number: str, count: int = 1) -> dict[str, Any]:
    """The newest session of ``number`` once ``count`` sessions are closed with a final notice."""

    async def closed() -> bool:
        sessions = await conversations(gateway, number)
        done = [s for s in sessions if s["state"] == "closed" and s["notice"] != "queued"]
        return len(done) >= count and sessions[0]["state"] == "closed"

    await wait_until(closed)
    return (await conversations(gateway, number))[0]


def rejected(gateway: Gateway, status: int) -> float:
    return gateway.metrics.value("gateway_webhook_requests_total", endpoint="sms", outcome=f"rejected_{status}")


@pytest.fixture
async def api() -> AsyncIterator[FakePlatform]:
    async with FakePlatform() as platform:
        platform.respond(MESSAGES_PATH, lambda _request: created())
        yield platform


# -- text in, echo out -------------------------------------------------------------------------------


async def test_sms_is_answered_with_empty_twiml_and_echoed_through_the_rest_api(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [sms_endpoint(api.url)]))
    status, content_type, answer = await post(gateway, inbound("héllo & <b>wörld</b> 1+1=2 %20 ✓"))
    assert status == 200
    assert content_type == "text/xml"
    assert answer == TWIML_EMPTY
    [request] = await api.wait_for(1, MESSAGES_PATH)
    assert request.method == "POST"
    expected_auth = "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    assert request.headers["Authorization"] == expected_auth
    form = request.form()
    assert form["To"] == USER
    assert form["From"] == FROM_NUMBER
    assert form["Body"] == "héllo & <b>wörld</b> 1+1=2 %20 ✓"
    await gateway.settle()
    [session] = await conversations(gateway, USER)
    assert session["channel"] == "twilio"
    assert session["conversation"] == USER
    assert session["contact_id"] == f"sms:{USER}"
    assert session["state"] == "open" and session["message_count"] == 1


async def test_messages_of_one_number_are_answered_in_order(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [sms_endpoint(api.url)]))
    api.respond(MESSAGES_PATH, lambda _request: Answer(status=201, json_body={"sid": "SM1"}, delay_s=0.01))
    for n in range(6):
        await say(gateway, f"m{n}")
        await say(gateway, f"o{n}", sender=OTHER_USER)
    await api.wait_for(12, MESSAGES_PATH)
    assert sent(api, USER) == [f"m{n}" for n in range(6)]
    assert sent(api, OTHER_USER) == [f"o{n}" for n in range(6)]


async def test_long_text_is_echoed_in_parts_of_at_most_1600_characters(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [sms_endpoint(api.url)]))
    words = [f"w{n:03d}" for n in range(700)]  # 3499 characters
    await say(gateway, " ".join(words))
    await api.wait_for(3, MESSAGES_PATH)
    await gateway.settle()
    parts = sent(api, USER)
    assert len(parts) == 3 and all(len(part) <= 1600 for part in parts)
    assert "".join(parts).split() == words


# -- the signed URL: the test server's, a configured public URL, or X-Forwarded-* --------------------


async def test_public_url_behind_a_proxy_is_the_signed_url(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    settings = make_settings(tmp_path, [sms_endpoint(api.url)], server={"public_url": "https://sms.example.com/"})
    gateway = await start_gateway(settings)
    params = inbound("via proxy")
    status, _, _ = await post(gateway, params, sign_url="https://sms.example.com/webhooks/sms")
    assert status == 200
    # A signature over the URL the request reached locally is not the one Twilio computes.
    status, _, _ = await post(gateway, inbound("local url"))
    assert status == 401
    await api.wait_for(1, MESSAGES_PATH)
    await gateway.settle()
    assert sent(api) == ["via proxy"]


async def test_query_string_of_the_registered_url_is_signed(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [sms_endpoint(api.url)]))
    path = WEBHOOK + "?tenant=a&x=1"
    status, _, _ = await post(gateway, inbound("with query"), path=path)
    assert status == 200
    # Signed without the query string: not what Twilio signs for this URL.
    unsigned_query = str(gateway.client.make_url(WEBHOOK))
    status, _, _ = await post(gateway, inbound("query dropped"), path=path, sign_url=unsigned_query)
    assert status == 401
    await api.wait_for(1, MESSAGES_PATH)
    await gateway.settle()
    assert sent(api) == ["with query"]


async def test_without_public_url_the_forwarded_host_and_proto_of_a_trusted_proxy_are_signed(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """From a peer in ``server.trusted_proxies`` (tests/test_hostile_input.py: from anyone else
    X-Forwarded-* are ignored)."""
    settings = make_settings(tmp_path, [sms_endpoint(api.url)], server={"trusted_proxies": ["127.0.0.1"]})
    gateway = await start_gateway(settings)
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "bots.example.com"}
    status, _, _ = await post(
        gateway, inbound("forwarded"), sign_url="https://bots.example.com/webhooks/sms", headers=forwarded
    )
    assert status == 200
    await api.wait_for(1, MESSAGES_PATH)
    assert sent(api) == ["forwarded"]


# -- rejected requests: nothing stored, never a 5xx ------------------------------------------------------


@pytest.mark.parametrize(
    "signature",
    [None, "", "AAAAAAAAAAAAAAAAAAAAAAAAAAA=", "WRONG-TOKEN", "OTHER-PARAMS"],
    ids=["missing", "empty", "forged", "wrong-token", "other-params"],
)
async def test_forged_or_missing_signature_is_401_and_stores_nothing(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, signature: str | None
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [sms_endpoint(api.url)]))
    params = inbound("let me in")
    url = str(gateway.client.make_url(WEBHOOK))
    if signature == "WRONG-TOKEN":
        signature = twilio_signature(url, params, token="not-the-auth-token")
    elif signature == "OTHER-PARAMS":
        signature = twilio_signature(url, {**params, "Body": "something else"})
    status, _, _ = await post(gateway, params, signature=signature)
    assert status in (401, 403)
    await gateway.settle()
    assert rejected(gateway, status) == 1
    assert (await contact(gateway, USER))[0] == 404
    assert (await gateway.admin_get("/admin/sessions"))["sessions"] == []
    assert gateway.metrics.total("gateway_events_total") == 0
    assert api.requests == []
    # The same MessageSid, properly signed afterwards, is new: the rejection left no trace.
    await say(gateway, "let me in", sid=params["MessageSid"])
    await api.wait_for(1, MESSAGES_PATH)
    assert sent(api) == ["let me in"]


@pytest.mark.parametrize(
    "params",
    [
        {"AccountSid": ACCOUNT_SID, "From": USER, "To": FROM_NUMBER, "Body": "no sid"},
        {"MessageSid": "", "AccountSid": ACCOUNT_SID, "From": USER, "To": FROM_NUMBER, "Body": "empty sid"},
        {},
        {"MessageSid": "SM1", "AccountSid": ACCOUNT_SID, "To": FROM_NUMBER, "Body": "no sender"},
        {"MessageSid": "SM2", "From": USER, "Body": "", "NumMedia": "lots"},
    ],
    ids=["no-message-sid", "empty-message-sid", "empty-form", "no-from", "garbage-num-media"],
)
async def test_signed_form_that_cannot_be_twilios_is_400(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, params: dict[str, str]
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [sms_endpoint(api.url)]))
    status, _, _ = await post(gateway, params)
    assert status == 400
    await gateway.settle()
    assert rejected(gateway, 400) == 1
    assert (await gateway.admin_get("/admin/sessions"))["sessions"] == []
    assert api.requests == []


async def test_json_body_and_get_are_client_errors_not_5xx(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [sms_endpoint(api.url)]))
    url = str(gateway.client.make_url(WEBHOOK))
    response = await gateway.client.post(
        WEBHOOK,
        data=b'{"MessageSid": "SM1", "Body": "hi"}',
        headers={"Content-Type": "application/json", "X-Twilio-Signature": twilio_signature(url, {})},
    )
    assert 400 <= response.status < 500
    response = await gateway.client.get(WEBHOOK)
    assert 400 <= response.status < 500
    assert api.requests == []


@pytest.mark.parametrize("signature", [None, "AAAA", "compute"], ids=["unsigned", "forged", "valid"])
async def test_oversized_form_is_413_whatever_its_signature(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, signature: str | None
) -> None:
    settings = make_settings(tmp_path, [sms_endpoint(api.url)], server={"max_body_bytes": 2048})
    gateway = await start_gateway(settings)
    status, _, _ = await post(gateway, inbound("x" * 4000), signature=signature)
    assert status == 413
    small = inbound("y" * 1000)
    assert len(urlencode(small)) < 2048
    await say(gateway, small["Body"], sid=small["MessageSid"])
    await api.wait_for(1, MESSAGES_PATH)
    assert sent(api) == ["y" * 1000]


# -- redelivery ------------------------------------------------------------------------------------------


async def test_redelivered_message_sid_gets_twiml_and_exactly_one_reply(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [sms_endpoint(api.url)]))
    params = inbound("once")
    for _ in range(3):
        status, content_type, answer = await post(gateway, params)
        assert (status, content_type, answer) == (200, "text/xml", TWIML_EMPTY)
    await api.wait_for(1, MESSAGES_PATH)
    await gateway.settle()
    assert sent(api) == ["once"]
    assert gateway.metrics.value("gateway_events_total", endpoint="sms", outcome="duplicate") == 2
    [session] = await conversations(gateway, USER)
    assert session["message_count"] == 1


async def test_concurrent_redeliveries_of_one_message_sid_get_exactly_one_reply(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """Twilio retries once after its 15 s timeout, possibly while the first is in flight."""
    gateway = await start_gateway(make_settings(tmp_path, [sms_endpoint(api.url)]))
    params = inbound("race")
    answers = await asyncio.gather(*(post(gateway, params) for _ in range(5)))
    assert [status for status, _, _ in answers] == [200] * 5
    await api.wait_for(1, MESSAGES_PATH)
    await gateway.settle()
    assert sent(api) == ["race"]
    assert gateway.metrics.value("gateway_events_total", endpoint="sms", outcome="duplicate") == 4


async def test_redelivery_after_a_restart_on_the_same_database_is_not_answered_again(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    settings = make_settings(tmp_path, [sms_endpoint(api.url)])
    params = inbound("before restart")
    first = await start_gateway(settings)
    assert (await post(first, params))[0] == 200
    await api.wait_for(1, MESSAGES_PATH)
    await first.settle()
    await first.client.close()

    second = await start_gateway(settings)
    status, content_type, answer = await post(second, params)  # signed over the new server's URL
    assert (status, content_type, answer) == (200, "text/xml", TWIML_EMPTY)
    await second.settle()
    assert sent(api) == ["before restart"]
    assert second.metrics.value("gateway_events_total", endpoint="sms", outcome="duplicate") == 1
    await say(second, "after restart")
    await api.wait_for(2, MESSAGES_PATH)
    await second.settle()
    assert sent(api) == ["before restart", "after restart"]
    [session] = await conversations(second, USER)
    assert session["state"] == "open" and session["message_count"] == 2


# -- closure notice on expiry (S7, S9) ------------------------------------------------------------------


async def test_s7_s9_closure_sms_goes_to_the_same_number_from_the_endpoint_number_exactly_once(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [sms_endpoint(api.url, minutes=0.01)]))
    await say(gateway, "hello")
    await say(gateway, "hi", sender=OTHER_USER)
    requests = await api.wait_for(4, MESSAGES_PATH)
    notices = [r.form() for r in requests if r.form()["Body"] == BYE]
    assert sorted(form["To"] for form in notices) == sorted([USER, OTHER_USER])
    assert all(form["From"] == FROM_NUMBER for form in notices)
    session = await wait_closed(gateway, USER)
    assert session["close_reason"] == "inactivity"
    assert session["notice"] == "sent"
    assert 0 <= parse_iso(session["closed_at"]) - parse_iso(session["expires_at"]) < 0.1
    await gateway.settle()
    await asyncio.sleep(0.3)  # a negative check: nothing more arrives
    assert sent(api, USER) == ["hello", BYE]
    assert sent(api, OTHER_USER) == ["hi", BYE]


# -- housekeeping (S16): status callbacks and opt-out keywords ---------------------------------------------


async def test_status_callback_is_200_twiml_and_opens_nothing(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [sms_endpoint(api.url)]))
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
    status, content_type, answer = await post(gateway, callback)
    assert (status, content_type, answer) == (200, "text/xml", TWIML_EMPTY)
    await gateway.settle()
    assert api.requests == []
    assert (await contact(gateway, USER))[0] == 404
    assert (await contact(gateway, FROM_NUMBER))[0] == 404
    assert (await gateway.admin_get("/admin/sessions"))["sessions"] == []
    assert gateway.metrics.value("gateway_events_total", endpoint="sms", outcome="ignored") == 1


async def test_stop_opts_out_without_a_reply_and_skips_the_closure_sms_and_start_clears_it(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """CHANNELS.md opt-out: STOP is no interaction (S16) and gets no reply; the number's
    closure SMS is not sent (notice "skipped: opted out"); START opts back in."""
    gateway = await start_gateway(make_settings(tmp_path, [sms_endpoint(api.url, minutes=0.01)]))
    await say(gateway, "hello")
    await api.wait_for(1, MESSAGES_PATH)
    await say(gateway, "Stop")
    await gateway.settle()
    status, body = await contact(gateway, USER)
    assert status == 200 and body["contact"]["opted_out"] is True
    [session] = body["conversations"]
    assert session["message_count"] == 1  # STOP neither counts nor extends the session
    closed = await wait_closed(gateway, USER)
    await gateway.settle()
    assert closed["close_reason"] == "inactivity"
    assert closed["notice"] == "skipped: opted out"
    assert sent(api) == ["hello"]

    await say(gateway, "START")
    await gateway.settle()
    status, body = await contact(gateway, USER)
    assert body["contact"]["opted_out"] is False
    assert len(body["conversations"]) == 1  # START opened no session either
    assert sent(api) == ["hello"]
    # Opted back in: the next conversation gets its reply and its closure SMS again.
    await say(gateway, "back again")
    await api.wait_for(3, MESSAGES_PATH)
    closed = await wait_closed(gateway, USER, count=2)
    assert closed["notice"] == "sent"
    assert sent(api, USER) == ["hello", "back again", BYE]


async def test_stop_from_an_unknown_number_records_the_opt_out(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [sms_endpoint(api.url)]))
    await say(gateway, "UNSUBSCRIBE", sender=OTHER_USER)
    await gateway.settle()
    status, body = await contact(gateway, OTHER_USER)
    assert status == 200
    assert body["contact"]["opted_out"] is True
    assert body["conversations"] == []
    assert api.requests == []


# -- non-text (S16) ------------------------------------------------------------------------------------


async def test_mms_without_text_opens_and_extends_the_session_without_an_echo(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [sms_endpoint(api.url, minutes=30)]))
    media = {"NumMedia": "1", "MediaUrl0": "https://api.twilio.com/media/ME1", "MediaContentType0": "image/jpeg"}
    status, _, _ = await post(gateway, inbound("", **media))
    assert status == 200
    await gateway.settle()
    [opened] = await conversations(gateway, USER)
    assert opened["state"] == "open" and opened["interactive"] is True and opened["message_count"] == 1
    live = gateway.manager.open_session("sms", USER)
    assert live is not None and live.expires_at is not None
    first_deadline = live.expires_at
    status, _, _ = await post(gateway, inbound("", **media))
    assert status == 200
    await gateway.settle()
    [extended] = await conversations(gateway, USER)
    assert extended["id"] == opened["id"] and extended["message_count"] == 2
    assert live.expires_at > first_deadline  # the deadline moved: the MMS extended the session
    assert api.requests == []


# -- platform failures -------------------------------------------------------------------------------------


async def test_rest_api_500_once_is_retried_and_the_reply_delivered_once(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [sms_endpoint(api.url)]))
    api.fail_next(MESSAGES_PATH, Answer(status=500, json_body={"code": 20500, "message": "Internal", "status": 500}))
    await say(gateway, "retry me")
    requests = await api.wait_for(2, MESSAGES_PATH)
    await gateway.settle()
    assert [r.form() for r in requests] == [requests[0].form()] * 2
    assert len(api.to(MESSAGES_PATH)) == 2
    assert gateway.metrics.value("gateway_messages_out_total", endpoint="sms", outcome="retry") == 1
    assert gateway.metrics.value("gateway_messages_out_total", endpoint="sms", outcome="sent") == 1


UNSUBSCRIBED = Answer(
    status=400,
    json_body={
        "code": 21610,
        "message": "Attempt to send to unsubscribed recipient",
        "more_info": "https://www.twilio.com/docs/errors/21610",
        "status": 400,
    },
)


async def test_21610_unsubscribed_is_never_retried_and_recorded_as_skipped(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """The number opted out at Twilio (we never saw its STOP): reply and notice are tried once
    each, not retried, and recorded as skipped."""
    gateway = await start_gateway(make_settings(tmp_path, [sms_endpoint(api.url, minutes=0.01)]))
    api.respond(MESSAGES_PATH, UNSUBSCRIBED)
    await say(gateway, "hello")
    await api.wait_for(1, MESSAGES_PATH)
    await gateway.settle()  # no retry is pending: the outbox is idle
    assert len(api.to(MESSAGES_PATH)) == 1
    # Twilio's own refusal: a dead letter operators can see; the notice outcome says skipped.
    assert gateway.metrics.value("gateway_messages_out_total", endpoint="sms", outcome="dead") == 1
    assert gateway.metrics.value("gateway_messages_out_total", endpoint="sms", outcome="retry") == 0
    closed = await wait_closed(gateway, USER)
    await gateway.settle()
    assert closed["notice"].startswith("skipped:") and "21610" in closed["notice"]
    assert AUTH_TOKEN not in closed["notice"]
    assert len(api.to(MESSAGES_PATH)) == 2  # the reply once, the notice once
    assert gateway.metrics.value("gateway_messages_out_total", endpoint="sms", outcome="retry") == 0


async def test_s9_on_close_notify_false_sends_no_closure_sms(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [sms_endpoint(api.url, minutes=0.01, notify=False)]))
    await say(gateway, "hello")
    await api.wait_for(1, MESSAGES_PATH)
    closed = await wait_closed(gateway, USER)
    await gateway.settle()
    assert closed["close_reason"] == "inactivity" and closed["notice"] == "none"
    assert sent(api) == ["hello"]
