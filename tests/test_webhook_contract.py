"""The webhook contract, written once and run against every webhook platform (Messenger, LINE,
Slack, Twilio) through its kit (``tests/kits``): real signed HTTP requests to the real app, the
recording fake platform API on 127.0.0.1, real SQLite, the echo flow.

Every platform: answers a text in its conversation and opens one session; refuses a bad
signature (401), an oversized body (413) and a malformed one (400) without storing anything;
answers a redelivered event once (also after a restart on the same database); sends one
closure notice on time after the inactivity timeout (none when ``notify: false``); retries a
5xx or a 429 (after its Retry-After) and delivers once; keeps the order of a conversation's
replies; splits a long text within the platform's limit.

What only one platform does stays in its ``tests/test_e2e_<platform>.py``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway
from tests.fakeplatform import FakePlatform
from tests.kits import KITS, Kit
from tests.kits.base import TAMPER_FROM, post_raw
from tests.kits.observe import assert_quiet, iso_seconds

SHORT = 0.01  # minutes: 0.6 s of silence closes a session
# Every character a platform might escape or mangle: JSON, XML, form encoding, Slack markup.
NASTY = "héllo & <b>wörld</b> 1+1=2 %20 ✓ <@U2> &lt;b&gt;"


@pytest.fixture(params=KITS, ids=str)
def kit(request: pytest.FixtureRequest) -> Kit:
    platform_kit: Kit = request.param
    return platform_kit


def each_kit_with(cases: str) -> list[Any]:
    """``(kit, case)`` parameters for every case a kit names in its attribute ``cases``."""
    return [pytest.param(kit, case, id=f"{kit}-{case}") for kit in KITS for case in getattr(kit, cases)]


# -- text in, echo out ------------------------------------------------------------------------------------


async def test_text_is_answered_in_its_conversation_and_opens_one_session(
    gateway: Gateway, kit: Kit, api: FakePlatform
) -> None:
    conversation = kit.conversations[0]
    inbound = kit.text(NASTY, conversation=conversation)
    assert await kit.post(gateway, inbound) == kit.ack
    [reply] = await api.wait_for(1, kit.reply_path)
    kit.check_reply(reply, inbound, NASTY)
    await gateway.settle()
    assert api.requests == [reply]  # nothing else: no LINE push, no Slack auth.test
    session = await kit.session(gateway, conversation)
    assert (session["channel"], session["conversation"]) == (kit.platform, conversation)
    assert session["contact_id"] == kit.contact_id(conversation)
    assert session["state"] == "open" and session["message_count"] == 1 and session["interactive"] is True


# -- refused requests: nothing stored, never a 5xx ----------------------------------------------------------


@pytest.mark.parametrize(("kit", "case"), each_kit_with("forged_cases"))
async def test_bad_signature_is_401_and_leaves_no_trace(
    gateway: Gateway, tmp_path: Path, kit: Kit, api: FakePlatform, case: str
) -> None:
    conversation = kit.conversations[0]
    inbound = kit.text(f"let me in {TAMPER_FROM}", conversation=conversation)
    body, headers = kit.forge(case, inbound, kit.webhook_url(gateway))
    assert (await kit.post(gateway, body, headers=headers)).status == 401
    await gateway.settle()
    assert kit.rejected(gateway, 401) == 1
    await kit.assert_nothing_stored(gateway, api, tmp_path / "gateway.db", conversation)
    # The same event, properly signed afterwards, is new: the refusal left no dedup id behind.
    await kit.say(gateway, inbound)
    await api.wait_for(1, kit.reply_path)
    await gateway.settle()
    assert kit.sent_texts(api, conversation) == [f"let me in {TAMPER_FROM}"]


async def test_signature_is_checked_before_the_body_is_parsed(
    gateway: Gateway, tmp_path: Path, kit: Kit, api: FakePlatform
) -> None:
    """Garbage that is not signed (or signed with another secret) is a 401, not a 400: the body
    is not even read before the signature holds."""
    garbage = b"{not json"
    assert (await kit.post(gateway, garbage, headers={})).status == 401
    other_secret = kit.sign(garbage, kit.webhook_url(gateway), secret="not-the-endpoint-secret")
    assert (await kit.post(gateway, garbage, headers=other_secret)).status == 401
    assert kit.rejected(gateway, 401) == 2
    assert kit.rejected(gateway, 400) == 0
    await kit.assert_nothing_stored(gateway, api, tmp_path / "gateway.db")


@pytest.mark.parametrize("non_ascii", [b"\xc3\xa9" * 4, b"\xff\xfe" * 4], ids=["utf8-e-acute", "not-utf8"])
async def test_non_ascii_signature_header_is_401_not_500(
    gateway: Gateway, tmp_path: Path, kit: Kit, api: FakePlatform, non_ascii: bytes
) -> None:
    """Bad input never becomes a 5xx: a signature header with non-ASCII bytes (sent on a raw
    socket, as any client on the internet can) is refused like any wrong signature."""
    inbound = kit.text("hello")
    signed = kit.sign(inbound.body, kit.webhook_url(gateway))
    signature = signed.pop(kit.signature_header).encode()
    headers = [f"{name}: {value}".encode() for name, value in signed.items()]
    headers.append(kit.signature_header.encode() + b": " + signature[:-8] + non_ascii)
    server = gateway.client.server
    host, port = str(server.host), int(server.port or 0)
    status_line = await post_raw(host, port, kit.webhook_path, headers, inbound.body, kit.content_type)
    assert status_line.split()[1] == b"401", status_line
    await kit.assert_nothing_stored(gateway, api, tmp_path / "gateway.db", inbound.conversation)


@pytest.mark.parametrize(("kit", "case"), each_kit_with("malformed_bodies"))
async def test_signed_malformed_body_is_400_and_stores_nothing(
    gateway: Gateway, tmp_path: Path, kit: Kit, api: FakePlatform, case: str
) -> None:
    assert (await kit.post(gateway, kit.malformed_bodies[case])).status == 400
    await gateway.settle()
    assert kit.rejected(gateway, 400) == 1
    await kit.assert_nothing_stored(gateway, api, tmp_path / "gateway.db")


@pytest.mark.parametrize("signature", ["unsigned", "forged", "signed"])
async def test_oversized_body_is_413_whatever_its_signature(
    tmp_path: Path, start_gateway: Any, kit: Kit, api: FakePlatform, signature: str
) -> None:
    gateway = await start_gateway(kit.settings(tmp_path, api, server={"max_body_bytes": 2048}))
    conversation = kit.conversations[0]
    big = kit.text("x" * 4000, conversation=conversation)
    assert len(big.body) > 2048
    url = kit.webhook_url(gateway)
    headers = {"unsigned": {}, "forged": kit.forge("garbage", big, url)[1], "signed": kit.sign(big.body, url)}
    assert (await kit.post(gateway, big, headers=headers[signature])).status == 413
    await kit.assert_nothing_stored(gateway, api, tmp_path / "gateway.db", conversation)
    # Just under the configured limit (and over 1 KiB) is still served: the limit is the configured one.
    small = kit.text("y" * 1500, conversation=conversation)
    assert 1024 < len(small.body) < 2048
    await kit.say(gateway, small)
    await api.wait_for(1, kit.reply_path)
    await gateway.settle()
    assert kit.sent_texts(api, conversation) == ["y" * 1500]
    assert (await kit.session(gateway, conversation))["message_count"] == 1


async def test_get_on_the_webhook_without_a_handshake_is_refused_and_stores_nothing(
    gateway: Gateway, tmp_path: Path, kit: Kit, api: FakePlatform
) -> None:
    """No platform's GET carries events; without Messenger's handshake parameters it is a 4xx."""
    response = await gateway.client.get(kit.webhook_path)
    assert response.status == kit.bare_get_status
    await kit.assert_nothing_stored(gateway, api, tmp_path / "gateway.db")


# -- redelivery ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("together", [False, True], ids=["after", "concurrent"])
async def test_redelivery_of_the_same_event_gets_one_reply(
    gateway: Gateway, kit: Kit, api: FakePlatform, together: bool
) -> None:
    """The platform resends an event it thinks was lost: as it was (the same bytes) or in its
    redelivery form (a new envelope, a retry header); also while the first is in flight."""
    conversation = kit.conversations[0]
    first = kit.text("once", conversation=conversation)
    again = kit.redelivery(first)
    if together:
        acks = await asyncio.gather(*(kit.post(gateway, r) for r in (first, again, first, again, first)))
        assert list(acks) == [kit.ack] * 5
    else:
        await kit.say(gateway, first)
        await api.wait_for(1, kit.reply_path)
        await kit.say(gateway, first)
        await kit.say(gateway, again)
    await gateway.settle()
    assert len(kit.sends(api)) == 1
    assert kit.sent_texts(api, conversation) == ["once"]
    assert kit.events(gateway, "duplicate") == (4 if together else 2)
    assert kit.events(gateway, "accepted") == 1
    assert (await kit.session(gateway, conversation))["message_count"] == 1


async def test_redelivery_after_a_restart_on_the_same_database_gets_no_second_reply(
    tmp_path: Path, start_gateway: Any, kit: Kit, api: FakePlatform
) -> None:
    settings = kit.settings(tmp_path, api)
    conversation = kit.conversations[0]
    first = kit.text("before restart", conversation=conversation)
    gateway = await start_gateway(settings)
    await kit.say(gateway, first)
    await api.wait_for(1, kit.reply_path)
    await gateway.settle()
    await gateway.client.close()

    restarted = await start_gateway(settings)
    await kit.say(restarted, kit.redelivery(first))  # signed anew (Twilio: over the new server's URL)
    await restarted.settle()
    assert len(kit.sends(api)) == 1
    assert kit.events(restarted, "duplicate") == 1
    session = await kit.session(restarted, conversation)
    assert session["state"] == "open" and session["message_count"] == 1
    # The restored session carries on with the next new message.
    await kit.say(restarted, kit.text("after restart", conversation=conversation))
    await api.wait_for(2, kit.reply_path)
    await restarted.settle()
    assert kit.sent_texts(api, conversation) == ["before restart", "after restart"]
    after = await kit.session(restarted, conversation)
    assert after["id"] == session["id"] and after["state"] == "open" and after["message_count"] == 2


# -- closure on inactivity (S7, S9) ----------------------------------------------------------------------


async def test_closure_notice_goes_once_to_each_conversation_on_time(
    tmp_path: Path, start_gateway: Any, kit: Kit, api: FakePlatform
) -> None:
    gateway = await start_gateway(kit.settings(tmp_path, api, minutes=SHORT))
    one, other = kit.conversations
    first = kit.text("hello", conversation=one)
    second = kit.text("other conversation", conversation=other)
    await kit.say(gateway, first)
    await kit.say(gateway, second)
    await api.wait_for(4)  # two replies, two notices
    for inbound, said in ((first, "hello"), (second, "other conversation")):
        conversation = inbound.conversation
        session = await kit.wait_closed(gateway, conversation)
        assert session["close_reason"] == "inactivity" and session["notice"] == "sent"
        # On time: committed within 100 ms of the deadline.
        assert 0 <= iso_seconds(session["closed_at"]) - iso_seconds(session["expires_at"]) < 0.1
        reply, notice = [r for r in kit.sends(api) if kit.texts_of(r)[0][0] == conversation]
        kit.check_reply(reply, inbound, said)
        kit.check_notice(notice, conversation, kit.bye)  # Messenger: an UPDATE, LINE: a push
        assert kit.sent_texts(api, conversation) == [said, kit.bye]
    # A late redelivery of the closed session's event reopens nothing and answers nothing.
    assert await kit.post(gateway, kit.redelivery(first)) == kit.ack
    await gateway.settle()
    # Exactly once: nothing more within another expiration period.
    await assert_quiet(api, within_s=SHORT * 60 + 0.2)
    assert len(api.requests) == 4
    found = await kit.contact(gateway, one)
    assert found is not None and len(found["conversations"]) == 1


async def test_on_close_notify_false_closes_silently(
    tmp_path: Path, start_gateway: Any, kit: Kit, api: FakePlatform
) -> None:
    gateway = await start_gateway(kit.settings(tmp_path, api, minutes=SHORT, notify=False))
    conversation = kit.conversations[0]
    await kit.say(gateway, kit.text("hello", conversation=conversation))
    await api.wait_for(1, kit.reply_path)
    session = await kit.wait_closed(gateway, conversation)
    assert session["close_reason"] == "inactivity" and session["notice"] == "none"
    await gateway.settle()
    assert kit.sent_texts(api) == ["hello"]
    assert len(api.requests) == 1


async def test_next_message_after_the_close_opens_a_new_session(
    tmp_path: Path, start_gateway: Any, kit: Kit, api: FakePlatform
) -> None:
    """S6: a closed session stays closed; the user's next message starts a new one."""
    gateway = await start_gateway(kit.settings(tmp_path, api, minutes=SHORT))
    conversation = kit.conversations[0]
    await kit.say(gateway, kit.text("first", conversation=conversation))
    first = await kit.wait_closed(gateway, conversation)
    await kit.say(gateway, kit.text("again", conversation=conversation))
    await api.wait_for(3)
    await gateway.settle()
    assert kit.sent_texts(api, conversation) == ["first", kit.bye, "again"]
    newest, oldest = await kit.sessions(gateway, conversation)
    assert oldest["id"] == first["id"] and oldest["state"] == "closed"
    assert newest["id"] != first["id"] and newest["state"] == "open" and newest["message_count"] == 1


