"""End to end: a real OpenID Provider (node oidc-provider), the enforcer process over real
TLS, and a real upstream app, exercised by a scripted browser and by headless Chromium."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
import time
import urllib.parse

import aiohttp
import pytest

from tests.harness.chromium import chromium_available, run_chromium_login, spki_hashes
from tests.harness.e2e_stack import HOST, USERS, Stack
from tests.harness.prereq import require

pytestmark = pytest.mark.e2e


def _seen_since(stack: Stack, n: int) -> list:
    return stack.upstream.seen[n:]


async def test_login_then_the_app_sees_the_user(stack: Stack) -> None:
    """A browser is sent to the IdP, signs in, lands on the page it asked for and the app sees who it is."""
    async with stack.browser() as b:
        before = len(stack.upstream.seen)
        page = await stack.login(b, "alice", "/hello?x=1")
        assert page.status == 200, page.text[:500]
        assert page.url == f"{stack.base}/hello?x=1"
        assert json.loads(page.text)["user"] == "alice"
        seen = _seen_since(stack, before)
        assert [s.target for s in seen] == ["/hello?x=1"]
        assert seen[0].header("X-Forwarded-Email") == ["alice@example.com"]
        assert seen[0].header("X-Forwarded-Proto") == ["https"]
        cookie_names = b.cookies.names()
        assert any(n == "__Host-enforcer-app" for n in cookie_names)
        assert not any(n.startswith("__Host-enforcertx-") for n in cookie_names), "transaction cookie deleted"
        assert all("enforcer" not in v for v in seen[0].header("Cookie")), "our cookies never reach the app"


async def test_login_redirect_is_a_correct_authorization_request(stack: Stack) -> None:
    """The 302 to the IdP carries code flow, PKCE S256, state, nonce and the exact redirect_uri, and is not cacheable."""
    async with stack.browser() as b:
        first = await b.get(stack.base + "/somewhere", follow=False)
        assert first.status == 302
        loc = urllib.parse.urlsplit(first.headers["Location"])
        q = urllib.parse.parse_qs(loc.query)
        assert q["response_type"] == ["code"]
        assert q["code_challenge_method"] == ["S256"]
        assert q["redirect_uri"] == [f"https://{HOST}:{stack.port}/oauth2/callback"]
        assert "openid" in q["scope"][0].split()
        assert len(q["state"][0]) >= 43 and len(q["nonce"][0]) >= 43
        assert first.headers["Cache-Control"] == "no-store"
        assert first.headers["Referrer-Policy"] == "no-referrer"
        assert "client_secret" not in first.headers["Location"]


async def test_wrong_tags_get_403_naming_the_reason(stack: Stack) -> None:
    """A signed-in user without the required tags gets a 403 naming the reason and the group tag sets that would
    allow it, but no other person's identifier."""
    async with stack.browser() as b:
        before = len(stack.upstream.seen)
        page = await stack.login(b, "eve", "/")
        assert page.status == 403
        assert "missing_tags" in page.text
        assert "groups=staff" in page.text
        assert "alice@example.com" not in page.text  # (denyPage.show: groups, the default)
        assert "1 more rule(s) allow particular people" in page.text
        assert _seen_since(stack, before) == []
        bob = stack.browser()
        async with bob:
            page = await stack.login(bob, "bob", "/admin/panel")
            assert page.status == 403
            assert "groups=admins" in page.text


