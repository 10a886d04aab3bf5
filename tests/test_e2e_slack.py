"""Slack end to end, what only Slack does: real HTTP requests signed with slack-sdk's own signer
to the real app, the recording fake Slack Web API on 127.0.0.1, real SQLite, echo flow. Proves
threads (addressing and closure), the signature timestamp's window, url_verification, S16
housekeeping (bots, subtypes, our own user, learned by auth.test) and Slack's permanent errors.
The contract every platform keeps (signatures, bodies, redelivery, closure notices, send
retries) is in ``tests/test_webhook_contract.py``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway, make_settings
from tests.fakeplatform import Answer, FakePlatform, RecordedRequest
from tests.kits import Kit
from tests.kits.observe import assert_quiet, listed_sessions
from tests.kits.slack import (
    AUTH_TEST,
    BOT_TOKEN,
    BOT_USER,
    BYE,
    POST,
    SLACK,
    callback,
    encode,
    message,
    posted,
    signed_headers,
)

SHORT = 0.01  # minutes: 0.6 s of silence closes the session
THREAD = "1700000000.000100"


async def post(gateway: Gateway, payload: Any, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """POST to the webhook, signed now unless ``headers`` are given (then sent as they are)."""
    ack = await SLACK.post(gateway, encode(payload), headers=headers)
    return ack.status, ack.text


async def no_sessions(gateway: Gateway) -> bool:
    return await listed_sessions(gateway, "sl") == []


@pytest.fixture
def kit() -> Kit:
    return SLACK


# -- threads ------------------------------------------------------------------------------------


async def test_thread_reply_is_echoed_in_its_thread(gateway: Gateway, api: FakePlatform) -> None:
    assert (await post(gateway, callback(message("in thread", thread_ts=THREAD))))[0] == 200
    [sent] = await api.wait_for(1, POST)
    await gateway.settle()
    assert posted(sent) == {"channel": "C1", "text": "in thread", "thread_ts": THREAD}
    assert (await SLACK.session(gateway, f"C1:{THREAD}"))["message_count"] == 1
    assert await SLACK.contact(gateway, "C1") is None  # the thread is its own conversation


async def test_thread_parent_with_thread_ts_equal_to_ts_is_top_level(gateway: Gateway, api: FakePlatform) -> None:
    event = message("parent")
    event["thread_ts"] = event["ts"]
    assert (await post(gateway, callback(event)))[0] == 200
    [sent] = await api.wait_for(1, POST)
    await gateway.settle()
    assert "thread_ts" not in posted(sent)
    assert (await SLACK.session(gateway, "C1"))["message_count"] == 1


async def test_s7_s9_thread_closure_notice_goes_once_to_the_same_channel_and_thread(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(SLACK.settings(tmp_path, api, minutes=SHORT))
    assert (await post(gateway, callback(message("in thread", channel="C9", thread_ts=THREAD))))[0] == 200
    echo, notice = await api.wait_for(2, POST, timeout_s=5)
    await gateway.settle()
    assert posted(echo) == {"channel": "C9", "text": "in thread", "thread_ts": THREAD}
    SLACK.check_notice(notice, f"C9:{THREAD}", BYE)
    session = await SLACK.session(gateway, f"C9:{THREAD}")
    assert session["state"] == "closed"
    assert session["close_reason"] == "inactivity" and session["notice"] == "sent"
    await assert_quiet(api, within_s=SHORT * 60 + 0.2)  # exactly once: nothing after another period
    assert len(api.to(POST)) == 2


# -- the signature's timestamp, url_verification ------------------------------------------------


async def test_timestamp_299s_old_is_still_accepted(gateway: Gateway, api: FakePlatform) -> None:
    body = encode(callback(message("just in time")))
    headers = signed_headers(body, timestamp=str(int(time.time()) - 299))
    assert await post(gateway, body, headers=headers) == (200, "")
    await api.wait_for(1, POST)


async def test_url_verification_answers_the_challenge(gateway: Gateway, tmp_path: Path, api: FakePlatform) -> None:
    challenge = "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    payload = {"token": "legacy", "challenge": challenge, "type": "url_verification"}
    assert await post(gateway, payload) == (200, challenge)
    # Unsigned, the same handshake is refused: the request URL proves the secret too.
    assert (await post(gateway, payload, headers={}))[0] == 401
    await SLACK.assert_nothing_stored(gateway, api, tmp_path / "gateway.db", "C1")


# -- housekeeping (S16) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        message("from a bot", bot_id="B0OTHER", user="U1"),
        message("from a bot without user", bot_id="B0OTHER", user=None),
        message("bot message", subtype="bot_message", bot_id="B0OTHER"),
        {
            "type": "message",
            "subtype": "message_changed",
            "channel": "C1",
            "hidden": True,
            "ts": "1700000001.000200",
            "message": {"type": "message", "user": "U1", "text": "edited", "ts": "1700000000.000100"},
            "previous_message": {"type": "message", "user": "U1", "text": "orig", "ts": "1700000000.000100"},
        },
        message("gone", subtype="message_deleted"),
        message("joined", subtype="channel_join"),
        message("our own echo", user=BOT_USER),
        {"type": "reaction_added", "user": "U1", "reaction": "thumbsup", "event_ts": "1.2"},
    ],
    ids=[
        "bot_id",
        "bot_id-no-user",
        "bot_message",
        "message_changed",
        "message_deleted",
        "channel_join",
        "own-bot-user",
        "reaction_added",
    ],
)
async def test_s16_bot_messages_subtypes_and_our_own_user_are_200_without_session(
    gateway: Gateway, api: FakePlatform, event: dict[str, Any]
) -> None:
    assert (await post(gateway, callback(event)))[0] == 200
    await gateway.settle()
    assert await no_sessions(gateway)
    assert await SLACK.contact(gateway, "C1") is None
    assert api.to(POST) == []
    assert SLACK.events(gateway, "ignored") == 1


async def test_s16_own_bot_user_learned_by_one_auth_test_at_start_is_ignored(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    api.respond(AUTH_TEST, Answer(json_body={"ok": True, "user_id": BOT_USER, "bot_id": "B0BOT"}))
    gateway = await start_gateway(make_settings(tmp_path, [SLACK.without_bot_user_id(api.url)]))
    [auth] = api.to(AUTH_TEST)
    assert auth.headers["Authorization"] == f"Bearer {BOT_TOKEN}"
    assert (await post(gateway, callback(message("our own", user=BOT_USER))))[0] == 200
    await gateway.settle()
    assert await no_sessions(gateway)
    assert (await post(gateway, callback(message("a person", user="U1"))))[0] == 200
    [sent] = await api.wait_for(1, POST)
    assert posted(sent)["text"] == "a person"
    assert len(api.to(AUTH_TEST)) == 1


async def test_s16_file_share_opens_a_session_without_echo(gateway: Gateway, api: FakePlatform) -> None:
    event = message("", subtype="file_share", files=[{"id": "F1", "name": "a.png", "mimetype": "image/png"}])
    assert (await post(gateway, callback(event)))[0] == 200
    await gateway.settle()
    session = await SLACK.session(gateway, "C1")
    assert session["state"] == "open" and session["message_count"] == 1
    assert api.to(POST) == []


# -- Slack's permanent errors -------------------------------------------------------------------


async def test_permanent_error_on_the_closure_notice_is_recorded_as_failed_and_not_retried(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    def answer(request: RecordedRequest) -> Answer:
        if posted(request)["text"] == BYE:
            return Answer(json_body={"ok": False, "error": "not_in_channel"})
        return SLACK.sent()

    api.respond(POST, answer)
    gateway = await start_gateway(SLACK.settings(tmp_path, api, minutes=SHORT))
    assert (await post(gateway, callback(message("hi"))))[0] == 200
    await api.wait_for(2, POST, timeout_s=5)
    await gateway.settle()
    session = await SLACK.session(gateway, "C1")
    assert session["close_reason"] == "inactivity"
    assert session["notice"].startswith("failed:") and "not_in_channel" in session["notice"]
    await assert_quiet(api, within_s=SHORT * 60)  # no retry of the refused notice
    assert len(api.to(POST)) == 2
    assert SLACK.sent_texts(api, "C1") == ["hi"]  # the notice was refused, not delivered


# -- odd but signed payloads ------------------------------------------------------------------


@pytest.mark.parametrize("event_ts", ["99999999999999.000100", "nan"], ids=["year-out-of-range", "nan"])
async def test_signed_event_with_an_odd_event_ts_still_opens_a_session_and_reaches_the_http_flow(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, echo_flow_url: str, event_ts: str
) -> None:
    """S16 and "nothing acknowledged is lost": an accepted (200) user message must open a
    session and get its answer even when its platform timestamp cannot be shown as ISO 8601."""
    gateway = await start_gateway(SLACK.settings(tmp_path, api, flow={"type": "http", "url": echo_flow_url}))
    event = message("odd clock")
    event["event_ts"] = event_ts
    assert (await post(gateway, callback(event)))[0] == 200
    [sent] = await api.wait_for(1, POST, timeout_s=3)
    assert posted(sent)["text"] == "flow: odd clock"
    await gateway.settle()
    assert (await SLACK.session(gateway, "C1"))["message_count"] == 1
