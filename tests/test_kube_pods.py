"""Pod mode on a real Kubernetes node: the shipped DaemonSet with the pod-mode component, ordinary
(not hostNetwork) pods protected by label inside their own network namespaces, the chained CNI
plugin, a real OpenID Provider, and what happens to a pod's traffic from its first packet, while
the enforcer pod is replaced, when a label goes, when a pod goes, and at an uninstall.

Built once for the module on the session's cluster (tests/harness/kube.py): the image (built by
``scripts/image``, imported into the node's containerd), the OP on ``https://10.250.0.1:9443`` and a
redis-server (TLS, ACL user; the shared session store) on ``10.250.0.1:6390`` in the node's network
namespace, and an overlay in tmp that references deploy/kubernetes/base and the components
pod-mode and shared-sessions and changes only the image reference, the ConfigMap's drop-ins (the
OP's CA, the watched namespace; the Redis URL), the Secret enforcer-sessions and the two CNI hostPaths: the harness's containerd keeps its CNI
configuration and plugins in its work directory (``Node.cni_conf_dir`` / ``cni_bin_dir``), not
in /etc/cni/net.d and /opt/cni/bin. The sample apps run tests/harness/recording_app.py with the
image's Python, each recording to ``<tmp>/record/<pod name>.jsonl`` (a hostPath). The client
namespace gets a route to the pod network through the node (removed afterwards).

The tests run in file order and build on each other; the last one deletes the DaemonSet. The
node's /var/lib/enforcer, /var/log/enforcer and /run/enforcer are the DaemonSet's hostPaths: the
module refuses to run if they exist already and removes them afterwards. Figures are printed as
``[k8s-pods] ...`` lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
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

import aiohttp
import pytest
import pytest_asyncio
import yaml

from enforcer import __version__
from enforcer.http.certs import CertStore
from enforcer.identity import crypto
from enforcer.net.ruleset import DEFAULT_MARK
from enforcer.run import cni
from tests.harness import fleet
from tests.harness.browser import Response, ScriptedBrowser
from tests.harness.kube import CLIENT_IP, CLIENT_NETNS, NODE_IP, NODE_NETNS, POD_CIDR, Node
from tests.harness.kube_e2e import (
    SELECTOR,
    SYSTEM_NS,
    Figures,
    build_image,
    client_ssl_context,
    enforcer_pods,
    fresh_host_dirs,
    is_login_at,
    ready_enforcer,
    unauthenticated,
    until,
)
from tests.harness.kube_load import Load, Outage, outage
from tests.harness.netns import NetnsLoop, connect, refused, require_root
from tests.harness.op import OPUser, RunningOP, start_op
from tests.harness.prereq import require_e2e
from tests.harness.redis import RedisServer

pytestmark = [pytest.mark.root, pytest.mark.e2e, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[1]
BASE_DIR = REPO / "deploy" / "kubernetes" / "base"
COMPONENT_DIR = REPO / "deploy" / "kubernetes" / "components" / "pod-mode"
SESSIONS_DIR = REPO / "deploy" / "kubernetes" / "components" / "shared-sessions"
REDIS_PORT = 6390  # the shared session store: redis-server (TLS, ACL user) on the node's address
SECOND_NODE_ADMIN = 9091
APPS_NS = "pe2e-apps"  # the custom resources, their Secret and the protected pods (a CR serves its own namespace)
IMAGE = f"localhost/enforcer-pods-e2e:{__version__}"
HOST = "app.pods.test"
BASE = f"https://{HOST}"
OTHER_HOST = "other.pods.test"  # the second service, selecting app=pe2e-b
OTHER_LABEL = ("app", "pe2e-b")
APP_PORT = 8080
EXPOSED_PORT = 443
LABEL = ("app", "pe2e")
OP_PORT = 9443
ISSUER = f"https://{NODE_IP}:{OP_PORT}"
CLIENT_SECRET = "k8s-pods-client-secret"
OP_CA_IN_POD = "/etc/enforcer/op-ca.pem"
STATE_DIR = Path("/var/lib/enforcer")
LOGS_DIR = Path("/var/log/enforcer")
RUN_DIR = Path("/run/enforcer")  # /var/run/enforcer: the CNI plugin's socket
USERS = {
    "alice": OPUser(
        "alice-pw",
        {"email": "alice@example.com", "email_verified": True, "groups": ["staff"], "preferred_username": "alice"},
    ),
}
KUBE_MARK_BITS = 0x4000 | 0x8000  # kubelet's KUBE-MARK-MASQ / KUBE-MARK-DROP
FIGURES = Figures("k8s-pods")
say, report = FIGURES.say, FIGURES.report


# ----------------------------------------------------------------------------- manifests


def is_login(status: int | None, location: str | None) -> bool:
    """A redirect to the test OP's authorization endpoint (a login challenge)."""
    return is_login_at(ISSUER, status, location)


def custom_resources() -> str:
    """The namespace, the Role letting the enforcer read its Secrets, the client Secret, the
    HTTPResourceSpec and the EnforcerService selecting pods labelled app=pe2e."""
    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": APPS_NS}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "enforcer-secrets", "namespace": APPS_NS},
         "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "enforcer-secrets", "namespace": APPS_NS},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "enforcer-secrets"},
         "subjects": [{"kind": "ServiceAccount", "name": "enforcer", "namespace": SYSTEM_NS}]},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "app-oidc", "namespace": APPS_NS},
         "type": "Opaque", "stringData": {"client-secret": CLIENT_SECRET}},
        {"apiVersion": "enforcer.dev/v1alpha1", "kind": "HTTPResourceSpec",
         "metadata": {"name": "app", "namespace": APPS_NS},
         "spec": {"associatedTags": ["httpresourcespec:name=app"],
                  "endpoints": [{"URI": "/*", "methods": ["GET", "POST"], "allowedScopes": [[]]}]}},
        {"apiVersion": "enforcer.dev/v1alpha1", "kind": "EnforcerService",
         "metadata": {"name": "app", "namespace": APPS_NS},
         "spec": {"OIDCClientID": "app",
                  "OIDCClientSecret": {"secretKeyRef": {"name": "app-oidc", "key": "client-secret"}},
                  "OIDCProviderURL": ISSUER, "OIDCCallbackURL": BASE, "OIDCScopes": ["openid", "email", "profile"],
                  "hosts": [HOST], "port": APP_PORT, "exposedPort": EXPOSED_PORT,
                  "selectors": [[f"{LABEL[0]}={LABEL[1]}"]],
                  "exposedAPIs": [["httpresourcespec:name=app"]]}},
        {"apiVersion": "enforcer.dev/v1alpha1", "kind": "EnforcerService",
         "metadata": {"name": "other", "namespace": APPS_NS},
         "spec": {"OIDCClientID": "other",
                  "OIDCClientSecret": {"secretKeyRef": {"name": "app-oidc", "key": "client-secret"}},
                  "OIDCProviderURL": ISSUER, "OIDCCallbackURL": f"https://{OTHER_HOST}",
                  "hosts": [OTHER_HOST], "port": APP_PORT, "exposedPort": EXPOSED_PORT,
                  "selectors": [[f"{OTHER_LABEL[0]}={OTHER_LABEL[1]}"]],
                  "exposedAPIs": [["httpresourcespec:name=app"]]}},
    ]  # fmt: skip
    return yaml.safe_dump_all(objs)


