"""The lean HTTP/1.1 path (enforcer/fastpath.py) against the real stack.

Oracle: the full path.  Every request is sent twice -- once on a fresh connection, where the
lean path may take it, and once on a connection already handed to aiohttp (a first request
with a header name the lean path never takes) -- and both answers, what the app saw and the
flow records must be the same.  The fast-path counters in /metrics say which path answered.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import weakref
from typing import Any

import aiohttp
import httptools
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enforcer.http.fastpath import Connection, FastPath
from tests.harness.e2e_stack import HOST, Seen, Stack
from tests.harness.raw import Raw, Reply, request
from tests.harness.refcount import cycle_collector_off

pytestmark = pytest.mark.e2e

HANDOFF = "X.Handoff: 1"  # a token character the lean path does not take: the connection goes to aiohttp
_VOLATILE_HEADERS = {"date"}
_FLOW_ID = re.compile(rb"[0-9a-f]{16}")


@pytest_asyncio.fixture(scope="module")
async def cookie(stack: Stack) -> str:
    """A session cookie header for bob (groups=staff)."""
    async with stack.browser() as b:
        page = await stack.login(b, "bob", "/")
        assert page.status == 200, page.text[:300]
        return str(b.cookies.header_for(stack.base + "/", same_site=True, method="GET"))


async def counters(stack: Stack) -> tuple[float, float]:
    """(requests served on the lean path, connections handed off) from /metrics."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{stack.admin_port}/metrics") as r:
        text = await r.text()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("enforcer_fast_path_requests_total", "enforcer_fast_path_handoffs_total"):
            values[name] = float(value)
    return values["enforcer_fast_path_requests_total"], values["enforcer_fast_path_handoffs_total"]


_RANDOM = re.compile(r"(state|nonce|code_challenge)=[^&;\s]+|__Host-enforcertx-[0-9a-f]+=[^;]+")


def shape(reply: Reply | None) -> tuple[Any, ...] | None:
    """What must be equal between the two paths: status, headers but Date, body (flow ids and a
    login's random state, nonce, PKCE challenge and transaction cookie masked)."""
    if reply is None:
        return None
    headers = [
        (k.lower(), "<flow>" if k.lower() == "x-enforcer-flow" else _RANDOM.sub("<random>", v))
        for k, v in reply.headers if k.lower() not in _VOLATILE_HEADERS
    ]
    return reply.status, sorted(headers), _FLOW_ID.sub(b"<flow>", reply.body)


async def send(stack: Stack, payload: bytes, *, handed_off: bool, head: bool = False) -> tuple[Reply | None, list[Seen]]:
    """``payload`` on a new connection (first handed to aiohttp if ``handed_off``): reply, app's view."""
    conn = await Raw.open(stack)
    try:
        if handed_off:
            await conn.send(request("GET /public/warm HTTP/1.1", HANDOFF))
            warm = await conn.reply()
            assert warm is not None and warm.status == 200
        before = len(stack.upstream.seen)
        await conn.send(payload)
        try:
            reply = await conn.reply(head=head, timeout=5.0)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            reply = None  # the connection was cut inside a body (a truncated answer)
        return reply, stack.upstream.seen[before:]
    finally:
        await conn.close()


async def both(stack: Stack, payload: bytes, *, head: bool = False) -> tuple[Reply | None, bool]:
    """Send on both paths; assert the same answer and the same request at the app; (reply, taken fast)."""
    served0, _ = await counters(stack)
    fast, fast_seen = await send(stack, payload, handed_off=False, head=head)
    served1, _ = await counters(stack)
    full, full_seen = await send(stack, payload, handed_off=True, head=head)
    fast_view = [(s.method, s.target, s.headers) for s in fast_seen]
    full_view = [(s.method, s.target, s.headers) for s in full_seen]
    if shape(fast) != shape(full) or fast_view != full_view:
        print("payload:", payload, "\nlean:", shape(fast), fast_view, "\nfull:", shape(full), full_view)
    assert shape(fast) == shape(full)
    assert fast_view == full_view
    return fast, served1 > served0


# ------------------------------------------------------------------ which path answers


