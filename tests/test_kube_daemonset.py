"""The shipped DaemonSet on a real Kubernetes node: the image from scripts/image, the manifests
through kustomize, custom resources applied with kubectl, a hostNetwork app, a real OpenID
Provider, and what happens to the app's traffic while the enforcer pod is replaced or removed.

Built once for the module on the session's cluster (tests/harness/kube.py): the image (built by
``scripts/image``, imported into the node's containerd), the node OP on
``https://10.250.0.1:9443`` in the node's network namespace, a hostNetwork pod running
tests/harness/recording_app.py on :8080 (from a ConfigMap, with the image's Python; it records
to a hostPath file in this module's tmp directory), and an overlay in tmp that references
deploy/kubernetes/overlays/example and changes only the image reference, plus a patch of the
ConfigMap (the OP's CA for ``oidc.caFile``). The README's install and removal are run exactly as
printed (:meth:`Cluster.printed`: that overlay stands for the example's path), on a cluster
without anything of the enforcer; the last test fails if a cluster command the README prints
was not run. The tests run in file order; each leaves the DaemonSet serving for the next, except
test_the_printed_removal_..., after which the next test installs again as printed and checks
that a bug this test found once (Secrets read cluster-wide against the per-namespace RBAC)
stays fixed.

The node's /var/lib/enforcer and /var/log/enforcer are the DaemonSet's hostPaths: the module
refuses to run if they exist already (not made by it) and removes them afterwards. Timings are
printed as ``[k8s-e2e] ...`` lines and summed up at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import re
import shlex
import shutil
import socket
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
import yaml

from enforcer import __version__
from enforcer.net.ruleset import DEFAULT_MARK
from tests.harness.browser import Response, ScriptedBrowser
from tests.harness.kube import CLIENT_NETNS, KUBECTL, NODE_IP, NODE_NETNS, Node
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
from tests.harness.manifests import RUN_ELSEWHERE, readme_commands
from tests.harness.netns import NetnsLoop, connect, refused, require_root
from tests.harness.op import OPUser, RunningOP, start_op
from tests.harness.prereq import require_e2e

pytestmark = [pytest.mark.root, pytest.mark.e2e, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[1]
BASE_DIR = REPO / "deploy" / "kubernetes" / "base"
APPS_NS = "demo"  # the README's sample namespace: the custom resources and their Secrets
EXAMPLE = "deploy/kubernetes/overlays/example"
"""The README's overlay path: :meth:`Cluster.printed` runs our overlay of it instead."""
APP_POD_NS = "default"
IMAGE = f"localhost/enforcer-e2e:{__version__}"
HOST = "app.k8s.test"
BASE = f"https://{HOST}"
APP_PORT = 8080
OP_PORT = 9443
ISSUER = f"https://{NODE_IP}:{OP_PORT}"
CLIENT_SECRET = "k8s-e2e-client-secret"
OP_CA_IN_POD = "/etc/enforcer/op-ca.pem"
STATE_DIR = Path("/var/lib/enforcer")
LOGS_DIR = Path("/var/log/enforcer")
USERS = {
    "alice": OPUser(
        "alice-pw",
        {"email": "alice@example.com", "email_verified": True, "groups": ["staff"], "preferred_username": "alice"},
    ),
}
SHIPPED_SOURCE = "- kubernetes: {}"
"""The shipped ConfigMap's definitions source: every namespace's custom resources."""


FIGURES = Figures("k8s-e2e")
say, report = FIGURES.say, FIGURES.report


# ----------------------------------------------------------------------------- manifests


def service_cr(**spec: Any) -> dict[str, Any]:
    """The EnforcerService of the sample app (``spec`` overrides fields)."""
    body: dict[str, Any] = {
        "OIDCClientID": "app",
        "OIDCClientSecret": {"secretKeyRef": {"name": "app-oidc", "key": "client-secret"}},
        "OIDCProviderURL": ISSUER,
        "OIDCCallbackURL": BASE,
        "OIDCScopes": ["openid", "email", "profile"],
        "hosts": [HOST],
        "port": APP_PORT,
        "exposedPort": 443,
        "exposedAPIs": [["httpresourcespec:name=app"]],
    }
    body.update(spec)
    return {"apiVersion": "enforcer.dev/v1alpha1", "kind": "EnforcerService",
            "metadata": {"name": "app", "namespace": APPS_NS}, "spec": body}  # fmt: skip


def is_login(status: int | None, location: str | None) -> bool:
    """A redirect to the test OP's authorization endpoint (a login challenge)."""
    return is_login_at(ISSUER, status, location)


def custom_resources() -> str:
    """The client Secret, the HTTPResourceSpec and the EnforcerService of the sample app."""
    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "app-oidc", "namespace": APPS_NS},
         "type": "Opaque", "stringData": {"client-secret": CLIENT_SECRET}},
        {"apiVersion": "enforcer.dev/v1alpha1", "kind": "HTTPResourceSpec",
         "metadata": {"name": "app", "namespace": APPS_NS},
         "spec": {"associatedTags": ["httpresourcespec:name=app"],
                  "endpoints": [{"URI": "/*", "methods": ["GET", "POST"], "allowedScopes": [[]]}]}},
        service_cr(),
    ]  # fmt: skip
    return yaml.safe_dump_all(objs)


