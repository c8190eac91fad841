"""Pod mode against a real API server (tests/harness/kube.py ``kube_api``, no kubelet): NodePods lists and
watches this Node's pods, and the PodController follows them.

Pods are created with ``spec.nodeName`` set to a Node no kubelet runs, so they stay Pending and nothing runs
them; their IP is set through the status subresource, as a kubelet would. The controller's sink serves
attachments with fake rules (FakeRedirector) and its "namespaces" are descriptors on our own namespace:
what is checked here is which pods are enrolled and when, from the API server's real events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from enforcer.config import settings as settings_mod
from enforcer.config.definitions import parse_documents, resolve_definitions
from enforcer.config.kubernetes import NodePods, PodInfo
from enforcer.net.pods import PodNetns, ScanResult
from enforcer.run.attach import PodAttachment
from enforcer.run.cni import CniEvent, PodRef
from enforcer.run.pods import NamespacedPodAttachment, PodController
from tests.harness.enrolment import FakeSink
from tests.harness.kube import ControlPlane
from tests.harness.redirector import FakeRedirector
from tests.harness.seed import SERVICE, SPEC

pytestmark = [pytest.mark.timeout(2400), pytest.mark.root]  # the cluster fixture may build or wait for the cluster

_counter = iter(range(1, 1000))


def _unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_counter)}"


@pytest.fixture
def namespace(kube_api: ControlPlane) -> Iterable[str]:
    """A fresh namespace with a service account ``web-sa`` (there is no controller to make ``default``)."""
    ns = _unique("kpods")
    kube_api.kubectl("create", "namespace", ns)
    kube_api.kubectl("create", "serviceaccount", "web-sa", "-n", ns)
    yield ns
    kube_api.kubectl("delete", "pods", "--all", "-n", ns, "--grace-period=0", "--force", check=False)
    kube_api.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _pod(name: str, ns: str, node: str, labels: Mapping[str, str], *, host_network: bool = False) -> dict[str, object]:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": dict(labels)},
        "spec": {"nodeName": node, "hostNetwork": host_network, "serviceAccountName": "web-sa",
                 "automountServiceAccountToken": False,
                 "containers": [{"name": "app", "image": "enforcer.test/none:1", "imagePullPolicy": "Never"}]},
    }


def _create(api: ControlPlane, *pods: dict[str, object]) -> None:
    api.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(pods)}))


def _set_ip(api: ControlPlane, ns: str, name: str, address: str) -> None:
    """What a kubelet does once the sandbox has its network: the pod's IP in its status."""
    api.kubectl("patch", "pod", name, "-n", ns, "--subresource=status", "--type=merge",
                "-p", json.dumps({"status": {"podIP": address, "podIPs": [{"ip": address}]}}))


async def _until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.05)


@dataclass
class Seen:
    """What the watch handed on: every (kind, pod) and how many lists completed."""

    events: list[tuple[str, PodInfo]] = field(default_factory=list)
    lists: int = 0

    async def on_pod(self, kind: str, pod: PodInfo) -> None:
        self.events.append((kind, pod))

    async def on_synced(self) -> None:
        self.lists += 1

    def of(self, name: str) -> list[tuple[str, PodInfo]]:
        return [(k, p) for k, p in self.events if p.name == name]


@contextlib.asynccontextmanager
async def _watching(source: NodePods, on_pod: Callable[..., object], on_synced: Callable[..., object]
                    ) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.get_running_loop().create_task(source.watch(on_pod, on_synced))  # type: ignore[arg-type]
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_node_pods_lists_and_watches_only_this_nodes_pods(kube_api: ControlPlane, namespace: str) -> None:
    """The list holds this Node's pods already there; the watch hands on ADDED, a label change and the IP as
    MODIFIED, a graceful deletion as MODIFIED going away, then DELETED; another Node's pod is never seen."""
    ns, node = namespace, _unique("node")
    _create(kube_api, _pod("early", ns, node, {"app": "web"}))
    source = NodePods(node, kubeconfig=kube_api.kubeconfig, min_gap=0.1)
    seen = Seen()
    async with _watching(source, seen.on_pod, seen.on_synced):
        await _until("the first list", lambda: seen.lists == 1)
        [early] = source.pods.values()
        assert (early.name, early.namespace, dict(early.labels), early.service_account, early.node) == (
            "early", ns, {"app": "web"}, "web-sa", node)
        assert seen.events == []  # listed, not handed on as events

        _create(kube_api, _pod("web", ns, node, {"app": "web"}), _pod("elsewhere", ns, _unique("node"), {"app": "web"}),
                _pod("host", ns, node, {"app": "web"}, host_network=True))
        await _until("ADDED web and host", lambda: {p.name for k, p in seen.events if k == "ADDED"} == {"web", "host"})
        [(_, host)] = seen.of("host")
        assert host.host_network and not host.deleting

        kube_api.kubectl("label", "pod", "web", "-n", ns, "app=api", "--overwrite")
        await _until("the label change", lambda: dict(seen.of("web")[-1][1].labels) == {"app": "api"})
        assert seen.of("web")[-1][0] == "MODIFIED"
        _set_ip(kube_api, ns, "web", "10.244.9.7")
        await _until("the IP", lambda: seen.of("web")[-1][1].ips == ("10.244.9.7",))

        kube_api.kubectl("delete", "pod", "web", "-n", ns, "--wait=false")  # no kubelet: graceful, it stays
        await _until("the deletion started", lambda: seen.of("web")[-1][1].deleting)
        assert seen.of("web")[-1][0] == "MODIFIED" and source.find(ns, "web") is not None
        kube_api.kubectl("delete", "pod", "web", "-n", ns, "--grace-period=0", "--force")
        await _until("DELETED web", lambda: seen.of("web")[-1][0] == "DELETED")
        assert source.find(ns, "web") is None
        assert seen.of("elsewhere") == [] and {p.name for p in source.pods.values()} == {"early", "host"}
        assert source.synced and source.current and seen.lists == 1


