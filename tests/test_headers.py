"""The strip rule of enforcer/http/headers.py (HeaderRule): which client headers the app never
gets, in every spelling, on both request builders (conformance.md §4.1 X-HDR-01/02/03/07/08,
issue 19 item 4).  End to end through TLS: tests/test_attacks.py."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from enforcer.config.settings import LimitsModel
from enforcer.http import headers as headers_mod
from enforcer.http.headers import DEFAULT_RULE, HeaderRule, normalise

#: Every header issue 19 item 4 names, and the rows of X-HDR-01/07/08.
LISTED = [
    # issue 19 item 4
    "X-Host", "X-Forwarded-Server", "X-HTTP-Host-Override", "X-Original-Host", "X-Forwarded-Port",
    "X-Forwarded-Scheme", "X-Forwarded-Ssl", "Front-End-Https", "X-Url-Scheme", "X-Original-URL", "X-Rewrite-URL",
    # X-HDR-07
    "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Prefix", "X-Forwarded-Uri", "Forwarded",
    "X-Real-IP", "True-Client-IP",
    # X-HDR-01
    "X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Groups", "X-Forwarded-Preferred-Username",
    "X-Forwarded-Access-Token", "X-Auth-Request-User", "X-Auth-Request-Email", "X-Auth-Request-Groups",
    "X-Auth-Request-Access-Token", "X-Remote-User", "Remote-User", "X-User", "X-Email", "X-WEBAUTH-USER",
    "OIDC-CLAIM-sub", "OIDC-access-token",
    # X-HDR-08
    "X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override",
]

#: Other headers proxies in front of apps set and apps trust (Envoy, Azure, Google IAP, AWS ALB,
#: Cloudflare, Kong, Pomerium, Grafana, mod_ssl, ...): the rule catches them without a list entry.
FAMILY = [
    "X-Forwarded-Protocol", "X-Forwarded-Path", "X-Forwarded-Client-Cert", "X-Client-IP", "X-Cluster-Client-IP",
    "CF-Connecting-IP", "Fastly-Client-IP", "X-Originating-IP", "X-Remote-IP", "X-Remote-Addr", "Client-IP",
    "X-Envoy-External-Address", "X-Envoy-Original-Path", "X-Original-URI", "X-Original-Method", "X-Scheme",
    "X-Https", "HTTPS", "X-ARR-SSL", "X-ARR-ClientCert", "X-SSL-Client-Cert", "Ssl-Client-Verify", "X-Client-Cert",
    "X-MS-CLIENT-PRINCIPAL-NAME", "X-MS-CLIENT-PRINCIPAL-ID", "X-Goog-Authenticated-User-Email",
    "X-Goog-IAP-JWT-Assertion", "X-Amzn-Oidc-Identity", "X-Amzn-Oidc-Data", "Cf-Access-Jwt-Assertion",
    "Cf-Access-Authenticated-User-Email", "X-Pomerium-Claim-Email", "X-Pomerium-Jwt-Assertion", "X-Vouch-User",
    "X-Webauth-Email", "X-Webauth-Groups", "X-Consumer-Username", "X-Credential-Identifier", "X-Userinfo",
    "X-Id-Token", "X-Access-Token", "Tailscale-User-Login", "X-Authenticated-Userid", "X-User-Id", "X-Username",
    "X-Roles", "X-Groups", "X-Identity", "X-Script-Name", "X-Enforcer-Flow", "X-OIDC-Claim-Email", "OIDC-id-token",
]

#: Ordinary request headers: they reach the app.  ``Authorization`` passes by design (X-HDR-09:
#: forwarded, never authentication; the app may use it for its own API tokens).
ORDINARY = [
    "Accept", "Accept-Language", "Accept-Encoding", "Content-Type", "Content-Length", "Authorization", "User-Agent",
    "X-User-Agent", "Sec-Fetch-User", "Sec-Fetch-Mode", "Sec-Fetch-Site", "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Key", "Access-Control-Request-Method", "Access-Control-Request-Headers", "Origin", "Referer",
    "If-None-Match", "Cache-Control", "Upgrade-Insecure-Requests", "X-Request-Id", "X-Correlation-Id",
    "X-Requested-With", "X-CSRF-Token", "X-XSRF-TOKEN", "X-Api-Key", "Idempotency-Key", "traceparent", "Destination",
    "Overwrite", "Depth", "X-Forwardedfor", "DNT",
]


def spellings(name: str) -> list[str]:
    """The ways a client may spell ``name`` that some server in front of an app reads as it."""
    return [name, name.lower(), name.upper(), name.replace("-", "_"), name.replace("-", "."),
            name.upper().replace("-", "."), name.replace("-", "-_"), f"{name}."]


def forward(pairs: list[tuple[str, str]], rule: HeaderRule = DEFAULT_RULE,
            identity: dict[str, str] | None = None) -> tuple[CIMultiDict[str], bytes]:
    """Both request builders on the same client headers: (request_headers, request_head)."""
    ident = {} if identity is None else identity
    full = headers_mod.request_headers(
        CIMultiDictProxy(CIMultiDict(pairs)), identity=ident, client_ip="192.0.2.7", host="app.test", rule=rule,
    )
    lean = headers_mod.request_head("GET", "/", pairs, identity=ident, client_ip="192.0.2.7", host="app.test", rule=rule)
    assert lean == headers_mod.serialise_head("GET", "/", full)
    return full, lean


def test_normalise_reads_every_spelling_as_one_name() -> None:
    """Case, '_', '.', other token punctuation and runs of them all read as one '-'-separated name."""
    for spelled in ("X-Forwarded-Host", "x_forwarded_host", "X.FORWARDED.HOST", "X__Forwarded..Host",
                    "-x-forwarded-host-", "X~Forwarded|Host", "x+forwarded'host"):
        assert normalise(spelled) == "x-forwarded-host", spelled


@pytest.mark.parametrize("name", LISTED + FAMILY)
def test_every_listed_and_family_header_is_stripped_in_every_spelling(name: str) -> None:
    """Each reserved name, in every spelling and sent twice, never reaches the app on either builder."""
    assert all(DEFAULT_RULE.reserved(s) for s in spellings(name)), name
    pairs = [(s, "EVIL") for s in spellings(name) for _ in range(2)] + [("Accept", "text/html")]
    full, lean = forward(pairs)
    assert [(k, v) for k, v in full.items() if v == "EVIL"] == []
    assert b"EVIL" not in lean
    assert full.getall("Accept") == ["text/html"]


@pytest.mark.parametrize("name", ORDINARY)
def test_ordinary_headers_reach_the_app(name: str) -> None:
    """Ordinary application headers (Authorization too, X-HDR-09) pass, as sent, in any case."""
    for spelled in (name, name.lower(), name.upper()):
        assert not DEFAULT_RULE.reserved(spelled), spelled
        full, lean = forward([(spelled, "fine")])
        assert full.getall(spelled) == ["fine"]
        assert f"{spelled}: fine\r\n".encode() in lean


def test_our_values_replace_the_clients_in_every_spelling() -> None:
    """X-HDR-03/07: whatever spelling the client used, the app gets one value of ours for each header we set."""
    identity = {"X-Forwarded-User": "alice", "X-App-Login": "alice"}
    pairs = [(s, "EVIL") for n in ("X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Host", *identity)
             for s in spellings(n)]
    full, _ = forward(pairs, identity=identity)
    assert full.getall("X-Forwarded-For") == ["192.0.2.7"]
    assert full.getall("X-Forwarded-Proto") == ["https"]
    assert full.getall("X-Forwarded-Host") == full.getall("Host") == ["app.test"]
    assert full.getall("X-Forwarded-User") == full.getall("X-App-Login") == ["alice"]
    assert "EVIL" not in full.values()


def test_only_the_real_cookie_header_carries_cookies() -> None:
    """``Cookie`` in any case is cleaned and re-added; a look-alike (``Cookie.``, ``X.Cookie``'s
    cousin ``_Cookie``) never reaches the app, and the enforcer's own cookie never does."""
    pairs = [("cookie", "__Host-enforcer-app=h; app=1"), ("Cookie.", "__Host-enforcer-app=h"), ("_Cookie", "x=1"),
             ("COOKIE", "b=2")]
    full, lean = forward(pairs)
    assert full.getall("Cookie") == ["app=1; b=2"]
    assert b"Cookie: app=1; b=2\r\n" in lean and b"enforcer" not in lean and b"x=1" not in lean


