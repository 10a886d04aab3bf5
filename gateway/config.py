"""YAML configuration file -> validated, frozen ``Settings`` (DESIGN.md "Configuration").

``load_settings`` collects every problem, not just the first, and raises one ``ConfigError``
whose lines read ``<file>: <dotted.key>: <reason>``. Endpoints are named by their name
(``endpoints.fb-main.session.mode``), or by position when they have no usable one
(``endpoints[2].channel``).

Each section is a table of key -> converter (``_SERVER``, ``_ENDPOINT`` ...), read by the generic
machinery in ``gateway.config_reader``: adding a key is one table entry plus the dataclass field
in ``gateway/settings.py``. Unknown keys are errors, so a typo never passes silently.
``${NAME}`` / ``${NAME:-default}`` are replaced before conversion, so ``port: ${PORT:-8080}``
is the int 8080.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from channels.registry import Channel, credentials_of, is_hosted
from gateway.config_reader import (
    FAILED,
    Converter,
    Invalid,
    Reader,
    boolean,
    choice,
    file_path,
    fmt_number,
    http_url,
    integer,
    kind,
    number,
    optional,
    parse_yaml,
    raw_value,
    secret,
    section,
    text,
)
from gateway.errors import ConfigError
from gateway.settings import (
    AdminSettings,
    DeliverySettings,
    DiscardSettings,
    EndpointSessionSettings,
    EndpointSettings,
    FlowSettings,
    FlowType,
    OnCloseSettings,
    OrganisationSessionSettings,
    RateLimitSettings,
    ServerSettings,
    SessionMode,
    Settings,
    StorageBackend,
    StorageSettings,
    effective_expiration_minutes,
)

log = logging.getLogger("gateway.config")

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_SCRIPT_REF = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_TOP_LEVEL = ("server", "storage", "admin", "organisation", "flow", "delivery", "endpoints", "logging")
_CHANNEL_NAMES = frozenset(channel.value for channel in Channel)
_ORG_DEFAULTS = OrganisationSessionSettings()
_NO_BOUNDS = OrganisationSessionSettings(min_minutes=0.0, max_minutes=math.inf)


# --- converters for the gateway's own values ------------------------------------------------


def _redis_url(r: Reader, value: object, key: str) -> str:
    url = text(r, value, key)
    if not url.startswith(_REDIS_SCHEMES):
        raise Invalid(f"{url!r} must start with redis://, rediss:// or unix://")
    return url


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


def _log_level(r: Reader, value: object, key: str) -> str:
    level = text(r, value, key).upper()
    if level not in _LOG_LEVELS:
        raise Invalid(f"{value!r} is not one of {', '.join(_LOG_LEVELS)}")
    return level


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


def _minutes(low: float, high: float) -> Converter:
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


# --- sections -------------------------------------------------------------------------------


def _check_storage(r: Reader, key: str, values: dict[str, Any]) -> None:
    if "path" not in values:
        values["path"] = file_path(r, str(StorageSettings().path), f"{key}.path")
    if values.get("backend") is StorageBackend.REDIS and values.get("url") is None:
        r.problem(f"{key}.url", "required when backend is redis")


def _check_flow(r: Reader, key: str, values: dict[str, Any]) -> None:
    if values.get("type") is FlowType.HTTP and values.get("url") is None:
        r.problem(f"{key}.url", "required when type is http")


def _check_bounds(r: Reader, key: str, values: dict[str, Any]) -> None:
    low = values.get("min_minutes", _ORG_DEFAULTS.min_minutes)
    high = values.get("max_minutes", _ORG_DEFAULTS.max_minutes)
    if isinstance(low, float) and isinstance(high, float) and low > high:
        r.problem(f"{key}.min_minutes", f"{fmt_number(low)} is above max_minutes ({fmt_number(high)})")


def _check_on_close(r: Reader, key: str, values: dict[str, Any]) -> None:
    if values.get("notify", True) is True and values.get("messages") == ():
        r.problem(f"{key}.messages", "must not be empty when notify is true")


def _check_endpoint(r: Reader, key: str, values: dict[str, Any]) -> None:
    name, channel = values.get("name"), values.get("channel")
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


_SERVER: dict[str, Converter] = {
    "host": text,
    "port": integer(0, 65535),
    "public_url": optional(http_url),
    "max_body_bytes": integer(1),
    "max_pending_events": integer(1),
}
_DELIVERY: dict[str, Converter] = {
    "max_attempts": integer(1),
    "max_age_minutes": number(minimum=0.0, strict=True),
    "base_delay_seconds": number(minimum=0.0, strict=True),
    "max_delay_seconds": number(minimum=0.0, strict=True),
}
_RATE_LIMIT: dict[str, Converter] = {
    "per_second": optional(number(minimum=0.0, strict=True)),
    "per_conversation_per_second": optional(number(minimum=0.0, strict=True)),
}
_STORAGE: dict[str, Converter] = {
    "backend": choice(StorageBackend),
    "path": file_path,
    "url": optional(_redis_url),
}
_ADMIN: dict[str, Converter] = {"token": secret}
_ORGANISATION_SESSION: dict[str, Converter] = {
    "expiration_minutes": optional(number(minimum=0.0)),
    "min_minutes": number(minimum=0.0),
    "max_minutes": number(minimum=0.0, strict=True),
}
_READ_ORGANISATION_SESSION = section(_ORGANISATION_SESSION, OrganisationSessionSettings, _check_bounds)
_ORGANISATION: dict[str, Converter] = {"session": raw_value}  # read by _read_organisation
_FLOW: dict[str, Converter] = {
    "type": choice(FlowType),
    "url": optional(http_url),
    "timeout_seconds": number(minimum=0.0, strict=True),
    "error_reply": optional(text),
}
_LOGGING: dict[str, Converter] = {"level": _log_level}
_ON_CLOSE: dict[str, Converter] = {
    "notify": boolean,
    "messages": _messages,
    "messages_by_channel": _messages_by_channel,
    "clear_auth_profiles": boolean,
    "script": optional(_script),
    "script_timeout_seconds": number(minimum=0.0, strict=True),
}
_DISCARD: dict[str, Converter] = {
    "words": _messages,
    "all_words": _messages,
    "reply": optional(text),
    "all_reply": optional(text),
}


def _endpoint_session_table(org: OrganisationSessionSettings) -> dict[str, Converter]:
    return {
        "expiration_minutes": optional(_minutes(org.min_minutes, org.max_minutes)),
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
        "session": section(_endpoint_session_table(org), EndpointSessionSettings),
        "rate_limit": section(_RATE_LIMIT, RateLimitSettings),
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


def _endpoints(org: OrganisationSessionSettings) -> Converter:
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


def _read_organisation(r: Reader, raw: object, key: str) -> OrganisationSessionSettings:
    """The organisation session settings, or no bounds at all when they are invalid: then
    endpoint values are not checked against guessed bounds (one mistake, one problem)."""
    org: OrganisationSessionSettings = r.read(
        raw, key, section(_ORGANISATION_SESSION, OrganisationSessionSettings, _check_bounds)
    )
    if org is FAILED:
        return _NO_BOUNDS
    if org.expiration_minutes is not None:
        # The organisation's own value obeys the bounds too (DESIGN.md, configuration errors).
        r.read(org.expiration_minutes, f"{key}.expiration_minutes", _minutes(org.min_minutes, org.max_minutes))
    return org


def _read_settings(r: Reader, top: dict[Any, Any], source: Path) -> Settings | None:
    for key in top:
        if key not in _TOP_LEVEL:
            r.problem(str(key), r.unknown(key, _TOP_LEVEL))
    organisation = r.read(top.get("organisation"), "organisation", section(_ORGANISATION, dict))
    raw_org = organisation.get("session") if organisation is not FAILED else None
    bounds = _read_organisation(r, raw_org, "organisation.session")
    parts: dict[str, Any] = {
        "server": r.read(top.get("server"), "server", section(_SERVER, ServerSettings)),
        "storage": r.read(top.get("storage"), "storage", section(_STORAGE, StorageSettings, _check_storage)),
        "admin": r.read(top.get("admin"), "admin", section(_ADMIN, AdminSettings)),
        "flow": r.read(top.get("flow"), "flow", section(_FLOW, FlowSettings, _check_flow)),
        "delivery": r.read(top.get("delivery"), "delivery", section(_DELIVERY, DeliverySettings)),
        "endpoints": r.read(top.get("endpoints"), "endpoints", _endpoints(bounds)),
        "log_level": r.read(top.get("logging"), "logging", section(_LOGGING, dict)),
    }
    if r.problems:
        return None
    parts["log_level"] = parts["log_level"].get("level", "INFO")
    return Settings(source=source, organisation=bounds, **parts)


def _warn_capped(settings: Settings) -> None:
    """S4: say which endpoints' configured expiration the organisation value overrides."""
    for endpoint in settings.endpoints:
        configured = endpoint.session.expiration_minutes
        if configured is None:
            continue
        effective = effective_expiration_minutes(configured, settings.organisation)
        if effective != configured:
            log.warning(
                "endpoint %s: session.expiration_minutes %s is capped to %s by organisation.session.expiration_minutes",
                endpoint.name,
                "0 (never)" if configured == 0 else fmt_number(configured),
                fmt_number(effective),
            )


