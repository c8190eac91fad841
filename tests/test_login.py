"""The pure login and logout rules of enforcer.identity.login, table-driven: the callback steps,
building the session, the logout CSRF rule and the pending-login cookies."""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import Any

import pytest

from enforcer.identity import login
from enforcer.identity.login import LoginFailure, LoginRules, LoginTransaction, LogoutAnswer
from enforcer.identity.tokens import OIDCError, TokenResponse, VerifiedToken

NOW = 1_800_000_000.0
ISSUER = "https://idp.example.com"
CB = "/oauth2/callback"
BINDING = "the-browser-binding"
TXN = LoginTransaction(
    state="s" * 43, nonce="n" * 43, code_verifier="v" * 86, binding=login.binding_hash(BINDING), service="app",
    issuer=ISSUER, redirect_uri="https://app.example.com" + CB, return_to="/page", created=NOW - 10,
)
RULES = LoginRules(service="app", client_id="client", scopes=("openid", "email"), userinfo="auto",
                   leeway=60, max_id_token_age=600, session_lifetime=3600)
TOKENS = TokenResponse(id_token="header.payload.sig", access_token="at", token_type="Bearer",
                       refresh_token="rt", expires_in=300, scope=None)
BOUND = f"{login.tx_cookie_name(TXN.state)}={login.tx_cookie_value(NOW, BINDING)}"


def id_claims(**changes: Any) -> dict[str, Any]:
    """Valid ID token claims for TXN; a value of None removes a claim."""
    claims: dict[str, Any] = {"iss": ISSUER, "aud": "client", "sub": "alice", "nonce": TXN.nonce, "iat": NOW,
                              "exp": NOW + 300, "email": "alice@example.com", "email_verified": True}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


# ------------------------------------------------------------------ parse_callback


@pytest.mark.parametrize(
    ("method", "raw_path", "query", "expected"),
    [
        ("GET", CB, "state=s&code=c", {"state": "s", "code": "c"}),
        ("GET", CB + "?state=s", "state=s&iss=" + urllib.parse.quote(ISSUER), {"state": "s", "iss": ISSUER}),
        ("GET", CB, "state=s&error=access_denied", {"state": "s", "error": "access_denied"}),
        ("POST", CB, "state=s&code=c", LoginFailure("callback_method", 405)),
        ("HEAD", CB, "state=s&code=c", LoginFailure("callback_method", 405)),
        ("GET", "//oauth2/callback", "state=s", LoginFailure("callback_path_not_exact")),
        ("GET", "/x/../oauth2/callback", "state=s", LoginFailure("callback_path_not_exact")),
        ("GET", CB, "state=s&pad=" + "x" * 8192, LoginFailure("callback_too_large", 414)),
        ("GET", CB, "state", LoginFailure("callback_malformed")),
        ("GET", CB, "state=s&&code=c", LoginFailure("callback_malformed")),
        ("GET", CB, "&".join(f"p{i}=v" for i in range(21)), LoginFailure("callback_malformed")),
        ("GET", CB, "state=s&state=t", LoginFailure("callback_duplicate_parameter")),
        ("GET", CB, "state=s&code=a&code=a", LoginFailure("callback_duplicate_parameter")),
        ("GET", CB, "code=c", LoginFailure("callback_no_state")),
        ("GET", CB, "state=&code=c", LoginFailure("callback_no_state")),
        ("GET", CB, "", LoginFailure("callback_no_state")),
    ],
)
def test_parse_callback(method: str, raw_path: str, query: str, expected: dict[str, str] | LoginFailure) -> None:
    """A callback is a GET of exactly the registered path with a bounded, well-formed query
    naming each parameter once and a state; anything else fails with its code."""
    assert login.parse_callback(method, raw_path, CB, query) == expected


# ------------------------------------------------------------------ check_transaction


