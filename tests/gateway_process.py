"""Run ``chat-gateway serve`` as a real subprocess (for restarts and kill -9), and an http flow
server for it to call."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import write_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_cli(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m gateway.cli ARGS`` in ``directory`` run to its end, without GATEWAY_*
    variables around: exit code, stdout and stderr."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


class GatewayProcess:
    """One ``python -m gateway.cli serve --config PATH`` process and its log file; ``module``
    runs another module the same way (``python -m MODULE serve --config PATH``)."""

    def __init__(self, config: Path, port: int, *, module: str = "gateway.cli") -> None:
        self.config = config
        self.port = port
        self.module = module
        self.log_path = config.parent / "gateway.log"
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def configured(cls, directory: Path, endpoints: list[dict[str, Any]], **sections: Any) -> GatewayProcess:
        """A process (not started) for a config written to ``directory``, on a free port."""
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = write_config(directory, endpoints, server={"host": "127.0.0.1", "port": port}, **sections)
        return cls(config, port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, preexec_fn: Callable[[], None] | None = None) -> None:
        """Start it; ``preexec_fn`` runs in the child first (e.g. to lower its resource limits)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module, "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=preexec_fn,
            )

    async def wait_healthy(self, timeout_s: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        async with aiohttp.ClientSession() as http:
            while asyncio.get_running_loop().time() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"gateway exited {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
                try:
                    async with http.get(f"{self.url}/healthz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"gateway not healthy: {self.log_path.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: no cleanup runs, as in a crash."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout_s: float = 15.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class FlowServer:
    """An http flow on 127.0.0.1: answers "echo <text>" after a random delay of up to
    ``latency_s``; holds texts starting with "hold" until ``release`` is set. Use as
    ``async with FlowServer() as flow:`` (released and stopped at exit)."""

    def __init__(self, latency_s: float = 0.0, seed: int = 0) -> None:
        self.release = asyncio.Event()
        self.held = asyncio.Event()
        self.seen: list[str] = []
        self._latency_s = latency_s
        self._rng = random.Random(seed)
        app = web.Application()
        app.router.add_post("/flow", self._flow)
        self.server = TestServer(app, host="127.0.0.1", port=0)

    async def __aenter__(self) -> FlowServer:
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await self.server.close()

    @property
    def url(self) -> str:
        return str(self.server.make_url("/flow"))

    def config(self) -> dict[str, Any]:
        return {"type": "http", "url": self.url, "timeout_seconds": 30}

    async def _flow(self, request: web.Request) -> web.StreamResponse:
        text = (await request.json())["event"]["text"]
        self.seen.append(text)
        if text.startswith("hold") and not self.release.is_set():
            self.held.set()
            await self.release.wait()
        if self._latency_s:
            await asyncio.sleep(self._rng.uniform(0, self._latency_s))
        return web.json_response({"replies": [{"text": f"echo {text}"}]})
