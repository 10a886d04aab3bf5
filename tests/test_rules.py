"""The session rulebook end to end, one test (or more) per S-rule of SESSION-SEMANTICS.md that
is not already covered elsewhere: S8 lazy mode, S10 closure texts, S11 auth profiles, S12 close
scripts, S17 refresh clearing everything, S18 discard, S19 variables with TTL, and the flow's
end_session and error paths."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.flows import FlowResult, FlowTurn
from gateway.models import EventKind, InboundEvent
from tests import close_script_fixture
from tests.conftest import make_settings, webchat_endpoint
from tests.scripted_flow import ScriptedFlow


def _event(conversation: str, text: str, n: int) -> InboundEvent:
    return InboundEvent(
        conversation=conversation, kind=EventKind.MESSAGE, dedup_key=f"{conversation}-{n}-{time.time()}", text=text
    )


async def _say(gateway: Any, conversation: str, text: str, n: int = 0) -> None:
    await gateway.manager.accept("web", _event(conversation, text, n))
    await gateway.settle()


async def _sessions(gateway: Any, conversation: str) -> list[Any]:
    return sorted(await gateway.store.contact_sessions(f"web:{conversation}"), key=lambda s: s.started_at)


async def _wait_closed(gateway: Any, conversation: str, count: int = 1, timeout_s: float = 5.0) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await gateway.settle()
        sessions = await _sessions(gateway, conversation)
        if sum(s.state == "closed" for s in sessions) >= count:
            return sessions
        await asyncio.sleep(0.02)
    raise AssertionError(f"{count} closed session(s) expected for {conversation}")


# -- S8 lazy mode --------------------------------------------------------------------------------


def _intent_flow() -> ScriptedFlow:
    """Replies with the text; the intent is the text's first word."""
    return ScriptedFlow(
        answer=lambda t: FlowResult(replies=[t.event.text or ""], intent=(t.event.text or "").split()[0])
    )


async def test_s8_lazy_nothing_happens_at_deadline_and_same_intent_continues(
    tmp_path: Path, start_gateway: Any
) -> None:
    flow = _intent_flow()
    settings = make_settings(tmp_path, [webchat_endpoint(minutes=0.003, mode="lazy"), webchat_endpoint("clock", 0.003)])
    gateway = await start_gateway(settings, flow=flow)
    await _say(gateway, "l", "billing question")
    # A proactive endpoint beside it, started after, is the clock: when it has closed, the lazy
    # session's deadline has passed too, and the lazy session must still be open (S8).
    await gateway.manager.accept("clock", _event("tick", "x", 0))
    await _wait_closed_on(gateway, "clock:tick")
    [session] = await _sessions(gateway, "l")
    assert session.state == "open" and session.expires_at < time.time()
    await _say(gateway, "l", "billing again", 1)
    [session] = await _sessions(gateway, "l")
    assert session.message_count == 2 and session.expires_at > time.time()  # re-armed
    assert [t.after_expiry for t in flow.turns if t.event.conversation == "l"] == [False, True]


async def _wait_closed_on(gateway: Any, contact_id: str) -> None:
    for _ in range(250):
        sessions = await gateway.store.contact_sessions(contact_id)
        if sessions and sessions[0].state == "closed":
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{contact_id} never closed")


async def test_s8_lazy_new_intent_closes_silently_and_handles_message_in_new_session(
    tmp_path: Path, start_gateway: Any
) -> None:
    flow = _intent_flow()
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0.003, mode="lazy")]), flow=flow)
    await _say(gateway, "n", "billing question")
    await asyncio.sleep(0.3)  # past the 0.18 s deadline: lazy mode waits for the user
    await _say(gateway, "n", "shipping question", 1)
    old, new = await _sessions(gateway, "n")
    assert (old.state, old.close_reason, old.notice) == ("closed", "inactivity", "none")
    assert (new.state, new.message_count, new.intent) == ("open", 1, "shipping")
    second = [t for t in flow.turns if t.event.text == "shipping question"]
    # Judged after expiry in the old session, then handled again in the new one.
    assert [(t.session.id, t.after_expiry) for t in second] == [(old.id, True), (new.id, False)]


