"""Close scripts used by tests/test_rules.py (S12), importable as ``tests.close_script_fixture:NAME``."""

from __future__ import annotations

import asyncio

from gateway.close_scripts import CloseScriptContext

CALLS: list[dict[str, object]] = []  # what the scripts saw, for the test to assert on


def clear_crm(context: CloseScriptContext) -> None:
    CALLS.append({"session": context.session["id"], "profiles": list(context.auth_profiles)})
    context.clear_auth_profile("crm")


async def clear_all_async(context: CloseScriptContext) -> None:
    await asyncio.sleep(0)
    CALLS.append({"session": context.session["id"], "profiles": list(context.auth_profiles)})
    context.clear_all_auth_profiles()


def broken(context: CloseScriptContext) -> None:
    raise RuntimeError("the operator's script has a bug")


async def too_slow(context: CloseScriptContext) -> None:
    await asyncio.sleep(30)
