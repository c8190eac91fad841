"""What an OpenID Provider sends, checked: JSON, metadata, JWKS, JWS signatures, claims, tags.

Pure: no I/O, the clock is a parameter. JOSE work (signature check) is done by joserfc; this
module holds the allowlist of asymmetric algorithms and the claims rules of OIDC Core §3.1.3.7,
the back-channel logout token rules, and :func:`claims_to_tags`.

Every failure is an :class:`OIDCError` with a :class:`~enforcer.errors.Reason` that is shown on
the error page, written to the flow record and used as a metric label. The same JWS checks run
on ID tokens and back-channel logout tokens; :class:`TokenKind` picks the codes
(``id_token_*`` or ``logout_token_*``). No token, code or secret is ever part of a message.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import urllib.parse
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import ECKey, OKPKey, RSAKey, import_key

from enforcer.errors import EnforcerError, Reason

log = logging.getLogger(__name__)

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


class OIDCError(EnforcerError):
    """A login or logout-token step failed; ``reason`` is stable and safe to show, ``detail``
    is for the log."""

    def __init__(self, reason: Reason | str, detail: str = "", *, status: int = 400) -> None:
        # str: http.gate still raises one by its code; Reason() refuses any text that is no code
        reason = Reason(reason)
        self.detail = detail
        super().__init__(reason, status, f"{reason}: {detail}" if detail else reason.value)

    @property
    def code(self) -> Reason:
        """The reason (the name callers in ``http`` and ``cli`` still use)."""
        return self.reason


class TokenKind(enum.Enum):
    """Which JWT is being checked: the checks are shared, the reason codes are not."""

    ID = "id_token"
    LOGOUT = "logout_token"


@dataclass(frozen=True, slots=True)
class TokenReasons:
    """The reason for each shared check, for one :class:`TokenKind`."""

    too_large: Reason
    malformed: Reason
    encrypted: Reason
    bad_alg: Reason
    bad_header: Reason
    bad_typ: Reason
    unknown_key: Reason
    bad_signature: Reason
    payload_invalid_json: Reason
    no_exp: Reason
    bad_exp: Reason
    no_iat: Reason
    bad_iat: Reason


TOKEN_REASONS: dict[TokenKind, TokenReasons] = {
    TokenKind.ID: TokenReasons(
        too_large=Reason.ID_TOKEN_TOO_LARGE,
        malformed=Reason.ID_TOKEN_MALFORMED,
        encrypted=Reason.ID_TOKEN_ENCRYPTED,
        bad_alg=Reason.ID_TOKEN_BAD_ALG,
        bad_header=Reason.ID_TOKEN_BAD_HEADER,
        bad_typ=Reason.ID_TOKEN_BAD_TYP,
        unknown_key=Reason.ID_TOKEN_UNKNOWN_KEY,
        bad_signature=Reason.ID_TOKEN_BAD_SIGNATURE,
        payload_invalid_json=Reason.ID_TOKEN_PAYLOAD_INVALID_JSON,
        no_exp=Reason.ID_TOKEN_NO_EXP,
        bad_exp=Reason.ID_TOKEN_BAD_EXP,
        no_iat=Reason.ID_TOKEN_NO_IAT,
        bad_iat=Reason.ID_TOKEN_BAD_IAT,
    ),
    TokenKind.LOGOUT: TokenReasons(
        too_large=Reason.LOGOUT_TOKEN_TOO_LARGE,
        malformed=Reason.LOGOUT_TOKEN_MALFORMED,
        encrypted=Reason.LOGOUT_TOKEN_ENCRYPTED,
        bad_alg=Reason.LOGOUT_TOKEN_BAD_ALG,
        bad_header=Reason.LOGOUT_TOKEN_BAD_HEADER,
        bad_typ=Reason.LOGOUT_TOKEN_BAD_TYP,
        unknown_key=Reason.LOGOUT_TOKEN_UNKNOWN_KEY,
        bad_signature=Reason.LOGOUT_TOKEN_BAD_SIGNATURE,
        payload_invalid_json=Reason.LOGOUT_TOKEN_PAYLOAD_INVALID_JSON,
        no_exp=Reason.LOGOUT_TOKEN_NO_EXP,
        bad_exp=Reason.LOGOUT_TOKEN_BAD_EXP,
        no_iat=Reason.LOGOUT_TOKEN_NO_IAT,
        bad_iat=Reason.LOGOUT_TOKEN_BAD_IAT,
    ),
}


# ---------------------------------------------------------------------------
# strict JSON


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate member {k!r}")
        out[k] = v
    return out


def strict_json_object(data: bytes, invalid: Reason, *, status: int = 502) -> dict[str, Any]:
    """Parse a JSON object; reject duplicates, BOMs, deep nesting and non-objects
    (``OIDCError(invalid, status=status)``)."""
    try:
        text = data.decode("utf-8")
        if text.startswith("\ufeff"):
            raise ValueError("byte-order mark")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise OIDCError(invalid, str(exc)[:200], status=status) from None
    if not isinstance(value, dict):
        raise OIDCError(invalid, "not a JSON object", status=status)
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
                Reason.DISCOVERY_ISSUER_MISMATCH,
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
                    Reason.DISCOVERY_BAD_ENDPOINT,
                    f"{key} must be an https URL (got {str(value)[:100]!r})",
                    status=502,
                )
            host = _host_class(urllib.parse.urlsplit(value).hostname)
            if host == "internal" or (host == "loopback" and not issuer_loopback):
                # SSRF through metadata (P-JWKS-11): never the cloud metadata address or the
                # like, and loopback only for an issuer that is itself on loopback.
                raise OIDCError(
                    Reason.DISCOVERY_BAD_ENDPOINT,
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
                Reason.DISCOVERY_NO_CLIENT_AUTH,
                "the IdP supports neither client_secret_basic nor client_secret_post",
                status=502,
            )
        types = doc.get("response_types_supported")
        if isinstance(types, list) and "code" not in types:
            raise OIDCError(Reason.DISCOVERY_NO_CODE_FLOW, "response_types_supported lacks 'code'", status=502)
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
        raise OIDCError(Reason.JWKS_INVALID, "no 'keys' array", status=502)
    if len(keys) > MAX_KEYS:
        raise OIDCError(Reason.JWKS_INVALID, f"more than {MAX_KEYS} keys", status=502)
    out: list[JWK] = []
    for raw in keys:
        if not isinstance(raw, dict):
            continue
        kty = raw.get("kty")
        if kty == "oct" or "d" in raw or "p" in raw:
            # A JWK Set "MUST NOT contain private or symmetric key values" (Discovery §3).
            raise OIDCError(Reason.JWKS_INVALID, "JWKS contains a symmetric or private key", status=502)
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
        # pragma below: unreachable, _rsa_modulus_bits measured this same modulus above (defence in depth)
        if isinstance(key, RSAKey) and key.raw_value.key_size < 2048:  # pragma: no cover
            log.warning("ignoring RSA JWK kid=%r: modulus shorter than 2048 bits", kid)
            continue
        # pragma below: unreachable, kty is RSA, EC or OKP here and import_key returns those classes
        if not isinstance(key, RSAKey | ECKey | OKPKey):  # pragma: no cover
            continue
        out.append(JWK(kid=kid, alg=alg, key=key))
    if not out:
        raise OIDCError(Reason.JWKS_INVALID, "no usable signing key", status=502)
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


def split_jws(token: str, token_kind: TokenKind = TokenKind.ID) -> tuple[dict[str, Any], bytes]:
    """Decode a compact JWS's header and payload strictly (no signature check)."""
    reasons = TOKEN_REASONS[token_kind]
    if len(token) > MAX_ID_TOKEN_BYTES:
        raise OIDCError(reasons.too_large, f"over {MAX_ID_TOKEN_BYTES} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        raise OIDCError(reasons.encrypted if len(parts) == 5 else reasons.malformed, "not a compact JWS")
    try:
        header = strict_json_object(_b64url_decode(parts[0]), reasons.malformed, status=400)
        payload = _b64url_decode(parts[1])
        _b64url_decode(parts[2])
    except ValueError as exc:
        raise OIDCError(reasons.malformed, str(exc)[:100]) from None
    return header, payload


def check_header(header: Mapping[str, Any], *, token_kind: TokenKind = TokenKind.ID) -> str:
    """Return the algorithm if the JWS header is acceptable for an ID token (or for a logout
    token, which must say ``typ: logout+jwt``)."""
    reasons = TOKEN_REASONS[token_kind]
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
        raise OIDCError(reasons.bad_alg, f"algorithm {str(alg)[:20]!r} is not allowed")
    if "crit" in header or header.get("b64") is False:
        raise OIDCError(reasons.bad_header, "critical header parameters are not supported")
    typ = header.get("typ")
    if token_kind is TokenKind.LOGOUT:
        # Back-Channel Logout §2.4 recommends the explicit type; we require it so that no
        # other JWT of the IdP (an ID token above all) can pass as a logout token.
        if not isinstance(typ, str) or typ.lower() not in ("logout+jwt", "application/logout+jwt"):
            raise OIDCError(reasons.bad_typ, "typ is not logout+jwt")
    elif typ is not None and (not isinstance(typ, str) or typ.lower() not in ("jwt", "application/jwt")):
        raise OIDCError(reasons.bad_typ, "typ is not JWT")
    if "enc" in header or "zip" in header:
        raise OIDCError(reasons.encrypted, "encrypted tokens are not configured")
    return alg


def verify_signature(token: str, keys: list[JWK], *, token_kind: TokenKind = TokenKind.ID) -> VerifiedToken:
    """Verify the JWS with a key from ``keys`` (joserfc does the cryptography)."""
    reasons = TOKEN_REASONS[token_kind]
    header, _payload = split_jws(token, token_kind)
    alg = check_header(header, token_kind=token_kind)
    candidates = select_key(keys, header)
    if not candidates:
        raise OIDCError(reasons.unknown_key, "no key in the JWKS matches kid and alg")
    for candidate in candidates:
        try:
            with warnings.catch_warnings():
                # joserfc flags "EdDSA" as deprecated by RFC 9864; we allow it on purpose
                # (it is in ALLOWED_ALGS), and a warning must not become an exception.
                warnings.simplefilter("ignore", SecurityWarning)
                result = jws.deserialize_compact(token, candidate.key, algorithms=[alg])
        except (JoseError, ValueError, TypeError):
            continue
        claims = strict_json_object(result.payload, reasons.payload_invalid_json, status=400)
        return VerifiedToken(claims=claims, header=dict(header), raw=token)
    raise OIDCError(reasons.bad_signature, "signature does not verify")


def _numeric_date(claims: Mapping[str, Any], name: str, *, missing: Reason | None, bad: Reason) -> float | None:
    """The NumericDate claim ``name``; absent is fine only when ``missing`` is None."""
    value = claims.get(name)
    if value is None:
        if missing is not None:
            raise OIDCError(missing, f"{name} claim is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OIDCError(bad, f"{name} is not a number")
    if not math.isfinite(value) or value < 0 or value > 2**53:
        raise OIDCError(bad, f"{name} is out of range")
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
        raise OIDCError(Reason.ID_TOKEN_BAD_ISS, "iss does not equal the configured issuer")
    aud = claims.get("aud")
    if aud not in (client_id, [client_id]):
        raise OIDCError(Reason.ID_TOKEN_BAD_AUD, "aud is not exactly this client")
    azp = claims.get("azp")
    if azp is not None and azp != client_id:
        raise OIDCError(Reason.ID_TOKEN_BAD_AZP, "azp is not this client")
    exp = _numeric_date(claims, "exp", missing=Reason.ID_TOKEN_NO_EXP, bad=Reason.ID_TOKEN_BAD_EXP)
    iat = _numeric_date(claims, "iat", missing=Reason.ID_TOKEN_NO_IAT, bad=Reason.ID_TOKEN_BAD_IAT)
    nbf = _numeric_date(claims, "nbf", missing=None, bad=Reason.ID_TOKEN_BAD_NBF)
    assert exp is not None
    assert iat is not None
    if now > exp + leeway:
        raise OIDCError(Reason.ID_TOKEN_EXPIRED, "exp is in the past")
    if iat > now + leeway:
        raise OIDCError(Reason.ID_TOKEN_BAD_IAT, "iat is in the future")
    if iat < now - max_age - leeway:
        raise OIDCError(Reason.ID_TOKEN_TOO_OLD, "iat is older than the maximum ID token age")
    if nbf is not None and nbf > now + leeway:
        raise OIDCError(Reason.ID_TOKEN_BAD_NBF, "nbf is in the future")
    got = claims.get("nonce")
    if not isinstance(got, str) or not hmac.compare_digest(got.encode(), nonce.encode()):
        raise OIDCError(Reason.ID_TOKEN_BAD_NONCE, "nonce does not match this login")
    sub = claims.get("sub")
    if (
        not isinstance(sub, str)
        or not 0 < len(sub) <= MAX_SUB_LENGTH
        or not sub.isascii()
        or not sub.isprintable()
    ):
        raise OIDCError(Reason.ID_TOKEN_BAD_SUB, "sub is missing or not 1-255 printable ASCII characters")


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
        raise OIDCError(Reason.LOGOUT_TOKEN_BAD_ISS, "iss does not equal the configured issuer")
    if claims.get("aud") not in (client_id, [client_id]):
        raise OIDCError(Reason.LOGOUT_TOKEN_BAD_AUD, "aud is not exactly this client")
    exp = _numeric_date(claims, "exp", missing=Reason.LOGOUT_TOKEN_NO_EXP, bad=Reason.LOGOUT_TOKEN_BAD_EXP)
    iat = _numeric_date(claims, "iat", missing=Reason.LOGOUT_TOKEN_NO_IAT, bad=Reason.LOGOUT_TOKEN_BAD_IAT)
    assert exp is not None
    assert iat is not None
    if now > exp + leeway:
        raise OIDCError(Reason.LOGOUT_TOKEN_EXPIRED, "exp is in the past")
    if iat > now + leeway or iat < now - max_age - leeway:
        raise OIDCError(Reason.LOGOUT_TOKEN_BAD_IAT, "iat is in the future or too old")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > 256:
        raise OIDCError(Reason.LOGOUT_TOKEN_NO_JTI, "jti is missing")
    events = claims.get("events")
    if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_EVENT), dict):
        raise OIDCError(Reason.LOGOUT_TOKEN_BAD_EVENTS, "events lacks the back-channel logout event")
    if "nonce" in claims:
        raise OIDCError(Reason.LOGOUT_TOKEN_HAS_NONCE, "a logout token must not contain a nonce")
    sub, sid = claims.get("sub"), claims.get("sid")
    if sub is None and sid is None:
        raise OIDCError(Reason.LOGOUT_TOKEN_NO_SUBJECT, "neither sub nor sid")
    for name, value, bad in (("sub", sub, Reason.LOGOUT_TOKEN_BAD_SUB), ("sid", sid, Reason.LOGOUT_TOKEN_BAD_SID)):
        if value is not None and (
            not isinstance(value, str) or not 0 < len(value) <= MAX_SUB_LENGTH or not value.isprintable()
        ):
            raise OIDCError(bad, f"{name} is not a short printable string")
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
        raise OIDCError(Reason.ID_TOKEN_BAD_AT_HASH, "at_hash does not match the access token")


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
            raise OIDCError(Reason.CLAIMS_TOO_LARGE, f"more than {MAX_TAGS} tags from claims")
    for tag in tags:
        if len(tag) > MAX_TAG_BYTES:
            raise OIDCError(Reason.CLAIMS_TOO_LARGE, f"a claim value is longer than {MAX_TAG_BYTES} bytes")
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
        raise OIDCError(Reason.TOKEN_NO_ID_TOKEN, "token response has no id_token")
    if not isinstance(access, str) or not access:
        raise OIDCError(Reason.TOKEN_NO_ACCESS_TOKEN, "token response has no access_token")
    if not isinstance(token_type, str) or not token_type:
        raise OIDCError(Reason.TOKEN_NO_TOKEN_TYPE, "token response has no token_type")
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


