"""One daemon, many pods: each pod's listener serves only its pod's services, through its pod's own pool.

Two parts. Over real TLS on loopback (no root): the same requests on the lean path and on
aiohttp's path get the same answers, and on a pod's listener neither path routes to another
pod's service nor forwards through another pool (each pool binds its own source address, so the
app sees which pool reached it). Then, as root, with real network namespaces as pods: one
Daemon, two PodAttachments added and removed while it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from enforcer.config import settings as settings_mod
from enforcer.config.definitions import Definitions, parse_documents, resolve_definitions
from enforcer.config.settings import DaemonModel, Settings
from enforcer.flowlog import FlowLog
from enforcer.http import proxy
from enforcer.http.accept import TLSListener
from enforcer.http.certs import CertStore
from enforcer.http.fastpath import FastPath
from enforcer.http.gate import Gate, Runtime
from enforcer.http.scope import Scope
from enforcer.http.server import Server
from enforcer.http.tls import TLSDispatch, make_listen_socket
from enforcer.identity.sessions import MemorySessionStore
from enforcer.metrics import Metrics
from enforcer.net import nftables
from enforcer.net.netns import run_in_netns
from enforcer.net.pods import PodNetns
from enforcer.run.attach import HostAttachment, PodAttachment
from enforcer.run.daemon import Daemon
from tests.harness.gate import FakeProvider, RecordingFlowLog
from tests.harness.netns import NetnsLoop, ip, no_fds_into, refused_from_here, require_root

P = os.getpid()


def _definitions(ports: dict[str, int], tags: tuple[str, ...]) -> Definitions:
    """Services ``a`` (a.test) and ``b`` (b.test), selected by ``app=a`` / ``app=b``, on the apps' ports."""
    docs: list[dict[str, Any]] = [
        {
            "kind": "service", "name": name, "OIDCClientID": name, "OIDCClientSecret": "s",
            "OIDCProviderURL": "https://127.0.0.1:9/", "OIDCCallbackURL": f"https://{name}.test",
            "hosts": [f"{name}.test"], "port": port, "exposedPort": 443, "selectors": [[f"app={name}"]],
            "exposedAPIs": [["httpresourcespec:name=open"]],
        }
        for name, port in ports.items()
    ]
    docs.append({
        "kind": "httpresourcespec", "name": "open", "associatedTags": ["httpresourcespec:name=open"],
        "endpoints": [{"URI": "/public/*", "methods": ["GET"], "public": True},
                      {"URI": "/*", "methods": ["GET"], "allowedScopes": [["groups=staff"]]}],
    })
    parsed = parse_documents(yaml.safe_dump_all(docs), "d.yaml")
    assert isinstance(parsed, list)
    return resolve_definitions(parsed, tags)


@dataclass
class Reply:
    status: int
    body: bytes
    flow: str | None


_FLOW = re.compile(rb"X-Enforcer-Flow: ([0-9a-f]+)\r\n", re.IGNORECASE)


async def _get(
    port: int, ca: bytes, *, host: str, sni: str | None, path: str, address: str = "127.0.0.1",
    connect: Callable[..., Any] | None = None,
) -> Reply:
    """One GET over a new TLS connection (SNI ``sni``, or none), ``Connection: close``."""
    ctx = ssl.create_default_context(cadata=ca.decode())
    if sni is None:
        ctx.check_hostname = False
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(address, port, ssl=ctx, server_hostname=sni), 10
    )
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    found = _FLOW.search(head + b"\r\n")
    return Reply(int(head.split(b" ", 2)[1]), body, found.group(1).decode() if found else None)


# ---------------------------------------------------------------------------------------------
# both HTTP paths honour the scope (real TLS on loopback; each pool has its own source address)


@dataclass
class _App:
    """An app on 127.0.0.1 answering its name; remembers (path, Host, peer address) of each request."""

    name: str
    seen: list[tuple[str, str, str]] = field(default_factory=list)
    port: int = 0

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername")[0] if request.transport else "-"
        self.seen.append((request.path, request.headers.get("Host", ""), peer))
        return web.Response(text=f"app {self.name}")


def _bound_factory(source: str) -> Callable[[Any], socket.socket]:
    """A pool's socket factory that binds its sockets to ``source``: the app sees which pool it was."""

    def make(addr_info: Any) -> socket.socket:
        family, type_, proto, _, _ = addr_info
        sock = socket.socket(family, type_, proto)
        sock.bind((source, 0))
        return sock

    return make


