"""Tests of the e2e harness itself: the real OP (node oidc-provider), the scripted
browser and the Chromium driver.  Everything runs on 127.0.0.1 over real TLS."""

from __future__ import annotations

import ast
import asyncio
import base64
import hashlib
import json
import os
import secrets
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote_plus, urlencode, urlsplit

import aiohttp
import pytest
from aiohttp import web
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.harness.prereq import require

# `tests.harness` is imported from the repository root (also by `enforcer demo`);
# pytest's default import mode only puts tests/ itself on sys.path.
if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness.browser import BrowserCookieJar, ScriptedBrowser, parse_forms
from tests.harness.chromium import (
    chromium_available,
    run_chromium_login,
    spki_hashes,
)
from tests.harness.op import OPUser, RunningOP, make_tls_material, start_op

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIENT_ID = "enforcer-test"
CLIENT_SECRET = "s3cret/+:& " + "x" * 24  # needs form-encoding in Basic auth

USERS = {
    "alice": OPUser(
        password="alice-pw",
        claims={
            "email": "alice@example.com",
            "email_verified": True,
            "groups": ["admins", "staff"],
            "name": "Alice",
        },
    ),
    "bob": OPUser(
        password="bob-pw",
        claims={"email": "bob@example.com", "email_verified": False, "groups": [], "name": "Bob"},
    ),
}


# ---------------------------------------------------------------- fixtures


@dataclass
class Receiver:
    """A plain-HTTP aiohttp server on 127.0.0.1 playing the client's redirect_uri."""

    base: str
    hits: list[dict[str, str]] = field(default_factory=list)

    @property
    def callback(self) -> str:
        return self.base + "/cb"

    @property
    def logged_out(self) -> str:
        return self.base + "/logged-out"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver(base="")

    async def cb(request: web.Request) -> web.Response:
        rec.hits.append(dict(request.query))
        return web.Response(
            text=f"<html><body><h1>RECEIVED {request.path}</h1></body></html>",
            content_type="text/html",
        )

    app = web.Application()
    app.router.add_get("/cb", cb)
    app.router.add_get("/logged-out", cb)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.base = f"http://127.0.0.1:{port}"
    try:
        yield rec
    finally:
        await runner.cleanup()


@pytest.fixture
async def op(tmp_path: Path, receiver: Receiver) -> AsyncIterator[RunningOP]:
    running = await start_op(
        tmp_path / "op",
        clients=[
            {
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "redirect_uris": [receiver.callback],
                "post_logout_redirect_uris": [receiver.logged_out],
                "token_endpoint_auth_method": "client_secret_basic",
            }
        ],
        users=USERS,
    )
    try:
        yield running
    finally:
        await running.stop()


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge.rstrip(b"=").decode()


async def discovery(op: RunningOP) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(op.discovery_url, ssl=op.ssl_context()) as resp,
    ):
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return data


def auth_url(
    meta: dict[str, Any], receiver: Receiver, challenge: str | None, **extra: str
) -> tuple[str, str, str]:
    state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    params = {
        "client_id": CLIENT_ID,
        "response_type": "code",
        "scope": "openid email groups profile",
        "redirect_uri": receiver.callback,
        "state": state,
        "nonce": nonce,
    }
    if challenge is not None:
        params |= {"code_challenge": challenge, "code_challenge_method": "S256"}
    params |= extra
    return meta["authorization_endpoint"] + "?" + urlencode(params), state, nonce


