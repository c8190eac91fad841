"""proxy.py's pure helpers: what the app may receive from the client, and what the client
receives from the app (conformance.md §4.1 X-HDR-*, §4.7 X-NET-06/07)."""

from __future__ import annotations

import asyncio
import socket
import string
import weakref
from collections.abc import AsyncIterator
from typing import Self

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from enforcer import errors
from enforcer.http import headers as headers_mod
from enforcer.http import proxy, upstream
from tests.harness.refcount import cycle_collector_off

IDENTITY = {"X-Forwarded-User": "alice", "X-Forwarded-Email": "alice@example.com", "X-Forwarded-Groups": "staff"}
OURS = {"x-forwarded-user", "x-forwarded-email", "x-forwarded-groups", "x-forwarded-for", "x-forwarded-proto",
        "x-forwarded-host", "host"}
PUBLIC = "https://app.test:8443"
INTERNAL = ("http://127.0.0.1:8081", "http://localhost:8081", "http://app.internal:8081")


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def forward(*pairs: tuple[str, str], identity: dict[str, str] | None = None, websocket: bool = False) -> CIMultiDict[str]:
    return headers_mod.request_headers(
        headers(*pairs), identity=IDENTITY if identity is None else identity,
        client_ip="192.0.2.7", host="app.test:8443", websocket=websocket,
    )


def back(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return headers_mod.response_headers(headers(*pairs), public_origin=PUBLIC, internal_origins=INTERNAL)


# ---------------------------------------------------------------- is_spoofable


@pytest.mark.parametrize(
    "name",
    [
        "X-Forwarded-User", "x-forwarded-user", "X-FORWARDED-USER", "X_Forwarded_User", "x_forwarded-email",
        "X-Forwarded-Preferred-Username", "X-Forwarded-Access-Token", "X-Forwarded-Port", "X-Forwarded-Prefix",
        "X-Forwarded-Uri", "X-Auth-Request-User", "X-Auth-Request-Access-Token", "X-Remote-User", "Remote-User",
        "X-User", "X-Email", "X-WEBAUTH-USER", "OIDC_CLAIM_sub", "oidc-claim-email", "OIDC_access_token",
        "Forwarded", "X-Real-IP", "True-Client-IP", "X-Original-URL", "X-Rewrite-URL", "X-Original-Host",
        "X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override", "X-Enforcer-Anything",
    ],
)
def test_identity_and_forwarding_names_are_spoofable(name: str) -> None:
    """Every identity/forwarding name of X-HDR-01/02/07/08, in any case and with '_', is spoofable."""
    assert headers_mod.is_spoofable(name)


@pytest.mark.parametrize("name", ["Accept", "Cookie", "Authorization", "User-Agent", "X-Request-Id", "X-Forwardedfor",
                                  "Content-Type"])
def test_ordinary_names_are_not_spoofable(name: str) -> None:
    """Ordinary application headers pass (only names the rule of headers.HeaderRule reserves go;
    ``Forwarded-Ish`` now does, by its ``forwarded`` part)."""
    assert not headers_mod.is_spoofable(name)


def test_configured_identity_names_are_spoofable() -> None:
    """A service's own identity header names (``extra``) are reserved too, in any case."""
    assert headers_mod.is_spoofable("x-app-login", frozenset({"x-app-login"}))
    assert headers_mod.is_spoofable("X_APP_LOGIN", frozenset({"x-app-login"}))


# ---------------------------------------------------------------- request_headers


def test_client_identity_headers_are_replaced_by_ours() -> None:
    """X-HDR-01/03: client copies (duplicates, comma lists, empty) are dropped; exactly one value of ours each."""
    out = forward(
        ("X-Forwarded-User", "admin"), ("x-forwarded-user", "admin, alice"), ("X-Forwarded-User", ""),
        ("X-Forwarded-Email", "root@x"), ("X-Forwarded-Groups", "admins"), ("Accept", "text/html"),
    )
    assert out.getall("X-Forwarded-User") == ["alice"]
    assert out.getall("X-Forwarded-Email") == ["alice@example.com"]
    assert out.getall("X-Forwarded-Groups") == ["staff"]
    assert out.getall("Accept") == ["text/html"]


def test_anonymous_request_carries_no_identity() -> None:
    """X-HDR-01 (public path, no session): client identity headers are dropped and none are added."""
    out = forward(("X-Forwarded-User", "admin"), ("X-Remote-User", "root"), identity={})
    assert "X-Forwarded-User" not in out and "X-Remote-User" not in out


def test_forwarding_metadata_is_overwritten_not_appended() -> None:
    """X-HDR-07: client X-Forwarded-*/Forwarded/X-Real-IP never reach the app; ours are single values."""
    out = forward(
        ("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Port", "80"), ("X-Forwarded-Prefix", "/admin"), ("Forwarded", "for=1.2.3.4"),
        ("X-Real-IP", "1.2.3.4"), ("True-Client-IP", "1.2.3.4"), ("X-Original-URL", "/admin"),
        ("X-Rewrite-URL", "/admin"), ("X-Original-Host", "evil"), ("Host", "evil.example"),
    )
    assert out.getall("X-Forwarded-For") == ["192.0.2.7"]
    assert out.getall("X-Forwarded-Host") == ["app.test:8443"]
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out.getall("Host") == ["app.test:8443"]
    for gone in ("X-Forwarded-Port", "X-Forwarded-Prefix", "Forwarded", "X-Real-IP", "True-Client-IP",
                 "X-Original-URL", "X-Rewrite-URL", "X-Original-Host"):
        assert gone not in out, gone


def test_method_override_headers_are_stripped() -> None:
    """X-HDR-08: method-override headers never reach the app (policy was decided on the real method)."""
    out = forward(("X-HTTP-Method-Override", "DELETE"), ("X-HTTP-Method", "PUT"), ("X-Method-Override", "PATCH"))
    assert not any("method" in k.lower() for k in out)


def test_connection_listed_headers_are_dropped_but_ours_survive() -> None:
    """X-HDR-04: headers named in Connection are removed from the client's set before ours are added."""
    out = forward(
        ("Connection", "close, X-Forwarded-User, X-Forwarded-Email, Authorization, Cookie, X-Custom"),
        ("Authorization", "Bearer x"), ("X-Custom", "1"), ("Cookie", "app=1"), ("X-Other", "kept"),
    )
    assert out.getall("X-Forwarded-User") == ["alice"]
    assert out.getall("X-Forwarded-Email") == ["alice@example.com"]
    assert out.getall("X-Forwarded-For") == ["192.0.2.7"]
    assert "Authorization" not in out and "X-Custom" not in out
    assert "Connection" not in out
    assert out.getall("X-Other") == ["kept"]


@pytest.mark.parametrize(
    "name", ["Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authorization", "TE", "Trailer",
             "Transfer-Encoding", "Upgrade", "HTTP2-Settings", "Expect"],
)
def test_hop_by_hop_headers_are_dropped(name: str) -> None:
    """Hop-by-hop headers (incl. h2c's Upgrade/HTTP2-Settings, X-SMG-13, and Trailer, X-HDR-05) stay at the enforcer."""
    assert name not in forward((name, "x"))


def test_websocket_gets_our_upgrade_headers_only() -> None:
    """An allowed WebSocket is re-marked as an upgrade by us; the client's Upgrade value is not copied."""
    out = forward(("Upgrade", "h2c"), ("Connection", "Upgrade"), websocket=True)
    assert out.getall("Upgrade") == ["websocket"] and out.getall("Connection") == ["Upgrade"]


def test_enforcer_cookies_are_stripped_app_cookies_kept() -> None:
    """Our session/transaction cookies never reach the app; the app's own cookies do."""
    out = forward(("Cookie", "__Host-enforcer-app=secret; app=1"), ("Cookie", "__Host-enforcertx-ab=x; b=2"))
    assert "secret" not in out.get("Cookie", "")
    assert "enforcer" not in out.get("Cookie", "").lower()
    assert "app=1" in out["Cookie"] and "b=2" in out["Cookie"]


def test_only_enforcer_cookies_means_no_cookie_header() -> None:
    """A Cookie header holding only our cookies disappears entirely."""
    assert "Cookie" not in forward(("Cookie", "__Host-enforcer-app=secret"))


# ---------------------------------------------------------------- clean_value


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("alice", "alice"),
        ("a\r\nX-Evil: 1", "aX-Evil: 1"),
        ("a\x00b\x7fc\td", "abcd"),
        ("josé", "jos%C3%A9"),
        ("100%", "100%25"),
        ("日本", "%E6%97%A5%E6%9C%AC"),
        ("x" * 5000, "x" * 4096),
    ],
)
def test_clean_value(raw: str, clean: str) -> None:
    """Identity values lose control characters, non-ASCII and '%' are percent-encoded, length is capped."""
    assert headers_mod.clean_value(raw) == clean


