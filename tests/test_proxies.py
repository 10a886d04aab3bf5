"""``gateway.proxies``: the client's address and the called URL, believed from X-Forwarded-*
only when the socket's peer is a trusted proxy. Driven by real HTTP requests to a tiny aiohttp
app on 127.0.0.1 whose handler answers what the functions say, and through the config file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.proxies import Network, client_address, parse_networks, public_url
from tests.conftest import write_config

Probe = Callable[[list[str], dict[str, str]], Any]


@pytest.fixture
async def probe() -> AsyncIterator[Probe]:
    """``await probe(trusted, headers)`` -> ``{"client", "url"}`` as the gateway sees them."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def ask(trusted: list[str], headers: dict[str, str]) -> Any:
        networks = parse_networks(trusted)

        async def handler(request: web.Request) -> web.StreamResponse:
            return web.json_response(
                {"client": client_address(request, networks), "url": public_url(request, None, networks)}
            )

        app = web.Application()
        app.router.add_get("/hook", handler)
        client = TestClient(TestServer(app, host="127.0.0.1", port=0))
        await client.start_server()
        clients.append(client)
        response = await client.get("/hook?x=1", headers=headers)
        return await response.json()

    yield ask
    for client in clients:
        await client.close()


FORWARDED = {
    "X-Forwarded-For": "203.0.113.7, 198.51.100.2",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "bots.example.com",
}


async def test_an_untrusted_peer_is_the_client_and_its_forwarded_headers_are_ignored(probe: Probe) -> None:
    seen = await probe([], FORWARDED)
    assert seen["client"] == "127.0.0.1"
    assert seen["url"].startswith("http://127.0.0.1:") and seen["url"].endswith("/hook?x=1")


async def test_behind_a_trusted_proxy_the_client_is_the_nearest_untrusted_hop(probe: Probe) -> None:
    seen = await probe(["127.0.0.1"], FORWARDED)
    assert seen["client"] == "198.51.100.2"  # the hop our proxy saw; the left one is the client's say
    assert seen["url"] == "https://bots.example.com/hook?x=1"


async def test_a_chain_of_trusted_proxies_is_walked_right_to_left(probe: Probe) -> None:
    seen = await probe(["127.0.0.0/8", "10.0.0.0/8"], {"X-Forwarded-For": "203.0.113.7, 10.1.2.3"})
    assert seen["client"] == "203.0.113.7"


async def test_a_trusted_proxy_without_forwarded_for_is_itself_the_client(probe: Probe) -> None:
    assert (await probe(["127.0.0.1"], {}))["client"] == "127.0.0.1"


async def test_garbage_forwarded_values_from_a_trusted_proxy_never_raise(probe: Probe) -> None:
    seen = await probe(["127.0.0.1"], {"X-Forwarded-For": " , ,not-an-ip", "X-Forwarded-Host": "a:99999"})
    assert seen["client"] == "not-an-ip"
    assert seen["url"] == ""  # a host no URL can have: a signature over it can only fail


def test_networks_accept_addresses_and_cidrs_and_name_a_bad_entry() -> None:
    networks: tuple[Network, ...] = parse_networks(["10.0.0.1", "192.168.0.0/16", "2001:db8::/32"])
    assert [str(n) for n in networks] == ["10.0.0.1/32", "192.168.0.0/16", "2001:db8::/32"]
    with pytest.raises(ValueError, match="'10.0.0.300'"):
        parse_networks(["10.0.0.300"])


def test_config_reads_trusted_proxies_as_a_list_or_a_comma_separated_string(tmp_path: Path) -> None:
    path = write_config(tmp_path, [], server={"trusted_proxies": ["10.0.0.0/8", "127.0.0.1"]})
    assert [str(n) for n in load_settings(path, environ={}).server.trusted_proxies] == ["10.0.0.0/8", "127.0.0.1/32"]
    path = write_config(tmp_path, [], server={"trusted_proxies": "${PROXIES:-}"})
    assert load_settings(path, environ={}).server.trusted_proxies == ()
    assert len(load_settings(path, environ={"PROXIES": "10.0.0.1, 10.0.0.2"}).server.trusted_proxies) == 2
    path = write_config(tmp_path, [], server={"trusted_proxies": ["example.com"], "max_connections": 0})
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert any("server.trusted_proxies: 'example.com' is not an IP address or CIDR" in p for p in caught.value.problems)
    assert any("server.max_connections: 0 must be >= 1" in p for p in caught.value.problems)