def app_pod(record_dir: Path) -> str:
    """The sample app: a hostNetwork pod running the recording app with the image's Python."""
    objs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "recording-app", "namespace": APP_POD_NS},
         "data": {"recording_app.py": (REPO / "tests" / "harness" / "recording_app.py").read_text()}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "recording-app", "namespace": APP_POD_NS},
         "spec": {
             "hostNetwork": True,
             "terminationGracePeriodSeconds": 1,
             "automountServiceAccountToken": False,
             "containers": [{
                 "name": "app", "image": IMAGE, "imagePullPolicy": "Never",
                 "command": ["/opt/enforcer/venv/bin/python", "/app/recording_app.py", "/record/seen.jsonl",
                             f"app:{APP_PORT}"],
                 "readinessProbe": {"tcpSocket": {"port": APP_PORT}, "periodSeconds": 1},
                 "volumeMounts": [{"name": "code", "mountPath": "/app"}, {"name": "record", "mountPath": "/record"}],
             }],
             "volumes": [{"name": "code", "configMap": {"name": "recording-app"}},
                         {"name": "record", "hostPath": {"path": str(record_dir), "type": "Directory"}}],
         }},
    ]  # fmt: skip
    return yaml.safe_dump_all(objs)


def write_overlay(d: Path, base_config: str, op_ca: bytes) -> Path:
    """An overlay of the README's example overlay that changes the image reference and patches the ConfigMap only."""
    d.mkdir(parents=True, exist_ok=True)
    name, tag = IMAGE.rsplit(":", 1)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(REPO / EXAMPLE, d)],
        "images": [{"name": "registry.example.com/enforcer", "newName": name, "newTag": tag}],
        "patches": [{"path": "configmap-patch.yaml"}],
    }
    config = base_config.rstrip("\n") + f"\noidc: {{caFile: {OP_CA_IN_POD}}}   # the test OP's CA\n"
    assert SHIPPED_SOURCE in config, config  # the shipped source, with the shipped RBAC
    patch = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "enforcer-config", "namespace": SYSTEM_NS},
        "data": {
            "enforcer.yaml": config,
            Path(OP_CA_IN_POD).name: op_ca.decode(),
        },
    }
    (d / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    (d / "configmap-patch.yaml").write_text(yaml.safe_dump(patch, sort_keys=False))
    return d


def by_kind(rendered: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(rendered) if o}


# ----------------------------------------------------------------------------- the node


def nft_tables() -> str:
    """``nft list tables`` in the node's network namespace."""
    return subprocess.run(["ip", "netns", "exec", NODE_NETNS, "nft", "list", "tables"], capture_output=True,
                          text=True, timeout=20, check=True).stdout  # fmt: skip


def nft_table() -> str:
    """The enforcer's table in the node's network namespace ('' when there is none)."""
    done = subprocess.run(["ip", "netns", "exec", NODE_NETNS, "nft", "list", "table", "inet", "enforcer"],
                          capture_output=True, text=True, timeout=20, check=False)  # fmt: skip
    return done.stdout if done.returncode == 0 else ""


def flows() -> list[dict[str, Any]]:
    path = LOGS_DIR / "flows.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


PRINTED_RAN: set[str] = set()
"""The README's commands :meth:`Cluster.printed` ran (the last test checks that none is missing)."""


@dataclass
class Cluster:
    """Everything the tests share."""

    node: Node
    op: RunningOP
    client: NetnsLoop
    workdir: Path
    overlay: Path
    record: Path
    dry_run: subprocess.CompletedProcess[str]
    browsers: list[ScriptedBrowser] = field(default_factory=list)

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.node.api.kubectl(*args, **kw)

    def printed(self, command: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a command the README's Kubernetes section prints, exactly as printed from the repository
        root (the example overlay's path: our overlay of it, which swaps the image reference only)."""
        assert command in readme_commands(), f"the README does not print {command!r}"
        argv = shlex.split(command)
        assert argv[0] == "kubectl", command
        if " | " in command:  # a pipeline: run by a shell, as the reader would, kubectl with our kubeconfig
            assert "deploy/" not in command, command
            done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=kw.get("timeout", 120), check=False,
                                  env={**os.environ, "KUBECONFIG": str(self.node.api.kubeconfig)})  # fmt: skip
            if kw.get("check", True) and done.returncode != 0:
                raise RuntimeError(f"{command} failed ({done.returncode}): {done.stderr.strip()}")
            PRINTED_RAN.add(command)
            return done
        args = [str(self.overlay) if a == EXAMPLE else str(REPO / a) if a.startswith("deploy/") else a
                for a in argv[1:]]  # fmt: skip
        done = self.kubectl(*args, **kw)
        PRINTED_RAN.add(command)
        return done

    def pods(self) -> list[dict[str, Any]]:
        return enforcer_pods(self.kubectl)

    def ready_pod(self, not_uid: str | None = None) -> dict[str, Any] | None:
        """A Ready enforcer pod (other than ``not_uid``), not being deleted."""
        return ready_enforcer(self.pods(), not_uid)

    def condition(self, kind: str, name: str) -> dict[str, Any]:
        out = json.loads(self.kubectl("-n", APPS_NS, "get", kind, name, "-o", "json").stdout)
        conds = (out.get("status") or {}).get("conditions") or []
        return next((c for c in conds if c.get("type") == "Accepted"), {})

    def diagnose(self) -> str:
        """The enforcer pods' logs, the custom resources' status and recent events (for a failure's message)."""
        parts = []
        for args in (
            ("-n", SYSTEM_NS, "logs", "-l", SELECTOR, "--tail=60", "--prefix"),
            ("-n", SYSTEM_NS, "get", "pods", "-o", "wide"),
            ("-n", APPS_NS, "get", "esvc,hrs", "-o", "yaml"),
            ("get", "events", "-A", "--sort-by=.lastTimestamp"),
        ):
            done = self.kubectl(*args, check=False)
            parts.append(f"$ kubectl {' '.join(args)}\n{done.stdout[-6000:]}{done.stderr[-2000:]}")
        parts.append("last flow records:\n" + "\n".join(json.dumps(f) for f in flows()[-5:]))
        for cmd in (["ss", "-ltnp"], ["nft", "list", "table", "inet", "enforcer"]):
            done = subprocess.run(["ip", "netns", "exec", NODE_NETNS, *cmd], capture_output=True, text=True,
                                  timeout=20, check=False)  # fmt: skip
            parts.append(f"$ {' '.join(cmd)} (node)\n{done.stdout[-4000:]}{done.stderr[-1000:]}")
        app = self.kubectl("-n", APP_POD_NS, "logs", "recording-app", "--tail=20", check=False)
        parts.append(f"recording app: {app.stdout}{app.stderr}")
        return "\n".join(parts)

    def seen(self) -> list[dict[str, Any]]:
        """Every request the app received."""
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]

    def ssl_context(self) -> Any:
        return client_ssl_context(STATE_DIR, self.op.ca_pem)

    async def browser(self, **kwargs: Any) -> ScriptedBrowser:
        """A scripted browser in the client namespace; app.k8s.test resolves to the node."""
        ctx = self.ssl_context()

        async def make() -> ScriptedBrowser:
            return ScriptedBrowser(ctx, resolve={HOST: NODE_IP}, **kwargs)

        b = await self.client.run(make())
        self.browsers.append(b)
        return b

    async def login(self, browser: ScriptedBrowser, path: str) -> Response:
        return await self.client.run(browser.login(BASE + path, "alice", USERS["alice"].password))

    async def get(self, browser: ScriptedBrowser, path: str) -> Response:
        return await self.client.run(browser.get(BASE + path, follow=False))

    def is_login(self, page: Response) -> bool:
        return is_login(page.status, page.location)


async def install_as_printed(c: Cluster) -> None:
    """The README's install after `kubectl create namespace demo`: the overlay, the rollout, the sample's
    client Secret and its custom resources, each command exactly as printed."""
    c.printed("kubectl kustomize deploy/kubernetes/overlays/example")
    c.printed("kubectl apply -k deploy/kubernetes/overlays/example")
    c.printed("kubectl -n enforcer-system rollout status daemonset/enforcer", timeout=200)
    c.printed("kubectl -n demo create secret generic private-app-oidc --from-literal=client-secret='<the secret>'")
    c.printed("kubectl apply -f deploy/kubernetes/overlays/example/demo.yaml")


REMOVAL = (
    "kubectl -n enforcer-system delete daemonset enforcer --cascade=foreground --wait",
    "kubectl delete -k deploy/kubernetes/overlays/example --ignore-not-found",
    "kubectl delete namespace demo",
)
"""The README's removal, in its order."""


async def _remove_everything(c: Cluster, overlay_applied: bool) -> None:
    """Undo the module's objects on the cluster with the README's removal (each step allowed to find
    its objects gone already), then the app pod; wait for the enforcer pods and namespaces to be gone."""
    c.kubectl("-n", APP_POD_NS, "delete", "pod,configmap", "recording-app", "--ignore-not-found", "--grace-period=1",
              check=False)  # fmt: skip
    for command in REMOVAL if overlay_applied else REMOVAL[-1:]:
        c.printed(command, check=False, timeout=180)
    with contextlib.suppress(AssertionError):
        await until("the enforcer pods gone", lambda: not c.pods(), timeout=90, interval=1)
    with contextlib.suppress(AssertionError):
        await until(
            "namespaces gone",
            lambda: c.kubectl("get", "namespace", SYSTEM_NS, APPS_NS, check=False).returncode != 0,
            timeout=60,
            interval=1,
        )


def product_crds(names: str) -> list[str]:
    """The enforcer's own CRDs among ``kubectl get crd -o name`` (other modules' test CRDs may share the cluster)."""
    return [n for n in names.split() if n.rsplit("/", 1)[-1] in ("enforcerservices.enforcer.dev",
                                                                  "httpresourcespecs.enforcer.dev")]


@pytest_asyncio.fixture(scope="module")
async def cluster(
    kube_node: Node, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> AsyncIterator[Cluster]:
    """The image on the node, the OP, the app pod, the README's install run as printed, and the custom resources."""
    require_root()
    require_e2e()
    FIGURES.capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    t_module = time.monotonic()
    ours = fresh_host_dirs(STATE_DIR, LOGS_DIR)
    work = tmp_path_factory.mktemp("k8s-e2e")
    record = work / "record"
    record.mkdir()
    api = kube_node.api
    archive = await asyncio.to_thread(build_image, work / "enforcer-e2e.oci.tar", IMAGE, FIGURES)
    t = time.monotonic()
    assert IMAGE in await asyncio.to_thread(kube_node.import_image, archive)
    report("image import (ctr)", time.monotonic() - t)

    op = await start_op(
        work / "op",
        clients=[{"client_id": "app", "client_secret": CLIENT_SECRET, "redirect_uris": [f"{BASE}/oauth2/callback"],
                  "post_logout_redirect_uris": [f"{BASE}/"], "token_endpoint_auth_method": "client_secret_basic"}],
        users=USERS, host=NODE_IP, port=OP_PORT, issuer=ISSUER, netns=NODE_NETNS,
    )  # fmt: skip
    client = NetnsLoop(CLIENT_NETNS)
    base_rendered = by_kind(api.kubectl("kustomize", str(BASE_DIR)).stdout)
    overlay = write_overlay(work / "overlay", base_rendered[("ConfigMap", "enforcer-config")]["data"]["enforcer.yaml"],
                            op.ca_pem)  # fmt: skip
    c = Cluster(kube_node, op, client, work, overlay, record / "seen.jsonl",
                subprocess.CompletedProcess([], 0))  # fmt: skip
    applied = False
    try:
        try:
            t = time.monotonic()
            api.kubectl("apply", "-f", "-", input=app_pod(record))
            kube_node.wait_pod_ready(APP_POD_NS, "recording-app", timeout=120)
            report("app pod Ready", time.monotonic() - t)

            # the server-side dry run needs the namespaces: made for it and deleted, so the install below
            # starts from a cluster without anything of the enforcer
            applied = True
            c.printed("kubectl create namespace demo")
            api.kubectl("create", "namespace", SYSTEM_NS)
            c.dry_run = api.kubectl("apply", "--dry-run=server", "-k", str(overlay), check=False)
            api.kubectl("delete", "namespace", SYSTEM_NS, "--wait", timeout=150)
            assert not product_crds(api.kubectl("get", "crd", "-o", "name").stdout)

            t = time.monotonic()
            await install_as_printed(c)
            report("README install (apply -k -> rollout status, pod Ready)", time.monotonic() - t)

            t = time.monotonic()
            api.kubectl("apply", "-f", "-", input=custom_resources())
            await until("EnforcerService app Accepted", lambda: c.condition("esvc", "app").get("status") == "True")
            await until("the redirect of :443", lambda: "dport 443" in nft_table())
            report("custom resources applied -> Accepted and redirected", time.monotonic() - t)
        except BaseException:
            diagnosis = c.diagnose()
            (work / "diagnosis.txt").write_text(diagnosis)
            stream = sys.__stderr__
            if stream is not None:
                stream.write(f"[k8s-e2e] set-up failed; the cluster said:\n{diagnosis}\n")
            raise
        yield c
    finally:
        stream = sys.__stderr__
        if stream is not None:  # shown with the last test's report if it failed
            stream.write(f"[k8s-e2e] at teardown:\n{c.diagnose()}\n")
        for b in c.browsers:
            with contextlib.suppress(Exception):
                await client.run(b.close())
        client.close()
        await _remove_everything(c, applied)
        left = nft_table()
        if left:  # leave the node as we found it, then fail: the printed removal must not leave it
            subprocess.run(["ip", "netns", "exec", NODE_NETNS, "nft", "delete", "table", "inet", "enforcer"],
                           capture_output=True, check=False)  # fmt: skip
        await op.stop()
        (work / "op.stderr").write_text("\n".join(op.stderr_lines) + "\n")
        for d in ours:
            shutil.rmtree(d, ignore_errors=True)
        report("whole module (fixture start to teardown end)", time.monotonic() - t_module)
        FIGURES.summary()
        if left:
            pytest.fail(f"the README's removal left table inet enforcer on the node:\n{left}")


# ----------------------------------------------------------------------------- tests


async def test_the_shipped_daemonset_validates_on_the_server_and_becomes_ready(cluster: Cluster) -> None:
    """A server-side dry run of the overlay succeeds, and the image runs as the shipped DaemonSet (only the image changed) and is Ready."""
    assert cluster.dry_run.returncode == 0, cluster.dry_run.stderr
    assert "daemonset.apps/enforcer created (server dry run)" in cluster.dry_run.stdout, cluster.dry_run.stdout
    shipped = by_kind(cluster.kubectl("kustomize", str(BASE_DIR)).stdout)[("DaemonSet", "enforcer")]
    ours = by_kind(cluster.kubectl("kustomize", str(cluster.overlay)).stdout)[("DaemonSet", "enforcer")]
    assert ours["spec"]["template"]["spec"]["containers"][0].pop("image") == IMAGE
    assert shipped["spec"]["template"]["spec"]["containers"][0].pop("image") == "localhost/enforcer:0.1.0"
    assert ours == shipped
    live = json.loads(cluster.kubectl("-n", SYSTEM_NS, "get", "daemonset", "enforcer", "-o", "json").stdout)
    assert live["status"]["numberReady"] == live["status"]["desiredNumberScheduled"] == 1
    pod = cluster.ready_pod()
    assert pod is not None and pod["spec"]["containers"][0]["image"] == IMAGE
    assert pod["spec"]["nodeName"] == cluster.node.name and pod["spec"]["hostNetwork"] is True


async def test_a_client_logs_in_and_reaches_the_host_network_app(cluster: Cluster) -> None:
    """From the client namespace https://app.k8s.test/ redirects to the OP, the login ends on the app page with identity headers, the app port is refused, and the flow is logged on the node."""
    browser = await cluster.browser()
    first = await cluster.get(browser, "/hello-k8s")
    assert cluster.is_login(first), (first.status, first.location)
    t = time.monotonic()
    page = await cluster.login(browser, "/hello-k8s")
    report("login through the DaemonSet", time.monotonic() - t)
    assert page.status == 200, (page.status, page.text[:300])
    assert json.loads(page.text)["user"], page.text
    rows = [r for r in cluster.seen() if r["path"] == "/hello-k8s"]
    assert rows and all(dict(r["headers"]).get("X-Forwarded-User") for r in rows), rows
    assert refused(CLIENT_NETNS, NODE_IP, APP_PORT)
    await until(
        "the flow record on the node",
        lambda: any(f["path"] == "/hello-k8s" and f["status"] == 200 and f["user"] for f in flows()),
        timeout=30,
    )
    (flow,) = [f for f in flows() if f["path"] == "/hello-k8s" and f["status"] == 200]
    assert (flow["service"], flow["destination"], flow["decision"]) == ("app", f"{NODE_IP}:443", "allow")
    # the pod's output through the API server, split as the README prints it: the flows, the daemon's log
    await until("the flow in the pod's output", lambda: "/hello-k8s" in cluster.kubectl(
        "-n", SYSTEM_NS, "logs", "ds/enforcer").stdout, timeout=30)  # fmt: skip
    flow_lines = cluster.printed(
        "kubectl -n enforcer-system logs ds/enforcer | jq -cR 'fromjson? | select(.flow_id)'").stdout.splitlines()
    logged = [json.loads(line) for line in flow_lines]
    assert logged and all(f["flow_id"] for f in logged), flow_lines[-5:]
    assert any(f["path"] == "/hello-k8s" and f["status"] == 200 for f in logged), flow_lines[-5:]
    logs = cluster.printed("""kubectl -n enforcer-system logs ds/enforcer | grep -v '^{"time":'""").stdout
    assert "definitions applied" in logs and "app" in logs, logs[-2000:]
    assert "flow_id" not in logs, logs[-2000:]
    # the flows read inside the pod: a method the HTTPResourceSpec does not allow is denied
    refused_delete = await cluster.client.run(browser.request("DELETE", BASE + "/denied-k8s", follow=False))
    assert refused_delete.status == 403, refused_delete.status
    await until("the denied flow record on the node", lambda: any(f["path"] == "/denied-k8s" for f in flows()),
                timeout=30)  # fmt: skip
    denied = cluster.printed("kubectl -n enforcer-system exec daemonset/enforcer -- enforcer flows --denied --since 1h")
    assert "/denied-k8s" in denied.stdout and "/hello-k8s" not in denied.stdout, (denied.stdout[-2000:],
                                                                                  denied.stderr[-2000:])
    assert unauthenticated(cluster.seen()) == []


async def test_the_printed_status_commands_show_each_custom_resource(cluster: Cluster) -> None:
    """kubectl get esvc,hrs -A lists the sample's and the test's custom resources with their Accepted column, and kubectl describe shows the sample's condition, as the README prints them."""
    listed = cluster.printed("kubectl get esvc,hrs -A").stdout
    assert "ACCEPTED" in listed and "REASON" in listed, listed
    for kind in ("enforcerservice.enforcer.dev/", "httpresourcespec.enforcer.dev/"):
        for name in ("app", "private-app"):
            assert f"{kind}{name} " in listed, listed
    described = cluster.printed("kubectl -n demo describe esvc private-app").stdout
    assert re.search(r"^Name:\s+private-app$", described, re.MULTILINE), described
    assert re.search(r"^\s+Type:\s+Accepted$", described, re.MULTILINE), described
    # The sample's IdP (idp.example.com) does not exist here: a pod that starts with it in force is
    # never Ready (/readyz waits for every IdP's discovery), which the restarts below need.
    cluster.kubectl("delete", "-f", str(REPO / EXAMPLE / "demo.yaml"))


async def test_kubectl_refuses_a_typoed_field_and_the_server_would_prune_it(cluster: Cluster) -> None:
    """On the 1.20 API server with the shipped CRDs, kubectl apply (strict validation, its default) refuses an EnforcerService with a typo'd field and names it; with validation off the server would accept it with the field pruned."""
    typo = service_cr()
    typo["metadata"]["name"] = "typo"
    typo["spec"]["exposedPorts"] = typo["spec"].pop("exposedPort")
    refused_apply = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(typo), check=False)
    say(f"[k8s-e2e] kubectl apply of a typo'd field: rc {refused_apply.returncode}: {refused_apply.stderr.strip()}")
    assert refused_apply.returncode != 0 and "exposedPorts" in refused_apply.stderr, refused_apply
    assert "typo" not in cluster.kubectl("-n", APPS_NS, "get", "esvc", "-o", "name").stdout
    lax = cluster.kubectl("apply", "--validate=false", "--dry-run=server", "-o", "yaml", "-f", "-",
                          input=yaml.safe_dump(typo), check=False)  # fmt: skip
    assert lax.returncode == 0, lax.stderr
    stored = yaml.safe_load(lax.stdout)["spec"]
    assert "exposedPorts" not in stored and "exposedPort" not in stored, stored


async def test_an_invalid_change_is_refused_with_its_key_path_and_the_last_version_serves(cluster: Cluster) -> None:
    """A schema-valid but wrong EnforcerService shows Accepted False with the key path in kubectl get, the login still works, and the fix is accepted."""
    bad = service_cr(OIDCCallbackURL="https://elsewhere.k8s.test")
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(bad))
    await until("Accepted False", lambda: cluster.condition("esvc", "app").get("status") == "False", timeout=30)
    cond = cluster.condition("esvc", "app")
    assert cond["reason"] == "Invalid" and "spec.OIDCCallbackURL" in cond["message"], cond
    printed = cluster.kubectl("-n", APPS_NS, "get", "esvc").stdout
    assert "False" in printed and "Invalid" in printed, printed
    browser = await cluster.browser()
    page = await cluster.login(browser, "/while-invalid")
    assert page.status == 200, (page.status, page.text[:300])
    callbacks = [u for u in page.urls if "/oauth2/callback" in u]
    assert callbacks and all(u.startswith(BASE + "/oauth2/callback") for u in callbacks), page.urls
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(service_cr()))
    await until("Accepted True", lambda: cluster.condition("esvc", "app").get("status") == "True", timeout=30)
    assert unauthenticated(cluster.seen()) == []


