"""The gate's login, callback and logout endpoints, driven through Gate.handle over fakes.

Every failure code the callback can produce is a row: its status, its flow-record reason and
that no session is created. The ID tokens are really signed (ES256) and really checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from enforcer.flow import tags_fingerprint
from enforcer.http.accept import TLSListener
from enforcer.http.certs import CertStore
from enforcer.http.server import Server
from enforcer.http.tls import TLSDispatch, make_listen_socket
from enforcer.identity.cookies import session_cookie_name
from enforcer.identity.tokens import OIDCError
from tests.harness.gate import (
    CLIENT_ID,
    CLIENT_SECRET,
    HOST,
    ISSUER,
    NOW,
    ORIGIN,
    Answer,
    FakeProvider,
    GateRig,
    at_hash,
    forge,
    id_token_claims,
    metadata,
    sign,
)

SESSION_COOKIE = session_cookie_name("app")


def claims(**changes: Any) -> Callable[[str], str]:
    """An ID token factory (nonce -> token): valid claims with ``changes``, properly signed."""
    return lambda nonce: sign(id_token_claims(nonce, **changes))


@dataclass(frozen=True)
class Case:
    """One way a callback fails: what to change, and the answer expected."""

    reason: str
    status: int = 400
    provider: dict[str, Any] = field(default_factory=dict)  # FakeProvider fields
    params: dict[str, Any] = field(default_factory=dict)  # callback query changes (None drops one)
    cookie: str | None = None  # Cookie header instead of the login's binding cookie
    method: str = "GET"
    target: str | None = None  # raw request-target instead of the callback URL
    clears_binding: bool = True  # the pending login was consumed: its cookie is cleared


CALLBACK_FAILURES = [
    # before the pending login is taken
    Case("callback_method", 405, method="POST", clears_binding=False),
    Case("callback_path_not_exact", target="/x/../oauth2/callback?state={state}&code=c", clears_binding=False),
    Case("callback_malformed", target="/oauth2/callback?state", clears_binding=False),
    Case("callback_duplicate_parameter", target="/oauth2/callback?state={state}&state={state}&code=c",
         clears_binding=False),
    Case("callback_no_state", params={"state": None}, clears_binding=False),
    # the pending login
    Case("callback_unknown_state", params={"state": "no-such-login"}, clears_binding=False),  # (that state's)
    Case("callback_not_bound", cookie=""),
    Case("callback_not_bound", cookie="__Host-enforcertx-{name}=1800000000.wrong-binding"),
    Case("idp_unavailable", 502, provider={"discover_error": OIDCError("discovery_unreachable", status=502)}),
    # the authorization response
    Case("callback_iss_mismatch", params={"iss": "https://evil.example"}),
    Case("callback_iss_missing", provider={"metadata_doc": metadata(iss_parameter_supported=True)}),
    Case("idp_error", 403, params={"error": "access_denied", "code": None}),
    Case("callback_no_code", params={"code": None}),
    # the token request
    Case("token_invalid_grant", provider={"token_error": OIDCError("token_invalid_grant", status=400)}),
    Case("token_unreachable", 502, provider={"token_error": OIDCError("token_unreachable", status=502)}),
    # the ID token: its form and signature
    Case("id_token_malformed", provider={"id_token": lambda nonce: "only.two"}),
    Case("id_token_encrypted", provider={"id_token": lambda nonce: "a.b.c.d.e"}),
    Case("id_token_too_large", provider={"id_token": lambda nonce: "a" * (64 << 10) + ".b.c"}),
    Case("id_token_bad_alg", provider={"id_token": lambda nonce: forge({"alg": "HS256"}, id_token_claims(nonce))}),
    Case("id_token_bad_alg", provider={"id_token": lambda nonce: forge({"alg": "none"}, id_token_claims(nonce))}),
    Case("id_token_bad_header",
         provider={"id_token": lambda nonce: forge({"alg": "ES256", "crit": ["b64"]}, id_token_claims(nonce))}),
    Case("id_token_bad_typ", provider={"id_token": lambda nonce: sign(id_token_claims(nonce), {"typ": "at+jwt"})}),
    Case("id_token_unknown_key", provider={"id_token": lambda nonce: sign(id_token_claims(nonce), {"kid": "other"})}),
    Case("id_token_bad_signature",
         provider={"id_token": lambda nonce: forge({"alg": "ES256", "kid": "k1"}, id_token_claims(nonce))}),
    Case("id_token_payload_invalid_json", provider={"id_token": lambda nonce: sign(["not", "an", "object"])}),
    # the ID token: its claims
    Case("id_token_bad_iss", provider={"id_token": claims(iss="https://evil.example")}),
    Case("id_token_bad_aud", provider={"id_token": claims(aud=["enforcer-client", "another"])}),
    Case("id_token_bad_azp", provider={"id_token": claims(azp="another")}),
    Case("id_token_no_exp", provider={"id_token": claims(exp=None)}),
    Case("id_token_bad_exp", provider={"id_token": claims(exp="tomorrow")}),
    Case("id_token_expired", provider={"id_token": claims(exp=int(NOW) - 3600)}),
    Case("id_token_no_iat", provider={"id_token": claims(iat=None)}),
    Case("id_token_bad_iat", provider={"id_token": claims(iat=int(NOW) + 3600)}),
    Case("id_token_too_old", provider={"id_token": claims(iat=int(NOW) - 7200)}),
    Case("id_token_bad_nbf", provider={"id_token": claims(nbf=int(NOW) + 3600)}),
    Case("id_token_bad_nonce", provider={"id_token": lambda nonce: sign(id_token_claims("another-login"))}),
    Case("id_token_bad_sub", provider={"id_token": claims(sub="")}),
    Case("id_token_bad_sub", provider={"id_token": claims(sub="x" * 256)}),
    Case("id_token_bad_at_hash", provider={"id_token": claims(at_hash="AAAAAAAAAAAAAAAAAAAAAA")}),
    # UserInfo (asked because the ID token lacks the email its scope promises) and the claims
    Case("userinfo_sub_mismatch", provider={"id_token": claims(email=None), "userinfo_doc": {"sub": "mallory"}}),
    Case("userinfo_unreachable", 502, provider={
        "id_token": claims(email=None), "userinfo_error": OIDCError("userinfo_unreachable", status=502)}),
    Case("claims_too_large", provider={"id_token": claims(name="x" * 2000)}),
]


@pytest.mark.parametrize("case", CALLBACK_FAILURES, ids=[f"{c.reason}-{i}" for i, c in enumerate(CALLBACK_FAILURES)])
async def test_a_failed_callback_answers_its_code_and_creates_no_session(case: Case) -> None:
    """Each callback failure answers its status and flow reason, counts a failed login and
    creates no session; once the pending login was taken, its binding cookie is cleared."""
    rig = GateRig()
    login = await rig.begin()
    for name, value in case.provider.items():  # the IdP changes while the browser is there
        setattr(rig.provider, name, value)
    binding_name = login.cookie.split("=", 1)[0]
    if case.target is not None:
        target = case.target.format(state=urllib.parse.quote(login.state))
        answer = await rig.request(case.method, target, {"Cookie": login.cookie})
    else:
        cookie = None if case.cookie is None else case.cookie.format(name=binding_name[len("__Host-enforcertx-"):])
        answer = await rig.callback(login, params=case.params, cookie=cookie, method=case.method)

    assert (answer.status, answer.flow.reason, answer.flow.decision) == (case.status, case.reason, "callback")
    assert answer.flow.status == case.status
    assert await rig.store.count() == 0
    assert answer.cookie(SESSION_COOKIE) is None
    assert (answer.cookie(binding_name) == "") is case.clears_binding
    assert rig.gate.metrics.logins.labels("app", "failure")._value.get() == 1


async def test_a_callback_over_the_target_limit_is_refused_before_the_callback() -> None:
    """A callback URL longer than the request-target limit is a 414 before any callback step."""
    rig = GateRig()
    login = await rig.begin()
    answer = await rig.callback(login, params={"pad": "x" * 8200})
    assert (answer.status, answer.flow.reason) == (414, "too_long")
    assert await rig.store.count() == 0
    assert rig.provider.token_requests == []


async def test_a_successful_callback_creates_a_session_and_returns_to_the_page() -> None:
    """The callback exchanges the code with the login's verifier, creates a session from the
    verified claims, sets its cookie, clears the binding cookie and redirects to return_to."""
    rig = GateRig()
    login = await rig.begin("/private/page?x=1")
    answer = await rig.callback(login, code="good-code")

    assert answer.status == 302
    assert answer.response.headers["Location"] == ORIGIN + "/private/page?x=1"
    assert (answer.flow.decision, answer.flow.reason, answer.flow.user) == ("callback", "login_success", "alice")
    [request] = rig.provider.token_requests
    assert request["code"] == "good-code" and request["redirect_uri"] == login.redirect_uri
    assert (request["client_id"], request["client_secret"]) == (CLIENT_ID, CLIENT_SECRET)
    handle = answer.cookie(SESSION_COOKIE)
    assert handle
    assert answer.cookie(login.cookie.split("=", 1)[0]) == ""
    session = await rig.store.get(handle, "app", NOW)
    assert session is not None
    assert (session.issuer, session.sub, session.email, session.username, session.sid) == (
        ISSUER, "alice", "alice@example.com", "alice", "idp-session")
    assert session.expires == NOW + rig.gate.absolute_timeout
    assert "email=alice@example.com" in session.tags
    assert rig.provider.userinfo_requests == [], "the ID token had every claim its scopes promise"

    page = await rig.request("GET", "/private/page", {"Cookie": f"{SESSION_COOKIE}={handle}"})
    assert (page.status, page.flow.decision, page.flow.user) == (200, "allow", "alice")
    assert rig.upstream.targets == ["/private/page"]


async def test_userinfo_fills_in_claims_the_id_token_lacks() -> None:
    """UserInfo is asked when the ID token lacks a promised claim; its claims fill the gaps
    and the ID token's own values win."""
    provider = FakeProvider(id_token=claims(email=None, email_verified=None),
                            userinfo_doc={"sub": "alice", "email": "alice@example.com", "email_verified": True,
                                          "preferred_username": "not-alice"})
    rig = GateRig(provider)
    answer = await rig.callback(await rig.begin())
    assert answer.flow.reason == "login_success"
    assert provider.userinfo_requests == [provider.access_token]
    session = await rig.store.get(answer.cookie(SESSION_COOKIE) or "", "app", NOW)
    assert session is not None
    assert (session.email, session.username) == ("alice@example.com", "alice")


