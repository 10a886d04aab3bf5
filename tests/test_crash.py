"""Crash faults on a real ``chat-gateway serve`` process (SQLite file, LINE endpoint, fake LINE
API on 127.0.0.1), checked against DESIGN.md's non-negotiables:

- a steady stream of signed webhooks while the process is SIGKILLed at random moments and
  restarted: every acknowledged event is answered exactly once, redeliveries get no second
  reply, every session that fell due closed exactly once with exactly one notice;
- a kill right after LINE accepted a send and before the gateway recorded it (the window);
- SIGTERM with an event in flight and sends pending: exit 0, nothing lost or repeated.

The fake LINE API keeps LINE's own once-rules, so a true duplicate is told from an idempotent
retry: a reply token works once (a reused one gets 400 "Invalid reply token") and a push retry
key is accepted once (a repeat gets 409). What reached a user is decided when the request
arrives, before any delay: LINE delivers what it received even if the caller died waiting.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from channels.line import retry_key
from tests.fakeplatform import FakePlatform
from tests.gateway_process import FlowServer, GatewayProcess
from tests.kits.line import LINE, LineApi, line_api_with_once_rules

ENDPOINT = LINE.endpoint_name
BYE = LINE.bye


def close_key(session_id: str) -> str:
    """The X-Line-Retry-Key the closure notice of ``session_id`` must carry on every attempt."""
    return retry_key(ENDPOINT, f"close:{session_id}")


def rows(db: Path, sql: str, *args: Any) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def backlog(db: Path) -> tuple[int, int, int]:
    """(pending inbound events, pending outbound messages, open sessions)."""
    [row] = rows(
        db,
        "SELECT (SELECT COUNT(*) FROM inbound WHERE state = 'pending'),"
        " (SELECT COUNT(*) FROM outbox WHERE state = 'pending'),"
        " (SELECT COUNT(*) FROM sessions WHERE state = 'open')",
    )
    return int(row[0]), int(row[1]), int(row[2])


def inbound_keys(db: Path) -> set[str]:
    return {r["dedup_key"] for r in rows(db, "SELECT dedup_key FROM inbound")}


async def wait_until(check: Callable[[], bool], timeout_s: float, what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what() if callable(what) else what}")
        await asyncio.sleep(0.02)


def restarts(gateway: GatewayProcess) -> list[str]:
    """Per start: "<open sessions restored>/<pending events re-queued>/<pending sends resumed>"
    (from the log; for the test's printout only)."""
    found: list[str] = []
    resumed = "0"
    for line in gateway.log_path.read_text().splitlines():
        if match := re.search(r"resuming (\d+) pending outbound", line):
            resumed = match.group(1)  # logged before the restore line of the same start
        elif match := re.search(r"restored (\d+) open sessions, (\d+) pending events", line):
            found.append(f"{match.group(1)}/{match.group(2)}/{resumed}")
            resumed = "0"
    return found


def log_tail(gateway: GatewayProcess, chars: int = 3000) -> str:
    try:
        return gateway.log_path.read_text()[-chars:]
    except OSError:
        return ""


@pytest.fixture
async def fake_line() -> AsyncIterator[tuple[FakePlatform, LineApi]]:
    async with line_api_with_once_rules() as pair:
        yield pair


# -- 1. SIGKILL at random moments under a steady stream ------------------------------------------

CONVERSATIONS = 20
EXPIRY_MIN = 0.02  # 1.2 s of silence closes a session
MEAN_GAP_S = 0.07  # per conversation while it talks
PAUSE_P = 0.05  # after a message, the chance that the user goes silent for longer than EXPIRY
# (~40 % of the time talking: about 100 webhooks/s in total while the gateway is up)
PAUSE_S = (1.4, 2.6)
LATENCY_S = 0.04  # the flow's and LINE's answers take up to this long
WEBHOOK_TIMEOUT = aiohttp.ClientTimeout(total=5)


@dataclass(slots=True)
class Sent:
    user: str
    event_id: str
    text: str
    status: int | None = None  # None: no answer (connection refused or dropped by the kill)
    redelivery_status: int | None = None


@dataclass
class Stream:
    """Per-conversation senders: bursts of messages, pauses longer than the expiry."""

    url: str
    seed: int
    sent: list[Sent] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, http: aiohttp.ClientSession) -> None:
        await asyncio.gather(
            *(self._converse(http, f"U{n:02d}", random.Random(self.seed * 1000 + n)) for n in range(CONVERSATIONS))
        )

    async def _converse(self, http: aiohttp.ClientSession, user: str, rng: random.Random) -> None:
        count = 0
        while not self.stop.is_set():
            if rng.random() < PAUSE_P:
                await self._sleep(rng.uniform(*PAUSE_S))
                continue
            await self._sleep(rng.expovariate(1 / MEAN_GAP_S))
            if self.stop.is_set():
                return
            count += 1
            item = Sent(user, f"E{self.seed}{user}N{count:05d}", f"{user} message {count}")
            self.sent.append(item)
            item.status = await self.post(http, item)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except TimeoutError:
            pass

    async def post(self, http: aiohttp.ClientSession, item: Sent, attempt: int = 0) -> int | None:
        inbound = LINE.text(item.text, conversation=item.user, event_id=item.event_id)
        for _ in range(attempt):
            inbound = LINE.redelivery(inbound)
        try:
            return await LINE.post_to(http, self.url, inbound)
        except (aiohttp.ClientError, TimeoutError):
            return None