SOURCES = {"host": "127.0.0.1", "a": "127.0.0.2", "b": "127.0.0.3"}
"""Which address each listener's pool connects from."""
SERVES = {"host": {"a"}, "a": {"a"}, "b": {"b"}}
"""What each listener serves: the host's tags select a; each pod's, its own."""


@dataclass
class _Rig:
    gate: Gate
    flowlog: RecordingFlowLog
    apps: dict[str, _App]
    ports: dict[tuple[bool, str], int]  # (lean path on, listener) -> port
    ca: bytes
    scopes: dict[str, Scope]
    servers: dict[bool, Server]  # lean path on -> server


@contextlib.asynccontextmanager
async def _rig(tmp_path: Path) -> AsyncIterator[_Rig]:
    """Apps a and b; one gate; two servers (lean path on and off), each with a host listener and one per pod."""
    apps = {name: _App(name) for name in ("a", "b")}
    runners = []
    for app in apps.values():
        runner = web.ServerRunner(web.Server(app.handle), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        app.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        runners.append(runner)
    definitions = _definitions({name: app.port for name, app in apps.items()}, ("app=a",))
    flowlog = RecordingFlowLog()
    settings = Settings(path=Path("/nonexistent/enforcer.yaml"),
                        model=DaemonModel.model_validate({"definitions": [{"file": "/nonexistent"}], "logsDir": "/nonexistent/logs"}))
    host_pool = proxy.Upstream(socket_factory=_bound_factory(SOURCES["host"]))
    gate = Gate(
        settings=settings, runtime=Runtime(definitions, {"a": FakeProvider(), "b": FakeProvider()}),  # type: ignore[dict-item]
        store=MemorySessionStore(idle_timeout=3600), flowlog=flowlog, metrics=Metrics(), upstream=host_pool,
        listen_port=8443,
    )
    pools = {name: proxy.PodUpstream(socket_factory=_bound_factory(SOURCES[name])) for name in ("a", "b")}
    scopes = {
        name: Scope(f"pod {name}", 8443, pools[name], [s for s in definitions.catalog if s.name == name])
        for name in ("a", "b")
    }
    store = CertStore(tmp_path)
    tls = TLSDispatch({f"{n}.test": store.ensure_leaf(n, [f"{n}.test"]) for n in ("a", "b")}, "a.test")
    servers: dict[bool, Server] = {}
    listeners, ports = [], {}
    for lean in (True, False):
        server = Server(gate.handle, header_timeout=5.0, body_timeout=5.0, access_log=None)
        server.on_refused = gate.refused
        if lean:
            server.fast = FastPath(gate, server).protocol_factory()
        servers[lean] = server
        for name in ("host", "a", "b"):
            sock = make_listen_socket("127.0.0.1", 0)
            listeners.append(TLSListener(server, sock, tls.context, 5.0, scope=scopes.get(name)))
            ports[(lean, name)] = sock.getsockname()[1]
    try:
        yield _Rig(gate, flowlog, apps, ports, store.ca_pem(), scopes, servers)
    finally:
        for listener in listeners:
            listener.close()
        for server in servers.values():
            await server.shutdown(1.0)
        for pool in (host_pool, *pools.values()):
            await pool.close()
        for runner in runners:
            await runner.cleanup()


def _expected(listener: str, host: str, sni: str | None, path: str) -> tuple[int, str, str | None]:
    """(status, flow reason, app reached) the scope rule gives."""
    served = {f"{n}.test" for n in SERVES[listener]}
    if host not in served or (listener != "host" and sni is not None and sni not in served):
        return 421, "unknown_host", None
    if sni is not None and sni != host:
        return 421, "sni_host_mismatch", None  # (the host's listener: today's answer)
    if path.startswith("/public/"):
        return 200, "public", host.split(".", maxsplit=1)[0]
    return 302, "login_required", None


CASES = [
    (listener, host, sni, path)
    for listener in ("host", "a", "b")
    for host, sni in (("a.test", "a.test"), ("b.test", "b.test"), ("a.test", "b.test"), ("b.test", "a.test"),
                      ("a.test", None), ("b.test", None))
    for path in ("/public/x", "/private")
]


async def test_both_http_paths_keep_each_pod_to_its_services_and_its_pool(tmp_path: Path) -> None:
    """Every request gets the same answer on the lean path and on aiohttp's; on a pod's listener a Host or SNI of
    another pod's service is 421 unknown_host and reaches no app, and an allowed one reaches the pod's app through
    the pod's own pool; the host's listener answers as before."""
    async with _rig(tmp_path) as rig:
        served = rig.gate.metrics.fast_requests
        for listener, host, sni, path in CASES:
            expected = _expected(listener, host, sni, path)
            answers = []
            for lean in (True, False):
                before = {n: len(a.seen) for n, a in rig.apps.items()}
                lean_before = served._value.get()
                written = len(rig.flowlog.records)
                reply = await _get(rig.ports[(lean, listener)], rig.ca, host=host, sni=sni, path=path)
                [record] = rig.flowlog.records[written:]
                assert reply.flow in (None, record.flow_id)
                reached = {n: a.seen[before[n]:] for n, a in rig.apps.items() if len(a.seen) > before[n]}
                case = (listener, host, sni, path, "lean" if lean else "full")
                assert (reply.status, record.reason) == expected[:2], case
                if expected[2] is None:
                    assert reached == {}, case
                else:
                    [(seen_path, seen_host, peer)] = reached[expected[2]]
                    assert (seen_path, seen_host, peer) == (path, host, SOURCES[listener]), case
                    assert reply.body == f"app {expected[2]}".encode(), case
                took_lean = served._value.get() > lean_before
                assert took_lean == (lean and expected[0] == 200), case
                answers.append((reply.status, record.reason, record.service, reply.body if reply.status == 200 else b""))
            assert answers[0] == answers[1], (listener, host, sni, path)


async def test_a_scope_follows_its_pods_services(tmp_path: Path) -> None:
    """A scope serves what it was last told: a pod whose labels now select b is routed to b, no longer to a."""
    async with _rig(tmp_path) as rig:
        port = rig.ports[(True, "a")]
        assert (await _get(port, rig.ca, host="a.test", sni="a.test", path="/public/x")).status == 200
        rig.scopes["a"].serve([s for s in rig.gate.runtime.definitions.catalog if s.name == "b"])
        assert (await _get(port, rig.ca, host="a.test", sni="a.test", path="/public/x")).status == 421
        reply = await _get(port, rig.ca, host="b.test", sni="b.test", path="/public/x")
        assert reply.status == 200 and reply.body == b"app b"
        assert rig.apps["b"].seen[-1][2] == SOURCES["a"]  # still the pod's own pool


async def _kept_alive(port: int, ca: bytes, host: str, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A keep-alive connection that got one answer (and stays open)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ssl.create_default_context(cadata=ca.decode()), server_hostname=host
    )
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
    await reader.readexactly(length)
    return reader, writer


async def test_closing_a_scope_closes_only_its_connections(tmp_path: Path) -> None:
    """close_scope ends a pod's idle connections on both paths (lean, and handed to aiohttp) and leaves the host's
    and the other pod's open."""
    async with _rig(tmp_path) as rig:
        for lean in (True, False):
            server = rig.servers[lean]
            mine = [await _kept_alive(rig.ports[(lean, "a")], rig.ca, "a.test", p) for p in ("/public/x", "/private")]
            others = [await _kept_alive(rig.ports[(lean, "host")], rig.ca, "a.test", "/public/x"),
                      await _kept_alive(rig.ports[(lean, "b")], rig.ca, "b.test", "/public/x")]
            assert len(server.scoped_connections(rig.scopes["a"])) == 2
            await server.close_scope(rig.scopes["a"], 2.0)
            for reader, _ in mine:
                assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
            assert server.scoped_connections(rig.scopes["a"]) == []
            assert len(server.scoped_connections(rig.scopes["b"])) == 1
            for reader, writer in others:
                assert not reader.at_eof()
                writer.close()
            for _, writer in mine:
                writer.close()


# ---------------------------------------------------------------------------------------------
# one Daemon, two pods in real network namespaces (root)

POD_APP = """\
import http.server, sys
name = sys.argv[1].encode()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(name)))
        self.end_headers()
        self.wfile.write(name)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 8080), H).serve_forever()
"""

POD_IPS = {"a": ("10.98.1.1", "10.98.1.2"), "b": ("10.98.2.1", "10.98.2.2")}
"""Each pod's address and the client's address on the pod's veth."""


@dataclass
class _Pods:
    client: str
    ns: dict[str, str]


@contextlib.contextmanager
def _two_pods() -> Iterator[_Pods]:
    """A client namespace and two pod namespaces (a veth each), each pod running an app on its
    127.0.0.1:8080 that answers its own name (a process of its own: its sockets are not ours)."""
    require_root()
    pods_ = _Pods(f"pscope-c-{P}", {n: f"pscope-{n}-{P}" for n in ("a", "b")})
    apps: list[subprocess.Popen[bytes]] = []
    try:
        ip("netns", "add", pods_.client)
        ip("-n", pods_.client, "link", "set", "lo", "up")
        for name, ns in pods_.ns.items():
            pod_ip, client_ip = POD_IPS[name]
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "add", "veth-pod", "type", "veth", "peer", "name", f"veth-{name}",
               "netns", pods_.client)  # fmt: skip
            ip("-n", ns, "addr", "add", f"{pod_ip}/24", "dev", "veth-pod")
            ip("-n", ns, "link", "set", "veth-pod", "up")
            ip("-n", pods_.client, "addr", "add", f"{client_ip}/24", "dev", f"veth-{name}")
            ip("-n", pods_.client, "link", "set", f"veth-{name}", "up")
            apps.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", POD_APP, f"pod {name}"]))
        for ns in pods_.ns.values():
            deadline = time.monotonic() + 10
            while run_in_netns(f"/run/netns/{ns}", _refused, "127.0.0.1", 8080):
                assert time.monotonic() < deadline, "the pod's app did not start"
                time.sleep(0.05)
        yield pods_
    finally:
        for app in apps:
            app.kill()
            app.wait()
        for ns in (pods_.client, *pods_.ns.values()):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _refused(address: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((address, port)) != 0


class _QuietDaemon(Daemon):
    """The real daemon, minus the signal handlers (they belong to pytest here)."""

    def _install_signals(self, loop: asyncio.AbstractEventLoop, flowlog: FlowLog) -> None:
        return None


def _daemon(tmp_path: Path) -> Daemon:
    """A daemon whose host listener is on loopback (no redirect on the host); pods get table ``pscope<pid>``."""
    ports = {"a": 8080, "b": 8080}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump_all([
        *[{"kind": "service", "name": n, "OIDCClientID": n, "OIDCClientSecret": "s",
           "OIDCProviderURL": "https://127.0.0.1:9/", "OIDCCallbackURL": f"https://{n}.test", "hosts": [f"{n}.test"],
           "port": p, "exposedPort": 443, "selectors": [[f"app={n}"]], "exposedAPIs": [["httpresourcespec:name=open"]]}
          for n, p in ports.items()],
        {"kind": "httpresourcespec", "name": "open", "associatedTags": ["httpresourcespec:name=open"],
         "endpoints": [{"URI": "/*", "methods": ["GET"], "public": True}]},
    ]))
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(yaml.safe_dump({
        "tags": ["node=n1"], "stateDir": str(tmp_path / "state"), "logsDir": str(tmp_path / "logs"), "admin": {"address": "127.0.0.1", "port": 0},
        "definitions": [{"file": "d.yaml"}], "sessions": {"store": "memory"}, "allowNoServices": True,
        "listen": {"port": 15443}, "redirect": {"enabled": True, "table": f"pscope{P}", "mark": 0x2321},
    }))
    settings = settings_mod.load_settings(cfg)
    host = HostAttachment(settings, manages_redirect=False, listen_socket=make_listen_socket("127.0.0.1", 0))
    return _QuietDaemon(settings, attachments=[host], flowlog=FlowLog(None, stream=io.StringIO()))