async def test_a_login_replaces_the_session_the_browser_had() -> None:
    """A new login deletes the browser's old session: each login gets a new handle (no fixation)."""
    rig = GateRig()
    first = (await rig.callback(await rig.begin())).cookie(SESSION_COOKIE)
    login = await rig.begin()
    second = await rig.callback(login, cookie=f"{login.cookie}; {SESSION_COOKIE}={first}")
    assert second.flow.reason == "login_success"
    assert second.cookie(SESSION_COOKIE) not in (None, first)
    assert await rig.store.count() == 1
    assert await rig.store.get(first or "", "app", NOW) is None


async def test_a_callback_replayed_while_the_first_is_in_flight_is_refused() -> None:
    """A second callback with the same state while the first still talks to the IdP is
    ``callback_replayed`` and does not consume anything; the first one then completes."""
    entered, release = asyncio.Event(), asyncio.Event()

    class SlowProvider(FakeProvider):
        async def exchange_code(self, **kwargs: Any) -> Any:
            entered.set()
            await release.wait()
            return await super().exchange_code(**kwargs)

    rig = GateRig(SlowProvider())
    login = await rig.begin()
    async with asyncio.TaskGroup() as tasks:
        first = tasks.create_task(rig.callback(login))
        await entered.wait()
        second = await rig.callback(login)
        release.set()
    assert (second.status, second.flow.reason) == (400, "callback_replayed")
    assert second.cookie(login.cookie.split("=", 1)[0]) is None
    assert first.result().flow.reason == "login_success"
    assert await rig.store.count() == 1


