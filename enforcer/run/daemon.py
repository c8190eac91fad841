"""Lifecycle of the running enforcer: start in order, serve, reload, stop cleanly.

Start-up order: config and definitions (fatal if invalid) -> certificates -> session
store -> flow log -> attachments (listening socket, redirect) -> admin listener -> the
background tasks (flow-log writer, IdP discovery, housekeeping, definitions poller; in one
``asyncio.TaskGroup``) -> TLS listeners.  ``/readyz`` waits for discovery.  SIGHUP reopens the
flow log and reloads the definitions (the old set stays if the new one is invalid);
SIGTERM/SIGINT stop accepting, drain in-flight requests, flush the flow log and exit 0.  A
background task that fails stops the daemon the same way, logged with the task's name, and
the exit code is 1.  Pods are added and removed while serving (:meth:`Daemon.add_attachment`,
:meth:`Daemon.remove_attachment`), each on its own listener whose connections carry its scope
(only its services, through its own upstream pool inside its network namespace).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from enforcer.config import definitions as definitions_mod
from enforcer.config import settings as settings_mod
from enforcer.config.sources import DefinitionsManager, WatchingSource, build_sources
from enforcer.errors import Outcome, Reason
from enforcer.flow import FlowIds, FlowRecord
from enforcer.flowlog import FlowLog, open_stdout
from enforcer.http import accept, certs, fastpath, probes, proxy
from enforcer.http import server as server_mod
from enforcer.http import tls as listener
from enforcer.http.gate import Gate, Runtime
from enforcer.http.scope import Scope
from enforcer.identity import login, oidc, sessions, sqlite, tokens
from enforcer.metrics import Metrics
from enforcer.run import memory
from enforcer.run.attach import (
    Attachment,
    HostAttachment,
    PodAttachment,
    SocketFactory,
    StopCheck,
    StopDecision,
    Undo,
)
from enforcer.run.attach import build_redirect as build_redirect  # noqa: PLC0414  (re-export: cli.doctor uses it)
from enforcer.run.memory import tune_gc
from enforcer.run.stores import session_store
from enforcer.run.systemd import sd_notify, watchdog_interval

if TYPE_CHECKING:
    from enforcer.config.kubernetes import NodeLabels
    from enforcer.run.pods import PodController

log = logging.getLogger(__name__)


DRAIN_SECONDS = 20.0

FAILED_DRAIN_SECONDS = 5.0
"""In-flight requests get this long when a failed background task stops the daemon."""

WORKERS_STATE = "workers.json"
"""Written by the master in the state dir: which workers listen and are ready."""

RELOAD_SIBLINGS = signal.SIGUSR1
"""Primary -> master: the admin API reloaded; master -> workers: re-read the definitions."""


def _jwks_counter(metrics: Metrics, issuer: str) -> Callable[[str], None]:
    """The Provider hook that counts its JWKS events under its issuer."""

    def count(outcome: str) -> None:
        metrics.jwks_refresh.labels(issuer, outcome).inc()

    return count


def build_providers(
    definitions: definitions_mod.Definitions,
    settings: settings_mod.Settings,
    http: aiohttp.ClientSession,
    previous: dict[str, oidc.Provider] | None = None,
    metrics: Metrics | None = None,
    *,
    services: tuple[definitions_mod.Service, ...] | None = None,
) -> dict[str, oidc.Provider]:
    """One Provider per (issuer, CA file); reused across reloads to keep caches. Its JWKS
    events are counted in ``metrics`` (``enforcer_jwks_refreshes{issuer, outcome}``).
    ``services``: the services served (default ``definitions.services``; with pods, theirs too)."""
    s = settings.model.oidc
    shared: dict[tuple[str, str | None], oidc.Provider] = {}
    for p in (previous or {}).values():
        shared[(p.issuer, getattr(p, "_ca_key", None))] = p
    out: dict[str, oidc.Provider] = {}
    for svc in definitions.services if services is None else services:
        ca = svc.idp_ca_file or s.caFile
        key = (svc.issuer, str(ca) if ca else None)
        provider = shared.get(key)
        if provider is None:
            provider = oidc.Provider(
                issuer=svc.issuer,
                http=http,
                ssl_context=oidc.client_ssl_context(str(ca) if ca else None),
                timeout=s.httpTimeout,
                allow_http_loopback=s.allowHttpLoopbackIssuer,
                jwks_refresh_interval=s.jwksRefreshInterval,
                on_jwks_event=None if metrics is None else _jwks_counter(metrics, svc.issuer),
            )
            provider._ca_key = key[1]  # type: ignore[attr-defined]
            shared[key] = provider
        out[svc.name] = provider
    return out


def build_leaves(
    definitions: definitions_mod.Definitions, store: certs.CertStore,
    services: tuple[definitions_mod.Service, ...] | None = None,
) -> tuple[dict[str, certs.LeafPaths], str | None]:
    """Certificates for every host (operator-supplied ones win) and the no-SNI default host.
    ``services``: the services served (default ``definitions.services``; with pods, theirs too:
    one TLS context holds every listener's certificates, and routing keeps each pod to its own)."""
    served = definitions.services if services is None else services
    leaves: dict[str, certs.LeafPaths] = {}
    for svc in served:
        if svc.tls is not None:
            leaf = store.operator_leaf(svc.tls.cert, svc.tls.key)
        else:
            leaf = store.ensure_leaf(svc.name, list(svc.hosts))
        for h in svc.hosts:
            leaves[h] = leaf
    default = served[0].hosts[0] if served else None
    return leaves, default


def status_text(definitions: definitions_mod.Definitions) -> str:
    """systemd's STATUS= line: how many services, and which (``systemctl status`` shows it)."""
    names = ", ".join(svc.name for svc in definitions.services)
    return f"serving {len(definitions.services)} service(s)" + (f": {names}"[:200] if names else "")


_RELOAD_REASONS = {
    "success": Reason.RELOAD_SUCCESS,
    "last_known_good": Reason.RELOAD_LAST_KNOWN_GOOD,
    "rejected": Reason.RELOAD_REJECTED,
    "failed": Reason.RELOAD_FAILED,
}
"""The flow reason of each outcome of a definitions reload."""


@dataclass(eq=False)
class _Pod:
    """A pod the daemon serves: its attachment, the scope its listener hands its connections
    (its services, its upstream pool inside its namespace) and that listener once serving."""

    attachment: PodAttachment
    scope: Scope
    upstream: proxy.PodUpstream
    listener: accept.TLSListener | None = None
    probe_gate: probes.ProbeGate | None = None
    """Its kubelet probes' gate (a pod with a plain-HTTP probe), open while it is served."""


POD_DRAIN_SECONDS = 5.0
"""In-flight requests of a pod being removed get this long (the pod is going away)."""

KEY_FILE_CHECK = 30.0
"""Seconds between two looks at the refresh-token key file (a stat; re-read only when changed)."""


@dataclass
class _Serving:
    """What start-up made and serving and stopping use."""

    definitions: definitions_mod.Definitions
    runtime: Runtime
    store: sessions.SessionStore
    server: server_mod.Server
    ssl_context: ssl.SSLContext
    listeners: list[accept.TLSListener] = field(default_factory=list)


@dataclass
class Daemon:
    """The running enforcer and everything it owns."""

    settings: settings_mod.Settings
    metrics: Metrics = field(default_factory=Metrics)
    flow_ids: FlowIds = field(default_factory=FlowIds)
    """Made with the Daemon, which each worker process makes after it is forked."""
    ready: bool = False
    listen_port: int = 0
    admin_port: int = 0
    metrics_port: int = 0
    """The metrics-only listener's port (``metrics:``), 0 without one."""
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _group: asyncio.TaskGroup | None = None
    """Owns every background task while the daemon serves; a task that fails stops the daemon."""
    _failed: str | None = None
    """The name of the background task whose failure stopped the daemon."""
    role: str = "single"
    """``single`` (one process does everything), or under a :class:`Master`: ``primary`` (worker
    0: also the redirect, the admin listener and housekeeping) or ``worker`` (serves only)."""
    listen_socket: socket.socket | None = None
    tls_context: ssl.SSLContext | None = None
    """Made by the master before forking, so every worker has the same session-ticket keys."""
    trimmer: memory.Trimmer = field(default_factory=memory.Trimmer)
    """Returns the C heap's free pages to the OS when a burst of connections is over and from housekeeping."""
    flowlog: FlowLog | None = None
    """Where flow records go; made from ``flowLog:`` at start unless given."""
    attachments: list[Attachment] = field(default_factory=list)
    """Where the daemon serves, each with its own listener: made at start (the host), and the
    pods added and removed while serving (:meth:`add_attachment`, :meth:`remove_attachment`)."""
    _pods: dict[int, _Pod] = field(default_factory=dict)
    """The pod attachments served, by ``id()`` of the attachment."""
    _serving: _Serving | None = None
    _attach_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """One change of attachments or definitions at a time (reloads, pods added and removed)."""
    node_labels: NodeLabels | None = None
    """On a Kubernetes node (``kubernetes.nodeLabelTags``): its Node's labels, watched."""
    pod_controller: PodController | None = None
    """Pod mode (``kubernetes.pods.enabled``): enrols this Node's pods by label."""
    _warming: asyncio.Task[None] | None = None
    """The discovery loop of the runtime in force (:meth:`_discover`)."""
    starting: str | None = "starting"
    """While start-up runs: what it is doing or waiting for (``/readyz`` says it); None after."""

    @property
    def owns_host(self) -> bool:
        """This process installs the redirect and runs the admin listener and housekeeping."""
        return self.role in ("single", "primary")

    async def run(self, *, on_ready: asyncio.Future[None] | None = None) -> int:
        """Serve until SIGTERM/SIGINT (or :meth:`stop`); returns the exit code: 0 after a clean
        stop, 1 when a background task failed (logged with its name)."""
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            # logrotate may send SIGHUP while we start: never let it kill the daemon
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, lambda: log.info("SIGHUP during start-up ignored: definitions are being read now")
            )
        async with contextlib.AsyncExitStack() as resources:
            serving = await self._start(resources)
            code = await self._serve(serving, on_ready)
        log.info("stopped")
        return code

    def stop(self) -> None:
        self._stop.set()

    # -- start-up ------------------------------------------------------------------------------

    async def _start(self, resources: contextlib.AsyncExitStack) -> _Serving:
        """Everything that may fail at start-up, in order; each resource is closed by
        ``resources`` (in reverse), also when a later step fails."""
        s = self.settings.model
        s.stateDir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.owns_host:  # first: a start-up that waits is alive and says why it is not ready
            resources.push_async_callback((await self._start_admin()).cleanup)
            if s.metrics is not None:
                resources.push_async_callback((await self._start_metrics(s.metrics)).cleanup)
        await self._node_tags()
        self.starting = "reading the definitions"
        if not self.attachments:
            self.attachments = [HostAttachment(
                self.settings, manages_redirect=self.owns_host, listen_socket=self.listen_socket,
                stop_check=self._stop_check(),
            )]
        outgoing = self.attachments[0].socket_factory()
        definitions = await self._load_definitions(resources, outgoing)
        self.cert_store = certs.CertStore(s.stateDir)
        self.tls = listener.TLSDispatch(*build_leaves(definitions, self.cert_store), context=self.tls_context)
        store = session_store(s, shared=self.role != "single", on_state=self.metrics.session_store_up.set)
        resources.push_async_callback(store.close)
        if self.flowlog is None:
            self.flowlog = FlowLog(
                self.settings.flow_log,
                on_dropped=self.metrics.flowlog_dropped.inc,
                on_write_error=self.metrics.flowlog_write_errors.inc,
                echo=open_stdout() if s.flowLogStdout else None, echo_shared=self.role != "single",
            )
        resources.push_async_callback(self.flowlog.close)
        upstream = proxy.Upstream(**self._upstream_limits(), socket_factory=outgoing)
        resources.push_async_callback(upstream.close)
        self.starting = "installing the redirect"
        await self._attach(resources, definitions)
        served = self._served(definitions)
        if self._pods:
            self.tls.update(*build_leaves(definitions, self.cert_store, served))
        runtime = Runtime(
            definitions, build_providers(definitions, self.settings, self.http, metrics=self.metrics, services=served)
        )
        self.gate = Gate(
            settings=self.settings,
            runtime=runtime,
            store=store,
            flowlog=self.flowlog,
            metrics=self.metrics,
            upstream=upstream,
            listen_port=self.listen_port,
            flow_ids=self.flow_ids,
            shared_logins=(
                login.SharedTransactionStore(store, ttl=s.oidc.loginTimeout)
                if isinstance(store, sessions.FleetStore)  # the callback may reach another enforcer
                or (self.role != "single" and isinstance(store, sqlite.SQLiteSessionStore)) else None
            ),
        )
        server = self._make_server()
        self.starting = None
        return _Serving(definitions, runtime, store, server, self.tls.context)

    async def _node_tags(self) -> None:
        """With ``kubernetes.nodeLabelTags``: add the Node's labels to the tags before anything
        is resolved, read now or, with the API server down, as last read here.  With neither,
        wait (retrying with backoff): not ready, no listener, and the redirect table already in
        force (the previous pod's) untouched -- serving with fewer tags would select fewer
        services and open their app ports."""
        kube = self.settings.model.kubernetes
        if kube is None or not kube.nodeLabelTags or kube.nodeName is None:
            return
        from enforcer.config import kubernetes  # noqa: PLC0415 (only on a Kubernetes node)

        self.node_labels = kubernetes.NodeLabels(
            kube.nodeName, self.settings.state_dir, kubeconfig=kube.kubeconfig, timeout=kube.timeout,
        )
        backoff = kubernetes.Backoff(base=1.0, cap=30.0)
        origin = ""
        while not origin:
            self.starting = f"reading the labels of Node {kube.nodeName}"
            try:
                origin = await self.node_labels.first()
            except kubernetes.KubernetesError as exc:
                delay = backoff.next()
                self.starting = f"waiting for the labels of Node {kube.nodeName}: {exc}"
                log.error("%s: not serving until the labels are known (the redirect table in force stays); "
                          "retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
        self.settings = dataclasses.replace(self.settings, node_tags=self.node_labels.tags)
        log.info("Node %s: %d label tag(s) from %s", kube.nodeName, len(self.settings.node_tags), origin)

    async def _node_labels_changed(self, labels: Mapping[str, str]) -> None:
        """The Node's labels changed: resolve the definitions in force again with the new tags."""
        assert self.node_labels is not None
        self.settings = dataclasses.replace(self.settings, node_tags=self.node_labels.tags)
        outcome = await self.manager.retag(self.settings, f"node {self.node_labels.node} labels changed")
        if outcome != "success":
            log.error("the definitions with the new node tags were not applied (%s); the set in force stays", outcome)

    def _stop_check(self) -> StopCheck | None:
        """With ``kubernetes.daemonSet``: the question asked at a stop (an uninstall?), asked of
        the API server once per stop (the host's table, the pods' and the CNI plugin share it)."""
        kube = self.settings.model.kubernetes
        if kube is None or kube.daemonSet is None or kube.namespace is None:
            return None
        namespace, name, kubeconfig, limit = kube.namespace, kube.daemonSet, kube.kubeconfig, kube.timeout
        node = kube.nodeName
        answer: list[StopDecision] = []

        async def check() -> StopDecision:
            from enforcer.config import kubernetes  # noqa: PLC0415 (only on a Kubernetes node)

            if not answer:
                answer.append(await kubernetes.stop_verdict(namespace, name, kubeconfig, limit, node))
                log.info("stop: %s", answer[0].why)
            return answer[0]

        return check

    async def _is_uninstall(self) -> bool:
        """At a stop: does the stop check (the host attachment's) call it an uninstall? Without
        one, or with ``redirect.keepBlockOnStop`` off (tables go at every stop anyway): no."""
        host = next((a for a in self.attachments if isinstance(a, HostAttachment)), None)
        if host is None or host.stop_check is None or not self.settings.model.redirect.keepBlockOnStop:
            return False
        try:
            return (await host.stop_check()).uninstall
        except Exception:
            log.exception("the stop check failed; keeping the pods' tables and the CNI plugin (fail closed)")
            return False

    async def _load_definitions(
        self, resources: contextlib.AsyncExitStack, outgoing: SocketFactory | None
    ) -> definitions_mod.Definitions:
        """The HTTP client for the IdPs and the definitions sources, and the first definitions."""
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, socket_factory=outgoing),
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": "enforcer"},
        )
        resources.push_async_callback(self.http.close)
        self.manager = DefinitionsManager(
            self.settings, build_sources(self.settings, self.http, self.metrics), on_change=self._apply,
            on_outcome=self._reload_outcome,
        )
        definitions = await self.manager.load_initial()
        for w in definitions.warnings:
            log.warning("%s", w)
        return definitions

    def _upstream_limits(self) -> dict[str, Any]:
        """An upstream pool's ``limits:`` settings (the host's pool and each pod's)."""
        s = self.settings.model
        return {
            "connect_timeout": s.limits.upstreamConnectTimeout, "read_timeout": s.limits.upstreamReadTimeout,
            "max_body": s.limits.maxBodyBytes, "body_buffer": s.limits.bodyBufferBytes,
        }

    async def _attach(self, resources: contextlib.AsyncExitStack, definitions: definitions_mod.Definitions) -> None:
        """Open every attachment's socket and install its redirect (removed again at stop); a
        pod's gets its scope and upstream pool too (all closed at stop by :meth:`_detach_pods`)."""
        resources.push_async_callback(self._detach_pods)
        for attachment in self.attachments:
            if isinstance(attachment, PodAttachment):
                attachment.open()
                try:
                    await attachment.apply(definitions)
                    pod = self._pod(attachment)
                    self._pods[id(attachment)] = pod
                    pod.probe_gate = await self._open_probe_gate(attachment)
                except BaseException:
                    attachment.close()
                    raise
                continue
            attachment.open()
            resources.callback(attachment.close)
            await attachment.apply(definitions)
            resources.push_async_callback(attachment.remove)
        self.listen_port = self.attachments[0].listen_port

    def _pod(self, attachment: PodAttachment) -> _Pod:
        """A pod's scope: its services and a pool whose sockets are made inside its namespace."""
        upstream = proxy.PodUpstream(**self._upstream_limits(), socket_factory=attachment.socket_factory())
        return _Pod(attachment, Scope(attachment.name, attachment.listen_port, upstream, attachment.services), upstream)

    async def _open_probe_gate(self, attachment: PodAttachment) -> probes.ProbeGate | None:
        """The pod's probe gate, serving (None when it has no plain-HTTP probe or no probe port)."""
        if not attachment.wants_probe_gate:
            return None
        limits = self.settings.model.limits
        gate = probes.ProbeGate(
            attachment.name, attachment.open_probe_socket(), lambda: attachment.gated, attachment.socket_factory(),
            count=lambda result: self.metrics.pod_probes.labels(result=result).inc(),
            max_connections=min(16, limits.maxConnectionsPerIP), head_limit=min(8192, limits.maxHeadBytes),
            timeout=min(probes.TIMEOUT, limits.headerTimeout),
        )
        await gate.start()
        return gate

    def _served(self, definitions: definitions_mod.Definitions) -> tuple[definitions_mod.Service, ...]:
        """Every service some attachment serves: the host's (``definitions.services``), then the pods'."""
        served = {svc.name: svc for svc in definitions.services}
        for pod in self._pods.values():
            for svc in pod.attachment.services:
                served.setdefault(svc.name, svc)
        return tuple(served.values())

    def _pod_listener(self, serving: _Serving, pod: _Pod) -> accept.TLSListener:
        handshake_timeout = min(10.0, self.settings.model.limits.headerTimeout)  # a silent ClientHello (X-LIM-10)
        return accept.TLSListener(
            serving.server, pod.attachment.open(), serving.ssl_context, handshake_timeout, redirect=True,
            scope=pod.scope,
        )

    async def add_attachment(self, attachment: PodAttachment) -> None:
        """Serve a pod from now on: open its listening socket (inside its namespace), install
        its redirect for the definitions in force (the services its tags select), add their
        certificates and identity providers, then accept on its listener with its scope (only
        its services, through its own upstream pool). Raises if a step fails; what it opened is
        closed again, and a table it installed stays (the pod's ports refuse: fail closed)."""
        async with self._attach_lock:
            serving = self._serving
            if serving is None or self._group is None:
                raise RuntimeError("the enforcer is not serving: attachments are added while it serves")
            if id(attachment) in self._pods:
                raise ValueError(f"{attachment.name} is served already")
            definitions = self.gate.runtime.definitions
            attachment.open()
            pod: _Pod | None = None
            try:
                await attachment.apply(definitions)
                pod = self._pod(attachment)
                self._pods[id(attachment)] = pod
                await self._serve_more(definitions)
                pod.listener = self._pod_listener(serving, pod)
                serving.listeners.append(pod.listener)
                pod.probe_gate = await self._open_probe_gate(attachment)
                self.attachments.append(attachment)
            except BaseException:
                if pod is not None:
                    self._pods.pop(id(attachment), None)
                    await self._close_pod(pod)
                attachment.close()
                raise
        log.info("%s: serving %s on port %d in its network namespace", attachment.name,
                 ", ".join(svc.name for svc in attachment.services) or "no service", attachment.listen_port)

    async def _serve_more(self, definitions: definitions_mod.Definitions) -> None:
        """A pod was added: certificates and providers for every service served now (existing
        ones kept; a reload trims what no attachment serves any more), then its scope."""
        served = self._served(definitions)
        leaves, default = await asyncio.to_thread(build_leaves, definitions, self.cert_store, served)
        self.tls.update(leaves, default)
        old = self.gate.runtime
        providers = build_providers(definitions, self.settings, self.http, old.providers, self.metrics, services=served)
        if providers.keys() != old.providers.keys():
            runtime = Runtime(definitions, providers)
            self.gate.runtime = runtime
            self._discover(runtime)
        for pod in self._pods.values():
            pod.scope.serve(pod.attachment.services)

    async def remove_attachment(
        self, attachment: PodAttachment, *, release: bool, drain: float = POD_DRAIN_SECONDS
    ) -> None:
        """Stop serving a pod: stop its listener, let its connections finish (up to ``drain``
        seconds, then cut), close its upstream pool (every socket into its namespace), then
        ``release()`` it (``release``: no longer selected, its table removed) or ``close()`` it
        (the pod is gone). Other pods and the host are not touched. A release the kernel refuses
        raises ``RedirectError`` and leaves the attachment open (its table in place, its ports
        refusing) for the caller to retry ``attachment.release()``."""
        async with self._attach_lock:
            pod = self._pods.pop(id(attachment), None)
            if pod is None:
                raise ValueError(f"{attachment.name} is not served here")
            with contextlib.suppress(ValueError):
                self.attachments.remove(attachment)
            await self._close_pod(pod, drain)
            if release:
                await attachment.release()
            else:
                attachment.close()
        log.info("%s: no longer served (%s)", attachment.name, "released" if release else "closed")

    async def _close_pod(self, pod: _Pod, drain: float = 0.0) -> None:
        """Stop a pod's listener and connections and close its upstream pool; wait (a second at
        most) until every upstream socket into its namespace is closed."""
        serving = self._serving
        if pod.listener is not None:
            pod.listener.close()
            if serving is not None and pod.listener in serving.listeners:
                serving.listeners.remove(pod.listener)
        if pod.probe_gate is not None:
            await pod.probe_gate.close()
        if serving is not None:
            await serving.server.close_scope(pod.scope, drain)
        await pod.upstream.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while pod.attachment.open_upstreams() and loop.time() < deadline:  # noqa: ASYNC110 (closes on the next turns)
            await asyncio.sleep(0.01)

    async def _detach_pods(self) -> None:
        """At stop (after the drain): each pod's listener and pool closed, then its table kept
        or removed as the host's (:meth:`PodAttachment.remove`), then its namespace let go.
        An uninstall (the stop check: the DaemonSet gone or being deleted) releases every pod
        (its table removed) and takes the CNI plugin out of the node's configuration; a restart
        or an upgrade keeps both (fail closed: new pods wait for the next enforcer)."""
        kube = self.settings.model.kubernetes
        pod_mode = self.owns_host and kube is not None and kube.pods.enabled
        uninstall = await self._is_uninstall() if self._pods or pod_mode else False
        for key, pod in reversed(list(self._pods.items())):
            del self._pods[key]
            await self._close_pod(pod)
            if uninstall:
                try:
                    await pod.attachment.release()
                except Exception:
                    log.exception("%s: its table could not be removed at the uninstall", pod.attachment.name)
            else:
                await pod.attachment.remove()
            pod.attachment.close()
        if uninstall and pod_mode:
            from enforcer.run import cni  # noqa: PLC0415 (pod mode only)

            await asyncio.to_thread(cni.uninstall_from_node)

    def _make_server(self) -> server_mod.Server:
        """The HTTP server behind every listener (and the lean path, if enabled)."""
        s = self.settings.model
        server = server_mod.Server(
            self.gate.handle,
            header_timeout=s.limits.headerTimeout,
            body_timeout=s.limits.idleTimeout,
            write_timeout=s.limits.writeTimeout,
            max_connections=s.limits.maxConnections,
            max_per_ip=s.limits.maxConnectionsPerIP,
            body_min_rate=s.limits.bodyMinRate,
            body_grace=s.limits.bodyGrace,
            read_min_rate=s.limits.readMinRate,
            read_grace=s.limits.readGrace,
            max_head_bytes=s.limits.maxHeadBytes,
            max_uploads_per_ip=s.limits.maxUploadsPerIP,
            new_per_ip=server_mod.RateLimit(
                s.limits.newConnectionsPerIP, s.limits.newConnectionsBurst, loopback=s.limits.rateLimitLoopback
            ),
            keepalive_timeout=s.limits.idleTimeout,
            max_line_size=8190,
            max_field_size=8190,
            max_headers=100,
            lingering_time=5.0,
            tcp_keepalive=False,  # idleTimeout closes idle connections long before TCP keep-alive would probe
            auto_decompress=False,
            access_log=None,
        )
        server.on_refused = self.gate.refused
        if s.listen.fastPath:
            server.fast = fastpath.FastPath(self.gate, server).protocol_factory()
        self.trimmer.call_later = asyncio.get_running_loop().call_later
        server.on_idle = self.trimmer.maybe_trim
        return server

    # -- serving -------------------------------------------------------------------------------

    async def _serve(self, serving: _Serving, on_ready: asyncio.Future[None] | None) -> int:
        """Serve inside one TaskGroup until stopped or until a background task fails."""
        code = 0
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self._start_tasks(serving)
                self._listen(serving)
                self._announce(serving.definitions, on_ready)
                await self._stop.wait()
                await self._drain(serving, DRAIN_SECONDS)
                self._group = None  # nothing new starts (a late reload's discovery)
                for task in list(self._tasks):
                    task.cancel()
        except* Exception as failed:
            if self._failed is None:
                log.critical("the enforcer failed while serving", exc_info=failed.exceptions[0])
            if self.role == "single":
                sd_notify(f"STOPPING=1\nSTATUS=stopping: {self._failed or 'serving'} failed")
            await self._drain(serving, FAILED_DRAIN_SECONDS)
            code = 1
        finally:
            self._group = None
            for tls_listener in serving.listeners:
                tls_listener.close()
        return code

    def _start_tasks(self, serving: _Serving) -> None:
        assert self.flowlog is not None
        self._spawn(self.flowlog.run(), "flowlog")
        self._discover(serving.runtime)
        if isinstance(serving.store, sessions.FleetStore):
            self.metrics.session_store_up.set(0)
            self._spawn(serving.store.watch(), "session-store-watch")
        if self.owns_host:
            self._spawn(self._housekeeping(serving.store), "housekeeping")
        self._spawn(self.manager.run(), "definitions")
        if self.settings.model.sessions.refreshTokenKeyFile is not None:
            self._spawn(self._watch_keys(), "refresh-token-keys")
        if self.node_labels is not None:
            self._spawn(self.node_labels.watch(self._node_labels_changed), "node-labels")
        kube = self.settings.model.kubernetes
        if self.owns_host and kube is not None and kube.pods.enabled:
            self._spawn(self._run_pods(), "pods")
        for src in self.manager.sources:
            if isinstance(src, WatchingSource):  # custom resources: the host stands for the status Lease
                self._spawn(src.watch(functools.partial(self.manager.push, origin=src.name), report=self.owns_host),
                            f"definitions-watch {src.name}")

    async def _run_pods(self) -> None:
        """Pod mode: the CNI plugin's socket and the controller watching this Node's pods (its
        attachments are served through :meth:`add_attachment` / :meth:`remove_attachment`)."""
        from enforcer.config import kubernetes  # noqa: PLC0415 (only on a Kubernetes node)
        from enforcer.run import cni, pods  # noqa: PLC0415

        kube = self.settings.model.kubernetes
        assert kube is not None
        assert kube.nodeName is not None
        source = kubernetes.NodePods(kube.nodeName, kubeconfig=kube.kubeconfig)
        controller = pods.PodController(
            self.settings, source, self, lambda: self.gate.runtime.definitions, lookup_wait=kube.pods.lookupWait,
        )
        self.pod_controller = controller
        server = cni.CniServer(controller, kube.pods.cniSocket)
        await server.start()
        try:
            self._spawn(self._install_cni(kube.pods.cniSocket), "cni-install")
            await controller.run()
        finally:
            await server.close()

    @staticmethod
    async def _install_cni(socket_path: Path) -> None:
        """The chained CNI plugin into the node's configuration, once our socket listens
        (idempotent; retried while the node has none; removed only by an uninstall)."""
        from enforcer.run import cni  # noqa: PLC0415 (pod mode only)

        await cni.keep_installed(socket_path)

    async def _reconcile_pods(self, controller: PodController) -> None:
        try:
            await controller.definitions_changed()
        except Exception:  # the next change or list tries again; the tables in force stay
            log.exception("pods: re-evaluating them for the new definitions failed")

    def _listen(self, serving: _Serving) -> None:
        """One TLS listener per attachment (a pod's with its scope), then the signal handlers."""
        self._serving = serving
        handshake_timeout = min(10.0, self.settings.model.limits.headerTimeout)  # a silent ClientHello (X-LIM-10)
        for attachment in self.attachments:
            pod = self._pods.get(id(attachment))
            if pod is not None:
                pod.listener = self._pod_listener(serving, pod)
                serving.listeners.append(pod.listener)
                continue
            sock = attachment.open()
            serving.listeners.append(accept.TLSListener(
                serving.server, sock, serving.ssl_context, handshake_timeout,
                redirect=self.settings.model.redirect.enabled,
            ))
        assert self.flowlog is not None
        self._install_signals(asyncio.get_running_loop(), self.flowlog)

    def _announce(self, definitions: definitions_mod.Definitions, on_ready: asyncio.Future[None] | None) -> None:
        """Log what is served, publish the definitions and tell the caller and systemd we are ready."""
        self._publish_definitions()
        s = self.settings.model
        log.info(
            "enforcer%s listening on %s port %d for %d service(s): %s",
            "" if self.role == "single" else f" {self.role} (pid {os.getpid()})",
            s.listen.address,
            self.listen_port,
            len(definitions.services),
            ", ".join(f"{svc.name} ({', '.join(svc.hosts)})" for svc in definitions.services) or "none",
        )
        tune_gc()
        if on_ready is not None and not on_ready.done():
            on_ready.set_result(None)
        if self.role == "single":
            sd_notify(f"READY=1\nSTATUS={status_text(definitions)}")
            watchdog = watchdog_interval()
            if watchdog is not None:
                self._spawn(self._feed_watchdog(watchdog), "watchdog")

    async def _drain(self, serving: _Serving, seconds: float) -> None:
        """Stop accepting and let in-flight requests finish (up to ``seconds``)."""
        if self.role == "single" and self._failed is None:
            sd_notify("STOPPING=1\nSTATUS=draining")
        log.info("stopping: draining in-flight requests (up to %.0f s)", seconds)
        for tls_listener in serving.listeners:
            tls_listener.close()
        await serving.server.shutdown(seconds)
        self.trimmer.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None] | None:
        """Run ``coro`` in the daemon's TaskGroup: if it fails, the daemon stops with an error."""
        if self._group is None:  # stopping: nothing new starts
            coro.close()
            return None
        task = self._group.create_task(self._owned(coro, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _discover(self, runtime: Runtime) -> None:
        """Warm up ``runtime``'s providers, in place of the warm-up of the runtime it replaced: one
        discovery loop at a time, however many reloads an unreachable IdP sees."""
        if self._warming is not None:
            self._warming.cancel()
        self._warming = self._spawn(self._warm_up(runtime), "discovery")

    async def _owned(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        try:
            await coro
        except Exception:
            if self._failed is None:
                self._failed = name
            log.critical("background task %r failed; stopping the enforcer", name, exc_info=True)
            raise

    def _install_signals(self, loop: asyncio.AbstractEventLoop, flowlog: FlowLog) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, self.stop)
            loop.add_signal_handler(signal.SIGINT, self.stop)
            loop.add_signal_handler(signal.SIGHUP, lambda: self._on_hup(flowlog))
            if self.role != "single":
                loop.add_signal_handler(RELOAD_SIBLINGS, self.reload)

    def _on_hup(self, flowlog: FlowLog) -> None:
        flowlog.reopen()
        self.reload()

    def _workers_not_ready(self) -> str | None:
        """Under a master: why not every worker is ready (from its ``workers.json``), or None."""
        try:
            state = json.loads((self.settings.model.stateDir / WORKERS_STATE).read_text(encoding="utf-8"))
            ready, count = len(state["ready"]), int(state["workers"])
        except (OSError, ValueError, KeyError, TypeError):
            return "worker state unknown (the master has not written workers.json yet)"
        return None if ready >= count else f"{ready} of {count} workers ready"

    def _tell_siblings(self) -> None:
        """Under a master: ask it to have every other worker re-read the definitions too."""
        if self.role == "primary":
            with contextlib.suppress(OSError):
                os.kill(os.getppid(), RELOAD_SIBLINGS)

    def reload(self) -> None:
        """Re-read every definitions source now (SIGHUP, `enforcer reload`), and the refresh-token
        key file if it changed."""
        self.gate.reload_keys()
        self.manager.trigger()

    async def _watch_keys(self) -> None:
        """Pick up a rotated ``sessions.refreshTokenKeyFile`` without a restart or a signal (a
        Kubernetes Secret volume changes under the running pod): every :data:`KEY_FILE_CHECK`."""
        while True:
            await asyncio.sleep(KEY_FILE_CHECK)
            self.gate.reload_keys()

    async def _apply(self, definitions: definitions_mod.Definitions, reason: str) -> None:
        """Swap in a validated set: redirect rules, then certificates, then the request path.

        A failing step raises, and the manager keeps the previous set (the nftables batch is
        atomic: a refused one leaves the old table untouched; the redirects already replaced
        are put back)."""
        async with self._attach_lock:
            await self._apply_locked(definitions, reason)
        if self.pod_controller is not None:  # enrol, release or re-tag every pod for the new set
            self._spawn(self._reconcile_pods(self.pod_controller), "pods-reconcile")

    async def _apply_locked(self, definitions: definitions_mod.Definitions, reason: str) -> None:
        undo: list[Undo] = []
        try:
            for attachment in list(self.attachments):
                undo.append(await attachment.apply(definitions))
            served = self._served(definitions)  # (each pod's services as just applied)
            leaves, default = await asyncio.to_thread(build_leaves, definitions, self.cert_store, served)
            self.tls.update(leaves, default)
        except Exception:
            for step in reversed(undo):
                await step()
            raise
        old = self.gate.runtime
        providers = build_providers(definitions, self.settings, self.http, old.providers, self.metrics, services=served)
        runtime = Runtime(definitions, providers)
        self.gate.runtime = runtime
        for pod in self._pods.values():
            pod.scope.serve(pod.attachment.services)
        dropped = self.gate.store.retain_services(frozenset(svc.name for svc in served))
        if dropped:
            log.info("reload: forgot %d cached session(s) of services no longer defined", dropped)
        self._discover(runtime)
        if self.role == "single":
            sd_notify(f"STATUS={status_text(definitions)}")
        log.info(
            "definitions applied (%s): %s", reason, ", ".join(svc.name for svc in definitions.services) or "no services"
        )

    def _publish_definitions(self) -> None:
        """enforcer_definitions_info{digest} and enforcer_services for the set in force."""
        current = self.manager.current
        if current is not None:
            self.metrics.set_definitions(self.manager.digest, len(current.services))
        problem = self._no_service()
        if problem:
            log.error("%s", problem)

    def _no_service(self) -> str | None:
        """Why it is wrong that no service applies here, or None (some do, or none is allowed)."""
        current = self.manager.current
        if current is None or current.services or self.settings.model.allowNoServices:
            return None
        return (
            f"no service applies to this enforcer (tags {list(self.settings.tags)}): every request is refused; "
            "fix the tags or the services' selectors (enforcer check says which), or set allowNoServices: true"
        )

    def _reload_outcome(self, outcome: str, detail: str) -> None:
        """Each reload is counted and leaves one flow record with its outcome."""
        self.metrics.reloads.labels(outcome).inc()
        if outcome in ("success", "last_known_good"):
            self._publish_definitions()
        flowlog = self.flowlog
        if flowlog is None:
            return
        now = time.time()
        record = FlowRecord.begin(
            flow_id=self.flow_ids(), client="-", sni=None, host=None, method="RELOAD", path="-", now=now
        )
        record.record(decision=Outcome.RELOAD, reason=_RELOAD_REASONS[outcome])
        record.endpoint = detail[:200] or None
        flowlog.write(record.finish(now=now, status=200 if outcome in ("success", "last_known_good") else 500))

    async def _feed_watchdog(self, interval: float) -> None:
        """Ping systemd's watchdog from the event loop: a wedged loop stops the pings."""
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _warm_up(self, runtime: Runtime) -> None:
        """Discover every IdP (retrying with backoff) so /readyz can report readiness."""
        delay = 1.0
        while True:
            pending = []
            for name, provider in runtime.providers.items():
                try:
                    await provider.discover()
                except tokens.OIDCError as exc:
                    pending.append(name)
                    log.warning("service %s: identity provider not ready: %s", name, exc)
            if not pending:
                self.ready = True
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    async def _housekeeping(self, store: sessions.SessionStore) -> None:
        while True:
            await asyncio.sleep(60)
            try:
                await store.purge_expired(time.time())
                self.metrics.sessions.set(await store.count())
            except Exception:  # keep serving even if the store hiccups
                log.exception("session housekeeping failed")
            self.trimmer.maybe_trim()  # under steady load the server may never go idle

    async def _metrics(self, _: web.Request) -> web.Response:
        body, ctype = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def _start_metrics(self, exposed: settings_mod.MetricsModel) -> web.AppRunner:
        """The metrics-only listener (``metrics:``): ``GET /metrics``, anything else 404."""

        async def metrics_only(request: web.Request) -> web.Response:
            if request.method in ("GET", "HEAD") and request.path == "/metrics":
                return await self._metrics(request)
            raise web.HTTPNotFound

        app = web.Application()
        app.router.add_route("*", "/{path:.*}", metrics_only)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            sock = listener.make_listen_socket(exposed.address, exposed.port, setting="metrics.port")
            self.metrics_port = sock.getsockname()[1]
            await web.SockSite(runner, sock).start()
        except BaseException:
            await runner.cleanup()
            raise
        return runner

    async def _start_admin(self) -> web.AppRunner:
        """The loopback admin listener: ``/healthz`` (alive), ``/readyz`` (why not ready, also
        while start-up waits), ``/metrics`` and ``POST /reload``."""
        s = self.settings.model.admin
        app = web.Application()

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def readyz(_: web.Request) -> web.Response:
            if self.starting is not None:
                return web.json_response({"ready": False, "problems": {"start-up": self.starting}}, status=503)
            providers = self.gate.runtime.providers
            idps = {n: p.last_error or "discovery pending" for n, p in providers.items() if p.metadata is None}
            reported = self.settings.model.admin.identityProviders == "reported"
            problems = {} if reported else idps
            no_service = self._no_service()
            if no_service:
                problems["services"] = no_service
            unread = self.manager.unread()
            if unread:  # fail closed: never ready on a set no source confirmed since start-up
                problems["definitions"] = f"not read since start-up: {', '.join(unread)}; enforcing last-known-good"
            store = self.gate.store
            if isinstance(store, sessions.FleetStore) and store.problem is not None:
                problems["sessions"] = store.problem
            if self.role == "primary":
                waiting = self._workers_not_ready()
                if waiting:
                    problems["workers"] = waiting
            ok = (reported or self.ready) and not problems
            body: dict[str, object] = {"ready": ok, "problems": problems}
            if reported:
                body["degraded"] = idps
            return web.json_response(body, status=200 if ok else 503)

        async def reload(_: web.Request) -> web.Response:
            if self.starting is not None:  # start-up reads every source anyway
                return web.json_response({"outcome": "starting", "detail": self.starting}, status=503)
            outcome = await self.manager.refresh(reason="admin")
            self._tell_siblings()
            return web.json_response({"outcome": outcome}, status=200 if outcome in ("success", "unchanged") else 409)

        app.router.add_post("/reload", reload)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = listener.make_listen_socket(s.address, s.port, setting="admin.port")
        self.admin_port = sock.getsockname()[1]
        site = web.SockSite(runner, sock)
        await site.start()
        return runner


def _run_loop(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop  # noqa: PLC0415  (optional speed-up)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


