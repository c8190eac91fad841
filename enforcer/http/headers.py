"""Header hygiene towards the app and back, and the request and response heads: one implementation.

Header hygiene happens here and only here, in a fixed order: (1) drop hop-by-hop headers and
every header the client's ``Connection:`` names, (2) drop every client header a proxy in front
of an app might trust for host, scheme, port, path, client address or identity, by the rule of
:class:`HeaderRule` (names with ``_`` never get this far, the gate rejects them), (3) drop the
enforcer's own cookies, and only then (4) add our ``X-Forwarded-*`` and identity headers.
"""

from __future__ import annotations

import email.utils
import functools
import http
import re
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from multidict import CIMultiDict, CIMultiDictProxy

from enforcer.errors import UpstreamError, UpstreamKind
from enforcer.identity import cookies as sessions

if TYPE_CHECKING:
    from enforcer.http import upstream as upstream_client

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

# ---------------------------------------------------------------- the strip rule
#
# A client header never reaches the app when its *normalised* name (lower case, every
# punctuation character of a token -- ``_ . ! # $ % & ' * + ^ ` | ~`` -- read as ``-``, empty
# parts dropped) is one of SPOOFABLE, starts with one of SPOOFABLE_PREFIXES, or has one of
# SPOOFABLE_TOKENS as a whole ``-``-separated part.  ``user`` directly followed by ``agent``
# (``User-Agent``, ``X-User-Agent``) and the exact names of UNRESERVED are not a match.

#: Whole names (normalised) only the enforcer may set towards the app.  Most are matched by a
#: token or prefix as well; the list names what the rule is tested against.
SPOOFABLE = frozenset(
    {
        "forwarded",
        "x-host",
        "x-real-ip",
        "true-client-ip",
        "client-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-original-url",
        "x-rewrite-url",
        "x-original-host",
        "x-original-uri",
        "x-original-method",
        "x-http-host-override",
        "x-forwarded-server",
        "x-forwarded-port",
        "x-forwarded-scheme",
        "x-forwarded-ssl",
        "front-end-https",
        "x-url-scheme",
        "x-scheme",
        "x-script-name",
        "x-remote-user",
        "remote-user",
        "x-remote-addr",
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
        "x-userinfo",
        "x-id-token",
        "x-access-token",
        "oidc-access-token",
        "oidc-id-token",
    }
)
#: Families whose tail is free: any name starting with one of these (normalised).
SPOOFABLE_PREFIXES = (
    "x-forwarded-",
    "x-auth-request-",
    "oidc-",
    "x-oidc-",
    "x-enforcer-",
    "x-amzn-oidc-",
    "x-goog-iap-",
    "cf-access-",
    "x-credential-",
    "x-consumer-",
    "x-envoy-",
)
#: A name with any of these as a whole part is reserved, whatever else it holds.
SPOOFABLE_TOKENS = frozenset(
    {
        # host and the route to it
        "host", "forwarded", "original", "originating", "rewrite", "override",
        # scheme and TLS
        "scheme", "proto", "ssl", "https",
        # port, path, URL
        "port", "path", "prefix", "url", "uri",
        # client address
        "ip", "addr", "address",
        # identity (and the proxies that inject it)
        "remote", "user", "username", "userid", "userinfo", "email", "group", "groups", "role", "roles",
        "principal", "identity", "authenticated", "webauth", "claim", "assertion", "oidc", "enforcer",
        "pomerium", "vouch", "tailscale",
        # client certificates
        "cert", "certificate", "clientcert",
    }
)
#: Standard request headers a token would otherwise catch (``Sec-Fetch-User: ?1``).
UNRESERVED = frozenset({"sec-fetch-user"})

_SEPARATORS = str.maketrans(dict.fromkeys("_.!#$%&'*+^`|~", "-"))


@functools.lru_cache(maxsize=256)
def normalise(name: str) -> str:
    """A header name as the strip rule reads it: lower case, punctuation as ``-``, runs of
    ``-`` collapsed, none at either end (``X__Forwarded.Host`` → ``x-forwarded-host``)."""
    return "-".join(part for part in name.lower().translate(_SEPARATORS).split("-") if part)


