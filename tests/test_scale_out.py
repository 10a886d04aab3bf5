"""Several ``chat-gateway serve`` processes on one Redis (the machine's, under a key prefix of the
test's own), a fake Messenger Send API on 127.0.0.1, signed webhooks spread round-robin over
the instances. Checked against the issue's promises:

- one reply per event, each conversation's replies in the order its messages were sent, one
  close and one closure notice per session, whichever instance took which webhook;
- kill -9 of one instance: its sessions still close once, within 2 s of their deadline, and its
  pending outbox messages (the platform was failing them) are sent once by the instances that
  take its conversations over;
- a runtime settings change through one instance applies on all (open sessions re-armed);
- the conversations are really spread: more than one instance owns some.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.conftest import ADMIN_TOKEN, write_config
from tests.fakeplatform import Answer, FakePlatform, RecordedRequest
from tests.gateway_process import GatewayProcess, free_port
from tests.kits.messenger import MESSENGER, SEND_PATH
from tests.redis_kit import REDIS_URL
from tests.test_restart import messenger_endpoint

ENDPOINT = "fb"
BYE = f"closed {ENDPOINT}"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Cluster:
    """N gateway processes sharing one Redis key prefix."""

    def __init__(self, root: Path, prefix: str, api_url: str) -> None:
        self.root = root
        self.prefix = prefix
        self.api_url = api_url
        self.nodes: list[GatewayProcess] = []

    async def start(self, count: int, minutes: float) -> None:
        for n in range(count):
            directory = self.root / f"node{n}"
            directory.mkdir()
            port = free_port()
            config = write_config(
                directory,
                [messenger_endpoint(ENDPOINT, minutes, self.api_url)],
                server={"host": "127.0.0.1", "port": port},
                storage={"backend": "redis", "url": REDIS_URL, "key_prefix": self.prefix},
                delivery={"base_delay_seconds": 0.2, "max_delay_seconds": 0.4},
            )
            self.nodes.append(GatewayProcess(config, port))
        for node in self.nodes:
            node.start()
        await asyncio.gather(*(node.wait_healthy() for node in self.nodes))

    def instance_id(self, node: GatewayProcess) -> str:
        match = re.search(r"instance (\w+) joined", node.log_path.read_text())
        assert match, node.log_path.read_text()[-2000:]
        return match.group(1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
async def cluster(tmp_path: Path, redis_prefix: str) -> AsyncIterator[Callable[[str], Cluster]]:
    made: list[Cluster] = []

    def make(api_url: str) -> Cluster:
        made.append(Cluster(tmp_path, redis_prefix, api_url))
        return made[-1]

    yield make
    for c in made:
        c.stop()


class Recipient:
    """The fake Send API's answer: accepted messages per recipient, or 500 for recipients in
    ``failing`` (nothing delivered)."""

    def __init__(self) -> None:
        self.delivered: dict[str, list[str]] = {}
        self.failing: set[str] = set()
        self.refusing: set[str] = set()  # a permanent refusal: the message becomes a dead letter
        self.refused: dict[str, int] = {}
        self.changed = asyncio.Event()

    def answer(self, request: RecordedRequest) -> Answer:
        body = request.json()
        psid = body["recipient"]["id"]
        if psid in self.refusing:
            self.refused[psid] = self.refused.get(psid, 0) + 1
            self.changed.set()
            return Answer(status=400, json_body={"error": {"message": "refused", "code": 100}})
        if psid in self.failing:
            self.refused[psid] = self.refused.get(psid, 0) + 1
            self.changed.set()
            return Answer(status=500, json_body={"error": {"message": "try later", "code": 2}})
        self.delivered.setdefault(psid, []).append(body["message"]["text"])
        self.changed.set()
        return Answer(json_body={"recipient_id": psid, "message_id": f"m{time.time_ns()}"})

    async def wait(self, done: Callable[[], bool], timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"delivered so far: {self.delivered}, refused: {self.refused}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))
            except TimeoutError:
                pass


@contextlib.asynccontextmanager
async def delivering_cluster(
    cluster: Callable[[str], Cluster], instances: int, *, minutes: float
) -> AsyncIterator[tuple[Cluster, Recipient]]:
    """``instances`` gateways sending to one fake Send API, whose answers ``Recipient`` gives."""
    recipient = Recipient()
    async with FakePlatform() as api:
        api.respond(SEND_PATH, recipient.answer)
        nodes = cluster(api.url)
        await nodes.start(instances, minutes=minutes)
        yield nodes, recipient


async def post(http: aiohttp.ClientSession, node: GatewayProcess, psid: str, text: str) -> None:
    inbound = MESSENGER.text(text, user=psid, event_id=f"{psid}-{text}")
    status = await MESSENGER.post_to(http, node.url, inbound, path=f"/webhooks/{ENDPOINT}")
    assert status == 200


async def sessions_of(http: aiohttp.ClientSession, node: GatewayProcess, psid: str) -> list[dict[str, Any]]:
    async with http.get(f"{node.url}/admin/contacts/{ENDPOINT}:{psid}", headers=ADMIN) as response:
        assert response.status == 200, await response.text()
        conversations: list[dict[str, Any]] = (await response.json())["conversations"]
        return conversations


def epoch(iso: str) -> float:
    from gateway.wire import parse_iso

    return parse_iso(iso)


async def owners(prefix: str, psids: list[str]) -> dict[str, str | None]:
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return {p: await client.hget(f"{prefix}:lease:{ENDPOINT}:{p}", "owner") for p in psids}
    finally:
        await client.aclose()


async def wait_recorded(prefix: str, psids: list[str], timeout_s: float = 10.0) -> None:
    """Until no message of these conversations is pending in the store."""
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        deadline = time.monotonic() + timeout_s
        while any([await client.scard(f"{prefix}:opend:{ENDPOINT}:{p}") for p in psids]):
            assert time.monotonic() < deadline, "messages still pending"
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()


async def test_round_robin_over_three_instances_one_reply_each_in_order_and_one_close_each(
    cluster: Callable[[str], Cluster],
) -> None:
    async with delivering_cluster(cluster, 3, minutes=0.04) as (nodes, recipient):  # 2.4 s of inactivity
        psids = [f"U{i}" for i in range(12)]
        texts = [f"m{j}" for j in range(5)]
        async with aiohttp.ClientSession() as http:

            async def conversation(i: int, psid: str) -> None:
                for j, text in enumerate(texts):  # message j of conversation i: instance (i + j) % 3
                    await post(http, nodes.nodes[(i + j) % 3], psid, text)

            await asyncio.gather(*(conversation(i, p) for i, p in enumerate(psids)))
            spread = {owner for owner in (await owners(nodes.prefix, psids)).values() if owner}
            assert len(spread) > 1  # the conversations really are spread over the instances
            await recipient.wait(lambda: all(recipient.delivered.get(p, [])[-1:] == [BYE] for p in psids))
            await asyncio.sleep(0.5)  # nothing more arrives: no second reply, no second notice
            for psid in psids:
                assert recipient.delivered[psid] == [*texts, BYE], psid
                [session] = await sessions_of(http, nodes.nodes[0], psid)
                assert (session["state"], session["close_reason"], session["notice"]) == (
                    "closed",
                    "inactivity",
                    "sent",
                )
                assert session["message_count"] == len(texts)
                assert 0 <= epoch(session["closed_at"]) - epoch(session["expires_at"]) < 0.5


async def test_kill_9_of_one_instance_its_sessions_close_once_and_its_pending_messages_go_once(
    cluster: Callable[[str], Cluster],
) -> None:
    async with delivering_cluster(cluster, 3, minutes=0.05) as (nodes, recipient):  # 3 s of inactivity
        victim, survivors = nodes.nodes[0], nodes.nodes[1:]
        mine = [f"V{i}" for i in range(6)]  # first message to the victim: it owns them
        stuck = [f"P{i}" for i in range(3)]  # owned by the victim, their replies failing
        others = [f"O{i}" for i in range(4)]
        async with aiohttp.ClientSession() as http:
            recipient.failing.update(stuck)
            await asyncio.gather(
                *(post(http, victim, p, "hello") for p in [*mine, *stuck]),
                *(post(http, survivors[i % 2], p, "hello") for i, p in enumerate(others)),
            )
            owned = await owners(nodes.prefix, [*mine, *stuck, *others])
            victim_id = nodes.instance_id(victim)
            assert all(owned[p] == victim_id for p in [*mine, *stuck])
            assert all(owned[p] not in (None, victim_id) for p in others)
            await recipient.wait(lambda: all(recipient.delivered.get(p) == ["hello"] for p in [*mine, *others]))
            await recipient.wait(lambda: all(recipient.refused.get(p, 0) >= 1 for p in stuck))
            # Kill outside the one window where a send can repeat (accepted, "sent" not yet
            # recorded): the victim has recorded every reply the platform accepted.
            await wait_recorded(nodes.prefix, mine)
            victim.kill()
            killed_at = time.time()
            recipient.failing.clear()
            everyone = [*mine, *stuck, *others]
            await recipient.wait(lambda: all(recipient.delivered.get(p, [])[-1:] == [BYE] for p in everyone))
            await asyncio.sleep(0.5)
            for psid in [*mine, *others]:
                assert recipient.delivered[psid] == ["hello", BYE], psid
            for psid in stuck:  # the victim's pending reply, sent once by its new owner
                assert recipient.delivered[psid] == ["hello", BYE], psid
            for psid in everyone:
                [session] = await sessions_of(http, survivors[0], psid)
                assert (session["state"], session["close_reason"], session["notice"]) == (
                    "closed",
                    "inactivity",
                    "sent",
                )
                late = epoch(session["closed_at"]) - epoch(session["expires_at"])
                assert 0 <= late < 2.0, (psid, late, epoch(session["expires_at"]) - killed_at)


async def test_a_settings_change_through_one_instance_applies_on_all(cluster: Callable[[str], Cluster]) -> None:
    async with delivering_cluster(cluster, 3, minutes=10) as (nodes, recipient):
        psids = [f"S{i}" for i in range(6)]
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(post(http, nodes.nodes[i % 3], p, "hi") for i, p in enumerate(psids)))
            await recipient.wait(lambda: all(recipient.delivered.get(p) == ["hi"] for p in psids))
            assert len({o for o in (await owners(nodes.prefix, psids)).values()}) == 3
            url = f"{nodes.nodes[0].url}/admin/endpoints/{ENDPOINT}/session"
            async with http.put(url, json={"expiration_minutes": 0.02}, headers=ADMIN) as response:
                assert response.status == 200, await response.text()
            changed_at = time.time()
            for node in nodes.nodes:
                async with http.get(f"{node.url}/admin/endpoints/{ENDPOINT}/session", headers=ADMIN) as response:
                    assert (await response.json())["effective_expiration_minutes"] == 0.02
            # Every instance re-armed the sessions it owns: all close at the new, shorter deadline.
            await recipient.wait(lambda: all(recipient.delivered.get(p) == ["hi", BYE] for p in psids), 10)
            for psid in psids:
                [session] = await sessions_of(http, nodes.nodes[2], psid)
                assert session["close_reason"] == "inactivity"
                new_deadline = epoch(session["last_activity_at"]) + 1.2
                assert epoch(session["closed_at"]) - max(new_deadline, changed_at) < 1.0
            assert json.loads(json.dumps(recipient.refused)) == {}


async def test_operator_actions_through_any_instance_reach_the_owner(cluster: Callable[[str], Cluster]) -> None:
    async with delivering_cluster(cluster, 2, minutes=10) as (nodes, recipient):
        owner, other = nodes.nodes
        async with aiohttp.ClientSession() as http:
            await post(http, owner, "A1", "hi")
            await post(http, owner, "A2", "hi")
            await recipient.wait(
                lambda: recipient.delivered.get("A1") == ["hi"] and recipient.delivered.get("A2") == ["hi"]
            )
            assert set((await owners(nodes.prefix, ["A1", "A2"])).values()) == {nodes.instance_id(owner)}
            [session] = await sessions_of(http, other, "A1")
            close_url = f"{other.url}/admin/sessions/{session['id']}/close"
            async with http.post(close_url, json={}, headers=ADMIN) as response:
                assert response.status == 200, await response.text()
                closed = await response.json()
            assert (closed["state"], closed["close_reason"]) == ("closed", "admin")
            async with http.post(close_url, json={}, headers=ADMIN) as response:
                assert response.status == 409
            message = {"endpoint": ENDPOINT, "conversation": "A2", "text": "from the bot"}
            async with http.post(f"{other.url}/admin/messages", json=message, headers=ADMIN) as response:
                assert response.status == 202, await response.text()
            await recipient.wait(lambda: recipient.delivered.get("A1") == ["hi", BYE])
            await recipient.wait(lambda: recipient.delivered.get("A2") == ["hi", "from the bot"])
            await asyncio.sleep(0.3)
            assert recipient.delivered == {"A1": ["hi", BYE], "A2": ["hi", "from the bot"]}
            # The owner did both: the conversations never moved.
            assert set((await owners(nodes.prefix, ["A1", "A2"])).values()) <= {nodes.instance_id(owner), None}


async def test_a_dead_letter_retried_through_another_instance_is_sent_once_by_the_owner(
    cluster: Callable[[str], Cluster],
) -> None:
    async with delivering_cluster(cluster, 2, minutes=10) as (nodes, recipient):
        owner, other = nodes.nodes
        async with aiohttp.ClientSession() as http:
            recipient.refusing.add("D1")
            await post(http, owner, "D1", "hello")
            await recipient.wait(lambda: recipient.refused.get("D1", 0) == 1)
            dead: list[dict[str, Any]] = []
            deadline = time.monotonic() + 10
            while not dead:
                assert time.monotonic() < deadline, "no dead letter"
                async with http.get(f"{other.url}/admin/dead-letters", headers=ADMIN) as response:
                    dead = (await response.json())["dead_letters"]
                await asyncio.sleep(0.05)
            [letter] = dead
            recipient.refusing.clear()
            async with http.post(f"{other.url}/admin/dead-letters/{letter['id']}/retry", headers=ADMIN) as response:
                assert response.status == 202, await response.text()
            await recipient.wait(lambda: recipient.delivered.get("D1") == ["hello"])
            await asyncio.sleep(0.5)
            assert recipient.delivered == {"D1": ["hello"]}  # once, by the conversation's owner
            assert (await owners(nodes.prefix, ["D1"]))["D1"] == nodes.instance_id(owner)