async def _replace_under_load(
    cluster: Cluster, tag: str, replace: Callable[[], object], settle: float
) -> dict[str, Any]:
    """Sign in, start the load, call ``replace`` (which must lead to a new enforcer pod), and measure."""
    user = await cluster.browser(new_connection_per_request=True, timeout=5.0)
    page = await cluster.login(user, f"/{tag}/login")
    assert page.status == 200, (page.status, page.text[:300])
    anon = await cluster.browser(new_connection_per_request=True, timeout=5.0)
    load = Load(BASE, tag, user, anon, (NODE_IP, APP_PORT))
    old = cluster.ready_pod()
    assert old is not None
    follower = LogFollower.start(cluster, old["metadata"]["name"])
    task = asyncio.ensure_future(cluster.client.run(load.run(), timeout=600))
    try:
        await asyncio.sleep(2.0)
        at = time.monotonic()
        await asyncio.to_thread(replace)
        timeline = PodTimeline(old["metadata"]["uid"], at, time.time())
        ready_after = await until("a new enforcer pod Ready", lambda: timeline.poll(cluster), timeout=240,
                                  interval=0.25)  # fmt: skip
        await until("signed-in requests served again", lambda: (o := outage(load.samples, at)).resumed is not None
                    and o.failed > 0, timeout=60)  # fmt: skip
        await asyncio.sleep(settle)
    finally:
        load.stop.set()
        await task
        follower.stop()
    o: Outage = outage(load.samples, at)
    timeline.old_log = follower.lines
    return {"load": load, "outage": o, "ready": ready_after, "at": at, "timeline": timeline}


