"""aiohttp's low-level HTTP/1 server, plus what it lacks on a public listener.

* A header deadline: a request's header block must be complete ``header_timeout`` seconds
  after its first byte (after the TLS handshake for a connection's first request), else
  the enforcer answers 408 and closes (slowloris, X-LIM-06).  aiohttp itself only has
  the keep-alive timer, which a client resets by sending one request at a time.
* A minimum body rate: a request body must arrive at ``body_min_rate`` bytes a second on
  average once ``body_grace`` seconds have passed, and may not stall for ``body_timeout``
  seconds; time the enforcer is not reading (the app is slow) does not count.  A body
  below it gets :class:`ClientBodyError` (``body_too_slow``): the handler reading it answers
  408 with a flow record and closes (slow POST, X-LIM-07).  One re-arming timer per body,
  set at the moment the rate would fall short: nothing runs per received chunk but a sum.
* An upload cap: at most ``max_uploads_per_ip`` request bodies arriving at once from one
  client address; one more gets ``too_many_uploads`` (429) the same way.
* A write timeout: a client that takes none of our bytes for ``write_timeout`` seconds
  while we have some for it (its TCP window stays shut: slow read, X-LIM-08) is cut off;
  and a minimum read rate: once our writing has been paused ``read_grace`` seconds, a client
  must take ``read_min_rate`` bytes a second, or it is cut (``read_too_slow``; accounted only
  while writing is paused, :class:`enforcer.http.upstream.WriteDeadline`).
* Connection caps: at most ``max_connections`` connections in all and ``max_per_ip`` from
  one client address, and at most ``new_per_ip`` new ones a second from one address
  (:class:`RateLimit`), counted from the TCP accept (:class:`TLSListener`), so a connection
  still in its TLS handshake (silent, or trickling its ClientHello) counts too; one over a
  cap is closed at once, before any TLS work (X-LIM-06/09/10, X-TLS-08: legitimate clients
  keep being served while one source floods).
* A total cap on a request head: aiohttp bounds each line and the number of lines only
  (100 lines of 8 KiB: ~800 KB); a header block over ``max_head_bytes`` (counted to within
  one read) is refused like a line that is too long: 431 ``header_too_large`` with a flow
  record, and close.  The lean path never takes a head over one line's size.
* Parser errors go through the gate (one flow record, a fixed page that echoes nothing)
  instead of aiohttp's error page, which quotes the offending request bytes back and logs
  a traceback for every malformed request.

This is the one module that uses aiohttp's private API (:data:`PRIVATE_NAMES`), written for
the aiohttp versions in :data:`AIOHTTP_WRITTEN_FOR`; a test fails on any other version, so
every aiohttp upgrade is a review of this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from enforcer.errors import ClientBodyError, Reason
from enforcer.http.tls import ConnectionInfo, connection_info
from enforcer.http.upstream import WriteDeadline

if TYPE_CHECKING:
    from enforcer.http.scope import Scope

log = logging.getLogger(__name__)

AIOHTTP_WRITTEN_FOR = ("3.14",)
"""aiohttp ``major.minor`` versions this module's use of private names was checked against."""

PRIVATE_NAMES = (
    "_ErrInfo", "_make_error_handler", "_manager", "_request_handler", "_messages", "_request_count",
    "_payload_parser", "_upgraded", "_force_close", "_close", "_request_in_progress", "_reading_paused",
    "_buffer_paused", "_kwargs", "_send_headers_immediately", "_waiter",
)
"""The private aiohttp names used here (and only here)."""

#: Set by the server protocol (:class:`Protocol`) on the stand-in request it makes when aiohttp's
#: parser refused the bytes: (status, reason code).  :meth:`Gate.handle` answers it, so a
#: malformed request gets one flow record and a fixed page that echoes nothing back.
FRAMING_ERROR: web.RequestKey[tuple[int, str]] = web.RequestKey("enforcer_framing_error", tuple)


def framing_error(exc: BaseException) -> tuple[int, str]:
    """aiohttp parser error -> (status, reason code); the parser's text is never shown."""
    if isinstance(exc, LineTooLong):
        # the C parser reports the request-target as a bytearray, header lines as bytes
        if exc.args and isinstance(exc.args[0], bytearray):
            return 414, Reason.TARGET_TOO_LONG
        return 431, Reason.HEADER_TOO_LARGE
    if isinstance(exc, HttpProcessingError) and "Too many headers" in str(exc.message):
        return 431, Reason.TOO_MANY_HEADERS
    return 400, Reason.MALFORMED_REQUEST


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"

