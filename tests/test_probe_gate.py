"""The kubelet's plain-HTTP probes of a protected pod port pass the pod's probe gate; nothing else does.

Root, real network namespaces: a "node" namespace joined to a "pod" namespace by a veth (the
node's address there is its route's source towards the pod, as the CNI bridge's is on a real
node), and an "other" namespace joined to the pod by a second veth (another pod). The pod runs
an app on 127.0.0.1:8080 that logs every request it gets; a real Daemon serves the pod through a
real PodAttachment whose route source is asked in the node namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from enforcer.config import settings as settings_mod
from enforcer.config.definitions import Definitions, parse_documents, resolve_definitions
from enforcer.config.kubernetes import Probe
from enforcer.flowlog import FlowLog
from enforcer.http.tls import make_listen_socket
from enforcer.net.netns import run_in_netns
from enforcer.net.pods import PodNetns, route_source
from enforcer.run.attach import HostAttachment, PodAttachment
from enforcer.run.daemon import Daemon
from tests.harness.netns import connect, ip, no_fds_into, refused, require_root
from tests.harness.redirector import FakeRedirector

P = os.getpid()
POD_IP, NODE_IP = "10.97.1.1", "10.97.1.2"
POD_IP2, OTHER_IP = "10.97.2.1", "10.97.2.2"
APP_PORT, PROBE_PORT = 8080, 15021
TABLE = f"probes{P}"

APP = """\
import http.server, json, sys
log = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _answer(self, body):
        with open(log, "a") as f:
            f.write(json.dumps([self.command, self.path, [[k, v] for k, v in self.headers.items()]]) + "\\n")
        status = int(self.path.split("/status/")[1].split("?")[0]) if "/status/" in self.path else 200
        if self.path.startswith("/big"):
            body = b"x" * 50000
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
    def do_GET(self):
        self._answer(b"app ok")
    def do_HEAD(self):
        self._answer(b"app ok")
    def do_POST(self):
        self._answer(b"posted")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 8080), H).serve_forever()
"""

PROBES = (
    Probe("app", "readiness", "httpGet", APP_PORT, "/healthz", headers=(("X-Probe", "kubelet"),)),
    Probe("app", "liveness", "httpGet", APP_PORT, "/status/500?deep=1"),
    Probe("app", "startup", "httpGet", APP_PORT, "/big"),
    Probe("app", "liveness", "tcpSocket", APP_PORT),
)


@dataclass
class _Net:
    node: str
    pod: str
    other: str
    app_log: Path
    app: subprocess.Popen[bytes] | None = None

    def requests(self) -> list[list[object]]:
        if not self.app_log.exists():
            return []
        return [json.loads(line) for line in self.app_log.read_text().splitlines()]


@contextlib.contextmanager
def _network(tmp_path: Path) -> Iterator[_Net]:
    """The node, pod and other namespaces with their veths, and the pod's logging app."""
    require_root()
    net = _Net(f"prb-node-{P}", f"prb-pod-{P}", f"prb-other-{P}", tmp_path / "app.log")
    try:
        for ns in (net.node, net.pod, net.other):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        for peer, dev, pod_ip, peer_ip in ((net.node, "veth-node", POD_IP, NODE_IP),
                                           (net.other, "veth-other", POD_IP2, OTHER_IP)):
            ip("-n", net.pod, "link", "add", dev, "type", "veth", "peer", "name", "veth-pod", "netns", peer)
            ip("-n", net.pod, "addr", "add", f"{pod_ip}/24", "dev", dev)
            ip("-n", net.pod, "link", "set", dev, "up")
            ip("-n", peer, "addr", "add", f"{peer_ip}/24", "dev", "veth-pod")
            ip("-n", peer, "link", "set", "veth-pod", "up")
        net.app = subprocess.Popen(["ip", "netns", "exec", net.pod, sys.executable, "-c", APP, str(net.app_log)])
        deadline = time.monotonic() + 10
        while refused(net.pod, "127.0.0.1", APP_PORT):
            assert time.monotonic() < deadline, "the pod's app did not start"
            time.sleep(0.05)
        yield net
    finally:
        if net.app is not None:
            net.app.kill()
            net.app.wait()
        for ns in (net.node, net.pod, net.other):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


