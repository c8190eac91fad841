"""Lifecycle of the running enforcer: start in order, serve, reload, stop cleanly.

Start-up order: config and definitions (fatal if invalid) -> certificates -> session
store -> flow log -> IdP discovery (in the background, retried; ``/readyz`` waits for
it) -> TLS listener -> admin listener.  SIGHUP reopens the flow log and reloads the
definitions (the old set stays if the new one is invalid); SIGTERM/SIGINT stop
accepting, drain in-flight requests, flush the flow log and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from enforcer.config import definitions as definitions_mod
from enforcer.config import settings as settings_mod
from enforcer.config.sources import DefinitionsManager, build_sources
from enforcer.errors import Outcome, Reason
from enforcer.flow import FlowRecord
from enforcer.flowlog import FlowLog
from enforcer.http import accept, certs, fastpath, proxy
from enforcer.http import server as server_mod
from enforcer.http import tls as listener
from enforcer.http.gate import Gate, Runtime
from enforcer.identity import login, oidc, sessions, sqlite, tokens
from enforcer.metrics import Metrics
from enforcer.net import nftables, sockopt
from enforcer.net.ruleset import RedirectError, RedirectSettings, RedirectTarget, Ruleset, build_ruleset
from enforcer.run import memory
from enforcer.run.memory import tune_gc
from enforcer.run.systemd import sd_notify, watchdog_interval

log = logging.getLogger(__name__)


DRAIN_SECONDS = 20.0

WORKERS_STATE = "workers.json"
"""Written by the master in the state dir: which workers listen and are ready."""

RELOAD_SIBLINGS = signal.SIGUSR1
"""Primary -> master: the admin API reloaded; master -> workers: re-read the definitions."""


def build_providers(
    definitions: definitions_mod.Definitions,
    settings: settings_mod.Settings,
    http: aiohttp.ClientSession,
    previous: dict[str, oidc.Provider] | None = None,
) -> dict[str, oidc.Provider]:
    """One Provider per (issuer, CA file); reused across reloads to keep caches."""
    s = settings.model.oidc
    shared: dict[tuple[str, str | None], oidc.Provider] = {}
    for p in (previous or {}).values():
        shared[(p.issuer, getattr(p, "_ca_key", None))] = p
    out: dict[str, oidc.Provider] = {}
    for svc in definitions.services:
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
            )
            provider._ca_key = key[1]  # type: ignore[attr-defined]
            shared[key] = provider
        out[svc.name] = provider
    return out


def build_leaves(
    definitions: definitions_mod.Definitions, store: certs.CertStore
) -> tuple[dict[str, certs.LeafPaths], str | None]:
    """Certificates for every host (operator-supplied ones win) and the no-SNI default host."""
    leaves: dict[str, certs.LeafPaths] = {}
    for svc in definitions.services:
        if svc.tls is not None:
            leaf = store.operator_leaf(svc.tls.cert, svc.tls.key)
        else:
            leaf = store.ensure_leaf(svc.name, list(svc.hosts))
        for h in svc.hosts:
            leaves[h] = leaf
    default = definitions.services[0].hosts[0] if definitions.services else None
    return leaves, default


LOCAL_UPSTREAMS = frozenset({"127.0.0.1", "::1", "localhost"})


def build_redirect(
    definitions: definitions_mod.Definitions, settings: settings_mod.Settings, listen_port: int
) -> Ruleset:
    """The nftables ruleset for these services (the app port is blocked only for local apps)."""

    r = settings.model.redirect
    targets = [
        RedirectTarget(
            svc.name, svc.exposed_port, svc.port if svc.upstream_host in LOCAL_UPSTREAMS else None
        )
        for svc in definitions.services
    ]
    return build_ruleset(
        targets,
        RedirectSettings(listen_port=listen_port, table=r.table, mark=r.mark, block_app_port=r.blockAppPort),
    )



def status_text(definitions: definitions_mod.Definitions) -> str:
    """systemd's STATUS= line: how many services, and which (``systemctl status`` shows it)."""
    names = ", ".join(svc.name for svc in definitions.services)
    return f"serving {len(definitions.services)} service(s)" + (f": {names}"[:200] if names else "")


def session_store(s: settings_mod.DaemonModel, *, shared: bool) -> sessions.SessionStore:
    """The session store ``sessions:`` asks for: SQLite in the state dir (``shared`` when
    several worker processes use it) or in memory."""
    if s.sessions.store == "sqlite":
        return sqlite.SQLiteSessionStore(
            s.stateDir / "sessions.db", idle_timeout=s.sessions.idleTimeout, max_sessions=s.sessions.maxSessions,
            cache_size=s.sessions.cacheSize, shared=shared,
        )
    return sessions.MemorySessionStore(idle_timeout=s.sessions.idleTimeout, max_sessions=s.sessions.maxSessions)



