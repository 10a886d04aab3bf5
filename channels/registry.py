"""Which adapter class serves which channel: the one place that maps channel names to code."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable

from channels.base import ChannelAdapter
from gateway.settings import Channel, EndpointSettings

_ADAPTERS: dict[Channel, str] = {
    Channel.MESSENGER: "channels.messenger:MessengerAdapter",
    Channel.LINE: "channels.line:LineAdapter",
    Channel.SLACK: "channels.slack:SlackAdapter",
    Channel.TWILIO: "channels.twilio_sms:TwilioAdapter",
    Channel.WEBCHAT: "channels.webchat:WebChatAdapter",
}


def create_adapter(endpoint: EndpointSettings, clock: Callable[[], float] = time.time) -> ChannelAdapter:
    """A new adapter for ``endpoint``. ``clock`` gives wall-clock seconds (tests may pass another)."""
    module_name, _, class_name = _ADAPTERS[endpoint.channel].partition(":")
    # Imported on demand: an operator using only web chat does not load the platform SDKs.
    adapter_class = getattr(importlib.import_module(module_name), class_name)
    adapter: ChannelAdapter = adapter_class(endpoint, clock=clock)
    return adapter
