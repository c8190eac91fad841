"""A lean HTTP/1.1 client towards the apps: one keep-alive pool of asyncio Protocols per
(host, port), requests serialised from the already-cleaned headers, responses parsed by
httptools (llhttp, strict: CL+TE and duplicate Content-Length are errors), bodies streamed
both ways with backpressure.

A connection goes back to the pool only after a complete, well-framed response to a request
whose body was sent in full, with keep-alive allowed by the app; anything else (errors,
truncation, ``Connection: close``, HEAD, bytes the app sent unasked) closes it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterable, Callable
from typing import Any, cast

import httptools

from enforcer.errors import ClientReadError, Reason

log = logging.getLogger("enforcer.upstream")

HIGH_WATER = 256 * 1024  # stop reading from the app when this much is waiting for the client
LOW_WATER = 64 * 1024
KEEPALIVE = 30.0  # seconds an idle pooled connection is kept
MAX_IDLE_PER_HOST = 64
"""Idle connections kept per app address at most (like nginx's ``keepalive N``): after a
burst of thousands of concurrent requests the pool does not hold thousands of idle sockets
(file descriptors, ~10 KiB of buffers and objects each, and the app's connection slots) for
:data:`KEEPALIVE` seconds; a connection released beyond it is closed."""


class ConnectError(Exception):
    """The app could not be connected to (refused, unreachable, connect timeout)."""


class ReadTimeout(Exception):
    """The app sent nothing for ``read_timeout`` seconds while an answer was due."""


class ProtocolError(Exception):
    """The app answered with bytes that are not one well-framed HTTP/1.1 response."""


class Closed(Exception):
    """The connection ended before the response was complete."""

    def __init__(self, got_bytes: bool) -> None:
        super().__init__("upstream connection closed")
        self.got_bytes = got_bytes


class Head:
    """Status line and headers of the app's final (non-1xx) response."""

    __slots__ = ("content_length", "headers", "keep_alive", "reason", "status")

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]], content_length: int | None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = content_length
        self.keep_alive = True


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def bytes_acked(transport: asyncio.BaseTransport) -> int | None:
    """Bytes of ours the peer has acknowledged on its TCP connection so far (Linux
    ``tcpi_bytes_acked``: what the client's TCP took, below TLS and every buffer of ours), or
    None where that cannot be read (no socket, no ``TCP_INFO``).  One system call."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
    except (OSError, ValueError):
        return None
    if len(info) < _TCP_INFO_LEN:
        return None
    acked: int = _BYTES_ACKED.unpack_from(info, _TCP_INFO_LEN - 8)[0]
    return acked


_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_TCP_INFO_LEN = 128  # struct tcp_info up to and including tcpi_bytes_acked (Linux 4.1+)
_BYTES_ACKED = struct.Struct("=Q")


class WriteDeadline:
    """Cut a peer that takes our bytes too slowly, accounted only while the transport has
    paused our writing (a fast peer never pauses it for long, so it costs nothing more than
    one timer per pause):

    * ``_write_timeout`` (0: none): a pause that lasts this long aborts the transport (the
      peer took none, or too few, of our bytes for that long: slow read, X-LIM-08);
    * ``_read_min_rate`` bytes a second (0: none) after ``_read_grace`` seconds: once a pause
      has lasted ``_read_grace`` seconds, the peer must take at least ``_read_min_rate`` bytes
      a second, measured over each following ``_read_grace`` seconds (TCP bytes acknowledged,
      :func:`bytes_acked`: one system call per ``_read_grace`` seconds of a long pause), or the
      transport is aborted and :attr:`cut` says why.

    One re-arming timer serves both.  The protocol calls :meth:`_arm_write_deadline` from
    ``pause_writing``, :meth:`_cancel_write_deadline` from ``resume_writing`` and
    ``connection_lost``, and has ``transport`` and ``_loop`` attributes."""

    _write_timeout: float = 0.0
    _read_min_rate: float = 0.0
    _read_grace: float = 10.0
    _write_timer: asyncio.TimerHandle | None = None
    _paused_at = 0.0  # loop time the current pause began
    _sampled_at = -1.0  # loop time of the last bytes_acked sample in this pause (-1: none yet)
    _sampled = 0
    cut: ClientReadError | None = None
    """Set when the connection was cut for reading too slowly (the writer raises it)."""

    def _arm_write_deadline(self) -> None:
        if self._write_timer is not None:
            return
        first = self._write_timeout if self._write_timeout > 0 else float("inf")
        if self._read_min_rate > 0:
            first = min(first, self._read_grace)
        if first != float("inf"):
            loop: asyncio.AbstractEventLoop = self._loop  # type: ignore[attr-defined]
            self._paused_at = loop.time()
            self._sampled_at = -1.0
            self._write_timer = loop.call_at(self._paused_at + first, self._write_check)

    def _cancel_write_deadline(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _closed_error(self) -> ConnectionResetError | ClientReadError:
        """What a write to the closed connection raises: why it was cut, if it was."""
        return self.cut if self.cut is not None else ConnectionResetError("the client connection is closed")

    def _write_check(self) -> None:
        self._write_timer = None
        transport: asyncio.BaseTransport | None = getattr(self, "transport", None)
        if transport is None or transport.is_closing():
            return
        loop: asyncio.AbstractEventLoop = self._loop  # type: ignore[attr-defined]
        now = loop.time()
        due = float("inf")
        if self._write_timeout > 0:
            due = self._paused_at + self._write_timeout
            if now >= due - 0.001:
                log.info("closing a connection that took none of our bytes for %.0f s", self._write_timeout)
                transport.abort()  # type: ignore[attr-defined]
                return
        rate = self._read_min_rate
        if rate > 0:
            acked = bytes_acked(transport)
            if acked is not None:
                since = self._sampled_at
                if since >= 0 and acked - self._sampled < rate * (now - since):
                    log.info(
                        "cutting a client that took %d bytes in %.1f s (minimum %d bytes/s)",
                        acked - self._sampled, now - since, rate,
                    )
                    self.cut = ClientReadError(Reason.READ_TOO_SLOW, 408)
                    transport.abort()  # type: ignore[attr-defined]
                    return
                self._sampled_at, self._sampled = now, acked
                due = min(due, now + self._read_grace)
        if due != float("inf"):
            self._write_timer = loop.call_at(due, self._write_check)


class WriteFlow(WriteDeadline):
    """Write flow control for a protocol: the transport's pause/resume, and a wait for it.

    The protocol sets ``_write_paused = False`` and ``_drain = None`` in ``__init__`` and calls
    :meth:`_wake_drain` from ``connection_lost`` (a closed transport never resumes).  A pause
    is accounted by :class:`WriteDeadline` (write timeout, minimum read rate)."""

    _write_paused: bool
    _drain: asyncio.Future[None] | None

    def pause_writing(self) -> None:
        self._write_paused = True
        self._arm_write_deadline()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._cancel_write_deadline()
        self._wake_drain()

    def _wake_drain(self) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)


class Connection(WriteFlow, asyncio.Protocol):
    """One connection to an app; serves one exchange at a time."""

    def __init__(self, pool: Pool, key: tuple[str, int]) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        """(It holds this connection's bound methods: :meth:`connection_lost` drops it, so a
        closed connection -- its transport, buffers and parser -- is freed by reference
        counting at once instead of waiting as a cycle for a rare full collection.)"""
        self._busy = False
        self._reset()
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._deadline = 0.0  # loop time by which the awaited bytes must have come
        self._timer: asyncio.TimerHandle | None = None

    def _reset(self) -> None:
        self._head: Head | None = None
        self._headers: list[tuple[str, str]] = []
        self._reason = b""
        self._content_length: int | None = None
        self._framed = False  # Content-Length or Transfer-Encoding seen
        self._interim = False
        self._skip_body = False
        self._complete = False
        self._got_bytes = False
        self._reusable = True
        self._exc: BaseException | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pool.forget(self)
        if self._busy and not self._complete and self._exc is None:
            head = self._head
            if head is not None and not self._framed and not self._skip_body:
                self._complete = True  # body delimited by the end of the connection
                self._reusable = False
            else:
                self._exc = Closed(self._got_bytes)
        self._parser = None  # break the parser <-> connection cycle (no byte comes any more)
        self._wake()
        self._wake_drain()

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if not self._busy or self._complete or parser is None:
            self._poison()  # bytes nobody asked for: never hand this connection out again
            return
        self._got_bytes = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._exc is None and not self._complete:
                self._exc = ProtocolError(str(exc))
            self._poison()
        self._wake()

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost does the accounting

    # ---------------------------------------------------------------- httptools callbacks

    def on_message_begin(self) -> None:
        if self._head is not None:
            self._reusable = False  # a second response to one request: the app is out of step
            self._skip_body = True

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) in (14, 17):
            low = name.lower()
            if low == b"content-length":
                self._framed = True
                self._content_length = int(value)  # llhttp has validated the digits
            elif low == b"transfer-encoding":
                self._framed = True
        self._headers.append((_decode(name), _decode(value)))

    def on_headers_complete(self) -> None:
        if self._head is not None:
            return
        parser = self._parser
        assert parser is not None  # (callbacks run inside feed_data only)
        status = parser.get_status_code()
        if status < 200:
            if status == 101:  # we never ask for an upgrade on this path
                self._exc = ProtocolError("unrequested 101")
                self._poison()
                return
            self._interim = True  # 100 Continue, 103 Early Hints: not forwarded
            self._headers = []
            self._reason = b""
            self._framed = False
            self._content_length = None
            return
        head = Head(status, _decode(self._reason), self._headers, self._content_length)
        head.keep_alive = parser.should_keep_alive()
        self._head = head
        if self._skip_body:  # HEAD: llhttp cannot be told there is no body
            self._complete = True
            self._reusable = False

    def on_body(self, body: bytes) -> None:
        if self._skip_body:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._head is None or self._complete:
            return
        self._complete = True
        parser = self._parser
        assert parser is not None  # (callbacks run inside feed_data only)
        if not parser.should_keep_alive():
            self._reusable = False

    # ---------------------------------------------------------------- exchange

    def _poison(self) -> None:
        self._reusable = False
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, exc: BaseException) -> None:
        """Abort the exchange (e.g. the request body could not be read)."""
        if self._exc is None and not self._complete:
            self._exc = exc
        self._poison()
        self._wake()

    def start(self, head: bytes, *, no_body: bool) -> None:
        """Send a request head; the response is awaited with :meth:`response`."""
        self._busy = True
        self._skip_body = no_body
        assert self.transport is not None
        self.transport.write(head)

    async def _wait(self) -> None:
        """Wait for bytes (or the end, or an error), at most ``read_timeout`` seconds.

        One timer per connection, not one per wait: it fires at the earliest deadline it
        was armed for and, if the current wait started later, re-arms for its deadline."""
        loop = self._loop
        waiter = loop.create_future()
        self._waiter = waiter
        self._deadline = loop.time() + self._pool.read_timeout
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._check_deadline)
        try:
            await waiter
        finally:
            self._waiter = None

    def _check_deadline(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done() or self.closed:
            return  # not waiting now: the next wait arms a new timer
        if self._loop.time() >= self._deadline:
            self.fail(ReadTimeout())
        else:
            self._timer = self._loop.call_at(self._deadline, self._check_deadline)

    async def response(self) -> Head:
        """The final response head (1xx skipped); raises on errors and timeouts."""
        while self._head is None:
            if self._exc is not None:
                raise self._exc
            await self._wait()
        return self._head

    def ready(self) -> bool:
        """True when :meth:`read` would answer without waiting (a chunk, the end, an error)."""
        return bool(self._chunks) or self._complete or self._exc is not None

    def drained(self) -> bool:
        """True when the body is complete and every chunk was read: :meth:`read` gives ``b""``."""
        return self._complete and not self._chunks and self._exc is None

    async def read(self) -> bytes:
        """The next body chunk; ``b""`` once the body is complete."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._reading_paused and self._buffered <= LOW_WATER and self.transport is not None:
                    self._reading_paused = False
                    self.transport.resume_reading()
                return chunk
            if self._exc is not None:
                raise self._exc
            if self._complete:
                return b""
            await self._wait()

    async def send_body(self, body: AsyncIterable[bytes], *, chunked: bool) -> None:
        """Stream the request body (run as a task next to :meth:`response`)."""
        transport = self.transport
        assert transport is not None
        try:
            async for chunk in body:
                if self.closed:
                    return
                if chunked:
                    if chunk:
                        transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                if self._write_paused:
                    self._drain = self._loop.create_future()
                    await self._drain
                    self._drain = None
            if chunked and not self.closed:
                transport.write(b"0\r\n\r\n")
        except asyncio.CancelledError:
            self._poison()
            raise
        except Exception as exc:  # handed to the reader, which raises it
            self.fail(exc)

    def finish(self, reusable: bool) -> None:
        """End the exchange: back into the pool or closed."""
        ok = reusable and self._complete and self._reusable and self._exc is None and not self.closed
        self._busy = False
        if self._head is not None and not self._head.keep_alive:
            ok = False
        self._reset()
        self._pool.release(self, ok)


