"""Refresh with the real OpenID Provider (issue 17): node oidc-provider issuing and rotating
refresh tokens, two ``python -m enforcer run`` processes (two loopback addresses, one port)
sharing a real redis-server, a recording app, a scripted browser that clicks through the OP's
login and consent pages. The OP's test admin listener (scripts/op/op.mjs) reports its events
(authorization requests, token grants) and changes a user's groups.

Claims live 3 s here (``claimsLifetime``; refresh aside in the last second), ID and access
tokens 10 s at the OP; each test signs in its own user, so the tests do not depend on each other.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from enforcer.identity import crypto, login
from tests.harness.browser import Response, ScriptedBrowser
from tests.harness.chromium import chromium_available, run_chromium_login, spki_hashes
from tests.harness.e2e_stack import SCOPES, Stack, start_peer, start_stack, stop_stack
from tests.harness.op import OPUser
from tests.harness.prereq import require, require_e2e
from tests.harness.redis import RedisServer, watched

pytestmark = pytest.mark.e2e

CLAIMS_LIFETIME = 3.0
PAST_CLAIMS = CLAIMS_LIFETIME + 0.4
"""Sleep this long after a login (or refresh) and the claims have expired: the next request refreshes inline."""
COOKIE = "__Host-enforcer-app"
OP_TTL = {"IdToken": 10, "AccessToken": 10, "RefreshToken": 600}


def _user(name: str) -> OPUser:
    return OPUser(f"{name}-pw", {"email": f"{name}@example.com", "email_verified": True,
                                 "groups": ["admins", "staff"], "preferred_username": name})


USERS = {name: _user(name) for name in ("ann", "ben", "cat", "dan", "eli")}


@dataclass
class Pair:
    """Enforcer A (the stack, 127.0.0.2) and enforcer B (127.0.0.3) on one Redis and one OP."""

    a: Stack
    b: Stack
    redis: RedisServer
    keys: Path

    async def stored(self, cookie: str) -> Any:
        """The session behind ``cookie`` as Redis holds it (None: gone)."""
        handle = cookie.split("=", 1)[1]
        async with watched(self.redis.config()) as store:
            return await store.get(handle, "app", time.time())

    async def refresh_token(self, cookie: str) -> str:
        """The refresh token in the clear, opened with the key file (what only the enforcer can do)."""
        session = await self.stored(cookie)
        assert session is not None and session.refresh_token is not None
        token = crypto.TokenCipher.from_file(self.keys).open(session.refresh_token, login.token_binding(session))
        assert token is not None
        return token

    async def token_request(self, endpoint: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """A client-authenticated POST to the OP (client_secret_basic, form-encoded per RFC 6749 2.3.1)."""
        secret = (self.a.state / "client-secret").read_text()
        pair_text = urllib.parse.quote_plus("app-client") + ":" + urllib.parse.quote_plus(secret)
        auth = {"Authorization": "Basic " + base64.b64encode(pair_text.encode()).decode()}
        async with aiohttp.ClientSession() as http:
            async with http.get(self.a.op.discovery_url, ssl=self.a.op.ssl_context()) as r:
                url = (await r.json())[endpoint]
            async with http.post(url, data=form, headers=auth, ssl=self.a.op.ssl_context()) as r:
                return r.status, (await r.json() if r.content_length != 0 else {})


@pytest_asyncio.fixture(scope="module")
async def pair(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pair]:
    """OP (short tokens, rotation on, test admin) + Redis + enforcers A and B with offline_access."""
    require_e2e()
    require(shutil.which("redis-server") is not None, "redis-server (scripts/setup)")
    work = tmp_path_factory.mktemp("refresh-e2e")
    redis = RedisServer()
    redis.start()
    keys = work / "refresh.keys"
    keys.write_text(crypto.new_key_line() + "\n")
    keys.chmod(0o600)
    sessions = (
        "sessions:\n"
        "  store: redis\n"
        f"  redis: {{url: 'unix://{redis.sock}', username: enforcer, passwordFile: {redis.password_file}}}\n"
        f"  refreshTokenKeyFile: {keys}\n"
        f"  claimsLifetime: {CLAIMS_LIFETIME}s\n"
        "  refreshMargin: 1s\n"
    )
    a: Stack | None = None
    b: Stack | None = None
    try:
        a = await start_stack(work / "a", scopes=(*SCOPES, "offline_access"), extra_config=sessions, users=USERS,
                              op_options={"ttl": OP_TTL, "rotate_refresh_tokens": True, "test_admin_port": 0},
                              address="127.0.0.2")
        b = await start_peer(a, work / "b", "127.0.0.3")
        yield Pair(a, b, redis, keys)
    finally:
        if b is not None:
            await b.stop_enforcer()
        if a is not None:
            (work / "op.stderr").write_text("\n".join(a.op.stderr_lines) + "\n")
            await stop_stack(a)
        redis.stop()
        shutil.rmtree(redis.dir, ignore_errors=True)


async def sign_in(stack: Stack, user: str, path: str) -> tuple[ScriptedBrowser, Response, str]:
    """A browser that signed ``user`` in through ``stack`` (login and consent pages); its cookie header."""
    browser = stack.browser()
    page = await stack.login(browser, user, path)
    assert page.status == 200, (page.status, page.url, page.text[:300])
    cookie = browser.cookies.get(COOKIE)
    assert cookie is not None, browser.cookies.names()
    return browser, page, f"{COOKIE}={cookie.value}"


async def get(stack: Stack, path: str, cookie: str) -> Response:
    """GET ``path`` on this enforcer with ``cookie`` (a fresh browser; redirects not followed)."""
    async with stack.browser() as b:
        return await b.request("GET", stack.base + path, follow=False, headers={"Cookie": cookie})


async def refreshes(stack: Stack, user: str) -> list[dict[str, Any]]:
    return await stack.op_events("grant.success", grant_type="refresh_token", account=user)


async def authorizations(stack: Stack, user: str) -> list[dict[str, Any]]:
    return await stack.op_events("authorization.success", account=user)


async def test_login_with_offline_access_asks_consent_and_gets_a_refresh_token(pair: Pair) -> None:
    """With offline_access the enforcer asks prompt=consent, the user allows on the OP's consent
    page, and the OP issues a refresh token that the enforcer keeps sealed in Redis."""
    browser, page, cookie = await sign_in(pair.a, "ann", "/ann/first")
    await browser.close()
    [auth] = await pair.a.op_events("authorization.accepted", account="ann")
    assert auth["prompt"] == "consent" and "offline_access" in auth["scope"].split()
    assert any("/interaction/" in url for url in page.urls)  # the login and then the consent page
    assert await pair.a.op_events("refresh_token.saved", account="ann")
    stored = await pair.stored(cookie)
    assert stored is not None and stored.refresh_token.startswith("v1.") and stored.claims_expire is not None
    assert await pair.refresh_token(cookie) not in stored.refresh_token


async def test_claims_renewed_without_a_browser_round_trip(pair: Pair) -> None:
    """After the claims expired the next request is served: the OP saw a refresh_token grant and
    no new authorization request, and the stored claims' end moved on."""
    browser, _, cookie = await sign_in(pair.a, "ann", "/ann/login")
    await browser.close()
    before = await pair.stored(cookie)
    auths, grants = len(await authorizations(pair.a, "ann")), len(await refreshes(pair.a, "ann"))
    await asyncio.sleep(PAST_CLAIMS)
    page = await get(pair.a, "/ann/after-expiry", cookie)
    assert page.status == 200, (page.status, page.location)
    assert len(await refreshes(pair.a, "ann")) == grants + 1
    assert len(await authorizations(pair.a, "ann")) == auths
    after = await pair.stored(cookie)
    assert after.claims_expire > before.claims_expire and after.refresh_token != before.refresh_token
    assert pair.a.upstream.seen[-1].target == "/ann/after-expiry"