# ---------------------------------------------------------------- properties

_SEPARATOR_SPELLINGS = ["-", "_", ".", "--", "_-", "~", "|"]


@st.composite
def spelled(draw: st.DrawFn, base: str) -> str:
    """``base`` with each letter in either case and each '-' spelled by one or more separators."""
    out = []
    for ch in base:
        if ch == "-":
            out.append(draw(st.sampled_from(_SEPARATOR_SPELLINGS)))
        elif ch.isalpha() and draw(st.booleans()):
            out.append(ch.swapcase())
        else:
            out.append(ch)
    return "".join(out)


_PART = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=8)


@st.composite
def reserved_name(draw: st.DrawFn) -> str:
    """A reserved name: a listed one, a reserved prefix with any tail, or any name holding a
    reserved part -- then spelled at random."""
    kind = draw(st.sampled_from(["listed", "prefix", "token"]))
    if kind == "listed":
        base = draw(st.sampled_from(sorted(headers_mod.SPOOFABLE) + [n.lower() for n in LISTED + FAMILY]))
    elif kind == "prefix":
        base = draw(st.sampled_from(headers_mod.SPOOFABLE_PREFIXES)) + "-".join(draw(st.lists(_PART, min_size=1,
                                                                                              max_size=3)))
    else:
        parts = draw(st.lists(_PART, max_size=3))
        token = draw(st.sampled_from(sorted(headers_mod.SPOOFABLE_TOKENS - {"user"})))
        parts.insert(draw(st.integers(0, len(parts))), token)
        base = "-".join(parts)
    return draw(spelled(base))


