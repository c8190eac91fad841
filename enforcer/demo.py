"""``enforcer demo``: a local OpenID Provider, a sample app and the enforcer, wired up.

Everything runs on loopback: the OpenID Provider (panva ``oidc-provider`` under node,
see ``enforcer.localidp``) on a free port with a certificate from the enforcer's own
CA, the sample app on a free port, and the enforcer on ``https://localhost:PORT``.
The sample app (:func:`sample_app`) shows the identity headers it receives and offers
a WebSocket echo, so a user can see what the protected app sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import secrets
import signal
import sys
from pathlib import Path

from aiohttp import WSMsgType, web

from enforcer import certs, config
from enforcer.daemon import Daemon

USERS = {
    "alice": {
        "password": "alice",
        "claims": {
            "email": "alice@example.com",
            "email_verified": True,
            "groups": ["admins", "staff"],
            "name": "Alice Admin",
            "preferred_username": "alice",
        },
    },
    "bob": {
        "password": "bob",
        "claims": {
            "email": "bob@example.com",
            "email_verified": True,
            "groups": ["staff"],
            "name": "Bob Staff",
            "preferred_username": "bob",
        },
    },
    "eve": {
        "password": "eve",
        "claims": {
            "email": "eve@example.com",
            "email_verified": False,
            "groups": ["contractors"],
            "name": "Eve Outsider",
            "preferred_username": "eve",
        },
    },
}


def sample_app() -> web.Application:
    """The protected demo app: echoes what it received, and a WebSocket echo."""

    async def page(request: web.Request) -> web.Response:
        ident = {k: v for k, v in request.headers.items() if k.lower().startswith("x-forwarded-")}
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in ident.items())
        body = (
            "<!doctype html><meta charset=utf-8><title>Sample app</title>"
            "<style>body{font-family:system-ui;max-width:44rem;margin:3rem auto}"
            "td{padding:.2rem .6rem;border-bottom:1px solid #ddd}</style>"
            f"<h1>Hello from the sample app</h1><p>You asked for <code>{html.escape(request.path_qs)}</code>.</p>"
            f"<p>The enforcer told me who you are:</p><table>{rows}</table>"
            "<p>Try <a href='/admin/'>/admin/</a> (admins only), <a href='/healthz'>/healthz</a> (public) "
            "and <a href='/oauth2/logout'>sign out</a>.</p>"
        )
        return web.Response(text=body, content_type="text/html")

    async def echo(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str("echo:" + msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
            return ws
        data = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": list(request.headers.items()),
                "body_bytes": len(data),
            }
        )

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/healthz", health)
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/{tail:.*}", page)
    return app


DEFINITIONS = """\
kind: service
name: demo-app
authorizationType: OIDC
OIDCClientID: demo-app
OIDCClientSecret: {{file: {secret_file}}}
OIDCProviderURL: {issuer}
OIDCCallbackURL: https://localhost:{port}
OIDCScopes: [openid, email, profile, groups]
hosts: [localhost]
port: {app_port}
exposedPort: {port}
selectors: [[app=demo, $identity=processingunit]]
exposedAPIs: [[httpresourcespec:name=demo-app]]
---
kind: httpresourcespec
name: demo-app
associatedTags: [httpresourcespec:name=demo-app]
endpoints:
  - {{URI: /healthz, methods: [GET], public: true}}
  - {{URI: /admin/*, methods: [GET, POST], allowedScopes: [[groups=admins, email_verified=true]]}}
  - {{URI: /echo, methods: [GET, POST], allowedScopes: [[groups=staff]]}}
  - {{URI: /*, methods: [GET], allowedScopes: [[groups=staff], [email=alice@example.com]]}}
"""

ENFORCER_YAML = """\
tags: [app=demo]
listen: {{address: "127.0.0.1", port: {port}}}
admin: {{address: 127.0.0.1, port: 0}}
stateDir: {state}
logsDir: {state}/logs
definitions:
  - file: {state}/definitions.yaml
oidc:
  caFile: {state}/ca/ca.crt
"""


async def _run(port: int, state: Path, exit_after: float | None) -> int:
    from enforcer import localidp  # noqa: PLC0415  (needs node; only the demo and tests use it)

    state.mkdir(parents=True, exist_ok=True, mode=0o700)  # noqa: ASYNC240  (start-up, before serving)
    store = certs.CertStore(state)
    store.ca_pem()
    idp_leaf = store.ensure_leaf("demo-idp", ["localhost", "127.0.0.1"])
    secret_file = state / "client-secret"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(24))
        secret_file.chmod(0o600)
    secret = secret_file.read_text().strip()

    runner = web.AppRunner(sample_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    app_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    callback = f"https://localhost:{port}/oauth2/callback"
    op = await localidp.start_op(
        state / "idp",
        clients=[
            {
                "client_id": "demo-app",
                "client_secret": secret,
                "redirect_uris": [callback],
                "post_logout_redirect_uris": [f"https://localhost:{port}/"],
                "token_endpoint_auth_method": "client_secret_basic",
            }
        ],
        users={name: localidp.OPUser(u["password"], u["claims"]) for name, u in USERS.items()},  # type: ignore[arg-type]
        cert_file=idp_leaf.cert,
        key_file=idp_leaf.key,
        ca_file=store.ca_dir / "ca.crt",
    )
    try:
        (state / "definitions.yaml").write_text(
            DEFINITIONS.format(secret_file=secret_file, issuer=op.issuer, port=port, app_port=app_port)
        )
        (state / "enforcer.yaml").write_text(ENFORCER_YAML.format(port=port, state=state))
        settings = config.load_settings(state / "enforcer.yaml")
        daemon = Daemon(settings)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(daemon.run(on_ready=ready))
        await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        if task.done():
            return task.result()
        print(
            "\n".join(
                [
                    "",
                    "enforcer demo is running",
                    f"  open          https://localhost:{port}/",
                    "  users         alice/alice (admins, staff)  bob/bob (staff)  eve/eve (no access)",
                    f"  trust the CA  {state}/ca/ca.crt   (or: curl --cacert {state}/ca/ca.crt ...)",
                    f"  flow log      enforcer flows -c {state}/enforcer.yaml --follow",
                    f"  explain       enforcer explain -c {state}/enforcer.yaml --service demo-app"
                    " --tags groups=staff GET /admin/",
                    f"  metrics       http://127.0.0.1:{daemon.admin_port}/metrics",
                    f"  identity provider {op.issuer}   sample app http://127.0.0.1:{app_port}/",
                    "Stop with Ctrl-C.",
                    "",
                ]
            ),
            flush=True,
        )
        if exit_after is not None:
            loop = asyncio.get_running_loop()
            loop.call_later(exit_after, daemon.stop)
        return await task
    finally:
        await op.stop()
        await runner.cleanup()


def main(*, port: int = 8443, state_dir: Path | None = None, exit_after: float | None = None) -> int:
    """Run the demo until Ctrl-C."""
    import logging  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = (state_dir or Path(os.environ.get("ENFORCER_DEMO_STATE", "demo-state"))).resolve()
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_run(port, state, exit_after))
    return 0


if __name__ == "__main__":  # pragma: no cover
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise SystemExit(main())
