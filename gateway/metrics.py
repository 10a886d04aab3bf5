"""Counters and gauges rendered in the Prometheus text format at ``GET /metrics``.

One ``Metrics`` object per application (no module state); tests read counters directly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

Labels = tuple[tuple[str, str], ...]

HELP: dict[str, str] = {
    "gateway_webhook_requests_total": "Webhook requests by endpoint and outcome.",
    "gateway_events_total": "Inbound events by endpoint and outcome (accepted, duplicate, ignored).",
    "gateway_sessions_opened_total": "Sessions opened by endpoint.",
    "gateway_sessions_closed_total": "Sessions closed by endpoint and reason.",
    "gateway_messages_out_total": (
        "Outbound messages by endpoint and outcome (sent, skipped, dead = dead letter, retry, deferred)."
    ),
    "gateway_dead_letters_retried_total": "Dead letters queued again through the admin API, by endpoint.",
    "gateway_outbox_throttled_seconds_total": "Seconds sends waited for the rate limit, by endpoint.",
    "gateway_flow_errors_total": "Failed or invalid flow calls by endpoint.",
    "gateway_event_errors_total": "Events whose handling failed unexpectedly (logged with their id).",
    "gateway_close_script_errors_total": "Close scripts that failed or timed out (S12).",
    "gateway_open_sessions": "Sessions open now.",
    "gateway_outbox_pending": "Outbound messages waiting for delivery.",
}


class Metrics:
    """Monotonic counters with labels, plus gauges read at render time."""

    def __init__(self) -> None:
        self._counters: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        self._gauges: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self._counters[name][tuple(sorted(labels.items()))] += amount

    def value(self, name: str, **labels: str) -> float:
        """The counter's value for exactly these labels (0 when never incremented)."""
        return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def total(self, name: str) -> float:
        """The counter summed over all labels."""
        return sum(self._counters.get(name, {}).values())

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        self._gauges[name] = read

    def render(self) -> str:
        lines: list[str] = []
        for name in sorted(self._counters):
            lines += [f"# HELP {name} {HELP.get(name, name)}", f"# TYPE {name} counter"]
            for labels, amount in sorted(self._counters[name].items()):
                lines.append(f"{name}{_labels(labels)} {amount:g}")
        for name in sorted(self._gauges):
            lines += [
                f"# HELP {name} {HELP.get(name, name)}",
                f"# TYPE {name} gauge",
                f"{name} {self._gauges[name]():g}",
            ]
        return "\n".join(lines) + "\n"


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
