"""OpenID Connect relying party: discovery, JWKS, login transactions, ID-token checks.

Split in two halves:

* **I/O** — :class:`Provider` talks to one OpenID Provider: discovery (mandatory,
  exact issuer), the JWKS cache (refetch on unknown ``kid``, throttled and coalesced),
  the token request (client_secret_basic, or client_secret_post when that is all the
  IdP offers) and UserInfo.  Every response is size-bounded, never follows redirects
  and must be JSON without duplicate member names.
* **pure** — :func:`start_login` builds the authorization request (PKCE S256, state and
  nonce always); :func:`verify_id_token` checks an ID token against an allowlist of
  asymmetric algorithms and the claims rules of OIDC Core §3.1.3.7; :func:`claims_to_tags`
  turns claims into policy tags.  JOSE work (signature check) is done by joserfc.

Every failure is an :class:`OIDCError` with a stable ``code`` that is shown on the error
page, written to the flow record and used as a metric label.  No token, code or secret
is ever part of a message.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import secrets
import ssl
import time
import urllib.parse
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from joserfc import jws
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import ECKey, OKPKey, RSAKey, import_key

log = logging.getLogger("enforcer.oidc")

# Limits on what the OpenID Provider (or an attacker in its place) controls.
MAX_DOCUMENT_BYTES = 1 << 20  # discovery, JWKS, token and userinfo responses
MAX_ID_TOKEN_BYTES = 64 << 10
MAX_KEYS = 100
MAX_TAGS = 2000
MAX_TAG_BYTES = 1024
MAX_SUB_LENGTH = 255

#: Signature algorithms we accept. Never ``none``, never HMAC (the client secret is
#: not a verification key we want an attacker to be able to choose).
ALLOWED_ALGS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_EC_ALG = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}

#: The one event a back-channel logout token carries (Back-Channel Logout 1.0 §2.4).
BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"

#: Claims that change at every login and never make sense in a policy.
PER_LOGIN_CLAIMS = frozenset({"nonce", "at_hash", "c_hash", "jti", "auth_time", "iat", "exp", "nbf"})


class OIDCError(Exception):
    """A login step failed; ``code`` is stable and safe to show."""

    def __init__(self, code: str, detail: str = "", *, status: int = 400) -> None:
        self.code = code
        self.detail = detail
        self.status = status
        super().__init__(f"{code}: {detail}" if detail else code)


# ---------------------------------------------------------------------------
# strict JSON


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate member {k!r}")
        out[k] = v
    return out


def strict_json_object(data: bytes, what: str) -> dict[str, Any]:
    """Parse a JSON object; reject duplicates, BOMs, deep nesting and non-objects."""
    try:
        text = data.decode("utf-8")
        if text.startswith("\ufeff"):
            raise ValueError("byte-order mark")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise OIDCError(f"{what}_invalid_json", str(exc)[:200], status=502) from None
    if not isinstance(value, dict):
        raise OIDCError(f"{what}_invalid_json", "not a JSON object", status=502)
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _b64url_decode(segment: str) -> bytes:
    if not segment or any(c in segment for c in "=+/ \t\r\n"):
        raise ValueError("not base64url without padding")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


# ---------------------------------------------------------------------------
# metadata and keys


@dataclass(frozen=True)
class ProviderMetadata:
    """The parts of the discovery document we use, already validated."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    end_session_endpoint: str | None
    token_auth_method: str  # client_secret_basic or client_secret_post
    iss_parameter_supported: bool

    @classmethod
    def parse(cls, doc: Mapping[str, Any], *, expected_issuer: str, allow_http_loopback: bool) -> ProviderMetadata:
        issuer = doc.get("issuer")
        if issuer != expected_issuer:
            raise OIDCError(
                "discovery_issuer_mismatch",
                f"discovery document says issuer {issuer!r}, configured OIDCProviderURL is "
                f"{expected_issuer!r}; they must be identical (check a trailing '/')",
                status=502,
            )

        issuer_loopback = _host_class(urllib.parse.urlsplit(issuer).hostname) == "loopback"

        def url(key: str, required: bool) -> str | None:
            value = doc.get(key)
            if value is None and not required:
                return None
            if not isinstance(value, str) or not _acceptable_url(value, allow_http_loopback):
                raise OIDCError(
                    "discovery_bad_endpoint",
                    f"{key} must be an https URL (got {str(value)[:100]!r})",
                    status=502,
                )
            host = _host_class(urllib.parse.urlsplit(value).hostname)
            if host == "internal" or (host == "loopback" and not issuer_loopback):
                # SSRF through metadata (P-JWKS-11): never the cloud metadata address or the
                # like, and loopback only for an issuer that is itself on loopback.
                raise OIDCError(
                    "discovery_bad_endpoint",
                    f"{key} points to a {host} address, which is not allowed for this issuer "
                    f"(got {value[:100]!r})",
                    status=502,
                )
            return value

        methods = doc.get("token_endpoint_auth_methods_supported", ["client_secret_basic"])
        if not isinstance(methods, list):
            methods = ["client_secret_basic"]
        if "client_secret_basic" in methods:
            auth = "client_secret_basic"
        elif "client_secret_post" in methods:
            auth = "client_secret_post"
        else:
            raise OIDCError(
                "discovery_no_client_auth",
                "the IdP supports neither client_secret_basic nor client_secret_post",
                status=502,
            )
        types = doc.get("response_types_supported")
        if isinstance(types, list) and "code" not in types:
            raise OIDCError("discovery_no_code_flow", "response_types_supported lacks 'code'", status=502)
        return cls(
            issuer=issuer,
            authorization_endpoint=url("authorization_endpoint", True) or "",
            token_endpoint=url("token_endpoint", True) or "",
            jwks_uri=url("jwks_uri", True) or "",
            userinfo_endpoint=url("userinfo_endpoint", False),
            end_session_endpoint=url("end_session_endpoint", False),
            token_auth_method=auth,
            iss_parameter_supported=doc.get("authorization_response_iss_parameter_supported") is True,
        )


