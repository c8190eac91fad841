"""Serve the common request without aiohttp: an allowed GET or HEAD, in plain HTTP/1.1.

Every TLS connection starts with a :class:`Connection`.  For each request it waits for the
complete header block, parses exactly those bytes with httptools (llhttp, strict) and asks
:meth:`enforcer.http.gate.Gate.plan` (the plan the full path acts on too) whether the gate would
forward it at once.  Only a request that passes every one of these is served here:

* ``GET`` or ``HEAD``, ``HTTP/1.1``, an origin-form target of printable ASCII without ``#``;
* a header block of at most ``max_head`` bytes and ``max_headers`` fields, CRLF line ends,
  no folding, names of letters, digits and ``-`` only, values of printable ASCII or tab
  without trailing blanks (:data:`_HEAD`);
* exactly one ``Host``; no ``Content-Length``, ``Transfer-Encoding``, ``Upgrade`` or
  ``Expect`` (so no body, no upgrade, nothing to continue);
* the gate's plan (:func:`enforcer.http.plan.plan_request`: routing by SNI, Host, port and
  original destination, path canonicalisation, session from the in-process cache only, and
  policy) is a :class:`~enforcer.http.plan.Forward`.

Anything else -- the first byte that does not fit -- hands the connection over for good to
aiohttp's protocol (:class:`enforcer.http.server.Protocol`) with every unconsumed byte, so
aiohttp's parser and :meth:`Gate.handle` answer it exactly as before: refusals, logins, the
enforcer's endpoints, bodies, WebSockets and every malformed input.  Nothing is consumed or
written for a request before it is known to be served here.

A served request gets what :meth:`Gate.handle` would give it: the same header hygiene
(:func:`enforcer.http.headers.request_head`, equal to ``request_headers``), the same upstream
pool, the same response head (:func:`enforcer.http.headers.relay_head`), the same body relay,
failure pages and flow record (:mod:`enforcer.http.relay`).  The connection keeps the
listener's limits: the connection caps, the header deadline (408), the keep-alive idle timeout,
the write timeout, the minimum read rate and back-pressure both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, NamedTuple

import httptools
from aiohttp import http_parser as aiohttp_http_parser
from aiohttp import web

from enforcer.http import headers as headers_mod
from enforcer.http import proxy, relay
from enforcer.http import upstream as upstream_client
from enforcer.http.plan import Forward
from enforcer.http.server import Deadline, Destination, header_timed_out, never
from enforcer.http.tls import ConnectionInfo, connection_info

if TYPE_CHECKING:
    from enforcer.http.gate import Gate
    from enforcer.http.scope import Scope
    from enforcer.http.server import Server

log = logging.getLogger("enforcer.fastpath")

MAX_PIPELINED = 256 * 1024  # stop reading while this much of later requests waits
_HEAD = re.compile(
    rb"(?:GET|HEAD) /[\x21\x22\x24-\x7e]* HTTP/1\.1\r\n"  # origin-form target, printable ASCII, no '#'
    rb"(?:[A-Za-z0-9-]+:[ \t]*(?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?\r\n)*"  # plain name: value
    rb"\r\n"
)
"""The header blocks the lean path takes: CRLF line ends only (no bare CR or LF, no folding,
no leading empty line), names of letters, digits and '-', values of printable ASCII or tab
without trailing blanks."""
_HANDOFF = re.compile(rb"\n(?i:content-length|transfer-encoding|upgrade|expect)[ \t]*:")
"""Fields that mean a body, an upgrade or an expectation: the full path handles those."""
_METHODS = {b"GET": "GET", b"HEAD": "HEAD"}
_SINGLETONS: frozenset[str] = frozenset(
    getattr(aiohttp_http_parser, "SINGLETON_HEADERS", ())
) | {"content-length", "content-location", "content-range", "content-type", "etag", "host", "max-forwards",
     "server", "transfer-encoding", "user-agent"}
"""Fields that may appear once: aiohttp's strict request parser refuses a duplicate (400),
so a head with one goes to the full path (its list, plus RFC 9110's as of aiohttp 3.14)."""


class _Request(NamedTuple):
    method: str
    target: str
    pairs: list[tuple[str, str]]  # the header fields as received
    host: str
    cookies: list[str]
    user_agent: str | None
    keep_alive: bool


class FastPath:
    """What a listener's fast connections share: the gate, and the listener whose limits they
    keep (its connection caps, header, idle and write timeouts, line and header-count limits;
    a whole head must fit in one of aiohttp's lines, so no per-line limit can differ)."""

    def __init__(self, gate: Gate, server: Server) -> None:
        self.gate = gate
        self.server = server
        self.header_timeout = server.header_timeout
        self.idle_timeout = server.idle_timeout
        self.write_timeout = server.write_timeout
        self.read_min_rate = server.read_min_rate
        self.read_grace = server.read_grace
        self.max_head = server.max_line_size
        self.max_headers = server.max_headers
        self.served = gate.metrics.fast_requests
        self.handed_off = gate.metrics.fast_handoffs

    def protocol_factory(self) -> functools.partial[Connection]:
        """The listener's protocol factory: a fast connection per accepted socket, called with
        (admitted, original destination, the listener's scope)."""
        return functools.partial(Connection, self, asyncio.get_running_loop())


class Connection(upstream_client.WriteFlow, asyncio.Protocol):
    """One client connection until (if ever) it is handed over to aiohttp."""

    def __init__(
        self, fast: FastPath, loop: asyncio.AbstractEventLoop, admitted: bool = False, destination: Destination = None,
        scope: Scope | None = None,
    ) -> None:
        self._fast = fast
        self._server = fast.server
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._peer_ip: str | None = None
        self.admitted = admitted
        """Counted against the caps (by accept.TLSListener at the TCP accept): the place
        is given back when the connection ends, or passed on with a hand-over."""
        self._destination = destination
        self._scope = scope
        self.info: ConnectionInfo | None = None
        """What the connection is (built in :meth:`connection_made`, passed on with a hand-over)."""
        self._buf = bytearray()
        self._busy = False  # a request is being answered
        self._serving: asyncio.Task[None] | None = None  # its task (kept: the loop holds tasks weakly)
        self._closing = False  # close once the current answer is out
        self._closed = False
        self._handed = False
        self._head_started = False  # bytes of a header block wait (the header deadline runs)
        self._deadline = Deadline(loop, never)  # the header deadline or the idle time (from connection_made)
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._write_timeout = fast.write_timeout  # (a client that takes nothing is cut: X-LIM-08)
        self._read_min_rate = fast.read_min_rate  # (or takes too little: read_too_slow)
        self._read_grace = fast.read_grace
        self._reading_paused = False
        self._parser: httptools.HttpRequestParser | None = None
        """Made in :meth:`connection_made`. (It holds this protocol for its callbacks: the cycle
        is broken when the connection ends or is handed over, so the transport's TLS buffers are
        freed at once, not by GC; a protocol whose TLS handshake never completed never gets one.)"""
        self._url = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._complete = False
        self._keep_alive = True
        self._upgrade = False
        self._written = False  # a byte of the current answer went out
        self._held = b""  # the current answer's head, until the first body bytes go with it
        self._chunked = False  # the current answer's body is sent chunked

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._peer_ip = str(peer[0]) if peer else None
        self.info = connection_info(peer, self._destination, transport.get_extra_info("ssl_object"), self._scope)
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._parser = httptools.HttpRequestParser(self)
        self._deadline = Deadline(self._loop, self._on_deadline)  # (holds this protocol until closed)
        self._server.fast_connections.add(self)
        # (no TCP_NODELAY here: uvloop and asyncio set it on every TCP transport already)
        self._head_started = True  # the first request's header block is due from now
        self._deadline.set(self._fast.header_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closed = True
        self._parser = None
        self._deadline.close()
        self._cancel_write_deadline()
        self._server.fast_connections.discard(self)
        if self.admitted:
            self.admitted = False
            self._server.release(self._peer_ip)
        self._wake_drain()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._busy:
            if len(self._buf) > MAX_PIPELINED and not self._reading_paused and self.transport is not None:
                self._reading_paused = True
                self.transport.pause_reading()
            return
        self._next()

    def eof_received(self) -> bool | None:
        return False  # the client is done sending: close (TLS cannot half-close anyway)

    # ---------------------------------------------------------------- httptools callbacks

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name, value))

    def on_message_complete(self) -> None:
        # (read now: once the whole head is fed, llhttp has reset its flags for the next message)
        parser = self._parser
        assert parser is not None
        self._complete = True
        self._keep_alive = parser.should_keep_alive()
        self._upgrade = parser.should_upgrade()

    # ---------------------------------------------------------------- requests

    def _next(self) -> None:
        """Start on the next buffered request, if its header block is complete."""
        if self._closed or self._handed or self._busy:
            return
        buf = self._buf
        if not buf:
            self._head_started = False
            self._deadline.set(self._fast.idle_timeout)
            return
        if not self._head_started:
            self._head_started = True
            self._deadline.set(self._fast.header_timeout)
        end = buf.find(b"\r\n\r\n")
        fast = self._fast
        if end < 0:
            if len(buf) > fast.max_head:
                self._hand_off()
            return
        end += 4
        if end > fast.max_head:
            self._hand_off()
            return
        analysed = self._analyse(bytes(buf[:end]))
        if analysed is None:
            self._hand_off()
            return
        del buf[:end]
        self._busy = True
        self._head_started = False
        fast.served.inc()
        self._serving = self._loop.create_task(self._serve(*analysed))

    def _analyse(self, head: bytes) -> tuple[Forward, _Request, ConnectionInfo] | None:
        """What to serve for ``head`` on this path, or None to hand the connection over: only a
        request the gate's plan forwards at once is served here."""
        info = self.info
        try:
            request = self._parse(head)
            if request is None or info is None:
                return None
            plan = self._fast.gate.plan(request.method, request.target, request.host, request.cookies, info=info)
        except Exception:
            # a bug here must not cost the request: the full path answers it (and records it)
            log.exception("fast path: cannot analyse a request head; handing the connection over")
            return None
        return (plan, request, info) if isinstance(plan, Forward) else None

    def _parse(self, head: bytes) -> _Request | None:
        """The request in ``head`` if it fits the fast path (with exactly one Host), else None.

        :data:`_HEAD` admits the subset (one C-speed match over the whole block); llhttp then
        parses it, and its verdict and fields are what is used."""
        if _HEAD.fullmatch(head) is None or _HANDOFF.search(head) is not None:
            return None
        parser = self._parser
        if parser is None:
            return None
        self._url = b""
        self._fields = []
        self._complete = False
        try:
            parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return None
        fields = self._fields
        method = _METHODS.get(parser.get_method())
        if (
            not self._complete or self._upgrade or method is None or parser.get_http_version() != "1.1"
            or len(fields) > self._fast.max_headers
        ):
            return None
        pairs = []
        cookies = []
        singles: dict[str, str] = {}
        for raw_name, raw_value in fields:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            pairs.append((name, value))
            low = name.lower()
            if low in _SINGLETONS:
                if low in singles:
                    return None  # a second Host, User-Agent, ...: aiohttp refuses it (400)
                singles[low] = value
            elif low == "cookie":
                cookies.append(value)
        host = singles.get("host")
        if host is None:
            return None
        return _Request(
            method, self._url.decode("latin-1"), pairs, host, cookies, singles.get("user-agent"), self._keep_alive
        )

    def _hand_off(self) -> None:
        """Give the connection, with every byte not yet answered, to aiohttp's protocol."""
        transport = self.transport
        if self._handed or self._closed or transport is None:
            return
        self._handed = True
        self._parser = None
        self.transport = None
        self._cancel_write_deadline()
        self._fast.handed_off.inc()
        self._deadline.close()
        self._server.fast_connections.discard(self)
        self.admitted = False  # the new protocol releases the connection's place
        protocol = self._server.protocol(admitted=True, info=self.info)
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        data = bytes(self._buf)
        self._buf.clear()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data:
            protocol.data_received(data)

    async def _serve(self, plan: Forward, request: _Request, info: ConnectionInfo) -> None:
        """Forward one allowed request and relay the answer; one flow record, whatever happens."""
        method, keep_alive = request.method, request.keep_alive
        if not keep_alive:
            self._closing = True  # the client asked to close after this answer
        gate = self._fast.gate
        flow = relay.begin(
            info, host=request.host, method=method, path=plan.path, user_agent=request.user_agent, now=gate.clock(),
            flow_id=gate.flow_ids(),
        )
        relay.allowed(flow, plan)
        transfer = proxy.Transfer()
        status: int | None = None
        self._written = False
        try:
            status = await self._forward(plan, request, info, transfer)
        except Exception as exc:
            status, page = relay.failure(flow, exc, gate.metrics)
            if page is not None:
                if not self._written:
                    self._page(page)
                elif self.transport is not None:
                    self.transport.abort()  # part of the answer is out: the client must see it cut
        finally:
            relay.finish(flow, transfer, status, flowlog=gate.flowlog, metrics=gate.metrics, now=gate.clock())
            self._done(keep_alive)

    async def _forward(self, plan: Forward, request: _Request, info: ConnectionInfo, transfer: proxy.Transfer) -> int:
        method = request.method
        service = plan.service
        gate = self._fast.gate
        head = headers_mod.request_head(
            method, plan.target, request.pairs, identity=plan.identity_headers, client_ip=info.client_ip,
            host=request.host, rule=gate.header_rule,
        )
        scope = info.scope  # a pod's listener: its own pool, into its namespace
        started = time.perf_counter()
        conn, answer = await (gate.upstream if scope is None else scope.upstream).send(
            upstream_host=service.upstream_host, port=service.port, head=head, no_body=method == "HEAD",
            transfer=transfer,
        )
        reusable = False
        try:
            transfer.upstream_ms = (time.perf_counter() - started) * 1000
            transfer.status = answer.status
            reply, chunked, no_body = headers_mod.relay_head(
                answer, method=method, public_origin=service.origin, upstream_host=service.upstream_host,
                port=service.port, keep_alive=not self._closing,
            )
            if no_body:
                self._write(reply)
            else:
                self._held, self._chunked = reply, chunked
                await relay.body(conn, self, transfer)
            reusable = True
            return answer.status
        finally:
            conn.finish(reusable)

    # ---------------------------------------------------------------- writing

    def _write(self, data: bytes) -> None:
        if self._closed or self.transport is None or self.transport.is_closing():
            raise self._closed_error()
        self._written = True
        self.transport.write(data)

    # (relay.Sink: the app's body, after the head held in self._held)

    def send_head(self) -> None:
        head, self._held = self._held, b""
        self._write(head)

    def write(self, chunk: bytes) -> Awaitable[None] | None:
        self._write_body(chunk, last=False)
        return self._drained() if self._write_paused else None

    def write_last(self, chunk: bytes) -> None:
        self._write_body(chunk, last=True)

    def _write_body(self, chunk: bytes, *, last: bool) -> None:
        head, self._held = self._held, b""
        if self._chunked:
            parts = [head, b"%x\r\n" % len(chunk), chunk, b"\r\n"] if chunk else [head]
            if last:
                parts.append(b"0\r\n\r\n")
            self._write(b"".join(parts))
        elif head:
            self._write(head + chunk)
        elif chunk:
            self._write(chunk)

    async def _drained(self) -> None:
        if self._closed:
            raise self._closed_error()
        self._drain = self._loop.create_future()
        try:
            await self._drain
        finally:
            self._drain = None
        if self._closed:
            raise self._closed_error()  # (cut for reading too slowly: its own reason)

    def _page(self, response: web.Response) -> None:
        """Write one of the enforcer's own pages (an error before any byte of the answer)."""
        data, close = relay.page_bytes(response, close=self._closing)
        self._closing = close
        with contextlib.suppress(ConnectionResetError):
            self._write(data)

    def _done(self, keep_alive: bool) -> None:
        """The answer is out: close, or go on with the next request."""
        self._busy = False
        transport = self.transport
        if transport is None or self._closed:
            return
        if self._closing or not keep_alive:
            transport.close()
            return
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        self._next()

    # ---------------------------------------------------------------- deadlines

    def _on_deadline(self) -> None:
        if self._closed or self._handed or self._busy or self.transport is None:
            return  # (an answer in progress: the deadline is set again when it is out)
        if self._head_started:
            header_timed_out(self.transport, self._fast.header_timeout, self._fast.server, self.info)
        self.transport.close()

    def shutdown(self) -> None:
        """Server stop: close when idle now, else once the current answer is out."""
        self._closing = True
        if not self._busy and self.transport is not None and not self._closed:
            self.transport.close()

    def abort(self) -> None:
        """Cut the connection: server stop with the drain time over, or a truncated answer."""
        self._closing = True
        if self.transport is not None and not self._closed:
            self.transport.abort()

