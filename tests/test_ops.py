"""Running it as an operator does, as real processes: JSON logs and the SIGTERM line, one-line
start-up failures, the demo fallback, backup and restore while serving, the effective
settings with runtime overrides, the health check, check-config's Redis check."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.logs import configure_logging
from gateway.settings import LogFormat
from tests.conftest import ADMIN_TOKEN, make_settings, webchat_endpoint, write_config
from tests.gateway_process import GatewayProcess, free_port

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**base, **(env or {})},
    )


def config(directory: Path, port: int, **sections: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(directory, [webchat_endpoint(minutes=0)], server={"port": port}, **sections)


@pytest.fixture
def processes() -> Iterator[list[GatewayProcess]]:
    running: list[GatewayProcess] = []
    yield running
    for process in running:
        process.stop()


async def say(url: str, text: str) -> str:
    """One web chat message in a new conversation, answered by the echo; the conversation id
    the server issued."""
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/webchat/web/ws") as ws:
        hello = await ws.receive_json()
        assert hello["type"] == "hello"
        await ws.send_json({"type": "message", "text": text})
        async for message in ws:
            frame = json.loads(message.data)
            if frame.get("type") == "message":
                return str(hello["conversation"])
    raise AssertionError("the socket closed before the echo")


async def test_json_logs_with_context_and_a_sigterm_line(tmp_path: Path, processes: list[GatewayProcess]) -> None:
    port = free_port()
    # DEBUG: the per-message lines ("session opened") carry the context, and they are DEBUG.
    gateway = GatewayProcess(config(tmp_path, port, logging={"format": "json", "level": "DEBUG"}), port)
    processes.append(gateway)
    gateway.start()
    await gateway.wait_healthy()
    conversation = await say(gateway.url, "hello")
    assert gateway.terminate() == 0
    lines = gateway.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= set(r) and r["ts"].endswith("Z") for r in records)
    opened = next(r for r in records if r["message"].startswith("session opened"))
    assert opened["endpoint"] == "web" and opened["conversation"] == conversation and len(opened["session_id"]) == 32
    assert any(r["message"] == "received SIGTERM: shutting down" and r["level"] == "INFO" for r in records)
    # At DEBUG, libraries (aiosqlite) log their own shutdown after ours: the gateway's last line.
    ours = [r for r in records if r["logger"].split(".")[0] in {"gateway", "channels"}]
    assert ours[-1]["message"] == "stopped"
    assert any(r["message"].startswith("serving on http://127.0.0.1:") for r in records)


def test_third_party_loggers_stay_at_warning_unless_debug() -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("gateway").level, logging.getLogger("channels").level)
    try:
        configure_logging(LogFormat.TEXT, "INFO")
        assert logging.getLogger("gateway.sessions").isEnabledFor(logging.INFO)
        assert logging.getLogger("channels.slack").isEnabledFor(logging.INFO)
        for noisy in ("twilio.http_client", "aiohttp.access", "slack_sdk.web", "urllib3.connectionpool"):
            assert not logging.getLogger(noisy).isEnabledFor(logging.INFO), noisy
            assert logging.getLogger(noisy).isEnabledFor(logging.WARNING), noisy
        configure_logging(LogFormat.JSON, "DEBUG")
        assert logging.getLogger("twilio.http_client").isEnabledFor(logging.DEBUG)
        configure_logging(LogFormat.TEXT, "ERROR")
        assert not logging.getLogger("gateway.sessions").isEnabledFor(logging.WARNING)
        assert not logging.getLogger("twilio.http_client").isEnabledFor(logging.WARNING)
    finally:
        root.setLevel(saved[0])
        for handler in list(root.handlers):
            if handler not in saved[1]:
                root.removeHandler(handler)
        logging.getLogger("gateway").setLevel(saved[2])
        logging.getLogger("channels").setLevel(saved[3])


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = config(tmp_path, port)
        result = cli("serve", "--config", str(path))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.endswith(f"ERROR gateway.app: cannot listen on 127.0.0.1:{port}: Address already in use"), line
    assert not (tmp_path / "gateway.db").exists()  # nothing else started


async def test_a_locked_store_is_one_line_and_exit_1(tmp_path: Path, processes: list[GatewayProcess]) -> None:
    port = free_port()
    first = GatewayProcess(config(tmp_path, port), port)
    processes.append(first)
    first.start()
    await first.wait_healthy()
    second = config(tmp_path / "second", free_port(), storage={"path": str(tmp_path / "gateway.db")})
    result = await asyncio.to_thread(cli, "serve", "--config", str(second))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "ERROR gateway.app: cannot start: database" in line and "in use by another gateway process" in line
    assert "Traceback" not in result.stderr


async def test_the_demo_config_runs_only_when_nothing_else_is_given(
    tmp_path: Path, processes: list[GatewayProcess]
) -> None:
    port = free_port()
    demo = config(tmp_path / "demo", port)
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}, "GATEWAY_DEMO_CONFIG": str(demo)}
    log_path = tmp_path / "demo.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve"], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    gateway = GatewayProcess(demo, port)
    gateway.process, gateway.log_path = process, log_path
    processes.append(gateway)
    await gateway.wait_healthy()
    assert gateway.terminate() == 0
    assert f"running the DEMO configuration {demo}" in log_path.read_text()
    # A configuration named by GATEWAY_CONFIG wins (here: a bad one, to see it was read).
    bad = tmp_path / "prod.yaml"
    bad.write_text("server: {port: nope}\n")
    result = cli("check-config", cwd=workdir, env={"GATEWAY_DEMO_CONFIG": str(demo), "GATEWAY_CONFIG": str(bad)})
    assert result.returncode == 2 and "server.port: 'nope' is not an integer" in result.stderr


async def test_backup_while_serving_and_restore(tmp_path: Path, processes: list[GatewayProcess]) -> None:
    port = free_port()
    path = config(tmp_path, port)
    gateway = GatewayProcess(path, port)
    processes.append(gateway)
    gateway.start()
    await gateway.wait_healthy()
    before = [await say(gateway.url, "before the backup") for _ in range(5)]
    copy = tmp_path / "backups" / "gateway-1.db"
    copy.parent.mkdir()
    # Messages keep arriving while the copy is taken.
    writes = asyncio.gather(*(say(gateway.url, "during") for _ in range(20)))
    result = await asyncio.to_thread(cli, "backup", "--config", str(path), str(copy))
    await writes
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{copy}: backup of {tmp_path / 'gateway.db'}, schema version ")
    conn = sqlite3.connect(copy)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one self-contained file
        conversations = {row[0] for row in conn.execute("SELECT conversation FROM sessions")}
    finally:
        conn.close()
    assert set(before) <= conversations
    assert not list(copy.parent.glob("*.partial"))
    again = await asyncio.to_thread(cli, "backup", "--config", str(path), str(copy))
    assert again.returncode == 1 and "exists already" in again.stderr

    # Restore: stop, put the copy in place (without the old WAL), start.
    assert gateway.terminate() == 0
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"gateway.db{suffix}").unlink(missing_ok=True)
    shutil.copy(copy, tmp_path / "gateway.db")
    restored = GatewayProcess(path, port)
    processes.append(restored)
    restored.start()
    await restored.wait_healthy()
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{restored.url}/admin/contacts/web:{before[0]}", headers=AUTH) as got,
    ):
        assert got.status == 200
        assert [m["text"] for m in (await got.json())["transcript"]] == ["before the backup"] * 2


async def test_settings_shows_runtime_overrides_with_secrets_masked(tmp_path: Path, start_gateway: Any) -> None:
    slack = {
        "name": "sl",
        "channel": "slack",
        "credentials": {"signing_secret": "s3cr3t-signing", "bot_token": "xoxb-s3cr3t", "bot_user_id": "UBOT"},
        "session": {"expiration_minutes": 30},
    }
    settings = make_settings(tmp_path, [slack], flow={"type": "http", "url": "http://bot:pa55@127.0.0.1:9/flow"})
    gateway = await start_gateway(settings)
    response = await gateway.client.put("/admin/endpoints/sl/session", json={"expiration_minutes": 10}, headers=AUTH)
    assert response.status == 200
    await gateway.client.close()
    result = cli("settings", "--config", str(tmp_path / "config.yaml"))
    assert result.returncode == 0, result.stderr
    for secret in ("s3cr3t", ADMIN_TOKEN, "pa55"):
        assert secret not in result.stdout
    shown = yaml.safe_load(result.stdout)
    [endpoint] = shown["endpoints"]
    assert endpoint["effective_expiration_minutes"] == 10  # the running gateway's, not the file's 30
    assert endpoint["override"] == {"expiration_minutes": 10.0}
    assert endpoint["credentials"] == {"signing_secret": "***", "bot_token": "***", "bot_user_id": "***"}
    assert shown["admin"]["token"] == "***" and shown["flow"]["url"] == "http://bot:***@127.0.0.1:9/flow"
    assert shown["runtime_overrides"].startswith("read from ")
    assert shown["retention"] == {"closed_sessions_days": 90.0, "messages_days": 7.0, "dedup_days": 7.0}


async def test_healthcheck_asks_the_configured_port(tmp_path: Path, processes: list[GatewayProcess]) -> None:
    port = free_port()
    path = config(tmp_path, port)
    assert (await asyncio.to_thread(cli, "healthcheck", "--config", str(path))).returncode == 1
    gateway = GatewayProcess(path, port)
    processes.append(gateway)
    gateway.start()
    await gateway.wait_healthy()
    result = await asyncio.to_thread(cli, "healthcheck", "--config", str(path))
    assert result.returncode == 0 and result.stdout.strip() == f"http://127.0.0.1:{port}/healthz: 200"


def test_check_config_needs_a_reachable_redis(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("storage: {backend: redis, url: 'redis://127.0.0.1:6379/15'}\n")
    reachable = cli("check-config", str(path))
    assert reachable.returncode == 0, reachable.stderr
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connections are refused
        path.write_text(f"storage: {{backend: redis, url: 'redis://:pw@127.0.0.1:{port}/0'}}\n")
        result = cli("check-config", str(path))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{path}: storage.url: redis://:***@127.0.0.1:{port}/0 is not reachable: ")
    assert "pw@" not in result.stderr


def test_check_config_checks_credential_values_and_placeholders(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        """
endpoints:
  - name: sms
    channel: twilio
    credentials: {account_sid: SK123, auth_token: t, from_number: "555-0001"}
    session: {on_close: {messages: ["Ended after {expiration_minute} minutes, {name}"]}}
  - name: sms2
    channel: twilio
    credentials: {account_sid: AC123, auth_token: t, from_number: MG0123abc}
  - name: sl
    channel: slack
    credentials: {signing_secret: s, bot_token: xoxp-user-token}
    session: {on_close: {messages_by_channel: {slack: ["bye {nmae}", "bye {name} after {expiration_minutes}"]}}}
"""
    )
    result = cli("check-config", str(path))
    assert result.returncode == 2
    assert sorted(result.stderr.splitlines()) == sorted(
        [
            f"{path}: endpoints.sms.credentials.account_sid: must be an account SID starting with AC",
            f"{path}: endpoints.sms.credentials.from_number: must be a number in E.164 form (+15551234567) "
            "or a Messaging Service SID (MG...)",
            f"{path}: endpoints.sms.session.on_close.messages[0]: unknown placeholder {{expiration_minute}} "
            "(known: {expiration_minutes}, {name})",
            f"{path}: endpoints.sl.credentials.bot_token: must be a bot token starting with xoxb-",
            f"{path}: endpoints.sl.session.on_close.messages_by_channel.slack[0]: unknown placeholder {{nmae}} "
            "(known: {expiration_minutes}, {name})",
        ]
    )
    assert "xoxp-user-token" not in result.stderr and "SK123" not in result.stderr
