"""The transparent redirect end to end: real namespaces, real OP, real enforcer process, real app.

A "client host" and an "app host" (two network namespaces joined by a veth, v4 + v6, test
addresses only inside them). On the app host run, each inside the app namespace:

* the real OpenID Provider (node oidc-provider) on ``IDP4:443``: the enforcer's own (marked)
  connections to it on 443 must *not* be redirected back to the enforcer. Users on the client
  host reach it through a test-only table (``dnat`` to itself at priority -102, so it wins
  against the enforcer's redirect at -101): it stands for "the IdP is reachable by users";
* a recording app (``tests/harness/recording_app.py``): app ``a`` on 8080 and app ``b`` on 8081, bound
  to every address, as a typical app binds;
* the enforcer (``python -m enforcer run``) with ``redirect: {enabled: true}``, listening on
  ``[::]:15443``: service ``app-a`` (app.test, exposedPort 443 -> 8080) and ``app-b``
  (other.test, exposedPort 8443 -> 8081).

The scripted browser runs on an event loop whose thread entered the client namespace. Needs
root (skips locally without it; fails with CI=true) and node (scripts/setup).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from enforcer.net import nftables, ruleset
from enforcer.net.nftables import LiveRuleset
from enforcer.net.ruleset import Chain, Expr, Rule, Ruleset
from tests.harness.browser import Response, ScriptedBrowser
from tests.harness.netns import Hosts, NetnsLoop, connect, refused, require_root, veth_hosts
from tests.harness.op import OPUser, RunningOP, make_tls_material, start_op
from tests.harness.prereq import require_e2e

pytestmark = [pytest.mark.root, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[1]
APP4, CLI4, IDP4 = "10.99.7.1", "10.99.7.2", "10.99.7.3"
APP6, CLI6 = "fd00:99:7::1", "fd00:99:7::2"
LISTEN = 15443
ADMIN = 9901
PORT_A, PORT_B = 8080, 8081
HOST_A, HOST_B = "app.test", "other.test"
ISSUER = f"https://{IDP4}"
USERS = {
    "alice": OPUser(
        "alice-pw",
        {"email": "alice@example.com", "email_verified": True, "groups": ["staff"], "preferred_username": "alice"},
    ),
}
APPLIED = re.compile(r"redirect table inet (\S+) applied in ([0-9.]+) ms")

DEFINITIONS = """\
kind: service
name: app-a
OIDCClientID: app-a
OIDCClientSecret: secret-a
OIDCProviderURL: {issuer}
OIDCCallbackURL: https://{host_a}
OIDCScopes: [openid, email, profile, groups]
hosts: [{host_a}]
port: {port_a}
exposedPort: 443
selectors: [[role=web]]
exposedAPIs: [[httpresourcespec:name=staff-only]]
---
kind: service
name: app-b
OIDCClientID: app-b
OIDCClientSecret: secret-b
OIDCProviderURL: {issuer}
OIDCCallbackURL: https://{host_b}:8443
OIDCScopes: [openid, email, profile, groups]
hosts: [{host_b}]
port: {port_b}
exposedPort: 8443
selectors: [[role=web]]
exposedAPIs: [[httpresourcespec:name=staff-only]]
---
kind: httpresourcespec
name: staff-only
associatedTags: [httpresourcespec:name=staff-only]
endpoints:
  - {{URI: /*, methods: [GET, POST], allowedScopes: [[groups=staff]]}}
"""

CONFIG = """\
tags: [role=web]
listen: {{address: "::", port: {listen}}}
admin: {{address: 127.0.0.1, port: {admin}}}
stateDir: {state}
logsDir: {state}/logs
definitions:
  - file: {state}/definitions.yaml
oidc:
  caFile: {op_ca}
redirect: {{enabled: true{extra}}}
"""


def _idp_passthrough(table: str) -> Ruleset:
    """Test-only: client -> IDP4:443 gets a NAT binding to itself first, so users reach the OP."""
    ip = ipaddress.ip_address(IDP4)
    exprs = (
        *ruleset._daddr(ip),
        *ruleset._tcp_dport(443),
        Expr("counter"),
        Expr("immediate", (("NFTA_IMMEDIATE_DREG", 1), ("NFTA_IMMEDIATE_DATA", (("NFTA_DATA_VALUE", ip.packed),)))),
        Expr("nat", (("NFTA_NAT_TYPE", 1), ("NFTA_NAT_FAMILY", 2), ("NFTA_NAT_REG_ADDR_MIN", 1))),  # dnat ip
    )
    return Ruleset(
        table,
        (Chain("prerouting", "nat", "prerouting", ruleset.NAT_PRIORITY - 1),),
        (Rule("prerouting", f"ip daddr {IDP4} tcp dport 443 counter dnat ip to {IDP4}", exprs),),
    )


# ---------------------------------------------------------------------------------------------
# raw requests from inside a namespace


@dataclass
class Raw:
    """One HTTP exchange over a connection made from a namespace."""

    status: int
    headers: dict[str, str]
    body: bytes
    peer_cert: dict[str, Any] | None = None


def _exchange(sock: Any, request: bytes) -> tuple[int, dict[str, str], bytes]:
    sock.sendall(request)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    return status, headers, body


def https_raw(
    netns: str, addr: str, port: int, *, sni: str, host: str, path: str, cadata: str, mark: int | None = None
) -> Raw:
    """GET over TLS from ``netns`` to ``addr:port``; verifies the server against ``cadata``."""
    ctx = ssl.create_default_context(cadata=cadata)
    with connect(netns, addr, port, mark=mark) as plain, ctx.wrap_socket(plain, server_hostname=sni) as tls:
        cert = tls.getpeercert()
        status, headers, body = _exchange(
            tls, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
    return Raw(status, headers, body, cert)


def http_raw(netns: str, addr: str, port: int, path: str) -> Raw:
    """Plain-HTTP GET from ``netns``."""
    with connect(netns, addr, port) as s:
        host = f"[{addr}]" if ":" in addr else addr
        status, headers, body = _exchange(
            s, f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
    return Raw(status, headers, body)


def _read_response(f: Any) -> tuple[int, dict[str, str]]:
    """One HTTP/1.1 response from a buffered reader (the connection stays open)."""
    status = int(f.readline().split()[1])
    headers: dict[str, str] = {}
    while (line := f.readline().decode("latin-1").strip()) != "":
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    f.read(int(headers.get("content-length", "0")))
    return status, headers


# ---------------------------------------------------------------------------------------------
# the stack


@dataclass
class Stack:
    hosts: Hosts
    workdir: Path
    op: RunningOP
    client: NetnsLoop
    record: Path
    apply_ms: list[float] = field(default_factory=list)
    enforcer: subprocess.Popen[bytes] | None = None

    @property
    def state(self) -> Path:
        return self.workdir / "state"

    @property
    def log_file(self) -> Path:
        return self.workdir / "enforcer.log"

    def write_config(self, extra: str = "") -> None:
        (self.state / "enforcer.yaml").write_text(
            CONFIG.format(listen=LISTEN, admin=ADMIN, state=self.state, op_ca=self.op.ca_file, extra=extra)
        )

    def cadata(self) -> str:
        return (self.state / "ca" / "ca.crt").read_text() + self.op.ca_pem.decode()

    def start_enforcer(self) -> None:
        with self.log_file.open("ab") as log:
            self.enforcer = subprocess.Popen(
                ["ip", "netns", "exec", self.hosts.app, sys.executable, "-m", "enforcer", "run",
                 "-c", str(self.state / "enforcer.yaml"), "--log-level", "info"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip

    def log_tail(self) -> str:
        return self.log_file.read_text(errors="replace")[-4000:] if self.log_file.exists() else ""

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until /readyz says ready: the enforcer discovered the OP over its marked socket."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.enforcer is not None and self.enforcer.poll() is not None:
                raise RuntimeError("enforcer exited:\n" + self.log_tail())
            with contextlib.suppress(OSError, ValueError, IndexError):
                raw = await asyncio.to_thread(http_raw, self.hosts.app, "127.0.0.1", ADMIN, "/readyz")
                if raw.status == 200:
                    self._note_apply()
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError("enforcer not ready in time:\n" + self.log_tail())

    def _note_apply(self) -> None:
        self.apply_ms = [float(m.group(2)) for m in APPLIED.finditer(self.log_file.read_text(errors="replace"))]

    async def stop_enforcer(self, sig: int = signal.SIGTERM) -> int:
        proc, self.enforcer = self.enforcer, None
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(sig)  # `ip netns exec` exec()s: this is the enforcer's own PID
        try:
            return await asyncio.wait_for(asyncio.to_thread(proc.wait), 30)
        except TimeoutError:
            proc.kill()
            return proc.wait()

    def seen(self) -> list[dict[str, Any]]:
        """Every request the apps received."""
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]

    def flows(self) -> list[dict[str, Any]]:
        path = self.state / "logs" / "flows.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    async def wait_flow(self, match: str | Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        """The first flow record for path ``match`` (or satisfying it); the log flushes every 200 ms."""
        deadline = time.monotonic() + timeout
        while True:
            for row in self.flows():
                if (match(row) if callable(match) else row.get("path") == match):
                    return row
            if time.monotonic() > deadline:
                raise AssertionError(f"no flow record for {match}")
            await asyncio.sleep(0.1)

    async def live(self) -> LiveRuleset:
        return await nftables.read_live(netns=self.hosts.app)

    async def browser(self, address: str) -> ScriptedBrowser:
        """A scripted browser on the client host's loop; both test hosts resolve to ``address``."""
        cadata = self.cadata()

        async def make() -> ScriptedBrowser:
            return ScriptedBrowser(ssl.create_default_context(cadata=cadata), resolve={HOST_A: address, HOST_B: address})

        return await self.client.run(make())

    async def login(self, browser: ScriptedBrowser, url: str) -> Response:
        return await self.client.run(browser.login(url, "alice", USERS["alice"].password))

    async def get(self, browser: ScriptedBrowser, url: str) -> Response:
        return await self.client.run(browser.get(url))

    async def close(self, browser: ScriptedBrowser) -> None:
        await self.client.run(browser.close())


@pytest_asyncio.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """Namespaces, OP, apps and the enforcer, all torn down afterwards (even on failure)."""
    require_root()
    require_e2e()
    workdir = tmp_path_factory.mktemp("redirect-e2e")
    pid = os.getpid()
    with contextlib.ExitStack() as cleanup:
        hosts = cleanup.enter_context(
            veth_hosts(f"enfc-e2e-{pid}", f"enfa-e2e-{pid}", app4=APP4, cli4=CLI4, app6=APP6, cli6=CLI6,
                       extra_app=(f"{IDP4}/24",))
        )  # fmt: skip
        await nftables.apply(_idp_passthrough(f"test_idp_{pid}"), netns=hosts.app)
        tls = make_tls_material(workdir / "op-tls", name="op", ips=(IDP4,), dns_names=())
        op = await start_op(
            workdir / "op",
            clients=[
                {
                    "client_id": "app-a",
                    "client_secret": "secret-a",
                    "redirect_uris": [f"https://{HOST_A}/oauth2/callback"],
                    "token_endpoint_auth_method": "client_secret_basic",
                },
                {
                    "client_id": "app-b",
                    "client_secret": "secret-b",
                    "redirect_uris": [f"https://{HOST_B}:8443/oauth2/callback"],
                    "token_endpoint_auth_method": "client_secret_basic",
                },
            ],
            users=USERS,
            host=IDP4,
            port=443,
            issuer=ISSUER,
            cert_file=tls.cert_file,
            key_file=tls.key_file,
            ca_file=tls.ca_file,
            netns=hosts.app,
        )
        apps: asyncio.subprocess.Process | None = None
        client: NetnsLoop | None = None
        s: Stack | None = None
        try:
            record = workdir / "seen.jsonl"
            apps = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", hosts.app, sys.executable, str(REPO / "tests" / "harness" / "recording_app.py"),
                str(record), f"a:{PORT_A}", f"b:{PORT_B}",
                stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL, cwd=REPO,
            )  # fmt: skip
            assert apps.stdout is not None
            line = await asyncio.wait_for(apps.stdout.readline(), 20)
            assert line.strip() == b"ready", line
            client = NetnsLoop(hosts.cli)
            s = Stack(hosts=hosts, workdir=workdir, op=op, client=client, record=record)
            s.state.mkdir()
            (s.state / "definitions.yaml").write_text(
                DEFINITIONS.format(issuer=ISSUER, host_a=HOST_A, host_b=HOST_B, port_a=PORT_A, port_b=PORT_B)
            )
            s.write_config()
            s.start_enforcer()
            await s.wait_ready()
            yield s
        finally:
            if s is not None:
                await s.stop_enforcer(signal.SIGKILL)
            if client is not None:
                client.close()
            if apps is not None and apps.returncode is None:
                apps.kill()
                await apps.wait()
            await op.stop()


# ---------------------------------------------------------------------------------------------
# tests


async def test_login_through_the_redirect_v4_and_v6(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    """X-NET-01: client -> https://app.test/ on 443 (v4, v6) lands on the enforcer, logs in at the OP, sees app a."""
    with capsys.disabled():
        print(f"\n[redirect e2e] enforcer log: redirect table applied in {stack.apply_ms} ms")
    assert stack.apply_ms, stack.log_tail()
    for address, path in ((APP4, "/hello-v4"), (APP6, "/hello-v6")):
        browser = await stack.browser(address)
        try:
            page = await stack.login(browser, f"https://{HOST_A}{path}")
            assert page.status == 200, (page.status, page.text[:300])
            assert json.loads(page.text) == {"app": "a", "path": path, "user": "alice"}
            assert any(u.startswith(ISSUER + "/") for u in page.urls), page.urls  # the login went to the OP
        finally:
            await stack.close(browser)
        rows = [r for r in stack.seen() if r["path"] == path]
        assert len(rows) == 1, rows
        headers = {k.lower(): v for k, v in rows[0]["headers"]}
        assert headers["x-forwarded-user"] == "alice"
        assert headers["x-forwarded-email"] == "alice@example.com"
        assert headers["x-forwarded-for"] == (CLI4 if address == APP4 else CLI6)  # not ::ffff:10.x
        assert rows[0]["app"] == "a"
        flow = await stack.wait_flow(path)
        assert flow["destination"] == f"{address}:443", flow
        assert flow["client"].startswith(CLI4 if address == APP4 else CLI6), flow


async def test_app_port_refused_from_client_open_on_loopback(stack: Stack) -> None:
    """X-NET-02: the apps' own ports reset connections from the client host (v4, v6), not on loopback."""
    before = await stack.live()
    for port in (PORT_A, PORT_B):
        for address in (APP4, APP6):
            assert refused(stack.hosts.cli, address, port), (address, port)
        for address in ("127.0.0.1", "::1"):
            raw = await asyncio.to_thread(http_raw, stack.hosts.app, address, port, f"/loopback-{port}")
            assert raw.status == 200
            assert json.loads(raw.body)["app"] == ("a" if port == PORT_A else "b")
    after = await stack.live()
    blocks = [(b.packets or 0, a.packets or 0) for b, a in zip(before.rules_of("input"), after.rules_of("input"), strict=True)]
    assert len(blocks) == 2
    assert all(a - b >= 2 for b, a in blocks), blocks  # the reject rules did it, two SYNs each
    assert not [r for r in stack.seen() if r["peer"] and CLI4 in r["peer"]]


async def test_local_connection_redirected_but_enforcer_reaches_idp_on_443(stack: Stack) -> None:
    """X-NET-03: on the app host, :443 lands on the enforcer, except for the enforcer's own marked sockets.

    An unmarked local connection even to the IdP's address lands on the enforcer, yet the
    enforcer is ready (it discovered the OP on IDP4:443) and logins work: its own sockets pass.
    """
    ca_enforcer = (stack.state / "ca" / "ca.crt").read_text()
    for address in (APP4, APP6, IDP4):
        # only the enforcer's CA is trusted: the handshake itself proves who answered
        raw = await asyncio.to_thread(
            https_raw, stack.hosts.app, address, 443, sni=HOST_A, host=HOST_A, path="/local", cadata=ca_enforcer
        )
        assert raw.status == 302, (address, raw)
        assert raw.headers["location"].startswith(f"{ISSUER}/"), raw.headers
    # the OP's certificate is only presented to a socket carrying the enforcer's mark
    marked = await asyncio.to_thread(
        https_raw, stack.hosts.app, IDP4, 443, sni=IDP4, host=IDP4, path="/.well-known/openid-configuration",
        cadata=stack.op.ca_pem.decode(), mark=ruleset.DEFAULT_MARK,
    )  # fmt: skip
    assert marked.status == 200
    assert json.loads(marked.body)["issuer"] == ISSUER
    live = await stack.live()
    mark_rule = live.rules_of("output")[0]
    assert "meta load mark => reg 1" in mark_rule.bytecode
    # NAT chains see a connection's first packet only: packets = marked connections (IdP, apps)
    assert mark_rule.packets, "the enforcer's own connections (IdP, app) never matched the mark rule"


UNPRIVILEGED_CLIENT = r"""
import socket, ssl, sys
address, host, mark = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
try:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    print("mark=set")
except PermissionError:
    print("mark=refused")
s.settimeout(10)
s.connect((address, 443))
ctx = ssl.create_default_context(cadata=sys.stdin.read())
with ctx.wrap_socket(s, server_hostname=host) as tls:
    tls.sendall(b"GET /local-unprivileged HTTP/1.1\r\nHost: " + host.encode()
                + b"\r\nX-Forwarded-User: admin\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := tls.recv(65536):
        data += chunk
print(data.split(b"\r\n")[0].decode())
"""


async def test_local_unprivileged_process_cannot_bypass_the_redirect(stack: Stack) -> None:
    """X-NET-04: a local process running as nobody cannot set the enforcer's mark, so its connections to :443 (even to the IdP's address) land on the enforcer and get LOGIN."""
    ca_enforcer = (stack.state / "ca" / "ca.crt").read_text()
    seen = len(stack.seen())
    for address in (APP4, APP6, IDP4):
        run = await asyncio.to_thread(
            subprocess.run,
            ["ip", "netns", "exec", stack.hosts.app, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "/usr/bin/python3", "-I", "-c", UNPRIVILEGED_CLIENT, address, HOST_A, str(ruleset.DEFAULT_MARK)],
            input=ca_enforcer, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert run.returncode == 0, (address, run.stderr[-1000:])
        # only the enforcer's CA is trusted: the handshake itself proves the enforcer answered
        assert run.stdout.splitlines() == ["mark=refused", "HTTP/1.1 302 Found"], (address, run.stdout)
    assert len(stack.seen()) == seen  # nothing reached the apps, spoofed identity header or not


async def test_two_services_picked_by_original_destination(stack: Stack) -> None:
    """443 -> app a, 8443 -> app b; app a's SNI/Host sent to b's port (and back) gets 421."""
    browser = await stack.browser(APP4)
    try:
        page = await stack.login(browser, f"https://{HOST_B}:8443/b-page")
        assert page.status == 200, (page.status, page.text[:300])
        assert json.loads(page.text)["app"] == "b"
        page = await stack.login(browser, f"https://{HOST_A}/a-page")
        assert page.status == 200, (page.status, page.text[:300])
        assert json.loads(page.text)["app"] == "a"
    finally:
        await stack.close(browser)
    seen = {r["path"]: r["app"] for r in stack.seen()}
    assert seen["/b-page"] == "b"
    assert seen["/a-page"] == "a"
    assert (await stack.wait_flow("/b-page"))["destination"] == f"{APP4}:8443"
    ca = stack.cadata()
    for address, port, host in ((APP4, 8443, HOST_A), (APP6, 8443, HOST_A), (APP4, 443, HOST_B)):
        path = f"/wrong-port-{port}-{host}-{address}"
        raw = await asyncio.to_thread(
            https_raw, stack.hosts.cli, address, port, sni=host, host=host, path=path, cadata=ca
        )
        assert raw.status == 421, (address, port, host, raw)
        destination = f"{address}:{port}"

        def refused_here(r: dict[str, Any], destination: str = destination, host: str = host) -> bool:
            return r.get("destination") == destination and r.get("host") == host and r.get("status") == 421

        flow = await stack.wait_flow(refused_here)
        assert flow["reason"] == "destination_mismatch", flow
        assert path not in {r["path"] for r in stack.seen()}


THIRD_SERVICE = """\
---
kind: service
name: app-c
OIDCClientID: app-c
OIDCClientSecret: secret-c
OIDCProviderURL: {issuer}
OIDCCallbackURL: https://third.test:9443
hosts: [third.test]
port: 8082
exposedPort: 9443
selectors: [[role=web]]
exposedAPIs: [[httpresourcespec:name=staff-only]]
"""


async def test_reload_replaces_the_table_and_open_connections_keep_flowing(stack: Stack) -> None:
    """X-NET-05: SIGHUP with a new service: its port is redirected and blocked at once; a live connection survives."""
    assert stack.enforcer is not None
    ctx = ssl.create_default_context(cadata=stack.cadata())
    conn = ctx.wrap_socket(connect(stack.hosts.cli, APP4, 443), server_hostname=HOST_A)
    with conn, conn.makefile("rb") as reader:

        def ask(path: str) -> int:
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST_A}\r\n\r\n".encode())
            return _read_response(reader)[0]

        assert await asyncio.to_thread(ask, "/before-reload") == 302
        assert refused(stack.hosts.cli, APP4, 9443)  # nothing redirects 9443 yet
        definitions = stack.state / "definitions.yaml"
        definitions.write_text(definitions.read_text() + THIRD_SERVICE.format(issuer=ISSUER))
        stack.enforcer.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while not any(f"cmp eq reg 1 0x{9443:04x}" in r.bytecode for r in (await stack.live()).rules_of("prerouting")):
            assert time.monotonic() < deadline, stack.log_tail()
            await asyncio.sleep(0.1)
        # the connection made before the replace keeps working (NAT is decided per connection)
        assert await asyncio.to_thread(ask, "/after-reload") == 302
    raw = await asyncio.to_thread(
        https_raw, stack.hosts.cli, APP6, 9443, sni="third.test", host="third.test:9443", path="/c",
        cadata=stack.cadata(),
    )  # fmt: skip
    assert raw.status == 302, raw
    assert raw.headers["location"].startswith(f"{ISSUER}/auth"), raw.headers
    for address in (APP4, APP6):
        assert refused(stack.hosts.cli, address, 8082)  # the new app's port is blocked too


async def test_kill_9_fails_closed_and_restart_adopts(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    """X-NET-05: kill -9: 443 refused, app ports blocked, nothing reaches the apps; restart resumes the session."""
    browser = await stack.browser(APP4)
    try:
        page = await stack.login(browser, f"https://{HOST_A}/before-kill")
        assert page.status == 200, page.text[:300]
        before = await stack.live()
        seen = len(stack.seen())

        assert stack.enforcer is not None
        stack.enforcer.kill()  # SIGKILL: no clean-up code runs
        assert await stack.stop_enforcer() == -signal.SIGKILL
        await _assert_closed(stack)
        assert len(stack.seen()) == seen
        after = await stack.live()
        assert after.exists
        assert [(r.chain, r.bytecode) for r in after.rules] == [(r.chain, r.bytecode) for r in before.rules]

        # restart: the leftover table is replaced atomically, and the old session still works
        stack.start_enforcer()
        await stack.wait_ready()
        assert len(stack.apply_ms) == 2, stack.log_tail()
        page = await stack.get(browser, f"https://{HOST_A}/after-restart")
        assert page.status == 200, page.text[:300]
        assert not page.history, page.urls  # no new login
        assert json.loads(page.text) == {"app": "a", "path": "/after-restart", "user": "alice"}
        assert len(stack.seen()) == seen + 1
        adopted = await stack.live()
        assert [(r.chain, r.bytecode) for r in adopted.rules] == [(r.chain, r.bytecode) for r in before.rules]
    finally:
        await stack.close(browser)
    with capsys.disabled():
        print(f"\n[redirect e2e] enforcer log, apply time at each start (initial, after kill -9): {stack.apply_ms} ms")


# ---------------------------------------------------------------------------------------------
# the life cycle: stop, unblock, boot (issue 19, item 1)


async def _assert_closed(stack: Stack) -> None:
    """From the client host (v4, v6): both exposed ports and both app ports refuse."""
    for address in (APP4, APP6):
        for port in (443, 8443, PORT_A, PORT_B):
            assert refused(stack.hosts.cli, address, port), (address, port)


def _rules(live: LiveRuleset) -> list[tuple[str, tuple[str, ...]]]:
    return [(r.chain, r.bytecode) for r in live.rules]


def enforcer_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """``enforcer <args> -c <config>`` on the app host, as an operator or a unit runs it."""
    return subprocess.run(
        ["ip", "netns", "exec", stack.hosts.app, sys.executable, "-m", "enforcer", *args,
         "-c", str(stack.state / "enforcer.yaml")],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
        env={k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"},
    )  # fmt: skip


@contextlib.asynccontextmanager
async def app_port_poller(stack: Stack) -> AsyncIterator[list[tuple[str, int]]]:
    """Connects from the client host to both app ports (v4, v6) every ~10 ms meanwhile; yields
    the list of connections that were accepted (each one an app reachable without the enforcer)."""
    accepted: list[tuple[str, int]] = []
    attempts = [0]
    done = threading.Event()

    async def poll() -> None:
        while not done.is_set():
            for address in (APP4, APP6):
                for port in (PORT_A, PORT_B):
                    attempts[0] += 1
                    try:
                        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), 1)
                    except (OSError, TimeoutError):
                        continue
                    accepted.append((address, port))
                    writer.close()
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(stack.client.run(poll(), timeout=300))
    try:
        await asyncio.sleep(0.1)
        yield accepted
    finally:
        done.set()
        await task
    assert attempts[0] > 20, attempts  # it did poll all along


async def test_clean_stop_keeps_the_ports_closed_until_unblock(stack: Stack) -> None:
    """X-NET-05: SIGTERM keeps the whole table (exposed ports refused, app ports blocked) and says so; a restart adopts it; only `enforcer unblock` opens them, and says so in the flow log."""
    before = await stack.live()
    async with app_port_poller(stack) as accepted:
        assert await stack.stop_enforcer(signal.SIGTERM) == 0, stack.log_tail()
        kept = await stack.live()
        assert kept.exists and _rules(kept) == _rules(before)
        await _assert_closed(stack)
        stop = await stack.wait_flow(lambda r: r.get("method") == "STOP")
        assert (stop["decision"], stop["reason"]) == ("lifecycle", "ports_blocked"), stop
        assert stop["endpoint"].startswith("table inet enforcer kept: exposed port(s) 443, 8443"), stop
        assert "app port(s) 8080, 8081" in stop["endpoint"], stop
        assert "redirect table inet enforcer kept" in stack.log_tail()

        stack.start_enforcer()  # a restart replaces the kept table atomically
        await stack.wait_ready()
        raw = await asyncio.to_thread(
            https_raw, stack.hosts.cli, APP4, 443, sni=HOST_A, host=HOST_A, path="/after-stop", cadata=stack.cadata()
        )
        assert raw.status == 302, raw
    assert accepted == []

    running = enforcer_cli(stack, "unblock")
    assert running.returncode == 1 and "an enforcer is running" in running.stderr, running
    assert (await stack.live()).exists

    assert await stack.stop_enforcer(signal.SIGTERM) == 0, stack.log_tail()
    unblocked = enforcer_cli(stack, "unblock")
    assert unblocked.returncode == 0, unblocked
    assert "removed by `enforcer unblock`" in unblocked.stderr, unblocked
    assert (await stack.live()).exists is False
    assert not refused(stack.hosts.cli, APP4, PORT_A)  # opened on purpose
    flow = await stack.wait_flow(lambda r: r.get("method") == "UNBLOCK")
    assert (flow["decision"], flow["reason"]) == ("lifecycle", "ports_unblocked"), flow
    again = enforcer_cli(stack, "unblock")
    assert again.returncode == 0 and "nothing was blocked" in again.stdout, again

    # opt-in: keepBlockOnStop: false removes the table at a clean stop, and says so
    stack.write_config(", keepBlockOnStop: false")
    stack.start_enforcer()
    await stack.wait_ready()
    assert await stack.stop_enforcer(signal.SIGTERM) == 0, stack.log_tail()
    assert (await stack.live()).exists is False
    flow = await stack.wait_flow(lambda r: r.get("method") == "STOP" and r.get("reason") == "ports_unblocked")
    assert "table inet enforcer removed" in flow["endpoint"], flow
    stack.write_config()


async def test_block_from_state_closes_the_ports_before_the_enforcer_starts(stack: Stack) -> None:
    """With no enforcer and no table (a boot), `enforcer block --from-state` installs the last-known-good table: every port refuses; the enforcer then starts over it with no app connection accepted at any moment."""
    assert stack.enforcer is None and (await stack.live()).exists is False
    assert not refused(stack.hosts.cli, APP4, PORT_A)  # the boot's starting point: an open app
    blocked = enforcer_cli(stack, "block", "--from-state")
    assert blocked.returncode == 0, blocked
    assert "installed from the last-known-good definitions" in blocked.stderr, blocked
    await _assert_closed(stack)
    table = await stack.live()
    flow = await stack.wait_flow(lambda r: r.get("method") == "BLOCK")
    assert (flow["decision"], flow["reason"]) == ("lifecycle", "ports_blocked"), flow
    async with app_port_poller(stack) as accepted:
        stack.start_enforcer()
        await stack.wait_ready()
        raw = await asyncio.to_thread(
            https_raw, stack.hosts.cli, APP6, 8443, sni=HOST_B, host=f"{HOST_B}:8443", path="/after-boot",
            cadata=stack.cadata(),
        )  # fmt: skip
        assert raw.status == 302, raw
    assert accepted == []
    assert _rules(await stack.live()) == _rules(table)  # the boot table was the daemon's own