async def test_sigkill_at_random_moments_under_a_steady_stream(
    tmp_path: Path, fake_line: tuple[FakePlatform, LineApi]
) -> None:
    """20 conversations talk in bursts (~100 webhooks/s while the gateway is up) with pauses
    longer than the 1.2 s expiry, through an http flow; the process is SIGKILLed 3-4 times at
    seeded random moments (sometimes staying down past the expiry) and restarted. Then the
    platform redelivers what got no 2xx, and every acknowledged event once more. At the end,
    after quiescence and one more kill and restart, ``check_outcome`` must find nothing wrong.
    Rerun a failure with ``CRASH_SEED=<seed>`` (timing still varies: the seed fixes the
    schedule, not the interleaving)."""
    seed = int(os.environ.get("CRASH_SEED") or random.randrange(1, 2**31))
    rng = random.Random(seed)
    fake, line = fake_line
    # Latency where real services have it, so that kills find events in the flow and sends
    # at LINE (accepted, answer not yet back): the flow and LINE answer in 0-40 ms.
    flow = FlowServer(latency_s=LATENCY_S, seed=seed)
    await flow.server.start_server()
    latency = random.Random(seed + 1)
    line.hold = lambda _to, _text: latency.uniform(0, LATENCY_S)
    gateway = GatewayProcess.configured(tmp_path, [LINE.endpoint(fake.url, minutes=EXPIRY_MIN)], flow=flow.config())
    db = tmp_path / "gateway.db"
    stream = Stream(gateway.url, seed)
    kills: list[float] = []
    started = time.monotonic()

    def context() -> str:
        return f"seed={seed} (rerun: CRASH_SEED={seed}); kills at {kills} s; log tail:\n{log_tail(gateway)}"

    async def killer() -> None:
        await asyncio.sleep(rng.uniform(0.8, 1.5))
        for _ in range(rng.choice([3, 4])):
            await asyncio.sleep(rng.uniform(0.7, 2.2))
            kills.append(round(time.monotonic() - started, 2))
            gateway.kill()
            # Sometimes down for longer than the expiry: sessions fall due while nobody runs.
            await asyncio.sleep(rng.choice([0.0, 0.2, rng.uniform(1.3, 1.8)]))
            gateway.start()
            await gateway.wait_healthy()
        await asyncio.sleep(1.0)  # traffic to the last incarnation too
        stream.stop.set()

    connector = aiohttp.TCPConnector(limit=CONVERSATIONS * 2)
    try:
        gateway.start()
        await gateway.wait_healthy()
        async with aiohttp.ClientSession(connector=connector, timeout=WEBHOOK_TIMEOUT) as http:
            await asyncio.gather(stream.run(http), killer())
            unanswered = [s for s in stream.sent if s.status is None]
            assert all(s.status in (200, None) for s in stream.sent), (
                Counter(s.status for s in stream.sent),
                context(),
            )
            assert len(stream.sent) > 300 and unanswered, (len(stream.sent), len(unanswered), context())

            committed_unanswered = len({s.event_id for s in unanswered} & inbound_keys(db))
            # The platform redelivers what got no 2xx (same webhookEventId, a new reply token),
            # and, for good measure, every acknowledged event once more.
            limit = asyncio.Semaphore(20)

            async def redeliver(item: Sent) -> None:
                async with limit:
                    item.redelivery_status = await stream.post(http, item, attempt=1)

            await asyncio.gather(*(redeliver(s) for s in unanswered))
            await asyncio.gather(*(redeliver(s) for s in stream.sent if s.status == 200))
            assert all(s.redelivery_status == 200 for s in stream.sent), (
                Counter(s.redelivery_status for s in stream.sent),
                context(),
            )

        doubled = rows(
            db,
            "SELECT conversation, COUNT(*) FROM sessions WHERE state = 'open' GROUP BY conversation HAVING COUNT(*) > 1",
        )
        assert not doubled, ([tuple(r) for r in doubled], context())
        # Quiescence: every event handled, every message sent, every session closed by its timer.
        await wait_until(
            lambda: backlog(db) == (0, 0, 0), 20, lambda: f"quiescence, backlog {backlog(db)}; {context()}"
        )
        delivered_before = len(line.deliveries)
        # A last crash and restart changes nothing: no re-send, no second close.
        gateway.kill()
        gateway.start()
        await gateway.wait_healthy()
        await asyncio.sleep(0.5)
        assert backlog(db) == (0, 0, 0), context()
        assert len(line.deliveries) == delivered_before, (line.deliveries[delivered_before:], context())
        assert await asyncio.to_thread(gateway.terminate, 15.0) == 0, context()
    finally:
        gateway.stop()
        await flow.server.close()

    sessions = rows(db, "SELECT COUNT(*) FROM sessions")[0][0]
    print(
        f"seed={seed} kills={kills} events={len(stream.sent)} unanswered={len(unanswered)} "
        f"(committed before the kill: {committed_unanswered}) "
        f"sessions={sessions} deliveries={len(line.deliveries)} 409s={len(line.repeated_keys)} "
        f"refused-tokens={len(line.refused_tokens)} restarts-resumed={restarts(gateway)} "
        f"took={time.monotonic() - started:.1f}s"
    )
    problems = check_outcome(db, line, stream.sent)
    assert not problems, "\n".join(problems) + "\n" + context()