# -- platform faults on send -------------------------------------------------------------------------------


async def test_platform_5xx_on_send_is_retried_and_the_reply_delivered_once(
    gateway: Gateway, kit: Kit, api: FakePlatform
) -> None:
    conversation = kit.conversations[0]
    api.fail_next(kit.reply_path, kit.server_error())
    inbound = kit.text("retry me", conversation=conversation)
    await kit.say(gateway, inbound)
    first, retry = await api.wait_for(2, kit.reply_path)
    await gateway.settle()
    assert retry.body == first.body  # the same request again (LINE: the same reply token)
    kit.check_reply(retry, inbound, "retry me")
    assert len(api.requests) == 2  # one failure, one delivery, nothing else (no LINE push)
    assert kit.sent_texts(api, conversation) == ["retry me"]
    assert kit.messages_out(gateway, "retry") == 1
    assert kit.messages_out(gateway, "sent") == 1


async def test_429_with_retry_after_is_delivered_once_after_the_wait(
    gateway: Gateway, kit: Kit, api: FakePlatform
) -> None:
    conversation = kit.conversations[0]
    api.fail_next(kit.reply_path, kit.rate_limited(1))
    inbound = kit.text("patience", conversation=conversation)
    await kit.say(gateway, inbound)
    first, retry = await api.wait_for(2, kit.reply_path, timeout_s=6)
    await gateway.settle()
    assert retry.received_at - first.received_at >= 0.95  # waited for Retry-After, not the 0.5 s backoff
    assert retry.body == first.body
    kit.check_reply(retry, inbound, "patience")
    assert len(api.requests) == 2  # one refused, one delivered: no further copy
    assert kit.sent_texts(api, conversation) == ["patience"]
    assert kit.messages_out(gateway, "sent") == 1