@dataclass
class LogFollower:
    """``kubectl logs -f`` of one pod, collected on a thread (the old pod's log vanishes with it)."""

    proc: subprocess.Popen[str]
    lines: list[str]
    thread: threading.Thread

    @classmethod
    def start(cls, cluster: Cluster, pod: str) -> LogFollower:
        proc = subprocess.Popen(
            [KUBECTL, "--kubeconfig", str(cluster.node.api.kubeconfig), "-n", SYSTEM_NS, "logs", "-f", pod],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        lines: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            lines.extend(proc.stdout)

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        return cls(proc, lines, thread)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)
        self.thread.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class PodTimeline:
    """When the old enforcer pod vanished and a new one appeared, relative to ``at`` (from polling the API)."""

    old_uid: str
    at: float
    wall: float  # time.time() at ``at``
    old_gone: float | None = None
    new_seen: float | None = None
    old_log: list[str] = field(default_factory=list)

    def logged(self, needle: str) -> float:
        """When the old pod logged a line containing ``needle``, relative to ``at`` (-1: it did not)."""
        for line in self.old_log:
            if needle in line:
                with contextlib.suppress(ValueError):
                    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                    return stamp.replace(tzinfo=datetime.UTC).timestamp() - self.wall
        return -1.0

    def poll(self, cluster: Cluster) -> bool:
        """Note what the pod list shows now; True once a new pod is Ready."""
        pods = cluster.pods()
        now = time.monotonic() - self.at
        uids = {p["metadata"]["uid"] for p in pods}
        if self.old_gone is None and self.old_uid not in uids:
            self.old_gone = now
        if self.new_seen is None and uids - {self.old_uid}:
            self.new_seen = now
        return cluster.ready_pod(not_uid=self.old_uid) is not None