@given(st.text(max_size=40) | st.text(alphabet=st.characters(max_codepoint=0x80), max_size=5000))
def test_clean_value_shortcut_equals_the_character_by_character_encoding(raw: str) -> None:
    """The no-copy shortcut for plain ASCII gives exactly what the per-character encoder gives."""
    assert headers_mod.clean_value(raw) == headers_mod._encode_value.__wrapped__(raw)


@given(st.text())
def test_clean_value_is_always_a_safe_header_value(value: str) -> None:
    """Whatever a claim contains, the header value is printable ASCII without CR/LF/NUL."""
    out = headers_mod.clean_value(value)
    assert all(0x20 <= ord(c) < 0x7F for c in out)
    assert len(out) <= 4096


# ---------------------------------------------------------------- response_headers


def test_location_to_an_internal_origin_is_rewritten() -> None:
    """X-NET-06: an app redirect to its internal address points at the public origin."""
    assert back(("Location", "http://127.0.0.1:8081/x?y=1"))["Location"] == PUBLIC + "/x?y=1"
    assert back(("Location", "http://localhost:8081"))["Location"] == PUBLIC
    assert back(("Location", "http://app.internal:8081/"))["Location"] == PUBLIC + "/"


@pytest.mark.parametrize(
    "location",
    ["http://127.0.0.1:80810/x", "http://127.0.0.1:8081.evil.example/", "http://127.0.0.1:8081@evil/",
     "https://idp.example/authorize", "/relative", "http://127.0.0.1:9090/metrics"],
)
def test_other_locations_pass_unchanged(location: str) -> None:
    """X-NET-06: only an exact internal origin (followed by '/', '?' or nothing) is rewritten."""
    assert back(("Location", location))["Location"] == location


def test_set_cookie_with_our_name_is_dropped() -> None:
    """X-NET-07: the app cannot set, overwrite or fix the enforcer's cookies; its own cookies pass."""
    out = back(
        ("Set-Cookie", "__Host-enforcer-app=evil; Path=/; Secure"),
        ("Set-Cookie", " __host-ENFORCERtx-1=x"),
        ("Set-Cookie", "appcookie=1; Path=/"),
    )
    assert out.getall("Set-Cookie") == ["appcookie=1; Path=/"]


