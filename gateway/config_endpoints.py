"""The ``endpoints`` list of the configuration file: one table per endpoint, its ``session``
(with ``on_close`` and ``discard``) and ``rate_limit`` sections, and its credentials, checked
against what its channel declares (``channels.registry``). Read by ``gateway.config``.
"""

from __future__ import annotations

import re
import string
from typing import Any
from urllib.parse import urlsplit

from channels.page_strings import DEFAULT_STRINGS
from channels.registry import Channel, credential_formats, credentials_of, is_hosted
from gateway.config_reader import (
    FAILED,
    Converter,
    Reader,
    boolean,
    choice,
    fmt_number,
    http_url,
    integer,
    kind,
    number,
    optional,
    secret,
    section,
    text,
)
from gateway.errors import Invalid
from gateway.settings import (
    CLOSURE_PLACEHOLDERS,
    DiscardSettings,
    EndpointSessionSettings,
    EndpointSettings,
    OnCloseSettings,
    OrganisationSessionSettings,
    RateLimitSettings,
    SessionMode,
    WebChatSettings,
)

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_SCRIPT_REF = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_CHANNEL_NAMES = frozenset(channel.value for channel in Channel)


def _endpoint_name(r: Reader, value: object, key: str) -> str:
    name = text(r, value, key)
    if not _NAME.fullmatch(name):
        raise Invalid(f"{name!r} must match [A-Za-z0-9_-]+")
    return name


def _webhook_path(r: Reader, value: object, key: str) -> str:
    path = text(r, value, key)
    if not path.startswith("/") or any(c.isspace() for c in path):
        raise Invalid(f"{path!r} must start with / and contain no spaces")
    return path


def _script(r: Reader, value: object, key: str) -> str:
    ref = text(r, value, key)
    if ref.startswith(("http://", "https://")):
        return http_url(r, ref, key)
    if not _SCRIPT_REF.fullmatch(ref):
        raise Invalid(f"{ref!r} must be module:function or an http(s) URL")
    return ref


def _messages(r: Reader, value: object, key: str) -> tuple[str, ...]:
    """A list of non-empty strings (emptiness of the list itself is the caller's rule)."""
    if not isinstance(value, list):
        raise Invalid(f"must be a list of strings, not {kind(value)}")
    bad = False
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            r.problem(f"{key}[{i}]", "must be a non-empty string")
            bad = True
    if bad:
        raise Invalid()
    return tuple(value)


def _messages_by_channel(r: Reader, value: object, key: str) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Invalid(f"must be a mapping of channel -> list of strings, not {kind(value)}")
    result: dict[str, tuple[str, ...]] = {}
    for name, messages in value.items():
        sub = f"{key}.{name}"
        if name not in _CHANNEL_NAMES:
            r.problem(sub, f"unknown channel (one of {', '.join(Channel)})")
            continue
        variants = r.read(messages, sub, _messages)
        if variants == ():
            r.problem(sub, "must not be empty")
        elif variants is not FAILED:
            result[str(name)] = variants
    return result


def _credentials(r: Reader, value: object, key: str) -> dict[str, Any]:
    """Name -> Secret; which names a channel takes is checked by the endpoint (it knows the channel)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Invalid(f"must be a mapping, not {kind(value)}")
    # A value that failed stays in as FAILED, so "missing" is not reported on top of it.
    return {str(name): r.read(raw, f"{key}.{name}", secret) for name, raw in value.items()}


def _origin(r: Reader, value: object, key: str) -> str:
    """A web origin as browsers send it: ``scheme://host[:port]``, lower case, nothing after."""
    origin = text(r, value, key).strip().lower()
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise Invalid(f"{origin!r} is not an origin like https://shop.example.com") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or origin != f"{parts.scheme}://{parts.netloc}":
        raise Invalid(f"{origin!r} is not an origin like https://shop.example.com (no path, no trailing slash)")
    if (parts.scheme, parts.port) in (("http", 80), ("https", 443)):
        return f"{parts.scheme}://{parts.netloc.rsplit(':', 1)[0]}"  # browsers leave the default port out
    return origin


