"""Forward an allowed request to the app and stream the answer back.

Header hygiene happens here and only here, in a fixed order: (1) drop hop-by-hop
headers and every header the client's ``Connection:`` names, (2) drop every client
copy of an identity or forwarding header (all case variants; names with ``_`` never
get this far, the handler rejects them), (3) drop the enforcer's own cookies, and only
then (4) add our ``X-Forwarded-*`` and identity headers.  Bodies are streamed both ways
through one keep-alive connection pool per app; nothing is buffered whole.
"""

from __future__ import annotations

import asyncio
import functools
import http
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

from enforcer import upstream as upstream_client
from enforcer.identity import cookies as sessions

log = logging.getLogger("enforcer.proxy")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
        "expect",
    }
)

#: Headers only the enforcer may set towards the app: identity and forwarding data.
SPOOFABLE = frozenset(
    {
        "forwarded",
        "x-real-ip",
        "true-client-ip",
        "client-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "x-original-url",
        "x-rewrite-url",
        "x-original-host",
        "x-original-uri",
        "x-original-method",
        "x-remote-user",
        "remote-user",
        "x-remote-email",
        "x-remote-group",
        "x-user",
        "x-email",
        "x-username",
        "x-webauth-user",
        "x-authenticated-user",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "oidc-access-token",
        "oidc-id-token",
    }
)
SPOOFABLE_PREFIXES = ("x-forwarded-", "x-auth-request-", "oidc-claim-", "x-oidc-", "x-enforcer-")

CHUNK = 64 * 1024
SERVER = "enforcer"


def is_spoofable(name: str, extra: frozenset[str] = frozenset()) -> bool:
    """True for any header name a client must never be able to send to the app."""
    n = name.lower().replace("_", "-")
    return n in SPOOFABLE or n in extra or n.startswith(SPOOFABLE_PREFIXES)


_NO_TOKENS: frozenset[str] = frozenset()


@functools.lru_cache(maxsize=256)
def _tokens(value: str) -> frozenset[str]:
    """The lower-cased tokens of one ``Connection`` value (the same few values all day)."""
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    if "Connection" not in headers:
        return _NO_TOKENS
    values = headers.getall("Connection")
    if len(values) == 1:
        return _tokens(values[0])
    return frozenset().union(*map(_tokens, values))


def _pair_connection_tokens(pairs: list[tuple[str, str]]) -> frozenset[str]:
    """:func:`_connection_tokens` of a raw header list (name case as received)."""
    values = [v for k, v in pairs if len(k) == 10 and k.lower() == "connection"]
    if not values:
        return _NO_TOKENS
    if len(values) == 1:
        return _tokens(values[0])
    return frozenset().union(*map(_tokens, values))


MAX_IDENTITY_VALUE = 4096
"""Longest identity header value sent to the app (after percent-encoding)."""


def clean_value(value: str) -> str:
    """A header-safe rendering of an identity value: controls removed, non-ASCII as
    RFC 3986 percent-encoded UTF-8 (documented for app authors).

    Printable ASCII without ``%`` (almost every user name and email) is its own rendering:
    returned as is, without a copy or a cache entry (the cache held a copy of every value of
    every user: 0.67 MiB with 10,000 users)."""
    if value.isascii() and value.isprintable() and "%" not in value:
        return value[:MAX_IDENTITY_VALUE]
    return _encode_value(value)


@functools.lru_cache(maxsize=1024)
def _encode_value(value: str) -> str:
    """:func:`clean_value` character by character."""
    out = []
    for ch in value:
        o = ord(ch)
        if o < 0x20 or o == 0x7F:
            continue
        if o < 0x80 and ch != "%":
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)[:MAX_IDENTITY_VALUE]


def request_headers(
    client: CIMultiDictProxy[str] | CIMultiDict[str],
    *,
    identity: Mapping[str, str],
    client_ip: str,
    host: str,
    websocket: bool = False,
) -> CIMultiDict[str]:
    """The headers the app receives: the client's, cleaned, then ours."""
    named = _connection_tokens(client)
    ours = frozenset(n.lower() for n in identity)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in client.items():
        if not _dropped(name.lower(), named, ours):
            out.add(name, value)
    cookie = sessions.strip_cookies(client.getall("Cookie", []), _is_enforcer_cookie)
    if cookie:
        out["Cookie"] = cookie
    out["Host"] = host
    out["X-Forwarded-For"] = client_ip
    out["X-Forwarded-Proto"] = "https"
    out["X-Forwarded-Host"] = host
    for name, value in identity.items():
        out[name] = clean_value(value)
    if websocket:
        out["Connection"] = "Upgrade"
        out["Upgrade"] = "websocket"
    return out


