"""Hostile input (DESIGN.md "Hostile input", issue #11 items 1, 3, 4, 9, 10): requests an
attacker can send, over real HTTP (raw sockets where a client library would refuse the bytes)
to the real app; bodies signed with the platforms' own signers where a signature is needed.
Nothing a client sends may become a 5xx, stall the loop, forge a log line or replay a message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway, make_settings, webchat_endpoint
from tests.fakeplatform import FakePlatform
from tests.kits import KITS, LINE, MESSENGER, SLACK, TWILIO
from tests.kits.line import PUSH as LINE_PUSH
from tests.kits.line import REPLY as LINE_REPLY
from tests.kits.line import body_of, text_event
from tests.kits.messenger import SEND_PATH, page_body, text_item
from tests.kits.slack import POST as SLACK_POST
from tests.kits.slack import callback, message
from tests.kits.twilio import form_request, inbound_form

WEEK_S = 7 * 24 * 3600


@pytest.fixture
async def api() -> AsyncIterator[FakePlatform]:
    """One fake API for every platform, each answering sends on its own paths as it does."""
    async with FakePlatform() as platform:
        for kit in KITS:
            kit.install(platform)
        yield platform


def all_endpoints(api_url: str) -> list[dict[str, Any]]:
    """Every webhook platform's endpoint (``fb``, ``ln``, ``sl``, ``sms``), on ``api_url``."""
    return [kit.endpoint(api_url) for kit in KITS]


async def raw_request(gateway: Gateway, head: bytes, body: bytes = b"") -> int:
    """Send ``head`` (request line and headers, CRLF-separated, without the blank line) and
    ``body`` exactly as given; the answer's status code."""
    port = gateway.client.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        return int(status_line.split()[1])
    finally:
        writer.close()
        await writer.wait_closed()


class LoopLag:
    """The longest the event loop was kept from running a 5 ms ticker."""

    def __init__(self) -> None:
        self.max_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.005)
            self.max_s = max(self.max_s, loop.time() - before - 0.005)

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


# -- 1. form bodies: parsed only by Twilio, after the signature header, at most 1000 fields -------