def basic_auth(client_id: str, secret: str) -> str:
    """client_secret_basic (RFC 6749 2.3.1: form-urlencode both parts first).
    aiohttp.BasicAuth is deprecated in aiohttp 3.14 (DeprecationWarning = error here)."""
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def b64url_json(part: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return data


# ---------------------------------------------------------------- OP basics


@pytest.mark.e2e
async def test_discovery_over_tls(op: RunningOP) -> None:
    assert op.issuer.startswith("https://127.0.0.1:")
    meta = await discovery(op)
    assert meta["issuer"] == op.issuer
    for key in (
        "authorization_endpoint",
        "token_endpoint",
        "userinfo_endpoint",
        "jwks_uri",
        "end_session_endpoint",
        "revocation_endpoint",
    ):
        assert meta[key].startswith(op.issuer + "/"), key
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert "client_secret_basic" in meta["token_endpoint_auth_methods_supported"]
    assert {"openid", "email", "groups"} <= set(meta["scopes_supported"])
    assert {"email", "email_verified", "groups"} <= set(meta["claims_supported"])
    assert meta["response_types_supported"] == ["code"]
    assert meta["backchannel_logout_supported"] is True
    assert {"RS256", "ES256"} <= set(meta["id_token_signing_alg_values_supported"])

    async with (
        aiohttp.ClientSession() as session,
        session.get(meta["jwks_uri"], ssl=op.ssl_context()) as resp,
    ):
        jwks = await resp.json()
    algs = [k["alg"] for k in jwks["keys"]]
    assert algs[0] == "RS256"
    assert "ES256" in algs
    assert all("d" not in k for k in jwks["keys"])  # public keys only


@pytest.mark.e2e
async def test_tls_is_really_verified(op: RunningOP) -> None:
    """The OP's certificate is only trusted through the throwaway CA."""
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with session.get(op.discovery_url, ssl=ssl.create_default_context()):
                pass
    assert op.ca_file.read_bytes() == op.ca_pem
    assert op.leaf_spki_sha256 in spki_hashes(op.tls.cert_file)


# ---------------------------------------------------------------- full code flow


@pytest.mark.e2e
async def test_authorization_code_flow(op: RunningOP, receiver: Receiver) -> None:
    meta = await discovery(op)
    verifier, challenge = pkce_pair()
    url, state, nonce = auth_url(meta, receiver, challenge)

    async with ScriptedBrowser(op.ssl_context()) as browser:
        login_page = await browser.get(url)
        assert login_page.status == 200
        assert urlsplit(login_page.url).path.startswith("/interaction/")
        form = login_page.login_form()
        assert form is not None
        assert {"login", "password"} <= form.field_names()

        final = await browser.submit_login(login_page, "alice", USERS["alice"].password)
    assert final.status == 200, final.text
    assert final.url.startswith(receiver.callback + "?")
    assert "RECEIVED /cb" in final.text
    query = receiver.hits[-1]
    assert query["state"] == state
    assert query["iss"] == op.issuer
    code = query["code"]

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            meta["token_endpoint"],
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": receiver.callback,
                "code_verifier": verifier,
            },
            headers={"Authorization": basic_auth(CLIENT_ID, CLIENT_SECRET)},
            ssl=op.ssl_context(),
        ) as resp,
    ):
        tokens = await resp.json()
        assert resp.status == 200, tokens
    assert tokens["token_type"].lower() == "bearer"

    # The ID token carries the scope claims (conformIdTokenClaims: false) ...
    claims = b64url_json(tokens["id_token"].split(".")[1])
    assert claims["iss"] == op.issuer
    assert claims["aud"] == CLIENT_ID
    assert claims["sub"] == "alice"
    assert claims["nonce"] == nonce
    assert claims["email"] == "alice@example.com"
    assert claims["email_verified"] is True
    assert claims["groups"] == ["admins", "staff"]
    assert claims["name"] == "Alice"
    assert b64url_json(tokens["id_token"].split(".")[0])["alg"] == "RS256"

    # ... and its signature verifies against the published JWKS.
    async with (
        aiohttp.ClientSession() as session,
        session.get(meta["jwks_uri"], ssl=op.ssl_context()) as resp,
    ):
        keyset = KeySet.import_key_set(await resp.json())
    verified = jwt.decode(tokens["id_token"], keyset, algorithms=["RS256"])
    assert verified.claims["groups"] == ["admins", "staff"]

    async with aiohttp.ClientSession() as session:
        async with session.get(
            meta["userinfo_endpoint"],
            headers={"Authorization": f"Bearer {tokens['access_token']}"},
            ssl=op.ssl_context(),
        ) as resp:
            userinfo = await resp.json()
            assert resp.status == 200, userinfo
        assert userinfo["sub"] == "alice"
        assert userinfo["groups"] == ["admins", "staff"]

        # A code is single-use.
        async with session.post(
            meta["token_endpoint"],
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": receiver.callback,
                "code_verifier": verifier,
            },
            headers={"Authorization": basic_auth(CLIENT_ID, CLIENT_SECRET)},
            ssl=op.ssl_context(),
        ) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "invalid_grant"

        async with session.post(
            meta["revocation_endpoint"],
            data={"token": tokens["access_token"], "token_type_hint": "access_token"},
            headers={"Authorization": basic_auth(CLIENT_ID, CLIENT_SECRET)},
            ssl=op.ssl_context(),
        ) as resp:
            assert resp.status == 200

    # RP-initiated logout: the OP asks, the browser confirms, back to the client.
    logout_url = (
        meta["end_session_endpoint"]
        + "?"
        + urlencode(
            {
                "id_token_hint": tokens["id_token"],
                "post_logout_redirect_uri": receiver.logged_out,
                "state": "bye",
            }
        )
    )
    async with ScriptedBrowser(op.ssl_context()) as browser:
        await browser.login(url, "alice", USERS["alice"].password)
        assert "_session" in browser.cookies.names()
        out = await browser.logout(logout_url)
        assert out.url.startswith(receiver.logged_out), out.text[:500]
        assert receiver.hits[-1]["state"] == "bye"
        assert "_session" not in browser.cookies.names()