class _QuietDaemon(Daemon):
    """The real daemon, minus the signal handlers (they belong to pytest here)."""

    def _install_signals(self, loop: asyncio.AbstractEventLoop, flowlog: FlowLog) -> None:
        return None


DOCS = [
    {"kind": "service", "name": "a", "OIDCClientID": "a", "OIDCClientSecret": "s",
     "OIDCProviderURL": "https://127.0.0.1:9/", "OIDCCallbackURL": "https://a.test", "hosts": ["a.test"],
     "port": APP_PORT, "exposedPort": 443, "selectors": [["app=a"]], "exposedAPIs": [["httpresourcespec:name=open"]]},
    {"kind": "httpresourcespec", "name": "open", "associatedTags": ["httpresourcespec:name=open"],
     "endpoints": [{"URI": "/*", "methods": ["GET"], "public": True}]},
]


def _settings(tmp_path: Path, block: bool = True) -> settings_mod.Settings:
    """Service ``a`` (app port 8080, selected by ``app=a``) in d.yaml; pods get table ``probes<pid>``."""
    (tmp_path / "d.yaml").write_text(yaml.safe_dump_all(DOCS))
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(yaml.safe_dump({
        "tags": ["node=n1"], "stateDir": str(tmp_path / "state"), "logsDir": str(tmp_path / "logs"),
        "admin": {"address": "127.0.0.1", "port": 0}, "definitions": [{"file": "d.yaml"}],
        "sessions": {"store": "memory"}, "allowNoServices": True, "listen": {"port": 15443},
        "redirect": {"enabled": True, "table": TABLE, "mark": 0x2322, "blockAppPort": block},
    }))
    return settings_mod.load_settings(cfg)


def _definitions() -> Definitions:
    parsed = parse_documents(yaml.safe_dump_all(DOCS), "d.yaml")
    assert isinstance(parsed, list)
    return resolve_definitions(parsed, ())


@pytest.mark.parametrize(
    ("probes", "source", "probe_port", "block", "rules", "gated", "warned"),
    [
        (PROBES, NODE_IP, PROBE_PORT, True, [f"ip saddr {NODE_IP} tcp dport 8080 counter redirect to :15021"],
         [8080], "tcpSocket on port 8080"),
        (PROBES[:1], "fd00:97::2", PROBE_PORT, True, ["ip6 saddr fd00:97::2 tcp dport 8080 counter redirect to :15021"],
         [8080], ""),
        (PROBES[:1], None, PROBE_PORT, True, [], [], "no route from the node"),
        (PROBES[:1], NODE_IP, None, True, [], [], "httpGet HTTP /healthz on port 8080"),
        ((Probe("app", "readiness", "httpGet", 9090, "/"), Probe("app", "liveness", "grpc", 9091)), NODE_IP,
         PROBE_PORT, True, [], [], ""),
        ((Probe("app", "readiness", "httpGet", APP_PORT, "/h", "HTTPS"),), NODE_IP, PROBE_PORT, True, [], [],
         "httpGet HTTPS /h on port 8080"),
        (PROBES, NODE_IP, PROBE_PORT, False, [], [], ""),
    ],
)
async def test_which_probes_an_attachment_lets_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, probes: tuple[Probe, ...], source: str | None,
    probe_port: int | None, block: bool, rules: list[str], gated: list[int], warned: str,
) -> None:
    """Only plain-HTTP probes of a protected port get a probe rule from the node's route source (v4 or v6) and are
    gated; other probes of a protected port are reported once; no source, no probe port or no block: no rule."""
    caplog.set_level(logging.WARNING, logger="enforcer.run.attach")
    fake, asked = FakeRedirector(), []

    def source_of(address: str) -> str | None:
        asked.append(address)
        return source

    attachment = PodAttachment(PodNetns.open("/proc/self/ns/net", uid="u"), _settings(tmp_path, block),
                               tags=frozenset({"app=a"}), redirector=fake, probes=probes, pod_ips=(POD_IP,),
                               probe_port=probe_port, source_of=source_of)
    try:
        for _ in range(2):
            await attachment.apply(_definitions())
        ruleset = fake.applied[-1]
        assert [r.text for r in ruleset.rules if r.probe] == rules
        assert sorted(attachment.gated) == gated
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == (1 if warned else 0) and warned in "".join(messages), messages
        if rules:
            assert asked == [POD_IP]  # asked once, kept
    finally:
        attachment.close()


