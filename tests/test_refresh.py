"""Claims kept fresh with refresh tokens: the sealing of tokens at rest (AES-GCM, key rotation,
tamper), the pure refresh rules of ``identity.login``, and the gate refreshing a SQLite-stored
session at the in-process fake OP over real TLS (renewal, rotation, a removed group, a revoked
token, single flight, and a misbehaving IdP)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import make_mocked_request

from enforcer.config.definitions import Definitions, parse_documents, resolve_definitions
from enforcer.config.settings import DaemonModel, Settings
from enforcer.errors import Reason
from enforcer.http.gate import Gate, Runtime
from enforcer.identity import crypto, login, oidc
from enforcer.identity.cookies import session_cookie_name
from enforcer.identity.login import LoginFailure, LoginRules, RefreshDue
from enforcer.identity.sessions import MemorySessionStore, Session
from enforcer.identity.sqlite import SQLiteSessionStore
from enforcer.identity.tokens import ProviderMetadata, TokenResponse, VerifiedToken
from enforcer.metrics import Metrics
from tests.harness.fake_op import FakeOP
from tests.harness.gate import HOST, SERVICE, SPEC, Answer, FakeUpstream, RecordingFlowLog
from tests.harness.prereq import require
from tests.harness.redis import RedisServer, until, watched
from tests.harness.redis import make_session as redis_session

NOW = 1_800_000_000.0
ISSUER = "https://idp.example.com"
BINDING = b"app\x00" + ISSUER.encode() + b"\x00alice"

# ------------------------------------------------------------------ sealing at rest


def test_sealed_token_opens_and_hides_the_token() -> None:
    """A sealed token opens to the original with the same binding and does not contain it."""
    cipher = crypto.TokenCipher([os.urandom(32)])
    sealed = cipher.seal("rt-secret-value", BINDING)
    assert "rt-secret-value" not in sealed and sealed.startswith("v1.")
    assert cipher.open(sealed, BINDING) == "rt-secret-value"
    assert cipher.seal("rt-secret-value", BINDING) != sealed  # a fresh nonce each time


def test_rotation_old_key_still_opens_until_resealed() -> None:
    """With a new key listed first, tokens sealed with the old key open and are marked stale;
    new seals use the new key; a file without the old key no longer opens them."""
    old, new = os.urandom(32), os.urandom(32)
    before = crypto.TokenCipher([old]).seal("rt", BINDING)
    rotated = crypto.TokenCipher([new, old])
    assert rotated.open(before, BINDING) == "rt" and rotated.stale(before)
    resealed = rotated.seal("rt", BINDING)
    assert not rotated.stale(resealed) and crypto.key_id(new) in resealed
    assert crypto.TokenCipher([new]).open(before, BINDING) is None


def _flip(sealed: str, at: int) -> str:
    return sealed[:at] + ("A" if sealed[at] != "A" else "B") + sealed[at + 1 :]


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: _flip(s, len(s) - 3),  # the tag
        lambda s: _flip(s, 20),  # the nonce
        lambda s: "v2" + s[2:],  # another version
        lambda s: s.split(".")[0] + ".00000000." + s.split(".")[2],  # an unknown key id
        lambda s: s + "!!",  # not base64
        lambda s: s[:-30],  # truncated
        lambda s: "junk",
        lambda s: "",
    ],
)
def test_tampered_token_gives_the_same_none(damage: Any) -> None:
    """Every damaged sealed token fails the same way (None): no oracle, no exception."""
    cipher = crypto.TokenCipher([os.urandom(32)])
    assert cipher.open(damage(cipher.seal("rt", BINDING)), BINDING) is None


def test_token_bound_to_its_user() -> None:
    """A sealed token copied into another user's session does not open."""
    cipher = crypto.TokenCipher([os.urandom(32)])
    assert cipher.open(cipher.seal("rt", BINDING), BINDING.replace(b"alice", b"mallory")) is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [("", "no key"), ("# only a comment\n\n", "no key"), ("not base64 at all!\n", "not base64"),
     ("AAAA\n", "32 bytes")],
)
def test_bad_key_file_is_refused(tmp_path: Path, text: str, problem: str) -> None:
    """A key file without a usable key is refused with the reason."""
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(crypto.KeyFileError, match=problem):
        crypto.TokenCipher.from_file(path)


