"""The session manager through the real app: S2-S4 expiration, re-arm, the fire-versus-message
race, per-session ordering under concurrent load, kinds (S13, S14), endpoint removal."""

from __future__ import annotations

import asyncio
import gc
import random
import time
from pathlib import Path
from typing import Any

from gateway.models import CloseReason, EventKind, InboundEvent, SessionState
from gateway.store.base import SessionQuery
from gateway.wire import parse_iso
from tests.conftest import make_settings, webchat_endpoint
from tests.scripted_flow import ScriptedFlow
from tests.test_metrics import scrape, value


def _message(conversation: str, text: str, n: int) -> InboundEvent:
    return InboundEvent(
        conversation=conversation,
        kind=EventKind.MESSAGE,
        dedup_key=f"{conversation}-{n}",
        text=text,
        timestamp=time.time(),
    )


async def _sessions_of(gateway: Any, conversation: str) -> list[dict[str, Any]]:
    body = await gateway.admin_get(f"/admin/contacts/web:{conversation}")
    return list(body["conversations"])


async def test_s2_default_expiration_is_30_minutes(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    settings = make_settings(tmp_path, [{"name": "web", "channel": "webchat"}])
    gateway = await start_gateway(settings)
    chat = await open_chat(gateway, "s2")
    await chat.say("hi")
    await chat.wait_messages(1, "reply")
    [session] = await _sessions_of(gateway, chat.conversation)
    span = parse_iso(session["expires_at"]) - parse_iso(session["last_activity_at"])
    assert abs(span - 30 * 60) < 0.01


async def test_s3_zero_never_expires(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    """S3: expiration 0 keeps one conversation; a short-lived endpoint beside it is the clock."""
    settings = make_settings(
        tmp_path, [webchat_endpoint("forever", minutes=0), webchat_endpoint("short", minutes=0.005)]
    )
    gateway = await start_gateway(settings)
    forever = await open_chat(gateway, "a", endpoint="forever")
    short = await open_chat(gateway, "b", endpoint="short")
    await forever.say("one")
    await forever.wait_messages(1, "reply")
    await short.say("one")
    await short.wait_messages(1, "closure")  # 0.3 s of silence closed this one...
    await forever.say("two")
    await forever.wait_messages(2, "reply")
    body = await gateway.admin_get(f"/admin/contacts/forever:{forever.conversation}")
    [session] = body["conversations"]  # ...but the forever one is still the same session
    assert session["state"] == "open" and session["expires_at"] is None and session["message_count"] == 2


async def test_s4_organisation_value_caps_endpoint(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    settings = make_settings(
        tmp_path,
        [webchat_endpoint(minutes=30)],
        organisation={"session": {"expiration_minutes": 0.01, "min_minutes": 0, "max_minutes": 20160}},
    )
    gateway = await start_gateway(settings)
    chat = await open_chat(gateway, "capped")
    await chat.say("hi")
    await chat.wait_messages(1, "closure", timeout_s=5)
    [session] = await _sessions_of(gateway, chat.conversation)
    assert session["close_reason"] == "inactivity"
    assert abs(parse_iso(session["expires_at"]) - parse_iso(session["last_activity_at"]) - 0.6) < 0.01


async def test_each_message_rearms_the_deadline(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    """Messages 0.3 s apart keep a 0.6 s session open well past its first deadline."""
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0.01)]))
    chat = await open_chat(gateway, "busy")
    for n in range(5):
        await chat.say(f"m{n}")
        await chat.wait_messages(n + 1, "reply")
        await asyncio.sleep(0.3)
    await chat.wait_messages(1, "closure")
    [session] = await _sessions_of(gateway, chat.conversation)
    assert session["message_count"] == 5
    lived = parse_iso(session["closed_at"]) - parse_iso(session["started_at"])
    assert lived > 1.2 + 0.6 - 0.05
    assert 0 <= parse_iso(session["closed_at"]) - parse_iso(session["expires_at"]) < 0.1
    assert gateway.manager.stats.timer_rearms >= 1  # the handle re-armed itself (lazy re-arm)


