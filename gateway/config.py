"""YAML configuration file -> validated, frozen ``Settings`` (DESIGN.md "Configuration").

``load_settings`` collects every problem, not just the first, and raises one ``ConfigError``
whose lines read ``<file>: <dotted.key>: <reason>``. Endpoints are named by their name
(``endpoints.fb-main.session.mode``), or by position when they have no usable one
(``endpoints[2].channel``).

Each section is a table of key -> converter (``_SERVER``, ``_FLOW`` ...; the endpoints' tables
are in ``gateway.config_endpoints``), read by the generic machinery in ``gateway.config_reader``:
adding a key is one table entry plus the dataclass field in ``gateway/settings.py``. Unknown
keys are errors, so a typo never passes silently.
``${NAME}`` / ``${NAME:-default}`` are replaced before conversion, so ``port: ${PORT:-8080}``
is the int 8080.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.config_endpoints import bounded_minutes, endpoint_session_table, endpoints
from gateway.config_reader import (
    FAILED,
    Converter,
    Reader,
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
from gateway.errors import ConfigError, Invalid
from gateway.proxies import Network, parse_networks
from gateway.settings import (
    AdminSettings,
    DeliverySettings,
    EndpointSessionSettings,
    FlowSettings,
    FlowType,
    LogFormat,
    OrganisationSessionSettings,
    RetentionSettings,
    ServerSettings,
    Settings,
    StorageBackend,
    StorageSettings,
    effective_expiration_minutes,
)

log = logging.getLogger("gateway.config")

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_TOP_LEVEL = ("server", "storage", "admin", "organisation", "flow", "delivery", "endpoints", "logging", "retention")
_ORG_DEFAULTS = OrganisationSessionSettings()
MAX_MINUTES = 525_600.0  # a year (DESIGN.md "Hostile input")
_NO_BOUNDS = OrganisationSessionSettings(min_minutes=0.0, max_minutes=math.inf)


# --- converters for the gateway's own values ------------------------------------------------


def _redis_url(r: Reader, value: object, key: str) -> str:
    url = text(r, value, key)
    if not url.startswith(_REDIS_SCHEMES):
        raise Invalid(f"{url!r} must start with redis://, rediss:// or unix://")
    return url


def _key_prefix(r: Reader, value: object, key: str) -> str:
    prefix = text(r, value, key)
    if not prefix or not all(ch.isalnum() or ch in "-_.{}" for ch in prefix):
        raise Invalid(f"{prefix!r} must be letters, digits, '-', '_', '.', '{{' or '}}'")
    return prefix


def _log_level(r: Reader, value: object, key: str) -> str:
    level = text(r, value, key).upper()
    if level not in _LOG_LEVELS:
        raise Invalid(f"{value!r} is not one of {', '.join(_LOG_LEVELS)}")
    return level


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


def _networks(r: Reader, value: object, key: str) -> tuple[Network, ...]:
    """A list of addresses or CIDRs, or one comma-separated string of them (``${X:-}``)."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise Invalid(f"must be a list of IP addresses or CIDRs, not {kind(value)}")
    try:
        return parse_networks(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


_SERVER: dict[str, Converter] = {
    "host": text,
    "port": integer(0, 65535),
    "public_url": optional(http_url),
    "max_body_bytes": integer(1),
    "max_pending_events": integer(1),
    "trusted_proxies": _networks,
    "max_connections": integer(1),
    "read_timeout_seconds": number(minimum=0.0, strict=True),
}
_DELIVERY: dict[str, Converter] = {
    "max_attempts": integer(1),
    "max_age_minutes": number(minimum=0.0, strict=True),
    "base_delay_seconds": number(minimum=0.0, strict=True),
    "max_delay_seconds": number(minimum=0.0, strict=True),
}
_STORAGE: dict[str, Converter] = {
    "backend": choice(StorageBackend),
    "path": file_path,
    "url": optional(_redis_url),
    "key_prefix": _key_prefix,
}
_ADMIN: dict[str, Converter] = {"token": secret}


def _max_minutes(r: Reader, value: object, key: str) -> float:
    """The upper bound of expirations: at most a year, so every deadline is a finite time
    that the store can hold (1e308 minutes would make it infinite)."""
    minutes: float = number(minimum=0.0, strict=True)(r, value, key)
    if minutes > MAX_MINUTES:
        raise Invalid(f"{fmt_number(minutes)} is above {fmt_number(MAX_MINUTES)} (a year)")
    return minutes


_ORGANISATION_SESSION: dict[str, Converter] = {
    "expiration_minutes": optional(number(minimum=0.0)),
    "min_minutes": number(minimum=0.0),
    "max_minutes": _max_minutes,
}
_ORGANISATION: dict[str, Converter] = {"session": raw_value}  # read by _read_organisation
_FLOW: dict[str, Converter] = {
    "type": choice(FlowType),
    "url": optional(http_url),
    "timeout_seconds": number(minimum=0.0, strict=True),
    "error_reply": optional(text),
}
_LOGGING: dict[str, Converter] = {"level": _log_level, "format": choice(LogFormat)}
_RETENTION: dict[str, Converter] = {
    "closed_sessions_days": number(minimum=0.0, strict=True),
    "messages_days": number(minimum=0.0, strict=True),
    "dedup_days": number(minimum=0.0, strict=True),
}


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
        r.read(org.expiration_minutes, f"{key}.expiration_minutes", bounded_minutes(org.min_minutes, org.max_minutes))
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
        "endpoints": r.read(top.get("endpoints"), "endpoints", endpoints(bounds)),
        "log_level": r.read(top.get("logging"), "logging", section(_LOGGING, dict)),
        "retention": r.read(top.get("retention"), "retention", section(_RETENTION, RetentionSettings)),
    }
    if r.problems:
        return None
    logging_section = parts.pop("log_level")
    parts["log_level"] = logging_section.get("level", "INFO")
    parts["log_format"] = logging_section.get("format", LogFormat.TEXT)
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
    table = endpoint_session_table(organisation)
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
        raise ConfigError(reader.scrubbed_problems())
    _warn_capped(settings)
    return settings
