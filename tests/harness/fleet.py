"""A fleet for root tests: three enforcers on three "hosts" behind HAProxy, sharing one Redis.

Network namespaces (names carry the PID, all deleted afterwards), joined by a bridge that lives
in the hub namespace::

    client  10.98.0.2 ──┐
    host 1  10.98.0.11 ─┤  br0 in the hub, 10.98.0.1: HAProxy :443 (TCP, round-robin over the
    host 2  10.98.0.12 ─┤  three enforcers' :443), redis-server :6379 (ACL user, RDB), the node
    host 3  10.98.0.13 ─┘  OpenID Provider :8443, the recording app :8080

Each host runs ``python -m enforcer run`` on ``0.0.0.0:443`` (admin on its own loopback) with
``sessions.store: redis``; all three share one CA (copied into each ``stateDir``) so the browser
sees one certificate authority whichever enforcer answers. In the hub ``app.test`` resolves to the
load balancer (``/etc/netns/<hub>/hosts``), so the OP's back-channel logout goes through it. The
OP (oidc-provider) refuses to call special-use addresses (10/8 and the like: its SSRF guard), so
for it the load balancer also listens on :data:`LB_PUBLIC`, an address outside those ranges that
exists only on the hub's bridge (nothing routes out of these namespaces).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enforcer.http.certs import CertStore
from tests.harness.browser import ScriptedBrowser
from tests.harness.netns import NetnsLoop, connect, ip
from tests.harness.op import OPUser, RunningOP, start_op

REPO = Path(__file__).resolve().parents[2]
HUB4, CLI4 = "10.98.0.1", "10.98.0.2"
LB_PUBLIC = "100.128.98.1"  # not special-use (100.64/10 ends at 100.127): the OP may call it
HOST4 = ("10.98.0.11", "10.98.0.12", "10.98.0.13")
OP_PORT, REDIS_PORT, APP_PORT, ADMIN = 8443, 6379, 8080, 9901
HOST = "app.test"
BASE = f"https://{HOST}"
ISSUER = f"https://{HUB4}:{OP_PORT}"
REDIS_PASSWORD = "fleet-redis-password"
COOKIE = "__Host-enforcer-app"
USERS = {
    "alice": OPUser(
        "alice-pw",
        {"email": "alice@example.com", "email_verified": True, "groups": ["staff"], "preferred_username": "alice"},
    ),
}

DEFINITIONS = f"""\
kind: service
name: app
OIDCClientID: app
OIDCClientSecret: secret-app
OIDCProviderURL: {ISSUER}
OIDCCallbackURL: {BASE}
OIDCScopes: [openid, email, profile, groups]
hosts: [{HOST}]
port: {APP_PORT}
upstreamHost: {HUB4}
exposedPort: 443
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
listen: {{address: 0.0.0.0, port: 443}}
admin: {{address: 127.0.0.1, port: {admin}}}
stateDir: {state}
logsDir: {state}/logs
definitions:
  - file: {state}/definitions.yaml
oidc:
  caFile: {op_ca}
sessions:
  store: redis
  redis: {{url: "redis://{hub}:{redis_port}", username: enforcer, passwordFile: {password}, timeout: 300ms,
           staleness: 1s}}
"""

HAPROXY = """\
global
  maxconn 2000
defaults
  mode tcp
  timeout connect 1s
  timeout client 60s
  timeout server 60s
  retries 3
  option redispatch 1
