"""Twilio SMS adapter: signed form webhooks (signed with the SDK's own validator) and REST sends
against a recording fake API on 127.0.0.1."""

from __future__ import annotations

import base64
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
import pytest
from multidict import CIMultiDict, MultiDict
from twilio.request_validator import RequestValidator

from channels.base import WebhookRequest
from channels.registry import Channel
from channels.twilio_sms import (
    TWIML_EMPTY,
    TwilioAdapter,
    is_status_callback,
    opt_keyword,
)
from gateway.errors import BadPayload, BadSignature, ConfigError, DeliveryError, DeliverySkipped
from gateway.models import EventKind, OutboundMessage
from gateway.settings import EndpointSettings, Secret
from tests.fakeplatform import Answer, FakePlatform
from tests.kits.twilio import UNSUBSCRIBED
from tests.outbound import outbound_message

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "s3cr3t-auth-token-0123456789abcd"
FROM_NUMBER = "+15550000000"
USER = "+15551234567"
MESSAGES_PATH = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
PUBLIC_URL = "https://bots.example.com/webhooks/sms?tenant=a&x=1"
CREATED = Answer(status=201, json_body={"sid": "SM" + "f" * 32, "status": "queued"})

Params = list[tuple[str, str]]


def endpoint(api_base_url: str | None = None, **credentials: str) -> EndpointSettings:
    creds = {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "from_number": FROM_NUMBER, **credentials}
    return EndpointSettings(
        name="sms",
        channel=Channel.TWILIO,
        path="/webhooks/sms",
        api_base_url=api_base_url,
        credentials={key: Secret(value) for key, value in creds.items()},
    )


def inbound(body: str = "hello", **extra: str) -> Params:
    params = {
        "MessageSid": "SM" + "a" * 32,
        "SmsSid": "SM" + "a" * 32,
        "AccountSid": ACCOUNT_SID,
        "From": USER,
        "To": FROM_NUMBER,
        "Body": body,
        "NumMedia": "0",
        "SmsStatus": "received",
        **extra,
    }
    return list(params.items())


def signed(
    params: Params,
    *,
    sign_url: str = PUBLIC_URL,
    url: str = PUBLIC_URL,
    signature: str | None = "compute",
    with_form: bool = True,
    token: str = AUTH_TOKEN,
) -> WebhookRequest:
    """A request as the web layer builds it, signed over ``sign_url`` like Twilio does."""
    form = MultiDict(params)
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/x-www-form-urlencoded"})
    if signature == "compute":
        headers["X-Twilio-Signature"] = RequestValidator(token).compute_signature(sign_url, form)
    elif signature is not None:
        headers["X-Twilio-Signature"] = signature
    parts = urlsplit(url)
    return WebhookRequest(
        method="POST",
        path=parts.path,
        query=dict(parse_qsl(parts.query)),
        public_url=url,
        headers=headers,
        body=urlencode(params).encode(),
        content_type="application/x-www-form-urlencoded",
        form=form if with_form else None,
    )


def outbound(text: str, key: str = "reply:1:0") -> OutboundMessage:
    return outbound_message("sms", "twilio", USER, text, key=key)


@asynccontextmanager
async def started(
    api: FakePlatform | None = None,
    *,
    base_url: str | None = None,
    clock: Callable[[], float] = time.time,
    send_timeout_s: float = 10.0,
) -> AsyncIterator[TwilioAdapter]:
    """A started adapter whose API origin is ``base_url``, else the fake's."""
    origin = base_url or (api.url if api else None)
    adapter = TwilioAdapter(endpoint(origin), clock=clock, send_timeout_s=send_timeout_s)
    async with aiohttp.ClientSession() as http:
        await adapter.start(http)
        try:
            yield adapter
        finally:
            await adapter.aclose()


