"""Run every benchmark of BENCHMARKS.md (B1-B6) one after the other and print their figure lines.

    .venv/bin/python bench/run_all.py [--rounds 3] [--quick] [--out DIR]

- B1: ``bench/ingest.py`` (wrk against bare aiohttp, the relay, slack-bolt and the gateway), and
  once ``bench/instructions.py`` (instructions per message of the relay and the gateway under
  callgrind: the B1 cost in a figure the machine's load does not move);
- B2-B5: ``bench/sessions.py`` (1,000,000 sessions; ``--quick``: 200,000 with 20,000 due);
- B6: ``bench/delivery.py`` (500 webhooks/s through the gateway and a bare baseline);
- once ``bench/http1_client.py`` (CPU per send call: aiohttp's client session against the
  adapters' ``channels/http1.py``).

Each runs ``--rounds`` times (the machine is shared: compare ratios, not single figures); the
full output of every run goes to ``--out`` (default: a new ``bench-results-<time>`` directory
in the system's temp dir), and the lines that carry the figures are printed as they come, with
the load average before each run. Needs the ``bench`` extra (slack-bolt):
``.venv/bin/pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
FIGURES = (
    "ratio ",
    "B1 ",
    "median ",
    "gateway",
    "relay",
    "bolt",
    "aiohttp",
    "server",
    "restore + arm",
    "RSS per open session",
    "fire lag",
    "close lag",
    "longest event-loop stall",
    "baseline",
    "target",
    "machine:",
    "B3 ",
    "webhook",
    "replies",
    "before",
    "http1",
)


def load() -> str:
    with open("/proc/loadavg") as loadavg:
        return " ".join(loadavg.read().split()[:3])


def run(name: str, command: list[str], out: Path) -> int:
    print(f"== {name}: {' '.join(command)} (load {load()})", flush=True)
    log = out / f"{name}.txt"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=BENCH.parent
        )
        assert process.stdout is not None
        for line in process.stdout:
            sink.write(line)
            if line.strip().startswith(FIGURES):
                print("   " + line.rstrip(), flush=True)
        code = process.wait()
    print(f"   exit {code}; full output in {log}", flush=True)
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each benchmark (default 3)")
    parser.add_argument("--quick", action="store_true", help="smaller sessions run, shorter ingest runs")
    parser.add_argument("--out", type=Path, help="directory for the full outputs")
    args = parser.parse_args()
    out = args.out or Path(tempfile.gettempdir()) / time.strftime("bench-results-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    sessions = ["--sessions", "200000", "--due", "20000"] if args.quick else []
    ingest = ["--seconds", "5"] if args.quick else []
    failed = run("B1-instructions", [python, str(BENCH / "instructions.py")], out) != 0
    failed += run("send-client", [python, str(BENCH / "http1_client.py")], out) != 0
    for number in range(1, args.rounds + 1):
        failed += run(f"B1-ingest-{number}", [python, str(BENCH / "ingest.py"), *ingest], out) != 0
        failed += run(f"B2-B5-sessions-{number}", [python, str(BENCH / "sessions.py"), *sessions], out) != 0
        # delivery.py exits 1 when its own (older, looser) target is missed: a figure, not a failure.
        run(f"B6-delivery-{number}", [python, str(BENCH / "delivery.py")], out)
    print(f"done (load {load()}); outputs in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
