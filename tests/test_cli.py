"""The command line: ``check-config`` and ``serve`` exit 2 with one stderr line per problem and
start nothing on a bad file; ``serve`` hands valid settings to ``gateway.app.serve``."""

from __future__ import annotations

import logging
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.errors import StoreLocked
from gateway.settings import Settings
from tests.gateway_process import free_port, run_cli

GOOD = """
    storage: {backend: sqlite, path: ./data/gateway.db}
    organisation: {session: {expiration_minutes: 60, min_minutes: 0}}
    endpoints:
      - name: web
        channel: webchat
        session: {expiration_minutes: 1}
      - name: fb-main
        channel: messenger
        credentials: {app_secret: s, verify_token: v, page_access_token: p}
        session: {expiration_minutes: 0, mode: lazy}
    """

BAD = """
    server: {port: http}
    storage: {backend: sqlite, path: ./data/gateway.db}
    admin: {token: '${GATEWAY_TEST_UNSET_TOKEN}'}
    endpoints:
      - name: fb-main
        channel: messenger
        credentials: {app_secret: s, verify_token: v}
        session: {expiration_minutes: 3}
    """

BAD_LINES = [
    "config.yaml: server.port: 'http' is not an integer",
    "config.yaml: admin.token: environment variable GATEWAY_TEST_UNSET_TOKEN is not set",
    "config.yaml: endpoints.fb-main.session.expiration_minutes: 3 is below organisation.session.min_minutes (5)",
    "config.yaml: endpoints.fb-main.credentials.page_access_token: required for channel messenger",
]


def write(directory: Path, content: str) -> Path:
    path = directory / "config.yaml"
    path.write_text(textwrap.dedent(content))
    return path


# --- as a process ----------------------------------------------------------------------------


def test_check_config_bad_file_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    write(tmp_path, BAD)
    result = run_cli(tmp_path, "check-config", "config.yaml")
    assert result.returncode == 2
    assert sorted(result.stderr.splitlines()) == sorted(BAD_LINES)
    assert result.stdout == ""


def test_check_config_good_file_exits_0_with_summary(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    result = run_cli(tmp_path, "check-config")  # ./config.yaml by default
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "config.yaml: OK" in out
    assert "web: webchat /webchat/web, expires after 1 min (proactive)" in out
    # S4: 0 (never) under an organisation value of 60 becomes 60, and the loader says so.
    assert "fb-main: messenger /webhooks/fb-main, expires after 60 min (lazy)" in out
    assert "WARNING gateway.config: endpoint fb-main" in result.stderr
    assert not (tmp_path / "data").exists()


def test_serve_bad_file_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    config = write(tmp_path, BAD)
    result = run_cli(tmp_path, "serve", "--config", config.name)
    assert result.returncode == 2
    assert sorted(result.stderr.splitlines()) == sorted(BAD_LINES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no data dir, no database


def test_serve_missing_file_exits_2(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "serve")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["config.yaml: file not found"]


# --- in process ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def root_level() -> Iterator[None]:
    """The commands set up logging (a handler on the root logger, levels from the settings);
    put it all back for the next test."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    own = {name: logging.getLogger(name).level for name in ("gateway", "channels")}
    yield
    root.setLevel(level)
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for name, own_level in own.items():
        logging.getLogger(name).setLevel(own_level)


@pytest.fixture
def fake_app(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """Stand in for ``gateway.app`` (imported by serve at call time); records what it was given."""
    calls: list[Settings] = []
    module = types.ModuleType("gateway.app")

    def serve(settings: Settings) -> int:
        calls.append(settings)
        return 0

    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gateway.app", module)
    return calls


def test_serve_hands_settings_to_the_app(tmp_path: Path, fake_app: list[Settings], root_level: None) -> None:
    config = write(tmp_path, GOOD + "logging: {level: DEBUG}\n")
    assert main(["serve", "--config", str(config)]) == 0
    (settings,) = fake_app
    assert settings.source == config
    assert [e.name for e in settings.endpoints] == ["web", "fb-main"]
    assert logging.getLogger().level == logging.DEBUG


def test_serve_bad_file_never_imports_the_app(
    tmp_path: Path, fake_app: list[Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, "server: {port: -5}\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert fake_app == []
    assert capsys.readouterr().err == f"{config}: server.port: -5 is out of range 0..65535\n"


def test_serve_store_locked_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], root_level: None
) -> None:
    module = types.ModuleType("gateway.app")

    def serve(settings: Settings) -> int:
        raise StoreLocked(f"{settings.storage.path} is in use by another gateway process")

    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gateway.app", module)
    config = write(tmp_path, GOOD)
    assert main(["serve", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert (
        f"ERROR gateway.cli: cannot start: {tmp_path / 'data' / 'gateway.db'} is in use by another gateway process\n"
        in err
    )
    assert "Traceback" not in err


def test_check_config_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, "endpoints: [{name: web, channel: webchat, session: {expiration_minutes: 0}}]\n")
    assert main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "web: webchat /webchat/web, never expires (proactive)" in out
    assert "admin: off" in out


@pytest.mark.parametrize("argv", [[], ["launch"], ["serve", "--bogus"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: chat-gateway" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "check-config" in capsys.readouterr().out


def test_serve_with_an_unreachable_redis_fails_in_one_line(tmp_path: Path) -> None:
    """storage.backend: redis needs a reachable url: exit 1 with one clear line, not a traceback."""
    config = tmp_path / "config.yaml"
    config.write_text(f"storage: {{backend: redis, url: 'redis://127.0.0.1:{free_port()}/0'}}\n")
    result = run_cli(tmp_path, "serve", "--config", str(config))
    assert result.returncode == 1
    assert "cannot start: redis unavailable" in result.stderr
    assert "Traceback" not in result.stderr
