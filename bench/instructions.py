"""Instructions per message on the echo path, counted by callgrind: a figure the shared machine's
load does not move.

    .venv/bin/python bench/instructions.py [--messages 300] [--servers relay,gateway]
                                           [--before GIT-REF]

Time on these shared two cores moves by tens of percent from run to run with what else runs
(bench/ingest.py measures it, side by side, and says so). An instruction count does not: it is
the same for the same program and input whatever the machine is doing. So this benchmark runs
each server of bench/ingest.py (the bare relay, the gateway, and with ``--before`` the gateway
as of an earlier commit) under ``valgrind --tool=callgrind`` with counting off while it starts
and warms up, then turns counting on (``callgrind_control -i on``), sends ``--messages`` signed
Slack events (a new user and DM channel each, 16 in flight), waits until the fake Slack API
counted every reply, and dumps the count (all the server's threads). Then, for the kernel's
side that callgrind does not see, each server runs again without valgrind and ``strace -f -c``
counts its system calls over five times as many messages. Printed: instructions and system
calls per message, and the ratios. It says nothing about waiting (latency); bench/ingest.py does.

Under callgrind a server runs ~50x slower; it takes a few minutes. Use it to see what a change
to the hot path buys: ``--servers gateway --before HEAD``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from ingest import (
    PATH,
    Fake,
    ensure_tool,
    export_tree,
    free_port,
    load,
    machine,
    start_server,
    stop_server,
    wait_ready,
    warm_up,
    write_events,
)

WARMUP_MESSAGES = 100
IN_FLIGHT = 16
SYSCALL_RUN = 5  # the system call count runs at full speed: this many times --messages


def callgrind_total(out_dir: Path) -> int:
    """The instruction count of the dump ``callgrind_control -d`` wrote (its ``summary:``, or
    ``totals:`` line); the dump taken at exit is ignored (it holds the shutdown too)."""
    dumps = sorted(out_dir.glob("callgrind.out.*.1"))
    if not dumps:
        raise RuntimeError(f"no callgrind dump in {out_dir}")
    text = dumps[-1].read_text(errors="replace")
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no total in {dumps[-1]}")
    return int(found.group(1))


async def send(url: str, events: Path) -> None:
    """Every event of ``events``, ``IN_FLIGHT`` at a time (warm_up's sender, narrower)."""
    await warm_up(url, events, in_flight=IN_FLIGHT)


async def measure(
    kind: str,
    messages: int,
    fake: Fake,
    directory: Path,
    before: Path | None,
    *,
    begin: Callable[[int], Awaitable[None]],
    end: Callable[[int], Awaitable[None]],
    wrapper: tuple[str, ...] = (),
) -> None:
    """Start server ``kind`` (under ``wrapper``), warm it up, ``begin(pid)``, send ``messages``
    events and wait for every reply, ``end(pid)``; the server stops in any case."""
    directory.mkdir()
    port = free_port()
    process = start_server(kind, port, fake.origin, directory, before, wrapper)
    try:
        await wait_ready(kind, port, process, timeout_s=600)
        url = f"http://127.0.0.1:{port}{PATH}"
        warm, measured = directory / "warm.events", directory / "run.events"
        write_events(warm, f"{directory.name}w", WARMUP_MESSAGES)
        write_events(measured, directory.name, messages, start=WARMUP_MESSAGES)
        await send(url, warm)
        await fake.replies_settled(WARMUP_MESSAGES, 120)
        await fake.call("POST", "/reset")
        await begin(process.pid)
        await send(url, measured)
        replies = await fake.replies_settled(messages, 300)
        await end(process.pid)
        if replies < messages:
            raise RuntimeError(f"{kind}: {replies} of {messages} replies arrived")
    finally:
        stop_server(process)


async def count(kind: str, messages: int, fake: Fake, workdir: Path, before: Path | None) -> float:
    """Instructions per message of server ``kind``: counting on once it is warm, dumped once
    every reply arrived."""
    directory = workdir / kind

    async def counting_on(pid: int) -> None:
        subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)

    async def dump(pid: int) -> None:
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)

    await measure(
        kind,
        messages,
        fake,
        directory,
        before,
        begin=counting_on,
        end=dump,
        wrapper=(
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={directory}/callgrind.out.%p",
        ),
    )
    return callgrind_total(directory) / messages


