"""/metrics as Prometheus reads it (prometheus-client's own parser): every known series from
start at 0, exact integer counters, the latency and lag histograms, the gauges."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics
from tests.conftest import Gateway, make_settings, webchat_endpoint
from tests.fakeplatform import FakePlatform
from tests.test_delivery import POST, ScriptedSlack, settings_for, slack_endpoint, slack_error, slack_say

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(gateway: Gateway) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels), and each family's type."""
    response = await gateway.client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(await response.text()):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_every_known_series_is_there_from_start_at_zero(tmp_path: Path, start_gateway: Any) -> None:
    async with FakePlatform() as api:
        settings = make_settings(tmp_path, [webchat_endpoint("web"), slack_endpoint(api.url)])
        gateway = await start_gateway(settings)
        samples, types = await scrape(gateway)
    for endpoint in ("web", "sl"):
        assert value(samples, "gateway_sessions_opened_total", endpoint=endpoint) == 0
        assert value(samples, "gateway_flow_errors_total", endpoint=endpoint) == 0
        for reason in ("inactivity", "refresh", "admin", "flow", "endpoint_removed"):
            assert value(samples, "gateway_sessions_closed_total", endpoint=endpoint, reason=reason) == 0
        for outcome in ("sent", "skipped", "dead", "retry", "deferred"):
            assert value(samples, "gateway_messages_out_total", endpoint=endpoint, outcome=outcome) == 0
        for outcome in ("accepted", "duplicate", "ignored", "overloaded"):
            assert value(samples, "gateway_events_total", endpoint=endpoint, outcome=outcome) == 0
        for name in ("gateway_send_seconds", "gateway_flow_seconds", "gateway_close_lag_seconds"):
            assert value(samples, f"{name}_count", endpoint=endpoint) == 0
            assert value(samples, f"{name}_bucket", endpoint=endpoint, le="+Inf") == 0
    # Webhook series exist for webhook endpoints only (the web chat has none).
    assert value(samples, "gateway_webhook_requests_total", endpoint="sl", outcome="rejected_401") == 0
    assert value(samples, "gateway_webhook_ack_seconds_count", endpoint="sl") == 0
    assert ("gateway_webhook_ack_seconds_count", (("endpoint", "web"),)) not in samples
    for name in (
        "gateway_webhook_ack_seconds",
        "gateway_send_seconds",
        "gateway_flow_seconds",
        "gateway_timer_fire_lag_seconds",
        "gateway_close_lag_seconds",
    ):
        assert types[name] == "histogram"
    assert types["gateway_messages_out"] == "counter"
    assert value(samples, "gateway_open_sessions") == 0
    assert value(samples, "gateway_outbox_pending") == 0
    assert value(samples, "gateway_dead_letters") == 0
    [(build, labels)] = [key for key in samples if key[0] == "gateway_build_info"]
    assert samples[(build, labels)] == 1 and dict(labels)["version"]


def test_counters_keep_every_digit() -> None:
    """%g printed 1234568 as 1.23457e+06; Prometheus must read back exactly what was counted."""
    metrics = Metrics()
    metrics.inc("gateway_events_total", 1_234_567, endpoint="web", outcome="accepted")
    metrics.inc("gateway_events_total", endpoint="web", outcome="accepted")
    metrics.inc("gateway_sessions_opened_total", 2**40 + 1, endpoint="web")
    [events] = [f for f in text_string_to_metric_families(metrics.render().decode()) if f.name == "gateway_events"]
    assert [s.value for s in events.samples if s.name == "gateway_events_total"] == [1_234_568]
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    [opened] = [s.value for s in families["gateway_sessions_opened"].samples if s.name.endswith("_total")]
    assert opened == 2**40 + 1
    assert "1.23457e+06" not in metrics.render().decode()


def test_one_registry_per_application() -> None:
    first, second = Metrics(), Metrics()
    first.inc("gateway_sessions_opened_total", endpoint="a")
    assert b'gateway_sessions_opened_total{endpoint="a"} 1.0' in first.render()
    assert b"gateway_sessions_opened_total" not in second.render()


async def test_histograms_observe_webhooks_sends_flows_timers_and_closes(tmp_path: Path, start_gateway: Any) -> None:
    script = ScriptedSlack()
    async with FakePlatform() as api:
        api.respond(POST, script)
        script.fail("CGONE", slack_error("channel_not_found"))
        endpoint = slack_endpoint(api.url, minutes=0.002)  # 0.12 s: the session closes by itself
        endpoint["session"]["on_close"] = {"notify": False}
        gateway = await start_gateway(settings_for(tmp_path, [endpoint]))
        await slack_say(gateway, "C1", "hello")
        await slack_say(gateway, "CGONE", "hello?")
        await api.wait_for(2, POST)
        await gateway.settle()
        while gateway.manager.open_count:  # both sessions close on their timers
            await gateway.manager.drain()
            await gateway.outbox.drain()
        samples, _ = await scrape(gateway)
    assert value(samples, "gateway_webhook_ack_seconds_count", endpoint="sl") == 2
    assert value(samples, "gateway_flow_seconds_count", endpoint="sl") == 2
    assert value(samples, "gateway_send_seconds_count", endpoint="sl") == 2
    assert value(samples, "gateway_timer_fire_lag_seconds_count", endpoint="sl") == 2
    assert value(samples, "gateway_close_lag_seconds_count", endpoint="sl") == 2
    # On time: both closes committed well within the contract's 100 ms of their deadline.
    assert value(samples, "gateway_close_lag_seconds_bucket", endpoint="sl", le="0.1") == 2
    assert value(samples, "gateway_messages_out_total", endpoint="sl", outcome="dead") == 1
    assert value(samples, "gateway_dead_letters") == 1
    assert value(samples, "gateway_sessions_closed_total", endpoint="sl", reason="inactivity") == 2


def test_a_snapshot_is_detached_for_rendering_off_the_loop() -> None:
    metrics = Metrics()
    metrics.declare_endpoint("web", webhook=False)
    metrics.gauge("gateway_open_sessions", lambda: 3.0)
    metrics.inc("gateway_sessions_opened_total", endpoint="web")
    metrics.observe("gateway_flow_seconds", 0.2, "web")
    snapshot = metrics.snapshot()
    metrics.inc("gateway_sessions_opened_total", endpoint="web")
    metrics.observe("gateway_flow_seconds", 0.2, "web")
    metrics.declare_endpoint("late", webhook=True)
    text = snapshot.render().decode()
    assert 'gateway_sessions_opened_total{endpoint="web"} 1.0' in text
    assert 'gateway_flow_seconds_count{endpoint="web"} 1.0' in text
    assert "gateway_open_sessions 3.0" in text and 'endpoint="late"' not in text
    assert 'gateway_sessions_opened_total{endpoint="web"} 2.0' in metrics.render().decode()
