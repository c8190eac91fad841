"""Login and logout rules: the authorization request, the callback checks, the logout checks.

:func:`start_login` builds the authorization request (PKCE S256, state and nonce always); the
transaction stores keep it until the callback, bound to the browser. The callback is checked by
pure steps, one between each of the gate's awaits: :func:`parse_callback` (before the pending
login is taken), :func:`check_transaction` (after), :func:`check_response_params` (after
discovery), :func:`check_id_token` (after the token request and signature check) and
:func:`complete_login` (after the optional UserInfo request), which builds the session.
:func:`refresh_due` and :func:`check_refreshed` are the refresh rules (claims renewed with a
refresh token). :func:`logout_answer` is the logout CSRF rule. :class:`Provider` is what the gate uses of an
OpenID Provider (:class:`enforcer.identity.oidc.Provider` in production).
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import json
import logging
import secrets
import urllib.parse
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from enforcer.errors import Reason
from enforcer.identity import cookies
from enforcer.identity.sessions import Session
from enforcer.identity.tokens import (
    OIDCError,
    ProviderMetadata,
    TokenResponse,
    VerifiedToken,
    check_at_hash,
    check_claims,
    claims_to_tags,
    needs_userinfo,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# login transactions (pure)


@dataclass(frozen=True)
class LoginTransaction:
    """What we remember between the redirect to the IdP and the callback."""

    state: str
    nonce: str
    code_verifier: str
    binding: str  # SHA-256 of the browser-binding cookie value
    service: str
    issuer: str
    redirect_uri: str
    return_to: str
    created: float


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 S256: BASE64URL(SHA256(ASCII(verifier))) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def binding_hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def start_login(
    *,
    metadata: ProviderMetadata,
    client_id: str,
    redirect_uri: str,
    scopes: tuple[str, ...],
    service: str,
    return_to: str,
    now: float,
) -> tuple[str, LoginTransaction, str]:
    """Build the authorization URL: returns (url, transaction, binding cookie value). With
    ``offline_access`` in ``scopes`` (and only then) it asks ``prompt=consent``."""
    state = secrets.token_urlsafe(32)
    nonce = secrets.token_urlsafe(32)
    verifier = secrets.token_urlsafe(64)  # 86 chars, 512 bits
    binding = secrets.token_urlsafe(32)
    txn = LoginTransaction(
        state=state,
        nonce=nonce,
        code_verifier=verifier,
        binding=binding_hash(binding),
        service=service,
        issuer=metadata.issuer,
        redirect_uri=redirect_uri,
        return_to=return_to,
        created=now,
    )
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": " ".join(scopes),
        "state": state,
        "nonce": nonce,
        "code_challenge": pkce_challenge(verifier),
        "code_challenge_method": "S256",
    }
    if keeps_refresh_token(scopes):
        # OIDC Core 11: offline access needs the user's consent; IdPs that follow it (e.g.
        # oidc-provider) silently drop offline_access, and issue no refresh token, without it
        params["prompt"] = "consent"
    sep = "&" if urllib.parse.urlsplit(metadata.authorization_endpoint).query else "?"
    url = metadata.authorization_endpoint + sep + urllib.parse.urlencode(params)
    return url, txn, binding


TX_COOKIE_PREFIX = "__Host-enforcertx-"
"""Prefix of the browser-binding cookie of one pending login (one cookie per login)."""
MAX_PENDING_PER_BROWSER = 5
"""Pending logins one browser may have at once; starting another drops the oldest."""


def tx_cookie_name(state: str) -> str:
    """Name of the browser-binding cookie of the login with this ``state``."""
    return TX_COOKIE_PREFIX + hashlib.sha256(state.encode()).hexdigest()[:16]


def tx_cookie_value(now: float, binding: str) -> str:
    """Value of a browser-binding cookie: ``<unix time>.<binding>`` (the time orders them)."""
    return f"{int(now)}.{binding}"


def stale_tx_cookies(cookie_headers: list[str], max_pending: int = MAX_PENDING_PER_BROWSER) -> list[str]:
    """Names of the binding cookies to drop so that, with the login being started, a browser
    has at most ``max_pending`` pending logins: the oldest go (unreadable times count as 0)."""
    pending: list[tuple[int, str]] = []
    for header in cookie_headers:
        for pair in header.split(";"):
            name, _, value = pair.strip().partition("=")
            if name.startswith(TX_COOKIE_PREFIX):
                stamp = value.split(".", 1)[0]
                pending.append((int(stamp) if stamp.isdigit() else 0, name))
    pending.sort()
    excess = len(pending) - (max_pending - 1)
    return [name for _, name in pending[: max(0, excess)]]


class TransactionStore:
    """Pending logins keyed by state: bounded, expiring, single use."""

    def __init__(self, *, ttl: float, max_pending: int = 10_000) -> None:
        self.ttl = ttl
        self.max_pending = max_pending
        self._items: OrderedDict[str, LoginTransaction] = OrderedDict()

    def add(self, txn: LoginTransaction) -> None:
        self._items[txn.state] = txn
        while len(self._items) > self.max_pending:
            self._items.popitem(last=False)

    def pop(self, state: str, now: float) -> LoginTransaction | None:
        """Consume a transaction (atomic in the event loop: a second pop gets None)."""
        self._expire(now)
        return self._items.pop(state, None)

    def __len__(self) -> int:
        return len(self._items)

    def _expire(self, now: float) -> None:
        while self._items:
            first = next(iter(self._items.values()))
            if now - first.created <= self.ttl:
                break
            self._items.popitem(last=False)


class PendingBackend(Protocol):
    """Where :class:`SharedTransactionStore` keeps pending logins (the SQLite session store)."""

    async def put_pending(
        self, state: str, data: str, created: float, *, max_pending: int, ttl: float | None = None
    ) -> None: ...

    async def take_pending(self, state: str, now: float, ttl: float) -> str | None: ...


class SharedTransactionStore:
    """Pending logins in a store every worker process sees: the callback may land on any of
    them. Same contract as :class:`TransactionStore` (single use, TTL, capped), but async."""

    def __init__(self, backend: PendingBackend, *, ttl: float, max_pending: int = 10_000) -> None:
        self.backend = backend
        self.ttl = ttl
        self.max_pending = max_pending

    async def add(self, txn: LoginTransaction) -> None:
        data = json.dumps(dataclasses.asdict(txn), separators=(",", ":"))
        await self.backend.put_pending(txn.state, data, txn.created, max_pending=self.max_pending, ttl=self.ttl)

    async def pop(self, state: str, now: float) -> LoginTransaction | None:
        data = await self.backend.take_pending(state, now, self.ttl)
        if data is None:
            return None
        try:
            fields = json.loads(data)
            if not isinstance(fields, dict):
                raise TypeError("not an object")
            if not isinstance(fields.get("created"), int | float) or not all(
                isinstance(fields.get(f.name), str) for f in dataclasses.fields(LoginTransaction) if f.name != "created"
            ):
                raise TypeError("a field has the wrong type")
            txn = LoginTransaction(**fields)
        except (ValueError, TypeError) as exc:
            log.warning("dropping an unreadable pending login: %s", exc)
            return None
        return txn if txn.state == state else None




# ---------------------------------------------------------------------------
# the OpenID Provider, as the gate uses it


class Provider(Protocol):
    """One OpenID Provider: discovery, token request, signature check, UserInfo (I/O).

    Every method raises :class:`OIDCError` when the provider or what it sent is not usable.
    """

    @property
    def metadata(self) -> ProviderMetadata | None:
        """The discovery document, once :meth:`discover` succeeded (else None)."""
        ...

    async def discover(self) -> ProviderMetadata:
        """The validated discovery document (fetched once, then cached)."""
        ...

    async def exchange_code(
        self, *, code: str, redirect_uri: str, code_verifier: str, client_id: str, client_secret: str
    ) -> TokenResponse:
        """Authorization code -> tokens at the token endpoint."""
        ...

    async def verify(self, token: str, *, logout: bool = False) -> VerifiedToken:
        """Check an ID token's (or, with ``logout``, a logout token's) signature."""
        ...

    async def userinfo(self, access_token: str) -> dict[str, Any] | None:
        """The UserInfo document (None if the provider has no UserInfo endpoint)."""
        ...

    async def refresh(self, *, refresh_token: str, client_id: str, client_secret: str) -> TokenResponse:
        """A refresh token -> new tokens at the token endpoint (``id_token`` is ``""`` when the
        provider sent none)."""
        ...


# ---------------------------------------------------------------------------
# the callback (pure)

MAX_CALLBACK_QUERY = 8192
"""Longest callback query string accepted (longer: 414)."""


@dataclass(frozen=True, slots=True)
class LoginFailure:
    """Why a callback signs nobody in: the stable ``code`` (flow record, page, metric), the
    HTTP status and the sentence the error page shows."""

    code: Reason
    status: int = 400
    message: str = "Sign-in did not complete."

    @classmethod
    def of(cls, error: OIDCError) -> LoginFailure:
        """The failure for an OpenID Provider error: 502 for the provider's fault, else 400."""
        return cls(error.reason, 502 if error.status >= 500 else 400)