listen enforcers
  bind {hub}:443
  bind {public}:443
  balance roundrobin
{servers}
"""


def _run(*args: str) -> None:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=20, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()}")


def admin_get(netns: str, path: str) -> tuple[int, bytes]:
    """Plain-HTTP GET of the admin listener of the enforcer in ``netns``."""
    with connect(netns, "127.0.0.1", ADMIN, timeout=2) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@dataclass
class Enforcer:
    """One enforcer process on its own host (namespace)."""

    netns: str
    address: str
    state: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.state.parent / "enforcer.log"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-m", "enforcer", "run",
                 "-c", str(self.state / "enforcer.yaml"), "--log-level", "info"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"enforcer on {self.netns} exited:\n" + self.tail())
            with contextlib.suppress(OSError, ValueError, IndexError):
                status, _ = await asyncio.to_thread(admin_get, self.netns, "/readyz")
                if status == 200:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"enforcer on {self.netns} not ready in time:\n" + self.tail())

    async def stop(self, sig: int = signal.SIGTERM) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)  # `ip netns exec` exec()s: this is the enforcer's own PID
        try:
            return await asyncio.wait_for(asyncio.to_thread(proc.wait), 20)
        except TimeoutError:
            proc.kill()
            return proc.wait()

    def store_state(self) -> tuple[float | None, int, dict[str, Any]]:
        """What this enforcer says of its session store: ``enforcer_session_store_up`` on
        /metrics (None if absent), and /readyz's status and problems."""
        _, metrics = admin_get(self.netns, "/metrics")
        up = next((float(line.split()[1]) for line in metrics.decode().splitlines()
                   if line.startswith("enforcer_session_store_up ")), None)
        status, body = admin_get(self.netns, "/readyz")
        return up, status, json.loads(body).get("problems", {})

    def flows(self) -> list[dict[str, Any]]:
        path = self.state / "logs" / "flows.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Redis:
    """redis-server in the hub: TCP on the bridge, ACL user ``enforcer``, default user off,
    persistence by an RDB snapshot at SIGTERM (a stop and start keeps the sessions). Not AOF:
    Redis 7.0.15 fails to replay the store's ``MULTI`` blocks from the AOF ("NOPERM ACLs rules
    changed ...") and starts without those keys."""

    hub: str
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def password_file(self) -> Path:
        return self.dir / "password"

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.password_file.write_text(REDIS_PASSWORD + "\n")
        lines = [
            f"bind {HUB4}", f"port {REDIS_PORT}", f"dir {self.dir}", "save 3600 1", "appendonly no",
            "user default off",
            f"user enforcer on >{REDIS_PASSWORD} ~enforcer:* &enforcer:* +@all -@dangerous",
        ]
        (self.dir / "redis.conf").write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        with (self.dir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.hub, "redis-server", str(self.dir / "redis.conf")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                connect(self.hub, HUB4, REDIS_PORT, timeout=1).close()
                return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def pause(self, paused: bool) -> None:
        """SIGSTOP / SIGCONT: a Redis that keeps its connections and never answers (``ip netns
        exec`` exec()s: the PID is redis-server's)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a paused one cannot act on SIGTERM
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Fleet:
    """Everything the fleet tests touch."""

    workdir: Path
    hub: str
    cli: str
    enforcers: list[Enforcer]
    redis: Redis
    op: RunningOP
    client: NetnsLoop
    record: Path
    ca_pem: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def seen(self) -> list[dict[str, Any]]:
        """Every request the app received (``peer`` names the enforcer that sent it)."""
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]

    def client_ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca_pem + self.op.ca_pem.decode())

    async def browser(self, address: str = HUB4, **kwargs: Any) -> ScriptedBrowser:
        """A scripted browser on the client host's loop; ``app.test`` resolves to ``address``
        (the load balancer by default, or one enforcer directly)."""
        ctx = self.client_ssl()

        async def make() -> ScriptedBrowser:
            return ScriptedBrowser(ctx, resolve={HOST: address}, **kwargs)

        return await self.client.run(make())


def _spawn(netns: str, args: list[str], *, stdout: Any) -> subprocess.Popen[bytes]:
    """Start ``args`` inside ``netns`` (stderr with stdout, or to the test's stderr for a pipe)."""
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, *args], stdout=stdout,
        stderr=None if stdout is subprocess.PIPE else subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip


def _hub_hosts_file(hub: str) -> Path:
    """``/etc/netns/<hub>/hosts``: ``ip netns exec`` bind-mounts it over /etc/hosts."""
    path = Path("/etc/netns") / hub / "hosts"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"127.0.0.1 localhost\n{LB_PUBLIC} {HOST}\n")
    return path


