"""The web chat's two static files, filled in per endpoint once at start: the page
(``static/webchat.html``) and the embeddable ``widget.js`` (``static/widget.js``).

Each gets its endpoint's settings as one JSON object (title, the strings table, limits): the
files themselves hold no visible text of their own beyond the defaults' fallbacks.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from typing import Any

from channels.page_strings import page_strings
from gateway.settings import EndpointSettings

PAGE_CONFIG = "/*WEBCHAT_CONFIG*/null"  # replaced in both files by the endpoint's JSON


def _static(name: str) -> str:
    return resources.files("channels").joinpath(f"static/{name}").read_text(encoding="utf-8")


def script_json(value: Any) -> str:
    """JSON that is safe inside a ``<script>`` element: no ``</script>``, no HTML comment,
    no line separators that old JavaScript parsers take for line ends."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028")):
        text = text.replace(char, escape)
    return text.replace("\u2029", "\\u2029")


def title_of(endpoint: EndpointSettings) -> str:
    """The page header: ``webchat.title``, else the endpoint name (DESIGN.md)."""
    return endpoint.webchat.title or endpoint.name


def render_page(endpoint: EndpointSettings, path: str) -> str:
    """The chat page of ``endpoint`` served at ``path`` (its socket is ``<path>/ws``)."""
    strings = page_strings(endpoint.webchat.strings)
    config = {
        "endpoint": endpoint.name,
        "title": title_of(endpoint),
        "socketPath": f"{path}/ws",
        "maxTextChars": endpoint.webchat.max_text_chars,
        "strings": strings,
    }
    page = _static("webchat.html")
    page = page.replace("{{lang}}", html.escape(strings["lang"], quote=True))
    page = page.replace("{{title}}", html.escape(title_of(endpoint)))
    return page.replace(PAGE_CONFIG, script_json(config))


def render_widget(endpoint: EndpointSettings, path: str) -> str:
    """``widget.js`` of ``endpoint``: a launcher button that opens the page at ``path`` in a
    frame, on the gateway's own origin and the ``allowed_origins`` only."""
    strings = page_strings(endpoint.webchat.strings)
    config = {
        "pagePath": path,
        "title": title_of(endpoint),
        "allowedOrigins": list(endpoint.webchat.allowed_origins),
        "strings": {key: strings[key] for key in ("open_chat", "close_chat")},
    }
    return _static("widget.js").replace(PAGE_CONFIG, script_json(config))
