"""What applies to an endpoint's sessions: effective expiration, mode, closure behaviour.

Built from the file's settings; runtime overrides (admin API) replace it at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.settings import (
    DiscardSettings,
    EndpointSettings,
    OnCloseSettings,
    OrganisationSessionSettings,
    SessionMode,
)
from gateway.settings import effective_expiration_minutes as _effective


@dataclass(slots=True, frozen=True)
class EndpointPolicy:
    """The session rules of one endpoint, resolved (S1-S5, S7-S12, S14)."""

    endpoint: str
    channel: str
    developer: bool
    expiration_minutes: float  # effective; 0 = never expires (S3)
    mode: SessionMode
    on_close: OnCloseSettings
    discard: DiscardSettings = field(default_factory=DiscardSettings)
    # The discard words as a user's text is compared with them (casefolded), once per policy
    # rather than once per message (session_rules.discard_command).
    discard_words: frozenset[str] = field(init=False, compare=False, repr=False)
    discard_all_words: frozenset[str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "discard_words", frozenset(w.casefold() for w in self.discard.words))
        object.__setattr__(self, "discard_all_words", frozenset(w.casefold() for w in self.discard.all_words))

    @property
    def expiration_s(self) -> float | None:
        """Seconds of inactivity before the session ends; None when it never does."""
        return self.expiration_minutes * 60.0 if self.expiration_minutes > 0 else None

    def deadline(self, last_activity_at: float) -> float | None:
        """The wall-clock deadline of a session last active at ``last_activity_at``."""
        seconds = self.expiration_s
        return None if seconds is None else last_activity_at + seconds


def policy_for(endpoint: EndpointSettings, organisation: OrganisationSessionSettings) -> EndpointPolicy:
    """Resolve the file's settings of ``endpoint`` under the organisation's default and cap."""
    session = endpoint.session
    return EndpointPolicy(
        endpoint=endpoint.name,
        channel=str(endpoint.channel),
        developer=endpoint.developer,
        expiration_minutes=_effective(session.expiration_minutes, organisation),
        mode=session.mode,
        on_close=session.on_close,
        discard=session.discard,
    )