def test_response_hop_by_hop_and_length_are_dropped() -> None:
    """X-SMG-14: the app's framing headers (CL, TE, Connection and what it names) never reach the client as-is."""
    out = back(
        ("Content-Length", "5"), ("Transfer-Encoding", "chunked"), ("Connection", "close, X-Secret"),
        ("X-Secret", "s"), ("Keep-Alive", "timeout=5"), ("Upgrade", "h2c"), ("Content-Type", "text/plain"),
    )
    assert list(out.keys()) == ["Content-Type"]


# ---------------------------------------------------------------- properties

_SPOOF_NAMES = sorted(headers_mod.SPOOFABLE) + [p + s for p in headers_mod.SPOOFABLE_PREFIXES for s in ("user", "email", "x")]


@st.composite
def spoofed_name(draw: st.DrawFn) -> str:
    """A reserved header name in random case, with '-' randomly turned into '_'."""
    base = draw(st.sampled_from(_SPOOF_NAMES + [n.lower() for n in IDENTITY]))
    out = []
    for ch in base:
        if ch == "-" and draw(st.booleans()):
            out.append("_")
        elif ch.isalpha() and draw(st.booleans()):
            out.append(ch.upper())
        else:
            out.append(ch)
    return "".join(out)


_TOKEN = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=30)


@settings(max_examples=300)
@given(
    spoofed=st.lists(st.tuples(spoofed_name(), st.just("EVIL")), min_size=1, max_size=8),
    others=st.lists(st.tuples(_TOKEN, st.text(alphabet=string.printable.strip(), max_size=20)), max_size=5),
    anonymous=st.booleans(),
)
def test_no_spoofable_header_survives(
    spoofed: list[tuple[str, str]], others: list[tuple[str, str]], anonymous: bool
) -> None:
    """No client-sent reserved header, in any case or '_' spelling, survives request_headers."""
    pairs = [(k, v) for k, v in others if k.lower() not in ("connection", "cookie")] + spoofed
    out = forward(*pairs, identity={} if anonymous else IDENTITY)
    for name, value in out.items():
        if headers_mod.is_spoofable(name):
            assert name.lower() in OURS, name
            assert value != "EVIL", name


@settings(max_examples=300)
@given(
    listed=st.lists(st.one_of(st.sampled_from([*IDENTITY, "X-Forwarded-For", "X-Forwarded-Proto", "Host",
                                               "x_forwarded_user", "close", "keep-alive", "Cookie"]), _TOKEN),
                    max_size=12),
    sep=st.sampled_from([",", ", ", " ,\t"]),
    lines=st.integers(min_value=1, max_value=3),
)
def test_injected_identity_survives_a_hostile_connection_header(listed: list[str], sep: str, lines: int) -> None:
    """X-HDR-04: whatever Connection names, our identity and forwarding headers still reach the app, once each."""
    value = sep.join(listed)
    out = forward(*[("Connection", value)] * lines, ("X-Forwarded-User", "admin"))
    for name, ours in IDENTITY.items():
        assert out.getall(name) == [ours]
    assert out.getall("X-Forwarded-For") == ["192.0.2.7"]
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out.getall("Host") == ["app.test:8443"]
    assert "Connection" not in out


# ---------------------------------------------------------------- the upstream client (enforcer.upstream)


class LoopbackApp:
    """A real asyncio server on 127.0.0.1 for the duration of an ``async with``; subclasses
    answer in ``_serve``."""

    server: asyncio.Server | None = None
    port = 0

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class FakeApp(LoopbackApp):
    """Answers each request head with the next scripted bytes."""

    def __init__(self, answers: list[bytes], *, close_after: bool = False, delay: float = 0.0) -> None:
        self.answers = list(answers)
        self.close_after = close_after
        self.delay = delay
        self.connections = 0
        self.requests: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                body = b""
                if b"transfer-encoding: chunked" in head.lower():
                    body = await reader.readuntil(b"0\r\n\r\n")
                elif b"content-length: " in head.lower():
                    n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    body = await reader.readexactly(n)
                self.requests.append(head + body)
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(self.answers.pop(0))
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def pool(**kw: float) -> upstream.Pool:
    return upstream.Pool(connect_timeout=kw.get("connect_timeout", 2.0), read_timeout=kw.get("read_timeout", 5.0))


async def fetch(p: upstream.Pool, port: int, method: str = "GET", target: str = "/") -> tuple[upstream.Head, bytes, upstream.Connection]:
    conn = await p.acquire("127.0.0.1", port)
    conn.start(f"{method} {target} HTTP/1.1\r\nHost: app\r\n\r\n".encode(), no_body=method == "HEAD")
    head = await conn.response()
    body = b""
    if method != "HEAD":
        while chunk := await conn.read():
            body += chunk
    return head, body, conn


OK5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello"


async def test_upstream_keep_alive_connection_is_reused() -> None:
    """Two sequential requests with complete responses go over one pooled connection."""
    async with FakeApp([OK5, OK5]) as app:
        p = pool()
        for _ in range(2):
            head, body, conn = await fetch(p, app.port)
            assert (head.status, head.reason, body) == (200, "OK", b"hello")
            assert ("X-A", "1") in head.headers and head.content_length == 5
            conn.finish(True)
        assert app.connections == 1
        p.close()


