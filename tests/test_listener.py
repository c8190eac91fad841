"""Tests for enforcer.listener: real TLS handshakes against an asyncio server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import threading
import warnings
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from enforcer.http.certs import CertError, CertStore, LeafPaths
from enforcer.http.tls import make_listen_socket, normalise_sni, server_ssl_context, sni_of
from tests.harness.prereq import require

# -- helpers ---------------------------------------------------------------------------------


@dataclass
class Reply:
    """What one client connection saw."""

    server_says: str
    peer_sans: list[str]
    session: ssl.SSLSession | None
    reused: bool
    alpn: str | None
    version: str | None


class RawSniContext(ssl.SSLContext):
    """A client context that sends server_hostname verbatim (Python lower-cases it via IDNA)."""

    def _encode_hostname(self, hostname: Any) -> Any:
        return hostname


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Tell the client which SNI and ALPN the server side saw, then close."""
    obj = writer.get_extra_info("ssl_object")
    writer.write(f"sni={sni_of(obj)} alpn={obj.selected_alpn_protocol()}\n".encode())
    with contextlib.suppress(Exception):
        await writer.drain()
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 2)


@contextlib.asynccontextmanager
async def serving(
    ctx: ssl.SSLContext | None, sock: socket.socket | None = None
) -> AsyncIterator[int]:
    """Run the test handler on ``sock`` (default: 127.0.0.1, any port) and yield the port.

    Handlers are awaited before returning so no task outlives the test's event loop.
    """
    sock = sock or make_listen_socket("127.0.0.1", 0)
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        await _handle(reader, writer)

    server = await asyncio.start_server(handle, sock=sock, ssl=ctx)
    try:
        yield sock.getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
        if handlers:
            await asyncio.wait(handlers, timeout=3)


@contextlib.contextmanager
def blocking_serving(ctx: ssl.SSLContext) -> Iterator[int]:
    """Serve with blocking ssl sockets in a thread and yield the port.

    asyncio's SSL transport in Python 3.11 (and uvloop) drops the fatal alert OpenSSL queued
    when a handshake fails (CPython gh-98078), so the client only sees EOF there; a blocking
    server flushes it, which lets tests check *which* alert our context chooses.
    """
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    tls = ctx.wrap_socket(conn, server_side=True)
                    tls.sendall(f"sni={sni_of(tls)}\n".encode())
                    tls.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        sock.close()


def client_ctx(
    ca: bytes, *, cls: type[ssl.SSLContext] = ssl.SSLContext, alpn: list[str] | None = None
) -> ssl.SSLContext:
    """A client context trusting only ``ca``."""
    ctx = cls(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca.decode())
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def _talk(
    port: int,
    ctx: ssl.SSLContext,
    server_hostname: str | None,
    *,
    session: ssl.SSLSession | None = None,
    host: str = "127.0.0.1",
) -> Reply:
    """Connect, handshake, read the server's one line (blocking; run in a thread)."""
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname, session=session) as tls,
    ):
        data = b""
        while not data.endswith(b"\n"):
            chunk = tls.recv(1024)
            if not chunk:
                break
            data += chunk
        cert = tls.getpeercert() or {}
        san_pairs: Any = cert.get("subjectAltName", ())
        sans = [v for _, v in san_pairs]
        return Reply(
            data.decode().strip(),
            [str(s) for s in sans],
            tls.session,
            bool(tls.session_reused),
            tls.selected_alpn_protocol(),
            tls.version(),
        )


async def talk(port: int, ctx: ssl.SSLContext, sni: str | None, **kw: Any) -> Reply:
    """``_talk`` in a worker thread so the server keeps running on the loop."""
    return await asyncio.to_thread(_talk, port, ctx, sni, **kw)