def _host_class(host: str | None) -> str:
    """``loopback``, ``internal`` (link-local, unspecified, multicast, reserved: never an
    IdP endpoint, e.g. the cloud metadata address) or ``public`` (names and other IPs)."""
    if not host:
        return "internal"
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return "loopback"
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return "public"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local or ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return "internal"
    return "public"


def _acceptable_url(value: str, allow_http_loopback: bool) -> bool:
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:
        return False
    if not parts.hostname or parts.fragment:
        return False
    if parts.scheme == "https":
        return True
    if parts.scheme == "http" and allow_http_loopback:
        return parts.hostname in ("127.0.0.1", "::1", "localhost")
    return False


VerifyKey = RSAKey | ECKey | OKPKey


@dataclass(frozen=True)
class JWK:
    """One verification key and the single algorithm it may be used with."""

    kid: str | None
    alg: str | None  # from the JWK, if it names one
    key: VerifyKey

    def allows(self, alg: str) -> bool:
        if self.alg is not None:
            return alg == self.alg
        if isinstance(self.key, RSAKey):
            return alg[:2] in ("RS", "PS")
        if isinstance(self.key, ECKey):
            return _EC_ALG.get(str(self.key.curve_name)) == alg
        return alg == "EdDSA"


def parse_jwks(doc: Mapping[str, Any]) -> list[JWK]:
    """Validate a JWK Set: refuse symmetric or private keys, weak RSA, enc-only keys."""
    keys = doc.get("keys")
    if not isinstance(keys, list) or not keys:
        raise OIDCError("jwks_invalid", "no 'keys' array", status=502)
    if len(keys) > MAX_KEYS:
        raise OIDCError("jwks_invalid", f"more than {MAX_KEYS} keys", status=502)
    out: list[JWK] = []
    for raw in keys:
        if not isinstance(raw, dict):
            continue
        kty = raw.get("kty")
        if kty == "oct" or "d" in raw or "p" in raw:
            # A JWK Set "MUST NOT contain private or symmetric key values" (Discovery §3).
            raise OIDCError("jwks_invalid", "JWKS contains a symmetric or private key", status=502)
        if raw.get("use") not in (None, "sig"):
            continue
        ops = raw.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            continue
        if kty not in ("RSA", "EC", "OKP"):
            continue
        alg = raw.get("alg")
        if alg is not None and alg not in ALLOWED_ALGS:
            continue
        kid = raw.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > 256):
            continue
        public = {k: v for k, v in raw.items() if k in ("kty", "n", "e", "crv", "x", "y")}
        if kty == "RSA" and _rsa_modulus_bits(public.get("n")) < 2048:
            log.warning("ignoring RSA JWK kid=%r: modulus shorter than 2048 bits", kid)
            continue
        try:
            key = import_key(public)
        except (JoseError, ValueError, TypeError) as exc:
            log.warning("ignoring unusable JWK kid=%r: %s", kid, exc)
            continue
        if isinstance(key, RSAKey) and key.raw_value.key_size < 2048:
            log.warning("ignoring RSA JWK kid=%r: modulus shorter than 2048 bits", kid)
            continue
        if not isinstance(key, RSAKey | ECKey | OKPKey):
            continue
        out.append(JWK(kid=kid, alg=alg, key=key))
    if not out:
        raise OIDCError("jwks_invalid", "no usable signing key", status=502)
    return out


