"""The gateway's exceptions, one tree, translated at the edges.

    GatewayError
    ├── ConfigError                bad configuration: every problem, one line each
    ├── Invalid                    one configuration value is unusable (becomes a ConfigError line)
    ├── RequestRejected            a request we refuse: answered with its status (gateway.http_errors)
    │   ├── BadSignature           401: missing or wrong platform signature
    │   ├── Unauthorized           401: missing or wrong admin bearer token
    │   ├── Forbidden              403: e.g. a wrong Messenger verify token
    │   ├── BadPayload             400: a body or query that cannot be what the route takes
    │   │   └── SettingsRefused    400: a runtime settings change breaks the rules (``problems``)
    │   ├── NotFound               404: no such session, contact, endpoint, message
    │   │   ├── SessionNotFound    404: no session with this id
    │   │   └── MessageNotFound    404: no outbox message with this id
    │   ├── Conflict               409: it exists, but its state forbids the request
    │   │   ├── SessionNotOpen     409: the session is closed already
    │   │   └── MessageNotDead     409: the message is not a dead letter
    │   ├── TooManyRequests        429: a client passed its limit (web chat: new conversations)
    │   ├── Overloaded             503: the backlog of accepted events passed its bound
    │   └── Unavailable            503: the store cannot take the event now (Redis down or slow)
    ├── DeliveryError              a send failed (retryable or not, with an optional delay)
    │   ├── DeliveryDeferred       nobody to deliver to yet (web chat without a socket)
    │   ├── DeliverySkipped        platform policy forbids this send (24 h window, opt-out)
    │   └── ReplyTokenRejected     LINE refused a reply token: the adapter pushes instead
    ├── StoreError                 storage failed or is unusable
    │   └── StoreLocked            another process holds the database
    ├── FlowError                  the flow failed or answered nonsense
    └── CloseScriptError           a close script failed, timed out or answered nonsense

Channel adapters wrap aiohttp/SDK errors into DeliveryError; stores wrap sqlite3/redis errors
into StoreError. Callers catch these classes only. The web layer's one error middleware
(``gateway.http_errors``) turns every RequestRejected into ``{"error": reason}`` (with
``"problems"`` when it lists them) and its class's ``status``; no handler answers an error itself.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """Configuration is invalid; ``problems`` holds one ``<file>: <key>: <reason>`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Invalid(GatewayError):
    """A configuration value is unusable (raised by converters, collected by the config reader).

    ``reason`` is None when its problems are already reported.
    """

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason


class RequestRejected(GatewayError):
    """A request is refused; the web layer answers ``status`` with ``{"error": reason}``, and
    ``"problems"`` too when the error lists them.

    ``detail``, when given, is the exception's message (logs) instead of ``reason``: an answer
    says no more than ``reason``.
    """

    status = 400
    problems: list[str] | None = None

    def __init__(self, reason: str, *, detail: str | None = None) -> None:
        super().__init__(reason if detail is None else detail)
        self.reason = reason


class BadSignature(RequestRejected):
    """Missing or wrong signature (or a stale Slack timestamp)."""

    status = 401


class Unauthorized(RequestRejected):
    """Missing or wrong admin bearer token (answered with ``WWW-Authenticate: Bearer``)."""

    status = 401


class Forbidden(RequestRejected):
    """Authenticated but not allowed, e.g. a wrong Messenger verify token."""

    status = 403


class BadPayload(RequestRejected):
    """A body or query that cannot be what the route takes (a platform's payload, an admin body)."""

    status = 400


class SettingsRefused(BadPayload):
    """A runtime change breaks the file's rules; ``problems`` holds ``<dotted.key>: <reason>`` lines."""

    problems: list[str]

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class NotFound(RequestRejected):
    """The request names something that does not exist (``reason``: e.g. "no such contact")."""

    status = 404


class SessionNotFound(NotFound):
    """No session with this id."""

    def __init__(self, detail: str) -> None:
        super().__init__("no such session", detail=detail)


class MessageNotFound(NotFound):
    """No outbox message with this id."""

    def __init__(self, detail: str) -> None:
        super().__init__("no such message", detail=detail)


class Conflict(RequestRejected):
    """What the request names exists, but its state forbids the request."""

    status = 409


class SessionNotOpen(Conflict):
    """The session is closed already."""

    def __init__(self, detail: str) -> None:
        super().__init__("session is closed already", detail=detail)


class MessageNotDead(Conflict):
    """The message is not a dead letter (pending, sent or skipped)."""

    def __init__(self, detail: str) -> None:
        super().__init__("message is not a dead letter", detail=detail)


class TooManyRequests(RequestRejected):
    """One client asked too often (web chat: new conversations per address): come back later."""

    status = 429


class Overloaded(RequestRejected):
    """Too many accepted events wait to be handled: come back later (back-pressure)."""

    status = 503


class Unavailable(RequestRejected):
    """The store cannot take the request now (Redis down or slow): come back later. Never a
    2xx for an event that is not stored."""

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
    """Nobody can receive the message now (a web chat with no socket): keep it in the store,
    not in memory, until the conversation wakes. ``keep``: at most this many pending messages
    of the conversation are kept; older ones are dropped (None: no cap)."""

    def __init__(self, reason: str = "no connected client", *, keep: int | None = None) -> None:
        super().__init__(reason, retryable=True)
        self.keep = keep


class StoreError(GatewayError):
    """The store failed or cannot be used."""


class StoreLocked(StoreError):
    """Another gateway process already uses this database."""


class LeaseLost(StoreError):
    """A write was refused because its conversation's lease (fencing token) moved to another
    instance: this instance must forget the conversation; the new owner carries on."""

    def __init__(self, contact_id: str) -> None:
        super().__init__(f"conversation {contact_id} is owned by another instance now")
        self.contact_id = contact_id


class FlowError(GatewayError):
    """The flow failed, timed out, or answered something we cannot use."""


class CloseScriptError(GatewayError):
    """The close script failed, timed out or answered nonsense."""


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


class ReplyTokenRejected(DeliveryError):
    """LINE refused a reply token; the adapter pushes the message instead (never leaves it)."""

    def __init__(self, reason: str = "line: reply token refused") -> None:
        super().__init__(reason, retryable=True)