async def test_allowed_get_with_a_cached_session_is_answered_on_the_lean_path(stack: Stack, cookie: str) -> None:
    """An allowed GET with a cached session is served fast and the app sees the user's identity."""
    served, handed = await counters(stack)
    reply, seen = await send(stack, request("GET /shape?x=1 HTTP/1.1", f"Cookie: {cookie}"), handed_off=False)
    assert reply is not None and reply.status == 200 and reply.body == b"shaped body"
    assert seen[0].header("X-Forwarded-User") == ["bob"]
    assert await counters(stack) == (served + 1, handed)


async def test_a_keep_alive_connection_stays_on_the_lean_path(stack: Stack, cookie: str) -> None:
    """Twenty requests on one connection, some pipelined in one write, are all served fast, in order."""
    served, handed = await counters(stack)
    conn = await Raw.open(stack)
    try:
        for i in range(10):
            await conn.send(request(f"GET /shape?body=one-{i} HTTP/1.1", f"Cookie: {cookie}"))
            reply = await conn.reply()
            assert reply is not None and reply.body == f"one-{i}".encode()
        await conn.send(b"".join(request(f"GET /shape?body=pipe-{i} HTTP/1.1", f"Cookie: {cookie}") for i in range(10)))
        for i in range(10):
            reply = await conn.reply()
            assert reply is not None and reply.body == f"pipe-{i}".encode()
    finally:
        await conn.close()
    assert await counters(stack) == (served + 20, handed)


async def test_a_connection_served_fast_can_be_handed_over_mid_stream(stack: Stack, cookie: str) -> None:
    """Pipelined on one connection: a fast GET, a POST with a body (hands over), then GETs: all
    answered in order with their own bodies, the POST body reaches the app intact."""
    served, handed = await counters(stack)
    before = len(stack.upstream.seen)
    conn = await Raw.open(stack)
    try:
        await conn.send(
            request("GET /shape?body=first HTTP/1.1", f"Cookie: {cookie}")
            + request("POST /upload HTTP/1.1", f"Cookie: {cookie}", "Content-Length: 11", body=b"hello world")
            + request("GET /shape?body=third HTTP/1.1", f"Cookie: {cookie}")
        )
        first, second, third = [await conn.reply() for _ in range(3)]
        assert first is not None and first.body == b"first"
        assert second is not None and json.loads(second.body)["bytes"] == 11
        assert third is not None and third.body == b"third"
        await conn.send(request("GET /shape?body=fourth HTTP/1.1", f"Cookie: {cookie}"))
        fourth = await conn.reply()
        assert fourth is not None and fourth.body == b"fourth"
    finally:
        await conn.close()
    assert [s.method for s in stack.upstream.seen[before:]] == ["GET", "POST", "GET", "GET"]
    assert await counters(stack) == (served + 1, handed + 1)


async def test_a_client_that_leaves_mid_answer_is_recorded_as_aborted(stack: Stack, cookie: str) -> None:
    """A client closing while a large answer streams: the flow record says client_aborted (499)."""
    conn = await Raw.open(stack)
    await conn.send(request("GET /big?size=50000000 HTTP/1.1", f"Cookie: {cookie}", "User-Agent: leaver/1"))
    await conn.reader.readexactly(4096)
    conn.writer.transport.abort()
    flow = await stack.wait_flow(lambda f: f.get("user_agent") == "leaver/1", timeout=15.0)
    assert flow["status"] == 499 and flow["reason"] == "client_aborted" and flow["decision"] == "allow"