@pytest.mark.parametrize(
    ("txn", "cookies", "expected"),
    [
        (TXN, [BOUND], TXN),
        (TXN, ["other=1", BOUND + "; more=2"], TXN),
        (None, [BOUND], LoginFailure("callback_unknown_state")),
        (dataclasses.replace(TXN, service="other"), [BOUND], LoginFailure("callback_unknown_state")),
        (TXN, [], LoginFailure("callback_not_bound")),
        (TXN, [f"{login.tx_cookie_name(TXN.state)}=1800000000.another-binding"], LoginFailure("callback_not_bound")),
        (TXN, [f"{login.tx_cookie_name(TXN.state)}={BINDING}"], LoginFailure("callback_not_bound")),
        (TXN, [BOUND, BOUND], LoginFailure("callback_not_bound")),
        (TXN, [f"{login.tx_cookie_name('another state')}={login.tx_cookie_value(NOW, BINDING)}"],
         LoginFailure("callback_not_bound")),
    ],
)
def test_check_transaction(txn: LoginTransaction | None, cookies: list[str], expected: object) -> None:
    """The pending login must exist for this service and the browser must send its binding
    cookie exactly once with the value whose hash the login kept."""
    assert login.check_transaction(txn, service="app", cookie_headers=cookies) == expected


# ------------------------------------------------------------------ check_response_params


@pytest.mark.parametrize(
    ("params", "iss_supported", "expected"),
    [
        ({"state": "s", "code": "c"}, False, "c"),
        ({"state": "s", "code": "c", "iss": ISSUER}, True, "c"),
        ({"state": "s", "code": "c", "iss": ISSUER}, False, "c"),
        ({"state": "s", "code": "c", "iss": ISSUER + "/"}, False, LoginFailure("callback_iss_mismatch")),
        ({"state": "s", "code": "c"}, True, LoginFailure("callback_iss_missing")),
        ({"state": "s", "error": "access_denied"}, False,
         LoginFailure("idp_error", 403, "The identity provider refused the sign-in (access_denied).")),
        ({"state": "s", "error": "e" * 100, "code": "c"}, False,
         LoginFailure("idp_error", 403, f"The identity provider refused the sign-in ({'e' * 64}).")),
        ({"state": "s"}, False, LoginFailure("callback_no_code")),
        ({"state": "s", "code": ""}, False, LoginFailure("callback_no_code")),
    ],
)
def test_check_response_params(params: dict[str, str], iss_supported: bool, expected: object) -> None:
    """The ``iss`` parameter must be the login's issuer (and present when the provider says
    it sends it); an ``error`` is refused with a short excerpt; else a code is required."""
    assert login.check_response_params(params, TXN, iss_parameter_supported=iss_supported) == expected


# ------------------------------------------------------------------ check_id_token


def _verified(claims: dict[str, Any], alg: str = "ES256") -> VerifiedToken:
    return VerifiedToken(claims=claims, header={"alg": alg}, raw="h.p.s")


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        (id_claims(), None),
        (id_claims(iss="https://evil.example"), "id_token_bad_iss"),
        (id_claims(aud="another"), "id_token_bad_aud"),
        (id_claims(azp="another"), "id_token_bad_azp"),
        (id_claims(exp=NOW - 61), "id_token_expired"),
        (id_claims(exp=None), "id_token_no_exp"),
        (id_claims(iat=NOW + 61), "id_token_bad_iat"),
        (id_claims(iat=NOW - 661), "id_token_too_old"),
        (id_claims(nbf=NOW + 61), "id_token_bad_nbf"),
        (id_claims(nonce="another"), "id_token_bad_nonce"),
        (id_claims(sub=17), "id_token_bad_sub"),
        (id_claims(at_hash="wrong"), "id_token_bad_at_hash"),
    ],
)
def test_check_id_token(claims: dict[str, Any], code: str | None) -> None:
    """The verified claims come back (a copy) when they are for this login and client; any
    broken rule is a 400 with the claim check's code."""
    result = login.check_id_token(_verified(claims), TOKENS, TXN, RULES, NOW)
    if code is None:
        assert result == claims and result is not claims
    else:
        assert result == LoginFailure(code, 400)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OIDCError("token_invalid_grant"), LoginFailure("token_invalid_grant", 400)),
        (OIDCError("token_unreachable", status=502), LoginFailure("token_unreachable", 502)),
        (OIDCError("jwks_invalid", status=503), LoginFailure("jwks_invalid", 502)),
    ],
)
def test_a_provider_error_is_a_502_only_when_it_is_the_providers_fault(error: OIDCError, expected: object) -> None:
    """An OIDCError keeps its code; its status becomes 502 for a 5xx and 400 otherwise."""
    assert LoginFailure.of(error) == expected