# ---------------------------------------------------------------------------------------------
# the controller following the API server's pods


@dataclass
class OwnNamespace:
    """Pod "namespaces" that are descriptors on our own: the scan finds every pod asked for and records who."""

    scanned: list[str] = field(default_factory=list)
    opened: list[PodNetns] = field(default_factory=list)

    def open(self, path: str, uid: str) -> PodNetns:
        held = PodNetns.open("/proc/self/ns/net", uid=uid)
        self.opened.append(held)
        return held

    def scan(self, pods: Mapping[str, Iterable[str]]) -> ScanResult:
        result = ScanResult()
        for uid in pods:
            self.scanned.append(uid)
            result.found[uid] = self.open("", uid)
        return result

    def leaked(self) -> list[PodNetns]:
        return [n for n in self.opened if not n.closed]


WEB = {**SERVICE, "name": "web", "port": 8080, "selectors": [["app=web"]]}


def _controller(tmp_path: Path, source: NodePods) -> tuple[PodController, FakeSink, OwnNamespace]:
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(yaml.safe_dump({"stateDir": "state", "logsDir": "logs", "definitions": [{"file": "d.yaml"}],
                                   "redirect": {"enabled": True}}))
    settings = settings_mod.load_settings(cfg)
    parsed = parse_documents(yaml.safe_dump_all([WEB, SPEC]), "d.yaml")
    assert isinstance(parsed, list)
    sink = FakeSink(resolve_definitions(parsed, ()))
    netns = OwnNamespace()

    def make(held: PodNetns, pod: PodInfo, tags: frozenset[str]) -> PodAttachment:
        return NamespacedPodAttachment(held, settings, tags=tags, port=15443, name=f"pod {pod.name}",
                                       namespace=pod.namespace, redirector=FakeRedirector())

    controller = PodController(settings, source, sink, lambda: sink.definitions, lookup_wait=10.0,
                               open_netns=netns.open, scan=netns.scan, make_attachment=make)
    return controller, sink, netns


async def test_the_controller_follows_the_api_servers_pods(
    kube_api: ControlPlane, namespace: str, tmp_path: Path,
) -> None:
    """From the real watch: a running selected pod is enrolled at the first list, a hostNetwork one with the same
    labels never (not even scanned); a CNI ADD for a pod just created waits for the watch and enrols it; a label
    change releases it; a graceful deletion keeps it served and the deletion lets it go."""
    ns, node = namespace, _unique("node")
    _create(kube_api, _pod("web", ns, node, {"app": "web"}), _pod("host", ns, node, {"app": "web"}, host_network=True))
    _set_ip(kube_api, ns, "web", "10.244.9.7")
    _set_ip(kube_api, ns, "host", "10.250.0.1")
    source = NodePods(node, kubeconfig=kube_api.kubeconfig, min_gap=0.1)
    controller, sink, netns = _controller(tmp_path, source)
    async with _watching(source, controller._on_pod, controller.reconcile):
        await _until("web enrolled", lambda: sink.calls == [("add", "pod web", ("web",))])
        host = next(p for p in source.pods.values() if p.name == "host")
        assert host.host_network and host.uid not in controller.enrolled and host.uid not in netns.scanned

        _create(kube_api, _pod("late", ns, node, {"app": "web"}))
        uid = kube_api.kubectl("get", "pod", "late", "-n", ns, "-o", "jsonpath={.metadata.uid}").stdout
        event = CniEvent("ADD", "sandbox-late", Path("/proc/self/ns/net"), "eth0", PodRef(ns, "late", uid), "1.0.0")
        await controller.pod_added(event)  # returns once the watch knows the pod, and it is served
        assert sink.calls[-1] == ("add", "pod late", ("web",)) and controller.enrolled[uid].sandbox == "sandbox-late"

        kube_api.kubectl("label", "pod", "late", "-n", ns, "app=db", "--overwrite")
        await _until("late released", lambda: sink.calls[-1] == ("remove", "pod late", True))
        assert uid not in controller.enrolled

        web = next(p for p in source.pods.values() if p.name == "web")
        kube_api.kubectl("delete", "pod", "web", "-n", ns, "--wait=false")
        await _until("web going away", lambda: source.pods[web.uid].deleting)
        await asyncio.sleep(0.2)
        assert web.uid in controller.enrolled and ("remove", "pod web", True) not in sink.calls
        kube_api.kubectl("delete", "pod", "web", "-n", ns, "--grace-period=0", "--force")
        await _until("web let go", lambda: sink.calls[-1] == ("remove", "pod web", False))
        assert controller.enrolled == {} and netns.leaked() == []