# -- pure predicates ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        ({"MessageSid": "SM1", "MessageStatus": "delivered", "SmsStatus": "delivered"}, True),
        ({"MessageSid": "SM1", "SmsStatus": "sent"}, True),
        ({"MessageSid": "SM1", "MessageStatus": "failed", "ErrorCode": "30003"}, True),
        ({"MessageSid": "SM1", "SmsStatus": "received", "Body": "hi"}, False),  # inbound messages carry it too
        ({"MessageSid": "SM1", "SmsStatus": "received", "Body": ""}, False),  # MMS without text
        ({"MessageSid": "SM1", "Body": "hi"}, False),
        ({"MessageSid": "SM1"}, False),
    ],
)
def test_is_status_callback(form: dict[str, str], expected: bool) -> None:
    assert is_status_callback(form) is expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        *((word, EventKind.OPT_OUT) for word in ("STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE")),
        ("OPTOUT", EventKind.OPT_OUT),
        ("stop ", EventKind.OPT_OUT),
        ("  Stop\n", EventKind.OPT_OUT),
        ("START", EventKind.OPT_IN),
        ("yes", EventKind.OPT_IN),
        (" unstop ", EventKind.OPT_IN),
        ("stop it", None),
        ("please stop", None),
        ("STOP ALL", None),
        ("", None),
        ("hello", None),
    ],
)
def test_opt_keyword(body: str, expected: EventKind | None) -> None:
    assert opt_keyword(body) is expected


# -- inbound -----------------------------------------------------------------------------------


def test_valid_message() -> None:
    parsed = TwilioAdapter(endpoint()).parse_webhook(signed(inbound("hello there")))
    assert parsed.ignored == 0
    [event] = parsed.events
    assert event.kind is EventKind.MESSAGE
    assert event.conversation == USER
    assert event.dedup_key == event.message_id == "SM" + "a" * 32
    assert event.text == "hello there"
    assert event.attachments == ()
    assert event.is_interaction
    assert parsed.response.status == 200
    assert parsed.response.content_type == "text/xml"
    assert parsed.response.text == TWIML_EMPTY == '<?xml version="1.0" encoding="UTF-8"?><Response/>'


def test_body_parsed_when_web_layer_gave_no_form() -> None:
    parsed = TwilioAdapter(endpoint()).parse_webhook(signed(inbound("a&b=c é"), with_form=False))
    assert parsed.events[0].text == "a&b=c é"


def test_blank_values_are_signed_and_kept() -> None:
    parsed = TwilioAdapter(endpoint()).parse_webhook(signed(inbound("", FromCity="")))
    assert parsed.events[0].text == ""


def test_blank_values_kept_when_parsing_the_body() -> None:
    # parse_qsl drops blank values unless told: the signature covers them.
    parsed = TwilioAdapter(endpoint()).parse_webhook(signed(inbound("hi", FromCity=""), with_form=False))
    assert parsed.events[0].text == "hi"


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        "forged",
        base64.b64encode(b"x" * 20).decode(),
        RequestValidator("another-token").compute_signature(PUBLIC_URL, MultiDict(inbound())),
    ],
    ids=["missing", "empty", "garbage", "wrong-hmac", "other-token"],
)
def test_missing_or_forged_signature(signature: str | None) -> None:
    with pytest.raises(BadSignature):
        TwilioAdapter(endpoint()).parse_webhook(signed(inbound(), signature=signature))


@pytest.mark.parametrize(
    "sign_url",
    [
        PUBLIC_URL.replace("https://", "http://"),
        PUBLIC_URL.split("?")[0],  # query string left out
        PUBLIC_URL.replace("tenant=a", "tenant=b"),
        "https://bots.example.com/webhooks/other?tenant=a&x=1",
        "https://evil.example.com/webhooks/sms?tenant=a&x=1",
    ],
)
def test_signature_for_another_url(sign_url: str) -> None:
    with pytest.raises(BadSignature):
        TwilioAdapter(endpoint()).parse_webhook(signed(inbound(), sign_url=sign_url))