@pytest.mark.parametrize(
    ("why", "payload"),
    [
        ("a POST", request("POST /public/p HTTP/1.1", "Content-Length: 2", body=b"hi")),
        ("HTTP/1.0", request("GET /public/p HTTP/1.0")),
        ("a Content-Length on a GET", request("GET /public/p HTTP/1.1", "Content-Length: 0")),
        ("an Expect", request("GET /public/p HTTP/1.1", "Expect: 100-continue")),
        ("an Upgrade", request("GET /public/p HTTP/1.1", "Upgrade: h2c", "Connection: Upgrade")),
        ("an underscore header", request("GET /public/p HTTP/1.1", "X_Forwarded_User: admin")),
        ("a blank before the colon", request("GET /public/p HTTP/1.1", "X-A : 1")),
        ("obsolete line folding", request("GET /public/p HTTP/1.1", "X-A: 1", " folded")),
        ("a bare LF", b"GET /public/p HTTP/1.1\nHost: " + HOST.encode() + b"\r\n\r\n"),
        ("a trailing blank in a value", request("GET /public/p HTTP/1.1", "X-A: 1 ")),
        ("a non-ASCII target", request("GET /public/\xe9 HTTP/1.1")),
        ("a fragment", request("GET /public/p#frag HTTP/1.1")),
        ("two Host headers", request("GET /public/p HTTP/1.1", f"Host: {HOST}")),
        ("two User-Agent headers", request("GET /public/p HTTP/1.1", "User-Agent: a", "User-Agent: b")),
        ("no Host", request("GET /public/p HTTP/1.1", host=None)),
        ("an unknown Host", request("GET /public/p HTTP/1.1", host="other.example")),
        ("an absolute-form target", request(f"GET https://{HOST}/public/p HTTP/1.1")),
        ("a dot segment", request("GET /public/../secret HTTP/1.1")),
        ("an encoded slash", request("GET /public/a%2fb HTTP/1.1")),
        ("no session on a protected path", request("GET /shape HTTP/1.1", "Accept: application/json")),
        ("the logout endpoint", request("GET /oauth2/logout HTTP/1.1")),
        ("the callback endpoint", request("GET /oauth2/callback?state=x&code=y HTTP/1.1")),
        ("a TRACE", request("TRACE /public/p HTTP/1.1")),
        ("a lower-case method", request("get /public/p HTTP/1.1")),
    ],
)
async def test_anything_else_is_handed_to_the_full_path_unchanged(stack: Stack, why: str, payload: bytes) -> None:
    """A request outside the lean path's subset is answered by the full path exactly as before."""
    _, handed = await counters(stack)
    reply, fast = await both(stack, payload)
    assert not fast, why
    assert reply is not None, why
    _, handed_after = await counters(stack)
    assert handed_after >= handed + 2, why  # (both connections were handed over)


async def test_a_denied_request_is_handed_over_and_gets_the_403_page(stack: Stack, cookie: str) -> None:
    """bob may not see /admin: the full path answers the 403 with its reason, the app sees nothing."""
    reply, fast = await both(stack, request("GET /admin/x HTTP/1.1", f"Cookie: {cookie}"))
    assert not fast and reply is not None and reply.status == 403 and b"missing_tags" in reply.body


async def test_a_revoked_session_is_not_served_from_the_lean_path(stack: Stack) -> None:
    """After logout the cookie no longer passes on the lean path: the login redirect comes instead."""
    async with stack.browser() as b:
        page = await stack.login(b, "bob", "/")
        assert page.status == 200
        own = b.cookies.header_for(stack.base + "/", same_site=True, method="GET")
        reply, seen = await send(stack, request("GET /shape HTTP/1.1", f"Cookie: {own}"), handed_off=False)
        assert reply is not None and reply.status == 200
        out = await b.get(stack.base + "/oauth2/logout")
        assert out.status in (200, 302, 303)
    served, _ = await counters(stack)
    reply, seen = await send(stack, request("GET /shape HTTP/1.1", f"Cookie: {own}", "Accept: application/json"),
                             handed_off=False)
    assert reply is not None and reply.status == 401 and seen == []
    assert (await counters(stack))[0] == served


# ------------------------------------------------------------------ same answers


@pytest.mark.parametrize(
    "target",
    [
        "/shape",
        "/shape?chunked=1&body=a+streamed+body",
        "/shape?status=204",
        "/shape?status=304",
        "/shape?status=404&body=missing",
        "/shape?status=500&body=boom",
        "/shape?body=",
        "/shape?ctype=text/plain;charset=utf-8&date=1",
        "/shape?reason=Quite+Fine",
        "/shape?status=302&location=/elsewhere%3Fa=1",
        "/shape?delay=0.2&chunked=1",
        "/redirect-internal",
        "/set-cookie",
        "/big?size=300000",
        "/bad-framing",
        "/dup-length",
        "/truncated",
        "/public/%7Euser/a%20b?q=%2F&r=1",
        "/public//double//slashes",
    ],
)
@pytest.mark.parametrize("connection", [None, "close", "keep-alive", "Close, X-A"])
async def test_the_lean_path_answers_exactly_like_the_full_path(
    stack: Stack, cookie: str, target: str, connection: str | None
) -> None:
    """Status, headers (but Date), body and the request the app received are the same on both paths."""
    extra = [f"Connection: {connection}"] if connection else []
    reply, fast = await both(stack, request(f"GET {target} HTTP/1.1", f"Cookie: {cookie}", *extra))
    assert reply is not None or target == "/truncated"
    if target not in ("/public//double//slashes",):
        assert fast, target


