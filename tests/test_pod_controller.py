"""Pod mode's controller (enforcer/run/pods.py): which pods are enrolled, from which source of
their network namespace, and when they are released; with a fake enrolment sink that serves
attachments as the daemon does (apply, then open) and a pod cache filled by the test."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import ipaddress
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from enforcer.config import definitions as definitions_mod
from enforcer.config import kubernetes as k8s
from enforcer.config import settings as settings_mod
from enforcer.config.definitions import parse_documents, resolve_definitions
from enforcer.config.issues import ConfigError
from enforcer.config.kubernetes import NodePods, PodInfo, Probe
from enforcer.flowlog import FlowLog
from enforcer.http.tls import make_listen_socket
from enforcer.net import nftables
from enforcer.net.netns import run_in_netns
from enforcer.net.pods import PodNetns, ScanResult, find_pod_netns
from enforcer.run.attach import HostAttachment, PodAttachment
from enforcer.run.cni import CniEvent, PodRef
from enforcer.run.daemon import Daemon
from enforcer.run.pods import NamespacedPodAttachment, PodController, PodUnknown, pod_tags, services_for
from tests.harness.enrolment import FakeSink
from tests.harness.fake_op import FakeOP
from tests.harness.netns import NetnsLoop, ip, no_fds_into, refused_from_here, require_root
from tests.harness.redirector import FakeRedirector
from tests.harness.seed import SERVICE, SPEC

FRONTEND = {**SERVICE, "name": "frontend", "port": 8080, "selectors": [["app=frontend"]]}
BACKEND = {**SERVICE, "name": "backend", "port": 9090, "exposedPort": 8443, "hosts": ["api.example.com"],
           "OIDCCallbackURL": "https://api.example.com", "selectors": [["app=backend"]]}
TEAM_A = {**SERVICE, "name": "team-a-app", "port": 7070, "exposedPort": 7443, "hosts": ["a.example.com"],
          "OIDCCallbackURL": "https://a.example.com", "selectors": [["app=shop"]], "namespace": "team-a"}


def _definitions(*services: dict[str, object]) -> definitions_mod.Definitions:
    parsed = parse_documents(yaml.safe_dump_all([*services, SPEC]), "d.yaml")
    assert isinstance(parsed, list)
    return resolve_definitions(parsed, ())


def _settings(tmp_path: Path, pods: dict[str, object] | None = None) -> settings_mod.Settings:
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(yaml.safe_dump({
        "stateDir": "state", "logsDir": "logs", "definitions": [{"file": "d.yaml"}],
        "redirect": {"enabled": True},
        "kubernetes": {"nodeName": "n1", "namespace": "enforcer-system", "pods": {"enabled": True, **(pods or {})}},
    }))
    return settings_mod.load_settings(cfg)


def _pod(name: str, labels: Mapping[str, str], *, ns: str = "shop", uid: str = "", ips: Iterable[str] = ("10.1.0.5",),
         **more: object) -> PodInfo:
    return PodInfo(uid=uid or f"uid-{ns}-{name}", namespace=ns, name=name, labels=dict(labels), ips=tuple(ips),
                   node="n1", **more)  # type: ignore[arg-type]


def _add(pod: PodInfo, sandbox: str = "sandbox-1", netns: str = "/var/run/netns/cni-1") -> CniEvent:
    return CniEvent("ADD", sandbox, Path(netns), "eth0", PodRef(pod.namespace, pod.name, pod.uid), "1.0.0",
                    (ipaddress.ip_interface("10.1.0.5/24"),))


def _del(pod: PodInfo, sandbox: str = "sandbox-1") -> CniEvent:
    return CniEvent("DEL", sandbox, None, "eth0", PodRef(pod.namespace, pod.name, pod.uid), "1.0.0")


@dataclass
class Netns:
    """Fake namespaces: a descriptor on /dev/null per path (no privilege needed), one inode per
    namespace path, a descriptor path of a held one leading to the same inode."""

    inodes: dict[str, int] = field(default_factory=dict)
    opened: list[PodNetns] = field(default_factory=list)

    def open(self, path: str, uid: str) -> PodNetns:
        inode = self.inodes.setdefault(path, 1000 + len(self.inodes))
        held = PodNetns(fd=os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC), inode=inode, uid=uid)
        self.inodes[f"/proc/self/fd/{held.fd}"] = inode
        self.opened.append(held)
        return held

    def scan(self, pods: Mapping[str, Iterable[str]]) -> ScanResult:
        result = ScanResult()
        for uid in pods:
            result.found[uid] = self.open(f"/proc/scan/{uid}", uid)
        return result

    def leaked(self) -> list[PodNetns]:
        return [n for n in self.opened if not n.closed]


@dataclass
class World:
    controller: PodController
    source: NodePods
    sink: FakeSink
    netns: Netns
    redirectors: dict[str, FakeRedirector]

    def put(self, *pods: PodInfo) -> None:
        for p in pods:
            self.source.pods[p.uid] = p


def _world(tmp_path: Path, definitions: definitions_mod.Definitions, *, lookup_wait: float = 0.3) -> World:
    settings = _settings(tmp_path)
    source = NodePods("n1")
    source.synced = source.current = True
    sink = FakeSink(definitions)
    netns = Netns()
    redirectors: dict[str, FakeRedirector] = {}

    def make(held: PodNetns, pod: PodInfo, tags: frozenset[str]) -> PodAttachment:
        fake = redirectors.setdefault(str(pod), FakeRedirector())
        return NamespacedPodAttachment(held, settings, tags=tags, port=15443, name=f"pod {pod}",
                                       namespace=pod.namespace, redirector=fake)

    controller = PodController(settings, source, sink, lambda: sink.definitions, lookup_wait=lookup_wait, poll=0.02,
                               open_netns=netns.open, scan=netns.scan, make_attachment=make)
    return World(controller, source, sink, netns, redirectors)


# ---------------------------------------------------------------------------------------------
# tags and selection


def test_pod_tags_are_its_labels_plus_namespace_and_service_account() -> None:
    """A pod's tags are one key=value per label plus k8s:namespace= and k8s:serviceaccount=; a label cannot forge them."""
    pod = _pod("web", {"app": "frontend", "k8s:namespace": "kube-system", "tier": ""}, service_account="web-sa")
    assert pod_tags(pod) == {"app=frontend", "tier=", "k8s:namespace=shop", "k8s:serviceaccount=web-sa"}