def test_signature_with_explicit_default_port_is_accepted() -> None:
    # The SDK checks the URL with and without the port, as Twilio's own signing varies.
    url = "https://bots.example.com:443/webhooks/sms?tenant=a&x=1"
    parsed = TwilioAdapter(endpoint()).parse_webhook(signed(inbound(), sign_url=PUBLIC_URL, url=url))
    assert len(parsed.events) == 1


def test_tampered_parameter_is_rejected() -> None:
    request = signed(inbound("hello"))
    tampered = MultiDict(request.form or {})
    tampered["Body"] = "goodbye"
    forged = dataclasses.replace(request, form=tampered)
    with pytest.raises(BadSignature):
        TwilioAdapter(endpoint()).parse_webhook(forged)


def test_empty_auth_token_accepts_nothing() -> None:
    adapter = TwilioAdapter(endpoint(auth_token=""))
    with pytest.raises(BadSignature):
        adapter.parse_webhook(signed(inbound(), token=""))


@pytest.mark.parametrize("with_form", [True, False])
def test_repeated_parameters(with_form: bool) -> None:
    params = [*inbound("hi"), ("Tag", "b"), ("Tag", "a"), ("Tag", "c")]
    parsed = TwilioAdapter(endpoint()).parse_webhook(signed(params, with_form=with_form))
    assert parsed.events[0].text == "hi"


def test_repeated_parameter_dropped_in_transit_is_rejected() -> None:
    params = [*inbound("hi"), ("Tag", "a"), ("Tag", "b")]
    request = signed(params)
    shortened = signed([p for p in params if p != ("Tag", "b")], signature=request.headers["X-Twilio-Signature"])
    with pytest.raises(BadSignature):
        TwilioAdapter(endpoint()).parse_webhook(shortened)


def test_signature_checked_before_the_payload() -> None:
    with pytest.raises(BadSignature):
        TwilioAdapter(endpoint()).parse_webhook(signed([("Body", "x")], signature="forged"))


@pytest.mark.parametrize(
    "params",
    [
        [("Body", "hi"), ("From", USER)],
        [("MessageSid", ""), ("Body", "hi"), ("From", USER)],
        [],
    ],
    ids=["no-sid", "empty-sid", "empty-form"],
)
def test_no_message_sid_is_bad_payload(params: Params) -> None:
    with pytest.raises(BadPayload):
        TwilioAdapter(endpoint()).parse_webhook(signed(params))


def test_json_body_is_bad_payload() -> None:
    request = signed([('{"entry": []}', "")], with_form=False)
    request = dataclasses.replace(request, body=b'{"entry": []}', content_type="application/json")
    with pytest.raises(BadPayload):
        TwilioAdapter(endpoint()).parse_webhook(request)


def test_garbage_num_media_is_bad_payload() -> None:
    with pytest.raises(BadPayload):
        TwilioAdapter(endpoint()).parse_webhook(signed(inbound("x", NumMedia="lots")))


def test_status_callback_is_ignored() -> None:
    params: Params = [
        ("MessageSid", "SM" + "b" * 32),
        ("AccountSid", ACCOUNT_SID),
        ("From", FROM_NUMBER),
        ("To", USER),
        ("MessageStatus", "delivered"),
        ("SmsStatus", "delivered"),
    ]
    parsed = TwilioAdapter(endpoint()).parse_webhook(signed(params))
    assert parsed.events == []
    assert parsed.ignored == 1
    assert (parsed.response.status, parsed.response.content_type, parsed.response.text) == (
        200,
        "text/xml",
        TWIML_EMPTY,
    )


def test_status_callback_still_needs_a_signature() -> None:
    params: Params = [("MessageSid", "SM1"), ("MessageStatus", "delivered")]
    with pytest.raises(BadSignature):
        TwilioAdapter(endpoint()).parse_webhook(signed(params, signature="forged"))


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ("STOP", EventKind.OPT_OUT),
        ("stop ", EventKind.OPT_OUT),
        ("Unsubscribe", EventKind.OPT_OUT),
        ("START", EventKind.OPT_IN),
        (" yes", EventKind.OPT_IN),
    ],
)
def test_opt_keywords(body: str, kind: EventKind) -> None:
    parsed = TwilioAdapter(endpoint()).parse_webhook(signed(inbound(body)))
    [event] = parsed.events
    assert event.kind is kind
    assert event.text == body
    assert event.conversation == USER
    assert event.dedup_key == "SM" + "a" * 32
    assert not event.is_interaction
    assert parsed.response.text == TWIML_EMPTY