@pytest.mark.parametrize("target", ["/shape", "/shape?status=204", "/big?size=1000", "/shape?chunked=1"])
async def test_head_answers_like_the_full_path(stack: Stack, cookie: str, target: str) -> None:
    """HEAD: the same head (with the app's Content-Length) and no body, on both paths."""
    reply, fast = await both(stack, request(f"HEAD {target} HTTP/1.1", f"Cookie: {cookie}"), head=True)
    assert fast and reply is not None and reply.body == b""


async def test_client_headers_are_cleaned_the_same_way(stack: Stack, cookie: str) -> None:
    """Spoofed identity and forwarding headers, Connection-named headers and our cookies never reach the app."""
    reply, fast = await both(stack, request(
        "GET /shape HTTP/1.1",
        f"Cookie: {cookie}; app=1",
        "Cookie: other=2",
        "X-Forwarded-User: admin",
        "X-Forwarded-For: 10.0.0.1",
        "X-Auth-Request-Email: boss@example.com",
        "Forwarded: for=1.2.3.4",
        "Connection: keep-alive, X-Secret",
        "X-Secret: hop",
        "Keep-Alive: timeout=5",
        "Remote-User: admin",
    ))
    assert fast and reply is not None and reply.status == 200
    seen = stack.upstream.seen[-1]
    assert seen.header("X-Forwarded-User") == ["bob"]
    assert seen.header("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.header("X-Secret") == [] and seen.header("Remote-User") == [] and seen.header("Forwarded") == []
    assert "__Host-enforcer" not in ";".join(seen.header("Cookie"))


async def test_connection_close_is_honoured(stack: Stack, cookie: str) -> None:
    """``Connection: close`` gets ``Connection: close`` back and the connection ends after the answer."""
    conn = await Raw.open(stack)
    try:
        await conn.send(request("GET /shape HTTP/1.1", f"Cookie: {cookie}", "Connection: close"))
        reply = await conn.reply()
        assert reply is not None and reply.status == 200 and reply.header("Connection") == ["close"]
        assert await conn.closed(3.0)
    finally:
        await conn.close()


async def test_flow_records_are_the_same_on_both_paths(stack: Stack, cookie: str) -> None:
    """One flow record per request, with the same fields whichever path answered it."""
    target = "/shape?body=flowcheck"
    records = []
    for handed_off in (False, True):
        reply, _ = await send(stack, request(f"GET {target} HTTP/1.1", f"Cookie: {cookie}", "User-Agent: ua/1"),
                              handed_off=handed_off)
        assert reply is not None and reply.status == 200
        known = {r["flow_id"] for r in records}
        records.append(await stack.wait_flow(
            lambda f, known=known: f.get("user_agent") == "ua/1" and f["flow_id"] not in known
        ))
    volatile = {"time", "flow_id", "start", "duration_ms", "upstream_ms", "client"}
    fast, full = ({k: v for k, v in r.items() if k not in volatile} for r in records)
    assert fast == full
    assert fast["decision"] == "allow" and fast["user"] and fast["status"] == 200 and fast["upstream_status"] == 200


async def test_stopping_lets_an_answer_in_flight_finish_and_records_it(stack: Stack, cookie: str) -> None:
    """SIGTERM during a slow answer on the lean path: the answer completes, its flow record is
    written, an idle keep-alive connection is closed, and the enforcer exits 0."""
    idle = await Raw.open(stack)
    busy = await Raw.open(stack)
    try:
        await idle.send(request("GET /shape?body=idle HTTP/1.1", f"Cookie: {cookie}"))
        assert (await idle.reply()) is not None
        await busy.send(request("GET /shape?delay=1.5&body=late HTTP/1.1", f"Cookie: {cookie}", "User-Agent: drain/1"))
        await asyncio.sleep(0.5)
        stopping = asyncio.create_task(stack.stop_enforcer())
        reply = await busy.reply(timeout=10.0)
        assert reply is not None and reply.status == 200 and reply.body == b"late"
        assert reply.header("Connection") == ["close"]
        assert await idle.closed(5.0)
        assert await stopping == 0
        records = [json.loads(line) for line in stack.flow_log.read_text().splitlines() if line.strip()]
        assert [r["status"] for r in records if r.get("user_agent") == "drain/1"] == [200]
    finally:
        await idle.close()
        await busy.close()
        if stack.process is None:
            stack.start_enforcer()
            await stack.wait_ready()


@pytest.mark.parametrize("handed_off", [False, True])
async def test_a_client_that_stops_reading_is_cut_off_after_the_write_timeout(
    stack: Stack, cookie: str, handed_off: bool
) -> None:
    """Slow read (X-LIM-08): a client that takes none of a large answer is disconnected after
    limits.writeTimeout on either path; the flow record says 499 client_aborted."""
    original = stack.config.read_text()
    stack.config.write_text(original + "limits: {writeTimeout: 2}\n")
    await stack.restart()
    agent = f"slowreader/{int(handed_off)}"
    try:
        conn = await Raw.open(stack)
        try:
            if handed_off:
                await conn.send(request("GET /public/warm HTTP/1.1", HANDOFF))
                assert (await conn.reply()) is not None
            conn.writer.transport.pause_reading()  # take nothing more: the TCP window closes
            await conn.send(request("GET /big?size=200000000 HTTP/1.1", f"Cookie: {cookie}", f"User-Agent: {agent}"))
            flow = await stack.wait_flow(lambda f: f.get("user_agent") == agent, timeout=20.0)
            assert flow["status"] == 499 and flow["reason"] == "client_aborted"
            assert flow["bytes_out"] < 50_000_000  # what the closed window let through, then bounded
        finally:
            conn.writer.transport.abort()
    finally:
        stack.config.write_text(original)
        await stack.restart()


async def test_a_slow_header_on_a_lean_connection_gets_408(stack: Stack) -> None:
    """A header block still incomplete after headerTimeout is answered 408 and closed (slowloris)."""
    original = stack.config.read_text()
    stack.config.write_text(original + "limits: {headerTimeout: 1, idleTimeout: 3}\n")
    await stack.restart()
    try:
        conn = await Raw.open(stack)
        try:
            await conn.send(b"GET /public/p HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n")
            reply = await conn.reply(timeout=5.0)
            assert reply is not None and reply.status == 408
            assert await conn.closed(3.0)
        finally:
            await conn.close()
        idle = await Raw.open(stack)  # keep-alive idle: closed silently after idleTimeout
        try:
            await idle.send(request("GET /public/p HTTP/1.1"))
            assert (await idle.reply()) is not None
            await asyncio.sleep(1.5)  # longer than headerTimeout, shorter than idleTimeout: still open
            await idle.send(request("GET /public/q HTTP/1.1"))
            assert (await idle.reply()) is not None
            assert await idle.closed(6.0)
        finally:
            await idle.close()
    finally:
        stack.config.write_text(original)
        await stack.restart()


# ------------------------------------------------------------------ generated requests

_methods = st.sampled_from(["GET", "GET", "GET", "HEAD", "POST", "OPTIONS", "get", "PUT"])
_versions = st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 "])
_targets = st.sampled_from([
    "/shape", "/public/a", "/public/a?b=c", "/admin/x", "/shape?chunked=1", "/public/%2e%2e/x", "/public/a%00b",
    "//public/a", "/public/a/./b", "/PUBLIC/a", "/public/;a", "*", "/oauth2/logou", "/public/\x7f", "/x y",
    "/public/a\tb", "/shape?status=304", "/set-cookie",
])
_fields = st.sampled_from([
    "Accept: */*", "User-Agent: hyp", "X-Forwarded-User: mallory", "Connection: close", "Connection: X-A",
    "X-A: b", "Transfer-Encoding: chunked", "Content-Length: 0", "Content-Length: 3", "X_A: 1", "X-A:", "X-A:  b",
    "Host: evil.example", "Cookie: a=b", "Cookie: __Host-enforcer-app=forged", "Expect: 100-continue",
    "Upgrade: websocket", "X-A: \x01", "Accept: application/json", "Sec-Fetch-Mode: navigate", "Te: trailers",
    "Content-Type: text/plain", "ETag: x", "Host: app.test", "user-agent: hyp2", "Max-Forwards: 3",
])


@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")  # (the stack's repr is large)
@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=_methods, target=_targets, version=_versions, fields=st.lists(_fields, max_size=4),
       with_cookie=st.booleans())
