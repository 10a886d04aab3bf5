"""A tiny real Flow for core tests: echoes, records each turn, can be held on a gate or
answer with a scripted result."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import aiohttp

from gateway.flows import FlowResult, FlowTurn


class ScriptedFlow:
    """Echo with knobs: ``gate`` (held until set), ``delay_s`` (random up to), ``answer``."""

    def __init__(
        self,
        *,
        delay_s: float = 0.0,
        answer: Callable[[FlowTurn], FlowResult] | None = None,
    ) -> None:
        self.turns: list[FlowTurn] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self._delay_s = delay_s
        self._answer = answer

    async def start(self, http: aiohttp.ClientSession) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def handle(self, turn: FlowTurn) -> FlowResult:
        self.turns.append(turn)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self._delay_s:
            await asyncio.sleep(random.random() * self._delay_s)
        if self._answer is not None:
            return self._answer(turn)
        return FlowResult(replies=[turn.event.text] if turn.event.text else [])