def test_key_file_lists_keys_newest_first(tmp_path: Path) -> None:
    """Keys are read one a line (comments skipped), the first one seals; a missing file is refused."""
    path = tmp_path / "keys"
    path.write_text(f"# new\n{crypto.new_key_line()}\n\n{crypto.new_key_line()}\n")
    first = crypto.parse_keys(path.read_text())[0]
    assert crypto.key_id(first) in crypto.TokenCipher.from_file(path).seal("rt", BINDING)
    with pytest.raises(crypto.KeyFileError, match="FileNotFoundError"):
        crypto.TokenCipher.from_file(tmp_path / "absent")
    with pytest.raises(crypto.KeyFileError):
        crypto.TokenCipher([])


# ------------------------------------------------------------------ the pure rules

RULES = LoginRules(service="app", client_id="client", scopes=("openid", "offline_access"), userinfo="auto",
                   leeway=60, max_id_token_age=600, session_lifetime=3600, claims_lifetime=300)
SESSION = Session(service="app", issuer=ISSUER, sub="alice", email="alice@example.com", username="alice",
                  tags=frozenset({"email=alice@example.com", "groups=admins", "groups=staff"}), sid="sid-1",
                  id_token="", created=NOW - 600, last_seen=NOW - 10, expires=NOW + 3000,
                  refresh_token="sealed-old", claims_expire=NOW + 100)
TOKENS = TokenResponse(id_token="h.p.s", access_token="at", token_type="Bearer", refresh_token="rt2",
                       expires_in=300, scope=None)


def refreshed_claims(**changes: Any) -> dict[str, Any]:
    """Valid refreshed ID token claims for SESSION (no nonce); None removes a claim."""
    claims: dict[str, Any] = {"iss": ISSUER, "aud": "client", "sub": "alice", "iat": NOW, "exp": NOW + 300,
                              "email": "alice@example.com", "email_verified": True, "groups": ["staff"],
                              "preferred_username": "alice"}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def verified(**changes: Any) -> VerifiedToken:
    return VerifiedToken(claims=refreshed_claims(**changes), header={"alg": "ES256"}, raw="h.p.s")


@pytest.mark.parametrize(
    ("changes", "now", "expected"),
    [
        ({}, NOW, RefreshDue.NO),
        ({}, NOW + 39.9, RefreshDue.NO),
        ({}, NOW + 40, RefreshDue.BACKGROUND),
        ({}, NOW + 99.9, RefreshDue.BACKGROUND),
        ({}, NOW + 100, RefreshDue.INLINE),
        ({"claims_expire": None}, NOW + 1000, RefreshDue.NO),
        ({"refresh_token": None}, NOW + 1000, RefreshDue.NO),
    ],
)
def test_refresh_due(changes: dict[str, Any], now: float, expected: RefreshDue) -> None:
    """Claims are refreshed aside within the margin (60 s) and inline once expired; never
    without a refresh token or a claims expiry."""
    assert login.refresh_due(dataclasses.replace(SESSION, **changes), now, 60) is expected


@pytest.mark.parametrize(
    ("scopes", "refresh_token", "kept"),
    [(("openid", "offline_access"), "rt", True), (("openid",), "rt", False),
     (("openid", "offline_access"), None, False)],
)
def test_login_keeps_refresh_token_only_with_offline_access(
    scopes: tuple[str, ...], refresh_token: str | None, kept: bool
) -> None:
    """complete_login keeps a refresh token (and sets the claims' expiry) only with offline_access."""
    txn = login.LoginTransaction(state="s", nonce="n", code_verifier="v", binding="b", service="app", issuer=ISSUER,
                                 redirect_uri="https://app/cb", return_to="/", created=NOW)
    session = login.complete_login(
        refreshed_claims(), None, tokens=dataclasses.replace(TOKENS, refresh_token=refresh_token), txn=txn,
        rules=dataclasses.replace(RULES, scopes=scopes), now=NOW,
    )
    assert isinstance(session, Session)
    assert (session.refresh_token is not None, session.claims_expire) == (kept, NOW + 300 if kept else None)
    assert login.token_binding(session) == BINDING


