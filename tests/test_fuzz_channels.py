"""Property-based fuzzing of every channel's parse path (issue #11): bodies shaped like each
platform's payload, with any field replaced by any JSON value (huge and non-finite numbers,
deep nesting, odd strings) or by raw bytes, and SIGNED as the platform signs them (its own SDK
signer where there is one), so the fuzzer gets past verification into parsing.

The property: ``parse_webhook`` either rejects with the gateway's own ``RequestRejected`` (a
4xx) or returns events that the rest of the path can take: stored as the inbox row's JSON and
read back, their timestamps rendered for the flow. Nothing else may reach the web layer.

Bounded for CI: a fixed number of examples per channel, derandomized (the same inputs every
run), no example database, no deadline.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import urlencode

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from slack_sdk.signature import SignatureVerifier
from twilio.request_validator import RequestValidator

from channels.base import ParsedWebhook, WebhookRequest
from channels.line import LineAdapter
from channels.messenger import MessengerAdapter
from channels.slack import SlackAdapter
from channels.twilio_sms import TwilioAdapter
from channels.webchat_routes import parse_client_frame
from gateway.errors import RequestRejected
from gateway.flows import FlowTurn, event_json
from gateway.models import InboundEvent, Session
from gateway.settings import EndpointSettings, Secret
from gateway.store.sqlite_rows import event_from_json, event_to_json

EXAMPLES = 400
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
SECRET = "fuzz-secret-0123456789"
TWILIO_URL = "https://bots.example.com/webhooks/sms?tenant=1"

# -- any JSON value, with the awkward ones well represented ------------------------------------------

texts = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
numbers = st.one_of(
    st.integers(min_value=-(10**450), max_value=10**450),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 10**400, 1e308, 1700000000000, 1700000000.000123]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)


def deep(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


deeply_nested = st.integers(min_value=100, max_value=900).map(deep)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The field as the platform sends it (nine times in ten), or anything at all."""
    anything = st.one_of(json_values, deeply_nested)
    return st.integers(min_value=0, max_value=9).flatmap(lambda n: strategy if n < 9 else anything)


