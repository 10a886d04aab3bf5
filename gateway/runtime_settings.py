"""Session settings as they apply at run time: the file's, overridden through the admin API.

Overrides are stored (``Store.put_override``) and win over the file across restarts until
deleted (DESIGN.md "Contract details"). Two kinds of scope:

- ``endpoint:<name>``: any subset of an endpoint's ``session`` keys. A PUT merges into the
  override already stored (``on_close`` and ``discard`` merge key by key; every other value,
  lists and ``messages_by_channel`` included, is replaced whole). The endpoint's configured
  settings are the file's with the override laid over them.
- ``organisation``: any of ``expiration_minutes``, ``min_minutes``, ``max_minutes``, merged the
  same way over the file's ``organisation.session``.

An override holds only the keys that were set, normalised (``"LAZY"`` is stored as ``"lazy"``,
``"5"`` as ``5.0``), so a key not overridden keeps following the file when the file changes.

Close scripts (S12) of the ``module:function`` kind are imported once, at start, from the file
(``gateway.close_scripts``), so ``on_close.script`` set at run time must be an http(s) URL, null,
or a ``module:function`` the file names for some endpoint.

Rules (the file's, from ``gateway.config``): every applied endpoint value lies within the applied
organisation bounds (S5). So a change that would break that is refused as a whole, naming the
key and the reason: an endpoint PUT outside the bounds, an organisation PUT whose new bounds
exclude some endpoint's value (``endpoints.<name>.session.expiration_minutes: ...``), a DELETE
that would bring back a file value outside the bounds set at run time. The organisation's
``expiration_minutes`` is then a default and a cap (S2-S4, ``effective_expiration_minutes``).

At start (``load_policies``) a stored override that no longer validates (the file's bounds or
endpoints changed meanwhile) is ignored with a logged warning, and stays stored: it is shown as
``ignored_override`` by the admin API, and the next PUT of that scope replaces it.

Pure code: no I/O but ``load_policies``. The admin handlers (``gateway.admin_settings``) build a
``RuntimeSettings`` from the stored overrides, ask it for the change, store, then apply.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from gateway.config import read_endpoint_session, read_organisation_session
from gateway.config_reader import fmt_number
from gateway.errors import ConfigError, SettingsRefused
from gateway.policy import EndpointPolicy, policy_for
from gateway.settings import EndpointSessionSettings, EndpointSettings, OrganisationSessionSettings, Settings
from gateway.store.base import Store

log = logging.getLogger("gateway.runtime_settings")

ORGANISATION_SCOPE = "organisation"
_ENDPOINT_PREFIX = "endpoint:"
# Mapping-valued session keys whose own keys merge one by one (a PUT of on_close.notify keeps
# the stored on_close.messages). Deeper mappings (messages_by_channel) are values, replaced whole.
_MERGED_SECTIONS = ("on_close", "discard")

JSON = dict[str, Any]


def endpoint_scope(name: str) -> str:
    """The override scope of endpoint ``name``."""
    return f"{_ENDPOINT_PREFIX}{name}"


def to_json(value: Any) -> Any:
    """A settings dataclass (or a part of one) as plain JSON: enums by value, tuples as lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {str(key): to_json(item) for key, item in value.items()}
    return value


def merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> JSON:
    """``patch`` laid over ``base``: its keys replace, the sections' keys merge one by one."""
    result = dict(base)
    for key, value in patch.items():
        current = result.get(key)
        if key in _MERGED_SECTIONS and isinstance(value, Mapping) and isinstance(current, Mapping):
            result[key] = {**current, **value}
        else:
            result[key] = value
    return result


def _project(full: Mapping[str, Any], shape: Mapping[str, Any]) -> JSON:
    """The values of ``full`` (validated, normalised) at the keys ``shape`` sets."""
    result: JSON = {}
    for key, value in shape.items():
        if key in _MERGED_SECTIONS and isinstance(value, Mapping):
            section = full[key]
            result[key] = {name: section[name] for name in value}
        else:
            result[key] = full[key]
    return result


def _prefixed(prefix: str, problems: list[str]) -> list[str]:
    return [f"{prefix}{problem}" for problem in problems]


@dataclasses.dataclass(slots=True, frozen=True)
class Ignored:
    """A stored override that is not applied, and why."""

    value: JSON
    reason: str


@dataclasses.dataclass(slots=True, frozen=True)
class EndpointRuntime:
    """One endpoint's session settings as they apply now."""

    file: EndpointSettings
    session: EndpointSessionSettings  # the file's with the override laid over them
    override: JSON | None  # the applied override
    ignored: Ignored | None  # a stored override that is not applied
    policy: EndpointPolicy


def _file_scripts(settings: Settings) -> frozenset[str]:
    """The ``module:function`` close scripts the file names: the ones imported at start."""
    return frozenset(
        script
        for endpoint in settings.endpoints
        if (script := endpoint.session.on_close.script) and not script.startswith(("http://", "https://"))
    )


