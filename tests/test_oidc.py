"""Unit tests of the pure half of enforcer.oidc: JSON, JWS, keys, claims, metadata, logins.

Table tests name the conformance rows they pin (see /work/shared/spec/conformance.md);
hypothesis tests check that the strict parsers never fail with anything but OIDCError.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import string
import urllib.parse
import warnings
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st
from joserfc import jws
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, OKPKey, RSAKey

from enforcer.errors import EnforcerError, Reason
from enforcer.identity import login, oidc, tokens
from enforcer.identity.tokens import OIDCError

RSA = RSAKey.generate_key(2048, parameters={"kid": "r1"})
RSA2 = RSAKey.generate_key(2048, parameters={"kid": "r2"})
EC = ECKey.generate_key("P-256", parameters={"kid": "e1"})
ED = OKPKey.generate_key("Ed25519", parameters={"kid": "d1"})
ISS = "https://op.example"
CLIENT = "client-1"
NONCE = "n-0123456789"
NOW = 1_700_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pub(key: Any, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = dict(key.as_dict(private=False))
    d.update(extra)
    return d


KEYS = tokens.parse_jwks({"keys": [pub(RSA), pub(EC), pub(ED)]})


def sign(claims: dict[str, Any], key: Any = RSA, alg: str = "RS256", **header: Any) -> str:
    h = {"alg": alg, "kid": key.kid, **header}
    h = {k: v for k, v in h.items() if v is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)  # joserfc: "EdDSA is deprecated via RFC 9864"
        return jws.serialize_compact(h, json.dumps(claims).encode(), key, algorithms=[alg])


def good_claims(**changes: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"iss": ISS, "aud": CLIENT, "sub": "u1", "nonce": NONCE, "iat": NOW, "exp": NOW + 300}
    for k, v in changes.items():
        if v is ...:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def code_of(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(OIDCError) as info:
        fn(*args, **kwargs)
    return info.value.code


# ------------------------------------------------------------------------------ strict JSON


@pytest.mark.parametrize(("data", "ok"), [
    (b'{"a":1}', True),
    (b'{"a":1,"a":2}', False),  # P-TOK-14, P-JOSE-08
    (b'{"a":{"b":1,"b":2}}', False),
    (b"[1]", False),
    (b'"x"', False),
    (b"", False),
    ("\ufeff{}".encode(), False),
    (b'{"a":NaN}', False),
    (b'{"a":Infinity}', False),
    (b"\xff\xfe", False),
    (b"[" * 100_000 + b"]" * 100_000, False),  # P-JWKS-10 deep nesting: no RecursionError
    (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", False),
])
def test_strict_json_object_table(data: bytes, ok: bool) -> None:
    """P-TOK-07 / P-TOK-14 / P-JOSE-08 / P-JWKS-10: only one JSON object without duplicates, BOM, NaN or deep nesting parses."""
    if ok:
        assert tokens.strict_json_object(data, Reason.JWKS_INVALID_JSON) == json.loads(data)
    else:
        assert code_of(tokens.strict_json_object, data, Reason.JWKS_INVALID_JSON) == "jwks_invalid_json"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=10), json_values, max_size=6))
def test_strict_json_object_round_trips_objects(doc: dict[str, Any]) -> None:
    """Any JSON object without duplicate members parses back to itself."""
    assert tokens.strict_json_object(json.dumps(doc).encode(), Reason.JWKS_INVALID_JSON) == doc


@given(st.binary(max_size=200))
def test_strict_json_object_only_raises_oidc_error(data: bytes) -> None:
    """Arbitrary bytes either parse to a dict or raise OIDCError, nothing else."""
    try:
        assert isinstance(tokens.strict_json_object(data, Reason.JWKS_INVALID_JSON), dict)
    except OIDCError as exc:
        assert exc.code == "jwks_invalid_json"


# ------------------------------------------------------------------------------ JWS splitting


@pytest.mark.parametrize(("token", "code"), [
    ("a.b", "id_token_malformed"),
    ("a.b.c.d", "id_token_malformed"),
    ("a.b.c.d.e", "id_token_encrypted"),  # P-IDT-12
    (b64(b'{"alg":"RS256"}') + "=.e30.c2ln", "id_token_malformed"),
    (b64(b'{"alg":"RS256"}') + ".e30+.c2ln", "id_token_malformed"),
    (b64(b'{"alg":"RS256"}') + ".e30.", "id_token_malformed"),  # empty signature
    (b64(b'{"alg":"RS256"}') + " .e30.c2ln", "id_token_malformed"),
    (b64(b"\xff\xfe") + ".e30.c2ln", "id_token_malformed"),
    (b64(b"[1]") + ".e30.c2ln", "id_token_malformed"),
    (b64(b'{"alg":"none","alg":"RS256"}') + ".e30.c2ln", "id_token_malformed"),  # P-JOSE-08
    ("x" * (tokens.MAX_ID_TOKEN_BYTES + 1), "id_token_too_large"),  # P-IDT-17
])
def test_split_jws_table(token: str, code: str) -> None:
    """P-JOSE-09 / P-IDT-12 / P-IDT-17: malformed compact serialisations are refused with a stable code."""
    assert code_of(tokens.split_jws, token) == code


@given(st.text(max_size=300))
def test_split_jws_only_raises_oidc_error(token: str) -> None:
    """Arbitrary text either splits or raises OIDCError (no other exception leaks)."""
    try:
        header, payload = tokens.split_jws(token)
    except OIDCError as exc:
        assert exc.code.startswith("id_token_")
    else:
        assert isinstance(header, dict) and isinstance(payload, bytes)


@given(st.dictionaries(st.text(string.ascii_letters, max_size=6), st.text(max_size=10), max_size=4), st.binary(max_size=64),
       st.binary(min_size=1, max_size=64))
def test_split_jws_accepts_well_formed(header: dict[str, str], payload: bytes, sig: bytes) -> None:
    """Any well-formed three-part token splits back into its header object and payload bytes."""
    token = f"{b64(json.dumps(header).encode())}.{b64(payload)}.{b64(sig)}"
    if not payload:
        assert code_of(tokens.split_jws, token) == "id_token_malformed"
        return
    assert tokens.split_jws(token) == (header, payload)


# ------------------------------------------------------------------------------ header checks


@pytest.mark.parametrize(("header", "code"), [
    ({"alg": "none"}, "id_token_bad_alg"),
    ({"alg": "None"}, "id_token_bad_alg"),
    ({"alg": "HS256"}, "id_token_bad_alg"),
    ({"alg": 5}, "id_token_bad_alg"),
    ({}, "id_token_bad_alg"),
    ({"alg": "RS256", "crit": ["exp"]}, "id_token_bad_header"),
    ({"alg": "RS256", "b64": False}, "id_token_bad_header"),
    ({"alg": "RS256", "typ": "logout+jwt"}, "id_token_bad_typ"),
    ({"alg": "RS256", "typ": "at+jwt"}, "id_token_bad_typ"),
    ({"alg": "RS256", "typ": 3}, "id_token_bad_typ"),
    ({"alg": "RS256", "enc": "A128GCM"}, "id_token_encrypted"),
    ({"alg": "RS256", "zip": "DEF"}, "id_token_encrypted"),
])
def test_check_header_rejects(header: dict[str, Any], code: str) -> None:
    """P-JOSE-01 / P-JOSE-07 / P-JOSE-12: none, HMAC, crit, b64 and foreign typ headers are refused."""
    assert code_of(tokens.check_header, header) == code


@pytest.mark.parametrize("typ", [None, "JWT", "jwt", "application/jwt"])
def test_check_header_accepts_jwt_typ(typ: str | None) -> None:
    """An absent typ or a JWT typ is fine."""
    header: dict[str, Any] = {"alg": "ES256"} if typ is None else {"alg": "ES256", "typ": typ}
    assert tokens.check_header(header) == "ES256"


# ------------------------------------------------------------------------------ verify_signature


@pytest.mark.parametrize(("key", "alg"), [(RSA, "RS256"), (RSA, "PS256"), (RSA, "RS512"), (EC, "ES256"), (ED, "EdDSA")])
def test_verify_signature_accepts_allowlisted_algs(key: Any, alg: str) -> None:
    """rp-id_token-sig-rs256 / -es256: every allowlisted algorithm verifies with the matching key."""
    verified = tokens.verify_signature(sign(good_claims(), key, alg), KEYS)
    assert verified.claims["sub"] == "u1"
    assert verified.header["alg"] == alg


NONE_HEADER = b64(b'{"alg":"none"}')


def _hs256(secret: bytes, claims: dict[str, Any]) -> str:
    si = f"{b64(json.dumps({'alg': 'HS256', 'kid': 'r1'}).encode())}.{b64(json.dumps(claims).encode())}".encode()
    return si.decode() + "." + b64(hmac.new(secret, si, hashlib.sha256).digest())


def _scrambled() -> str:
    h, p, s = sign(good_claims()).split(".")
    raw = bytearray(base64.urlsafe_b64decode(s + "=="))
    raw[0] ^= 1
    return f"{h}.{p}.{b64(bytes(raw))}"


@pytest.mark.parametrize(("make", "code"), [
    (_scrambled, "id_token_bad_signature"),  # rp-id_token-bad-sig-rs256
    (lambda: sign(good_claims(), RSA2), "id_token_unknown_key"),  # unknown kid
    (lambda: sign(good_claims(), RSA2, kid="r1"), "id_token_bad_signature"),  # kid of another key
    (lambda: sign(good_claims(), EC, "ES256", kid="r1"), "id_token_unknown_key"),  # P-JOSE-03
    (lambda: sign(good_claims(), RSA, "RS256", kid="e1"), "id_token_unknown_key"),  # P-JOSE-03
    (lambda: _hs256(RSA.as_pem(private=False), good_claims()), "id_token_bad_alg"),  # P-JOSE-02
    (lambda: _hs256(json.dumps(pub(RSA)).encode(), good_claims()), "id_token_bad_alg"),  # P-JOSE-02 (JWK)
    (lambda: NONE_HEADER + "." + b64(json.dumps(good_claims()).encode()) + ".", "id_token_malformed"),
    (lambda: NONE_HEADER + "." + b64(json.dumps(good_claims()).encode()) + ".c2ln", "id_token_bad_alg"),
    (lambda: sign(good_claims(), RSA, kid="x" * 300), "id_token_unknown_key"),  # P-JOSE-06
])
def test_verify_signature_rejects(make: Any, code: str) -> None:
    """P-JOSE-01..03 / P-JOSE-06: bad signatures, foreign keys, alg/key mismatches and none/HMAC are refused."""
    assert code_of(tokens.verify_signature, make(), KEYS) == code


def test_verify_signature_payload_duplicates_are_token_errors() -> None:
    """P-JOSE-08: a validly signed payload with duplicate claims is a 400-class token error."""
    key = RSA.private_key
    assert isinstance(key, rsa.RSAPrivateKey)
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import padding  # noqa: PLC0415

    si = (b64(b'{"alg":"RS256","kid":"r1"}') + "." + b64(b'{"sub":"a","sub":"b"}')).encode()
    token = si.decode() + "." + b64(key.sign(si, padding.PKCS1v15(), hashes.SHA256()))
    with pytest.raises(OIDCError) as info:
        tokens.verify_signature(token, KEYS)
    assert info.value.code == "id_token_payload_invalid_json" and info.value.status == 400


def test_select_key_without_kid_is_bounded() -> None:
    """rp-id_token-kid-absent-multiple-jwks: without a kid at most three alg-compatible keys are tried."""
    many = [tokens.JWK(kid=None, alg=None, key=RSA) for _ in range(10)]
    assert len(tokens.select_key(many, {"alg": "RS256"})) == 3
    assert tokens.select_key(many, {"alg": "ES256"}) == []
    assert tokens.select_key(many, {"alg": 5}) == []


def test_verify_signature_without_kid_tries_candidates() -> None:
    """rp-id_token-kid-absent-single/multiple-jwks: without kid the key that verifies is found."""
    keys = tokens.parse_jwks({"keys": [{k: v for k, v in pub(RSA2).items() if k != "kid"},
                                     {k: v for k, v in pub(RSA).items() if k != "kid"}]})
    token = sign(good_claims(), RSA, kid=None)
    assert tokens.verify_signature(token, keys).claims["sub"] == "u1"


# ------------------------------------------------------------------------------ JWKS


def _weak_rsa() -> dict[str, Any]:
    n = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_numbers().n
    return {"kty": "RSA", "kid": "weak", "n": b64(n.to_bytes(128, "big")), "e": "AQAB"}


@pytest.mark.parametrize(("doc", "code"), [
    ({}, "jwks_invalid"),
    ({"keys": []}, "jwks_invalid"),
    ({"keys": {}}, "jwks_invalid"),
    ({"keys": [pub(RSA)] * (tokens.MAX_KEYS + 1)}, "jwks_invalid"),
    ({"keys": [pub(RSA), {"kty": "oct", "k": "c2VjcmV0"}]}, "jwks_invalid"),  # P-JOSE-04
    ({"keys": [pub(RSA), dict(EC.as_dict(private=True))]}, "jwks_invalid"),  # P-JOSE-04 private
    ({"keys": [_weak_rsa()]}, "jwks_invalid"),  # P-JOSE-11
    ({"keys": [pub(RSA, use="enc")]}, "jwks_invalid"),  # P-JWKS-06
    ({"keys": [pub(RSA, key_ops=["encrypt"])]}, "jwks_invalid"),
    ({"keys": [pub(RSA, alg="HS256")]}, "jwks_invalid"),
    ({"keys": [pub(RSA, kid=5)]}, "jwks_invalid"),
    ({"keys": [dict(pub(EC), y=pub(EC)["x"])]}, "jwks_invalid"),  # P-JOSE-11 point not on the curve
    ({"keys": ["x", 5, None]}, "jwks_invalid"),
])
def test_parse_jwks_rejects(doc: dict[str, Any], code: str) -> None:
    """P-JOSE-04 / P-JOSE-11 / P-JWKS-06 / P-JWKS-10: symmetric, private, weak, enc-only and malformed keys are never usable."""
    assert code_of(tokens.parse_jwks, doc) == code


def test_parse_jwks_keeps_good_keys_and_skips_bad_ones() -> None:
    """A weak or enc-only key next to a good one is skipped; the good one stays; private members are never kept."""
    keys = tokens.parse_jwks({"keys": [_weak_rsa(), pub(RSA2, use="enc"), pub(RSA, alg="RS256", x5c=["zz"])]})
    assert [k.kid for k in keys] == ["r1"]
    assert keys[0].allows("RS256") and not keys[0].allows("PS256")


@pytest.mark.parametrize(("key", "alg", "ok"), [
    (RSA, "RS256", True), (RSA, "PS512", True), (RSA, "ES256", False), (EC, "ES256", True),
    (EC, "ES384", False), (ED, "EdDSA", True), (ED, "RS256", False),
])
def test_jwk_allows_one_family(key: Any, alg: str, ok: bool) -> None:
    """P-JOSE-03: each key is used only with algorithms of its own type and curve."""
    (jwk,) = tokens.parse_jwks({"keys": [pub(key)]})
    assert jwk.allows(alg) is ok


# ------------------------------------------------------------------------------ claims


def check(claims: dict[str, Any], now: float = NOW) -> None:
    tokens.check_claims(claims, issuer=ISS, client_id=CLIENT, nonce=NONCE, now=now, leeway=60, max_age=600)


@pytest.mark.parametrize(("changes", "code"), [
    ({"iss": ISS + "/"}, "id_token_bad_iss"),  # P-IDT-01
    ({"iss": ISS.replace("https", "http")}, "id_token_bad_iss"),
    ({"iss": ISS.upper()}, "id_token_bad_iss"),
    ({"iss": ...}, "id_token_bad_iss"),
    ({"aud": ...}, "id_token_bad_aud"),  # P-IDT-02
    ({"aud": "other"}, "id_token_bad_aud"),
    ({"aud": [CLIENT, "other"]}, "id_token_bad_aud"),
    ({"aud": 5}, "id_token_bad_aud"),
    ({"aud": {"x": CLIENT}}, "id_token_bad_aud"),
    ({"azp": "other"}, "id_token_bad_azp"),  # P-IDT-03
    ({"exp": NOW - 65}, "id_token_expired"),  # P-IDT-04
    ({"exp": NOW - 360}, "id_token_expired"),
    ({"exp": ...}, "id_token_no_exp"),
    ({"exp": None}, "id_token_no_exp"),
    ({"exp": "1700000300"}, "id_token_bad_exp"),
    ({"exp": True}, "id_token_bad_exp"),
    ({"exp": 1e300}, "id_token_bad_exp"),
    ({"exp": 2**63}, "id_token_bad_exp"),
    ({"exp": -1}, "id_token_bad_exp"),
    ({"exp": float("inf")}, "id_token_bad_exp"),
    ({"iat": ...}, "id_token_no_iat"),  # P-IDT-05
    ({"iat": NOW + 600}, "id_token_bad_iat"),
    ({"iat": NOW - 7 * 86400}, "id_token_too_old"),
    ({"iat": NOW - 665}, "id_token_too_old"),
    ({"nbf": NOW + 600}, "id_token_bad_nbf"),  # P-IDT-06
    ({"nbf": "x"}, "id_token_bad_nbf"),
    ({"nonce": ...}, "id_token_bad_nonce"),  # P-IDT-07
    ({"nonce": "012345678"}, "id_token_bad_nonce"),
    ({"nonce": 5}, "id_token_bad_nonce"),
    ({"nonce": NONCE + "x"}, "id_token_bad_nonce"),
    ({"sub": ...}, "id_token_bad_sub"),  # P-IDT-08
    ({"sub": ""}, "id_token_bad_sub"),
    ({"sub": 5}, "id_token_bad_sub"),
    ({"sub": "x" * 256}, "id_token_bad_sub"),
    ({"sub": "a\r\nb"}, "id_token_bad_sub"),
    ({"sub": "a\x00"}, "id_token_bad_sub"),
    ({"sub": "é"}, "id_token_bad_sub"),
])
def test_check_claims_rejects(changes: dict[str, Any], code: str) -> None:
    """P-IDT-01..08: every claim rule of OIDC Core §3.1.3.7 has its own stable code."""
    assert code_of(check, good_claims(**changes)) == code


@pytest.mark.parametrize("changes", [
    {}, {"aud": [CLIENT]}, {"azp": CLIENT}, {"exp": NOW - 55}, {"exp": NOW + 300.5},
    {"iat": NOW + 55}, {"nbf": NOW + 55}, {"sub": "x" * 255}, {"iat": NOW - 600},
])
def test_check_claims_accepts(changes: dict[str, Any]) -> None:
    """P-IDT-02 / P-IDT-04 / P-IDT-05: aud as [client], leeway edges and float NumericDates are accepted."""
    check(good_claims(**changes))


def _at_hash(token: str, name: str) -> str:
    d = hashlib.new(name, token.encode()).digest()
    return b64(d[: len(d) // 2])


@pytest.mark.parametrize(("alg", "name"), [("RS256", "sha256"), ("ES384", "sha384"), ("PS512", "sha512"), ("EdDSA", "sha512")])
def test_check_at_hash_accepts_matching(alg: str, name: str) -> None:
    """P-IDT-11: a correct at_hash (hash chosen by the alg) is accepted; an absent one too."""
    tokens.check_at_hash({"at_hash": _at_hash("tok", name)}, alg, "tok")
    tokens.check_at_hash({}, alg, "tok")


@pytest.mark.parametrize("value", ["AAAA", 5, None if False else "", _at_hash("other", "sha256")])
def test_check_at_hash_rejects_wrong(value: Any) -> None:
    """P-IDT-11: a wrong or non-string at_hash is refused."""
    assert code_of(tokens.check_at_hash, {"at_hash": value}, "RS256", "tok") == "id_token_bad_at_hash"


@pytest.mark.parametrize(("claims", "tags"), [
    ({"groups": ["a", "b"], "sub": "u"}, {"groups=a", "groups=b", "sub=u"}),
    ({"email": "x@y", "email_verified": True}, {"email=x@y", "email_verified=true"}),
    ({"email": "x@y", "email_verified": False}, {"email_verified=false"}),  # P-IDT-15
    ({"email": "x@y"}, set()),
    ({"email": "x@y", "email_verified": "true"}, {"email_verified=true"}),
    ({"n": 5, "o": {"a": 1}, "z": None, "l": [1, {"a": 1}, "ok"]}, {"l=ok"}),
    ({"nonce": "n", "at_hash": "h", "iat": 1, "jti": "j", "auth_time": 2}, set()),
    ({"groups": None}, set()),  # P-UI-07
    ({"groups": []}, set()),
    ({"_claim_names": {"groups": "s"}}, set()),
])
def test_claims_to_tags_table(claims: dict[str, Any], tags: set[str]) -> None:
    """P-IDT-15 / P-UI-07: claims become tags; unverified email, per-login values, non-strings and indirections become nothing."""
    assert tokens.claims_to_tags(claims) == frozenset(tags)


def test_claims_to_tags_limits() -> None:
    """P-UI-06: too many tags or an over-long value refuses the login."""
    assert code_of(tokens.claims_to_tags, {"groups": [str(i) for i in range(tokens.MAX_TAGS + 1)]}) == "claims_too_large"
    assert code_of(tokens.claims_to_tags, {"name": "x" * tokens.MAX_TAG_BYTES}) == "claims_too_large"


@pytest.mark.parametrize(("mode", "scopes", "claims", "want"), [
    ("always", ("openid",), {"email": "a"}, True),
    ("never", ("openid", "email"), {}, False),
    ("auto", ("openid", "email"), {}, True),
    ("auto", ("openid", "email"), {"email": "a"}, False),
    ("auto", ("openid", "profile"), {"name": "a"}, False),
    ("auto", ("openid", "profile"), {}, True),
    ("auto", ("openid",), {}, False),
])
def test_needs_userinfo(mode: str, scopes: tuple[str, ...], claims: dict[str, Any], want: bool) -> None:
    """rp-scope-userinfo-claims: UserInfo is called when the scopes promise claims the ID token lacks."""
    assert tokens.needs_userinfo(mode, scopes, claims) is want


# ------------------------------------------------------------------------------ metadata


def meta(**changes: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "issuer": ISS,
        "authorization_endpoint": ISS + "/auth",
        "token_endpoint": ISS + "/token",
        "jwks_uri": ISS + "/jwks",
        "userinfo_endpoint": ISS + "/me",
        "response_types_supported": ["code"],
    }
    for k, v in changes.items():
        if v is ...:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def parse(doc: dict[str, Any], issuer: str = ISS, loopback: bool = False) -> tokens.ProviderMetadata:
    return tokens.ProviderMetadata.parse(doc, expected_issuer=issuer, allow_http_loopback=loopback)


@pytest.mark.parametrize(("doc", "code"), [
    (meta(issuer="https://example.com"), "discovery_issuer_mismatch"),  # P-JWKS-07
    (meta(issuer=ISS + "/"), "discovery_issuer_mismatch"),
    (meta(issuer=...), "discovery_issuer_mismatch"),
    (meta(jwks_uri="http://op.example/jwks"), "discovery_bad_endpoint"),  # P-JWKS-08
    (meta(token_endpoint="http://op.example/token"), "discovery_bad_endpoint"),  # P-TOK-03
    (meta(authorization_endpoint="ftp://op.example/a"), "discovery_bad_endpoint"),
    (meta(jwks_uri=...), "discovery_bad_endpoint"),  # P-JWKS-09
    (meta(token_endpoint=...), "discovery_bad_endpoint"),
    (meta(authorization_endpoint=...), "discovery_bad_endpoint"),
    (meta(jwks_uri=5), "discovery_bad_endpoint"),
    (meta(jwks_uri="https://op.example/jwks#frag"), "discovery_bad_endpoint"),
    (meta(jwks_uri="https://169.254.169.254/latest"), "discovery_bad_endpoint"),  # P-JWKS-11
    (meta(jwks_uri="https://[fe80::1]/x"), "discovery_bad_endpoint"),
    (meta(jwks_uri="https://0.0.0.0/x"), "discovery_bad_endpoint"),
    (meta(jwks_uri="https://224.0.0.1/x"), "discovery_bad_endpoint"),
    (meta(token_endpoint="https://127.0.0.1:9090/metrics"), "discovery_bad_endpoint"),  # loopback for a public issuer
    (meta(userinfo_endpoint="https://localhost/me"), "discovery_bad_endpoint"),
    (meta(token_endpoint_auth_methods_supported=["private_key_jwt"]), "discovery_no_client_auth"),
    (meta(response_types_supported=["id_token"]), "discovery_no_code_flow"),
])
def test_provider_metadata_rejects(doc: dict[str, Any], code: str) -> None:
    """P-JWKS-07..11 / P-TOK-03: wrong issuer, non-https, missing, fragment and internal-address endpoints are refused."""
    assert code_of(parse, doc) == code


def test_provider_metadata_accepts_and_picks_auth() -> None:
    """P-JWKS-09: unknown members are ignored; client_secret_basic is preferred; iss support is read."""
    m = parse(meta(x_unknown={"a": 1}, token_endpoint_auth_methods_supported=["client_secret_post", "client_secret_basic"],
                   authorization_response_iss_parameter_supported=True))
    assert m.token_auth_method == "client_secret_basic"
    assert m.iss_parameter_supported is True and m.end_session_endpoint is None
    assert parse(meta(token_endpoint_auth_methods_supported=["client_secret_post"])).token_auth_method == "client_secret_post"
    assert parse(meta(authorization_response_iss_parameter_supported="true")).iss_parameter_supported is False


def test_provider_metadata_loopback_issuer_may_use_loopback() -> None:
    """A loopback issuer (tests, a local IdP) may use loopback endpoints; http only when allowed."""
    local = "https://127.0.0.1:8443"
    doc = {k: (v.replace(ISS, local) if isinstance(v, str) else v) for k, v in meta().items()}
    assert parse(doc, local).jwks_uri == local + "/jwks"
    http_doc = {k: (v.replace("https://", "http://") if isinstance(v, str) else v) for k, v in doc.items()}
    assert parse(http_doc, http_doc["issuer"], loopback=True).token_endpoint.startswith("http://")
    assert code_of(parse, http_doc, http_doc["issuer"], False) == "discovery_bad_endpoint"


# ------------------------------------------------------------------------------ token response


@pytest.mark.parametrize(("doc", "code"), [
    ({"access_token": "a", "token_type": "Bearer"}, "token_no_id_token"),  # P-TOK-08
    ({"id_token": "", "access_token": "a", "token_type": "Bearer"}, "token_no_id_token"),
    ({"id_token": 5, "access_token": "a", "token_type": "Bearer"}, "token_no_id_token"),
    ({"id_token": "t", "token_type": "Bearer"}, "token_no_access_token"),  # P-TOK-09
    ({"id_token": "t", "access_token": "a"}, "token_no_token_type"),
])
def test_parse_token_response_rejects(doc: dict[str, Any], code: str) -> None:
    """P-TOK-08 / P-TOK-09: missing id_token, access_token or token_type is refused."""
    assert code_of(tokens.parse_token_response, doc) == code


@pytest.mark.parametrize(("expires", "want"), [(3600, 3600.0), ("3600", None), (-5, None), (1e308, None), (True, None), (None, None)])
def test_parse_token_response_lenient_members(expires: Any, want: float | None) -> None:
    """P-TOK-11 / P-TOK-12 / P-TOK-13: odd expires_in is 'unknown'; missing scope and unknown members are fine."""
    doc = {"id_token": "t", "access_token": "a", "token_type": "bEARER", "x": [1], "refresh_token": 5}
    if expires is not None:
        doc["expires_in"] = expires
    r = tokens.parse_token_response(doc)
    assert r.expires_in == want and r.scope is None and r.refresh_token is None and r.token_type == "bEARER"


# ------------------------------------------------------------------------------ login start, PKCE


def test_pkce_challenge_rfc7636_appendix_b() -> None:
    """P-AR-03: the RFC 7636 Appendix B example vector."""
    assert login.pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


@given(st.text(alphabet=string.ascii_letters + string.digits + "-._~", min_size=43, max_size=128))
def test_pkce_challenge_is_unpadded_base64url_sha256(verifier: str) -> None:
    """P-AR-03: the challenge is BASE64URL(SHA256(verifier)) without padding, 43 characters."""
    c = login.pkce_challenge(verifier)
    assert len(c) == 43 and "=" not in c
    assert base64.urlsafe_b64decode(c + "=") == hashlib.sha256(verifier.encode()).digest()


def _start(endpoint: str = ISS + "/auth") -> tuple[str, login.LoginTransaction, str]:
    m = parse(meta(authorization_endpoint=endpoint))
    return login.start_login(metadata=m, client_id=CLIENT, redirect_uri="https://app/cb", scopes=("openid", "email"),
                            service="app", return_to="/x?y=1", now=NOW)


def test_start_login_builds_the_exact_request() -> None:
    """P-AR-01 / P-AR-02: code flow, S256, state and nonce, exact redirect_uri, and a binding hash (not the cookie) stored."""
    url, txn, binding = _start()
    parts = urllib.parse.urlsplit(url)
    q = dict(urllib.parse.parse_qsl(parts.query))
    assert url.startswith(ISS + "/auth?")
    assert q == {"response_type": "code", "client_id": CLIENT, "redirect_uri": "https://app/cb", "scope": "openid email",
                 "state": txn.state, "nonce": txn.nonce, "code_challenge": login.pkce_challenge(txn.code_verifier),
                 "code_challenge_method": "S256"}
    assert txn.binding == login.binding_hash(binding) and binding not in url and txn.code_verifier not in url
    assert len({txn.state, txn.nonce, txn.code_verifier, binding}) == 4
    assert 43 <= len(txn.code_verifier) <= 128 and len(txn.state) >= 43
    assert (txn.issuer, txn.return_to, txn.created) == (ISS, "/x?y=1", NOW)


def test_start_login_keeps_an_existing_query() -> None:
    """An authorization endpoint with its own query gets '&', not a second '?'."""
    url, _, _ = _start(ISS + "/auth?tenant=t1")
    assert url.startswith(ISS + "/auth?tenant=t1&response_type=code")


def test_start_login_values_are_unique() -> None:
    """P-AR-02: 1,000 logins give 1,000 distinct states, nonces and verifiers."""
    txns = [_start()[1] for _ in range(1000)]
    for attr in ("state", "nonce", "code_verifier", "binding"):
        assert len({getattr(t, attr) for t in txns}) == 1000


def _txn(state: str, created: float) -> login.LoginTransaction:
    return login.LoginTransaction(state=state, nonce="n", code_verifier="v", binding="b", service="app", issuer=ISS,
                                 redirect_uri="https://app/cb", return_to="/", created=created)


def test_transaction_store_single_use_expiry_and_bound() -> None:
    """P-CB-04 / P-CB-06 / P-AR-09 / X-LIM-11: transactions are single use, expire after the TTL and are capped."""
    store = login.TransactionStore(ttl=600, max_pending=3)
    store.add(_txn("a", NOW))
    assert store.pop("a", NOW + 1) is not None
    assert store.pop("a", NOW + 1) is None
    store.add(_txn("b", NOW))
    assert store.pop("b", NOW + 601) is None
    for s in "cdef":
        store.add(_txn(s, NOW))
    assert len(store) == 3
    assert store.pop("c", NOW) is None  # the oldest was evicted
    assert store.pop("f", NOW + 600) is not None
    assert store.pop("unknown", NOW) is None


class _FakePendingBackend:
    """The PendingBackend interface over a dict (the real one is the SQLite session store)."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, float]] = {}

    async def put_pending(
        self, state: str, data: str, created: float, *, max_pending: int, ttl: float | None = None
    ) -> None:
        self.rows[state] = (data, created)

    async def take_pending(self, state: str, now: float, ttl: float) -> str | None:
        row = self.rows.pop(state, None)
        return row[0] if row is not None and now - row[1] <= ttl else None