IDP_UNAVAILABLE = LoginFailure(Reason.IDP_UNAVAILABLE, 502)
"""The provider's discovery document cannot be had, so the callback cannot be checked."""


@dataclass(frozen=True, slots=True)
class LoginRules:
    """The settings of one service and of the enforcer that the callback checks apply."""

    service: str
    client_id: str
    scopes: tuple[str, ...]
    userinfo: str
    """When to call UserInfo: ``always``, ``never`` or ``auto`` (see :func:`needs_userinfo`)."""
    leeway: float
    """Clock skew allowed on ``exp``, ``iat`` and ``nbf`` (seconds)."""
    max_id_token_age: float
    """Oldest ``iat`` accepted (seconds before now)."""
    session_lifetime: float
    """Absolute lifetime of the session a login creates (seconds)."""
    claims_lifetime: float = 300.0
    """How long claims are trusted before a refresh renews them (with a refresh token)."""


def parse_callback(method: str, raw_path: str, callback_path: str, query: str) -> dict[str, str] | LoginFailure:
    """The callback's query parameters, each exactly once and ``state`` among them; or why not."""
    if method != "GET":
        return LoginFailure(Reason.CALLBACK_METHOD, 405)
    if urllib.parse.urlsplit(raw_path).path != callback_path:
        # Exact redirect_uri matching (RFC 9700 §2.1, P-CB-14): '//cb', '/x/../cb' and
        # the like canonicalise to the callback path but are not the registered URI.
        return LoginFailure(Reason.CALLBACK_PATH_NOT_EXACT)
    if len(query) > MAX_CALLBACK_QUERY:
        return LoginFailure(Reason.CALLBACK_TOO_LARGE, 414)
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=20)
    except ValueError:
        return LoginFailure(Reason.CALLBACK_MALFORMED)
    params: dict[str, str] = {}
    for k, v in pairs:
        if k in params:
            return LoginFailure(Reason.CALLBACK_DUPLICATE_PARAMETER)
        params[k] = v
    if not params.get("state"):
        return LoginFailure(Reason.CALLBACK_NO_STATE)
    return params