# ------------------------------------------------------------------ wants_userinfo


@pytest.mark.parametrize(
    ("token_type", "mode", "claims", "wanted"),
    [
        ("Bearer", "auto", {"sub": "a", "email": "a@x"}, False),
        ("Bearer", "auto", {"sub": "a"}, True),
        ("bearer", "auto", {"sub": "a"}, True),
        ("DPoP", "auto", {"sub": "a"}, False),
        ("Bearer", "always", {"sub": "a", "email": "a@x"}, True),
        ("Bearer", "never", {"sub": "a"}, False),
    ],
)
def test_wants_userinfo(token_type: str, mode: str, claims: dict[str, Any], wanted: bool) -> None:
    """UserInfo is asked only with a bearer token, and as the service's setting says."""
    tokens = dataclasses.replace(TOKENS, token_type=token_type)
    rules = dataclasses.replace(RULES, userinfo=mode)
    assert login.wants_userinfo(tokens, rules, claims) is wanted


# ------------------------------------------------------------------ complete_login


@pytest.mark.parametrize(
    ("claims", "userinfo", "expected"),
    [
        (id_claims(), None, {"email": "alice@example.com", "username": None, "sid": None}),
        (id_claims(email_verified=False), None, {"email": None}),
        (id_claims(email_verified="true"), None, {"email": None}),
        (id_claims(email=["a@x"]), None, {"email": None}),
        (id_claims(preferred_username="al", sid="idp-1"), None, {"username": "al", "sid": "idp-1"}),
        (id_claims(preferred_username=7, sid=["x"]), None, {"username": None, "sid": None}),
        (id_claims(email=None, email_verified=None), {"sub": "alice", "email": "a@x", "email_verified": True},
         {"email": "a@x"}),
        (id_claims(email="id@x"), {"sub": "alice", "email": "info@x"}, {"email": "id@x"}),
        (id_claims(), {"sub": "mallory"}, LoginFailure("userinfo_sub_mismatch")),
        (id_claims(), {"email": "a@x"}, LoginFailure("userinfo_sub_mismatch")),
        (id_claims(name="x" * 2000), None, LoginFailure("claims_too_large")),
    ],
)
def test_complete_login(claims: dict[str, Any], userinfo: dict[str, Any] | None, expected: object) -> None:
    """UserInfo must name the same sub and only fills gaps; the email counts only when
    verified; username and sid only when strings; too many or too long claims refuse."""
    result = login.complete_login(claims, userinfo, tokens=TOKENS, txn=TXN, rules=RULES, now=NOW)
    if isinstance(expected, LoginFailure):
        assert result == expected
        return
    assert not isinstance(result, LoginFailure)
    assert {k: getattr(result, k) for k in expected} == expected


def test_complete_login_builds_the_session_of_the_login() -> None:
    """The session is for the login's service and issuer, keeps the raw ID token (the refresh
    token only with offline_access, which RULES lacks: see tests/test_refresh.py), starts now
    and ends after the session lifetime; its tags come from the claims."""
    session = login.complete_login(id_claims(groups=["staff"]), None, tokens=TOKENS, txn=TXN, rules=RULES, now=NOW)
    assert not isinstance(session, LoginFailure)
    assert (session.service, session.issuer, session.sub) == ("app", ISSUER, "alice")
    assert (session.id_token, session.refresh_token, session.claims_expire) == (TOKENS.id_token, None, None)
    assert (session.created, session.last_seen, session.expires) == (NOW, NOW, NOW + 3600)
    assert {"email=alice@example.com", "groups=staff", "sub=alice"} <= session.tags
    assert not any(t.startswith(("nonce=", "iat=")) for t in session.tags)


# ------------------------------------------------------------------ logout