_DROP_FROM_CLIENT = HOP_BY_HOP | SPOOFABLE | {"host", "cookie"}


def _dropped(low: str, named: frozenset[str], ours: frozenset[str]) -> bool:
    """Whether a client header (lower-case name) stays away from the app: hop-by-hop, named
    by ``Connection``, one of our identity headers, spoofable, Host or Cookie (re-added)."""
    return (
        low in _DROP_FROM_CLIENT
        or low in named
        or low in ours
        or low.startswith(SPOOFABLE_PREFIXES)
        or ("_" in low and is_spoofable(low, ours))
    )


def request_head(
    method: str, target: str, client: list[tuple[str, str]], *, identity: Mapping[str, str], client_ip: str, host: str
) -> bytes:
    """``serialise_head(method, target, request_headers(CIMultiDict(client), ...))`` in one pass
    over the client's raw header list (the fast path's request; no WebSocket), byte for byte
    the same (a property test holds them equal)."""
    named = _pair_connection_tokens(client)
    ours = frozenset(n.lower() for n in identity) if identity else _NO_TOKENS
    lines = [f"{method} {target} HTTP/1.1"]
    cookies = []
    for name, value in client:
        low = name.lower()
        if low == "cookie":
            cookies.append(value)
        elif not _dropped(low, named, ours):
            lines.append(f"{name}: {value}")
    cookie = sessions.strip_cookies(cookies, _is_enforcer_cookie) if cookies else None
    if cookie:
        lines.append(f"Cookie: {cookie}")
    lines += (f"Host: {host}", f"X-Forwarded-For: {client_ip}", "X-Forwarded-Proto: https", f"X-Forwarded-Host: {host}")
    for name, value in identity.items():
        lines.append(f"{name}: {clean_value(value)}")
    return _encode_head(lines)


def _is_enforcer_cookie(name: str) -> bool:
    return name.lower().startswith("__host-enforcer")


def response_headers(
    upstream: CIMultiDictProxy[str] | CIMultiDict[str] | list[tuple[str, str]],
    *,
    public_origin: str,
    internal_origins: tuple[str, ...],
    into: CIMultiDict[str] | None = None,
) -> CIMultiDict[str]:
    """The headers the client receives from the app's answer (added to ``into`` if given:
    the response's own header dict, so they are built once from the parser's raw list)."""
    if isinstance(upstream, list):
        named = _pair_connection_tokens(upstream)
        pairs: Any = upstream
    else:
        named = _connection_tokens(upstream)
        pairs = upstream.items()
    out: CIMultiDict[str] = CIMultiDict() if into is None else into
    for name, value in pairs:
        low = name.lower()
        if low in HOP_BY_HOP or low in named or low == "content-length":
            continue
        if low == "set-cookie" and _is_enforcer_cookie(value.split("=", 1)[0].strip()):
            continue  # the app may not overwrite or fix our session
        if low == "location":
            out.add(name, _public_location(value, public_origin, internal_origins))
            continue
        out.add(name, value)
    return out


def _public_location(value: str, public_origin: str, internal_origins: tuple[str, ...]) -> str:
    """An app redirect to its own internal address points at the public origin instead."""
    for internal in internal_origins:
        if value.startswith(internal) and value[len(internal) : len(internal) + 1] in ("", "/", "?"):
            return public_origin + value[len(internal) :]
    return value


@functools.lru_cache(maxsize=256)
def _internal_origins(upstream_host: str, port: int) -> tuple[str, str, str]:
    """The app's own addresses, as it may write them in a ``Location``."""
    return (f"http://{upstream_host}:{port}", f"http://127.0.0.1:{port}", f"http://localhost:{port}")


def _first(pairs: list[tuple[str, str]], low_name: str) -> str | None:
    """The first value of a header in a raw list (case-insensitive), like CIMultiDict[...]."""
    for k, v in pairs:
        if k.lower() == low_name:
            return v
    return None