def check_transaction(
    txn: LoginTransaction | None, *, service: str, cookie_headers: list[str]
) -> LoginTransaction | LoginFailure:
    """The pending login, if it exists, is for this service and is bound to this browser (its
    binding cookie sent exactly once, holding the value whose hash the login kept)."""
    if txn is None or txn.service != service:
        return LoginFailure(Reason.CALLBACK_UNKNOWN_STATE)
    found, cookie = cookies.find_cookie(cookie_headers, tx_cookie_name(txn.state))
    binding = cookie.split(".", 1)[1] if cookie and "." in cookie else ""
    bound = secrets.compare_digest(binding_hash(binding), txn.binding)
    if found is not cookies.CookieLookup.FOUND or not bound:
        return LoginFailure(Reason.CALLBACK_NOT_BOUND)
    return txn


def check_response_params(
    params: Mapping[str, str], txn: LoginTransaction, *, iss_parameter_supported: bool
) -> str | LoginFailure:
    """The authorization code, if the response comes from the login's issuer (RFC 9207
    ``iss``: required when the provider announces it) and is not an error."""
    iss = params.get("iss")
    if iss is not None and iss != txn.issuer:
        return LoginFailure(Reason.CALLBACK_ISS_MISMATCH)
    if iss is None and iss_parameter_supported:
        return LoginFailure(Reason.CALLBACK_ISS_MISSING)
    if "error" in params:
        error = params["error"][:64]
        return LoginFailure(Reason.IDP_ERROR, 403, f"The identity provider refused the sign-in ({error}).")
    code = params.get("code")
    if not code:
        return LoginFailure(Reason.CALLBACK_NO_CODE)
    return code


