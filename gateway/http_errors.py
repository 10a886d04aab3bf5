"""Errors become HTTP answers here, and only here: handlers raise, this middleware answers.

- Every ``RequestRejected`` answers its class's ``status`` (see the tree in ``gateway.errors``)
  with ``{"error": reason}``, plus ``"problems": [...]`` when the error lists them (a refused
  settings change). A 503 carries ``Retry-After``; a refused admin token carries
  ``WWW-Authenticate: Bearer``.
- On ``/admin`` paths aiohttp's own HTTP errors (404 unknown route or admin API off, 405 wrong
  method, 413 body too large) answer the same shape, so an operator's client reads every error
  one way; their own headers (``Allow`` on a 405) are kept. Elsewhere they stay aiohttp's.
- An unexpected exception on ``/admin`` is logged with its traceback and answers 500
  ``{"error": "internal error"}``; elsewhere aiohttp logs it and answers its own 500.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from gateway.errors import RequestRejected, Unauthorized

log = logging.getLogger("gateway.http")

ADMIN_PREFIX = "/admin"
RETRY_AFTER_S = 5


def error_response(
    status: int, reason: str, *, problems: list[str] | None = None, headers: CIMultiDict[str] | None = None
) -> web.Response:
    """The one error shape: ``{"error": reason}``, with ``"problems"`` when given."""
    body: dict[str, Any] = {"error": reason}
    if problems is not None:
        body["problems"] = problems
    return web.json_response(body, status=status, headers=headers)


def _headers(exc: RequestRejected) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    if exc.status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def _kept_headers(exc: web.HTTPException) -> CIMultiDict[str]:
    """aiohttp's headers of its error (``Allow`` on a 405), without those of its text body."""
    headers = CIMultiDict(exc.headers)
    for name in ("Content-Type", "Content-Length"):
        headers.popall(name, None)
    return headers


@web.middleware
async def answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Our rejections become their status with a JSON reason; bad input never becomes a 5xx."""
    try:
        response: web.StreamResponse = await handler(request)
    except RequestRejected as exc:
        return error_response(exc.status, exc.reason, problems=exc.problems, headers=_headers(exc))
    except web.HTTPException as exc:
        if exc.status < 400 or not request.path.startswith(ADMIN_PREFIX):
            raise
        return error_response(exc.status, exc.reason.lower(), headers=_kept_headers(exc))
    except Exception:
        if not request.path.startswith(ADMIN_PREFIX):
            raise
        log.exception("admin request %s %s failed", request.method, request.path)
        return error_response(500, "internal error")
    return response