@pytest.mark.parametrize(
    ("scopes", "prompt"),
    [(("openid", "offline_access"), "consent"), (("openid", "email", "offline_access", "groups"), "consent"),
     (("openid", "email"), None), (("openid", "offline_accessible"), None)],
)
def test_authorization_request_asks_consent_only_for_offline_access(
    scopes: tuple[str, ...], prompt: str | None
) -> None:
    """The authorization request carries prompt=consent exactly when the scopes ask
    offline_access (OIDC Core 11; without it oidc-provider drops offline_access and issues no
    refresh token); nothing else of the request changes."""
    metadata = ProviderMetadata(issuer=ISSUER, authorization_endpoint=ISSUER + "/auth", token_endpoint=ISSUER + "/token",
                                jwks_uri=ISSUER + "/jwks", userinfo_endpoint=None, end_session_endpoint=None,
                                token_auth_method="client_secret_basic", iss_parameter_supported=True)
    url, txn, _ = login.start_login(metadata=metadata, client_id="client", redirect_uri="https://app/cb",
                                    scopes=scopes, service="app", return_to="/", now=NOW)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query.get("prompt") == ([prompt] if prompt else None)
    assert query["scope"] == [" ".join(scopes)] and query["state"] == [txn.state]
    assert set(query) == {"response_type", "client_id", "redirect_uri", "scope", "state", "nonce", "code_challenge",
                          "code_challenge_method", *(["prompt"] if prompt else [])}


def test_refresh_recomputes_tags_and_keeps_the_session() -> None:
    """A good refreshed ID token renews tags (a removed group is gone), ID token, refresh token
    and claims expiry; identity, sid and the session's lifetime stay."""
    renewed = login.check_refreshed(SESSION, verified(sid="other"), None, tokens=TOKENS, rules=RULES,
                                    refresh_token="sealed-new", now=NOW)
    assert isinstance(renewed, Session)
    assert {"email=alice@example.com", "groups=staff"} <= renewed.tags and "groups=admins" not in renewed.tags
    assert (renewed.id_token, renewed.refresh_token, renewed.claims_expire) == ("h.p.s", "sealed-new", NOW + 300)
    assert (renewed.sub, renewed.sid, renewed.created, renewed.expires) == ("alice", "sid-1", SESSION.created,
                                                                             SESSION.expires)


@pytest.mark.parametrize(
    ("token", "userinfo", "expected"),
    [
        (verified(sub="mallory"), None, Reason.REFRESH_SUB_MISMATCH),
        (verified(iss="https://evil.example.com"), None, Reason.ID_TOKEN_BAD_ISS),
        (verified(aud="other-client"), None, Reason.ID_TOKEN_BAD_AUD),
        (verified(exp=NOW - 3600), None, Reason.ID_TOKEN_EXPIRED),
        (verified(at_hash="AAAAAAAAAAAAAAAAAAAAAA"), None, Reason.ID_TOKEN_BAD_AT_HASH),
        (verified(groups=["x" * 5000]), None, Reason.CLAIMS_TOO_LARGE),
        (None, None, Reason.REFRESH_NO_ID_TOKEN),
        (verified(), {"sub": "mallory"}, Reason.USERINFO_SUB_MISMATCH),
    ],
)
def test_refresh_refused(token: VerifiedToken | None, userinfo: dict[str, Any] | None, expected: Reason) -> None:
    """A refreshed ID token for another sub or issuer, failing any login check, or missing,
    ends the session (the failure's code says why)."""
    result = login.check_refreshed(SESSION, token, userinfo, tokens=TOKENS, rules=RULES, refresh_token="x", now=NOW)
    assert isinstance(result, LoginFailure) and result.code == expected