def strace_calls(report: Path) -> dict[str, int]:
    """System call -> calls, from ``strace -c``'s table (and ``total``)."""
    calls: dict[str, int] = {}
    for line in report.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0].replace(".", "", 1).isdigit() and fields[3].isdigit():
            calls[fields[-1]] = int(fields[3])
    return calls


async def count_syscalls(kind: str, messages: int, fake: Fake, workdir: Path, before: Path | None) -> dict[str, int]:
    """System calls of server ``kind`` (all threads) while it handles ``messages`` events:
    ``strace -f -c`` attached once it is warm, detached once every reply arrived."""
    directory = workdir / f"{kind}-strace"
    report = directory / "strace.txt"
    tracers: list[subprocess.Popen[bytes]] = []

    async def attach(pid: int) -> None:
        threads = [f"-p{tid}" for tid in os.listdir(f"/proc/{pid}/task")]
        tracers.append(subprocess.Popen(["strace", "-f", "-c", "-o", str(report), *threads], stderr=subprocess.DEVNULL))
        await asyncio.sleep(1.0)  # attached to every thread

    async def detach(pid: int) -> None:
        for tracer in tracers:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(30)

    await measure(kind, messages, fake, directory, before, begin=attach, end=detach)
    return strace_calls(report)


async def run(args: argparse.Namespace) -> int:
    ensure_tool("callgrind_control", "valgrind")
    ensure_tool("strace")
    servers = [s for s in args.servers.split(",") if s]
    if args.before and "before" not in servers:
        servers.insert(servers.index("gateway") if "gateway" in servers else len(servers), "before")
    fake = Fake(free_port())
    per_message: dict[str, float] = {}
    syscalls: dict[str, float] = {}
    try:
        with contextlib.ExitStack() as stack:
            if args.keep:
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                tmp = args.keep
            else:
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-instructions-"))
            before = export_tree(args.before, Path(tmp)) if args.before else None
            for kind in servers:
                started = time.monotonic()
                per_message[kind] = await count(kind, args.messages, fake, Path(tmp), before)
                print(
                    f"{kind:8} {per_message[kind] / 1e6:8.3f} M instructions per message "
                    f"({time.monotonic() - started:.0f} s)",
                    flush=True,
                )
                calls = await count_syscalls(kind, args.messages * SYSCALL_RUN, fake, Path(tmp), before)
                per_call = {name: n / (args.messages * SYSCALL_RUN) for name, n in calls.items()}
                syscalls[kind] = per_call.pop("total", 0.0)
                top = sorted(per_call.items(), key=lambda item: -item[1])[:6]
                print(
                    f"{kind:8} {syscalls[kind]:8.1f} system calls per message ("
                    + ", ".join(f"{name} {n:.1f}" for name, n in top)
                    + ")",
                    flush=True,
                )
    finally:
        fake.stop()
    for a, b in (("gateway", "relay"), ("gateway", "before")):
        if a in per_message and b in per_message:
            print(f"ratio {a}/{b} instructions per message: {per_message[a] / per_message[b]:.3f}")
            print(f"ratio {a}/{b} system calls per message: {syscalls[a] / syscalls[b]:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=300, help="measured messages per server (default 300)")
    parser.add_argument("--servers", default="relay,gateway", help="comma-separated: relay, gateway (default both)")
    parser.add_argument("--before", metavar="GIT-REF", help="also count the gateway as of this commit")
    parser.add_argument("--keep", metavar="DIR", help="keep the callgrind dumps in DIR (for callgrind_annotate)")
    args = parser.parse_args(argv)
    unknown = set(args.servers.split(",")) - {"relay", "gateway", "before"}
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine()}; {load()}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