async def test_unsigned_megabyte_forms_do_not_stall_the_loop_on_any_endpoint(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """The cheapest body for a form parser to choke on: 1 MB of empty fields."""
    gateway = await start_gateway(make_settings(tmp_path, all_endpoints(api.url)))
    flood = b"a=&" * (1_048_576 // 3 - 1)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    statuses: dict[str, int] = {}
    async with LoopLag() as lag:
        for name in ("fb", "sl", "ln", "sms"):
            headers = {**form, "X-Twilio-Signature": "forged"} if name == "sms" else form
            response = await gateway.client.post(f"/webhooks/{name}", data=flood, headers=headers)
            statuses[name] = response.status
    # Parsing the form stalled the loop 120-450 ms per request; verifying 1 MB costs ~3 ms. The
    # bound leaves room for a busy machine preempting the test process.
    assert lag.max_s < 0.1, f"the loop stalled {lag.max_s * 1000:.0f} ms"
    assert statuses == {"fb": 401, "sl": 401, "ln": 401, "sms": 400}


async def test_signed_twilio_form_with_more_than_1000_fields_is_400(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(TWILIO.settings(tmp_path, api))

    async def post(params: dict[str, str]) -> int:
        return (await TWILIO.post(gateway, form_request(params))).status

    base = inbound_form("hello")
    padding_fields = 1000 - len(base)
    assert await post({**base, **{f"Pad{i}": "" for i in range(padding_fields + 1)}}) == 400
    assert await post({**base, **{f"Pad{i}": "" for i in range(padding_fields)}}) == 200  # exactly 1000


# -- 3. the URL Twilio signed: Host and X-Forwarded-* -----------------------------------------------


@pytest.mark.parametrize("host", [b"a:99999", b"a:abc", b"[::1", b"", b"a b", b"\xff\xfe"])
@pytest.mark.parametrize("header", [b"Host", b"X-Forwarded-Host"])
async def test_malformed_host_headers_on_twilio_are_401_not_500(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, host: bytes, header: bytes
) -> None:
    endpoint = TWILIO.endpoint(api.url)
    gateway = await start_gateway(
        make_settings(tmp_path, [endpoint], server={"trusted_proxies": ["127.0.0.1"]})
        if header == b"X-Forwarded-Host"
        else make_settings(tmp_path, [endpoint])
    )
    body = TWILIO.text("hi").body
    head = b"POST /webhooks/sms HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    head += b"X-Twilio-Signature: c2lnbmF0dXJl\r\n"
    head += (b"Host: 127.0.0.1\r\n" + header + b": " + host) if header != b"Host" else header + b": " + host
    assert await raw_request(gateway, head, body) == 401


async def test_x_forwarded_headers_from_an_untrusted_peer_do_not_choose_the_signed_url(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """Signed over a URL the attacker names: refused unless the peer is a trusted proxy."""
    sms = TWILIO.text("hi")
    forged_url = "https://attacker.example/webhooks/sms"
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "attacker.example"}
    gateway = await start_gateway(TWILIO.settings(tmp_path, api))
    ack = await TWILIO.post(gateway, sms, signed_for=forged_url, extra_headers=forwarded)
    assert ack.status == 401
    await gateway.client.close()

    trusted = TWILIO.settings(tmp_path, api, server={"trusted_proxies": ["127.0.0.0/8"]})
    gateway = await start_gateway(trusted)
    ack = await TWILIO.post(gateway, sms, signed_for=forged_url, extra_headers=forwarded)
    assert ack.status == 200


# -- 4. numbers that overflow, non-UTF-8 headers, deep JSON ------------------------------------------


async def test_signed_payloads_with_timestamps_of_10_pow_400_are_not_5xx(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, all_endpoints(api.url)))
    huge = "1" + "0" * 400
    item = text_item("PSID-H", "huge", "m_huge")
    fb_body = page_body([item]).replace(b'"timestamp": %d' % item["timestamp"], b'"timestamp": ' + huge.encode())
    assert huge.encode() in fb_body
    assert (await MESSENGER.post(gateway, fb_body)).status == 200

    event = text_event("huge")
    line_body = body_of(event).replace(b'"timestamp": %d' % event["timestamp"], b'"timestamp": ' + huge.encode())
    assert huge.encode() in line_body
    assert (await LINE.post(gateway, line_body)).status == 200

    slack_event = message("huge")
    slack_event["event_ts"] = 0  # replaced by the literal below
    slack_body = json.dumps(callback(slack_event)).encode().replace(b'"event_ts": 0', b'"event_ts": ' + huge.encode())
    assert huge.encode() in slack_body
    assert (await SLACK.post(gateway, slack_body)).status == 200
    await gateway.settle()
    assert len(api.to(SEND_PATH)) == len(api.to(SLACK_POST)) == 1


@pytest.mark.parametrize(
    ("path", "header"),
    [
        (b"/admin/sessions", b"Authorization: Bearer \xff\xfe\xc3"),
        (b"/webhooks/fb", b"X-Hub-Signature-256: sha256=\xff\xfe"),
        (b"/webhooks/sl", b"X-Slack-Signature: v0=\xff\xfe\r\nX-Slack-Request-Timestamp: \xc3\x28"),
        (b"/webhooks/ln", b"x-line-signature: \xff\xfe\xc3\x28"),
        (b"/webhooks/sms", b"X-Twilio-Signature: \xff\xfe\xc3\x28"),
    ],
    ids=["admin", "messenger", "slack", "line", "twilio"],
)
async def test_non_utf8_header_values_are_4xx(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, path: bytes, header: bytes
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, all_endpoints(api.url)))
    method = b"GET" if path.startswith(b"/admin") else b"POST"
    head = method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + header
    status = await raw_request(gateway, head, b"" if method == b"GET" else b'{"object":"page","entry":[]}')
    assert status == 401


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/admin/messages"), ("PUT", "/admin/endpoints/fb/session"), ("PUT", "/admin/organisation/session")],
)
async def test_deeply_nested_json_on_admin_routes_is_400(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, method: str, path: str
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, all_endpoints(api.url)))
    body = b"[" * 200_000 + b"]" * 200_000
    response = await gateway.client.request(
        method, path, data=body, headers={**gateway.admin_headers(), "Content-Type": "application/json"}
    )
    assert response.status == 400
    assert (await response.json())["error"]


# -- 9. user text in log lines ---------------------------------------------------------------------------


FORGED_LINE = "x\n2026-01-01 00:00:00,000 ERROR gateway.admin: admin token leaked\r\x1b[2J"


def log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The captured records as a plain-text log file shows them, split into lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return "\n".join(handler.format(record) for record in caplog.records).splitlines()


def assert_no_forged_line(lines: list[str]) -> None:
    assert not [line for line in lines if line.startswith("2026-01-01")]
    assert not [line for line in lines if "\x1b" in line or "\r" in line]