async def test_group_removed_at_the_idp_is_gone_after_the_next_refresh(pair: Pair) -> None:
    """A group removed at the OP: after the next refresh the session's tags lack it and the
    admins-only endpoint answers 403 (its flow record names the missing tag); staff still works."""
    browser, _, cookie = await sign_in(pair.a, "ben", "/ben/login")
    await browser.close()
    assert (await get(pair.a, "/admin/ben-before", cookie)).status == 200
    await pair.a.set_claims("ben", groups=["staff"])
    await asyncio.sleep(PAST_CLAIMS)
    denied = await get(pair.a, "/admin/ben-after", cookie)
    assert denied.status == 403, (denied.status, denied.location)
    stored = await pair.stored(cookie)
    assert "groups=admins" not in stored.tags and "groups=staff" in stored.tags
    flow = await pair.a.wait_flow(lambda r: r.get("path") == "/admin/ben-after")
    assert flow["decision"] == "deny" and flow["user"] == "ben" and "groups=admins" in str(flow.get("missing"))
    assert (await get(pair.a, "/ben/staff", cookie)).status == 200
    assert len(await refreshes(pair.a, "ben")) == 1


async def test_refresh_token_revoked_at_the_op_ends_the_session(pair: Pair) -> None:
    """The refresh token revoked at the OP's revocation endpoint: the next refresh is refused
    (invalid_grant), the session ends and the request is sent to sign in again."""
    browser, _, cookie = await sign_in(pair.a, "cat", "/cat/login")
    await browser.close()
    errors, revoked = len(await pair.a.op_events("grant.error")), len(await pair.a.op_events("grant.revoked"))
    status, _ = await pair.token_request("revocation_endpoint", {
        "token": await pair.refresh_token(cookie), "token_type_hint": "refresh_token"})
    assert status == 200
    assert len(await pair.a.op_events("grant.revoked")) == revoked + 1  # oidc-provider revokes the whole grant
    assert (await get(pair.a, "/cat/still-fresh", cookie)).status == 200  # claims still valid: no IdP call yet
    await asyncio.sleep(PAST_CLAIMS)
    page = await get(pair.a, "/cat/after-revocation", cookie)
    assert page.status == 302 and (page.location or "").startswith(pair.a.op.issuer + "/auth?"), page.location
    [refused] = (await pair.a.op_events("grant.error"))[errors:]  # (a revoked token names no account)
    assert (refused["grant_type"], refused["error"], refused["detail"]) == (
        "refresh_token", "invalid_grant", "refresh token not found")
    assert await pair.stored(cookie) is None
    assert (await get(pair.b, "/cat/on-b", cookie)).status == 302  # ended on every enforcer


