"""The HTTP server wrapper: connection caps per client address and in all."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from enforcer.http import accept
from enforcer.http import server as server_mod
from enforcer.http.certs import CertStore


async def _ok(_: web.BaseRequest) -> web.StreamResponse:
    return web.Response(text="ok")


@dataclass
class Capped:
    server: server_mod.Server
    port: int
    client: ssl.SSLContext


@pytest_asyncio.fixture
async def capped(tmp_path: Path) -> AsyncIterator[Capped]:
    """A TLS listener (TLSListener, as the daemon runs it) with at most 3 connections, 2 per address."""
    store = CertStore(tmp_path)
    leaf = store.ensure_leaf("app", ["app.test"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(leaf.cert, leaf.key)
    client = ssl.create_default_context(cadata=store.ca_pem().decode())
    server = server_mod.Server(_ok, header_timeout=5, body_timeout=5, max_connections=3, max_per_ip=2)
    sock = socket.create_server(("127.0.0.1", 0))
    listener = accept.TLSListener(server, sock, ctx, 5)
    yield Capped(server, sock.getsockname()[1], client)
    listener.close()
    await server.shutdown(1)


async def _served(capped: Capped) -> tuple[bool, asyncio.StreamWriter | None]:
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", capped.port, ssl=capped.client, server_hostname="app.test"
        )
    except (ConnectionError, ssl.SSLError):
        return False, None  # closed before the handshake: over a cap
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    try:
        line = await asyncio.wait_for(reader.readline(), 5)
    except (ConnectionError, TimeoutError, ssl.SSLError):
        return False, writer
    return line.startswith(b"HTTP/1.1 200"), writer


async def test_connections_over_the_per_ip_cap_are_closed(capped: Capped) -> None:
    """A third connection from one address is closed at once; after one ends, a new one is served."""
    server = capped.server
    ok1, w1 = await _served(capped)
    ok2, w2 = await _served(capped)
    ok3, w3 = await _served(capped)
    assert (ok1, ok2, ok3) == (True, True, False)
    assert server.refused_connections == 1
    assert w1 is not None
    w1.close()
    await asyncio.sleep(0.1)
    ok4, w4 = await _served(capped)
    assert ok4
    for w in (w2, w3, w4):
        if w is not None:
            w.close()
    await asyncio.sleep(0.1)
    assert server.open_connections == 0


async def test_admit_and_release_keep_counts_exact() -> None:
    """The global cap holds across addresses and counts return to zero."""
    server = server_mod.Server(_ok, header_timeout=5, body_timeout=5, max_connections=2, max_per_ip=5)
    assert server.admit("a") and server.admit("b")
    assert not server.admit("c")
    server.release("a")
    assert server.admit("c")
    server.release("b")
    server.release("c")
    assert server.open_connections == 0
    assert server._per_ip == {}


async def test_on_idle_runs_when_a_burst_of_connections_is_over() -> None:
    """on_idle (the daemon's heap trim) is called when the open connections fall to a quarter of their peak, or to none."""
    server = server_mod.Server(_ok, header_timeout=5, body_timeout=5)
    idle: list[int] = []
    server.on_idle = lambda: idle.append(server.open_connections)
    for _ in range(100):
        assert server.admit("a")
    for _ in range(74):
        server.release("a")
    assert idle == []  # 26 of a peak of 100 still open
    server.release("a")
    assert idle == [25]
    for _ in range(5):
        server.release("a")
    assert idle == [25]  # 20 open: not a quarter of the new peak (25) yet
    for _ in range(14):
        server.release("a")
    assert idle == [25, 6]
    for _ in range(6):
        server.release("a")
    assert idle[-1] == 0 and server.open_connections == 0


class _NoFilesSocket:
    """A listening socket whose accept fails as in a process out of file descriptors."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.accepts = 0

    def setblocking(self, flag: bool) -> None:
        self.real.setblocking(flag)

    def fileno(self) -> int:
        return self.real.fileno()

    def accept(self) -> tuple[socket.socket, object]:
        self.accepts += 1
        raise OSError(errno.EMFILE, "Too many open files")

    def close(self) -> None:
        self.real.close()


async def test_listener_pauses_accepting_when_out_of_file_descriptors() -> None:
    """When accept fails with EMFILE the listener stops watching the socket for a moment instead of spinning, then tries again."""
    real = socket.create_server(("127.0.0.1", 0))
    fake = _NoFilesSocket(real)
    server = server_mod.Server(_ok, header_timeout=5, body_timeout=5)
    listener = accept.TLSListener(server, fake, ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), 5)  # type: ignore[arg-type]
    client = socket.create_connection(real.getsockname())  # the listening socket stays readable
    try:
        await asyncio.sleep(0.05)
        assert fake.accepts == 1  # one attempt, then paused: no busy loop on a readable socket
        await asyncio.sleep(accept._ACCEPT_PAUSE * 2)
        assert fake.accepts >= 2  # accepting resumed after the pause
        assert server.open_connections == 0
    finally:
        listener.close()
        client.close()


async def test_listener_counts_a_connection_from_accept_to_close() -> None:
    """A TCP connection is counted from its accept, through a handshake that fails, back to zero."""
    server = server_mod.Server(_ok, header_timeout=5, body_timeout=5)
    sock = socket.create_server(("127.0.0.1", 0))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no certificate: every handshake fails
    listener = accept.TLSListener(server, sock, ctx, 5)
    try:
        reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        for _ in range(50):
            if server.open_connections == 1:
                break
            await asyncio.sleep(0.01)
        assert server.open_connections == 1  # counted while no TLS byte has been sent yet
        writer.write(b"\x16\x03\x01\x00\x05hello")  # not a valid ClientHello
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        for _ in range(100):
            if server.open_connections == 0:
                break
            await asyncio.sleep(0.01)
        assert server.open_connections == 0 and server._per_ip == {}
    finally:
        listener.close()


# ------------------------------------------------------------------ aiohttp's private API


def test_the_installed_aiohttp_is_a_version_the_server_module_was_written_for() -> None:
    """http/server.py uses aiohttp private names: it names the versions they were checked against, and only those pass."""
    import aiohttp  # noqa: PLC0415

    major_minor = ".".join(aiohttp.__version__.split(".")[:2])
    assert major_minor in server_mod.AIOHTTP_WRITTEN_FOR, (
        f"aiohttp {aiohttp.__version__}: review enforcer/http/server.py's private names, then add it"
    )


async def test_every_private_aiohttp_name_the_server_module_uses_exists() -> None:
    """Each private name in PRIVATE_NAMES is there on the installed aiohttp's classes or a live protocol."""
    from aiohttp import web_protocol  # noqa: PLC0415

    server = server_mod.Server(_ok, header_timeout=5, body_timeout=5)
    protocol = server.protocol()
    places: tuple[object, ...] = (protocol, server, web_protocol, web.StreamResponse, server_mod.Protocol)
    missing = [n for n in server_mod.PRIVATE_NAMES if not any(hasattr(p, n) for p in places)]
    assert missing == []


def test_no_module_but_the_server_module_uses_aiohttp_private_names() -> None:
    """Outside http/server.py no module imports aiohttp's private modules or names, or touches its private attributes."""
    import ast  # noqa: PLC0415

    ours = {"_reading_paused", "_close", "_waiter"}  # also attributes of our own protocols (fastpath, upstream)
    names = set(server_mod.PRIVATE_NAMES) - ours
    offenders = []
    root = Path(server_mod.__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        if path.name == "server.py" and path.parent.name == "http":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiohttp"):
                if "web_protocol" in (node.module or "") or any(a.name.startswith("_") for a in node.names):
                    offenders.append(f"{path.name}: from {node.module} import ...")
            elif isinstance(node, ast.Attribute) and node.attr in names:
                offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert offenders == []


class _Clock:
    """A settable clock for :class:`server_mod.RateLimit`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("ip", "loopback", "limited"), [
    ("192.0.2.7", False, True), ("2001:db8::7", False, True),
    ("127.0.0.1", False, False), ("127.0.0.9", False, False), ("::1", False, False), ("::ffff:127.0.0.1", False, False),
    ("127.0.0.1", True, True), ("::1", True, True),
])
def test_rate_limit_lets_a_burst_through_then_the_rate(ip: str, loopback: bool, limited: bool) -> None:
    """A RateLimit lets an address's burst through, then refuses until tokens refill at its rate (loopback uncounted unless asked), and marks only the first refusal of a run."""
    clock = _Clock()
    limit = server_mod.RateLimit(2.0, 3, loopback=loopback, clock=clock)
    assert [limit.allow(ip) for _ in range(3)] == [True] * 3
    if not limited:
        assert all(limit.allow(ip) for _ in range(100))
        return
    assert not limit.allow(ip)
    assert limit.first_refusal(ip)
    assert not limit.allow(ip)
    assert not limit.first_refusal(ip)
    assert limit.allow("198.51.100.1")  # another address has its own bucket
    clock.now += 0.5  # one token back at 2/s
    assert limit.allow(ip)
    assert not limit.allow(ip)
    assert limit.first_refusal(ip)  # a new run of refusals
    clock.now += 60
    assert [limit.allow(ip) for _ in range(4)] == [True, True, True, False]  # refilled to the burst, no more


def test_rate_limit_off_and_bounded() -> None:
    """A rate of 0 limits nothing; the bucket table never grows past max_keys addresses."""
    off = server_mod.RateLimit(0, 1)
    assert all(off.allow("192.0.2.1") for _ in range(1000))
    clock = _Clock()
    limit = server_mod.RateLimit(1.0, 1, clock=clock, max_keys=100)
    for i in range(1000):
        assert limit.allow(f"10.0.{i // 256}.{i % 256}")
    assert len(limit._buckets) <= 100


async def _slow(request: web.BaseRequest) -> web.StreamResponse:
    await asyncio.sleep(0.5 if request.path == "/slow" else 0)
    return web.Response(text="ok")


async def test_a_stop_closes_idle_keepalive_connections_at_once_and_lets_a_request_finish(tmp_path: Path) -> None:
    """At a stop an idle keep-alive connection is closed at once (it does not hold the drain for its whole time), while a request in flight is answered first; the drain then ends without waiting for its limit."""
    store = CertStore(tmp_path)
    leaf = store.ensure_leaf("app", ["app.test"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(leaf.cert, leaf.key)
    client = ssl.create_default_context(cadata=store.ca_pem().decode())
    server = server_mod.Server(_slow, header_timeout=5, body_timeout=5, keepalive_timeout=60)
    sock = socket.create_server(("127.0.0.1", 0))
    listener = accept.TLSListener(server, sock, ctx, 5)
    port = sock.getsockname()[1]

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="app.test")

    idle_r, idle_w = await connect()
    idle_w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(idle_r.readuntil(b"ok"), 5)).startswith(b"HTTP/1.1 200")  # now idle, kept alive
    busy_r, busy_w = await connect()
    busy_w.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.1)  # the slow request is in flight
    listener.close()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await server.shutdown(20)
    took = loop.time() - started
    answer = await asyncio.wait_for(busy_r.read(), 5)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")
    assert await asyncio.wait_for(idle_r.read(), 5) == b""  # closed by the server
    assert took < 3, f"the drain took {took:.1f} s"
    for w in (idle_w, busy_w):
        w.close()
