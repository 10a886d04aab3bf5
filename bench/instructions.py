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
counted every reply, and dumps the count (all the server's threads). Printed: instructions per
message and the ratios. It says nothing about waiting (latency); bench/ingest.py does.

Under callgrind a server runs ~50x slower; it takes a few minutes. Use it to see what a change
to the hot path buys: ``--servers gateway --before HEAD``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ingest import (
    PATH,
    Fake,
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


async def count(kind: str, messages: int, fake: Fake, workdir: Path, before: Path | None) -> float:
    """Instructions per message of server ``kind``."""
    directory = workdir / kind
    directory.mkdir()
    port = free_port()
    wrapper = (
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={directory}/callgrind.out.%p",
    )
    process = start_server(kind, port, fake.origin, directory, before, wrapper)
    try:
        await wait_ready(kind, port, process, timeout_s=600)
        url = f"http://127.0.0.1:{port}{PATH}"
        warm, measured = directory / "warm.events", directory / "run.events"
        write_events(warm, f"{kind[0]}w", WARMUP_MESSAGES)
        write_events(measured, kind[0], messages, start=WARMUP_MESSAGES)
        await send(url, warm)
        await fake.replies_settled(WARMUP_MESSAGES, 120)
        await fake.call("POST", "/reset")
        subprocess.run(["callgrind_control", "-i", "on", str(process.pid)], check=True, capture_output=True)
        await send(url, measured)
        replies = await fake.replies_settled(messages, 300)
        subprocess.run(["callgrind_control", "-d", str(process.pid)], check=True, capture_output=True)
        if replies < messages:
            raise RuntimeError(f"{kind}: {replies} of {messages} replies arrived")
        return callgrind_total(directory) / messages
    finally:
        stop_server(process)


async def run(args: argparse.Namespace) -> int:
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("valgrind is missing: apt-get install -y valgrind", flush=True)
        subprocess.run(["apt-get", "install", "-y", "valgrind"], check=True, stdout=subprocess.DEVNULL)
    servers = [s for s in args.servers.split(",") if s]
    if args.before and "before" not in servers:
        servers.insert(servers.index("gateway") if "gateway" in servers else len(servers), "before")
    fake = Fake(free_port())
    per_message: dict[str, float] = {}
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
    finally:
        fake.stop()
    for a, b in (("gateway", "relay"), ("gateway", "before")):
        if a in per_message and b in per_message:
            print(f"ratio {a}/{b} instructions per message: {per_message[a] / per_message[b]:.3f}")
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