def _reserved(norm: str, names: frozenset[str], prefixes: tuple[str, ...]) -> bool:
    """The rule on a normalised name, with the given whole names and prefixes."""
    if norm in names or norm.startswith(prefixes):
        return True
    if norm in UNRESERVED:
        return False
    parts = norm.split("-")
    for i, part in enumerate(parts):
        if part in SPOOFABLE_TOKENS and not (part == "user" and parts[i + 1 : i + 2] == ["agent"]):
            return True
    return False


KEEP, DROP, COOKIE = 0, 1, 2
"""What :meth:`HeaderRule.verdict` says about a client header name."""

_DROP_NAMES = HOP_BY_HOP | {"host", "cookie"}


class HeaderRule:
    """Which client header names never reach the app: the built-in rule plus the operator's
    ``limits.stripHeaders`` (a name, or a prefix ending in ``*``), each read normalised.

    The verdict on a name is remembered per spelling as received (bounded): a request pays
    one dict lookup per header; only a spelling not seen before pays the rule."""

    __slots__ = ("_names", "_prefixes", "_verdicts")

    MAX_REMEMBERED = 4096

    def __init__(self, extra: Iterable[str] = ()) -> None:
        names = set(SPOOFABLE)
        prefixes = list(SPOOFABLE_PREFIXES)
        for entry in extra:
            if entry.endswith("*"):
                stem = entry[:-1]
                prefix = normalise(stem)
                # "X-Tenant-*" holds the whole part "tenant"; "X-Tenant*" any part starting so
                prefixes.append(prefix + "-" if stem[-1:] in "-_.!#$%&'+^`|~" else prefix)
            else:
                names.add(normalise(entry))
        self._names = frozenset(names)
        self._prefixes = tuple(prefixes)
        self._verdicts: dict[str, tuple[int, str, str]] = {}

    def reserved(self, name: str) -> bool:
        """True for a header name only the enforcer may send to the app (any spelling)."""
        return _reserved(normalise(name), self._names, self._prefixes)

    def verdict(self, name: str) -> tuple[int, str, str]:
        """(KEEP, DROP or COOKIE; the name lower-cased; normalised) for a client header name.
        DROP: hop-by-hop, ``Host`` (ours is added), any other spelling of ``Cookie`` or
        ``Host``, or reserved. COOKIE: the one real ``Cookie`` (cleaned, then re-added)."""
        known = self._verdicts.get(name)
        if known is not None:
            return known
        low = name.lower()
        norm = normalise(name)
        if low == "cookie":
            code = COOKIE
        elif norm in _DROP_NAMES or _reserved(norm, self._names, self._prefixes):
            code = DROP
        else:
            code = KEEP
        if len(self._verdicts) >= self.MAX_REMEMBERED:
            self._verdicts.clear()  # a flood of made-up names costs the rule again, never memory
        known = self._verdicts[name] = (code, low, norm)
        return known


DEFAULT_RULE = HeaderRule()
"""The built-in rule (what every path uses unless the daemon config adds names)."""

CHUNK = 64 * 1024
SERVER = "enforcer"


def is_spoofable(name: str, extra: frozenset[str] = frozenset()) -> bool:
    """True for any header name a client must never be able to send to the app (``extra``:
    more names, e.g. a service's own identity headers; every spelling of each)."""
    return DEFAULT_RULE.reserved(name) or normalise(name) in {normalise(e) for e in extra}


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
    rule: HeaderRule = DEFAULT_RULE,
) -> CIMultiDict[str]:
    """The headers the app receives: the client's, cleaned by ``rule``, then ours."""
    named = _connection_tokens(client)
    ours = _ours(identity)
    verdict = rule.verdict
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in client.items():
        code, low, norm = verdict(name)
        if code == KEEP and low not in named and norm not in ours:
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


def _ours(identity: Mapping[str, str]) -> frozenset[str]:
    """The normalised names of the identity headers we add (their client copies go, in every
    spelling, whether or not the rule reserves them)."""
    return frozenset(map(normalise, identity)) if identity else _NO_TOKENS