@pytest.mark.parametrize(("pod", "expected"), [
    (_pod("web", {"app": "frontend"}), ("frontend",)),
    (_pod("api", {"app": "backend"}), ("backend",)),
    (_pod("other", {"app": "db"}), ()),
    (_pod("web", {"app": "frontend"}, host_network=True), ()),
    (_pod("web", {"app": "frontend"}, deleting=True), ()),
    (_pod("shop", {"app": "shop"}, ns="team-a"), ("team-a-app",)),
    (_pod("shop", {"app": "shop"}, ns="team-b"), ()),
    (_pod("web", {"app": "frontend"}, ns="team-b"), ("frontend",)),
])
def test_which_services_a_pod_is_served(pod: PodInfo, expected: tuple[str, ...]) -> None:
    """Only pods with their own namespace, not going away, get the services their tags select, a namespaced service
    only in its namespace."""
    defs = _definitions(FRONTEND, BACKEND, TEAM_A)
    assert tuple(s.name for s in services_for(pod, defs)) == expected


async def test_a_namespaced_attachment_never_serves_another_namespaces_service(tmp_path: Path) -> None:
    """Handed every definition, a pod of namespace team-b is not served team-a's service even with matching labels."""
    w = _world(tmp_path, _definitions(TEAM_A, FRONTEND))
    pod = _pod("shop", {"app": "shop", "extra": "x"}, ns="team-b")
    attachment = NamespacedPodAttachment(w.netns.open("/x", pod.uid), w.controller.settings, tags=pod_tags(pod),
                                         namespace="team-b", redirector=FakeRedirector())
    await attachment.apply(w.sink.definitions)
    assert attachment.services == ()
    attachment.close()


# ---------------------------------------------------------------------------------------------
# the CNI ADD and DEL


async def test_a_selected_pod_is_served_before_its_cni_add_returns(tmp_path: Path) -> None:
    """A CNI ADD for a selected pod returns only once its attachment is added (rules applied); a retried ADD adds nothing."""
    w = _world(tmp_path, _definitions(FRONTEND, BACKEND))
    web = _pod("web", {"app": "frontend"}, ips=())
    w.put(web)
    await w.controller.pod_added(_add(web))
    assert w.sink.calls == [("add", "pod shop/web", ("frontend",))]
    assert w.redirectors["shop/web"].applied, "the table was applied before the ADD returned"
    enrolled = w.controller.enrolled[web.uid]
    assert enrolled.sandbox == "sandbox-1" and enrolled.pod.ips == ("10.1.0.5",)  # the IPs came from the plugin
    await w.controller.pod_added(_add(web))
    assert len(w.sink.calls) == 1
    assert len(w.netns.leaked()) == 1  # the retried ADD's descriptor was closed


async def test_a_pod_no_service_selects_starts_untouched(tmp_path: Path) -> None:
    """A CNI ADD for a pod no service selects (or a hostNetwork one) returns at once without enrolling it."""
    w = _world(tmp_path, _definitions(FRONTEND))
    db = _pod("db", {"app": "db"})
    w.put(db)
    await w.controller.pod_added(_add(db))
    assert w.sink.calls == [] and w.netns.opened == []


async def test_a_cni_add_waits_for_the_pod_to_reach_the_watch(tmp_path: Path) -> None:
    """A CNI ADD that comes before the watch knows the pod waits for it (the API lags the kubelet), then enrols it."""
    w = _world(tmp_path, _definitions(FRONTEND), lookup_wait=2.0)
    web = _pod("web", {"app": "frontend"})
    asyncio.get_running_loop().call_later(0.2, w.put, web)
    started = time.monotonic()
    await w.controller.pod_added(_add(web))
    assert 0.15 < time.monotonic() - started < 1.5
    assert [c[0] for c in w.sink.calls] == ["add"]


@pytest.mark.parametrize(("current", "why"), [
    (False, "cannot be reached"),
    (True, "not \\(yet\\) in the watch"),
])
async def test_a_pod_that_cannot_be_decided_fails_its_sandbox(tmp_path: Path, current: bool, why: str) -> None:
    """A CNI ADD for a pod unknown after the wait raises (the plugin fails the sandbox): fail closed, saying why."""
    w = _world(tmp_path, _definitions(FRONTEND), lookup_wait=0.2)
    w.source.current = current
    with pytest.raises(PodUnknown, match=why):
        await w.controller.pod_added(_add(_pod("web", {"app": "frontend"})))
    assert w.sink.calls == []


async def test_a_failed_enrolment_fails_the_add_and_closes_the_namespace(tmp_path: Path) -> None:
    """When the sink cannot serve the pod, the ADD raises and no descriptor into the namespace stays open."""
    w = _world(tmp_path, _definitions(FRONTEND))
    web = _pod("web", {"app": "frontend"})
    w.put(web)
    w.sink.refuse = True
    with pytest.raises(RuntimeError, match="refused"):
        await w.controller.pod_added(_add(web))
    assert w.controller.enrolled == {} and w.netns.leaked() == []