async def test_upstream_pool_keeps_at_most_max_idle_connections_per_host() -> None:
    """Connections released beyond max_idle_per_host are closed, not kept idle; the kept ones are reused."""
    async with FakeApp([OK5] * 6) as app:
        p = upstream.Pool(connect_timeout=2.0, read_timeout=5.0, max_idle_per_host=2)
        fetched = [await fetch(p, app.port) for _ in range(3)]  # three in use at once
        for _, body, conn in fetched:
            assert body == b"hello"
            conn.finish(True)
        assert app.connections == 3
        assert [c.transport is not None and c.transport.is_closing() for _, _, c in fetched] == [False, False, True]
        again = [await fetch(p, app.port) for _ in range(2)]
        assert {id(c) for _, _, c in again} == {id(c) for _, _, c in fetched[:2]}
        assert app.connections == 3
        p.close()


async def test_upstream_connection_close_is_honoured() -> None:
    """A response with ``Connection: close`` is not followed by reuse of that connection."""
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"
    async with FakeApp([answer, answer]) as app:
        p = pool()
        for _ in range(2):
            _, body, conn = await fetch(p, app.port)
            assert body == b"hi"
            conn.finish(True)
        assert app.connections == 2
        p.close()


async def test_upstream_closed_connection_is_freed_without_the_cycle_collector() -> None:
    """A connection the app closed is freed by reference counting alone once released (no
    parser <-> connection cycle left for a rare full collection: pooled connections age into
    the oldest generation, so such garbage would linger)."""
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"
    async with FakeApp([answer]) as app:
        p = pool()
        try:
            with cycle_collector_off():
                _, body, conn = await fetch(p, app.port)
                assert body == b"hi"
                conn.finish(True)
                for _ in range(100):  # the close reaches connection_lost on a later loop turn
                    if conn.closed:
                        break
                    await asyncio.sleep(0.01)
                assert conn.closed
                await asyncio.sleep(0)
                gone = weakref.ref(conn)
                del conn
                assert gone() is None
        finally:
            p.close()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nSMUGGLED",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello!!",
    b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
], ids=["cl-te", "dup-cl", "obs-fold", "unasked-101"])
async def test_upstream_ambiguous_framing_is_a_protocol_error(answer: bytes) -> None:
    """CL+TE, duplicate Content-Length, folded headers and an unrequested 101 raise ProtocolError."""
    async with FakeApp([answer]) as app:
        p = pool()
        with pytest.raises(upstream.ProtocolError):
            await fetch(p, app.port)
        p.close()


