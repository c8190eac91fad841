"""A Gate built from fakes: an in-memory session store, a recording flow log, a fake OpenID
Provider that signs and verifies real ES256 ID tokens, and a fake upstream app.

:class:`GateRig` drives requests through :meth:`Gate.handle` with aiohttp's own test request
(``make_mocked_request``): no sockets, no processes, a fixed clock.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from joserfc import jws
from joserfc.jwk import ECKey
from multidict import CIMultiDict

from enforcer.config.definitions import Definitions, parse_documents, resolve_definitions
from enforcer.config.settings import DaemonModel, Settings
from enforcer.flow import FlowRecord
from enforcer.flowlog import FlowLog
from enforcer.http import proxy
from enforcer.http import upstream as upstream_client
from enforcer.http.gate import Gate, Runtime
from enforcer.identity import tokens
from enforcer.identity.sessions import MemorySessionStore
from enforcer.identity.tokens import (
    JWK,
    OIDCError,
    ProviderMetadata,
    TokenResponse,
    VerifiedToken,
)
from enforcer.metrics import Metrics

NOW = 1_800_000_000.0
HOST = "app.example.com"
ORIGIN = f"https://{HOST}"
ISSUER = "https://idp.example.com"
CLIENT_ID = "enforcer-client"
CLIENT_SECRET = "client-secret-value"
SERVICE = {
    "kind": "service",
    "name": "app",
    "OIDCClientID": CLIENT_ID,
    "OIDCClientSecret": CLIENT_SECRET,
    "OIDCProviderURL": ISSUER,
    "OIDCCallbackURL": ORIGIN,
    "OIDCScopes": ["openid", "email"],
    "hosts": [HOST],
    "port": 8080,
    "exposedAPIs": [["httpresourcespec:name=app"]],
}
SPEC = {
    "kind": "httpresourcespec",
    "name": "app",
    "endpoints": [
        {"URI": "/public", "methods": ["GET"], "public": True},
        {"URI": "/*", "methods": ["GET", "POST"], "allowedScopes": [["email=alice@example.com"]]},
    ],
    "associatedTags": ["httpresourcespec:name=app"],
}

_KEY = ECKey.generate_key("P-256", private=True)
KID = "k1"


def definitions(service: dict[str, Any] | None = None) -> Definitions:
    """The test service (overridden by ``service``) and its endpoints, resolved."""
    parsed = parse_documents(yaml.safe_dump_all([{**SERVICE, **(service or {})}, SPEC]), "defs.yaml")
    assert isinstance(parsed, list)
    return resolve_definitions(parsed, ())


def metadata(**changes: Any) -> ProviderMetadata:
    """The fake provider's discovery document, already validated."""
    fields: dict[str, Any] = {
        "issuer": ISSUER,
        "authorization_endpoint": ISSUER + "/authorize",
        "token_endpoint": ISSUER + "/token",
        "jwks_uri": ISSUER + "/jwks",
        "userinfo_endpoint": ISSUER + "/userinfo",
        "end_session_endpoint": ISSUER + "/logout",
        "token_auth_method": "client_secret_basic",
        "iss_parameter_supported": False,
    }
    return ProviderMetadata(**{**fields, **changes})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def at_hash(access_token: str) -> str:
    """``at_hash`` of an access token for an ES256 ID token."""
    return _b64(hashlib.sha256(access_token.encode()).digest()[:16])


def sign(claims: Any, header: dict[str, Any] | None = None) -> str:
    """A compact JWS of ``claims`` (any JSON value) signed with the fake provider's key."""
    protected = {"alg": "ES256", "kid": KID, "typ": "JWT", **(header or {})}
    return jws.serialize_compact(protected, json.dumps(claims).encode(), _KEY, algorithms=["ES256"])