def read_endpoint_session(raw: object, organisation: OrganisationSessionSettings) -> EndpointSessionSettings:
    """An endpoint ``session`` mapping from outside the file (e.g. an admin API PUT), checked by
    the file's rules against ``organisation``'s bounds, without ``${...}`` interpolation.

    Raises ``ConfigError`` with ``session.<key>: <reason>`` lines.
    """
    reader = Reader("", None, Path.cwd())
    table = _endpoint_session_table(organisation)
    result: EndpointSessionSettings = reader.read(raw, "session", section(table, EndpointSessionSettings))
    if reader.problems:
        raise ConfigError(reader.problems)
    return result


def read_organisation_session(raw: object) -> OrganisationSessionSettings:
    """An ``organisation.session`` mapping from outside the file, checked like the file's.

    Raises ``ConfigError`` with ``session.<key>: <reason>`` lines.
    """
    reader = Reader("", None, Path.cwd())
    result = _read_organisation(reader, raw, "session")
    if reader.problems:
        raise ConfigError(reader.problems)
    return result


def load_settings(path: Path | str, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, interpolate and validate the configuration file at ``path``.

    ``environ`` (default ``os.environ``) supplies ``${NAME}`` values. Raises ``ConfigError``
    holding every problem found, one ``<path as given>: <dotted.key>: <reason>`` line each.
    Logs a warning for each endpoint whose expiration the organisation value caps (S4).
    """
    source = Path(os.path.abspath(path))
    reader = Reader(str(path), os.environ if environ is None else environ, source.parent)
    top = parse_yaml(reader, source)
    settings = _read_settings(reader, top, source) if top is not None else None
    if settings is None:
        raise ConfigError(reader.problems)
    _warn_capped(settings)
    return settings
