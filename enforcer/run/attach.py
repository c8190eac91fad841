"""Where the enforcer serves: a listening socket and the redirect that sends traffic to it.

An :class:`Attachment` is one place the enforcer is attached to. It opens the listening socket
the redirected connections land on, installs the nftables ruleset that sends the place's
exposed ports there (and replaces it on reload; a stop keeps it, so the ports stay closed),
and marks the enforcer's own outgoing sockets so that ruleset never loops them back. :class:`HostAttachment`
is the host the daemon runs on; :class:`PodAttachment` is a Kubernetes pod, served inside its own
network namespace (socket, table and upstream sockets all made there, ``Netlink(netns=...)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import socket
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from enforcer.config import definitions as definitions_mod
from enforcer.config import settings as settings_mod
from enforcer.errors import Outcome, Reason
from enforcer.flow import FlowIds, FlowRecord
from enforcer.flowlog import FlowLog
from enforcer.http import tls as listener
from enforcer.net import sockopt
from enforcer.net.netns import run_in_netns
from enforcer.net.pods import PodNetns, route_source
from enforcer.net.ruleset import (
    ProbeTarget,
    RedirectError,
    RedirectSettings,
    RedirectTarget,
    Ruleset,
    build_ruleset,
)

if TYPE_CHECKING:
    from enforcer.config.kubernetes import Probe

log = logging.getLogger(__name__)

_DPORT = re.compile(r"\btcp dport (\d+)\b")

LOCAL_UPSTREAMS = frozenset({"127.0.0.1", "::1", "localhost"})

Undo = Callable[[], Awaitable[None]]
"""Puts back the redirect that was in force before an :meth:`Attachment.apply`."""

SocketFactory = Callable[[Any], socket.socket]
"""Makes an outgoing socket from an ``addrinfo`` tuple (aiohttp's ``socket_factory``)."""


class StopDecision(Protocol):
    """What a stop is (``enforcer.config.kubernetes.StopVerdict``): an uninstall removes the table."""

    @property
    def uninstall(self) -> bool: ...

    @property
    def short(self) -> str:
        """For the flow record, e.g. ``DaemonSet enforcer-system/enforcer deleted``."""

    @property
    def why(self) -> str:
        """For the log."""


StopCheck = Callable[[], Awaitable[StopDecision]]
"""Asked at a stop whether it is an uninstall (the DaemonSet gone) or an update/restart; never raises."""


async def _nothing_to_undo() -> None:
    return None


class Attachment(Protocol):
    """One place the enforcer serves: its listening socket and its redirect ruleset."""

    name: str
    """Names the attachment in logs and flow records (``host`` for the host)."""

    @property
    def listen_port(self) -> int:
        """The port of the listening socket (0 before :meth:`open`)."""

    def open(self) -> socket.socket:
        """Open (or adopt) the listening socket the redirected connections land on."""

    async def apply(self, definitions: definitions_mod.Definitions) -> Undo:
        """Install or replace the redirect for these services, atomically (raises
        ``RedirectError`` and leaves the old ruleset if refused); returns the undo."""

    async def remove(self) -> None:
        """On a clean stop: keep the redirect table (fail closed), or remove it when
        ``redirect.keepBlockOnStop`` is off or the stop is an uninstall (its DaemonSet gone);
        says which in the log and the flow log; never raises."""

    def close(self) -> None:
        """Close the listening socket."""

    def socket_factory(self) -> SocketFactory | None:
        """How to make outgoing sockets (IdP, app) the redirect leaves alone, or None."""


class Redirector(Protocol):
    """The nftables operations an attachment uses (``enforcer.net.nftables``, in a namespace)."""

    async def apply(self, ruleset: Ruleset) -> None:
        """Replace the ruleset's table in one atomic batch."""

    async def remove(self, table: str) -> bool:
        """Delete the table; False if it was not there."""


@dataclass(frozen=True)
class Netlink:
    """:class:`Redirector` over netlink, in the network namespace ``netns`` (None: ours).

    The one place that loads :mod:`enforcer.net.nftables`, and only when a redirect is made:
    it imports pyroute2, which adds ~7 MiB to the RSS of every process that loads it, so a
    daemon without the redirect (and each ``enforcer`` command that never redirects) does not.
    """

    netns: str | None = None

    async def apply(self, ruleset: Ruleset) -> None:
        from enforcer.net import nftables  # noqa: PLC0415  (pyroute2: ~7 MiB RSS; only with a redirect)

        await nftables.apply(ruleset, netns=self.netns)

    async def remove(self, table: str) -> bool:
        from enforcer.net import nftables  # noqa: PLC0415  (pyroute2: ~7 MiB RSS; only with a redirect)

        return await nftables.remove(table, netns=self.netns)


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


@dataclass
class HostAttachment:
    """The host the daemon runs on: ``listen:`` socket, ``redirect:`` table in our namespace.

    ``manages_redirect`` is False for a worker process (the primary installs the redirect) and
    when ``redirect.enabled`` is off; ``listen_socket`` is the one the master opened, if any;
    ``stop_check`` (a DaemonSet's pod: ``kubernetes.daemonSet``) tells an uninstall, which
    removes the table, from an update or restart, which keeps it."""

    settings: settings_mod.Settings
    manages_redirect: bool = True
    listen_socket: socket.socket | None = None
    redirector: Redirector = field(default_factory=Netlink)
    name: str = "host"
    stop_check: StopCheck | None = None
    ruleset: Ruleset | None = None
    """The ruleset in force (None before the first :meth:`apply` or when not managed)."""

    def __post_init__(self) -> None:
        self.manages_redirect = self.manages_redirect and self.settings.model.redirect.enabled

    @property
    def listen_port(self) -> int:
        return self.listen_socket.getsockname()[1] if self.listen_socket is not None else 0

    def open(self) -> socket.socket:
        if self.listen_socket is None:
            listen = self.settings.model.listen
            self.listen_socket = listener.make_listen_socket(listen.address, listen.port)
        return self.listen_socket

    async def apply(self, definitions: definitions_mod.Definitions) -> Undo:
        if not self.manages_redirect:
            return _nothing_to_undo
        previous = self.ruleset
        ruleset = build_redirect(definitions, self.settings, self.listen_port)
        if ruleset == previous:
            return _nothing_to_undo
        started = time.perf_counter()
        await self.redirector.apply(ruleset)
        self.ruleset = ruleset
        if previous is None:
            log.info(
                "redirect table inet %s applied in %.1f ms (%d rules)",
                self.settings.model.redirect.table, (time.perf_counter() - started) * 1000, len(ruleset.rules),
            )
            return _nothing_to_undo

        async def undo() -> None:
            if self.ruleset is ruleset:
                await self.redirector.apply(previous)
                self.ruleset = previous

        return undo

    async def remove(self) -> None:
        if not self.manages_redirect or self.ruleset is None:
            return
        decision = await self._ask_stop_check() if self.settings.model.redirect.keepBlockOnStop else None
        await _stop_redirect(self.settings, self.redirector, self.ruleset, who="", decision=decision)

    async def _ask_stop_check(self) -> StopDecision | None:
        """The stop check's answer (None without one, or if it failed: keep the table)."""
        if self.stop_check is None:
            return None
        try:
            return await self.stop_check()
        except Exception:
            log.exception("the stop check failed; keeping the redirect table (fail closed)")
            return None

    def close(self) -> None:
        if self.listen_socket is not None:
            self.listen_socket.close()

    def socket_factory(self) -> SocketFactory | None:
        """Outgoing sockets (IdP, app) carry our mark so the output chain never loops them
        (in every process, even one that does not install the redirect)."""
        r = self.settings.model.redirect
        if not r.enabled:
            return None

        def make(addr_info: Any) -> socket.socket:
            family, type_, proto, _, _ = addr_info
            sock = socket.socket(family=family, type=type_, proto=proto)
            sockopt.mark_socket(sock, r.mark)
            return sock

        return make


def build_pod_redirect(
    services: Iterable[definitions_mod.Service], settings: settings_mod.Settings, listen_port: int,
    probes: Iterable[ProbeTarget] = (), probe_port: int | None = None,
) -> Ruleset:
    """The nftables ruleset inside a pod: as :func:`build_redirect`, but every service's app is the
    pod's own (the upstream is the pod's loopback), so every ``port`` is blocked for non-loopback
    clients (unless ``redirect.blockAppPort`` is off); ``probes`` (the kubelet's, from the node's
    address) are redirected to the probe gate on ``probe_port``."""
    r = settings.model.redirect
    return build_ruleset(
        [RedirectTarget(svc.name, svc.exposed_port, svc.port) for svc in services],
        RedirectSettings(listen_port=listen_port, table=r.table, mark=r.mark, block_app_port=r.blockAppPort,
                         probe_port=probe_port),
        tuple(probes),
    )


def gated_probes(
    probes: Iterable[Probe], services: Iterable[definitions_mod.Service], settings: settings_mod.Settings,
    probe_port: int | None,
) -> tuple[dict[int, tuple[Probe, ...]], list[Probe]]:
    """Of a pod's probes, those of a protected app port: the ones the probe gate lets through (by port;
    plain-HTTP ``httpGet`` with a probe port) and the ones that cannot pass (reset like any client).
    ``enforcer doctor --pod`` rebuilds a pod's expected table with it (the source: ``route_source``)."""
    if not settings.model.redirect.blockAppPort:
        return {}, []
    protected = {svc.port for svc in services}
    gated: dict[int, tuple[Probe, ...]] = {}
    refused = []
    for probe in probes:
        if probe.port is None or probe.port not in protected:
            continue
        if probe.gated and probe_port is not None:
            gated[probe.port] = (*gated.get(probe.port, ()), probe)
        else:
            refused.append(probe)
    return gated, refused


def _pod_listen_socket(port: int, mark: int) -> socket.socket:
    """Run inside the pod's namespace: a dual-stack ``[::]`` listener (``0.0.0.0`` where the pod
    has no IPv6), ``SO_REUSEPORT`` so an old and a new enforcer can both bind, marked."""
    try:
        sock = listener.make_listen_socket("::", port, reuse_port=True)
    except OSError as exc:
        if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            raise
        sock = listener.make_listen_socket("0.0.0.0", port, reuse_port=True)  # noqa: S104  (the redirect target)
    try:
        sockopt.mark_socket(sock, mark)
    except BaseException:
        sock.close()
        raise
    return sock


def _marked_socket(family: int, type_: int, proto: int, mark: int) -> socket.socket:
    sock = socket.socket(family=family, type=type_, proto=proto)
    try:
        sockopt.mark_socket(sock, mark)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(eq=False)
class PodAttachment:
    """A Kubernetes pod, served inside its own network namespace ``netns``.

    Everything is made inside the pod's namespace from a short-lived thread
    (:func:`enforcer.net.netns.run_in_netns`), so the daemon's own threads never move: the
    listening socket (``[::]:port``, ``SO_REUSEPORT``, ``SO_MARK``), the nftables table (the
    redirect of each service's ``exposedPort`` to that socket, each app ``port`` blocked for
    non-loopback clients) and the upstream sockets to the app at ``127.0.0.1:port`` (marked, so
    the pod's output chain lets them through).

    For the daemon:

    * ``tags``: the pod's tags (its labels as ``key=value``, ...). :meth:`apply` serves
      ``definitions.for_tags(tags)``, so every attachment can be handed the same definitions
      (as ``Daemon._apply`` does); None serves ``definitions.services`` as given. A label
      change: set ``tags`` and :meth:`apply` again; :attr:`services` is what is served now
      (empty: nothing selects the pod any more, call :meth:`release`).
    * ``port``: the listener's port inside the pod (default ``listen.port``). Every enforcer
      must use the same one: an old and a new enforcer overlap on it, and the rules the old
      one left redirect to it. It must not be a port the pod's app uses.
    * Order: :meth:`apply` may come before :meth:`open` (the rules first: until the socket
      exists, redirected connections are refused, never passed to the app).
    * Stop (:meth:`remove`): the host's rule, the table stays unless
      ``redirect.keepBlockOnStop`` is off. Pod no longer selected: :meth:`release` removes the
      table (raises ``RedirectError``, and keeps everything open for a retry, if it cannot),
      then closes. Pod gone: just :meth:`close` (the namespace dies with its last holder).
    * :meth:`close` closes this attachment's descriptors into the namespace: the listening
      socket (stop the server that accepts on it first) and the namespace's. Upstream sockets
      belong to whoever uses them (aiohttp's connector): close that connector before, or the
      namespace stays alive; :meth:`open_upstreams` counts those still open, and close()
      warns about them.
    """

    netns: PodNetns
    settings: settings_mod.Settings
    tags: frozenset[str] | None = None
    port: int | None = None
    name: str = ""
    redirector: Redirector | None = None
    """How rules are programmed; default :class:`Netlink` in ``netns`` (tests pass a fake)."""
    listen_socket: socket.socket | None = None
    ruleset: Ruleset | None = None
    """The ruleset this attachment installed (None before the first :meth:`apply`)."""
    services: tuple[definitions_mod.Service, ...] = ()
    probes: tuple[Probe, ...] = ()
    """The pod's kubelet probes (``PodInfo.probes``)."""
    pod_ips: tuple[str, ...] = ()
    """The pod's IPs: the node's route to each names the source of the kubelet's probes."""
    probe_port: int | None = None
    """The probe gate's port inside the pod (``kubernetes.pods.probePort``); None: no gate, the
    probes of a protected port are reset like any other connection."""
    source_of: Callable[[str], str | None] = route_source
    """The address the node's connections to a pod IP come from (its route's source, asked in
    the daemon's namespace: the node's)."""
    probe_socket: socket.socket | None = None
    """The probe gate's listening socket (inside the pod), open while the pod is served."""
    gated: dict[int, tuple[Probe, ...]] = field(default_factory=dict)
    """The probes let through now, by protected app port (what the probe gate serves)."""
    _probe_sources: tuple[str, ...] = ()
    _warned: bool = False
    _no_route_warned: bool = False
    _upstreams: weakref.WeakSet[socket.socket] = field(default_factory=weakref.WeakSet, repr=False)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"pod {self.netns.uid or f'net:[{self.netns.inode}]'}"

    @property
    def wanted_port(self) -> int:
        """The port the listener binds and the rules redirect to."""
        return self.port if self.port is not None else self.settings.model.listen.port

    @property
    def listen_port(self) -> int:
        return self.listen_socket.getsockname()[1] if self.listen_socket is not None else 0

    def _redirector(self) -> Redirector:
        return self.redirector if self.redirector is not None else Netlink(netns=self.netns.path)

    def open(self) -> socket.socket:
        if self.listen_socket is None:
            self.listen_socket = run_in_netns(
                self.netns.path, _pod_listen_socket, self.wanted_port, self.settings.model.redirect.mark
            )
        return self.listen_socket

    @property
    def wants_probe_gate(self) -> bool:
        """The pod has a plain-HTTP probe and a probe port: its gate listens while it is served."""
        return self.probe_port is not None and any(p.gated for p in self.probes)

    def open_probe_socket(self) -> socket.socket:
        """The probe gate's listening socket inside the pod (as the listener's: ``SO_REUSEPORT``, marked)."""
        if self.probe_port is None:
            raise ValueError(f"{self.name}: no probe port")
        if self.probe_socket is None:
            self.probe_socket = run_in_netns(
                self.netns.path, _pod_listen_socket, self.probe_port, self.settings.model.redirect.mark
            )
        return self.probe_socket

    async def _probe_targets(
        self, services: tuple[definitions_mod.Service, ...]
    ) -> tuple[list[ProbeTarget], dict[int, tuple[Probe, ...]]]:
        """The probe rules for these services' protected ports, and the probes they let through."""
        gated, refused = gated_probes(self.probes, services, self.settings, self.probe_port)
        if refused and not self._warned:
            self._warned = True
            log.warning(
                "%s: %s target(s) a protected port and cannot pass (only plain-HTTP httpGet probes "
                "pass the probe gate); use an httpGet probe with scheme HTTP or an exec probe",
                self.name, "; ".join(map(str, refused)),
            )
        if not gated:
            return [], {}
        if not self._probe_sources:
            found = [await asyncio.to_thread(self.source_of, ip) for ip in self.pod_ips]
            self._probe_sources = tuple(dict.fromkeys(s for s in found if s))
            if not self._probe_sources:
                if self._no_route_warned:
                    return [], {}
                self._no_route_warned = True
                log.warning("%s: no route from the node to the pod's IPs (%s) names a source address; its "
                            "probes of protected ports are refused", self.name, ", ".join(self.pod_ips) or "none")
                return [], {}
        return [ProbeTarget(port, source) for port in gated for source in self._probe_sources], gated

    async def apply(self, definitions: definitions_mod.Definitions) -> Undo:
        services = definitions.for_tags(self.tags) if self.tags is not None else definitions.services
        previous, previous_services, previous_gated = self.ruleset, self.services, self.gated
        targets, gated = await self._probe_targets(services)
        ruleset = build_pod_redirect(services, self.settings, self.wanted_port, targets, self.probe_port)
        if ruleset == previous:
            self.services, self.gated = services, gated
            return _nothing_to_undo
        started = time.perf_counter()
        await self._redirector().apply(ruleset)
        self.ruleset, self.services, self.gated = ruleset, services, gated
        if previous is None:
            log.info(
                "%s: redirect table inet %s applied in its network namespace in %.1f ms (%s)",
                self.name, ruleset.table, (time.perf_counter() - started) * 1000, ruleset_ports(ruleset),
            )
            return _nothing_to_undo

        async def undo() -> None:
            if self.ruleset is ruleset:
                await self._redirector().apply(previous)
                self.ruleset, self.services, self.gated = previous, previous_services, previous_gated

        return undo

    async def remove(self) -> None:
        if self.ruleset is None or self.netns.closed:
            return
        await _stop_redirect(
            self.settings, self._redirector(), self.ruleset, who=f"{self.name}: ",
            opener="a new enforcer serving the pod, or its release, opens them",
        )

    async def release(self) -> None:
        """The pod is no longer selected: remove its table (present or not, e.g. left by an
        earlier enforcer), note it in the flow log, then :meth:`close`. Raises ``RedirectError``
        if the table cannot be removed, and then keeps everything open for a retry."""
        if self.netns.closed:
            return
        table = self.settings.model.redirect.table
        removed = await self._redirector().remove(table)
        ports = ruleset_ports(self.ruleset) if self.ruleset is not None else "its ports"
        self.ruleset, self.services, self.gated = None, (), {}
        self.close()
        if removed:
            log.warning("%s released: redirect table inet %s removed; %s answer without the enforcer now",
                        self.name, table, ports)
            await note_ports(self.settings, method="RELEASE", reason=Reason.PORTS_UNBLOCKED,
                             detail=f"{self.name}: table inet {table} removed: {ports}")

    def close(self) -> None:
        if self.listen_socket is not None:
            self.listen_socket.close()
        if self.probe_socket is not None:
            self.probe_socket.close()
        if not self.netns.closed:
            left = self.open_upstreams()
            if left:
                log.warning("%s: %d upstream socket(s) still open keep its network namespace alive "
                            "(close the pod's connector before the attachment)", self.name, left)
            self.netns.close()

    def open_upstreams(self) -> int:
        """How many sockets made by :meth:`socket_factory` are still open."""
        return sum(1 for sock in list(self._upstreams) if sock.fileno() != -1)

    def socket_factory(self) -> SocketFactory:
        """Outgoing sockets made inside the pod's namespace, carrying our mark: for the app at
        the pod's ``127.0.0.1:port`` (aiohttp's ``socket_factory``). One short-lived thread per
        new connection (about 0.2 ms measured), none per request on a kept-alive connection. After
        :meth:`close` it raises ValueError."""
        mark = self.settings.model.redirect.mark

        def make(addr_info: Any) -> socket.socket:
            family, type_, proto, _, _ = addr_info
            sock = run_in_netns(self.netns.path, _marked_socket, family, type_, proto, mark)
            self._upstreams.add(sock)
            return sock

        return make


async def _stop_redirect(
    settings: settings_mod.Settings, redirector: Redirector, ruleset: Ruleset, *, who: str,
    opener: str = "`enforcer unblock` opens them", decision: StopDecision | None = None,
) -> None:
    """A clean stop's rule for the table in force (``who``: ``"pod x/y: "``, or "" for the host):
    keep it (``redirect.keepBlockOnStop``, the default, unless ``decision`` says this stop is an
    uninstall) or remove it; log and note which."""
    r = settings.model.redirect
    ports = ruleset_ports(ruleset)
    why, short = "redirect.keepBlockOnStop: false", ""
    if r.keepBlockOnStop:
        if decision is None or not decision.uninstall:
            # The table stays as a crash leaves it: the exposed ports redirect to a listener that
            # is gone (refused), the app ports reject; the next start replaces it atomically.
            log.warning(
                "%sstopping with the redirect table inet %s kept: %s refuse connections until the "
                "enforcer serves again (%s)%s", who, r.table, ports, opener,
                f"; {decision.why}" if decision is not None else "",
            )
            short = f"{decision.short}: " if decision is not None else ""
            await note_ports(
                settings, method="STOP", reason=Reason.PORTS_BLOCKED,
                detail=f"{who}{short}table inet {r.table} kept: {ports}",
            )
            return
        why, short = decision.why, f"{decision.short}: "
    try:
        await redirector.remove(r.table)
    except RedirectError as exc:
        log.error("%scould not remove the redirect table on stop: %s", who, exc)
        return
    log.warning(
        "%sredirect table inet %s removed at stop (%s): %s answer without the enforcer now", who, r.table, why, ports,
    )
    await note_ports(
        settings, method="STOP", reason=Reason.PORTS_UNBLOCKED,
        detail=f"{who}{short}table inet {r.table} removed: {ports}",
    )


def ruleset_ports(ruleset: Ruleset) -> str:
    """The ports a ruleset closes, for a log line: ``exposed port(s) 443, 8443; app port(s) 8080``."""

    def ports(chain: str) -> str:
        found = {int(m.group(1)) for rule in ruleset.rules_of(chain)
                 if not rule.probe and (m := _DPORT.search(rule.text))}
        return ", ".join(map(str, sorted(found))) or "none"

    return f"exposed port(s) {ports('prerouting')}; app port(s) {ports('input')}"


async def note_ports(settings: settings_mod.Settings, *, method: str, reason: Reason, detail: str) -> None:
    """One flow record, written now, for a change of the protected ports while no enforcer
    serves them (``BLOCK`` at boot, ``STOP``, ``UNBLOCK``): decision ``lifecycle``."""
    now = time.time()
    record = FlowRecord.begin(flow_id=FlowIds()(), client="-", sni=None, host=None, method=method, path="-", now=now)
    record.record(decision=Outcome.LIFECYCLE, reason=reason)
    record.endpoint = detail[:200]
    path = settings.flow_log
    new = not path.exists()
    sink = FlowLog(path)
    sink.write(record.finish(now=now))
    await sink.close()
    if sink.write_errors:
        log.error("could not write the %s flow record to %s", reason.value, path)
    elif new and os.geteuid() == 0:
        # root (the boot unit, `enforcer unblock`) must not leave a log file the daemon's user cannot append to
        owner = path.parent.stat()
        with contextlib.suppress(OSError):
            os.chown(path, owner.st_uid, owner.st_gid)