def app_pod_spec(record_dir: Path) -> dict[str, Any]:
    """The recording app on :8080 with the image's Python, recording to ``/record/<pod name>.jsonl``.
    No readiness probe: the kubelet's probe comes from outside the pod, and the app port refuses it."""
    return {
        "terminationGracePeriodSeconds": 1,
        "automountServiceAccountToken": False,
        "containers": [{
            "name": "app", "image": IMAGE, "imagePullPolicy": "Never",
            "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
            "command": ["/opt/enforcer/venv/bin/python", "/app/recording_app.py", "/record/$(POD_NAME).jsonl",
                        f"app:{APP_PORT}"],
            "volumeMounts": [{"name": "code", "mountPath": "/app"}, {"name": "record", "mountPath": "/record"}],
        }],
        "volumes": [{"name": "code", "configMap": {"name": "recording-app"}},
                    {"name": "record", "hostPath": {"path": str(record_dir), "type": "Directory"}}],
    }  # fmt: skip


def app_code() -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
                           "metadata": {"name": "recording-app", "namespace": APPS_NS},
                           "data": {"recording_app.py": (REPO / "tests/harness/recording_app.py").read_text()}})  # fmt: skip


def app_pod(name: str, record_dir: Path, labels: dict[str, str]) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": name, "namespace": APPS_NS, "labels": labels},
                           "spec": app_pod_spec(record_dir)})  # fmt: skip


def app_deployment(name: str, record_dir: Path, label: tuple[str, str] = LABEL) -> str:
    labels = {label[0]: label[1], "deployment": name}
    return yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": APPS_NS},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"deployment": name}},
                 "template": {"metadata": {"labels": labels}, "spec": app_pod_spec(record_dir)}},
    })  # fmt: skip


def write_overlay(d: Path, op_ca: bytes, node: Node, redis_url: str) -> Path:
    """Base + pod-mode + shared-sessions, as a user writes it: the image reference, a drop-in of
    the test's own (the OP's CA, the watched namespace, the mark), the sessions drop-in pointing
    at the test's Redis, and the two CNI hostPaths."""
    d.mkdir(parents=True, exist_ok=True)
    name, tag = IMAGE.rsplit(":", 1)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(BASE_DIR, d)],
        "components": [os.path.relpath(COMPONENT_DIR, d), os.path.relpath(SESSIONS_DIR, d)],
        "images": [{"name": "localhost/enforcer", "newName": name, "newTag": tag}],
        "patches": [{"path": "configmap-patch.yaml"}, {"path": "cni-paths-patch.yaml"}],
    }
    test_config: dict[str, Any] = {
        "oidc": {"caFile": OP_CA_IN_POD},  # the test OP's CA
        "definitions": [{"kubernetes": {"namespaces": [APPS_NS]}}],
    }
    if DEFAULT_MARK & KUBE_MARK_BITS:  # as tests/test_kube_daemonset.py: kubelet's masquerade bit
        test_config["redirect"] = {"enabled": True, "mark": DEFAULT_MARK & ~KUBE_MARK_BITS}
    shipped = yaml.safe_load((SESSIONS_DIR / "configmap-patch.yaml").read_text())["data"]["enforcer.sessions.yaml"]
    url_line = re.compile(r"url: rediss://\S+")
    assert len(url_line.findall(shipped)) == 1, shipped
    sessions = url_line.sub(f"url: {redis_url}", shipped)
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "enforcer-config", "namespace": SYSTEM_NS},
          "data": {"enforcer.test.yaml": yaml.safe_dump(test_config), "enforcer.sessions.yaml": sessions,
                   Path(OP_CA_IN_POD).name: op_ca.decode()}}  # fmt: skip
    paths = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "enforcer", "namespace": SYSTEM_NS},
             "spec": {"template": {"spec": {"volumes": [
                 {"name": "cni-conf", "hostPath": {"path": str(node.cni_conf_dir), "type": "Directory"}},
                 {"name": "cni-bin", "hostPath": {"path": str(node.cni_bin_dir), "type": "Directory"}},
             ]}}}}  # fmt: skip
    (d / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    (d / "configmap-patch.yaml").write_text(yaml.safe_dump(cm, sort_keys=False))
    (d / "cni-paths-patch.yaml").write_text(yaml.safe_dump(paths, sort_keys=False))
    return d


def sessions_secret(redis: RedisServer, keys: Path) -> str:
    """The Secret the shared-sessions component mounts, as its comment says to create it."""
    assert redis.tls is not None
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "enforcer-sessions", "namespace": SYSTEM_NS},
        "stringData": {"redis-password": redis.password_file.read_text(), "ca.crt": redis.tls.ca_pem().decode(),
                       "refresh-token-keys": keys.read_text()},
    })  # fmt: skip


# ----------------------------------------------------------------------------- the node


def app_pid(pod_name: str) -> int | None:
    """The recording app's process of a pod (its command line names ``/record/<pod>.jsonl``)."""
    needle = f"/record/{pod_name}.jsonl".encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (d / "cmdline").read_bytes().split(b"\0"):
                    return int(d.name)
    return None


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def tables_in(pid: int) -> str:
    """``nft list tables`` in that process's network namespace."""
    return subprocess.run(["nsenter", "-t", str(pid), "-n", "nft", "list", "tables"], capture_output=True, text=True,
                          timeout=20, check=True).stdout  # fmt: skip


