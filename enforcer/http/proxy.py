"""Forward an allowed request to the app and stream the answer back (and WebSockets).

Bodies are streamed both ways through one keep-alive connection pool per app
(:mod:`enforcer.http.upstream`).  The first ``body_buffer`` bytes of a request body are read
before an app connection is taken (a smaller body whole, as nginx buffers bodies), so a body
trickling in never holds one of the app's connections; the rest is streamed.  A client that
goes away while its body is read is a client abort (499), not an app failure.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict, istr
from yarl import URL

from enforcer.errors import ClientBodyError, UpstreamError, UpstreamKind
from enforcer.http import relay
from enforcer.http import upstream as upstream_client
from enforcer.http.headers import CHUNK, response_head, serialise_head
from enforcer.http.server import HeldHeadResponse

log = logging.getLogger(__name__)

_WS = aiohttp.ClientWebSocketResponse | web.WebSocketResponse


@dataclass
class Transfer:
    """What one forwarded request moved (for the flow record)."""

    status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_ms: float | None = None


class _ResponseSink:
    """:class:`relay.Sink` over an aiohttp response (prepared, its head held)."""

    __slots__ = ("_request", "_resp", "_writer")

    def __init__(self, request: web.BaseRequest, resp: HeldHeadResponse, writer: AbstractStreamWriter) -> None:
        self._request = request
        self._resp = resp
        self._writer = writer

    def send_head(self) -> None:
        self._writer.send_headers()

    def write(self, chunk: bytes) -> Awaitable[None]:
        return self._resp.write(chunk)  # (the first one together with the head)

    def write_last(self, chunk: bytes) -> Awaitable[None]:
        return self._resp.write_eof(chunk)  # head (if still held), last chunk and end: one write

    def abort(self) -> None:
        if self._request.transport is not None:
            self._request.transport.abort()


class ClientAborted(ConnectionResetError):
    """The client's connection ended (or failed) while its request body was being read."""


_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # no "Content-Length: 0" without a body