async def test_s8_lazy_with_a_flow_without_intent_opens_new_session(tmp_path: Path, start_gateway: Any) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0.003, mode="lazy")]))
    await _say(gateway, "e", "hi")
    await asyncio.sleep(0.3)
    await _say(gateway, "e", "hi again", 1)
    old, new = await _sessions(gateway, "e")
    assert old.close_reason == "inactivity" and old.notice == "none" and new.state == "open"


# -- S10 closure texts -----------------------------------------------------------------------------


async def test_s10_closure_variants_are_used_in_turn_with_placeholders(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    # An unknown {placeholder} is a configuration error (check-config); text that is no
    # template ({0}) goes out as written.
    texts = ["Bye {name}, silence for {expiration_minutes} min ended this.", "Second variant {0}."]
    gateway = await start_gateway(
        make_settings(tmp_path, [webchat_endpoint(minutes=0.003, on_close={"messages": texts})])
    )
    chat = await open_chat(gateway, "v")
    await chat.say("one")
    await chat.wait_messages(1, "closure")
    await chat.say("two")
    assert await chat.wait_messages(2, "closure") == [
        "Bye there, silence for 0.003 min ended this.",
        "Second variant {0}.",
    ]


async def test_s10_per_channel_variant_wins(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    on_close = {"messages": ["generic"], "messages_by_channel": {"webchat": ["web only"], "slack": ["slack only"]}}
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0.003, on_close=on_close)]))
    chat = await open_chat(gateway, "pc")
    await chat.say("hi")
    assert await chat.wait_messages(1, "closure") == ["web only"]


# -- S11 auth profiles -----------------------------------------------------------------------------


def _profile_flow() -> ScriptedFlow:
    """On "login": sets the crm profile and a variable bound to it; echoes otherwise."""

    def answer(turn: FlowTurn) -> FlowResult:
        if turn.event.text == "login":
            return FlowResult(
                replies=["logged in"],
                auth_profiles={"crm": {"token": "secret-token"}, "other": {"token": "o"}},
                variables={"crm_user": {"value": "u-1", "auth_profile": "crm"}},
            )
        return FlowResult(replies=[turn.event.text or ""])

    return ScriptedFlow(answer=answer)


@pytest.mark.parametrize("clear", [True, False])
async def test_s11_auth_profiles_cleared_on_close_only_when_configured(
    tmp_path: Path, start_gateway: Any, clear: bool
) -> None:
    flow = _profile_flow()
    endpoint = webchat_endpoint(minutes=0.003, on_close={"clear_auth_profiles": clear})
    gateway = await start_gateway(make_settings(tmp_path, [endpoint]), flow=flow)
    await _say(gateway, "a", "login")
    await _wait_closed(gateway, "a")
    await _say(gateway, "a", "hello again", 1)
    turn = flow.turns[-1]
    if clear:  # the user must authorise again; the variable bound to the profile went with it
        assert turn.auth_profiles == {} and "crm_user" not in turn.contact_variables
    else:
        assert set(turn.auth_profiles) == {"crm", "other"}
        assert turn.contact_variables["crm_user"]["value"] == "u-1"


# -- S12 close scripts -----------------------------------------------------------------------------


async def test_s12_close_script_clears_one_named_profile(tmp_path: Path, start_gateway: Any) -> None:
    close_script_fixture.CALLS.clear()
    flow = _profile_flow()
    endpoint = webchat_endpoint(minutes=0.003, on_close={"script": "tests.close_script_fixture:clear_crm"})
    gateway = await start_gateway(make_settings(tmp_path, [endpoint]), flow=flow)
    await _say(gateway, "s", "login")
    [closed] = await _wait_closed(gateway, "s")
    for _ in range(100):
        contact = await gateway.store.get_contact("web:s")
        if "crm" not in contact.auth_profiles:
            break
        await asyncio.sleep(0.02)
    assert close_script_fixture.CALLS == [{"session": closed.id, "profiles": ["crm", "other"]}]
    assert set(contact.auth_profiles) == {"other"} and "crm_user" not in contact.variables