def test_refresh_without_id_token_string_is_refused() -> None:
    """A token response whose ID token is empty counts as no ID token, even with a verified one."""
    result = login.check_refreshed(SESSION, verified(), None, tokens=dataclasses.replace(TOKENS, id_token=""),
                                   rules=RULES, refresh_token="x", now=NOW)
    assert result == LoginFailure(Reason.REFRESH_NO_ID_TOKEN, 401)


def test_refresh_merges_userinfo_and_drops_unverified_email() -> None:
    """UserInfo of the same sub fills in claims (the ID token wins); an unverified email and a
    non-string username are not kept."""
    token = verified(email_verified=False, preferred_username=7, groups=None)
    renewed = login.check_refreshed(SESSION, token, {"sub": "alice", "groups": ["ops"], "email": "x@y"},
                                    tokens=TOKENS, rules=RULES, refresh_token="x", now=NOW)
    assert isinstance(renewed, Session)
    assert "groups=ops" in renewed.tags and renewed.email is None and renewed.username is None


# ------------------------------------------------------------------ the memory store's lease


async def test_memory_store_lease_and_atomic_write() -> None:
    """One lease at a time per session; the renewed write happens only over the expected token."""
    store = MemorySessionStore(idle_timeout=3600, max_sessions=1)
    handle = await store.create(SESSION)
    assert await store.refresh_begin("junk", NOW, 10) is None
    assert await store.refresh_begin(handle, NOW, 10) == SESSION
    assert await store.refresh_begin(handle, NOW + 5, 10) is None  # leased
    renewed = dataclasses.replace(SESSION, tags=frozenset({"x=1"}), refresh_token="sealed-new")
    assert not await store.refresh_end(handle, "not-the-stored-one", renewed)
    assert await store.refresh_begin(handle, NOW + 20, 10) is not None  # the lease was released
    assert await store.refresh_end(handle, "sealed-old", renewed)
    got = await store.get(handle, "app", NOW)
    assert got is not None and got.tags == frozenset({"x=1"}) and got.refresh_token == "sealed-new"
    assert not await store.refresh_end("junk", None, None)
    assert await store.refresh_begin(handle, NOW + 40, 10) is not None  # the lease table is bounded
    assert await store.refresh_begin(handle, NOW + 41, 10) is None


async def test_sqlite_store_lease_is_shared_between_workers(tmp_path: Path) -> None:
    """Two SQLite stores on one file (two workers): one lease; the renewed write reaches the other's reads."""
    a = SQLiteSessionStore(tmp_path / "s.db", idle_timeout=3600, shared=True)
    b = SQLiteSessionStore(tmp_path / "s.db", idle_timeout=3600, shared=True)
    try:
        handle = await a.create(SESSION)
        assert (await b.get(handle, "app", NOW)) is not None  # cached in b
        stored = await a.refresh_begin(handle, NOW, 10)
        assert stored is not None and stored.refresh_token == "sealed-old"
        assert await b.refresh_begin(handle, NOW, 10) is None
        renewed = dataclasses.replace(stored, tags=frozenset({"groups=staff"}), refresh_token="sealed-new",
                                      claims_expire=NOW + 400, id_token="new.id.token")
        assert await a.refresh_end(handle, "sealed-old", renewed)
        got = await b.get(handle, "app", NOW)
        assert got is not None and got.tags == frozenset({"groups=staff"}) and got.claims_expire == NOW + 400
        assert not await b.refresh_end(handle, "sealed-old", renewed)  # rotated already: no write
        assert await b.refresh_begin(handle, NOW, 10) is not None  # released by refresh_end
        assert await a.refresh_begin("junk", NOW, 10) is None and not await a.refresh_end("junk", None, None)
    finally:
        await a.close()
        await b.close()


# ------------------------------------------------------------------ the gate at the fake OP


