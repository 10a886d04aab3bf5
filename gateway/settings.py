"""Typed, validated settings. Built only by ``gateway.config.load_settings``; frozen after.

Secrets are held as ``Secret`` so that reprs and logs never show them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

DEFAULT_EXPIRATION_MINUTES = 30.0  # S2


class SessionMode(StrEnum):
    PROACTIVE = "proactive"  # S7: close at the deadline, without waiting for the user
    LAZY = "lazy"  # S8: judge the session when the user comes back


class StorageBackend(StrEnum):
    SQLITE = "sqlite"
    REDIS = "redis"


class FlowType(StrEnum):
    ECHO = "echo"
    HTTP = "http"


class LogFormat(StrEnum):
    TEXT = "text"  # "<time> <LEVEL> <logger>: <message>"
    JSON = "json"  # one object per line: ts, level, logger, message, endpoint, conversation, session_id


# The placeholders a closure text may use (S10; filled by gateway.session_rules.ClosureTexts).
CLOSURE_PLACEHOLDERS = ("expiration_minutes", "name")


@dataclass(slots=True, frozen=True)
class Secret:
    """A credential. Its repr and str are masked; read ``.value`` where it is really needed."""

    value: str

    def __repr__(self) -> str:
        return "Secret('**********')" if self.value else "Secret('')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self.value)


@dataclass(slots=True, frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = None  # the origin platforms call, e.g. https://bots.example.com
    max_body_bytes: int = 1_048_576
    # Accepted events not yet handled; past this, webhooks answer 503 (back-pressure).
    max_pending_events: int = 10_000
    # Peers whose X-Forwarded-For/-Proto/-Host are believed (gateway.proxies); empty: nobody.
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    max_connections: int = 2048  # open at once; past it new connections are closed at once
    read_timeout_seconds: float = 15.0  # a request's headers, and then its body, must arrive within


@dataclass(slots=True, frozen=True)
class StorageSettings:
    backend: StorageBackend = StorageBackend.SQLITE
    path: Path = Path("data/gateway.db")  # absolute after loading (relative to the config file)
    url: str | None = None  # redis
    key_prefix: str = "gw"  # redis: every key starts with "<key_prefix>:", so gateways can share a Redis


@dataclass(slots=True, frozen=True)
class AdminSettings:
    token: Secret = Secret("")  # empty: /admin/* answers 404


@dataclass(slots=True, frozen=True)
class OrganisationSessionSettings:
    """Organisation-wide expiration default and cap (S4) and the bounds (S5)."""

    expiration_minutes: float | None = None
    min_minutes: float = 5.0
    max_minutes: float = 20160.0


@dataclass(slots=True, frozen=True)
class FlowSettings:
    type: FlowType = FlowType.ECHO
    url: str | None = None
    timeout_seconds: float = 10.0
    error_reply: str | None = None  # sent to the user when the http flow fails


@dataclass(slots=True, frozen=True)
class DeliverySettings:
    """Outbox retries: exponential backoff with jitter, then a dead letter."""

    max_attempts: int = 8
    max_age_minutes: float = 1440.0
    base_delay_seconds: float = 0.5
    max_delay_seconds: float = 60.0


@dataclass(slots=True, frozen=True)
class RetentionSettings:
    """How long history is kept (pruned in the background, hourly)."""

    closed_sessions_days: float = 90.0  # closed sessions, then contacts left without any
    messages_days: float = 7.0  # sent and skipped outbox messages and their texts
    dedup_days: float = 7.0  # handled inbound events: dedup ids and the users' texts


@dataclass(slots=True, frozen=True)
class RateLimitSettings:
    """Sends per second to the platform; None takes the channel's default (see outbox)."""

    per_second: float | None = None  # the whole endpoint (Twilio: its sending number)
    per_conversation_per_second: float | None = None  # one conversation (Slack: one channel)


