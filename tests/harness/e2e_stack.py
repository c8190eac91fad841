"""A real stack for end-to-end tests: node oidc-provider, the enforcer process, an upstream.

Everything listens on 127.0.0.1.  The enforcer runs as its own process
(``python -m enforcer run``) so tests can restart and kill it; the upstream runs in
the test's event loop and records every request it receives (the "UP-SEES" oracle).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from tests.harness.browser import ScriptedBrowser
from tests.harness.op import OPUser, RunningOP, start_op

USERS = {
    "alice": OPUser(
        "alice-pw",
        {
            "email": "alice@example.com",
            "email_verified": True,
            "groups": ["admins", "staff"],
            "preferred_username": "alice",
            "name": "Alice",
        },
    ),
    "bob": OPUser(
        "bob-pw", {"email": "bob@example.com", "email_verified": True, "groups": ["staff"], "preferred_username": "bob"}
    ),
    "eve": OPUser(
        "eve-pw",
        {"email": "eve@example.com", "email_verified": False, "groups": ["contractors"], "preferred_username": "eve"},
    ),
}
HOST = "app.test"

DEFINITIONS = """\
kind: service
name: app
authorizationType: OIDC
OIDCClientID: app-client
OIDCClientSecret: {{file: {secret}}}
OIDCProviderURL: {issuer}
OIDCCallbackURL: https://{host}:{port}
OIDCScopes: [{scopes}]
hosts: [{host}]
port: {app_port}
exposedPort: {port}
selectors: [[role=web]]
exposedAPIs: [[httpresourcespec:name=app]]
type: HTTP
propagate: true
associatedTags: [service:name=app]
---
kind: httpresourcespec
name: app
associatedTags: [httpresourcespec:name=app]
endpoints:
  - {{URI: /public/*, methods: [GET, POST], public: true}}
  - {{URI: /admin/*, methods: [GET, POST], allowedScopes: [[groups=admins]]}}
  - {{URI: /upload, methods: [POST, PUT], allowedScopes: [[groups=staff]]}}
  - {{URI: /big, methods: [GET], allowedScopes: [[groups=staff]]}}
  - {{URI: /ws, methods: [GET], allowedScopes: [[groups=staff]]}}
  - {{URI: /*, methods: [GET], allowedScopes: [[groups=staff], [email=alice@example.com]]}}
"""

SCOPES = ("openid", "email", "profile", "groups")

CONFIG = """\
tags: [role=web]
listen: {{address: {address}, port: {port}}}
admin: {{address: 127.0.0.1, port: {admin_port}}}
stateDir: {state}
logsDir: {state}/logs
definitions:
  - file: {state}/definitions.yaml
oidc:
  caFile: {op_ca}
{extra}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Seen:
    """One request as the upstream app received it."""

    method: str
    target: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Upstream:
    """The protected app: records requests, streams big bodies, echoes WebSockets."""

    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None
    upload_sha256: list[str] = field(default_factory=list)

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._any)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _any(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.method, request.raw_path, list(request.headers.items())))
        if request.path == "/ws":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str("echo:" + msg.data)
            return ws
        if request.path == "/big":
            size = int(request.query.get("size", str(100 << 20)))
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.content_length = size
            await resp.prepare(request)
            chunk = b"x" * (1 << 20)
            sent = 0
            while sent < size:
                n = min(len(chunk), size - sent)
                await resp.write(chunk[:n])
                sent += n
            await resp.write_eof()
            return resp
        if request.path in ("/upload", "/public/upload"):  # (a public POST that reads its body: X-LIM-07)
            digest = hashlib.sha256()
            total = 0
            async for part in request.content.iter_chunked(1 << 16):
                digest.update(part)
                total += len(part)
            self.upload_sha256.append(digest.hexdigest())
            return web.json_response({"bytes": total, "sha256": digest.hexdigest()})
        if request.path == "/redirect-internal":
            raise web.HTTPFound(f"http://127.0.0.1:{self.port}/landing")
        if request.path == "/set-cookie":
            resp = web.Response(text="cookies")
            resp.headers.add("Set-Cookie", "__Host-enforcer-app=evil; Path=/; Secure")
            resp.headers.add("Set-Cookie", "appcookie=1; Path=/")
            return resp
        if request.path in RAW_ANSWERS:  # broken framing from the app (X-SMG-14)
            assert request.transport is not None
            request.transport.write(RAW_ANSWERS[request.path])
            request.transport.close()
            return web.Response()  # never sent: the transport is closed
        if request.path == "/shape":  # an answer shaped by the query (fast-path differential tests)
            return await self._shape(request)
        if request.path == "/ws-refuse":  # an app that refuses an upgrade (X-SMG-13)
            return web.Response(status=403, text="no upgrade for you")
        return web.json_response({"path": request.raw_path, "user": request.headers.get("X-Forwarded-User")})


    async def _shape(self, request: web.Request) -> web.StreamResponse:
        """?status=&body=&reason=&ctype=&date=1&location=&chunked=1&delay=: an app answer of that shape."""
        q = request.query
        status = int(q.get("status", "200"))
        body = q.get("body", "shaped body").encode()
        headers: dict[str, str] = {}
        if "ctype" in q:
            headers["Content-Type"] = q["ctype"]
        if "date" in q:
            headers["Date"] = "Mon, 01 Jan 2024 00:00:00 GMT"
        if "location" in q:
            headers["Location"] = f"http://127.0.0.1:{self.port}{q['location']}"
        if "delay" in q:
            await asyncio.sleep(float(q["delay"]))
        reason = q.get("reason")
        if q.get("chunked"):
            resp = web.StreamResponse(status=status, reason=reason, headers=headers)
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for part in (body[:4], body[4:]):
                if part:
                    await resp.write(part)
                    await asyncio.sleep(0.01)
            await resp.write_eof()
            return resp
        empty = status in (204, 304) or request.method == "HEAD"
        return web.Response(status=status, reason=reason, body=None if empty else body, headers=headers)


RAW_ANSWERS = {
    "/bad-framing": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nSMUGGLED",
    "/dup-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello!!",
    "/truncated": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/plain\r\n\r\n" + b"t" * 10,
}


@dataclass
class Stack:
    """The whole thing, plus helpers to make browsers and restart the enforcer."""

    workdir: Path
    op: RunningOP
    upstream: Upstream
    port: int
    admin_port: int
    process: subprocess.Popen[bytes] | None = None
    run_args: tuple[str, ...] = ()
    """Extra ``enforcer run`` arguments, e.g. ``("--workers", "2")``."""
    address: str = "127.0.0.1"
    """Where this enforcer listens (another loopback address for a second enforcer)."""
    op_admin: int | None = None
    """Port of the OP's test admin listener on 127.0.0.1 (``op_options={"test_admin_port": ...}``)."""

    @property
    def state(self) -> Path:
        return self.workdir / "state"

    @property
    def base(self) -> str:
        return f"https://{HOST}:{self.port}"

    @property
    def config(self) -> Path:
        return self.state / "enforcer.yaml"

    @property
    def flow_log(self) -> Path:
        return self.state / "logs" / "flows.jsonl"

    def ca_pem(self) -> bytes:
        return (self.state / "ca" / "ca.crt").read_bytes()

    def client_ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.ca_pem().decode())
        ctx.load_verify_locations(cadata=self.op.ca_pem.decode())
        return ctx

    def browser(self, **kwargs: Any) -> ScriptedBrowser:
        return ScriptedBrowser(self.client_ssl(), resolve={HOST: self.address, "localhost": "127.0.0.1"}, **kwargs)

    async def login(self, browser: ScriptedBrowser, user: str, path: str = "/") -> Any:
        return await browser.login(self.base + path, user, self.op.users[user].password)

    async def op_admin_call(self, method: str, path: str, body: Any = None) -> Any:
        """A call to the OP's test admin listener (see scripts/op/op.mjs); its JSON answer."""
        assert self.op_admin is not None, "start_stack(op_options={'test_admin_port': ...})"
        async with aiohttp.ClientSession() as http, http.request(
            method, f"http://127.0.0.1:{self.op_admin}{path}", json=body
        ) as r:
            assert r.status == 200, (r.status, await r.text())
            return await r.json()

    async def op_events(self, event: str | None = None, **match: str) -> list[dict[str, Any]]:
        """The OP's events so far (oldest first), only ``event`` ones with those fields if given."""
        rows: list[dict[str, Any]] = await self.op_admin_call("GET", "/events")
        return [r for r in rows if (event is None or r["event"] == event)
                and all(r.get(k) == v for k, v in match.items())]

    async def set_claims(self, user: str, **claims: Any) -> None:
        """Change ``user``'s claims at the OP (the next ID token, e.g. of a refresh, carries them)."""
        await self.op_admin_call("POST", f"/users/{user}/claims", claims)

    def start_enforcer(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.workdir / "enforcer.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "enforcer", "run", "-c", str(self.config), "--log-level", "info",
                 *self.run_args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError("enforcer exited:\n" + self.log_tail())
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(f"http://127.0.0.1:{self.admin_port}/readyz") as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise RuntimeError("enforcer not ready in time:\n" + self.log_tail())

    def log_tail(self) -> str:
        path = self.workdir / "enforcer.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    async def stop_enforcer(self, sig: int = signal.SIGTERM) -> int:
        proc = self.process
        if proc is None:
            return 0
        self.process = None
        if proc.poll() is None:
            proc.send_signal(sig)
            for _ in range(300):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                proc.kill()
        return proc.wait()

    async def restart(self) -> None:
        await self.stop_enforcer()
        self.start_enforcer()
        await self.wait_ready()

    async def wait_flow(self, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
        """The first flow record matching ``predicate`` (the log flushes every 200 ms)."""
        deadline = time.monotonic() + timeout
        while True:
            for row in self.flows():
                if predicate(row):
                    return row
            if time.monotonic() > deadline:
                raise AssertionError("no matching flow record")
            await asyncio.sleep(0.1)

    def flows(self) -> list[dict[str, Any]]:
        import json  # noqa: PLC0415

        if not self.flow_log.exists():
            return []
        return [json.loads(line) for line in self.flow_log.read_text().splitlines() if line.strip()]


async def start_stack(
    workdir: Path,
    run_args: tuple[str, ...] = (),
    *,
    scopes: tuple[str, ...] = SCOPES,
    extra_config: str = "",
    users: dict[str, OPUser] | None = None,
    op_options: dict[str, Any] | None = None,
    address: str = "127.0.0.1",
) -> Stack:
    """OP + upstream + enforcer, configured for each other; ready to serve.

    ``scopes`` are the service's ``OIDCScopes``; ``extra_config`` is YAML appended to the
    enforcer's configuration (e.g. a ``sessions:`` section); ``users`` replace :data:`USERS` at
    the OP; ``op_options`` go into op.mjs's configuration (``test_admin_port: 0`` picks a free
    port for the OP's test admin listener); ``address`` is where the enforcer listens."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    op_options = dict(op_options or {})
    if op_options.get("test_admin_port") == 0:
        op_options["test_admin_port"] = free_port()
    secret = "s3cr:et %+ " + os.urandom(6).hex()  # characters that need form-encoding (P-TOK-01)
    upstream = Upstream()
    await upstream.start()
    op = await start_op(
        workdir / "op",
        clients=[
            {
                "client_id": "app-client",
                "client_secret": secret,
                "redirect_uris": [f"https://{HOST}:{port}/oauth2/callback"],
                "post_logout_redirect_uris": [f"https://{HOST}:{port}/"],
                "token_endpoint_auth_method": "client_secret_basic",
            }
        ],
        users=USERS if users is None else users,
        options=op_options,
    )
    state = workdir / "state"
    state.mkdir(parents=True, exist_ok=True)
    secret_file = state / "client-secret"
    secret_file.write_text(secret, encoding="utf-8")
    (state / "definitions.yaml").write_text(
        DEFINITIONS.format(secret=secret_file, issuer=op.issuer, host=HOST, port=port, app_port=upstream.port,
                           scopes=", ".join(scopes))
    )
    (state / "enforcer.yaml").write_text(CONFIG.format(port=port, admin_port=admin_port, state=state, op_ca=op.ca_file,
                                                       address=address, extra=extra_config))
    stack = Stack(workdir=workdir, op=op, upstream=upstream, port=port, admin_port=admin_port, run_args=run_args,
                  address=address, op_admin=op_options.get("test_admin_port"))
    stack.start_enforcer()
    try:
        await stack.wait_ready()
    except Exception:
        await stop_stack(stack)
        raise
    return stack


async def start_peer(stack: Stack, workdir: Path, address: str) -> Stack:
    """A second enforcer for ``stack``'s service, OP and app: the same definitions and settings
    (so the same port, callback and session store) and the same CA, listening on ``address``
    (another loopback address); its own state directory and admin port. Stop it with
    :meth:`Stack.stop_enforcer` (the OP and app belong to ``stack``)."""
    state = workdir / "state"
    state.mkdir(parents=True, exist_ok=True)
    shutil.copytree(stack.state / "ca", state / "ca")
    shutil.copy(stack.state / "client-secret", state / "client-secret")
    (state / "definitions.yaml").write_text((stack.state / "definitions.yaml").read_text().replace(
        str(stack.state), str(state)))
    admin_port = free_port()
    config = stack.config.read_text().replace(str(stack.state), str(state))
    config = config.replace(f"address: {stack.address}, port: {stack.port}", f"address: {address}, port: {stack.port}")
    config = config.replace(f"port: {stack.admin_port}}}", f"port: {admin_port}}}")
    (state / "enforcer.yaml").write_text(config)
    peer = Stack(workdir=workdir, op=stack.op, upstream=stack.upstream, port=stack.port, admin_port=admin_port,
                 run_args=stack.run_args, address=address, op_admin=stack.op_admin)
    peer.start_enforcer()
    await peer.wait_ready()
    return peer


async def stop_stack(stack: Stack) -> None:
    await stack.stop_enforcer()
    await stack.op.stop()
    await stack.upstream.stop()
