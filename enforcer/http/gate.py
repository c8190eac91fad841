"""The request path, top to bottom: route -> canonicalise -> identify -> decide -> act.

:meth:`Gate.handle` is the one function every request goes through; it writes exactly
one flow record per request whatever happens (including 400s and crashes, which fail
closed with a 500 that reaches nothing).  The OpenID Connect callback and logout
endpoints are handled here too, as explicit steps calling into ``oidc`` and ``session``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web
from multidict import CIMultiDict

from enforcer import errors
from enforcer.config.definitions import Definitions, Service
from enforcer.config.settings import Settings
from enforcer.errors import Outcome, Reason
from enforcer.flow import FlowIds, FlowRecord
from enforcer.flowlog import FlowLog
from enforcer.http import headers as headers_mod
from enforcer.http import pages, proxy, relay
from enforcer.http import plan as plan_mod
from enforcer.http import server as server_mod
from enforcer.http import upstream as upstream_client
from enforcer.http.plan import Deny, Endpoint, Forward, Login, NeedSession, OwnEndpoint, Refuse
from enforcer.http.server import FRAMING_ERROR
from enforcer.http.tls import ConnectionInfo, connection_info
from enforcer.identity import cookies as cookies_mod
from enforcer.identity import crypto, login, oidc, sessions
from enforcer.identity import tokens as tokens_mod
from enforcer.metrics import Metrics

log = logging.getLogger("enforcer.handler")

MAX_RETURN_TO = 2048
MAX_LOGOUT_TOKEN_BODY = 64 << 10
FORBIDDEN_METHODS = frozenset({"TRACE", "TRACK", "CONNECT"})
REFRESH_RETRY = 30.0
"""Seconds before a refresh that failed for the provider's fault is tried again (claims still valid)."""
_TRANSIENT = frozenset({Reason.TOKEN_SERVER_ERROR, Reason.TOKEN_TEMPORARILY_UNAVAILABLE, Reason.TOKEN_UNREACHABLE})

def transfer_coding_problem(request: web.BaseRequest) -> tuple[int, str] | None:
    """Framing the parser accepted but the enforcer refuses (RFC 9112 §6.1, §2.3)."""
    if request.version not in ((1, 0), (1, 1)):
        return 505, Reason.BAD_VERSION
    if "Transfer-Encoding" not in request.headers:
        return None
    codings = [
        t.strip().lower() for v in request.headers.getall("Transfer-Encoding", []) for t in v.split(",")
    ]
    if not codings:
        return None
    if request.version < (1, 1):
        return 400, Reason.TE_IN_HTTP10  # faulty framing: the length cannot be trusted
    if codings != ["chunked"]:
        return 501, Reason.UNSUPPORTED_TRANSFER_CODING  # only a plain ``chunked`` is forwarded
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


def _connection_info(request: web.BaseRequest) -> ConnectionInfo:
    """What the request's connection is: built once by the serving protocol (computed here only
    under a protocol that is not ours, such as a test's plain aiohttp server)."""
    protocol = request.protocol
    if type(protocol) is server_mod.Protocol and protocol.info is not None:
        return protocol.info
    transport = request.transport
    if transport is None:
        return connection_info(None, None, None)
    return connection_info(transport.get_extra_info("peername"), None, transport.get_extra_info("ssl_object"))


