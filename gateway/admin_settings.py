"""Admin API: runtime session settings and session analytics (to be completed)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register the runtime-settings and analytics routes."""