def _send_raw(port: int, payload: bytes) -> bytes:
    """Send non-TLS bytes and read until the server closes; returns whatever it sent back."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(4096):
                got += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server hung up while we were still sending: also a clean close
    return got


@pytest.fixture
def store(tmp_path: Path) -> CertStore:
    """A CertStore in a temp state dir."""
    return CertStore(tmp_path)


@pytest.fixture
def leaves(store: CertStore) -> Mapping[str, LeafPaths]:
    """Two services on one listener: a.example and b.example (with www.b.example)."""
    a = store.ensure_leaf("a", ["a.example"])
    b = store.ensure_leaf("b", ["b.example", "www.b.example"])
    return {"a.example": a, "b.example": b, "www.b.example": b}


@pytest.fixture
def ca(store: CertStore) -> bytes:
    """The CA PEM clients trust."""
    return store.ca_pem()


# -- SNI -------------------------------------------------------------------------------------


async def test_two_hosts_one_listener_different_leaves(
    leaves: Mapping[str, LeafPaths], ca: bytes
) -> None:
    """A client trusting only the CA verifies a.example and b.example on one port, each its own."""
    async with serving(server_ssl_context(leaves, default=None)) as port:
        ra = await talk(port, client_ctx(ca), "a.example")
        rb = await talk(port, client_ctx(ca), "b.example")
        rw = await talk(port, client_ctx(ca), "www.b.example")
    assert ra.peer_sans == ["a.example"]
    assert ra.server_says == "sni=a.example alpn=None"
    assert rb.peer_sans == ["b.example", "www.b.example"]
    assert rw.peer_sans == rb.peer_sans


async def test_unknown_sni_fails_handshake(
    leaves: Mapping[str, LeafPaths], ca: bytes, store: CertStore
) -> None:
    """An SNI no service names fails the handshake and no certificate is minted."""
    before = sorted(p.name for p in store.certs_dir.iterdir())
    async with serving(server_ssl_context(leaves, default="a.example")) as port:
        with pytest.raises(ssl.SSLError):
            await talk(port, client_ctx(ca), "c.example")
        with pytest.raises(ssl.SSLError):
            await talk(port, client_ctx(ca), "x" * 63 + ".a.example")
        assert (await talk(port, client_ctx(ca), "a.example")).peer_sans == ["a.example"]
    assert sorted(p.name for p in store.certs_dir.iterdir()) == before


def test_unknown_sni_alert_is_unrecognized_name(leaves: Mapping[str, LeafPaths], ca: bytes) -> None:
    """The context answers an unknown SNI with the unrecognized_name alert (RFC 6066 §3)."""
    with blocking_serving(server_ssl_context(leaves, default="a.example")) as port:
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            _talk(port, client_ctx(ca), "c.example")
        assert _talk(port, client_ctx(ca), "a.example").server_says == "sni=a.example"


async def test_no_sni_gets_default(leaves: Mapping[str, LeafPaths], ca: bytes) -> None:
    """Without SNI the default host's leaf is presented and sni_of() is None."""
    ctx = client_ctx(ca)
    ctx.check_hostname = False  # no name to check; the chain is still verified
    async with serving(server_ssl_context(leaves, default="b.example")) as port:
        r = await talk(port, ctx, None)
    assert r.peer_sans == ["b.example", "www.b.example"]
    assert r.server_says == "sni=None alpn=None"


async def test_no_sni_without_default_fails(leaves: Mapping[str, LeafPaths], ca: bytes) -> None:
    """Without SNI and without a default the handshake fails."""
    ctx = client_ctx(ca)
    ctx.check_hostname = False
    async with serving(server_ssl_context(leaves, default=None)) as port:
        with pytest.raises(ssl.SSLError):
            await talk(port, ctx, None)
    with (
        blocking_serving(server_ssl_context(leaves, default=None)) as port,
        pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"),
    ):
        _talk(port, ctx, None)


async def test_sni_of_is_normalised(leaves: Mapping[str, LeafPaths], ca: bytes) -> None:
    """An upper-case SNI with a trailing dot selects a.example and sni_of() says 'a.example'."""
    ctx = client_ctx(ca, cls=RawSniContext)
    ctx.check_hostname = False  # OpenSSL's name check does not accept the trailing dot
    async with serving(server_ssl_context(leaves, default=None)) as port:
        r = await talk(port, ctx, "A.EXAMPLE.")
    assert r.server_says == "sni=a.example alpn=None"
    assert r.peer_sans == ["a.example"]


async def test_wildcard_host(store: CertStore, ca: bytes) -> None:
    """A '*.w.example' host serves one label below it, not two."""
    leaf = store.ensure_leaf("w", ["*.w.example"])
    async with serving(server_ssl_context({"*.w.example": leaf}, default=None)) as port:
        r = await talk(port, client_ctx(ca), "x.w.example")
        assert r.server_says == "sni=x.w.example alpn=None"
        with pytest.raises(ssl.SSLError):
            await talk(port, client_ctx(ca), "y.x.w.example")