Refused = Callable[[ConnectionInfo, Reason, "int | None"], str]
"""Writes the flow record of a connection refused before any request; answers the flow id."""

Destination = tuple[str, int] | None
"""Where a redirected connection was going (read at the accept), or None."""


class RateLimit:
    """Token buckets by client address: ``rate`` events a second after a burst of ``burst``
    (``rate`` 0: no limit).  Loopback addresses are not counted unless ``loopback``.  At most
    ``max_keys`` addresses are kept (full buckets are dropped first), so a flood of source
    addresses cannot grow it without bound."""

    __slots__ = ("_buckets", "_clock", "burst", "loopback", "max_keys", "rate")

    def __init__(
        self, rate: float, burst: int, *, loopback: bool = False, clock: Callable[[], float] = time.monotonic,
        max_keys: int = 65536,
    ) -> None:
        self.max_keys = max_keys
        self.rate = rate
        self.burst = float(max(1, burst))
        self.loopback = loopback
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}  # address -> [last event, tokens left, refusals in a row]

    def allow(self, ip: str | None) -> bool:
        """Count one event from ``ip``; False when its bucket is empty (:meth:`first_refusal`
        then says whether it is the first refusal since the address was last let through)."""
        if self.rate <= 0 or not ip:
            return True
        if not self.loopback and (ip.startswith(("127.", "::ffff:127.")) or ip == "::1"):
            return True
        now = self._clock()
        bucket = self._buckets.get(ip)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._prune(now)
            self._buckets[ip] = [now, self.burst - 1.0, 0.0]
            return True
        tokens = min(self.burst, bucket[1] + (now - bucket[0]) * self.rate)
        bucket[0] = now
        if tokens < 1.0:
            bucket[1] = tokens
            bucket[2] += 1.0
            return False
        bucket[1] = tokens - 1.0
        bucket[2] = 0.0
        return True

    def first_refusal(self, ip: str) -> bool:
        """Whether the last :meth:`allow` for ``ip`` was its first refusal in a row (one flow
        record per episode, not one per refused event, so a flood cannot flood the flow log)."""
        bucket = self._buckets.get(ip)
        return bucket is not None and bucket[2] == 1.0

    def _prune(self, now: float) -> None:
        rate, burst = self.rate, self.burst
        full = [ip for ip, (last, tokens, _) in self._buckets.items() if tokens + (now - last) * rate >= burst]
        for ip in full:
            del self._buckets[ip]
        if len(self._buckets) >= self.max_keys:
            self._buckets.clear()  # (a flood of addresses each still in its burst: start over)


def never() -> None:
    """What a closed :class:`Deadline` would call (it never fires)."""


class Deadline:
    """One connection deadline on one re-arming timer, shared by both HTTP paths (the header
    deadline of each, and the lean path's keep-alive idle time): :meth:`set` moves it (a later
    deadline keeps the timer and re-arms it when it fires, a sooner one replaces it), and
    ``fire`` is called once when it passes."""

    __slots__ = ("_due", "_fire", "_loop", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, fire: Callable[[], None]) -> None:
        self._loop = loop
        self._fire = fire
        self._due = float("inf")
        self._timer: asyncio.TimerHandle | None = None

    @property
    def armed(self) -> bool:
        return self._due != float("inf")

    def set(self, seconds: float) -> None:
        """Due ``seconds`` from now (0 or less: no deadline)."""
        if seconds <= 0:
            self._due = float("inf")
            return
        self._due = due = self._loop.time() + seconds
        timer = self._timer
        if timer is not None and timer.when() > due:
            timer.cancel()
            timer = None
        if timer is None:
            self._timer = self._loop.call_at(due, self._check)

    def cancel(self) -> None:
        self._due = float("inf")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """Cancel for good and let go of ``fire`` (a bound method of the connection: the
        connection is then freed by reference counting, without waiting for the collector)."""
        self.cancel()
        self._fire = never

    def _check(self) -> None:
        self._timer = None
        due = self._due
        if due == float("inf"):
            return
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check)
            return
        self._due = float("inf")
        self._fire()