class RuntimeSettings:
    """The file's settings with stored overrides applied, and the changes allowed on them.

    Construction never fails: overrides that do not validate are left out (``warnings`` says
    which). The ``with_*`` methods return the override to store for a change, or raise
    ``SettingsRefused``; they change nothing themselves.
    """

    def __init__(self, settings: Settings, overrides: Mapping[str, JSON]) -> None:
        self.settings = settings
        self.stored = dict(overrides)
        self._scripts = _file_scripts(settings)
        self.warnings: list[str] = []
        self.organisation = settings.organisation
        self.organisation_override: JSON | None = None
        self.organisation_ignored: Ignored | None = None
        raw_org = overrides.get(ORGANISATION_SCOPE)
        if raw_org is not None:
            try:
                self.organisation = self._organisation_with(raw_org)
                self.organisation_override = raw_org
            except ConfigError as exc:
                reason = "; ".join(exc.problems)
                self.organisation_ignored = Ignored(raw_org, reason)
                self.warnings.append(f"organisation: stored runtime override {raw_org} is ignored: {reason}")
        self.endpoints: dict[str, EndpointRuntime] = {}
        for endpoint in settings.endpoints:
            self.endpoints[endpoint.name] = self._resolve(endpoint, overrides.get(endpoint_scope(endpoint.name)))
        for scope in overrides:
            if scope == ORGANISATION_SCOPE:
                continue
            name = scope.removeprefix(_ENDPOINT_PREFIX)
            if not scope.startswith(_ENDPOINT_PREFIX):
                self.warnings.append(f"stored runtime override of unknown scope {scope!r} is ignored")
            elif name not in self.endpoints:
                self.warnings.append(
                    f"endpoint {name}: stored runtime override is ignored: no such endpoint in {settings.source}"
                )

    # -- resolution ---------------------------------------------------------------------------

    def _organisation_with(self, patch: Mapping[str, Any]) -> OrganisationSessionSettings:
        return read_organisation_session(merge(to_json(self.settings.organisation), patch))

    def _session_with(self, endpoint: EndpointSettings, override: Mapping[str, Any]) -> EndpointSessionSettings:
        """The file's session settings of ``endpoint`` with ``override`` laid over them, checked
        by the file's rules. Raises ``ConfigError``."""
        session = read_endpoint_session(merge(to_json(endpoint.session), override), self.organisation)
        script = session.on_close.script
        if script and not script.startswith(("http://", "https://")) and script not in self._scripts:
            # Close scripts are imported once, at start, from the file (gateway.close_scripts).
            raise ConfigError(
                [
                    f"session.on_close.script: {script!r} is not loaded by this gateway "
                    "(a module:function set at run time must be one the configuration file names; "
                    "http(s) URLs are fine)"
                ]
            )
        return session

    def _resolve(self, endpoint: EndpointSettings, raw: JSON | None) -> EndpointRuntime:
        session, override, ignored = endpoint.session, None, None
        if raw is not None:
            try:
                session = self._session_with(endpoint, raw)
                override = raw
            except ConfigError as exc:
                reason = "; ".join(exc.problems)
                ignored = Ignored(raw, reason)
                self.warnings.append(f"endpoint {endpoint.name}: stored runtime override {raw} is ignored: {reason}")
        if override is None and self.organisation_override is not None:
            # The file's own value under bounds set at run time: applied anyway (it is the
            # operator's latest word; the organisation cap still applies), but said.
            try:
                read_endpoint_session(to_json(endpoint.session), self.organisation)
            except ConfigError as exc:
                self.warnings.append(
                    f"endpoint {endpoint.name}: file settings break the organisation bounds set at run time "
                    f"({'; '.join(exc.problems)}); they apply anyway"
                )
        policy = policy_for(dataclasses.replace(endpoint, session=session), self.organisation)
        return EndpointRuntime(endpoint, session, override, ignored, policy)

    def policies(self) -> dict[str, EndpointPolicy]:
        """Every configured endpoint's policy."""
        return {name: runtime.policy for name, runtime in self.endpoints.items()}

    def capped(self) -> list[str]:
        """S4: a line for each endpoint whose configured expiration the organisation value changes."""
        lines: list[str] = []
        for name, runtime in self.endpoints.items():
            configured = runtime.session.expiration_minutes
            effective = runtime.policy.expiration_minutes
            if configured is not None and configured != effective:
                shown = "0 (never)" if configured == 0 else fmt_number(configured)
                lines.append(
                    f"endpoint {name}: session.expiration_minutes {shown} is capped to {fmt_number(effective)} "
                    "by the organisation's expiration_minutes"
                )
        return lines

    # -- changes ------------------------------------------------------------------------------

    def with_endpoint(self, name: str, patch: Mapping[str, Any]) -> JSON:
        """The override of endpoint ``name`` after merging ``patch`` into the applied one."""
        runtime = self.endpoints[name]
        override = merge(runtime.override or {}, patch)
        try:
            session = self._session_with(runtime.file, override)
        except ConfigError as exc:
            raise SettingsRefused(exc.problems) from None
        return _project(to_json(session), override)

    def check_endpoint_reset(self, name: str) -> None:
        """Refuse to drop the override of ``name`` when the file's values break the bounds now
        applied (they were checked against the file's bounds only)."""
        runtime = self.endpoints[name]
        if runtime.override is None:
            return
        try:
            read_endpoint_session(to_json(runtime.file.session), self.organisation)
        except ConfigError as exc:
            raise SettingsRefused(
                [f"{problem} (the value in {self.settings.source.name})" for problem in exc.problems]
            ) from None

    def with_organisation(self, patch: Mapping[str, Any] | None) -> JSON | None:
        """The organisation override after merging ``patch`` (None: dropping it, back to the
        file). Refused when the result is invalid or excludes an endpoint's value (S5)."""
        override = None if patch is None else merge(self.organisation_override or {}, patch)
        try:
            organisation = self.settings.organisation if override is None else self._organisation_with(override)
        except ConfigError as exc:
            raise SettingsRefused(exc.problems) from None
        problems: list[str] = []
        for name, runtime in self.endpoints.items():
            try:
                read_endpoint_session(to_json(runtime.session), organisation)
            except ConfigError as exc:
                problems += _prefixed(f"endpoints.{name}.", exc.problems)
        if problems:
            raise SettingsRefused(problems)
        return None if override is None else _project(to_json(organisation), override)

    def with_stored(self, scope: str, value: JSON | None) -> RuntimeSettings:
        """The settings after storing ``value`` (None: deleting) at ``scope``."""
        overrides = dict(self.stored)
        if value is None:
            overrides.pop(scope, None)
        else:
            overrides[scope] = value
        return RuntimeSettings(self.settings, overrides)

    # -- JSON ---------------------------------------------------------------------------------

    def endpoint_json(self, name: str) -> JSON:
        """``GET /admin/endpoints/<name>/session``."""
        runtime = self.endpoints[name]
        body: JSON = {
            "configured": to_json(runtime.session),
            "effective_expiration_minutes": runtime.policy.expiration_minutes,
            "override": runtime.override,
        }
        if runtime.ignored is not None:
            body["ignored_override"] = {"value": runtime.ignored.value, "reason": runtime.ignored.reason}
        return body

    def organisation_json(self) -> JSON:
        """``GET /admin/organisation/session``."""
        body: JSON = {
            "configured": to_json(self.organisation),
            "override": self.organisation_override,
            "endpoints": {
                name: {"effective_expiration_minutes": runtime.policy.expiration_minutes}
                for name, runtime in self.endpoints.items()
            },
        }
        if self.organisation_ignored is not None:
            ignored = self.organisation_ignored
            body["ignored_override"] = {"value": ignored.value, "reason": ignored.reason}
        return body


