"""Delivery under platform faults, through the real app: signed webhooks in (slack-sdk's own
signer, LINE's and Twilio's signatures), the real outbox on real SQLite, and recording fake
platform APIs on 127.0.0.1 that answer 5xx, 429 with Retry-After, too slowly, or refuse for good.

Proves: every message is delivered once and in order per conversation, one failing
conversation holds up no other, Retry-After is honoured and the schedule survives a restart,
permanent failures and exhausted retries become dead letters (listed, counted, retried through
the admin API).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from channels.line import LineAdapter
from channels.messenger import classify_error as messenger_classify_error
from gateway.app import create_app
from gateway.errors import DeliverySkipped, StoreError
from gateway.keys import ADAPTERS
from gateway.models import Change, OutboxState
from gateway.settings import Settings
from gateway.store.sqlite import SqliteStore
from gateway.wire import parse_iso
from tests.conftest import Gateway, make_settings
from tests.fakeplatform import Answer, FakePlatform, RecordedRequest
from tests.kits.line import LINE, PUSH
from tests.kits.line import body_of as line_body_of
from tests.kits.line import text_event as line_text_event
from tests.kits.slack import POST, SLACK
from tests.kits.twilio import MESSAGES_PATH, TWILIO, UNSUBSCRIBED

DEAD_LETTER_FIELDS = "id endpoint channel conversation kind text key session_id attempts last_error created_at".split()
# Fast retries: tests wait tens of milliseconds, not the production half second.
DELIVERY = {"base_delay_seconds": 0.05, "max_delay_seconds": 0.2, "max_attempts": 4}

POSTED = SLACK.sent()
PUSHED = LINE.sent()
BYE = SLACK.bye


def server_error(status: int = 500) -> Answer:
    return Answer(status=status, json_body={"ok": False})


def rate_limited(retry_after_s: int) -> Answer:
    return Answer(
        status=429, json_body={"ok": False, "error": "ratelimited"}, headers={"Retry-After": str(retry_after_s)}
    )


def slack_error(code: str) -> Answer:
    return Answer(json_body={"ok": False, "error": code})


def slow(delay_s: float) -> Answer:
    return Answer(json_body=POSTED.json_body, delay_s=delay_s)


# -- Slack in and out -----------------------------------------------------------------------------


def slack_endpoint(
    api_url: str, *, minutes: float = 30.0, per_conversation_per_second: float | None = 1000.0
) -> dict[str, Any]:
    """The ``sl`` endpoint; Slack's 1/s per channel is lifted unless the test is about it."""
    endpoint = SLACK.endpoint(api_url, minutes=minutes)
    del endpoint["rate_limit"]
    if per_conversation_per_second is not None:
        endpoint["rate_limit"] = {"per_conversation_per_second": per_conversation_per_second}
    return endpoint


async def slack_say(gateway: Gateway, channel: str, text: str) -> None:
    """A user's message in ``channel``, as Slack posts it (signed now); asserts the 200."""
    await SLACK.say(gateway, SLACK.text(text, conversation=channel))


@dataclass
class ScriptedSlack:
    """chat.postMessage with scripted faults per channel (then success). A message counts as
    delivered when the platform accepted it (``ok: true``), at the moment it arrives."""

    faults: dict[str, deque[Answer]] = field(default_factory=dict)
    delivered: dict[str, list[str]] = field(default_factory=dict)
    delivered_at: dict[str, list[float]] = field(default_factory=dict)
    arrivals: list[tuple[float, str, str, int]] = field(default_factory=list)  # (t, channel, text, status)

    def fail(self, channel: str, *answers: Answer) -> None:
        self.faults.setdefault(channel, deque()).extend(answers)

    def __call__(self, request: RecordedRequest) -> Answer:
        body = request.json()
        channel, text = body["channel"], body["text"]
        queued = self.faults.get(channel)
        answer = queued.popleft() if queued else POSTED
        now = time.monotonic()
        self.arrivals.append((now, channel, text, answer.status))
        if answer.status == 200 and isinstance(answer.json_body, dict) and answer.json_body.get("ok"):
            self.delivered.setdefault(channel, []).append(text)
            self.delivered_at.setdefault(channel, []).append(now)
        return answer

    def attempts(self, channel: str) -> list[str]:
        return [text for _, c, text, _ in self.arrivals if c == channel]

    def count(self) -> int:
        return sum(len(texts) for texts in self.delivered.values())