@pytest.mark.e2e
async def test_wrong_password_shows_form_again(op: RunningOP, receiver: Receiver) -> None:
    meta = await discovery(op)
    url, _, _ = auth_url(meta, receiver, pkce_pair()[1])
    async with ScriptedBrowser(op.ssl_context()) as browser:
        page = await browser.login(url, "alice", "wrong")
        assert page.status == 200
        assert "Invalid username or password" in page.text
        assert page.login_form() is not None
        assert not receiver.hits
        # unknown user, then the right password on the re-shown form
        page = await browser.submit_login(page, "mallory", "x")
        assert "Invalid username or password" in page.text
        page = await browser.submit_login(page, "bob", USERS["bob"].password)
    assert page.url.startswith(receiver.callback)
    assert "code" in receiver.hits[-1]


@pytest.mark.e2e
async def test_pkce_is_required(op: RunningOP, receiver: Receiver) -> None:
    meta = await discovery(op)
    url, state, _ = auth_url(meta, receiver, None)
    async with ScriptedBrowser(op.ssl_context()) as browser:
        page = await browser.get(url)
    assert page.url.startswith(receiver.callback)
    assert receiver.hits[-1]["error"] == "invalid_request"
    assert receiver.hits[-1]["state"] == state

    url, _, _ = auth_url(meta, receiver, "x" * 43, code_challenge_method="plain")
    async with ScriptedBrowser(op.ssl_context()) as browser:
        await browser.get(url)
    assert receiver.hits[-1]["error"] == "invalid_request"


@pytest.mark.e2e
async def test_wrong_code_verifier_is_rejected(op: RunningOP, receiver: Receiver) -> None:
    meta = await discovery(op)
    _, challenge = pkce_pair()
    url, _, _ = auth_url(meta, receiver, challenge)
    async with ScriptedBrowser(op.ssl_context()) as browser:
        await browser.login(url, "bob", USERS["bob"].password)
    code = receiver.hits[-1]["code"]
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            meta["token_endpoint"],
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": receiver.callback,
                "code_verifier": pkce_pair()[0],
            },
            headers={"Authorization": basic_auth(CLIENT_ID, CLIENT_SECRET)},
            ssl=op.ssl_context(),
        ) as resp,
    ):
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_grant"


