"""proxy.py's pure helpers: what the app may receive from the client, and what the client
receives from the app (conformance.md §4.1 X-HDR-*, §4.7 X-NET-06/07)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from enforcer import proxy

IDENTITY = {"X-Forwarded-User": "alice", "X-Forwarded-Email": "alice@example.com", "X-Forwarded-Groups": "staff"}
OURS = {"x-forwarded-user", "x-forwarded-email", "x-forwarded-groups", "x-forwarded-for", "x-forwarded-proto",
        "x-forwarded-host", "host"}
PUBLIC = "https://app.test:8443"
INTERNAL = ("http://127.0.0.1:8081", "http://localhost:8081", "http://app.internal:8081")


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def forward(*pairs: tuple[str, str], identity: dict[str, str] | None = None, websocket: bool = False) -> CIMultiDict[str]:
    return proxy.request_headers(
        headers(*pairs), identity=IDENTITY if identity is None else identity,
        client_ip="192.0.2.7", host="app.test:8443", websocket=websocket,
    )


def back(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return proxy.response_headers(headers(*pairs), public_origin=PUBLIC, internal_origins=INTERNAL)


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
    assert proxy.is_spoofable(name)


@pytest.mark.parametrize("name", ["Accept", "Cookie", "Authorization", "User-Agent", "X-Request-Id", "Forwarded-Ish",
                                  "X-Forwardedfor", "Content-Type"])
def test_ordinary_names_are_not_spoofable(name: str) -> None:
    """Ordinary application headers pass (only the listed names and prefixes are reserved)."""
    assert not proxy.is_spoofable(name)


def test_configured_identity_names_are_spoofable() -> None:
    """A service's own identity header names (``extra``) are reserved too, in any case."""
    assert proxy.is_spoofable("x-app-login", frozenset({"x-app-login"}))
    assert proxy.is_spoofable("X_APP_LOGIN", frozenset({"x-app-login"}))


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
    assert proxy.clean_value(raw) == clean


@given(st.text())
def test_clean_value_is_always_a_safe_header_value(value: str) -> None:
    """Whatever a claim contains, the header value is printable ASCII without CR/LF/NUL."""
    out = proxy.clean_value(value)
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

_SPOOF_NAMES = sorted(proxy.SPOOFABLE) + [p + s for p in proxy.SPOOFABLE_PREFIXES for s in ("user", "email", "x")]


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
        if proxy.is_spoofable(name):
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