async def test_public_endpoint_needs_no_login_and_strips_spoofed_identity(stack: Stack) -> None:
    """A public path is served without a session, and client-sent identity headers never reach the app."""
    async with aiohttp.ClientSession() as http:
        before = len(stack.upstream.seen)
        async with http.get(
            stack.base.replace(HOST, "127.0.0.1") + "/public/info",
            ssl=stack.client_ssl(),
            server_hostname=HOST,
            headers={
                "Host": f"{HOST}:{stack.port}",
                "X-Forwarded-User": "admin",
                "x-forwarded-email": "a@b",
                "X-Remote-User": "root",
                "Forwarded": "for=1.2.3.4",
                "Connection": "X-Forwarded-For",
            },
        ) as r:
            assert r.status == 200
        seen = _seen_since(stack, before)
        assert len(seen) == 1
        assert seen[0].header("X-Forwarded-User") == []
        assert seen[0].header("X-Forwarded-Email") == []
        assert seen[0].header("X-Remote-User") == []
        assert seen[0].header("Forwarded") == []
        assert seen[0].header("X-Forwarded-For") == ["127.0.0.1"]


async def test_api_client_without_session_gets_401_json(stack: Stack) -> None:
    """A non-navigation request without a session gets 401 JSON, no redirect and no transaction cookie."""
    async with stack.browser(headers={"Accept": "application/json", "Sec-Fetch-Mode": "cors"}) as b:
        before = len(stack.upstream.seen)
        r = await b.get(stack.base + "/api/things", follow=False)
        assert r.status == 401
        assert json.loads(r.text)["error"] == "login_required"
        assert "WWW-Authenticate" in r.headers
        assert not r.set_cookies
        assert _seen_since(stack, before) == []


async def test_logout_ends_the_session_server_side(stack: Stack) -> None:
    """Logout clears the cookie, redirects to the IdP's end_session_endpoint, and a replayed old cookie no longer works."""
    async with stack.browser() as b:
        assert (await stack.login(b, "bob", "/")).status == 200
        old = b.cookies.get("__Host-enforcer-app")
        assert old is not None
        r = await b.get(stack.base + "/oauth2/logout", follow=False)
        assert r.status == 302
        loc = r.headers["Location"]
        assert loc.startswith(stack.op.issuer)
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(loc).query)
        assert q["client_id"] == ["app-client"] and "id_token_hint" in q and "state" in q
        assert any("__Host-enforcer-app=;" in c and "Max-Age=0" in c for c in r.set_cookies)
    async with stack.browser() as replay:
        replay.cookies.set_from_header(f"__Host-enforcer-app={old.value}; Path=/; Secure; HttpOnly", stack.base + "/")
        again = await replay.get(stack.base + "/", follow=False)
        assert again.status == 302
        assert again.headers["Location"].startswith(stack.op.issuer)


async def test_two_tabs_log_in_in_parallel(stack: Stack) -> None:
    """Two tabs of one browser start logins at the same time; both pending logins complete and land on their own pages."""
    async with stack.browser() as b:
        tab1, tab2 = await asyncio.gather(b.get(stack.base + "/tab/one"), b.get(stack.base + "/tab/two"))
        assert tab1.login_form() is not None and tab2.login_form() is not None
        assert len([n for n in b.cookies.names() if n.startswith("__Host-enforcertx-")]) == 2
        # The user types the password in one tab, then in the other (an OpenID Provider
        # keeps one session per browser, so simultaneous form posts would race at the IdP).
        done1 = await b.submit_login(tab1, "bob", USERS["bob"].password)
        done2 = await b.submit_login(tab2, "bob", USERS["bob"].password)
        assert (done1.status, done2.status) == (200, 200), (done1.text[:300], done2.text[:300])
        assert {done1.url, done2.url} == {stack.base + "/tab/one", stack.base + "/tab/two"}


async def test_callback_replay_and_forged_state_are_rejected(stack: Stack) -> None:
    """Replaying a used callback URL or forging state fails without creating a session (P-CB-02, P-CB-04)."""
    async with stack.browser() as b:
        page = await stack.login(b, "bob", "/x")
        callback = next(h.url for h in page.history if "/oauth2/callback" in h.url)
    async with stack.browser() as other:
        replay = await other.get(callback, follow=False)
        assert replay.status == 400
        assert "callback_" in replay.text
        assert not any(c.startswith("__Host-enforcer-app=") and "Max-Age=0" not in c for c in replay.set_cookies)
        forged = await other.get(stack.base + "/oauth2/callback?code=abc&state=forged", follow=False)
        assert forged.status == 400
        dup = await other.get(stack.base + "/oauth2/callback?code=a&code=b&state=x", follow=False)
        assert dup.status == 400 and "callback_duplicate_parameter" in dup.text


