"""Runtime session settings through the admin API (DESIGN.md "HTTP surface", "Contract
details"): applied to open sessions at once (S1-S4), validated with the file's rules and bounds
(S5), merged, reverted by DELETE, and winning over the file across restarts until deleted."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from gateway.wire import parse_iso
from tests.conftest import make_settings, webchat_endpoint

ENDPOINT_PATH = "/admin/endpoints/{}/session"
ORG_PATH = "/admin/organisation/session"


async def _put(gateway: Any, path: str, body: Any, status: int = 200) -> Any:
    response = await gateway.client.put(path, json=body, headers=gateway.admin_headers())
    assert response.status == status, await response.text()
    return await response.json()


async def _delete(gateway: Any, path: str, status: int = 200) -> Any:
    response = await gateway.client.delete(path, headers=gateway.admin_headers())
    assert response.status == status, await response.text()
    return await response.json()


async def _session(gateway: Any, contact_id: str) -> dict[str, Any]:
    body = await gateway.admin_get(f"/admin/contacts/{contact_id}")
    return dict(body["conversations"][0])  # newest first


def _span(session: dict[str, Any]) -> float:
    return parse_iso(session["expires_at"]) - parse_iso(session["last_activity_at"])


# -- applied at once to open sessions (S1 with runtime settings) --------------------------------


async def test_s1_put_shorter_expiration_closes_open_session_at_new_deadline(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    """A session opened under 30 minutes closes ~0.6 s after its last message once the
    endpoint is PUT to 0.01 minutes: the timer is re-armed earlier at once."""
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=30)]))
    chat = await open_chat(gateway, "short")
    await chat.say("hi")
    await chat.wait_messages(1, "reply")
    assert abs(_span(await _session(gateway, f"web:{chat.conversation}")) - 1800) < 0.01
    body = await _put(gateway, ENDPOINT_PATH.format("web"), {"expiration_minutes": 0.01})
    assert body["effective_expiration_minutes"] == 0.01
    assert gateway.manager.policy("web").expiration_minutes == 0.01
    await chat.wait_messages(1, "closure", timeout_s=3)
    session = await _session(gateway, f"web:{chat.conversation}")
    assert session["state"] == "closed" and session["close_reason"] == "inactivity"
    assert abs(_span(session) - 0.6) < 0.01
    assert 0 <= parse_iso(session["closed_at"]) - parse_iso(session["expires_at"]) < 0.1  # on time


async def test_s1_put_longer_expiration_delays_close_of_open_session(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    """A 1.2 s session PUT to 30 minutes is still open after its old deadline; an endpoint
    with the old value, opened later, is the clock that proves the old deadline passed."""
    settings = make_settings(tmp_path, [webchat_endpoint("web", minutes=0.02), webchat_endpoint("clock", minutes=0.02)])
    gateway = await start_gateway(settings)
    chat = await open_chat(gateway, "long")
    await chat.say("hi")
    await chat.wait_messages(1, "reply")
    await _put(gateway, ENDPOINT_PATH.format("web"), {"expiration_minutes": 30})
    clock = await open_chat(gateway, "tick", endpoint="clock")
    await clock.say("tick")
    await clock.wait_messages(1, "closure", timeout_s=5)  # 1.2 s after "tick": past web's old deadline
    session = await _session(gateway, f"web:{chat.conversation}")
    assert session["state"] == "open" and abs(_span(session) - 1800) < 0.01
    assert chat.messages("closure") == []


async def test_s3_put_zero_stops_the_timer_and_delete_reverts_to_the_file(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    """PUT 0 (never, S3) disarms an open session's timer; DELETE brings the file's 0.6 s back
    at once, and the session closes on that deadline."""
    settings = make_settings(tmp_path, [webchat_endpoint("web", minutes=0.01), webchat_endpoint("clock", minutes=0.01)])
    gateway = await start_gateway(settings)
    file_view = await gateway.admin_get(ENDPOINT_PATH.format("web"))
    chat = await open_chat(gateway, "z")
    await chat.say("hi")
    await chat.wait_messages(1, "reply")
    body = await _put(gateway, ENDPOINT_PATH.format("web"), {"expiration_minutes": 0})
    assert body["effective_expiration_minutes"] == 0 and body["override"] == {"expiration_minutes": 0}
    clock = await open_chat(gateway, "tick", endpoint="clock")
    await clock.say("tick")
    await clock.wait_messages(1, "closure")
    session = await _session(gateway, f"web:{chat.conversation}")
    assert session["state"] == "open" and session["expires_at"] is None
    reverted = await _delete(gateway, ENDPOINT_PATH.format("web"))
    assert reverted == file_view and reverted["override"] is None
    await chat.wait_messages(1, "closure", timeout_s=3)  # the file's deadline has passed: closes now
    session = await _session(gateway, f"web:{chat.conversation}")
    assert session["close_reason"] == "inactivity" and abs(_span(session) - 0.6) < 0.01
    assert await gateway.store.get_overrides() == {}
    again = await _delete(gateway, ENDPOINT_PATH.format("web"))  # nothing to drop: fine
    assert again == file_view


# -- merge, validation, shapes --------------------------------------------------------------------


async def test_s2_get_shapes_and_the_default_of_30(tmp_path: Path, start_gateway: Any) -> None:
    endpoint = webchat_endpoint("web", minutes=30, on_close={"messages": ["bye"], "messages_by_channel": {}})
    settings = make_settings(
        tmp_path,
        [endpoint, {"name": "plain", "channel": "webchat"}],
        organisation={"session": {"min_minutes": 0, "max_minutes": 20160}},
    )
    gateway = await start_gateway(settings)
    body = await gateway.admin_get(ENDPOINT_PATH.format("web"))
    assert body == {
        "configured": {
            "expiration_minutes": 30.0,
            "mode": "proactive",
            "on_close": {
                "notify": True,
                "messages": ["bye"],
                "messages_by_channel": {},
                "clear_auth_profiles": False,
                "script": None,
                "script_timeout_seconds": 5.0,
            },
            "discard": {
                "words": ["discard"],
                "all_words": ["discard all"],
                "reply": "Okay, let's drop that. What else can I do for you?",
                "all_reply": "Okay, everything is cleared. What can I do for you?",
            },
        },
        "effective_expiration_minutes": 30.0,
        "override": None,
    }
    plain = await gateway.admin_get(ENDPOINT_PATH.format("plain"))
    assert plain["configured"]["expiration_minutes"] is None  # inherit
    assert plain["effective_expiration_minutes"] == 30.0  # S2: no organisation value, so 30
    org = await gateway.admin_get(ORG_PATH)
    assert org == {
        "configured": {"expiration_minutes": None, "min_minutes": 0.0, "max_minutes": 20160.0},
        "override": None,
        "endpoints": {"web": {"effective_expiration_minutes": 30.0}, "plain": {"effective_expiration_minutes": 30.0}},
    }
    # The configured JSON is itself a valid PUT body, and changes nothing.
    again = await _put(gateway, ENDPOINT_PATH.format("web"), body["configured"])
    assert again["configured"] == body["configured"] and again["override"] == body["configured"]


async def test_unknown_endpoint_is_404_and_admin_auth_applies(tmp_path: Path, start_gateway: Any) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint()]))
    headers = gateway.admin_headers()
    path = ENDPOINT_PATH.format("nope")
    assert (await gateway.client.get(path, headers=headers)).status == 404
    assert (await gateway.client.put(path, json={"mode": "lazy"}, headers=headers)).status == 404
    assert (await gateway.client.delete(path, headers=headers)).status == 404
    assert (await gateway.client.get(ENDPOINT_PATH.format("web"))).status == 401
    assert (await gateway.client.put(ORG_PATH, json={}, headers={"Authorization": "Bearer x"})).status == 401
    assert await gateway.store.get_overrides() == {}


async def test_put_merges_with_earlier_puts(tmp_path: Path, start_gateway: Any) -> None:
    endpoint = webchat_endpoint("web", minutes=30, on_close={"messages": ["file bye"], "clear_auth_profiles": True})
    gateway = await start_gateway(make_settings(tmp_path, [endpoint]))
    path = ENDPOINT_PATH.format("web")
    await _put(gateway, path, {"mode": "LAZY"})
    await _put(gateway, path, {"on_close": {"notify": False}})
    await _put(gateway, path, {"on_close": {"messages": ["runtime bye"]}, "discard": {"reply": None}})
    body = await _put(gateway, path, {"expiration_minutes": "12.5"})
    # Normalised ("LAZY" -> "lazy", "12.5" -> 12.5), and only the keys that were set.
    assert body["override"] == {
        "mode": "lazy",
        "on_close": {"notify": False, "messages": ["runtime bye"]},
        "discard": {"reply": None},
        "expiration_minutes": 12.5,
    }
    configured = body["configured"]
    assert configured["mode"] == "lazy" and configured["expiration_minutes"] == 12.5
    assert configured["on_close"]["notify"] is False and configured["on_close"]["messages"] == ["runtime bye"]
    assert configured["on_close"]["clear_auth_profiles"] is True  # from the file, untouched
    assert configured["discard"]["reply"] is None and configured["discard"]["words"] == ["discard"]
    policy = gateway.manager.policy("web")
    assert policy.mode.value == "lazy" and policy.expiration_minutes == 12.5
    assert policy.on_close.notify is False and policy.on_close.messages == ("runtime bye",)
    assert await gateway.store.get_overrides() == {"endpoint:web": body["override"]}
    assert await gateway.admin_get(path) == body
    # expiration_minutes null: inherit again (the organisation value, else 30: S2).
    inherit = await _put(gateway, path, {"expiration_minutes": None})
    assert inherit["configured"]["expiration_minutes"] is None and inherit["effective_expiration_minutes"] == 30


async def test_concurrent_puts_of_different_keys_both_hold(tmp_path: Path, start_gateway: Any) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=30)]))
    path = ENDPOINT_PATH.format("web")
    bodies = [
        {"mode": "lazy"},
        {"expiration_minutes": 7},
        {"on_close": {"notify": False}},
        {"discard": {"reply": "ok"}},
    ]
    await asyncio.gather(*(_put(gateway, path, body) for body in bodies))
    view = await gateway.admin_get(path)
    assert view["override"] == {
        "mode": "lazy",
        "expiration_minutes": 7.0,
        "on_close": {"notify": False},
        "discard": {"reply": "ok"},
    }
    policy = gateway.manager.policy("web")
    assert policy.expiration_minutes == 7 and policy.mode.value == "lazy" and policy.on_close.notify is False
    # An empty PUT changes nothing; on an endpoint without an override it stores none.
    assert await _put(gateway, path, {}) == view
    assert (await _put(gateway, ORG_PATH, {}))["override"] is None
    assert await gateway.store.get_overrides() == {"endpoint:web": view["override"]}


async def test_s5_invalid_puts_are_refused_with_key_and_reason_and_change_nothing(
    tmp_path: Path, start_gateway: Any
) -> None:
    settings = make_settings(
        tmp_path, [webchat_endpoint(minutes=30)], organisation={"session": {"min_minutes": 1, "max_minutes": 60}}
    )
    gateway = await start_gateway(settings)
    path = ENDPOINT_PATH.format("web")
    before = await gateway.admin_get(path)
    cases: list[tuple[Any, list[str]]] = [
        (
            {"expiration_minutes": 0.5},
            ["session.expiration_minutes: 0.5 is below organisation.session.min_minutes (1)"],
        ),
        ({"expiration_minutes": 61}, ["session.expiration_minutes: 61 is above organisation.session.max_minutes (60)"]),
        ({"expiration_minutes": -1}, ["session.expiration_minutes: -1 must be >= 0"]),
        ({"expiration_minutes": "soon"}, ["session.expiration_minutes: 'soon' is not a number"]),
        ({"mode": "sometimes"}, ["session.mode: 'sometimes' is not one of proactive, lazy"]),
        ({"on_close": {"messages": []}}, ["session.on_close.messages: must not be empty when notify is true"]),
        ({"on_close": 5}, ["session.on_close: must be a mapping, not a number"]),
        ({"expiration_minute": 5}, ["session.expiration_minute: unknown key (did you mean 'expiration_minutes'?)"]),
        (
            {"expiration_minutes": 0.5, "mode": "x"},
            [
                "session.expiration_minutes: 0.5 is below organisation.session.min_minutes (1)",
                "session.mode: 'x' is not one of proactive, lazy",
            ],
        ),
    ]
    for body, problems in cases:
        response = await gateway.client.put(path, json=body, headers=gateway.admin_headers())
        assert response.status == 400, body
        assert await response.json() == {"error": "; ".join(problems), "problems": problems}
    for raw in ("not json", "[1, 2]"):
        response = await gateway.client.put(path, data=raw, headers=gateway.admin_headers())
        assert response.status == 400 and "error" in await response.json()
    # An invalid PUT after a valid one leaves the valid one in place.
    await _put(gateway, path, {"mode": "lazy"})
    response = await gateway.client.put(path, json={"expiration_minutes": 100}, headers=gateway.admin_headers())
    assert response.status == 400
    after = await gateway.admin_get(path)
    assert after["override"] == {"mode": "lazy"}
    assert after["configured"] == {**before["configured"], "mode": "lazy"}
    assert await gateway.store.get_overrides() == {"endpoint:web": {"mode": "lazy"}}
    assert gateway.manager.policy("web").expiration_minutes == 30
    # 0 (never) is always within the bounds (S3, S5).
    assert (await _put(gateway, path, {"expiration_minutes": 0}))["effective_expiration_minutes"] == 0


async def test_s12_close_script_set_at_run_time_must_be_loaded(tmp_path: Path, start_gateway: Any) -> None:
    """module:function close scripts are imported at start from the file, so a runtime value
    must be one of those (or a URL, or null)."""
    endpoints = [webchat_endpoint("web", 30), webchat_endpoint("other", 30, on_close={"script": "json:dumps"})]
    gateway = await start_gateway(make_settings(tmp_path, endpoints))
    path = ENDPOINT_PATH.format("web")
    response = await gateway.client.put(
        path, json={"on_close": {"script": "json:loads"}}, headers=gateway.admin_headers()
    )
    assert response.status == 400
    assert (await response.json())["error"].startswith("session.on_close.script: 'json:loads' is not loaded")
    assert (await _put(gateway, path, {"on_close": {"script": "json:dumps"}}))["configured"]["on_close"]["script"] == (
        "json:dumps"
    )
    url = "http://127.0.0.1:9/close"
    assert (await _put(gateway, path, {"on_close": {"script": url}}))["override"] == {"on_close": {"script": url}}
    assert gateway.manager.policy("web").on_close.script == url
    assert (await _put(gateway, path, {"on_close": {"script": None}}))["configured"]["on_close"]["script"] is None


# -- organisation (S2, S4, S5) --------------------------------------------------------------------


async def test_s4_organisation_put_caps_endpoints_and_open_sessions(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    """The organisation value set at run time is the default (S2) and a cap (S4) for every
    endpoint, 0 (unlimited) included, and applies to open sessions at once."""
    endpoints = [
        webchat_endpoint("long", minutes=30),
        webchat_endpoint("never", minutes=0),
        {"name": "inherit", "channel": "webchat"},
        webchat_endpoint("short", minutes=0.005),
    ]
    gateway = await start_gateway(make_settings(tmp_path, endpoints))
    chat = await open_chat(gateway, "c", endpoint="long")
    await chat.say("hi")
    await chat.wait_messages(1, "reply")
    body = await _put(gateway, ORG_PATH, {"expiration_minutes": 0.01})
    assert body["override"] == {"expiration_minutes": 0.01}
    assert body["configured"] == {"expiration_minutes": 0.01, "min_minutes": 0.0, "max_minutes": 20160.0}
    effective = {name: v["effective_expiration_minutes"] for name, v in body["endpoints"].items()}
    assert effective == {"long": 0.01, "never": 0.01, "inherit": 0.01, "short": 0.005}
    await chat.wait_messages(1, "closure", timeout_s=3)
    session = await _session(gateway, f"long:{chat.conversation}")
    assert session["close_reason"] == "inactivity" and abs(_span(session) - 0.6) < 0.01
    long_view = await gateway.admin_get(ENDPOINT_PATH.format("long"))
    assert long_view["configured"]["expiration_minutes"] == 30 and long_view["effective_expiration_minutes"] == 0.01
    # No organisation value at run time: endpoints are back to their own values.
    cleared = await _put(gateway, ORG_PATH, {"expiration_minutes": None})
    effective = {name: v["effective_expiration_minutes"] for name, v in cleared["endpoints"].items()}
    assert effective == {"long": 30, "never": 0, "inherit": 30, "short": 0.005}
    assert gateway.manager.policy("never").expiration_s is None


async def test_s5_organisation_bounds_set_at_run_time_apply_to_puts(tmp_path: Path, start_gateway: Any) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint("web", minutes=0.01)]))
    path = ENDPOINT_PATH.format("web")
    # New bounds that exclude an endpoint's value are refused, naming the endpoint.
    response = await gateway.client.put(ORG_PATH, json={"min_minutes": 5}, headers=gateway.admin_headers())
    assert response.status == 400
    assert (await response.json())["problems"] == [
        "endpoints.web.session.expiration_minutes: 0.01 is below organisation.session.min_minutes (5)"
    ]
    assert await gateway.store.get_overrides() == {}
    # Invalid organisation values themselves.
    for body, problem in [
        ({"min_minutes": 100, "max_minutes": 50}, "session.min_minutes: 100 is above max_minutes (50)"),
        ({"max_minutes": 0}, "session.max_minutes: 0 must be > 0"),
        ({"expiration_minutes": 30000}, "session.expiration_minutes: 30000 is above organisation.session.max_minutes"),
        ({"cap": 1}, "session.cap: unknown key"),
    ]:
        response = await gateway.client.put(ORG_PATH, json=body, headers=gateway.admin_headers())
        assert response.status == 400, body
        assert (await response.json())["error"].startswith(problem), body
    assert await gateway.store.get_overrides() == {}
    # Move the endpoint into the new bounds first, then the bounds can follow.
    await _put(gateway, path, {"expiration_minutes": 10})
    org = await _put(gateway, ORG_PATH, {"min_minutes": 5})
    await _put(gateway, ORG_PATH, {"max_minutes": 60})  # merges: min_minutes stays 5
    org = await gateway.admin_get(ORG_PATH)
    assert org["override"] == {"min_minutes": 5.0, "max_minutes": 60.0}
    for value, problem in [
        (1, "session.expiration_minutes: 1 is below organisation.session.min_minutes (5)"),
        (61, "session.expiration_minutes: 61 is above organisation.session.max_minutes (60)"),
    ]:
        response = await gateway.client.put(path, json={"expiration_minutes": value}, headers=gateway.admin_headers())
        assert response.status == 400 and (await response.json())["error"] == problem
    # Dropping the endpoint override would bring back the file's 0.01, below the bounds now.
    response = await gateway.client.delete(path, headers=gateway.admin_headers())
    assert response.status == 400
    assert (
        "session.expiration_minutes: 0.01 is below organisation.session.min_minutes (5)"
        in (await response.json())["error"]
    )
    # Dropping the organisation override (back to the file's bounds) then allows it.
    org = await _delete(gateway, ORG_PATH)
    assert org["override"] is None and org["configured"]["min_minutes"] == 0
    assert (await _delete(gateway, path))["effective_expiration_minutes"] == 0.01
    assert await gateway.store.get_overrides() == {}


# -- across restarts ------------------------------------------------------------------------------


async def test_override_survives_restart_and_wins_over_the_file(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    """The runtime override is stored: after a restart on the same database it applies over
    the file, to new sessions and to the restored open ones, until DELETE."""
    endpoints = [webchat_endpoint("web", minutes=30), webchat_endpoint("keep", minutes=0.01)]
    first = await start_gateway(make_settings(tmp_path, endpoints))
    await _put(first, ENDPOINT_PATH.format("web"), {"expiration_minutes": 0.01, "on_close": {"messages": ["rt bye"]}})
    await _put(first, ENDPOINT_PATH.format("keep"), {"expiration_minutes": 0})
    chat = await open_chat(first, "k", endpoint="keep")
    await chat.say("hi")
    await chat.wait_messages(1, "reply")
    await chat.close()
    keep_conversation = chat.conversation
    await first.client.close()

    second = await start_gateway(make_settings(tmp_path, endpoints))
    view = await second.admin_get(ENDPOINT_PATH.format("web"))
    assert view["override"] == {"expiration_minutes": 0.01, "on_close": {"messages": ["rt bye"]}}
    assert view["effective_expiration_minutes"] == 0.01
    assert second.manager.policy("keep").expiration_s is None
    chat = await open_chat(second, "w", endpoint="web")
    await chat.say("hi")
    assert await chat.wait_messages(1, "closure", timeout_s=3) == ["rt bye"]
    # "keep" restored under its override (never): the file's 0.6 s passed long ago.
    kept = await _session(second, f"keep:{keep_conversation}")
    assert kept["state"] == "open" and kept["expires_at"] is None
    await _delete(second, ENDPOINT_PATH.format("web"))
    await second.client.close()

    third = await start_gateway(make_settings(tmp_path, endpoints))
    assert (await third.admin_get(ENDPOINT_PATH.format("web")))["override"] is None
    assert third.manager.policy("web").expiration_minutes == 30
    assert await third.store.get_overrides() == {"endpoint:keep": {"expiration_minutes": 0.0}}


async def test_stale_overrides_are_ignored_at_start_with_a_warning(
    tmp_path: Path, start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An override for an endpoint gone from the file, or one the file's new bounds refuse, is
    ignored (and kept) at start, with a warning; a PUT then replaces the refused one."""
    first = await start_gateway(make_settings(tmp_path, [webchat_endpoint("web", 30), webchat_endpoint("gone", 30)]))
    await _put(first, ENDPOINT_PATH.format("web"), {"expiration_minutes": 0.01})
    await _put(first, ENDPOINT_PATH.format("gone"), {"mode": "lazy"})
    await first.client.close()

    caplog.set_level(logging.WARNING, logger="gateway.runtime_settings")
    settings = make_settings(
        tmp_path, [webchat_endpoint("web", 30)], organisation={"session": {"min_minutes": 1, "max_minutes": 20160}}
    )
    second = await start_gateway(settings)
    warnings = [r.getMessage() for r in caplog.records if r.name == "gateway.runtime_settings"]
    assert any("endpoint gone:" in w and "no such endpoint" in w for w in warnings), warnings
    assert any("endpoint web:" in w and "below organisation.session.min_minutes (1)" in w for w in warnings), warnings
    assert second.manager.policy("web").expiration_minutes == 30  # the file's value applies
    view = await second.admin_get(ENDPOINT_PATH.format("web"))
    assert view["override"] is None and view["effective_expiration_minutes"] == 30
    assert view["ignored_override"]["value"] == {"expiration_minutes": 0.01}
    assert "below organisation.session.min_minutes (1)" in view["ignored_override"]["reason"]
    fixed = await _put(second, ENDPOINT_PATH.format("web"), {"mode": "lazy"})  # not merged into the ignored one
    assert fixed["override"] == {"mode": "lazy"} and "ignored_override" not in fixed
    assert (await second.store.get_overrides())["endpoint:gone"] == {"mode": "lazy"}  # kept, in case it returns
