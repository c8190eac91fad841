"""An in-process, misbehaving OpenID Provider for conformance tests.

:class:`FakeOP` is an aiohttp HTTPS server on 127.0.0.1 (certificate from a throwaway CA,
see :func:`tests.harness.op.make_tls_material`) that serves discovery, JWKS,
authorization, token, userinfo and end_session.  The authorization endpoint auto-approves:
it redirects straight back to ``redirect_uri`` with a code, echoing ``state`` (and ``iss``).

Each test flips switches on :attr:`FakeOP.behaviour` (a :class:`Behaviour`) to make the OP
misbehave: wrong ``iss``, ``http://`` endpoints, odd JWKS, ID tokens signed with ``none`` or
HS256-with-the-public-key, bad claims, token-endpoint errors, userinfo mismatches, a new
signing key for every ID token (``rotate_every_token``) and so on.
Every request the OP receives is recorded in :attr:`FakeOP.requests`, so a test can assert
that the token endpoint saw nothing (``NO-TOKEN-REQ``).

Tokens are signed with joserfc.  Nothing here is imported by the enforcer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import ssl
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from joserfc import jws
from joserfc.jwk import ECKey, RSAKey

from tests.harness.op import TLSMaterial, make_tls_material

#: Sentinel: remove this member from a JSON document (discovery, claims, token response...).
DELETE = object()

BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def at_hash(access_token: str, bits: int = 256) -> str:
    digest = hashlib.new(f"sha{bits}", access_token.encode()).digest()
    return b64url(digest[: len(digest) // 2])


def apply_overrides(doc: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``doc`` with ``overrides`` merged in (:data:`DELETE` removes a member)."""
    out = dict(doc)
    for k, v in overrides.items():
        if v is DELETE:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def compact(header: dict[str, Any], payload: bytes | dict[str, Any], signature: bytes = b"") -> str:
    """Hand-made compact JWS (no signing): for alg none and malformed tokens."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return f"{b64url(json.dumps(header).encode())}.{b64url(body)}.{b64url(signature)}"


@dataclass
class Recorded:
    """One request the OP received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def form(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)


@dataclass
class Behaviour:
    """Per-test switches.  The defaults are a correct OP."""

    # discovery
    discovery_overrides: dict[str, Any] = field(default_factory=dict)
    discovery_raw: bytes | None = None
    discovery_status: int = 200
    # JWKS
    jwks_keys: list[dict[str, Any]] | None = None  # None: the public half of every signing key
    jwks_raw: bytes | None = None
    jwks_status: int = 200
    rotate_every_token: bool = False  # each ID token signed by a new key (see FakeOP.rotating_key)
    rotation_published: int = 2  # with rotate_every_token: how many of the newest keys the JWKS holds
    # authorization response
    send_iss: bool = True
    iss_value: str | None = None  # None: the real issuer
    authorize_overrides: dict[str, Any] = field(default_factory=dict)  # DELETE removes (state, code)
    # ID token
    sign_with: str = "rsa"  # rsa | ec | rsa2 | none | hs256-pubkey | hs256-secret | unknown | rotating
    header_overrides: dict[str, Any] = field(default_factory=dict)
    claims_overrides: dict[str, Any] = field(default_factory=dict)
    id_token_transform: Callable[[str], str] | None = None
    id_token_raw: str | None = None
    id_token_factory: Callable[[dict[str, Any]], str] | None = None  # claims -> token
    include_at_hash: bool = True
    # token endpoint
    token_overrides: dict[str, Any] = field(default_factory=dict)
    token_status: int = 200
    token_raw: bytes | None = None
    token_content_type: str = "application/json"
    token_delay: float = 0.0
    token_redirect: str | None = None
    token_stream_bytes: int = 0  # >0: stream this many bytes of JSON-ish junk, chunked
    token_headers: dict[str, str] = field(default_factory=dict)
    check_pkce: bool = True
    # refresh grant (a refresh token is issued when the scope has offline_access)
    rotate_refresh_tokens: bool = True  # each refresh answers a new refresh token; the old one dies
    refresh_id_token: bool = True  # False: a refresh answers no ID token
    refresh_claims_overrides: dict[str, Any] = field(default_factory=dict)  # on refreshed ID tokens only
    refresh_sign_with: str | None = None  # None: as sign_with
    refresh_delay: float = 0.0
    # userinfo
    userinfo_overrides: dict[str, Any] = field(default_factory=dict)
    userinfo_status: int = 200
    userinfo_raw: bytes | None = None


