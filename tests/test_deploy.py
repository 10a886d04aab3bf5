"""The deploy kit: the pinned dependency set the image installs, and the Dockerfile's shape
(Docker itself cannot run on the project's machines, so the image is not built here)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in (ROOT / "requirements.lock").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        requirement = Requirement(line)
        [spec] = requirement.specifier
        assert spec.operator == "==", line
        pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def test_every_runtime_dependency_is_pinned_within_its_range() -> None:
    pins = locked()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements.lock"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement.specifier}"
    assert "prometheus-client" in pins
    for test_only in ("pytest", "schemathesis", "playwright", "mypy", "ruff"):
        assert test_only not in pins


def test_the_image_installs_the_lock_before_the_source_and_checks_the_configured_port() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    steps = [line for line in lines if line and not line.startswith("#")]

    def index(pattern: str) -> int:
        return next(i for i, line in enumerate(steps) if re.search(pattern, line))

    assert index(r"^COPY requirements\.lock") < index(r"pip install .*-r requirements\.lock") < index(r"^COPY gateway")
    assert index(r"^COPY gateway") < index(r"pip install .*--no-deps \.")
    assert index(r"^COPY pyproject") > index(r"-r requirements\.lock")
    assert any(line.startswith("HEALTHCHECK") and '"chat-gateway", "healthcheck"' in line for line in steps)
    assert 'CMD ["chat-gateway", "serve"]' in steps  # the config: /config/config.yaml, GATEWAY_CONFIG, else demo
    assert any("GATEWAY_DEMO_CONFIG=/app/demo-config.yaml" in line for line in steps)
    assert any(line.startswith("USER gateway") for line in steps)
