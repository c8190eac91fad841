"""What to do with one request, decided from plain values: route, canonical path, own endpoints,
session, verdict.

Both HTTP paths call :func:`plan_request` (the aiohttp path in :mod:`enforcer.http.gate`, the lean
path in :mod:`enforcer.http.fastpath`), so they cannot disagree on any of these steps.  Nothing
here does I/O: the values come in (the Host header, the TLS server name, the original destination,
the cookies, a synchronous look-up in the session cache), one immutable plan goes out:

* :class:`Refuse` -- a plain error page that closes the connection (bad Host, unknown host, bad
  path, body too large);
* :class:`OwnEndpoint` -- the enforcer's callback, logout or back-channel logout endpoint;
* :class:`NeedSession` -- a session cookie the cache cannot vouch for: the caller asks the session
  store (I/O) and then calls :func:`decide` with what it found;
* :class:`Login`, :class:`Deny`, :class:`Forward` -- the policy's verdict with everything the act
  needs.

The plans are ``NamedTuple``s: immutable, and the cheapest objects Python builds (the lean path
makes one per request).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from enforcer import policy
from enforcer.config.fields import normalise_host
from enforcer.http import headers as headers_mod
from enforcer.identity import cookies as cookies_mod

if TYPE_CHECKING:
    from enforcer.config.definitions import Service
    from enforcer.identity.sessions import Session

log = logging.getLogger("enforcer.handler")

BACKCHANNEL_SUFFIX = "/backchannel"  # back-channel logout endpoint: <logout path>/backchannel


class Refuse(NamedTuple):
    """Answer with a plain page and close: the request is malformed or not for us."""

    status: int
    reason: str  # the flow record's reason code
    text: str  # the page's one line
    service: Service | None = None  # set once routing succeeded
    path: str | None = None  # set once the path is canonical


class Endpoint(enum.Enum):
    """The enforcer's own endpoints on every service's origin."""

    CALLBACK = "callback"
    LOGOUT = "logout"
    BACKCHANNEL = "backchannel"


class OwnEndpoint(NamedTuple):
    """The request is for one of the enforcer's own endpoints."""

    endpoint: Endpoint
    service: Service
    path: str
    query: str


class NeedSession(NamedTuple):
    """A session cookie the cache could not vouch for: look it up, then :func:`decide`."""

    service: Service
    path: str
    query: str
    handle: str


class Login(NamedTuple):
    """No session where one is needed: start a login (or answer 401 to an API client)."""

    service: Service
    path: str
    query: str
    identity: Session | None
    endpoint: str | None
    reason: str


class Deny(NamedTuple):
    """Signed in, but the policy does not allow this request."""

    service: Service
    path: str
    identity: Session | None
    endpoint: str | None
    reason: str
    would_allow: tuple[frozenset[str], ...]  # the tag sets that would have allowed it
    missing: frozenset[str]  # the fewest tags the user lacks


class Forward(NamedTuple):
    """Allowed: forward ``target`` to the service's app with these identity headers."""

    service: Service
    path: str  # canonical path (logged and matched)
    target: str  # path and query towards the app
    identity: Session | None
    endpoint: str | None
    reason: str
    identity_headers: dict[str, str]


Plan = Refuse | OwnEndpoint | NeedSession | Login | Deny | Forward
Decision = Login | Deny | Forward

CachedSession = Callable[[str, str, float], "Session | None"]
"""``(handle, service name, now)`` -> the session when the cache vouches for it, else None."""


def plan_request(
    by_host: Mapping[str, Service],
    listen_port: int,
    method: str,
    raw_target: str,
    host_value: str,
    *,
    sni: str | None,
    destination: tuple[str, int] | None,
    cookies: list[str],
    cached: CachedSession | None,
    now: float,
    content_length: int | None = None,
    max_body: int = 0,
    scoped: bool = False,
) -> Plan:
    """The plan for one request whose framing was already checked (``raw_target`` in origin form).

    ``cached`` answers from the session cache only (None: there is no cache); a cookie it cannot
    vouch for gives :class:`NeedSession`.  ``content_length`` over ``max_body`` is refused once
    the path is known.  ``scoped``: ``by_host`` is one pod's services (see :func:`route`)."""
    routed = route(by_host, listen_port, host_value, sni, destination, scoped=scoped)
    if isinstance(routed, Refuse):
        return routed
    service = routed
    try:
        path, query = policy.canonical_path(raw_target)
    except policy.PathError as exc:
        return Refuse(exc.status, exc.code, f"bad request target ({exc.code})", service)
    if content_length is not None and content_length > max_body:
        return Refuse(413, "body_too_large", "request body too large", service, path)
    if path == service.callback_path:
        return OwnEndpoint(Endpoint.CALLBACK, service, path, query)
    logout = service.logout_path
    if path.startswith(logout):
        if path == logout:
            return OwnEndpoint(Endpoint.LOGOUT, service, path, query)
        if path == logout + BACKCHANNEL_SUFFIX:
            return OwnEndpoint(Endpoint.BACKCHANNEL, service, path, query)
    identity: Session | None = None
    handle = session_handle(cookies, service)
    if handle is not None:
        identity = cached(handle, service.name, now) if cached is not None else None
        if identity is None:
            return NeedSession(service, path, query, handle)
    return decide(service, method, path, query, identity)


