"""The bypasses published in 2026 for peer products (advisories.md §3.9, issue 19 item 5) as tests.

Each advisory is one of: a row of :data:`ROWS` (exact request bytes over real TLS to the real
stack, judged by the answer and by what the recording upstream saw), a test of its own below
(failed callbacks with marker credentials, fragmented ClientHellos, session resumption under
another SNI, literal tag matching), a test elsewhere in the suite that already sends the
advisory's input (:data:`COVERED_ELSEWHERE`), or a row of :data:`DOES_NOT_APPLY` with the
reason. :func:`test_every_2026_advisory_is_accounted_for` keeps the four in step with the list
of §3.9.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from enforcer.policy import Endpoint, EndpointTable, Verdict, decide, validate_pattern
from tests.harness.attack import assert_close, assert_served_then_next, attack, marker
from tests.harness.e2e_stack import HOST, Seen, Stack
from tests.harness.raw import Raw, Reply, request

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ the §3.9 list

#: Every advisory of advisories.md §3.9 (3.9.1-3.9.7), by the id the tables lead with.
ADVISORIES_2026 = (
    # 3.9.1 oauth2-proxy
    "GHSA-wr5q-7wxw-x568", "GHSA-63jm-59jj-478j", "GHSA-hhqp-vx7f-5c6m", "oauth2-proxy#3506",
    # 3.9.2 Pomerium
    "CVE-2026-50285",
    # 3.9.3 mod_auth_openidc
    "CVE-2026-54789",
    # 3.9.4 Envoy
    "CVE-2026-26308", "CVE-2026-47775", "CVE-2026-48090", "CVE-2026-47778", "CVE-2026-48743", "CVE-2026-47774",
    "CVE-2026-73553", "CVE-2026-73551", "CVE-2026-73511", "CVE-2026-73552", "CVE-2026-73548", "CVE-2026-73550",
    "CVE-2026-73547", "CVE-2026-50572",
    # 3.9.5 Istio
    "CVE-2026-31837", "CVE-2026-31838", "CVE-2026-39350", "CVE-2026-41413", "GHSA-qm8v-g4f9-qhjx",
    "ISTIO-SECURITY-2026-006",
    # 3.9.6 Traefik
    "CVE-2026-33433", "CVE-2026-39858", "CVE-2026-35051", "CVE-2026-40912", "CVE-2026-54763", "CVE-2026-54764",
    "CVE-2026-65600", "CVE-2026-26998", "GHSA-4mr2-fg2p-w63c", "CVE-2026-32305", "CVE-2026-48491", "CVE-2026-53622",
    # 3.9.7 nginx, ingress-nginx, Caddy, gRPC-Go
    "CVE-2025-23419", "CVE-2025-24514", "CVE-2025-1097", "CVE-2025-1098", "CVE-2025-15566", "nginx-http2-bomb",
    "GHSA-6365-7ppr-5r92", "GHSA-m8m5-v4jf-3wcm", "CVE-2026-33186",
)

# ------------------------------------------------------------------ rows: exact bytes through the stack

HTML = "Accept: text/html"


@dataclass(frozen=True)
class Row:
    """One advisory input: a request (anonymous or as bob) and what must happen to it.

    ``expect`` is ``"close"`` (400-CLOSE, or one of ``statuses``), ``"login"`` (302 to the IdP, or
    one of ``statuses`` such as 401 for a POST; nothing reaches the app), ``"deny"`` (403, nothing reaches the app) or ``"served"`` (200, the app saw
    exactly this one request, and ``check`` holds for what it saw)."""

    advisory: str
    target: str
    headers: tuple[str, ...] = ()
    as_bob: bool = False
    expect: str = "login"
    statuses: tuple[int, ...] = ()
    check: Callable[[Seen], object] | None = None
    method: str = "GET"
    body: bytes = b""
    name: str = field(default="")

    @property
    def id(self) -> str:
        return f"{self.advisory}:{self.name or self.target[:30]}{':bob' if self.as_bob else ''}"


def _only(name: str, *values: str) -> Callable[[Seen], object]:
    """The app saw header ``name`` exactly with ``values`` (none if empty)."""

    def check(seen: Seen) -> None:
        assert seen.header(name) == list(values), (name, seen.header(name))

    return check


def _none_of(*names: str) -> Callable[[Seen], object]:
    """The app saw none of ``names`` in any spelling the rule reads alike (case, '-', '_', '.')."""
    wanted = {re.sub(r"[-_.]", "", n).lower() for n in names}

    def check(seen: Seen) -> None:
        leaked = [(k, v) for k, v in seen.headers if re.sub(r"[-_.]", "", k).lower() in wanted]
        assert leaked == [], leaked

    return check


def _no_value(*values: str) -> Callable[[Seen], object]:
    """No header the app saw has one of ``values`` (the client's spoofed values) as its whole value."""

    def check(seen: Seen) -> None:
        leaked = [(k, v) for k, v in seen.headers if v in values]
        assert leaked == [], leaked

    return check


def _all(*checks: Callable[[Seen], object]) -> Callable[[Seen], object]:
    def check(seen: Seen) -> None:
        for c in checks:
            c(seen)

    return check


SPOOFED_ADDRESS = ("X-Forwarded-For: 127.0.0.1", "X-Real-IP: 127.0.0.1", "Forwarded: for=127.0.0.1;proto=https",
                   "True-Client-IP: 127.0.0.1", "X-Client-IP: 127.0.0.1", "CF-Connecting-IP: 127.0.0.1")
SPOOFED_TARGET = ("X-Forwarded-Uri: /public/x", "X-Original-URL: /public/x", "X-Rewrite-URL: /public/x",
                  "X-Original-URI: /public/x", "X-Forwarded-Prefix: /public", "X-Forwarded-Path: /public/x")

ROWS: list[Row] = [
    # oauth2-proxy: client address metadata never waives a login; the app sees the TCP peer only
    Row("GHSA-wr5q-7wxw-x568", "/admin/x", (HTML, *SPOOFED_ADDRESS), name="address-headers"),
    Row("GHSA-wr5q-7wxw-x568", "/x", SPOOFED_ADDRESS, as_bob=True, expect="served", name="address-headers",
        check=_all(_only("X-Forwarded-For", "127.0.0.1"), _none_of("X-Real-IP", "Forwarded", "True-Client-IP",
                                                                   "X-Client-IP", "CF-Connecting-IP"))),
    # oauth2-proxy GHSA-63jm / #3506 (and GHSA-7x63): a spoofed target header never changes the rule
    Row("GHSA-63jm-59jj-478j", "/admin/x", (HTML, *SPOOFED_TARGET), name="target-headers"),
    Row("GHSA-63jm-59jj-478j", "/admin/x", SPOOFED_TARGET, as_bob=True, expect="deny", name="target-headers"),
    Row("oauth2-proxy#3506", "/public/x", ("X-Forwarded-Uri: /admin/x",), expect="served", name="uri-on-public",
        check=_none_of("X-Forwarded-Uri")),
    # Envoy RBAC: duplicate identity / decision headers are neither joined nor believed
    Row("CVE-2026-26308", "/admin/x", (HTML, "X-Forwarded-Groups: admins", "X-Forwarded-Groups: admins",
                                       "X-Forwarded-User: alice", "X-Forwarded-User: alice"), name="duplicates"),
    Row("CVE-2026-26308", "/x", ("X-Forwarded-User: bob", "X-Forwarded-User: admin", "X-Forwarded-Groups: admins",
                                 "x-forwarded-groups: admins"), as_bob=True, expect="served", name="duplicates",
        check=_all(_only("X-Forwarded-User", "bob"), _no_value("admins", "admin"))),
    # Envoy path parameters: ';' is refused outright, so routing, policy and the app cannot disagree
    *(Row(adv, t, (HTML,), as_bob=bob, expect="close")
      for adv, t in (("CVE-2026-73553", "/admin;x"), ("CVE-2026-73553", "/admin;jsessionid=1"),
                     ("CVE-2026-73553", "/a;b/../admin"), ("CVE-2026-73551", "/public/..;x/admin"),
                     ("CVE-2026-73511", "/public;x/../admin"), ("CVE-2026-73511", "/public/x;y"))
      for bob in (False, True)),
    # Envoy: non-UTF-8 header bytes never turn a refusal into an allow
    Row("CVE-2026-73552", "/admin/x", (HTML, "X-Forwarded-Groups: admins\udcff", "X-Test: \udcff\udcfe"),
        name="non-utf8-header"),
    Row("CVE-2026-73552", "/admin/x", ("X-Forwarded-Groups: admins\udcff", "X-Test: \udcff\udcfe"), as_bob=True,
        expect="deny", name="non-utf8-header"),
    Row("CVE-2026-73552", "/public/\udcff", expect="close", name="non-utf8-target"),
    # Envoy: a generic upgrade with early body never becomes a tunnel on a pooled app connection
    Row("CVE-2026-73548", "/x", ("Upgrade: foo", "Connection: Upgrade", "Content-Length: 5"), as_bob=True,
        body=b"hello", expect="close", name="generic-upgrade-early-body"),
    # Envoy: a thousand Host headers, CONNECT without a path
    Row("CVE-2026-73550", "/public/x", tuple(f"Host: {HOST}" for _ in range(1000)), expect="close",
        statuses=(400, 431), name="1000-hosts"),
    Row("CVE-2026-73547", f"{HOST}:443", method="CONNECT", expect="close", statuses=(400, 405), name="connect"),
    Row("CVE-2026-73547", "/admin/x", method="CONNECT", expect="close", statuses=(400, 405), name="connect-path"),
    # HTTP/2 Bomb, HTTP/1.1 form: Cookie lines count toward the header limits like any other line
    Row("CVE-2026-47774", "/public/x", ("Cookie: c=" + "k" * 9000,), expect="close", statuses=(431,),
        name="9k-cookie-line"),
    Row("CVE-2026-47774", "/public/x", tuple(f"Cookie: c{i}=v" for i in range(101)), expect="close",
        statuses=(431,), name="101-cookie-lines"),
    # Istio: the admin/debug endpoints are not reachable through the public listener
    *(Row("CVE-2026-31838", p, (HTML,), name=p) for p in ("/metrics", "/readyz", "/healthz", "/debug/pprof")),
    Row("CVE-2026-31838", "/reload", ("Content-Length: 0",), method="POST", expect="login", statuses=(401,),
        name="/reload"),
    # Traefik identity headers: the app sees one value, ours, whatever the spelling the client used
    Row("CVE-2026-33433", "/x", ("X-Auth-User: admin", "X-Forwarded-User: admin", "x-forwarded-user: admin"),
        as_bob=True, expect="served", check=_all(_only("X-Forwarded-User", "bob"), _none_of("X-Auth-User"))),
    Row("CVE-2026-39858", "/public/x", ("X_Forwarded_Proto: http",), expect="close", name="underscore"),
    Row("CVE-2026-39858", "/public/x", ("X.Forwarded.Proto: http", "X-FORWARDED-PROTO: http"), expect="served",
        name="dot-and-case", check=_all(_only("X-Forwarded-Proto", "https"), _no_value("http"))),
    Row("CVE-2026-35051", "/public/x", ("X-Forwarded-Prefix: /admin",), expect="served",
        check=_none_of("X-Forwarded-Prefix")),
    Row("CVE-2026-35051", "/admin/x", (HTML, "X-Forwarded-Prefix: /public")),
    *(Row("CVE-2026-40912", t, (HTML,), as_bob=bob, expect="deny" if bob else "login")
      for t in ("/%2e/admin/x", "/./admin/secret", "/public/%2e%2e/admin/secret") for bob in (False, True)),
    Row("CVE-2026-40912", "/pre.fix/admin", (HTML,)),
    *(Row("CVE-2026-54763", "/public/x", (f"{h}: admin",), as_bob=bob, expect="close", name=h)
      for h in ("X_Auth_User", "x_auth_user", "X_Forwarded_User") for bob in (False, True)),
    Row("CVE-2026-54764", "/public/x", ("X-Forwarded-Proto: http", "X-Forwarded-Port: 80"), expect="served",
        check=_all(_only("X-Forwarded-Proto", "https"), _none_of("X-Forwarded-Port"))),
    # Caddy: raw-URI matcher vs decoded path
    Row("GHSA-m8m5-v4jf-3wcm", "/public/..%2fadmin/secret", expect="close"),
    Row("GHSA-m8m5-v4jf-3wcm", "/public/..%2Fadmin/secret", as_bob=True, expect="close"),
    # gRPC-Go: a target without a leading '/'
    *(Row("CVE-2026-33186", t, method=m, expect="close")
      for m, t in (("GET", "admin/x"), ("GET", "public/../admin/x"), ("POST", "admin/x"), ("GET", "*"))),
    # mod_auth_openidc: value-less and empty cookie pairs (also the binding cookie's name) parse safely
    *(Row("CVE-2026-54789", t, (HTML, f"Cookie: {c}"), expect=e, name=f"{t}:{c[:24]}")
      for c in ("__Host-enforcertx-0123456789abcdef", "a; b; =;", "=; ;;; =x", "__Host-enforcer-app")
      for t, e in (("/public/x", "served"), ("/x", "login"))),
]


@pytest_asyncio.fixture(scope="module")
async def bob(stack: Stack) -> str:
    """A Cookie header value carrying bob's (staff) session."""
    async with stack.browser() as b:
        page = await stack.login(b, "bob", "/")
        assert page.status == 200, page.text[:300]
        return b.cookies.header_for(stack.base + "/", same_site=True, method="GET")


@pytest.mark.e2e
@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
async def test_advisory_row(stack: Stack, bob: str, row: Row) -> None:
    """Each §3.9 input, sent as exact bytes over TLS, is refused, sent to login, denied or served as its row says, and the app sees only what the row allows."""
    headers = (*row.headers, f"Cookie: {bob}") if row.as_bob else row.headers
    out = await attack(stack, request(f"{row.method} {row.target} HTTP/1.1", *headers, port=stack.port, body=row.body))
    if row.expect == "close":
        assert_close(out, *row.statuses)
    elif row.expect == "login":
        assert out.first is not None and out.first.status in (row.statuses or (302,)), out.first
        assert_served_then_next(out, out.first.status)
        if out.first.status == 302:
            assert out.first.header("Location")[0].startswith(stack.op.issuer)
        assert out.attack_seen == []
    elif row.expect == "deny":
        assert_served_then_next(out, 403)
        assert out.attack_seen == []
    else:
        assert_served_then_next(out)
        (seen,) = out.attack_seen
        assert seen.header("X-Forwarded-User") == (["bob"] if row.as_bob else [])
        if row.check is not None:
            row.check(seen)


@pytest.mark.e2e
async def test_GHSA_wr5q_the_app_and_the_flow_record_see_the_tcp_peer(stack: Stack, bob: str) -> None:
    """GHSA-wr5q-7wxw-x568: from 127.0.0.2 with X-Forwarded-For naming 127.0.0.1, the flow record and the app's X-Forwarded-For both say 127.0.0.2."""
    tag = marker()
    conn = await Raw.open(stack, source="127.0.0.2")
    try:
        before = len(stack.upstream.seen)
        await conn.send(request(f"GET /wr5q-{tag} HTTP/1.1", f"Cookie: {bob}", "X-Forwarded-For: 127.0.0.1",
                                "X-Real-IP: 127.0.0.1", "Forwarded: for=127.0.0.1", port=stack.port))
        reply = await conn.reply()
    finally:
        await conn.close()
    assert reply is not None and reply.status == 200
    (seen,) = stack.upstream.seen[before:]
    assert seen.header("X-Forwarded-For") == ["127.0.0.2"]
    flow = await stack.wait_flow(lambda f: f.get("path") == f"/wr5q-{tag}")
    assert flow["client"].startswith("127.0.0.2:")


# ------------------------------------------------------------------ no credential in any log (GHSA-hhqp)


async def _start_login(stack: Stack) -> tuple[str, str]:
    """An anonymous request that starts a login: its ``state`` and its browser-binding cookie pair."""
    conn = await Raw.open(stack)
    try:
        await conn.send(request(f"GET /hhqp-{marker()} HTTP/1.1", HTML, "Connection: close", port=stack.port))
        reply = await conn.reply()
    finally:
        await conn.close()
    assert reply is not None and reply.status == 302
    (state,) = re.findall(r"[?&]state=([^&]+)", reply.header("Location")[0])
    binding = next(sc.split(";", 1)[0] for sc in reply.header("Set-Cookie") if sc.startswith("__Host-enforcertx-"))
    return state, binding


async def _one(stack: Stack, payload: bytes) -> Reply:
    conn = await Raw.open(stack)
    try:
        await conn.send(payload)
        reply = await conn.reply()
    finally:
        await conn.close()
    assert reply is not None
    return reply


@pytest.mark.e2e
async def test_GHSA_hhqp_failed_callbacks_log_no_credential(stack: Stack) -> None:
    """GHSA-hhqp-vx7f-5c6m: after callbacks that fail (unknown or missing state, IdP error, missing binding cookie, a code the IdP refuses) and a junk logout token, no marker put in a code, state, token, cookie or Authorization value appears in the flow log, the daemon's log or the metrics."""
    m = {k: f"MRK{k}{secrets.token_hex(12)}" for k in
         ("code", "state", "cookie", "handle", "binding", "auth", "desc", "logout", "basic", "agent")}
    handle = (m["handle"] + "x" * 43)[:43]  # the shape of a session handle, so it is looked up
    creds = (f"Cookie: __Host-enforcer-app={handle}; __Host-enforcertx-0123456789abcdef=1.{m['binding']}; "
             f"other={m['cookie']}", f"Authorization: Bearer {m['auth']}", f"Proxy-Authorization: Basic {m['basic']}",
             f"User-Agent: {m['agent']}")
    cb = "/oauth2/callback"
    answers = [
        await _one(stack, request(f"GET {cb}?code={m['code']}&state={m['state']} HTTP/1.1", *creds, port=stack.port)),
        await _one(stack, request(f"GET {cb}?code={m['code']} HTTP/1.1", *creds, port=stack.port)),
        await _one(stack, request(f"GET {cb}?error=access_denied&error_description={m['desc']}&state={m['state']}"
                                  " HTTP/1.1", *creds, port=stack.port)),
        await _one(stack, request("POST /oauth2/logout/backchannel HTTP/1.1", *creds,
                                  "Content-Type: application/x-www-form-urlencoded",
                                  f"Content-Length: {len('logout_token=') + len(m['logout']) + 6}", port=stack.port,
                                  body=f"logout_token={m['logout']}.a.b.c".encode())),
    ]
    state, binding = await _start_login(stack)  # the real state, but without its binding cookie (no CSRF proof)
    answers.append(await _one(stack, request(f"GET {cb}?code={m['code']}&state={state} HTTP/1.1", *creds,
                                             port=stack.port)))
    state, binding = await _start_login(stack)  # the real state and binding cookie, a code the IdP refuses
    answers.append(await _one(stack, request(f"GET {cb}?code={m['code']}&state={state} HTTP/1.1",
                                             f"Cookie: {binding}; other={m['cookie']}", creds[1], port=stack.port)))
    assert all(400 <= a.status < 600 for a in answers), [a.status for a in answers]
    assert not any(sc.startswith("__Host-enforcer-app=") and "Max-Age=0" not in sc
                   for a in answers for sc in a.header("Set-Cookie"))
    await stack.wait_flow(lambda f: f.get("path") == cb and f.get("reason") not in (None, "unfinished")
                          and f.get("status") == answers[-1].status)
    await asyncio.sleep(0.5)  # the flow log flushes every 200 ms
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{stack.admin_port}/metrics") as r:
        metrics = await r.text()
    places = {"flow log": stack.flow_log.read_text(), "daemon log": (stack.workdir / "enforcer.log").read_text(errors="replace"),
              "metrics": metrics,
              "answers": "".join(a.raw_head.decode("latin-1") + a.text for a in answers)}
    assert places["flow log"].count(m.pop("agent")) >= 5  # control: the records are there, the grep finds them
    leaks = [(where, k) for where, text in places.items() for k, v in (*m.items(), ("handle43", handle))
             if v in text]
    assert leaks == [], leaks


# ------------------------------------------------------------------ TLS name selection (Traefik, nginx)


def _records(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """TLS records in ``data``: (content type, legacy version, payload)."""
    out, i = [], 0
    while i < len(data):
        ctype, version, length = data[i], data[i + 1 : i + 3], struct.unpack("!H", data[i + 3 : i + 5])[0]
        out.append((ctype, version, data[i + 5 : i + 5 + length]))
        i += 5 + length
    return out


def _complete(answer: bytes) -> bool:
    """True once ``answer`` holds a whole response head and its Content-Length of body."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return length is None or len(body) >= int(length.group(1))


async def fragmented_get(stack: Stack, sni: str, host: str, path: str, *, size: int = 32) -> tuple[dict[str, object], bytes]:
    """A TLS handshake whose ClientHello is cut into ``size``-byte records, each its own TCP write, then one GET;
    returns the verified peer certificate and the raw answer."""
    ctx = stack.client_ssl()
    ctx.check_hostname = False  # the chain is still verified; the names are checked by the caller
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    try:
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        (hello,) = _records(outgoing.read())
        assert hello[0] == 22 and len(hello[2]) > 3 * size
        for i in range(0, len(hello[2]), size):
            chunk = hello[2][i : i + size]
            writer.write(bytes([22]) + hello[1] + struct.pack("!H", len(chunk)) + chunk)
            await writer.drain()
            await asyncio.sleep(0.01)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if pending := outgoing.read():
                    writer.write(pending)
                    await writer.drain()
                data = await asyncio.wait_for(reader.read(65536), 10)
                if not data:
                    raise ConnectionResetError("closed during the handshake") from None
                incoming.write(data)
        cert = tls.getpeercert()
        tls.write(request(f"GET {path} HTTP/1.1", "Connection: close", host=host))
        writer.write(outgoing.read())
        await writer.drain()
        answer = b""
        while not _complete(answer):
            data = await asyncio.wait_for(reader.read(65536), 10)
            if not data:
                break
            incoming.write(data)
            try:
                while chunk := tls.read(65536):
                    answer += chunk
            except ssl.SSLWantReadError:
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
        return cert, answer
    finally:
        writer.close()


def _sans(cert: dict[str, object]) -> list[str]:
    return [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]  # type: ignore[attr-defined]


@pytest.mark.e2e
@pytest.mark.parametrize(("sni", "size"), [(HOST, 32), (HOST, 7), ("APP.Test", 32), ("app.test.", 16)])
async def test_CVE_2026_32305_fragmented_client_hello_picks_the_same_certificate_and_policy(
    stack: Stack, sni: str, size: int
) -> None:
    """CVE-2026-32305 / CVE-2026-53622: a ClientHello split across many records (the SNI in a later one), in any letter case or with a trailing dot, gets app.test's certificate and app.test's policy."""
    before = len(stack.upstream.seen)
    cert, answer = await fragmented_get(stack, sni, f"{HOST}:{stack.port}", "/public/frag", size=size)
    assert HOST in _sans(cert)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert [s.target for s in stack.upstream.seen[before:]] == ["/public/frag"]
    cert, answer = await fragmented_get(stack, sni, f"{HOST}:{stack.port}", "/admin/frag", size=size)
    assert answer.startswith(b"HTTP/1.1 302"), answer[:200]  # the service's policy: a login, not a default


@pytest.mark.e2e
@pytest.mark.parametrize("sni", ["other.test", "xapp.test", "app.test.evil", "app.tes", "*.test"])
async def test_CVE_2026_32305_fragmented_client_hello_with_another_name_is_refused(stack: Stack, sni: str) -> None:
    """CVE-2026-32305: split across records, a ClientHello naming an unknown host (or none usable) gets no certificate and no default service; nothing reaches the app."""
    before = len(stack.upstream.seen)
    try:
        _, answer = await fragmented_get(stack, sni, f"{HOST}:{stack.port}", "/public/frag-other")
    except (ssl.SSLError, ConnectionError):
        answer = b""
    assert not answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert stack.upstream.seen[before:] == []


@pytest.mark.e2e
@pytest.mark.parametrize(("sni", "host"), [(HOST, "other.test"), (HOST, "APP.test.evil"), ("127.0.0.1", "other.test")])
async def test_CVE_2026_48491_host_must_match_sni_after_fragmented_hello(stack: Stack, sni: str, host: str) -> None:
    """CVE-2026-48491: SNI app.test (fragmented), or no usable SNI (an IP literal: the default host), with another Host is 421, never the other name's policy or the app."""
    before = len(stack.upstream.seen)
    _, answer = await fragmented_get(stack, sni, host, "/public/fronting")
    assert answer.startswith(b"HTTP/1.1 421"), answer[:200]
    assert stack.upstream.seen[before:] == []


def _resume_under(stack: Stack, version: ssl.TLSVersion, sni: str, host: str) -> tuple[bool, int | None]:
    """A session from app.test offered again with SNI ``sni``: (resumed?, status of a GET with ``host``) — status
    None when the handshake is refused."""
    ctx = stack.client_ssl()
    ctx.check_hostname = False
    ctx.minimum_version = ctx.maximum_version = version
    with socket.create_connection(("127.0.0.1", stack.port), 5) as raw, ctx.wrap_socket(raw, server_hostname=HOST) as t:
        t.sendall(request("GET /public/first HTTP/1.1", "Connection: close", port=stack.port))
        while t.recv(65536):
            pass
        session = t.session
    assert session is not None
    with socket.create_connection(("127.0.0.1", stack.port), 5) as raw:
        try:
            t = ctx.wrap_socket(raw, server_hostname=sni, session=session)
        except (ssl.SSLError, ConnectionError):
            return False, None
        with t:
            resumed = t.session_reused
            try:
                t.sendall(request("GET /public/resumed HTTP/1.1", "Connection: close", host=host))
                answer = t.recv(65536)
            except (ssl.SSLError, ConnectionError):
                return resumed, None
    return resumed, int(answer.split(b" ")[1]) if answer else None


@pytest.mark.e2e
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
async def test_CVE_2025_23419_a_session_resumed_under_another_sni_gets_nothing_of_it(
    stack: Stack, version: ssl.TLSVersion
) -> None:
    """CVE-2025-23419: a TLS session of app.test offered with SNI other.test is either refused or, resumed, still bound to app.test: a request for other.test is 421 and never reaches the app."""
    before = len(stack.upstream.seen)
    resumed, status = await asyncio.to_thread(_resume_under, stack, version, "other.test", f"other.test:{stack.port}")
    assert status in (None, 421), (resumed, status)
    assert [s.target for s in stack.upstream.seen[before:]] == ["/public/first"]


# ------------------------------------------------------------------ pure rows


def test_CVE_2026_39350_tag_values_match_literally() -> None:
    """CVE-2026-39350: a tag value with regex characters ('.', '*', '+', '|') matches only itself, never as a pattern."""
    for value in ("a.b", "a*", "a+b", "a|b", "(a)", "[ab]", ".*"):
        table = EndpointTable([Endpoint.parse("/x", ["GET"], allowed_scopes=[[f"groups={value}"]])])
        assert decide("GET", "/x", frozenset({f"groups={value}"}), table).verdict is Verdict.ALLOW
        for other in ("aXb", "a", "aaa", "ab", "b", "anything", "groups=a.b"):
            if other != value:
                assert decide("GET", "/x", frozenset({f"groups={other}"}), table).verdict is Verdict.DENY, (value, other)


@pytest.mark.parametrize("uri", ["/admin.*", "/ad(min|x)/*", "/a+/x", "/[a-z]*", "/x*", "/*.php", "/a/**"])
def test_ISTIO_SECURITY_2026_006_patterns_are_never_regexes(uri: str) -> None:
    """ISTIO-SECURITY-2026-006 / CVE-2026-39350: an endpoint URI is a literal path with whole-segment '*', so regex syntax is either refused or matched as literal text."""
    problem = validate_pattern(uri)
    if problem is None:
        table = EndpointTable([Endpoint.parse(uri, ["GET"], public=True)])
        assert decide("GET", "/admin/x", None, table).verdict is Verdict.LOGIN
        assert decide("GET", "/adminX", None, table).verdict is Verdict.LOGIN
    else:
        assert "'*' must be a whole segment" in problem or "must" in problem


# ------------------------------------------------------------------ covered by other tests; does not apply

#: Advisory -> the tests elsewhere in the suite that already send its input (checked to exist).
COVERED_ELSEWHERE: dict[str, tuple[str, ...]] = {
    "CVE-2026-50285": (
        "tests/test_attacks.py::test_s_id_04_oversized_bomb_or_chunked_session_cookies_are_no_session",
    ),
    "CVE-2026-31837": (
        "tests/test_jwks.py::test_a_key_never_seen_is_refused_while_the_jwks_fails",
        "tests/test_jwks.py::test_known_keys_outlive_a_failing_jwks_for_the_grace_only",
        "tests/test_conformance.py::test_P_JWKS_03_jwks_down_at_startup_fails_closed",
    ),
    "CVE-2026-41413": ("tests/test_conformance.py::test_P_JWKS_11_metadata_urls_to_link_local_addresses_are_refused",
                       "tests/test_conformance.py::test_P_JWKS_08_http_endpoints_are_refused"),
    "CVE-2026-26998": ("tests/test_conformance.py::test_P_TOK_15_huge_token_response",
                       "tests/test_conformance.py::test_P_JWKS_10_huge_or_deep_documents",
                       "tests/test_conformance.py::test_P_IDT_17_oversized_or_deep_id_tokens"),
    "GHSA-4mr2-fg2p-w63c": ("tests/test_definitions.py::test_invalid_update_is_rejected_and_the_old_set_stays",
                            "tests/test_daemon.py::test_invalid_reload_keeps_serving_the_old_set",
                            "tests/test_config.py::test_service_without_matching_specs_warns_that_everything_is_denied"),
    "CVE-2026-47775": ("tests/test_conformance.py::test_S_ID_03_S_ID_06_tampered_cookie_means_login",
                       "tests/test_conformance.py::test_P_RET_05_tampered_transaction_cookie"),
}

#: Advisory -> why its class of bug cannot happen here (also in THREAT_MODEL.md, issue 19 item 5).
DOES_NOT_APPLY: dict[str, str] = {
    "CVE-2026-50285": "nothing a client sends is ever decompressed: sessions and logins are server-side, the cookie "
                      "is a 43-character random handle checked by shape before lookup, the callback's state is "
                      "an opaque key; app bodies are relayed with auto_decompress off",
    "CVE-2026-47775": "nothing is encrypted, so there is no padding to probe: the session cookie is a random handle "
                      "(only its SHA-256 is stored), the binding cookie a random value compared by hash, the PKCE "
                      "verifier never leaves the server; a tampered value is simply unknown (same answer as none)",
    "CVE-2026-48090": "use-after-free needs manual memory management; a client leaving during the token exchange "
                      "cancels a Python task (the login is single use and creates no session)",
    "CVE-2026-47778": "no certificate names are matched by us: no client certificates are requested, the app link "
                      "is plain HTTP on loopback, and IdP certificates are checked by OpenSSL's X509_check_host, "
                      "which refuses names with an embedded NUL",
    "CVE-2026-48743": "HTTP/3 and HTTP/2 are not spoken (ALPN http/1.1 only; X-HDR-11 test), and HTTP/1.1 framing "
                      "conflicts are 400-CLOSE (X-SMG tests)",
    "nginx-http2-bomb": "HPACK does not exist without HTTP/2, which is not spoken; the HTTP/1.1 form (cookie bytes "
                        "counted in the header limit) is a row of ROWS under CVE-2026-47774",
    "CVE-2026-50572": "no raw HTTP client with manual memory; CONNECT is refused (rows under CVE-2026-73547)",
    "GHSA-qm8v-g4f9-qhjx": "there is no upstream TLS to downgrade (the app link is plain HTTP to the configured "
                           "address); IdP connections are HTTPS only and an unreadable oidc.caFile is a config error "
                           "at start, never a fallback to plaintext or to no verification",
    "CVE-2026-65600": "the enforcer has no path rewriting: the canonical path the policy matched is the path the "
                      "app receives (X-PATH-11 test)",
    "CVE-2025-24514": "no configuration is templated from strings: definitions become typed objects, nftables rules "
                      "are netlink objects, nothing is rendered into a config language",
    "CVE-2025-1097": "as CVE-2025-24514: no templated configuration",
    "CVE-2025-1098": "as CVE-2025-24514: no templated configuration",
    "CVE-2025-15566": "as CVE-2025-24514: no templated configuration",
    "GHSA-6365-7ppr-5r92": "there is no auth subrequest to mix up: the IdP is reached by its own aiohttp session "
                           "(HTTPS, the IdP's host) and the app by the upstream pool, two separate objects whose "
                           "connections cannot be exchanged",
}


@pytest.mark.parametrize(("advisory", "ref"), [(a, r) for a, refs in COVERED_ELSEWHERE.items() for r in refs],
                         ids=[f"{a}->{r.split('::')[1]}" for a, refs in COVERED_ELSEWHERE.items() for r in refs])
def test_covered_elsewhere_tests_exist(advisory: str, ref: str) -> None:
    """Each test named as covering an advisory elsewhere in the suite is defined where it is named."""
    path, name = ref.split("::")
    source = (REPO / path).read_text(encoding="utf-8")
    assert re.search(rf"^\s*(async\s+)?def {re.escape(name)}\(", source, re.MULTILINE), (advisory, ref)


SPECIAL = {
    "GHSA-wr5q-7wxw-x568", "GHSA-hhqp-vx7f-5c6m", "CVE-2026-32305", "CVE-2026-53622", "CVE-2026-48491",
    "CVE-2025-23419", "CVE-2026-39350", "ISTIO-SECURITY-2026-006",
}
"""Advisories with a test of their own in this file (their id is in the test's name or docstring)."""


def test_every_2026_advisory_is_accounted_for() -> None:
    """Every advisory of §3.9 is a row, a test of this file, covered elsewhere, or does-not-apply with a reason; no other ids."""
    source = Path(__file__).read_text(encoding="utf-8")
    tested = {r.advisory for r in ROWS} | SPECIAL
    for advisory in SPECIAL:
        assert source.count(advisory) >= 3, f"{advisory}: no test of this file names it"
    accounted = tested | set(COVERED_ELSEWHERE) | set(DOES_NOT_APPLY)
    assert set(ADVISORIES_2026) - accounted == set()
    assert accounted - set(ADVISORIES_2026) == set()
    assert all(len(reason) > 40 for reason in DOES_NOT_APPLY.values())
