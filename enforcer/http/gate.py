"""The request path, top to bottom: route -> canonicalise -> identify -> decide -> act.

:meth:`Gate.handle` is the one function every request goes through; it writes exactly
one flow record per request whatever happens (including 400s and crashes, which fail
closed with a 500 that reaches nothing).  The OpenID Connect callback and logout
endpoints are handled here too, as explicit steps calling into ``oidc`` and ``session``.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import time
import urllib.parse
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web
from multidict import CIMultiDict

from enforcer import errors, policy
from enforcer.config.definitions import Definitions, Service
from enforcer.config.fields import normalise_host
from enforcer.config.settings import Settings
from enforcer.flow import FlowRecord
from enforcer.flowlog import FlowLog
from enforcer.http import headers as headers_mod
from enforcer.http import pages, proxy
from enforcer.http import upstream as upstream_client
from enforcer.http.server import FRAMING_ERROR
from enforcer.http.tls import sni_of
from enforcer.identity import cookies as cookies_mod
from enforcer.identity import login, oidc, sessions, sqlite
from enforcer.identity import tokens as tokens_mod
from enforcer.metrics import Metrics
from enforcer.net import sockopt

log = logging.getLogger("enforcer.handler")

MAX_RETURN_TO = 2048
BACKCHANNEL_SUFFIX = "/backchannel"  # back-channel logout endpoint: <logout path>/backchannel
MAX_LOGOUT_TOKEN_BODY = 64 << 10
FORBIDDEN_METHODS = frozenset({"TRACE", "TRACK", "CONNECT"})

def transfer_coding_problem(request: web.BaseRequest) -> tuple[int, str] | None:
    """Framing the parser accepted but the enforcer refuses (RFC 9112 §6.1, §2.3)."""
    if request.version not in ((1, 0), (1, 1)):
        return 505, "bad_version"
    if "Transfer-Encoding" not in request.headers:
        return None
    codings = [
        t.strip().lower() for v in request.headers.getall("Transfer-Encoding", []) for t in v.split(",")
    ]
    if not codings:
        return None
    if request.version < (1, 1):
        return 400, "te_in_http10"  # faulty framing: the length cannot be trusted
    if codings != ["chunked"]:
        return 501, "unsupported_transfer_coding"  # only a plain ``chunked`` is forwarded
    return None


@dataclass
class Runtime:
    """Everything derived from one definitions set; replaced as a whole on reload."""

    definitions: Definitions
    providers: dict[str, oidc.Provider]  # by service name
    by_host: dict[str, Service] = field(init=False)

    def __post_init__(self) -> None:
        self.by_host = self.definitions.by_host()


def is_api_request(headers: web.BaseRequest) -> bool:
    """mod_auth_openidc's heuristics: who must get a 401 instead of a redirect."""
    h = headers.headers
    if "X-Requested-With" in h or "Upgrade" in h:
        return True
    mode = h.get("Sec-Fetch-Mode")
    if mode is not None and mode != "navigate":
        return True
    dest = h.get("Sec-Fetch-Dest")
    if dest is not None and dest not in ("document", ""):
        return True
    accept = h.get("Accept", "*/*").lower()
    return not any(t in accept for t in ("text/html", "application/xhtml+xml", "*/*"))


_ConnFacts = tuple[str, str, tuple[str, int] | None, str | None, str | None]
"""(client ip, client ip:port, original destination, SNI, TLS version) of one connection."""

_HOST_CACHE: dict[str, tuple[str, int | None]] = {}
"""Host header value -> :func:`_split_host` result (pure; bounded, cleared when full)."""
_HOST_CACHE_MAX = 1024


def _split_host(value: str) -> tuple[str, int | None] | None:
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
    """:func:`_split_host`, remembered per header value."""
    split = _HOST_CACHE.get(value)
    if split is None:
        split = _split_host(value)
        if split is not None:
            if len(_HOST_CACHE) >= _HOST_CACHE_MAX:
                _HOST_CACHE.clear()
            _HOST_CACHE[value] = split
    return split