_RELOAD_REASONS = {
    "success": Reason.RELOAD_SUCCESS,
    "last_known_good": Reason.RELOAD_LAST_KNOWN_GOOD,
    "rejected": Reason.RELOAD_REJECTED,
    "failed": Reason.RELOAD_FAILED,
}
"""The flow reason of each outcome of a definitions reload."""


@dataclass
class Daemon:
    """The running enforcer and everything it owns."""

    settings: settings_mod.Settings
    metrics: Metrics = field(default_factory=Metrics)
    ready: bool = False
    ruleset: Ruleset | None = None
    listen_port: int = 0
    admin_port: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    role: str = "single"
    """``single`` (one process does everything), or under a :class:`Master`: ``primary`` (worker
    0: also the redirect, the admin listener and housekeeping) or ``worker`` (serves only)."""
    listen_socket: socket.socket | None = None
    tls_context: ssl.SSLContext | None = None
    """Made by the master before forking, so every worker has the same session-ticket keys."""
    trimmer: memory.Trimmer = field(default_factory=memory.Trimmer)
    """Returns the C heap's free pages to the OS when a burst of connections is over and from housekeeping."""

    @property
    def owns_host(self) -> bool:
        """This process installs the redirect and runs the admin listener and housekeeping."""
        return self.role in ("single", "primary")

    async def run(self, *, on_ready: asyncio.Future[None] | None = None) -> int:
        """Serve until SIGTERM/SIGINT (or :meth:`stop`); returns the exit code."""
        s = self.settings.model
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            # logrotate may send SIGHUP while we start: never let it kill the daemon
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, lambda: log.info("SIGHUP during start-up ignored: definitions are being read now")
            )
        s.stateDir.mkdir(parents=True, exist_ok=True, mode=0o700)
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, socket_factory=self._socket_factory()),
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": "enforcer"},
        )
        self.http = http
        self.manager = DefinitionsManager(
            self.settings, build_sources(self.settings, http), on_change=self._apply, on_outcome=self._reload_outcome
        )
        try:
            definitions = await self.manager.load_initial()
        except BaseException:
            await http.close()
            raise
        for w in definitions.warnings:
            log.warning("%s", w)
        self.cert_store = certs.CertStore(s.stateDir)
        self.tls = listener.TLSDispatch(*build_leaves(definitions, self.cert_store), context=self.tls_context)
        ssl_ctx = self.tls.context
        shared_logins: login.SharedTransactionStore | None = None
        shared = self.role != "single"
        store = session_store(s, shared=shared)
        if shared and isinstance(store, sqlite.SQLiteSessionStore):
            shared_logins = login.SharedTransactionStore(store, ttl=s.oidc.loginTimeout)
        flowlog = FlowLog(
            self.settings.flow_log,
            on_dropped=self.metrics.flowlog_dropped.inc,
            on_write_error=self.metrics.flowlog_write_errors.inc,
        )
        upstream = proxy.Upstream(
            connect_timeout=s.limits.upstreamConnectTimeout,
            read_timeout=s.limits.upstreamReadTimeout,
            max_body=s.limits.maxBodyBytes,
            socket_factory=self._socket_factory(),
        )
        runtime = Runtime(definitions, build_providers(definitions, self.settings, http))
        sock = self.listen_socket or listener.make_listen_socket(s.listen.address, s.listen.port)
        self.listen_port = sock.getsockname()[1]
        if s.redirect.enabled and self.owns_host:

            self.ruleset = build_redirect(definitions, self.settings, self.listen_port)
            try:
                started = time.perf_counter()
                await nftables.apply(self.ruleset)
            except RedirectError:
                sock.close()
                await http.close()
                raise
            log.info(
                "redirect table inet %s applied in %.1f ms (%d rules)",
                s.redirect.table, (time.perf_counter() - started) * 1000, len(self.ruleset.rules),
            )
        gate = Gate(
            settings=self.settings,
            runtime=runtime,
            store=store,
            flowlog=flowlog,
            metrics=self.metrics,
            upstream=upstream,
            listen_port=self.listen_port,
            shared_logins=shared_logins,
        )
        self.gate = gate
        server = server_mod.Server(
            gate.handle,
            header_timeout=s.limits.headerTimeout,
            body_timeout=s.limits.idleTimeout,
            write_timeout=s.limits.writeTimeout,
            max_connections=s.limits.maxConnections,
            max_per_ip=s.limits.maxConnectionsPerIP,
            keepalive_timeout=s.limits.idleTimeout,
            max_line_size=8190,
            max_field_size=8190,
            max_headers=100,
            lingering_time=5.0,
            tcp_keepalive=False,  # idleTimeout closes idle connections long before TCP keep-alive would probe
            auto_decompress=False,
            access_log=None,
        )
        if s.listen.fastPath:
            server.fast = fastpath.FastPath(gate, server).protocol_factory()
        loop = asyncio.get_running_loop()
        self.trimmer.call_later = loop.call_later
        server.on_idle = self.trimmer.maybe_trim
        self._spawn(flowlog.run(), "flowlog")
        self._spawn(self._warm_up(runtime), "discovery")
        if self.owns_host:
            self._spawn(self._housekeeping(store), "housekeeping")
        self._spawn(self.manager.run(), "definitions")
        self.flowlog = flowlog
        handshake_timeout = min(10.0, s.limits.headerTimeout)  # a silent or partial ClientHello (X-LIM-10)
        tls_server = accept.TLSListener(server, sock, ssl_ctx, handshake_timeout, redirect=s.redirect.enabled)
        admin = await self._start_admin(runtime) if self.owns_host else None
        self._install_signals(loop, flowlog)
        self._publish_definitions()
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
        try:
            await self._stop.wait()
        finally:
            if self.role == "single":
                sd_notify("STOPPING=1\nSTATUS=draining")
            log.info("stopping: draining in-flight requests (up to %.0f s)", DRAIN_SECONDS)
            tls_server.close()
            await server.shutdown(DRAIN_SECONDS)
            self.trimmer.close()
            if admin is not None:
                await admin.cleanup()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await flowlog.close()
            await upstream.close()
            await http.close()
            await store.close()
            await self._remove_redirect()
            log.info("stopped")
        return 0

    def stop(self) -> None:
        self._stop.set()

    def _socket_factory(self) -> Callable[[Any], socket.socket] | None:
        """Outgoing sockets (IdP, app) carry our mark so the output chain never loops them."""
        r = self.settings.model.redirect
        if not r.enabled:
            return None


        def make(addr_info: Any) -> socket.socket:
            family, type_, proto, _, _ = addr_info
            sock = socket.socket(family=family, type=type_, proto=proto)
            sockopt.mark_socket(sock, r.mark)
            return sock

        return make

    async def _remove_redirect(self) -> None:
        """Clean stop: remove the table, or keep only the app-port block if configured."""
        r = self.settings.model.redirect
        if not r.enabled or self.ruleset is None or not self.owns_host:
            return

        try:
            if r.keepBlockOnStop:
                await nftables.apply(self.ruleset.block_only())
            else:
                await nftables.remove(r.table)
        except RedirectError as exc:
            log.error("could not remove the redirect table on stop: %s", exc)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)

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
        """Re-read every definitions source now (SIGHUP, `enforcer reload`)."""
        self.manager.trigger()

    async def _apply(self, definitions: definitions_mod.Definitions, reason: str) -> None:
        """Swap in a validated set: redirect rules, then certificates, then the request path.

        A failing step raises, and the manager keeps the previous set (the nftables batch is
        atomic: a refused one leaves the old table untouched)."""
        previous = self.ruleset
        if self.settings.model.redirect.enabled and self.owns_host:

            ruleset = build_redirect(definitions, self.settings, self.listen_port)
            if ruleset != previous:
                await nftables.apply(ruleset)
                self.ruleset = ruleset
        try:
            leaves, default = await asyncio.to_thread(build_leaves, definitions, self.cert_store)
            self.tls.update(leaves, default)
        except Exception:
            if previous is not None and self.ruleset is not previous:
                await nftables.apply(previous)
                self.ruleset = previous
            raise
        old = self.gate.runtime
        runtime = Runtime(definitions, build_providers(definitions, self.settings, self.http, old.providers))
        self.gate.runtime = runtime
        self._spawn(self._warm_up(runtime), "discovery")
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

    def _reload_outcome(self, outcome: str, detail: str) -> None:
        """Each reload is counted and leaves one flow record with its outcome."""
        self.metrics.reloads.labels(outcome).inc()
        if outcome in ("success", "last_known_good"):
            self._publish_definitions()
        flowlog = getattr(self, "flowlog", None)
        if flowlog is None:
            return
        now = time.time()
        record = FlowRecord.begin(client="-", sni=None, host=None, method="RELOAD", path="-", now=now)
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

    async def _start_admin(self, runtime: Runtime) -> web.AppRunner:
        s = self.settings.model.admin
        app = web.Application()

        async def metrics(_: web.Request) -> web.Response:
            body, ctype = self.metrics.render()
            return web.Response(body=body, headers={"Content-Type": ctype})

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def readyz(_: web.Request) -> web.Response:
            providers = self.gate.runtime.providers
            problems = {n: p.last_error or "discovery pending" for n, p in providers.items() if p.metadata is None}
            if self.role == "primary":
                waiting = self._workers_not_ready()
                if waiting:
                    problems["workers"] = waiting
            ok = self.ready and not problems
            return web.json_response({"ready": ok, "problems": problems}, status=200 if ok else 503)

        async def reload(_: web.Request) -> web.Response:
            outcome = await self.manager.refresh(reason="admin")
            self._tell_siblings()
            return web.json_response({"outcome": outcome}, status=200 if outcome in ("success", "unchanged") else 409)

        app.router.add_post("/reload", reload)
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        family = socket.AF_INET6 if ":" in s.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((s.address, s.port))
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