@pytest.mark.parametrize(
    ("method", "fetch_site", "origin", "answer"),
    [
        ("GET", None, None, LogoutAnswer.SIGN_OUT),
        ("GET", "same-origin", None, LogoutAnswer.SIGN_OUT),
        ("GET", "none", None, LogoutAnswer.SIGN_OUT),
        ("HEAD", None, "https://app.example.com", LogoutAnswer.SIGN_OUT),
        ("GET", "same-site", None, LogoutAnswer.CONFIRM),
        ("GET", "cross-site", None, LogoutAnswer.CONFIRM),
        ("GET", None, "https://evil.example", LogoutAnswer.CONFIRM),
        ("GET", "same-origin", "null", LogoutAnswer.CONFIRM),
        ("POST", "same-origin", None, LogoutAnswer.SIGN_OUT),
        ("POST", None, "https://app.example.com", LogoutAnswer.SIGN_OUT),
        ("POST", "cross-site", "https://app.example.com", LogoutAnswer.SIGN_OUT),
        ("POST", None, None, LogoutAnswer.CONFIRM),
        ("POST", "none", None, LogoutAnswer.CONFIRM),
        ("POST", "cross-site", "https://evil.example", LogoutAnswer.CONFIRM),
        ("PUT", "same-origin", None, LogoutAnswer.METHOD_NOT_ALLOWED),
        ("DELETE", None, None, LogoutAnswer.METHOD_NOT_ALLOWED),
    ],
)
def test_logout_answer(method: str, fetch_site: str | None, origin: str | None, answer: LogoutAnswer) -> None:
    """A GET or HEAD signs out unless cross-site or from a foreign Origin; a POST only when
    same-origin or from the service's Origin; other requests are asked to confirm."""
    assert login.logout_answer(method, fetch_site, origin, "https://app.example.com") is answer


@pytest.mark.parametrize(
    ("endpoint", "redirect", "expected_path", "extra"),
    [
        ("https://idp.example.com/logout", None, "/logout", {}),
        ("https://idp.example.com/logout?tenant=1", "https://app.example.com/bye", "/logout",
         {"tenant": "1", "post_logout_redirect_uri": "https://app.example.com/bye"}),
    ],
)
def test_end_session_url(endpoint: str, redirect: str | None, expected_path: str, extra: dict[str, str]) -> None:
    """RP-initiated logout names the client, the session's ID token and a fresh state, keeps
    the endpoint's own query and adds the post-logout redirect only when configured."""
    url = urllib.parse.urlsplit(login.end_session_url(endpoint, client_id="client", id_token="idt",
                                                      post_logout_redirect=redirect))
    query = dict(urllib.parse.parse_qsl(url.query))
    state = query.pop("state")
    assert url.path == expected_path and len(state) >= 16
    assert query == {"client_id": "client", "id_token_hint": "idt", **extra}


# ------------------------------------------------------------------ pending-login cookies


def _tx(i: int, stamp: str) -> str:
    return f"{login.TX_COOKIE_PREFIX}{i:016x}={stamp}.b"


@pytest.mark.parametrize(
    ("headers", "dropped"),
    [
        ([], []),
        (["; ".join(_tx(i, str(100 + i)) for i in range(4))], []),
        (["; ".join(_tx(i, str(100 + i)) for i in range(5))], [0]),
        (["; ".join(_tx(i, str(200 - i)) for i in range(7))], [6, 5, 4]),
        ([_tx(0, "300"), _tx(1, "junk"), _tx(2, "100"), _tx(3, "200"), "app=1; " + _tx(4, "400")], [1]),
    ],
)
def test_stale_tx_cookies(headers: list[str], dropped: list[int]) -> None:
    """With the login being started a browser keeps at most five pending logins: the oldest
    binding cookies go (an unreadable time counts as oldest); other cookies are ignored."""
    assert login.stale_tx_cookies(headers) == [f"{login.TX_COOKIE_PREFIX}{i:016x}" for i in dropped]


def test_tx_cookie_names_differ_per_login_and_carry_the_time() -> None:
    """Each login's binding cookie has its own name and its value starts with the unix time."""
    assert login.tx_cookie_name("a") != login.tx_cookie_name("b")
    assert login.tx_cookie_name("a").startswith(login.TX_COOKIE_PREFIX)
    assert login.tx_cookie_value(NOW + 0.9, "bind") == "1800000000.bind"