async def test_generated_requests_answer_the_same_on_both_paths(
    stack: Stack, cookie: str, method: str, target: str, version: str, fields: list[str], with_cookie: bool
) -> None:
    """For generated request heads, the lean path's answer and the app's view equal the full path's.
    (No logout target: it would end the shared session between the two sends.)"""
    lines = [*fields, *([f"Cookie: {cookie}"] if with_cookie else [])]
    body = b"abc" if "Content-Length: 3" in fields else b""
    await both(stack, request(f"{method} {target} {version}", *lines, body=body), head=method == "HEAD")
    await asyncio.sleep(0)  # (the stack's upstream runs in this loop)


def test_flow_id_mask_matches_flow_ids() -> None:
    """The mask used to compare error pages covers a flow id (16 hex characters)."""
    assert _FLOW_ID.sub(b"<flow>", json.dumps({"id": "0123456789abcdef"}).encode()) == b'{"id": "<flow>"}'


# ------------------------------------------------------------------ the head gate, in isolation

_pieces = st.sampled_from([
    b"GET", b"HEAD", b"POST", b"get", b" ", b"  ", b"/", b"/a", b"?q=1", b"#f", b"%2F", b"\x00", b"\x7f", b"\xe9",
    b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b"\n", b"\r", b"\t", b":", b"Host", b"host", b"Content-Length", b"0",
    b"Transfer-Encoding", b"chunked", b"Upgrade", b"Expect", b"X_A", b"X-A", b"Cookie", b"a=b", b",", b";",
])