async def test_a_pending_login_is_single_use() -> None:
    """A callback URL used once is unknown the second time."""
    rig = GateRig()
    login = await rig.begin()
    assert (await rig.callback(login)).flow.reason == "login_success"
    again = await rig.callback(login)
    assert (again.status, again.flow.reason) == (400, "callback_unknown_state")
    assert await rig.store.count() == 1


async def test_starting_a_login_keeps_at_most_five_pending_logins_per_browser() -> None:
    """With five pending logins the browser's oldest binding cookie is cleared as a sixth starts."""
    rig = GateRig()
    pending = "; ".join(f"__Host-enforcertx-{i:016x}={1_700_000_000 + i}.b" for i in range(5))
    answer = await rig.request("GET", "/private", {"Accept": "text/html", "Cookie": pending})
    assert answer.status == 302
    assert answer.cookie(f"__Host-enforcertx-{0:016x}") == ""
    assert all(answer.cookie(f"__Host-enforcertx-{i:016x}") is None for i in range(1, 5))


async def test_an_api_client_without_a_session_gets_401_and_no_pending_login() -> None:
    """A non-browser request to a protected path is a 401 with the login URL, not a redirect."""
    rig = GateRig()
    answer = await rig.request("GET", "/private", {"Accept": "application/json"})
    assert (answer.status, answer.flow.decision) == (401, "login")
    assert len(rig.gate.transactions) == 0


