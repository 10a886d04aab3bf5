"""Admin API: runtime session settings and session analytics (DESIGN.md "HTTP surface").

- ``GET|PUT|DELETE /admin/endpoints/<name>/session``: ``{"configured": {...}, "override":
  {...}|null, "effective_expiration_minutes": x}``. PUT merges any subset of the session keys
  into the override (see ``gateway.runtime_settings``), checks the result with the file's rules
  (400 ``{"error": "session.<key>: <reason>; ...", "problems": [...]}``, nothing stored),
  stores it and applies it to the endpoint's open sessions at once. DELETE drops the override
  (back to the file), also at once. Unknown endpoint: 404.
- ``GET|PUT|DELETE /admin/organisation/session``: the organisation default, cap and bounds
  (S2-S5), same merge rules; a change re-applies every endpoint whose policy it changes. A PUT
  whose bounds would exclude an endpoint's value is refused naming the endpoint
  (``endpoints.<name>.session.expiration_minutes: ...``). DELETE is an extension of the
  contract's GET|PUT: it drops the organisation override.
- ``GET /admin/analytics/sessions?since=ISO&until=ISO``: sessions STARTED in ``[since, until)``
  (each bound optional) counted by endpoint and kind (S13-S15). Every configured endpoint is
  listed (zeros when it had no sessions), and so is any endpoint no longer configured that has
  sessions in the range. ``closed_by_reason`` lists every close reason (zeros included); open
  sessions are in ``sessions`` but in no reason.

Changes are serialised by one lock: the override is read, merged, checked, stored and applied
as one step, so two concurrent PUTs of different keys both hold.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from gateway.admin import read_json_object
from gateway.errors import BadPayload, NotFound
from gateway.keys import MANAGER, OWNERSHIP, SETTINGS, STORE
from gateway.models import CloseReason
from gateway.runtime_settings import (
    ORGANISATION_SCOPE,
    RuntimeSettings,
    endpoint_scope,
    load_runtime,
)
from gateway.wire import iso, parse_iso

log = logging.getLogger("gateway.admin_settings")

_CHANGES = web.AppKey("runtime_settings_changes", asyncio.Lock)


def add_routes(app: web.Application) -> None:
    """Register the runtime-settings and analytics routes."""
    app[_CHANGES] = asyncio.Lock()
    app.router.add_get("/admin/endpoints/{name}/session", get_endpoint_session)
    app.router.add_put("/admin/endpoints/{name}/session", put_endpoint_session)
    app.router.add_delete("/admin/endpoints/{name}/session", delete_endpoint_session)
    app.router.add_get("/admin/organisation/session", get_organisation_session)
    app.router.add_put("/admin/organisation/session", put_organisation_session)
    app.router.add_delete("/admin/organisation/session", delete_organisation_session)
    app.router.add_get("/admin/analytics/sessions", session_analytics)


# -- helpers ----------------------------------------------------------------------------------


async def _runtime(request: web.Request) -> RuntimeSettings:
    return await load_runtime(request.app[SETTINGS], request.app[STORE])


async def _endpoint_runtime(request: web.Request) -> tuple[str, RuntimeSettings]:
    name = request.match_info["name"]
    runtime = await _runtime(request)
    if name not in runtime.endpoints:
        raise NotFound("no such endpoint")
    return name, runtime


async def _apply(request: web.Request, before: RuntimeSettings, after: RuntimeSettings) -> None:
    """Hand every changed endpoint policy to the session manager (open sessions at once)."""
    manager = request.app[MANAGER]
    for name, runtime in after.endpoints.items():
        if runtime.policy != before.endpoints[name].policy:
            await manager.set_policy(runtime.policy)
            log.info(
                "endpoint %s: session settings changed at run time (expiration %s min, mode %s)",
                name,
                runtime.policy.expiration_minutes,
                runtime.policy.mode.value,
            )
    for line in after.capped():
        log.warning("%s", line)
    await request.app[OWNERSHIP].settings_changed()  # several instances: the others apply it too


async def _store(request: web.Request, scope: str, value: dict[str, Any] | None) -> None:
    store = request.app[STORE]
    if value is None:
        await store.delete_override(scope)
    else:
        await store.put_override(scope, value)


# -- endpoint settings ------------------------------------------------------------------------


async def get_endpoint_session(request: web.Request) -> web.StreamResponse:
    name, runtime = await _endpoint_runtime(request)
    return web.json_response(runtime.endpoint_json(name))


async def put_endpoint_session(request: web.Request) -> web.StreamResponse:
    patch = await read_json_object(request)
    async with request.app[_CHANGES]:
        name, runtime = await _endpoint_runtime(request)
        override = runtime.with_endpoint(name, patch) or None  # {}: no override at all
        await _store(request, endpoint_scope(name), override)
        after = runtime.with_stored(endpoint_scope(name), override)
        await _apply(request, runtime, after)
    return web.json_response(after.endpoint_json(name))


async def delete_endpoint_session(request: web.Request) -> web.StreamResponse:
    async with request.app[_CHANGES]:
        name, runtime = await _endpoint_runtime(request)
        runtime.check_endpoint_reset(name)
        await _store(request, endpoint_scope(name), None)
        after = runtime.with_stored(endpoint_scope(name), None)
        await _apply(request, runtime, after)
    return web.json_response(after.endpoint_json(name))


# -- organisation settings --------------------------------------------------------------------


async def get_organisation_session(request: web.Request) -> web.StreamResponse:
    return web.json_response((await _runtime(request)).organisation_json())


async def _change_organisation(request: web.Request, patch: dict[str, Any] | None) -> web.StreamResponse:
    async with request.app[_CHANGES]:
        runtime = await _runtime(request)
        override = runtime.with_organisation(patch) or None
        await _store(request, ORGANISATION_SCOPE, override)
        after = runtime.with_stored(ORGANISATION_SCOPE, override)
        await _apply(request, runtime, after)
    return web.json_response(after.organisation_json())


async def put_organisation_session(request: web.Request) -> web.StreamResponse:
    return await _change_organisation(request, await read_json_object(request))


async def delete_organisation_session(request: web.Request) -> web.StreamResponse:
    return await _change_organisation(request, None)


# -- analytics --------------------------------------------------------------------------------


def _time_param(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    text = raw.strip()
    if " " in text and "T" in text:
        # An unencoded "+02:00" in a query string arrives as " 02:00".
        head, _, tail = text.rpartition(" ")
        text = f"{head}+{tail}"
    try:
        return parse_iso(text)
    except (ValueError, OverflowError, OSError):
        raise BadPayload(f"{name}: {raw!r} is not an ISO 8601 time (e.g. 2025-01-31T00:00:00Z)") from None


def _zero_counts() -> dict[str, Any]:
    return {
        "sessions": 0,
        "interactive": 0,
        "non_interactive": 0,
        "developer": 0,
        "billable": 0,
        "closed_by_reason": {reason.value: 0 for reason in CloseReason},
    }


async def session_analytics(request: web.Request) -> web.StreamResponse:
    since, until = _time_param(request, "since"), _time_param(request, "until")
    if since is not None and until is not None and since > until:
        raise BadPayload("since must not be after until")
    groups = await request.app[STORE].session_analytics(since, until)
    endpoints = {endpoint.name: _zero_counts() for endpoint in request.app[SETTINGS].endpoints}
    for endpoint, interactive, developer, reason, count in groups:
        counts = endpoints.setdefault(endpoint, _zero_counts())
        counts["sessions"] += count
        counts["interactive" if interactive else "non_interactive"] += count
        if developer:
            counts["developer"] += count
        elif interactive:
            counts["billable"] += count  # S15: interactive and not developer
        if reason is not None:
            by_reason = counts["closed_by_reason"]
            by_reason[reason] = by_reason.get(reason, 0) + count
    return web.json_response({"since": iso(since), "until": iso(until), "endpoints": endpoints})