class _Probe(Connection):
    """A Connection whose parsing is exercised without a transport."""

    def __init__(self) -> None:
        super().__init__(FastPath(_Gate(), _Server()), None)  # type: ignore[arg-type]
        self._parser = httptools.HttpRequestParser(self)  # (connection_made makes it)


@settings(max_examples=400, deadline=None)
@given(start=st.sampled_from([b"GET / HTTP/1.1\r\n", b"HEAD /a?b HTTP/1.1\r\n", b""]),
       middle=st.lists(_pieces, max_size=14), host=st.booleans())
def test_whatever_the_head_gate_admits_is_a_plain_bodiless_get_or_head(
    start: bytes, middle: list[bytes], host: bool
) -> None:
    """An admitted head is GET/HEAD in HTTP/1.1 with an origin-form ASCII target, exactly one
    Host, token-only header names, no body, upgrade or expectation field."""
    head = start + (b"Host: app.test\r\n" if host else b"") + b"".join(middle) + b"\r\n\r\n"
    parsed = _Probe()._parse(head)
    if parsed is None:
        return
    assert parsed.method in ("GET", "HEAD")
    target = parsed.target
    assert target.startswith("/") and target.isascii() and "#" not in target and " " not in target
    assert [v for k, v in parsed.pairs if k.lower() == "host"] == [parsed.host]
    for name, value in parsed.pairs:
        assert re.fullmatch(r"[A-Za-z0-9-]+", name), name
        assert name.lower() not in ("content-length", "transfer-encoding", "upgrade", "expect")
        assert all(0x20 <= ord(c) < 0x7F or c == "\t" for c in value) and value == value.rstrip(" \t")


