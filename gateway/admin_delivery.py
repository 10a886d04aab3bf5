"""Admin API: dead letters (to be completed)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register the dead-letter routes."""