def _client_gone() -> web.Response:
    """The answer to a client that has gone: never seen, it only ends the connection."""
    response = web.Response(status=400)
    response.force_close()
    return response


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
        flow_ids: Callable[[], str] | None = None,
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
        self.flow_ids = flow_ids if flow_ids is not None else FlowIds()
        s = settings.model
        self.transactions = login.TransactionStore(ttl=s.oidc.loginTimeout)
        self.shared_logins = shared_logins
        """Set when several worker processes serve: pending logins then live in the session file."""
        self.absolute_timeout = s.sessions.absoluteTimeout
        self.max_body = s.limits.maxBodyBytes
        self.header_rule = headers_mod.HeaderRule(s.limits.stripHeaders)
        self._callback_inflight: set[str] = set()
        key_file = s.sessions.refreshTokenKeyFile
        self._key_file = key_file
        self._key_stamp = crypto.file_stamp(key_file) if key_file is not None else None
        self.cipher = crypto.TokenCipher.from_file(key_file) if key_file is not None else None
        """Seals refresh tokens; None: no refresh token is kept (and claims are never refreshed)."""
        self.refresh_margin = s.sessions.refreshMargin
        self.refresh_lease = 3 * s.oidc.httpTimeout + 5
        self._refreshing: dict[str, asyncio.Task[sessions.Session | None]] = {}
        self._refresh_retry: dict[str, float] = {}
        # the lean path's session lookup: one more comparison only when refresh is configured
        self._cached = self._cached_fresh if self.cipher is not None else store.get_cached
        self.backchannel_rate = server_mod.RateLimit(
            s.limits.backchannelPerIP, s.limits.backchannelBurst, loopback=s.limits.rateLimitLoopback
        )

    # ------------------------------------------------------------------ entry

    def reload_keys(self) -> bool:
        """Re-read ``sessions.refreshTokenKeyFile`` if it changed since it was read (a key
        rotation: the new key first, the old ones after it): from now on tokens are sealed with
        the new key and those sealed with a listed old key still open (re-sealed at their next
        refresh). A file that no longer reads or holds no usable key keeps the keys in force,
        logged once per change. Returns whether the keys were replaced."""
        if self._key_file is None:
            return False
        stamp = crypto.file_stamp(self._key_file)
        if stamp == self._key_stamp:
            return False
        self._key_stamp = stamp
        try:
            cipher = crypto.TokenCipher.from_file(self._key_file)
        except crypto.KeyFileError as exc:
            log.error("sessions.refreshTokenKeyFile changed but cannot be used (%s); the keys in force stay", exc)
            return False
        self.cipher = cipher
        log.info("sessions.refreshTokenKeyFile re-read: %d key(s); new refresh tokens are sealed with key %s",
                 cipher.key_count, cipher.current)
        return True

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Handle one request; exactly one flow record is written, whatever happens."""
        info = _connection_info(request)
        headers = request.headers
        flow = relay.begin(
            info, host=headers.get("Host"), method=request.method, path="-", user_agent=headers.get("User-Agent"),
            now=self.clock(), flow_id=self.flow_ids(),
        )
        response: web.StreamResponse | None = None
        gone = False
        transfer = proxy.Transfer()  # (untouched unless the request is forwarded)
        try:
            response = await self._handle(request, flow, info, transfer)
            return response
        except Exception as exc:
            _, response = relay.failure(flow, exc, self.metrics)
            if response is None:
                # the client went away: nothing to tell it, and nothing for aiohttp to log as our
                # error (raising would); this closes the connection quietly, its write is dropped
                gone = True
                return _client_gone()
            return response
        finally:
            if gone:
                response = None
            if response is not None and not response.prepared:
                # not streamed from the app: the enforcer's own answer names its flow
                response.headers[pages.FLOW_HEADER] = flow.flow_id
                if "Upgrade" in request.headers:
                    # aiohttp stops parsing after an upgrade request: an answer other than 101
                    # must end the connection, or the next request would sit there unread
                    response.force_close()
            relay.finish(
                flow, transfer, response.status if response is not None else None, flowlog=self.flowlog,
                metrics=self.metrics, now=self.clock(),
            )

    async def _handle(
        self, request: web.BaseRequest, flow: FlowRecord, info: ConnectionInfo, transfer: proxy.Transfer
    ) -> web.StreamResponse:
        """The framing checks only this path needs, then the plan and the act on it."""
        # 0. the parser refused the bytes, or framing it let through that we do not accept
        # (len() first: BaseRequest.get pays for a KeyError when the key is absent)
        refused = (request.get(FRAMING_ERROR) if len(request) else None) or transfer_coding_problem(request)
        if refused is not None:
            status, reason = refused
            flow.record(decision=Outcome.BAD_REQUEST, reason=reason)
            return pages.plain_close(status, pages.TITLES.get(status, "Bad request"), flow.flow_id)
        # 1. framing the HTTP parser cannot see: names with '_', odd methods, Host
        for name in request.headers:
            if "_" in name:
                flow.record(decision=Outcome.BAD_REQUEST, reason=Reason.UNDERSCORE_HEADER)
                return pages.plain_close(400, "header names with '_' are not accepted", flow.flow_id)
        if request.method in FORBIDDEN_METHODS:
            flow.record(decision=Outcome.BAD_REQUEST, reason=Reason.METHOD_NOT_SUPPORTED)
            return pages.plain_close(405, "method not supported", flow.flow_id)
        upgrade = request.headers.get("Upgrade")
        if upgrade is not None and upgrade.strip().lower() != "websocket":
            flow.record(decision=Outcome.BAD_REQUEST, reason=Reason.UPGRADE_NOT_SUPPORTED)  # h2c smuggling (X-SMG-13)
            return pages.plain_close(400, "only WebSocket upgrades are supported", flow.flow_id)
        hosts = request.headers.getall("Host", [])
        if len(hosts) != 1 and request.version >= (1, 1):
            flow.record(decision=Outcome.BAD_REQUEST, reason=Reason.BAD_HOST)
            return pages.plain_close(400, "exactly one Host header is required", flow.flow_id)
        raw_target = request.raw_path
        host_value = hosts[0] if hosts else ""
        if not raw_target.startswith("/"):
            if raw_target == "*" and request.method == "OPTIONS":
                flow.record(decision=Outcome.BAD_REQUEST, reason=Reason.ASTERISK_FORM)
                allow = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
                return web.Response(status=200, headers={"Allow": allow, "Content-Length": "0"})
            absolute = urllib.parse.urlsplit(raw_target)
            if absolute.scheme.lower() != "https" or not absolute.netloc:
                flow.record(decision=Outcome.BAD_REQUEST, reason=Reason.BAD_TARGET)
                return pages.plain_close(400, "bad request target", flow.flow_id)
            host_value = absolute.netloc
            raw_target = urllib.parse.urlunsplit(("", "", absolute.path or "/", absolute.query, ""))

        # 2-6. route, canonical path, own endpoints, session, decide
        plan = self.plan(
            request.method, raw_target, host_value, request.headers.getall("Cookie", []), info=info,
            content_length=request.content_length,
        )
        if isinstance(plan, Refuse):
            if plan.service is not None:
                flow.service = plan.service.name
            if plan.path is not None:
                flow.path = plan.path
            flow.record(decision=Outcome.BAD_REQUEST, reason=plan.reason)
            return pages.plain_close(plan.status, plan.text, flow.flow_id)
        service = plan.service
        flow.service = service.name
        flow.path = plan.path
        if isinstance(plan, OwnEndpoint):
            if plan.endpoint is Endpoint.CALLBACK:
                return await self._callback(request, flow, service, plan.query)
            if plan.endpoint is Endpoint.LOGOUT:
                return await self._logout(request, flow, service)
            return await self._backchannel_logout(request, flow, service)
        if isinstance(plan, NeedSession):
            identity = await self.store.get(plan.handle, service.name, self.clock())
            if identity is not None and identity.claims_expire is not None and self.cipher is not None:
                identity = await self._fresh_claims(plan.handle, service, identity)
            plan = plan_mod.decide(service, request.method, plan.path, plan.query, identity)
        if isinstance(plan, Login):
            if plan.identity is not None:
                flow.user, flow.email = plan.identity.sub, plan.identity.email
            flow.record(decision=Outcome.LOGIN, reason=plan.reason, endpoint=plan.endpoint)
            return await self._begin_login(request, flow, service, plan.path, plan.query)
        if isinstance(plan, Deny):
            if plan.identity is not None:
                flow.user, flow.email = plan.identity.sub, plan.identity.email
            flow.record(decision=Outcome.DENY, reason=plan.reason, endpoint=plan.endpoint)
            flow.note_deny(would_allow=plan.would_allow, missing=plan.missing,
                           tags=plan.identity.tags if plan.identity is not None else None)
            shown = self.settings.model.denyPage
            return self._close_if_body(request, pages.deny_page(
                plan.reason, flow.flow_id, rule=plan.endpoint, would_allow=plan.would_allow, missing=plan.missing,
                show=shown.show, group_claims=shown.groupClaims, sign_out_url=service.logout_path,
            ))
        relay.allowed(flow, plan)
        return await self._forward(request, plan, info, host_value, transfer)  # 7. forward

    def refused(self, info: ConnectionInfo, reason: Reason, status: int | None) -> str:
        """A connection refused before any request was read (:meth:`server_mod.Server.refused`:
        an unknown server name, a missed header deadline): write its flow record; its id."""
        now = self.clock()
        flow = relay.begin(info, host=None, method="-", path="-", user_agent=None, now=now, flow_id=self.flow_ids())
        flow.record(decision=Outcome.BAD_REQUEST, reason=reason)
        relay.finish(flow, None, status, flowlog=self.flowlog, metrics=self.metrics, now=now)
        return flow.flow_id

    async def _forward(
        self, request: web.BaseRequest, plan: Forward, info: ConnectionInfo, host_value: str,
        transfer: proxy.Transfer,
    ) -> web.StreamResponse:
        """Forward an allowed request (or WebSocket) to the app and relay its answer."""
        service = plan.service
        websocket = (
            request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in request.headers.get("Connection", "").lower()
        )
        headers = headers_mod.request_headers(
            request.headers, identity=plan.identity_headers, client_ip=info.client_ip, host=host_value,
            websocket=websocket, rule=self.header_rule,
        )
        scope = info.scope  # a pod's listener: its own pool, into its namespace
        upstream = self.upstream if scope is None else scope.upstream
        if websocket:
            return await upstream.websocket(
                request, upstream_host=service.upstream_host, port=service.port, target=plan.target,
                headers=headers, transfer=transfer,
            )
        return await upstream.forward(
            request, upstream_host=service.upstream_host, port=service.port, target=plan.target,
            headers=headers, public_origin=service.origin, transfer=transfer,
        )

    def plan(
        self, method: str, raw_target: str, host_value: str, cookies: list[str], *, info: ConnectionInfo,
        content_length: int | None = None,
    ) -> plan_mod.Plan:
        """:func:`plan_mod.plan_request` for this gate's services, session cache and clock: the
        one plan both HTTP paths act on (the lean path forwards a :class:`Forward` itself and
        hands anything else to :meth:`handle`). A connection a pod's listener accepted is routed
        among that pod's services only (its :class:`~enforcer.http.scope.Scope`)."""
        scope = info.scope
        if scope is None:
            return plan_mod.plan_request(
                self.runtime.by_host, self.listen_port, method, raw_target, host_value, sni=info.sni,
                destination=info.destination, cookies=cookies, cached=self._cached, now=self.clock(),
                content_length=content_length, max_body=self.max_body,
            )
        return plan_mod.plan_request(
            scope.by_host, scope.listen_port, method, raw_target, host_value, sni=info.sni,
            destination=info.destination, cookies=cookies, cached=self._cached, now=self.clock(),
            content_length=content_length, max_body=self.max_body, scoped=True,
        )

    def _cached_fresh(self, handle: str, service: str, now: float) -> sessions.Session | None:
        """The store's cached session unless its claims are due for a refresh (then the
        request takes the full path, which refreshes): one comparison per request."""
        found = self.store.get_cached(handle, service, now)
        if found is not None and found.claims_expire is not None and now >= found.claims_expire - self.refresh_margin:
            return None
        return found

    # ------------------------------------------------------------------ refresh

    async def _fresh_claims(self, handle: str, service: Service, identity: sessions.Session) -> sessions.Session | None:
        """The session to decide this request with, its claims renewed when due.

        Within the margin before the claims' end the request is served with the current claims
        and the refresh runs aside; past their end it waits for the refresh (claims that may be
        stale never decide). One refresh per session in this process (a task), one across
        processes and enforcers (the store's lease). None: the session ended or cannot be
        vouched for now (the request is treated as signed out)."""
        now = self.clock()
        due = login.refresh_due(identity, now, self.refresh_margin)
        if due is login.RefreshDue.NO:
            return identity
        task = self._refreshing.get(handle)
        if task is None:
            if due is login.RefreshDue.BACKGROUND and self._refresh_retry.get(handle, 0.0) > now:
                return identity
            # owned by self._refreshing until done; _refresh_done logs what a background one raised
            task = asyncio.create_task(self._refresh(handle, service))  # noqa: TID251
            self._refreshing[handle] = task
            task.add_done_callback(lambda t: self._refresh_done(handle, t))
        if due is login.RefreshDue.BACKGROUND:
            return identity
        return await asyncio.shield(task)

    def _refresh_done(self, handle: str, task: asyncio.Task[sessions.Session | None]) -> None:
        self._refreshing.pop(handle, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("a claims refresh failed: %s: %s", type(exc).__name__, exc)

    async def _refresh(self, handle: str, service: Service) -> sessions.Session | None:
        """Renew the claims of ``handle``'s session at the token endpoint; the renewed session,
        the one another refresher stored, or None (ended, or not renewable now)."""
        assert self.cipher is not None
        store, now = self.store, self.clock()
        stored = await store.refresh_begin(handle, now, self.refresh_lease)
        if stored is None:  # another worker or enforcer is refreshing it (or it is gone)
            return await self._await_other_refresh(handle, service)
        if stored.refresh_token is None or login.refresh_due(stored, now, self.refresh_margin) is login.RefreshDue.NO:
            await store.refresh_end(handle, None, None)  # renewed meanwhile by another
            return stored
        token = self.cipher.open(stored.refresh_token, login.token_binding(stored))
        if token is None:
            await self._end_refreshed(handle, service, Reason.REFRESH_TOKEN_UNREADABLE)
            return None
        provider = self._provider(service)
        rules = self._login_rules(service)
        try:
            tokens = await provider.refresh(
                refresh_token=token, client_id=service.client_id, client_secret=service.client_secret
            )
            verified = await provider.verify(tokens.id_token) if tokens.id_token else None
            info = (await provider.userinfo(tokens.access_token)
                    if verified is not None and login.wants_userinfo(tokens, rules, verified.claims) else None)
        except tokens_mod.OIDCError as exc:
            if exc.status >= 500 or exc.reason in _TRANSIENT:
                log.warning("service %s: refresh failed for now (%s); claims kept until they expire",
                            service.name, exc.reason)
                if len(self._refresh_retry) > 10_000:
                    self._refresh_retry = {h: t for h, t in self._refresh_retry.items() if t > now}
                self._refresh_retry[handle] = now + REFRESH_RETRY
                await store.refresh_end(handle, None, None)
                return None
            await self._end_refreshed(handle, service, exc.reason)
            return None
        except BaseException:
            await store.refresh_end(handle, None, None)
            raise
        sealed = self.cipher.seal(tokens.refresh_token or token, login.token_binding(stored))
        renewed = login.check_refreshed(stored, verified, info, tokens=tokens, rules=rules, refresh_token=sealed,
                                        now=self.clock())
        if isinstance(renewed, login.LoginFailure):
            await self._end_refreshed(handle, service, renewed.code)
            return None
        if not await store.refresh_end(handle, stored.refresh_token, renewed):
            return None  # deleted (logout) or renewed by another meanwhile: ask again next time
        self._refresh_retry.pop(handle, None)
        self.metrics.logins.labels(service.name, "refreshed").inc()
        return renewed

    async def _await_other_refresh(self, handle: str, service: Service) -> sessions.Session | None:
        """Another process holds the lease: wait (polling the store) until it renewed the
        claims, at most the lease; None if it did not."""
        deadline = self.clock() + self.refresh_lease
        while self.clock() < deadline:
            current = await self.store.get(handle, service.name, self.clock())
            if current is None or login.refresh_due(current, self.clock(), 0.0) is login.RefreshDue.NO:
                return current
            await asyncio.sleep(0.05)
        return None

    async def _end_refreshed(self, handle: str, service: Service, reason: Reason) -> None:
        """A refused or unusable refresh: the session ends (the user signs in again)."""
        log.info("service %s: refresh refused (%s): the session ends", service.name, reason)
        self.metrics.logins.labels(service.name, reason).inc()
        await self.store.refresh_end(handle, None, None)
        await self.store.delete(handle)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _close_if_body(request: web.BaseRequest, response: web.Response) -> web.Response:
        """A request whose body we will not read must not leave bytes on the connection."""
        if request.body_exists:
            response.force_close()
        return response

    def _provider(self, service: Service) -> login.Provider:
        return self.runtime.providers[service.name]

    async def _begin_login(
        self, request: web.BaseRequest, flow: FlowRecord, service: Service, path: str, query: str
    ) -> web.StreamResponse:
        """Unauthenticated: a 302 to the IdP for browsers, 401 for API clients."""
        login_url = service.origin + path
        if is_api_request(request) or request.method not in ("GET", "HEAD"):
            resp = pages.json_error(401, Reason.LOGIN_REQUIRED, flow.flow_id, login_url=login_url)
            return self._close_if_body(request, resp)
        try:
            metadata = await self._provider(service).discover()
        except tokens_mod.OIDCError as exc:
            flow.record(decision=Outcome.ERROR, reason=Reason.IDP_UNAVAILABLE)
            log.warning("service %s: cannot start a login: %s", service.name, exc)
            return pages.error_page(503, Reason.IDP_UNAVAILABLE, flow.flow_id,
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
            except Exception as exc:
                log.exception("service %s: cannot store a pending login", service.name)
                code = exc.reason if isinstance(exc, errors.EnforcerError) else Reason.SESSION_STORE_ERROR
                flow.record(decision=Outcome.ERROR, reason=code)
                return pages.error_page(503, code, flow.flow_id,
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
            claims_lifetime=self.settings.model.sessions.claimsLifetime,
        )

    async def _callback(
        self, request: web.BaseRequest, flow: FlowRecord, service: Service, query: str
    ) -> web.StreamResponse:
        """The IdP sent the browser back: the checks of :mod:`enforcer.identity.login`, each
        after the I/O it needs, then a new session."""
        flow.record(decision=Outcome.CALLBACK, reason=Reason.LOGIN_FAILED)

        def fail(failure: login.LoginFailure, *, clear: str | None = None) -> web.Response:
            flow.record(decision=Outcome.CALLBACK, reason=failure.code)
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
        if new.refresh_token is not None:  # sealed at rest, or not kept without a key
            sealed = self.cipher.seal(new.refresh_token, login.token_binding(new)) if self.cipher else None
            new = dataclasses.replace(new, refresh_token=sealed, claims_expire=new.claims_expire if sealed else None)

        cookie_name = cookies_mod.session_cookie_name(service.name)
        old_found, old_handle = cookies_mod.find_cookie(request.headers.getall("Cookie", []), cookie_name)
        if old_found is cookies_mod.CookieLookup.FOUND and old_handle:
            await self.store.delete(old_handle)  # a new handle at each login (no fixation)
        handle = await self.store.create(new)
        flow.record(decision=Outcome.CALLBACK, reason=Reason.LOGIN_SUCCESS, user=new.sub, email=new.email)
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
        flow.record(decision=Outcome.LOGOUT, reason=Reason.LOGOUT)
        answer = login.logout_answer(
            request.method, request.headers.get("Sec-Fetch-Site"), request.headers.get("Origin"), service.origin
        )
        if answer is login.LogoutAnswer.METHOD_NOT_ALLOWED:
            return pages.plain_close(405, "method not allowed", flow.flow_id)
        if answer is login.LogoutAnswer.CONFIRM:
            flow.record(decision=Outcome.LOGOUT, reason=Reason.LOGOUT_CONFIRM)
            form = (
                f"<form method=post action='{html.escape(service.logout_path, quote=True)}'>"
                "<p>Do you want to sign out?</p><button type=submit>Sign out</button></form>"
            )
            return pages.info_page("Sign out", form)
        cookie_name = cookies_mod.session_cookie_name(service.name)
        found, handle = cookies_mod.find_cookie(request.headers.getall("Cookie", []), cookie_name)
        current = None
        clear = [cookies_mod.clear_cookie_header(cookie_name)]
        if found is cookies_mod.CookieLookup.FOUND and handle:
            try:
                current = await self.store.pop(handle, service.name, self.clock())
            except sessions.LogoutOwed:
                # fail closed, nothing lost: the store refuses the session here already and sends
                # the deletion to the fleet when it answers again (it logged that); no ID token to
                # end the IdP session with, so say what happened instead
                flow.record(decision=Outcome.LOGOUT, reason=Reason.SESSION_STORE_UNAVAILABLE)
                return pages.info_page(
                    "Signed out",
                    "<p>You are signed out of this application.</p><p>The session store is unavailable "
                    "right now: your sign-out is recorded and reaches every server as soon as it is back. "
                    "You may still be signed in at your identity provider.</p>"
                    f"<p><a href='{html.escape(service.origin, quote=True)}/'>Sign in again</a></p>",
                    set_cookies=clear,
                )
        if current is not None:
            flow.user, flow.email = current.sub, current.email
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
            flow.record(decision=Outcome.LOGOUT, reason=reason)
            body = json.dumps({"error": error}) if error else ""
            resp = web.Response(status=status, text=body, headers=headers,
                                content_type="application/json" if error else "text/plain")
            return self._close_if_body(request, resp) if status >= 400 else resp

        if not self.backchannel_rate.allow(_connection_info(request).client_ip):
            headers["Retry-After"] = "1"  # (before any work: a flood costs no token check, no JWKS fetch)
            return answer(429, Reason.BACKCHANNEL_RATE, "temporarily_unavailable")
        if request.method != "POST":
            headers["Allow"] = "POST"
            return answer(405, Reason.BACKCHANNEL_METHOD, "invalid_request")
        if request.content_type != "application/x-www-form-urlencoded":
            return answer(400, Reason.BACKCHANNEL_CONTENT_TYPE, "invalid_request")
        if request.content_length is not None and request.content_length > MAX_LOGOUT_TOKEN_BODY:
            return answer(413, Reason.BACKCHANNEL_TOO_LARGE, "invalid_request")
        raw = await request.content.read(MAX_LOGOUT_TOKEN_BODY + 1)
        if len(raw) > MAX_LOGOUT_TOKEN_BODY:
            return answer(413, Reason.BACKCHANNEL_TOO_LARGE, "invalid_request")
        try:
            pairs = urllib.parse.parse_qsl(raw.decode("ascii"), keep_blank_values=True, strict_parsing=True,
                                           max_num_fields=10)
        except (ValueError, UnicodeDecodeError):
            return answer(400, Reason.BACKCHANNEL_MALFORMED, "invalid_request")
        tokens = [v for k, v in pairs if k == "logout_token"]
        if len(tokens) != 1 or not tokens[0]:
            return answer(400, Reason.BACKCHANNEL_NO_TOKEN, "invalid_request")
        provider = self._provider(service)
        s = self.settings.model.oidc
        try:
            verified = await provider.verify(tokens[0], logout=True)
            sub, sid = tokens_mod.check_logout_claims(
                verified.claims, issuer=service.issuer, client_id=service.client_id,
                now=self.clock(), leeway=s.leeway, max_age=s.maxIdTokenAge,
            )
        except tokens_mod.OIDCError as exc:
            code = exc.reason
            log.info("back-channel logout refused for service %s: %s (flow %s)", service.name, code, flow.flow_id)
            return answer(400, code, "invalid_request")
        # One effect per token (P-BCL-04): a token whose jti is marked (fleet-wide) ends nothing.
        # The mark is made only once its sessions have ended, so a failure on the way (503) leaves
        # the token usable for the IdP's retry: a logout is never lost to its own mark. A store
        # that cannot tell fails the request.
        claims = verified.claims
        until = min(float(claims["exp"]), float(claims["iat"]) + s.maxIdTokenAge) + s.leeway
        jti = f"{service.issuer}\x00{service.client_id}\x00{claims['jti']}"
        if await self.store.was_used("logout", jti, self.clock()):
            if sub is not None:
                flow.user = sub
            log.info("back-channel logout for service %s: a replayed logout token, nothing ended (flow %s)",
                     service.name, flow.flow_id)
            return answer(200, Reason.BACKCHANNEL_REPLAYED)
        # With a sid only that IdP session ends; with only a sub every session of the user.
        ended = await self.store.delete_matching(issuer=service.issuer, sub=sub, sid=sid)
        await self.store.first_use("logout", jti, self.clock(), until)
        if sub is not None:
            flow.user = sub
        log.info("back-channel logout for service %s ended %d session(s) (flow %s)", service.name, ended,
                 flow.flow_id)
        return answer(200, Reason.BACKCHANNEL_LOGOUT)


