"""``chat-gateway serve | check-config | settings | backup | healthcheck``: the command line
(console script ``gateway.cli:main``).

Exit codes: 0 success, 1 the gateway (or the command) could not run (port in use, database
locked by another process, an unreachable health check), 2 invalid configuration or usage. An
invalid configuration starts nothing.

The configuration file: ``--config PATH`` (``check-config PATH``), else ``$GATEWAY_CONFIG``,
else ``./config.yaml``; and only when none of them names an existing file and
``$GATEWAY_DEMO_CONFIG`` is set (the Docker image sets it), that demo file, with a warning
saying so.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from channels.registry import entry_path
from gateway.config import load_settings
from gateway.config_reader import fmt_number, mask_passwords
from gateway.errors import ConfigError, StoreError
from gateway.logs import HeldRecords, configure_logging
from gateway.settings import LogFormat, Settings, StorageBackend, effective_expiration_minutes

DEFAULT_CONFIG = "config.yaml"

log = logging.getLogger("gateway.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chat-gateway", description="Asyncio chat gateway.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    config_help = "default: $GATEWAY_CONFIG, else ./config.yaml"
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", metavar="PATH", help=config_help)
    check = commands.add_parser("check-config", help="validate a configuration file and summarise it")
    check.add_argument("path", nargs="?", metavar="PATH", help=config_help)
    shown = commands.add_parser("settings", help="print the effective settings (runtime overrides applied)")
    shown.add_argument("--config", metavar="PATH", help=config_help)
    backup = commands.add_parser("backup", help="copy the SQLite database, also while the gateway runs")
    backup.add_argument("--config", metavar="PATH", help=config_help)
    backup.add_argument("dest", metavar="DEST", help="the new file to write")
    health = commands.add_parser("healthcheck", help="exit 0 when /healthz on the configured port answers 200")
    health.add_argument("--config", metavar="PATH", help=config_help)
    return parser


def config_path(given: str | None) -> tuple[str, str | None]:
    """The configuration file to read, and a warning when it is the demo fallback."""
    if given:
        return given, None
    named = os.environ.get("GATEWAY_CONFIG")
    if named:
        return named, None
    demo = os.environ.get("GATEWAY_DEMO_CONFIG")
    if demo and not Path(DEFAULT_CONFIG).exists():
        return demo, (
            f"no configuration given (--config, GATEWAY_CONFIG, or ./{DEFAULT_CONFIG}): running the DEMO "
            f"configuration {demo} (one web chat endpoint, 1-minute sessions); mount your own"
        )
    return DEFAULT_CONFIG, None


def _print_problems(error: ConfigError) -> None:
    for line in error.problems:
        print(line, file=sys.stderr)


def _summary(settings: Settings) -> list[str]:
    """What check-config prints: where state goes and, per endpoint, its effective expiration."""
    storage = settings.storage
    lines = [
        f"{settings.source}: OK",
        f"server: {settings.server.host}:{settings.server.port}",
        f"storage: {storage.backend} {storage.path if storage.backend is StorageBackend.SQLITE else storage.url}",
        f"flow: {settings.flow.type}" + (f" {settings.flow.url}" if settings.flow.url else ""),
        f"admin: {'on' if settings.admin.token else 'off'}",
        f"logging: {settings.log_level} {settings.log_format}",
        "retention: closed sessions {} days, messages {} days, dedup ids {} days".format(
            *(fmt_number(days) for days in _retention_days(settings))
        ),
        f"endpoints: {len(settings.endpoints)}",
    ]
    for endpoint in settings.endpoints:
        minutes = effective_expiration_minutes(endpoint.session.expiration_minutes, settings.organisation)
        expiry = "never expires" if minutes == 0 else f"expires after {fmt_number(minutes)} min"
        url = entry_path(endpoint)
        lines.append(f"  {endpoint.name}: {endpoint.channel} {url}, {expiry} ({endpoint.session.mode})")
    return [mask_passwords(line) for line in lines]  # a URL's password never prints


def _retention_days(settings: Settings) -> tuple[float, float, float]:
    retention = settings.retention
    return retention.closed_sessions_days, retention.messages_days, retention.dedup_days


def _load(path: str, level: str | None = "WARNING") -> Settings | None:
    """The settings at ``path``, or None once the problems are on stderr.

    What the loader logs (S4 caps) is held until the logging format is known, then written in
    it; ``level`` None takes the file's ``logging.level`` (serve).
    """
    held = HeldRecords()
    root = logging.getLogger()
    root.addHandler(held)
    try:
        settings = load_settings(path)
    except ConfigError as error:
        configure_logging(LogFormat.TEXT, "WARNING")
        held.replay()
        _print_problems(error)
        return None
    finally:
        root.removeHandler(held)
    configure_logging(settings.log_format, level or settings.log_level)
    held.replay()
    return settings


def _check_config(path: str | None) -> int:
    settings = _load(config_path(path)[0])
    if settings is None:
        return 2
    if settings.storage.backend is StorageBackend.REDIS and settings.storage.url:
        from gateway.ops import redis_problem

        problem = redis_problem(settings.storage.url)
        if problem is not None:
            print(f"{path or settings.source}: storage.url: {problem}", file=sys.stderr)
            return 2
    print("\n".join(_summary(settings)))
    return 0


def _serve(given: str | None) -> int:
    path, demo_warning = config_path(given)
    settings = _load(path, level=None)
    if settings is None:
        return 2
    if demo_warning:
        log.warning("%s", demo_warning)
    # Imported here: check-config and bad configurations never load the web stack.
    from gateway.app import serve

    try:
        return serve(settings)
    except ConfigError as error:
        _print_problems(error)
        return 2
    except StoreError as error:  # the app logs these itself; a stand-in app may not
        log.error("cannot start: %s", error)
        return 1


def _operation(command: str, given: str | None, dest: str | None) -> int:
    from gateway.ops import OpsError, backup, effective_settings, healthcheck

    settings = _load(config_path(given)[0], level="ERROR" if command == "healthcheck" else "WARNING")
    if settings is None:
        return 2
    try:
        if command == "backup":
            assert dest is not None  # argparse requires it
            print(backup(settings, Path(dest)))
        elif command == "settings":
            print(effective_settings(settings), end="")
        else:
            print(healthcheck(settings))
    except OpsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``chat-gateway`` command line with ``argv`` (default ``sys.argv[1:]``).

    Returns the exit code: 0 ok, 1 the gateway could not run, 2 bad configuration or usage.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return exc.code if isinstance(exc.code, int) else 2
    if args.command == "serve":
        return _serve(args.config)
    if args.command == "check-config":
        return _check_config(args.path)
    if args.command in ("settings", "backup", "healthcheck"):
        return _operation(args.command, args.config, getattr(args, "dest", None))
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