def header_timed_out(
    transport: asyncio.Transport, header_timeout: float, server: Server | None = None,
    info: ConnectionInfo | None = None,
) -> None:
    """A request's header block missed its deadline: answer 408 (the caller then closes), with
    a flow record (:meth:`Server.refused`) whose id the answer names.

    The one 408 of both HTTP paths (aiohttp's :class:`Protocol` and the lean path's
    connection), each on its own :class:`Deadline`."""
    log.debug("closing a connection whose request header did not complete in %.0f s", header_timeout)
    flow_id = server.refused(info, Reason.HEADER_TIMEOUT, 408) if server is not None and info is not None else None
    answer = TIMEOUT_408 if flow_id is None else TIMEOUT_408[:-2] + f"X-Enforcer-Flow: {flow_id}\r\n\r\n".encode()
    with contextlib.suppress(Exception):  # (a transport already closing: nothing to tell)
        transport.write(answer)


class Protocol(WriteDeadline, RequestHandler):
    """One client connection (see the module docstring)."""

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        header_timeout: float,
        body_timeout: float,
        write_timeout: float = 0.0,
        body_min_rate: float = 0.0,
        body_grace: float = 10.0,
        read_min_rate: float = 0.0,
        read_grace: float = 10.0,
        max_head_bytes: int = 1 << 30,
        destination: Destination = None,
        info: ConnectionInfo | None = None,
        scope: Scope | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._write_timeout = write_timeout
        self._read_min_rate = read_min_rate
        self._read_grace = read_grace
        self._max_head_bytes = max_head_bytes
        self._head_bytes = 0  # bytes of the header block now arriving, before this read
        self._head_refused = False  # a head over max_head_bytes: nothing more is parsed
        self._head_line_ended = False  # the request line of the head now arriving is complete
        self._body_min_rate = body_min_rate
        self._body_grace = body_grace
        self._header_deadline = Deadline(loop, never)  # the real one from connection_made (no cycle before)
        self._body_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # body of the newest parsed request
        self._body_seen = 0.0  # loop time of the body's last byte
        self._body_start = 0.0  # loop time the body began, moved on by the time we were not reading
        self._body_clock = 0.0  # loop time of the last look at the body
        self._body_bytes = 0
        self._uploading = False  # the body counts against the server's per-address upload cap
        self._destination = destination
        self._scope = scope
        self.info: ConnectionInfo | None = info
        """What the connection is (built in :meth:`connection_made`, or passed on by the lean path)."""
        self.admitted = False
        """Counted against the server's caps (by TLSListener, or before a fast-path hand-over):
        this protocol gives the place back when the connection ends."""
        self._peer_ip: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._peer_ip = str(peer[0]) if peer else None
        if self.info is None:
            self.info = connection_info(peer, self._destination, transport.get_extra_info("ssl_object"), self._scope)
        super().connection_made(transport)
        self._header_deadline = Deadline(self._loop, self._header_expired)
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        server = self._manager
        self._end_upload()
        if self.admitted and isinstance(server, Server):
            self.admitted = False
            server.release(self._peer_ip)
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._upgraded or self._payload_parser is not None or self._force_close or self._close:
            super().data_received(data)  # WebSocket frames, or a connection already closing
            return
        if self._head_refused:
            return  # (the 431 is queued; the connection closes once it is out)
        body = self._body
        in_head = body is None or body.is_eof()  # between bodies: these bytes are (part of) a head
        if in_head:
            end = data.find(b"\r\n\r\n")
            if self._head_bytes + (len(data) if end < 0 else end + 4) > self._max_head_bytes:
                crlf = -1 if self._head_line_ended else data.find(b"\r\n")
                # the request line itself too long (aiohttp's own limit): the target, 414
                self._refuse_head(target=not self._head_line_ended and (
                    crlf < 0 or self._head_bytes + crlf > self.max_line_size))
                return
        queued = len(self._messages)
        count = self._request_count
        super().data_received(data)
        if self._request_count == count:
            if in_head:
                self._head_bytes += len(data)
                self._head_line_ended = self._head_line_ended or b"\r\n" in data
        else:  # a header block completed (or was refused)
            self._head_bytes = 0
            self._head_line_ended = False
            self._header_deadline.cancel()
            if len(self._messages) > queued:
                payload = self._messages[-1][1]
                self._end_upload()
                self._body = payload
                if not payload.is_eof():
                    self._begin_body(payload)
        body = self._body
        if body is not None and not body.is_eof():
            if self._uploading:
                self._body_seen = self._loop.time()
                self._body_bytes += len(data)
        else:
            if self._uploading:
                self._end_upload()
            if data and self._request_count == count:
                self._arm_header_timer()  # bytes of a new request's header block

    def _refuse_head(self, *, target: bool) -> None:
        """The header block now arriving is over ``max_head_bytes``: queue the parser's own
        error for a too-long line (the gate answers 431 ``header_too_large``, or 414
        ``target_too_long`` when the request line itself never ended, with a flow record, and
        closes) and parse nothing more on this connection."""
        log.debug("refusing a request head over %d bytes", self._max_head_bytes)
        self._head_refused = True
        self._header_deadline.cancel()
        exc = LineTooLong(b"request head", self._max_head_bytes)
        if target:  # (framing_error tells the request-target by its bytearray, as the C parser reports it)
            exc.args = (bytearray(b"request target"), *exc.args[1:])
        self._request_count += 1
        self._messages.append((_ErrInfo(status=414 if target else 431, exc=exc, message=exc.message), EMPTY_PAYLOAD))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _begin_body(self, body: StreamReader) -> None:
        """A request body begins: count it against the address's upload cap, start its clock."""
        server = self._manager
        if isinstance(server, Server) and not server.upload_begin(self._peer_ip):
            log.info("refusing an upload from %s: %d already arriving", self._peer_ip, server.max_uploads_per_ip)
            body.set_exception(ClientBodyError(Reason.TOO_MANY_UPLOADS, 429))
            return
        self._uploading = True
        now = self._loop.time()
        self._body_start = self._body_clock = self._body_seen = now
        self._body_bytes = 0
        if self._body_timer is None and (self._body_timeout > 0 or self._body_min_rate > 0):
            self._body_timer = self._loop.call_at(now + self._next_check(now), self._check_body)

    def _end_upload(self) -> None:
        if self._uploading:
            self._uploading = False
            server = self._manager
            if isinstance(server, Server):
                server.upload_end(self._peer_ip)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._arm_write_deadline()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_write_deadline()

    def _arm_header_timer(self) -> None:
        if not self._header_deadline.armed:
            self._header_deadline.set(self._header_timeout)

    def _cancel_timers(self) -> None:
        self._header_deadline.close()
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = None
        self._cancel_write_deadline()

    def _header_expired(self) -> None:
        if self.transport is None or self._force_close:
            return
        if self._request_in_progress or self._messages:
            self._arm_header_timer()  # still answering an earlier request: check again later
            return
        server = self._manager if isinstance(self._manager, Server) else None
        header_timed_out(self.transport, self._header_timeout, server, self.info)
        self.force_close()

    def _next_check(self, now: float) -> float:
        """Seconds until the body would stall or fall below the minimum rate (inf: never)."""
        wait = self._body_seen + self._body_timeout - now if self._body_timeout > 0 else float("inf")
        rate = self._body_min_rate
        if rate > 0:
            active = now - self._body_start
            if active < self._body_grace:
                wait = min(wait, self._body_grace - active)
            else:
                wait = min(wait, self._body_bytes / rate - active)  # when bytes/rate == active
        return wait

    def _check_body(self) -> None:
        self._body_timer = None
        body = self._body
        if self.transport is None or body is None or body.is_eof() or not self._uploading:
            return
        now = self._loop.time()
        if self._reading_paused or self._buffer_paused:
            # the enforcer is not reading (the app or the pool is slow): not the client's fault
            self._body_start += now - self._body_clock
            self._body_seen = now
        self._body_clock = now
        wait = self._next_check(now)
        if wait > 0:
            if wait != float("inf"):
                self._body_timer = self._loop.call_at(now + max(wait, 0.05), self._check_body)
            return
        log.info(
            "cutting a request body from %s: %d bytes in %.1f s (minimum %d bytes/s, stall limit %.0f s)",
            self._peer_ip, self._body_bytes, now - self._body_start, self._body_min_rate, self._body_timeout,
        )
        self._end_upload()
        body.set_exception(ClientBodyError(Reason.BODY_TOO_SLOW, 408))
        # the handler reading the body answers 408 and closes; should nothing read it, close anyway
        self._body_timer = self._loop.call_at(now + 2.0, self._cut_unread)

    def _cut_unread(self) -> None:
        self._body_timer = None
        if self.transport is not None and not self._force_close:
            self.force_close()

    def _make_error_handler(self, err_info: _ErrInfo) -> Handler:
        gate = self._request_handler
        assert gate is not None

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            request[FRAMING_ERROR] = framing_error(err_info.exc)
            return await gate(request)

        return handler