async def test_session_survives_an_enforcer_restart(stack: Stack) -> None:
    """A user signed in before a restart is still signed in after it (SQLite session store)."""
    async with stack.browser() as b:
        assert (await stack.login(b, "bob", "/before")).status == 200
        await stack.restart()
        after = await b.get(stack.base + "/after", follow=False)
        assert after.status == 200, after.text[:300]


async def test_100_megabytes_stream_both_ways(stack: Stack) -> None:
    """A 100 MB download and a 100 MB upload pass through intact without being buffered whole."""
    async with stack.browser() as b:
        assert (await stack.login(b, "bob", "/")).status == 200
        cookie = b.cookies.header_for(stack.base + "/", same_site=True, method="GET")
    size = 100 << 20
    conn = aiohttp.TCPConnector(ssl=stack.client_ssl(), resolver=_resolver())
    async with aiohttp.ClientSession(connector=conn) as http:
        got = 0
        async with http.get(stack.base + "/big", headers={"Cookie": cookie}) as r:
            assert r.status == 200
            async for chunk in r.content.iter_chunked(1 << 20):
                got += len(chunk)
        assert got == size

        digest = hashlib.sha256()

        async def body():  # type: ignore[no-untyped-def]
            block = bytes(range(256)) * 4096  # 1 MiB
            for _ in range(100):
                digest.update(block)
                yield block

        async with http.post(
            stack.base + "/upload", data=body(), headers={"Cookie": cookie, "Accept": "application/json"}
        ) as r:
            assert r.status == 200, await r.text()
            result = await r.json()
        assert result == {"bytes": size, "sha256": digest.hexdigest()}
    await stack.wait_flow(lambda f: f["path"] == "/big" and f["bytes_out"] == size)
    await stack.wait_flow(lambda f: f["path"] == "/upload" and f["bytes_in"] == size)


async def test_websocket_only_after_login(stack: Stack) -> None:
    """A WebSocket without a session is refused; with a session it is relayed both ways."""
    conn = aiohttp.TCPConnector(ssl=stack.client_ssl(), resolver=_resolver())
    async with aiohttp.ClientSession(connector=conn) as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(stack.base + "/ws")
        assert refused.value.status in (401, 302)
    async with stack.browser() as b:
        assert (await stack.login(b, "bob", "/")).status == 200
        cookie = b.cookies.header_for(stack.base + "/", same_site=True, method="GET")
    conn = aiohttp.TCPConnector(ssl=stack.client_ssl(), resolver=_resolver())
    async with aiohttp.ClientSession(connector=conn) as http:
        ws = await http.ws_connect(stack.base + "/ws", headers={"Cookie": cookie})
        await ws.send_str("hello")
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.data == "echo:hello"
        await ws.close()


async def test_upstream_down_gives_502_and_a_flow(stack: Stack) -> None:
    """When the app is down the user gets a 502 page and a flow record says why."""
    async with stack.browser() as b:
        assert (await stack.login(b, "bob", "/")).status == 200
        port = stack.upstream.port
        await stack.upstream.stop()
        try:
            r = await b.get(stack.base + "/down-test", follow=False)
            assert r.status == 502
            assert "upstream_connect" in r.text
        finally:
            await _restart_upstream(stack, port)
    await stack.wait_flow(lambda f: f["path"] == "/down-test" and f["reason"] == "upstream_connect")