# ------------------------------------------------------------------ logout


async def _signed_in(rig: GateRig) -> str:
    handle = (await rig.callback(await rig.begin())).cookie(SESSION_COOKIE)
    assert handle
    return handle


@pytest.mark.parametrize(
    ("method", "headers", "outcome"),
    [
        ("GET", {}, "signed_out"),
        ("GET", {"Sec-Fetch-Site": "same-origin"}, "signed_out"),
        ("GET", {"Sec-Fetch-Site": "cross-site"}, "logout_confirm"),
        ("GET", {"Origin": "https://evil.example"}, "logout_confirm"),
        ("POST", {"Sec-Fetch-Site": "same-origin"}, "signed_out"),
        ("POST", {"Origin": ORIGIN}, "signed_out"),
        ("POST", {}, "logout_confirm"),
        ("PUT", {}, "method_not_allowed"),
    ],
)
async def test_logout_signs_out_only_same_site_requests(method: str, headers: dict[str, str], outcome: str) -> None:
    """Logout ends the session and sends the browser to the IdP's end-session endpoint only
    for a request that is not cross-site; a possibly forged one gets a confirmation form."""
    rig = GateRig()
    handle = await _signed_in(rig)
    answer = await rig.request(method, "/oauth2/logout", {"Cookie": f"{SESSION_COOKIE}={handle}", **headers})
    live = await rig.store.get(handle, "app", NOW)
    if outcome == "signed_out":
        assert (answer.status, answer.flow.reason, answer.flow.user) == (302, "logout", "alice")
        location = urllib.parse.urlsplit(answer.response.headers["Location"])
        query = dict(urllib.parse.parse_qsl(location.query))
        assert location.path == "/logout" and query["client_id"] == CLIENT_ID and query["id_token_hint"]
        assert answer.cookie(SESSION_COOKIE) == ""
        assert live is None
    elif outcome == "logout_confirm":
        assert (answer.status, answer.flow.reason) == (200, "logout_confirm")
        assert live is not None
    else:
        assert (answer.status, answer.flow.reason) == (405, "logout")
        assert live is not None


async def test_logout_without_an_end_session_endpoint_shows_a_signed_out_page() -> None:
    """When the IdP has no end-session endpoint, logout clears the session and answers a page."""
    rig = GateRig(FakeProvider(metadata_doc=metadata(end_session_endpoint=None)))
    handle = await _signed_in(rig)
    answer = await rig.request("GET", "/oauth2/logout", {"Cookie": f"{SESSION_COOKIE}={handle}"})
    assert (answer.status, answer.flow.reason) == (200, "logout")
    assert answer.cookie(SESSION_COOKIE) == ""
    assert await rig.store.count() == 0


async def test_the_id_token_at_hash_is_checked_when_present() -> None:
    """An ID token whose at_hash matches the access token signs in (the check is not vacuous)."""
    provider = FakeProvider()
    provider.id_token = claims(at_hash=at_hash(provider.access_token))
    rig = GateRig(provider)
    assert (await rig.callback(await rig.begin())).flow.reason == "login_success"


# ------------------------------------------------------------------ why a request was denied (issue 18)


async def _eve_denied(rig: GateRig) -> tuple[Answer, str]:
    """Eve signs in and asks for a page only alice may see: the answer and eve's session handle."""
    rig.provider.id_token = claims(sub="eve-sub", email="eve@example.com", preferred_username="eve")
    handle = (await rig.callback(await rig.begin())).cookie(SESSION_COOKIE)
    assert handle
    answer = await rig.request("GET", "/private", {"Cookie": f"{SESSION_COOKIE}={handle}", "Accept": "text/html"})
    return answer, handle


async def test_a_deny_page_hides_other_peoples_identifiers_and_offers_to_sign_out() -> None:
    """Eve's 403 names the rule and her flow but not alice's email, and links to sign out."""
    rig = GateRig()
    answer, _ = await _eve_denied(rig)
    body = answer.response.text or ""  # type: ignore[attr-defined]
    assert (answer.status, answer.flow.reason) == (403, "missing_tags")
    assert "alice" not in body
    assert "1 more rule(s) allow particular people" in body
    assert f"Rule: <code>{answer.flow.endpoint}</code>" in body
    assert "href='/oauth2/logout'>Sign out / use another account" in body
    assert answer.flow.flow_id in body
    assert answer.response.headers["X-Enforcer-Flow"] == answer.flow.flow_id