async def test_cni_del_lets_go_of_its_own_sandbox_only(tmp_path: Path) -> None:
    """A CNI DEL of another (older) sandbox of the pod is ignored; the DEL of the served one closes it, rules kept."""
    w = _world(tmp_path, _definitions(FRONTEND))
    web = _pod("web", {"app": "frontend"})
    w.put(web)
    await w.controller.pod_added(_add(web, sandbox="new"))
    await w.controller.pod_deleted(_del(web, sandbox="old"))
    assert web.uid in w.controller.enrolled
    await w.controller.pod_deleted(_del(web, sandbox="new"))
    assert w.sink.calls[-1] == ("remove", "pod shop/web", False)
    assert w.controller.enrolled == {} and w.netns.leaked() == []
    assert w.redirectors["shop/web"].removed == []


async def test_a_recreated_sandbox_replaces_the_old_one(tmp_path: Path) -> None:
    """An ADD with a new network namespace for a served pod drops the old attachment and serves the new one."""
    w = _world(tmp_path, _definitions(FRONTEND))
    web = _pod("web", {"app": "frontend"})
    w.put(web)
    await w.controller.pod_added(_add(web, sandbox="s1", netns="/var/run/netns/cni-1"))
    await w.controller.pod_added(_add(web, sandbox="s2", netns="/var/run/netns/cni-2"))
    assert [c[:2] for c in w.sink.calls] == [("add", "pod shop/web"), ("remove", "pod shop/web"), ("add", "pod shop/web")]
    assert w.controller.enrolled[web.uid].sandbox == "s2"
    assert [n.inode for n in w.netns.leaked()] == [w.netns.inodes["/var/run/netns/cni-2"]]


# ---------------------------------------------------------------------------------------------
# the watch: labels, deletion, definitions


async def test_label_changes_release_or_retag(tmp_path: Path) -> None:
    """Labels selecting another service re-serve the pod with its new tags; labels selecting none release it (rules removed)."""
    w = _world(tmp_path, _definitions(FRONTEND, BACKEND))
    web = _pod("web", {"app": "frontend"})
    w.put(web)
    await w.controller.pod_added(_add(web))
    now_api = _pod("web", {"app": "backend"})
    await w.controller._on_pod("MODIFIED", now_api)
    assert w.sink.calls[1:] == [("remove", "pod shop/web", False), ("add", "pod shop/web", ("backend",))]
    assert w.redirectors["shop/web"].removed == []  # the table stayed in force while re-served
    await w.controller._on_pod("MODIFIED", now_api)  # nothing changed: nothing done
    assert len(w.sink.calls) == 3
    await w.controller._on_pod("MODIFIED", _pod("web", {"app": "db"}))
    assert w.sink.calls[-1] == ("remove", "pod shop/web", True)
    assert w.redirectors["shop/web"].removed == ["enforcer"]
    assert w.controller.enrolled == {} and w.netns.leaked() == []


async def test_a_deleted_pod_is_let_go_with_its_rules_kept(tmp_path: Path) -> None:
    """A pod deleted (watch) is removed without a release: its namespace goes away with it."""
    w = _world(tmp_path, _definitions(FRONTEND))
    web = _pod("web", {"app": "frontend"})
    w.put(web)
    await w.controller.pod_added(_add(web))
    del w.source.pods[web.uid]
    await w.controller._on_pod("DELETED", web)
    assert w.sink.calls[-1] == ("remove", "pod shop/web", False)
    assert w.controller.enrolled == {} and w.netns.leaked() == []


async def test_a_pod_going_away_stays_served_until_deleted(tmp_path: Path) -> None:
    """A served pod whose deletion started (or that finished) keeps its rules and listener, even with labels no longer
    selecting it or new definitions; its deletion then lets it go with the rules kept, never a release."""
    w = _world(tmp_path, _definitions(FRONTEND))
    web = _pod("web", {"app": "frontend"})
    w.put(web)
    await w.controller.pod_added(_add(web))
    for going in (_pod("web", {"app": "frontend"}, deleting=True), _pod("web", {"app": "db"}, deleting=True)):
        w.put(going)
        await w.controller._on_pod("MODIFIED", going)
        await w.controller.reconcile()
    assert [c[0] for c in w.sink.calls] == ["add"] and w.redirectors["shop/web"].removed == []
    del w.source.pods[web.uid]
    await w.controller._on_pod("DELETED", going)
    assert w.sink.calls[-1] == ("remove", "pod shop/web", False)
    assert w.controller.enrolled == {} and w.netns.leaked() == []


async def test_reconcile_finds_running_pods_by_the_scan_and_follows_the_definitions(tmp_path: Path) -> None:
    """At start the running selected pods are found by one /proc scan and served; a new definitions set releases the
    pods it no longer selects and enrols the ones it now does; a running pod without IPs is left to its CNI ADD."""
    w = _world(tmp_path, _definitions(FRONTEND))
    web, api, db = _pod("web", {"app": "frontend"}), _pod("api", {"app": "backend"}), _pod("db", {"app": "db"})
    starting = _pod("web-2", {"app": "frontend"}, ips=())
    w.put(web, api, db, starting)
    await w.controller.reconcile()
    assert w.sink.calls == [("add", "pod shop/web", ("frontend",))]
    w.sink.definitions = _definitions(BACKEND)
    await w.controller.definitions_changed()
    assert sorted(w.sink.calls[1:]) == [("add", "pod shop/api", ("backend",)), ("remove", "pod shop/web", True)]
    assert set(w.controller.enrolled) == {api.uid}
    assert [n.uid for n in w.netns.leaked()] == [api.uid]


