"""Typed application keys, declared once (aiohttp ``web.AppKey``)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from channels.base import ChannelAdapter
from gateway.metrics import Metrics
from gateway.outbox import Outbox
from gateway.sessions import SessionManager
from gateway.sessions.ownership import Ownership
from gateway.settings import Settings
from gateway.store.base import Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", Metrics)
CLOCK = web.AppKey[Callable[[], float]]("clock")
ADAPTERS = web.AppKey[dict[str, ChannelAdapter]]("adapters")
OUTBOX = web.AppKey("outbox", Outbox)
MANAGER = web.AppKey("manager", SessionManager)
OWNERSHIP = web.AppKey[Ownership]("ownership")
