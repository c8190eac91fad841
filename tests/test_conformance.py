"""Conformance rows of /work/shared/spec/conformance.md run against the real enforcer.

The enforcer runs in-process (:class:`enforcer.daemon.Daemon` in the test loop) over real
TLS, in front of a recording upstream, and logs in at :class:`tests.harness.fake_op.FakeOP`, an
OpenID Provider that misbehaves on request.  Browser steps use
:class:`tests.harness.browser.ScriptedBrowser`.  Each test names the rows it covers.

Outcome helpers:

* :meth:`Env.assert_reject_cb` -- REJECT-CB: a 4xx (or 502 when the OP itself failed) error
  page with ``Cache-Control: no-store``, no session cookie set, nothing reached the
  upstream, a flow record carrying the reason code;
* :meth:`Env.assert_no_token_request` -- NO-TOKEN-REQ: the OP's token endpoint saw nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yarl
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from enforcer.config import settings as config
from enforcer.flow import FlowRecord
from enforcer.identity import tokens as oidc
from enforcer.identity.oidc import Provider
from enforcer.run import daemon
from tests.harness.browser import Response, ScriptedBrowser
from tests.harness.e2e_stack import Upstream, free_port
from tests.harness.fake_op import DELETE, FakeOP, b64url, compact

pytestmark = pytest.mark.e2e

HOST = "app.test"
OTHER_HOST = "other.test"
SESSION_COOKIE = "__Host-enforcer-app"
TX_PREFIX = "__Host-enforcertx-"
LEEWAY = 60
MAX_AGE = 600
HTTP_TIMEOUT = 1.5

DEFINITIONS = """\
kind: service
name: app
OIDCClientID: app-client
OIDCClientSecret: {{file: {secret}}}
OIDCProviderURL: {issuer}
OIDCCallbackURL: https://{host}:{port}
OIDCScopes: [openid, email, profile, groups]
OIDCCAFile: {ca}
OIDCPostLogoutRedirectURL: https://{host}:{port}/
hosts: [{host}]
port: {app_port}
exposedPort: {port}
exposedAPIs: [[httpresourcespec:name=app]]
identityHeaders: {{groups: X-Forwarded-Groups}}
---
kind: service
name: other
OIDCClientID: other-client
OIDCClientSecret: other-secret-value
OIDCProviderURL: {issuer_b}
OIDCCallbackURL: https://{other}:{port}
OIDCCAFile: {ca_b}
hosts: [{other}]
port: {app_port}
exposedPort: {port}
exposedAPIs: [[httpresourcespec:name=app]]
---
kind: httpresourcespec
name: app
endpoints:
  - {{URI: /public/*, methods: [GET, POST], public: true}}
  - {{URI: /admin/*, methods: [GET, POST], allowedScopes: [[groups=admins]]}}
  - {{URI: /*, methods: [GET, POST], allowedScopes: [[groups=staff], [email=alice@example.com]]}}
"""

CONFIG = """\
listen: {{address: 127.0.0.1, port: {port}}}
admin: {{address: 127.0.0.1, port: 0}}
stateDir: {state}
logsDir: {state}/logs
definitions:
  - file: {state}/definitions.yaml
sessions: {{store: memory}}
oidc: {{leeway: {leeway}s, maxIdTokenAge: {max_age}s, httpTimeout: {timeout}s}}
"""


class QuietDaemon(daemon.Daemon):
    """The real daemon, minus the signal handlers (they belong to pytest here)."""

    def _install_signals(self, loop: asyncio.AbstractEventLoop, flowlog: Any) -> None:
        return None


@dataclass
class Env:
    """The enforcer, two fake OPs (one per service), the upstream and the flow records."""

    op: FakeOP
    op_b: FakeOP
    upstream: Upstream
    daemon: QuietDaemon
    task: asyncio.Task[int]
    port: int
    state: Path
    flows: list[FlowRecord] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"https://{HOST}:{self.port}"

    @property
    def callback(self) -> str:
        return self.base + "/oauth2/callback"

    @property
    def gate(self) -> Any:
        return self.daemon.gate

    def provider(self, service: str = "app") -> Provider:
        p: Provider = self.gate.runtime.providers[service]
        return p

    def client_ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=(self.state / "ca" / "ca.crt").read_text())
        ctx.load_verify_locations(cadata=self.op.ca_pem.decode())
        ctx.load_verify_locations(cadata=self.op_b.ca_pem.decode())
        return ctx

    def browser(self) -> ScriptedBrowser:
        return ScriptedBrowser(self.client_ssl(), resolve={HOST: "127.0.0.1", OTHER_HOST: "127.0.0.1"})

    def reset(self) -> None:
        """A correct OP, fresh discovery and keys, no pending logins, the real clock."""
        self.op.reset()
        self.op_b.reset()
        for p in self.gate.runtime.providers.values():
            p.metadata = None
            p.keys = []
            p.keys_fetched = 0.0
            p.last_error = None
            if hasattr(p, "keys_missed"):
                p.keys_missed = float("-inf")
        self.gate.transactions._items.clear()
        self.gate.clock = time.time
        self.flows.clear()
        self.upstream.seen.clear()

    # ------------------------------------------------------------------ browser steps

    async def start_login(self, b: ScriptedBrowser, path: str = "/") -> tuple[Response, dict[str, str]]:
        """GET a protected path: the 302 to the OP and its query parameters."""
        resp = await b.get(self.base + path, follow=False)
        assert resp.status == 302, (resp.status, resp.text[:300])
        loc = resp.headers["Location"]
        q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(loc).query))
        return resp, q

    async def to_callback(self, b: ScriptedBrowser, path: str = "/") -> str:
        """Start a login and let the OP answer: the callback URL the OP redirects to."""
        resp, _ = await self.start_login(b, path)
        op_resp = await b.get(resp.headers["Location"], follow=False)
        assert op_resp.status == 302, op_resp.text[:300]
        return op_resp.headers["Location"]

    async def login(self, b: ScriptedBrowser, path: str = "/") -> Response:
        """The whole login, following every redirect: the final page."""
        return await b.get(self.base + path)

    def session_value(self, b: ScriptedBrowser) -> str | None:
        c = b.cookies.get(SESSION_COOKIE)
        return c.value if c is not None else None

    # ------------------------------------------------------------------ oracles

    def flow_reasons(self, path: str = "/oauth2/callback") -> list[str]:
        return [f.reason for f in self.flows if f.path == path]

    async def settle(self) -> None:
        await asyncio.sleep(0)

    def assert_no_token_request(self) -> None:
        assert self.op.token_requests() == [], "NO-TOKEN-REQ: the token endpoint was called"

    def assert_reject_cb(self, resp: Response, reason: str | None = None, *, status: int | tuple[int, ...] = 400) -> None:
        """REJECT-CB (see the module docstring)."""
        allowed = (status,) if isinstance(status, int) else status
        assert resp.status in allowed, (resp.status, resp.text[:400])
        assert resp.headers.get("Cache-Control") == "no-store"
        assert "text/html" in resp.headers.get("Content-Type", "")
        for sc in resp.set_cookies:
            name, _, rest = sc.partition("=")
            if name == SESSION_COOKIE:
                assert rest.startswith(";"), f"a session cookie was set: {sc}"
        assert self.upstream.seen == [], "something reached the upstream"
        if reason is not None:
            assert reason in self.flow_reasons(), (reason, [(f.path, f.reason) for f in self.flows])
            assert reason in resp.text
        for secret in (self.op.client_secret, *self.op.issued_access_tokens, *self.op.grants):
            assert secret not in resp.text


async def _start_env(workdir: Path) -> Env:
    op = FakeOP(workdir=workdir / "op-a")
    op_b = FakeOP(workdir=workdir / "op-b", client_id="other-client", client_secret="other-secret-value",
                  sub="user-b", claims={"groups": ["staff"]})
    await op.start()
    await op_b.start()
    upstream = Upstream()
    await upstream.start()
    port = free_port()
    state = workdir / "state"
    state.mkdir(parents=True)
    secret = state / "client-secret"
    secret.write_text(op.client_secret, encoding="utf-8")
    (state / "definitions.yaml").write_text(DEFINITIONS.format(
        secret=secret, issuer=op.issuer, issuer_b=op_b.issuer, host=HOST, other=OTHER_HOST, port=port,
        app_port=upstream.port, ca=op.ca_file, ca_b=op_b.ca_file,
    ))
    cfg = state / "enforcer.yaml"
    cfg.write_text(CONFIG.format(port=port, state=state, leeway=LEEWAY, max_age=MAX_AGE, timeout=HTTP_TIMEOUT))
    d = QuietDaemon(config.load_settings(cfg))
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.get_running_loop().create_task(d.run(on_ready=ready))
    done, _ = await asyncio.wait({ready, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    assert ready.done(), "enforcer did not start"
    env = Env(op=op, op_b=op_b, upstream=upstream, daemon=d, task=task, port=port, state=state)
    flowlog = d.gate.flowlog
    original = flowlog.write

    def record(rec: FlowRecord) -> None:
        env.flows.append(rec)
        original(rec)

    flowlog.write = record
    return env


@pytest_asyncio.fixture(scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    """One in-process enforcer with its fake OPs for the whole module."""
    env = await _start_env(tmp_path_factory.mktemp("conformance"))
    try:
        yield env
    finally:
        env.daemon.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(env.task, 30)
        await env.op.stop()
        await env.op_b.stop()
        await env.upstream.stop()


@pytest_asyncio.fixture
async def env(running: Env) -> AsyncIterator[Env]:
    """The module's enforcer, reset to a correct OP for this test."""
    running.reset()
    yield running


@pytest_asyncio.fixture
async def browser(env: Env) -> AsyncIterator[ScriptedBrowser]:
    """A fresh browser (empty cookie jar) for this test."""
    async with env.browser() as b:
        yield b


# ---------------------------------------------------------------------------------------------
# helpers to craft tokens


def rsa_sign_raw(op: FakeOP, header: bytes, payload: bytes) -> str:
    """RS256 over arbitrary header/payload bytes with the OP's real key (for duplicate members)."""
    key = op.rsa.private_key
    assert isinstance(key, rsa.RSAPrivateKey)
    signing_input = f"{b64url(header)}.{b64url(payload)}".encode()
    sig = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return signing_input.decode() + "." + b64url(sig)


def claims_json(claims: dict[str, Any]) -> bytes:
    return json.dumps(claims).encode()


async def run_login(env: Env, b: ScriptedBrowser, path: str = "/") -> Response:
    """Browser login with whatever the OP is set to do: the page the browser ends on."""
    return await env.login(b, path)


async def expect_reject(env: Env, b: ScriptedBrowser, reason: str | None, *,
                        status: int | tuple[int, ...] = 400) -> Response:
    resp = await run_login(env, b)
    env.assert_reject_cb(resp, reason, status=status)
    assert env.session_value(b) is None
    return resp


# =============================================================================================
# happy path and the authorization request (P-AR-*)


async def test_P_CB_15_successful_login_sets_a_new_session_and_lands_on_the_return_url(env: Env, browser: ScriptedBrowser) -> None:
    """P-CB-15 / rp-response_type-code / rp-id_token-sig-rs256: a correct OP gives a session, a 302 back to the stored URL and the app sees the user."""
    page = await run_login(env, browser, "/hello?x=1")
    assert page.status == 200, page.text[:300]
    assert page.url == env.base + "/hello?x=1"
    cb = next(h for h in page.history if h.url.startswith(env.callback))
    assert cb.status == 302
    assert cb.headers["Location"] == env.base + "/hello?x=1"
    assert cb.headers["Cache-Control"] == "no-store"
    assert cb.headers["Referrer-Policy"] == "no-referrer"
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(cb.url).query)["code"][0]
    assert code not in cb.text
    assert any(sc.startswith(SESSION_COOKIE + "=") and not sc.startswith(SESSION_COOKIE + "=;") for sc in cb.set_cookies)
    assert any(sc.startswith(TX_PREFIX) and "Max-Age=0" in sc for sc in cb.set_cookies), "tx cookie deleted"
    assert not any(n.startswith(TX_PREFIX) for n in browser.cookies.names())
    assert [s.target for s in env.upstream.seen] == ["/hello?x=1"]
    assert env.upstream.seen[0].header("X-Forwarded-User") == ["alice"]
    assert "login_success" in env.flow_reasons()


async def test_P_AR_01_authorization_request_is_exact(env: Env, browser: ScriptedBrowser) -> None:
    """P-AR-01: the 302 goes to the metadata authorization_endpoint with exactly the required parameters."""
    resp, q = await env.start_login(browser, "/x")
    loc = urllib.parse.urlsplit(resp.headers["Location"])
    assert f"{loc.scheme}://{loc.netloc}{loc.path}" == env.op.url("/authorize")
    assert set(q) == {"response_type", "client_id", "redirect_uri", "scope", "state", "nonce",
                      "code_challenge", "code_challenge_method"}
    assert q["response_type"] == "code"
    assert q["client_id"] == "app-client"
    assert q["redirect_uri"] == env.callback
    assert "openid" in q["scope"].split()
    assert q["code_challenge_method"] == "S256"
    assert env.upstream.seen == []


async def test_P_AR_02_state_nonce_and_verifier_are_unique_and_long(env: Env, browser: ScriptedBrowser) -> None:
    """P-AR-02: many logins give distinct, high-entropy state, nonce and PKCE verifiers."""
    states, nonces, verifiers = set(), set(), set()
    for _ in range(200):
        _, q = await env.start_login(browser)
        states.add(q["state"])
        nonces.add(q["nonce"])
        assert len(q["state"]) >= 43 and len(q["nonce"]) >= 43  # >= 256 bits of token_urlsafe
    for txn in env.gate.transactions._items.values():
        verifiers.add(txn.code_verifier)
        assert 43 <= len(txn.code_verifier) <= 128
        assert set(txn.code_verifier) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
    assert len(states) == len(nonces) == 200
    assert len(verifiers) == len(env.gate.transactions._items)
    assert not (states & nonces)


async def test_P_AR_03_P_TOK_02_challenge_matches_verifier_and_token_request_is_correct(env: Env, browser: ScriptedBrowser) -> None:
    """P-AR-03 / P-TOK-02: the OP recomputes S256 from the verifier; the token request is a form POST with the exact redirect_uri."""
    _, q = await env.start_login(browser)
    page = await run_login(env, browser)
    assert page.status == 200
    (req,) = env.op.token_requests()
    assert req.method == "POST"
    assert req.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    form = req.form()
    assert form["grant_type"] == ["authorization_code"]
    assert form["redirect_uri"] == [env.callback]
    verifier = form["code_verifier"][0]
    authz = env.op.seen("/authorize")[-1].query
    assert authz["code_challenge"] == [b64url(hashlib.sha256(verifier.encode()).digest())]
    assert q["code_challenge"] != authz["code_challenge"][0]  # a fresh transaction each login


async def test_P_TOK_01_client_secret_basic_is_form_encoded_and_not_repeated(env: Env, browser: ScriptedBrowser) -> None:
    """P-TOK-01 / rp-token_endpoint-client_secret_basic: Basic auth of form-encoded id and secret, no secret in the body."""
    page = await run_login(env, browser)
    assert page.status == 200
    (req,) = env.op.token_requests()
    raw = base64.b64decode(req.headers["Authorization"][6:]).decode()
    cid, _, secret = raw.partition(":")
    assert urllib.parse.unquote_plus(cid) == "app-client"
    assert urllib.parse.unquote_plus(secret) == env.op.client_secret
    assert "client_secret" not in req.form() and "client_id" not in req.form()


async def test_P_AR_04_plain_only_metadata_still_gets_S256(env: Env, browser: ScriptedBrowser) -> None:
    """P-AR-04: metadata listing only 'plain' (or nothing) never downgrades PKCE."""
    for methods in (["plain"], DELETE):
        env.reset()
        env.op.behaviour.discovery_overrides = {"code_challenge_methods_supported": methods}
        _, q = await env.start_login(browser)
        assert q["code_challenge_method"] == "S256"


async def test_P_AR_05_P_CB_07_op_ignoring_pkce_still_fails_on_injected_code(env: Env) -> None:
    """P-AR-05 / P-CB-07: a victim's code pasted into the attacker's transaction fails (PKCE, or nonce when the OP ignores PKCE)."""
    for check_pkce, reason in ((True, "token_invalid_grant"), (False, "id_token_bad_nonce")):
        env.reset()
        env.op.behaviour.check_pkce = check_pkce
        async with env.browser() as victim, env.browser() as attacker:
            victim_cb = await env.to_callback(victim)
            attacker_cb = await env.to_callback(attacker)
            stolen = urllib.parse.parse_qs(urllib.parse.urlsplit(victim_cb).query)["code"][0]
            q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(attacker_cb).query))
            q["code"] = stolen
            resp = await attacker.get(env.callback + "?" + urllib.parse.urlencode(q), follow=False)
            env.assert_reject_cb(resp, reason)
            assert env.session_value(attacker) is None


async def test_P_AR_06_redirect_uri_never_comes_from_request_headers(env: Env, browser: ScriptedBrowser) -> None:
    """P-AR-06: spoofed X-Forwarded-Host / Forwarded do not change redirect_uri; a foreign Host is refused."""
    resp = await browser.request("GET", env.base + "/x", follow=False,
                                 headers={"X-Forwarded-Host": "evil.example", "Forwarded": "host=evil.example"})
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(resp.headers["Location"]).query))
    assert q["redirect_uri"] == env.callback
    resp = await browser.request("GET", env.base + "/x", follow=False, headers={"Host": "evil.example"})
    assert resp.status in (400, 421)
    assert env.op.seen("/authorize") == []


async def test_P_AR_07_S_CK_02_login_redirect_headers_and_transaction_cookie(env: Env, browser: ScriptedBrowser) -> None:
    """P-AR-07 / S-CK-02 / S-CK-09: the login redirect is no-store, no-referrer, and the tx cookie is __Host-, Secure, HttpOnly, Lax, short-lived."""
    resp, _ = await env.start_login(browser)
    h = resp.headers
    assert h["Cache-Control"] == "no-store"
    assert h["Referrer-Policy"] == "no-referrer"
    assert h["X-Content-Type-Options"] == "nosniff"
    assert "frame-ancestors 'none'" in h["Content-Security-Policy"]
    assert h["Strict-Transport-Security"].startswith("max-age=31536000")
    assert "client_secret" not in h["Location"] and env.op.client_secret not in h["Location"]
    (tx,) = [sc for sc in resp.set_cookies if sc.startswith(TX_PREFIX)]
    attrs = [a.strip() for a in tx.split(";")]
    assert {"Path=/", "Secure", "HttpOnly", "SameSite=Lax"} <= set(attrs)
    assert not any(a.lower().startswith("domain") for a in attrs)
    max_age = int(next(a for a in attrs if a.startswith("Max-Age=")).split("=")[1])
    assert 0 < max_age <= 600
    for txn in env.gate.transactions._items.values():
        assert txn.code_verifier not in h["Location"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Accept": "application/json"},
        {"Sec-Fetch-Mode": "cors"},
        {"X-Requested-With": "XMLHttpRequest"},
        {"Sec-Fetch-Dest": "empty"},
    ],
)
async def test_P_AR_08_api_requests_get_401_without_a_transaction(env: Env, browser: ScriptedBrowser, headers: dict[str, str]) -> None:
    """P-AR-08: non-navigation requests get a 401, no transaction and no cookie."""
    resp = await browser.request("GET", env.base + "/api", follow=False, headers=headers)
    assert resp.status == 401
    assert "WWW-Authenticate" in resp.headers
    assert resp.set_cookies == []
    assert len(env.gate.transactions) == 0
    assert env.upstream.seen == []


async def test_P_AR_09_pending_logins_per_browser_are_capped(env: Env, browser: ScriptedBrowser) -> None:
    """P-AR-09: 50 navigations leave at most 5 transaction cookies and a small Cookie header."""
    for _ in range(50):
        await env.start_login(browser)
    tx = [n for n in browser.cookies.names() if n.startswith(TX_PREFIX)]
    assert len(tx) <= 5
    assert len(browser.cookies.header_for(env.base + "/", same_site=True, method="GET")) < 4096


async def test_P_AR_10_two_tabs_can_both_complete(env: Env, browser: ScriptedBrowser) -> None:
    """P-AR-10: two concurrent logins in one browser both complete (per-transaction cookies)."""
    cb1 = await env.to_callback(browser, "/one")
    cb2 = await env.to_callback(browser, "/two")
    r2 = await browser.get(cb2, follow=False)
    r1 = await browser.get(cb1, follow=False)
    assert r2.status == 302 and r2.headers["Location"] == env.base + "/two"
    assert r1.status == 302 and r1.headers["Location"] == env.base + "/one"


async def test_P_AR_11_no_request_objects_or_other_response_modes(env: Env, browser: ScriptedBrowser) -> None:
    """P-AR-11: even when the OP advertises request objects, only response_type=code is sent, no request/response_mode."""
    env.op.behaviour.discovery_overrides = {"request_parameter_supported": True,
                                            "response_modes_supported": ["form_post", "query"]}
    _, q = await env.start_login(browser)
    assert q["response_type"] == "code"
    assert not {"request", "request_uri", "response_mode"} & set(q)


# =============================================================================================
# callback handling (P-CB-*)


def _with(url: str, **changes: Any) -> str:
    """The callback URL with parameters replaced (None removes; a list repeats)."""
    parts = urllib.parse.urlsplit(url)
    q = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    out: list[tuple[str, str]] = [(k, v) for k, v in q if k not in changes]
    for k, v in changes.items():
        if v is None:
            continue
        if isinstance(v, list):
            out.extend((k, x) for x in v)
        else:
            out.append((k, v))
    return parts._replace(query=urllib.parse.urlencode(out)).geturl()


async def test_P_CB_01_missing_state_is_rejected(env: Env, browser: ScriptedBrowser) -> None:
    """P-CB-01 / fapi2 missing-state: a callback with a valid code and no state is REJECT-CB, NO-TOKEN-REQ."""
    cb = await env.to_callback(browser)
    resp = await browser.get(_with(cb, state=None), follow=False)
    env.assert_reject_cb(resp, "callback_no_state")
    env.assert_no_token_request()


async def test_P_CB_02_forged_state_is_rejected(env: Env, browser: ScriptedBrowser) -> None:
    """P-CB-02 / fapi2 invalid-state: an unknown state is REJECT-CB, NO-TOKEN-REQ."""
    cb = await env.to_callback(browser)
    resp = await browser.get(_with(cb, state="forged-" + "A" * 40), follow=False)
    env.assert_reject_cb(resp, "callback_unknown_state")
    env.assert_no_token_request()
    env.op.behaviour.authorize_overrides = {"state": "other-state"}
    resp = await run_login(env, browser)
    env.assert_reject_cb(resp, "callback_unknown_state")
    env.assert_no_token_request()


async def test_P_CB_03_login_csrf_victim_lacks_the_binding(env: Env) -> None:
    """P-CB-03: the attacker's callback URL opened in the victim's browser is REJECT-CB, NO-TOKEN-REQ, and the victim is not logged in."""
    async with env.browser() as attacker, env.browser() as victim:
        cb = await env.to_callback(attacker)
        resp = await victim.get(cb, follow=False)
        env.assert_reject_cb(resp, "callback_not_bound")
        env.assert_no_token_request()
        assert env.session_value(victim) is None


async def test_P_CB_04_replayed_callback_in_same_browser(env: Env, browser: ScriptedBrowser) -> None:
    """P-CB-04: replaying a used callback URL is REJECT-CB with no second token request, and the session is unchanged."""
    cb = await env.to_callback(browser)
    first = await browser.get(cb, follow=False)
    assert first.status == 302
    handle = env.session_value(browser)
    assert handle
    env.upstream.seen.clear()
    resp = await browser.get(cb, follow=False)
    env.assert_reject_cb(resp, "callback_unknown_state")
    assert len(env.op.token_requests()) == 1
    assert env.session_value(browser) == handle
    page = await browser.get(env.base + "/still", follow=False)
    assert page.status == 200, "P-CB-16: the existing session survives a failed callback"


async def test_P_CB_05_callback_replayed_in_another_browser(env: Env) -> None:
    """P-CB-05: a leaked callback URL replayed in another browser is REJECT-CB, NO-TOKEN-REQ."""
    async with env.browser() as a, env.browser() as other:
        cb = await env.to_callback(a)
        resp = await other.get(cb, follow=False)
        env.assert_reject_cb(resp, "callback_not_bound")
        env.assert_no_token_request()
        ok = await a.get(cb, follow=False)  # the binding failure consumed the transaction
        env.upstream.seen.clear()
        env.assert_reject_cb(ok, "callback_unknown_state")
        env.assert_no_token_request()


async def test_P_CB_06_expired_transaction(env: Env, browser: ScriptedBrowser) -> None:
    """P-CB-06: a callback after the transaction TTL is REJECT-CB, NO-TOKEN-REQ, and offers a fresh login link."""
    cb = await env.to_callback(browser)
    real = time.time
    env.gate.clock = lambda: real() + 601
    resp = await browser.get(cb, follow=False)
    env.assert_reject_cb(resp, "callback_unknown_state")
    env.assert_no_token_request()
    assert f"href='{env.base}/'" in resp.text


@pytest.mark.parametrize("param", ["code", "state", "iss", "error"])
async def test_P_CB_08_duplicate_parameters(env: Env, browser: ScriptedBrowser, param: str) -> None:
    """P-CB-08: any callback parameter given twice is a 400, NO-TOKEN-REQ."""
    cb = await env.to_callback(browser)
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(cb).query))
    first = q.get(param, "access_denied")
    resp = await browser.get(_with(cb, **{param: [first, first + "x"]}), follow=False)
    env.assert_reject_cb(resp, "callback_duplicate_parameter")
    env.assert_no_token_request()


async def test_P_CB_09_error_response_is_escaped_and_consumes_the_transaction(env: Env, browser: ScriptedBrowser) -> None:
    """P-CB-09: an error response shows the escaped error code, not the description, and consumes the transaction."""
    cb = await env.to_callback(browser)
    bad = _with(cb, code=None, error="<script>alert(1)</script>", error_description="<script>x()</script>")
    resp = await browser.get(bad, follow=False)
    env.assert_reject_cb(resp, "idp_error", status=403)
    assert "<script>" not in resp.text
    assert "x()" not in resp.text
    env.assert_no_token_request()
    assert len(env.gate.transactions) == 0
    resp = await browser.get(_with(cb, state="nope", code=None, error="access_denied",
                                   error_description="<b>secret</b>"), follow=False)
    env.assert_reject_cb(resp, "callback_unknown_state")
    assert "secret" not in resp.text


async def test_P_CB_10_error_and_code_together_is_an_error(env: Env, browser: ScriptedBrowser) -> None:
    """P-CB-10: a callback carrying both error and code is treated as an error, NO-TOKEN-REQ."""
    cb = await env.to_callback(browser)
    resp = await browser.get(_with(cb, error="access_denied"), follow=False)
    env.assert_reject_cb(resp, "idp_error", status=403)
    env.assert_no_token_request()


async def test_P_CB_11_post_callback_and_fragment_only_code_are_rejected(env: Env, browser: ScriptedBrowser) -> None:
    """P-CB-11: a form-post callback (query mode requested) and a fragment-only code are rejected, NO-TOKEN-REQ."""
    cb = await env.to_callback(browser)
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(cb).query))
    resp = await browser.post(env.callback, q, follow=False, referrer=env.op.issuer + "/authorize")
    env.assert_reject_cb(resp, "callback_method", status=405)
    frag = env.callback + "?" + urllib.parse.urlencode({"state": q["state"], "iss": q["iss"]}) + "#code=" + q["code"]
    resp = await browser.get(frag, follow=False)
    env.assert_reject_cb(resp, "callback_no_code")
    env.assert_no_token_request()


async def test_P_CB_12_neither_code_nor_error(env: Env, browser: ScriptedBrowser) -> None:
    """P-CB-12: a callback with neither code nor error is a 400, NO-TOKEN-REQ."""
    cb = await env.to_callback(browser)
    resp = await browser.get(_with(cb, code=None), follow=False)
    env.assert_reject_cb(resp, "callback_no_code")
    env.assert_no_token_request()


async def test_P_CB_13_oversized_parameters(env: Env, browser: ScriptedBrowser) -> None:
    """P-CB-13: a 64 KiB code or state is refused with 4xx and NO-TOKEN-REQ."""
    cb = await env.to_callback(browser)
    for change in ({"code": "A" * 65536}, {"state": "S" * 65536}):
        resp = await browser.get(_with(cb, **change), follow=False)
        assert 400 <= resp.status < 500, resp.status
        assert env.session_value(browser) is None
    env.assert_no_token_request()
    assert env.upstream.seen == []


@pytest.mark.parametrize(
    "path", ["/oauth2/callback/", "/OAuth2/callback", "/oauth2/callback;x", "/oauth2/callback%2F", "//oauth2/callback"]
)
async def test_P_CB_14_callback_path_variants_are_not_callbacks(env: Env, browser: ScriptedBrowser, path: str) -> None:
    """P-CB-14: callback path look-alikes are neither processed as the callback nor forwarded unauthenticated."""
    cb = await env.to_callback(browser)
    query = urllib.parse.urlsplit(cb).query
    resp = await browser.get(env.base + path + "?" + query, follow=False)
    assert resp.status in (302, 400, 404), resp.status
    if resp.status == 302:
        assert resp.headers["Location"].startswith(env.op.url("/authorize")), "only a fresh login"
    env.assert_no_token_request()
    assert env.upstream.seen == []
    assert "callback_" not in "".join(env.flow_reasons(path))


async def test_P_CB_14_dot_segment_callback_is_the_callback(env: Env, browser: ScriptedBrowser) -> None:
    """P-CB-14: /x/../oauth2/callback is a 400 (exact redirect_uri matching) and leaves the transaction usable."""
    cb = await env.to_callback(browser)
    url = yarl.URL(env.base + "/x/../oauth2/callback?" + urllib.parse.urlsplit(cb).query, encoded=True)
    cookie = browser.cookies.header_for(env.callback, same_site=False, method="GET")
    async with browser._get_session().get(url, headers={"Cookie": cookie, "Accept": "text/html"},
                                          allow_redirects=False) as raw:
        resp = Response(raw.status, str(url), dict(raw.headers), await raw.text(),
                        set_cookies=raw.headers.getall("Set-Cookie", []))
    env.assert_reject_cb(resp, "callback_path_not_exact")
    env.assert_no_token_request()
    ok = await browser.get(cb, follow=False)
    assert ok.status == 302 and env.session_value(browser)


async def test_P_CB_16_failed_callback_keeps_existing_session(env: Env, browser: ScriptedBrowser) -> None:
    """P-CB-16: a bad callback arriving while signed in does not destroy the session and is no 500."""
    assert (await run_login(env, browser)).status == 200
    handle = env.session_value(browser)
    resp = await browser.get(env.callback + "?state=zzz&code=zzz", follow=False)
    assert resp.status == 400
    assert env.session_value(browser) == handle
    assert (await browser.get(env.base + "/again", follow=False)).status == 200


async def test_P_CB_17_simultaneous_callbacks_single_flight(env: Env, browser: ScriptedBrowser) -> None:
    """P-CB-17: two simultaneous requests to one callback URL make at most one token request and one session."""
    env.op.behaviour.token_delay = 0.3
    cb = await env.to_callback(browser)
    async with env.browser() as twin:
        for c in browser.cookies:
            twin.cookies.set_from_header(f"{c.name}={c.value}; Path=/; Secure; HttpOnly", env.base + "/")
        r1, r2 = await asyncio.gather(browser.get(cb, follow=False), twin.get(cb, follow=False))
    assert sorted([r1.status, r2.status]) == [302, 400]
    assert len(env.op.token_requests()) == 1
    assert sum(1 for f in env.flows if f.reason == "login_success") == 1


# =============================================================================================
# mix-up (P-MIX-*)


async def test_P_MIX_01_missing_iss_when_advertised(env: Env, browser: ScriptedBrowser) -> None:
    """P-MIX-01 / fapi2 remove-authorization-response-iss: no iss while the metadata promises it is REJECT-CB, NO-TOKEN-REQ."""
    env.op.behaviour.send_iss = False
    await expect_reject(env, browser, "callback_iss_missing")
    env.assert_no_token_request()


@pytest.mark.parametrize("mangle", [
    lambda i: "https://evil.example",
    lambda i: i + "/",
    lambda i: i.replace("127.0.0.1", "127.0.0.1:443"),
    lambda i: i.replace("https", "HTTPS"),
    lambda i: urllib.parse.quote(i, safe=""),
])
async def test_P_MIX_02_P_MIX_03_wrong_or_lookalike_iss(env: Env, browser: ScriptedBrowser, mangle: Callable[[str], str]) -> None:
    """P-MIX-02 / P-MIX-03 / fapi2 invalid-authorization-response-iss: an iss that is not exactly the issuer is REJECT-CB, NO-TOKEN-REQ."""
    env.op.behaviour.iss_value = mangle(env.op.issuer)
    await expect_reject(env, browser, "callback_iss_mismatch")
    env.assert_no_token_request()


async def test_P_MIX_04_not_advertised_compare_when_present(env: Env, browser: ScriptedBrowser) -> None:
    """P-MIX-04: without the metadata flag, a missing iss is fine, a correct one accepted, a wrong one rejected."""
    env.op.behaviour.discovery_overrides = {"authorization_response_iss_parameter_supported": DELETE}
    env.op.behaviour.send_iss = False
    assert (await run_login(env, browser, "/a")).status == 200
    async with env.browser() as b2:
        env.op.behaviour.send_iss = True
        assert (await run_login(env, b2, "/b")).status == 200
    async with env.browser() as b3:
        env.upstream.seen.clear()
        env.op.requests.clear()
        env.op.behaviour.iss_value = "https://evil.example"
        await expect_reject(env, b3, "callback_iss_mismatch")
        env.assert_no_token_request()


async def test_P_MIX_05_error_response_with_wrong_iss(env: Env, browser: ScriptedBrowser) -> None:
    """P-MIX-05: an error response with a wrong iss gets a generic error that does not show the OP's error."""
    env.op.behaviour.iss_value = "https://evil.example"
    env.op.behaviour.authorize_overrides = {"code": DELETE, "error": "evil_error_text"}
    resp = await expect_reject(env, browser, "callback_iss_mismatch")
    assert "evil_error_text" not in resp.text


async def test_P_MIX_06_transaction_of_one_issuer_cannot_finish_at_another(env: Env, browser: ScriptedBrowser) -> None:
    """P-MIX-06: a callback for service A carrying OP-B's code and iss (and a state from OP-B's service) is rejected, no token request at either OP."""
    other_base = f"https://{OTHER_HOST}:{env.port}"
    resp = await browser.get(other_base + "/x", follow=False)
    op_b_resp = await browser.get(resp.headers["Location"], follow=False)
    cb_b = op_b_resp.headers["Location"]
    assert cb_b.startswith(other_base)
    moved = env.callback + "?" + urllib.parse.urlsplit(cb_b).query
    r = await browser.get(moved, follow=False)
    env.assert_reject_cb(r, "callback_unknown_state")
    env.assert_no_token_request()
    assert env.op_b.token_requests() == []


async def test_P_MIX_07_S_ID_05_sessions_are_bound_to_their_service(env: Env, browser: ScriptedBrowser) -> None:
    """P-MIX-07 / S-ID-05: a session cookie of service app is not accepted by service other (different issuer)."""
    assert (await run_login(env, browser)).status == 200
    handle = env.session_value(browser)
    assert handle
    other_base = f"https://{OTHER_HOST}:{env.port}"
    async with env.browser() as b2:
        b2.cookies.set_from_header(f"__Host-enforcer-other={handle}; Path=/; Secure", other_base + "/")
        resp = await b2.get(other_base + "/x", follow=False)
        assert resp.status == 302 and resp.headers["Location"].startswith(env.op_b.url("/authorize"))
    assert env.upstream.seen[-1].target == "/"


# =============================================================================================
# token endpoint (P-TOK-*)


async def test_P_TOK_03_http_token_endpoint_is_refused(env: Env, browser: ScriptedBrowser) -> None:
    """P-TOK-03 / P-JWKS-08: an http:// token endpoint makes discovery fail closed: no login starts."""
    env.op.behaviour.discovery_overrides = {"token_endpoint": env.op.url("/token").replace("https", "http")}
    resp = await browser.get(env.base + "/", follow=False)
    assert resp.status == 503 and "idp_unavailable" in resp.text
    assert env.op.seen("/authorize") == []


async def test_P_TOK_03_token_redirect_is_not_followed(env: Env, browser: ScriptedBrowser) -> None:
    """P-TOK-03: a 307 from the token endpoint is not followed, credentials are not re-sent, REJECT-CB."""
    env.op.behaviour.token_redirect = env.op.url("/stolen")
    await expect_reject(env, browser, None)
    assert env.op.seen("/stolen") == []
    assert len(env.op.token_requests()) == 1


@pytest.mark.parametrize(("status", "body", "reason"), [
    (400, {"error": "invalid_grant"}, "token_invalid_grant"),
    (401, {"error": "invalid_client"}, "token_invalid_client"),
    (500, {"error": "server_error"}, "token_server_error"),
    (503, None, "token_unknown"),
])
async def test_P_TOK_04_05_06_token_errors(env: Env, browser: ScriptedBrowser, status: int, body: Any, reason: str) -> None:
    """P-TOK-04 / P-TOK-05 / P-TOK-06: token endpoint errors end in REJECT-CB with one request and no retry."""
    env.op.behaviour.token_raw = json.dumps(body).encode() if body is not None else b"<html>down</html>"
    env.op.behaviour.token_status = status
    await expect_reject(env, browser, reason, status=(400, 502))
    assert len(env.op.token_requests()) == 1
    assert env.op.seen("/userinfo") == []


async def test_P_TOK_06_token_timeout_is_bounded_and_loop_keeps_serving(env: Env, browser: ScriptedBrowser) -> None:
    """P-TOK-06: a token endpoint that hangs fails closed within the client timeout while other requests are served."""
    env.op.behaviour.token_delay = 10
    cb = await env.to_callback(browser)
    started = time.monotonic()
    async with env.browser() as other:
        pending = asyncio.ensure_future(browser.get(cb, follow=False))
        await asyncio.sleep(0.2)
        quick = await other.get(env.base + "/public/x", follow=False)
        assert quick.status == 200 and not pending.done()
        resp = await pending
    assert time.monotonic() - started < HTTP_TIMEOUT + 3
    env.upstream.seen.clear()
    env.assert_reject_cb(resp, "token_unreachable", status=502)


@pytest.mark.parametrize(("raw", "ctype", "reason"), [
    (b"<html>hi</html>", "text/html", "token_"),
    (b"", "application/json", "token_invalid_json"),
    (b"not json", "application/json", "token_invalid_json"),
    (b"[1,2]", "application/json", "token_invalid_json"),
    ("\ufeff{}".encode(), "application/json", "token_invalid_json"),
    (b'{"access_token":"a","token_type":"Bearer","id_token":"x.y.z"}', "text/html", "token_"),
])
async def test_P_TOK_07_non_json_token_responses(env: Env, browser: ScriptedBrowser, raw: bytes, ctype: str, reason: str) -> None:
    """P-TOK-07: a 200 with HTML, empty, non-JSON, array, BOM or the wrong Content-Type is REJECT-CB."""
    env.op.behaviour.token_raw = raw
    env.op.behaviour.token_content_type = ctype
    resp = await expect_reject(env, browser, None, status=(400, 502))
    assert any(r.startswith(reason) for r in env.flow_reasons()), env.flow_reasons()
    assert env.op.seen("/userinfo") == []
    assert resp.status != 500


@pytest.mark.parametrize(("member", "reason"), [
    ("id_token", "token_no_id_token"), ("access_token", "token_no_access_token"), ("token_type", "token_no_token_type"),
])
async def test_P_TOK_08_09_missing_members(env: Env, browser: ScriptedBrowser, member: str, reason: str) -> None:
    """P-TOK-08 / P-TOK-09: a token response without id_token, access_token or token_type is REJECT-CB."""
    env.op.behaviour.token_overrides = {member: DELETE}
    await expect_reject(env, browser, reason, status=(400, 502))


@pytest.mark.parametrize("token_type", ["bearer", "BEARER", "bEARER"])
async def test_P_TOK_10_token_type_is_case_insensitive(env: Env, browser: ScriptedBrowser, token_type: str) -> None:
    """P-TOK-10 / fapi2 token-type-case-insensitivity: any case of Bearer is accepted and used at UserInfo."""
    env.op.behaviour.token_overrides = {"token_type": token_type}
    env.op.behaviour.claims_overrides = {"email": DELETE}
    assert (await run_login(env, browser)).status == 200
    assert len(env.op.seen("/userinfo")) == 1


@pytest.mark.parametrize("token_type", ["N_A", "mac"])
async def test_P_TOK_10_unknown_token_type_is_not_used_at_userinfo(env: Env, browser: ScriptedBrowser, token_type: str) -> None:
    """P-TOK-10: an unknown token_type is not sent to UserInfo; the login rests on the ID token alone."""
    env.op.behaviour.token_overrides = {"token_type": token_type}
    env.op.behaviour.claims_overrides = {"email": DELETE}
    page = await run_login(env, browser)
    assert page.status == 200
    assert env.op.seen("/userinfo") == []


@pytest.mark.parametrize("overrides", [
    {"expires_in": DELETE}, {"expires_in": "3600"}, {"expires_in": -5}, {"expires_in": 1e308},
    {"scope": DELETE, "expires_in": DELETE}, {"scope": "openid"}, {"x_unknown": {"a": [1]}, "refresh_token": 5},
])
async def test_P_TOK_11_12_13_lenient_members_are_accepted(env: Env, browser: ScriptedBrowser, overrides: dict[str, Any]) -> None:
    """P-TOK-11 / P-TOK-12 / P-TOK-13 / fapi no-scope, without-expires_in: odd expires_in/scope and unknown members do not break login."""
    env.op.behaviour.token_overrides = overrides
    assert (await run_login(env, browser)).status == 200


async def test_P_TOK_14_duplicate_members_in_token_response(env: Env, browser: ScriptedBrowser) -> None:
    """P-TOK-14: a token response with two id_token members is REJECT-CB."""
    env.op.behaviour.token_raw = b'{"access_token":"a","token_type":"Bearer","id_token":"a.b.c","id_token":"d.e.f"}'
    await expect_reject(env, browser, "token_invalid_json", status=(400, 502))


@pytest.mark.parametrize("mode", ["declared", "chunked"])
async def test_P_TOK_15_huge_token_response(env: Env, browser: ScriptedBrowser, mode: str) -> None:
    """P-TOK-15: a 10 MiB token response (declared or an endless chunked stream) is cut at the limit and REJECT-CB."""
    if mode == "declared":
        env.op.behaviour.token_raw = b"{" + b" " * (10 << 20) + b"}"
    else:
        env.op.behaviour.token_stream_bytes = 10 << 20
    await expect_reject(env, browser, "token_too_large", status=(400, 502))


# =============================================================================================
# ID token claims (P-IDT-*) -- always signed correctly


async def _reject_claims(env: Env, b: ScriptedBrowser, overrides: dict[str, Any], reason: str) -> None:
    env.op.behaviour.claims_overrides = overrides
    await expect_reject(env, b, reason)
    assert env.op.seen("/userinfo") == []


async def _accept_claims(env: Env, b: ScriptedBrowser, overrides: dict[str, Any]) -> None:
    env.op.behaviour.claims_overrides = overrides
    page = await run_login(env, b)
    assert page.status == 200, (page.status, page.text[:300])


def _now() -> int:
    return int(time.time())


@pytest.mark.parametrize("iss", ["{iss}/", "{http}", "{upper}", DELETE, "https://example.org/"])
async def test_P_IDT_01_issuer_must_match_exactly(env: Env, browser: ScriptedBrowser, iss: Any) -> None:
    """P-IDT-01 / rp-id_token-issuer-mismatch: an ID token iss that is not exactly the issuer is REJECT-CB."""
    value = iss
    if isinstance(iss, str):
        value = iss.format(iss=env.op.issuer, http=env.op.issuer.replace("https", "http"),
                           upper=env.op.issuer.replace("https", "HTTPS"))
    await _reject_claims(env, browser, {"iss": value}, "id_token_bad_iss")


@pytest.mark.parametrize("aud", [DELETE, "other", ["app-client", "other"], 5, {"a": "app-client"}, "https://example.com/"])
async def test_P_IDT_02_audience_must_be_this_client(env: Env, browser: ScriptedBrowser, aud: Any) -> None:
    """P-IDT-02 / rp-id_token-aud / fapi invalid-secondary-aud: anything but aud = client_id or [client_id] is REJECT-CB."""
    await _reject_claims(env, browser, {"aud": aud}, "id_token_bad_aud")


async def test_P_IDT_02_audience_as_single_element_array_is_accepted(env: Env, browser: ScriptedBrowser) -> None:
    """P-IDT-02 / fapi valid-aud-as-array: aud = [client_id] is accepted."""
    await _accept_claims(env, browser, {"aud": ["app-client"]})


async def test_P_IDT_03_foreign_azp(env: Env, browser: ScriptedBrowser) -> None:
    """P-IDT-03: an azp that is not this client is REJECT-CB; azp = client_id is fine."""
    await _reject_claims(env, browser, {"azp": "someone-else"}, "id_token_bad_azp")
    async with env.browser() as b2:
        await _accept_claims(env, b2, {"azp": "app-client"})


@pytest.mark.parametrize(("exp", "reason"), [
    (lambda: _now() - (LEEWAY + 5), "id_token_expired"),
    (lambda: _now() - 360, "id_token_expired"),
    (lambda: DELETE, "id_token_no_exp"),
    (lambda: "1700000000", "id_token_bad_exp"),
    (lambda: None, "id_token_no_exp"),
    (lambda: True, "id_token_bad_exp"),
    (lambda: 1e300, "id_token_bad_exp"),
    (lambda: 2**63, "id_token_bad_exp"),
    (lambda: -1, "id_token_bad_exp"),
])
async def test_P_IDT_04_bad_exp(env: Env, browser: ScriptedBrowser, exp: Callable[[], Any], reason: str) -> None:
    """P-IDT-04 / fapi invalid-expired-exp, invalid-missing-exp: expired, missing and malformed exp are REJECT-CB without a crash."""
    await _reject_claims(env, browser, {"exp": exp()}, reason)


@pytest.mark.parametrize("exp", [lambda: _now() - (LEEWAY - 5), lambda: _now() + 300.5])
async def test_P_IDT_04_exp_within_leeway_or_float_is_accepted(env: Env, browser: ScriptedBrowser, exp: Callable[[], Any]) -> None:
    """P-IDT-04: exp just inside the leeway, or a non-integer NumericDate, is accepted."""
    await _accept_claims(env, browser, {"exp": exp()})


@pytest.mark.parametrize(("iat", "reason"), [
    (lambda: DELETE, "id_token_no_iat"),
    (lambda: _now() + 600, "id_token_bad_iat"),
    (lambda: _now() - 7 * 86400, "id_token_too_old"),
    (lambda: _now() - (MAX_AGE + LEEWAY + 5), "id_token_too_old"),
])
async def test_P_IDT_05_bad_iat(env: Env, browser: ScriptedBrowser, iat: Callable[[], Any], reason: str) -> None:
    """P-IDT-05 / rp-id_token-iat / fapi1 iat-is-week-in-past: missing, future and too old iat are REJECT-CB."""
    await _reject_claims(env, browser, {"iat": iat(), "exp": _now() + 300}, reason)


async def test_P_IDT_05_S_LT_03_op_clock_slightly_ahead_is_accepted(env: Env, browser: ScriptedBrowser) -> None:
    """P-IDT-05 / S-LT-03: an OP clock ahead by less than the leeway is tolerated."""
    await _accept_claims(env, browser, {"iat": _now() + LEEWAY - 5, "nbf": _now() + LEEWAY - 5})


async def test_P_IDT_06_future_nbf(env: Env, browser: ScriptedBrowser) -> None:
    """P-IDT-06: nbf ten minutes ahead is REJECT-CB."""
    await _reject_claims(env, browser, {"nbf": _now() + 600}, "id_token_bad_nbf")


@pytest.mark.parametrize("nonce", [DELETE, "012345678", 12345, None])
async def test_P_IDT_07_bad_nonce(env: Env, browser: ScriptedBrowser, nonce: Any) -> None:
    """P-IDT-07 / rp-nonce-invalid / fapi invalid-missing-nonce: a missing, wrong or non-string nonce is REJECT-CB."""
    await _reject_claims(env, browser, {"nonce": nonce}, "id_token_bad_nonce")


async def test_P_IDT_07_replayed_id_token_with_an_old_nonce(env: Env, browser: ScriptedBrowser) -> None:
    """P-IDT-07: an ID token replayed from an earlier completed login (its nonce) is REJECT-CB."""
    assert (await run_login(env, browser)).status == 200
    old_nonce = env.op.seen("/authorize")[-1].query["nonce"][0]
    env.upstream.seen.clear()
    async with env.browser() as b2:
        await _reject_claims(env, b2, {"nonce": old_nonce}, "id_token_bad_nonce")


@pytest.mark.parametrize("sub", [DELETE, "", 42, "x" * 256, "a\r\nb", "a\x00b", "é"])
async def test_P_IDT_08_bad_sub(env: Env, browser: ScriptedBrowser, sub: Any) -> None:
    """P-IDT-08 / rp-id_token-sub: a missing, empty, non-string, over-long or control-character sub is REJECT-CB."""
    await _reject_claims(env, browser, {"sub": sub}, "id_token_bad_sub")


async def test_P_IDT_11_at_hash(env: Env, browser: ScriptedBrowser) -> None:
    """P-IDT-11 / fapi1 missing-athash: a wrong at_hash is REJECT-CB; an absent one is accepted."""
    await _reject_claims(env, browser, {"at_hash": "AAAAAAAAAAAAAAAAAAAAAA"}, "id_token_bad_at_hash")
    async with env.browser() as b2:
        env.op.behaviour.include_at_hash = False
        await _accept_claims(env, b2, {})


async def test_P_IDT_12_encrypted_five_part_token(env: Env, browser: ScriptedBrowser) -> None:
    """P-IDT-12: a 5-part JWE-looking ID token is REJECT-CB when no encryption is configured."""
    env.op.behaviour.id_token_raw = ".".join(b64url(x) for x in (b'{"alg":"RSA-OAEP","enc":"A128GCM"}', b"k", b"iv", b"ct", b"tag"))
    await expect_reject(env, browser, "id_token_encrypted")


async def test_P_IDT_14_claims_of_a_failed_token_are_never_used(env: Env, browser: ScriptedBrowser) -> None:
    """P-IDT-14: a bad-signature token with an attractive groups claim leaves no identity in flows, headers or upstream."""
    env.op.behaviour.claims_overrides = {"groups": ["superadmins"], "sub": "mallory"}
    env.op.behaviour.id_token_transform = lambda t: t[:-8] + ("AAAAAAAA" if not t.endswith("AAAAAAAA") else "BBBBBBBB")
    await expect_reject(env, browser, "id_token_bad_signature")
    assert all(f.user is None for f in env.flows)


async def test_P_IDT_15_unverified_email_grants_nothing(env: Env, browser: ScriptedBrowser) -> None:
    """P-IDT-15: an unverified (or multi-@) email never satisfies an email rule."""
    env.op.behaviour.claims_overrides = {"groups": [], "email_verified": False}
    page = await run_login(env, browser)
    assert page.status == 403
    async with env.browser() as b2:
        env.op.behaviour.claims_overrides = {"groups": [], "email": "victim@evil.com@alice@example.com"}
        assert (await run_login(env, b2)).status == 403
    assert env.upstream.seen == []


async def test_P_IDT_16_logout_token_as_id_token(env: Env, browser: ScriptedBrowser) -> None:
    """P-IDT-16: a logout token (or an at+jwt) returned as id_token is REJECT-CB."""
    env.op.behaviour.id_token_factory = lambda claims: env.op.logout_token()
    await expect_reject(env, browser, "id_token_bad_typ")
    async with env.browser() as b2:
        env.op.behaviour.id_token_factory = lambda claims: env.op.sign(claims, header={"typ": "at+jwt"})
        await expect_reject(env, b2, "id_token_bad_typ")


@pytest.mark.parametrize("kind", ["big_token", "many_claims", "deep", "big_claim"])
async def test_P_IDT_17_oversized_or_deep_id_tokens(env: Env, browser: ScriptedBrowser, kind: str) -> None:
    """P-IDT-17: huge, wide or deeply nested ID tokens are refused at a limit with a clean error page."""
    if kind == "big_token":
        env.op.behaviour.claims_overrides = {"pad": "x" * (1 << 20)}
    elif kind == "many_claims":
        env.op.behaviour.claims_overrides = {f"c{i}": i for i in range(100_000)}
    elif kind == "big_claim":
        env.op.behaviour.claims_overrides = {"pad": "x" * (256 << 10)}
    else:
        deep = "[" * 10000 + "]" * 10000
        env.op.behaviour.id_token_factory = lambda claims: rsa_sign_raw(
            env.op, b'{"alg":"RS256","kid":"rsa-1"}', claims_json(claims)[:-1] + b', "deep": ' + deep.encode() + b"}")
    resp = await expect_reject(env, browser, None, status=(400, 502))
    assert any(r in ("id_token_too_large", "token_too_large", "id_token_payload_invalid_json")
               for r in env.flow_reasons()), env.flow_reasons()
    assert resp.status != 500


# =============================================================================================
# JOSE (P-JOSE-*)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", [b"", b"sig"])
async def test_P_JOSE_01_alg_none(env: Env, browser: ScriptedBrowser, alg: str, signature: bytes) -> None:
    """P-JOSE-01 / rp-id_token-sig-none / fapi invalid-null-alg: alg none in any case, with or without a signature, is REJECT-CB."""
    env.op.behaviour.id_token_factory = lambda claims: compact({"alg": alg, "typ": "JWT"}, claims, signature)
    await expect_reject(env, browser, None)
    assert env.flow_reasons()[-1] in ("id_token_bad_alg", "id_token_malformed")


@pytest.mark.parametrize("secret", ["pem", "jwk_json", "n_bytes", "client_secret"])
async def test_P_JOSE_02_hs256_with_public_key_material(env: Env, browser: ScriptedBrowser, secret: str) -> None:
    """P-JOSE-02 / rp-id_token-sig-hs256 / rp-id_token-bad-sig-hs256: HS256 keyed with the OP's public key (any encoding) or the client secret is REJECT-CB."""
    import hmac  # noqa: PLC0415

    pub = env.op.rsa.as_dict(private=False)
    keys = {
        "pem": env.op.rsa.as_pem(private=False),
        "jwk_json": json.dumps(pub).encode(),
        "n_bytes": base64.urlsafe_b64decode(pub["n"] + "=="),
        "client_secret": env.op.client_secret.encode(),
    }

    def make(claims: dict[str, Any]) -> str:
        header = b64url(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode())
        si = f"{header}.{b64url(claims_json(claims))}".encode()
        return si.decode() + "." + b64url(hmac.new(keys[secret], si, hashlib.sha256).digest())

    env.op.behaviour.id_token_factory = make
    await expect_reject(env, browser, "id_token_bad_alg")


@pytest.mark.parametrize("case", ["es256_with_rsa_kid", "rs256_with_ec_kid", "jwk_alg_rs384"])
async def test_P_JOSE_03_alg_must_fit_the_key(env: Env, browser: ScriptedBrowser, case: str) -> None:
    """P-JOSE-03: a header alg that does not fit the key (or the JWK's own alg) is REJECT-CB."""
    if case == "es256_with_rsa_kid":
        env.op.behaviour.sign_with = "ec"
        env.op.behaviour.header_overrides = {"kid": "rsa-1"}
    elif case == "rs256_with_ec_kid":
        env.op.behaviour.header_overrides = {"kid": "ec-1"}
    else:
        jwk = env.op.rsa.as_dict(private=False)
        jwk["alg"] = "RS384"
        env.op.behaviour.jwks_keys = [jwk]
    await expect_reject(env, browser, None)
    assert env.flow_reasons()[-1] in ("id_token_unknown_key", "id_token_bad_signature")


@pytest.mark.parametrize("extra", [{"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0", "kid": "rsa-1"}, "private"])
async def test_P_JOSE_04_symmetric_or_private_keys_poison_the_jwks(env: Env, browser: ScriptedBrowser, extra: Any) -> None:
    """P-JOSE-04: a JWKS with an oct key or private members is refused: no login starts (fail closed)."""
    if extra == "private":
        extra = env.op.ec.as_dict(private=True)
    env.op.behaviour.jwks_keys = [env.op.rsa.as_dict(private=False), extra]
    resp = await browser.get(env.base + "/", follow=False)
    assert resp.status == 503 and "idp_unavailable" in resp.text
    assert env.op.seen("/authorize") == []


@pytest.mark.parametrize("member", ["jwk", "jku", "x5u", "x5c"])
async def test_P_JOSE_05_embedded_keys_and_key_urls_are_ignored(env: Env, browser: ScriptedBrowser, member: str) -> None:
    """P-JOSE-05: jwk/jku/x5u/x5c in the header never select a key and are never fetched."""
    values = {
        "jwk": env.op.stranger.as_dict(private=False),
        "jku": env.op.url("/evil-jwks"),
        "x5u": env.op.url("/evil-x5u"),
        "x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"],
    }
    env.op.behaviour.sign_with = "unknown"
    env.op.behaviour.header_overrides = {member: values[member]}
    await expect_reject(env, browser, "id_token_unknown_key")
    assert env.op.seen("/evil-jwks") == [] and env.op.seen("/evil-x5u") == []


@pytest.mark.parametrize("kid", ["../../etc/passwd", "' OR 1=1--", "k" * 10240, 7])
async def test_P_JOSE_06_hostile_kids(env: Env, browser: ScriptedBrowser, kid: Any) -> None:
    """P-JOSE-06: odd kids are opaque bounded lookups; unknown ones fail closed after at most one JWKS re-fetch."""
    env.op.behaviour.id_token_factory = lambda claims: rsa_sign_raw(
        env.op, json.dumps({"alg": "RS256", "kid": kid}).encode(), claims_json(claims))
    await expect_reject(env, browser, None)
    assert env.flow_reasons()[-1] in ("id_token_unknown_key", "id_token_too_large", "token_too_large")
    assert len(env.op.seen("/jwks")) <= 2


@pytest.mark.parametrize("header", [{"crit": ["exp"], "exp": 1}, {"crit": ["x-unknown"], "x-unknown": 1}, {"b64": False, "crit": ["b64"]}])
async def test_P_JOSE_07_crit_and_b64(env: Env, browser: ScriptedBrowser, header: dict[str, Any]) -> None:
    """P-JOSE-07: crit headers and b64:false make the ID token REJECT-CB."""
    env.op.behaviour.id_token_factory = lambda claims: rsa_sign_raw(
        env.op, json.dumps({"alg": "RS256", "kid": "rsa-1", **header}).encode(), claims_json(claims))
    await expect_reject(env, browser, "id_token_bad_header")


async def test_P_JOSE_08_duplicate_header_and_claim_names(env: Env, browser: ScriptedBrowser) -> None:
    """P-JOSE-08: duplicate header names and duplicate claim names are REJECT-CB even with a valid signature."""
    env.op.behaviour.id_token_factory = lambda claims: rsa_sign_raw(
        env.op, b'{"alg":"none","alg":"RS256","kid":"rsa-1"}', claims_json(claims))
    await expect_reject(env, browser, "id_token_malformed")
    async with env.browser() as b2:
        env.upstream.seen.clear()
        env.op.behaviour.id_token_factory = lambda claims: rsa_sign_raw(
            env.op, b'{"alg":"RS256","kid":"rsa-1"}', claims_json(claims)[:-1] + b', "sub": "admin"}')
        await expect_reject(env, b2, "id_token_payload_invalid_json")


@pytest.mark.parametrize("mangle", [
    lambda t: ".".join(t.split(".")[:2]),
    lambda t: t + ".extra",
    lambda t: t.split(".")[0] + "=." + ".".join(t.split(".")[1:]),
    lambda t: t.replace("-", "+").replace("_", "/") if ("-" in t or "_" in t) else "+" + t,
    lambda t: t[:20] + " " + t[20:],
    lambda t: b64url(b"\xff\xfe") + "." + ".".join(t.split(".")[1:]),
    lambda t: b64url(b"[1]") + "." + ".".join(t.split(".")[1:]),
    lambda t: ".".join(t.split(".")[:2]) + ".",
])
async def test_P_JOSE_09_malformed_compact_serialization(env: Env, browser: ScriptedBrowser, mangle: Callable[[str], str]) -> None:
    """P-JOSE-09: 2 or 4 segments, padding, +/ characters, whitespace, non-UTF-8/non-object header, empty signature are REJECT-CB."""
    env.op.behaviour.id_token_transform = mangle
    resp = await expect_reject(env, browser, None)
    assert env.flow_reasons()[-1].startswith("id_token_")
    assert resp.status == 400


@pytest.mark.parametrize("case", ["der", "zero", "big"])
async def test_P_JOSE_10_broken_ecdsa_signatures(env: Env, browser: ScriptedBrowser, case: str) -> None:
    """P-JOSE-10 / rp-id_token-bad-sig-es256: DER-encoded, zero (psychic) and out-of-range ES256 signatures are REJECT-CB."""
    key = env.op.ec.private_key
    assert isinstance(key, ec.EllipticCurvePrivateKey)

    def make(claims: dict[str, Any]) -> str:
        si = f"{b64url(json.dumps({'alg': 'ES256', 'kid': 'ec-1'}).encode())}.{b64url(claims_json(claims))}".encode()
        der = key.sign(si, ec.ECDSA(hashes.SHA256()))
        if case == "der":
            sig = der
        elif case == "zero":
            sig = bytes(64)
        else:
            _r, s = decode_dss_signature(der)
            n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256 order
            sig = n.to_bytes(32, "big") + s.to_bytes(32, "big")  # R = n: out of range
        return si.decode() + "." + b64url(sig)

    env.op.behaviour.id_token_factory = make
    await expect_reject(env, browser, "id_token_bad_signature")


async def test_rp_id_token_sig_es256_is_accepted(env: Env, browser: ScriptedBrowser) -> None:
    """rp-id_token-sig-es256: a valid ES256 ID token is accepted."""
    env.op.behaviour.sign_with = "ec"
    assert (await run_login(env, browser)).status == 200


async def test_rp_id_token_bad_sig_rs256(env: Env, browser: ScriptedBrowser) -> None:
    """rp-id_token-bad-sig-rs256 / fapi invalid-signature: scrambled RS256 signature bytes are REJECT-CB."""
    def scramble(t: str) -> str:
        h, p, s = t.split(".")
        raw = bytearray(base64.urlsafe_b64decode(s + "=="))
        raw[10] ^= 0xFF
        return f"{h}.{p}.{b64url(bytes(raw))}"

    env.op.behaviour.id_token_transform = scramble
    await expect_reject(env, browser, "id_token_bad_signature")


@pytest.mark.parametrize("case", ["single", "multiple"])
async def test_rp_id_token_kid_absent(env: Env, browser: ScriptedBrowser, case: str) -> None:
    """rp-id_token-kid-absent-single-jwks / -multiple-jwks: no kid in the header; the matching key(s) are tried and the right one verifies."""
    jwks = [{k: v for k, v in env.op.rsa.as_dict(private=False).items() if k != "kid"}]
    if case == "multiple":
        jwks.insert(0, {k: v for k, v in env.op.rsa2.as_dict(private=False).items() if k != "kid"})
    env.op.behaviour.jwks_keys = jwks
    env.op.behaviour.header_overrides = {"kid": DELETE}
    assert (await run_login(env, browser)).status == 200


async def test_P_JOSE_11_weak_rsa_and_off_curve_keys_are_never_used(env: Env, browser: ScriptedBrowser) -> None:
    """P-JOSE-11: a 1024-bit RSA key or an EC point not on the curve is refused; with nothing else usable no login starts."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_numbers()
    weak_jwk = {"kty": "RSA", "kid": "rsa-1", "n": b64url(weak.n.to_bytes(128, "big")), "e": "AQAB"}
    bad_ec = dict(env.op.ec.as_dict(private=False))
    bad_ec["y"] = b64url((int.from_bytes(base64.urlsafe_b64decode(bad_ec["y"] + "=="), "big") ^ 1).to_bytes(32, "big"))
    env.op.behaviour.jwks_keys = [weak_jwk, bad_ec]
    resp = await browser.get(env.base + "/", follow=False)
    assert resp.status == 503
    env.reset()
    env.op.behaviour.jwks_keys = [weak_jwk, env.op.ec.as_dict(private=False)]
    await expect_reject(env, browser, "id_token_unknown_key")


@pytest.mark.parametrize("typ", ["logout+jwt", "at+jwt", "dpop+jwt", "application/logout+jwt"])
async def test_P_JOSE_12_explicit_other_typ(env: Env, browser: ScriptedBrowser, typ: str) -> None:
    """P-JOSE-12: an ID token whose typ names another JWT kind is REJECT-CB."""
    env.op.behaviour.header_overrides = {"typ": typ}
    await expect_reject(env, browser, "id_token_bad_typ")


# =============================================================================================
# discovery, JWKS cache and rotation (P-JWKS-*)


async def test_P_JWKS_01_rotation_after_first_login(env: Env, browser: ScriptedBrowser) -> None:
    """P-JWKS-01 / rp-key-rotation-op-sign-key: login 1 with K1, the OP rotates to K2, login 2 succeeds after one JWKS re-fetch."""
    assert (await run_login(env, browser)).status == 200
    env.op.rotate()
    jwks_before = len(env.op.seen("/jwks"))
    async with env.browser() as b2:
        assert (await run_login(env, b2)).status == 200
    assert len(env.op.seen("/jwks")) == jwks_before + 1


async def test_P_JWKS_01_rotation_just_before_first_signing(env: Env, browser: ScriptedBrowser) -> None:
    """P-JWKS-01 / rp-key-rotation-op-sign-key-native: keys rotated right after discovery still allow the first login."""
    resp, _ = await env.start_login(browser)
    env.op.rotate()
    op_resp = await browser.get(resp.headers["Location"], follow=False)
    page = await browser.get(op_resp.headers["Location"])
    assert page.status == 200, page.text[:300]


async def test_P_JWKS_02_unknown_kid_flood_is_throttled(env: Env) -> None:
    """P-JWKS-02: logins with unknown kids re-fetch the JWKS at most once per floor, never twice for one kid, and fail closed."""
    async with env.browser() as warm:
        assert (await run_login(env, warm)).status == 200
    env.op.behaviour.sign_with = "unknown"
    floor = env.provider().jwks_min_fetch_interval

    async def logins_with_kids() -> int:
        for i in range(10):
            env.op.behaviour.header_overrides = {"kid": f"random-{i}"}
            async with env.browser() as b:
                env.upstream.seen.clear()
                await expect_reject(env, b, "id_token_unknown_key")
        return len(env.op.seen("/jwks"))

    before, started = len(env.op.seen("/jwks")), time.monotonic()
    after_new = await logins_with_kids()
    assert after_new - before <= min(10, 1 + (time.monotonic() - started) / floor)
    assert await logins_with_kids() == after_new, "a kid just found missing is not looked up again"


async def test_P_JWKS_02_concurrent_misses_are_coalesced(env: Env) -> None:
    """P-JWKS-02: concurrent unknown-kid misses share one JWKS fetch."""
    provider = env.provider()
    await provider.discover()
    before = len(env.op.seen("/jwks"))
    token = env.op.sign(env.op.id_token_claims(None, None), how="unknown")
    results = await asyncio.gather(*(provider.verify(token) for _ in range(20)), return_exceptions=True)
    assert all(getattr(r, "code", None) == "id_token_unknown_key" for r in results)
    assert len(env.op.seen("/jwks")) - before <= 1


async def test_P_JWKS_03_jwks_down_at_startup_fails_closed(env: Env, browser: ScriptedBrowser) -> None:
    """P-JWKS-03: with the JWKS endpoint down no login starts (503) and nothing reaches the upstream."""
    env.op.behaviour.jwks_status = 500
    resp = await browser.get(env.base + "/", follow=False)
    assert resp.status == 503 and "idp_unavailable" in resp.text
    assert env.upstream.seen == []
    assert env.provider().last_error and "jwks" in env.provider().last_error


@pytest.mark.parametrize(("status", "raw"), [
    (500, None), (200, b"<html>"), (200, b"{}"), (200, b'{"keys":[]}'), (200, b"{bad json"),
])
async def test_P_JWKS_04_bad_refresh_keeps_last_good_keys(env: Env, browser: ScriptedBrowser, status: int, raw: bytes | None) -> None:
    """P-JWKS-04: a JWKS refresh that yields garbage keeps the last good key set."""
    assert (await run_login(env, browser)).status == 200
    env.op.behaviour.jwks_status = status
    env.op.behaviour.jwks_raw = raw
    provider = env.provider()
    token = env.op.sign(env.op.id_token_claims(None, None), how="unknown")
    with pytest.raises(Exception, match="id_token_unknown_key"):
        await provider.verify(token)
    assert provider.keys, "the old key set survives"
    async with env.browser() as b2:
        env.upstream.seen.clear()
        assert (await run_login(env, b2)).status == 200


async def test_P_JWKS_05_removed_key_is_rejected_after_the_cache_age(env: Env, browser: ScriptedBrowser) -> None:
    """P-JWKS-05: once the cached JWKS is older than its maximum age, a token signed with a key the OP removed is REJECT-CB."""
    assert (await run_login(env, browser)).status == 200
    env.op.behaviour.jwks_keys = [env.op.rsa2.as_dict(private=False)]  # rsa-1 revoked; tokens still signed with it
    provider = env.provider()
    provider.keys_fetched -= 86400 * 2
    async with env.browser() as b2:
        env.upstream.seen.clear()
        await expect_reject(env, b2, "id_token_unknown_key")


async def test_P_JWKS_06_enc_only_and_duplicate_kids(env: Env, browser: ScriptedBrowser) -> None:
    """P-JWKS-06: an enc-only key with the token's kid is never used; among duplicate kids the sig-capable key verifies."""
    enc = dict(env.op.rsa.as_dict(private=False), use="enc")
    ops = dict(env.op.rsa.as_dict(private=False), key_ops=["encrypt"])
    ops.pop("use")
    env.op.behaviour.jwks_keys = [enc, ops, env.op.ec.as_dict(private=False)]
    await expect_reject(env, browser, "id_token_unknown_key")
    env.reset()
    dup = dict(env.op.rsa2.as_dict(private=False), kid="rsa-1")
    env.op.behaviour.jwks_keys = [dup, env.op.rsa.as_dict(private=False)]
    async with env.browser() as b2:
        assert (await run_login(env, b2)).status == 200


@pytest.mark.parametrize("issuer", ["https://example.com", "{iss}/", "{upper}"])
async def test_P_JWKS_07_discovery_issuer_mismatch(env: Env, browser: ScriptedBrowser, issuer: str) -> None:
    """P-JWKS-07 / rp-discovery-issuer-not-matching-config: metadata whose issuer is not the configured one fails closed."""
    env.op.behaviour.discovery_overrides = {"issuer": issuer.format(
        iss=env.op.issuer, upper=env.op.issuer.upper())}
    resp = await browser.get(env.base + "/", follow=False)
    assert resp.status == 503 and "idp_unavailable" in resp.text
    assert env.op.seen("/authorize") == [] and env.op.seen("/jwks") == []
    assert "discovery_issuer_mismatch" in (env.provider().last_error or "")


@pytest.mark.parametrize("member", ["authorization_endpoint", "token_endpoint", "jwks_uri"])
async def test_P_JWKS_08_http_endpoints_are_refused(env: Env, browser: ScriptedBrowser, member: str) -> None:
    """P-JWKS-08: an http:// authorization, token or JWKS endpoint in the metadata fails closed."""
    env.op.behaviour.discovery_overrides = {member: env.op.discovery()[member].replace("https://", "http://")}
    resp = await browser.get(env.base + "/", follow=False)
    assert resp.status == 503
    assert "discovery_bad_endpoint" in (env.provider().last_error or "")


@pytest.mark.parametrize("member", ["authorization_endpoint", "token_endpoint", "jwks_uri"])
async def test_P_JWKS_09_missing_endpoints_fail_closed(env: Env, browser: ScriptedBrowser, member: str) -> None:
    """P-JWKS-09: metadata without the authorization, token or JWKS endpoint fails closed."""
    env.op.behaviour.discovery_overrides = {member: DELETE}
    resp = await browser.get(env.base + "/", follow=False)
    assert resp.status == 503
    assert env.op.seen("/authorize") == []


async def test_P_JWKS_09_unknown_metadata_members_are_ignored(env: Env, browser: ScriptedBrowser) -> None:
    """P-JWKS-09 / rp-discovery-openid-configuration: unknown metadata members are ignored and endpoints come from the metadata."""
    env.op.behaviour.discovery_overrides = {"x_vendor": {"deep": [1, 2, {"a": None}]}, "mtls_endpoint_aliases": {}}
    assert (await run_login(env, browser)).status == 200
    assert env.op.seen("/.well-known/openid-configuration")


@pytest.mark.parametrize("kind", ["big_discovery", "deep_discovery", "big_jwks", "many_keys", "deep_jwks", "dup_discovery"])
async def test_P_JWKS_10_huge_or_deep_documents(env: Env, browser: ScriptedBrowser, kind: str) -> None:
    """P-JWKS-10: 10 MiB, 100k-key, 10k-deep or duplicate-member metadata/JWKS fail closed without a crash."""
    b = env.op.behaviour
    if kind == "big_discovery":
        b.discovery_overrides = {"pad": "x" * (10 << 20)}
    elif kind == "deep_discovery":
        b.discovery_raw = json.dumps(env.op.discovery())[:-1].encode() + b', "d": ' + b"[" * 10000 + b"]" * 10000 + b"}"
    elif kind == "big_jwks":
        b.jwks_raw = b'{"keys": [], "pad": "' + b"x" * (10 << 20) + b'"}'
    elif kind == "many_keys":
        b.jwks_keys = [env.op.rsa.as_dict(private=False)] * 100_000
    elif kind == "deep_jwks":
        b.jwks_raw = b'{"keys": ' + b"[" * 10000 + b"]" * 10000 + b"}"
    else:
        b.discovery_raw = json.dumps(env.op.discovery())[:-1].encode() + b', "issuer": "https://evil.example"}'
    resp = await browser.get(env.base + "/", follow=False)
    assert resp.status == 503
    assert env.op.seen("/authorize") == []


@pytest.mark.parametrize("url", ["https://169.254.169.254/keys", "https://[fe80::1]/keys", "https://0.0.0.0/keys"])
async def test_P_JWKS_11_metadata_urls_to_link_local_addresses_are_refused(env: Env, browser: ScriptedBrowser, url: str) -> None:
    """P-JWKS-11: a jwks_uri pointing at a link-local or unspecified address is refused (SSRF through metadata)."""
    env.op.behaviour.discovery_overrides = {"jwks_uri": url}
    resp = await browser.get(env.base + "/", follow=False)
    assert resp.status == 503
    assert "discovery_bad_endpoint" in (env.provider().last_error or "")


# =============================================================================================
# UserInfo and claims (P-UI-*)


async def test_P_UI_01_userinfo_sub_mismatch(env: Env, browser: ScriptedBrowser) -> None:
    """P-UI-01 / rp-userinfo-bad-sub-claim: a UserInfo sub that differs from the ID token is REJECT-CB."""
    env.op.behaviour.claims_overrides = {"email": DELETE}
    env.op.behaviour.userinfo_overrides = {"sub": "foobar"}
    await expect_reject(env, browser, "userinfo_sub_mismatch")
    (ui,) = env.op.seen("/userinfo")
    assert ui.headers["Authorization"].startswith("Bearer ")
    assert "access_token" not in ui.query


@pytest.mark.parametrize(("status", "raw", "reason"), [
    (401, None, "userinfo_http_error"),
    (500, None, "userinfo_http_error"),
    (200, b"<html>hello</html>", "userinfo_invalid_json"),
    (200, b"eyJhbGciOiJSUzI1NiJ9.e30.c2ln", "userinfo_invalid_json"),
    (200, b'{"sub":"user-1","sub":"admin"}', "userinfo_invalid_json"),
])
async def test_P_UI_03_userinfo_failures_fail_closed(env: Env, browser: ScriptedBrowser, status: int, raw: bytes | None, reason: str) -> None:
    """P-UI-03 / P-UI-02: UserInfo 401, 5xx, HTML, a JWT or duplicate members fail closed with no crash."""
    env.op.behaviour.claims_overrides = {"email": DELETE}
    env.op.behaviour.userinfo_status = status
    env.op.behaviour.userinfo_raw = raw
    await expect_reject(env, browser, reason, status=(400, 502))


async def test_P_UI_05_control_characters_in_claims_never_split_headers(env: Env, browser: ScriptedBrowser) -> None:
    """P-UI-05: claim values with CR/LF/NUL reach the app as exactly one clean identity header each."""
    env.op.behaviour.claims_overrides = {
        "preferred_username": "A\r\nX-Forwarded-User: admin",
        "email": "a@example.com\r\nX-Evil: 1",
        "groups": ["staff", "x\r\nX-Injected: 1", "nul\x00byte"],
    }
    page = await run_login(env, browser)
    assert page.status == 200, page.text[:300]
    seen = env.upstream.seen[-1]
    assert len(seen.header("X-Forwarded-User")) == 1
    assert "\r" not in seen.header("X-Forwarded-User")[0] and "\n" not in seen.header("X-Forwarded-User")[0]
    assert seen.header("X-Evil") == [] and seen.header("X-Injected") == []
    for _, v in seen.headers:
        assert "\x00" not in v and "\r" not in v and "\n" not in v


@pytest.mark.parametrize("groups", [DELETE, None, [], "_claim_names"])
async def test_P_UI_07_missing_or_odd_groups_deny(env: Env, browser: ScriptedBrowser, groups: Any) -> None:
    """P-UI-07 / rp-claims-aggregated: a required groups claim that is missing, null, empty or only indirect denies (403)."""
    overrides: dict[str, Any] = {"groups": groups}
    if groups == "_claim_names":
        overrides = {"groups": DELETE, "_claim_names": {"groups": "src1"},
                     "_claim_sources": {"src1": {"JWT": "a.b.c"}}}
    env.op.behaviour.claims_overrides = overrides
    page = await run_login(env, browser, "/admin/panel")
    assert page.status == 403
    assert env.upstream.seen == []


# =============================================================================================
# return URLs (P-RET-*)


@pytest.mark.parametrize("path", [
    "//evil.example/x", "/%5Cevil.example", "/%2F%2Fevil.example", "/%09/evil.example",
    "/./%5Cevil.example", "/../..//evil.example", "/x?rd=https://evil.example",
])
async def test_P_RET_01_02_03_return_url_stays_on_the_origin(env: Env, browser: ScriptedBrowser, path: str) -> None:
    """P-RET-01 / P-RET-02 / P-RET-03: after login the browser lands on the configured origin, never on another host."""
    resp = await browser.get(env.base + path, follow=False)
    if resp.status == 400:
        return
    assert resp.status == 302
    page = await browser.get(resp.headers["Location"])
    cb = next(h for h in page.history if h.url.startswith(env.callback))
    loc = cb.headers["Location"]
    assert loc.startswith(env.base + "/")
    assert not loc[len(env.base):].startswith("//")
    assert urllib.parse.urlsplit(loc).hostname == HOST


async def test_P_RET_04_callback_rd_parameter_is_ignored(env: Env, browser: ScriptedBrowser) -> None:
    """P-RET-04: an attacker parameter on the callback does not change where the browser goes."""
    cb = await env.to_callback(browser, "/mine")
    resp = await browser.get(cb + "&rd=https%3A%2F%2Fevil.example&return_to=%2F%2Fevil.example", follow=False)
    assert resp.status == 302
    assert resp.headers["Location"] == env.base + "/mine"


async def test_P_RET_05_tampered_transaction_cookie(env: Env, browser: ScriptedBrowser) -> None:
    """P-RET-05: a tampered transaction cookie fails the binding; the return URL lives server-side."""
    cb = await env.to_callback(browser, "/mine")
    for c in list(browser.cookies):
        if c.name.startswith(TX_PREFIX):
            stamp, _, binding = c.value.partition(".")
            browser.cookies.set_from_header(f"{c.name}={stamp}.{binding[::-1]}; Path=/; Secure", env.base + "/")
    resp = await browser.get(cb, follow=False)
    env.assert_reject_cb(resp, "callback_not_bound")
    env.assert_no_token_request()


@pytest.mark.parametrize("path", ["/x%0d%0aSet-Cookie:%20a=b", "/" + "a" * 3000])
async def test_P_RET_06_long_or_crlf_return_urls(env: Env, browser: ScriptedBrowser, path: str) -> None:
    """P-RET-06: CR/LF in the return URL never reaches a header; an over-long one falls back to /."""
    resp = await browser.get(env.base + path, follow=False)
    if resp.status != 302:
        assert 400 <= resp.status < 500
        return
    page = await browser.get(resp.headers["Location"])
    cb = next(h for h in page.history if h.url.startswith(env.callback))
    loc = cb.headers["Location"]
    assert "\r" not in loc and "\n" not in loc
    assert not any(sc.startswith("a=") for sc in cb.set_cookies)
    if len(path) > 2048:
        assert loc == env.base + "/"


async def test_P_RET_07_post_without_session_is_not_replayed(env: Env, browser: ScriptedBrowser) -> None:
    """P-RET-07: an unauthenticated POST gets a 401 (no login, no body replay) and nothing reaches the upstream."""
    resp = await browser.post(env.base + "/form", {"a": "1"}, follow=False, referrer=env.base + "/")
    assert resp.status == 401
    assert env.upstream.seen == []
    assert len(env.gate.transactions) == 0


async def test_P_RET_08_logout_redirect_parameter_is_ignored(env: Env, browser: ScriptedBrowser) -> None:
    """P-RET-08: a redirect parameter on the logout endpoint never decides where the browser goes."""
    assert (await run_login(env, browser)).status == 200
    resp = await browser.get(env.base + "/oauth2/logout?redirect=https%3A%2F%2Fevil.example&post_logout_redirect_uri=https%3A%2F%2Fevil.example", follow=False)
    assert resp.status == 302
    loc = resp.headers["Location"]
    assert loc.startswith(env.op.url("/end_session"))
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(loc).query)
    assert q["post_logout_redirect_uri"] == [env.base + "/"]
    assert "evil" not in loc


# =============================================================================================
# RP-initiated logout (P-RPL-*)


async def test_P_RPL_01_P_RPL_04_P_RPL_06_logout(env: Env, browser: ScriptedBrowser) -> None:
    """P-RPL-01 / P-RPL-04 / P-RPL-06 / rp-init-logout: the session dies server-side first, the cookie is cleared, then a no-store 302 to end_session with hint, state and client_id."""
    assert (await run_login(env, browser)).status == 200
    handle = env.session_value(browser)
    assert handle
    resp = await browser.get(env.base + "/oauth2/logout", follow=False)
    assert resp.status == 302
    assert resp.headers["Cache-Control"] == "no-store"
    cleared = [sc for sc in resp.set_cookies if sc.startswith(SESSION_COOKIE + "=")]
    assert cleared and "Max-Age=0" in cleared[0] and "Path=/" in cleared[0] and "Secure" in cleared[0]
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(resp.headers["Location"]).query)
    assert q["client_id"] == ["app-client"]
    assert q["post_logout_redirect_uri"] == [env.base + "/"]
    assert len(q["state"][0]) >= 16
    hint = q["id_token_hint"][0]
    payload = json.loads(base64.urlsafe_b64decode(hint.split(".")[1] + "=="))
    assert payload["iss"] == env.op.issuer and payload["aud"] == "app-client"
    # P-RPL-04: the saved cookie no longer works
    async with env.browser() as replay:
        replay.cookies.set_from_header(f"{SESSION_COOKIE}={handle}; Path=/; Secure", env.base + "/")
        again = await replay.get(env.base + "/", follow=False)
        assert again.status == 302 and again.headers["Location"].startswith(env.op.url("/authorize"))


async def test_P_RPL_02_cross_site_logout_needs_confirmation(env: Env, browser: ScriptedBrowser) -> None:
    """P-RPL-02: a cross-site GET or an Origin-less POST to logout shows a confirmation page and keeps the session."""
    assert (await run_login(env, browser)).status == 200
    env.upstream.seen.clear()
    resp = await browser.request("GET", env.base + "/oauth2/logout", follow=False, referrer="https://evil.example/")
    assert resp.status == 200 and "<form method=post" in resp.text
    resp = await browser.request("POST", env.base + "/oauth2/logout", data={"x": "1"}, follow=False,
                                 referrer="https://evil.example/")
    assert resp.status == 200 and "<form method=post" in resp.text
    assert (await browser.get(env.base + "/still-in", follow=False)).status == 200
    # the confirmation form itself works
    done = await browser.submit_form(resp, follow=False)
    assert done.status == 302 and done.headers["Location"].startswith(env.op.url("/end_session"))


async def test_P_RPL_03_return_from_op_with_foreign_or_no_state(env: Env, browser: ScriptedBrowser) -> None:
    """P-RPL-03 / rp-init-logout-other-state / -no-state: coming back with any state starts no session and follows nothing in state."""
    assert (await run_login(env, browser)).status == 200
    await browser.get(env.base + "/oauth2/logout", follow=False)
    for suffix in ("?state=https%3A%2F%2Fevil.example", ""):
        resp = await browser.get(env.base + "/" + suffix, follow=False)
        assert resp.status == 302
        assert resp.headers["Location"].startswith(env.op.url("/authorize"))
        assert env.session_value(browser) is None


async def test_P_RPL_05_no_end_session_endpoint_is_local_logout(env: Env, browser: ScriptedBrowser) -> None:
    """P-RPL-05: without end_session_endpoint the logout is local, with a signed-out page and no redirect."""
    env.op.behaviour.discovery_overrides = {"end_session_endpoint": DELETE}
    assert (await run_login(env, browser)).status == 200
    resp = await browser.get(env.base + "/oauth2/logout", follow=False)
    assert resp.status == 200 and "signed out" in resp.text.lower()
    assert resp.headers["Cache-Control"] == "no-store"
    assert "Location" not in resp.headers
    assert env.session_value(browser) is None


# =============================================================================================
# cookies and sessions (S-*)


async def test_S_CK_01_S_CK_08_session_cookie_attributes(env: Env, browser: ScriptedBrowser) -> None:
    """S-CK-01 / S-CK-08 / S-ID-06: the session cookie is an opaque __Host- handle, Secure, HttpOnly, Lax, no Domain, bounded Max-Age."""
    page = await run_login(env, browser)
    cb = next(h for h in page.history if h.url.startswith(env.callback))
    (sc,) = [s for s in cb.set_cookies if s.startswith(SESSION_COOKIE + "=")]
    attrs = [a.strip() for a in sc.split(";")]
    assert {"Path=/", "Secure", "HttpOnly", "SameSite=Lax"} <= set(attrs)
    assert not any(a.lower().startswith("domain") for a in attrs)
    assert 0 < int(next(a for a in attrs if a.startswith("Max-Age=")).split("=")[1]) <= 24 * 3600
    value = attrs[0].split("=", 1)[1]
    assert len(value) == 43 and "." not in value


async def test_S_CK_03_cookie_tossing_lookalikes_are_ignored(env: Env, browser: ScriptedBrowser) -> None:
    """S-CK-03: only the exact __Host- name counts: unprefixed or case-changed copies of a valid handle are ignored."""
    assert (await run_login(env, browser)).status == 200
    handle = env.session_value(browser)
    for name in ("enforcer-app", "__host-enforcer-app", "__Secure-enforcer-app"):
        async with env.browser() as b:
            resp = await b.request("GET", env.base + "/x", follow=False, headers={"Cookie": f"{name}={handle}"})
            assert resp.status == 302


async def test_S_CK_04_duplicate_session_cookie_is_unauthenticated(env: Env, browser: ScriptedBrowser) -> None:
    """S-CK-04: two values for the session cookie are treated as no session."""
    assert (await run_login(env, browser)).status == 200
    handle = env.session_value(browser)
    async with env.browser() as b:
        for cookie in (f"{SESSION_COOKIE}={handle}; {SESSION_COOKIE}={handle}", f"{SESSION_COOKIE}=junk; {SESSION_COOKIE}={handle}"):
            resp = await b.request("GET", env.base + "/x", follow=False, headers={"Cookie": cookie})
            assert resp.status == 302


async def test_S_CK_05_S_CK_06_enforcer_cookies_never_reach_or_come_from_the_app(env: Env, browser: ScriptedBrowser) -> None:
    """S-CK-05 / S-CK-06: the app never sees our cookies and cannot set one of our names."""
    assert (await run_login(env, browser)).status == 200
    handle = env.session_value(browser)
    browser.cookies.set_from_header("appcookie=1; Path=/; Secure", env.base + "/")
    resp = await browser.get(env.base + "/set-cookie", follow=False)
    seen = env.upstream.seen[-1]
    assert seen.header("Cookie") == ["appcookie=1"]
    assert handle not in json.dumps(seen.headers)
    assert not any(sc.startswith("__Host-enforcer") for sc in resp.set_cookies)
    assert env.session_value(browser) == handle
    assert handle not in resp.text and all(handle not in str(v) for v in resp.headers.values())


async def test_S_CK_07_S_CK_09_enforcer_pages_are_not_cacheable(env: Env, browser: ScriptedBrowser) -> None:
    """S-CK-07 / S-CK-09: every enforcer response that sets or clears a cookie, and every error page, has no-store and the security headers."""
    page = await run_login(env, browser)
    responses = [*page.history]
    responses.append(await browser.get(env.base + "/oauth2/logout", follow=False))
    responses.append(await browser.get(env.callback + "?state=x&code=y", follow=False))
    for r in responses:
        if urllib.parse.urlsplit(r.url).hostname != HOST:
            continue
        if r.set_cookies or r.status >= 400:
            assert r.headers.get("Cache-Control") == "no-store", r.url
            assert r.headers.get("X-Content-Type-Options") == "nosniff"
            assert "frame-ancestors 'none'" in r.headers.get("Content-Security-Policy", "")


async def test_S_ID_01_handles_are_unique_and_random(env: Env) -> None:
    """S-ID-01: session handles from 40 logins are unique, 43 URL-safe characters (256 bits), without structure."""
    handles = set()
    for _ in range(40):
        async with env.browser() as b:
            assert (await run_login(env, b)).status == 200
            handles.add(env.session_value(b))
    assert len(handles) == 40
    assert all(h and len(h) == 43 and set(h) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
               for h in handles)
    prefixes = {h[:6] for h in handles if h}
    assert len(prefixes) == 40


async def test_S_ID_02_session_fixation(env: Env, browser: ScriptedBrowser) -> None:
    """S-ID-02: a planted (valid or made-up) session cookie is replaced at login, expired at sign-in start, and the planted id is dead."""
    async with env.browser() as attacker:
        assert (await run_login(env, attacker)).status == 200
        planted = env.session_value(attacker)
    assert planted
    browser.cookies.set_from_header(f"{SESSION_COOKIE}={'A' * 43}; Path=/; Secure", env.base + "/")
    start, _ = await env.start_login(browser)
    assert any(sc.startswith(SESSION_COOKIE + "=;") for sc in start.set_cookies), "sign-in start expires the stale cookie"
    cb = await env.to_callback(browser)
    browser.cookies.set_from_header(f"{SESSION_COOKIE}={planted}; Path=/; Secure", env.base + "/")
    resp = await browser.get(cb, follow=False)
    assert resp.status == 302
    new = env.session_value(browser)
    assert new and new != planted
    async with env.browser() as attacker:
        attacker.cookies.set_from_header(f"{SESSION_COOKIE}={planted}; Path=/; Secure", env.base + "/")
        assert (await attacker.get(env.base + "/", follow=False)).status == 302


@pytest.mark.parametrize("tamper", [
    lambda h: h[:-1] + ("A" if h[-1] != "A" else "B"), lambda h: h[:20], lambda h: h + "xx",
    lambda h: h + "=", lambda h: h.replace("-", "+").replace("_", "/") + "+/", lambda h: "1700000000." + h,
])
async def test_S_ID_03_S_ID_06_tampered_cookie_means_login(env: Env, browser: ScriptedBrowser, tamper: Callable[[str], str]) -> None:
    """S-ID-03 / S-ID-06: any change to the handle (or a tx-cookie-shaped value) is a fresh LOGIN, never a 500."""
    assert (await run_login(env, browser)).status == 200
    handle = env.session_value(browser)
    assert handle
    async with env.browser() as b:
        resp = await b.request("GET", env.base + "/x", follow=False, headers={"Cookie": f"{SESSION_COOKIE}={tamper(handle)}"})
        assert resp.status == 302 and resp.headers["Location"].startswith(env.op.url("/authorize"))


async def test_S_ID_06_id_token_as_session_cookie(env: Env, browser: ScriptedBrowser) -> None:
    """S-ID-06: an ID token placed in the session cookie is no session."""
    token = env.op.sign(env.op.id_token_claims(None, None))
    resp = await browser.request("GET", env.base + "/x", follow=False, headers={"Cookie": f"{SESSION_COOKIE}={token}"})
    assert resp.status == 302


async def test_S_ID_07_S_LT_01_S_LT_02_expiry(env: Env, browser: ScriptedBrowser) -> None:
    """S-ID-07 (d) / S-LT-01 / S-LT-02: after the idle timeout, and after the absolute lifetime despite activity, the cookie means LOGIN."""
    assert (await run_login(env, browser)).status == 200
    real = time.time
    s = env.gate.settings.model.sessions
    env.gate.clock = lambda: real() + s.idleTimeout + 5
    resp = await browser.get(env.base + "/x", follow=False)
    assert resp.status == 302 and resp.headers["Location"].startswith(env.op.url("/authorize"))
    env.gate.clock = real
    async with env.browser() as b2:
        assert (await run_login(env, b2)).status == 200
        step = s.idleTimeout / 2
        t = 0.0
        while t < s.absoluteTimeout - step:
            t += step
            env.gate.clock = lambda t=t: real() + t
            assert (await b2.get(env.base + "/x", follow=False)).status == 200, t
        env.gate.clock = lambda: real() + s.absoluteTimeout + 1
        assert (await b2.get(env.base + "/x", follow=False)).status == 302


# =============================================================================================
# back-channel logout (P-BCL-*)


async def bcl_post(env: Env, body: bytes | str, *, content_type: str = "application/x-www-form-urlencoded",
                   method: str = "POST", cookie: str | None = None) -> Response:
    """POST to the back-channel logout endpoint the way an OP does (no browser headers)."""
    url = env.base + "/oauth2/logout/backchannel"
    headers = {"Content-Type": content_type}
    if cookie:
        headers["Cookie"] = cookie
    async with env.browser() as b, b._get_session().request(
        method, url, data=io.BytesIO(body if isinstance(body, bytes) else body.encode()) if method == "POST" else None,
        headers=headers, allow_redirects=False
    ) as raw:
        return Response(raw.status, url, dict(raw.headers), await raw.text(),
                        set_cookies=raw.headers.getall("Set-Cookie", []))


def form(token: str) -> str:
    return urllib.parse.urlencode({"logout_token": token})


async def logged_in(env: Env, sub: str = "user-1", sid: str | None = None) -> ScriptedBrowser:
    """A browser with a live session for (sub, sid) at OP A."""
    env.op.sub = sub
    if sid is not None:
        env.op.session_id = sid
    b = env.browser()
    page = await run_login(env, b)
    assert page.status == 200
    return b


async def is_live(env: Env, b: ScriptedBrowser) -> bool:
    resp = await b.get(env.base + "/probe", follow=False)
    return resp.status == 200


@pytest.fixture
def op_identity(env: Env) -> Any:
    """Restore the OP's default sub and sid after a test that changes them."""
    sub, sid = env.op.sub, env.op.session_id
    yield
    env.op.sub, env.op.session_id = sub, sid


@pytest.mark.usefixtures("op_identity")
async def test_P_BCL_01_valid_logout_token_by_sid_ends_that_session(env: Env) -> None:
    """P-BCL-01 / rp-backchannel-rpinitlogout / S-ID-07 (b): a valid token with sid (plus an unknown claim) gets 200 no-store and that session ends."""
    victim = await logged_in(env, "u-a", "sid-a")
    other = await logged_in(env, "u-a", "sid-other")
    try:
        token = env.op.logout_token(sid="sid-a", overrides={"sub": "u-a", "ignored_claim": "x"})
        resp = await bcl_post(env, form(token))
        assert resp.status == 200, resp.text
        assert resp.headers["Cache-Control"] == "no-store"
        assert not await is_live(env, victim)
        assert await is_live(env, other), "another IdP session of the same user survives"
        assert "backchannel_logout" in env.flow_reasons("/oauth2/logout/backchannel")
    finally:
        await victim.close()
        await other.close()


@pytest.mark.usefixtures("op_identity")
async def test_P_BCL_01_sub_only_ends_every_session_of_the_user(env: Env) -> None:
    """P-BCL-01: a token with only sub ends all sessions of (iss, sub), and nobody else's."""
    a1 = await logged_in(env, "u-b", "sid-1")
    a2 = await logged_in(env, "u-b", "sid-2")
    bystander = await logged_in(env, "u-c", "sid-3")
    try:
        resp = await bcl_post(env, form(env.op.logout_token(overrides={"sub": "u-b", "sid": DELETE})))
        assert resp.status == 200
        assert not await is_live(env, a1) and not await is_live(env, a2)
        assert await is_live(env, bystander)
    finally:
        for b in (a1, a2, bystander):
            await b.close()


def _bad_tokens(op: FakeOP) -> dict[str, Callable[[], str]]:
    now = int(time.time())
    ok = {"sub": "u-d", "sid": "sid-d"}

    def lt(**o: Any) -> Callable[[], str]:
        return lambda: op.logout_token(overrides={**ok, **o})

    def scrambled() -> str:
        h, p, s = op.logout_token(overrides=ok).split(".")
        raw = bytearray(base64.urlsafe_b64decode(s + "=="))
        raw[5] ^= 0xFF
        return f"{h}.{p}.{b64url(bytes(raw))}"

    claims = {"iss": op.issuer, "aud": op.client_id, "iat": now, "exp": now + 120, "jti": "j1",
              "events": {"http://schemas.openid.net/event/backchannel-logout": {}}, **ok}
    return {
        "alg_none": lambda: compact({"alg": "none", "typ": "logout+jwt"}, claims),
        "hs256": lambda: op.sign(claims, how="hs256-secret", header={"typ": "logout+jwt"}),
        "bad_signature": scrambled,
        "unknown_key": lambda: op.logout_token(overrides=ok, how="unknown"),
        "wrong_aud": lt(aud="someone-else"),
        "secondary_aud": lt(aud=[op.client_id, "x"]),
        "wrong_iss": lt(iss="https://evil.example"),
        "expired": lt(exp=now - 600, iat=now - 720),
        "iat_old": lt(iat=now - 86400, exp=now + 60),
        "iat_future": lt(iat=now + 3600, exp=now + 3700),
        "no_events": lt(events=DELETE),
        "wrong_event": lt(events={"http://schemas.openid.net/event/foobar": {}}),
        "events_array": lt(events=["http://schemas.openid.net/event/backchannel-logout"]),
        "event_not_object": lt(events={"http://schemas.openid.net/event/backchannel-logout": "yes"}),
        "with_nonce": lt(nonce="n"),
        "no_sub_no_sid": lt(sub=DELETE, sid=DELETE),
        "no_jti": lt(jti=DELETE),
        "no_iat": lt(iat=DELETE),
        "no_exp": lt(exp=DELETE),
        "typ_jwt": lambda: op.logout_token(overrides=ok, header={"typ": "JWT"}),
        "typ_absent": lambda: op.logout_token(overrides=ok, header={}),
        "id_token": lambda: op.sign({**op.id_token_claims(None, None), **ok, "nonce": "n"}),  # P-BCL-03
    }


BAD_LOGOUT_TOKENS = ["alg_none", "hs256", "bad_signature", "unknown_key", "wrong_aud", "secondary_aud", "wrong_iss",
                     "expired", "iat_old", "iat_future", "no_events", "wrong_event", "events_array",
                     "event_not_object", "with_nonce", "no_sub_no_sid", "no_jti", "no_iat", "no_exp", "typ_jwt",
                     "typ_absent", "id_token"]


@pytest.mark.usefixtures("op_identity")
@pytest.mark.parametrize("case", BAD_LOGOUT_TOKENS)
async def test_P_BCL_02_P_BCL_03_invalid_logout_tokens_are_400(env: Env, case: str) -> None:
    """P-BCL-02 / P-BCL-03 / rp-backchannel-rpinitlogout-lt-*: every invalid logout token (or an ID token) is a 400 and the live session survives."""
    b = await logged_in(env, "u-d", "sid-d")
    try:
        resp = await bcl_post(env, form(_bad_tokens(env.op)[case]()))
        assert resp.status == 400, (case, resp.status, resp.text)
        assert json.loads(resp.text) == {"error": "invalid_request"}
        assert resp.headers["Cache-Control"] == "no-store"
        assert await is_live(env, b)
    finally:
        await b.close()


@pytest.mark.usefixtures("op_identity")
async def test_P_BCL_04_P_BCL_05_replay_and_unknown_sid(env: Env) -> None:
    """P-BCL-04 / P-BCL-05: a replayed sub-only token (same jti) is a no-store 200 that ends nothing, not even the user's newer session; an unknown sid is a harmless 200."""
    b = await logged_in(env, "u-e", "sid-e")
    again: ScriptedBrowser | None = None
    try:
        token = env.op.logout_token(overrides={"sub": "u-e", "sid": DELETE})
        assert (await bcl_post(env, form(token))).status == 200
        assert not await is_live(env, b)
        again = await logged_in(env, "u-e", "sid-e2")
        replay = await bcl_post(env, form(token))
        assert replay.status == 200 and replay.headers["Cache-Control"] == "no-store"
        assert await is_live(env, again), "a replayed logout token ends the user's new session"
        assert env.flow_reasons("/oauth2/logout/backchannel")[-2:] == ["backchannel_logout", "backchannel_replayed"]
        assert (await bcl_post(env, form(env.op.logout_token(sid="never-seen")))).status == 200
    finally:
        await b.close()
        if again is not None:
            await again.close()


@pytest.mark.parametrize(("method", "body", "ctype", "status"), [
    ("GET", b"", "application/x-www-form-urlencoded", 405),
    ("POST", b'{"logout_token": "x"}', "application/json", 400),
    ("POST", b"--b\r\nContent-Disposition: form-data; name=logout_token\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b", 400),
    ("POST", b"other=1", "application/x-www-form-urlencoded", 400),
    ("POST", b"logout_token=a.b.c&logout_token=d.e.f", "application/x-www-form-urlencoded", 400),
    ("POST", b"logout_token=" + b"A" * (10 << 20), "application/x-www-form-urlencoded", 413),
])
async def test_P_BCL_06_wrong_requests(env: Env, method: str, body: bytes, ctype: str, status: int) -> None:
    """P-BCL-06: GET, JSON, multipart, a missing or repeated logout_token and a 10 MiB body are refused."""
    resp = await bcl_post(env, body, content_type=ctype, method=method)
    assert resp.status == status, resp.text
    assert resp.headers["Cache-Control"] == "no-store"


@pytest.mark.usefixtures("op_identity")
async def test_P_BCL_08_cookie_is_irrelevant(env: Env) -> None:
    """P-BCL-08: a request carrying a session cookie plus a logout token for another user ends only the named sessions."""
    carrier = await logged_in(env, "u-f", "sid-f")
    target = await logged_in(env, "u-g", "sid-g")
    try:
        cookie = f"{SESSION_COOKIE}={env.session_value(carrier)}"
        resp = await bcl_post(env, form(env.op.logout_token(sid="sid-g", overrides={"sub": "u-g"})), cookie=cookie)
        assert resp.status == 200
        assert await is_live(env, carrier)
        assert not await is_live(env, target)
    finally:
        await carrier.close()
        await target.close()


@pytest.mark.usefixtures("op_identity")
async def test_P_BCL_07_X_LIM_12_junk_logout_flood_is_bounded(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """P-BCL-07 / X-LIM-12: 240 concurrent junk logout requests are all 400, cost at most one signature check each and one JWKS fetch, while a live session keeps being served and survives."""
    live = await logged_in(env, "u-h", "sid-h")
    checks: list[int] = []
    select_key = oidc.select_key

    def counting(keys: Any, header: Any) -> Any:
        found = select_key(keys, header)
        checks.append(len(found))
        return found

    monkeypatch.setattr(oidc, "select_key", counting)
    ok = {"sub": "u-h", "sid": "sid-h"}

    def scrambled() -> str:
        h, p, s = env.op.logout_token(overrides=ok).split(".")
        raw = bytearray(base64.urlsafe_b64decode(s + "=="))
        raw[7] ^= 0xFF
        return f"{h}.{p}.{b64url(bytes(raw))}"

    junk: list[Callable[[], str]] = [
        lambda: "garbage", lambda: "a.b.c", scrambled, lambda: env.op.logout_token(overrides=ok, how="unknown"),
    ]
    jwks_before = len(env.op.seen("/jwks"))
    sem = asyncio.Semaphore(40)

    async def one(i: int) -> int:
        async with sem:
            return (await bcl_post(env, form(junk[i % len(junk)]()))).status

    async def keep_browsing() -> list[int]:
        return [(await live.get(env.base + f"/during-flood-{i}", follow=False)).status for i in range(20)]

    try:
        statuses, browsing = await asyncio.gather(asyncio.gather(*(one(i) for i in range(240))), keep_browsing())
        assert set(statuses) == {400}
        assert browsing == [200] * 20
        assert await is_live(env, live)
        assert len(checks) >= 120, len(checks)  # the scrambled and unknown-kid tokens reached key selection
        assert all(n <= 1 for n in checks), checks  # one key per token: never a try-every-key loop
        assert sum(checks) <= 240
        assert len(env.op.seen("/jwks")) - jwks_before <= 1  # unknown kids share one throttled refetch
    finally:
        await live.close()


# =============================================================================================
# issue 19, item 3: JWKS done right (rotation per token, bounded unknown-kid flood)


async def test_P_JWKS_01_idp_rotating_its_key_for_every_token(env: Env) -> None:
    """P-JWKS-01 / issue 19: five consecutive logins against an OP that signs every ID token with a new key all succeed, one JWKS fetch each."""
    env.op.behaviour.rotate_every_token = True
    async with env.browser() as first:
        assert (await run_login(env, first)).status == 200
    before, started = len(env.op.seen("/jwks")), time.monotonic()
    for _ in range(5):
        async with env.browser() as b:
            page = await run_login(env, b)
            assert page.status == 200, (page.status, env.flow_reasons()[-1:])
    assert len(env.op.seen("/jwks")) - before == 5
    assert len(env.op.rotated) == 6
    assert time.monotonic() - started < 5.0, "each login waited at most the floor for its fetch"


async def test_P_JWKS_02_random_kid_flood_beside_a_rotating_login(env: Env) -> None:
    """P-JWKS-02 / issue 19: 1,000 random-kid tokens verified at once cost at most three JWKS fetches while a login with a new key succeeds."""
    provider = env.provider()
    await provider.discover()
    env.op.behaviour.rotate_every_token = True
    before = len(env.op.seen("/jwks"))
    flood = [compact({"alg": "RS256", "kid": f"made-up-{i}"}, env.op.id_token_claims(None, None), b"\0" * 256)
             for i in range(1000)]
    async with env.browser() as b:
        results, page = await asyncio.gather(
            asyncio.gather(*(provider.verify(t) for t in flood), return_exceptions=True), run_login(env, b)
        )
    assert page.status == 200
    assert all(getattr(r, "code", None) == "id_token_unknown_key" for r in results)
    assert len(env.op.seen("/jwks")) - before <= 3