async def test_sqlite_late_end_does_not_release_the_next_holders_lease(tmp_path: Path) -> None:
    """A worker whose lease ran out ends late: the next holder's lease stays, though the write over the expected token happens."""
    a = SQLiteSessionStore(tmp_path / "s.db", idle_timeout=3600, shared=True)
    b = SQLiteSessionStore(tmp_path / "s.db", idle_timeout=3600, shared=True)
    try:
        handle = await a.create(SESSION)
        stored = await a.refresh_begin(handle, NOW, 10)
        assert stored is not None
        assert await b.refresh_begin(handle, NOW + 11, 10) is not None  # a's lease ran out
        renewed = dataclasses.replace(stored, refresh_token="sealed-new")
        assert await a.refresh_end(handle, "sealed-old", renewed)  # late: still a compare-and-set write
        assert await a.refresh_begin(handle, NOW + 12, 10) is None  # b's lease stays
        assert not await b.refresh_end(handle, "sealed-old", renewed)
        assert await a.refresh_begin(handle, NOW + 13, 10) is not None  # released by its holder
    finally:
        await a.close()
        await b.close()


def _definitions(service: dict[str, Any], spec: dict[str, Any]) -> Definitions:
    parsed = parse_documents(yaml.safe_dump_all([{**SERVICE, **service}, spec]), "defs.yaml")
    assert isinstance(parsed, list)
    return resolve_definitions(parsed, ())


class Rig:
    """A Gate with a SQLite store and a real oidc.Provider at the fake OP (real TLS); the gate's
    clock is real time plus ``skew`` (so the OP's tokens stay valid while claims expire)."""

    def __init__(self, op: FakeOP, tmp: Path, http: aiohttp.ClientSession, *, key: bool = True,
                 shared: bool = False) -> None:
        self.op, self.http, self.skew = op, http, 0.0
        keys = tmp / "refresh.keys"
        if not keys.exists():
            keys.write_text(crypto.new_key_line() + "\n")
        model: dict[str, Any] = {"definitions": [{"file": "/nonexistent"}],
                                 "sessions": {"claimsLifetime": 10, "refreshMargin": 4}}
        if key:
            model["sessions"]["refreshTokenKeyFile"] = str(keys)
        settings = Settings(path=Path("/nonexistent/enforcer.yaml"), model=DaemonModel.model_validate(model))
        self.provider = oidc.Provider(issuer=op.issuer, http=http, ssl_context=oidc.client_ssl_context(str(op.ca_file)))
        service = {"OIDCProviderURL": op.issuer, "OIDCClientID": op.client_id, "OIDCClientSecret": op.client_secret,
                   "OIDCScopes": ["openid", "email", "offline_access"]}
        spec = {**SPEC, "endpoints": [{"URI": "/admin", "methods": ["GET"], "allowedScopes": [["groups=admins"]]},
                                      *SPEC["endpoints"]]}
        self.store = SQLiteSessionStore(tmp / "sessions.db", idle_timeout=3600, shared=shared)
        self.flowlog = RecordingFlowLog()
        self.gate = Gate(
            settings=settings, runtime=Runtime(_definitions(service, spec), {"app": self.provider}),
            store=self.store, flowlog=self.flowlog, metrics=Metrics(), upstream=FakeUpstream(), listen_port=8443,
            clock=lambda: time.time() + self.skew,
        )
        self.cookie = ""

    async def request(self, path: str, headers: dict[str, str] | None = None) -> Answer:
        sent = {"Host": HOST, "Accept": "text/html", **({"Cookie": self.cookie} if self.cookie else {}),
                **(headers or {})}
        response = await self.gate.handle(make_mocked_request("GET", path, headers=sent))
        return Answer(response, self.flowlog.records[-1])

    async def sign_in(self) -> None:
        """The browser's whole login: gate -> OP authorize -> gate callback; keeps the session cookie."""
        first = await self.request("/private")
        assert first.status == 302, first.flow.reason
        binding = next(c.split(";", 1)[0] for c in first.set_cookies() if c.startswith("__Host-enforcertx-"))
        async with self.http.get(first.response.headers["Location"], allow_redirects=False,
                                 ssl=oidc.client_ssl_context(str(self.op.ca_file))) as resp:
            back = urllib.parse.urlsplit(resp.headers["Location"])
        self.cookie = binding
        done = await self.request(back.path + "?" + back.query)
        assert done.status == 302, done.flow.reason
        handle = done.cookie(session_cookie_name("app"))
        assert handle
        self.cookie = f"{session_cookie_name('app')}={handle}"

    @property
    def handle(self) -> str:
        return self.cookie.split("=", 1)[1]

    async def stored(self) -> Session | None:
        return await self.store.get(self.handle, "app", time.time() + self.skew)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of its own (tests/harness/redis.py)."""
    require(shutil.which("redis-server") is not None, "redis-server (scripts/setup)")
    srv = RedisServer()
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(srv.dir, ignore_errors=True)


@pytest.fixture
async def op(tmp_path: Path) -> AsyncIterator[FakeOP]:
    fake = FakeOP(workdir=tmp_path / "op", claims={"email": "alice@example.com", "email_verified": True,
                                                   "groups": ["admins", "staff"]})
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def rig(op: FakeOP, tmp_path: Path) -> AsyncIterator[Rig]:
    async with aiohttp.ClientSession() as http:
        r = Rig(op, tmp_path, http)
        yield r
        await r.store.close()


async def test_login_stores_the_refresh_token_sealed(rig: Rig) -> None:
    """With offline_access the OP's refresh token is kept, sealed (never in the clear in the file)."""
    await rig.sign_in()
    stored = await rig.stored()
    assert stored is not None and stored.refresh_token is not None and stored.refresh_token.startswith("v1.")
    [issued] = rig.op.refresh_tokens
    assert issued not in (rig.store._path.read_bytes() + rig.store._path.with_name("sessions.db-wal").read_bytes()).decode("latin-1")