async def test_race_message_accepted_before_deadline_keeps_session(tmp_path: Path, start_gateway: Any) -> None:
    """The deadline moves at acceptance: a message queued behind a slow flow call is not
    overtaken by its own timeout."""
    flow = ScriptedFlow()
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0.005)]), flow=flow)
    manager = gateway.manager
    await manager.accept("web", _message("r", "first", 1))
    await gateway.settle()
    flow.gate = asyncio.Event()
    flow.entered.clear()
    await manager.accept("web", _message("r", "second", 2))  # holds the flow past the deadline
    await flow.entered.wait()
    await manager.accept("web", _message("r", "third", 3))  # accepted before the deadline...
    await asyncio.sleep(0.5)  # ...which passes (0.3 s) while both wait on the flow
    flow.gate.set()
    await gateway.settle()
    [session] = await gateway.store.contact_sessions("web:r")
    # All three in one session: the fire waited behind them. The user then really was silent
    # for longer than 0.3 s, so the session closed after them, measured from "third"'s arrival.
    assert session.message_count == 3
    third = max(turn.event.timestamp or 0 for turn in flow.turns)
    assert session.last_activity_at >= third
    assert session.close_reason is CloseReason.INACTIVITY
    assert session.closed_at is not None and session.closed_at >= session.last_activity_at + 0.3


async def test_race_message_after_deadline_opens_new_session(tmp_path: Path, start_gateway: Any) -> None:
    flow = ScriptedFlow()
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0.005)]), flow=flow)
    manager = gateway.manager
    flow.gate = asyncio.Event()
    await manager.accept("web", _message("r2", "first", 1))
    await flow.entered.wait()
    await asyncio.sleep(0.4)  # the deadline (0.3 s after "first") passes while the flow is held
    await manager.accept("web", _message("r2", "late", 2))
    flow.gate.set()
    await gateway.settle()
    old, new = sorted(await gateway.store.contact_sessions("web:r2"), key=lambda s: s.started_at)
    assert old.state is SessionState.CLOSED and old.close_reason is CloseReason.INACTIVITY
    assert old.message_count == 1 and new.message_count == 1 and new.state is SessionState.OPEN


async def test_race_hammer_invariants(tmp_path: Path, start_gateway: Any) -> None:
    """Messages at random moments around the deadline: never two open sessions, no message
    lost, no session closed before it was inactive for its full expiration."""
    expiration_s = 0.12
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=expiration_s / 60)]))
    manager = gateway.manager

    async def user(conversation: str) -> int:
        sent = 0
        for n in range(12):
            await manager.accept("web", _message(conversation, f"m{n}", n))
            sent += 1
            await asyncio.sleep(expiration_s * random.uniform(0.8, 1.2))
        return sent

    conversations = [f"h{i}" for i in range(20)]
    sent = await asyncio.gather(*(user(c) for c in conversations))
    await gateway.settle()
    for conversation, count in zip(conversations, sent, strict=True):
        sessions = await gateway.store.contact_sessions(f"web:{conversation}")
        assert sum(s.message_count for s in sessions) == count
        assert sum(s.state is SessionState.OPEN for s in sessions) <= 1
        for s in sessions:
            if s.state is SessionState.CLOSED:
                assert s.closed_at is not None
                assert s.closed_at - s.last_activity_at >= expiration_s - 0.002


async def test_per_session_order_under_concurrent_load(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    """Each conversation's replies leave in the order of its messages, while 30 conversations
    run concurrently through a flow with random delays."""
    flow = ScriptedFlow(delay_s=0.01)
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0)]), flow=flow)
    chats = [await open_chat(gateway, f"o{i}") for i in range(30)]

    async def talk(chat: Any) -> None:
        for n in range(15):
            await chat.say(f"{n}")

    await asyncio.gather(*(talk(chat) for chat in chats))
    for chat in chats:
        assert await chat.wait_messages(15, "reply") == [f"{n}" for n in range(15)]
    active = [turn for turn in flow.turns if turn.event.conversation == chats[0].conversation]
    assert [t.event.text for t in active] == [f"{n}" for n in range(15)]


async def test_s13_bot_message_opens_non_interactive_session(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0.01)]))
    chat = await open_chat(gateway, "bot")
    session = await gateway.bot_message("web", chat.conversation, "news!")
    assert session["interactive"] is False and session["billable"] is False
    assert await chat.wait_messages(1) == ["news!"]
    await chat.wait_for(lambda frames: any(f.get("state") == "closed" for f in frames))
    await gateway.settle()
    closed = await gateway.admin_get(f"/admin/sessions/{session['id']}")
    # Never interactive: closed on time, but no closure notice (DESIGN.md).
    assert closed["state"] == "closed" and closed["notice"] == "skipped: never interactive"
    assert chat.messages("closure") == []