def check_id_token(
    verified: VerifiedToken, tokens: TokenResponse, txn: LoginTransaction, rules: LoginRules, now: float
) -> dict[str, Any] | LoginFailure:
    """The claims of a signature-checked ID token, if they are for this login and client
    (OIDC Core §3.1.3.7) and ``at_hash``, when present, matches the access token."""
    try:
        check_claims(
            verified.claims, issuer=txn.issuer, client_id=rules.client_id, nonce=txn.nonce,
            now=now, leeway=rules.leeway, max_age=rules.max_id_token_age,
        )
        check_at_hash(verified.claims, str(verified.header.get("alg")), tokens.access_token)
    except OIDCError as exc:
        return LoginFailure.of(exc)
    return dict(verified.claims)


def wants_userinfo(tokens: TokenResponse, rules: LoginRules, claims: Mapping[str, Any]) -> bool:
    """Whether to ask UserInfo for more claims: only with a bearer access token, and as
    the service's ``userinfo`` setting says."""
    return tokens.token_type.lower() == "bearer" and needs_userinfo(rules.userinfo, rules.scopes, claims)


def _identity(
    claims: Mapping[str, Any], userinfo: Mapping[str, Any] | None, *, status: int
) -> tuple[dict[str, Any], frozenset[str], str | None, str | None] | LoginFailure:
    """Who a checked ID token (plus UserInfo) says the user is, for a login and a refresh alike:
    (merged claims, tags, email, username), or why not (with ``status``).

    UserInfo must name the same ``sub``; its claims fill in what the ID token lacks (the ID token
    wins). The email counts only when ``email_verified`` is true; it and ``preferred_username``
    only when they are strings."""
    merged = dict(claims)
    if userinfo is not None:
        if userinfo.get("sub") != merged["sub"]:
            return LoginFailure(Reason.USERINFO_SUB_MISMATCH, status)
        for k, v in userinfo.items():
            merged.setdefault(k, v)
    try:
        tags = claims_to_tags(merged)
    except OIDCError as exc:
        return LoginFailure.of(exc)
    email = merged.get("email") if merged.get("email_verified") is True else None
    username = merged.get("preferred_username")
    return (merged, tags, email if isinstance(email, str) else None,
            username if isinstance(username, str) else None)


def complete_login(
    claims: Mapping[str, Any],
    userinfo: Mapping[str, Any] | None,
    *,
    tokens: TokenResponse,
    txn: LoginTransaction,
    rules: LoginRules,
    now: float,
) -> Session | LoginFailure:
    """The session a checked ID token signs in, or why not.

    UserInfo must name the same ``sub``; its claims fill in what the ID token lacks (the ID
    token wins). The email counts only when ``email_verified`` is true; ``preferred_username``
    and ``sid`` only when they are strings. The session lives ``rules.session_lifetime``.
    """
    identity = _identity(claims, userinfo, status=400)
    if isinstance(identity, LoginFailure):
        return identity
    merged, tags, email, username = identity
    sid = merged.get("sid")
    return Session(
        service=rules.service, issuer=txn.issuer, sub=merged["sub"], email=email, username=username,
        tags=tags, sid=sid if isinstance(sid, str) else None,
        id_token=tokens.id_token, created=now, last_seen=now, expires=now + rules.session_lifetime,
        refresh_token=tokens.refresh_token if keeps_refresh_token(rules.scopes) else None,
        claims_expire=(now + rules.claims_lifetime
                       if keeps_refresh_token(rules.scopes) and tokens.refresh_token else None),
    )


# ---------------------------------------------------------------------------
# refresh (pure)


def keeps_refresh_token(scopes: tuple[str, ...]) -> bool:
    """Whether a refresh token is kept at all: only when the service asks ``offline_access``."""
    return "offline_access" in scopes


def token_binding(session: Session) -> bytes:
    """What a sealed refresh token is bound to (AEAD associated data): its service and user."""
    return "\x00".join((session.service, session.issuer, session.sub)).encode()


