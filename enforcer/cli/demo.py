"""``enforcer demo``: a local OpenID Provider, a sample app and the enforcer, wired up.

As root (unless ``--no-netns``) the demo shows the real product: it creates two network
namespaces, a "client host" (``enf-demo-client``) and an "app host" (``enf-demo-app``),
joined by a veth with private addresses that exist only inside them. The OpenID Provider
(on the app host's address, port 9443), the sample app (port 8080) and the enforcer (with
``redirect: {enabled: true}``) run inside the app namespace: ``https://app.demo/`` on port
443 lands on the enforcer through the nftables redirect, and port 8080 refuses the client
host. The demo re-runs itself under ``ip netns exec enf-demo-app``; the parent forwards
Ctrl-C / SIGTERM and deletes both namespaces when the child is gone.

Otherwise everything runs on loopback: the OpenID Provider (panva ``oidc-provider`` under
node, see ``enforcer.localidp``) on a free port with a certificate from the enforcer's own
CA, the sample app on a free port, and the enforcer on ``https://localhost:PORT``.
The sample app (:func:`sample_app`) shows the identity headers it receives and offers
a WebSocket echo, so a user can see what the protected app sees.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import html
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from aiohttp import WSMsgType, web

from enforcer.cli import localidp
from enforcer.config import settings as config
from enforcer.http import certs
from enforcer.run.daemon import Daemon

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
OIDCCallbackURL: {origin}
OIDCScopes: [openid, email, profile, groups]
hosts: [{host}]
port: {app_port}
exposedPort: {exposed}
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
listen: {{address: "{listen}", port: {port}}}
admin: {{address: 127.0.0.1, port: 0}}
stateDir: {state}
logsDir: {state}/logs
definitions:
  - file: {state}/definitions.yaml
oidc:
  caFile: {state}/ca/ca.crt
redirect: {{enabled: {redirect}}}
"""

CLIENT_NS, APP_NS = "enf-demo-client", "enf-demo-app"
APP4, CLIENT4 = "10.203.0.1", "10.203.0.2"
APP6, CLIENT6 = "fd00:203::1", "fd00:203::2"
DEMO_HOST = "app.demo"
IDP_PORT = 9443
APP_PORT = 8080


@dataclass(frozen=True)
class _Layout:
    """Where the demo's pieces listen."""

    host: str  # the service's host name
    exposed: int  # what users connect to
    listen: str  # the enforcer's listener address
    app_bind: tuple[str | None, int]  # the sample app (None: every address, v4 and v6)
    idp_host: str
    idp_port: int
    idp_names: tuple[str, ...]  # the IdP certificate's SANs
    redirect: bool

    @property
    def origin(self) -> str:
        return f"https://{self.host}" + ("" if self.exposed == 443 else f":{self.exposed}")


def _loopback_layout(port: int) -> _Layout:
    return _Layout("localhost", port, "127.0.0.1", ("127.0.0.1", 0), "127.0.0.1", 0, ("localhost", "127.0.0.1"), False)


def _netns_layout() -> _Layout:
    # the app binds every address, as apps do: only the enforcer's port block keeps the client out
    return _Layout(DEMO_HOST, 443, "::", (None, APP_PORT), APP4, IDP_PORT, ("localhost", "127.0.0.1", APP4), True)


async def _run(port: int, state: Path, exit_after: float | None, layout: _Layout | None = None) -> int:
    lay = layout or _loopback_layout(port)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)  # noqa: ASYNC240  (start-up, before serving)
    store = certs.CertStore(state)
    store.ca_pem()
    idp_leaf = store.ensure_leaf("demo-idp", list(lay.idp_names))
    secret_file = state / "client-secret"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(24))
        secret_file.chmod(0o600)
    secret = secret_file.read_text().strip()

    runner = web.AppRunner(sample_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, *lay.app_bind)
    await site.start()
    app_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    origin = lay.origin
    op = await localidp.start_op(
        state / "idp",
        clients=[
            {
                "client_id": "demo-app",
                "client_secret": secret,
                "redirect_uris": [f"{origin}/oauth2/callback"],
                "post_logout_redirect_uris": [f"{origin}/"],
                "token_endpoint_auth_method": "client_secret_basic",
            }
        ],
        users={name: localidp.OPUser(u["password"], u["claims"]) for name, u in USERS.items()},  # type: ignore[arg-type]
        host=lay.idp_host,
        port=lay.idp_port,
        cert_file=idp_leaf.cert,
        key_file=idp_leaf.key,
        ca_file=store.ca_dir / "ca.crt",
    )
    try:
        (state / "definitions.yaml").write_text(
            DEFINITIONS.format(
                secret_file=secret_file, issuer=op.issuer, origin=origin, host=lay.host, app_port=app_port,
                exposed=lay.exposed,
            )
        )
        (state / "enforcer.yaml").write_text(
            ENFORCER_YAML.format(
                listen=lay.listen, port=port, state=state, redirect="true" if lay.redirect else "false"
            )
        )
        settings = config.load_settings(state / "enforcer.yaml")
        daemon = Daemon(settings)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(daemon.run(on_ready=ready))
        await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        if task.done():
            return task.result()
        if lay.redirect:
            lines = _netns_banner(state, op.issuer, daemon.listen_port)
        else:
            lines = [
                f"  open          {origin}/",
                "  users         alice/alice (admins, staff)  bob/bob (staff)  eve/eve (no access)",
                f"  trust the CA  {state}/ca/ca.crt   (or: curl --cacert {state}/ca/ca.crt ...)",
                f"  flow log      enforcer flows -c {state}/enforcer.yaml --follow",
                f"  explain       enforcer explain -c {state}/enforcer.yaml --service demo-app"
                " --tags groups=staff GET /admin/",
                f"  metrics       http://127.0.0.1:{daemon.admin_port}/metrics",
                f"  identity provider {op.issuer}   sample app http://127.0.0.1:{app_port}/",
            ]
        print("\n".join(["", "enforcer demo is running", *lines, "Stop with Ctrl-C.", ""]), flush=True)
        if exit_after is not None:
            loop = asyncio.get_running_loop()
            loop.call_later(exit_after, daemon.stop)
        return await task
    finally:
        await op.stop()
        await runner.cleanup()