@pytest.fixture
async def slack() -> AsyncIterator[tuple[FakePlatform, ScriptedSlack]]:
    script = ScriptedSlack()
    async with FakePlatform() as api:
        api.respond(POST, script)
        yield api, script


async def eventually(check: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def settings_for(tmp_path: Path, endpoints: list[dict[str, Any]], **delivery: Any) -> Settings:
    return make_settings(tmp_path, endpoints, delivery={**DELIVERY, **delivery})


async def dead_letters(gateway: Gateway, query: str = "") -> list[dict[str, Any]]:
    body = await gateway.admin_get(f"/admin/dead-letters{query}")
    return list(body["dead_letters"])


async def retry(gateway: Gateway, message_id: int | str) -> tuple[int, Any]:
    response = await gateway.client.post(f"/admin/dead-letters/{message_id}/retry", headers=gateway.admin_headers())
    return response.status, await response.json()


# -- faults: every message once, in order, nobody held up ----------------------------------------


async def test_5xx_429_and_slow_answers_deliver_every_message_once_in_order(
    tmp_path: Path, start_gateway: Any, slack: tuple[FakePlatform, ScriptedSlack]
) -> None:
    api, script = slack
    script.fail("C1", server_error(500), rate_limited(1), slow(0.3))
    script.fail("C2", server_error(503), server_error(500), server_error(502))
    script.fail("C3", slow(0.3), rate_limited(1), server_error(500))
    gateway = await start_gateway(settings_for(tmp_path, [slack_endpoint(api.url)]))
    produced = {channel: [f"{channel} #{n}" for n in range(4)] for channel in ("C1", "C2", "C3")}
    for n in range(4):
        for channel in produced:
            await slack_say(gateway, channel, produced[channel][n])
    await eventually(lambda: script.count() == 12, what="12 deliveries")
    await gateway.settle()
    await asyncio.sleep(0.3)  # room for a stray duplicate to show up
    assert script.delivered == produced  # each exactly once, in order per conversation
    assert len(api.to(POST)) == 12 + 7  # 7 refused attempts (the slow ones were accepted)
    assert gateway.metrics.value("gateway_messages_out_total", endpoint="sl", outcome="retry") == 7
    assert gateway.metrics.value("gateway_messages_out_total", endpoint="sl", outcome="sent") == 12
    assert await dead_letters(gateway) == []


async def test_one_failing_conversation_holds_up_no_other(
    tmp_path: Path, start_gateway: Any, slack: tuple[FakePlatform, ScriptedSlack]
) -> None:
    api, script = slack
    script.fail("CBAD", rate_limited(1), rate_limited(1))
    gateway = await start_gateway(settings_for(tmp_path, [slack_endpoint(api.url)]))
    started = time.monotonic()
    for n in range(3):
        for channel in ("CBAD", "C1", "C2"):
            await slack_say(gateway, channel, f"{channel} #{n}")
    await eventually(lambda: len(script.delivered.get("C1", [])) == 3 and len(script.delivered.get("C2", [])) == 3)
    healthy_done_s = time.monotonic() - started
    assert healthy_done_s < 0.8, healthy_done_s  # not behind CBAD's 2 s of Retry-After
    assert "CBAD" not in script.delivered
    await eventually(lambda: len(script.delivered.get("CBAD", [])) == 3, what="CBAD's replies")
    assert script.delivered["CBAD"] == [f"CBAD #{n}" for n in range(3)]
    assert script.delivered_at["CBAD"][0] - started >= 2.0  # two Retry-After: 1 waits
    assert script.attempts("CBAD") == ["CBAD #0"] * 3 + ["CBAD #1", "CBAD #2"]  # the head blocked its lane only


async def test_answers_slower_than_the_timeout_are_retried_and_delivered_once(
    tmp_path: Path, serve_app: Callable[[web.Application], Any]
) -> None:
    """LINE push with a 0.3 s client timeout; the platform takes the first push of U1 (and
    the second) at once but answers after 1 s. The retry carries the same X-Line-Retry-Key
    and gets 409 "already accepted": the user sees each text once, in order."""
    accepted: dict[str, str] = {}
    delivered: dict[str, list[str]] = {}
    slow_left = {"U1": 2}
    arrived: list[str] = []  # every push as it arrives (the fake records a cut-off one late or never)

    def answer(request: RecordedRequest) -> Answer:
        key = request.headers.get("X-Line-Retry-Key", "")
        body = request.json()
        arrived.append(body["messages"][0]["text"])
        if key in accepted:
            return Answer(status=409, json_body={"message": "The retry key is already accepted"})
        accepted[key] = body["to"]
        delivered.setdefault(body["to"], []).append(body["messages"][0]["text"])
        if slow_left.get(body["to"], 0) > 0:
            slow_left[body["to"]] -= 1
            return Answer(json_body=PUSHED.json_body, delay_s=1.0)
        return PUSHED

    async with FakePlatform() as api:
        api.respond(PUSH, answer)
        settings = settings_for(tmp_path, [LINE.endpoint(api.url, minutes=30)])
        app = create_app(settings)
        line_settings = settings.endpoint("ln")
        assert line_settings is not None
        app[ADAPTERS]["ln"] = LineAdapter(line_settings, request_timeout_s=0.3)
        gateway: Gateway = await serve_app(app)
        started = time.monotonic()
        for n in range(3):
            for user in ("U1", "U2"):
                await line_say(gateway, user, f"{user} #{n}")
        await eventually(lambda: len(delivered.get("U2", [])) == 3)
        assert time.monotonic() - started < 0.5  # U2 did not wait for U1's timeouts
        await eventually(lambda: len(delivered.get("U1", [])) == 3, what="U1's replies")
        await gateway.settle()
        assert delivered == {user: [f"{user} #{n}" for n in range(3)] for user in ("U1", "U2")}
        # Each slow push was tried twice with one retry key; the retry got 409 "already accepted".
        assert [t for t in arrived if t.startswith("U1")] == ["U1 #0", "U1 #0", "U1 #1", "U1 #1", "U1 #2"]
        assert [t for t in arrived if t.startswith("U2")] == ["U2 #0", "U2 #1", "U2 #2"]
        assert gateway.metrics.value("gateway_messages_out_total", endpoint="ln", outcome="retry") == 2
        assert gateway.metrics.value("gateway_messages_out_total", endpoint="ln", outcome="sent") == 6


async def line_say(gateway: Gateway, user: str, text: str) -> None:
    """A LINE text message without a reply token, so the answer goes by push (retry key)."""
    event = line_text_event(text, user=user)
    del event["replyToken"]
    assert await LINE.post(gateway, line_body_of(event)) == LINE.ack


# -- Retry-After and the persisted schedule ------------------------------------------------------


async def test_retry_after_is_honoured_and_the_schedule_is_stored(
    tmp_path: Path, start_gateway: Any, slack: tuple[FakePlatform, ScriptedSlack]
) -> None:
    api, script = slack
    script.fail("C1", rate_limited(1))
    gateway = await start_gateway(settings_for(tmp_path, [slack_endpoint(api.url)]))
    await slack_say(gateway, "C1", "patience")
    await api.wait_for(1, POST)
    refused_wall = time.time()
    pending: list[Any] = []

    async def scheduled() -> bool:
        pending[:] = await gateway.store.pending_outbox()
        return bool(pending) and pending[0].attempts == 1

    deadline = time.monotonic() + 0.9
    while not await scheduled():
        assert time.monotonic() < deadline, "the retry was not stored"
        await asyncio.sleep(0.01)
    [message] = pending
    assert message.state is OutboxState.PENDING and message.last_error == "ratelimited"
    assert message.next_attempt_at >= refused_wall + 0.95  # 1 s asked; far beyond max_delay 0.2
    await eventually(lambda: script.count() == 1, what="the delivery")
    (refused_at, *_), (delivered_at, *_) = script.arrivals
    assert delivered_at - refused_at >= 1.0  # not earlier than asked
    await gateway.settle()
    assert len(api.to(POST)) == 2


async def test_a_restart_resumes_the_retry_schedule(
    tmp_path: Path, start_gateway: Any, slack: tuple[FakePlatform, ScriptedSlack]
) -> None:
    api, script = slack
    script.fail("C1", rate_limited(2))
    settings = settings_for(tmp_path, [slack_endpoint(api.url)])
    gateway = await start_gateway(settings)
    await slack_say(gateway, "C1", "later")
    await api.wait_for(1, POST)
    await eventually(lambda: gateway.outbox.pending == 1 and gateway.metrics.total("gateway_messages_out_total") == 1)
    stop_started = time.monotonic()
    await gateway.client.close()  # graceful stop while the lane waits for its retry
    assert time.monotonic() - stop_started < 1.0  # a waiting lane is not a send in flight
    restarted = await start_gateway(settings)
    await eventually(lambda: script.count() == 1, timeout_s=5, what="the resumed delivery")
    (refused_at, *_), (delivered_at, *_) = script.arrivals
    assert delivered_at - refused_at >= 2.0  # the stored next_attempt_at, not a fresh start
    await restarted.settle()
    assert script.delivered == {"C1": ["later"]} and len(api.to(POST)) == 2


# -- dead letters -----------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["channel_not_found", "not_in_channel", "is_archived"])
async def test_a_permanent_slack_error_is_a_dead_letter_after_one_request(
    tmp_path: Path, start_gateway: Any, slack: tuple[FakePlatform, ScriptedSlack], code: str
) -> None:
    api, script = slack
    script.fail("CGONE", slack_error(code))
    gateway = await start_gateway(settings_for(tmp_path, [slack_endpoint(api.url)]))
    await slack_say(gateway, "CGONE", "anyone?")
    await api.wait_for(1, POST)
    await gateway.settle()
    await asyncio.sleep(0.15)  # longer than a retry would wait
    assert len(api.to(POST)) == 1
    [dead] = await dead_letters(gateway)
    assert dead["last_error"] == code and dead["attempts"] == 1


async def test_dead_letters_are_listed_counted_and_retried_once_the_platform_accepts(
    tmp_path: Path, start_gateway: Any, slack: tuple[FakePlatform, ScriptedSlack]
) -> None:
    api, script = slack
    script.fail("CGONE", slack_error("channel_not_found"), slack_error("not_in_channel"))
    gateway = await start_gateway(settings_for(tmp_path, [slack_endpoint(api.url)]))
    await slack_say(gateway, "CGONE", "first")
    await slack_say(gateway, "CGONE", "second")
    await slack_say(gateway, "C1", "fine")
    await api.wait_for(3, POST)
    await gateway.settle()

    listed = await dead_letters(gateway)
    assert [d["text"] for d in listed] == ["second", "first"]  # newest first
    newest = listed[0]
    assert set(newest) >= set(DEAD_LETTER_FIELDS)
    where = (newest["endpoint"], newest["channel"], newest["conversation"], newest["kind"])
    assert where == ("sl", "slack", "CGONE", "reply")
    assert newest["last_error"] == "not_in_channel" and newest["attempts"] == 1
    assert newest["key"].startswith("reply:") and newest["session_id"]
    assert newest["created_at"].endswith("Z") and abs(_iso_age_s(newest["created_at"])) < 30
    assert [d["text"] for d in await dead_letters(gateway, "?limit=1")] == ["second"]
    metrics = await (await gateway.client.get("/metrics")).text()
    assert 'gateway_messages_out_total{endpoint="sl",outcome="dead"} 2' in metrics

    status, body = await retry(gateway, newest["id"])
    assert status == 202
    assert (body["id"], body["state"], body["attempts"], body["text"]) == (newest["id"], "pending", 0, "second")
    [*_, resent] = await api.wait_for(4, POST)
    assert resent.json() == {"channel": "CGONE", "text": "second"}
    await gateway.settle()
    assert [d["text"] for d in await dead_letters(gateway)] == ["first"]
    sent = await gateway.store.get_outbound(newest["id"])
    assert sent is not None and sent.state is OutboxState.SENT
    assert gateway.metrics.value("gateway_dead_letters_retried_total", endpoint="sl") == 1

    assert (await retry(gateway, newest["id"]))[0] == 409  # sent: not a dead letter any more
    assert (await retry(gateway, 999_999))[0] == 404
    assert (await retry(gateway, "not-a-number"))[0] == 404
    assert (await retry(gateway, "9" * 40))[0] == 404
    await asyncio.sleep(0.1)
    assert len(api.to(POST)) == 4


async def test_two_concurrent_retries_of_one_dead_letter_send_it_once(
    tmp_path: Path, start_gateway: Any, slack: tuple[FakePlatform, ScriptedSlack]
) -> None:
    api, script = slack
    script.fail("CGONE", slack_error("channel_not_found"))
    gateway = await start_gateway(settings_for(tmp_path, [slack_endpoint(api.url)]))
    await slack_say(gateway, "CGONE", "once")
    await api.wait_for(1, POST)
    await gateway.settle()
    [dead] = await dead_letters(gateway)
    statuses = sorted(status for status, _ in await asyncio.gather(*(retry(gateway, dead["id"]) for _ in range(5))))
    assert statuses == [202, 409, 409, 409, 409]
    await api.wait_for(2, POST)
    await gateway.settle()
    await asyncio.sleep(0.1)
    assert script.delivered == {"CGONE": ["once"]} and len(api.to(POST)) == 2


async def test_retries_exhausted_is_a_dead_letter_with_the_last_error(
    tmp_path: Path, start_gateway: Any, slack: tuple[FakePlatform, ScriptedSlack]
) -> None:
    api, script = slack
    script.fail("C1", server_error(500), server_error(500), server_error(500), server_error(503))
    gateway = await start_gateway(settings_for(tmp_path, [slack_endpoint(api.url)]))
    await slack_say(gateway, "C1", "doomed")
    await slack_say(gateway, "C1", "next")
    await eventually(lambda: script.count() == 1, what="the next message")
    await gateway.settle()
    assert script.attempts("C1") == ["doomed"] * 4 + ["next"]  # max_attempts, then the lane moves on
    [dead] = await dead_letters(gateway)
    assert dead["text"] == "doomed" and dead["attempts"] == 4
    assert "503" in dead["last_error"] and "4 attempts" in dead["last_error"]
    assert gateway.metrics.value("gateway_messages_out_total", endpoint="sl", outcome="retry") == 3
    assert gateway.metrics.value("gateway_messages_out_total", endpoint="sl", outcome="dead") == 1


async def test_a_message_older_than_max_age_is_a_dead_letter(
    tmp_path: Path, start_gateway: Any, slack: tuple[FakePlatform, ScriptedSlack]
) -> None:
    api, script = slack
    script.fail("C1", *[server_error(500)] * 100)
    settings = settings_for(tmp_path, [slack_endpoint(api.url)], max_attempts=100, max_age_minutes=0.005)  # 0.3 s
    gateway = await start_gateway(settings)
    await slack_say(gateway, "C1", "stale")
    await eventually(lambda: gateway.metrics.value("gateway_messages_out_total", endpoint="sl", outcome="dead") == 1)
    [dead] = await dead_letters(gateway)
    assert "older than" in dead["last_error"] and 1 < dead["attempts"] < 100


async def test_a_dead_closure_notice_reads_failed_then_sent_after_its_retry(
    tmp_path: Path, start_gateway: Any, slack: tuple[FakePlatform, ScriptedSlack]
) -> None:
    api, script = slack
    gateway = await start_gateway(settings_for(tmp_path, [slack_endpoint(api.url, minutes=0.005)]))  # 0.3 s
    script.fail("C1", POSTED, slack_error("not_in_channel"))  # the echo goes, the notice is refused
    await slack_say(gateway, "C1", "hello")
    await api.wait_for(2, POST)
    await gateway.settle()
    [dead] = await dead_letters(gateway)
    assert dead["kind"] == "closure" and dead["text"] == BYE
    session = await gateway.admin_get(f"/admin/sessions/{dead['session_id']}")
    assert session["notice"] == "failed: not_in_channel"
    assert (await retry(gateway, dead["id"]))[0] == 202
    await api.wait_for(3, POST)
    await gateway.settle()
    session = await gateway.admin_get(f"/admin/sessions/{dead['session_id']}")
    assert session["notice"] == "sent" and script.delivered == {"C1": ["hello", BYE]}


# -- Twilio 21610: refused after sending --------------------------------------------------------------


async def test_twilio_21610_is_a_dead_letter_without_retries_and_the_notice_reads_skipped(
    tmp_path: Path, start_gateway: Any
) -> None:
    async with FakePlatform() as api:
        api.respond(MESSAGES_PATH, UNSUBSCRIBED)
        gateway = await start_gateway(settings_for(tmp_path, [TWILIO.endpoint(api.url, minutes=0.005)]))
        await TWILIO.say(gateway, TWILIO.text("hello"))
        await api.wait_for(2, MESSAGES_PATH)  # the echo, then the closure notice
        await gateway.settle()
        await asyncio.sleep(0.15)
        assert len(api.to(MESSAGES_PATH)) == 2  # once each, never retried
        closure, reply = await dead_letters(gateway)
        assert (closure["kind"], reply["kind"]) == ("closure", "reply")
        assert all("21610" in d["last_error"] and d["attempts"] == 1 for d in (closure, reply))
        session = await gateway.admin_get(f"/admin/sessions/{closure['session_id']}")
        assert session["notice"].startswith("skipped: 21610")
        assert gateway.metrics.value("gateway_messages_out_total", endpoint="sms", outcome="dead") == 2
        assert gateway.metrics.value("gateway_messages_out_total", endpoint="sms", outcome="retry") == 0


def _iso_age_s(text: str) -> float:
    return time.time() - parse_iso(text)


def test_skips_refused_by_the_platform_are_told_from_local_policy_skips() -> None:
    """The adapters mark a platform's own refusal (a dead letter) apart from their local checks."""
    window = {"error": {"code": 10, "error_subcode": 2018278, "message": "(#10) outside of allowed window"}}
    refused_by_messenger = messenger_classify_error(400, window, None)
    assert isinstance(refused_by_messenger, DeliverySkipped) and refused_by_messenger.refused_by_platform
    assert not DeliverySkipped("outside the 24 h messaging window").refused_by_platform  # checked locally


class SentMarkFailsOnce(SqliteStore):
    """A store whose first "sent" bookkeeping write fails (a disk hiccup)."""

    failed = False

    async def commit(self, change: Change) -> None:
        if not self.failed and any(m.state is OutboxState.SENT for m in change.outbox_updates):
            self.failed = True
            raise StoreError("disk I/O error (injected)")
        await super().commit(change)


async def test_a_failed_sent_mark_is_written_again_and_the_message_is_not_resent(
    tmp_path: Path, start_gateway: Any, slack: tuple[FakePlatform, ScriptedSlack]
) -> None:
    api, script = slack
    settings = settings_for(tmp_path, [slack_endpoint(api.url)])
    store = SentMarkFailsOnce(settings.storage.path)
    gateway = await start_gateway(settings, store=store)
    await slack_say(gateway, "C1", "once")
    await api.wait_for(1, POST)
    await slack_say(gateway, "C1", "twice?")  # the lane carries on after the retried bookkeeping
    await api.wait_for(2, POST)
    await gateway.settle()
    await asyncio.sleep(0.2)
    assert store.failed and script.delivered == {"C1": ["once", "twice?"]} and len(api.to(POST)) == 2
    assert await gateway.store.pending_outbox() == []