async def test_every_request_gets_exactly_one_flow_record(stack: Stack) -> None:
    """Each request (allowed, denied, rejected) is one JSON line; `enforcer flows` reads them."""
    rows_after = time.time() - 1
    async with stack.browser() as b:
        marker = f"/flowcheck-{time.time_ns()}"
        await b.get(stack.base + marker, follow=False)  # login redirect
        await b.get(stack.base + marker + "/a%2Fb", follow=False)  # 400
    await stack.wait_flow(lambda f: f["path"] == marker)
    await stack.wait_flow(lambda f: f["reason"] == "encoded_separator" and f["start"] > rows_after)
    rows = [f for f in stack.flows() if f["path"] == marker]
    assert len(rows) == 1 and rows[0]["decision"] == "login"
    out = subprocess.run(
        [sys.executable, "-m", "enforcer", "flows", "-c", str(stack.config), "--json", "--service", "app"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert marker in out.stdout
    summary = subprocess.run(
        [sys.executable, "-m", "enforcer", "flows", "-c", str(stack.config), "--summary"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "login_required" in summary.stdout


async def test_admin_endpoints_report_health_and_metrics(stack: Stack) -> None:
    """/healthz, /readyz and /metrics answer on the loopback admin listener."""
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{stack.admin_port}"
        async with http.get(base + "/healthz") as r:
            assert r.status == 200
        async with http.get(base + "/readyz") as r:
            assert r.status == 200
        async with http.get(base + "/metrics") as r:
            text = await r.text()
            assert "enforcer_requests_total" in text
            # the set in force is published: its digest and how many services it has
            assert re.search(r'^enforcer_definitions_info\{digest="[0-9a-f]{16}"\} 1\.0$', text, re.M), text
            assert re.search(r"^enforcer_services 1\.0$", text, re.M)


@pytest.mark.browser
async def test_headless_chromium_logs_in_through_real_redirects(stack: Stack) -> None:
    """Debian's Chromium follows the real redirects, fills the IdP's form and reaches the app over trusted TLS."""
    require(chromium_available(), "chromium or playwright-core")
    leaf = stack.state / "certs" / "app.crt"
    started = time.monotonic()
    result = await run_chromium_login(
        stack.base + "/chromium-page",
        username="alice",
        password=USERS["alice"].password,
        expect_text="chromium-page",
        spki=spki_hashes(leaf, stack.op.tls.cert_file),
        resolve={HOST: "127.0.0.1"},
    )
    elapsed = time.monotonic() - started
    assert result["ok"], result
    assert result["final_url"].startswith(stack.base + "/chromium-page")
    print(f"chromium login round trip: {elapsed:.2f} s (in-page {result.get('elapsed_ms')} ms)")


def _resolver() -> aiohttp.abc.AbstractResolver:
    from tests.harness.browser import StaticResolver  # noqa: PLC0415

    return StaticResolver({HOST: "127.0.0.1"})


async def _restart_upstream(stack: Stack, port: int) -> None:
    from aiohttp import web  # noqa: PLC0415

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", stack.upstream._any)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    stack.upstream.runner = runner


async def test_logs_never_contain_secrets_tokens_or_session_handles(stack: Stack) -> None:
    """X-LOG-02: after logins, the daemon log and the flow log hold no client secret, code, token or session handle."""
    async with stack.browser() as b:
        page = await stack.login(b, "alice", "/secret-check")
        assert page.status == 200
        handle = b.cookies.get("__Host-enforcer-app")
        assert handle is not None
        callback = next(h.url for h in page.history if "/oauth2/callback" in h.url)
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(callback).query)["code"][0]
    await stack.wait_flow(lambda f: f["path"] == "/secret-check")
    secret = (stack.state / "client-secret").read_text()
    texts = {
        "daemon log": (stack.workdir / "enforcer.log").read_text(errors="replace"),
        "flow log": stack.flow_log.read_text(errors="replace"),
    }
    for name, text in texts.items():
        assert secret not in text, f"client secret in the {name}"
        assert handle.value not in text, f"session handle in the {name}"
        assert code not in text, f"authorization code in the {name}"
        assert "eyJ" not in text, f"something JWT-shaped in the {name}"