def test_mms_attachments() -> None:
    params = inbound(
        "",
        NumMedia="2",
        MediaUrl0="https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME0",
        MediaContentType0="image/jpeg",
        MediaUrl1="https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1",
        MediaContentType1="video/mp4",
        MediaUrl2="https://ignored.example/beyond-num-media",
    )
    [event] = TwilioAdapter(endpoint()).parse_webhook(signed(params)).events
    assert event.kind is EventKind.MESSAGE
    assert event.text is None
    assert event.attachments == (
        {
            "type": "media",
            "url": "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME0",
            "content_type": "image/jpeg",
        },
        {
            "type": "media",
            "url": "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1",
            "content_type": "video/mp4",
        },
    )
    assert event.is_interaction


def test_mms_with_caption_keeps_the_text() -> None:
    params = inbound("look", NumMedia="1", MediaUrl0="https://m.example/0", MediaContentType0="image/png")
    [event] = TwilioAdapter(endpoint()).parse_webhook(signed(params)).events
    assert event.text == "look"
    assert len(event.attachments) == 1


def test_huge_num_media_is_bounded() -> None:
    [event] = TwilioAdapter(endpoint()).parse_webhook(signed(inbound("", NumMedia="999999999999"))).events
    assert event.attachments == ()


def test_whatsapp_sender_kept_as_sent() -> None:
    params = [(k, "whatsapp:" + USER if k == "From" else v) for k, v in inbound("hi")]
    [event] = TwilioAdapter(endpoint()).parse_webhook(signed(params)).events
    assert event.conversation == "whatsapp:" + USER


def test_no_get_handshake() -> None:
    with pytest.raises(BadPayload):
        TwilioAdapter(endpoint()).handshake(signed([], signature=None))


# -- outbound ----------------------------------------------------------------------------------


async def test_send() -> None:
    async with FakePlatform() as api, started(api) as adapter:
        api.respond(MESSAGES_PATH, CREATED)
        await adapter.send(outbound("Hello from the bot"))
        [request] = api.to(MESSAGES_PATH)
    assert request.method == "POST"
    expected_auth = "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    assert request.headers["Authorization"] == expected_auth
    assert request.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    assert request.form() == {"To": USER, "From": FROM_NUMBER, "Body": "Hello from the bot"}


async def test_send_with_base_url_path_prefix() -> None:
    async with FakePlatform() as api, started(base_url=api.url + "/proxy/") as adapter:
        api.respond("/proxy" + MESSAGES_PATH, CREATED)
        await adapter.send(outbound("hi"))
        assert len(api.to("/proxy" + MESSAGES_PATH)) == 1


async def test_long_text_is_split_in_order() -> None:
    text = "".join(f"{i:05d} " for i in range(600))  # 3600 characters
    async with FakePlatform() as api, started(api) as adapter:
        api.respond(MESSAGES_PATH, CREATED)
        await adapter.send(outbound(text))
        bodies = [r.form()["Body"] for r in api.to(MESSAGES_PATH)]
    assert len(bodies) == 3
    assert all(len(body) <= 1600 for body in bodies)
    assert "".join(bodies) == text


async def test_long_text_is_split_in_utf16_units() -> None:
    text = "\N{GRINNING FACE}" * 1000  # 2000 UTF-16 units: 1600 of them fit in one body
    async with FakePlatform() as api, started(api) as adapter:
        api.respond(MESSAGES_PATH, CREATED)
        await adapter.send(outbound(text))
        bodies = [r.form()["Body"] for r in api.to(MESSAGES_PATH)]
    assert [len(body) for body in bodies] == [800, 200]