def check_outcome(db: Path, line: LineApi, sent: list[Sent]) -> list[str]:
    """Everything the stream test requires of the end state; one line per violation."""
    problems: list[str] = []

    # Every event (acknowledged at first, or only on redelivery) was answered exactly once.
    replies = Counter((d.to, d.text) for d in line.deliveries if d.text != BYE)
    expected = Counter((s.user, f"echo {s.text}") for s in sent)
    for key in sorted(expected | replies):
        if replies[key] != expected[key]:
            how = [(d.via, d.key) for d in line.deliveries if (d.to, d.text) == key]
            kind = ""
            if [via for via, _ in how] == ["reply", "push"] and how[0][1] in line.refused_tokens:
                kind = " [reply accepted, then after the restart its token refused and the text pushed again]"
            problems.append(f"{key}: delivered {replies[key]} times, expected {expected[key]}: {how}{kind}")

    # The inbox holds each event once (dedup key = webhookEventId), all handled.
    inbound = rows(db, "SELECT dedup_key, state FROM inbound")
    if sorted(r["dedup_key"] for r in inbound) != sorted(s.event_id for s in sent):
        problems.append(f"inbox keys differ from the events sent ({len(inbound)} rows, {len(sent)} events)")
    if {r["state"] for r in inbound} != {"done"}:
        problems.append(f"inbox states: {Counter(r['state'] for r in inbound)}")

    # Every session fell due and closed exactly once, by inactivity, its notice sent once.
    sessions = rows(db, "SELECT * FROM sessions ORDER BY conversation, started_at")
    if len(sessions) < 2 * CONVERSATIONS:
        problems.append(f"only {len(sessions)} sessions: too few fell due mid-stream")
    for s in sessions:
        if (s["state"], s["close_reason"], s["notice"]) != ("closed", "inactivity", "sent"):
            problems.append(f"session not closed once by inactivity with its notice sent: {dict(s)}")
    if sum(s["message_count"] for s in sessions) != len(sent):
        problems.append(f"message_count sums to {sum(s['message_count'] for s in sessions)}, {len(sent)} events")
    notices = [d for d in line.deliveries if d.text == BYE]
    by_key = {d.key: d for d in notices}
    assert len(by_key) == len(notices)  # the fake accepts a retry key once
    for s in sessions:
        notice = by_key.pop(close_key(s["id"]), None)
        if notice is None or notice.via != "push" or notice.to != s["conversation"]:
            problems.append(f"closure notice of session {s['id']} ({s['conversation']}): {notice}")
    if by_key:
        problems.append(f"closure notices of no session: {list(by_key.values())[:5]}")
    closure_keys = sorted(r["key"] for r in rows(db, "SELECT key FROM outbox WHERE kind = 'closure'"))
    if closure_keys != sorted(f"close:{s['id']}" for s in sessions):
        problems.append(f"closure rows in the outbox: {len(closure_keys)} for {len(sessions)} sessions")

    # Never two live sessions for one conversation: a session opens only with a message that
    # arrived after the previous one's deadline (``started_at`` is that message's arrival; the
    # previous one's ``closed_at`` is when its close committed, which may come a little later,
    # e.g. at the restart that found it overdue and the message waiting).
    by_conversation: dict[str, list[sqlite3.Row]] = {}
    for s in sessions:
        by_conversation.setdefault(s["conversation"], []).append(s)
    for conversation, history in by_conversation.items():
        for before, after in zip(history, history[1:], strict=False):
            if before["closed_at"] is None or before["expires_at"] > after["started_at"]:
                problems.append(
                    f"{conversation}: a session opened before the previous one fell due: {dict(before)} / {dict(after)}"
                )

    # Per-conversation order: what reached each user left in the order it was produced.
    outbox = rows(db, "SELECT conversation, kind, text, session_id FROM outbox ORDER BY id")
    for user in sorted(by_conversation):
        produced = [
            r["text"] if r["kind"] != "closure" else close_key(r["session_id"])
            for r in outbox
            if r["conversation"] == user
        ]
        received = [d.text if d.text != BYE else d.key for d in line.deliveries if d.to == user]
        received = list(dict.fromkeys(received))  # repeats are reported above; here: order only
        if received != produced:
            at = next((i for i, (r, p) in enumerate(zip(received, produced, strict=False)) if r != p), None)
            at = min(len(received), len(produced)) if at is None else at
            problems.append(
                f"{user}: order differs at #{at}: received {received[at : at + 3]} produced {produced[at : at + 3]}"
            )
    return problems