async def test_a_label_change_re_applies_the_probe_rules(tmp_path: Path) -> None:
    """When the pod's tags no longer select the service its probe rule and its gated probes go; the undo brings
    both back."""
    fake = FakeRedirector()
    attachment = PodAttachment(PodNetns.open("/proc/self/ns/net", uid="u"), _settings(tmp_path),
                               tags=frozenset({"app=a"}), redirector=fake, probes=PROBES, pod_ips=(POD_IP,),
                               probe_port=PROBE_PORT, source_of=lambda _: NODE_IP)
    try:
        await attachment.apply(_definitions())
        assert attachment.wants_probe_gate and sorted(attachment.gated) == [APP_PORT]
        attachment.tags = frozenset({"app=b"})
        undo = await attachment.apply(_definitions())
        assert attachment.gated == {} and not any(r.probe for r in fake.applied[-1].rules)
        await undo()
        assert sorted(attachment.gated) == [APP_PORT] and any(r.probe for r in fake.applied[-1].rules)
        await attachment.release()
        assert attachment.gated == {}
    finally:
        attachment.close()


def test_a_pod_without_an_http_probe_or_probe_port_has_no_gate(tmp_path: Path) -> None:
    """The gate is wanted only with a plain-HTTP probe and a probe port; opening one without a port is refused."""
    settings = _settings(tmp_path)
    for probes, port, wanted in ((PROBES, PROBE_PORT, True), (PROBES[3:], PROBE_PORT, False), (PROBES, None, False)):
        attachment = PodAttachment(PodNetns.open("/proc/self/ns/net", uid="u"), settings, probes=probes,
                                   probe_port=port)
        try:
            assert attachment.wants_probe_gate is wanted
            if port is None:
                with pytest.raises(ValueError, match="no probe port"):
                    attachment.open_probe_socket()
        finally:
            attachment.close()


def _daemon(tmp_path: Path, flows: io.StringIO) -> Daemon:
    """A daemon whose host listener is on loopback; the pod gets table ``probes<pid>``, service ``a`` on 8080."""
    settings = _settings(tmp_path)
    host = HostAttachment(settings, manages_redirect=False, listen_socket=make_listen_socket("127.0.0.1", 0))
    return _QuietDaemon(settings, attachments=[host], flowlog=FlowLog(None, stream=flows))


