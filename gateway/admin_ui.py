"""``GET /admin/ui``: the management page, one static HTML file (no build step).

The page asks for the admin token and keeps it in ``sessionStorage`` (gone when the tab
closes); every call it makes is to the admin API with that bearer, so the route itself needs
none (``admin.admin_auth`` lets it through; it is 404 when admin is off, like all of /admin).
It is read once per application: the file ships inside the package (``gateway/static``).
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

_PAGE = web.AppKey("admin_page", str)

# The page loads nothing from elsewhere and is never framed.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def page_html() -> str:
    """The page's HTML."""
    return resources.files("gateway").joinpath("static/admin.html").read_text(encoding="utf-8")


async def admin_page(request: web.Request) -> web.StreamResponse:
    return web.Response(text=request.app[_PAGE], content_type="text/html", charset="utf-8", headers=_HEADERS)


def add_routes(app: web.Application) -> None:
    app[_PAGE] = page_html()
    app.router.add_get("/admin/ui", admin_page)