async def test_s12_close_script_by_url_async_and_failing(tmp_path: Path, start_gateway: Any) -> None:
    seen: list[dict[str, Any]] = []

    async def script(request: web.Request) -> web.StreamResponse:
        seen.append(await request.json())
        return web.json_response({"clear_auth_profiles": "all"})

    app = web.Application()
    app.router.add_post("/on-close", script)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        endpoints = [
            {**webchat_endpoint("url", minutes=0.003, on_close={"script": str(server.make_url("/on-close"))})},
            webchat_endpoint("bad", minutes=0.003, on_close={"script": "tests.close_script_fixture:broken"}),
            webchat_endpoint(
                "slow",
                minutes=0.003,
                on_close={"script": "tests.close_script_fixture:too_slow", "script_timeout_seconds": 0.1},
            ),
        ]
        flow = _profile_flow()
        gateway = await start_gateway(make_settings(tmp_path, endpoints), flow=flow)
        for endpoint in ("url", "bad", "slow"):
            await gateway.manager.accept(endpoint, _event("x", "login", 0))
        await gateway.settle()
        for _ in range(250):
            url_contact = await gateway.store.get_contact("url:x")
            errors = gateway.metrics.total("gateway_close_script_errors_total")
            if not url_contact.auth_profiles and errors == 2:
                break
            await asyncio.sleep(0.02)
        assert url_contact.auth_profiles == {} and seen[0]["auth_profiles"] == ["crm", "other"]
        assert seen[0]["session"]["state"] == "closed"
        assert errors == 2  # the broken and the slow script were counted...
        for endpoint in ("bad", "slow"):  # ...and neither stopped its close
            [session] = await gateway.store.contact_sessions(f"{endpoint}:x")
            assert session.state == "closed" and session.close_reason == "inactivity"
    finally:
        await server.close()


# -- S17 refresh, S19 variables with TTL -----------------------------------------------------------


def _variables_flow() -> ScriptedFlow:
    def answer(turn: FlowTurn) -> FlowResult:
        if turn.event.text == "remember":
            return FlowResult(
                replies=["ok"],
                variables={
                    "plain": 1,
                    "kept": {"value": 2, "ttl_seconds": 60},
                    "brief": {"value": 3, "ttl_seconds": 0.05},
                },
            )
        return FlowResult(replies=[turn.event.text or ""])

    return ScriptedFlow(answer=answer)


async def test_s19_variables_without_ttl_cleared_on_close_ttl_ones_outlive_it(
    tmp_path: Path, start_gateway: Any
) -> None:
    flow = _variables_flow()
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0.003)]), flow=flow)
    await _say(gateway, "t", "remember")
    [closed] = await _wait_closed(gateway, "t")
    assert closed.variables is None and closed.context is None  # S19: cleared at close
    await _say(gateway, "t", "new session", 1)
    turn = flow.turns[-1]
    assert turn.session.variables is None
    # "kept" lives on with its TTL; "brief" (0.05 s) ran out meanwhile.
    assert {name: entry["value"] for name, entry in turn.contact_variables.items()} == {"kept": 2}


async def test_s17_refresh_clears_ttl_variables_and_auth_profiles_too(tmp_path: Path, start_gateway: Any) -> None:
    flow = _variables_flow()
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0)]), flow=flow)
    await _say(gateway, "r", "remember")
    await gateway.manager.accept("web", InboundEvent(conversation="r", kind=EventKind.REFRESH, dedup_key="refresh-1"))
    await gateway.settle()
    await _say(gateway, "r", "after refresh", 1)
    old, new = await _sessions(gateway, "r")
    assert old.close_reason == "refresh" and new.state == "open"
    assert flow.turns[-1].contact_variables == {} and flow.turns[-1].auth_profiles == {}


# -- S18 discard -----------------------------------------------------------------------------------

_CONTEXT = {
    "tags": {"current": ["pay"], "historic": [["greet"], ["browse"]]},
    "sentiment": {"tone": "angry"},
    "dialog": {"step": 3},
}