def _check_load(cluster: Cluster, tag: str, result: dict[str, Any], what: str) -> None:
    load: Load = result["load"]
    o: Outage = result["outage"]
    users, anons, ports = load.of("user"), load.of("anon"), load.of("port")
    timeline: PodTimeline = result["timeline"]
    report(
        f"{what}: new pod Ready after",
        result["ready"],
        f"(old pod: draining at +{timeline.logged('stopping: draining'):.2f} s, stop verdict at "
        f"+{timeline.logged('stop: '):.2f} s, 'stopped' at +{timeline.logged('daemon: stopped'):.2f} s, gone from the API "
        f"at +{timeline.old_gone or -1:.2f} s; new pod seen at +{timeline.new_seen or -1:.2f} s)",
    )
    assert o.resumed is not None
    report(f"{what}: signed-in requests served again after", o.resumed,
           f"(first failure at +{o.first_failure or 0:.1f} s, longest gap {o.longest_gap:.1f} s, {o.failed} failed, "
           f"{len(users)} signed-in / {len(anons)} anonymous requests, {len(ports)} app-port probes)")  # fmt: skip
    # never an unauthenticated answer from the app
    assert [s for s in anons if s.status == 200] == []
    assert all(is_login(s.status, s.location) for s in anons if s.status is not None), {
        (s.status, s.location) for s in anons if s.status is not None
    }
    assert [s for s in users if s.status == 200 and not s.user] == []
    assert [s for s in ports if s.error == "connected"] == [], "the app port answered from outside"
    rows = [r for r in cluster.seen() if r["path"].startswith(f"/{tag}/")]
    assert len(rows) >= sum(1 for s in users if s.ok)
    assert unauthenticated(rows) == [] and unauthenticated(cluster.seen()) == []
    assert not any(r["path"].startswith(f"/{tag}/anon/") for r in rows)
    # a signed-in user is never asked to log in again: the sessions live on the node (hostPath)
    assert [s for s in users if s.status is not None and s.status != 200] == [], {
        (s.status, s.location) for s in users if s.status is not None and s.status != 200
    }
    assert sum(1 for s in users if s.ok and s.start > result["at"] + o.resumed) > 10