async def test_shared_transaction_store_round_trips_and_is_single_use() -> None:
    """A pending login put in the shared store comes back equal, once; expired ones do not come back."""
    store = login.SharedTransactionStore(_FakePendingBackend(), ttl=600)
    await store.add(_txn("a", NOW))
    assert await store.pop("a", NOW + 1) == _txn("a", NOW)
    assert await store.pop("a", NOW + 1) is None
    await store.add(_txn("b", NOW))
    assert await store.pop("b", NOW + 601) is None


@pytest.mark.parametrize(
    "data",
    ["not json", "[]", '{"state": "a"}', '{"state": 1, "nonce": "n", "code_verifier": "v", "binding": "b", '
     '"service": "app", "issuer": "i", "redirect_uri": "r", "return_to": "/", "created": 1}',
     '{"state": "other", "nonce": "n", "code_verifier": "v", "binding": "b", "service": "app", "issuer": "i", '
     '"redirect_uri": "r", "return_to": "/", "created": 1}'],
)
async def test_shared_transaction_store_refuses_unreadable_rows(data: str) -> None:
    """A row that is not a complete, well-typed transaction for this very state counts as no transaction."""
    backend = _FakePendingBackend()
    backend.rows["a"] = (data, NOW)
    assert await login.SharedTransactionStore(backend, ttl=600).pop("a", NOW) is None