@pytest.mark.parametrize(
    "head",
    [
        b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a \r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        b"GET / HTTP/1.1\r\ncontent-LENGTH: 0\r\n\r\n",
        b"GET / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n",
        b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nX\xe9: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: \xe9\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: x\r\nuser-agent: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Type: x\r\nContent-Type: x\r\n\r\n",
    ],
)
def test_the_head_gate_refuses_unusual_heads(head: bytes) -> None:
    """Leading CRLF, folding, bare LF/CR, trailing blanks, blank before ':', a body field,
    a fragment, absolute-form, HTTP/1.0, asterisk-form, non-ASCII, no Host, or a second
    Host, User-Agent or other singleton field all go to the full path."""
    assert _Probe()._parse(head) is None


def test_the_head_gate_admits_a_browser_get() -> None:
    """A typical browser GET is admitted with its fields as sent."""
    parsed = _Probe()._parse(
        b"GET /a/b?c=d HTTP/1.1\r\nHost: app.test\r\nUser-Agent: Mozilla/5.0 (X11)\r\nAccept: */*\r\n"
        b"Cookie: a=b; c=d\r\nConnection: keep-alive\r\n\r\n"
    )
    assert parsed is not None
    assert (parsed.method, parsed.target, parsed.keep_alive, parsed.host) == ("GET", "/a/b?c=d", True, "app.test")
    assert parsed.user_agent == "Mozilla/5.0 (X11)" and parsed.cookies == ["a=b; c=d"]
    assert ("Connection", "keep-alive") in parsed.pairs


# ------------------------------------------------------------------ fakes for the protocol alone


class _FullProtocol(asyncio.Protocol):
    """Stands in for aiohttp's protocol after a hand-over: records what it is given."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.received.append(data)


class _Server:
    """The listener's side of httpserver.Server that a fast connection uses."""

    header_timeout = idle_timeout = 5.0
    write_timeout = 0.0
    read_min_rate = 0.0
    read_grace = 10.0
    max_line_size = 8190
    max_headers = 100

    def __init__(self) -> None:
        self.fast_connections: set[Any] = set()

    def admit(self, ip: str | None) -> bool:
        return True

    def release(self, ip: str | None) -> None:
        pass

    def protocol(self, *, admitted: bool, info: Any = None) -> _FullProtocol:
        assert admitted
        return _FullProtocol()


class _Transport(asyncio.Transport):
    """A transport that only answers get_extra_info and remembers set_protocol."""

    protocol: Any = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name == "peername" else default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol


class _Counter:
    def inc(self) -> None:
        pass


class _Gate:
    """A gate whose plan always raises (a bug on the lean path)."""

    metrics = type("M", (), {"fast_requests": _Counter(), "fast_handoffs": _Counter()})()

    def plan(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")


@pytest.mark.parametrize("ended", [True, False], ids=["closed", "handshake-never-completed"])
def test_a_protocol_is_freed_without_the_cycle_collector(ended: bool) -> None:
    """Nothing keeps a fast protocol (and its transport's TLS buffers) alive once dropped: not
    after connection_lost, nor when its TLS handshake never completed (no connection_made, no
    connection_lost), so memory does not wait for a full GC pass."""
    loop = asyncio.new_event_loop()
    try:
        with cycle_collector_off():
            conn = Connection(FastPath(_Gate(), _Server()), loop)  # type: ignore[arg-type]
            if ended:
                conn.connection_made(_Transport())
                conn.data_received(b"GET /partial HTTP/1.1\r\n")
                conn.connection_lost(None)
            ref = weakref.ref(conn)
            del conn
            assert ref() is None
    finally:
        loop.close()


def test_a_fault_while_analysing_a_head_hands_the_request_over_intact() -> None:
    """If deciding on the lean path raises, the connection and every byte of the request go to
    the full path (which answers and records it) instead of being lost."""
    loop = asyncio.new_event_loop()
    try:
        transport = _Transport()
        conn = Connection(FastPath(_Gate(), _Server()), loop)  # type: ignore[arg-type]
        conn.connection_made(transport)
        head = b"GET /x HTTP/1.1\r\nHost: app.test\r\n\r\nGET /y HTTP/1.1\r\n"
        conn.data_received(head)
        assert isinstance(transport.protocol, _FullProtocol)
        assert transport.protocol.received == [head]
    finally:
        loop.close()