async def test_without_key_file_no_refresh_token_is_kept(op: FakeOP, tmp_path: Path) -> None:
    """Without refreshTokenKeyFile the refresh token is dropped and claims are never refreshed."""
    async with aiohttp.ClientSession() as http:
        r = Rig(op, tmp_path, http, key=False)
        try:
            await r.sign_in()
            stored = await r.stored()
            assert stored is not None and (stored.refresh_token, stored.claims_expire) == (None, None)
        finally:
            await r.store.close()


async def test_expired_claims_refreshed_inline_with_rotation_and_new_groups(rig: Rig) -> None:
    """Past the claims' end the next request refreshes them first (no browser round trip): the
    rotated refresh token is stored, and a group removed at the IdP is gone from the tags."""
    await rig.sign_in()
    assert (await rig.request("/admin")).status == 200
    rig.op.claims["groups"] = ["staff"]
    rig.skew = 11  # the claims (10 s) have expired
    denied = await rig.request("/admin")
    assert denied.status == 403, denied.flow.reason
    assert len(rig.op.refresh_requests()) == 1
    stored = await rig.stored()
    assert stored is not None and "groups=admins" not in stored.tags and "groups=staff" in stored.tags
    assert (await rig.request("/private")).status == 200
    assert len(rig.op.refresh_requests()) == 1  # the renewed claims serve the next requests


async def test_claims_near_their_end_refreshed_in_the_background(rig: Rig) -> None:
    """Within the margin the request is served at once with the current claims; the refresh
    runs aside and the next request sees the renewed tags."""
    await rig.sign_in()
    rig.op.claims["groups"] = ["staff"]
    rig.op.behaviour.refresh_delay = 0.2
    rig.skew = 7  # within the 4 s margin of the 10 s claims
    assert (await rig.request("/admin")).status == 200  # old claims, served without waiting
    assert rig.gate._refreshing
    await asyncio.wait_for(asyncio.gather(*rig.gate._refreshing.values()), 5)
    assert (await rig.request("/admin")).status == 403