@pytest.mark.e2e
async def test_second_login_reuses_op_session(op: RunningOP, receiver: Receiver) -> None:
    meta = await discovery(op)
    async with ScriptedBrowser(op.ssl_context()) as browser:
        first = await browser.login(
            auth_url(meta, receiver, pkce_pair()[1])[0], "alice", "alice-pw"
        )
        assert first.url.startswith(receiver.callback)
        # Already signed in at the OP: no form, straight back with a code.
        second = await browser.get(auth_url(meta, receiver, pkce_pair()[1])[0])
    assert second.url.startswith(receiver.callback)
    assert second.login_form() is None
    assert "code" in receiver.hits[-1]


@pytest.mark.e2e
async def test_stop_leaves_no_process(op: RunningOP) -> None:
    pid = op.pid
    os.kill(pid, 0)
    await op.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    await op.stop()  # idempotent


# ---------------------------------------------------------------- Chromium


@pytest.mark.e2e
@pytest.mark.browser
async def test_chromium_login(op: RunningOP, receiver: Receiver, tmp_path: Path) -> None:
    require(chromium_available(), "node, /usr/bin/chromium, playwright-core")
    meta = await discovery(op)
    url, state, _ = auth_url(meta, receiver, pkce_pair()[1])
    started = time.monotonic()
    result = await run_chromium_login(
        url,
        username="alice",
        password=USERS["alice"].password,
        expect_text="RECEIVED /cb",
        spki=[op.leaf_spki_sha256],
        screenshot=tmp_path / "landed.png",
    )
    elapsed = time.monotonic() - started
    assert result["ok"] is True
    assert result["login_form_seen"] is True
    assert result["final_url"].startswith(receiver.callback + "?")
    assert result["status"] == 200
    assert "RECEIVED /cb" in result["body_text"]
    assert "_session" in result["cookies"]
    assert receiver.hits[-1]["state"] == state
    assert "code" in receiver.hits[-1]
    assert (tmp_path / "landed.png").stat().st_size > 1000
    assert elapsed < 60


@pytest.mark.e2e
@pytest.mark.browser
async def test_chromium_rejects_untrusted_certificate(op: RunningOP, receiver: Receiver) -> None:
    """Without the SPKI allow list Chromium refuses the OP: TLS is really checked."""
    require(chromium_available(), "node, /usr/bin/chromium, playwright-core")
    meta = await discovery(op)
    url, _, _ = auth_url(meta, receiver, pkce_pair()[1])
    result = await run_chromium_login(
        url, username="alice", password="alice-pw", timeout_ms=8000, check=False
    )
    assert result["ok"] is False
    assert "ERR_CERT" in (result.get("error") or "")
    assert not receiver.hits


# ---------------------------------------------------------------- scripted browser units


def test_cookie_jar_host_prefix_rules() -> None:
    jar = BrowserCookieJar()
    url = "https://127.0.0.1:8443/oidc/callback"
    jar.set_from_header("__Host-ok=1; Path=/; Secure; HttpOnly; SameSite=Lax", url)
    jar.set_from_header("__Host-nosecure=1; Path=/", url)
    jar.set_from_header("__Host-domain=1; Path=/; Secure; Domain=127.0.0.1", url)
    jar.set_from_header("__Host-path=1; Path=/oidc; Secure", url)
    jar.set_from_header("__Secure-nosecure=1; Path=/", url)
    jar.set_from_header("plain=1", url)
    assert jar.names() == ["__Host-ok", "plain"]
    assert [reason for _, reason in jar.rejected] == [
        "__Host- cookie without Secure",
        "__Host- cookie with Domain",
        "__Host- cookie without Path=/",
        "__Secure- cookie without Secure",
    ]
    plain = jar.get("plain")
    assert plain is not None
    assert plain.path == "/oidc"  # default-path of /oidc/callback
    assert jar.header_for("https://127.0.0.1:8443/", same_site=True, method="GET") == "__Host-ok=1"
    # Secure cookies never go over plain http to a non-loopback host
    assert jar.header_for("http://app.test/", same_site=True, method="GET") == ""
    # other hosts / ports: host-only cookies are per host, not per port
    assert jar.header_for("https://127.0.0.2/", same_site=True, method="GET") == ""
    assert "__Host-ok=1" in jar.header_for("https://127.0.0.1:9/", same_site=True, method="GET")

    # deletion by Max-Age=0
    jar.set_from_header("__Host-ok=; Path=/; Secure; Max-Age=0", url)
    assert jar.names() == ["plain"]