async def test_upstream_truncated_body_raises_closed() -> None:
    """A body shorter than its Content-Length ends in Closed, not in a short 'complete' body."""
    async with FakeApp([b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"t" * 10], close_after=True) as app:
        p = pool()
        conn = await p.acquire("127.0.0.1", app.port)
        conn.start(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n", no_body=False)
        assert (await conn.response()).content_length == 1000
        got: list[bytes] = []

        async def drain() -> None:
            while chunk := await conn.read():
                got.append(chunk)

        with pytest.raises(upstream.Closed):
            await drain()
        assert b"".join(got) == b"t" * 10
        conn.finish(True)
        assert p._idle.get(("127.0.0.1", app.port), []) == []
        p.close()


async def test_upstream_interim_responses_are_skipped() -> None:
    """100 Continue and 103 Early Hints are skipped; the final 200 and its headers are returned."""
    answer = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
              b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    async with FakeApp([answer, OK5]) as app:
        p = pool()
        head, body, conn = await fetch(p, app.port)
        assert (head.status, body) == (200, b"ok") and ("Link", "</a>") not in head.headers
        conn.finish(True)
        head, body, conn = await fetch(p, app.port)
        assert body == b"hello" and app.connections == 1
        conn.finish(True)
        p.close()


async def test_upstream_head_response_has_no_body_and_is_not_reused() -> None:
    """A HEAD response with Content-Length is complete at its head; the connection is then closed."""
    async with FakeApp([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", OK5]) as app:
        p = pool()
        head, _, conn = await fetch(p, app.port, "HEAD")
        assert head.content_length == 5 and await conn.read() == b""
        conn.finish(True)
        _, body, conn = await fetch(p, app.port)
        assert body == b"hello" and app.connections == 2
        conn.finish(True)
        p.close()


@pytest.mark.parametrize("status", [204, 304])
async def test_upstream_204_304_have_no_body(status: int) -> None:
    """204 and 304 end at their head even with a Content-Length, and the connection is reused."""
    async with FakeApp([b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status, OK5]) as app:
        p = pool()
        head, body, conn = await fetch(p, app.port)
        assert (head.status, body) == (status, b"")
        conn.finish(True)
        _, body, conn = await fetch(p, app.port)
        assert body == b"hello" and app.connections == 1
        conn.finish(True)
        p.close()


async def test_upstream_body_until_close() -> None:
    """A response without Content-Length or chunking is delimited by the end of the connection."""
    async with FakeApp([b"HTTP/1.0 200 OK\r\n\r\nall of it"], close_after=True) as app:
        p = pool()
        _, body, conn = await fetch(p, app.port)
        assert body == b"all of it"
        conn.finish(True)
        p.close()


async def test_upstream_chunked_response_is_decoded() -> None:
    """A chunked response body arrives de-chunked and complete."""
    async with FakeApp([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"]) as app:
        p = pool()
        head, body, conn = await fetch(p, app.port)
        assert body == b"abcde" and head.content_length is None
        conn.finish(True)
        p.close()


async def test_upstream_read_timeout() -> None:
    """An app that sends nothing within the read timeout raises ReadTimeout."""
    async with FakeApp([OK5], delay=2.0) as app:
        p = pool(read_timeout=0.2)
        with pytest.raises(upstream.ReadTimeout):
            await fetch(p, app.port)
        p.close()


async def test_upstream_read_timeout_is_per_wait_not_per_response() -> None:
    """A body that keeps trickling (each gap shorter than the read timeout) is read in full,
    however long it takes in all."""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
        for part in (b"ab", b"cd", b"ef"):
            await asyncio.sleep(0.15)
            writer.write(part)
            await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    p = pool(read_timeout=0.25)
    try:
        head, body, conn = await fetch(p, port)  # 0.45 s in all
        assert (head.status, body) == (200, b"abcdef")
        conn.finish(True)
    finally:
        p.close()
        server.close()
        await server.wait_closed()


async def test_upstream_read_timeout_on_a_reused_connection() -> None:
    """A pooled connection that sat idle past the read timeout still times out a later slow answer,
    and still serves a prompt one."""
    async with FakeApp([OK5, OK5, OK5]) as app:
        p = pool(read_timeout=0.2)
        _, body, conn = await fetch(p, app.port)
        conn.finish(True)
        await asyncio.sleep(0.3)  # idle past the timeout: nothing fails meanwhile
        _, body, conn = await fetch(p, app.port)
        assert body == b"hello" and conn.reused and app.connections == 1
        conn.finish(True)
        app.delay = 1.0
        with pytest.raises(upstream.ReadTimeout):
            await fetch(p, app.port)
        p.close()


async def test_upstream_connect_refused() -> None:
    """A port nobody listens on raises ConnectError."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    p = pool()
    with pytest.raises(upstream.ConnectError):
        await p.acquire("127.0.0.1", port)
    p.close()


async def test_upstream_unsolicited_bytes_poison_the_connection() -> None:
    """Bytes after a complete response (a second answer) mean the connection is never reused."""
    async with FakeApp([OK5 + OK5, OK5]) as app:
        p = pool()
        _, body, conn = await fetch(p, app.port)
        assert body == b"hello"
        conn.finish(True)
        _, body, conn = await fetch(p, app.port)
        assert body == b"hello" and app.connections == 2
        conn.finish(True)
        p.close()


async def test_upstream_backpressure_pauses_reading() -> None:
    """A consumer that does not read keeps at most about HIGH_WATER bytes buffered, then gets everything."""
    size = 16 << 20
    async with FakeApp([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size]) as app:
        p = pool()
        conn = await p.acquire("127.0.0.1", app.port)
        conn.start(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n", no_body=False)
        await conn.response()
        await asyncio.sleep(0.3)
        assert conn._buffered < upstream.HIGH_WATER + (1 << 20)
        total = 0
        while chunk := await conn.read():
            total += len(chunk)
        assert total == size
        conn.finish(True)
        p.close()


async def _body(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


@pytest.mark.parametrize("chunked", [True, False])
async def test_upstream_request_body_is_streamed(chunked: bool) -> None:
    """The request body reaches the app chunk-encoded or as-is after its Content-Length head."""
    async with FakeApp([OK5]) as app:
        p = pool()
        conn = await p.acquire("127.0.0.1", app.port)
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: 8"
        conn.start(b"POST / HTTP/1.1\r\nHost: app\r\n" + framing + b"\r\n\r\n", no_body=False)
        task = asyncio.create_task(conn.send_body(_body(b"abc", b"defgh"), chunked=chunked))
        await conn.response()
        while await conn.read():
            pass
        await task
        conn.finish(True)
        expected = b"3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n" if chunked else b"abcdefgh"
        assert app.requests[0].endswith(b"\r\n\r\n" + expected)
        p.close()


async def test_upstream_socket_factory_is_used() -> None:
    """Outgoing connections are made from the socket_factory's sockets (the enforcer's mark)."""
    made: list[socket.socket] = []

    def factory(info: tuple[int, int, int, str, tuple[str, int]]) -> socket.socket:
        sock = socket.socket(info[0], info[1], info[2])
        made.append(sock)
        return sock

    async with FakeApp([OK5]) as app:
        p = upstream.Pool(connect_timeout=2.0, read_timeout=5.0, socket_factory=factory)
        _, body, conn = await fetch(p, app.port)
        assert body == b"hello" and len(made) == 1
        conn.finish(True)
        p.close()


def test_serialise_head_refuses_line_breaks_in_values() -> None:
    """A CR or LF inside a header value never reaches the app as a second header line."""
    ok = headers_mod.serialise_head("GET", "/x", CIMultiDict([("Host", "app"), ("A", "b")]))
    assert ok == b"GET /x HTTP/1.1\r\nHost: app\r\nA: b\r\n\r\n"
    with pytest.raises(errors.UpstreamError):
        headers_mod.serialise_head("GET", "/x", CIMultiDict([("Host", "app"), ("A", "b\r\nX-Forwarded-User: root")]))


@given(st.lists(st.tuples(_TOKEN, st.text(alphabet=string.printable + "\u00e9\u2028", max_size=20)), max_size=6))
def test_serialise_head_is_the_header_block_or_refused(pairs: list[tuple[str, str]]) -> None:
    """Request line, one "name: value" line per header in order, blank line; a CR or LF anywhere refuses."""
    headers: CIMultiDict[str] = CIMultiDict(pairs)
    expected = "GET /x HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in pairs) + "\r\n"
    if any(c in v for _, v in pairs for c in "\r\n"):
        with pytest.raises(errors.UpstreamError):
            headers_mod.serialise_head("GET", "/x", headers)
    else:
        assert headers_mod.serialise_head("GET", "/x", headers) == expected.encode()
    with pytest.raises(errors.UpstreamError):
        headers_mod.serialise_head("GET", "/x\r\nX-Evil: 1", headers)


async def test_upstream_stale_pooled_connection_is_retried_once() -> None:
    """A pooled connection the app closed while idle is not handed out again; a new one serves the request."""
    async with FakeApp([OK5], close_after=True) as app:
        app.answers = [OK5]
        up = proxy.Upstream(connect_timeout=2.0, read_timeout=5.0)
        transfer = proxy.Transfer()
        conn, _, _ = await up._exchange(None, "127.0.0.1", app.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",  # type: ignore[arg-type]
                                        no_body=False, has_body=False, chunked=False, transfer=transfer)
        assert await conn.read() == b"hello"
        conn._reusable = True
        conn._complete = True
        conn.finish(True)  # pooled, but the app closes it right after answering
        await asyncio.sleep(0.1)
        app.answers = [OK5]
        conn, head, _ = await up._exchange(None, "127.0.0.1", app.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",  # type: ignore[arg-type]
                                           no_body=False, has_body=False, chunked=False, transfer=transfer)
        assert head.status == 200 and app.connections == 2
        conn.finish(False)
        await up.close()


def test_response_headers_from_the_parsers_raw_list_match_the_multidict_path() -> None:
    """forward() hands the parser's raw list straight in (built once, into the response)."""
    pairs = [("Content-Type", "text/plain"), ("connection", "keep-alive, X-Drop"), ("X-Drop", "1"),
             ("Location", "http://127.0.0.1:8081/next"), ("Set-Cookie", "__Host-enforcer-app=evil"),
             ("Set-Cookie", "app=1"), ("Content-Length", "5"), ("Keep-Alive", "timeout=5"), ("x-b", "2")]
    via_dict = back(*pairs)
    into: CIMultiDict[str] = CIMultiDict()
    via_list = headers_mod.response_headers(list(pairs), public_origin=PUBLIC, internal_origins=INTERNAL, into=into)
    assert via_list is into
    assert list(via_list.items()) == list(via_dict.items())
    assert list(via_list.items()) == [("Content-Type", "text/plain"), ("Location", PUBLIC + "/next"),
                                      ("Set-Cookie", "app=1"), ("x-b", "2")]


def test_request_headers_drop_set_is_unchanged() -> None:
    """The merged drop set equals the rules one by one (hop-by-hop, spoofable, Host, Cookie)."""
    names = [*sorted(headers_mod.HOP_BY_HOP | headers_mod.SPOOFABLE), "Host", "Cookie", "X-Forwarded-Foo",
             "X-Auth-Request-User", "X-User", "accept", "x-ok"]
    out = forward(*[(n, "v") for n in names], identity={"X-Ok": "me"})
    added = {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-ok"}
    assert {k.lower() for k in out if k.lower() not in added} == {"accept"}
    assert out.getall("X-Ok") == ["me"] and out.getall("Host") == ["app.test:8443"]


# ---------------------------------------------------------------- Upstream.forward, end to end over TCP


class StagedApp(LoopbackApp):
    """An app that answers every request head with ``head``, then (once ``release`` is set) ``body``."""

    def __init__(self, head: bytes, body: bytes = b"") -> None:
        self.head, self.body = head, body
        self.release = asyncio.Event()

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await super().__aexit__(*exc)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(self.head)
                await writer.drain()
                await self.release.wait()
                writer.write(self.body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class Relay:
    """An aiohttp low-level server on 127.0.0.1 that forwards every request with Upstream.forward;
    counts the transport writes of each response."""

    def __init__(self, app_port: int) -> None:
        self.app_port = app_port
        self.up = proxy.Upstream(connect_timeout=2.0, read_timeout=5.0)
        self.writes: list[int] = []
        self.port = 0

    async def handler(self, request: web.BaseRequest) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        count = len(self.writes)
        self.writes.append(0)
        plain_write = type(transport).write

        def counting(data: bytes | bytearray | memoryview) -> None:
            self.writes[count] += 1
            plain_write(transport, data)

        transport.write = counting  # type: ignore[method-assign]
        try:
            headers = headers_mod.request_headers(request.headers, identity={}, client_ip="127.0.0.1", host="app.test")
            return await self.up.forward(
                request, upstream_host="127.0.0.1", port=self.app_port, target=request.raw_path,
                headers=headers, public_origin=PUBLIC, transfer=proxy.Transfer(),
            )
        finally:
            del transport.write

    async def __aenter__(self) -> Relay:
        self.server = web.Server(self.handler)
        self.listener = await asyncio.get_running_loop().create_server(self.server, "127.0.0.1", 0)
        self.port = self.listener.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.listener.close()
        await self.server.shutdown(1.0)
        await self.up.close()


async def _read_head(reader: asyncio.StreamReader, timeout: float = 2.0) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)


async def _nothing_more(reader: asyncio.StreamReader, wait: float = 0.3) -> bool:
    try:
        await asyncio.wait_for(reader.read(1), wait)
    except TimeoutError:
        return True
    return False


@pytest.mark.parametrize(
    ("head", "body", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"hello", b"hello"),
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
         b"5\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    ],
    ids=["content-length", "chunked-stream"],
)
async def test_forward_sends_the_head_before_a_late_body(head: bytes, body: bytes, expected: bytes) -> None:
    """A streaming / long-poll answer: the client gets the app's head at once, not with the first body byte."""
    async with StagedApp(head, body) as app, Relay(app.port) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: app.test\r\n\r\n")
        got = await _read_head(reader)  # while the app still holds its body back
        assert got.startswith(b"HTTP/1.1 200 OK\r\n")
        assert await _nothing_more(reader)
        app.release.set()
        assert await asyncio.wait_for(reader.readexactly(len(expected)), 2.0) == expected
        writer.close()


async def test_forward_sends_a_small_answer_in_one_write() -> None:
    """Head and body of a small answer go to the client in one write, and the connection stays usable."""
    async with StagedApp(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello") as app, Relay(app.port) as relay:
        app.release.set()
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        for _ in range(2):
            writer.write(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            head = await _read_head(reader)
            assert b"\r\nContent-Length: 5\r\n" in head
            assert await asyncio.wait_for(reader.readexactly(5), 2.0) == b"hello"
        assert relay.writes == [1, 1]
        writer.close()


async def test_forward_chunked_answer_ends_in_the_same_write() -> None:
    """An app answer without a length, complete at once: head, chunk and last-chunk in one write."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    async with StagedApp(answer) as app, Relay(app.port) as relay:
        app.release.set()
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        head = await _read_head(reader)
        assert b"\r\nTransfer-Encoding: chunked\r\n" in head
        assert await asyncio.wait_for(reader.readexactly(15), 2.0) == b"5\r\nhello\r\n0\r\n\r\n"
        assert relay.writes == [1]
        writer.close()


@pytest.mark.parametrize(
    ("method", "answer", "length"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"5"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n", None),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n", None),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"0"),
    ],
    ids=["head", "204", "304", "empty"],
)
async def test_forward_bodiless_answers_are_sent_at_once(method: str, answer: bytes, length: bytes | None) -> None:
    """HEAD, 204, 304 and an empty body: the head goes out at once, in one write, with nothing after it."""
    async with StagedApp(answer) as app, Relay(app.port) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(f"{method} / HTTP/1.1\r\nHost: app.test\r\n\r\n".encode())
        head = await _read_head(reader)  # the app's "body" stays held back: none is due
        assert (b"\r\nContent-Length: " + length + b"\r\n" in head) if length else b"Content-Length" not in head
        assert b"Transfer-Encoding" not in head
        assert await _nothing_more(reader)
        assert relay.writes == [1]
        writer.close()


# ------------------------------------------------------------------ relay_head (the fast path's response head)


def _relay(status: int, headers: list[tuple[str, str]], *, method: str = "GET", keep_alive: bool = True,
           length: int | None = None, reason: str = "") -> tuple[str, bool, bool]:
    head = upstream.Head(status, reason, headers, length)
    raw, chunked, no_body = headers_mod.relay_head(
        head, method=method, public_origin="https://app.test", upstream_host="10.0.0.5", port=8080,
        keep_alive=keep_alive,
    )
    return raw.decode(), chunked, no_body


def test_relay_head_frames_by_length_or_chunked_and_adds_defaults() -> None:
    """A length-framed answer keeps its length, an unframed one is chunked; Server, Date and
    Content-Type defaults are added and hop-by-hop headers dropped."""
    raw, chunked, no_body = _relay(200, [("Content-Length", "5"), ("Connection", "keep-alive")], length=5)
    assert raw.startswith("HTTP/1.1 200 OK\r\n") and raw.endswith("\r\n\r\n")
    assert "Content-Length: 5\r\n" in raw and "Server: enforcer\r\n" in raw and "Date: " in raw
    assert "Content-Type: application/octet-stream" in raw and "Connection" not in raw
    assert (chunked, no_body) == (False, False)
    raw, chunked, _ = _relay(200, [("Content-Type", "text/plain")])
    assert "Transfer-Encoding: chunked\r\n" in raw and chunked


@pytest.mark.parametrize(("status", "method", "length", "framing", "no_body"), [
    (200, "GET", 5, ("5", None), False),
    (200, "GET", None, (None, "chunked"), False),
    (200, "HEAD", 1234, ("1234", None), True),  # the length the GET would have
    (204, "GET", 0, (None, None), True),
    (304, "GET", 10, (None, None), True),
])
def test_response_head_is_the_one_framing_decision_of_both_paths(
    status: int, method: str, length: int | None, framing: tuple[str | None, str | None], no_body: bool
) -> None:
    """response_head decides Content-Length or chunked (or neither) once; the lean head and aiohttp's both follow it."""
    app = [("Content-Length", str(length))] if length is not None else []
    answer = headers_mod.response_head(
        upstream.Head(status, "", app, length), method=method, public_origin="https://app.test",
        upstream_host="10.0.0.5", port=8080,
    )
    assert (answer.fields.get("Content-Length"), answer.fields.get("Transfer-Encoding")) == framing
    assert (answer.no_body, answer.chunked) == (no_body, framing[1] == "chunked")
    assert answer.fields["Server"] == "enforcer" and answer.reason


@pytest.mark.parametrize(("reason", "headers"), [
    ("OK\r\nX-Evil: 1", [("Content-Length", "0")]),
    ("OK", [("X-App", "a\x01b"), ("Content-Length", "0")]),
])
def test_response_head_refuses_control_characters_from_the_app(reason: str, headers: list[tuple[str, str]]) -> None:
    """A status line or header value with a control character is the app's protocol error, on both paths."""
    with pytest.raises(errors.UpstreamError) as caught:
        headers_mod.response_head(upstream.Head(200, reason, headers, 0), method="GET", public_origin="https://a.test",
                                  upstream_host="10.0.0.5", port=8080)
    assert caught.value.reason is errors.Reason.UPSTREAM_PROTOCOL


def test_relay_head_for_head_204_and_304_has_no_body_framing() -> None:
    """HEAD keeps the app's length; 204 and 304 carry neither length nor chunked."""
    raw, _, no_body = _relay(200, [("Content-Length", "1234")], method="HEAD", length=1234)
    assert no_body and "Content-Length: 1234\r\n" in raw
    for status in (204, 304):
        raw, chunked, no_body = _relay(status, [("Content-Length", "0")], length=0)
        assert no_body and not chunked and "Content-Length" not in raw and "Transfer-Encoding" not in raw


def test_relay_head_is_remembered_but_its_own_date_is_fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """A repeated answer reuses the built head; the Date we add follows the clock."""
    monkeypatch.setattr(headers_mod, "http_date", lambda: "Mon, 01 Jan 2024 00:00:00 GMT")
    first, _, _ = _relay(200, [("Content-Length", "2"), ("X-Same", "1")], length=2)
    monkeypatch.setattr(headers_mod, "http_date", lambda: "Tue, 02 Jan 2024 00:00:00 GMT")
    second, _, _ = _relay(200, [("Content-Length", "2"), ("X-Same", "1")], length=2)
    assert "2024 00:00:00" in first and first.replace("Mon, 01", "Tue, 02") == second
    own, _, _ = _relay(200, [("Content-Length", "2"), ("Date", "Sun, 07 Jan 2024 00:00:00 GMT")], length=2)
    assert own.count("Date: ") == 1 and "Sun, 07 Jan 2024" in own


def test_relay_head_rewrites_internal_locations_and_closes_when_asked() -> None:
    """An app redirect to its internal address points at the public origin; keep_alive=False says close."""
    raw, _, _ = _relay(302, [("Location", "http://10.0.0.5:8080/next"), ("Content-Length", "0")], length=0,
                       keep_alive=False)
    assert "Location: https://app.test/next\r\n" in raw and "Connection: close\r\n" in raw


def test_relay_head_refuses_control_characters_from_the_app() -> None:
    """A control character in the app's reason phrase or a header value is a protocol error (502)."""
    with pytest.raises(errors.UpstreamError) as err:
        _relay(200, [("X-Bad", "a\x01b")], length=None)
    assert err.value.status == 502
    with pytest.raises(errors.UpstreamError):
        _relay(200, [], reason="OK\x7f")


_names = st.sampled_from([
    "Accept", "accept", "Cookie", "cookie", "Connection", "connection", "X-A", "x-a", "Keep-Alive", "TE",
    "X-Forwarded-For", "x-forwarded-user", "X-Remote-User", "Forwarded", "X-Auth-Request-Email", "Host",
    "X-User", "x-user", "User-Agent", "Proxy-Authorization", "Upgrade", "Trailer", "X-Enforcer-Flow",
])
_values = st.sampled_from([
    "1", "a, X-A", "close", "X-User, keep-alive", "__Host-enforcer-app=h; app=1", "app=1;  other=2", "=bad; ok=1",
    "x; __Host-enforcertx-1=2", "", "v\tw", "caf\u00e9", "a\rb",
])


@settings(max_examples=300)
@given(pairs=st.lists(st.tuples(_names, _values), max_size=8),
       identity=st.sampled_from([{}, {"X-User": "bob"}, {"X-Forwarded-User": "bob", "X-Forwarded-Email": "b@x"}]))
def test_request_head_from_pairs_equals_the_multidict_route(pairs: list[tuple[str, str]], identity: dict[str, str]) -> None:
    """The fast path's one-pass request head is byte for byte the gate's request_headers +
    serialise_head (or both refuse a value with CR/LF)."""
    def full() -> bytes:
        headers = headers_mod.request_headers(
            CIMultiDictProxy(CIMultiDict(pairs)), identity=identity, client_ip="10.1.2.3", host="app.test"
        )
        return headers_mod.serialise_head("GET", "/p?q=1", headers)

    def lean() -> bytes:
        return headers_mod.request_head("GET", "/p?q=1", pairs, identity=identity, client_ip="10.1.2.3", host="app.test")

    try:
        expected = full()
    except errors.UpstreamError:
        with pytest.raises(errors.UpstreamError):
            lean()
        return
    assert lean() == expected


def test_relay_head_for_head_without_the_apps_length_sends_none() -> None:
    """A HEAD answer the app sent without Content-Length gets no length (and no chunked) from us either."""
    raw, chunked, no_body = _relay(200, [("Content-Type", "text/html"), ("X-A", "1")], method="HEAD")
    assert no_body and not chunked
    assert "Content-Length" not in raw and "Transfer-Encoding" not in raw and "X-A: 1\r\n" in raw


def test_relay_head_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the remembered heads reach their bound they are forgotten and rebuilt, and answers stay right."""
    monkeypatch.setattr(headers_mod, "_RELAY_HEADS", {})
    monkeypatch.setattr(headers_mod, "_RELAY_HEADS_MAX", 2)
    for n in range(5):
        raw, _, _ = _relay(200, [("Content-Length", "1"), ("X-N", str(n))], length=1)
        assert f"X-N: {n}\r\n" in raw
        assert 1 <= len(headers_mod._RELAY_HEADS) <= 2