class Server(web.Server):
    """``web.Server`` whose connections are :class:`Protocol` instances."""

    def __init__(
        self,
        handler: Handler,
        *,
        header_timeout: float,
        body_timeout: float,
        write_timeout: float = 0.0,
        max_connections: int = 10_000,
        max_per_ip: int = 512,
        body_min_rate: float = 0.0,
        body_grace: float = 10.0,
        read_min_rate: float = 0.0,
        read_grace: float = 10.0,
        max_head_bytes: int = 1 << 30,
        max_uploads_per_ip: int = 1 << 30,
        new_per_ip: RateLimit | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout = header_timeout
        self.write_timeout = write_timeout
        self.read_min_rate = read_min_rate
        self.read_grace = read_grace
        self.idle_timeout: float = kwargs.get("keepalive_timeout", 3630.0)  # (aiohttp's defaults)
        self.max_line_size: int = kwargs.get("max_line_size", 8190)
        self.max_headers: int = kwargs.get("max_headers", 128)
        self._timeouts = {
            "header_timeout": header_timeout, "body_timeout": body_timeout, "write_timeout": write_timeout,
            "body_min_rate": body_min_rate, "body_grace": body_grace, "read_min_rate": read_min_rate,
            "read_grace": read_grace,
        }
        self.max_head_bytes = max_head_bytes
        self.max_uploads_per_ip = max_uploads_per_ip
        self._uploads: dict[str, int] = {}
        self.new_per_ip = new_per_ip if new_per_ip is not None else RateLimit(0, 1)
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.open_connections = 0
        self.refused_connections = 0
        self._per_ip: dict[str, int] = {}
        self.fast: Callable[[bool, Destination, Scope | None], asyncio.Protocol] | None = None
        """Set to serve connections through :mod:`enforcer.fastpath` first (daemon.py): called
        with (admitted, original destination, the listener's scope)."""
        self.fast_connections: set[Any] = set()
        """The fast-path connections now open (each has ``shutdown()`` and ``abort()``)."""
        self.on_idle: Callable[[], object] | None = None
        """Called when a burst is over: the open connections fell to a quarter of their peak
        since the last call, or to none (daemon.py: trim the C heap)."""
        self._peak = 0
        self.on_refused: Refused | None = None
        """Set to write the flow record (and count the metric) of a connection refused before
        any request was read (daemon.py: :meth:`Gate.refused`); answers its flow id."""

    def refused(self, info: ConnectionInfo, reason: Reason, status: int | None) -> str | None:
        """A connection refused before any request (an unknown server name, a header deadline
        missed): its flow record via :attr:`on_refused`; the flow id, or None without one."""
        hook = self.on_refused
        if hook is None:
            return None
        try:
            return hook(info, reason, status)
        except Exception:  # (a record that cannot be written must not stop the refusal)
            log.exception("cannot write the flow record of a refused connection")
            return None

    def upload_begin(self, ip: str | None) -> bool:
        """Count a request body now arriving from ``ip``; False (not counted) over the cap."""
        if not ip:
            return True
        n = self._uploads.get(ip, 0)
        if n >= self.max_uploads_per_ip:
            return False
        self._uploads[ip] = n + 1
        return True

    def upload_end(self, ip: str | None) -> None:
        """A body counted by :meth:`upload_begin` is in, cut, or its connection ended."""
        if ip:
            left = self._uploads.get(ip, 1) - 1
            if left > 0:
                self._uploads[ip] = left
            else:
                self._uploads.pop(ip, None)

    def admit(self, ip: str | None) -> bool:
        """Count a new connection in, or refuse it when a cap is reached."""
        per_ip = self._per_ip.get(ip, 0) if ip else 0
        if self.open_connections >= self.max_connections or per_ip >= self.max_per_ip:
            self.refused_connections += 1
            if self.refused_connections % 1000 == 1:
                log.warning(
                    "connection cap reached (%d open, %d from %s): refusing (%d refused so far)",
                    self.open_connections, per_ip, ip, self.refused_connections,
                )
            return False
        self.open_connections += 1
        self._peak = max(self._peak, self.open_connections)
        if ip:
            self._per_ip[ip] = per_ip + 1
        return True

    def release(self, ip: str | None) -> None:
        """A counted connection ended."""
        self.open_connections -= 1
        if ip:
            left = self._per_ip.get(ip, 1) - 1
            if left > 0:
                self._per_ip[ip] = left
            else:
                self._per_ip.pop(ip, None)
        if self.open_connections * 4 <= self._peak and self.on_idle is not None:
            self._peak = self.open_connections
            self.on_idle()  # (last: the counts are already right whatever it does)

    def protocol(
        self, *, admitted: bool = False, destination: Destination = None, info: ConnectionInfo | None = None,
        scope: Scope | None = None,
    ) -> Protocol:
        """An aiohttp connection protocol; ``admitted``: the connection was counted in already;
        ``info``: what the connection is, when another protocol served it first; ``scope``: what
        the accepting listener serves (None: the host's)."""
        protocol = Protocol(
            self, loop=self._loop, destination=destination, info=info, scope=scope,
            max_head_bytes=self.max_head_bytes, **self._timeouts, **self._kwargs
        )
        protocol.admitted = admitted
        return protocol

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]  # a fast connection is no RequestHandler
        return self.admitted_protocol(None, admitted=False)

    def admitted_protocol(
        self, destination: Destination = None, scope: Scope | None = None, *, admitted: bool = True
    ) -> asyncio.Protocol:
        """A serving protocol for a connection :class:`TLSListener` counted in already."""
        fast = self.fast
        if fast is not None:
            return fast(admitted, destination, scope)
        return self.protocol(admitted=admitted, destination=destination, scope=scope)

    def scoped_connections(self, scope: Scope) -> list[Any]:
        """The open connections one scoped listener accepted (both paths'; each has ``info``)."""
        found: list[Any] = [c for c in self.fast_connections if c.info is not None and c.info.scope is scope]
        found += [
            h for h in self.connections if isinstance(h, Protocol) and h.info is not None and h.info.scope is scope
        ]
        return found

    async def close_scope(self, scope: Scope, timeout: float) -> None:  # noqa: ASYNC109 (a drain's own deadline)
        """Stop the connections of one scoped listener (a pod going away; the others are not
        touched): each closes when idle or once its answer is out, and whatever is still open
        after ``timeout`` seconds is cut."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        fast = [c for c in self.scoped_connections(scope) if not isinstance(c, Protocol)]
        for conn in fast:
            conn.shutdown()
        while any(c in self.fast_connections for c in fast) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        for conn in fast:
            if conn in self.fast_connections:
                conn.abort()
        full = [c for c in self.scoped_connections(scope) if isinstance(c, Protocol)]
        for handler in full:
            handler.close()  # (aiohttp's pre-shutdown: an idle one ends now, a busy one after its answer)
        if full:
            await asyncio.gather(*(h.shutdown(max(0.0, deadline - loop.time())) for h in full))
        for handler in full:
            if handler.transport is not None:
                handler.transport.abort()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        """Stop: fast-path connections close when idle or once their answer is out, then
        aiohttp's connections drain; whatever is still open when ``timeout`` is over is cut."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else 60.0)
        for conn in list(self.fast_connections):
            conn.shutdown()
        while self.fast_connections and loop.time() < deadline:  # noqa: ASYNC110 (a poll at stop only)
            await asyncio.sleep(0.02)
        for conn in list(self.fast_connections):
            conn.abort()
        # aiohttp's connections: idle keep-alive ones close now, busy ones after their answer
        # (aiohttp's runner does this first; without it each idle connection holds the drain
        # for its whole time, and a stop or an upgrade refuses for that long)
        self.pre_shutdown()
        await super().shutdown(max(0.0, deadline - loop.time()) if timeout is not None else None)


class HeldHeadResponse(web.StreamResponse):
    """A response whose head is not written on its own (``web.StreamResponse`` would) but
    together with the first body bytes, or with the end of a bodiless response: one TLS
    record and one system call less per small response. The proxy writes the head at once
    when no body bytes are there yet."""

    _send_headers_immediately = False