def test_cookie_jar_same_site_rules() -> None:
    jar = BrowserCookieJar()
    url = "https://app.test/"
    jar.set_from_header("strict=1; Path=/; Secure; SameSite=Strict", url)
    jar.set_from_header("lax=1; Path=/; Secure; SameSite=Lax", url)
    jar.set_from_header("none=1; Path=/; Secure; SameSite=None", url)
    jar.set_from_header("none-insecure=1; Path=/; SameSite=None", url)
    assert jar.names() == ["lax", "none", "strict"]

    def names(header: str) -> set[str]:
        return {p.split("=")[0] for p in header.split("; ") if p}

    assert names(jar.header_for(url, same_site=True, method="POST")) == {"strict", "lax", "none"}
    assert names(jar.header_for(url, same_site=False, method="GET")) == {"lax", "none"}
    assert names(jar.header_for(url, same_site=False, method="POST")) == {"none"}

    jar.set_from_header("evil=1; Domain=other.test; Path=/", "https://app.test/")
    assert "evil" not in jar.names()
    jar.set_from_header("wide=1; Domain=app.test; Path=/", "https://www.app.test/")
    wide = jar.get("wide")
    assert wide is not None
    assert not wide.host_only
    assert "wide=1" in jar.header_for("https://app.test/x", same_site=True, method="GET")


def test_parse_forms_collects_hidden_fields_and_buttons() -> None:
    html = """
      <form id="f" method="post" action="/session/end/confirm">
        <input type="hidden" name="xsrf" value="abc">
      </form>
      <button type="submit" form="f" name="logout" value="yes">Yes</button>
      <form method="get" action="search"><input name="q" value="1">
        <input type="checkbox" name="c" value="on"><input type="submit" name="go"></form>
    """
    forms = parse_forms(html, "https://op.test/session/end?x=1")
    assert forms[0].action == "https://op.test/session/end/confirm"
    assert forms[0].method == "POST"
    assert forms[0].fields == [("xsrf", "abc")]
    assert forms[1].action == "https://op.test/session/search"
    assert forms[1].values({"q": "2"}) == [("q", "2")]


async def test_resolve_maps_test_names(receiver: Receiver) -> None:
    port = urlsplit(receiver.base).port
    async with ScriptedBrowser(resolve={"app.test": "127.0.0.1"}) as browser:
        page = await browser.get(f"http://app.test:{port}/cb?via=name")
        assert page.status == 200
        assert receiver.hits[-1] == {"via": "name"}
        with pytest.raises(aiohttp.ClientConnectorError):
            await browser.get(f"http://unknown.test:{port}/cb")


async def test_redirect_history_and_sec_fetch_site(receiver: Receiver) -> None:
    seen: list[dict[str, str]] = []

    async def hop(request: web.Request) -> web.StreamResponse:
        seen.append({"site": request.headers.get("Sec-Fetch-Site", ""), "path": request.path})
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(text="done", content_type="text/html")
        if n == 2:  # go to another site and come back
            raise web.HTTPFound(f"{receiver.base}/cb?from=hop")
        raise web.HTTPSeeOther(f"/hop/{n - 1}")

    app = web.Application()
    app.router.add_route("*", "/hop/{n}", hop)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://localhost:{runner.addresses[0][1]}"
    try:
        async with ScriptedBrowser(resolve={"localhost": "127.0.0.1"}) as browser:
            page = await browser.post(base + "/hop/3", {"a": "b"})
            assert page.status == 200
            assert page.method == "GET"  # 303 turns the POST into a GET
            assert [urlsplit(u).path for u in page.urls] == ["/hop/3", "/hop/2", "/cb"]
            assert seen == [
                {"site": "none", "path": "/hop/3"},
                {"site": "same-origin", "path": "/hop/2"},
            ]
            assert parse_qs(urlsplit(page.url).query) == {"from": ["hop"]}
            no_follow = await browser.get(base + "/hop/1", follow=False)
            assert no_follow.status == 303
            assert no_follow.location == "/hop/0"
    finally:
        await runner.cleanup()