class Pool:
    """Keep-alive connections per (host, port), at most ``limit_per_host`` in use at once and
    ``max_idle_per_host`` idle."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        limit_per_host: int = 256,
        socket_factory: Callable[[Any], socket.socket] | None = None,
        keepalive: float = KEEPALIVE,
        max_idle_per_host: int = MAX_IDLE_PER_HOST,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.max_idle = max_idle_per_host
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.limit = limit_per_host
        self.keepalive = keepalive
        self._socket_factory = socket_factory
        self._idle: dict[tuple[str, int], list[Connection]] = {}
        self._active: dict[tuple[str, int], int] = {}
        self._waiting: dict[tuple[str, int], collections.deque[asyncio.Future[None]]] = {}
        self._all: set[Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def acquire(self, host: str, port: int, *, fresh: bool = False) -> Connection:
        """A connection to ``host:port``: a pooled idle one unless ``fresh``, else a new one."""
        key = (host, port)
        while self._active.get(key, 0) >= self.limit:
            fut: asyncio.Future[None] = self.loop.create_future()
            self._waiting.setdefault(key, collections.deque()).append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._wake_one(key)
                raise
        self._active[key] = self._active.get(key, 0) + 1
        try:
            idle = self._idle.get(key)
            if idle and not fresh:
                now = self.loop.time()
                while idle:
                    conn = idle.pop()
                    if not conn.closed and now - conn.idle_since < self.keepalive:
                        conn.reused = True
                        return conn
                    self._discard(conn)
            return await self._connect(key)
        except BaseException:
            self._done(key)
            raise

    async def _connect(self, key: tuple[str, int]) -> Connection:
        host, port = key
        conn = Connection(self, key)
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self._socket_factory is None:
                    await self.loop.create_connection(lambda: conn, host, port)
                else:
                    await self._connect_marked(conn, host, port)
        except TimeoutError:
            raise ConnectError(f"connect to {host}:{port} timed out") from None
        except OSError as exc:
            raise ConnectError(f"connect to {host}:{port}: {exc}") from None
        self._all.add(conn)
        return conn

    async def _connect_marked(self, conn: Connection, host: str, port: int) -> None:
        assert self._socket_factory is not None
        infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        last: OSError = OSError(f"no address for {host}")
        for info in infos:
            sock = self._socket_factory(info)
            try:
                sock.setblocking(False)
                await self.loop.sock_connect(sock, info[4])
            except OSError as exc:
                sock.close()
                last = exc
                continue
            except BaseException:
                sock.close()
                raise
            await self.loop.create_connection(lambda: conn, sock=sock)
            return
        raise last

    def release(self, conn: Connection, reusable: bool) -> None:
        self._done(conn.key)
        if not reusable or self._closed or conn.closed:
            self._discard(conn)
            return
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.max_idle:
            self._discard(conn)
            return
        conn.idle_since = self.loop.time()
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.keepalive, self._sweep)

    def _done(self, key: tuple[str, int]) -> None:
        self._active[key] -= 1
        self._wake_one(key)

    def _wake_one(self, key: tuple[str, int]) -> None:
        waiting = self._waiting.get(key)
        while waiting:
            fut = waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _discard(self, conn: Connection) -> None:
        self._all.discard(conn)
        if conn.transport is not None and not conn.closed:
            conn.transport.close()

    def forget(self, conn: Connection) -> None:
        """A connection closed: drop it from the idle list."""
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        left = False
        for idle in self._idle.values():
            for conn in [c for c in idle if now - c.idle_since >= self.keepalive]:
                idle.remove(conn)
                self._discard(conn)
            left = left or bool(idle)
        if left and not self._closed:
            self._sweeper = self.loop.call_later(self.keepalive / 2, self._sweep)

    def close(self) -> None:
        """Close every connection (idle and in use)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self._all):
            if conn.transport is not None:
                conn.transport.abort()
        self._all.clear()
        self._idle.clear()