@dataclass(slots=True, frozen=True)
class DiscardSettings:
    """The user commands that stop the ongoing dialog without ending the session (S18)."""

    words: tuple[str, ...] = ("discard",)
    all_words: tuple[str, ...] = ("discard all",)
    reply: str | None = "Okay, let's drop that. What else can I do for you?"
    all_reply: str | None = "Okay, everything is cleared. What can I do for you?"


@dataclass(slots=True, frozen=True)
class OnCloseSettings:
    notify: bool = True  # S9
    messages: tuple[str, ...] = ("This conversation has ended. Write again any time to start a new one.",)
    messages_by_channel: dict[str, tuple[str, ...]] = field(default_factory=dict)  # S10
    clear_auth_profiles: bool = False  # S11
    script: str | None = None  # S12: module:function or http(s) URL
    script_timeout_seconds: float = 5.0


@dataclass(slots=True, frozen=True)
class EndpointSessionSettings:
    expiration_minutes: float | None = None  # None: inherit (organisation, else 30)
    mode: SessionMode = SessionMode.PROACTIVE
    on_close: OnCloseSettings = field(default_factory=OnCloseSettings)
    discard: DiscardSettings = field(default_factory=DiscardSettings)


@dataclass(slots=True, frozen=True)
class WebChatSettings:
    """The ``webchat:`` block of a web chat endpoint: who may embed it and its limits."""

    # Origins (``https://shop.example.com``) whose pages may open the socket and frame the page;
    # empty: only the gateway's own origin.
    allowed_origins: tuple[str, ...] = ()
    max_messages_per_minute: int = 30  # per socket; excess frames get an error frame
    max_new_conversations_per_hour: int = 20  # per client address; excess hellos get 429
    max_text_chars: int = 2000
    max_kept_messages: int = 100  # per conversation while no socket is connected; older dropped
    title: str | None = None  # page header; None: the endpoint name
    strings: dict[str, str] = field(default_factory=dict)  # overrides of the page's visible texts


@dataclass(slots=True, frozen=True)
class EndpointSettings:
    name: str
    channel: str  # a channels.registry.Channel value; the core never branches on it
    path: str  # webhook path; /webhooks/<name> unless overridden
    developer: bool = False  # S14
    api_base_url: str | None = None  # override of the platform API origin
    credentials: dict[str, Secret] = field(default_factory=dict)
    session: EndpointSessionSettings = field(default_factory=EndpointSessionSettings)
    rate_limit: RateLimitSettings = field(default_factory=RateLimitSettings)
    webchat: WebChatSettings = field(default_factory=WebChatSettings)  # channel webchat only

    def credential(self, key: str) -> str:
        """The plain value of credential ``key`` ('' when absent)."""
        secret = self.credentials.get(key)
        return secret.value if secret else ""


@dataclass(slots=True, frozen=True)
class Settings:
    source: Path  # the configuration file these settings came from
    server: ServerSettings = field(default_factory=ServerSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    organisation: OrganisationSessionSettings = field(default_factory=OrganisationSessionSettings)
    flow: FlowSettings = field(default_factory=FlowSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    endpoints: tuple[EndpointSettings, ...] = ()
    log_level: str = "INFO"
    log_format: LogFormat = LogFormat.TEXT
    retention: RetentionSettings = field(default_factory=RetentionSettings)

    def endpoint(self, name: str) -> EndpointSettings | None:
        for endpoint in self.endpoints:
            if endpoint.name == name:
                return endpoint
        return None


def effective_expiration_minutes(endpoint_value: float | None, organisation: OrganisationSessionSettings) -> float:
    """The expiration that applies to an endpoint (S2-S4); 0 means never.

    The endpoint's own value, else the organisation's, else 30. An organisation value that is
    set and non-zero caps the endpoint's: a higher value, or 0 (unlimited counts as higher),
    becomes the organisation value.
    """
    org = organisation.expiration_minutes
    if endpoint_value is None:
        value = org if org is not None else DEFAULT_EXPIRATION_MINUTES
    else:
        value = endpoint_value
    if org is not None and org != 0 and (value == 0 or value > org):
        value = org
    return value