def _context_flow() -> ScriptedFlow:
    return ScriptedFlow(
        answer=lambda t: (
            FlowResult(replies=["set"], context=_CONTEXT)
            if t.event.text == "start"
            else FlowResult(replies=[t.event.text or ""])
        )
    )


@pytest.mark.parametrize(
    ("said", "reply", "context"),
    [
        (
            "Discard",
            "dropped",
            {"tags": {"current": ["browse"], "historic": []}, "sentiment": {"tone": "angry"}},
        ),
        ("  DISCARD   all ", "all gone", {"tags": {"current": [], "historic": []}}),
    ],
)
async def test_s18_discard_stops_the_dialog_but_not_the_session(
    tmp_path: Path, start_gateway: Any, open_chat: Any, said: str, reply: str, context: dict[str, Any]
) -> None:
    flow = _context_flow()
    endpoint = webchat_endpoint(minutes=0, discard={"reply": "dropped", "all_reply": "all gone"})
    gateway = await start_gateway(make_settings(tmp_path, [endpoint]), flow=flow)
    chat = await open_chat(gateway, "d")
    await chat.say("start")
    await chat.wait_messages(1)
    await chat.say(said)
    assert await chat.wait_messages(2) == ["set", reply]
    [session] = await _sessions(gateway, chat.conversation)
    assert session.context == context  # as stored after the discard
    await chat.say("next")
    assert await chat.wait_messages(3) == ["set", reply, "next"]
    assert [t.event.text for t in flow.turns] == ["start", "next"]  # the gateway answered the discard
    await gateway.settle()
    [session] = await _sessions(gateway, chat.conversation)
    assert session.state == "open" and session.message_count == 3


async def test_s18_discard_words_are_configurable(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    endpoint = webchat_endpoint(minutes=0, discard={"words": ["cancel"], "all_words": ["start over"], "reply": None})
    gateway = await start_gateway(make_settings(tmp_path, [endpoint]))
    chat = await open_chat(gateway, "w")
    await chat.say("discard")  # no longer a command: echoed
    await chat.say("cancel")  # a command, with no confirmation configured
    await chat.say("after")
    assert await chat.wait_messages(2) == ["discard", "after"]


# -- the flow: end_session, errors -----------------------------------------------------------------


async def test_end_session_from_flow_closes_with_reason_flow_and_notice(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    flow = ScriptedFlow(answer=lambda t: FlowResult(replies=["goodbye"], end_session=t.event.text == "bye"))
    endpoint = webchat_endpoint(minutes=0, on_close={"messages": ["session ended"]})
    gateway = await start_gateway(make_settings(tmp_path, [endpoint]), flow=flow)
    chat = await open_chat(gateway, "f")
    await chat.say("bye")
    assert await chat.wait_messages(2) == ["goodbye", "session ended"]
    await gateway.settle()
    [session] = await _sessions(gateway, chat.conversation)
    assert (session.state, session.close_reason, session.notice) == ("closed", "flow", "sent")


@pytest.fixture
async def failing_flow() -> AsyncIterator[str]:
    async def flow(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, text="boom")

    app = web.Application()
    app.router.add_post("/flow", flow)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    yield str(server.make_url("/flow"))
    await server.close()


async def test_failing_http_flow_is_counted_answered_with_error_reply_and_session_lives(
    tmp_path: Path, start_gateway: Any, open_chat: Any, failing_flow: str
) -> None:
    settings = make_settings(
        tmp_path,
        [webchat_endpoint(minutes=0)],
        flow={"type": "http", "url": failing_flow, "timeout_seconds": 2, "error_reply": "Sorry, try again."},
    )
    gateway = await start_gateway(settings)
    chat = await open_chat(gateway, "err")
    await chat.say("hi")
    assert await chat.wait_messages(1) == ["Sorry, try again."]
    assert gateway.metrics.value("gateway_flow_errors_total", endpoint="web") == 1
    [session] = await _sessions(gateway, chat.conversation)
    assert session.state == "open" and session.message_count == 1
