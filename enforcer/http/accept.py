"""Accept connections on the listening socket, count them against the caps, start their TLS.

:class:`TLSListener` accepts each connection itself, so it is counted against the server's caps
and its address's new-connection rate (:class:`enforcer.http.server.RateLimit`) *before* its
TLS handshake (X-LIM-06/09/10, X-TLS-08).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Any

from enforcer.errors import Reason
from enforcer.http import tls
from enforcer.http.server import Server
from enforcer.net import sockopt

if TYPE_CHECKING:
    from enforcer.http.scope import Scope

log = logging.getLogger(__name__)

ACCEPT_BATCH = 128
"""Connections accepted per wake-up at most, so a flood cannot starve the event loop."""

LOGGED_NAMES_MAX = 1024
"""Unknown server names logged by name at most (after that, only their flow records)."""

_ACCEPT_PAUSE = 0.1
"""Seconds to stop accepting when the process is out of file descriptors or memory."""


class TLSListener:
    """Accepts the listening socket's connections itself, so each is counted against the
    server's caps by its client address *before* its TLS handshake: a connection over a cap
    is closed at once, one within is handed to uvloop with TLS
    (``loop.connect_accepted_socket``, handshake at most ``handshake_timeout`` seconds) and
    its serving protocol (:meth:`Server.admitted_protocol`) gives the count back when it ends;
    a failed handshake gives it back here. (uvloop's own TLS server calls the protocol only
    after the handshake, too late to count silent and slow handshakes.)  With ``redirect``
    each connection's original destination is read here, once, and handed to its protocol.
    A handshake refused for an unknown server name gets a flow record and a metric
    (:meth:`Server.refused`) and a log line (once per name, :data:`LOGGED_NAMES_MAX` names).
    ``scope``: what this listener serves (a pod's :class:`~enforcer.http.scope.Scope`), handed
    to each connection's protocol at its accept; None (the host) serves the daemon's services."""

    def __init__(
        self, server: Server, sock: socket.socket, context: ssl.SSLContext, handshake_timeout: float,
        *, redirect: bool = False, scope: Scope | None = None,
    ) -> None:
        self._server = server
        self.scope = scope
        self._redirect = redirect
        self._sock = sock
        self._context = context
        self._handshake_timeout = handshake_timeout
        self._loop = asyncio.get_running_loop()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._closed = False
        self._accept_errors = 0
        self._logged_names: set[str] = set()
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        server = self._server
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._accept_errors += 1
                    if self._accept_errors % 1000 == 1:
                        log.warning("cannot accept connections (%s): pausing %.1f s", exc, _ACCEPT_PAUSE)
                    self._loop.remove_reader(self._sock.fileno())
                    self._loop.call_later(_ACCEPT_PAUSE, self._resume)
                return  # (ECONNABORTED and the like: that client is gone)
            ip = str(addr[0]) if addr else None
            if not server.new_per_ip.allow(ip):
                conn.close()
                self._rate_limited(ip, addr)
                continue
            if not server.admit(ip):
                conn.close()
                continue
            task = self._loop.create_task(self._start(conn, ip, addr))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    async def _start(self, conn: socket.socket, ip: str | None, addr: Any = None) -> None:
        note = tls.HandshakeNote()
        tls.HANDSHAKE.set(note)  # (this task's own context, copied into the transport's)
        destination = None
        try:
            destination = sockopt.redirected_destination(conn) if self._redirect else None
            await self._loop.connect_accepted_socket(
                lambda: self._server.admitted_protocol(destination, self.scope),
                conn,
                ssl=self._context,
                ssl_handshake_timeout=self._handshake_timeout,
            )
        except BaseException as exc:
            # the serving protocol never started (no connection_made): the count is ours
            self._server.release(ip)
            conn.close()
            if note.unknown_sni is not None:
                self._unknown_sni(note.unknown_sni, addr, destination)
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.debug("TLS handshake with %s failed: %r", ip, exc)

    def _rate_limited(self, ip: str | None, addr: Any) -> None:
        """A connection over its address's new-connection rate was closed before TLS: a flow
        record and a log line for the first of each run of refusals from that address."""
        if ip is None or not self._server.new_per_ip.first_refusal(ip):
            return
        info = tls.connection_info(addr, None, None)
        flow_id = self._server.refused(info, Reason.CONNECTION_RATE, None)
        log.warning(
            "%s opens connections faster than %g a second: closing new ones before TLS (flow %s)",
            info.client, self._server.new_per_ip.rate, flow_id,
        )

    def _unknown_sni(self, name: str, addr: Any, destination: tuple[str, int] | None) -> None:
        """A client asked for a server name no service has: its flow record, metric and log line."""
        info = tls.connection_info(addr, destination, None)._replace(sni=name)
        flow_id = self._server.refused(info, Reason.UNKNOWN_SNI, None)
        if name in self._logged_names or len(self._logged_names) >= LOGGED_NAMES_MAX:
            return
        self._logged_names.add(name)
        log.warning(
            "refused TLS from %s: server name %r is no configured host (flow %s; further ones: enforcer flows)",
            info.client, name, flow_id,
        )

    def close(self) -> None:
        """Stop accepting, close the listening socket and cut the handshakes in progress."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for task in list(self._handshakes):
            task.cancel()