def _origins(r: Reader, value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise Invalid(f"must be a list of origins, not {kind(value)}")
    origins = [r.read(item, f"{key}[{i}]", _origin) for i, item in enumerate(value)]
    if any(origin is FAILED for origin in origins):
        raise Invalid()
    return tuple(dict.fromkeys(origins))


def _strings(r: Reader, value: object, key: str) -> dict[str, str]:
    """Overrides of the page's texts, by the keys of ``channels.page_strings``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Invalid(f"must be a mapping of text name -> text, not {kind(value)}")
    result: dict[str, str] = {}
    for name, raw in value.items():
        if name not in DEFAULT_STRINGS:
            r.problem(f"{key}.{name}", r.unknown(name, DEFAULT_STRINGS))
            continue
        converted = r.read(raw, f"{key}.{name}", text)
        if converted is not FAILED:
            result[str(name)] = converted
    return result


def bounded_minutes(low: float, high: float) -> Converter:
    """Minutes >= 0; a non-zero value must lie within the organisation bounds (S5, 0 = never)."""
    base = number(minimum=0.0)

    def read(r: Reader, value: object, key: str) -> float:
        minutes: float = base(r, value, key)
        if minutes and minutes < low:
            raise Invalid(f"{fmt_number(minutes)} is below organisation.session.min_minutes ({fmt_number(low)})")
        if minutes > high:
            raise Invalid(f"{fmt_number(minutes)} is above organisation.session.max_minutes ({fmt_number(high)})")
        return minutes

    return read


def _unknown_placeholders(text: str) -> list[str]:
    """The ``{name}`` fields of a closure text that will not be filled (a typo would reach the
    user as written). Text that is no template (a lone brace) is sent as written: not a problem."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError:
        return []
    return [name for name in fields if name.isidentifier() and name not in CLOSURE_PLACEHOLDERS]


def _check_closure_texts(r: Reader, key: str, texts: object) -> None:
    if not isinstance(texts, tuple):
        return  # already reported
    known = ", ".join(f"{{{name}}}" for name in CLOSURE_PLACEHOLDERS)
    for i, message in enumerate(texts):
        for name in _unknown_placeholders(message):
            r.problem(f"{key}[{i}]", f"unknown placeholder {{{name}}} (known: {known})")


def _check_on_close(r: Reader, key: str, values: dict[str, Any]) -> None:
    if values.get("notify", True) is True and values.get("messages") == ():
        r.problem(f"{key}.messages", "must not be empty when notify is true")
    _check_closure_texts(r, f"{key}.messages", values.get("messages"))
    by_channel = values.get("messages_by_channel")
    if isinstance(by_channel, dict):
        for channel, texts in by_channel.items():
            _check_closure_texts(r, f"{key}.messages_by_channel.{channel}", texts)


def _check_endpoint(r: Reader, key: str, values: dict[str, Any]) -> None:
    name, channel = values.get("name"), values.get("channel")
    if "webchat" in values and isinstance(channel, Channel) and channel is not Channel.WEBCHAT:
        r.problem(f"{key}.webchat", f"only for channel webchat (this endpoint is {channel})")
    if "path" not in values and isinstance(name, str):
        values["path"] = f"/webhooks/{name}"
    credentials = values.get("credentials", {})
    if not isinstance(channel, Channel) or not isinstance(credentials, dict):
        return  # the channel or the mapping is already reported
    required, optional_keys = credentials_of(channel)
    for cred in credentials:
        if cred not in required and cred not in optional_keys:
            takes = ", ".join(required + optional_keys) or "no credentials"
            r.problem(f"{key}.credentials.{cred}", f"unknown key (channel {channel} takes {takes})")
    for cred in required:
        value = credentials.get(cred)
        if cred not in credentials:
            r.problem(f"{key}.credentials.{cred}", f"required for channel {channel}")
        elif value is not FAILED and not value:
            r.problem(f"{key}.credentials.{cred}", f"must not be empty (required for channel {channel})")
    for cred, (pattern, meaning) in credential_formats(channel).items():
        value = credentials.get(cred)
        if value is not None and value is not FAILED and value and not re.fullmatch(pattern, value.value.strip()):
            # The value itself is not repeated: it may be a secret.
            r.problem(f"{key}.credentials.{cred}", f"must be {meaning}")


_RATE_LIMIT: dict[str, Converter] = {
    "per_second": optional(number(minimum=0.0, strict=True)),
    "per_conversation_per_second": optional(number(minimum=0.0, strict=True)),
}
_ON_CLOSE: dict[str, Converter] = {
    "notify": boolean,
    "messages": _messages,
    "messages_by_channel": _messages_by_channel,
    "clear_auth_profiles": boolean,
    "script": optional(_script),
    "script_timeout_seconds": number(minimum=0.0, strict=True),
}
_WEBCHAT: dict[str, Converter] = {
    "allowed_origins": _origins,
    "max_messages_per_minute": integer(1),
    "max_new_conversations_per_hour": integer(1),
    "max_text_chars": integer(1, 100_000),
    "max_kept_messages": integer(0, 100_000),
    "title": optional(text),
    "strings": _strings,
}
_DISCARD: dict[str, Converter] = {
    "words": _messages,
    "all_words": _messages,
    "reply": optional(text),
    "all_reply": optional(text),
}


def endpoint_session_table(org: OrganisationSessionSettings) -> dict[str, Converter]:
    return {
        "expiration_minutes": optional(bounded_minutes(org.min_minutes, org.max_minutes)),
        "mode": choice(SessionMode),
        "on_close": section(_ON_CLOSE, OnCloseSettings, _check_on_close),
        "discard": section(_DISCARD, DiscardSettings),
    }


def _endpoint_table(org: OrganisationSessionSettings) -> dict[str, Converter]:
    return {
        "name": _endpoint_name,
        "channel": choice(Channel),
        "path": _webhook_path,
        "developer": boolean,
        "api_base_url": optional(http_url),
        "credentials": _credentials,
        "session": section(endpoint_session_table(org), EndpointSessionSettings),
        "rate_limit": section(_RATE_LIMIT, RateLimitSettings),
        "webchat": section(_WEBCHAT, WebChatSettings),
    }


def _endpoint_labels(r: Reader, items: list[object]) -> list[str]:
    """Each endpoint's key prefix: ``endpoints.<name>``, or ``endpoints[i]`` without a usable name.

    A repeated name is reported here, and the repeat is labelled by position so keys stay unique.
    """
    labels: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        raw = item.get("name") if isinstance(item, dict) else None
        name = r.peek(raw)
        label = f"endpoints[{i}]"
        if name is not None and _NAME.fullmatch(name):
            if name in seen:
                r.problem(f"{label}.name", f"duplicate endpoint name {name!r}")
            else:
                label = f"endpoints.{name}"
                seen.add(name)
        labels.append(label)
    return labels


def endpoints(org: OrganisationSessionSettings) -> Converter:
    read_endpoint = section(_endpoint_table(org), EndpointSettings, _check_endpoint, required=("name", "channel"))

    def read(r: Reader, value: object, key: str) -> tuple[EndpointSettings, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise Invalid(f"must be a list, not {kind(value)}")
        endpoints: list[EndpointSettings] = []
        paths: dict[str, str] = {}
        for item, label in zip(value, _endpoint_labels(r, value), strict=True):
            endpoint = r.read(item, label, read_endpoint)
            if endpoint is FAILED:
                continue
            endpoints.append(endpoint)
            if is_hosted(endpoint.channel):
                continue  # served under its channel's own path (web chat: /webchat/<name>); unused
            if endpoint.path in paths:
                r.problem(f"{label}.path", f"{endpoint.path!r} is already used by endpoint {paths[endpoint.path]}")
            else:
                paths[endpoint.path] = endpoint.name
        return tuple(endpoints)

    return read
