"""One OpenID Provider over HTTP: discovery, the JWKS cache, the token and UserInfo requests.

Discovery is mandatory with an exact issuer; the JWKS cache refetches on an unknown ``kid``
(throttled per kid, with a global floor, coalesced) and fails closed when its keys grow too
old; the token request uses client_secret_basic (or client_secret_post when that is all the
IdP offers). Every response is size-bounded, never follows redirects and must be JSON without
duplicate member names.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import json
import logging
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from enforcer.errors import Reason
from enforcer.identity.tokens import (
    JWK,
    MAX_DOCUMENT_BYTES,
    TOKEN_REASONS,
    OIDCError,
    ProviderMetadata,
    TokenKind,
    TokenResponse,
    VerifiedToken,
    parse_jwks,
    parse_token_response,
    select_key,
    split_jws,
    strict_json_object,
    verify_signature,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Document:
    """A JSON document fetched from the IdP, with the reason for each way fetching it fails."""

    name: str
    unreachable: Reason
    http_error: Reason
    too_large: Reason
    invalid_json: Reason


_DISCOVERY = _Document("discovery", Reason.DISCOVERY_UNREACHABLE, Reason.DISCOVERY_HTTP_ERROR,
                       Reason.DISCOVERY_TOO_LARGE, Reason.DISCOVERY_INVALID_JSON)
_JWKS = _Document("jwks", Reason.JWKS_UNREACHABLE, Reason.JWKS_HTTP_ERROR, Reason.JWKS_TOO_LARGE,
                  Reason.JWKS_INVALID_JSON)
_USERINFO = _Document("userinfo", Reason.USERINFO_UNREACHABLE, Reason.USERINFO_HTTP_ERROR,
                      Reason.USERINFO_TOO_LARGE, Reason.USERINFO_INVALID_JSON)

TOKEN_ERRORS: dict[str, Reason] = {
    "invalid_request": Reason.TOKEN_INVALID_REQUEST,
    "invalid_client": Reason.TOKEN_INVALID_CLIENT,
    "invalid_grant": Reason.TOKEN_INVALID_GRANT,
    "unauthorized_client": Reason.TOKEN_UNAUTHORIZED_CLIENT,
    "unsupported_grant_type": Reason.TOKEN_UNSUPPORTED_GRANT_TYPE,
    "invalid_scope": Reason.TOKEN_INVALID_SCOPE,
    "server_error": Reason.TOKEN_SERVER_ERROR,
    "temporarily_unavailable": Reason.TOKEN_TEMPORARILY_UNAVAILABLE,
}
"""The token endpoint's ``error`` (RFC 6749 §5.2, plus the two 5xx-like codes IdPs also send
there) -> reason; any other or no ``error`` is ``token_unknown`` (the IdP's text is logged)."""

MAX_REMEMBERED_MISSES = 4096
"""Unknown (kid, alg) pairs remembered for the per-kid throttle; the oldest are forgotten first."""


@dataclass
class Provider:
    """One OpenID Provider as seen by one client configuration (I/O).

    The JWKS cache (OIDC Core §10.1.1; rows P-JWKS-01…05 of the conformance spec):

    * Discovery fetches the key set. A token whose ``kid`` (with its ``alg``) is not in the
      set makes the provider fetch the JWKS again and retry once, so an IdP that signs every
      token with a new key works for every login.
    * Throttled per ``kid``: a ``kid`` that a successful fetch did not contain is not looked
      up again for ``jwks_refresh_interval``; tokens carrying it are refused at once
      (outcome ``throttled``).
    * A global floor: at most one JWKS fetch per ``jwks_min_fetch_interval``. A miss waits
      for the next slot (never longer than the floor) and concurrent misses share one fetch,
      so a flood of made-up kids costs the IdP at most one request per floor.
    * A key set older than ``jwks_max_age`` is refetched before it verifies anything, so a
      key the IdP removed stops working (P-JWKS-05). If that refetch fails, the last good
      set stays usable for ``jwks_stale_grace`` more (retried every
      ``jwks_refresh_interval``); after that it is dropped and every token is refused until a
      fetch succeeds (fail closed).
    * Keys come only from the ``jwks_uri`` of the discovery document; a token whose key is
      not in the current set is refused, whether or not the JWKS endpoint answers (no
      fallback key; only a kid-less token is tried against the at most three keys of its
      alg, as rp-id_token-kid-absent-multiple-jwks allows).

    Every fetch, failure, throttled miss and expiry is counted in :attr:`jwks_events`, passed
    to ``on_jwks_event`` (for the metrics) and logged (throttled misses at most once per
    ``jwks_refresh_interval``).
    """

    issuer: str
    http: aiohttp.ClientSession
    ssl_context: ssl.SSLContext | None = None
    timeout: float = 10.0
    allow_http_loopback: bool = False
    #: Seconds a ``kid`` that the IdP's JWKS did not contain is not looked up again; also
    #: how often a failed refresh of a stale set is retried.
    jwks_refresh_interval: float = 60.0
    #: Seconds between two JWKS fetches at least (the global floor; discovery excepted).
    jwks_min_fetch_interval: float = 0.1
    #: A key set older than this is refetched before it verifies anything (P-JWKS-05).
    jwks_max_age: float = 3600.0
    #: How long past ``jwks_max_age`` the last good set stays usable while refetches fail.
    jwks_stale_grace: float = 3600.0
    #: Called with ``success``, ``failure``, ``throttled`` or ``expired`` (metrics hook).
    on_jwks_event: Callable[[str], None] | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    metadata: ProviderMetadata | None = None
    keys: list[JWK] = field(default_factory=list)
    keys_fetched: float = float("-inf")  # clock time the current key set was fetched
    jwks_events: collections.Counter[str] = field(default_factory=collections.Counter)
    _keys_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _discover_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _fetches_started: int = 0
    _last_fetch: float = float("-inf")  # clock time the last fetch started
    _last_fetch_error: OIDCError | None = None
    _stale_tried: float = float("-inf")
    _missed: collections.OrderedDict[tuple[str | None, str], float] = field(
        default_factory=collections.OrderedDict
    )
    _throttle_logged: float = float("-inf")
    last_error: str | None = None

    async def _get_json(self, url: str, doc: _Document, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        try:
            async with self.http.get(
                url,
                headers=headers,
                allow_redirects=False,
                ssl=self.ssl_context if self.ssl_context is not None else True,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                body = await _read_bounded(resp, doc.too_large)
                if resp.status != 200:
                    raise OIDCError(doc.http_error, f"{doc.name} answered HTTP {resp.status}", status=502)
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as exc:
            raise OIDCError(doc.unreachable, f"{type(exc).__name__}: {str(exc)[:200]}", status=502) from None
        return strict_json_object(body, doc.invalid_json)

    def _metadata_now(self) -> ProviderMetadata | None:
        """The discovered metadata as it is now (a call, so a check after an await is not
        narrowed away by the one before it)."""
        return self.metadata

    async def discover(self) -> ProviderMetadata:
        """Fetch and validate the discovery document (cached once it succeeded), then the JWKS."""
        if self.metadata is not None:
            return self.metadata
        async with self._discover_lock:
            known = self._metadata_now()  # another caller may have discovered it while we waited
            if known is not None:
                return known
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                doc = await self._get_json(url, _DISCOVERY)
                metadata = ProviderMetadata.parse(
                    doc, expected_issuer=self.issuer, allow_http_loopback=self.allow_http_loopback
                )
                # Not throttled: keys rotated right after start-up still work (P-JWKS-01).
                if not await self._fetch_keys(metadata, self._fetches_started, wait=False) and not self._usable():
                    raise self._fetch_failure()
            except OIDCError as exc:
                self.last_error = str(exc)
                raise
            self._missed.clear()
            self.metadata = metadata
            self.last_error = None
            return metadata

    async def verify(self, token: str, *, logout: bool = False) -> VerifiedToken:
        """Verify an ID (or logout) token's signature; an unknown kid refetches the JWKS once
        (throttled per kid, at most one fetch per floor, coalesced)."""
        kind = TokenKind.LOGOUT if logout else TokenKind.ID
        unknown_key = TOKEN_REASONS[kind].unknown_key
        metadata = await self.discover()
        await self._ensure_fresh(metadata)
        try:
            return verify_signature(token, self.keys, token_kind=kind)
        except OIDCError as exc:
            if exc.reason is not unknown_key:
                raise
            slot = _lookup_slot(token)
            if slot is None:  # a kid no JWKS can hold: nothing to fetch
                raise
            if self._recently_missed(slot):
                self._note_throttled(slot)
                raise
        await self._fetch_keys(metadata, self._fetches_started, slot=slot)
        return verify_signature(token, self.keys, token_kind=kind)

    # ------------------------------------------------------------------ the JWKS cache

    def _usable(self) -> bool:
        """Whether the current key set may still verify a token (not past its grace)."""
        return bool(self.keys) and self.clock() - self.keys_fetched <= self.jwks_max_age + self.jwks_stale_grace

    def _fetch_failure(self) -> OIDCError:
        err = self._last_fetch_error
        if err is None:
            return OIDCError(Reason.JWKS_UNREACHABLE, "no JWKS fetched yet", status=502)
        return OIDCError(err.reason, err.detail, status=err.status)

    def _event(self, outcome: str) -> None:
        self.jwks_events[outcome] += 1
        if self.on_jwks_event is not None:
            self.on_jwks_event(outcome)

    def _recently_missed(self, slot: tuple[str | None, str]) -> bool:
        missed = self._missed.get(slot)
        return missed is not None and self.clock() - missed < self.jwks_refresh_interval

    def _note_throttled(self, slot: tuple[str | None, str]) -> None:
        self._event("throttled")
        now = self.clock()
        if now - self._throttle_logged >= self.jwks_refresh_interval:
            self._throttle_logged = now
            log.warning(
                "unknown kid %.64r (alg %s) for %s: the JWKS did not hold it; not looked up again "
                "for %.0f s (%d unknown-kid tokens refused without a fetch so far)",
                slot[0], slot[1], self.issuer, self.jwks_refresh_interval, self.jwks_events["throttled"],
            )

    async def _ensure_fresh(self, metadata: ProviderMetadata) -> None:
        """Refetch a set older than jwks_max_age; past its grace, drop it and fail closed."""
        now = self.clock()
        age = now - self.keys_fetched
        if age <= self.jwks_max_age:
            return
        usable = self._usable()
        if usable and now - self._stale_tried < self.jwks_refresh_interval:
            return  # the last refetch failed a moment ago: keep using the set for now
        self._stale_tried = now
        if await self._fetch_keys(metadata, self._fetches_started):
            return
        if usable:
            log.warning(
                "keeping the JWKS of %s, %.0f s old, for at most %.0f s more: the refetch failed",
                self.issuer, age, self.jwks_max_age + self.jwks_stale_grace - age,
            )
            return
        if self.keys:
            self.keys = []
            self._event("expired")
            log.error(
                "the JWKS of %s is %.0f s old and cannot be refetched: every token is refused "
                "until a fetch succeeds", self.issuer, age,
            )
        raise self._fetch_failure()

    async def _fetch_keys(
        self, metadata: ProviderMetadata, seen: int, *, slot: tuple[str | None, str] | None = None, wait: bool = True
    ) -> bool:
        """Make sure a JWKS fetch that started after fetch number ``seen`` has finished; True
        if it succeeded.

        Callers that queued behind such a fetch share it; otherwise this waits for the floor
        (unless ``wait`` is false) and fetches. ``slot`` is the (kid, alg) that missed: if the
        fetched set lacks it too it is remembered, and a slot remembered while this caller
        queued is not fetched again.
        """
        async with self._keys_lock:
            if self._fetches_started <= seen:
                if slot is not None and self._recently_missed(slot):
                    self._note_throttled(slot)
                    return False
                delay = self._last_fetch + self.jwks_min_fetch_interval - self.clock()
                if wait and delay > 0:
                    await self.sleep(delay)
                self._fetches_started += 1
                started = self._last_fetch = self.clock()
                try:
                    keys = parse_jwks(await self._get_json(metadata.jwks_uri, _JWKS))
                except OIDCError as exc:
                    self._last_fetch_error = exc
                    self._event("failure")
                    log.warning("JWKS fetch for %s failed: %s", self.issuer, exc)
                    return False
                self.keys, self.keys_fetched, self._last_fetch_error = keys, started, None
                self._event("success")
            if self._last_fetch_error is not None:
                return False
            if slot is not None and not select_key(self.keys, {"kid": slot[0], "alg": slot[1]}):
                self._missed[slot] = self.clock()
                self._missed.move_to_end(slot)
                while len(self._missed) > MAX_REMEMBERED_MISSES:
                    self._missed.popitem(last=False)
            return True

    async def exchange_code(
        self, *, code: str, redirect_uri: str, code_verifier: str, client_id: str, client_secret: str
    ) -> TokenResponse:
        """Authorization code -> tokens at the token endpoint (no redirects followed)."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
        return parse_token_response(await self._token_request(form, client_id, client_secret))

    async def refresh(self, *, refresh_token: str, client_id: str, client_secret: str) -> TokenResponse:
        """A refresh token -> new tokens (RFC 6749 §6). A provider may send no ID token on a
        refresh: then ``id_token`` is ``""`` and the caller decides."""
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        doc = await self._token_request(form, client_id, client_secret)
        id_token = doc.get("id_token")
        has_id = isinstance(id_token, str) and bool(id_token)
        parsed = parse_token_response({**doc, "id_token": id_token if has_id else "-"})
        return parsed if has_id else dataclasses.replace(parsed, id_token="")

    async def _token_request(self, form: dict[str, str], client_id: str, client_secret: str) -> dict[str, Any]:
        """POST ``form`` to the token endpoint with the client's credentials; the JSON answer."""
        metadata = await self.discover()
        headers = {"Accept": "application/json"}
        if metadata.token_auth_method == "client_secret_basic":  # noqa: S105 (a method name)
            pair = f"{urllib.parse.quote_plus(client_id)}:{urllib.parse.quote_plus(client_secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form["client_id"] = client_id
            form["client_secret"] = client_secret
        try:
            async with self.http.post(
                metadata.token_endpoint,
                data=form,
                headers=headers,
                allow_redirects=False,
                ssl=self.ssl_context if self.ssl_context is not None else True,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                body = await _read_bounded(resp, Reason.TOKEN_TOO_LARGE)
                status = resp.status
                content_type = resp.content_type
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as exc:
            raise OIDCError(Reason.TOKEN_UNREACHABLE, type(exc).__name__, status=502) from None
        if status != 200:
            error = "unknown"
            try:
                err_doc = json.loads(body.decode("utf-8"))
                if isinstance(err_doc, dict) and isinstance(err_doc.get("error"), str):
                    error = err_doc["error"][:64]
            except (ValueError, UnicodeDecodeError):
                pass
            reason = TOKEN_ERRORS.get(error, Reason.TOKEN_UNKNOWN)
            if reason is Reason.TOKEN_UNKNOWN:
                log.warning("the token endpoint of %s answered HTTP %d, error %r", self.issuer, status, error)
            if reason is Reason.TOKEN_INVALID_CLIENT:
                log.error(
                    "the IdP rejected the client credentials of %s (invalid_client): "
                    "check OIDCClientID/OIDCClientSecret",
                    client_id,
                )
            raise OIDCError(reason, f"token endpoint answered HTTP {status}", status=502 if status >= 500 else 400)
        if content_type != "application/json":  # RFC 6749 §5.1 (P-TOK-07)
            raise OIDCError(
                Reason.TOKEN_BAD_CONTENT_TYPE, f"token response is {content_type[:60]!r}, not JSON", status=502
            )
        return strict_json_object(body, Reason.TOKEN_INVALID_JSON)

    async def userinfo(self, access_token: str) -> dict[str, Any] | None:
        """Claims from the UserInfo endpoint (None if the IdP has none)."""
        metadata = await self.discover()
        if metadata.userinfo_endpoint is None:
            return None
        return await self._get_json(
            metadata.userinfo_endpoint,
            _USERINFO,
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
        )


async def _read_bounded(resp: aiohttp.ClientResponse, too_large: Reason) -> bytes:
    declared = resp.content_length
    if declared is not None and declared > MAX_DOCUMENT_BYTES:
        raise OIDCError(too_large, f"over {MAX_DOCUMENT_BYTES} bytes", status=502)
    chunks: list[bytes] = []
    total = 0
    async for chunk in resp.content.iter_chunked(65536):
        total += len(chunk)
        if total > MAX_DOCUMENT_BYTES:
            raise OIDCError(too_large, f"over {MAX_DOCUMENT_BYTES} bytes", status=502)
        chunks.append(chunk)
    return b"".join(chunks)


def client_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """TLS for calls to the IdP: system trust store plus an optional extra CA file."""
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def now() -> float:
    return time.time()


def _lookup_slot(token: str) -> tuple[str | None, str] | None:
    """The (kid, alg) a JWKS refetch would look for, or None if no JWK could ever match."""
    header, _payload = split_jws(token)
    kid, alg = header.get("kid"), header.get("alg")
    if not isinstance(alg, str) or (kid is not None and (not isinstance(kid, str) or len(kid) > 256)):
        return None
    return kid, alg