async def test_the_first_reconcile_removes_tables_left_in_pods_nothing_selects(tmp_path: Path) -> None:
    """At start a running pod no service selects has any table an earlier enforcer left removed (one scan); a pod going away or on the host network is not touched, and later reconciles do not sweep again."""
    w = _world(tmp_path, _definitions(FRONTEND))
    web, api = _pod("web", {"app": "frontend"}), _pod("api", {"app": "backend"})
    leaving = _pod("old", {"app": "backend"}, deleting=True)
    host = _pod("agent", {"app": "x"}, host_network=True)
    w.put(web, api, leaving, host)
    await w.controller.reconcile()
    assert w.sink.calls == [("add", "pod shop/web", ("frontend",))]
    assert {pod: r.removed for pod, r in w.redirectors.items()} == {"shop/web": [], "shop/api": ["enforcer"]}
    assert [n.uid for n in w.netns.leaked()] == [web.uid]
    w.put(_pod("db", {"app": "db"}))
    await w.controller.reconcile()
    assert "shop/db" not in w.redirectors  # swept once, at start: a later pod is never enrolled, so has no table


async def test_a_refused_release_is_retried(tmp_path: Path) -> None:
    """When the kernel refuses to remove a released pod's rules, the pod stays known and the release is retried later."""
    w = _world(tmp_path, _definitions(FRONTEND))
    web = _pod("web", {"app": "frontend"})
    w.put(web)
    await w.controller.pod_added(_add(web))
    w.redirectors["shop/web"].refuse = True
    await w.controller._on_pod("MODIFIED", _pod("web", {"app": "db"}))
    assert w.controller.enrolled[web.uid].releasing
    w.redirectors["shop/web"].refuse = False
    await w.controller._on_pod("MODIFIED", _pod("web", {"app": "db"}))
    assert w.controller.enrolled == {} and w.redirectors["shop/web"].removed == ["enforcer"]
    assert w.netns.leaked() == []


# ---------------------------------------------------------------------------------------------
# settings and the custom resource's namespace


def test_pods_settings_defaults(tmp_path: Path) -> None:
    """kubernetes.pods defaults: off elsewhere, port 15443, probe port 15021, the plugin's socket, a 5 s lookup wait."""
    pods = _settings(tmp_path).model.kubernetes.pods  # type: ignore[union-attr]
    assert (pods.enabled, pods.listenPort, pods.probePort, str(pods.cniSocket), pods.lookupWait) == (
        True, 15443, 15021, "/var/run/enforcer/cni.sock", 5.0)


@pytest.mark.parametrize(("pods", "path"), [
    ({"listenPort": 0}, "kubernetes.pods.listenPort"),
    ({"cniSocket": "relative.sock"}, "kubernetes.pods.cniSocket"),
    ({"cniSocket": "/var/run/with space.sock"}, "kubernetes.pods.cniSocket"),
    ({"lookupWait": "30s"}, "kubernetes.pods"),
    ({"listenport": 15443}, "kubernetes.pods.listenport"),
    ({"probePort": 70000}, "kubernetes.pods.probePort"),
    ({"probePort": 15443}, "kubernetes.pods"),
])
def test_pods_settings_are_validated(tmp_path: Path, pods: dict[str, object], path: str) -> None:
    """A wrong kubernetes.pods value is refused, naming its key."""
    with pytest.raises(ConfigError) as caught:
        _settings(tmp_path, pods)
    assert any(i.path.startswith(path) for i in caught.value.issues), caught.value.issues


def test_a_custom_resource_carries_its_namespace() -> None:
    """An EnforcerService's definition holds its metadata.namespace, and spec.namespace is refused."""
    kind = k8s.KIND_BY_NAME["EnforcerService"]
    obj = {"metadata": {"name": "app", "namespace": "team-a"}, "spec": {"port": 80}}
    assert k8s.render(kind, obj, {}).data == {"kind": "service", "name": "app", "namespace": "team-a", "port": 80}
    bad = k8s.render(kind, {**obj, "spec": {"namespace": "team-b"}}, {})
    assert bad.data is None and bad.problem is not None and "metadata.namespace" in bad.problem.message


