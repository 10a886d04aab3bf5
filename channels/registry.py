"""The one map from channel name to platform: its adapter class, credentials, default rate
limits and how it is served. The core asks here and names no platform itself.

A new platform is an adapter module under ``channels/`` plus one ``Channel`` member and one
``ChannelSpec`` below. The specs are plain data, so configuration checks read them without
importing the adapters (nor the platform SDKs they load); an adapter class is imported when an
endpoint of its channel is created.

Default rate limits (CHANNELS.md); an endpoint's ``rate_limit`` settings replace them one by one:

=========  =======================  ==================================================
channel    default                  why
=========  =======================  ==================================================
slack      1/s per channel          Slack: about one message per second per channel
twilio     1/s per endpoint         a long code sends about one segment per second, and
                                    one endpoint has one ``from_number``
line       2000/s per endpoint      LINE: 2000 requests/s per channel
messenger  300/s per endpoint       Send API: about 300 calls/s per page
webchat    none                     our own sockets
=========  =======================  ==================================================
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from enum import StrEnum

from channels.base import ChannelAdapter, ChannelSpec, Limits
from gateway.settings import EndpointSettings


class Channel(StrEnum):
    MESSENGER = "messenger"
    LINE = "line"
    SLACK = "slack"
    TWILIO = "twilio"
    WEBCHAT = "webchat"


def _slack_channel(conversation: str) -> str:
    """Slack limits per channel; ``<channel>:<thread_ts>`` threads share their channel's."""
    return conversation.partition(":")[0]


_SPECS: dict[Channel, ChannelSpec] = {
    Channel.MESSENGER: ChannelSpec(
        adapter="channels.messenger:MessengerAdapter",
        credentials=("app_secret", "verify_token", "page_access_token"),
        optional_credentials=("api_version",),
        limits=Limits(per_second=300.0),
    ),
    Channel.LINE: ChannelSpec(
        adapter="channels.line:LineAdapter",
        credentials=("channel_secret", "channel_access_token"),
        limits=Limits(per_second=2000.0),
    ),
    Channel.SLACK: ChannelSpec(
        adapter="channels.slack:SlackAdapter",
        credentials=("signing_secret", "bot_token"),
        optional_credentials=("bot_user_id",),
        limits=Limits(per_conversation_per_second=1.0, scope=_slack_channel),
        # A user token (xoxp-) or app token (xapp-) would post as someone else or not at all.
        credential_formats={"bot_token": (r"xoxb-\S+", "a bot token starting with xoxb-")},
    ),
    Channel.TWILIO: ChannelSpec(
        adapter="channels.twilio_sms:TwilioAdapter",
        credentials=("account_sid", "auth_token", "from_number"),
        limits=Limits(per_second=1.0),
        credential_formats={
            # An API key SID (SK...) is not an account SID.
            "account_sid": (r"AC[0-9A-Za-z]+", "an account SID starting with AC"),
            "from_number": (
                r"\+[1-9][0-9]{1,14}|MG[0-9A-Za-z]+",
                "a number in E.164 form (+15551234567) or a Messaging Service SID (MG...)",
            ),
        },
    ),
    Channel.WEBCHAT: ChannelSpec(
        adapter="channels.webchat:WebChatAdapter",
        hosted_path="/webchat/{name}",
        holds_undelivered=True,
    ),
}


def spec_of(channel: str) -> ChannelSpec:
    """The spec of ``channel`` (a ``Channel`` value); ValueError for an unknown name."""
    return _SPECS[Channel(channel)]


def credentials_of(channel: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The credential keys ``channel`` takes: (required, optional)."""
    spec = spec_of(channel)
    return spec.credentials, spec.optional_credentials


def credential_formats(channel: str) -> dict[str, tuple[str, str]]:
    """Credential -> (regular expression for its whole value, what it must be), for ``channel``."""
    return dict(spec_of(channel).credential_formats)


def default_limits(channel: str) -> Limits:
    """The rate limits of ``channel`` when an endpoint sets none."""
    return spec_of(channel).limits


def is_hosted(channel: str) -> bool:
    """Whether ``channel`` serves its own routes instead of a webhook at the endpoint's path."""
    return spec_of(channel).hosted_path is not None


def entry_path(endpoint: EndpointSettings) -> str:
    """The path users or the platform call for ``endpoint``: the hosted path of its channel
    (web chat: ``/webchat/<name>``), else its webhook path."""
    hosted = spec_of(endpoint.channel).hosted_path
    return endpoint.path if hosted is None else hosted.format(name=endpoint.name)


def holding_channels() -> frozenset[str]:
    """The channels whose undeliverable messages stay pending until the user connects."""
    return frozenset(channel.value for channel, spec in _SPECS.items() if spec.holds_undelivered)


def create_adapter(endpoint: EndpointSettings, clock: Callable[[], float] = time.time) -> ChannelAdapter:
    """A new adapter for ``endpoint``. ``clock`` gives wall-clock seconds (tests may pass another)."""
    module_name, _, class_name = spec_of(endpoint.channel).adapter.partition(":")
    # Imported on demand: an operator using only web chat does not load the platform SDKs.
    adapter_class = getattr(importlib.import_module(module_name), class_name)
    adapter: ChannelAdapter = adapter_class(endpoint, clock=clock)
    return adapter