async def test_a_newline_in_a_web_chat_conversation_id_forges_no_log_line(
    tmp_path: Path, start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Web chat conversations are server-issued: a forged id in the query (with a token, as a
    resume) is not taken; the socket gets a new conversation and the forged text no log line."""
    caplog.set_level(logging.INFO)
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=30)]))
    ws = await gateway.client.ws_connect("/webchat/web/ws", params={"conversation": FORGED_LINE, "token": "t"})
    hello = await ws.receive_json(timeout=10)
    assert hello["type"] == "hello" and hello["conversation"] != FORGED_LINE
    await ws.send_json({"type": "message", "text": "hi"})
    reply = await ws.receive_json(timeout=10)
    assert reply["type"] in ("session", "message")
    await ws.close()
    await gateway.settle()
    assert_no_forged_line(log_lines(caplog))


async def test_a_newline_in_a_webhook_conversation_id_forges_no_log_line(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, caplog: pytest.LogCaptureFixture
) -> None:
    """A platform's conversation id is logged as the payload says (a signed Messenger PSID
    here): escaped, it forges no line (the per-message lines that carry it are DEBUG)."""
    caplog.set_level(logging.DEBUG, logger="gateway")
    gateway = await start_gateway(MESSENGER.settings(tmp_path, api))
    await MESSENGER.say(gateway, MESSENGER.text("hi", conversation=FORGED_LINE))
    await gateway.settle()
    lines = log_lines(caplog)
    assert any("admin token leaked" in line for line in lines)  # the id is logged, escaped
    assert_no_forged_line(lines)


# -- 10. replays older than the dedup retention -------------------------------------------------------------


async def test_events_older_than_the_dedup_retention_are_200_and_ignored(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, all_endpoints(api.url)))
    old_ms = int((time.time() - 8 * 24 * 3600) * 1000)
    fb_body = page_body([text_item("PSID-OLD", "replayed", "m_old", ts_ms=old_ms)])
    assert (await MESSENGER.post(gateway, fb_body)).status == 200
    event = text_event("replayed")
    event["timestamp"] = old_ms
    assert (await LINE.post(gateway, body_of(event))).status == 200
    # A week minus an hour is still inside the retention: answered.
    recent_ms = int((time.time() - WEEK_S + 3600) * 1000)
    fb_body = page_body([text_item("PSID-RECENT", "late but kept", "m_recent", ts_ms=recent_ms)])
    assert (await MESSENGER.post(gateway, fb_body)).status == 200
    await gateway.settle()
    assert [r.json()["message"]["text"] for r in api.to(SEND_PATH)] == ["late but kept"]
    assert api.to(LINE_REPLY) == [] and api.to(LINE_PUSH) == []
    assert gateway.metrics.value("gateway_events_total", endpoint="fb", outcome="stale") == 1
    assert gateway.metrics.value("gateway_events_total", endpoint="ln", outcome="stale") == 1
    listed = await gateway.admin_get("/admin/sessions")
    assert [s["conversation"] for s in listed["sessions"]] == ["PSID-RECENT"]


@pytest.mark.parametrize(
    "header",
    [
        b"Host: [::1",
        b"Host: a:99999",
        b"Host: \xff\xfe",
        b"Host: 127.0.0.1\r\nX-Forwarded-Host: \xff\xfe:abc",
        b"Host: 127.0.0.1\r\nX-Forwarded-For: \xff, [::1, 999.1.1.1",
        b"Host: 127.0.0.1\r\nX-Forwarded-Proto: \xff\r\nOrigin: \xfe",
    ],
    ids=["ipv6-unclosed", "port-out-of-range", "host-not-utf8", "xfh-not-utf8", "xff-garbage", "proto-origin"],
)
async def test_malformed_host_and_forwarded_headers_are_never_5xx_on_any_route(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, header: bytes
) -> None:
    settings = make_settings(
        tmp_path, [*all_endpoints(api.url), webchat_endpoint()], server={"trusted_proxies": ["127.0.0.0/8"]}
    )
    gateway = await start_gateway(settings)
    routes = [
        (b"GET", b"/healthz"),
        (b"GET", b"/metrics"),
        (b"GET", b"/webchat/web"),
        (b"GET", b"/admin/sessions"),
        (b"GET", b"/webhooks/fb?hub.mode=subscribe&hub.verify_token=x&hub.challenge=1"),
        (b"POST", b"/webhooks/fb"),
        (b"POST", b"/webhooks/sms"),
    ]
    for method, path in routes:
        head = method + b" " + path + b" HTTP/1.1\r\nContent-Type: application/json\r\n" + header
        status = await raw_request(gateway, head, b"{}" if method == b"POST" else b"")
        assert status < 500, (method, path, status)