class Upstream:
    """A keep-alive connection pool to the apps, and the forwarding itself.

    Plain HTTP goes through :mod:`enforcer.upstream` (httptools); WebSockets through aiohttp.
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        max_body: int = 1 << 30,
        limit_per_host: int = 256,
        body_buffer: int = 64 << 10,
        socket_factory: Callable[[Any], socket.socket] | None = None,
    ) -> None:
        self.body_buffer = body_buffer
        self._pool = upstream_client.Pool(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            limit_per_host=limit_per_host,
            socket_factory=socket_factory,
        )
        self._ws_args: dict[str, Any] = {
            "connect_timeout": connect_timeout, "read_timeout": read_timeout, "socket_factory": socket_factory,
        }
        self._ws_session: aiohttp.ClientSession | None = None
        self.max_body = max_body

    def _session(self) -> aiohttp.ClientSession:
        """The aiohttp session WebSockets are relayed with (made on first use)."""
        if self._ws_session is None:
            a = self._ws_args
            self._ws_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0, enable_cleanup_closed=False, socket_factory=a["socket_factory"], force_close=True,
                ),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=a["connect_timeout"], sock_read=a["read_timeout"]
                ),
            )
        return self._ws_session

    async def close(self) -> None:
        self._pool.close()
        if self._ws_session is not None:
            await self._ws_session.close()

    async def forward(
        self,
        request: web.BaseRequest,
        *,
        upstream_host: str,
        port: int,
        target: str,
        headers: CIMultiDict[str],
        public_origin: str,
        transfer: Transfer,
    ) -> web.StreamResponse:
        """Send the request to the app and stream its response to the client."""
        method = request.method
        has_body = request.body_exists
        chunked = False
        prefix: list[bytes] = []
        if has_body:
            if request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            prefix = await self._prefix(request, transfer)  # before any app connection is taken
            if request.content_length is not None:
                headers[istr("Content-Length")] = str(request.content_length)
            else:
                headers[istr("Transfer-Encoding")] = "chunked"
                chunked = True
        elif method not in _NO_BODY_METHODS and "Content-Length" not in headers:
            headers[istr("Content-Length")] = "0"
        head = serialise_head(method, target, headers)
        no_body = method == "HEAD"
        started = time.perf_counter()
        conn, resp_head, body_task = await self._exchange(
            request, upstream_host, port, head, no_body=no_body, has_body=has_body, chunked=chunked,
            transfer=transfer, prefix=prefix,
        )
        reusable = False
        try:
            transfer.upstream_ms = (time.perf_counter() - started) * 1000
            status = resp_head.status
            transfer.status = status
            answer = response_head(
                resp_head, method=method, public_origin=public_origin, upstream_host=upstream_host, port=port
            )
            no_body = answer.no_body
            resp = HeldHeadResponse(status=status, reason=answer.reason or None)
            fields = answer.fields
            if not no_body:  # aiohttp frames the body itself (chunked, or for HTTP/1.0 until close)
                fields.popall("Transfer-Encoding", None)
                if not answer.chunked:
                    resp.content_length = int(fields.popone("Content-Length"))
            resp.headers.extend(fields)
            writer = await resp.prepare(request)  # the head is held for the first body bytes
            if no_body:
                await resp.write_eof(b"")  # the held head and the end: one write
            else:
                assert writer is not None
                try:
                    await relay.body(conn, _ResponseSink(request, resp, writer), transfer)
                except ConnectionResetError:
                    cut = getattr(request.protocol, "cut", None)  # (server.Protocol: read too slowly)
                    if cut is not None:
                        raise cut from None
                    raise
            reusable = body_task is None or (body_task.done() and not body_task.cancelled())
            return resp
        finally:
            if body_task is not None and not body_task.done():
                body_task.cancel()
            conn.finish(reusable)

    async def send(
        self, *, upstream_host: str, port: int, head: bytes, no_body: bool, transfer: Transfer
    ) -> tuple[upstream_client.Connection, upstream_client.Head]:
        """Send a bodiless request head (the fast path's GET or HEAD); the response head.

        The caller reads the body from the connection and must call ``conn.finish(...)``.
        Raises UpstreamError like :meth:`forward`.
        """
        conn, answer, _ = await self._exchange(
            None, upstream_host, port, head, no_body=no_body, has_body=False, chunked=False, transfer=transfer
        )
        return conn, answer

    async def _exchange(
        self,
        request: web.BaseRequest | None,
        host: str,
        port: int,
        head: bytes,
        *,
        no_body: bool,
        has_body: bool,
        chunked: bool,
        transfer: Transfer,
        prefix: list[bytes] | None = None,
    ) -> tuple[upstream_client.Connection, upstream_client.Head, asyncio.Task[None] | None]:
        """Connect (or reuse), send the request, and wait for the response head.

        A pooled connection the app closed while idle is retried once on a new connection,
        provided nothing of the request body was consumed and no response byte arrived.
        """
        fresh = False
        while True:
            try:
                conn = await self._pool.acquire(host, port, fresh=fresh)
            except upstream_client.ConnectError as exc:
                log.info("upstream %s:%s: %s", host, port, exc)
                raise UpstreamError(UpstreamKind.CONNECT, 502) from None
            conn.start(head, no_body=no_body)
            body_task = None
            if has_body and request is not None:
                body_task = asyncio.get_running_loop().create_task(
                    conn.send_body(self._count_body(request, transfer, prefix or []), chunked=chunked)
                )
            try:
                return conn, await conn.response(), body_task
            except BaseException as exc:
                if body_task is not None and not body_task.done():
                    body_task.cancel()
                conn.finish(False)
                if isinstance(exc, UpstreamError | ClientAborted | ClientBodyError):
                    raise  # (the client's body failed: its own reason, not the app's)
                if isinstance(exc, upstream_client.ReadTimeout):
                    raise UpstreamError(UpstreamKind.TIMEOUT, 504) from None
                if transfer.bytes_in > self.max_body:
                    raise UpstreamError(UpstreamKind.BODY_TOO_LARGE, 413) from None
                if isinstance(exc, upstream_client.Closed) and conn.reused and not exc.got_bytes and not has_body:
                    fresh = True  # the app had closed the idle connection: once more on a new one
                    continue
                if isinstance(exc, upstream_client.Closed | upstream_client.ProtocolError | OSError):
                    log.info("upstream %s:%s failed: %s", host, port, exc)
                    raise UpstreamError(UpstreamKind.PROTOCOL, 502) from None
                raise

    async def _prefix(self, request: web.BaseRequest, transfer: Transfer) -> list[bytes]:
        """The body's first ``body_buffer`` bytes (all of a smaller one), read before an app
        connection is taken: its minimum rate (:mod:`enforcer.http.server`) runs meanwhile."""
        content = request.content
        chunks: list[bytes] = []
        got = 0
        try:
            while got < self.body_buffer:
                chunk = await content.read(CHUNK)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
                self._count(transfer, len(chunk))
        except OSError as exc:  # (ConnectionResetError, or the TLS error that ended the connection)
            raise ClientAborted(str(exc)) from None
        return chunks

    def _count(self, transfer: Transfer, n: int) -> None:
        transfer.bytes_in += n
        if transfer.bytes_in > self.max_body:
            raise UpstreamError(UpstreamKind.BODY_TOO_LARGE, 413)

    async def _count_body(
        self, request: web.BaseRequest, transfer: Transfer, prefix: list[bytes]
    ) -> AsyncIterator[bytes]:
        for chunk in prefix:  # (counted when read)
            yield chunk
        content = request.content
        while True:
            try:
                chunk = await content.read(CHUNK)
            except OSError as exc:
                raise ClientAborted(str(exc)) from None
            if not chunk:
                return
            self._count(transfer, len(chunk))
            yield chunk

    async def websocket(
        self,
        request: web.BaseRequest,
        *,
        upstream_host: str,
        port: int,
        target: str,
        headers: CIMultiDict[str],
        transfer: Transfer,
    ) -> web.StreamResponse:
        """Relay a WebSocket (only called after the request was allowed)."""
        url = URL.build(scheme="ws", host=upstream_host, port=port, encoded=True).join(URL(target, encoded=True))
        offered = request.headers.getall("Sec-WebSocket-Protocol", [])
        protocols = [p.strip() for v in offered for p in v.split(",") if p.strip()]
        fwd = CIMultiDict(
            (k, v)
            for k, v in headers.items()
            if k.lower() not in ("connection", "upgrade") and not k.lower().startswith("sec-websocket-")
        )
        started = time.perf_counter()
        try:
            up = await self._session().ws_connect(
                url, headers=fwd, protocols=protocols, autoping=False, max_msg_size=16 << 20
            )
        except aiohttp.WSServerHandshakeError as exc:
            transfer.status = exc.status
            raise UpstreamError(UpstreamKind.WEBSOCKET_REFUSED, 502 if exc.status < 400 else exc.status) from None
        except (aiohttp.ClientError, OSError, TimeoutError):
            raise UpstreamError(UpstreamKind.CONNECT, 502) from None
        transfer.upstream_ms = (time.perf_counter() - started) * 1000
        transfer.status = 101
        chosen = [up.protocol] if up.protocol else []
        down = web.WebSocketResponse(protocols=chosen, autoping=False, max_msg_size=16 << 20)
        await down.prepare(request)

        async def pump(src: _WS, dst: _WS, outbound: bool) -> None:
            async for msg in src:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await dst.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await dst.send_bytes(msg.data)
                elif msg.type == aiohttp.WSMsgType.PING:
                    await dst.ping(msg.data)
                elif msg.type == aiohttp.WSMsgType.PONG:
                    await dst.pong(msg.data)
                else:
                    break
                size = len(msg.data) if isinstance(msg.data, bytes | str) else 0
                if outbound:
                    transfer.bytes_in += size
                else:
                    transfer.bytes_out += size
            await dst.close()

        try:
            await asyncio.gather(pump(down, up, True), pump(up, down, False))
        finally:
            await up.close()
            await down.close()
        return down


POD_LOOPBACK = "127.0.0.1"


class PodUpstream(Upstream):
    """The apps of one pod: an :class:`Upstream` whose every connection goes to the pod's own
    loopback (``127.0.0.1:port``), its sockets made inside the pod's network namespace by
    ``socket_factory`` (:meth:`enforcer.run.attach.PodAttachment.socket_factory`), whatever a
    service's ``upstreamHost`` says (only the connection: rewriting the app's redirects still
    compares against it, on both HTTP paths alike). :meth:`close` closes every one of them."""

    async def _exchange(
        self,
        request: web.BaseRequest | None,
        host: str,
        port: int,
        head: bytes,
        *,
        no_body: bool,
        has_body: bool,
        chunked: bool,
        transfer: Transfer,
        prefix: list[bytes] | None = None,
    ) -> tuple[upstream_client.Connection, upstream_client.Head, asyncio.Task[None] | None]:
        return await super()._exchange(
            request, POD_LOOPBACK, port, head, no_body=no_body, has_body=has_body, chunked=chunked,
            transfer=transfer, prefix=prefix,
        )

    async def websocket(
        self,
        request: web.BaseRequest,
        *,
        upstream_host: str,
        port: int,
        target: str,
        headers: CIMultiDict[str],
        transfer: Transfer,
    ) -> web.StreamResponse:
        return await super().websocket(
            request, upstream_host=POD_LOOPBACK, port=port, target=target, headers=headers, transfer=transfer
        )
