"""``enforcer demo``: a local OpenID Provider, a sample app and the enforcer, wired up.

As root (unless ``--no-netns``) the demo shows the real product: it creates two network
namespaces, a "client host" (``enf-demo-client``) and an "app host" (``enf-demo-app``),
joined by a veth with private addresses that exist only inside them. The OpenID Provider,
the sample app (port 8080) and the enforcer (with ``redirect: {enabled: true}``) run inside
the app namespace: ``https://app.demo/`` on port 443 lands on the enforcer through the
nftables redirect, and port 8080 refuses the client host. This machine's ``--port`` and
``--idp-port`` are forwarded into the client namespace (``--forward``), so a browser here,
or on a laptop through ``ssh -L``, uses ``https://localhost:PORT/`` like a client host. The
demo re-runs itself under ``ip netns exec enf-demo-app``; the parent forwards Ctrl-C /
SIGTERM and deletes both namespaces when the child is gone.

Otherwise everything runs on loopback: the OpenID Provider (panva ``oidc-provider`` under
node, see ``enforcer.cli.localidp``) on ``--idp-port`` with a certificate from the
enforcer's own CA, the sample app on a free port, and the enforcer on
``https://localhost:PORT``.

The enforcer is ``enforcer run`` in a process of its own: ``--kill-enforcer`` SIGKILLs it to
show that nothing reaches the app without it, and the demo restarts it. The banner's ``$``
lines are commands that work when pasted. The sample app (:func:`sample_app`) shows the
identity headers it receives and offers a WebSocket echo, so a user can see what the
protected app sees.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import getpass
import html
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import WSMsgType, web

from enforcer.cli import localidp
from enforcer.http import certs

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

BROWSER_SERVICE = """\
---
kind: service
name: demo-app-browser
authorizationType: OIDC
OIDCClientID: demo-app
OIDCClientSecret: {{file: {secret_file}}}
OIDCProviderURL: {issuer}
OIDCCallbackURL: {origin}
OIDCScopes: [openid, email, profile, groups]
hosts: [localhost]
port: {app_port}
exposedPort: {exposed}
selectors: [[app=demo, $identity=processingunit]]
exposedAPIs: [[httpresourcespec:name=demo-app]]
"""
"""The same app for a browser on this machine (or a laptop): ``https://localhost:PORT`` is
forwarded into the client host and connects to the app host's port PORT from there (which
the redirect sends to the enforcer as it does 443)."""

ENFORCER_YAML = """\
tags: [app=demo]
listen: {{address: "{listen}", port: {port}}}
admin: {{address: 127.0.0.1, port: {admin_port}}}
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
NS_LISTEN_PORT = 4443
ADMIN_PORT = 9090  # inside the app namespace, where nothing else listens
RESTART_AFTER = 30.0
READY_TIMEOUT = 60.0
PID_FILE = "enforcer.pid"
USERS_LINE = "users         alice/alice (admins, staff)   bob/bob (staff)   eve/eve (no access)"


class PortInUse(Exception):
    """A port the demo needs is taken: the message names it and the option that changes it."""


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
    admin_port: int
    redirect: bool
    idp_issuer: str | None = None  # None: https://IDP_HOST:IDP_PORT
    browser_port: int | None = None  # netns: this machine's port forwarded to the app host's 443

    @property
    def browser_origin(self) -> str:
        return f"https://localhost:{self.browser_port}"

    @property
    def origin(self) -> str:
        return f"https://{self.host}" + ("" if self.exposed == 443 else f":{self.exposed}")


def _loopback_layout(port: int, idp_port: int) -> _Layout:
    return _Layout(
        "localhost", port, "127.0.0.1", ("127.0.0.1", 0), "127.0.0.1", idp_port, ("localhost", "127.0.0.1"),
        _free_port(), False,
    )  # fmt: skip