def request_head(
    method: str,
    target: str,
    client: list[tuple[str, str]],
    *,
    identity: Mapping[str, str],
    client_ip: str,
    host: str,
    rule: HeaderRule = DEFAULT_RULE,
) -> bytes:
    """``serialise_head(method, target, request_headers(CIMultiDict(client), ...))`` in one pass
    over the client's raw header list (the fast path's request; no WebSocket), byte for byte
    the same (a property test holds them equal)."""
    named = _pair_connection_tokens(client)
    ours = _ours(identity)
    verdict = rule.verdict
    lines = [f"{method} {target} HTTP/1.1"]
    cookies = []
    for name, value in client:
        code, low, norm = verdict(name)
        if code == KEEP:
            if low not in named and norm not in ours:
                lines.append(f"{name}: {value}")
        elif code == COOKIE:
            cookies.append(value)
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
        raise UpstreamError(UpstreamKind.PROTOCOL, 502)
    return text.encode("utf-8", "surrogateescape")


_FORBIDDEN_IN_HEAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # as aiohttp's header writer refuses
_REASONS = {s.value: s.phrase for s in http.HTTPStatus}


@functools.lru_cache(maxsize=2)
def _date_of(second: int) -> str:
    return email.utils.formatdate(second, usegmt=True)


def http_date() -> str:
    """The ``Date`` header value for now (RFC 9110 IMF-fixdate), formatted once per second."""
    return _date_of(int(time.time()))


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


class ResponseHead(NamedTuple):
    """The client's head for an app's answer, before its ``Date`` and ``Connection`` lines:
    what both HTTP paths send (the lean path writes it with :func:`relay_head`, the full path
    hands it to aiohttp, which frames HTTP/1.0 answers too)."""

    status: int
    reason: str
    fields: CIMultiDict[str]
    """The app's headers cleaned by :func:`response_headers`, the ``Server`` and
    ``Content-Type`` defaults, and ``Content-Length`` or ``Transfer-Encoding: chunked``."""
    chunked: bool
    no_body: bool


def response_head(
    head: upstream_client.Head, *, method: str, public_origin: str, upstream_host: str, port: int
) -> ResponseHead:
    """The one response-head builder: ``Content-Length`` when the app framed the body by length,
    else chunked; none of either for HEAD's and 204/304's empty body except the app's length on
    a HEAD; ``Content-Type`` and ``Server`` defaults. Raises UpstreamError if the app's status
    line or a header value holds a control character."""
    status = head.status
    fields: CIMultiDict[str] = CIMultiDict()
    response_headers(
        head.headers, public_origin=public_origin, internal_origins=_internal_origins(upstream_host, port),
        into=fields,
    )
    fields.setdefault("Server", SERVER)
    chunked = False
    no_body = method == "HEAD" or status in (204, 304)
    if not no_body:
        length = head.content_length
        if length is None:
            fields["Transfer-Encoding"] = "chunked"
            chunked = True
        else:
            fields["Content-Length"] = str(length)
        if length != 0:
            fields.setdefault("Content-Type", "application/octet-stream")
    elif status not in (204, 304):  # a HEAD: the length the GET would have
        up_length = _first(head.headers, "content-length")
        if up_length is not None:
            fields["Content-Length"] = up_length
    reason = head.reason or _REASONS.get(status, "")
    if _FORBIDDEN_IN_HEAD.search(reason) is not None or any(
        _FORBIDDEN_IN_HEAD.search(name) is not None or _FORBIDDEN_IN_HEAD.search(value) is not None
        for name, value in fields.items()
    ):
        raise UpstreamError(UpstreamKind.PROTOCOL, 502)
    return ResponseHead(status, reason, fields, chunked, no_body)


def _build_relay_head(
    head: upstream_client.Head, method: str, public_origin: str, *, upstream_host: str, port: int, keep_alive: bool
) -> tuple[bytes, bool, bool, bool]:
    """(status line and header lines, each ending in CRLF; chunked; no_body; Date to add)."""
    built = response_head(head, method=method, public_origin=public_origin, upstream_host=upstream_host, port=port)
    fields = built.fields
    if not keep_alive and "Connection" not in fields:
        fields["Connection"] = "close"
    lines = [f"HTTP/1.1 {built.status} {built.reason}", *map(": ".join, fields.items()), ""]
    return "\r\n".join(lines).encode("utf-8", "surrogateescape"), built.chunked, built.no_body, "Date" not in fields