async def _started(daemon: Daemon) -> asyncio.Task[int]:
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.get_running_loop().create_task(daemon.run(on_ready=ready))
    await asyncio.wait({ready, task}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert ready.done(), "the daemon did not start"
    return task


@pytest.mark.root
async def test_one_daemon_serves_two_pods_each_only_its_own_app(tmp_path: Path) -> None:
    """Two pods added to one serving daemon: each pod's IP reaches its own app only, another pod's Host or SNI is
    refused 421 on it, the app port is refused from outside; removing a pod closes every fd into its namespace,
    keeps its table (its port refuses) or releases it, and leaves the other pod served."""
    with _two_pods() as netns:
        daemon = _daemon(tmp_path)
        task = await _started(daemon)
        client = NetnsLoop(netns.client)
        inodes = {n: os.stat(f"/run/netns/{ns}").st_ino for n, ns in netns.ns.items()}
        attachments = {
            n: PodAttachment(PodNetns.open(f"/run/netns/{ns}", uid=f"uid-{n}"), daemon.settings,
                             tags=frozenset({f"app={n}"}))
            for n, ns in netns.ns.items()
        }
        try:
            for attachment in attachments.values():
                await daemon.add_attachment(attachment)
            assert [s.name for s in attachments["a"].services] == ["a"]
            assert [s.name for s in attachments["b"].services] == ["b"]
            ca = daemon.cert_store.ca_pem()

            async def get(pod: str, host: str, sni: str | None) -> Reply:
                return await client.run(_get(443, ca, host=host, sni=sni, path="/", address=POD_IPS[pod][0]))

            for pod, other in (("a", "b"), ("b", "a")):
                reply = await get(pod, f"{pod}.test", f"{pod}.test")
                assert (reply.status, reply.body) == (200, f"pod {pod}".encode())
                for host, sni in ((f"{other}.test", f"{other}.test"), (f"{other}.test", None),
                                  (f"{pod}.test", f"{other}.test"), (f"{other}.test", f"{pod}.test")):
                    reply = await get(pod, host, sni)
                    assert reply.status == 421 and b"not served here" in reply.body, (pod, host, sni)
            # on the host's listener neither pod's service is served
            host_reply = await _get(daemon.listen_port, ca, host="a.test", sni="a.test", path="/")
            assert host_reply.status == 421

            # pod a's labels now select b: a reload serves b on pod a's listener (its own app), no longer a
            attachments["a"].tags = frozenset({"app=b"})
            await daemon._apply(daemon.gate.runtime.definitions, "test")
            reply = await get("a", "b.test", "b.test")
            assert (reply.status, reply.body) == (200, b"pod a")
            assert (await get("a", "a.test", None)).status == 421
            with pytest.raises((ssl.SSLError, ConnectionResetError)):  # no pod serves a now: not even its certificate
                await get("a", "a.test", "a.test")

            # pod a goes away: its listener, connections and pool close, its table stays (fail closed)
            await daemon.remove_attachment(attachments["a"], release=False)
            assert attachments["a"].netns.closed
            assert await no_fds_into(inodes["a"]) == []
            assert await client.run(refused_from_here(POD_IPS["a"][0], 443))
            live = await nftables.read_live(f"pscope{P}", netns=f"/run/netns/{netns.ns['a']}")
            assert live.exists
            reply = await get("b", "b.test", "b.test")
            assert (reply.status, reply.body) == (200, b"pod b")

            # pod b is no longer selected: released, its table removed, the app answers without us
            await daemon.remove_attachment(attachments["b"], release=True)
            assert await no_fds_into(inodes["b"]) == []
            assert not (await nftables.read_live(f"pscope{P}", netns=f"/run/netns/{netns.ns['b']}")).exists
        finally:
            client.close()
            daemon.stop()
            code = await asyncio.wait_for(task, 30)
            for attachment in attachments.values():
                attachment.close()
        assert code == 0
        assert daemon.attachments[1:] == []


@pytest.mark.root
async def test_a_pod_given_at_start_is_served_and_let_go_at_stop(tmp_path: Path) -> None:
    """A pod attachment the daemon starts with is served with its scope; a clean stop closes every fd into its
    namespace and keeps its table (keepBlockOnStop), so its port refuses until an enforcer serves it again."""
    with _two_pods() as netns:
        daemon = _daemon(tmp_path)
        path = f"/run/netns/{netns.ns['a']}"
        inode = os.stat(path).st_ino
        pod = PodAttachment(PodNetns.open(path, uid="uid-a"), daemon.settings, tags=frozenset({"app=a"}))
        daemon.attachments.append(pod)
        task = await _started(daemon)
        client = NetnsLoop(netns.client)
        try:
            ca = daemon.cert_store.ca_pem()
            reply = await client.run(_get(443, ca, host="a.test", sni="a.test", path="/", address=POD_IPS["a"][0]))
            assert (reply.status, reply.body) == (200, b"pod a")
            reply = await client.run(_get(443, ca, host="b.test", sni=None, path="/", address=POD_IPS["a"][0]))
            assert reply.status == 421
        finally:
            daemon.stop()
            code = await asyncio.wait_for(task, 30)
        try:
            assert code == 0 and pod.netns.closed
            assert await no_fds_into(inode) == []
            assert (await nftables.read_live(f"pscope{P}", netns=path)).exists
            assert await client.run(refused_from_here(POD_IPS["a"][0], 443))
        finally:
            client.close()
            pod.close()


async def test_pods_are_added_only_while_the_daemon_serves(tmp_path: Path) -> None:
    """add_attachment before the daemon serves raises and leaves the pod untouched; remove_attachment of a pod it
    does not serve raises."""
    daemon = _daemon(tmp_path)
    pod = PodAttachment(PodNetns.open("/proc/self/ns/net", uid="uid-x"), daemon.settings, tags=frozenset({"app=a"}))
    try:
        with pytest.raises(RuntimeError, match="not serving"):
            await daemon.add_attachment(pod)
        assert pod.listen_socket is None and not pod.netns.closed
        with pytest.raises(ValueError, match="not served here"):
            await daemon.remove_attachment(pod, release=False)
    finally:
        pod.close()
        daemon.attachments[0].close()
