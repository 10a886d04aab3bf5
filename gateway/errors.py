"""The gateway's exceptions, one tree, translated at the edges.

    GatewayError
    ├── ConfigError              bad configuration: every problem, one line each
    ├── RequestRejected          an inbound request we refuse (status set per subclass)
    │   ├── BadSignature         401: missing or wrong platform signature
    │   ├── Forbidden            403: e.g. a wrong Messenger verify token
    │   ├── BadPayload           400: a body that cannot be the platform's payload
    │   └── Overloaded           503: the backlog of accepted events passed its bound
    ├── DeliveryError            a send failed (retryable or not, with an optional delay)
    │   └── DeliveryDeferred     nobody to deliver to yet (web chat without a socket)
    ├── StoreError               storage failed or is unusable
    │   └── StoreLocked          another process holds the database
    └── FlowError                the flow failed or answered nonsense

Channel adapters wrap aiohttp/SDK errors into DeliveryError; stores wrap sqlite3/redis errors
into StoreError. Callers catch these classes only.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """Configuration is invalid; ``problems`` holds one ``<file>: <key>: <reason>`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class RequestRejected(GatewayError):
    """An inbound request is refused; the web layer answers ``status`` with ``reason``."""

    status = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadSignature(RequestRejected):
    """Missing or wrong signature (or a stale Slack timestamp)."""

    status = 401


class Forbidden(RequestRejected):
    """Authenticated but not allowed, e.g. a wrong Messenger verify token."""

    status = 403


class BadPayload(RequestRejected):
    """A body that cannot be the platform's payload."""

    status = 400


class Overloaded(RequestRejected):
    """Too many accepted events wait to be handled: come back later (back-pressure)."""

    status = 503


class DeliveryError(GatewayError):
    """Sending a message failed.

    ``retryable`` says whether trying again can help (timeouts, 5xx, 429); ``retry_after_s``
    is the platform's own requested delay, when it gave one.
    """

    def __init__(self, reason: str, *, retryable: bool, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class DeliveryDeferred(DeliveryError):
    """Nobody can receive the message now (a web chat with no socket): keep it, wake later."""

    def __init__(self, reason: str = "no connected client") -> None:
        super().__init__(reason, retryable=True)


class StoreError(GatewayError):
    """The store failed or cannot be used."""


class StoreLocked(StoreError):
    """Another gateway process already uses this database."""


class FlowError(GatewayError):
    """The flow failed, timed out, or answered something we cannot use."""


class DeliverySkipped(DeliveryError):
    """Platform policy forbids this send (Messenger 24 h window, Twilio opt-out): not an error
    to retry, recorded as ``skipped: <reason>``.

    ``refused_by_platform``: the platform itself refused a send it received (Twilio 21610,
    Messenger's own window error), which also makes it a dead letter operators can see and
    retry; False for a check the adapter made before sending.
    """

    def __init__(self, reason: str, *, refused_by_platform: bool = False) -> None:
        super().__init__(reason, retryable=False)
        self.refused_by_platform = refused_by_platform