class Upstream(Protocol):
    """The apps behind the enforcer, as both request paths use them (:class:`proxy.Upstream`)."""

    async def forward(
        self,
        request: web.BaseRequest,
        *,
        upstream_host: str,
        port: int,
        target: str,
        headers: CIMultiDict[str],
        public_origin: str,
        transfer: proxy.Transfer,
    ) -> web.StreamResponse:
        """Send the request to the app and stream its response to the client."""
        ...

    async def websocket(
        self,
        request: web.BaseRequest,
        *,
        upstream_host: str,
        port: int,
        target: str,
        headers: CIMultiDict[str],
        transfer: proxy.Transfer,
    ) -> web.StreamResponse:
        """Relay a WebSocket (only called after the request was allowed)."""
        ...

    async def send(
        self, *, upstream_host: str, port: int, head: bytes, no_body: bool, transfer: proxy.Transfer
    ) -> tuple[upstream_client.Connection, upstream_client.Head]:
        """Send a bodiless request head (the lean path's GET or HEAD); the response head."""
        ...


class Gate:
    """Decides and acts on every request arriving at the TLS listener."""

    def __init__(
        self,
        *,
        settings: Settings,
        runtime: Runtime,
        store: sessions.SessionStore,
        flowlog: FlowLog,
        metrics: Metrics,
        upstream: Upstream,
        listen_port: int,
        clock: Callable[[], float] = time.time,
        shared_logins: login.SharedTransactionStore | None = None,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.store = store
        self.flowlog = flowlog
        self.metrics = metrics
        self.upstream = upstream
        self.listen_port = listen_port
        self.clock = clock
        s = settings.model
        self.transactions = login.TransactionStore(ttl=s.oidc.loginTimeout)
        self.shared_logins = shared_logins
        """Set when several worker processes serve: pending logins then live in the session file."""
        self.absolute_timeout = s.sessions.absoluteTimeout
        self.max_body = s.limits.maxBodyBytes
        self._callback_inflight: set[str] = set()
        self.redirect_enabled = settings.model.redirect.enabled
        self._destinations: weakref.WeakKeyDictionary[asyncio.BaseTransport, tuple[str, int] | None] = (
            weakref.WeakKeyDictionary()
        )

    # ------------------------------------------------------------------ entry

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Handle one request; exactly one flow record is written, whatever happens."""
        conn = self._connection_facts(request)
        client_ip, client, destination, sni, tls_version = conn
        headers = request.headers
        flow = FlowRecord.begin(
            client=client,
            destination=f"{destination[0]}:{destination[1]}" if destination else None,
            sni=sni,
            host=headers.get("Host"),
            method=request.method,
            path="-",
            now=self.clock(),
            tls_version=tls_version,
            user_agent=headers.get("User-Agent"),
        )
        response: web.StreamResponse | None = None
        try:
            response = await self._handle(request, flow, client_ip, destination)
            return response
        except errors.UpstreamError as exc:
            flow.record(decision="error", reason=f"upstream_{exc.kind}", endpoint=flow.endpoint, user=flow.user)
            if flow.service:
                self.metrics.upstream_errors.labels(flow.service, exc.kind).inc()
            response = pages.error_page(exc.status, f"upstream_{exc.kind}", flow.flow_id,
                                        message="The application did not answer properly.",
                                        close=exc.status == 413)  # the rest of the body is not read
            return response
        except ConnectionResetError:
            # the client went away while we were answering: not our error, nothing to send
            flow.record(decision=flow.decision, reason="client_aborted", endpoint=flow.endpoint)
            flow.status = 499
            raise
        except Exception:
            log.exception("internal error in flow %s", flow.flow_id)
            flow.record(decision="error", reason="internal_error")
            response = pages.error_page(500, "internal_error", flow.flow_id, close=True)
            return response
        finally:
            if response is not None and not response.prepared and "Upgrade" in request.headers:
                # aiohttp stops parsing after an upgrade request: an answer other than 101
                # must end the connection, or the next request would sit there unread
                response.force_close()
            status = response.status if response is not None else None
            if flow.upstream_status is None and flow.decision == "allow":
                flow.upstream_status = status
            self.flowlog.write(flow.finish(now=self.clock(), status=status))
            self.metrics.observe_flow(flow)

    async def _handle(
        self, request: web.BaseRequest, flow: FlowRecord, client_ip: str, destination: tuple[str, int] | None = None
    ) -> web.StreamResponse:
        # 0. the parser refused the bytes, or framing it let through that we do not accept
        # (len() first: BaseRequest.get pays for a KeyError when the key is absent)
        refused = (request.get(FRAMING_ERROR) if len(request) else None) or transfer_coding_problem(request)
        if refused is not None:
            status, reason = refused
            flow.record(decision="bad_request", reason=reason)
            return pages.plain_close(status, pages.TITLES.get(status, "Bad request"))
        # 1. framing the HTTP parser cannot see: names with '_', odd methods, Host
        for name in request.headers:
            if "_" in name:
                flow.record(decision="bad_request", reason="underscore_header")
                return pages.plain_close(400, "header names with '_' are not accepted")
        if request.method in FORBIDDEN_METHODS:
            flow.record(decision="bad_request", reason="method_not_supported")
            return pages.plain_close(405, "method not supported")
        upgrade = request.headers.get("Upgrade")
        if upgrade is not None and upgrade.strip().lower() != "websocket":
            flow.record(decision="bad_request", reason="upgrade_not_supported")  # h2c smuggling (X-SMG-13)
            return pages.plain_close(400, "only WebSocket upgrades are supported")
        hosts = request.headers.getall("Host", [])
        if len(hosts) != 1 and request.version >= (1, 1):
            flow.record(decision="bad_request", reason="bad_host")
            return pages.plain_close(400, "exactly one Host header is required")
        raw_target = request.raw_path
        host_value = hosts[0] if hosts else ""
        if not raw_target.startswith("/"):
            if raw_target == "*" and request.method == "OPTIONS":
                flow.record(decision="bad_request", reason="asterisk_form")
                allow = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
                return web.Response(status=200, headers={"Allow": allow, "Content-Length": "0"})
            absolute = urllib.parse.urlsplit(raw_target)
            if absolute.scheme.lower() != "https" or not absolute.netloc:
                flow.record(decision="bad_request", reason="bad_target")
                return pages.plain_close(400, "bad request target")
            host_value = absolute.netloc
            raw_target = urllib.parse.urlunsplit(("", "", absolute.path or "/", absolute.query, ""))

        # 2. which service: SNI and Host must agree
        routed = self._route(host_value, flow.sni, destination)
        if not isinstance(routed, Service):
            status, reason, text = routed
            flow.record(decision="bad_request", reason=reason)
            return pages.plain_close(status, text)
        service = routed
        flow.service = service.name

        # 3. one canonical path: logged, matched and forwarded
        try:
            path, query = policy.canonical_path(raw_target)
        except policy.PathError as exc:
            flow.record(decision="bad_request", reason=exc.code)
            return pages.plain_close(exc.status, f"bad request target ({exc.code})")
        flow.path = path
        if request.content_length is not None and request.content_length > self.max_body:
            flow.record(decision="bad_request", reason="body_too_large")
            return pages.plain_close(413, "request body too large")

        # 4. the enforcer's own endpoints
        if path == service.callback_path:
            return await self._callback(request, flow, service, query)
        if path == service.logout_path:
            return await self._logout(request, flow, service)
        if path == service.logout_path + BACKCHANNEL_SUFFIX:
            return await self._backchannel_logout(request, flow, service)

        # 5. who is asking
        now = self.clock()
        identity = await self._session(request, service, now)
        tags = identity.tags if identity is not None else None
        if identity is not None:
            flow.user, flow.email = identity.sub, identity.email

        # 6. decide
        decision = policy.decide(request.method, path, tags, service.table)
        endpoint = decision.endpoint.rule if decision.endpoint else None
        if decision.verdict is policy.Verdict.LOGIN:
            flow.record(decision="login", reason=decision.reason.value, endpoint=endpoint)
            return await self._begin_login(request, flow, service, path, query)
        if decision.verdict is policy.Verdict.DENY:
            flow.record(decision="deny", reason=decision.reason.value, endpoint=endpoint)
            return self._close_if_body(request, pages.error_page(
                403, decision.reason.value, flow.flow_id,
                message="You are signed in, but this request is not allowed for you.",
                would_allow=decision.would_allow, missing=decision.missing,
            ))
        flow.record(decision="allow", reason=decision.reason.value, endpoint=endpoint)

        # 7. forward
        identity_headers = _identity_headers(service, identity)
        websocket = (
            request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in request.headers.get("Connection", "").lower()
        )
        headers = headers_mod.request_headers(
            request.headers, identity=identity_headers, client_ip=client_ip, host=host_value, websocket=websocket
        )
        target = path + ("?" + query if query else "")
        transfer = proxy.Transfer()
        try:
            if websocket:
                return await self.upstream.websocket(
                    request, upstream_host=service.upstream_host, port=service.port, target=target,
                    headers=headers, transfer=transfer,
                )
            return await self.upstream.forward(
                request, upstream_host=service.upstream_host, port=service.port, target=target,
                headers=headers, public_origin=service.origin, transfer=transfer,
            )
        finally:
            flow.upstream_status = transfer.status
            flow.upstream_ms = transfer.upstream_ms
            flow.bytes_in, flow.bytes_out = transfer.bytes_in, transfer.bytes_out
            # (the upstream duration is observed once, by metrics.observe_flow)

    def _route(
        self, host_value: str, sni: str | None, destination: tuple[str, int] | None
    ) -> Service | tuple[int, str, str]:
        """The service a request is for, or why it is refused: (status, reason code, text).
        Host must name a service (on its exposed port or ours), the TLS server name the same
        one, and a redirected connection must have been going to that service's port."""
        split = _host_split(host_value)
        if split is None:
            return 400, "bad_host", "malformed Host header"
        host, port = split
        by_host = self.runtime.by_host
        service = by_host.get(host)
        if service is None or (port is not None and port not in (service.exposed_port, self.listen_port)):
            return 421, "unknown_host", "this host is not served here"
        if sni is not None and by_host.get(sni) is not service:
            return 421, "sni_host_mismatch", "TLS server name and Host do not match"
        if destination is not None and destination[1] != service.exposed_port:
            # redirected from another service's exposed port
            return 421, "destination_mismatch", "this host is not served on this port"
        return service

    # ------------------------------------------------------------------ fast path

    def fast_plan(
        self, method: str, raw_target: str, host_value: str, cookies: list[str], facts: _ConnFacts
    ) -> FastPlan | None:
        """The plan for a request :mod:`enforcer.fastpath` may forward itself, or None.

        The caller has checked the framing (a GET or HEAD in HTTP/1.1 with one Host, no body,
        no upgrade, an origin-form target, plain header names and values).  This runs the
        same steps as :meth:`_handle` -- route, canonicalise, identify, decide -- with the
        same helpers, and answers None wherever :meth:`_handle` would do anything but
        forward at once (a refusal, an enforcer endpoint, a session not in the cache or due
        a touch, a verdict other than allow).  None has no side effects: the request then
        goes, unchanged, to :meth:`handle`, which gives the one authoritative answer.
        """
        _, _, destination, sni, _ = facts
        service = self._route(host_value, sni, destination)
        if not isinstance(service, Service):
            return None
        try:
            path, query = policy.canonical_path(raw_target)
        except policy.PathError:
            return None
        if path == service.callback_path or path.startswith(service.logout_path):
            return None  # the enforcer's own endpoints (logout and <logout>/backchannel)
        identity: sessions.Session | None = None
        handle = _session_handle(cookies, service)
        if handle is not None:
            store = self.store
            if type(store) is not sqlite.SQLiteSessionStore:
                return None
            identity = store.get_cached(handle, service.name, self.clock())
            if identity is None:
                return None  # not cached, expired, revoked or due a touch: the slow path decides
        decision = policy.decide(method, path, identity.tags if identity is not None else None, service.table)
        if decision.verdict is not policy.Verdict.ALLOW:
            return None
        return FastPlan(
            service=service,
            path=path,
            target=path + ("?" + query if query else ""),
            identity=identity,
            endpoint=decision.endpoint.rule if decision.endpoint else None,
            reason=decision.reason.value,
            identity_headers=_identity_headers(service, identity),
        )

    # ------------------------------------------------------------------ helpers

    def _connection_facts(self, request: web.BaseRequest) -> _ConnFacts:
        """Peer, SNI, TLS version and original destination: per connection, so computed once
        and kept on the server protocol object (one per client connection)."""
        protocol = request.protocol
        facts = getattr(protocol, "enforcer_facts", None)
        if type(facts) is tuple:
            return facts
        facts = self.connection_facts(request.transport)
        if request.transport is not None and protocol is not None:
            with contextlib.suppress(AttributeError):  # a protocol without a __dict__: no cache
                protocol.enforcer_facts = facts  # type: ignore[attr-defined]
        return facts

    def connection_facts(self, transport: asyncio.BaseTransport | None) -> _ConnFacts:
        """(client ip, client ip:port, original destination, SNI, TLS version) of a connection."""
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        peer = transport.get_extra_info("peername") if transport else None
        # the dual-stack [::] listener the redirect needs reports IPv4 clients as ::ffff:a.b.c.d
        client_ip = str(peer[0]) if peer else "-"
        if client_ip.startswith("::ffff:") and "." in client_ip:
            client_ip = client_ip[7:]
        destination = self._destination(transport) if self.redirect_enabled else None
        return (
            client_ip,
            f"{client_ip}:{peer[1]}" if peer else "-",
            destination,
            sni_of(ssl_object),
            ssl_object.version() if ssl_object is not None else None,
        )

    def _destination(self, transport: asyncio.BaseTransport | None) -> tuple[str, int] | None:
        """Where a redirected connection was going (cached per connection: one syscall)."""
        if transport is None:
            return None
        try:
            return self._destinations[transport]
        except KeyError:
            pass
        except TypeError:  # a transport that cannot be weakly referenced (uvloop)
            sock = transport.get_extra_info("socket")
            return sockopt.redirected_destination(sock) if sock is not None else None
        sock = transport.get_extra_info("socket")
        found = sockopt.redirected_destination(sock) if sock is not None else None
        self._destinations[transport] = found
        return found

    @staticmethod
    def _close_if_body(request: web.BaseRequest, response: web.Response) -> web.Response:
        """A request whose body we will not read must not leave bytes on the connection."""
        if request.body_exists:
            response.force_close()
        return response

    async def _session(self, request: web.BaseRequest, service: Service, now: float) -> sessions.Session | None:
        handle = _session_handle(request.headers.getall("Cookie", []), service)
        if handle is None:
            return None
        cached = self.store.get_cached(handle, service.name, now)  # no touch due: no coroutine
        if cached is not None:
            return cached
        return await self.store.get(handle, service.name, now)

    def _provider(self, service: Service) -> login.Provider:
        return self.runtime.providers[service.name]

    async def _begin_login(
        self, request: web.BaseRequest, flow: FlowRecord, service: Service, path: str, query: str
    ) -> web.StreamResponse:
        """Unauthenticated: a 302 to the IdP for browsers, 401 for API clients."""
        login_url = service.origin + path
        if is_api_request(request) or request.method not in ("GET", "HEAD"):
            resp = pages.json_error(401, "login_required", flow.flow_id, login_url=login_url)
            return self._close_if_body(request, resp)
        try:
            metadata = await self._provider(service).discover()
        except tokens_mod.OIDCError as exc:
            flow.record(decision="error", reason="idp_unavailable")
            log.warning("service %s: cannot start a login: %s", service.name, exc)
            return pages.error_page(503, "idp_unavailable", flow.flow_id,
                                    message="The identity provider cannot be reached; try again shortly.")
        return_to = path + ("?" + query if query else "")
        if len(return_to) > MAX_RETURN_TO:
            return_to = "/"
        now = self.clock()
        url, txn, binding = login.start_login(
            metadata=metadata, client_id=service.client_id, redirect_uri=service.callback_url,
            scopes=service.scopes, service=service.name, return_to=return_to, now=now,
        )
        if self.shared_logins is not None:
            try:
                await self.shared_logins.add(txn)
            except Exception:
                log.exception("service %s: cannot store a pending login", service.name)
                flow.record(decision="error", reason="session_store_error")
                return pages.error_page(503, "session_store_error", flow.flow_id,
                                        message="Sign-in is unavailable right now; try again shortly.")
        else:
            self.transactions.add(txn)
        self.metrics.logins.labels(service.name, "started").inc()
        cookie_headers = request.headers.getall("Cookie", [])
        cookies = [cookies_mod.clear_cookie_header(name) for name in login.stale_tx_cookies(cookie_headers)]
        session_cookie = cookies_mod.session_cookie_name(service.name)
        stale, _ = cookies_mod.find_cookie(cookie_headers, session_cookie)
        if stale is not cookies_mod.CookieLookup.ABSENT:
            # We only get here without a live session: drop the dead or planted one (S-ID-02).
            cookies.append(cookies_mod.clear_cookie_header(session_cookie))
        cookies.append(cookies_mod.set_cookie_header(
            login.tx_cookie_name(txn.state), login.tx_cookie_value(now, binding), max_age=int(self.transactions.ttl)
        ))
        return pages.redirect(url, set_cookies=cookies)

    # ------------------------------------------------------------------ callback

    def _login_rules(self, service: Service) -> login.LoginRules:
        """What the callback checks of ``service`` and of the OIDC settings."""
        s = self.settings.model.oidc
        return login.LoginRules(
            service=service.name, client_id=service.client_id, scopes=service.scopes, userinfo=service.userinfo,
            leeway=s.leeway, max_id_token_age=s.maxIdTokenAge, session_lifetime=self.absolute_timeout,
        )

    async def _callback(
        self, request: web.BaseRequest, flow: FlowRecord, service: Service, query: str
    ) -> web.StreamResponse:
        """The IdP sent the browser back: the checks of :mod:`enforcer.identity.login`, each
        after the I/O it needs, then a new session."""
        flow.record(decision="callback", reason="login_failed")

        def fail(failure: login.LoginFailure, *, clear: str | None = None) -> web.Response:
            flow.record(decision="callback", reason=failure.code)
            self.metrics.logins.labels(service.name, "failure").inc()
            log.info("login failed for service %s: %s (flow %s)", service.name, failure.code, flow.flow_id)
            resp = pages.error_page(failure.status, failure.code, flow.flow_id, message=failure.message,
                                    retry_url=service.origin + "/")
            if clear:
                resp.headers.add("Set-Cookie", cookies_mod.clear_cookie_header(clear))
            return self._close_if_body(request, resp) if failure.status == 405 else resp

        params = login.parse_callback(request.method, request.raw_path, service.callback_path, query)
        if isinstance(params, login.LoginFailure):
            return fail(params)
        state = params["state"]
        if state in self._callback_inflight:
            return fail(login.LoginFailure(errors.Reason.CALLBACK_REPLAYED))
        tx_name = login.tx_cookie_name(state)
        now = self.clock()
        if self.shared_logins is not None:  # one DELETE ... RETURNING: a second pop gets None
            popped = await self.shared_logins.pop(state, now)
        else:
            popped = self.transactions.pop(state, now)
        txn = login.check_transaction(popped, service=service.name, cookie_headers=request.headers.getall("Cookie", []))
        if isinstance(txn, login.LoginFailure):
            return fail(txn, clear=tx_name)
        provider = self._provider(service)
        try:
            metadata = await provider.discover()
        except tokens_mod.OIDCError as exc:
            log.warning("service %s: callback without IdP metadata: %s", service.name, exc)
            return fail(login.IDP_UNAVAILABLE, clear=tx_name)
        code = login.check_response_params(params, txn, iss_parameter_supported=metadata.iss_parameter_supported)
        if isinstance(code, login.LoginFailure):
            return fail(code, clear=tx_name)
        rules = self._login_rules(service)
        self._callback_inflight.add(state)
        try:
            tokens = await provider.exchange_code(
                code=code, redirect_uri=txn.redirect_uri, code_verifier=txn.code_verifier,
                client_id=service.client_id, client_secret=service.client_secret,
            )
            verified = await provider.verify(tokens.id_token)
            claims = login.check_id_token(verified, tokens, txn, rules, self.clock())
            if isinstance(claims, login.LoginFailure):
                return fail(claims, clear=tx_name)
            info = await provider.userinfo(tokens.access_token) if login.wants_userinfo(tokens, rules, claims) else None
        except tokens_mod.OIDCError as exc:
            return fail(login.LoginFailure.of(exc), clear=tx_name)
        finally:
            self._callback_inflight.discard(state)
        new = login.complete_login(claims, info, tokens=tokens, txn=txn, rules=rules, now=self.clock())
        if isinstance(new, login.LoginFailure):
            return fail(new, clear=tx_name)

        cookie_name = cookies_mod.session_cookie_name(service.name)
        old_found, old_handle = cookies_mod.find_cookie(request.headers.getall("Cookie", []), cookie_name)
        if old_found is cookies_mod.CookieLookup.FOUND and old_handle:
            await self.store.delete(old_handle)  # a new handle at each login (no fixation)
        handle = await self.store.create(new)
        flow.record(decision="callback", reason="login_success", user=new.sub, email=new.email)
        self.metrics.logins.labels(service.name, "success").inc()
        return pages.redirect(
            service.origin + txn.return_to,
            set_cookies=[
                cookies_mod.clear_cookie_header(tx_name),
                cookies_mod.set_cookie_header(cookie_name, handle, max_age=int(self.absolute_timeout)),
            ],
        )

    # ------------------------------------------------------------------ logout

    async def _logout(self, request: web.BaseRequest, flow: FlowRecord, service: Service) -> web.StreamResponse:
        """End the session here and, when the IdP offers it, at the IdP too."""
        flow.record(decision="logout", reason="logout")
        answer = login.logout_answer(
            request.method, request.headers.get("Sec-Fetch-Site"), request.headers.get("Origin"), service.origin
        )
        if answer is login.LogoutAnswer.METHOD_NOT_ALLOWED:
            return pages.plain_close(405, "method not allowed")
        if answer is login.LogoutAnswer.CONFIRM:
            flow.record(decision="logout", reason="logout_confirm")
            form = (
                f"<form method=post action='{html.escape(service.logout_path, quote=True)}'>"
                "<p>Do you want to sign out?</p><button type=submit>Sign out</button></form>"
            )
            return pages.info_page("Sign out", form)
        cookie_name = cookies_mod.session_cookie_name(service.name)
        found, handle = cookies_mod.find_cookie(request.headers.getall("Cookie", []), cookie_name)
        current = None
        if found is cookies_mod.CookieLookup.FOUND and handle:
            current = await self.store.pop(handle, service.name, self.clock())
        if current is not None:
            flow.user, flow.email = current.sub, current.email
        clear = [cookies_mod.clear_cookie_header(cookie_name)]
        metadata = self._provider(service).metadata
        if current is not None and metadata is not None and metadata.end_session_endpoint:
            end_session = login.end_session_url(
                metadata.end_session_endpoint, client_id=service.client_id, id_token=current.id_token,
                post_logout_redirect=service.post_logout_redirect,
            )
            return pages.redirect(end_session, set_cookies=clear)
        return pages.info_page(
            "Signed out",
            "<p>You are signed out of this application.</p>"
            f"<p><a href='{html.escape(service.origin, quote=True)}/'>Sign in again</a></p>",
            set_cookies=clear,
        )

    async def _backchannel_logout(
        self, request: web.BaseRequest, flow: FlowRecord, service: Service
    ) -> web.StreamResponse:
        """OIDC Back-Channel Logout 1.0: the IdP POSTs a signed logout token; the sessions it
        names (by ``sid``, else every session of ``sub``) end.  No cookie plays any role."""
        headers = dict(pages.SECURITY_HEADERS)

        def answer(status: int, reason: str, error: str | None = None) -> web.Response:
            flow.record(decision="logout", reason=reason)
            body = json.dumps({"error": error}) if error else ""
            resp = web.Response(status=status, text=body, headers=headers,
                                content_type="application/json" if error else "text/plain")
            return self._close_if_body(request, resp) if status >= 400 else resp

        if request.method != "POST":
            headers["Allow"] = "POST"
            return answer(405, "backchannel_method", "invalid_request")
        if request.content_type != "application/x-www-form-urlencoded":
            return answer(400, "backchannel_content_type", "invalid_request")
        if request.content_length is not None and request.content_length > MAX_LOGOUT_TOKEN_BODY:
            return answer(413, "backchannel_too_large", "invalid_request")
        raw = await request.content.read(MAX_LOGOUT_TOKEN_BODY + 1)
        if len(raw) > MAX_LOGOUT_TOKEN_BODY:
            return answer(413, "backchannel_too_large", "invalid_request")
        try:
            pairs = urllib.parse.parse_qsl(raw.decode("ascii"), keep_blank_values=True, strict_parsing=True,
                                           max_num_fields=10)
        except (ValueError, UnicodeDecodeError):
            return answer(400, "backchannel_malformed", "invalid_request")
        tokens = [v for k, v in pairs if k == "logout_token"]
        if len(tokens) != 1 or not tokens[0]:
            return answer(400, "backchannel_no_token", "invalid_request")
        provider = self._provider(service)
        s = self.settings.model.oidc
        try:
            verified = await provider.verify(tokens[0], logout=True)
            sub, sid = tokens_mod.check_logout_claims(
                verified.claims, issuer=service.issuer, client_id=service.client_id,
                now=self.clock(), leeway=s.leeway, max_age=s.maxIdTokenAge,
            )
        except tokens_mod.OIDCError as exc:
            code = exc.code.replace("id_token_", "logout_token_")
            log.info("back-channel logout refused for service %s: %s (flow %s)", service.name, code, flow.flow_id)
            return answer(400, code, "invalid_request")
        # With a sid only that IdP session ends; with only a sub every session of the user.
        ended = await self.store.delete_matching(issuer=service.issuer, sub=sub, sid=sid)
        if sub is not None:
            flow.user = sub
        log.info("back-channel logout for service %s ended %d session(s) (flow %s)", service.name, ended,
                 flow.flow_id)
        return answer(200, "backchannel_logout")


@dataclass(slots=True)
class FastPlan:
    """What :meth:`Gate.fast_plan` decided for an allowed request: where and as whom to forward."""

    service: Service
    path: str  # canonical path (logged and matched)
    target: str  # path and query towards the app
    identity: sessions.Session | None
    endpoint: str | None
    reason: str
    identity_headers: dict[str, str]


def _identity_headers(service: Service, identity: sessions.Session | None) -> dict[str, str]:
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


def _session_handle(cookies: list[str], service: Service) -> str | None:
    """The session handle in the service's cookie, if exactly one well-formed one was sent."""
    found, handle = cookies_mod.find_cookie(cookies, cookies_mod.session_cookie_name(service.name))
    return handle if found is cookies_mod.CookieLookup.FOUND else None