@contextlib.asynccontextmanager
async def fleet(workdir: Path) -> AsyncIterator[Fleet]:
    """Build the whole fleet (see the module docstring) and tear everything down afterwards."""
    pid = os.getpid()
    hub, cli = f"fhub-{pid}", f"fcli-{pid}"
    hosts = [f"fh{i}-{pid}" for i in (1, 2, 3)]
    names = [hub, cli, *hosts]
    with contextlib.ExitStack() as cleanup:
        for ns in names:
            ip("netns", "add", ns)
            cleanup.callback(subprocess.run, ["ip", "netns", "del", ns], capture_output=True, check=False)
        ip("-n", hub, "link", "add", "br0", "type", "bridge")
        ip("-n", hub, "addr", "add", f"{HUB4}/24", "dev", "br0")
        ip("-n", hub, "addr", "add", f"{LB_PUBLIC}/32", "dev", "br0")
        ip("-n", hub, "link", "set", "br0", "up")
        ip("-n", hub, "link", "set", "lo", "up")
        for n, (ns, address) in enumerate(((cli, CLI4), *zip(hosts, HOST4, strict=True))):
            ip("-n", hub, "link", "add", f"vp{n}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", hub, "link", "set", f"vp{n}", "master", "br0")
            ip("-n", hub, "link", "set", f"vp{n}", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
        hosts_file = _hub_hosts_file(hub)
        cleanup.callback(shutil.rmtree, hosts_file.parent, True)

        # one CA for the whole fleet, made before the OP starts (the OP trusts it for back-channel calls)
        ca_src = workdir / "fleet-ca"
        ca_pem = CertStore(ca_src).ca_pem().decode()
        redis = Redis(hub, workdir / "redis")
        redis.prepare()
        redis.start()
        cleanup.callback(redis.stop, signal.SIGKILL)

        op = await start_op(
            workdir / "op",
            clients=[{
                "client_id": "app", "client_secret": "secret-app",
                "redirect_uris": [f"{BASE}/oauth2/callback"], "post_logout_redirect_uris": [f"{BASE}/"],
                "backchannel_logout_uri": f"{BASE}/oauth2/logout/backchannel",
                "token_endpoint_auth_method": "client_secret_basic",
            }],
            users=USERS, host=HUB4, port=OP_PORT, issuer=ISSUER, netns=hub, extra_ca_file=ca_src / "ca" / "ca.crt",
        )  # fmt: skip
        procs: list[subprocess.Popen[bytes]] = []
        enforcers: list[Enforcer] = []
        client: NetnsLoop | None = None
        try:
            record = workdir / "seen.jsonl"
            app = _spawn(hub, [sys.executable, str(REPO / "tests" / "harness" / "recording_app.py"), str(record),
                               f"app:{APP_PORT}"], stdout=subprocess.PIPE)  # fmt: skip
            procs.append(app)
            assert app.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(app.stdout.readline), 20)
            assert line.strip() == b"ready", line
            servers = "\n".join(f"  server e{i} {a}:443" for i, a in enumerate(HOST4, 1))
            (workdir / "haproxy.cfg").write_text(HAPROXY.format(hub=HUB4, public=LB_PUBLIC, servers=servers))
            with (workdir / "haproxy.log").open("ab") as log:
                procs.append(_spawn(hub, ["haproxy", "-db", "-f", str(workdir / "haproxy.cfg")], stdout=log))
            for ns, address in zip(hosts, HOST4, strict=True):
                state = workdir / ns / "state"
                shutil.copytree(ca_src / "ca", state / "ca")
                (state / "definitions.yaml").write_text(DEFINITIONS)
                (state / "enforcer.yaml").write_text(CONFIG.format(
                    admin=ADMIN, state=state, op_ca=op.ca_file, hub=HUB4, redis_port=REDIS_PORT,
                    password=redis.password_file,
                ))  # fmt: skip
                enforcers.append(Enforcer(ns, address, state))
            for e in enforcers:
                e.start()
            for e in enforcers:
                await e.wait_ready()
            client = NetnsLoop(cli)
            yield Fleet(workdir=workdir, hub=hub, cli=cli, enforcers=enforcers, redis=redis, op=op,
                        client=client, record=record, ca_pem=ca_pem, procs=procs)  # fmt: skip
        finally:
            for e in enforcers:
                await e.stop(signal.SIGKILL)
            if client is not None:
                client.close()
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
            await op.stop()
            (workdir / "op.stderr").write_text("\n".join(op.stderr_lines) + "\n")

