"""``enforcer doctor --pod``: the per-pod checks (enforcer/cli/doctor_pod.py) after the API read.

As root, real network namespaces are the pods (an app process on each one's 127.0.0.1:8080, an
address on its loopback), found by the daemon's own ``/proc`` scan with the test's app
processes as the pods' (the cgroup mapping a node has is faked by ``pod_uid_of``), and a real
daemon serves the enrolled one through a real ``NamespacedPodAttachment``. Without root: the pods
the node checks do not apply to, and ``--pod`` without pod mode in the config. With the harness's
real API server (``kube_api``): the whole command, reading the pod as the daemon's client does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from enforcer import cli
from enforcer.cli import doctor_pod
from enforcer.cli.doctor import Report
from enforcer.config import definitions as definitions_mod
from enforcer.config import settings as settings_mod
from enforcer.config.kubernetes import PodInfo
from enforcer.flowlog import FlowLog
from enforcer.http.tls import make_listen_socket
from enforcer.net import pods as net_pods
from enforcer.net.netns import run_in_netns
from enforcer.net.pods import PodNetns, ScanResult, find_pod_netns
from enforcer.run.attach import HostAttachment
from enforcer.run.daemon import Daemon
from enforcer.run.pods import NamespacedPodAttachment, Scan, pod_tags
from tests.harness.kube import ControlPlane
from tests.harness.netns import ip, require_root

P = os.getpid()
TABLE = f"pdoc{P}"
POD_PORT = 15444  # kubernetes.pods.listenPort (the daemon's own listen.port is 15443)
POD_APP = """\
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8080))
s.listen(16)
while True:
    s.accept()[0].close()