# ------------------------------------------------------------------------------ logout tokens


def logout_claims(**changes: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"iss": ISS, "aud": CLIENT, "iat": NOW, "exp": NOW + 120, "jti": "j", "sid": "s1",
                         "sub": "u1", "events": {tokens.BACKCHANNEL_EVENT: {}}}
    for k, v in changes.items():
        if v is ...:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def check_logout(claims: dict[str, Any]) -> tuple[str | None, str | None]:
    return tokens.check_logout_claims(claims, issuer=ISS, client_id=CLIENT, now=NOW, leeway=60, max_age=600)


@pytest.mark.parametrize(("changes", "code"), [
    ({"iss": "https://evil"}, "logout_token_bad_iss"),
    ({"aud": "x"}, "logout_token_bad_aud"),
    ({"aud": [CLIENT, "x"]}, "logout_token_bad_aud"),
    ({"exp": ...}, "logout_token_no_exp"),
    ({"exp": NOW - 120}, "logout_token_expired"),
    ({"iat": ...}, "logout_token_no_iat"),
    ({"iat": "x"}, "logout_token_bad_iat"),
    ({"iat": NOW + 3600}, "logout_token_bad_iat"),
    ({"iat": NOW - 3600}, "logout_token_bad_iat"),
    ({"jti": ...}, "logout_token_no_jti"),
    ({"jti": 5}, "logout_token_no_jti"),
    ({"events": ...}, "logout_token_bad_events"),
    ({"events": [tokens.BACKCHANNEL_EVENT]}, "logout_token_bad_events"),
    ({"events": {"http://schemas.openid.net/event/foobar": {}}}, "logout_token_bad_events"),
    ({"events": {tokens.BACKCHANNEL_EVENT: "x"}}, "logout_token_bad_events"),
    ({"nonce": "n"}, "logout_token_has_nonce"),
    ({"sub": ..., "sid": ...}, "logout_token_no_subject"),
    ({"sid": 5}, "logout_token_bad_sid"),
    ({"sub": "a\nb"}, "logout_token_bad_sub"),
])
def test_check_logout_claims_rejects(changes: dict[str, Any], code: str) -> None:
    """P-BCL-02 / P-BCL-03: logout-token claim rules of Back-Channel Logout §2.6, one code each."""
    assert code_of(check_logout, logout_claims(**changes)) == code


