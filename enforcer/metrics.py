"""Every Prometheus collector of the enforcer, on one dedicated registry, and the /metrics body.

Label values are bounded: ``service`` is a configured service name, ``decision`` and
``reason`` are :class:`~enforcer.errors.Outcome` and :class:`~enforcer.errors.Reason` members
(the flow record holds nothing else), ``kind`` is an :class:`~enforcer.errors.UpstreamKind` or
a fixed word, ``outcome`` and ``verdict`` fixed words, and ``source`` a configured definitions
source's name. Paths, users, clients and hosts are never labels — they belong in the flow log.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

if TYPE_CHECKING:
    from enforcer.errors import Outcome, Reason
    from enforcer.flow import FlowRecord

__all__ = ["LATENCY_BUCKETS", "Metrics"]

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Seconds: a proxy hop costs well under a millisecond; apps take up to seconds."""

NO_SERVICE = "none"
"""Label for requests that matched no service (unknown SNI/Host/destination)."""


_multiprocess: dict[str, Path] = {}
"""``{"dir": path}`` once :func:`enable_multiprocess` ran in this process (or its parent)."""


def enable_multiprocess(directory: Path) -> None:
    """Several worker processes: every collector made from now on keeps its values in a
    per-process file in ``directory`` (prometheus_client's multiprocess mode), and
    :meth:`Metrics.render` adds up all processes. Call once in the parent, before forking;
    ``directory`` is emptied first (files of a previous run would be counted again)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700, parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _multiprocess["dir"] = directory


def process_gone(pid: int) -> None:
    """A worker exited: drop its live-gauge files (its counters keep counting in the sum)."""
    if "dir" in _multiprocess:
        multiprocess.mark_process_dead(pid, str(_multiprocess["dir"]))  # type: ignore[no-untyped-call]


class Metrics:
    """The collectors; construct one per daemon (tests make fresh ones)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Register every collector on ``registry`` (a new private one by default)."""
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "enforcer_requests",
            "Requests handled, by service, decision and reason code.",
            ["service", "decision", "reason"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "enforcer_request_duration_seconds",
            "Time from request arrival to the end of the response.",
            ["service"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "enforcer_upstream_duration_seconds",
            "Time the app took to answer (until response headers).",
            ["service"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "enforcer_upstream_errors",
            "Failures talking to the app, by kind (connect, timeout, protocol, reset).",
            ["service", "kind"],
            registry=r,
        )
        self.fast_requests = Counter(
            "enforcer_fast_path_requests",
            "Requests answered on the lean HTTP/1.1 path (allowed GET/HEAD with a cached session).",
            registry=r,
        )
        self.fast_handoffs = Counter(
            "enforcer_fast_path_handoffs",
            "Client connections handed from the lean path to the full HTTP stack (any other request).",
            registry=r,
        )
        self.logins = Counter(
            "enforcer_logins",
            "OpenID Connect logins: started, success, or a failure reason code.",
            ["service", "outcome"],
            registry=r,
        )
        self.sessions = Gauge(
            "enforcer_sessions", "Live sessions in the store.", registry=r, multiprocess_mode="livemax"
        )
        self.session_store_up = Gauge(
            "enforcer_session_store_up",
            "1 while the shared session store (Redis) answers, 0 while it is unavailable (fail closed).",
            registry=r, multiprocess_mode="livemin",
        )
        self.active_connections = Gauge(
            "enforcer_active_connections", "Client connections currently open.", registry=r,
            multiprocess_mode="livesum",
        )
        self.reloads = Counter(
            "enforcer_reloads", "Definition reloads, by outcome.", ["outcome"], registry=r
        )
        self.services = Gauge(
            "enforcer_services", "Services applying to this enforcer (0: every request is refused).",
            registry=r, multiprocess_mode="livemax",
        )
        self.definitions_info = Gauge(
            "enforcer_definitions_info",
            "Always 1; the label names the digest of the active definitions.",
            ["digest"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.flowlog_dropped = Counter(
            "enforcer_flowlog_dropped_records",
            "Flow records lost because the flow-log sink failed for too long.",
            registry=r,
        )
        self.flowlog_write_errors = Counter(
            "enforcer_flowlog_write_errors", "Failed writes to the flow-log sink.", registry=r
        )
        self.jwks_refresh = Counter(
            "enforcer_jwks_refreshes",
            "JWKS fetches by outcome (success, failure), unknown kids refused without a fetch "
            "(throttled) and key sets dropped after their grace (expired), by identity provider.",
            ["issuer", "outcome"],
            registry=r,
        )
        self.pod_probes = Counter(
            "enforcer_pod_probes",
            "Kubelet probes at a pod's probe gate, by result: passed (the app answered), refused (403, the app "
            "not contacted), unavailable (503, the app down or silent).",
            ["result"],
            registry=r,
        )
        self.kube_lists = Counter(
            "enforcer_kubernetes_lists",
            "Full lists of a kubernetes source's custom resources or Secrets (start-up, 410 Gone, errors).",
            ["source"],
            registry=r,
        )
        self.kube_watches = Counter(
            "enforcer_kubernetes_watch_starts",
            "Watches a kubernetes source started (each stream again when the server ends or breaks one).",
            ["source"],
            registry=r,
        )
        self.kube_errors = Counter(
            "enforcer_kubernetes_errors",
            "A kubernetes source's failed lists and watches (api: unreachable or refused, retried with "
            "backoff; gone: resourceVersion too old, listed again).",
            ["source", "kind"],
            registry=r,
        )
        self.kube_last_sync = Gauge(
            "enforcer_kubernetes_last_sync_timestamp_seconds",
            "Unix time up to which a kubernetes source's view is current: the oldest of its streams' last "
            "list, watch event or bookmark (0: never listed in full).",
            ["source"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.kube_resources = Gauge(
            "enforcer_kubernetes_custom_resources",
            "A kubernetes source's custom resources by the verdict of its last judging (accepted, rejected).",
            ["source", "verdict"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._duration_children: dict[str, tuple[Histogram, Histogram]] = {}
        self._children: dict[
            tuple[str | None, Outcome, Reason], tuple[Counter, tuple[Histogram, Histogram]]
        ] = {}
        """(service, decision, reason) -> the collectors' children, so a request does no lookup
        in prometheus_client's label dictionaries."""

    def render(self) -> tuple[bytes, str]:
        """Body and content type for the /metrics admin endpoint (all workers' sum when
        several processes serve)."""
        if "dir" in _multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, str(_multiprocess["dir"]))  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def observe_flow(self, record: FlowRecord) -> None:
        """Count a finished request and observe its durations (cached children: cheap)."""
        key = (record.service, record.decision, record.reason)
        children = self._children.get(key)
        if children is None:
            children = self._children_for(key)
        counter, durations = children
        counter.inc()
        durations[0].observe(record.duration_ms / 1000.0)
        if record.upstream_ms is not None:
            durations[1].observe(record.upstream_ms / 1000.0)

    def _children_for(
        self, key: tuple[str | None, Outcome, Reason]
    ) -> tuple[Counter, tuple[Histogram, Histogram]]:
        """The collectors' children for one (service, decision, reason), remembered."""
        service = key[0] or NO_SERVICE
        durations = self._duration_children.get(service)
        if durations is None:
            durations = (self.request_seconds.labels(service), self.upstream_seconds.labels(service))
            self._duration_children[service] = durations
        children = (self.requests.labels(service, key[1], key[2]), durations)
        self._children[key] = children
        return children

    def set_definitions(self, digest: str, services: int) -> None:
        """Publish the active definitions (only one digest series exists at a time)."""
        if "dir" in _multiprocess:  # the old series' file value stays: make it 0
            for labels in list(self.definitions_info._metrics):
                self.definitions_info.labels(*labels).set(0)
        self.definitions_info.clear()
        self.definitions_info.labels(digest[:64]).set(1)
        self.services.set(services)