def forge(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A compact JWS with this header and a signature that is not one."""
    return ".".join((_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(b"not a signature")))


def id_token_claims(nonce: str, **changes: Any) -> dict[str, Any]:
    """Valid ID token claims for a login with this ``nonce``; a value of None removes a claim."""
    claims: dict[str, Any] = {
        "iss": ISSUER, "aud": CLIENT_ID, "sub": "alice", "nonce": nonce, "iat": int(NOW), "exp": int(NOW) + 300,
        "email": "alice@example.com", "email_verified": True, "preferred_username": "alice", "sid": "idp-session",
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


@dataclass
class FakeProvider:
    """An OpenID Provider (the ``login.Provider`` Protocol) answering from fields; ``verify``
    checks real signatures with :func:`tokens.verify_signature`. ``id_token`` builds the ID
    token from the login's nonce; ``*_error`` fields make a step fail."""

    metadata_doc: ProviderMetadata = field(default_factory=metadata)
    metadata: ProviderMetadata | None = None
    id_token: Callable[[str], str] = lambda nonce: sign(id_token_claims(nonce))
    access_token: str = "access-token-value"
    token_type: str = "Bearer"
    userinfo_doc: dict[str, Any] | None = None
    discover_error: OIDCError | None = None
    token_error: OIDCError | None = None
    userinfo_error: OIDCError | None = None
    keys: list[JWK] = field(default_factory=lambda: [JWK(kid=KID, alg="ES256", key=ECKey.import_key(_KEY.as_dict(private=False)))])
    nonces: dict[str, str] = field(default_factory=dict)  # code -> nonce, filled by the test
    token_requests: list[dict[str, str]] = field(default_factory=list)
    userinfo_requests: list[str] = field(default_factory=list)

    async def discover(self) -> ProviderMetadata:
        if self.discover_error is not None:
            raise self.discover_error
        self.metadata = self.metadata_doc
        return self.metadata_doc

    async def exchange_code(
        self, *, code: str, redirect_uri: str, code_verifier: str, client_id: str, client_secret: str
    ) -> TokenResponse:
        self.token_requests.append({"code": code, "redirect_uri": redirect_uri, "code_verifier": code_verifier,
                                    "client_id": client_id, "client_secret": client_secret})
        if self.token_error is not None:
            raise self.token_error
        return TokenResponse(id_token=self.id_token(self.nonces.get(code, "")), access_token=self.access_token,
                             token_type=self.token_type, refresh_token=None, expires_in=300, scope=None)

    async def verify(self, token: str, *, logout: bool = False) -> VerifiedToken:
        kind = tokens.TokenKind.LOGOUT if logout else tokens.TokenKind.ID
        return tokens.verify_signature(token, self.keys, token_kind=kind)

    async def userinfo(self, access_token: str) -> dict[str, Any] | None:
        self.userinfo_requests.append(access_token)
        if self.userinfo_error is not None:
            raise self.userinfo_error
        return self.userinfo_doc


class FakeUpstream:
    """The app (the gate's ``Upstream`` Protocol): answers 200 ``app`` and remembers targets."""

    def __init__(self) -> None:
        self.targets: list[str] = []

    async def forward(
        self, request: web.BaseRequest, *, upstream_host: str, port: int, target: str, headers: CIMultiDict[str],
        public_origin: str, transfer: proxy.Transfer,
    ) -> web.StreamResponse:
        self.targets.append(target)
        transfer.status = 200
        return web.Response(text="app")

    async def websocket(
        self, request: web.BaseRequest, *, upstream_host: str, port: int, target: str, headers: CIMultiDict[str],
        transfer: proxy.Transfer,
    ) -> web.StreamResponse:
        raise AssertionError("no WebSocket in these tests")

    async def send(
        self, *, upstream_host: str, port: int, head: bytes, no_body: bool, transfer: proxy.Transfer
    ) -> tuple[upstream_client.Connection, upstream_client.Head]:
        raise AssertionError("the lean path is not used by Gate.handle")


class RecordingFlowLog(FlowLog):
    """A flow log to memory that also keeps the records it was given."""

    def __init__(self) -> None:
        super().__init__(None, stream=io.StringIO())
        self.records: list[FlowRecord] = []

    def write(self, record: FlowRecord) -> None:
        self.records.append(record)
        super().write(record)


@dataclass
class Answer:
    """One response of the gate and the flow record it wrote."""

    response: web.StreamResponse
    flow: FlowRecord

    @property
    def status(self) -> int:
        return self.response.status

    def set_cookies(self) -> list[str]:
        return self.response.headers.getall("Set-Cookie", [])

    def cookie(self, name: str) -> str | None:
        """The value this response sets for cookie ``name`` (None if it does not set it)."""
        for header in self.set_cookies():
            pair = header.split(";", 1)[0]
            key, _, value = pair.partition("=")
            if key == name:
                return value
        return None


@dataclass
class Login:
    """A login the gate started: what the browser holds and what the IdP was asked."""

    state: str
    nonce: str
    cookie: str  # "name=value" of the browser-binding cookie
    redirect_uri: str


class GateRig:
    """A Gate over fakes, and the browser-side steps of a login."""

    def __init__(self, provider: FakeProvider | None = None, *, service: dict[str, Any] | None = None) -> None:
        self.provider = provider or FakeProvider()
        self.store = MemorySessionStore(idle_timeout=3600)
        self.flowlog = RecordingFlowLog()
        self.upstream = FakeUpstream()
        self.now = NOW
        settings = Settings(path=Path("/nonexistent/enforcer.yaml"),
                            model=DaemonModel.model_validate({"definitions": [{"file": "/nonexistent"}]}))
        self.gate = Gate(
            settings=settings, runtime=Runtime(definitions(service), {"app": self.provider}),  # type: ignore[dict-item]
            store=self.store, flowlog=self.flowlog, metrics=Metrics(), upstream=self.upstream,
            listen_port=8443, clock=lambda: self.now,
        )

    async def request(self, method: str, target: str, headers: dict[str, str] | None = None) -> Answer:
        """Send one request through :meth:`Gate.handle`."""
        request = make_mocked_request(method, target, headers={"Host": HOST, **(headers or {})})
        response = await self.gate.handle(request)
        return Answer(response, self.flowlog.records[-1])

    async def begin(self, path: str = "/private") -> Login:
        """GET a protected path without a session: the login the gate starts."""
        answer = await self.request("GET", path, {"Accept": "text/html"})
        assert answer.status == 302, answer.flow.reason
        location = answer.response.headers["Location"]
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))
        [binding] = [c.split(";", 1)[0] for c in answer.set_cookies() if c.startswith("__Host-enforcertx-")]
        return Login(state=query["state"], nonce=query["nonce"], cookie=binding, redirect_uri=query["redirect_uri"])

    async def callback(
        self, login: Login, *, code: str = "the-code", params: dict[str, str] | None = None,
        cookie: str | None = None, method: str = "GET",
    ) -> Answer:
        """The browser comes back from the IdP with ``code`` and the login's state."""
        self.provider.nonces[code] = login.nonce
        query = {"code": code, "state": login.state, **(params or {})}
        query = {k: v for k, v in query.items() if v is not None}
        sent = login.cookie if cookie is None else cookie
        headers = {"Cookie": sent} if sent else {}
        return await self.request(method, "/oauth2/callback?" + urllib.parse.urlencode(query), headers)