@pytest.mark.parametrize(("changes", "want"), [
    ({}, ("u1", "s1")), ({"sub": ...}, (None, "s1")), ({"sid": ...}, ("u1", None)), ({"extra": 1}, ("u1", "s1")),
])
def test_check_logout_claims_accepts(changes: dict[str, Any], want: tuple[str | None, str | None]) -> None:
    """P-BCL-01: a valid logout token yields (sub, sid); unknown claims are ignored."""
    assert check_logout(logout_claims(**changes)) == want


@pytest.mark.parametrize(("typ", "ok"), [("logout+jwt", True), ("application/logout+jwt", True), ("JWT", False), (None, False)])
def test_check_header_logout_typ(typ: str | None, ok: bool) -> None:
    """P-BCL-02 / P-IDT-16: a logout token must say typ logout+jwt, and an ID token must not."""
    header: dict[str, Any] = {"alg": "RS256"} if typ is None else {"alg": "RS256", "typ": typ}
    if ok:
        assert tokens.check_header(header, token_kind=tokens.TokenKind.LOGOUT) == "RS256"
        assert code_of(tokens.check_header, header) == "id_token_bad_typ"
    else:
        assert code_of(tokens.check_header, header, token_kind=tokens.TokenKind.LOGOUT) == "logout_token_bad_typ"