@pytest.mark.e2e
async def test_op_with_caller_certificate(tmp_path: Path, receiver: Receiver) -> None:
    """start_op(cert_file=, key_file=) serves a certificate made by the caller
    (the demo uses the enforcer's own CA); ca_pem is the chain's CA."""
    tls = make_tls_material(tmp_path / "own", name="idp")
    op = await start_op(
        tmp_path / "op",
        clients=[{"client_id": "c", "client_secret": "s", "redirect_uris": [receiver.callback]}],
        users={},
        cert_file=tls.cert_file,
        key_file=tls.key_file,
    )
    try:
        assert op.ca_pem == tls.ca_pem
        assert (await discovery(op))["issuer"] == op.issuer
    finally:
        await op.stop()


@pytest.mark.e2e
async def test_op_exits_when_parent_dies(tmp_path: Path) -> None:
    """The OP watches its stdin: a parent killed with SIGKILL leaves no OP behind."""
    code = (
        "import asyncio, sys, pathlib\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "from tests.harness.op import start_op\n"
        "async def main():\n"
        f"    op = await start_op(pathlib.Path({str(tmp_path / 'op')!r}), clients=[], users={{}})\n"
        "    print(op.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    assert parent.stdout is not None
    # start_op may take two attempts of READY_TIMEOUT each on a loaded machine (seen in CI: > 30 s)
    line = await asyncio.wait_for(parent.stdout.readline(), 2 * 30 + 15)
    op_pid = int(line)
    os.kill(op_pid, 0)
    parent.kill()
    await parent.wait()
    for _ in range(100):
        try:
            os.kill(op_pid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.05)
    os.kill(op_pid, signal.SIGKILL)
    pytest.fail("OP outlived its parent")


@pytest.mark.e2e
async def test_invalid_client_fails_the_start(tmp_path: Path) -> None:
    """oidc-provider only accepts ASCII client secrets; op.mjs checks clients at start."""
    with pytest.raises(RuntimeError, match="invalid client_secret value"):
        await start_op(
            tmp_path / "op",
            clients=[{"client_id": "c", "client_secret": "sécret", "redirect_uris": []}],
            users={},
        )


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (``from tests import x`` counts as ``tests.x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(filter(None, ["tests", node.module])) if node.level else (node.module or "")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_no_test_module_imports_another_test_module() -> None:
    """Shared test code lives in tests/harness/ (or a helper module): no file imports a ``test_*`` module."""
    offenders = {
        str(path.relative_to(REPO_ROOT)): sorted(
            name
            for name in _imported_modules(path)
            if name.startswith("tests.") and any(part.startswith("test_") for part in name.split("."))
        )
        for path in sorted((REPO_ROOT / "tests").rglob("*.py"))
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_import_check_sees_test_module_imports(tmp_path: Path) -> None:
    """The parser behind the layout check finds absolute, relative and nested imports of test modules."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from tests.test_config import SERVICE\n"
        "from . import test_cli\n"
        "def f():\n"
        "    import tests.test_attacks\n"
    )
    names = _imported_modules(probe)
    assert {"tests.test_config", "tests.test_cli", "tests.test_attacks"} <= names


def test_shared_test_code_lives_in_the_harness_package() -> None:
    """tests/ holds only test modules and conftest.py; every helper module is under tests/harness/."""
    stray = sorted(
        p.name for p in (REPO_ROOT / "tests").glob("*.py")
        if not p.name.startswith("test_") and p.name not in {"__init__.py", "conftest.py"}
    )
    assert stray == []