async def test_revoked_refresh_token_ends_the_session(rig: Rig) -> None:
    """invalid_grant (revoked token, disabled user) ends the session: the next request signs in again."""
    await rig.sign_in()
    rig.op.revoke_refresh_tokens()
    rig.skew = 11
    answer = await rig.request("/private")
    assert answer.status == 302 and answer.flow.reason == Reason.LOGIN_REQUIRED
    assert await rig.stored() is None


async def test_concurrent_refreshes_make_one_token_request(rig: Rig) -> None:
    """Many requests of one session with expired claims at once: one token request, all served."""
    await rig.sign_in()
    rig.op.behaviour.refresh_delay = 0.2
    rig.skew = 11
    answers = await asyncio.gather(*(rig.request("/private") for _ in range(8)))
    assert [a.status for a in answers] == [200] * 8
    assert len(rig.op.refresh_requests()) == 1


async def test_two_workers_refresh_one_session_once(op: FakeOP, tmp_path: Path) -> None:
    """A second worker (its own gate and store on the same SQLite file) waits for the first's
    refresh instead of making its own token request (the store's lease), and then sees it."""
    async with aiohttp.ClientSession() as http:
        one, two = Rig(op, tmp_path, http, shared=True), Rig(op, tmp_path, http, shared=True)
        try:
            await one.sign_in()
            two.cookie = one.cookie
            assert (await two.request("/admin")).status == 200
            op.claims["groups"] = ["staff"]
            op.behaviour.refresh_delay = 0.3
            one.skew = two.skew = 11
            a, b = await asyncio.gather(one.request("/admin"), two.request("/admin"))
            assert (a.status, b.status) == (403, 403)
            assert len(op.refresh_requests()) == 1
        finally:
            await one.store.close()
            await two.store.close()


@pytest.mark.parametrize(
    ("misbehave", "reason"),
    [
        ({"refresh_claims_overrides": {"sub": "mallory"}}, Reason.REFRESH_SUB_MISMATCH),
        ({"refresh_claims_overrides": {"iss": "https://evil.example.com"}}, Reason.ID_TOKEN_BAD_ISS),
        ({"refresh_sign_with": "unknown"}, None),
        ({"refresh_id_token": False}, Reason.REFRESH_NO_ID_TOKEN),
    ],
)
async def test_misbehaving_idp_refresh_ends_the_session(
    rig: Rig, misbehave: dict[str, Any], reason: Reason | None
) -> None:
    """A refreshed ID token for another sub, from another issuer, with a bad signature, or none
    at all: the session ends (nothing about the user can be vouched for), the request signs in again."""
    await rig.sign_in()
    for k, v in misbehave.items():
        setattr(rig.op.behaviour, k, v)
    rig.skew = 11
    answer = await rig.request("/private")
    assert answer.status == 302 and answer.flow.reason == Reason.LOGIN_REQUIRED
    assert await rig.stored() is None
    if reason is not None:
        assert rig.gate.metrics.logins.labels("app", reason)._value.get() == 1


async def test_unreadable_refresh_token_ends_the_session(rig: Rig) -> None:
    """A refresh token that does not decrypt (key removed) ends the session without a token request."""
    await rig.sign_in()
    rig.gate.cipher = crypto.TokenCipher([os.urandom(32)])
    rig.skew = 11
    answer = await rig.request("/private")
    assert answer.status == 302 and not rig.op.refresh_requests()