def test_sni_of_under_uvloop(leaves: Mapping[str, LeafPaths], ca: bytes) -> None:
    """sni_of() also works with uvloop's SSL transport (the daemon may run on uvloop)."""

    async def scenario() -> Reply:
        async with serving(server_ssl_context(leaves, default=None)) as port:
            return await talk(port, client_ctx(ca, alpn=["h2", "http/1.1"]), "www.b.example")

    r = uvloop.run(scenario())
    assert r.server_says == "sni=www.b.example alpn=http/1.1"


def test_normalise_sni() -> None:
    """normalise_sni lower-cases, drops one trailing dot and maps IP literals to None."""
    assert normalise_sni("A.Example.") == "a.example"
    assert normalise_sni("127.0.0.1") is None
    assert normalise_sni("::1") is None
    assert normalise_sni("") is None
    assert normalise_sni(None) is None
    assert normalise_sni(".") is None
    assert sni_of(None) is None


def _normalise_sni_reference(name: str | None) -> str | None:
    """normalise_sni without its fast path: every name goes through ipaddress."""
    if not name:
        return None
    name = name.lower().removesuffix(".")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name or None
    return None


@given(st.one_of(st.none(), st.text(), st.text(alphabet="0123456789.:abcdefABCDEF%xX "),
                 st.ip_addresses().map(str), st.ip_addresses().map(lambda a: f"{a}.")))
def test_normalise_sni_fast_path_agrees_with_ipaddress(name: str | None) -> None:
    """The fast path that skips the IP parse for ordinary names gives the same answer as parsing every name."""
    assert normalise_sni(name) == _normalise_sni_reference(name)


def test_bad_configuration_rejected(leaves: Mapping[str, LeafPaths], tmp_path: Path) -> None:
    """An unknown default raises ValueError, an unloadable pair raises CertError naming it."""
    with pytest.raises(ValueError, match="default"):
        server_ssl_context(leaves, default="c.example")
    broken = LeafPaths(tmp_path / "nope.crt", tmp_path / "nope.key", leaves["a.example"].not_after)
    with pytest.raises(CertError, match=r"nope\.crt"):
        server_ssl_context({"a.example": broken}, default=None)


# -- protocol settings -----------------------------------------------------------------------


def test_context_settings(leaves: Mapping[str, LeafPaths]) -> None:
    """TLS 1.2+, AEAD-only 1.2 suites, no compression/renegotiation, tickets on, no client certs."""
    ctx = server_ssl_context(leaves, default=None)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert not ctx.options & ssl.OP_NO_TICKET
    assert ctx.verify_mode == ssl.CERT_NONE
    assert ctx.num_tickets >= 1
    for c in ctx.get_ciphers():
        assert c["aead"], c["name"]
        assert c["protocol"] == "TLSv1.3" or c["kea"] == "kx-ecdhe", c["name"]