async def test_a_deny_record_keeps_what_replays_it() -> None:
    """The deny's flow record holds the allowing tag sets, the missing tags and eve's tags' fingerprint."""
    rig = GateRig()
    answer, handle = await _eve_denied(rig)
    session = await rig.store.get(handle, "app", NOW)
    assert session is not None
    assert answer.flow.would_allow == [["email=alice@example.com"]]
    assert answer.flow.missing == ["email=alice@example.com"]
    assert answer.flow.tags_fp == tags_fingerprint(session.tags)


@pytest.mark.parametrize(
    ("method", "target", "headers", "status"),
    [
        ("GET", "/private", {"Accept": "text/html"}, 302),  # login redirect
        ("GET", "/private", {"Accept": "application/json"}, 401),
        ("GET", "/private", {"Host": "other.example"}, 421),
        ("GET", "/private", {"X_Bad": "1"}, 400),
        ("TRACE", "/private", {}, 405),
        ("GET", "/oauth2/callback", {}, 400),
    ],
)
async def test_every_answer_of_the_enforcer_names_its_flow(
    method: str, target: str, headers: dict[str, str], status: int
) -> None:
    """Each response the enforcer makes itself carries X-Enforcer-Flow with the id of its flow record."""
    rig = GateRig()
    answer = await rig.request(method, target, headers)
    assert answer.status == status
    assert answer.response.headers["X-Enforcer-Flow"] == answer.flow.flow_id
    body = getattr(answer.response, "text", None) or ""
    if status >= 400:
        assert answer.flow.flow_id in body


@contextlib.asynccontextmanager
async def _listening(rig: GateRig, tmp_path: Path, header_timeout: float = 30.0) -> AsyncIterator[tuple[int, bytes]]:
    """The rig's gate behind a real TLS listener on loopback (certificate for HOST): (port, CA PEM)."""
    store = CertStore(tmp_path)
    leaf = store.ensure_leaf("app", [HOST])
    server = Server(rig.gate.handle, header_timeout=header_timeout, body_timeout=30.0, access_log=None)
    server.on_refused = rig.gate.refused
    sock = make_listen_socket("127.0.0.1", 0)
    listener = TLSListener(server, sock, TLSDispatch({HOST: leaf}, None).context, 5.0)
    try:
        yield sock.getsockname()[1], store.ca_pem()
    finally:
        listener.close()
        await server.shutdown(1.0)


async def _records(rig: GateRig, reason: str) -> list[Any]:
    """The flow records of ``reason``, waited for (the listener writes them after the handshake)."""
    for _ in range(200):
        found = [r for r in rig.flowlog.records if r.reason == reason]
        if found:
            return found
        await asyncio.sleep(0.01)
    return []


async def test_an_unknown_server_name_gets_a_flow_record_a_metric_and_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A TLS handshake for a name no service has is refused, recorded with that name, counted and logged."""
    rig = GateRig()
    async with _listening(rig, tmp_path) as (port, ca):
        client = ssl.create_default_context(cadata=ca.decode())
        with pytest.raises((ssl.SSLError, ConnectionResetError)):  # (the alert is not always flushed)
            await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="nope.example")
        [record] = await _records(rig, "unknown_sni")
    assert (record.sni, record.decision, record.status) == ("nope.example", "bad_request", None)
    assert record.client.startswith("127.0.0.1:")
    labels = {"service": "none", "decision": "bad_request", "reason": "unknown_sni"}
    assert rig.gate.metrics.registry.get_sample_value("enforcer_requests_total", labels) == 1
    assert any("nope.example" in m and record.flow_id in m for m in caplog.messages)


async def test_a_header_timeout_answers_408_with_its_flow_and_a_record(tmp_path: Path) -> None:
    """A header block that misses its deadline is answered 408 naming a flow record with reason header_timeout."""
    rig = GateRig()
    async with _listening(rig, tmp_path, header_timeout=0.2) as (port, ca):
        client = ssl.create_default_context(cadata=ca.decode())
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=HOST)
        writer.write(b"GET /private HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        [record] = await _records(rig, "header_timeout")
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert f"X-Enforcer-Flow: {record.flow_id}\r\n".encode() in answer
    assert (record.status, record.decision, record.sni) == (408, "bad_request", HOST)