async def test_split_retry_resumes_after_accepted_parts() -> None:
    text = "a" * 1600 + "b" * 1600 + "c" * 10
    message = outbound(text, key="reply:7:0")
    reported: list[tuple[int, int]] = []

    async def progress(done: int, total: int) -> None:  # as the outbox does, which also stores it
        reported.append((done, total))
        message.parts_sent = done

    async with FakePlatform() as api, started(api) as adapter:
        api.respond(MESSAGES_PATH, CREATED)
        api.fail_next(MESSAGES_PATH, CREATED, Answer(status=503, json_body={"code": 20500, "message": "busy"}))
        with pytest.raises(DeliveryError) as failed:
            await adapter.send(message, progress)
        assert failed.value.retryable
        assert reported == [(1, 3)]
        await adapter.send(message, progress)
        bodies = [r.form()["Body"][0] for r in api.to(MESSAGES_PATH)]
    assert bodies == ["a", "b", "b", "c"]  # "a" sent once; the failed "b" again; then "c"
    assert reported == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize(
    "answer",
    [
        UNSUBSCRIBED,
        # RFC 9457 bodies make the SDK raise TwilioServiceException, which is not a TwilioRestException.
        Answer(
            status=400,
            json_body={
                "type": "https://www.twilio.com/docs/errors/21610",
                "title": "Unsubscribed",
                "status": 400,
                "code": 21610,
            },
        ),
    ],
    ids=["legacy", "rfc9457"],
)
async def test_unsubscribed_recipient_is_permanent(answer: Answer) -> None:
    async with FakePlatform() as api, started(api) as adapter:
        api.respond(MESSAGES_PATH, answer)
        with pytest.raises(DeliveryError) as failed:
            await adapter.send(outbound("closure notice"))
        assert len(api.to(MESSAGES_PATH)) == 1  # the SDK did not retry
    assert isinstance(failed.value, DeliverySkipped)
    assert failed.value.retryable is False
    assert failed.value.reason == "21610: recipient opted out"