async def test_tls11_client_refused(leaves: Mapping[str, LeafPaths], ca: bytes) -> None:
    """A client that can only do TLS 1.0/1.1 gets a protocol_version alert."""
    ctx = client_ctx(ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # make the client really offer TLS 1.1
    async with serving(server_ssl_context(leaves, default=None)) as port:
        with pytest.raises(ssl.SSLError):
            await talk(port, ctx, "a.example")
        assert (await talk(port, client_ctx(ca), "a.example")).version == "TLSv1.3"
    with (
        blocking_serving(server_ssl_context(leaves, default=None)) as port,
        pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"),
    ):
        _talk(port, ctx, "a.example")


def test_cbc_only_client_refused(leaves: Mapping[str, LeafPaths], ca: bytes) -> None:
    """A TLS 1.2 client offering only CBC suites fails the handshake."""
    ctx = client_ctx(ca)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE+AES128+SHA256:ECDHE+AES256+SHA384:ECDHE+SHA1")
    assert not any(c["aead"] for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3")
    with (
        blocking_serving(server_ssl_context(leaves, default=None)) as port,
        pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"),
    ):
        _talk(port, ctx, "a.example")


@pytest.mark.parametrize(
    ("offer", "expected"),
    [(["h2"], None), (["h2", "http/1.1"], "http/1.1"), (["spdy/3"], None), (None, None)],
)
async def test_alpn_never_h2(
    leaves: Mapping[str, LeafPaths], ca: bytes, offer: list[str] | None, expected: str | None
) -> None:
    """ALPN yields http/1.1 or nothing (OpenSSL continues without ALPN), never h2."""
    async with serving(server_ssl_context(leaves, default=None)) as port:
        r = await talk(port, client_ctx(ca, alpn=offer), "a.example")
    assert r.alpn == expected
    assert r.server_says == f"sni=a.example alpn={expected}"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_session_resumption(
    leaves: Mapping[str, LeafPaths], ca: bytes, version: ssl.TLSVersion
) -> None:
    """A second connection that passes the first one's session resumes it."""
    ctx = client_ctx(ca)
    ctx.minimum_version = ctx.maximum_version = version
    async with serving(server_ssl_context(leaves, default=None)) as port:
        first = await talk(port, ctx, "b.example")
        assert not first.reused
        second = await talk(port, ctx, "b.example", session=first.session)
    assert second.reused
    assert second.server_says == "sni=b.example alpn=None"


async def test_no_tls13_early_data(
    leaves: Mapping[str, LeafPaths], ca: bytes, tmp_path: Path
) -> None:
    """Our TLS 1.3 tickets allow no 0-RTT, so a resuming client sends no early data."""
    require(shutil.which("openssl") is not None, "the openssl CLI (package openssl)")
    ca_file, sess, early = tmp_path / "ca.pem", tmp_path / "sess.pem", tmp_path / "early.txt"
    ca_file.write_bytes(ca)
    early.write_bytes(b"POST /logout HTTP/1.1\r\nHost: a.example\r\n\r\n")

    def s_client(port: int, *extra: str) -> str:
        argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-ign_eof"]
        argv += ["-servername", "a.example", "-CAfile", str(ca_file), *extra]
        return subprocess.run(
            argv, input=b"", capture_output=True, timeout=10, check=False
        ).stdout.decode()

    async with serving(server_ssl_context(leaves, default=None)) as port:
        first = await asyncio.to_thread(s_client, port, "-sess_out", str(sess))
        second = await asyncio.to_thread(
            s_client, port, "-sess_in", str(sess), "-early_data", str(early)
        )
    assert "Max Early Data: 0" in first
    assert "Reused, TLSv1.3" in second
    assert "Early data was not sent" in second


# -- robustness ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", os.urandom(64 * 1024)],
    ids=["plaintext-http", "64KiB-random"],
)
async def test_garbage_closes_cleanly(
    leaves: Mapping[str, LeafPaths], ca: bytes, payload: bytes
) -> None:
    """Non-TLS bytes get the connection closed (no HTTP answer) and the server keeps serving."""
    async with serving(server_ssl_context(leaves, default=None)) as port:
        got = await asyncio.to_thread(_send_raw, port, payload)
        assert b"HTTP/1.1 200" not in got
        assert len(got) < 100  # at most a TLS alert
        r = await talk(port, client_ctx(ca), "a.example")
    assert r.peer_sans == ["a.example"]


# -- sockets ---------------------------------------------------------------------------------


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


async def test_dual_stack_socket_accepts_v4_and_v6(
    leaves: Mapping[str, LeafPaths], ca: bytes
) -> None:
    """make_listen_socket('::', 0) accepts TLS from both 127.0.0.1 and ::1."""
    require(_has_ipv6_loopback(), "an IPv6 loopback address (::1)")
    sock = make_listen_socket("::", 0)
    assert sock.family == socket.AF_INET6
    assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    assert not sock.getblocking()
    async with serving(server_ssl_context(leaves, default=None), sock) as port:
        v4 = await talk(port, client_ctx(ca), "a.example", host="127.0.0.1")
        v6 = await talk(port, client_ctx(ca), "a.example", host="::1")
    assert v4.peer_sans == v6.peer_sans == ["a.example"]


def test_listen_socket_options() -> None:
    """IPv4 sockets get SO_REUSEADDR, optional SO_REUSEPORT, and are non-blocking and listening."""
    with make_listen_socket("127.0.0.1", 0, reuse_port=True, backlog=16) as s:
        assert s.family == socket.AF_INET
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        assert not s.getblocking()