async def test_a_rotated_key_file_is_picked_up_and_old_tokens_are_resealed(rig: Rig, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A key file rewritten with a new key first is picked up without a restart: the token sealed with the old key still opens and is re-sealed with the new one at its refresh, after which the old key can go; a file that stops parsing keeps the keys in force."""
    keys = tmp_path / "refresh.keys"
    old = keys.read_text().strip()
    await rig.sign_in()
    first = await rig.stored()
    assert first is not None and first.refresh_token is not None
    assert not rig.gate.reload_keys()  # unchanged: not re-read
    new = crypto.new_key_line()
    keys.write_text(f"{new}\n{old}\n")
    assert rig.gate.reload_keys()
    new_id = crypto.key_id(crypto.parse_keys(new)[0])
    assert first.refresh_token.split(".")[1] != new_id
    rig.skew = 11  # the claims have expired: the next request refreshes them
    assert (await rig.request("/private")).status == 200
    resealed = await rig.stored()
    assert resealed is not None and resealed.refresh_token is not None
    assert resealed.refresh_token.split(".")[1] == new_id
    keys.write_text(f"{new}\n")  # the old key removed
    assert rig.gate.reload_keys()
    rig.skew = 22
    assert (await rig.request("/private")).status == 200
    assert len(rig.op.refresh_requests()) == 2
    keys.write_text("not a key\n")
    with caplog.at_level(logging.ERROR):
        assert not rig.gate.reload_keys()
    assert "cannot be used" in caplog.text and rig.gate.cipher is not None and rig.gate.cipher.current == new_id


# ------------------------------------------------------------------ the Redis store's lease


async def test_redis_store_lease_and_atomic_write_reach_every_enforcer(redis_server: RedisServer) -> None:
    """Two enforcers on one Redis: one lease (SET NX PX) per session; the renewed write, only
    over the expected refresh token, is seen by the other at once (its cached copy is dropped)."""
    async with watched(redis_server.config()) as a, watched(redis_server.config()) as b:
        now = time.time()
        handle = await a.create(redis_session(refresh_token="sealed-old", claims_expire=now + 10))
        assert (await b.get(handle, "app", now)) is not None  # cached in b
        stored = await a.refresh_begin(handle, now, 10)
        assert stored is not None and stored.refresh_token == "sealed-old"
        assert await b.refresh_begin(handle, now, 10) is None
        renewed = dataclasses.replace(stored, tags=frozenset({"groups=ops"}), refresh_token="sealed-new",
                                      claims_expire=now + 400, id_token="new.id.token")
        assert not await b.refresh_end(handle, "sealed-other", renewed)  # not the stored token: no write
        assert await b.refresh_begin(handle, now, 10) is None  # ... and A's lease is not B's to release
        assert await a.refresh_end(handle, "sealed-old", renewed)
        assert await until(lambda: b.get_cached(handle, "app", now) is None, 1.0) <= 1.0
        got = await b.get(handle, "app", now)
        assert got is not None and got.tags == frozenset({"groups=ops"}) and got.claims_expire == now + 400
        popped = await b.pop(handle, "app", now)
        assert popped is not None and popped.id_token == "new.id.token"
        assert await a.refresh_begin(handle, now, 10) is None  # gone
        assert await a.refresh_begin("junk", now, 10) is None and not await a.refresh_end("junk", None, None)
        assert not await a.refresh_end(handle, "sealed-new", renewed)  # gone: nothing re-created
        assert await a.get(handle, "app", now) is None


async def test_redis_late_end_does_not_release_the_next_holders_lease(redis_server: RedisServer) -> None:
    """A holder whose lease expired ends late: the next holder's lease (another random value) stays; the compare-and-set write still applies."""
    async with watched(redis_server.config()) as a, watched(redis_server.config()) as b:
        now = time.time()
        handle = await a.create(redis_session(refresh_token="sealed-old", claims_expire=now + 10))
        stored = await a.refresh_begin(handle, now, 0.05)
        assert stored is not None
        await asyncio.sleep(0.1)  # a's lease expires in Redis
        assert await b.refresh_begin(handle, now, 10) is not None
        assert not await a.refresh_end(handle, None, None)  # late, nothing to write
        assert await a.refresh_begin(handle, now, 10) is None  # b's lease stays
        renewed = dataclasses.replace(stored, refresh_token="sealed-new")
        assert await a.refresh_end(handle, "sealed-old", renewed)  # late write: the token still matches
        assert await a.refresh_begin(handle, now, 10) is None  # ... and b's lease still stays
        assert not await b.refresh_end(handle, "sealed-old", renewed)  # rotated by a: no write, released
        assert await a.refresh_begin(handle, now, 10) is not None
