"""Benchmark B1: the echo path's throughput and latency against three baselines, in one run.

    .venv/bin/python bench/ingest.py [--seconds 10] [--connections 32] [--rounds 1]
                                     [--servers aiohttp,relay,bolt,gateway] [--py-spy DIR]
                                     [--before GIT-REF]

Signed Slack ``message`` events, each from a new user in a new DM channel (so each one opens a
session in the gateway), are sent by wrk (a C load generator in its own process; Debian's
``wrk`` package, installed here with apt-get when missing) with ``--connections`` keep-alive
connections for ``--seconds``, from a file of events signed before each server's turn
(``bench/ingest.lua`` cycles through them, each sent once). Each server runs in its own process
and posts its replies to one fake Slack Web API (``bench/fake_slack.py``, another process), which
counts the distinct texts it received: every event must be answered, once.

The servers, one after the other, each on a fresh process:

- ``aiohttp``: bare aiohttp answering 200 (no reply): the ceiling;
- ``relay``: verify the signature, parse, answer 200, post the echo with one pooled aiohttp
  client (bounded in flight): the floor of any echo gateway in one Python process;
- ``bolt``: slack-bolt's ``AsyncApp`` echoing with ``say()`` (the ``bench`` extra);
- ``gateway``: ``python -m gateway.cli serve`` (what ``scripts/serve`` runs) on a config with one
  Slack endpoint, the echo flow, SQLite in a temp dir and the default logging level (INFO).

``--before REF`` adds a ``before`` row: the gateway as of that commit (``git archive`` into the
temp dir, run with the same venv), just before ``gateway``, for before/after ratios of a change.

Printed per server: requests/s, latency p50 / p99 / max as wrk measured it (closed loop, so
latency and throughput trade), non-2xx answers, replies counted at the fake, and the server
process's CPU time per request (user + system, all its threads; "(loop)" its main thread alone,
the event loop): less sensitive than the rest to other work on the machine. Then the issue-9
ratios: gateway/relay and gateway/bolt throughput, gateway p99 / relay p99. The machine is
shared: compare ratios from one run, and note the load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SECRET = "bench-signing-secret"
PATH = "/slack/events"
SERVERS = ("aiohttp", "relay", "bolt", "gateway")
EVENTS_PER_SECOND_CAP = 25_000  # events signed per second of --seconds; more than any server here answers
WARMUP_EVENTS = 300


# -- machine and tools -------------------------------------------------------------------------------


def ensure_tool(binary: str, package: str | None = None) -> str:
    """The path of ``binary``; installed from Debian's ``package`` (default: the same name) when
    missing (needs root)."""
    found = shutil.which(binary)
    if found:
        return found
    package = package or binary
    print(f"{binary} is missing: apt-get install -y {package}", flush=True)
    subprocess.run(["apt-get", "install", "-y", package], check=True, stdout=subprocess.DEVNULL)
    found = shutil.which(binary)
    if not found:
        raise SystemExit(f"{binary} could not be installed")
    return found


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {model}"


def load() -> str:
    with open("/proc/loadavg") as loadavg:
        return "load average " + " ".join(loadavg.read().split()[:3])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of a process, all its threads (or of its thread ``tid``)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- events ------------------------------------------------------------------------------------------


def write_events(path: Path, tag: str, count: int, start: int = 0) -> None:
    """``count`` signed Slack events, one per line: timestamp, signature, body (see ingest.lua).
    Each has its own event_id, user, DM channel and text (``<tag>-<n>``)."""
    key = SECRET.encode()
    now = int(time.time())
    timestamp = str(now).encode()
    with open(path, "wb") as out:
        for n in range(start, start + count):
            ts = f"{now}.{n % 1_000_000:06d}"
            body = (
                '{"token":"legacy","team_id":"T1","api_app_id":"A1","type":"event_callback",'
                f'"event_id":"Ev{tag}{n:08d}","event_time":{now},"event":{{"type":"message",'
                f'"channel":"D{n:09d}","user":"U{n:09d}","text":"{tag}-{n}","ts":"{ts}","event_ts":"{ts}",'
                '"channel_type":"im"}}'
            ).encode()
            signature = hmac.new(key, b"v0:" + timestamp + b":" + body, hashlib.sha256).hexdigest()
            out.write(timestamp + b"\tv0=" + signature.encode() + b"\t" + body + b"\n")


async def warm_up(url: str, events: Path, in_flight: int = 32) -> None:
    """Send the warm-up events (a few hundred, ``in_flight`` at a time) before the measured run."""
    lines = events.read_bytes().splitlines()
    semaphore = asyncio.Semaphore(in_flight)
    async with aiohttp.ClientSession() as http:

        async def post(line: bytes) -> None:
            timestamp, signature, body = line.split(b"\t", 2)
            headers = {
                "Content-Type": "application/json",
                "X-Slack-Request-Timestamp": timestamp.decode(),
                "X-Slack-Signature": signature.decode(),
            }
            async with semaphore, http.post(url, data=body, headers=headers) as response:
                await response.read()

        await asyncio.gather(*(post(line) for line in lines))


# -- the fake API ------------------------------------------------------------------------------------


class Fake:
    """The fake Slack API process and its counters."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.origin = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, str(BENCH / "fake_slack.py"), "--port", str(port)])

    async def call(self, method: str, path: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.request(method, self.origin + path) as response:
            return dict(await response.json())

    async def replies_settled(self, expected: int, timeout_s: float = 30.0) -> int:
        """Distinct replies, once they reach ``expected`` or stop growing for 2 s."""
        deadline = time.monotonic() + timeout_s
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            unique = int((await self.call("GET", "/count"))["unique"])
            if unique >= expected:
                return unique
            if unique != last:
                last, since = unique, time.monotonic()
            elif time.monotonic() - since > 2.0:
                return unique
            await asyncio.sleep(0.2)
        return last

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


# -- the servers -------------------------------------------------------------------------------------


def gateway_config(directory: Path, port: int, api: str) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"backend": "sqlite", "path": "gateway.db"},
        "flow": {"type": "echo"},
        "endpoints": [
            {
                "name": "slack",
                "channel": "slack",
                "path": PATH,
                "api_base_url": api,
                "credentials": {"signing_secret": SECRET, "bot_token": "xoxb-bench", "bot_user_id": "UBOT"},
            }
        ],
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def export_tree(ref: str, workdir: Path) -> Path:
    """The project's files as of git ``ref``, for the ``before`` server."""
    tree = workdir / "before-src"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def start_server(
    kind: str, port: int, api: str, directory: Path, before: Path | None, wrapper: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """The server ``kind`` in its own process (``wrapper``: a command it runs under, e.g. valgrind)."""
    log = open(directory / f"{kind}.log", "wb")  # the child writes it
    cwd = ROOT
    if kind in ("gateway", "before"):
        config = gateway_config(directory, port, api)
        # ``-m`` puts the working directory first on sys.path: the ``before`` tree's packages
        # win over the venv's editable install of this one.
        command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
        if kind == "before":
            assert before is not None
            cwd = before
    else:
        command = [sys.executable, str(BENCH / "ingest_servers.py"), kind, "--port", str(port), "--api", api]
        command += ["--secret", SECRET]
    return subprocess.Popen([*wrapper, *command], cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


async def wait_ready(kind: str, port: int, process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    gateway = kind in ("gateway", "before")
    url = f"http://127.0.0.1:{port}" + ("/healthz" if gateway else PATH)
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{kind} exited with {process.returncode} before it was ready")
            try:
                async with http.request("GET" if gateway else "POST", url) as response:
                    if not gateway or response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{kind} did not become ready")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class Result:
    server: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    wraps: int
    replies: int | None  # None: this server does not reply
    cpu_s: float
    main_cpu_s: float  # of the main thread (the event loop) alone

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def missing(self) -> int:
        return 0 if self.replies is None else max(0, self.requests - self.non_2xx - self.replies)


async def measure(
    kind: str, args: argparse.Namespace, fake: Fake, wrk: str, workdir: Path, tag: str, before: Path | None
) -> Result:
    directory = workdir / f"{tag}-{kind}"
    directory.mkdir()
    port = free_port()
    process = start_server(kind, port, fake.origin, directory, before, tuple(os.environ["INGEST_WRAP"].split()) if kind == "gateway" and os.environ.get("INGEST_WRAP") else ())
    spy: subprocess.Popen[bytes] | None = None
    try:
        await wait_ready(kind, port, process)
        url = f"http://127.0.0.1:{port}{PATH}"
        warm = directory / "warm.events"
        write_events(warm, f"{tag}w", WARMUP_EVENTS)
        await warm_up(url, warm)
        if kind != "aiohttp":
            await fake.replies_settled(WARMUP_EVENTS, 15)
        await fake.call("POST", "/reset")
        events = directory / "run.events"
        write_events(events, tag, int(args.seconds * EVENTS_PER_SECOND_CAP), start=WARMUP_EVENTS)
        env = {**os.environ, "INGEST_EVENTS": str(events), "INGEST_PATH": PATH, "INGEST_THREADS": str(args.threads)}
        command = [wrk, "-t", str(args.threads), "-c", str(args.connections), "-d", f"{args.seconds:g}s"]
        command += ["--timeout", "10s", "-s", str(BENCH / "ingest.lua"), url]
        if args.py_spy and kind in ("gateway", "before"):
            out = Path(args.py_spy) / f"{tag}-{kind}.txt"
            spy_command = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(process.pid)]
            spy_command += ["--duration", f"{int(args.seconds)}"]
            spy_command += ["--format", "raw", "--threads", "--gil", "--rate", "400", "--nonblocking", "-o", str(out)]
            spy = subprocess.Popen(spy_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu_before, main_before = cpu_seconds(process.pid), cpu_seconds(process.pid, process.pid)
        run = await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True, text=True, check=True)
        cpu_s = cpu_seconds(process.pid) - cpu_before
        main_cpu_s = cpu_seconds(process.pid, process.pid) - main_before
        line = next((x for x in run.stdout.splitlines() if x.startswith("INGEST_RESULT ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no result:\n{run.stdout}\n{run.stderr}")
        figures = json.loads(line.removeprefix("INGEST_RESULT "))
        requests = int(figures["requests"])
        replies = None
        if kind != "aiohttp":
            replies = await fake.replies_settled(requests - int(figures["status_errors"]))
        return Result(
            server=kind,
            requests=requests,
            seconds=figures["duration_us"] / 1e6,
            p50_ms=figures["p50_us"] / 1000,
            p99_ms=figures["p99_us"] / 1000,
            max_ms=figures["max_us"] / 1000,
            non_2xx=int(figures["status_errors"]),
            socket_errors=sum(int(figures[k]) for k in ("connect_errors", "read_errors", "write_errors", "timeouts")),
            wraps=int(figures["wraps"]),
            replies=replies,
            cpu_s=cpu_s,
            main_cpu_s=main_cpu_s,
        )
    finally:
        if spy is not None:
            spy.wait(30)
        stop_server(process)


def table(results: list[Result]) -> list[str]:
    lines = [
        f"{'server':8s} {'req/s':>7s} {'p50 ms':>7s} {'p99 ms':>7s} {'max ms':>7s} {'non-2xx':>7s} "
        f"{'replies':>8s} {'missing':>7s} {'CPU us/req':>10s} {'(loop)':>6s}"
    ]
    for r in results:
        replies = "-" if r.replies is None else str(r.replies)
        lines.append(
            f"{r.server:8s} {r.rate:7.0f} {r.p50_ms:7.1f} {r.p99_ms:7.1f} {r.max_ms:7.1f} {r.non_2xx:7d} "
            f"{replies:>8s} {r.missing:7d} {r.cpu_s / max(r.requests, 1) * 1e6:10.0f}"
            f" {r.main_cpu_s / max(r.requests, 1) * 1e6:6.0f}"
            + (f"  (socket errors {r.socket_errors})" if r.socket_errors else "")
            + (f"  (events file wrapped {r.wraps}x: raise EVENTS_PER_SECOND_CAP)" if r.wraps and r.replies else "")
        )
    return lines


def ratios(results: list[Result]) -> dict[str, float]:
    by = {r.server: r for r in results}
    out: dict[str, float] = {}
    gateway, relay, bolt, before = by.get("gateway"), by.get("relay"), by.get("bolt"), by.get("before")
    if gateway and before:
        out["gateway/before req/s"] = gateway.rate / before.rate
        out["before/gateway CPU per request"] = (before.cpu_s / before.requests) / (gateway.cpu_s / gateway.requests)
    if gateway and relay:
        out["gateway/relay req/s"] = gateway.rate / relay.rate
        out["gateway p99 / relay p99"] = gateway.p99_ms / relay.p99_ms
        out["relay/gateway CPU per request"] = (relay.cpu_s / relay.requests) / (gateway.cpu_s / gateway.requests)
    if gateway and bolt:
        out["gateway/bolt req/s"] = gateway.rate / bolt.rate
    return out


def verdict(results: list[Result], found: dict[str, float]) -> list[str]:
    gateway = next((r for r in results if r.server == "gateway"), None)
    lines = []
    if gateway is not None:
        clean = gateway.non_2xx == 0 and gateway.socket_errors == 0 and gateway.missing == 0
        lines.append(f"gateway: no non-2xx and every reply delivered: {'yes' if clean else 'NO'}")
    checks = (
        ("gateway/relay req/s", 0.5, ">="),
        ("gateway/bolt req/s", 2.0, ">="),
        ("gateway p99 / relay p99", 3.0, "<="),
    )
    for name, target, sense in checks:
        if name in found:
            met = found[name] >= target if sense == ">=" else found[name] <= target
            lines.append(f"B1 {name} = {found[name]:.2f} (target {sense} {target:g}): {'met' if met else 'NOT met'}")
    return lines


async def run_all(args: argparse.Namespace) -> int:
    wrk = ensure_tool("wrk")
    servers = [s for s in args.servers.split(",") if s]
    if args.before and "before" not in servers:
        servers.insert(servers.index("gateway") if "gateway" in servers else len(servers), "before")
    fake = Fake(free_port())
    rounds: list[dict[str, float]] = []
    try:
        with contextlib.ExitStack() as stack:
            if args.workdir:
                tmp = args.workdir
                Path(tmp).mkdir(parents=True, exist_ok=True)
            else:
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ingest-"))
            before = export_tree(args.before, Path(tmp)) if args.before else None
            for number in range(1, args.rounds + 1):
                print(f"round {number}/{args.rounds}: {load()}", flush=True)
                results = []
                for kind in servers:
                    results.append(await measure(kind, args, fake, wrk, Path(tmp), f"r{number}", before))
                    print(f"  {kind} done ({load()})", flush=True)
                print("\n".join(table(results)))
                found = ratios(results)
                print("\n".join(f"ratio {name}: {value:.2f}" for name, value in found.items()))
                print("\n".join(verdict(results, found)), flush=True)
                rounds.append(found)
    finally:
        fake.stop()
    if len(rounds) > 1:
        for name in rounds[0]:
            values = [r[name] for r in rounds if name in r]
            print(f"median over {len(values)} rounds, ratio {name}: {statistics.median(values):.2f} {values}")
    print(f"after: {load()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="wrk duration per server (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: the cores are few)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole table (default 1)")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset, in order")
    parser.add_argument("--py-spy", metavar="DIR", help="record the gateway with py-spy (raw stacks) into DIR")
    parser.add_argument("--before", metavar="GIT-REF", help="also run the gateway as of this commit, for ratios")
    parser.add_argument("--workdir", metavar="DIR", help="keep configs, logs and databases in DIR (must be empty)")
    args = parser.parse_args(argv)
    unknown = set(args.servers.split(",")) - {*SERVERS, "before"}
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine()}; {load()}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(
        f"wrk -t{args.threads} -c{args.connections} -d{args.seconds:g}s, signed Slack events (a new user and DM "
        "channel each), replies to a fake chat.postMessage"
    )
    return asyncio.run(run_all(args))


if __name__ == "__main__":
    raise SystemExit(main())