class RefreshDue(enum.Enum):
    """When the gate renews a session's claims."""

    NO = "no"
    """No refresh token, or the claims are fresh: serve as is."""
    BACKGROUND = "background"
    """Within ``margin`` of the claims' end: serve with the current claims, refresh aside."""
    INLINE = "inline"
    """The claims have expired: refresh before deciding this request."""


def refresh_due(session: Session, now: float, margin: float) -> RefreshDue:
    """How the claims of ``session`` must be renewed at ``now`` (the lean path's test is the
    same single comparison, ``now < claims_expire - margin``)."""
    ce = session.claims_expire
    if ce is None or session.refresh_token is None or now < ce - margin:
        return RefreshDue.NO
    return RefreshDue.BACKGROUND if now < ce else RefreshDue.INLINE


def check_refreshed(
    session: Session,
    verified: VerifiedToken | None,
    userinfo: Mapping[str, Any] | None,
    *,
    tokens: TokenResponse,
    rules: LoginRules,
    refresh_token: str | None,
    now: float,
) -> Session | LoginFailure:
    """The session with renewed claims after a refresh, or why the session must end.

    The new ID token (OIDC Core §12.2) gets every check of a login but the nonce -- it has
    none -- against the session's own issuer and client, and must name the session's ``sub``;
    UserInfo, when asked, must too. No ID token ends the session: the claims cannot be renewed,
    and keeping the old ones would keep a removed group forever. ``refresh_token`` is the
    (sealed) token to keep: the rotated one, or the old one when the provider did not rotate.
    """
    if verified is None or not tokens.id_token:
        return LoginFailure(Reason.REFRESH_NO_ID_TOKEN, 401)
    claims = dict(verified.claims)
    try:
        check_claims(
            {**claims, "nonce": ""}, issuer=session.issuer, client_id=rules.client_id, nonce="",
            now=now, leeway=rules.leeway, max_age=rules.max_id_token_age,
        )
        check_at_hash(claims, str(verified.header.get("alg")), tokens.access_token)
    except OIDCError as exc:
        return LoginFailure.of(exc)
    if claims["sub"] != session.sub:
        return LoginFailure(Reason.REFRESH_SUB_MISMATCH, 401)
    identity = _identity(claims, userinfo, status=401)
    if isinstance(identity, LoginFailure):
        return identity
    _, tags, email, username = identity
    # sid stays: the stores' back-channel logout index keys on the login's sid
    return dataclasses.replace(
        session, tags=tags, email=email, username=username, id_token=tokens.id_token,
        refresh_token=refresh_token, claims_expire=now + rules.claims_lifetime,
    )


# ---------------------------------------------------------------------------
# logout (pure)


class LogoutAnswer(enum.Enum):
    """What a request to the logout endpoint gets."""

    SIGN_OUT = "sign_out"
    """End the session now."""
    CONFIRM = "confirm"
    """Possibly cross-site (logout CSRF): ask with a same-origin form first."""
    METHOD_NOT_ALLOWED = "method_not_allowed"


def logout_answer(method: str, fetch_site: str | None, origin: str | None, service_origin: str) -> LogoutAnswer:
    """The logout CSRF rule. A POST signs out when the browser says it is same-origin
    (``Sec-Fetch-Site``) or its ``Origin`` is the service's; a GET or HEAD when it is not
    cross-site (``Sec-Fetch-Site`` absent, ``same-origin`` or ``none``) and has no foreign
    ``Origin``. Anything else is asked to confirm."""
    if method == "POST":
        allowed = fetch_site == "same-origin" or origin == service_origin
    elif method in ("GET", "HEAD"):
        allowed = fetch_site in (None, "same-origin", "none") and (origin is None or origin == service_origin)
    else:
        return LogoutAnswer.METHOD_NOT_ALLOWED
    return LogoutAnswer.SIGN_OUT if allowed else LogoutAnswer.CONFIRM


def end_session_url(endpoint: str, *, client_id: str, id_token: str, post_logout_redirect: str | None) -> str:
    """The provider's RP-initiated logout URL for a session that held ``id_token``."""
    params = {"client_id": client_id, "id_token_hint": id_token, "state": secrets.token_urlsafe(16)}
    if post_logout_redirect:
        params["post_logout_redirect_uri"] = post_logout_redirect
    sep = "&" if "?" in endpoint else "?"
    return endpoint + sep + urllib.parse.urlencode(params)
