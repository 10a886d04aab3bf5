"""Configuration against hostile or careless files (DESIGN.md "Hostile input", issue #11 items
5-8): numbers that would make deadlines infinite, nested ``${A:-${B}}`` defaults, YAML alias
bombs, and secrets in what ``check-config`` and config errors print. Run through
``chat-gateway check-config`` as a process, and through the admin API of the real app."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_settings
from tests.conftest import make_settings, webchat_endpoint

ROOT = Path(__file__).resolve().parents[1]


def check_config(directory: Path, content: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``chat-gateway check-config`` on ``content`` (this tree's code), with only ``env`` set."""
    path = directory / "config.yaml"
    path.write_text(textwrap.dedent(content))
    base = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", str(path)],
        cwd=directory,
        env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=20,
    )


# -- 5. numbers: finite, and minutes at most a year ------------------------------------------------


@pytest.mark.parametrize(
    ("session", "expected"),
    [
        ("{max_minutes: 1e308}", "organisation.session.max_minutes: 1e+308 is above 525600 (a year)"),
        ("{max_minutes: 525601}", "organisation.session.max_minutes: 525601 is above 525600 (a year)"),
        (
            "{max_minutes: 1e308, expiration_minutes: 1e307}",
            "organisation.session.max_minutes: 1e+308 is above 525600 (a year)",
        ),
        ("{max_minutes: 1" + "0" * 400 + "}", "organisation.session.max_minutes: "),
        ("{min_minutes: .inf}", "organisation.session.min_minutes: inf is not a finite number"),
    ],
    ids=["1e308", "a-year-and-a-minute", "with-expiration-1e307", "10**400", "inf"],
)
def test_minutes_beyond_a_year_or_not_finite_are_refused_by_check_config(
    tmp_path: Path, session: str, expected: str
) -> None:
    result = check_config(tmp_path, f"organisation: {{session: {session}}}\n")
    assert result.returncode == 2, result.stdout
    assert any(expected in line for line in result.stderr.splitlines()), result.stderr


def test_a_year_is_allowed(tmp_path: Path) -> None:
    result = check_config(tmp_path, "organisation: {session: {max_minutes: 525600, expiration_minutes: 525600}}\n")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/admin/organisation/session", {"max_minutes": 1e308}),
        ("/admin/organisation/session", {"max_minutes": 1e308, "expiration_minutes": 1e307}),
        ("/admin/endpoints/web/session", {"expiration_minutes": 1e307}),
    ],
)
async def test_admin_put_of_minutes_beyond_a_year_is_400(
    tmp_path: Path, start_gateway: Any, path: str, body: dict[str, Any]
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=30)]))
    response = await gateway.client.put(path, json=body, headers=gateway.admin_headers())
    assert response.status == 400, await response.text()
    endpoint = await gateway.admin_get("/admin/endpoints/web/session")
    assert endpoint["effective_expiration_minutes"] == 30


# -- 6. nested defaults --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "environ", "expected"),
    [
        ("${A:-${B}}", {"B": "from-b"}, "from-b"),
        ("${A:-${B}}", {"A": "from-a", "B": "from-b"}, "from-a"),
        ("${A:-${B:-${C:-deep}}}", {}, "deep"),
        ("x-${A:-${B:-b}-tail}-y", {}, "x-b-tail-y"),
        ("${A:-}", {}, ""),
        ("${A:-{literal}}", {}, "{literal}"),
    ],
)
def test_defaults_nest(tmp_path: Path, value: str, environ: dict[str, str], expected: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"flow: {{type: echo, error_reply: '{value}'}}\n")
    assert load_settings(path, environ=environ).flow.error_reply == (expected or None)


def test_a_nested_default_naming_an_unset_variable_is_an_error_only_when_used(tmp_path: Path) -> None:
    result = check_config(tmp_path, "admin: {token: '${GATEWAY_A:-${GATEWAY_B}}'}\n")
    assert result.returncode == 2
    assert "config.yaml: admin.token: environment variable GATEWAY_B is not set" in result.stderr
    result = check_config(tmp_path, "admin: {token: '${GATEWAY_A:-${GATEWAY_B}}'}\n", env={"GATEWAY_A": "set"})
    assert result.returncode == 0, result.stderr


# -- 7. YAML aliases -------------------------------------------------------------------------------------------


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for n, name in enumerate("bcdefg"):
        previous = "abcdefg"[n]
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 10) + "]")
    bomb = "\n".join(f"# {line}" if False else line for line in levels)
    content = (
        "organisation: {session: {min_minutes: 0}}\n"
        "x-anchors:\n" + textwrap.indent(bomb, "  ") + "\n"
        "endpoints:\n  - {name: w, channel: webchat, session: {on_close: {messages: *g}}}\n"
    )
    assert len(content.encode()) < 700
    started = time.monotonic()
    result = check_config(tmp_path, content)
    assert time.monotonic() - started < 10
    assert result.returncode == 2
    assert "YAML aliases are not allowed" in result.stderr


def test_an_anchor_without_alias_is_fine_and_a_merge_key_alias_is_refused(tmp_path: Path) -> None:
    assert check_config(tmp_path, "server: &s {port: 8080}\n").returncode == 0
    merged = "endpoints:\n  - &web {name: a, channel: webchat}\n  - <<: *web\n    name: b\n"
    result = check_config(tmp_path, merged)
    assert result.returncode == 2 and "YAML aliases are not allowed" in result.stderr


# -- 8. secrets in check-config output and config errors ---------------------------------------------------------


def test_check_config_masks_the_password_of_urls(tmp_path: Path) -> None:
    result = check_config(tmp_path, "flow: {type: http, url: 'http://bot:s3cr3t-pw@127.0.0.1:9000/flow'}\n")
    assert result.returncode == 0, result.stderr
    assert "s3cr3t-pw" not in result.stdout
    assert "flow: http http://bot:***@127.0.0.1:9000/flow" in result.stdout


def test_config_errors_never_echo_a_credential_or_a_url_password(tmp_path: Path) -> None:
    content = """
        server: {port: '${GATEWAY_TOKEN}', public_url: 'ftp://user:url-pw-123@example.com'}
        admin: {token: '${GATEWAY_TOKEN}'}
        storage: {backend: redis, url: 'http://:redis-pw-456@127.0.0.1:6379/0'}
        flow: {type: http, url: '${GATEWAY_FLOW_URL}'}
        endpoints:
          - name: fb
            channel: messenger
            credentials: {app_secret: '${GATEWAY_TOKEN}', verify_token: v, page_access_token: p}
            path: '/hooks/${GATEWAY_TOKEN} x'
        """
    env = {"GATEWAY_TOKEN": "hunter2-secret-token", "GATEWAY_FLOW_URL": "gopher://flow:flow-pw-789@host/flow"}
    result = check_config(tmp_path, content, env=env)
    assert result.returncode == 2
    lines = [line.partition("config.yaml: ")[2] for line in result.stderr.splitlines()]
    assert len(lines) == 5, result.stderr
    for secret in ("hunter2-secret-token", "url-pw-123", "redis-pw-456", "flow-pw-789"):
        assert secret not in result.stderr
    assert "server.port: '***' is not an integer" in lines
    assert "storage.url: 'http://:***@127.0.0.1:6379/0' must start with redis://, rediss:// or unix://" in lines
    assert "endpoints.fb.path: '/hooks/*** x' must start with / and contain no spaces" in lines