def _rsa_modulus_bits(n: object) -> int:
    """Bit length of a JWK ``n`` (0 if it is not base64url), checked before any import."""
    if not isinstance(n, str) or len(n) > 4096:
        return 0
    try:
        return int.from_bytes(_b64url_decode(n), "big").bit_length()
    except ValueError:
        return 0


# ---------------------------------------------------------------------------
# ID token verification (pure)


@dataclass(frozen=True)
class VerifiedToken:
    """A verified ID token: its claims are safe to use."""

    claims: dict[str, Any]
    header: dict[str, Any]
    raw: str


def select_key(keys: list[JWK], header: Mapping[str, Any]) -> list[JWK]:
    """Candidate keys for a JWS header (bounded); empty if the kid is unknown."""
    alg = header.get("alg")
    kid = header.get("kid")
    if not isinstance(alg, str):
        return []
    if kid is not None:
        if not isinstance(kid, str) or len(kid) > 256:
            return []
        return [k for k in keys if k.kid == kid and k.allows(alg)][:3]
    return [k for k in keys if k.allows(alg)][:3]


def split_jws(token: str) -> tuple[dict[str, Any], bytes]:
    """Decode a compact JWS's header and payload strictly (no signature check)."""
    if len(token) > MAX_ID_TOKEN_BYTES:
        raise OIDCError("id_token_too_large", f"over {MAX_ID_TOKEN_BYTES} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        code = "id_token_encrypted" if len(parts) == 5 else "id_token_malformed"
        raise OIDCError(code, "not a compact JWS")
    try:
        header = strict_json_object(_b64url_decode(parts[0]), "id_token_header")
        payload = _b64url_decode(parts[1])
        _b64url_decode(parts[2])
    except ValueError as exc:
        raise OIDCError("id_token_malformed", str(exc)[:100]) from None
    except OIDCError as exc:
        raise OIDCError("id_token_malformed", exc.detail, status=400) from None
    return header, payload


def check_header(header: Mapping[str, Any], *, logout: bool = False) -> str:
    """Return the algorithm if the JWS header is acceptable for an ID token (or, with
    ``logout``, for a logout token, which must say ``typ: logout+jwt``)."""
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
        raise OIDCError("id_token_bad_alg", f"algorithm {str(alg)[:20]!r} is not allowed")
    if "crit" in header or header.get("b64") is False:
        raise OIDCError("id_token_bad_header", "critical header parameters are not supported")
    typ = header.get("typ")
    if logout:
        # Back-Channel Logout §2.4 recommends the explicit type; we require it so that no
        # other JWT of the IdP (an ID token above all) can pass as a logout token.
        if not isinstance(typ, str) or typ.lower() not in ("logout+jwt", "application/logout+jwt"):
            raise OIDCError("id_token_bad_typ", "typ is not logout+jwt")
    elif typ is not None and (not isinstance(typ, str) or typ.lower() not in ("jwt", "application/jwt")):
        raise OIDCError("id_token_bad_typ", "typ is not JWT")
    if "enc" in header or "zip" in header:
        raise OIDCError("id_token_encrypted", "encrypted ID tokens are not configured")
    return alg


def verify_signature(token: str, keys: list[JWK], *, logout: bool = False) -> VerifiedToken:
    """Verify the JWS with a key from ``keys`` (joserfc does the cryptography)."""
    header, _payload = split_jws(token)
    alg = check_header(header, logout=logout)
    candidates = select_key(keys, header)
    if not candidates:
        raise OIDCError("id_token_unknown_key", "no key in the JWKS matches kid and alg")
    for candidate in candidates:
        try:
            with warnings.catch_warnings():
                # joserfc flags "EdDSA" as deprecated by RFC 9864; we allow it on purpose
                # (it is in ALLOWED_ALGS), and a warning must not become an exception.
                warnings.simplefilter("ignore", SecurityWarning)
                result = jws.deserialize_compact(token, candidate.key, algorithms=[alg])
        except (JoseError, ValueError, TypeError):
            continue
        try:
            claims = strict_json_object(result.payload, "id_token_payload")
        except OIDCError as exc:
            raise OIDCError(exc.code, exc.detail, status=400) from None
        return VerifiedToken(claims=claims, header=dict(header), raw=token)
    raise OIDCError("id_token_bad_signature", "signature does not verify")


def _numeric_date(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise OIDCError(f"id_token_no_{name}", f"{name} claim is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OIDCError(f"id_token_bad_{name}", f"{name} is not a number")
    if not math.isfinite(value) or value < 0 or value > 2**53:
        raise OIDCError(f"id_token_bad_{name}", f"{name} is out of range")
    return float(value)


def check_claims(
    claims: Mapping[str, Any],
    *,
    issuer: str,
    client_id: str,
    nonce: str,
    now: float,
    leeway: float,
    max_age: float,
) -> None:
    """OIDC Core §3.1.3.7 claim checks, strictly (raises OIDCError)."""
    if claims.get("iss") != issuer:
        raise OIDCError("id_token_bad_iss", "iss does not equal the configured issuer")
    aud = claims.get("aud")
    if aud not in (client_id, [client_id]):
        raise OIDCError("id_token_bad_aud", "aud is not exactly this client")
    azp = claims.get("azp")
    if azp is not None and azp != client_id:
        raise OIDCError("id_token_bad_azp", "azp is not this client")
    exp = _numeric_date(claims, "exp", required=True)
    iat = _numeric_date(claims, "iat", required=True)
    nbf = _numeric_date(claims, "nbf", required=False)
    assert exp is not None
    assert iat is not None
    if now > exp + leeway:
        raise OIDCError("id_token_expired", "exp is in the past")
    if iat > now + leeway:
        raise OIDCError("id_token_bad_iat", "iat is in the future")
    if iat < now - max_age - leeway:
        raise OIDCError("id_token_too_old", "iat is older than the maximum ID token age")
    if nbf is not None and nbf > now + leeway:
        raise OIDCError("id_token_bad_nbf", "nbf is in the future")
    got = claims.get("nonce")
    if not isinstance(got, str) or not hmac.compare_digest(got.encode(), nonce.encode()):
        raise OIDCError("id_token_bad_nonce", "nonce does not match this login")
    sub = claims.get("sub")
    if (
        not isinstance(sub, str)
        or not 0 < len(sub) <= MAX_SUB_LENGTH
        or not sub.isascii()
        or not sub.isprintable()
    ):
        raise OIDCError("id_token_bad_sub", "sub is missing or not 1-255 printable ASCII characters")


def check_logout_claims(
    claims: Mapping[str, Any],
    *,
    issuer: str,
    client_id: str,
    now: float,
    leeway: float,
    max_age: float,
) -> tuple[str | None, str | None]:
    """Back-Channel Logout §2.6 checks on a verified logout token; returns (sub, sid).

    iss and aud as for ID tokens; iat, exp and jti required; ``events`` must be an object
    holding the back-channel event (an object); no ``nonce``; ``sub`` and/or ``sid``.
    """
    if claims.get("iss") != issuer:
        raise OIDCError("logout_token_bad_iss", "iss does not equal the configured issuer")
    if claims.get("aud") not in (client_id, [client_id]):
        raise OIDCError("logout_token_bad_aud", "aud is not exactly this client")
    try:
        exp = _numeric_date(claims, "exp", required=True)
        iat = _numeric_date(claims, "iat", required=True)
    except OIDCError as exc:
        raise OIDCError(exc.code.replace("id_token_", "logout_token_"), exc.detail) from None
    assert exp is not None
    assert iat is not None
    if now > exp + leeway:
        raise OIDCError("logout_token_expired", "exp is in the past")
    if iat > now + leeway or iat < now - max_age - leeway:
        raise OIDCError("logout_token_bad_iat", "iat is in the future or too old")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > 256:
        raise OIDCError("logout_token_no_jti", "jti is missing")
    events = claims.get("events")
    if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_EVENT), dict):
        raise OIDCError("logout_token_bad_events", "events lacks the back-channel logout event")
    if "nonce" in claims:
        raise OIDCError("logout_token_has_nonce", "a logout token must not contain a nonce")
    sub, sid = claims.get("sub"), claims.get("sid")
    if sub is None and sid is None:
        raise OIDCError("logout_token_no_subject", "neither sub nor sid")
    for name, value in (("sub", sub), ("sid", sid)):
        if value is not None and (
            not isinstance(value, str) or not 0 < len(value) <= MAX_SUB_LENGTH or not value.isprintable()
        ):
            raise OIDCError(f"logout_token_bad_{name}", f"{name} is not a short printable string")
    return sub, sid


def check_at_hash(claims: Mapping[str, Any], alg: str, access_token: str | None) -> None:
    """If the ID token carries ``at_hash``, it must match the access token."""
    at_hash = claims.get("at_hash")
    if at_hash is None or access_token is None:
        return
    bits = {"256": hashlib.sha256, "384": hashlib.sha384, "512": hashlib.sha512}
    digest = bits.get(alg[-3:], hashlib.sha512)(access_token.encode("ascii", "replace")).digest()
    if alg == "EdDSA":
        digest = hashlib.sha512(access_token.encode("ascii", "replace")).digest()
    expected = base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode()
    if not isinstance(at_hash, str) or not hmac.compare_digest(at_hash, expected):
        raise OIDCError("id_token_bad_at_hash", "at_hash does not match the access token")


def claims_to_tags(claims: Mapping[str, Any]) -> frozenset[str]:
    """Claims -> tags: ``c: "v"`` -> ``c=v``; a string list -> one tag each; booleans
    -> ``c=true|false``; numbers, objects and nulls are ignored.  ``email`` becomes a
    tag only when ``email_verified`` is true.  Per-login values (nonce, at_hash, ...)
    are skipped.  More than :data:`MAX_TAGS` tags refuses the login."""
    tags: set[str] = set()
    verified = claims.get("email_verified") is True
    for name, value in claims.items():
        if name in PER_LOGIN_CLAIMS or not isinstance(name, str):
            continue
        if name == "email" and not verified:
            continue
        if isinstance(value, bool):
            tags.add(f"{name}={'true' if value else 'false'}")
        elif isinstance(value, str):
            tags.add(f"{name}={value}")
        elif isinstance(value, list):
            tags.update(f"{name}={v}" for v in value if isinstance(v, str))
        if len(tags) > MAX_TAGS:
            raise OIDCError("claims_too_large", f"more than {MAX_TAGS} tags from claims")
    for tag in tags:
        if len(tag) > MAX_TAG_BYTES:
            raise OIDCError("claims_too_large", f"a claim value is longer than {MAX_TAG_BYTES} bytes")
    return frozenset(tags)


def needs_userinfo(mode: str, scopes: tuple[str, ...], claims: Mapping[str, Any]) -> bool:
    """Whether to call UserInfo: ``always``, ``never``, or ``auto`` = only when the ID
    token lacks the claims its scopes promise (saves a round trip per login)."""
    if mode != "auto":
        return mode == "always"
    if "email" in scopes and "email" not in claims:
        return True
    return "profile" in scopes and not ({"name", "preferred_username"} & claims.keys())


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
    """Build the authorization URL: returns (url, transaction, binding cookie value)."""
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
    sep = "&" if urllib.parse.urlsplit(metadata.authorization_endpoint).query else "?"
    url = metadata.authorization_endpoint + sep + urllib.parse.urlencode(params)
    return url, txn, binding


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

    async def put_pending(self, state: str, data: str, created: float, *, max_pending: int) -> None: ...

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
        await self.backend.put_pending(txn.state, data, txn.created, max_pending=self.max_pending)

    async def pop(self, state: str, now: float) -> LoginTransaction | None:
        data = await self.backend.take_pending(state, now, self.ttl)
        if data is None:
            return None
        try:
            fields = json.loads(data)
            txn = LoginTransaction(**fields)
            if not isinstance(txn.created, int | float) or not all(
                isinstance(getattr(txn, f.name), str) for f in dataclasses.fields(txn) if f.name != "created"
            ):
                raise TypeError("a field has the wrong type")
        except (ValueError, TypeError) as exc:
            log.warning("dropping an unreadable pending login: %s", exc)
            return None
        return txn if txn.state == state else None


# ---------------------------------------------------------------------------
# the provider (I/O)


@dataclass
class TokenResponse:
    """The token endpoint's answer, validated."""

    id_token: str
    access_token: str
    token_type: str
    refresh_token: str | None
    expires_in: float | None
    scope: str | None


def parse_token_response(doc: Mapping[str, Any]) -> TokenResponse:
    """RFC 6749 §5.1 + OIDC Core §3.1.3.3 (raises OIDCError)."""
    id_token = doc.get("id_token")
    access = doc.get("access_token")
    token_type = doc.get("token_type")
    if not isinstance(id_token, str) or not id_token:
        raise OIDCError("token_no_id_token", "token response has no id_token")
    if not isinstance(access, str) or not access:
        raise OIDCError("token_no_access_token", "token response has no access_token")
    if not isinstance(token_type, str) or not token_type:
        raise OIDCError("token_no_token_type", "token response has no token_type")
    expires = doc.get("expires_in")
    expires_in = (
        float(expires)
        if isinstance(expires, int | float) and not isinstance(expires, bool) and 0 < expires < 10**9
        else None
    )
    refresh = doc.get("refresh_token")
    scope = doc.get("scope")
    return TokenResponse(
        id_token=id_token,
        access_token=access,
        token_type=token_type,
        refresh_token=refresh if isinstance(refresh, str) else None,
        expires_in=expires_in,
        scope=scope if isinstance(scope, str) else None,
    )


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

    async def _get_json(self, url: str, what: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        try:
            async with self.http.get(
                url,
                headers=headers,
                allow_redirects=False,
                ssl=self.ssl_context if self.ssl_context is not None else True,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                body = await _read_bounded(resp, what)
                if resp.status != 200:
                    raise OIDCError(f"{what}_http_{resp.status}", f"{what} answered HTTP {resp.status}", status=502)
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as exc:
            raise OIDCError(f"{what}_unreachable", f"{type(exc).__name__}: {str(exc)[:200]}", status=502) from None
        return strict_json_object(body, what)

    async def discover(self) -> ProviderMetadata:
        """Fetch and validate the discovery document (cached once it succeeded)."""
        if self.metadata is not None:
            return self.metadata
        async with self._discover_lock:
            if self.metadata is not None:
                return self.metadata
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                doc = await self._get_json(url, "discovery")
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
                keys = parse_jwks(await self._get_json(metadata.jwks_uri, "jwks"))
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
        metadata = await self.discover()
        if time.monotonic() - self.keys_fetched > self.jwks_max_age:
            await self._refresh_keys(metadata, force=False, stale_only=True)
        before = self.keys
        try:
            return verify_signature(token, before, logout=logout)
        except OIDCError as exc:
            if exc.code != "id_token_unknown_key":
                raise
        await self._refresh_keys(metadata, force=False)
        if self.keys is not before:  # refreshed by us or by a concurrent miss
            return verify_signature(token, self.keys, logout=logout)
        raise OIDCError("id_token_unknown_key", "no key in the JWKS matches kid and alg")

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
                body = await _read_bounded(resp, "token")
                status = resp.status
                content_type = resp.content_type
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as exc:
            raise OIDCError("token_unreachable", type(exc).__name__, status=502) from None
        if status != 200:
            error = "unknown"
            try:
                err_doc = json.loads(body.decode("utf-8"))
                if isinstance(err_doc, dict) and isinstance(err_doc.get("error"), str):
                    error = err_doc["error"][:64]
            except (ValueError, UnicodeDecodeError):
                pass
            code_name = "token_" + ("".join(c for c in error if c.isalnum() or c == "_") or "error")
            if error == "invalid_client":
                log.error(
                    "the IdP rejected the client credentials of %s (invalid_client): "
                    "check OIDCClientID/OIDCClientSecret",
                    client_id,
                )
            raise OIDCError(code_name, f"token endpoint answered HTTP {status}", status=502 if status >= 500 else 400)
        if content_type != "application/json":  # RFC 6749 §5.1 (P-TOK-07)
            raise OIDCError("token_bad_content_type", f"token response is {content_type[:60]!r}, not JSON", status=502)
        return parse_token_response(strict_json_object(body, "token"))

    async def userinfo(self, access_token: str) -> dict[str, Any] | None:
        """Claims from the UserInfo endpoint (None if the IdP has none)."""
        metadata = await self.discover()
        if metadata.userinfo_endpoint is None:
            return None
        return await self._get_json(
            metadata.userinfo_endpoint,
            "userinfo",
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
        )


async def _read_bounded(resp: aiohttp.ClientResponse, what: str) -> bytes:
    declared = resp.content_length
    if declared is not None and declared > MAX_DOCUMENT_BYTES:
        raise OIDCError(f"{what}_too_large", f"over {MAX_DOCUMENT_BYTES} bytes", status=502)
    chunks: list[bytes] = []
    total = 0
    async for chunk in resp.content.iter_chunked(65536):
        total += len(chunk)
        if total > MAX_DOCUMENT_BYTES:
            raise OIDCError(f"{what}_too_large", f"over {MAX_DOCUMENT_BYTES} bytes", status=502)
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