def decide(service: Service, method: str, path: str, query: str, identity: Session | None) -> Decision:
    """The policy's verdict for a routed request whose session (if any) is known."""
    decision = policy.decide(method, path, identity.tags if identity is not None else None, service.table)
    endpoint = decision.endpoint.rule if decision.endpoint else None
    verdict = decision.verdict
    if verdict is policy.Verdict.ALLOW:
        return Forward(
            service, path, path + "?" + query if query else path, identity, endpoint, decision.reason.value,
            identity_headers(service, identity),
        )
    if verdict is policy.Verdict.LOGIN:
        return Login(service, path, query, identity, endpoint, decision.reason.value)
    return Deny(
        service, path, identity, endpoint, decision.reason.value, decision.would_allow, decision.missing
    )


_HOST_CACHE: dict[str, tuple[str, int | None]] = {}
"""Host header value -> :func:`split_host` result (pure; bounded, cleared when full)."""
_HOST_CACHE_MAX = 1024


def split_host(value: str) -> tuple[str, int | None] | None:
    """``Host`` header -> (normalised host, port or None); None if malformed."""
    if not value or any(c in value for c in " \t,@/\\?#"):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[: end + 1], value[end + 1 :]
    else:
        host, _, port_text = value.partition(":")
        rest = ":" + port_text if _ else ""
    port: int | None = None
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit() or len(rest) > 6 or rest[1] == "0":
            return None
        port = int(rest[1:])
        if port > 65535:
            return None
    return normalise_host(host), port


def _host_split(value: str) -> tuple[str, int | None] | None:
    """:func:`split_host`, remembered per header value."""
    split = _HOST_CACHE.get(value)
    if split is None:
        split = split_host(value)
        if split is not None:
            if len(_HOST_CACHE) >= _HOST_CACHE_MAX:
                _HOST_CACHE.clear()
            _HOST_CACHE[value] = split
    return split


def route(
    by_host: Mapping[str, Service], listen_port: int, host_value: str, sni: str | None,
    destination: tuple[str, int] | None, *, scoped: bool = False,
) -> Service | Refuse:
    """The service a request is for, or why it is refused.  Host must name a service (on its
    exposed port or ours), the TLS server name the same one, and a redirected connection must
    have been going to that service's port.

    ``scoped``: ``by_host`` holds only the services of the pod whose listener took the
    connection (the certificates are every pod's, so any served name completes the handshake).
    A Host *or* a TLS server name outside it is then an unknown host, whatever else the request
    says: a pod's listener never leads to another pod's service."""
    split = _host_split(host_value)
    if split is None:
        return Refuse(400, "bad_host", "malformed Host header")
    host, port = split
    service = by_host.get(host)
    if service is None or (port is not None and port not in (service.exposed_port, listen_port)):
        return Refuse(421, "unknown_host", "this host is not served here")
    if sni is not None and by_host.get(sni) is not service:
        if scoped and sni not in by_host:
            return Refuse(421, "unknown_host", "this host is not served here")
        return Refuse(421, "sni_host_mismatch", "TLS server name and Host do not match")
    if destination is not None and destination[1] != service.exposed_port:
        # redirected from another service's exposed port
        return Refuse(421, "destination_mismatch", "this host is not served on this port")
    return service


def session_handle(cookies: list[str], service: Service) -> str | None:
    """The session handle in the service's cookie, if exactly one well-formed one was sent."""
    found, handle = cookies_mod.find_cookie(cookies, cookies_mod.session_cookie_name(service.name))
    return handle if found is cookies_mod.CookieLookup.FOUND else None


def identity_headers(service: Service, identity: Session | None) -> dict[str, str]:
    """The identity headers the app receives for this session (none when anonymous)."""
    out: dict[str, str] = {}
    if identity is None:
        return out
    names = service.identity_headers
    out[names.user] = identity.username or identity.sub
    if identity.email:
        out[names.email] = identity.email
    if names.groups:
        groups = sorted(t.split("=", 1)[1] for t in identity.tags if t.startswith("groups="))
        out[names.groups] = _whole_items(groups, identity.sub)
    return out


_CUT_WARNED: set[str] = set()


def _whole_items(items: list[str], sub: str) -> str:
    """``items`` comma-joined, as many *whole* items as fit the identity header limit once
    percent-encoded (conformance X-LIM-05). A cut item could name another group (``admin``
    out of ``administrators``), so an item is sent whole or not at all; what is left out is
    logged (once per user and process)."""
    kept: list[str] = []
    size = -1
    for item in items:
        rendered = len(headers_mod.clean_value(item))
        if rendered >= headers_mod.MAX_IDENTITY_VALUE or size + 1 + rendered > headers_mod.MAX_IDENTITY_VALUE:
            continue
        size += 1 + rendered
        kept.append(item)
    if len(kept) < len(items) and sub not in _CUT_WARNED:
        if len(_CUT_WARNED) >= 1000:
            _CUT_WARNED.clear()
        _CUT_WARNED.add(sub)
        log.warning(
            "user %s: %d of %d groups do not fit the %d-byte groups header and are not sent to the app",
            sub, len(items) - len(kept), len(items), headers_mod.MAX_IDENTITY_VALUE,
        )
    return ",".join(kept)