def enforcer_pids() -> list[int]:
    """The enforcer daemon processes in the node's network namespace (``enforcer run`` of the image)."""
    node_ino = os.stat(f"/run/netns/{NODE_NETNS}").st_ino
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (d / "cmdline").read_bytes().split(b"\0")
            ours = b"run" in argv and b"/etc/enforcer/enforcer.yaml" in argv and any(a.endswith(b"enforcer") for a in argv)
            if ours and os.stat(d / "ns" / "net").st_ino == node_ino:
                out.append(int(d.name))
    return out


def sockets_of(enforcer: int, pid: int) -> set[int]:
    """The inodes of the enforcer's sockets that live in ``pid``'s network namespace (``ss -p`` there)."""
    done = subprocess.run(["nsenter", "-t", str(pid), "-n", "ss", "-tanpe"], capture_output=True, text=True,
                          timeout=20, check=True)  # fmt: skip
    return {int(m.group(1)) for line in done.stdout.splitlines() if f"pid={enforcer}," in line
            for m in [re.search(r"ino:(\d+)", line)] if m}  # fmt: skip


def handles(enforcer: int, netns: int, sockets: set[int]) -> list[str]:
    """The enforcer's descriptors and threads' namespaces that still point at ``netns`` or one of ``sockets``."""
    left = []
    for fd in Path(f"/proc/{enforcer}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target == f"net:[{netns}]" or any(target == f"socket:[{s}]" for s in sockets):
                left.append(f"fd {fd.name} -> {target}")
    for task in Path(f"/proc/{enforcer}/task").iterdir():
        with contextlib.suppress(OSError):
            if os.stat(task / "ns" / "net").st_ino == netns:
                left.append(f"thread {task.name} in net:[{netns}]")
    return left


@dataclass
class Cluster:
    """Everything the tests share."""

    node: Node
    op: RunningOP
    client: NetnsLoop
    workdir: Path
    overlay: Path
    record: Path
    redis: RedisServer
    refresh_keys: Path
    browsers: list[ScriptedBrowser] = field(default_factory=list)

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.node.api.kubectl(*args, **kw)

    def enforcer_pods(self) -> list[dict[str, Any]]:
        return enforcer_pods(self.kubectl)

    def ready_enforcer(self, not_uid: str | None = None) -> dict[str, Any] | None:
        return ready_enforcer(self.enforcer_pods(), not_uid)

    def pod(self, name: str) -> dict[str, Any] | None:
        done = self.kubectl("-n", APPS_NS, "get", "pod", name, "-o", "json", check=False)
        return json.loads(done.stdout) if done.returncode == 0 else None

    def pod_ip(self, name: str) -> str:
        pod = self.pod(name)
        ip: str = (pod or {}).get("status", {}).get("podIP") or ""
        return ip

    def deployment_pod(self, name: str) -> str:
        """The name of the running, not deleting, pod of a Deployment."""
        out = json.loads(self.kubectl("-n", APPS_NS, "get", "pods", "-l", f"deployment={name}", "-o", "json").stdout)
        names: list[str] = [p["metadata"]["name"] for p in out["items"] if not p["metadata"].get("deletionTimestamp")
                 and p.get("status", {}).get("phase") == "Running"]  # fmt: skip
        assert len(names) == 1, names
        return names[0]

    def seen(self, pod_name: str) -> list[dict[str, Any]]:
        path = self.record / f"{pod_name}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def all_seen(self) -> dict[str, list[dict[str, Any]]]:
        return {p.stem: self.seen(p.stem) for p in self.record.glob("*.jsonl")}

    def ssl_context(self) -> ssl.SSLContext:
        return client_ssl_context(STATE_DIR, self.op.ca_pem)

    async def browser(self, ip: str, **kwargs: Any) -> ScriptedBrowser:
        """A scripted browser in the client namespace; both services' hosts resolve to ``ip`` (a pod)."""
        ctx = self.ssl_context()

        async def make() -> ScriptedBrowser:
            return ScriptedBrowser(ctx, resolve={HOST: ip, OTHER_HOST: ip}, **kwargs)

        b = await self.client.run(make())
        self.browsers.append(b)
        return b

    async def login(self, browser: ScriptedBrowser, path: str) -> Response:
        return await self.client.run(browser.login(BASE + path, "alice", USERS["alice"].password))

    async def get(self, browser: ScriptedBrowser, path: str) -> Response:
        return await self.client.run(browser.get(BASE + path, follow=False))

    async def challenged(self, ip: str) -> bool:
        """An anonymous GET to the pod's exposed port gets the login redirect (the pod is served)."""
        try:
            b = await self.browser(ip, timeout=3.0)
            return is_login(*_status(await self.get(b, "/probe")))
        except Exception:
            return False

    def diagnose(self) -> str:
        parts = []
        for args in (
            ("-n", SYSTEM_NS, "logs", "-l", SELECTOR, "--tail=80", "--prefix"),
            ("get", "pods", "-A", "-o", "wide"),
            ("-n", APPS_NS, "get", "esvc,hrs", "-o", "yaml"),
            ("get", "events", "-A", "--sort-by=.lastTimestamp"),
        ):
            done = self.kubectl(*args, check=False)
            parts.append(f"$ kubectl {' '.join(args)}\n{done.stdout[-6000:]}{done.stderr[-2000:]}")
        for f in cni.conf_files(self.node.cni_conf_dir):
            parts.append(f"{f}:\n{f.read_text()[-3000:]}")
        return "\n".join(parts)


def _status(page: Response) -> tuple[int | None, str | None]:
    return page.status, page.location


def _route(action: str) -> None:
    subprocess.run(["ip", "-n", CLIENT_NETNS, "route", action, POD_CIDR, "via", NODE_IP], capture_output=True,
                   check=action == "add", timeout=20)  # fmt: skip


@pytest_asyncio.fixture(scope="module")
async def cluster(
    kube_node: Node, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> AsyncIterator[Cluster]:
    """The image on the node, the OP, the DaemonSet with pod mode, the custom resources and the app code."""
    require_root()
    require_e2e()
    FIGURES.capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    t_module = time.monotonic()
    ours = fresh_host_dirs(STATE_DIR, LOGS_DIR, RUN_DIR)
    work = tmp_path_factory.mktemp("k8s-pods")
    record = work / "record"
    record.mkdir()
    api = kube_node.api
    archive = await asyncio.to_thread(build_image, work / "enforcer-pods-e2e.oci.tar", IMAGE, FIGURES)
    assert IMAGE in await asyncio.to_thread(kube_node.import_image, archive)
    op = await start_op(
        work / "op",
        clients=[{"client_id": "app", "client_secret": CLIENT_SECRET, "redirect_uris": [f"{BASE}/oauth2/callback"],
                  "post_logout_redirect_uris": [f"{BASE}/"], "token_endpoint_auth_method": "client_secret_basic"}],
        users=USERS, host=NODE_IP, port=OP_PORT, issuer=ISSUER, netns=NODE_NETNS,
    )  # fmt: skip
    redis = RedisServer(CertStore(work / "redis-ca"), netns=NODE_NETNS, bind=NODE_IP, port=REDIS_PORT)
    await asyncio.to_thread(redis.start)
    refresh_keys = work / "refresh-token-keys"
    refresh_keys.write_text(crypto.new_key_line() + "\n")
    _route("add")
    client = NetnsLoop(CLIENT_NETNS)
    overlay = write_overlay(work / "overlay", op.ca_pem, kube_node, f"rediss://{NODE_IP}:{REDIS_PORT}")
    c = Cluster(kube_node, op, client, work, overlay, record, redis, refresh_keys)
    try:
        try:
            api.kubectl("apply", "-f", str(BASE_DIR / "namespace.yaml"), "-f", str(BASE_DIR / "crds.yaml"))
            api.kubectl("apply", "-f", "-", input=sessions_secret(redis, refresh_keys))
            api.kubectl("wait", "--for=condition=established", "--timeout=60s",
                        "crd/enforcerservices.enforcer.dev", "crd/httpresourcespecs.enforcer.dev")  # fmt: skip
            api.kubectl("apply", "-f", "-", input=custom_resources())
            api.kubectl("apply", "-f", "-", input=app_code())
            t = time.monotonic()
            api.kubectl("apply", "-k", str(overlay))
            api.kubectl("-n", SYSTEM_NS, "rollout", "status", "daemonset/enforcer", "--timeout=180s", timeout=200)
            report("DaemonSet (pod mode) apply -> pod Ready", time.monotonic() - t)
            await until("the CNI plugin in the node's conflist",
                        lambda: "enforcer-cni" in cni.conf_files(kube_node.cni_conf_dir)[0].read_text(), timeout=60)  # fmt: skip
        except BaseException:
            diagnosis = c.diagnose()
            (work / "diagnosis.txt").write_text(diagnosis)
            say(f"[k8s-pods] set-up failed; the cluster said:\n{diagnosis}")
            raise
        yield c
    finally:
        say(f"[k8s-pods] at teardown:\n{c.diagnose()}")
        for b in c.browsers:
            with contextlib.suppress(Exception):
                await client.run(b.close())
        client.close()
        c.kubectl("delete", "namespace", APPS_NS, "--ignore-not-found", "--wait=false", check=False)
        c.kubectl("delete", "-k", str(overlay), "--ignore-not-found", "--wait=false", check=False)
        with contextlib.suppress(AssertionError):
            await until("the enforcer pods gone", lambda: not c.enforcer_pods(), timeout=90, interval=1)
        with contextlib.suppress(AssertionError):
            await until("namespaces gone", lambda: c.kubectl("get", "namespace", SYSTEM_NS, APPS_NS,
                                                             check=False).returncode != 0, timeout=90, interval=1)  # fmt: skip
        if cni.uninstall(kube_node.cni_conf_dir, kube_node.cni_bin_dir):  # never leave the node's pods stalled
            say("[k8s-pods] teardown removed a CNI plugin the uninstall left")
        _route("del")
        await op.stop()
        redis.stop()
        for d in ours:
            shutil.rmtree(d, ignore_errors=True)
        report("whole module", time.monotonic() - t_module)
        FIGURES.summary()


# ----------------------------------------------------------------------------- tests


async def test_a_labelled_pod_is_served_after_login_and_an_unlabelled_one_is_untouched(cluster: Cluster) -> None:
    """A Deployment's labelled pod answers https://<pod IP>:443 with the OP's login, then the app page with identity headers; its app port is refused from outside; a pod without the label answers on its port directly and has no table."""
    t = time.monotonic()
    cluster.kubectl("apply", "-f", "-", input=app_deployment("web", cluster.record))
    cluster.kubectl("apply", "-f", "-", input=app_pod("plain", cluster.record, {"app": "other"}))
    await until("the Deployment's pod running", lambda: cluster.deployment_pod("web"), timeout=120, interval=0.5)
    name = cluster.deployment_pod("web")
    ip = cluster.pod_ip(name)
    await until("the pod's app started", lambda: app_pid(name), timeout=60)
    waited = 0.0
    while not await cluster.challenged(ip):
        waited += 0.5
        assert waited < 60, cluster.diagnose()
        await asyncio.sleep(0.5)
    report("labelled Deployment created -> served", time.monotonic() - t)
    pid = app_pid(name)
    assert pid is not None and "inet enforcer" in tables_in(pid)

    browser = await cluster.browser(ip)
    page = await cluster.login(browser, "/hello-pod")
    assert page.status == 200, (page.status, page.text[:300])
    assert json.loads(page.text)["user"], page.text
    rows = [r for r in cluster.seen(name) if r["path"] == "/hello-pod"]
    assert rows and all(dict(r["headers"]).get("X-Forwarded-User") for r in rows), rows
    assert refused(CLIENT_NETNS, ip, APP_PORT)
    assert unauthenticated(cluster.seen(name)) == []

    await until("the unlabelled pod's app", lambda: app_pid("plain"), timeout=120)
    # The app runs before the kubelet reports the pod's IP in its status.
    await until("the unlabelled pod's IP", lambda: cluster.pod_ip("plain"), timeout=60, interval=0.2)
    plain_ip = cluster.pod_ip("plain")
    assert "inet enforcer" not in tables_in(app_pid("plain") or 0)

    async def direct() -> int:
        async with aiohttp.ClientSession() as s, s.get(f"http://{plain_ip}:{APP_PORT}/direct") as r:
            return r.status

    assert await cluster.client.run(direct()) == 200
    assert refused(CLIENT_NETNS, plain_ip, EXPOSED_PORT)  # nothing redirects or listens there


async def test_two_deployments_with_different_labels_get_their_own_services(cluster: Cluster) -> None:
    """A second Deployment labelled for the second service is served that service only: each pod's IP gives the login of its own service and 421 for the other's host."""
    cluster.kubectl("apply", "-f", "-", input=app_deployment("web-b", cluster.record, OTHER_LABEL))
    await until("the second Deployment's pod running", lambda: cluster.deployment_pod("web-b"), timeout=120,
                interval=0.5)  # fmt: skip
    ips = {"web": cluster.pod_ip(cluster.deployment_pod("web")), "web-b": cluster.pod_ip(cluster.deployment_pod("web-b"))}
    own = {"web": HOST, "web-b": OTHER_HOST}

    async def answers(ip: str, host: str) -> tuple[int | None, str | None]:
        b = await cluster.browser(ip, timeout=5.0)
        return _status(await cluster.client.run(b.get(f"https://{host}/which", follow=False)))

    async def served_b() -> bool:
        with contextlib.suppress(Exception):
            return is_login(*await answers(ips["web-b"], OTHER_HOST))
        return False

    waited = 0.0
    while not await served_b():
        waited += 0.5
        assert waited < 60, cluster.diagnose()
        await asyncio.sleep(0.5)
    for deployment, ip in ips.items():
        for host in (HOST, OTHER_HOST):
            status, location = await answers(ip, host)
            if host == own[deployment]:
                assert is_login(status, location), (deployment, host, status, location)
                assert f"client_id={'app' if host == HOST else 'other'}" in (location or ""), location
            else:
                assert status == 421, (deployment, host, status, location)
        assert refused(CLIENT_NETNS, ip, APP_PORT)
    assert all(unauthenticated(rows) == [] for pod, rows in cluster.all_seen().items() if pod != "plain")


SECOND_NODE_DEFINITIONS = f"""\
kind: service
name: app
OIDCClientID: app
OIDCClientSecret: {CLIENT_SECRET}
OIDCProviderURL: {ISSUER}
OIDCCallbackURL: {BASE}
OIDCScopes: [openid, email, profile]
hosts: [{HOST}]
port: {APP_PORT}
exposedPort: {EXPOSED_PORT}
exposedAPIs: [[httpresourcespec:name=app]]
---
kind: httpresourcespec
name: app
associatedTags: [httpresourcespec:name=app]
endpoints:
  - {{URI: /*, methods: [GET, POST], allowedScopes: [[]]}}
"""


@contextlib.asynccontextmanager
async def second_node(cluster: Cluster) -> AsyncIterator[fleet.Enforcer]:
    """Another node's enforcer, as a process in the client's namespace on its address, :443: the
    same service (from a file), the same Redis and refresh-token keys as the ConfigMap's drop-in,
    the same CA as the node's enforcer (copied, as docs/kubernetes.md says to do for several
    nodes), and its own recording app on 127.0.0.1:8080 there."""
    state = cluster.workdir / "second-node" / "state"
    (state / "ca").mkdir(parents=True, mode=0o700)
    for name in ("ca.crt", "ca.key"):
        shutil.copy2(STATE_DIR / "ca" / name, state / "ca" / name)
    (state / "definitions.yaml").write_text(SECOND_NODE_DEFINITIONS)
    redis = cluster.redis
    assert redis.tls is not None
    (state / "redis-ca.pem").write_bytes(redis.tls.ca_pem())
    (state / "enforcer.yaml").write_text(yaml.safe_dump({
        "listen": {"address": CLIENT_IP, "port": EXPOSED_PORT},
        "admin": {"address": "127.0.0.1", "port": fleet.ADMIN},
        "stateDir": str(state), "logsDir": str(state / "logs"),
        "definitions": [{"file": str(state / "definitions.yaml")}],
        "oidc": {"caFile": str(cluster.op.ca_file)},
        "sessions": {"store": "redis", "refreshTokenKeyFile": str(cluster.refresh_keys),
                     "redis": {"url": f"rediss://{NODE_IP}:{REDIS_PORT}", "username": "enforcer",
                               "passwordFile": str(redis.password_file), "caFile": str(state / "redis-ca.pem")}},
    }))  # fmt: skip
    app = await asyncio.to_thread(
        subprocess.Popen,
        ["ip", "netns", "exec", CLIENT_NETNS, sys.executable, str(REPO / "tests/harness/recording_app.py"),
         str(cluster.record / "second-node.jsonl"), f"app:{APP_PORT}"],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    enforcer = fleet.Enforcer(CLIENT_NETNS, CLIENT_IP, state)
    try:
        assert app.stdout is not None and b"ready" in await asyncio.to_thread(app.stdout.readline)
        enforcer.start()
        await enforcer.wait_ready(60)
        yield enforcer
    finally:
        await enforcer.stop()
        app.kill()
        app.wait()
        if app.stdout is not None:
            app.stdout.close()


async def test_a_session_made_through_a_pod_is_valid_on_another_nodes_enforcer(cluster: Cluster) -> None:
    """With the shared-sessions component the pod's session is in Redis: another node's enforcer serves the same browser without a second login, and a logout there ends the session at the pod within 1 s."""
    ip = cluster.pod_ip(cluster.deployment_pod("web"))
    at_pod = await cluster.browser(ip)
    page = await cluster.login(at_pod, "/shared/login")
    assert page.status == 200, (page.status, page.text[:300])
    keys = redis_keys(cluster.redis)
    assert any(k.startswith("enforcer:") for k in keys), keys  # the DaemonSet's enforcer wrote it there

    async with second_node(cluster):
        elsewhere = await cluster.browser(CLIENT_IP)
        elsewhere.cookies = at_pod.cookies  # one browser: the same cookie jar, the other node's address
        page = await cluster.get(elsewhere, "/shared/other-node")
        assert page.status == 200, (page.status, page.location, page.text[:300])
        rows = [r for r in cluster.seen("second-node") if r["path"] == "/shared/other-node"]
        assert rows and dict(rows[0]["headers"]).get("X-Forwarded-User"), rows

        out = await cluster.get(elsewhere, "/oauth2/logout")
        assert out.status in (302, 303), (out.status, out.text[:300])
        t = time.monotonic()
        while not is_login(*_status(await cluster.get(at_pod, "/shared/after-logout"))):
            assert time.monotonic() - t < 1.5, "the pod's enforcer still serves a session logged out elsewhere"
            await asyncio.sleep(0.05)
        report("logout on another node -> refused at the pod", time.monotonic() - t)
    assert unauthenticated(cluster.seen("second-node")) == []


def redis_keys(redis: RedisServer) -> list[str]:
    return redis.cli("--scan", "--pattern", "enforcer:*").split()


@dataclass
class Hammer:
    """Connections to candidate pod IPs on both ports, as fast as they are refused, from before the pod exists."""

    ips: list[str]
    samples: list[tuple[float, str, str, str]] = field(default_factory=list)
    """(time, ip, port kind, outcome): outcome 'refused'/'timeout'/... for a failed connect,
    'connected' (app port: a TCP connection accepted), 'answered <status>' (app port: an HTTP answer),
    'login' / 'status <n>' (exposed port)."""
    stop: bool = False

    async def _app(self, ip: str) -> None:
        while not self.stop:
            t = time.monotonic()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, APP_PORT), 0.5)
            except (OSError, TimeoutError) as exc:
                self.samples.append((t, ip, "app", type(exc).__name__))
                await asyncio.sleep(0.01)
                continue
            outcome = "connected"
            try:
                writer.write(f"GET /first-packet HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
                line = await asyncio.wait_for(reader.readline(), 2)
                if line:
                    outcome = f"answered {line.decode(errors='replace').strip()}"
            except (OSError, TimeoutError):
                pass
            finally:
                writer.close()
            self.samples.append((t, ip, "app", outcome))

    async def _exposed(self, ip: str) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        while not self.stop:
            t = time.monotonic()
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(ip, EXPOSED_PORT, ssl=ctx, server_hostname=HOST), 1.0)
            except (OSError, TimeoutError) as exc:
                self.samples.append((t, ip, "exposed", type(exc).__name__))
                await asyncio.sleep(0.01)
                continue
            try:
                writer.write(f"GET /first-packet HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
                head = (await asyncio.wait_for(reader.read(4096), 3)).decode(errors="replace")
                status = head.split(" ", 2)[1] if head.startswith("HTTP/") else "?"
                location = next((h.split(":", 1)[1].strip() for h in head.split("\r\n")
                                 if h.lower().startswith("location:")), "")  # fmt: skip
                self.samples.append((t, ip, "exposed", "login" if is_login(int(status), location) else f"status {status}"))
            except (OSError, TimeoutError, ValueError) as exc:
                self.samples.append((t, ip, "exposed", f"broken {type(exc).__name__}"))
            finally:
                writer.close()

    async def run(self) -> None:
        await asyncio.gather(*(self._app(ip) for ip in self.ips), *(self._exposed(ip) for ip in self.ips))


def next_pod_ips(node: Node, n: int) -> list[str]:
    """The next ``n`` addresses host-local IPAM hands out (it goes round from the last one it reserved)."""
    net = ipaddress.ip_network(POD_CIDR)
    last_file = next((node.workdir / "cni" / "ipam").glob("*/last_reserved_ip.0"), None)
    last = ipaddress.ip_address(last_file.read_text().strip()) if last_file else net.network_address + 1
    return [str(ipaddress.ip_address(int(last) + i)) for i in range(1, n + 1) if ipaddress.ip_address(int(last) + i) in net]


async def test_a_new_pod_answers_nothing_unauthenticated_from_its_first_packet(cluster: Cluster) -> None:
    """A client hammering the next pod addresses on the app port and the exposed port from before a labelled pod is created gets no app answer and no page but the login, and the app records no request."""
    candidates = next_pod_ips(cluster.node, 6)
    hammer = Hammer(candidates)
    task = asyncio.ensure_future(cluster.client.run(hammer.run(), timeout=600))
    try:
        await asyncio.sleep(1.0)
        created = time.monotonic()
        cluster.kubectl("apply", "-f", "-", input=app_pod("first", cluster.record, {LABEL[0]: LABEL[1]}))
        await until("the new pod's IP", lambda: cluster.pod_ip("first"), timeout=120, interval=0.1)
        ip_seen = time.monotonic() - created
        ip = cluster.pod_ip("first")
        assert ip in candidates, (ip, candidates)
        await until("the new pod's app started", lambda: app_pid("first"), timeout=60, interval=0.1)
        app_started = time.monotonic() - created
        await until("a login page from the new pod",
                    lambda: any(s[1] == ip and s[3] == "login" for s in hammer.samples), timeout=60)  # fmt: skip
        await asyncio.sleep(3.0)
    finally:
        hammer.stop = True
        await task
    mine = [s for s in hammer.samples if s[1] == ip]
    first_login = min(s[0] for s in mine if s[3] == "login") - created
    report("first packet: pod created -> IP in the API", ip_seen)
    report("first packet: pod created -> app process running", app_started)
    report("first packet: pod created -> first login page", first_login,
           f"({len(mine)} attempts on its IP: " + ", ".join(
               f"{k} {o}: {sum(1 for s in mine if (s[2], s[3]) == (k, o))}"
               for k, o in sorted({(s[2], s[3]) for s in mine})) + ")")  # fmt: skip
    app = [s for s in hammer.samples if s[2] == "app"]
    assert [s for s in app if s[3] == "connected" or s[3].startswith("answered")] == [], "the app port answered"
    exposed = [s for s in hammer.samples if s[2] == "exposed" and not s[3].startswith(("login", "broken"))
               and s[3] not in ("ConnectionRefusedError", "TimeoutError", "ConnectionResetError", "OSError",
                                "SSLError", "SSLZeroReturnError", "SSLEOFError")]  # fmt: skip
    assert exposed == [], exposed[:10]
    assert cluster.seen("first") == []  # not one request reached the app


def restarts(pod: dict[str, Any]) -> int:
    """How often the kubelet restarted the pod's enforcer container."""
    return sum(int(c.get("restartCount", 0)) for c in pod.get("status", {}).get("containerStatuses", []))


@pytest.mark.parametrize("how", ["deleted", "rolled", "killed"])
async def test_the_enforcer_pod_deleted_under_load_lets_nothing_through(cluster: Cluster, how: str) -> None:
    """With the enforcer pod deleted, replaced by a rolling update, or its process killed with SIGKILL (a crash: no drain, no clean-up; the kubelet restarts the container) under signed-in and anonymous load on a protected pod, the app never answers unauthenticated, its port stays refused, and service resumes with the new enforcer."""
    name = cluster.deployment_pod("web")
    ip = cluster.pod_ip(name)
    user = await cluster.browser(ip, new_connection_per_request=True, timeout=5.0)
    page = await cluster.login(user, f"/{how}/login")
    assert page.status == 200, (page.status, page.text[:300])
    anon = await cluster.browser(ip, new_connection_per_request=True, timeout=5.0)
    load = Load(BASE, how, user, anon, (ip, APP_PORT))
    old = cluster.ready_enforcer()
    assert old is not None
    task = asyncio.ensure_future(cluster.client.run(load.run(), timeout=600))
    try:
        await asyncio.sleep(2.0)
        at = time.monotonic()
        if how == "deleted":
            cluster.kubectl("-n", SYSTEM_NS, "delete", "pod", old["metadata"]["name"], "--wait=false")
        elif how == "rolled":  # an upgrade: the DaemonSet's template changes, its pods are replaced one node at a time
            cluster.kubectl("-n", SYSTEM_NS, "rollout", "restart", "daemonset/enforcer")
        else:  # a crash: the daemon process (PID 1 of the container) dies at once
            [pid] = enforcer_pids()
            os.kill(pid, signal.SIGKILL)
        if how == "killed":
            ready = await until("the enforcer container restarted and Ready",
                                lambda: (p := cluster.ready_enforcer()) is not None and restarts(p) > restarts(old),
                                timeout=240, interval=0.25)  # fmt: skip
        else:
            ready = await until("a new enforcer pod Ready",
                                lambda: cluster.ready_enforcer(not_uid=old["metadata"]["uid"]), timeout=240,
                                interval=0.25)  # fmt: skip
        await until("signed-in requests served again",
                    lambda: (o := outage(load.samples, at)).resumed is not None and o.failed > 0, timeout=90)  # fmt: skip
        await asyncio.sleep(3.0)
    finally:
        load.stop.set()
        await task
    o: Outage = outage(load.samples, at)
    users, anons, ports = load.of("user"), load.of("anon"), load.of("port")
    report(f"enforcer pod {how}: new pod Ready after", ready)
    assert o.resumed is not None
    report(f"enforcer pod {how}: signed-in requests to the pod served again after", o.resumed,
           f"(first failure at +{o.first_failure or 0:.1f} s, longest gap {o.longest_gap:.1f} s, {o.failed} failed, "
           f"{len(users)} signed-in / {len(anons)} anonymous requests, {len(ports)} app-port probes)")  # fmt: skip
    assert [s for s in anons if s.status == 200] == []
    assert all(is_login(s.status, s.location) for s in anons if s.status is not None), {
        (s.status, s.location) for s in anons if s.status is not None}
    assert [s for s in users if s.status == 200 and not s.user] == []
    assert [s for s in ports if s.error == "connected"] == [], "the app port answered from outside"
    assert unauthenticated(cluster.seen(name)) == []
    assert sum(1 for s in users if s.ok and s.start > at + o.resumed) > 10


async def test_a_deleted_pod_leaves_no_socket_or_handle_in_the_enforcer(cluster: Cluster) -> None:
    """When a served pod is deleted, the enforcer keeps no descriptor of its network namespace and none of the sockets it had inside it."""
    pid = app_pid("first")
    assert pid is not None
    ns = netns_inode(pid)
    await until("the new enforcer serving the pod", lambda: cluster.pod_ip("first") and True, timeout=10)
    assert await cluster.challenged(cluster.pod_ip("first"))  # its listener (and a connection) are there
    [enforcer] = enforcer_pids()
    sockets = sockets_of(enforcer, pid)
    assert sockets, "no enforcer socket inside the served pod"
    assert handles(enforcer, ns, sockets), "the enforcer holds nothing of the served pod: the check sees nothing"
    t = time.monotonic()
    cluster.kubectl("-n", APPS_NS, "delete", "pod", "first", "--wait=false")
    await until("the pod gone", lambda: cluster.pod("first") is None, timeout=120, interval=0.5)
    await until("every handle closed", lambda: not handles(enforcer, ns, sockets), timeout=15)
    report("served pod deleted -> no handle left", time.monotonic() - t, f"({len(sockets)} sockets watched)")
    assert handles(enforcer, ns, sockets) == []


async def test_a_label_removed_releases_the_pod_and_removes_its_rules(cluster: Cluster) -> None:
    """Removing the selecting label from a served pod removes the table from its namespace, opens its app port and leaves no handle in the enforcer; putting the label back serves it again."""
    name = cluster.deployment_pod("web")
    pid = app_pid(name)
    assert pid is not None and "inet enforcer" in tables_in(pid)
    ip = cluster.pod_ip(name)
    ns = netns_inode(pid)
    [enforcer] = enforcer_pids()
    sockets = sockets_of(enforcer, pid)
    t = time.monotonic()
    cluster.kubectl("-n", APPS_NS, "label", "pod", name, f"{LABEL[0]}-")
    await until("its table removed", lambda: "inet enforcer" not in tables_in(pid), timeout=30)
    report("label removed -> table removed", time.monotonic() - t)
    connect(CLIENT_NETNS, ip, APP_PORT).close()  # open now (no request sent: nothing recorded)
    await until("every handle closed", lambda: not handles(enforcer, ns, sockets), timeout=15)
    # the Deployment selects its pods by another label: the pod stays, and the label back serves it again
    cluster.kubectl("-n", APPS_NS, "label", "pod", name, f"{LABEL[0]}={LABEL[1]}")
    await until("served again", lambda: "inet enforcer" in tables_in(pid), timeout=30)
    assert await cluster.challenged(ip)
    assert refused(CLIENT_NETNS, ip, APP_PORT)


def enforcer_doctor_pod(cluster: Cluster, pod: str) -> subprocess.CompletedProcess[str]:
    """The README's ``kubectl -n enforcer-system exec daemonset/enforcer -- enforcer doctor --pod <ns>/<pod>``."""
    done = cluster.kubectl("-n", SYSTEM_NS, "exec", "daemonset/enforcer", "--", "enforcer", "doctor", "--pod",
                           f"{APPS_NS}/{pod}", check=False, timeout=120)  # fmt: skip
    say(f"[k8s-pods] $ kubectl -n {SYSTEM_NS} exec daemonset/enforcer -- enforcer doctor --pod {APPS_NS}/{pod}\n"
        f"{done.stdout}{done.stderr}[exit {done.returncode}]")
    return done


async def test_doctor_shows_what_the_enforcer_added_to_a_pod(cluster: Cluster) -> None:
    """``enforcer doctor --pod`` run through kubectl exec in the enforcer pod: for the served pod every check is ok (the pod, its service, its namespace, its table listed with counters, the listener and the app port inside it), exit 0; for the unlabelled pod it says no service selects it and its namespace has no table."""
    name = cluster.deployment_pod("web")
    done = enforcer_doctor_pod(cluster, name)
    assert done.returncode == 0, done.stdout + done.stderr
    inode = netns_inode(app_pid(name) or 0)
    for line in (f"ok    pod {APPS_NS}/{name} (uid ", "select service(s) app (exposedPort 443",
                 f"ok    network namespace net:[{inode}]", "ok    table inet enforcer in the pod's namespace matches",
                 "ok    the enforcer's listener accepts connections on 127.0.0.1:15443 inside the pod",
                 f"ok    the app answers on 127.0.0.1:{APP_PORT} (app) inside the pod", "redirect to :15443",
                 "0 failure(s)"):  # fmt: skip
        assert line in done.stdout, (line, done.stdout)
    assert re.search(r"counter packets \d+ bytes \d+ redirect to :15443", done.stdout), done.stdout
    if cluster.pod("plain") is None:  # made by the first test; made again if gone
        cluster.kubectl("apply", "-f", "-", input=app_pod("plain", cluster.record, {"app": "other"}))
        await until("the unlabelled pod's IP", lambda: cluster.pod_ip("plain") and app_pid("plain"), timeout=120)
    done = enforcer_doctor_pod(cluster, "plain")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"warn  pod {APPS_NS}/plain is not selected by any service" in done.stdout, done.stdout
    assert f"selectors for namespace {APPS_NS}: app: [app=pe2e]" in done.stdout, done.stdout
    assert "ok    no table inet enforcer in its namespace: untouched" in done.stdout, done.stdout


async def test_a_deployment_with_an_http_readiness_probe_of_its_app_port_becomes_ready(cluster: Cluster) -> None:
    """A protected Deployment whose readinessProbe is an httpGet of its app port becomes Ready (the kubelet passes the
    pod's probe gate), while the app port and the probe's own URL stay refused from the client namespace."""
    name = "web-probe"
    doc = yaml.safe_load(app_deployment(name, cluster.record))
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"] = {
        "httpGet": {"path": "/healthz", "port": APP_PORT}, "periodSeconds": 2}
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))

    def ready() -> bool:
        out = json.loads(cluster.kubectl("-n", APPS_NS, "get", "deployment", name, "-o", "json").stdout)
        return bool(out.get("status", {}).get("readyReplicas") == 1)

    try:
        t = time.monotonic()
        await until("the probed Deployment Ready", ready, timeout=120, interval=0.5)
        report("readinessProbe through the probe gate -> Ready", time.monotonic() - t)
        pod = cluster.deployment_pod(name)
        ip, pid = cluster.pod_ip(pod), app_pid(pod)
        assert pid is not None
        table = subprocess.run(["nsenter", "-t", str(pid), "-n", "nft", "list", "table", "inet", "enforcer"],
                               capture_output=True, text=True, timeout=20, check=True).stdout
        say(table)
        assert "tcp dport 8080 counter" in table and "redirect to :15021" in table, table
        assert refused(CLIENT_NETNS, ip, APP_PORT)

        async def probe_url() -> str:
            async with aiohttp.ClientSession() as s:
                try:
                    async with s.get(f"http://{ip}:{APP_PORT}/healthz", timeout=aiohttp.ClientTimeout(total=5)) as r:
                        return f"answered {r.status}"
                except aiohttp.ClientConnectorError as exc:
                    return f"refused: {exc}"

        assert (await cluster.client.run(probe_url())).startswith("refused"), "the probe URL answered the client"
        doctor = enforcer_doctor_pod(cluster, pod)  # the probe rule is part of what doctor expects
        assert doctor.returncode == 0 and "redirect to :15021" in doctor.stdout, doctor.stdout + doctor.stderr
        rows = cluster.seen(pod)
        assert rows and {(r["method"], r["path"]) for r in rows} == {("GET", "/healthz")}, rows
    finally:
        cluster.kubectl("-n", APPS_NS, "delete", "deployment", name, "--wait=true", "--timeout=60s", check=False)
        await until("the probed pods gone", lambda: not cluster.kubectl(
            "-n", APPS_NS, "get", "pods", "-l", f"deployment={name}", "-o", "name").stdout.strip(), timeout=60)
        for record in cluster.record.glob(f"{name}-*.jsonl"):  # the kubelet's requests: not users'
            record.unlink()


