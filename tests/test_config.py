"""Configuration loading (DESIGN.md "Configuration" and "Contract details": configuration errors).

Every problem of a file is reported at once, one ``<file>: <dotted.key>: <reason>`` line each,
endpoints named by their name. S-numbers refer to SESSION-SEMANTICS.md.
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest

from channels.registry import Channel
from gateway.config import load_settings, read_endpoint_session, read_organisation_session
from gateway.errors import ConfigError
from gateway.settings import (
    DEFAULT_EXPIRATION_MINUTES,
    FlowType,
    OnCloseSettings,
    OrganisationSessionSettings,
    Secret,
    SessionMode,
    Settings,
    StorageBackend,
    effective_expiration_minutes,
)

MESSENGER_CREDENTIALS = "{app_secret: s, verify_token: v, page_access_token: p}"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Files are written to and named relative to tmp_path, so problem lines start "config.yaml: ".
    monkeypatch.chdir(tmp_path)


def write(content: str, name: str = "config.yaml") -> str:
    Path(name).write_text(textwrap.dedent(content))
    return name


def load(content: str, environ: dict[str, str] | None = None) -> Settings:
    return load_settings(write(content), environ={} if environ is None else environ)


def problems(content: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(content, environ)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def endpoint_yaml(session: str = "", **fields: str) -> str:
    """A YAML document with one messenger endpoint ``fb-main`` and bounds 5..20160."""
    lines = ["name: fb-main", "channel: messenger", f"credentials: {MESSENGER_CREDENTIALS}"]
    lines += [f"{key}: {value}" for key, value in fields.items()]
    body = "\n".join("    " + line for line in lines)
    if session:
        body += "\n    session:\n" + textwrap.indent(textwrap.dedent(session).strip(), "      ")
    return f"endpoints:\n  - {body.strip()}\n"


# --- the file as a whole ---------------------------------------------------------------------


def test_empty_sections_give_defaults(tmp_path: Path) -> None:
    settings = load("server: {}\n")
    assert settings.source == tmp_path / "config.yaml"
    assert settings.server.host == "127.0.0.1" and settings.server.port == 8080
    assert settings.server.max_body_bytes == 1_048_576 and settings.server.public_url is None
    assert settings.storage.backend is StorageBackend.SQLITE
    assert settings.storage.path == tmp_path / "data" / "gateway.db"  # default, relative to the file
    assert not settings.admin.token
    assert settings.organisation == OrganisationSessionSettings()
    assert settings.flow.type is FlowType.ECHO and settings.flow.timeout_seconds == 10
    assert settings.endpoints == ()
    assert settings.log_level == "INFO"


def test_design_example_loads(tmp_path: Path) -> None:
    settings = load(
        """
        server:
          host: ${GATEWAY_HOST:-127.0.0.1}
          port: 8080
          public_url: https://bots.example.com/
          max_body_bytes: 1048576
        storage:
          backend: sqlite
          path: ./data/gateway.db
          url: redis://127.0.0.1:6379/0
        admin:
          token: ${GATEWAY_ADMIN_TOKEN:-}
        organisation:
          session:
            expiration_minutes: null
            min_minutes: 5
            max_minutes: 20160
        flow:
          type: echo
          url: http://127.0.0.1:9000/flow
          timeout_seconds: 10
        logging:
          level: WARNING
        endpoints:
          - name: fb-main
            path: /webhooks/fb-main
            channel: messenger
            developer: false
            api_base_url: https://graph.facebook.com
            credentials: {app_secret: a, verify_token: b, page_access_token: c}
            session:
              expiration_minutes: 30
              mode: proactive
              on_close:
                notify: true
                messages: ["This conversation has ended. Write again any time to start a new one."]
                messages_by_channel: {}
                clear_auth_profiles: false
                script: null
        """
    )
    assert settings.server.public_url == "https://bots.example.com"
    assert settings.storage.path == tmp_path / "data" / "gateway.db"
    assert settings.log_level == "WARNING"
    (endpoint,) = settings.endpoints
    assert endpoint.channel is Channel.MESSENGER and endpoint.path == "/webhooks/fb-main"
    assert endpoint.credential("page_access_token") == "c"
    assert endpoint.session.expiration_minutes == 30 and endpoint.session.mode is SessionMode.PROACTIVE
    assert endpoint.session.on_close == OnCloseSettings()


def test_problem_line_names_file_as_given_and_endpoint_by_name() -> None:
    lines = problems(endpoint_yaml(session="expiration_minutes: 3"))
    assert lines == [
        "config.yaml: endpoints.fb-main.session.expiration_minutes: 3 is below organisation.session.min_minutes (5)"
    ]


def test_file_is_named_as_given_even_when_absolute(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "gw.yaml"
    path.parent.mkdir()
    path.write_text("server: {port: -1}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert caught.value.problems == [f"{path}: server.port: -1 is out of range 0..65535"]


def test_every_problem_is_reported_at_once() -> None:
    lines = problems(
        """
        serverr: {}
        server: {port: 70000, max_body_bytes: 0}
        storage: {backend: redis}
        flow: {type: http, timeout_seconds: 0}
        logging: {level: loud}
        endpoints:
          - name: fb-main
            channel: messenger
            credentials: {app_secret: s, verify_token: v}
            session: {mode: eager}
          - channel: slack
        """
    )
    assert sorted(lines) == sorted(
        [
            "config.yaml: serverr: unknown key (did you mean 'server'?)",
            "config.yaml: server.port: 70000 is out of range 0..65535",
            "config.yaml: server.max_body_bytes: 0 must be >= 1",
            "config.yaml: storage.url: required when backend is redis",
            "config.yaml: flow.timeout_seconds: 0 must be > 0",
            "config.yaml: flow.url: required when type is http",
            "config.yaml: logging.level: 'loud' is not one of DEBUG, INFO, WARNING, ERROR",
            "config.yaml: endpoints.fb-main.credentials.page_access_token: required for channel messenger",
            "config.yaml: endpoints.fb-main.session.mode: 'eager' is not one of proactive, lazy",
            "config.yaml: endpoints[1].name: required",
            "config.yaml: endpoints[1].credentials.signing_secret: required for channel slack",
            "config.yaml: endpoints[1].credentials.bot_token: required for channel slack",
        ]
    )


def test_missing_file_is_one_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings("nowhere.yaml", environ={})
    assert caught.value.problems == ["nowhere.yaml: file not found"]


def test_yaml_syntax_error_gives_line_number() -> None:
    lines = problems("server:\n  host: a\n  port: [1, 2\n")
    assert len(lines) == 1
    assert lines[0].startswith("config.yaml: line 4, column 1: invalid YAML: ")


@pytest.mark.parametrize(("content", "shown"), [("- a\n- b\n", "a list"), ("just text\n", "a string"), ("", "null")])
def test_top_level_must_be_a_mapping(content: str, shown: str) -> None:
    assert problems(content) == [f"config.yaml: the top level must be a mapping of sections, not {shown}"]


def test_repeated_yaml_key_is_refused() -> None:
    lines = problems("server:\n  port: 1\n  port: 2\n")
    assert len(lines) == 1
    assert lines[0].startswith("config.yaml: line 3, column 3: invalid YAML: duplicate key 'port'")


def test_yaml_merge_keys_need_aliases_which_are_refused() -> None:
    # DESIGN.md "Hostile input": YAML aliases are refused, merge keys (<<: *x) with them.
    lines = problems(
        """
        endpoints:
          - &web {name: a, channel: webchat}
          - <<: *web
            name: b
        """
    )
    assert len(lines) == 1
    assert lines[0].endswith("invalid YAML: YAML aliases are not allowed")


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ("colour: red\n", "colour"),
        ("server: {hots: x}\n", "server.hots"),
        ("storage: {pth: x}\n", "storage.pth"),
        ("admin: {tokn: x}\n", "admin.tokn"),
        ("organisation: {sesion: {}}\n", "organisation.sesion"),
        ("organisation: {session: {min: 1}}\n", "organisation.session.min"),
        ("flow: {kind: echo}\n", "flow.kind"),
        ("logging: {lvl: INFO}\n", "logging.lvl"),
        ("endpoints: [{name: w, channel: webchat, devloper: true}]\n", "endpoints.w.devloper"),
        ("endpoints: [{name: w, channel: webchat, session: {mod: lazy}}]\n", "endpoints.w.session.mod"),
        (
            "endpoints: [{name: w, channel: webchat, session: {on_close: {notfy: false}}}]\n",
            "endpoints.w.session.on_close.notfy",
        ),
    ],
)
def test_unknown_keys_are_errors_at_every_level(content: str, key: str) -> None:
    (line,) = problems(content)
    assert line.startswith(f"config.yaml: {key}: unknown key")


def test_unknown_key_suggests_the_intended_one() -> None:
    assert problems("server: {prot: 1}\n") == ["config.yaml: server.prot: unknown key (did you mean 'port'?)"]


@pytest.mark.parametrize("section", ["server", "storage", "admin", "organisation", "flow", "logging"])
def test_sections_must_be_mappings(section: str) -> None:
    assert problems(f"{section}: [1]\n") == [f"config.yaml: {section}: must be a mapping, not a list"]


def test_null_section_means_defaults() -> None:
    assert load("server:\nendpoints:\n").server.port == 8080


# --- ${ENV} interpolation --------------------------------------------------------------------


def test_env_default_used_when_unset() -> None:
    settings = load("server: {host: '${GW_HOST:-0.0.0.0}'}\nadmin: {token: '${GW_TOKEN:-}'}\n")
    assert settings.server.host == "0.0.0.0"
    assert settings.admin.token == Secret("")


def test_env_value_wins_over_default() -> None:
    settings = load("server: {host: '${GW_HOST:-0.0.0.0}'}\n", {"GW_HOST": "10.0.0.1"})
    assert settings.server.host == "10.0.0.1"


def test_env_without_default_must_be_set() -> None:
    content = "admin: {token: '${GW_TOKEN}'}\n"
    assert problems(content) == ["config.yaml: admin.token: environment variable GW_TOKEN is not set"]
    assert load(content, {"GW_TOKEN": "t0ken"}).admin.token.value == "t0ken"


def test_env_is_replaced_inside_longer_strings_and_lists() -> None:
    settings = load(
        """
        flow: {type: http, url: 'http://${FLOW_HOST}:${FLOW_PORT:-9000}/flow'}
        endpoints:
          - name: w
            channel: webchat
            session: {on_close: {messages: ['Bye from ${BOT_NAME:-the bot}', '${BYE}']}}
        """,
        {"FLOW_HOST": "bot", "BYE": "see you"},
    )
    assert settings.flow.url == "http://bot:9000/flow"
    assert settings.endpoints[0].session.on_close.messages == ("Bye from the bot", "see you")


def test_env_problem_is_reported_at_the_list_item_and_credential() -> None:
    lines = problems(
        """
        endpoints:
          - name: fb-main
            channel: messenger
            credentials: {app_secret: '${FB_SECRET}', verify_token: v, page_access_token: p}
            session: {on_close: {messages: [ok, '${BYE}']}}
        """
    )
    assert sorted(lines) == [
        "config.yaml: endpoints.fb-main.credentials.app_secret: environment variable FB_SECRET is not set",
        "config.yaml: endpoints.fb-main.session.on_close.messages[1]: environment variable BYE is not set",
    ]


def test_env_interpolates_before_type_conversion() -> None:
    settings = load(
        """
        server: {port: '${PORT:-8081}', max_body_bytes: '${MAX_BODY}'}
        organisation: {session: {min_minutes: '${MIN:-0}'}}
        endpoints:
          - name: '${EP_NAME:-w}'
            channel: '${EP_CHANNEL:-webchat}'
            developer: '${DEV:-true}'
            session: {expiration_minutes: '${EXPIRY:-0.5}', on_close: {notify: '${NOTIFY}'}}
        """,
        {"MAX_BODY": "2048", "NOTIFY": "false"},
    )
    assert settings.server.port == 8081 and isinstance(settings.server.port, int)
    assert settings.server.max_body_bytes == 2048
    assert settings.organisation.min_minutes == 0
    (endpoint,) = settings.endpoints
    assert endpoint.name == "w" and endpoint.channel is Channel.WEBCHAT and endpoint.developer is True
    assert endpoint.session.expiration_minutes == 0.5
    assert endpoint.session.on_close.notify is False


def test_env_interpolated_value_is_still_validated() -> None:
    assert problems("server: {port: '${PORT}'}\n", {"PORT": "http"}) == [
        "config.yaml: server.port: 'http' is not an integer"
    ]


def test_endpoint_named_by_its_interpolated_name() -> None:
    lines = problems("endpoints: [{name: '${EP:-web}', channel: webchat, developer: maybe}]\n")
    assert lines == ["config.yaml: endpoints.web.developer: must be true or false, not 'maybe'"]


def test_environ_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_HOST", "192.0.2.7")
    assert load_settings(write("server: {host: '${GW_TEST_HOST}'}\n")).server.host == "192.0.2.7"


# --- server, storage, admin, flow, logging ---------------------------------------------------


@pytest.mark.parametrize(
    ("server", "reason"),
    [
        ("{port: 65536}", "port: 65536 is out of range 0..65535"),
        ("{port: -1}", "port: -1 is out of range 0..65535"),
        ("{port: 80.5}", "port: must be an integer, not 80.5"),
        ("{port: true}", "port: must be an integer, not true/false"),
        ("{host: ''}", "host: must not be empty"),
        ("{host: 127}", "host: must be a string, not a number (quote it in YAML)"),
        ("{public_url: 'ftp://x'}", "public_url: 'ftp://x' is not an http(s) URL"),
        ("{public_url: bots.example.com}", "public_url: 'bots.example.com' is not an http(s) URL"),
        ("{max_body_bytes: 0}", "max_body_bytes: 0 must be >= 1"),
    ],
)
def test_server_values(server: str, reason: str) -> None:
    assert problems(f"server: {server}\n") == [f"config.yaml: server.{reason}"]


def test_server_port_zero_and_public_url_trailing_slash() -> None:
    settings = load("server: {port: 0, public_url: 'http://gw.example.com:8443/base/'}\n")
    assert settings.server.port == 0
    assert settings.server.public_url == "http://gw.example.com:8443/base"


def test_storage_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "gw.yaml"
    path.write_text("storage: {backend: sqlite, path: ../var/./gw.db}\n")
    settings = load_settings("etc/gw.yaml", environ={})
    assert settings.storage.path == tmp_path / "var" / "gw.db"
    assert settings.storage.path.is_absolute()


def test_storage_absolute_path_is_kept(tmp_path: Path) -> None:
    assert load(f"storage: {{path: {tmp_path}/x.db}}\n").storage.path == tmp_path / "x.db"


def test_storage_redis() -> None:
    settings = load("storage: {backend: redis, url: 'rediss://cache:6380/1'}\n")
    assert settings.storage.backend is StorageBackend.REDIS
    assert settings.storage.url == "rediss://cache:6380/1"
    assert load("storage: {backend: redis, url: 'unix:///run/redis.sock'}\n").storage.url == "unix:///run/redis.sock"


@pytest.mark.parametrize(
    ("storage", "line"),
    [
        ("{backend: redis}", "storage.url: required when backend is redis"),
        ("{backend: redis, url: ''}", "storage.url: required when backend is redis"),
        (
            "{backend: redis, url: 'http://cache'}",
            "storage.url: 'http://cache' must start with redis://, rediss:// or unix://",
        ),
        ("{backend: mysql}", "storage.backend: 'mysql' is not one of sqlite, redis"),
        ("{backend: sqlite, path: ''}", "storage.path: must not be empty"),
        ("{backend: sqlite, path: null}", "storage.path: required"),
    ],
)
def test_storage_problems(storage: str, line: str) -> None:
    assert problems(f"storage: {storage}\n") == [f"config.yaml: {line}"]


def test_admin_token_is_a_secret() -> None:
    settings = load("admin: {token: s3cr3t-token}\n")
    assert settings.admin.token.value == "s3cr3t-token" and settings.admin.token
    assert "s3cr3t-token" not in repr(settings) and "s3cr3t-token" not in str(settings.admin)
    assert not load("admin: {token: ''}\n").admin.token  # empty: /admin is off
    assert not load("admin: {token: null}\n").admin.token


def test_secret_repr_is_masked() -> None:
    settings = load(
        """
        endpoints:
          - name: fb-main
            channel: messenger
            credentials: {app_secret: APPSECRET, verify_token: VERIFYTOKEN, page_access_token: PAGETOKEN}
        """
    )
    shown = repr(settings)
    for value in ("APPSECRET", "VERIFYTOKEN", "PAGETOKEN"):
        assert value not in shown
    assert repr(settings.endpoints[0].credentials["app_secret"]) == "Secret('**********')"
    assert str(Secret("x")) == "Secret('**********')" and repr(Secret("")) == "Secret('')"


def test_flow_http() -> None:
    settings = load(
        "flow: {type: http, url: 'https://bot.example.com/flow/', timeout_seconds: 2.5, error_reply: Oops}\n"
    )
    assert settings.flow.type is FlowType.HTTP
    assert settings.flow.url == "https://bot.example.com/flow"
    assert settings.flow.timeout_seconds == 2.5 and settings.flow.error_reply == "Oops"


@pytest.mark.parametrize(
    ("flow", "line"),
    [
        ("{type: http}", "flow.url: required when type is http"),
        ("{type: http, url: 'ws://bot'}", "flow.url: 'ws://bot' is not an http(s) URL"),
        ("{type: smart}", "flow.type: 'smart' is not one of echo, http"),
        ("{timeout_seconds: 0}", "flow.timeout_seconds: 0 must be > 0"),
        ("{timeout_seconds: soon}", "flow.timeout_seconds: 'soon' is not a number"),
        ("{error_reply: [a]}", "flow.error_reply: must be a string, not a list (quote it in YAML)"),
    ],
)
def test_flow_problems(flow: str, line: str) -> None:
    assert problems(f"flow: {flow}\n") == [f"config.yaml: {line}"]


def test_logging_level() -> None:
    assert load("logging: {level: debug}\n").log_level == "DEBUG"
    assert load("logging: {level: ERROR}\n").log_level == "ERROR"
    assert problems("logging: {level: TRACE}\n") == [
        "config.yaml: logging.level: 'TRACE' is not one of DEBUG, INFO, WARNING, ERROR"
    ]


# --- organisation session (S4, S5) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("session", "line"),
    [
        ("{expiration_minutes: -1}", "organisation.session.expiration_minutes: -1 must be >= 0"),
        ("{min_minutes: -1}", "organisation.session.min_minutes: -1 must be >= 0"),
        ("{max_minutes: 0}", "organisation.session.max_minutes: 0 must be > 0"),
        ("{min_minutes: 10, max_minutes: 5}", "organisation.session.min_minutes: 10 is above max_minutes (5)"),
        ("{expiration_minutes: .inf}", "organisation.session.expiration_minutes: inf is not a finite number"),
        (
            "{expiration_minutes: 3}",
            "organisation.session.expiration_minutes: 3 is below organisation.session.min_minutes (5)",
        ),
        (
            "{expiration_minutes: 20161}",
            "organisation.session.expiration_minutes: 20161 is above organisation.session.max_minutes (20160)",
        ),
        (
            "{expiration_minutes: 30, max_minutes: 20}",
            "organisation.session.expiration_minutes: 30 is above organisation.session.max_minutes (20)",
        ),
    ],
)
def test_s5_organisation_value_obeys_the_bounds(session: str, line: str) -> None:
    assert problems(f"organisation: {{session: {session}}}\n") == [f"config.yaml: {line}"]


def test_s5_organisation_value_zero_and_fractions_are_allowed() -> None:
    org = load("organisation: {session: {expiration_minutes: 0}}\n").organisation
    assert org.expiration_minutes == 0
    org = load(
        "organisation: {session: {expiration_minutes: 7.5, min_minutes: 0.5, max_minutes: 60.25}}\n"
    ).organisation
    assert (org.expiration_minutes, org.min_minutes, org.max_minutes) == (7.5, 0.5, 60.25)


def test_s5_endpoints_are_not_rechecked_against_invalid_bounds() -> None:
    lines = problems("organisation: {session: {min_minutes: x}}\n" + endpoint_yaml(session="expiration_minutes: 1"))
    assert lines == ["config.yaml: organisation.session.min_minutes: 'x' is not a number"]


def test_s5_invalid_organisation_value_keeps_its_bounds_for_endpoints() -> None:
    lines = problems(
        "organisation: {session: {expiration_minutes: 1}}\n" + endpoint_yaml(session="expiration_minutes: 2")
    )
    assert lines == [
        "config.yaml: organisation.session.expiration_minutes: 1 is below organisation.session.min_minutes (5)",
        "config.yaml: endpoints.fb-main.session.expiration_minutes: 2 is below organisation.session.min_minutes (5)",
    ]


# --- endpoint expiration (S2-S5) -------------------------------------------------------------


def effective(settings: Settings) -> float:
    return effective_expiration_minutes(settings.endpoints[0].session.expiration_minutes, settings.organisation)


def test_s2_default_expiration_is_30() -> None:
    settings = load(endpoint_yaml())
    assert settings.endpoints[0].session.expiration_minutes is None
    assert effective(settings) == DEFAULT_EXPIRATION_MINUTES == 30


def test_s3_zero_means_never() -> None:
    settings = load(endpoint_yaml(session="expiration_minutes: 0"))
    assert settings.endpoints[0].session.expiration_minutes == 0
    assert effective(settings) == 0


def test_s4_org_value_is_the_default() -> None:
    settings = load("organisation: {session: {expiration_minutes: 45}}\n" + endpoint_yaml())
    assert effective(settings) == 45


def test_s4_org_value_caps_endpoint(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.config"):
        settings = load(
            "organisation: {session: {expiration_minutes: 60}}\n" + endpoint_yaml(session="expiration_minutes: 90")
        )
    assert settings.endpoints[0].session.expiration_minutes == 90  # configured value kept as written
    assert effective(settings) == 60
    (record,) = [r for r in caplog.records if r.name == "gateway.config"]
    assert record.levelno == logging.WARNING
    assert record.args == ("fb-main", "90", "60")


def test_s4_zero_under_org_value_becomes_org_value(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.config"):
        settings = load(
            "organisation: {session: {expiration_minutes: 60}}\n" + endpoint_yaml(session="expiration_minutes: 0")
        )
    assert effective(settings) == 60
    (record,) = [r for r in caplog.records if r.name == "gateway.config"]
    assert record.args == ("fb-main", "0 (never)", "60")


def test_s4_no_warning_when_the_cap_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="gateway.config"):
        load("organisation: {session: {expiration_minutes: 60}}\n" + endpoint_yaml(session="expiration_minutes: 20"))
        load("organisation: {session: {expiration_minutes: 0}}\n" + endpoint_yaml(session="expiration_minutes: 90"))
        load("organisation: {session: {expiration_minutes: 60}}\n" + endpoint_yaml())
    assert [r for r in caplog.records if r.name == "gateway.config"] == []


@pytest.mark.parametrize(
    ("minutes", "reason"),
    [
        ("4.99", "4.99 is below organisation.session.min_minutes (5)"),
        ("20160.5", "20160.5 is above organisation.session.max_minutes (20160)"),
        ("-1", "-1 must be >= 0"),
        ("soon", "'soon' is not a number"),
        ("true", "must be a number, not true/false"),
    ],
)
def test_s5_default_bounds(minutes: str, reason: str) -> None:
    lines = problems(endpoint_yaml(session=f"expiration_minutes: {minutes}"))
    assert lines == [f"config.yaml: endpoints.fb-main.session.expiration_minutes: {reason}"]


def test_s5_bounds_edges_and_zero_are_allowed() -> None:
    for minutes in ("5", "20160", "0", "12.5"):
        settings = load(endpoint_yaml(session=f"expiration_minutes: {minutes}"))
        assert settings.endpoints[0].session.expiration_minutes == float(minutes)


def test_s5_bounds_are_configurable() -> None:
    org = "organisation: {session: {min_minutes: 0, max_minutes: 120}}\n"
    assert load(org + endpoint_yaml(session="expiration_minutes: 0.01")).endpoints[0].session.expiration_minutes == 0.01
    assert problems(org + endpoint_yaml(session="expiration_minutes: 121")) == [
        "config.yaml: endpoints.fb-main.session.expiration_minutes: 121 is above organisation.session.max_minutes (120)"
    ]
    org = "organisation: {session: {min_minutes: 10}}\n"
    assert problems(org + endpoint_yaml(session="expiration_minutes: 5")) == [
        "config.yaml: endpoints.fb-main.session.expiration_minutes: 5 is below organisation.session.min_minutes (10)"
    ]


# --- endpoints ---------------------------------------------------------------------------------


def test_endpoints_may_be_empty() -> None:
    assert load("endpoints: []\n").endpoints == ()


def test_endpoints_must_be_a_list() -> None:
    assert problems("endpoints: {name: w}\n") == ["config.yaml: endpoints: must be a list, not a mapping"]


def test_endpoint_path_default_and_override() -> None:
    settings = load(
        """
        endpoints:
          - {name: fb-main, channel: line, credentials: {channel_secret: s, channel_access_token: t}}
          - {name: fb-2, channel: line, path: /hooks/line, credentials: {channel_secret: s, channel_access_token: t}}
          - {name: web, channel: webchat}
        """
    )
    assert [e.path for e in settings.endpoints] == ["/webhooks/fb-main", "/hooks/line", "/webhooks/web"]


@pytest.mark.parametrize(
    ("entry", "line"),
    [
        ("{channel: webchat}", "endpoints[0].name: required"),
        ("{name: '', channel: webchat}", "endpoints[0].name: must not be empty"),
        ("{name: 'fb main', channel: webchat}", "endpoints[0].name: 'fb main' must match [A-Za-z0-9_-]+"),
        ("{name: 'a/b', channel: webchat}", "endpoints[0].name: 'a/b' must match [A-Za-z0-9_-]+"),
        ("{name: w}", "endpoints.w.channel: required"),
        (
            "{name: w, channel: telegram}",
            "endpoints.w.channel: 'telegram' is not one of messenger, line, slack, twilio, webchat",
        ),
        (
            "{name: w, channel: webchat, path: hooks/w}",
            "endpoints.w.path: 'hooks/w' must start with / and contain no spaces",
        ),
        ("{name: w, channel: webchat, developer: 1}", "endpoints.w.developer: must be true or false, not 1"),
        ("{name: w, channel: webchat, api_base_url: 'x'}", "endpoints.w.api_base_url: 'x' is not an http(s) URL"),
        ("{name: w, channel: webchat, credentials: [a]}", "endpoints.w.credentials: must be a mapping, not a list"),
        ("{name: w, channel: webchat, session: 30}", "endpoints.w.session: must be a mapping, not a number"),
        ("7", "endpoints[0]: must be a mapping, not a number"),
    ],
)
def test_endpoint_problems(entry: str, line: str) -> None:
    assert problems(f"endpoints: [{entry}]\n") == [f"config.yaml: {line}"]


def test_endpoint_names_are_unique_and_the_repeat_is_named_by_position() -> None:
    lines = problems(
        """
        endpoints:
          - {name: web, channel: webchat}
          - {name: web, channel: webchat, developer: maybe}
        """
    )
    assert sorted(lines) == [
        "config.yaml: endpoints[1].developer: must be true or false, not 'maybe'",
        "config.yaml: endpoints[1].name: duplicate endpoint name 'web'",
    ]


def test_endpoint_paths_are_unique() -> None:
    lines = problems(
        """
        endpoints:
          - {name: a, channel: line, path: /hook, credentials: {channel_secret: s, channel_access_token: t}}
          - {name: b, channel: line, path: /hook, credentials: {channel_secret: s, channel_access_token: t}}
          - {name: c, channel: line, path: /webhooks/a, credentials: {channel_secret: s, channel_access_token: t}}
        """
    )
    assert lines == ["config.yaml: endpoints.b.path: '/hook' is already used by endpoint a"]


def test_webchat_paths_are_unused_so_never_clash() -> None:
    settings = load("endpoints: [{name: a, channel: webchat, path: /x}, {name: b, channel: webchat, path: /x}]\n")
    assert [e.name for e in settings.endpoints] == ["a", "b"]


def test_endpoint_developer_and_api_base_url() -> None:
    settings = load(endpoint_yaml(developer="'true'", api_base_url="'http://127.0.0.1:9999/'"))
    (endpoint,) = settings.endpoints
    assert endpoint.developer is True
    assert endpoint.api_base_url == "http://127.0.0.1:9999"


@pytest.mark.parametrize(
    ("channel", "required", "optional"),
    [
        ("messenger", ["app_secret", "verify_token", "page_access_token"], ["api_version"]),
        ("line", ["channel_secret", "channel_access_token"], []),
        ("slack", ["signing_secret", "bot_token"], ["bot_user_id"]),
        ("twilio", ["account_sid", "auth_token", "from_number"], []),
        ("webchat", [], []),
    ],
)
def test_credentials_per_channel(channel: str, required: list[str], optional: list[str]) -> None:
    missing = problems(f"endpoints: [{{name: ep, channel: {channel}, credentials: {{}}, developer: x}}]\n")
    expected = [f"config.yaml: endpoints.ep.credentials.{key}: required for channel {channel}" for key in required]
    assert sorted(missing) == sorted([*expected, "config.yaml: endpoints.ep.developer: must be true or false, not 'x'"])
    # Values in the form their platform requires (account_sid AC..., bot_token xoxb-...).
    values = {
        key: {"account_sid": "AC1", "bot_token": "xoxb-1"}.get(key, f"+1555{i}")
        for i, key in enumerate(required + optional)
    }
    given = ", ".join(f"{key}: '{value}'" for key, value in values.items())
    (endpoint,) = load(f"endpoints: [{{name: ep, channel: {channel}, credentials: {{{given}}}}}]\n").endpoints
    assert sorted(endpoint.credentials) == sorted(required + optional)
    assert all(isinstance(secret, Secret) for secret in endpoint.credentials.values())
    for key, value in values.items():
        assert endpoint.credential(key) == value


def test_credentials_empty_unknown_and_non_string() -> None:
    lines = problems(
        """
        endpoints:
          - name: sms
            channel: twilio
            credentials: {account_sid: '', auth_token: '${TW_TOKEN:-}', from_number: +15551234567, api_key: k}
        """
    )
    assert sorted(lines) == [
        "config.yaml: endpoints.sms.credentials.account_sid: must not be empty (required for channel twilio)",
        "config.yaml: endpoints.sms.credentials.api_key: unknown key"
        " (channel twilio takes account_sid, auth_token, from_number)",
        "config.yaml: endpoints.sms.credentials.auth_token: must not be empty (required for channel twilio)",
        # YAML reads an unquoted +1555... as an int; refusing it keeps the '+'.
        "config.yaml: endpoints.sms.credentials.from_number: must be a string, not a number (quote it in YAML)",
    ]


def test_webchat_takes_no_credentials() -> None:
    assert problems("endpoints: [{name: w, channel: webchat, credentials: {token: x}}]\n") == [
        "config.yaml: endpoints.w.credentials.token: unknown key (channel webchat takes no credentials)"
    ]


# --- endpoint session: mode and on_close (S7-S12) ----------------------------------------------


def test_session_mode_and_on_close() -> None:
    settings = load(
        endpoint_yaml(
            session="""
            mode: lazy
            on_close:
              notify: true
              messages: [Bye, 'See you']
              messages_by_channel: {slack: ['Bye :wave:'], messenger: [Ciao]}
              clear_auth_profiles: true
              script: 'hooks.close:run'
            """
        )
    )
    session = settings.endpoints[0].session
    assert session.mode is SessionMode.LAZY
    assert session.on_close == OnCloseSettings(
        notify=True,
        messages=("Bye", "See you"),
        messages_by_channel={"slack": ("Bye :wave:",), "messenger": ("Ciao",)},
        clear_auth_profiles=True,
        script="hooks.close:run",
    )


def test_s9_notify_false_allows_no_messages() -> None:
    on_close = load(endpoint_yaml(session="on_close: {notify: false, messages: []}")).endpoints[0].session.on_close
    assert on_close.notify is False and on_close.messages == ()


def test_s9_default_on_close() -> None:
    assert load(endpoint_yaml()).endpoints[0].session.on_close == OnCloseSettings()
    assert load(endpoint_yaml(session="on_close: {notify: false}")).endpoints[0].session.on_close.messages == (
        OnCloseSettings().messages
    )


def test_s12_script_accepts_url() -> None:
    on_close = load(endpoint_yaml(session="on_close: {script: 'https://hooks.example.com/close'}")).endpoints[0]
    assert on_close.session.on_close.script == "https://hooks.example.com/close"


@pytest.mark.parametrize(
    ("on_close", "line"),
    [
        ("{messages: []}", "on_close.messages: must not be empty when notify is true"),
        ("{notify: true, messages: []}", "on_close.messages: must not be empty when notify is true"),
        ("{messages: 'Bye'}", "on_close.messages: must be a list of strings, not a string"),
        ("{messages: [ok, '']}", "on_close.messages[1]: must be a non-empty string"),
        ("{messages: [ok, 3]}", "on_close.messages[1]: must be a non-empty string"),
        ("{notify: yes please}", "on_close.notify: must be true or false, not 'yes please'"),
        (
            "{messages_by_channel: {sms: [x]}}",
            "on_close.messages_by_channel.sms: unknown channel (one of messenger, line, slack, twilio, webchat)",
        ),
        ("{messages_by_channel: {slack: []}}", "on_close.messages_by_channel.slack: must not be empty"),
        ("{messages_by_channel: {slack: ['']}}", "on_close.messages_by_channel.slack[0]: must be a non-empty string"),
        (
            "{messages_by_channel: [x]}",
            "on_close.messages_by_channel: must be a mapping of channel -> list of strings, not a list",
        ),
        ("{clear_auth_profiles: 2}", "on_close.clear_auth_profiles: must be true or false, not 2"),
        ("{script: 'not a script'}", "on_close.script: 'not a script' must be module:function or an http(s) URL"),
        ("{script: 'ftp://x/y'}", "on_close.script: 'ftp://x/y' must be module:function or an http(s) URL"),
    ],
)
def test_on_close_problems(on_close: str, line: str) -> None:
    assert problems(endpoint_yaml(session=f"on_close: {on_close}")) == [
        f"config.yaml: endpoints.fb-main.session.{line}"
    ]


def test_session_mode_must_be_known() -> None:
    assert problems(endpoint_yaml(session="mode: sleepy")) == [
        "config.yaml: endpoints.fb-main.session.mode: 'sleepy' is not one of proactive, lazy"
    ]


# --- the same rules for values from outside the file (admin API) -------------------------------


def test_read_endpoint_session_checks_without_interpolation() -> None:
    org = OrganisationSessionSettings(min_minutes=1, max_minutes=60)
    session = read_endpoint_session({"expiration_minutes": 2, "on_close": {"messages": ["${name}"]}}, org)
    assert session.expiration_minutes == 2
    assert session.on_close.messages == ("${name}",)  # never filled from the server's environment
    with pytest.raises(ConfigError) as caught:
        read_endpoint_session({"expiration_minutes": 61, "mode": "x"}, org)
    assert caught.value.problems == [
        "session.expiration_minutes: 61 is above organisation.session.max_minutes (60)",
        "session.mode: 'x' is not one of proactive, lazy",
    ]


def test_read_organisation_session() -> None:
    assert read_organisation_session({"expiration_minutes": 10}).expiration_minutes == 10
    with pytest.raises(ConfigError) as caught:
        read_organisation_session({"expiration_minutes": 1, "typo": 1})
    assert caught.value.problems == [
        "session.typo: unknown key (expected one of: expiration_minutes, min_minutes, max_minutes)"
    ]
    with pytest.raises(ConfigError) as caught:
        read_organisation_session({"expiration_minutes": 1})
    assert caught.value.problems == ["session.expiration_minutes: 1 is below organisation.session.min_minutes (5)"]