def _netns_layout(port: int, idp_port: int) -> _Layout:
    # the app binds every address, as apps do: only the enforcer's port block keeps the client out.
    # The identity provider is https://localhost:IDP_PORT for everyone: the enforcer (on the app host),
    # a browser on the client host and one on this machine (forwarders), or a laptop (ssh -L).
    return _Layout(
        DEMO_HOST, 443, "::", (None, APP_PORT), "::", idp_port, ("localhost", "127.0.0.1", "::1", APP4),
        ADMIN_PORT, True, f"https://localhost:{idp_port}", port,
    )  # fmt: skip


def ns_listen_port(port: int) -> int:
    """The enforcer's own port on the app host: not ``port``, which the redirect sends to it."""
    return NS_LISTEN_PORT if port != NS_LISTEN_PORT else NS_LISTEN_PORT + 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _require_free(host: str, port: int, option: str) -> None:
    """Raise :class:`PortInUse` if something listens on ``host:port`` already."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listeners do: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"port {port} is in use: choose another with {option}") from None
            raise


# ---------------------------------------------------------------------------------------------
# the commands the banner prints


def _enforcer_command() -> str:
    """How to run this checkout's ``enforcer`` from a shell: the bare name when PATH finds this
    very program (scripts/setup links it), else its full path (PATH has another checkout's)."""
    own = Path(sys.prefix) / "bin" / "enforcer"
    if not own.exists():
        return f"{sys.executable} -m enforcer"
    on_path = shutil.which("enforcer")
    if on_path is not None and Path(on_path).resolve() == own.resolve():
        return "enforcer"
    return str(own)


def _sudo() -> str:
    """``sudo `` when the demo runs under sudo: the person's own shell is not root."""
    return "sudo " if os.geteuid() == 0 and os.environ.get("SUDO_USER") else ""


def _cmd(command: str, expect: str = "") -> str:
    """One banner line a person (or the test) can paste: ``$ COMMAND   # -> what happens``."""
    return f"    $ {_sudo()}{command}" + (f"   # -> {expect}" if expect else "")


@dataclass(frozen=True)
class _Banner:
    """What the demo prints once it serves, and when the enforcer is killed."""

    running: list[str]
    killed: list[str]


def _curl_status(extra: str, url: str) -> str:
    return f"curl -sS -o /dev/null -w '%{{http_code}} %{{redirect_url}}\\n' {extra}{url}"


def _loopback_banner(lay: _Layout, state: Path, issuer: str, app_port: int) -> _Banner:
    enforcer = _enforcer_command()
    conf = f"-c {state}/enforcer.yaml"
    ca = f"{state}/ca/ca.crt"
    host = socket.gethostname()
    user = os.environ.get("SUDO_USER") or getpass.getuser()
    front = _curl_status(f"--cacert {ca} ", f"{lay.origin}/")
    running = [
        f"  open          {lay.origin}/   in a browser on this machine",
        f"  from a laptop ssh -L {lay.exposed}:127.0.0.1:{lay.exposed} -L {lay.idp_port}:127.0.0.1:{lay.idp_port}"
        f" {user}@{host}   then open {lay.origin}/ there",
        f"  trust the CA  {ca}   (import it in the browser, or accept the warning on both sites)",
        f"  {USERS_LINE}",
        f"  identity provider {issuer}   sample app http://127.0.0.1:{app_port}/",
        "  try",
        _cmd(front, "302 to the identity provider's login"),
        _cmd(f"{enforcer} flows {conf}", "the requests so far (add --follow to watch)"),
        _cmd(f"{enforcer} explain {conf} --service demo-app --tags groups=staff GET /admin/", "which rule decides"),
        _cmd(f"{enforcer} doctor {conf}", "checks IdP, certificates and ports"),
        _cmd(f"{enforcer} reload {conf}", "re-reads the definitions"),
        _cmd(f"curl -sS http://127.0.0.1:{lay.admin_port}/metrics | grep -m3 '^enforcer_'", "metrics"),
        _cmd(f"{enforcer} demo --kill-enforcer --state-dir {state}", "SIGKILL the enforcer, see what refuses"),
    ]
    killed = [
        "  the enforcer was killed with SIGKILL; nothing answers in its place:",
        _cmd(front, "refused: no enforcer, no way past it"),
        "  (on loopback the sample app's own port stays open; as root the demo blocks it with nftables)",
    ]
    return _Banner(running, killed)


def _netns_banner(lay: _Layout, state: Path, issuer: str, listen_port: int) -> _Banner:
    enforcer = _enforcer_command()
    conf = f"-c {state}/enforcer.yaml"
    ca = f"{state}/ca/ca.crt"
    client = f"ip netns exec {CLIENT_NS}"
    app = f"ip netns exec {APP_NS}"
    front = _curl_status(f"--cacert {ca} --resolve {DEMO_HOST}:443:{APP4} ", f"https://{DEMO_HOST}/")
    front6 = _curl_status(f"--cacert {ca} --resolve {DEMO_HOST}:443:[{APP6}] ", f"https://{DEMO_HOST}/")
    here = _curl_status(f"--cacert {ca} ", f"{lay.browser_origin}/")
    user = os.environ.get("SUDO_USER") or getpass.getuser()
    forwards = f"-L {lay.browser_port}:127.0.0.1:{lay.browser_port} -L {lay.idp_port}:127.0.0.1:{lay.idp_port}"
    app_port = f"curl -sS -m 5 http://{APP4}:{APP_PORT}/"
    running = [
        f"  network       client host {CLIENT_NS} ({CLIENT4}, {CLIENT6}) --veth-- app host {APP_NS}"
        f" ({APP4}, {APP6})",
        f"                on the app host: identity provider, sample app (:{APP_PORT}) and the enforcer"
        f" (:{listen_port}); nftables redirects :443 and :{lay.browser_port} to it",
        f"  open          {lay.browser_origin}/   in a browser on this machine: it is forwarded into"
        f" {CLIENT_NS}, which connects to the app host's port {lay.browser_port}",
        f"  from a laptop ssh {forwards} {user}@{socket.gethostname()}   then open {lay.browser_origin}/ there",
        f"  trust the CA  {ca}   (import it in the browser, or accept the warning on both sites)",
        f"  {USERS_LINE}",
        f"  identity provider {issuer} (forwarded to {APP4}:{lay.idp_port} on the app host)",
        "  try",
        _cmd(here, "302 to the identity provider's login (from this machine)"),
        _cmd(f"{client} {front}", "302 to the identity provider's login"),
        _cmd(f"{client} {front6}", "302 as well, over IPv6"),
        _cmd(f"{client} {app_port}", "refused: only the enforcer reaches the app"),
        _cmd(f"{app} {enforcer} doctor {conf}", "IdP, certificates, ports, live nftables table"),
        _cmd(f"{app} {enforcer} reload {conf}", "re-reads the definitions"),
        _cmd(f"{enforcer} flows {conf}", "the requests so far (add --follow to watch)"),
        _cmd(f"{enforcer} explain {conf} --service demo-app --tags groups=staff GET /admin/", "which rule decides"),
        _cmd(f"{app} curl -sS http://127.0.0.1:{lay.admin_port}/metrics | grep -m3 '^enforcer_'", "metrics"),
        _cmd(f"{enforcer} demo --kill-enforcer --state-dir {state}", "SIGKILL the enforcer, see what refuses"),
    ]
    killed = [
        "  the enforcer was killed with SIGKILL; its nftables table stays, so the app stays shut:",
        _cmd(f"{client} {front}", "refused: the redirect leads to no listener"),
        _cmd(f"{client} {app_port}", "refused: the app port stays blocked"),
    ]
    return _Banner(running, killed)


def _say(*lines: str) -> None:
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------------------
# the enforcer in a process of its own


def _die_with_parent() -> None:  # pragma: no cover  (runs in the child between fork and exec)
    """Linux: SIGTERM the enforcer when the demo dies, so no orphan keeps serving."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


class _Enforcer:
    """``enforcer run`` for the demo's config, started, awaited until ready, stopped."""

    def __init__(self, state: Path, admin_port: int) -> None:
        self.state = state
        self.admin_port = admin_port
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> int | None:
        """Start and wait for ``/readyz``; None once ready, else the exit code of a failed start."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "enforcer", "run", "-c", str(self.state / "enforcer.yaml"),
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
        (self.state / PID_FILE).write_text(f"{self.proc.pid}\n")
        url = f"http://127.0.0.1:{self.admin_port}/readyz"
        deadline = time.monotonic() + READY_TIMEOUT
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    return self.proc.returncode
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        if resp.status == 200:
                            return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), 0.2)
        print(f"enforcer demo: the enforcer was not ready after {READY_TIMEOUT:.0f} s", file=sys.stderr)
        await self.stop()
        return 1

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        with contextlib.suppress(FileNotFoundError):
            (self.state / PID_FILE).unlink()


async def _supervise(enforcer: _Enforcer, banner: _Banner, stop: asyncio.Event, restart_after: float) -> int:
    """Until ``stop``: bring the enforcer back after a SIGKILL; any other exit ends the demo."""
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while True:
            died = asyncio.ensure_future(enforcer.wait())
            await asyncio.wait([died, stopping], return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                died.cancel()
                return 0
            code = died.result()
            if code != -signal.SIGKILL:
                print(f"enforcer demo: the enforcer exited with status {code}", file=sys.stderr)
                return code if code > 0 else 1
            _say("", *banner.killed, f"  it comes back in {restart_after:.0f} s", "")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stopping), restart_after)
            if stop.is_set():
                return 0
            failed = await enforcer.start()
            if failed is not None:
                return failed
            _say(f"the enforcer is back (pid {enforcer.proc.pid if enforcer.proc else '?'})", "")
    finally:
        stopping.cancel()


# ---------------------------------------------------------------------------------------------
# the demo


async def _run(state: Path, lay: _Layout, port: int, exit_after: float | None, restart_after: float) -> int:
    if not lay.redirect:
        _require_free(lay.listen, port, "--port")
        _require_free(lay.idp_host, lay.idp_port, "--idp-port")
    state.mkdir(parents=True, exist_ok=True, mode=0o700)  # noqa: ASYNC240  (start-up, before serving)
    store = certs.CertStore(state)
    store.ca_pem()
    idp_leaf = store.ensure_leaf("demo-idp", list(lay.idp_names))
    secret_file = state / "client-secret"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(24))
        secret_file.chmod(0o600)
    secret = secret_file.read_text().strip()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    if exit_after is not None:
        loop.call_later(exit_after, stop.set)

    runner = web.AppRunner(sample_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, *lay.app_bind)
    await site.start()
    app_port = int(runner.addresses[0][1])

    origin = lay.origin
    origins = [origin] + ([lay.browser_origin] if lay.browser_port else [])
    op = await localidp.start_op(
        state / "idp",
        clients=[
            {
                "client_id": "demo-app",
                "client_secret": secret,
                "redirect_uris": [f"{o}/oauth2/callback" for o in origins],
                "post_logout_redirect_uris": [f"{o}/" for o in origins],
                "token_endpoint_auth_method": "client_secret_basic",
            }
        ],
        users={name: localidp.OPUser(u["password"], u["claims"]) for name, u in USERS.items()},  # type: ignore[arg-type]
        host=lay.idp_host,
        port=lay.idp_port,
        cert_file=idp_leaf.cert,
        key_file=idp_leaf.key,
        ca_file=store.ca_dir / "ca.crt",
        issuer=lay.idp_issuer,
    )
    enforcer = _Enforcer(state, lay.admin_port)
    try:
        definitions = DEFINITIONS.format(
            secret_file=secret_file, issuer=op.issuer, origin=origin, host=lay.host, app_port=app_port,
            exposed=lay.exposed,
        )  # fmt: skip
        if lay.browser_port:
            definitions += BROWSER_SERVICE.format(
                secret_file=secret_file, issuer=op.issuer, origin=lay.browser_origin, app_port=app_port,
                exposed=lay.browser_port,
            )  # fmt: skip
        (state / "definitions.yaml").write_text(definitions)
        (state / "enforcer.yaml").write_text(
            ENFORCER_YAML.format(
                listen=lay.listen, port=port, admin_port=lay.admin_port, state=state,
                redirect="true" if lay.redirect else "false",
            )
        )  # fmt: skip
        failed = await enforcer.start()
        if failed is not None:
            return failed
        if lay.redirect:
            banner = _netns_banner(lay, state, op.issuer, port)
        else:
            banner = _loopback_banner(lay, state, op.issuer, app_port)
        _say("", "enforcer demo is running", *banner.running, "Stop with Ctrl-C.", "")
        return await _supervise(enforcer, banner, stop, restart_after)
    finally:
        await enforcer.stop()
        await op.stop()
        await runner.cleanup()


def kill_enforcer(state: Path) -> int:
    """``enforcer demo --kill-enforcer``: SIGKILL the enforcer of the demo that uses ``state``."""
    pid_file = state / PID_FILE
    try:
        pid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        print(f"enforcer demo: no demo enforcer is running with state directory {state}", file=sys.stderr)
        return 1
    if b"run" not in cmdline or str(state / "enforcer.yaml").encode() not in cmdline:
        print(f"enforcer demo: pid {pid} is not this demo's enforcer any more", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGKILL)
    print(f"killed the demo's enforcer (pid {pid}) with SIGKILL; the demo's window says what to try")
    return 0


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


# ---------------------------------------------------------------------------------------------
# forwarding this machine's ports into the client host


def _host_listeners(port: int, option: str) -> list[socket.socket]:
    """Listening sockets on this machine's loopback (127.0.0.1, and ::1 where there is IPv6)."""
    socks: list[socket.socket] = []
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((address, port))
            s.listen(128)
        except OSError as exc:
            s.close()
            if exc.errno == errno.EADDRINUSE:
                for other in socks:
                    other.close()
                raise PortInUse(f"port {port} is in use: choose another with {option}") from None
            if family == socket.AF_INET:
                raise
            continue  # no ::1 here
        socks.append(s)
    return socks


async def _splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


async def _forward(specs: list[str]) -> None:
    """Forward until SIGTERM. ``FD>HOST:PORT``: an inherited listening socket (made on this machine
    before entering the client host); ``PORT>HOST:PORT``: listen on this namespace's loopback."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    servers = []
    for spec in specs:
        source, _, target = spec.partition(">")
        host, _, port_text = target.rpartition(":")

        async def handle(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str = host, port: int = int(port_text)
        ) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(host, port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(_splice(reader, up_writer), _splice(up_reader, writer))
            up_writer.close()
            writer.close()

        if source.startswith("fd"):
            sock = socket.socket(fileno=int(source[2:]))
            servers.append(await asyncio.start_server(handle, sock=sock))
        else:
            servers.append(await asyncio.start_server(handle, "127.0.0.1", int(source), reuse_address=True))
            with contextlib.suppress(OSError):  # no IPv6 loopback here
                servers.append(await asyncio.start_server(handle, "::1", int(source), reuse_address=True))
    await stop.wait()
    for server in servers:
        server.close()


def _start_forwarder(port: int, idp_port: int) -> tuple[subprocess.Popen[bytes], list[socket.socket]]:
    """This machine's ``port`` and ``idp_port`` -> the same ports of the app host, connecting from
    the client host; and the client host's own localhost:9443 -> the identity provider."""
    front = _host_listeners(port, "--port")
    try:
        idp = _host_listeners(idp_port, "--idp-port")
    except PortInUse:
        for s in front:
            s.close()
        raise
    specs = [f"fd{s.fileno()}>{APP4}:{port}" for s in front] + [f"fd{s.fileno()}>{APP4}:{idp_port}" for s in idp]
    specs.append(f"{idp_port}>{APP4}:{idp_port}")
    argv = [shutil.which("ip") or "/usr/sbin/ip", "netns", "exec", CLIENT_NS, sys.executable, "-m", "enforcer",
            "demo", *(x for spec in specs for x in ("--forward", spec))]  # fmt: skip
    proc = subprocess.Popen(  # noqa: S603  (fixed argv)
        argv, stdin=subprocess.DEVNULL, pass_fds=[s.fileno() for s in front + idp]
    )
    return proc, front + idp


def _run_in_namespaces(args: list[str], state: Path, port: int, idp_port: int) -> int:
    """Create the namespaces, run the demo inside the app one, delete them when it ends."""
    existing = _ip_output("netns", "list").stdout.split()
    if CLIENT_NS in existing or APP_NS in existing:
        print(
            f"enforcer demo: network namespace {CLIENT_NS} or {APP_NS} exists already (another demo running?); "
            f"remove them with: ip netns del {CLIENT_NS}; ip netns del {APP_NS}   (or use --no-netns)",
            file=sys.stderr,
        )
        return 1
    try:  # fail before creating anything
        _host_listeners(port, "--port")[0].close()
        _host_listeners(idp_port, "--idp-port")[0].close()
    except PortInUse as exc:
        print(f"enforcer demo: {exc}", file=sys.stderr)
        return 1
    child: subprocess.Popen[bytes] | None = None
    forwarder: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        _create_namespaces()
        forwarder, sockets = _start_forwarder(port, idp_port)
        for s in sockets:
            s.close()  # the forwarder has them
        argv = [shutil.which("ip") or "/usr/sbin/ip", "netns", "exec", APP_NS, sys.executable, "-m", "enforcer",
                "demo", "--netns-child", "--state-dir", str(state), *args]  # fmt: skip
        # `ip netns exec` enters the namespace and exec()s: child.pid is the demo's own PID
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)  # noqa: S603  (fixed argv)
        return child.wait()
    except RuntimeError as e:
        print(f"enforcer demo: cannot set up the network namespaces: {e}", file=sys.stderr)
        return 1
    except PortInUse as exc:
        print(f"enforcer demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if forwarder is not None:
            forwarder.terminate()
            try:
                forwarder.wait(10)
            except subprocess.TimeoutExpired:
                forwarder.kill()
                forwarder.wait()
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
    idp_port: int = IDP_PORT,
    state_dir: Path | None = None,
    exit_after: float | None = None,
    restart_after: float = RESTART_AFTER,
    netns: bool | None = None,
    netns_child: bool = False,
    kill: bool = False,
    forward: list[str] | None = None,
) -> int:
    """Run the demo until Ctrl-C (or ``exit_after`` seconds); ``kill``: SIGKILL a running demo's enforcer.

    ``netns``: None = in network namespaces when root (and ``ip`` is there), else loopback;
    False = loopback. ``netns_child``: this process already runs inside the app namespace.
    """
    state = (state_dir or Path(os.environ.get("ENFORCER_DEMO_STATE", "demo-state"))).resolve()
    if kill:
        return kill_enforcer(state)
    if forward:
        asyncio.run(_forward(forward))
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if netns is None:
        netns = os.geteuid() == 0 and shutil.which("ip") is not None
    if netns and not netns_child:
        args = ["--port", str(port), "--idp-port", str(idp_port), "--restart-after", str(restart_after)]
        if exit_after is not None:
            args += ["--exit-after", str(exit_after)]
        return _run_in_namespaces(args, state, port, idp_port)
    layout = _netns_layout(port, idp_port) if netns_child else _loopback_layout(port, idp_port)
    try:
        listen = ns_listen_port(port) if netns_child else port
        return asyncio.run(_run(state, layout, listen, exit_after, restart_after))
    except PortInUse as exc:
        print(f"enforcer demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":  # pragma: no cover
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise SystemExit(main())


def command(args: argparse.Namespace) -> int:
    """``enforcer demo``: a local OpenID Provider, a sample app and the enforcer in front of it."""
    return int(
        main(
            port=args.port,
            idp_port=args.idp_port,
            state_dir=args.state_dir,
            exit_after=args.exit_after,
            restart_after=args.restart_after,
            netns=False if args.no_netns else None,
            netns_child=args.netns_child,
            kill=args.kill_enforcer,
            forward=args.forward,
        )
    )
