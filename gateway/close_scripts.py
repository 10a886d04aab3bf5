"""Custom scripts run when a session closes (S12): ``module:function`` or an http(s) URL.

A script gets the closed session and the names of the contact's auth profiles, and may ask to
clear one named profile or all of them (S11/S12). It runs after the close is committed, bounded
by ``on_close.script_timeout_seconds``; a failing or slow script is logged and counted and never
stops or delays the close.

- ``module:function`` is called with one ``CloseScriptContext`` argument; it may be sync or
  async. Modules are imported once, at start, so a typo fails start-up and no import happens
  on the event loop later.
- A URL receives ``POST {"session": {...}, "auth_profiles": ["name", ...]}`` and may answer
  ``{"clear_auth_profiles": ["name", ...] | "all"}``.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.errors import CloseScriptError, ConfigError
from gateway.models import JSONDict


@dataclass(slots=True)
class CloseScriptContext:
    """What a ``module:function`` close script receives."""

    session: JSONDict
    auth_profiles: list[str]
    cleared: set[str] = field(default_factory=set)

    def clear_auth_profile(self, name: str) -> None:
        """Ask the gateway to clear one auth profile of the contact (and variables bound to it)."""
        self.cleared.add(name)

    def clear_all_auth_profiles(self) -> None:
        self.cleared.update(self.auth_profiles)


class CloseScripts:
    """Resolves the configured scripts at start and runs them on close."""

    def __init__(self, refs: Iterable[str]) -> None:
        self._refs = sorted(set(refs))
        self._functions: dict[str, Callable[[CloseScriptContext], Any]] = {}
        self._http: aiohttp.ClientSession | None = None

    async def start(self, http: aiohttp.ClientSession) -> None:
        """Import every ``module:function`` script (raises ``ConfigError`` naming a bad one)."""
        self._http = http
        problems: list[str] = []
        for ref in self._refs:
            if ref.startswith(("http://", "https://")):
                continue
            module_name, _, function_name = ref.partition(":")
            try:
                function = getattr(importlib.import_module(module_name), function_name)
            except (ImportError, AttributeError) as exc:
                problems.append(f"on_close.script: cannot load {ref!r}: {exc}")
                continue
            if not callable(function):
                problems.append(f"on_close.script: {ref!r} is not callable")
                continue
            self._functions[ref] = function
        if problems:
            raise ConfigError(problems)

    async def aclose(self) -> None:
        self._http = None

    async def run(self, ref: str, timeout_s: float, session: JSONDict, auth_profiles: list[str]) -> list[str]:
        """Run the script; the auth profiles it asks to clear. Raises ``CloseScriptError``."""
        try:
            async with asyncio.timeout(timeout_s):
                if ref in self._functions:
                    return await self._call(self._functions[ref], session, auth_profiles)
                return await self._post(ref, session, auth_profiles)
        except TimeoutError as exc:
            raise CloseScriptError(f"close script {ref} took longer than {timeout_s:g} s") from exc
        except CloseScriptError:
            raise
        except Exception as exc:  # the operator's code: anything may come out of it
            raise CloseScriptError(f"close script {ref} failed: {type(exc).__name__}: {exc}") from exc

    async def _call(
        self, function: Callable[[CloseScriptContext], Any], session: JSONDict, auth_profiles: list[str]
    ) -> list[str]:
        context = CloseScriptContext(session, list(auth_profiles))
        outcome = function(context)
        if inspect.isawaitable(outcome):
            await outcome
        return sorted(context.cleared)

    async def _post(self, url: str, session: JSONDict, auth_profiles: list[str]) -> list[str]:
        if self._http is None:
            raise CloseScriptError("close scripts used before start()")
        async with self._http.post(url, json={"session": session, "auth_profiles": auth_profiles}) as response:
            if response.status >= 300:
                raise CloseScriptError(f"close script {url} answered HTTP {response.status}")
            answer = await response.json(content_type=None) if response.content_length != 0 else None
        wanted = answer.get("clear_auth_profiles") if isinstance(answer, dict) else None
        if wanted is None:
            return []
        if wanted == "all":
            return list(auth_profiles)
        if isinstance(wanted, list) and all(isinstance(name, str) for name in wanted):
            return list(wanted)
        raise CloseScriptError(f'close script {url}: "clear_auth_profiles" must be a list of names or "all"')
