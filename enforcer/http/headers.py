"""Header hygiene towards the app and back, and the request and response heads: one implementation.

Header hygiene happens here and only here, in a fixed order: (1) drop hop-by-hop headers and
every header the client's ``Connection:`` names, (2) drop every client copy of an identity or
forwarding header (all case variants; names with ``_`` never get this far, the gate rejects
them), (3) drop the enforcer's own cookies, and only then (4) add our ``X-Forwarded-*`` and
identity headers.
"""

from __future__ import annotations

import email.utils
import functools
import http
import re
import time
from collections.abc import Mapping
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