@settings(max_examples=500)
@given(names=st.lists(reserved_name(), min_size=1, max_size=6), twice=st.booleans(),
       ordinary=st.lists(st.sampled_from(ORDINARY), max_size=4))
def test_the_rule_strips_every_spelling_of_a_stripped_name(names: list[str], twice: bool, ordinary: list[str]) -> None:
    """Any spelling (case, separators, duplicates) of a reserved name is stripped by both builders;
    the ordinary headers beside it pass."""
    pairs = [(n, "EVIL") for n in names for _ in range(1 + twice)] + [(n, "ok") for n in ordinary
                                                                       if n != "Content-Length"]
    full, lean = forward(pairs)
    assert "EVIL" not in full.values() and b"EVIL" not in lean
    for name in ordinary:
        if name != "Content-Length":
            assert "ok" in full.getall(name), name


@settings(max_examples=300)
@given(name=st.sampled_from(ORDINARY).flatmap(lambda n: spelled(n.lower())))
def test_ordinary_names_pass_in_any_case_and_separator(name: str) -> None:
    """No spelling of an ordinary header becomes reserved (the gate refuses names with '_' anyway)."""
    assert not DEFAULT_RULE.reserved(name), name


# ---------------------------------------------------------------- the operator's additions


def test_operator_names_and_prefixes_are_stripped_in_every_spelling() -> None:
    """limits.stripHeaders: a name matches itself in every spelling; ``X-Tenant-*`` whole parts
    after it; ``X-Team*`` any name it starts; the built-in rule stays."""
    rule = HeaderRule(["X-App-Secret", "X-Tenant-*", "X-Team*"])
    for name in ("X-App-Secret", "x.app.secret", "X_APP_SECRET", "X-Tenant-Id", "x.tenant.region", "X-Teamid",
                 "X-Team-Name", "X-Host"):
        assert rule.reserved(name), name
    for name in ("X-App-Secret-Other", "X-Tenant", "X-Tenantid", "X-Tea", "Accept"):
        assert not rule.reserved(name), name
    full, lean = forward([("X.Tenant.Id", "EVIL"), ("X-Teamid", "EVIL"), ("x-app-secret", "EVIL"), ("X-Ok", "1")],
                         rule=rule)
    assert "EVIL" not in full.values() and b"EVIL" not in lean and full.getall("X-Ok") == ["1"]
    assert not DEFAULT_RULE.reserved("X-App-Secret")  # another rule's names stay its own


@pytest.mark.parametrize("entry", ["X-Tenant", "X-Tenant-*", "x_tenant*", "a", "X.Y"])
def test_strip_headers_setting_takes_names_and_prefixes(entry: str) -> None:
    """limits.stripHeaders accepts a header name or a prefix ending in '*'."""
    assert LimitsModel.model_validate({"stripHeaders": [entry]}).stripHeaders == [entry]


@pytest.mark.parametrize("entry", ["*", "-*", "X Tenant", "X-Tenant:", "X-*-Id", "X-Tenant**", "", "X-Tenant\n",
                                   "Ä-Header", "x" * 200])
def test_strip_headers_setting_refuses_what_is_not_a_name_or_prefix(entry: str) -> None:
    """An entry that is not a header name (or would strip everything, like '*') is a config error."""
    with pytest.raises(ValueError, match="a header name"):
        LimitsModel.model_validate({"stripHeaders": [entry]})


# ---------------------------------------------------------------- cost


def test_verdicts_are_remembered_per_spelling_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A spelling's verdict is computed once and reused; a flood of made-up names never holds more
    than MAX_REMEMBERED verdicts, and the verdicts stay right after the memory is cleared."""
    rule = HeaderRule()
    monkeypatch.setattr(HeaderRule, "MAX_REMEMBERED", 8)
    first = rule.verdict("X.Host")
    assert rule.verdict("X.Host") is first and first[0] == headers_mod.DROP
    for n in range(50):
        assert rule.verdict(f"X-Made-Up-{n}")[0] == headers_mod.KEEP
        assert len(rule._verdicts) <= 8
    assert rule.verdict("X.Host") == first
    assert rule.verdict("Cookie")[0] == headers_mod.COOKIE and rule.verdict("Keep-Alive")[0] == headers_mod.DROP
