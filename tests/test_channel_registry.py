"""channels.registry: the one map from channel name to adapter, credentials, limits and routes."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
import textwrap

import pytest

from channels.base import HostedChannel, SessionListener, WebhookChannel
from channels.registry import (
    Channel,
    create_adapter,
    credentials_of,
    default_limits,
    entry_path,
    holding_channels,
    is_hosted,
    spec_of,
)
from gateway.settings import EndpointSettings, Secret

_CREDENTIAL_READ = re.compile(r"""\.credential\(\s*["']([a-z_]+)["']\s*\)""")


def endpoint_of(channel: Channel, name: str = "e") -> EndpointSettings:
    """An endpoint of ``channel`` holding every credential its spec declares."""
    required, optional = credentials_of(channel)
    credentials = {key: Secret(f"{key}-value") for key in required + optional}
    return EndpointSettings(name=name, channel=channel, path=f"/webhooks/{name}", credentials=credentials)


@pytest.mark.parametrize("channel", list(Channel))
def test_every_channel_has_an_adapter_served_as_its_spec_says(channel: Channel) -> None:
    adapter = create_adapter(endpoint_of(channel), clock=lambda: 1_700_000_000.0)
    assert adapter.channel == channel.value
    if is_hosted(channel):
        assert isinstance(adapter, HostedChannel)
    else:
        assert isinstance(adapter, WebhookChannel) and not isinstance(adapter, HostedChannel)


@pytest.mark.parametrize("channel", list(Channel))
def test_adapters_read_only_the_credentials_their_channel_declares(channel: Channel) -> None:
    module_name = spec_of(channel).adapter.partition(":")[0]
    read = set(_CREDENTIAL_READ.findall(inspect.getsource(importlib.import_module(module_name))))
    required, optional = credentials_of(channel)
    assert read <= set(required + optional)


@pytest.mark.parametrize(
    ("channel", "required", "optional"),
    [
        (Channel.MESSENGER, ("app_secret", "verify_token", "page_access_token"), ("api_version",)),
        (Channel.LINE, ("channel_secret", "channel_access_token"), ()),
        (Channel.SLACK, ("signing_secret", "bot_token"), ("bot_user_id",)),
        (Channel.TWILIO, ("account_sid", "auth_token", "from_number"), ()),
        (Channel.WEBCHAT, (), ()),
    ],
)
def test_credentials_of(channel: Channel, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    assert credentials_of(channel) == (required, optional)
    assert credentials_of(channel.value) == (required, optional)  # a plain name works as well


def test_slack_threads_share_their_channels_rate_limit_scope() -> None:
    scope = default_limits(Channel.SLACK).scope
    assert scope("C123:1700000000.000100") == scope("C123") == "C123"
    assert default_limits(Channel.TWILIO).scope("+15550001111") == "+15550001111"


def test_entry_path_is_the_hosted_path_or_the_webhook_path() -> None:
    assert entry_path(endpoint_of(Channel.WEBCHAT, "web")) == "/webchat/web"
    assert entry_path(endpoint_of(Channel.SLACK, "sl")) == "/webhooks/sl"


def test_only_web_chat_holds_undelivered_messages_and_listens_to_sessions() -> None:
    assert holding_channels() == {"webchat"}
    listeners = {c for c in Channel if isinstance(create_adapter(endpoint_of(c)), SessionListener)}
    assert listeners == {Channel.WEBCHAT}


def test_unknown_channel_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        spec_of("fax")


def test_check_config_loads_neither_the_web_stack_nor_platform_sdks() -> None:
    """The specs are plain data: validating a file imports no adapter."""
    code = textwrap.dedent(
        """
        import sys
        from channels.registry import Channel, credentials_of, default_limits, entry_path
        from gateway.config import load_settings
        for channel in Channel:
            credentials_of(channel), default_limits(channel)
        heavy = ("aiohttp", "slack_sdk", "twilio", "linebot", "channels.webchat", "channels.slack")
        print(sorted(name for name in sys.modules if name.startswith(heavy)))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