async def _started(daemon: Daemon) -> asyncio.Task[int]:
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.get_running_loop().create_task(daemon.run(on_ready=ready))
    await asyncio.wait({ready, task}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert ready.done(), "the daemon did not start"
    return task


def _exchange(netns: str, host: str, port: int, request: bytes) -> bytes:
    """Send ``request`` from ``netns`` and read the whole answer (the gate closes after one)."""
    with connect(netns, host, port, timeout=15) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


async def _ask(netns: str, method: str, target: str, port: int = APP_PORT, host: str = POD_IP,
               extra: str = "") -> tuple[int, bytes]:
    request = (f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.31\r\n"
               f"Accept: */*\r\n{extra}Connection: close\r\n\r\n").encode()
    answer = await asyncio.to_thread(_exchange, netns, host, port, request)
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _count(daemon: Daemon, result: str) -> float:
    return float(daemon.metrics.pod_probes.labels(result=result)._value.get())


@pytest.mark.root
async def test_the_kubelets_http_probes_pass_the_gate_and_nothing_else(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """From the node's route source a GET/HEAD of a probe's path on the app port reaches the app (kubelet's headers
    only, status and at most 10 KiB of body back, no flow record); another path, a POST, a direct connection to the
    probe port get 403 and the app sees nothing; another pod is still reset, the pod's loopback still reaches the
    app; a tcpSocket probe of the port is reported once; the app down gives 503; removal closes every fd."""
    caplog.set_level(logging.WARNING, logger="enforcer.run.attach")
    with _network(tmp_path) as net:
        flows = io.StringIO()
        daemon = _daemon(tmp_path, flows)
        task = await _started(daemon)
        path = f"/run/netns/{net.pod}"
        inode = os.stat(path).st_ino
        attachment = PodAttachment(
            PodNetns.open(path, uid="uid-p"), daemon.settings, tags=frozenset({"app=a"}), probes=PROBES,
            pod_ips=(POD_IP,), probe_port=PROBE_PORT,
            source_of=lambda address: run_in_netns(f"/run/netns/{net.node}", route_source, address),
        )
        try:
            await daemon.add_attachment(attachment)
            assert sorted(attachment.gated) == [APP_PORT]
            table = subprocess.run(["ip", "netns", "exec", net.pod, "nft", "list", "table", "inet", TABLE],
                                   capture_output=True, text=True, check=True).stdout
            print(table)
            assert f"ip saddr {NODE_IP} tcp dport {APP_PORT} counter" in table and f"redirect to :{PROBE_PORT}" in table

            # the probes pass, with the kubelet's headers only (and the spec's), never identity headers
            assert await _ask(net.node, "GET", "/healthz", extra="Cookie: s=1\r\nX-Remote-User: admin\r\n") == (
                200, b"app ok")
            (method, target, headers), = net.requests()
            assert (method, target) == ("GET", "/healthz")
            assert headers == [["Host", f"{POD_IP}:{APP_PORT}"], ["User-Agent", "kube-probe/1.31"], ["Accept", "*/*"],
                               ["X-Probe", "kubelet"], ["Connection", "close"]]
            assert await _ask(net.node, "HEAD", "/healthz") == (200, b"")
            assert await _ask(net.node, "GET", "/status/500?deep=1") == (500, b"app ok")
            status, body = await _ask(net.node, "GET", "/big")
            assert (status, len(body)) == (200, 10 * 1024)
            assert len(net.requests()) == 4

            # anything else: 403, the app not contacted
            for method, target in (("GET", "/other"), ("POST", "/healthz"), ("GET", "/healthz?x=1"),
                                   ("GET", "/status/500"), ("OPTIONS", "*")):
                assert (await _ask(net.node, method, target))[0] == 403, (method, target)
            assert (await _ask(net.node, "GET", "/healthz", port=PROBE_PORT))[0] == 403  # not redirected
            assert len(net.requests()) == 4

            # another pod is reset on the app port; the pod's own loopback reaches the app directly
            assert await asyncio.to_thread(refused, net.other, POD_IP2, APP_PORT)
            assert (await _ask(net.pod, "GET", "/anything", host="127.0.0.1"))[0] == 200
            assert len(net.requests()) == 5

            warnings = [r.getMessage() for r in caplog.records if "cannot pass" in r.getMessage()]
            assert len(warnings) == 1 and "livenessProbe of container app (tcpSocket on port 8080)" in warnings[0]

            # the app down: 503
            assert net.app is not None
            net.app.kill()
            net.app.wait()
            net.app = None
            assert (await _ask(net.node, "GET", "/healthz"))[0] == 503
            assert (_count(daemon, "passed"), _count(daemon, "refused"), _count(daemon, "unavailable")) == (4, 6, 1)
            assert flows.getvalue() == ""

            await daemon.remove_attachment(attachment, release=False)
            assert attachment.netns.closed
            assert await no_fds_into(inode) == []
            assert await asyncio.to_thread(refused, net.node, POD_IP, APP_PORT)  # fail closed: nobody on the gate
        finally:
            daemon.stop()
            code = await asyncio.wait_for(task, 30)
            attachment.close()
        assert code == 0