# -- 2. the window: LINE accepted a send, the gateway died before recording it ------------------


async def start_line_gateway(
    tmp_path: Path, fake: FakePlatform, minutes: float, **sections: Any
) -> tuple[GatewayProcess, Path]:
    gateway = GatewayProcess.configured(tmp_path, [LINE.endpoint(fake.url, minutes=minutes)], **sections)
    gateway.start()
    await gateway.wait_healthy()
    return gateway, tmp_path / "gateway.db"


async def say(gateway: GatewayProcess, user: str, text: str, event_id: str) -> int:
    async with aiohttp.ClientSession(timeout=WEBHOOK_TIMEOUT) as http:
        return await LINE.post_to(http, gateway.url, LINE.text(text, conversation=user, event_id=event_id))


async def test_kill_after_line_accepted_a_closure_push_sends_it_once(
    tmp_path: Path, fake_line: tuple[FakePlatform, LineApi]
) -> None:
    """The notice's push reached LINE, the process died before marking it sent: after the
    restart it is pushed again with the same retry key, LINE answers 409, the user has one."""
    fake, line = fake_line
    line.hold = lambda _to, text: 3.0 if text == BYE else 0.0  # accepted, answer withheld
    gateway, db = await start_line_gateway(tmp_path, fake, 0.01)
    try:
        assert await say(gateway, "U1", "hi", "EV-PUSH-1") == 200
        await wait_until(lambda: bool(line.delivered(BYE, "U1")), 10, "the closure push")
        gateway.kill()
        [session] = rows(db, "SELECT * FROM sessions")
        assert (session["state"], session["notice"]) == ("closed", "queued")  # not yet marked sent
        line.hold = lambda _to, _text: 0.0
        gateway.start()
        await gateway.wait_healthy()
        await wait_until(lambda: backlog(db) == (0, 0, 0), 10, "the resumed notice")
        assert line.repeated_keys == [close_key(session["id"])]  # sent again, same key
        assert [d.text for d in line.deliveries if d.to == "U1"] == ["hi", BYE]
        [session] = rows(db, "SELECT * FROM sessions")
        assert (session["close_reason"], session["notice"]) == ("inactivity", "sent")
    finally:
        gateway.stop()