async def test_s13_first_user_message_makes_bot_session_interactive(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0)]))
    chat = await open_chat(gateway, "bot2")
    session_id = (await gateway.bot_message("web", chat.conversation, "hello"))["id"]
    await chat.say("hi back")
    await chat.wait_messages(2)
    session = await gateway.admin_get(f"/admin/sessions/{session_id}")
    assert session["interactive"] is True and session["message_count"] == 1 and session["billable"] is True


async def test_s14_developer_endpoint_opens_developer_sessions(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    endpoint = {**webchat_endpoint(minutes=0), "developer": True}
    gateway = await start_gateway(make_settings(tmp_path, [endpoint]))
    chat = await open_chat(gateway, "dev")
    await chat.say("test")
    await chat.wait_messages(1)
    [session] = await _sessions_of(gateway, chat.conversation)
    assert session["developer"] is True and session["billable"] is False


async def test_endpoint_removed_sessions_close_at_start(tmp_path: Path, start_gateway: Any) -> None:
    settings = make_settings(tmp_path, [webchat_endpoint("old", minutes=0), webchat_endpoint("kept", minutes=0)])
    first = await start_gateway(settings)
    await first.manager.accept("old", _message("x", "hi", 1))
    await first.manager.accept("kept", _message("y", "hi", 2))
    await first.settle()
    await first.client.close()
    second = await start_gateway(make_settings(tmp_path, [webchat_endpoint("kept", minutes=0)]))
    [old] = await second.store.contact_sessions("old:x")
    assert old.state is SessionState.CLOSED and old.close_reason is CloseReason.ENDPOINT_REMOVED
    assert old.notice == "skipped: endpoint removed"
    [kept] = await second.store.contact_sessions("kept:y")
    assert kept.state is SessionState.OPEN
    page, _ = await second.store.list_sessions(SessionQuery(state=SessionState.OPEN))
    assert [s.endpoint for s in page] == ["kept"]


async def test_restore_gives_the_garbage_collector_back(tmp_path: Path, start_gateway: Any) -> None:
    """Restore pauses the cyclic collector (SessionManager.start) and must turn it on again."""
    assert gc.isenabled()
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint()]))
    assert gateway.manager.ready
    assert gc.isenabled()


async def test_a_burst_of_closes_lets_the_loop_run_between_chunks(tmp_path: Path, start_gateway: Any) -> None:
    """Sessions due together close in batches of 500; each batch's committed closes leave memory
    100 at a time with the loop running between (closing.AFTER_CLOSE_CHUNK), so a burst holds no
    timer back for long. Counted in loop iterations, not time: a callback that re-schedules itself
    each iteration numbers them, and the closes of one batch must span several."""
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0.01)]))
    loop = asyncio.get_running_loop()
    iteration = 0
    ticking = True

    def tick() -> None:
        nonlocal iteration
        iteration += 1
        if ticking:
            loop.call_soon(tick)

    closed_in: dict[str, int] = {}
    all_closed = asyncio.Event()

    def on_session(session: Any) -> None:
        if not session.is_open:
            closed_in[session.id] = iteration
            if len(closed_in) == 600:
                all_closed.set()

    gateway.manager.listeners.append(on_session)
    arrival = time.time()  # one arrival for all: one deadline, one fire, batches of 500 and 100
    await asyncio.gather(*(gateway.manager.accept("web", _message(f"b{n}", "hi", n), arrival) for n in range(600)))
    await gateway.settle()
    loop.call_soon(tick)
    try:
        await asyncio.wait_for(all_closed.wait(), 30)
    finally:
        ticking = False
    iterations = sorted(set(closed_in.values()))
    # 600 closes, at most 100 per iteration and batch (two batches may share an iteration).
    assert len(iterations) >= 4, iterations
    per_iteration = [sum(1 for i in closed_in.values() if i == it) for it in iterations]
    assert max(per_iteration) <= 200, per_iteration
    # Their metrics are counted per batch and per timer round, not per session: none is lost.
    samples, _ = await scrape(gateway)
    assert value(samples, "gateway_sessions_closed_total", endpoint="web", reason="inactivity") == 600
    assert value(samples, "gateway_close_lag_seconds_count", endpoint="web") == 600
    assert value(samples, "gateway_timer_fire_lag_seconds_count", endpoint="web") == 600