def serialise_head(method: str, target: str, headers: CIMultiDict[str]) -> bytes:
    """The request line and header block towards the app (values were cleaned already)."""
    return _encode_head([f"{method} {target} HTTP/1.1", *map(": ".join, headers.items())])


def _encode_head(lines: list[str]) -> bytes:
    """A request head from its lines; UpstreamError if a value holds a CR or LF (a header
    is never split in two)."""
    text = "\r\n".join([*lines, "", ""])
    count = len(lines) + 1
    if text.count("\n") != count or text.count("\r") != count:
        raise UpstreamError("protocol", 502)
    return text.encode("utf-8", "surrogateescape")


_FORBIDDEN_IN_HEAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # as aiohttp's header writer refuses
_REASONS = {s.value: s.phrase for s in http.HTTPStatus}
http_date = rfc822_formatted_time
"""The ``Date`` header value for now (aiohttp's, formatted once per second)."""


_RELAY_HEADS: dict[tuple[Any, ...], tuple[bytes, bool, bool, bool]] = {}
"""Built response heads by everything they depend on (apps repeat the same few all day)."""
_RELAY_HEADS_MAX = 512


def relay_head(
    head: upstream_client.Head, *, method: str, public_origin: str, upstream_host: str, port: int, keep_alive: bool
) -> tuple[bytes, bool, bool]:
    """The HTTP/1.1 head the client receives for the app's answer, and (chunked, no_body).

    The same head :meth:`Upstream.forward` has aiohttp write: the app's headers cleaned by
    :func:`response_headers`; ``Content-Length`` when the app framed the body by length,
    else chunked; none of either for HEAD's and 204/304's empty body except the app's length
    on a HEAD; ``Content-Type``, ``Date`` and ``Server`` defaults; ``Connection: close`` when
    the client connection ends after this answer.  Raises UpstreamError if the app's status
    line or a header value holds a control character.  A head is built once per distinct
    input and remembered (bounded); only our own ``Date`` is added fresh each time.
    """
    key = (head.status, head.reason, tuple(head.headers), head.content_length, method, keep_alive,
           public_origin, upstream_host, port)
    built = _RELAY_HEADS.get(key)
    if built is None:
        built = _build_relay_head(
            head, method, public_origin, upstream_host=upstream_host, port=port, keep_alive=keep_alive
        )
        if len(_RELAY_HEADS) >= _RELAY_HEADS_MAX:
            _RELAY_HEADS.clear()
        _RELAY_HEADS[key] = built
    lines, chunked, no_body, add_date = built
    if add_date:
        return b"%sDate: %s\r\n\r\n" % (lines, http_date().encode()), chunked, no_body
    return lines + b"\r\n", chunked, no_body


def _build_relay_head(
    head: upstream_client.Head, method: str, public_origin: str, *, upstream_host: str, port: int, keep_alive: bool
) -> tuple[bytes, bool, bool, bool]:
    """(status line and header lines, each ending in CRLF; chunked; no_body; Date to add)."""
    status = head.status
    headers: CIMultiDict[str] = CIMultiDict()
    response_headers(
        head.headers, public_origin=public_origin, internal_origins=_internal_origins(upstream_host, port),
        into=headers,
    )
    headers.setdefault("Server", SERVER)
    chunked = False
    no_body = method == "HEAD" or status in (204, 304)
    if not no_body:
        length = head.content_length
        if length is None:
            headers["Transfer-Encoding"] = "chunked"
            chunked = True
        else:
            headers["Content-Length"] = str(length)
        if length != 0:
            headers.setdefault("Content-Type", "application/octet-stream")
    elif status not in (204, 304):  # a HEAD: the length the GET would have
        up_length = _first(head.headers, "content-length")
        if up_length is not None:
            headers["Content-Length"] = up_length
    if not keep_alive and "Connection" not in headers:
        headers["Connection"] = "close"
    reason = head.reason or _REASONS.get(status, "")
    lines = [f"HTTP/1.1 {status} {reason}", *map(": ".join, headers.items())]
    for line in lines:
        if _FORBIDDEN_IN_HEAD.search(line) is not None:
            raise UpstreamError("protocol", 502)
    lines.append("")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape"), chunked, no_body, "Date" not in headers


_WS = aiohttp.ClientWebSocketResponse | web.WebSocketResponse