def fields(required: tuple[str, ...] = (), **known: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """An object with the ``known`` keys (those in ``required`` always there), each value
    ``maybe`` the expected one."""
    return st.fixed_dictionaries(
        {name: maybe(value) for name, value in known.items() if name in required},
        optional={name: maybe(value) for name, value in known.items() if name not in required},
    )


# -- checking what the adapter did ---------------------------------------------------------------------


def endpoint(channel: str, **credentials: str) -> EndpointSettings:
    return EndpointSettings(
        name="fz",
        channel=channel,
        path="/webhooks/fz",
        credentials={key: Secret(value) for key, value in credentials.items()},
    )


def request(body: bytes, headers: dict[str, str], content_type: str = "application/json") -> WebhookRequest:
    return WebhookRequest(
        method="POST",
        path="/webhooks/fz",
        query={},
        public_url=TWILIO_URL,
        headers=CIMultiDictProxy(CIMultiDict(headers)),
        body=body,
        content_type=content_type,
    )


def passes_on(event: InboundEvent) -> None:
    """What the web layer and the core do next with an accepted event must not raise."""
    assert isinstance(event.conversation, str) and event.conversation
    assert isinstance(event.dedup_key, str) and event.dedup_key
    again = event_from_json(event_to_json(event))  # the inbox row, and its restore
    assert again.dedup_key == event.dedup_key
    session = Session(
        id="s",
        endpoint="fz",
        channel="x",
        conversation=event.conversation,
        started_at=0.0,
        last_activity_at=0.0,
        expires_at=None,
    )
    json.dumps(event_json(FlowTurn(session, event, {}, {}, False)))  # what the http flow gets


def parse(adapter: Any, webhook: WebhookRequest) -> None:
    try:
        parsed = adapter.parse_webhook(webhook)
    except RequestRejected as exc:
        assert 400 <= exc.status < 500
        return
    assert isinstance(parsed, ParsedWebhook)
    assert isinstance(parsed.response.status, int) and parsed.response.status < 500
    assert parsed.ignored >= 0
    for event in parsed.events:
        passes_on(event)


def body_of(payload: Any, raw: bytes | None) -> bytes:
    if raw is not None:
        return raw
    return json.dumps(payload).encode()


raw_bodies = st.integers(min_value=0, max_value=9).flatmap(lambda n: st.none() if n < 9 else st.binary(max_size=64))


# -- Messenger -------------------------------------------------------------------------------------------

messenger_message = fields(
    ("mid", "text"),
    mid=texts,
    text=texts,
    is_echo=st.booleans(),
    attachments=st.lists(fields(type=texts, payload=json_values)),
    quick_reply=fields(payload=texts),
)
messenger_item = fields(
    ("sender", "timestamp"),
    sender=fields(("id",), id=st.one_of(texts, st.integers()), user_ref=texts),
    recipient=fields(id=texts),
    timestamp=st.one_of(numbers, texts),
    message=messenger_message,
    postback=fields(title=texts, payload=texts, mid=texts),
    delivery=json_values,
    read=json_values,
)
messenger_payload = fields(
    ("object", "entry"),
    object=st.just("page"),
    entry=st.lists(
        fields(("messaging",), id=texts, time=numbers, messaging=st.lists(messenger_item, max_size=3)), max_size=3
    ),
)


@FUZZ
@given(payload=messenger_payload, raw=raw_bodies)
def test_fuzz_messenger(payload: Any, raw: bytes | None) -> None:
    body = body_of(payload, raw)
    signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    adapter = MessengerAdapter(endpoint("messenger", app_secret=SECRET, verify_token="v", page_access_token="p"))
    parse(adapter, request(body, {"X-Hub-Signature-256": signature}))


# -- Slack -----------------------------------------------------------------------------------------------

slack_event = fields(
    ("type", "channel", "user", "ts"),
    type=st.sampled_from(["message", "app_mention", "reaction_added"]),
    subtype=st.sampled_from(["file_share", "thread_broadcast", "message_changed", "bot_message"]),
    channel=texts,
    user=texts,
    bot_id=texts,
    text=texts,
    ts=st.one_of(texts, st.just("1700000000.000100")),
    thread_ts=texts,
    event_ts=st.one_of(texts, numbers),
    files=st.lists(fields(name=texts, mimetype=texts)),
)
slack_user_message = fields(
    ("type", "channel", "user", "ts", "text"),
    type=st.sampled_from(["message", "app_mention"]),
    channel=texts,
    user=texts,
    text=texts,
    ts=st.one_of(texts, st.just("1700000000.000100")),
    thread_ts=texts,
    event_ts=st.one_of(texts, numbers),
)
slack_payload = fields(
    ("type", "event_id", "event"),
    type=st.sampled_from(["event_callback"] * 4 + ["url_verification", "app_rate_limited"]),
    challenge=texts,
    event_id=texts,
    event=st.one_of(slack_user_message, slack_event),
)


@FUZZ
@given(payload=slack_payload, raw=raw_bodies, stamp=maybe(st.none()).map(lambda v: v if v is None else str(v)))
def test_fuzz_slack(payload: Any, raw: bytes | None, stamp: str | None) -> None:
    body = body_of(payload, raw)
    timestamp = str(int(time.time())) if stamp is None else stamp
    try:
        signature = SignatureVerifier(SECRET).generate_signature(timestamp=timestamp, body=body)
    except (UnicodeDecodeError, UnicodeEncodeError):  # the SDK signs text only
        signature = "v0=" + "0" * 64
    adapter = SlackAdapter(endpoint("slack", signing_secret=SECRET, bot_token="xoxb-1", bot_user_id="UBOT"))
    headers = {"X-Slack-Request-Timestamp": timestamp, "X-Slack-Signature": signature or ""}
    parse(adapter, request(body, headers))


# -- LINE --------------------------------------------------------------------------------------------------

line_event = fields(
    ("type", "timestamp", "source", "message"),
    type=st.sampled_from(["message", "postback", "follow", "unsend"]),
    mode=st.sampled_from(["active", "standby"]),
    timestamp=numbers,
    source=fields(
        ("type", "userId"), type=st.sampled_from(["user", "group", "room"]), userId=texts, groupId=texts, roomId=texts
    ),
    webhookEventId=texts,
    deliveryContext=fields(isRedelivery=st.booleans()),
    replyToken=texts,
    message=fields(id=st.one_of(texts, st.integers()), type=st.sampled_from(["text", "image", "sticker"]), text=texts),
    postback=fields(data=texts, params=json_values),
)
line_payload = fields(("events",), destination=texts, events=st.lists(line_event, max_size=4))


@FUZZ
@given(payload=line_payload, raw=raw_bodies)
def test_fuzz_line(payload: Any, raw: bytes | None) -> None:
    body = body_of(payload, raw)
    signature = base64.b64encode(hmac.new(SECRET.encode(), body, hashlib.sha256).digest()).decode()
    adapter = LineAdapter(endpoint("line", channel_secret=SECRET, channel_access_token="t"))
    parse(adapter, request(body, {"x-line-signature": signature}))


# -- Twilio ------------------------------------------------------------------------------------------------

form_texts = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=30)
twilio_form = st.fixed_dictionaries(
    {
        "MessageSid": st.one_of(st.just("SM" + "1" * 32), form_texts),
        "From": st.one_of(st.just("+15551234567"), form_texts),
        "Body": st.one_of(st.sampled_from(["STOP", "start", "HELP", "hello"]), form_texts),
    },
    optional={
        "To": form_texts,
        "NumMedia": st.one_of(st.sampled_from(["0", "1", "99999", "9" * 5000, "-3"]), form_texts),
        "MediaUrl0": form_texts,
        "MessageStatus": form_texts,
        "SmsStatus": st.one_of(st.just("received"), form_texts),
        "OptOutType": st.one_of(st.sampled_from(["STOP", "START", "HELP"]), form_texts),
    },
).flatmap(lambda known: st.dictionaries(form_texts, form_texts, max_size=5).map(lambda extra: {**extra, **known}))


@FUZZ
@given(params=twilio_form, raw=raw_bodies)
def test_fuzz_twilio(params: dict[str, str], raw: bytes | None) -> None:
    body = raw if raw is not None else urlencode(params).encode()
    signed_params = params if raw is None else {}
    signature = RequestValidator(SECRET).compute_signature(TWILIO_URL, signed_params)
    adapter = TwilioAdapter(endpoint("twilio", account_sid="AC1", auth_token=SECRET, from_number="+15550001111"))
    parse(adapter, request(body, {"X-Twilio-Signature": signature}, "application/x-www-form-urlencoded"))


# -- web chat (no signature: any socket frame) -------------------------------------------------------------

webchat_frame = fields(
    ("type", "text"), type=st.sampled_from(["message", "refresh", "hello"]), text=texts, id=json_values
)


@FUZZ
@given(frame=webchat_frame, raw=st.one_of(st.none(), st.none(), texts))
def test_fuzz_webchat_frames(frame: Any, raw: str | None) -> None:
    data = raw if raw is not None else json.dumps(frame)
    parsed = parse_client_frame("conversation-1", data, max_text_chars=2000)
    if parsed.event is not None:
        passes_on(parsed.event)
    else:
        assert parsed.refused in ("malformed", "too_long")