async def test_replies_keep_each_conversations_order_while_the_platform_is_slow(
    gateway: Gateway, kit: Kit, api: FakePlatform
) -> None:
    api.respond(kit.reply_path, kit.slow(0.01))
    one, other = kit.conversations
    for n in range(6):
        await kit.say(gateway, kit.text(f"a{n}", conversation=one))
        await kit.say(gateway, kit.text(f"b{n}", conversation=other))
    await api.wait_for(12, kit.reply_path)
    await gateway.settle()
    assert kit.sent_texts(api, one) == [f"a{n}" for n in range(6)]
    assert kit.sent_texts(api, other) == [f"b{n}" for n in range(6)]
    for conversation in (one, other):
        assert (await kit.session(gateway, conversation))["message_count"] == 6


async def test_long_text_is_sent_in_parts_within_the_platform_limit_in_order(
    gateway: Gateway, kit: Kit, api: FakePlatform
) -> None:
    conversation = kit.conversations[0]
    words = [f"w{n:04d}" for n in range(2 * kit.text_limit // 6 + 100)]  # over two limits long
    text = " ".join(words)
    await kit.say(gateway, kit.text(text, conversation=conversation))
    await api.wait_for(1, kit.reply_path)
    await gateway.settle()
    parts = kit.sent_texts(api, conversation)
    assert len(parts) == 3
    assert all(len(part) <= kit.text_limit for part in parts)
    assert "".join(parts) == text  # in order, cut at spaces, nothing lost