async def test_two_enforcers_refresh_once_and_store_the_rotated_token(
    pair: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    """Requests on both enforcers at once after the claims expired: one token request, all
    served; the rotated refresh token is stored, so later refreshes never reuse an old one, while
    the OP does detect a reuse (by someone else) and revokes the grant."""
    browser, _, cookie = await sign_in(pair.a, "dan", "/dan/login")
    await browser.close()
    assert (await get(pair.b, "/dan/warm-b", cookie)).status == 200  # B has the session cached too
    first = await pair.refresh_token(cookie)
    await asyncio.sleep(PAST_CLAIMS)
    answers = await asyncio.gather(*(get(stack, f"/dan/both/{n}", cookie)
                                     for n in range(4) for stack in (pair.a, pair.b)))
    assert [a.status for a in answers] == [200] * 8, [(a.status, a.location) for a in answers]
    assert len(await refreshes(pair.a, "dan")) == 1
    second = await pair.refresh_token(cookie)
    assert second != first  # rotated, and the new one is what is stored

    await asyncio.sleep(PAST_CLAIMS)  # a second refresh (on B) uses the stored rotated token
    assert (await get(pair.b, "/dan/second", cookie)).status == 200
    assert len(await refreshes(pair.a, "dan")) == 2
    assert await pair.a.op_events("grant.error", account="dan") == []  # we never sent a used token

    status, body = await pair.token_request("token_endpoint", {"grant_type": "refresh_token", "refresh_token": first})
    assert (status, body.get("error")) == (400, "invalid_grant")  # a reuse: the OP revokes the whole grant
    [reuse] = await pair.a.op_events("grant.error", account="dan")
    assert reuse["detail"] == "refresh token already used"
    await asyncio.sleep(PAST_CLAIMS)
    page = await get(pair.a, "/dan/after-reuse", cookie)
    assert page.status == 302, (page.status, page.location)
    events = [e for e in await pair.a.op_events() if e.get("account") == "dan" and e["event"] != "authorization.accepted"]
    with capsys.disabled():
        print("\n[refresh-e2e] OP events for dan:")
        for e in events:
            print("  ", {k: v for k, v in e.items() if k != "account"})


@pytest.mark.browser
async def test_chromium_allows_the_consent_page_and_gets_a_refresh_token(pair: Pair) -> None:
    """Debian's Chromium, asked for consent by the OP (prompt=consent with offline_access), allows it and reaches the app with a sealed refresh token stored."""
    require(chromium_available(), "chromium or playwright-core")
    stack = pair.a
    result = await run_chromium_login(
        stack.base + "/consent-page",
        username="eli",
        password=USERS["eli"].password,
        expect_text="consent-page",
        spki=spki_hashes(stack.state / "certs" / "app.crt", stack.op.tls.cert_file),
        resolve={"app.test": "127.0.0.2"},
    )
    assert result["ok"], result
    assert result["consent_given"], result
    [auth] = await stack.op_events("authorization.accepted", account="eli")
    assert auth["prompt"] == "consent"
    assert await stack.op_events("refresh_token.saved", account="eli")