def _netns_banner(state: Path, issuer: str, listen_port: int) -> list[str]:
    ca = f"{state}/ca/ca.crt"
    client = f"ip netns exec {CLIENT_NS}"
    return [
        f"  network       client host {CLIENT_NS} ({CLIENT4}, {CLIENT6}) --veth-- app host {APP_NS}"
        f" ({APP4}, {APP6})",
        f"                on the app host: identity provider, sample app (:{APP_PORT}) and the enforcer"
        f" (:{listen_port}); nftables redirects :443 to it",
        f"  try           {client} curl --cacert {ca} --resolve {DEMO_HOST}:443:{APP4} https://{DEMO_HOST}/",
        f"                -> 302 to the identity provider's login (IPv6: --resolve {DEMO_HOST}:443:[{APP6}]);"
        f" a browser in {CLIENT_NS} resolving {DEMO_HOST} to {APP4} can log in",
        "  users         alice/alice (admins, staff)  bob/bob (staff)  eve/eve (no access)",
        f"  identity provider {issuer} (trusts the same CA)",
        f"  app port      {client} curl http://{APP4}:{APP_PORT}/   -> refused: only the enforcer reaches the app",
        f"  rules         ip netns exec {APP_NS} enforcer doctor -c {state}/enforcer.yaml   (live table vs expected)",
        f"  flow log      enforcer flows -c {state}/enforcer.yaml --follow",
    ]


def _ip_output(*args: str) -> subprocess.CompletedProcess[str]:
    """``ip ARGS`` (iproute2, found on PATH); never raises for a failed command."""
    ip = shutil.which("ip") or "/usr/sbin/ip"
    return subprocess.run([ip, *args], capture_output=True, text=True, timeout=20, check=False)  # noqa: S603  (fixed argv)


def _ip(*args: str) -> None:
    done = _ip_output(*args)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _delete_namespaces() -> None:
    for ns in (CLIENT_NS, APP_NS):
        _ip_output("netns", "del", ns)


def _create_namespaces() -> None:
    """Client and app namespaces joined by a veth that is created inside the app namespace."""
    _ip("netns", "add", CLIENT_NS)
    _ip("netns", "add", APP_NS)
    _ip("-n", APP_NS, "link", "add", "veth-app", "type", "veth", "peer", "name", "veth-client", "netns", CLIENT_NS)
    for ns, dev, v4, v6 in ((APP_NS, "veth-app", APP4, APP6), (CLIENT_NS, "veth-client", CLIENT4, CLIENT6)):
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
        _ip("-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
        _ip("-n", ns, "link", "set", dev, "up")


def _run_in_namespaces(port: int, state: Path, exit_after: float | None) -> int:
    """Create the namespaces, run the demo inside the app one, delete them when it ends."""
    existing = _ip_output("netns", "list").stdout.split()
    if CLIENT_NS in existing or APP_NS in existing:
        print(
            f"enforcer demo: network namespace {CLIENT_NS} or {APP_NS} exists already (another demo running?); "
            f"remove them with: ip netns del {CLIENT_NS}; ip netns del {APP_NS}   (or use --no-netns)",
            file=sys.stderr,
        )
        return 1
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        _create_namespaces()
        argv = [shutil.which("ip") or "/usr/sbin/ip", "netns", "exec", APP_NS, sys.executable, "-m", "enforcer",
                "demo", "--netns-child", "--port", str(port), "--state-dir", str(state)]  # fmt: skip
        if exit_after is not None:
            argv += ["--exit-after", str(exit_after)]
        # `ip netns exec` enters the namespace and exec()s: child.pid is the demo's own PID
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)  # noqa: S603  (fixed argv)
        return child.wait()
    except RuntimeError as e:
        print(f"enforcer demo: cannot set up the network namespaces: {e}", file=sys.stderr)
        return 1
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        _delete_namespaces()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(
    *,
    port: int = 8443,
    state_dir: Path | None = None,
    exit_after: float | None = None,
    netns: bool | None = None,
    netns_child: bool = False,
) -> int:
    """Run the demo until Ctrl-C (or ``exit_after`` seconds).

    ``netns``: None = in network namespaces when root (and ``ip`` is there), else loopback;
    False = loopback. ``netns_child``: this process already runs inside the app namespace.
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = (state_dir or Path(os.environ.get("ENFORCER_DEMO_STATE", "demo-state"))).resolve()
    if netns is None:
        netns = os.geteuid() == 0 and shutil.which("ip") is not None
    if netns and not netns_child:
        return _run_in_namespaces(port, state, exit_after)
    layout = _netns_layout() if netns_child else None
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_run(port, state, exit_after, layout))
    return 0


if __name__ == "__main__":  # pragma: no cover
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise SystemExit(main())


def command(args: argparse.Namespace) -> int:
    """``enforcer demo``: a local OpenID Provider, a sample app and the enforcer in front of it."""
    return int(
        main(
            port=args.port,
            state_dir=args.state_dir,
            exit_after=args.exit_after,
            netns=False if args.no_netns else None,
            netns_child=args.netns_child,
        )
    )