def test_pod_objects_become_pod_info() -> None:
    """A pod object's UID, labels, service account, hostNetwork, IPs and deletion are read; one without a UID is none."""
    obj = {
        "metadata": {"uid": "u1", "namespace": "shop", "name": "web", "labels": {"app": "frontend"},
                     "deletionTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeName": "n1", "serviceAccountName": "web-sa", "hostNetwork": False},
        "status": {"podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}], "phase": "Running"},
    }
    assert k8s.pod_info(obj) == PodInfo("u1", "shop", "web", {"app": "frontend"}, "web-sa", False,
                                        ("10.1.0.5", "fd00::5"), "n1", True)
    assert k8s.pod_info({"metadata": {"name": "x", "namespace": "y"}}) is None


def _container(name: str = "app", ports: Iterable[tuple[str, int]] = (("http", 8080),), **probes: object) -> dict[str, object]:
    return {"name": name, "ports": [{"name": n, "containerPort": p} for n, p in ports], **probes}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"containers": [_container(readinessProbe={"httpGet": {"path": "/healthz", "port": 8080}})]},
         [Probe("app", "readiness", "httpGet", 8080, "/healthz")]),
        ({"containers": [_container(livenessProbe={"httpGet": {"port": "http"}})]},
         [Probe("app", "liveness", "httpGet", 8080, "/")]),
        ({"containers": [_container(startupProbe={"httpGet": {"path": "ready?full=1", "port": "8081",
                                                               "httpHeaders": [{"name": "X-Probe", "value": "1"}]}})]},
         [Probe("app", "startup", "httpGet", 8081, "/ready?full=1", headers=(("X-Probe", "1"),))]),
        ({"containers": [_container(readinessProbe={"httpGet": {"path": "/h", "port": 8443, "scheme": "HTTPS"}})]},
         [Probe("app", "readiness", "httpGet", 8443, "/h", "HTTPS")]),
        ({"containers": [_container(livenessProbe={"tcpSocket": {"port": "http"}}, readinessProbe={"grpc": {"port": 9090}})]},
         [Probe("app", "liveness", "tcpSocket", 8080), Probe("app", "readiness", "grpc", 9090)]),
        ({"containers": [_container(livenessProbe={"httpGet": {"port": "nope"}})]},
         [Probe("app", "liveness", "httpGet", None, "/")]),
        ({"containers": [_container(livenessProbe={"exec": {"command": ["true"]}},
                                    readinessProbe={"httpGet": {"host": "10.0.0.9", "port": 8080}})]}, []),
        ({"containers": [_container("a", readinessProbe={"httpGet": {"port": 8080}})],
          "initContainers": [_container("side", [("m", 9100)], restartPolicy="Always",
                                        livenessProbe={"httpGet": {"port": "m", "path": "/metrics"}})]},
         [Probe("a", "readiness", "httpGet", 8080), Probe("side", "liveness", "httpGet", 9100, "/metrics")]),
        ({"containers": [_container(livenessProbe={"httpGet": {"port": True}}, readinessProbe={"httpGet": {"port": 0}},
                                    startupProbe={"httpGet": {"port": 1.5}}), "junk"]},
         [Probe("app", k, "httpGet", None) for k in ("liveness", "readiness", "startup")]),
        ({}, []),
    ],
)
def test_pod_probes_are_parsed(spec: dict[str, object], expected: list[Probe]) -> None:
    """httpGet, tcpSocket and grpc probes of every container are read with named ports resolved in the container,
    the request target defaulted and prefixed with /; exec probes and probes of another host are not."""
    probes = k8s.pod_probes(spec)
    assert list(probes) == expected
    assert k8s.pod_info({"metadata": {"uid": "u", "namespace": "n", "name": "p"}, "spec": spec}) == PodInfo(
        "u", "n", "p", probes=probes)


def test_only_plain_http_probes_of_a_known_port_are_gated() -> None:
    """A probe is gated only as a plain-HTTP httpGet of a resolved port; its text names it for the log."""
    assert Probe("app", "readiness", "httpGet", 8080, "/healthz").gated
    assert str(Probe("app", "readiness", "httpGet", 8080, "/healthz")) == (
        "readinessProbe of container app (httpGet HTTP /healthz on port 8080)")
    for probe in (Probe("app", "readiness", "httpGet", 8443, scheme="HTTPS"), Probe("app", "liveness", "tcpSocket", 8080),
                  Probe("app", "liveness", "grpc", 8080), Probe("app", "liveness", "httpGet", None)):
        assert not probe.gated, probe
    assert str(Probe("app", "liveness", "tcpSocket", 8080)) == "livenessProbe of container app (tcpSocket on port 8080)"


# ---------------------------------------------------------------------------------------------
# real pods (root): network namespaces as pods, real PodAttachments, a real Daemon as the sink

P = os.getpid()
TABLE = f"pctl{P}"

