"""Run ``chat-gateway serve`` as a real subprocess (for restarts and kill -9)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class GatewayProcess:
    """One ``python -m gateway.cli serve --config PATH`` process and its log file."""

    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.port = port
        self.log_path = config.parent / "gateway.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, preexec_fn: Callable[[], None] | None = None) -> None:
        """Start it; ``preexec_fn`` runs in the child first (e.g. to lower its resource limits)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config)],
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
