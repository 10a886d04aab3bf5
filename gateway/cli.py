"""``chat-gateway serve | check-config``: the command line (console script ``gateway.cli:main``).

Exit codes: 0 success, 1 the gateway could not run (e.g. its database is locked by another
process), 2 invalid configuration or usage. An invalid configuration starts nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys

from channels.registry import entry_path
from gateway.config import load_settings
from gateway.config_reader import fmt_number, mask_passwords
from gateway.errors import ConfigError, StoreError
from gateway.settings import Settings, StorageBackend, effective_expiration_minutes

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEFAULT_CONFIG = "config.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chat-gateway", description="Asyncio chat gateway.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH", help="default: ./config.yaml")
    check = commands.add_parser("check-config", help="validate a configuration file and summarise it")
    check.add_argument("path", nargs="?", default=DEFAULT_CONFIG, metavar="PATH", help="default: ./config.yaml")
    return parser


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
        f"endpoints: {len(settings.endpoints)}",
    ]
    for endpoint in settings.endpoints:
        minutes = effective_expiration_minutes(endpoint.session.expiration_minutes, settings.organisation)
        expiry = "never expires" if minutes == 0 else f"expires after {fmt_number(minutes)} min"
        url = entry_path(endpoint)
        lines.append(f"  {endpoint.name}: {endpoint.channel} {url}, {expiry} ({endpoint.session.mode})")
    return [mask_passwords(line) for line in lines]  # a URL's password never prints


def _load(path: str) -> Settings | None:
    """The settings at ``path``, or None once the problems are on stderr.

    Logging is formatted before loading, so the warnings the loader gives (S4 caps) read
    like every later log line.
    """
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    try:
        return load_settings(path)
    except ConfigError as error:
        _print_problems(error)
        return None


def _check_config(path: str) -> int:
    settings = _load(path)
    if settings is None:
        return 2
    print("\n".join(_summary(settings)))
    return 0


def _serve(path: str) -> int:
    settings = _load(path)
    if settings is None:
        return 2
    logging.getLogger().setLevel(settings.log_level)
    # Imported here: check-config and bad configurations never load the web stack.
    from gateway.app import serve

    try:
        return serve(settings)
    except ConfigError as error:
        _print_problems(error)
        return 2
    except StoreError as error:  # e.g. StoreLocked: another process has the database
        print(f"error: {error}", file=sys.stderr)
        return 1


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
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