async def load_runtime(settings: Settings, store: Store) -> RuntimeSettings:
    """The runtime settings from the stored overrides."""
    return RuntimeSettings(settings, await store.get_overrides())


class PolicyHolder(Protocol):
    """What ``apply_stored_settings`` needs of the session manager."""

    def policy(self, endpoint: str) -> EndpointPolicy | None: ...

    async def set_policy(self, policy: EndpointPolicy) -> None: ...


async def apply_stored_settings(settings: Settings, store: Store, manager: PolicyHolder) -> None:
    """Apply the stored overrides to the open sessions (several instances: another instance
    changed them): every endpoint whose policy differs from the one in force is re-applied."""
    runtime = await load_runtime(settings, store)
    for name, endpoint in runtime.endpoints.items():
        if endpoint.policy != manager.policy(name):
            await manager.set_policy(endpoint.policy)
            log.info(
                "endpoint %s: session settings changed through another instance (expiration %s min, mode %s)",
                name,
                endpoint.policy.expiration_minutes,
                endpoint.policy.mode.value,
            )


async def load_policies(settings: Settings, store: Store) -> dict[str, EndpointPolicy]:
    """The policy of every configured endpoint, with stored runtime overrides applied.

    An override for an endpoint no longer in the file, or one that no longer validates, is
    ignored with a logged warning (and kept stored).
    """
    runtime = await load_runtime(settings, store)
    for warning in runtime.warnings:
        log.warning("%s", warning)
    if runtime.stored:
        for name, endpoint in runtime.endpoints.items():
            if endpoint.override is not None:
                log.info("endpoint %s: runtime session settings %s apply over the file", name, endpoint.override)
        if runtime.organisation_override is not None:
            log.info("organisation: runtime session settings %s apply over the file", runtime.organisation_override)
        for line in runtime.capped():
            log.warning("%s", line)
    return runtime.policies()
