"""The probe gate of one pod: lets the kubelet's plain-HTTP probes of a protected port reach the app, nothing else.

In pod mode every connection to a protected app ``port`` that does not come from the pod's own
loopback is reset, so the kubelet's ``httpGet`` probes (from the node's address) could never
reach the app. The pod's table redirects connections from the ONE address the node uses towards
the pod (:class:`enforcer.net.ruleset.ProbeTarget`) to ``kubernetes.pods.probePort``, where a
:class:`ProbeGate` listens inside the pod's namespace. For each connection it:

* takes the app port from the connection's original destination (``SO_ORIGINAL_DST``); a
  connection made straight to the gate's port (not redirected) gets 403;
* reads one request head (bounded in size and time) and parses it with httptools;
* forwards only ``GET``/``HEAD`` of exactly a probe's request target for that port (path and
  query as the pod spec says) to the app at ``127.0.0.1:<port>`` through a socket made inside
  the pod's namespace, with the kubelet's headers only (``Host``, ``User-Agent``, ``Accept`` as
  received, then the probe's ``httpHeaders`` from the spec) and ``Connection: close``; no
  identity header is ever added;
* answers with the app's status and at most :data:`BODY_LIMIT` bytes of its body (the kubelet
  reads no more); anything else: 403 without contacting the app; the app down or silent: 503.

No flow record is written (the kubelet probes every few seconds); each answer counts once in
``enforcer_pod_probes_total{result}`` (:data:`RESULTS`). Nothing here runs on the request path
of protected services: the gate has its own listener and only ever sees probe connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

import httptools

from enforcer.net import sockopt

log = logging.getLogger(__name__)

BODY_LIMIT = 10 * 1024
"""The most of the app's body handed back (the kubelet reads 10 KiB of a probe's answer)."""
TIMEOUT = 10.0
"""The longest the gate waits for a request head or for the app (the probe's timeoutSeconds
bounds the kubelet anyway)."""
RESULTS = ("passed", "refused", "unavailable")
"""``passed``: the app answered (any status); ``refused``: 403, the app not contacted;
``unavailable``: 503, the app could not be reached or did not answer in time."""

_KUBELET_HEADERS = (b"Host", b"User-Agent", b"Accept")


class GatedProbe(Protocol):
    """What the gate needs of a probe (``enforcer.config.kubernetes.Probe``)."""

    @property
    def target(self) -> str: ...

    @property
    def headers(self) -> tuple[tuple[str, str], ...]: ...


Routes = Callable[[], Mapping[int, Sequence[GatedProbe]]]
"""The gated probes by app port, as they are now (the attachment's, replaced on each apply)."""
SocketFactory = Callable[[Any], socket.socket]


@dataclass
class _Head:
    method: bytes = b""
    target: bytes = b""
    headers: dict[bytes, bytes] = field(default_factory=dict)
    done: bool = False

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.setdefault(name.lower(), value)

    def on_headers_complete(self) -> None:
        self.done = True


@dataclass
class _Answer:
    status: int = 0
    body: bytearray = field(default_factory=bytearray)
    content_type: bytes = b""
    headers_done: bool = False
    complete: bool = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type" and not self.content_type:
            self.content_type = value

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body += body[: BODY_LIMIT - len(self.body)]

    def on_message_complete(self) -> None:
        self.complete = True


def _clean(value: str | bytes) -> bytes:
    data = value.encode("latin-1", "replace") if isinstance(value, str) else value
    return bytes(b for b in data if b >= 0x20 and b != 0x7F)  # no CR, LF or other control bytes


def _phrase(status: int) -> str:
    """The reason phrase of a status line (any phrase will do for an unknown status)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status"


class ProbeGate:
    """One pod's probe gate on ``sock`` (listening, inside the pod's namespace): see the module
    docstring. ``connect`` makes the app's sockets inside the pod's namespace; ``count`` is told
    each answer's result. :meth:`start` serves from the running loop; :meth:`close` stops it and
    cuts the probes in flight (their app sockets closed)."""

    def __init__(
        self, name: str, sock: socket.socket, routes: Routes, connect: SocketFactory, *,
        count: Callable[[str], None] = lambda _: None, max_connections: int = 16,
        head_limit: int = 8192, timeout: float = TIMEOUT,
    ) -> None:
        self.name = name
        self.sock = sock
        self.routes = routes
        self.connect = connect
        self.count = count
        self.max_connections = max_connections
        self.head_limit = head_limit
        self.timeout = min(timeout, TIMEOUT)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, sock=self.sock, limit=self.head_limit)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) >= self.max_connections:
            writer.close()
            return
        self._tasks.add(task)
        try:
            status, body, content_type = await self._answer(reader, writer)
            head = (f"HTTP/1.1 {int(status)} {_phrase(status)}\r\nContent-Length: {len(body)}\r\n").encode()
            if content_type:
                head += b"Content-Type: " + content_type + b"\r\n"
            writer.write(head + b"Connection: close\r\n\r\n" + body)
            await asyncio.wait_for(writer.drain(), self.timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[int, bytes, bytes]:
        """The answer to one probe connection: (status, body, content type)."""
        sock = writer.get_extra_info("socket")
        original = sockopt.redirected_destination(sock) if sock is not None else None
        probes = self.routes().get(original[1], ()) if original is not None else ()
        head = await self._read_head(reader)
        wanted = next((p for p in probes if head is not None and p.target.encode() == head.target), None)
        if head is None or wanted is None or head.method not in (b"GET", b"HEAD") or original is None:
            self.count("refused")
            return HTTPStatus.FORBIDDEN, b"", b""
        try:
            answer = await asyncio.wait_for(self._forward(original[1], head, wanted), self.timeout)
        except (OSError, TimeoutError, httptools.HttpParserError, ValueError) as exc:
            log.debug("%s: probe of port %d: the app did not answer: %s", self.name, original[1], exc)
            self.count("unavailable")
            return HTTPStatus.SERVICE_UNAVAILABLE, b"", b""
        self.count("passed")
        body = bytes(answer.body) if head.method == b"GET" else b""
        return answer.status, body, _clean(answer.content_type)

    async def _read_head(self, reader: asyncio.StreamReader) -> _Head | None:
        """One request head, parsed (None: too big, too slow, cut or malformed)."""
        try:
            data = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ValueError, OSError):
            return None
        head = _Head()
        parser = httptools.HttpRequestParser(head)
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # no upgrade is a probe
            return None
        if not head.done:
            return None
        head.method = parser.get_method()
        return head

    async def _forward(self, port: int, head: _Head, probe: GatedProbe) -> _Answer:
        """Send the probe to the app at 127.0.0.1:``port`` (inside the pod) and read its answer."""
        loop = asyncio.get_running_loop()
        address = ("127.0.0.1", port)
        sock = self.connect((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address))
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            headers: dict[bytes, tuple[bytes, bytes]] = {  # lower-case name -> (name, value)
                name.lower(): (name, _clean(head.headers[name.lower()]))
                for name in _KUBELET_HEADERS if name.lower() in head.headers
            }
            for name, value in probe.headers:
                headers[_clean(name).lower()] = (_clean(name), _clean(value))
            lines = [head.method + b" " + probe.target.encode() + b" HTTP/1.1"]
            lines.extend(name + b": " + value for key, (name, value) in headers.items() if key != b"connection")
            lines.append(b"Connection: close")
            await loop.sock_sendall(sock, b"\r\n".join(lines) + b"\r\n\r\n")
            answer = _Answer()
            parser = httptools.HttpResponseParser(answer)
            while not answer.complete and len(answer.body) < BODY_LIMIT:
                if head.method == b"HEAD" and answer.headers_done:
                    break
                data = await loop.sock_recv(sock, 16384)
                if not data:
                    break
                parser.feed_data(data)
            if not answer.headers_done:
                raise ValueError("the app closed the connection before its answer's head")
            answer.status = parser.get_status_code()
            return answer
        finally:
            with contextlib.suppress(OSError):
                sock.close()