async def test_kill_after_line_accepted_a_reply_sends_it_once(
    tmp_path: Path, fake_line: tuple[FakePlatform, LineApi]
) -> None:
    """The same window for a reply (reply token, no retry key). README promises that LINE
    drops the repeat; a reply token works once, so after the restart the reply is refused
    and must not be pushed again as if it had never been delivered."""
    fake, line = fake_line
    line.hold = lambda _to, text: 3.0 if text == "hi" else 0.0
    gateway, db = await start_line_gateway(tmp_path, fake, 30)
    try:
        assert await say(gateway, "U1", "hi", "EV-REPLY-1") == 200
        await wait_until(lambda: bool(line.delivered("hi", "U1")), 10, "the reply")
        gateway.kill()
        assert [r["state"] for r in rows(db, "SELECT state FROM outbox")] == ["pending"]
        line.hold = lambda _to, _text: 0.0
        gateway.start()
        await gateway.wait_healthy()
        await wait_until(lambda: backlog(db)[:2] == (0, 0), 10, "the resumed reply")
        await asyncio.sleep(0.2)
        assert [(d.via, d.text) for d in line.deliveries] == [("reply", "hi")], (
            f"the user got the reply {len(line.deliveries)} times: {line.deliveries}; "
            f"refused reply tokens: {line.refused_tokens}"
        )
    finally:
        gateway.stop()


# -- 3. SIGTERM with an event in flight and sends pending ----------------------------------------


async def test_sigterm_with_an_event_in_flight_and_sends_pending(
    tmp_path: Path, fake_line: tuple[FakePlatform, LineApi]
) -> None:
    """SIGTERM while the flow holds an acknowledged event, one send fails with 500 (retrying)
    and one closure push sits unanswered at LINE: the process exits 0 within 15 s, keeping the
    event and both sends pending; after the restart the event is answered once and both sends
    are delivered once (the withheld push again with its key: LINE answers 409)."""
    fake, line = fake_line
    flow = FlowServer()
    await flow.server.start_server()
    line.fail = lambda to, text: 500 if to == "U-fail" and text != BYE else None
    line.hold = lambda to, text: 20.0 if to == "U-slow" and text == BYE else 0.0
    gateway, db = await start_line_gateway(tmp_path, fake, 0.01, flow=flow.config())
    try:
        assert await say(gateway, "U-slow", "slow", "EV-SLOW") == 200
        assert await say(gateway, "U-fail", "fail", "EV-FAIL") == 200
        await wait_until(lambda: bool(line.delivered(BYE, "U-slow")), 10, "the withheld closure push")
        await wait_until(lambda: len(line.failed) >= 2, 10, "failed attempts to U-fail")
        assert await say(gateway, "U-held", "hold me", "EV-HELD") == 200
        await asyncio.wait_for(flow.held.wait(), 10)

        began = time.monotonic()
        code = await asyncio.to_thread(gateway.terminate, 15.0)
        took = time.monotonic() - began
        assert code == 0, log_tail(gateway)
        assert took < 15.0
        print(f"SIGTERM to exit: {took:.1f} s")

        # Persisted, not lost: the held event still pending, the two sends still pending.
        [held] = rows(db, "SELECT state FROM inbound WHERE dedup_key = 'EV-HELD'")
        assert held["state"] == "pending"
        pending = rows(db, "SELECT conversation, kind, text FROM outbox WHERE state = 'pending' ORDER BY id")
        # (U-fail's notice, when its session closed already, waits behind its reply: FIFO.)
        assert {("U-fail", "echo fail"), ("U-slow", BYE)} <= {(r["conversation"], r["text"]) for r in pending}
        assert len(pending) <= 3, [dict(r) for r in pending]
        assert not line.delivered("echo fail")

        line.fail = lambda _to, _text: None
        line.hold = lambda _to, _text: 0.0
        flow.release.set()
        gateway.start()
        await gateway.wait_healthy()
        await wait_until(lambda: backlog(db) == (0, 0, 0), 15, lambda: f"quiescence, backlog {backlog(db)}")
        await asyncio.sleep(0.2)
    finally:
        gateway.stop()
        flow.release.set()
        await flow.server.close()

    sessions = {s["conversation"]: s for s in rows(db, "SELECT * FROM sessions")}
    assert {c: (s["close_reason"], s["notice"]) for c, s in sessions.items()} == {
        c: ("inactivity", "sent") for c in ("U-slow", "U-fail", "U-held")
    }
    received = {user: [d.text for d in line.deliveries if d.to == user] for user in sessions}
    assert received == {
        "U-slow": ["echo slow", BYE],
        "U-fail": ["echo fail", BYE],
        "U-held": ["echo hold me", BYE],
    }, line.deliveries
    assert line.repeated_keys == [close_key(sessions["U-slow"]["id"])]  # resumed with the same key
    assert "hold me" in flow.seen  # the acknowledged event reached the flow again after the restart