POD_APP = """\
import http.server, sys
name = sys.argv[1].encode()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        user = self.headers.get("X-Forwarded-User")
        body = name + (b" for " + user.encode() if user else b"")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""
"""A pod's app: every address of its namespace, port 8080, answering its pod's name (and the user it is told)."""


@dataclass
class RealPod:
    """One pod: its network namespace (a veth to the client's), its IP, its app's pid, its UID."""

    name: str
    namespace: str
    netns: str
    ip: str
    app_pid: int
    uid: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.netns}"

    @property
    def inode(self) -> int:
        return os.stat(self.path).st_ino

    def info(self, labels: Mapping[str, str], **more: object) -> PodInfo:
        return PodInfo(uid=self.uid, namespace=self.namespace, name=self.name, labels=dict(labels),
                       ips=(self.ip,), node="n1", **more)  # type: ignore[arg-type]

    def add(self, sandbox: str = "sandbox-1") -> CniEvent:
        return CniEvent("ADD", sandbox, Path(self.path), "eth0", PodRef(self.namespace, self.name, self.uid), "1.0.0",
                        (ipaddress.ip_interface(f"{self.ip}/24"),))


@contextlib.contextmanager
def _real_pods(*pods: tuple[str, str]) -> Iterator[tuple[str, dict[str, RealPod]]]:
    """A client namespace and one namespace per (k8s namespace, name) pod, each with a veth to the client and an
    app process on its 0.0.0.0:8080 (a process of its own: its sockets are not ours)."""
    require_root()
    client = f"pctl-c-{P}"
    made: list[str] = []
    apps: list[subprocess.Popen[bytes]] = []
    found: dict[str, RealPod] = {}
    try:
        ip("netns", "add", client)
        made.append(client)
        ip("-n", client, "link", "set", "lo", "up")
        for i, (namespace, name) in enumerate(pods, start=1):
            ns, pod_ip, client_ip = f"pctl-{i}-{P}", f"10.97.{i}.1", f"10.97.{i}.2"
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"veth{i}", "netns", client)
            ip("-n", ns, "addr", "add", f"{pod_ip}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", client, "addr", "add", f"{client_ip}/24", "dev", f"veth{i}")
            ip("-n", client, "link", "set", f"veth{i}", "up")
            app = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", POD_APP, f"app {name}"])
            apps.append(app)
            found[name] = RealPod(name, namespace, ns, pod_ip, app.pid, f"uid-{namespace}-{name}-{P}")
        for pod in found.values():
            deadline = time.monotonic() + 10
            while not run_in_netns(f"/run/netns/{client}", _answers, pod.ip, 8080):
                assert time.monotonic() < deadline, "the pod's app did not start"
                time.sleep(0.05)
        yield client, found
    finally:
        for app in apps:
            app.kill()
            app.wait()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _answers(address: str, port: int) -> bool:
    """A TCP connection to ``address:port`` is accepted (False: refused or no answer)."""
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((address, port)) == 0


class _QuietDaemon(Daemon):
    """The real daemon, minus the signal handlers (they belong to pytest here)."""

    def _install_signals(self, loop: asyncio.AbstractEventLoop, flowlog: FlowLog) -> None:
        return None


WEB = "web"


def _service_doc(name: str, selector: str, *, op: FakeOP, namespace: str = "") -> dict[str, object]:
    doc: dict[str, object] = {
        "kind": "service", "name": name, "OIDCClientID": op.client_id, "OIDCClientSecret": op.client_secret,
        "OIDCProviderURL": op.issuer, "OIDCCAFile": str(op.ca_file), "OIDCCallbackURL": f"https://{name}.test",
        "hosts": [f"{name}.test"], "port": 8080, "exposedPort": 443, "selectors": [[selector]],
        "exposedAPIs": [["httpresourcespec:name=open"]],
    }
    if namespace:
        doc["namespace"] = namespace
    return doc


def _write_definitions(tmp_path: Path, op: FakeOP, *services: tuple[str, str, str]) -> None:
    """d.yaml: one service per (name, selector, namespace); /public/* open, the rest for staff after a login."""
    docs: list[dict[str, object]] = [
        _service_doc(name, selector, op=op, namespace=namespace)
        for name, selector, namespace in services
    ]
    docs.append({
        "kind": "httpresourcespec", "name": "open", "associatedTags": ["httpresourcespec:name=open"],
        "endpoints": [{"URI": "/public/*", "methods": ["GET"], "public": True},
                      {"URI": "/*", "methods": ["GET"], "allowedScopes": [["groups=staff"]]}],
    })
    (tmp_path / "d.yaml").write_text(yaml.safe_dump_all(docs))


def _real_daemon(tmp_path: Path) -> Daemon:
    """A daemon whose host listener is on loopback (no host redirect); pods get table ``pctl<pid>`` and port 15443."""
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(yaml.safe_dump({
        "tags": ["node=n1"], "stateDir": str(tmp_path / "state"), "logsDir": str(tmp_path / "logs"), "admin": {"address": "127.0.0.1", "port": 0},
        "definitions": [{"file": "d.yaml"}], "sessions": {"store": "memory"}, "allowNoServices": True,
        "listen": {"port": 15443}, "redirect": {"enabled": True, "table": TABLE, "mark": 0x2321},
    }))
    settings = settings_mod.load_settings(cfg)
    host = HostAttachment(settings, manages_redirect=False, listen_socket=make_listen_socket("127.0.0.1", 0))
    return _QuietDaemon(settings, attachments=[host], flowlog=FlowLog(None, stream=io.StringIO()))


@dataclass
class ScriptedPods(NodePods):
    """This Node's pods kept as NodePods keeps them, fed by the test instead of an API server: each event updates
    the cache, then the controller hears it; ``SYNCED`` is a completed list."""

    events: asyncio.Queue[tuple[str, PodInfo | None]] = field(default_factory=asyncio.Queue)

    async def watch(self, on_pod: k8s.OnPod, on_synced: k8s.OnSynced) -> None:
        self.synced = self.current = True
        while True:
            kind, pod = await self.events.get()
            try:
                if pod is None:
                    await on_synced()
                    continue
                if kind == "DELETED":
                    self.pods.pop(pod.uid, None)
                else:
                    self.pods[pod.uid] = pod
                await on_pod(kind, pod)
            finally:
                self.events.task_done()

    async def send(self, kind: str, pod: PodInfo | None = None) -> None:
        """Hand one event to the watcher and wait until the controller has dealt with it."""
        self.events.put_nowait((kind, pod))
        await asyncio.wait_for(self.events.join(), 30)


@dataclass
class Rig:
    daemon: Daemon
    controller: PodController
    source: ScriptedPods
    client: NetnsLoop
    ca: bytes
    op: FakeOP
    pods: dict[str, RealPod]

    async def get(self, pod: str, path: str, host: str = "web.test") -> tuple[int, str, bytes]:
        """GET over TLS from the client namespace to the pod's IP on 443: (status, Location, body)."""
        return (await self.client.run(_https_get(self.pods[pod].ip, self.ca, host, path)))[:3]

    async def log_in(self, pod: str, path: str, host: str = "web.test") -> tuple[int, bytes]:
        """A browser's login through the pod's IP (the OP leg from this namespace, where the OP is): the answer to
        ``path`` once signed in."""
        status, location, _, cookies = await self.client.run(_https_get(self.pods[pod].ip, self.ca, host, path))
        assert status == 302 and location.startswith(self.op.url("/authorize")), location
        ctx = ssl.create_default_context(cadata=self.op.ca_pem.decode())
        async with aiohttp.ClientSession() as http, http.get(location, ssl=ctx, allow_redirects=False) as resp:
            callback = urlsplit(resp.headers["Location"])
        assert callback.hostname == host, callback
        status, location, _, more = await self.client.run(_https_get(
            self.pods[pod].ip, self.ca, host, f"{callback.path}?{callback.query}", cookie="; ".join(cookies)))
        assert status in (302, 303) and location.endswith(path), (status, location)
        status, _, body, _ = await self.client.run(_https_get(
            self.pods[pod].ip, self.ca, host, path, cookie="; ".join(cookies + more)))
        return status, body

    async def app_answers(self, pod: str) -> bool:
        """The pod's app port is reachable from the client namespace."""
        return not await self.client.run(refused_from_here(self.pods[pod].ip, 8080))

    async def exposed_refused(self, pod: str) -> bool:
        return await self.client.run(refused_from_here(self.pods[pod].ip, 443))

    async def table(self, pod: str) -> bool:
        return (await nftables.read_live(TABLE, netns=self.pods[pod].path)).exists

    async def until(self, what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for: {what}"
            await asyncio.sleep(0.05)


async def _https_get(address: str, ca: bytes, host: str, path: str, cookie: str = "",
                     ) -> tuple[int, str, bytes, list[str]]:
    """One GET over a new TLS connection: (status, Location, body, each Set-Cookie's name=value)."""
    ctx = ssl.create_default_context(cadata=ca.decode())
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address, 443, ssl=ctx, server_hostname=host), 10)
    try:
        sent = f"Cookie: {cookie}\r\n" if cookie else ""
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{sent}Connection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    found = re.search(rb"\r\nLocation: ([^\r]*)", head, re.IGNORECASE)
    cookies = [c.decode().split(";", 1)[0] for c in re.findall(rb"\r\nSet-Cookie: ([^\r]*)", head, re.IGNORECASE)]
    return int(head.split(b" ", 2)[1]), found.group(1).decode() if found else "", body, cookies


@contextlib.asynccontextmanager
async def _rig(tmp_path: Path, pods: Iterable[tuple[str, str]], *services: tuple[str, str, str]) -> AsyncIterator[Rig]:
    """Pods in real namespaces, a FakeOP, a serving Daemon and a PodController (its /proc scan limited to the pods'
    app processes) watching a scripted pod source; everything stopped and closed after."""
    op = FakeOP(workdir=tmp_path / "op")
    await op.start()
    try:
        with _real_pods(*pods) as (client_ns, real):
            _write_definitions(tmp_path, op, *services)
            daemon = _real_daemon(tmp_path)
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            task = asyncio.get_running_loop().create_task(daemon.run(on_ready=ready))
            started: set[asyncio.Future[None] | asyncio.Task[int]] = {ready, task}
            await asyncio.wait(started, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()
            assert ready.done(), "the daemon did not start"
            owner = {p.app_pid: p.uid for p in real.values()}
            source = ScriptedPods("n1")
            controller = PodController(daemon.settings, source, daemon, lambda: daemon.gate.runtime.definitions,
                                       lookup_wait=2.0, scan=functools.partial(find_pod_netns, pod_uid_of=owner.get))
            daemon.pod_controller = controller  # a reload re-evaluates the pods, as with kubernetes.pods.enabled
            watching = asyncio.get_running_loop().create_task(controller.run())
            client = NetnsLoop(client_ns)
            try:
                yield Rig(daemon, controller, source, client, daemon.cert_store.ca_pem(), op, real)
            finally:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
                client.close()
                daemon.stop()
                assert await asyncio.wait_for(task, 30) == 0
                for enrolled in controller.enrolled.values():
                    enrolled.attachment.close()
    finally:
        await op.stop()


@pytest.mark.root
async def test_a_real_pod_is_enrolled_by_its_cni_add_released_by_its_labels_and_let_go_when_deleted(
    tmp_path: Path,
) -> None:
    """Driven through the controller into a real daemon: a selected pod's CNI ADD returns with its table and listener
    in its namespace (its app reached through a real login, with the user's identity; its app port refused); an unselected pod is untouched; labels no longer
    selecting it release it (table gone, app port answers); labels selecting it again enrol it by the /proc scan; other
    labels still selecting it re-serve it; a graceful deletion keeps it served; deleted, no fd into its namespace remains and its table stays."""
    async with _rig(tmp_path, [("shop", "web"), ("shop", "db")], (WEB, "app=web", "")) as rig:
        web, db = rig.pods["web"], rig.pods["db"]
        await rig.source.send("ADDED", web.info({"app": "web"}))  # no IP known to the API yet: left to the CNI ADD
        await rig.source.send("ADDED", db.info({"app": "db"}))
        await rig.controller.pod_added(db.add())
        await rig.controller.pod_added(web.add())
        # the ADD has returned: rules and listener are in place
        assert await rig.table("web") and not await rig.table("db")
        assert await rig.get("web", "/public/x") == (200, "", b"app web")
        assert await rig.log_in("web", "/private") == (200, b"app web for alice")  # a staff member, signed in
        assert not await rig.app_answers("web")
        assert await rig.app_answers("db") and await rig.exposed_refused("db")  # untouched

        await rig.source.send("MODIFIED", web.info({"app": "other"}))
        assert web.uid not in rig.controller.enrolled
        assert not await rig.table("web") and await rig.app_answers("web")
        assert await rig.exposed_refused("web")
        assert await no_fds_into(web.inode) == []

        await rig.source.send("MODIFIED", web.info({"app": "web"}))  # selected again: found by the /proc scan
        assert rig.controller.enrolled[web.uid].sandbox == ""
        assert await rig.table("web") and not await rig.app_answers("web")
        assert await rig.get("web", "/public/y") == (200, "", b"app web")

        first = rig.controller.enrolled[web.uid].attachment
        await rig.source.send("MODIFIED", web.info({"app": "web", "tier": "front"}))  # still selected: re-served
        again = rig.controller.enrolled[web.uid].attachment
        assert again is not first and first.netns.closed and "tier=front" in (again.tags or ())
        assert rig.daemon.attachments[1:] == [again]
        assert await rig.table("web") and not await rig.app_answers("web")
        assert await rig.get("web", "/public/y") == (200, "", b"app web")

        await rig.source.send("MODIFIED", web.info({"app": "web"}, deleting=True))  # graceful: the app still runs
        assert await rig.table("web") and not await rig.app_answers("web")
        assert await rig.get("web", "/public/z") == (200, "", b"app web")

        await rig.source.send("DELETED", web.info({"app": "web"}, deleting=True))
        assert rig.controller.enrolled == {}
        assert await no_fds_into(web.inode) == []
        assert await rig.table("web") and not await rig.app_answers("web") and await rig.exposed_refused("web")


@pytest.mark.root
async def test_a_table_left_in_a_real_pod_nothing_selects_is_removed_at_start(tmp_path: Path) -> None:
    """Tables an earlier enforcer left: at the first reconcile the one in a pod no service selects any more is removed (its app answers again); a selected pod's is taken over and a terminating pod's is kept."""
    async with _rig(tmp_path, [("shop", "web"), ("shop", "stale"), ("shop", "leaving")], (WEB, "app=web", "")) as rig:
        for name in ("web", "stale", "leaving"):  # as an enforcer that served them and stopped would leave them
            ip("netns", "exec", rig.pods[name].netns, "nft", "add", "table", "inet", TABLE)
            ip("netns", "exec", rig.pods[name].netns, "nft", "add", "chain", "inet", TABLE, "in",
               "{ type filter hook input priority 0; }")
            ip("netns", "exec", rig.pods[name].netns, "nft", "add", "rule", "inet", TABLE, "in",
               "tcp dport 8080 iif != lo reject with tcp reset")
        assert not await rig.app_answers("stale")
        web, stale, leaving = rig.pods["web"], rig.pods["stale"], rig.pods["leaving"]
        await rig.source.send("ADDED", web.info({"app": "web"}))
        await rig.source.send("ADDED", stale.info({"app": "was-web"}))
        await rig.source.send("ADDED", leaving.info({"app": "was-web"}, deleting=True))
        await rig.source.send("SYNCED")
        assert set(rig.controller.enrolled) == {web.uid}
        assert not await rig.table("stale") and await rig.app_answers("stale")
        assert await no_fds_into(stale.inode) == []
        assert await rig.table("leaving") and not await rig.app_answers("leaving")
        assert await rig.table("web") and await rig.get("web", "/public/x") == (200, "", b"app web")


@pytest.mark.root
async def test_new_definitions_re_evaluate_the_real_pods(tmp_path: Path) -> None:
    """Pods running at start are found by the /proc scan and served; a reload whose service now selects another
    label releases the first pod (its app port answers) and enrols the other, which then serves that service."""
    async with _rig(tmp_path, [("shop", "web"), ("shop", "api")], (WEB, "app=web", "")) as rig:
        web, api = rig.pods["web"], rig.pods["api"]
        await rig.source.send("ADDED", web.info({"app": "web"}))
        await rig.source.send("ADDED", api.info({"app": "api"}))
        await rig.source.send("SYNCED")
        assert set(rig.controller.enrolled) == {web.uid} and rig.controller.enrolled[web.uid].sandbox == ""
        assert await rig.get("web", "/public/x") == (200, "", b"app web")
        assert await rig.app_answers("api") and not await rig.table("api")

        _write_definitions(tmp_path, rig.op, (WEB, "app=api", ""))
        rig.daemon.reload()
        await rig.until("api enrolled, web released", lambda: set(rig.controller.enrolled) == {api.uid})
        assert not await rig.table("web") and await rig.app_answers("web")
        assert await no_fds_into(web.inode) == []
        assert await rig.table("api") and not await rig.app_answers("api")
        assert await rig.get("api", "/public/x") == (200, "", b"app api")


@pytest.mark.root
async def test_a_namespaced_service_never_enrols_a_real_pod_of_another_namespace(tmp_path: Path) -> None:
    """A service of namespace team-a enrols team-a's pod and never team-b's with the same labels (by CNI ADD or
    scan); once the same service has no namespace (the node operator's), a reload enrols team-b's pod too; a CNI DEL
    lets a pod go with its rules kept and no fd into its namespace."""
    pods = [("team-a", "shop-a"), ("team-b", "shop-b")]
    async with _rig(tmp_path, pods, (WEB, "app=shop", "team-a")) as rig:
        a, b = rig.pods["shop-a"], rig.pods["shop-b"]
        for pod in (a, b):
            await rig.source.send("ADDED", pod.info({"app": "shop"}))
            await rig.controller.pod_added(pod.add())
        await rig.source.send("SYNCED")
        assert set(rig.controller.enrolled) == {a.uid}
        assert await rig.table("shop-a") and not await rig.app_answers("shop-a")
        assert await rig.get("shop-a", "/public/x") == (200, "", b"app shop-a")
        assert not await rig.table("shop-b") and await rig.app_answers("shop-b") and await rig.exposed_refused("shop-b")
        assert await no_fds_into(b.inode) == []

        _write_definitions(tmp_path, rig.op, (WEB, "app=shop", ""))
        rig.daemon.reload()
        await rig.until("team-b's pod enrolled", lambda: set(rig.controller.enrolled) == {a.uid, b.uid})
        assert await rig.table("shop-b") and not await rig.app_answers("shop-b")
        assert await rig.get("shop-b", "/public/x") == (200, "", b"app shop-b")

        await rig.controller.pod_deleted(CniEvent("DEL", "sandbox-1", None, "eth0", PodRef(a.namespace, a.name, a.uid),
                                                  "1.0.0"))  # its sandbox torn down: let go, rules kept
        assert set(rig.controller.enrolled) == {b.uid} and await no_fds_into(a.inode) == []
        assert await rig.table("shop-a") and await rig.exposed_refused("shop-a") and not await rig.app_answers("shop-a")