"""


def _write_config(tmp_path: Path) -> tuple[Path, Path]:
    """d.yaml (service web: app=web, port 8080, exposedPort 443), the daemon's config and doctor's (pod mode on)."""
    (tmp_path / "d.yaml").write_text(yaml.safe_dump_all([
        {"kind": "service", "name": "web", "OIDCClientID": "web", "OIDCClientSecret": "s",
         "OIDCProviderURL": "https://127.0.0.1:9/", "OIDCCallbackURL": "https://web.test", "hosts": ["web.test"],
         "port": 8080, "exposedPort": 443, "selectors": [["app=web"]], "exposedAPIs": [["httpresourcespec:name=open"]]},
        {"kind": "httpresourcespec", "name": "open", "associatedTags": ["httpresourcespec:name=open"],
         "endpoints": [{"URI": "/*", "methods": ["GET"], "public": True}]},
    ]))  # fmt: skip
    base = {
        "tags": ["node=n1"], "stateDir": str(tmp_path / "state"), "logsDir": str(tmp_path / "logs"),
        "admin": {"address": "127.0.0.1", "port": 0}, "definitions": [{"file": "d.yaml"}],
        "sessions": {"store": "memory"}, "allowNoServices": True, "listen": {"port": 15443},
        "redirect": {"enabled": True, "table": TABLE, "mark": 0x2321},
    }
    daemon_cfg, doctor_cfg = tmp_path / "enforcer.yaml", tmp_path / "doctor.yaml"
    daemon_cfg.write_text(yaml.safe_dump(base))
    doctor_cfg.write_text(yaml.safe_dump({**base, "kubernetes": {
        "nodeName": "n1", "namespace": "enforcer-system", "nodeLabelTags": False,
        "pods": {"enabled": True, "listenPort": POD_PORT}}}))  # fmt: skip
    return daemon_cfg, doctor_cfg


@dataclass
class _Pod:
    name: str
    netns: str
    ip: str
    pid: int

    @property
    def uid(self) -> str:
        return f"uid-{self.name}-{P}"

    def info(self, labels: Mapping[str, str], **more: object) -> PodInfo:
        return PodInfo(uid=self.uid, namespace="shop", name=self.name, labels=dict(labels), ips=(self.ip,),
                       node="n1", phase="Running", **more)  # type: ignore[arg-type]


@contextlib.contextmanager
def _pods(*names: str) -> Iterator[dict[str, _Pod]]:
    """One network namespace per name (the pod's IP on its loopback), each with an app process on 127.0.0.1:8080."""
    require_root()
    made: dict[str, _Pod] = {}
    apps: list[subprocess.Popen[bytes]] = []
    try:
        for i, name in enumerate(names, start=1):
            ns, pod_ip = f"pdoc-{i}-{P}", f"10.95.{i}.1"
            ip("netns", "add", ns)
            made[name] = _Pod(name, ns, pod_ip, 0)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{pod_ip}/32", "dev", "lo")
            app = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", POD_APP])
            apps.append(app)
            made[name].pid = app.pid
        for pod in made.values():
            deadline = time.monotonic() + 10
            while run_in_netns(f"/run/netns/{pod.netns}", doctor_pod._connects, 8080):  # "": it answers
                assert time.monotonic() < deadline, "the pod's app did not start"
                time.sleep(0.05)
        yield made
    finally:
        for app in apps:
            app.kill()
            app.wait()
        for pod in made.values():
            subprocess.run(["ip", "netns", "del", pod.netns], capture_output=True, check=False)


class _QuietDaemon(Daemon):
    """The real daemon, minus the signal handlers (they belong to pytest here)."""

    def _install_signals(self, loop: asyncio.AbstractEventLoop, flowlog: FlowLog) -> None:
        return None


@dataclass
class _Rig:
    daemon: Daemon
    settings: settings_mod.Settings  # doctor's (kubernetes.pods on)
    pods: dict[str, _Pod]

    @property
    def definitions(self) -> definitions_mod.Definitions:
        definitions = self.daemon.gate.runtime.definitions
        assert definitions is not None
        return definitions

    async def doctor(self, pod: PodInfo) -> tuple[Report, str]:
        """The per-pod checks of ``pod`` with the /proc scan limited to the test's app processes."""
        out = io.StringIO()
        report = Report(out)
        owner = {p.pid: p.uid for p in self.pods.values()}
        scan = functools.partial(find_pod_netns, pod_uid_of=owner.get)
        await doctor_pod.check_pod(report, self.settings, self.definitions, pod, node="n1", scan=scan)
        return report, out.getvalue()


@contextlib.asynccontextmanager
async def _rig(tmp_path: Path) -> AsyncIterator[_Rig]:
    """Pods ``served`` (labelled app=web, enrolled into a serving daemon) and ``idle`` (labelled app=web, not)."""
    daemon_cfg, doctor_cfg = _write_config(tmp_path)
    with _pods("served", "idle") as pods:
        settings = settings_mod.load_settings(daemon_cfg)
        host = HostAttachment(settings, manages_redirect=False, listen_socket=make_listen_socket("127.0.0.1", 0))
        daemon = _QuietDaemon(settings, attachments=[host], flowlog=FlowLog(None, stream=io.StringIO()))
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.get_running_loop().create_task(daemon.run(on_ready=ready))
        started: set[asyncio.Future[None] | asyncio.Task[int]] = {ready, task}
        await asyncio.wait(started, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        assert ready.done(), "the daemon did not start"
        served = pods["served"].info({"app": "web"})
        attachment = NamespacedPodAttachment(
            PodNetns.open(f"/run/netns/{pods['served'].netns}", uid=served.uid), settings, tags=pod_tags(served),
            port=POD_PORT, name=f"pod {served}", namespace=served.namespace,
        )
        try:
            await daemon.add_attachment(attachment)
            assert [s.name for s in attachment.services] == ["web"]
            yield _Rig(daemon, settings_mod.load_settings(doctor_cfg), pods)
        finally:
            daemon.stop()
            assert await asyncio.wait_for(task, 30) == 0
            attachment.close()


@pytest.mark.root
async def test_a_served_pod_passes_and_its_live_table_is_listed(tmp_path: Path) -> None:
    """A pod the daemon serves: every check ok (selected, namespace found by the scan, its table as intended, the
    listener on listenPort and the app port answering inside it), with the live table in nft syntax and counters."""
    async with _rig(tmp_path) as rig:
        report, out = await rig.doctor(rig.pods["served"].info({"app": "web"}))
        assert (report.failures, report.warnings) == (0, 0), out
        inode = os.stat(f"/run/netns/{rig.pods['served'].netns}").st_ino
        for expected in (
            "ok    pod shop/served", "select service(s) web (exposedPort 443", f"ok    network namespace net:[{inode}]",
            f"ok    table inet {TABLE} in the pod's namespace matches its services",
            f"ok    the enforcer's listener accepts connections on 127.0.0.1:{POD_PORT}",
            "ok    the app answers on 127.0.0.1:8080 (web)", f"table inet {TABLE} {{", f"redirect to :{POD_PORT}",
        ):
            assert expected in out, (expected, out)
        assert re.search(r"counter packets \d+ bytes \d+", out), out


async def _delete_first_rule(netns: str, chain: str) -> None:
    """``nft delete rule`` of the first rule of ``chain`` inside the pod."""
    listing = subprocess.run(["ip", "netns", "exec", netns, "nft", "-a", "list", "chain", "inet", TABLE, chain],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    handle = re.findall(r"# handle (\d+)", listing)[1]  # [0] is the chain's own
    subprocess.run(["ip", "netns", "exec", netns, "nft", "delete", "rule", "inet", TABLE, chain, "handle", handle],
                   check=True)  # fmt: skip


@pytest.mark.root
@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("no table", rf"FAIL  pod shop/idle is selected but has no table inet {TABLE} in its namespace: NOT protected"),
        ("rule deleted", rf"FAIL  table inet {TABLE} in pod shop/served differs from what its services need:\n"
                         r"\s+chain prerouting rule 1 "),
    ],
)
async def test_a_selected_pod_without_its_table_or_with_a_changed_one_fails(
    tmp_path: Path, case: str, pattern: str
) -> None:
    """A selected pod no enforcer serves has no table (FAIL: not protected); a served pod's table with a rule deleted
    by hand differs from the intended one (FAIL, the difference named, the live table still listed)."""
    async with _rig(tmp_path) as rig:
        name = "idle" if case == "no table" else "served"
        if case == "rule deleted":
            await _delete_first_rule(rig.pods[name].netns, "prerouting")
        report, out = await rig.doctor(rig.pods[name].info({"app": "web"}))
        assert report.failures >= 1 and re.search(pattern, out), out
        assert ("nft syntax" in out) == (case == "rule deleted"), out


@pytest.mark.root
async def test_a_table_on_a_pod_no_service_selects_is_stale(tmp_path: Path) -> None:
    """A pod whose labels no longer select a service but whose namespace still holds the table: a warning (stale),
    the selectors for its namespace named, the table listed in nft syntax; no failure; the namespace handle is closed after."""
    async with _rig(tmp_path) as rig:
        pod = rig.pods["served"]
        inode = os.stat(f"/run/netns/{pod.netns}").st_ino
        before = len(net_pods.fds_into(inode))
        report, out = await rig.doctor(pod.info({"app": "other"}))
        assert report.failures == 0, out
        assert "warn  pod shop/served is not selected by any service" in out
        assert "selectors for namespace shop: web: [app=web]" in out
        assert f"warn  pod shop/served: a stale table inet {TABLE} in its namespace" in out
        assert f"table inet {TABLE} {{" in out and f"redirect to :{POD_PORT} # handle" in out  # in nft syntax
        assert len(net_pods.fds_into(inode)) == before  # doctor's own handle is closed


def _no_scan(pods: Mapping[str, object]) -> ScanResult:
    raise AssertionError(f"scanned for {list(pods)}")


POD = PodInfo(uid="u1", namespace="shop", name="web-1", labels={"app": "web"}, ips=("10.1.0.5",), node="n1",
              phase="Running")


@pytest.mark.parametrize(
    ("pod", "scan", "line"),
    [
        (PodInfo("u1", "shop", "web-1", {"app": "web"}, host_network=True, node="n1"), _no_scan,
         "warn  pod shop/web-1 (uid u1) uses hostNetwork: pod mode does not apply"),
        (PodInfo("u1", "shop", "web-1", {"app": "web"}, node="n2"), _no_scan,
         "FAIL  pod shop/web-1 (uid u1) runs on node n2; this enforcer serves node n1"),
        (PodInfo("u1", "shop", "web-1", {"app": "web"}, node="n1", deleting=True, phase="Succeeded"), _no_scan,
         "warn  pod shop/web-1 (uid u1) is going away"),
        (PodInfo("u1", "shop", "web-1", {"app": "web"}, node="n1", phase="Pending"), _no_scan,
         "warn  pod shop/web-1 (uid u1) is not running (phase Pending)"),
        (POD, functools.partial(find_pod_netns, pod_uid_of=lambda pid: None),
         "FAIL  pod shop/web-1: its network namespace was not found: no process of the pod found in /proc"),
        (PodInfo("u1", "shop", "web-1", {"app": "web"}, node="n1", phase="Running"), find_pod_netns,
         "FAIL  pod shop/web-1: its network namespace was not found: no IP known for the pod"),
    ],
)
async def test_pods_the_node_checks_cannot_reach_get_one_clear_line(
    tmp_path: Path, pod: PodInfo, scan: Scan, line: str
) -> None:
    """hostNetwork, another node, going away or not running: one line and no scan; a selected pod whose namespace
    the scan cannot find (no process of it here, no IP known): FAIL with the scan's reason and a fix."""
    _, doctor_cfg = _write_config(tmp_path)
    settings = settings_mod.load_settings(doctor_cfg)
    definitions = definitions_mod.resolve_definitions(
        definitions_mod.parse_documents((tmp_path / "d.yaml").read_text(), "d.yaml"), ()  # type: ignore[arg-type]
    )
    out = io.StringIO()
    report = Report(out)
    await doctor_pod.check_pod(report, settings, definitions, pod, node="n1", scan=scan)
    assert line in out.getvalue(), out.getvalue()
    assert "fix: " in out.getvalue() or line.startswith("warn  pod shop/web-1 (uid u1) is going away")


def test_pod_needs_pod_mode_in_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``doctor --pod`` with a config without ``kubernetes.pods`` exits 2 naming ``kubernetes.pods.enabled``."""
    daemon_cfg, _ = _write_config(tmp_path)
    assert cli.main(["doctor", "-c", str(daemon_cfg), "--pod", "shop/web-1"]) == 2
    err = capsys.readouterr().err
    assert "kubernetes.pods.enabled" in err and "doctor --pod" in err, err


@pytest.mark.root
@pytest.mark.timeout(2400)  # the API server fixture may wait for another session's cluster
def test_the_cli_reads_the_pod_from_a_real_api_server(
    tmp_path: Path, kube_api: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    """``enforcer doctor --pod`` reads the pod from the API server with the config's kubeconfig: a missing pod and a
    pod on another node FAIL (exit 1, the other node named), a hostNetwork pod is one warning (exit 0)."""
    _, doctor_cfg = _write_config(tmp_path)
    config = yaml.safe_load(doctor_cfg.read_text())
    config["kubernetes"]["kubeconfig"] = str(kube_api.kubeconfig)
    doctor_cfg.write_text(yaml.safe_dump(config))
    ns = f"pdoc-{P}"
    kube_api.kubectl("create", "namespace", ns)
    try:
        kube_api.kubectl("create", "serviceaccount", "web-sa", "-n", ns)
        pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app": "web"}},
                 "spec": {"nodeName": node, "hostNetwork": host, "serviceAccountName": "web-sa",
                          "automountServiceAccountToken": False,
                          "containers": [{"name": "app", "image": "enforcer.test/none:1", "imagePullPolicy": "Never"}]}}
                for name, node, host in (("far", "n2", False), ("hostnet", "n1", True))]  # fmt: skip
        kube_api.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": pods}))
        for name, code, line in (
            ("missing", 1, f"FAIL  pod {ns}/missing not found"),
            ("far", 1, "runs on node n2; this enforcer serves node n1"),
            ("hostnet", 0, "uses hostNetwork: pod mode does not apply to it"),
        ):
            assert cli.main(["doctor", "-c", str(doctor_cfg), "--pod", f"{ns}/{name}"]) == code, name
            out = capsys.readouterr().out
            assert line in out, out
    finally:
        kube_api.kubectl("delete", "namespace", ns, "--wait=false", check=False)

