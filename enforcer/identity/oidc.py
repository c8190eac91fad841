"""One OpenID Provider over HTTP: discovery, the JWKS cache, the token and UserInfo requests.

Discovery is mandatory with an exact issuer; the JWKS cache refetches on an unknown ``kid``,
throttled and coalesced; the token request uses client_secret_basic (or client_secret_post when
that is all the IdP offers). Every response is size-bounded, never follows redirects and must be
JSON without duplicate member names.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import time
import urllib.parse
from collections.abc import Mapping
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

@dataclass
class Provider:
    """One OpenID Provider as seen by one client configuration (I/O)."""

    issuer: str
    http: aiohttp.ClientSession
    ssl_context: ssl.SSLContext | None = None
    timeout: float = 10.0
    allow_http_loopback: bool = False
    jwks_refresh_interval: float = 60.0
    #: A key set older than this is refetched before it verifies anything, so a key the
    #: IdP removed stops working (P-JWKS-05); if the refetch fails the old set is kept.
    jwks_max_age: float = 3600.0
    metadata: ProviderMetadata | None = None
    keys: list[JWK] = field(default_factory=list)
    keys_fetched: float = 0.0  # monotonic time the current key set was fetched
    #: Monotonic time of the last refetch *attempt* not forced by discovery (unknown kid or
    #: stale set): these are throttled to one per ``jwks_refresh_interval``.  The discovery
    #: fetch does not count, so keys rotated right after start-up still work (P-JWKS-01).
    keys_missed: float = float("-inf")
    _keys_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _discover_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
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

    async def discover(self) -> ProviderMetadata:
        """Fetch and validate the discovery document (cached once it succeeded)."""
        if self.metadata is not None:
            return self.metadata
        async with self._discover_lock:
            if self.metadata is not None:
                return self.metadata
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                doc = await self._get_json(url, _DISCOVERY)
                metadata = ProviderMetadata.parse(
                    doc, expected_issuer=self.issuer, allow_http_loopback=self.allow_http_loopback
                )
                await self._refresh_keys(metadata, force=True)
            except OIDCError as exc:
                self.last_error = str(exc)
                raise
            self.metadata = metadata
            self.last_error = None
            return metadata

    async def _refresh_keys(self, metadata: ProviderMetadata, *, force: bool, stale_only: bool = False) -> bool:
        """Refetch the JWKS (unforced: at most once per throttle interval); True if replaced."""
        async with self._keys_lock:  # coalesces concurrent misses
            now = time.monotonic()
            if not force:
                if stale_only and now - self.keys_fetched <= self.jwks_max_age:
                    return False  # someone refreshed it while we waited for the lock
                if now - self.keys_missed < self.jwks_refresh_interval:
                    return False
                self.keys_missed = now
            try:
                keys = parse_jwks(await self._get_json(metadata.jwks_uri, _JWKS))
            except OIDCError as exc:
                if not self.keys:
                    raise
                log.warning("keeping the previous JWKS of %s: %s", self.issuer, exc)
                return False
            self.keys = keys
            self.keys_fetched = now
            return True

    async def verify(self, token: str, *, logout: bool = False) -> VerifiedToken:
        """Verify an ID (or logout) token's signature, refetching the JWKS once for an unknown kid."""
        kind = TokenKind.LOGOUT if logout else TokenKind.ID
        unknown_key = TOKEN_REASONS[kind].unknown_key
        metadata = await self.discover()
        if time.monotonic() - self.keys_fetched > self.jwks_max_age:
            await self._refresh_keys(metadata, force=False, stale_only=True)
        before = self.keys
        try:
            return verify_signature(token, before, token_kind=kind)
        except OIDCError as exc:
            if exc.reason is not unknown_key:
                raise
        await self._refresh_keys(metadata, force=False)
        if self.keys is not before:  # refreshed by us or by a concurrent miss
            return verify_signature(token, self.keys, token_kind=kind)
        raise OIDCError(unknown_key, "no key in the JWKS matches kid and alg")

    async def exchange_code(
        self, *, code: str, redirect_uri: str, code_verifier: str, client_id: str, client_secret: str
    ) -> TokenResponse:
        """Authorization code -> tokens at the token endpoint (no redirects followed)."""
        metadata = await self.discover()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
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
        return parse_token_response(strict_json_object(body, Reason.TOKEN_INVALID_JSON))

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