@pytest.mark.parametrize(("make", "code"), [
    (lambda: "x" * (tokens.MAX_ID_TOKEN_BYTES + 1), "logout_token_too_large"),
    (lambda: "a.b", "logout_token_malformed"),
    (lambda: "a.b.c.d.e", "logout_token_encrypted"),
    (lambda: b64(b'{"alg":"none","typ":"logout+jwt"}') + ".e30.c2ln", "logout_token_bad_alg"),
    (lambda: b64(b'{"alg":"RS256","typ":"logout+jwt","crit":["exp"]}') + ".e30.c2ln", "logout_token_bad_header"),
    (lambda: sign(good_claims(), RSA, typ="JWT"), "logout_token_bad_typ"),
    (lambda: sign(good_claims(), RSA2, typ="logout+jwt"), "logout_token_unknown_key"),
    (lambda: sign(good_claims(), RSA, typ="logout+jwt")[:-8] + "AAAAAAAA", "logout_token_bad_signature"),
])
def test_verify_signature_of_a_logout_token_names_logout_token_codes(make: Any, code: str) -> None:
    """P-BCL-02: the shared JWS checks give logout_token_* codes for a logout token, never id_token_*."""
    assert code_of(tokens.verify_signature, make(), KEYS, token_kind=tokens.TokenKind.LOGOUT) == code