@dataclass
class Grant:
    """What the OP remembers about an issued authorization code."""

    client_id: str
    redirect_uri: str
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    scope: str
    used: bool = False


class FakeOP:
    """The misbehaving OP.  ``await op.start()``, use :attr:`issuer`, ``await op.stop()``."""

    def __init__(
        self,
        *,
        client_id: str = "app-client",
        client_secret: str = "s3cr:et %+ é",
        sub: str = "user-1",
        claims: dict[str, Any] | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.sub = sub
        self.claims: dict[str, Any] = dict(
            claims
            if claims is not None
            else {
                "email": "alice@example.com",
                "email_verified": True,
                "groups": ["admins", "staff"],
                "preferred_username": "alice",
            }
        )
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-op-") if workdir is None else None
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.behaviour = Behaviour()
        self.requests: list[Recorded] = []
        self.grants: dict[str, Grant] = {}
        self.issued_access_tokens: list[str] = []
        self.rsa = RSAKey.generate_key(2048, parameters={"kid": "rsa-1", "use": "sig", "alg": "RS256"})
        self.rsa2 = RSAKey.generate_key(2048, parameters={"kid": "rsa-2", "use": "sig", "alg": "RS256"})
        self.ec = ECKey.generate_key("P-256", parameters={"kid": "ec-1", "use": "sig", "alg": "ES256"})
        self.stranger = RSAKey.generate_key(2048, parameters={"kid": "stranger", "alg": "RS256"})
        self.rotated: list[ECKey] = []  # per-token keys, oldest first (rotate_every_token)
        self.tls: TLSMaterial | None = None
        self.port = 0
        self._runner: web.AppRunner | None = None
        self.session_id = "sid-" + secrets.token_hex(4)
        self.refresh_tokens: dict[str, str] = {}  # live refresh token -> its scope

    # ------------------------------------------------------------------ lifecycle

    @property
    def issuer(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        assert self.tls is not None
        return self.tls.ca_file

    @property
    def ca_pem(self) -> bytes:
        assert self.tls is not None
        return self.tls.ca_pem

    async def start(self) -> None:
        self.tls = make_tls_material(self.workdir / "tls", name="op")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        app = web.Application(client_max_size=1 << 20)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._tmp is not None:
            self._tmp.cleanup()

    def reset(self) -> None:
        """Back to a correct OP with the original keys, and forget what was recorded."""
        self.behaviour = Behaviour()
        self.requests.clear()
        self.grants.clear()
        self.rotated.clear()

    # ------------------------------------------------------------------ queries for tests

    def seen(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    def token_requests(self) -> list[Recorded]:
        return self.seen("/token")

    def url(self, path: str) -> str:
        return self.issuer + path

    # ------------------------------------------------------------------ documents

    def discovery(self) -> dict[str, Any]:
        doc = {
            "issuer": self.issuer,
            "authorization_endpoint": self.url("/authorize"),
            "token_endpoint": self.url("/token"),
            "jwks_uri": self.url("/jwks"),
            "userinfo_endpoint": self.url("/userinfo"),
            "end_session_endpoint": self.url("/end_session"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": True,
            "backchannel_logout_supported": True,
            "backchannel_logout_session_supported": True,
        }
        return apply_overrides(doc, self.behaviour.discovery_overrides)

    def jwks(self) -> dict[str, Any]:
        if self.behaviour.jwks_keys is not None:
            return {"keys": self.behaviour.jwks_keys}
        if self.behaviour.rotate_every_token and self.rotated:
            newest = self.rotated[-self.behaviour.rotation_published:]
            return {"keys": [k.as_dict(private=False) for k in newest]}
        return {"keys": [self.rsa.as_dict(private=False), self.ec.as_dict(private=False)]}

    def rotate(self) -> None:
        """Key rotation: sign with ``rsa-2`` and publish only ``rsa-2`` (and the EC key)."""
        self.behaviour.sign_with = "rsa2"
        self.behaviour.jwks_keys = [self.rsa2.as_dict(private=False), self.ec.as_dict(private=False)]

    def rotating_key(self) -> ECKey:
        """A fresh ES256 key with a never-used kid, published at once (only the newest
        ``rotation_published`` keys stay in the JWKS), as an IdP that rotates per token does."""
        key = ECKey.generate_key(
            "P-256", parameters={"kid": f"rot-{len(self.rotated) + 1}-{secrets.token_hex(4)}", "use": "sig",
                                 "alg": "ES256"}
        )
        self.rotated.append(key)
        return key

    def id_token_claims(self, grant: Grant | None, access_token: str | None) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": self.sub,
            "aud": self.client_id,
            "iat": now,
            "exp": now + 300,
            "auth_time": now,
            "sid": self.session_id,
            **self.claims,
        }
        if grant is not None and grant.nonce is not None:
            claims["nonce"] = grant.nonce
        if access_token is not None and self.behaviour.include_at_hash:
            bits = 256
            claims["at_hash"] = at_hash(access_token, bits)
        return apply_overrides(claims, self.behaviour.claims_overrides)

    def sign(self, claims: dict[str, Any], *, how: str | None = None, header: dict[str, Any] | None = None) -> str:
        """Sign ``claims`` the way ``how`` (default: ``behaviour.sign_with``) says."""
        how = how or self.behaviour.sign_with
        extra = dict(header if header is not None else self.behaviour.header_overrides)
        payload = json.dumps(claims).encode()
        if how == "none":
            h = apply_overrides({"alg": "none", "typ": "JWT"}, extra)
            return compact(h, payload)
        if how in ("hs256-pubkey", "hs256-secret"):
            # hs256-pubkey: the OP's RSA public key (PEM) used as an HMAC secret (key-type
            # confusion); hs256-secret: the client secret, as OIDC Core §3.1.3.7 step 8 allows.
            secret = self.rsa.as_pem(private=False) if how == "hs256-pubkey" else self.client_secret.encode()
            h = apply_overrides({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, extra)
            signing_input = f"{b64url(json.dumps(h).encode())}.{b64url(payload)}".encode()
            sig = hmac.new(secret, signing_input, hashlib.sha256).digest()
            return signing_input.decode() + "." + b64url(sig)
        key_obj: RSAKey | ECKey
        alg = "RS256"
        if how == "rsa":
            key_obj = self.rsa
        elif how == "rsa2":
            key_obj = self.rsa2
        elif how == "ec":
            key_obj, alg = self.ec, "ES256"
        elif how == "unknown":
            key_obj = self.stranger
        elif how == "rotating":
            key_obj, alg = self.rotating_key(), "ES256"
        else:
            raise ValueError(how)
        h = {"alg": alg, "typ": "JWT", "kid": key_obj.kid}
        h = apply_overrides(h, extra)
        return jws.serialize_compact(h, payload, key_obj, algorithms=[str(h.get("alg", alg))])

    def logout_token(self, *, overrides: dict[str, Any] | None = None, how: str = "rsa",
                     header: dict[str, Any] | None = None, sid: str | None = None) -> str:
        """A back-channel logout token (valid unless ``overrides`` say otherwise)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": self.sub,
            "aud": self.client_id,
            "iat": now,
            "exp": now + 120,
            "jti": secrets.token_hex(8),
            "sid": sid or self.session_id,
            "events": {BACKCHANNEL_EVENT: {}},
        }
        claims = apply_overrides(claims, overrides or {})
        hdr = {"typ": "logout+jwt"} if header is None else header
        return self.sign(claims, how=how, header=hdr)

    # ------------------------------------------------------------------ HTTP

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            Recorded(request.method, request.path, urllib.parse.parse_qs(request.query_string, keep_blank_values=True),
                     dict(request.headers), body)
        )
        handlers: dict[str, Callable[[web.Request, bytes], Any]] = {
            "/.well-known/openid-configuration": self._discovery,
            "/jwks": self._jwks,
            "/authorize": self._authorize,
            "/token": self._token,
            "/userinfo": self._userinfo,
            "/end_session": self._end_session,
        }
        handler = handlers.get(request.path)
        if handler is None:
            return web.Response(status=404, text="not here")
        result: web.StreamResponse = await handler(request, body)
        return result

    async def _discovery(self, request: web.Request, body: bytes) -> web.StreamResponse:
        b = self.behaviour
        raw = b.discovery_raw if b.discovery_raw is not None else json.dumps(self.discovery()).encode()
        return web.Response(status=b.discovery_status, body=raw, content_type="application/json")

    async def _jwks(self, request: web.Request, body: bytes) -> web.StreamResponse:
        b = self.behaviour
        raw = b.jwks_raw if b.jwks_raw is not None else json.dumps(self.jwks()).encode()
        return web.Response(status=b.jwks_status, body=raw, content_type="application/json")

    async def _authorize(self, request: web.Request, body: bytes) -> web.StreamResponse:
        q = request.query
        redirect_uri = q.get("redirect_uri", "")
        code = secrets.token_urlsafe(24)
        self.grants[code] = Grant(
            client_id=q.get("client_id", ""),
            redirect_uri=redirect_uri,
            nonce=q.get("nonce"),
            code_challenge=q.get("code_challenge"),
            code_challenge_method=q.get("code_challenge_method"),
            scope=q.get("scope", ""),
        )
        params: dict[str, Any] = {"code": code, "state": q.get("state", "")}
        if self.behaviour.send_iss:
            params["iss"] = self.behaviour.iss_value or self.issuer
        params = apply_overrides(params, self.behaviour.authorize_overrides)
        pairs: list[tuple[str, str]] = []
        for k, v in params.items():
            if isinstance(v, list):
                pairs.extend((k, str(x)) for x in v)
            else:
                pairs.append((k, str(v)))
        raise web.HTTPFound(redirect_uri + "?" + urllib.parse.urlencode(pairs))

    def _client_ok(self, request: web.Request, form: dict[str, list[str]]) -> bool:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            raw = base64.b64decode(auth[6:]).decode()
            cid, _, secret = raw.partition(":")
            return (
                urllib.parse.unquote_plus(cid) == self.client_id
                and urllib.parse.unquote_plus(secret) == self.client_secret
                and "client_secret" not in form
            )
        return form.get("client_id") == [self.client_id] and form.get("client_secret") == [self.client_secret]

    async def _token(self, request: web.Request, body: bytes) -> web.StreamResponse:
        b = self.behaviour
        if b.token_delay:
            await asyncio.sleep(b.token_delay)
        if b.token_redirect is not None:
            return web.Response(status=307, headers={"Location": b.token_redirect})
        if b.token_stream_bytes:
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            chunk = b" " * 65536
            sent = 0
            try:
                while sent < b.token_stream_bytes:
                    await resp.write(chunk)
                    sent += len(chunk)
            except (ConnectionResetError, OSError):
                return resp
            return resp
        if b.token_raw is not None:
            return web.Response(status=b.token_status, body=b.token_raw,
                                headers={"Content-Type": b.token_content_type, **b.token_headers})
        form = urllib.parse.parse_qs(body.decode(), keep_blank_values=True)
        if not self._client_ok(request, form):
            return web.json_response({"error": "invalid_client"}, status=401,
                                     headers={"WWW-Authenticate": 'Basic realm="op"'})
        if form.get("grant_type") == ["refresh_token"]:
            return await self._refresh(form)
        code = (form.get("code") or [""])[0]
        grant = self.grants.get(code)
        if grant is None or grant.used or form.get("grant_type") != ["authorization_code"]:
            return web.json_response({"error": "invalid_grant"}, status=400)
        if form.get("redirect_uri") != [grant.redirect_uri]:
            return web.json_response({"error": "invalid_grant", "error_description": "redirect_uri"}, status=400)
        verifier = (form.get("code_verifier") or [""])[0]
        if b.check_pkce and (
            grant.code_challenge_method != "S256"
            or b64url(hashlib.sha256(verifier.encode()).digest()) != grant.code_challenge
        ):
            return web.json_response({"error": "invalid_grant", "error_description": "pkce"}, status=400)
        grant.used = True
        access = secrets.token_urlsafe(32)
        self.issued_access_tokens.append(access)
        claims = self.id_token_claims(grant, access)
        if b.id_token_raw is not None:
            id_token = b.id_token_raw
        elif b.id_token_factory is not None:
            id_token = b.id_token_factory(claims)
        else:
            id_token = self.sign(claims, how="rotating" if b.rotate_every_token else None)
        if b.id_token_transform is not None:
            id_token = b.id_token_transform(id_token)
        doc: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": 300,
            "id_token": id_token,
            "scope": grant.scope,
        }
        if "offline_access" in grant.scope.split():
            doc["refresh_token"] = self.issue_refresh_token(grant.scope)
        doc = apply_overrides(doc, b.token_overrides)
        return web.Response(status=b.token_status, body=json.dumps(doc).encode(),
                            headers={"Content-Type": b.token_content_type, "Cache-Control": "no-store",
                                     **b.token_headers})

    def issue_refresh_token(self, scope: str) -> str:
        token = "rt-" + secrets.token_urlsafe(24)
        self.refresh_tokens[token] = scope
        return token

    def revoke_refresh_tokens(self) -> None:
        """The user was disabled (or signed out at the IdP): every refresh token dies."""
        self.refresh_tokens.clear()

    def refresh_requests(self) -> list[Recorded]:
        return [r for r in self.token_requests() if r.form().get("grant_type") == ["refresh_token"]]

    async def _refresh(self, form: dict[str, list[str]]) -> web.StreamResponse:
        """RFC 6749 §6 with rotation; the new ID token has no nonce (OIDC Core §12.2)."""
        b = self.behaviour
        if b.refresh_delay:
            await asyncio.sleep(b.refresh_delay)
        old = (form.get("refresh_token") or [""])[0]
        scope = self.refresh_tokens.get(old)
        if scope is None:
            return web.json_response({"error": "invalid_grant"}, status=400)
        access = secrets.token_urlsafe(32)
        self.issued_access_tokens.append(access)
        doc: dict[str, Any] = {"access_token": access, "token_type": "Bearer", "expires_in": 300, "scope": scope}
        if b.rotate_refresh_tokens:
            del self.refresh_tokens[old]
            doc["refresh_token"] = self.issue_refresh_token(scope)
        if b.refresh_id_token:
            claims = apply_overrides(self.id_token_claims(None, access), b.refresh_claims_overrides)
            doc["id_token"] = self.sign(claims, how=b.refresh_sign_with)
        return web.Response(status=200, body=json.dumps(doc).encode(),
                            headers={"Content-Type": "application/json", "Cache-Control": "no-store"})

    async def _userinfo(self, request: web.Request, body: bytes) -> web.StreamResponse:
        b = self.behaviour
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        if b.userinfo_status != 200 or token not in self.issued_access_tokens:
            status = b.userinfo_status if b.userinfo_status != 200 else 401
            return web.json_response({"error": "invalid_token"}, status=status,
                                     headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if b.userinfo_raw is not None:
            return web.Response(body=b.userinfo_raw, content_type="application/json")
        doc = apply_overrides({"sub": self.sub, **self.claims, "name": "Alice Example"}, b.userinfo_overrides)
        return web.json_response(doc)

    async def _end_session(self, request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(text="<p>signed out at the OP</p>", content_type="text/html")