async def test_the_enforcer_pod_deleted_under_load_lets_nothing_through_and_comes_back(cluster: Cluster) -> None:
    """With the pod deleted under signed-in and anonymous load, the app never answers unauthenticated, its port stays refused, and service resumes with the new pod."""
    old = cluster.ready_pod()
    assert old is not None
    name = old["metadata"]["name"]
    result = await _replace_under_load(
        cluster, "delete", lambda: cluster.kubectl("-n", SYSTEM_NS, "delete", "pod", name, "--wait=false"), 3.0
    )
    _check_load(cluster, "delete", result, "pod deleted")


async def test_a_rolling_update_under_load_lets_nothing_through_and_keeps_sessions(cluster: Cluster) -> None:
    """kubectl rollout restart under the same load: nothing unauthenticated, the app port refused, service resumes with the new pod."""

    def restart() -> None:
        cluster.kubectl("-n", SYSTEM_NS, "rollout", "restart", "daemonset/enforcer")

    result = await _replace_under_load(cluster, "rollout", restart, 3.0)
    cluster.kubectl("-n", SYSTEM_NS, "rollout", "status", "daemonset/enforcer", "--timeout=120s", timeout=150)
    _check_load(cluster, "rollout", result, "rolling update")


async def test_deleting_the_enforcer_service_removes_its_protection(cluster: Cluster) -> None:
    """kubectl delete of the EnforcerService takes its redirect and its app-port block away; applying it again restores both."""
    cluster.kubectl("-n", APPS_NS, "delete", "esvc", "app")
    waited = await until("the redirect and the block gone", lambda: "dport 443" not in nft_table()
                         and "dport 8080" not in nft_table(), timeout=30)  # fmt: skip
    report("EnforcerService deleted -> rules gone", waited)
    assert refused(CLIENT_NETNS, NODE_IP, 443)  # nothing redirects :443 any more, nothing listens there
    connect(CLIENT_NETNS, NODE_IP, APP_PORT).close()  # the app's port is open (no request sent: nothing recorded)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(service_cr()))
    waited = await until("the redirect and the block back", lambda: "dport 443" in nft_table()
                         and "dport 8080" in nft_table(), timeout=30)  # fmt: skip
    report("EnforcerService re-applied -> rules back", waited)
    assert refused(CLIENT_NETNS, NODE_IP, APP_PORT)
    browser = await cluster.browser()
    assert cluster.is_login(await cluster.get(browser, "/after-reapply"))
    assert unauthenticated(cluster.seen()) == []