class UpstreamError(Exception):
    """The app could not be reached or answered garbage; ``kind`` labels the metric."""

    def __init__(self, kind: str, status: int) -> None:
        self.kind = kind
        self.status = status
        super().__init__(kind)


@dataclass
class Transfer:
    """What one forwarded request moved (for the flow record)."""

    status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_ms: float | None = None


class _Relayed(web.StreamResponse):
    """The app's answer on its way to the client.  Its head is not written on its own
    (``web.StreamResponse`` would) but together with the first body bytes, or with the end
    of a bodiless response: one TLS record and one system call less per small response.
    :meth:`Upstream.forward` writes the head at once when no body bytes are there yet."""

    _send_headers_immediately = False


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
        socket_factory: Callable[[Any], socket.socket] | None = None,
    ) -> None:
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
        if has_body:
            if request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
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
            transfer=transfer,
        )
        reusable = False
        try:
            transfer.upstream_ms = (time.perf_counter() - started) * 1000
            status = resp_head.status
            transfer.status = status
            resp = _Relayed(status=status, reason=resp_head.reason or None)
            response_headers(
                resp_head.headers, public_origin=public_origin, internal_origins=_internal_origins(upstream_host, port),
                into=resp.headers,
            )
            resp.headers.setdefault("Server", SERVER)  # not aiohttp's version banner
            length = resp_head.content_length
            no_body = no_body or status in (204, 304)
            if length is not None and not no_body:
                resp.content_length = length
            elif method == "HEAD":
                up_length = _first(resp_head.headers, "content-length")
                if up_length is not None:
                    resp.headers["Content-Length"] = up_length
            writer = await resp.prepare(request)  # the head is held for the first body bytes
            chunk = b""
            if not no_body:
                try:
                    if not conn.ready():
                        # nothing of the body has arrived (a slow app, a stream, a long poll):
                        # the client gets the head now, not when the first byte comes
                        assert writer is not None
                        writer.send_headers()
                    chunk = await conn.read()
                    while chunk:
                        transfer.bytes_out += len(chunk)
                        if conn.drained():
                            break  # the last chunk: written with the end of the response below
                        await resp.write(chunk)  # (the first one together with the head)
                        chunk = await conn.read()
                except (upstream_client.Closed, upstream_client.ReadTimeout, upstream_client.ProtocolError):
                    # truncated body: never let the client take it for complete
                    transfer.status = 502
                    if request.transport is not None:
                        request.transport.abort()
                    raise UpstreamError("reset", 502) from None
            await resp.write_eof(chunk)  # head (if still held), last chunk and end: one write
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
                raise UpstreamError("connect", 502) from None
            conn.start(head, no_body=no_body)
            body_task = None
            if has_body and request is not None:
                body_task = asyncio.get_running_loop().create_task(
                    conn.send_body(self._count_body(request, transfer), chunked=chunked)
                )
            try:
                return conn, await conn.response(), body_task
            except BaseException as exc:
                if body_task is not None and not body_task.done():
                    body_task.cancel()
                conn.finish(False)
                if isinstance(exc, UpstreamError):
                    raise
                if isinstance(exc, upstream_client.ReadTimeout):
                    raise UpstreamError("timeout", 504) from None
                if transfer.bytes_in > self.max_body:
                    raise UpstreamError("body_too_large", 413) from None
                if isinstance(exc, upstream_client.Closed) and conn.reused and not exc.got_bytes and not has_body:
                    fresh = True  # the app had closed the idle connection: once more on a new one
                    continue
                if isinstance(exc, upstream_client.Closed | upstream_client.ProtocolError | OSError):
                    log.info("upstream %s:%s failed: %s", host, port, exc)
                    raise UpstreamError("protocol", 502) from None
                raise

    async def _count_body(self, request: web.BaseRequest, transfer: Transfer) -> AsyncIterator[bytes]:
        async for chunk in request.content.iter_chunked(CHUNK):
            transfer.bytes_in += len(chunk)
            if transfer.bytes_in > self.max_body:
                raise UpstreamError("body_too_large", 413)
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
            raise UpstreamError("websocket_refused", 502 if exc.status < 400 else exc.status) from None
        except (aiohttp.ClientError, OSError, TimeoutError):
            raise UpstreamError("connect", 502) from None
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