@pytest.mark.parametrize(
    ("answer", "retry_after_s"),
    [
        (
            Answer(
                status=429,
                json_body={"code": 20429, "message": "Too Many Requests", "status": 429},
                headers={"Retry-After": "7"},
            ),
            7.0,
        ),
        (Answer(status=429, json_body={"code": 20429, "message": "Too Many Requests", "status": 429}), None),
        (Answer(status=429, text="slow down"), None),
        (Answer(status=400, json_body={"code": 20429, "message": "Too Many Requests", "status": 400}), None),
        (Answer(status=429, json_body={"code": 20429}, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:30 GMT"}), 30.0),
    ],
    ids=["retry-after", "no-header", "not-json", "code-only", "http-date"],
)
async def test_rate_limited_is_retryable(answer: Answer, retry_after_s: float | None) -> None:
    fixed_now = 1445412480.0  # 2015-10-21T07:28:00Z
    async with FakePlatform() as api, started(api, clock=lambda: fixed_now) as adapter:
        api.respond(MESSAGES_PATH, answer)
        with pytest.raises(DeliveryError) as failed:
            await adapter.send(outbound("hi"))
        assert len(api.to(MESSAGES_PATH)) == 1
    assert failed.value.retryable is True
    assert failed.value.retry_after_s == retry_after_s


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_error_is_retryable(status: int) -> None:
    async with FakePlatform() as api, started(api) as adapter:
        api.respond(MESSAGES_PATH, Answer(status=status, text="<html>oops</html>"))
        with pytest.raises(DeliveryError) as failed:
            await adapter.send(outbound("hi"))
        assert len(api.to(MESSAGES_PATH)) == 1  # no retry inside the SDK: the outbox decides
    assert failed.value.retryable is True
    assert failed.value.retry_after_s is None


@pytest.mark.parametrize(
    ("code", "status", "reason"),
    [
        (21211, 400, "21211: invalid 'To' number"),
        (21614, 400, "21614: 'To' is not a mobile number"),
        (20003, 401, "20003: authentication failed"),
        (21602, 400, "twilio 400 (21602): Unable to create record: Message body is required."),
        (20404, 404, "twilio 404 (20404): Unable to create record: Message body is required."),
    ],
)
async def test_client_errors_are_permanent(code: int, status: int, reason: str) -> None:
    async with FakePlatform() as api, started(api) as adapter:
        api.respond(
            MESSAGES_PATH,
            Answer(status=status, json_body={"code": code, "status": status, "message": "Message body is required."}),
        )
        with pytest.raises(DeliveryError) as failed:
            await adapter.send(outbound("hi"))
    assert failed.value.retryable is False
    assert failed.value.reason == reason


async def test_reason_never_contains_the_auth_token() -> None:
    async with FakePlatform() as api, started(api) as adapter:
        api.respond(MESSAGES_PATH, Answer(status=400, json_body={"code": 21999, "message": f"bad {AUTH_TOKEN}"}))
        with pytest.raises(DeliveryError) as failed:
            await adapter.send(outbound("hi"))
    assert AUTH_TOKEN not in failed.value.reason
    assert AUTH_TOKEN not in repr(adapter)


async def test_timeout_is_retryable() -> None:
    async with FakePlatform() as api, started(api, send_timeout_s=0.2) as adapter:
        api.respond(MESSAGES_PATH, Answer(status=201, json_body={"sid": "SM1"}, delay_s=2.0))
        with pytest.raises(DeliveryError) as failed:
            await adapter.send(outbound("hi"))
    assert failed.value.retryable is True
    assert "timeout" in failed.value.reason


async def test_connection_refused_is_retryable() -> None:
    async with FakePlatform() as api:
        dead_url = api.url
    async with started(base_url=dead_url) as adapter:
        with pytest.raises(DeliveryError) as failed:
            await adapter.send(outbound("hi"))
    assert failed.value.retryable is True


async def test_accepted_with_unreadable_body_is_not_an_error() -> None:
    # Retrying would send the SMS twice: a 2xx is Twilio's acceptance whatever its body.
    async with FakePlatform() as api, started(api) as adapter:
        api.respond(MESSAGES_PATH, Answer(status=201, text="not json"))
        await adapter.send(outbound("hi"))
        assert len(api.to(MESSAGES_PATH)) == 1


async def test_reaches_loopback_despite_proxy_and_twilio_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # the discard port: any use of it fails
    monkeypatch.setenv("TWILIO_REGION", "au1")
    monkeypatch.setenv("TWILIO_EDGE", "sydney")
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "AC" + "9" * 32)
    async with FakePlatform() as api, started(api) as adapter:
        api.respond(MESSAGES_PATH, CREATED)
        await adapter.send(outbound("hi"))
        assert len(api.to(MESSAGES_PATH)) == 1


async def test_lifecycle() -> None:
    adapter = TwilioAdapter(endpoint("http://127.0.0.1:9"))
    with pytest.raises(DeliveryError) as before:
        await adapter.send(outbound("hi"))
    assert before.value.retryable
    async with aiohttp.ClientSession() as http:
        await adapter.start(http)
        with pytest.raises(RuntimeError):
            await adapter.start(http)
    await adapter.aclose()
    await adapter.aclose()
    with pytest.raises(DeliveryError) as after:
        await adapter.send(outbound("hi"))
    assert after.value.retryable
    assert "closed" in after.value.reason


async def test_empty_text_is_not_sent() -> None:
    async with FakePlatform() as api, started(api) as adapter:
        with pytest.raises(DeliveryError) as failed:
            await adapter.send(outbound(""))
        assert api.requests == []
    assert failed.value.retryable is False


async def test_missing_credentials_refuse_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT_SID)  # the SDK would fall back to it
    adapter = TwilioAdapter(endpoint(account_sid=""))
    async with aiohttp.ClientSession() as http:
        with pytest.raises(ConfigError) as error:
            await adapter.start(http)
    assert error.value.problems == ["endpoints.sms.credentials.account_sid: required"]
    await adapter.aclose()