async def test_the_printed_removal_leaves_no_rules_and_no_blocked_port(cluster: Cluster) -> None:
    """The README's removal run as printed: the DaemonSet deleted in the foreground ends its pod, whose stop sees it being deleted and removes table inet enforcer; then the rest goes and the app port answers again."""
    assert "inet enforcer" in nft_tables()
    assert refused(CLIENT_NETNS, NODE_IP, APP_PORT)
    t = time.monotonic()
    cluster.printed(REMOVAL[0], timeout=180)
    report("README removal: DaemonSet deleted (foreground, --wait)", time.monotonic() - t)
    assert not cluster.pods(), "--wait returned before the pods were gone"
    tables = nft_tables()
    assert "inet enforcer" not in tables, tables
    stops = [f for f in flows() if f.get("method") == "STOP"]
    assert stops and stops[-1]["reason"] == "ports_unblocked", stops[-1:]
    assert f"DaemonSet {SYSTEM_NS}/enforcer being deleted" in stops[-1]["endpoint"], stops[-1]
    t = time.monotonic()
    for command in REMOVAL[1:]:
        cluster.printed(command, timeout=180)
    report("README removal: the rest (delete -k, namespace demo)", time.monotonic() - t)
    assert not product_crds(cluster.kubectl("get", "crd", "-o", "name").stdout)
    assert cluster.kubectl("get", "namespace", SYSTEM_NS, check=False).returncode != 0
    tables = nft_tables()
    assert "inet enforcer" not in tables, tables
    connect(CLIENT_NETNS, NODE_IP, APP_PORT).close()  # not blocked any more (no request sent: nothing recorded)
    assert refused(CLIENT_NETNS, NODE_IP, 443)  # nothing redirects :443 any more