def test_every_token_kind_has_its_own_reasons() -> None:
    """Each TokenKind's reasons are members named after the kind, and no two kinds share one."""
    for kind, reasons in tokens.TOKEN_REASONS.items():
        for reason in vars(type(reasons)).get("__slots__", ()):
            assert getattr(reasons, reason).startswith(kind.value + "_")
    id_codes = {getattr(tokens.TOKEN_REASONS[tokens.TokenKind.ID], f) for f in tokens.TokenReasons.__slots__}
    logout_codes = {getattr(tokens.TOKEN_REASONS[tokens.TokenKind.LOGOUT], f) for f in tokens.TokenReasons.__slots__}
    assert len(id_codes) == len(logout_codes) == len(tokens.TokenReasons.__slots__)
    assert not id_codes & logout_codes


@pytest.mark.parametrize(("error", "code"), [
    ("invalid_request", "token_invalid_request"),
    ("invalid_client", "token_invalid_client"),
    ("invalid_grant", "token_invalid_grant"),
    ("unauthorized_client", "token_unauthorized_client"),
    ("unsupported_grant_type", "token_unsupported_grant_type"),
    ("invalid_scope", "token_invalid_scope"),
    ("server_error", "token_server_error"),
    ("temporarily_unavailable", "token_temporarily_unavailable"),
])
def test_token_endpoint_errors_map_to_their_own_reason(error: str, code: str) -> None:
    """P-TOK-04: each RFC 6749 §5.2 token error has its own reason; other text falls to token_unknown."""
    assert oidc.TOKEN_ERRORS[error] == code
    assert oidc.TOKEN_ERRORS.get("x\x1b[31m evil", Reason.TOKEN_UNKNOWN) is Reason.TOKEN_UNKNOWN


