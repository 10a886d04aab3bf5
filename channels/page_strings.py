"""Every visible text of the web chat page and its widget, in one table (``webchat.strings``).

A deployment translates or rewords them with the endpoint's ``webchat.strings`` (unknown keys
are configuration errors, so a typo never passes silently). Plain data: the configuration
check reads it without the web stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

DEFAULT_STRINGS: Mapping[str, str] = MappingProxyType(
    {
        "lang": "en",  # the page's language (the html lang attribute), for screen readers
        "connecting": "Connecting…",
        "reconnecting": "Disconnected. Reconnecting…",
        "status_ready": "Connected",
        "status_open": "Conversation open",
        "status_closed": "This conversation has ended. Write to start a new one.",
        "ended": "Conversation ended",
        "new_conversation": "New conversation",
        "new_conversation_started": "New conversation started",
        "transcript_label": "Conversation",
        "you": "You",
        "bot": "Assistant",
        "notice": "Notice",
        "input_label": "Message",
        "placeholder": "Type a message…",
        "send": "Send",
        "sending": "Sending…",
        "retrying": "Not sent yet, trying again…",
        "too_long": "Not sent: the message is too long.",
        "open_chat": "Chat with us",
        "close_chat": "Close chat",
    }
)


def page_strings(overrides: Mapping[str, str]) -> dict[str, str]:
    """The defaults with an endpoint's ``webchat.strings`` applied."""
    return {**DEFAULT_STRINGS, **overrides}
