"""The outbox's rule for split messages, for every adapter that splits: the real outbox on a
real SQLite file, the real adapter, and a fake platform API on 127.0.0.1.

A long text goes out as parts (LINE: batches of up to five texts per request). After each part
the platform accepted, and before the next is sent, ``parts_sent`` is committed on the outbox
row; a retry, also by a new outbox on the reopened database (a restart), starts after it. So a
part the platform accepted is not sent again. (The subprocess kill -9 version is in
test_split_crash.py.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from channels.line import retry_key
from channels.registry import Channel, create_adapter
from gateway.errors import StoreError
from gateway.models import Change, MessageKind, OutboundMessage, OutboxState
from gateway.outbox import Outbox
from gateway.outbox_outcomes import RetryPolicy
from gateway.settings import EndpointSettings, Secret
from gateway.store.sqlite import SqliteStore
from tests.fakeplatform import Answer, FakePlatform, RecordedRequest

TWILIO_SID = "AC" + "e" * 32
FAST = RetryPolicy(base_delay_s=0.02, max_delay_s=0.05)
SLOW = RetryPolicy(base_delay_s=60.0, max_delay_s=60.0)  # a retry that waits past the "restart"


@dataclass(frozen=True, slots=True)
class Platform:
    """One splitting platform: its send path, answers, and a text that splits into three parts
    whose texts start with "a", "b" and "c" (``label`` reads that letter off a request)."""

    channel: Channel
    conversation: str
    credentials: dict[str, str]
    path: str
    accepted: Answer
    busy: Answer
    text: str
    label: Callable[[RecordedRequest], str]

    def endpoint(self, api_url: str) -> EndpointSettings:
        return EndpointSettings(
            name="ep",
            channel=self.channel,
            path="/webhooks/ep",
            api_base_url=api_url,
            credentials={key: Secret(value) for key, value in self.credentials.items()},
        )


PLATFORMS = {
    "slack": Platform(
        Channel.SLACK,
        "C1",
        {"signing_secret": "split-secret", "bot_token": "xoxb-split", "bot_user_id": "UBOT"},
        "/api/chat.postMessage",
        Answer(json_body={"ok": True, "channel": "C1", "ts": "1700000000.000100"}),
        Answer(status=503, text="busy"),
        "a" * 3000 + " " + "b" * 3000 + " " + "c" * 3000,
        lambda request: str(request.json()["text"][0]),
    ),
    "messenger": Platform(
        Channel.MESSENGER,
        "PSID1",
        {"app_secret": "split-secret", "verify_token": "v", "page_access_token": "page-token"},
        "/v21.0/me/messages",
        Answer(json_body={"recipient_id": "PSID1", "message_id": "m_1"}),
        Answer(status=503, json_body={}),
        "a" * 2000 + " " + "b" * 2000 + " " + "c" * 10,
        lambda request: str(request.json()["message"]["text"][0]),
    ),
    "twilio": Platform(
        Channel.TWILIO,
        "+15551230000",
        {"account_sid": TWILIO_SID, "auth_token": "split-auth-token", "from_number": "+15550001111"},
        f"/2010-04-01/Accounts/{TWILIO_SID}/Messages.json",
        Answer(status=201, json_body={"sid": "SM" + "f" * 32, "status": "queued"}),
        Answer(status=503, json_body={"code": 20500, "message": "busy"}),
        "a" * 1600 + "b" * 1600 + "c" * 10,
        lambda request: request.form()["Body"][0],
    ),
    # A part is one push of up to five texts: 5 x "a", 5 x "b", then "c".
    "line": Platform(
        Channel.LINE,
        "U1",
        {"channel_secret": "split-secret", "channel_access_token": "split-token"},
        "/v2/bot/message/push",
        Answer(json_body={"sentMessages": [{"id": "461230966842064897", "quoteToken": "q"}]}),
        Answer(status=500, json_body={"message": "busy"}),
        "a" * 25_000 + " " + "b" * 25_000 + " " + "c" * 10,
        lambda request: str(request.json()["messages"][0]["text"][0]),
    ),
}


def long_message(platform: Platform, key: str = "reply:1:0") -> OutboundMessage:
    now = time.time()
    return OutboundMessage(
        endpoint="ep",
        channel=platform.channel.value,
        conversation=platform.conversation,
        kind=MessageKind.REPLY,
        text=platform.text,
        key=key,
        created_at=now,
        user_last_seen_at=now,  # inside Messenger's 24 h window
        next_attempt_at=now,
    )


@asynccontextmanager
async def running(
    path: Path,
    platform: Platform,
    api: FakePlatform,
    *,
    retry: RetryPolicy = FAST,
    clock: Callable[[], float] = time.time,
    store: SqliteStore | None = None,
    messages: tuple[OutboundMessage, ...] = (),
) -> AsyncIterator[tuple[SqliteStore, Outbox]]:
    """The store at ``path`` (with ``messages`` committed) and a started outbox over it, then
    closed in reverse: the outbox, the adapter, the store."""
    store = store or SqliteStore(path)
    await store.open()
    adapter = create_adapter(platform.endpoint(api.url))
    try:
        if messages:
            await store.commit(Change(outbox=list(messages)))
        async with aiohttp.ClientSession() as http:
            await adapter.start(http)
            outbox = Outbox(store, {"ep": adapter}, clock=clock, retry=retry)
            try:
                await outbox.start()
                yield store, outbox
            finally:
                await outbox.aclose()
                await adapter.aclose()
    finally:
        await store.aclose()


async def row_of(store: SqliteStore, message: OutboundMessage) -> OutboundMessage:
    row = await store.get_outbound(message.id)
    assert row is not None
    return row


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("name", list(PLATFORMS))
async def test_a_retry_resumes_after_the_recorded_parts(tmp_path: Path, name: str) -> None:
    platform = PLATFORMS[name]
    message = long_message(platform)
    async with FakePlatform() as api:
        api.respond(platform.path, platform.accepted)
        api.fail_next(platform.path, platform.accepted, platform.busy)  # part 1 accepted, part 2 refused
        async with running(tmp_path / "gateway.db", platform, api, messages=(message,)) as (store, outbox):
            await outbox.drain()
            row = await row_of(store, message)
    assert [platform.label(request) for request in api.to(platform.path)] == ["a", "b", "b", "c"]
    assert (row.state, row.attempts) == (OutboxState.SENT, 1)
    assert row.parts_sent == 2  # the last progress written; the "sent" mark records the last part


@pytest.mark.parametrize("name", list(PLATFORMS))
async def test_a_restart_resumes_after_the_recorded_parts(tmp_path: Path, name: str) -> None:
    """Part 2 fails and its retry waits a minute; the outbox and the store close (a restart),
    and a new outbox on the reopened database sends parts 2 and 3 only."""
    platform = PLATFORMS[name]
    message = long_message(platform)
    db = tmp_path / "gateway.db"
    async with FakePlatform() as api:
        api.respond(platform.path, platform.accepted)
        api.fail_next(platform.path, platform.accepted, platform.busy)
        async with running(db, platform, api, retry=SLOW, messages=(message,)) as (store, _outbox):

            async def failure_recorded() -> bool:
                return (await row_of(store, message)).attempts == 1

            await eventually(failure_recorded)
            row = await row_of(store, message)
            assert (row.state, row.parts_sent) == (OutboxState.PENDING, 1)
        assert [platform.label(request) for request in api.to(platform.path)] == ["a", "b"]

        # The new outbox's clock is two minutes on: past the retry's next_attempt_at.
        async with running(db, platform, api, clock=lambda: time.time() + 120) as (store, outbox):
            await outbox.drain()
            row = await row_of(store, message)
    assert [platform.label(request) for request in api.to(platform.path)] == ["a", "b", "b", "c"]
    assert (row.state, row.parts_sent) == (OutboxState.SENT, 2)
    if name == "line":  # each batch pushed with its own key; the first batch never again
        keys = [request.headers["X-Line-Retry-Key"] for request in api.to(platform.path)]
        assert keys == [retry_key("ep", message.key, index) for index in (0, 1, 1, 2)]


class CountingStore(SqliteStore):
    """Records the progress writes; the first ``failures`` of them fail (a disk hiccup)."""

    def __init__(self, path: Path, failures: int = 0) -> None:
        super().__init__(path)
        self.progress: list[tuple[int, int]] = []
        self.failures = failures

    async def record_parts_sent(self, message_id: int, parts_sent: int) -> None:
        self.progress.append((message_id, parts_sent))
        if self.failures:
            self.failures -= 1
            raise StoreError("disk I/O error (injected)")
        await super().record_parts_sent(message_id, parts_sent)


async def test_progress_is_written_between_parts_only(tmp_path: Path) -> None:
    """No write after the last part (the "sent" mark follows), so a one-part message costs no
    extra write."""
    platform = PLATFORMS["slack"]
    long, short = long_message(platform), long_message(platform, key="reply:2:0")
    short.text = "short"
    store = CountingStore(tmp_path / "gateway.db")
    async with FakePlatform() as api:
        api.respond(platform.path, platform.accepted)
        async with running(tmp_path / "gateway.db", platform, api, store=store, messages=(long, short)) as (_, outbox):
            await outbox.drain()
    assert store.progress == [(long.id, 1), (long.id, 2)]
    assert len(api.to(platform.path)) == 4


async def test_a_failed_progress_write_is_repeated_before_the_next_part(tmp_path: Path) -> None:
    platform = PLATFORMS["slack"]
    message = long_message(platform)
    store = CountingStore(tmp_path / "gateway.db", failures=1)
    async with FakePlatform() as api:
        api.respond(platform.path, platform.accepted)
        async with running(tmp_path / "gateway.db", platform, api, store=store, messages=(message,)) as (_, outbox):
            await outbox.drain()
            row = await row_of(store, message)
    assert store.progress == [(message.id, 1), (message.id, 1), (message.id, 2)]
    assert [platform.label(request) for request in api.to(platform.path)] == ["a", "b", "c"]
    assert (row.state, row.attempts, row.parts_sent) == (OutboxState.SENT, 0, 2)