def test_an_oidc_error_refuses_text_that_is_no_reason() -> None:
    """OIDCError takes a Reason (or its exact code) and raises ValueError for any other text."""
    assert OIDCError("id_token_expired").reason is Reason.ID_TOKEN_EXPIRED
    assert isinstance(OIDCError(Reason.JWKS_INVALID), EnforcerError)
    with pytest.raises(ValueError, match="not a valid Reason"):
        OIDCError("token_whatever_the_idp_said")


# ------------------------------------------------------------------------------ metadata and keys: edge cases


@pytest.mark.parametrize(("doc", "code"), [
    (meta(jwks_uri="https://[op.example/jwks"), "discovery_bad_endpoint"),  # not a URL at all
    (meta(issuer="urn:op", token_endpoint="https://127.0.0.1/token"), "discovery_bad_endpoint"),
])
def test_provider_metadata_rejects_unparsable_urls_and_hostless_issuers(doc: dict[str, Any], code: str) -> None:
    """An endpoint that is no URL is refused, and an issuer without a host never counts as loopback."""
    assert code_of(parse, doc, doc["issuer"]) == code


def test_provider_metadata_edge_values_that_are_accepted() -> None:
    """Endpoints on a public IP address are fine, and a non-list auth-methods member means client_secret_basic."""
    m = parse(meta(jwks_uri="https://203.0.113.7/jwks", token_endpoint_auth_methods_supported="client_secret_post"))
    assert m.jwks_uri == "https://203.0.113.7/jwks"
    assert m.token_auth_method == "client_secret_basic"


@pytest.mark.parametrize("bad", [
    {"kty": "oct-ish", "kid": "x"},
    {**pub(RSA2), "n": 5},
    {**pub(RSA2), "n": "A" * 4097},
    {**pub(RSA2), "n": "not+base64/url"},
])
def test_parse_jwks_skips_unknown_types_and_unreadable_moduli(bad: dict[str, Any]) -> None:
    """A key of an unknown type or with an unreadable RSA modulus is skipped; the good key beside it stays."""
    assert [k.kid for k in tokens.parse_jwks({"keys": [bad, pub(RSA)]})] == ["r1"]
