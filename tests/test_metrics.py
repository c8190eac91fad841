"""Tests for enforcer.metrics: collector names, rendering, observe_flow and label values."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from enforcer.errors import Outcome, Reason
from enforcer.flow import FlowRecord
from enforcer.metrics import Metrics


def flow(
    *,
    service: str | None = "app",
    decision: str = "allow",
    reason: str = "allowed",
    upstream_ms: float | None = 2.0,
) -> FlowRecord:
    """A finished record that took 12.5 ms."""
    rec = FlowRecord.begin(
        flow_id="0123456789abcdef", client="192.0.2.1:1", sni=None, host=None, method="GET", path="/secret/path", now=100.0
    )
    rec.service = service
    rec.user = "sub-123"
    rec.record(decision=decision, reason=reason)
    rec.upstream_ms = upstream_ms
    return rec.finish(now=100.0125, status=200)


def sample(m: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    """The value of one sample in the registry (None if absent)."""
    return m.registry.get_sample_value(name, labels or {})


def test_render_contains_all_metric_names() -> None:
    """The /metrics body names every collector and uses the Prometheus text content type."""
    m = Metrics()
    m.observe_flow(flow())
    m.upstream_errors.labels("app", "connect").inc()
    m.logins.labels("app", "started").inc()
    m.reloads.labels("success").inc()
    m.jwks_refresh.labels("https://idp.example", "success").inc()
    m.set_definitions("sha256:abc", 3)
    body, content_type = m.render()
    text = body.decode()
    assert content_type.startswith("text/plain")
    for name in (
        "enforcer_requests_total",
        "enforcer_request_duration_seconds_bucket",
        "enforcer_upstream_duration_seconds_bucket",
        "enforcer_upstream_errors_total",
        "enforcer_logins_total",
        "enforcer_sessions",
        "enforcer_active_connections",
        "enforcer_reloads_total",
        "enforcer_services",
        "enforcer_definitions_info",
        "enforcer_flowlog_dropped_records_total",
        "enforcer_flowlog_write_errors_total",
        "enforcer_jwks_refreshes_total",
    ):
        assert name in text, name
    families = {f.name for f in text_string_to_metric_families(text)}
    assert "enforcer_requests" in families


def test_fresh_registries_are_independent() -> None:
    """Two Metrics objects have separate registries, so tests never collide."""
    a, b = Metrics(), Metrics()
    a.observe_flow(flow())
    labels = {"service": "app", "decision": "allow", "reason": "allowed"}
    assert sample(a, "enforcer_requests_total", labels) == 1
    assert sample(b, "enforcer_requests_total", labels) is None


def test_accepts_given_registry() -> None:
    """A registry passed in is the one used."""
    reg = CollectorRegistry()
    m = Metrics(reg)
    assert m.registry is reg


def test_observe_flow_increments_counter_and_histograms() -> None:
    """observe_flow counts the request and observes request and upstream durations."""
    m = Metrics()
    m.observe_flow(flow())
    m.observe_flow(flow())
    m.observe_flow(flow(decision="deny", reason="missing_tags", upstream_ms=None))
    allow = {"service": "app", "decision": "allow", "reason": "allowed"}
    deny = {"service": "app", "decision": "deny", "reason": "missing_tags"}
    assert sample(m, "enforcer_requests_total", allow) == 2
    assert sample(m, "enforcer_requests_total", deny) == 1
    assert sample(m, "enforcer_request_duration_seconds_count", {"service": "app"}) == 3
    total = sample(m, "enforcer_request_duration_seconds_sum", {"service": "app"})
    assert total is not None
    assert abs(total - 3 * 0.0125) < 1e-6
    assert sample(m, "enforcer_upstream_duration_seconds_count", {"service": "app"}) == 2
    bucket = {"service": "app", "le": "0.025"}
    assert sample(m, "enforcer_request_duration_seconds_bucket", bucket) == 3


def test_no_path_or_user_in_labels() -> None:
    """Neither the path nor the user ever appears in the metrics output."""
    m = Metrics()
    m.observe_flow(flow())
    text = m.render()[0].decode()
    assert "/secret/path" not in text
    assert "sub-123" not in text


def test_a_flow_without_service_is_labelled_none() -> None:
    """A request that matched no service is counted under service 'none'."""
    m = Metrics()
    m.observe_flow(flow(service=None, decision="bad_request", reason="unknown_host"))
    labels = {"service": "none", "decision": "bad_request", "reason": "unknown_host"}
    assert sample(m, "enforcer_requests_total", labels) == 1


@pytest.mark.parametrize("reason", list(Reason))
def test_every_reason_is_its_own_metric_label(reason: Reason) -> None:
    """Each Reason is counted under a label equal to its code, a valid Prometheus label value."""
    m = Metrics()
    m.observe_flow(flow(decision=Outcome.ERROR, reason=reason))
    labels = {"service": "app", "decision": "error", "reason": reason.value}
    assert sample(m, "enforcer_requests_total", labels) == 1


def test_set_definitions_keeps_one_series() -> None:
    """Publishing new definitions replaces the previous digest series."""
    m = Metrics()
    m.set_definitions("one", 2)
    m.set_definitions("two", 4)
    assert sample(m, "enforcer_definitions_info", {"digest": "one"}) is None
    assert sample(m, "enforcer_definitions_info", {"digest": "two"}) == 1
    assert sample(m, "enforcer_services") == 4


def test_flowlog_callbacks_feed_counters() -> None:
    """The counter inc methods fit FlowLog's on_dropped / on_write_error hooks."""
    m = Metrics()
    m.flowlog_dropped.inc(3)
    m.flowlog_write_errors.inc()
    assert sample(m, "enforcer_flowlog_dropped_records_total") == 3
    assert sample(m, "enforcer_flowlog_write_errors_total") == 1


def test_observe_flow_reuses_the_children_of_a_label_set() -> None:
    """Repeated label sets land on one series, with or without a service."""
    m = Metrics()
    for _ in range(3):
        m.observe_flow(flow())
        m.observe_flow(flow(service=None, decision="bad_request", reason="bad_host"))
    assert sample(m, "enforcer_requests_total", {"service": "app", "decision": "allow", "reason": "allowed"}) == 3
    assert sample(m, "enforcer_requests_total", {"service": "none", "decision": "bad_request", "reason": "bad_host"}) == 3
    assert sample(m, "enforcer_request_duration_seconds_count", {"service": "none"}) == 3