async def test_the_shipped_source_accepts_a_cr_in_a_namespace_with_the_documented_role(cluster: Cluster) -> None:
    """After the removal, the README's install as printed brings the enforcer back; with the shipped definitions source (every namespace) and the per-namespace Secrets Role of the example overlay, the EnforcerService is accepted and served."""
    cluster.printed("kubectl create namespace demo")
    await install_as_printed(cluster)
    cluster.kubectl("apply", "-f", "-", input=custom_resources())
    with contextlib.suppress(AssertionError):  # a rejection comes within a second of the start
        await until("a verdict", lambda: cluster.condition("esvc", "app").get("status") == "False", timeout=10)
    await until("EnforcerService app Accepted", lambda: cluster.condition("esvc", "app").get("status") == "True",
                timeout=30)  # fmt: skip
    await until("the redirect of :443", lambda: "dport 443" in nft_table())
    browser = await cluster.browser()
    assert cluster.is_login(await cluster.get(browser, "/shipped-source"))


def test_the_default_socket_mark_passes_the_kubelets_rules(kube_node: Node) -> None:
    """A connection carrying the enforcer's default SO_MARK reaches a listener on the node's loopback despite kubelet's own nftables rules."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))  # a free port number (the machine's namespace; the node's is as empty)
        port = probe.getsockname()[1]
    listener = subprocess.Popen(
        ["ip", "netns", "exec", NODE_NETNS, sys.executable, "-c",
         f"import socket, time; s = socket.create_server(('127.0.0.1', {port})); print('ready', flush=True); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == b"ready"
        connect(NODE_NETNS, "127.0.0.1", port, timeout=3).close()  # without a mark: fine
        try:
            connect(NODE_NETNS, "127.0.0.1", port, mark=DEFAULT_MARK, timeout=3).close()
        except TimeoutError:
            pytest.fail(f"SO_MARK {DEFAULT_MARK:#x} has kubelet's KUBE-MARK-MASQ bit 0x4000: masqueraded, then dropped "
                        "by KUBE-FIREWALL ('block incoming localnet connections')")  # fmt: skip
    finally:
        listener.kill()
        listener.wait()
        if listener.stdout is not None:
            listener.stdout.close()


def test_every_cluster_command_the_readme_prints_was_run(request: pytest.FixtureRequest) -> None:
    """Each command of the README's Kubernetes section (but the few tests/test_manifests.py lists with what happens to them instead) was run as printed by this module."""
    module_tests = [i for i in request.session.items if isinstance(i, pytest.Function) and i.module is request.module]
    if len(module_tests) < len([n for n in dir(request.module) if n.startswith("test_")]):
        pytest.skip("only the whole module runs every printed command")
    missing_ = [c for c in readme_commands() if c not in RUN_ELSEWHERE and c not in PRINTED_RAN]
    assert missing_ == [], f"printed in the README, not run here: {missing_}"