async def test_deleting_the_daemonset_removes_every_pod_rule_and_the_cni_plugin(cluster: Cluster) -> None:
    """kubectl delete of the DaemonSet ends its pod, which removes the table from every served pod's namespace and the plugin from the node's conflist and plugin directory."""
    name = cluster.deployment_pod("web")
    pid = app_pid(name)
    assert pid is not None and "inet enforcer" in tables_in(pid)
    assert any("enforcer-cni" in f.read_text() for f in cni.conf_files(cluster.node.cni_conf_dir))
    t = time.monotonic()
    cluster.kubectl("-n", SYSTEM_NS, "delete", "daemonset", "enforcer", "--wait=false")
    await until("the enforcer pod gone", lambda: not cluster.enforcer_pods(), timeout=120, interval=0.5)
    report("DaemonSet deleted -> pod gone", time.monotonic() - t)
    left = {p: tables_in(p) for p in (app_pid(n) for n in (name, cluster.deployment_pod("web-b"), "plain")) if p}
    assert len(left) == 3, left
    assert all("inet enforcer" not in tables for tables in left.values()), left
    assert not any("enforcer-cni" in f.read_text() for f in cni.conf_files(cluster.node.cni_conf_dir))
    assert not (cluster.node.cni_bin_dir / cni.PLUGIN_TYPE).exists()
    # pods start again without the enforcer, untouched
    cluster.kubectl("apply", "-f", "-", input=app_pod("after", cluster.record, {LABEL[0]: LABEL[1]}))
    await until("a pod started after the uninstall", lambda: app_pid("after"), timeout=120)
    assert "inet enforcer" not in tables_in(app_pid("after") or 0)
