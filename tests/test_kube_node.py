"""A DaemonSet pod's node identity: tags from its Node's labels (read, persisted, watched) and
the stop that tells an uninstall (its DaemonSet gone) from an update or restart."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from enforcer.config import definitions
from enforcer.config import kubernetes as k8s
from enforcer.config import settings as settings_mod
from enforcer.config.issues import ConfigError
from enforcer.config.sources import DefinitionsManager, build_sources
from enforcer.flowlog import FlowLog
from enforcer.http.tls import make_listen_socket
from enforcer.net.ruleset import RedirectError, Ruleset
from enforcer.run.attach import HostAttachment, StopDecision
from enforcer.run.daemon import Daemon
from tests.harness.kube import ControlPlane, write_kubeconfig
from tests.harness.seed import SERVICE, SPEC

pytestmark = pytest.mark.timeout(2400)  # the cluster fixture may build or wait for the cluster first

ZONE = "topology.kubernetes.io/zone"


def _service(name: str, zone: str, exposed: int) -> dict[str, object]:
    """The seed service for the nodes of one zone."""
    return {**SERVICE, "name": name, "hosts": [f"{name}.example.com"], "OIDCCallbackURL": f"https://{name}.example.com",
            "exposedPort": exposed, "selectors": [[f"{ZONE}={zone}"]]}


DOCS = [_service("zone-a", "a", 8001), _service("zone-b", "b", 8002), SPEC]


def _config(tmp_path: Path, kubernetes: Mapping[str, object] | None, **more: object) -> Path:
    (tmp_path / "d.yaml").write_text(yaml.safe_dump_all(DOCS))
    cfg = tmp_path / "enforcer.yaml"
    data: dict[str, object] = {"tags": ["app=frontend"], "stateDir": "state", "logsDir": "logs",
                               "definitions": [{"file": "d.yaml"}], **more}
    if kubernetes is not None:
        data["kubernetes"] = dict(kubernetes)
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def _settings(tmp_path: Path, kubernetes: Mapping[str, object] | None, **more: object) -> settings_mod.Settings:
    return settings_mod.load_settings(_config(tmp_path, kubernetes, **more))


@pytest.fixture(autouse=True)
def _no_pod_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test states the pod's environment it needs."""
    for name in ("NODE_NAME", "POD_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)


# -- the mapping and its persistence ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "tags"),
    [
        ({}, ()),
        ({"kubernetes.io/hostname": "node-1"}, ("kubernetes.io/hostname=node-1",)),
        ({"node-role.kubernetes.io/control-plane": ""}, ("node-role.kubernetes.io/control-plane=",)),
        ({ZONE: "b", "app": "frontend"}, ("app=frontend", f"{ZONE}=b")),  # ordered by key
        ({"bad key": "x", "k=v": "x", "ok": "with space", "fine": "1"}, ("fine=1",)),  # never labels; left out
    ],
)
def test_each_node_label_becomes_one_key_value_tag(labels: dict[str, object], tags: tuple[str, ...]) -> None:
    """Every label key: value of the Node is the tag key=value, the full key with its prefix; nothing else is added."""
    assert k8s.label_tags(labels) == tags


def test_the_labels_persist_for_their_node_only(tmp_path: Path) -> None:
    """Saved labels load back for the same node (mode 0600); another node's file, a corrupt one or none give None."""
    path = tmp_path / "state" / k8s.NODE_LABELS_FILE
    assert k8s.load_labels(path, "node-1") is None
    k8s.save_labels(path, "node-1", {ZONE: "a"})
    loaded = k8s.load_labels(path, "node-1")
    assert loaded is not None and loaded[0] == {ZONE: "a"} and loaded[1].endswith("Z")
    assert path.stat().st_mode & 0o777 == 0o600
    assert k8s.load_labels(path, "node-2") is None
    path.write_text("{not json")
    assert k8s.load_labels(path, "node-1") is None


# -- the kubernetes: section ------------------------------------------------------------------------


def test_the_kubernetes_section_takes_the_pod_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nodeName and the DaemonSet's namespace come from NODE_NAME and POD_NAMESPACE; a relative kubeconfig is
    relative to the config's folder; without the section nothing of it applies."""
    monkeypatch.setenv("NODE_NAME", "node-1")
    monkeypatch.setenv("POD_NAMESPACE", "enforcer-system")
    kube = _settings(tmp_path, {"daemonSet": "enforcer", "kubeconfig": "kube.conf"}).model.kubernetes
    assert kube is not None
    assert (kube.nodeName, kube.namespace, kube.daemonSet, kube.nodeLabelTags, kube.timeout) == (
        "node-1", "enforcer-system", "enforcer", True, 4.0)
    assert kube.kubeconfig == tmp_path.resolve() / "kube.conf"
    given = _settings(tmp_path, {"nodeName": "node-9", "namespace": "other"}).model.kubernetes
    assert given is not None and (given.nodeName, given.namespace) == ("node-9", "other")
    assert _settings(tmp_path, None).model.kubernetes is None


@pytest.mark.parametrize(
    ("section", "env", "path", "needle"),
    [
        ({}, {}, "kubernetes.nodeName", "NODE_NAME"),  # tags from labels need a node name
        ({"daemonSet": "enforcer"}, {"NODE_NAME": "n"}, "kubernetes.namespace", "POD_NAMESPACE"),
        ({"daemonSet": "Enforcer_1"}, {"NODE_NAME": "n"}, "kubernetes.daemonSet", "object name"),
        ({"nodeName": "UPPER"}, {}, "kubernetes.nodeName", "object name"),
        ({"namespace": "a.b"}, {"NODE_NAME": "n"}, "kubernetes.namespace", "namespace name"),
        ({"timeout": "30s"}, {"NODE_NAME": "n"}, "kubernetes", "timeout must be between"),
        ({"nodeLabels": True}, {"NODE_NAME": "n"}, "kubernetes.nodeLabels", "nodeLabelTags"),  # did you mean
        ({}, {"NODE_NAME": "bad name"}, "kubernetes.nodeName", "downward API"),
    ],
)
def test_a_bad_kubernetes_section_names_the_key_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, section: dict[str, object], env: dict[str, str],
    path: str, needle: str,
) -> None:
    """Each problem of kubernetes: is a ConfigIssue at its key path with what to do."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        _settings(tmp_path, section)
    issues = [i for i in err.value.issues if i.path == path]
    assert issues, [str(i) for i in err.value.issues]
    assert any(needle in f"{i.message} {i.fix}" for i in issues), [str(i) for i in issues]


def test_without_label_tags_no_node_name_is_needed(tmp_path: Path) -> None:
    """nodeLabelTags: false with only a DaemonSet (and its namespace) is valid without NODE_NAME."""
    kube = _settings(tmp_path, {"nodeLabelTags": False, "daemonSet": "enforcer", "namespace": "ns"}).model.kubernetes
    assert kube is not None and kube.nodeName is None


def test_the_node_tags_join_the_configured_tags_once(tmp_path: Path) -> None:
    """Settings.tags is the configured tags, then the Node's, each once."""
    settings = _settings(tmp_path, None)
    assert settings.tags == ("app=frontend",)
    with_node = settings_mod.Settings(settings.path, settings.model, node_tags=("app=frontend", f"{ZONE}=a"))
    assert with_node.tags == ("app=frontend", f"{ZONE}=a")


# -- a label change re-resolves the set in force ----------------------------------------------------


@dataclass
class Applied:
    """Records each set the manager hands on; refuses them when told to."""

    sets: list[list[str]] = field(default_factory=list)
    refuse: bool = False

    async def __call__(self, defs: definitions.Definitions, reason: str) -> None:
        if self.refuse:
            raise RedirectError("refused")
        self.sets.append([s.name for s in defs.services])


async def test_new_tags_re_resolve_the_set_in_force(tmp_path: Path) -> None:
    """retag resolves the documents in force with the new tags and hands the new services on; a set the
    attachments refuse leaves the old one in force."""
    settings = _settings(tmp_path, None)
    settings = settings_mod.Settings(settings.path, settings.model, node_tags=(f"{ZONE}=a",))
    applied = Applied()
    async with aiohttp.ClientSession() as http:
        manager = DefinitionsManager(settings, build_sources(settings, http), on_change=applied)
        first = await manager.load_initial()
        assert [s.name for s in first.services] == ["zone-a"]
        b = settings_mod.Settings(settings.path, settings.model, node_tags=(f"{ZONE}=b",))
        assert await manager.retag(b, "labels changed") == "success"
        assert applied.sets == [["zone-b"]]
        assert manager.current is not None and [s.name for s in manager.current.services] == ["zone-b"]
        applied.refuse = True
        assert await manager.retag(settings, "labels changed") == "failed"
        assert [s.name for s in manager.current.services] == ["zone-b"]


# -- the stop: the attachment with a stop check (a fake redirector) -----------------------------------


@dataclass
class FakeRedirector:
    """Records the rulesets applied and the tables removed."""

    applied: list[Ruleset] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    async def apply(self, ruleset: Ruleset) -> None:
        self.applied.append(ruleset)

    async def remove(self, table: str) -> bool:
        self.removed.append(table)
        return True


def _flows(settings: settings_mod.Settings) -> list[dict[str, Any]]:
    path = settings.flow_log
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _resolved(settings: settings_mod.Settings) -> definitions.Definitions:
    parsed = definitions.parse_documents(yaml.safe_dump_all(DOCS), "d.yaml")
    assert isinstance(parsed, list)
    return definitions.resolve_definitions(parsed, (f"{ZONE}=a",))


def _verdict(uninstall: bool, short: str) -> Callable[[], Any]:
    async def check() -> StopDecision:
        return k8s.StopVerdict(uninstall, short, f"{short} (long)")
    return check


async def _failing_check() -> StopDecision:
    raise RuntimeError("the check broke")


@pytest.mark.parametrize(
    ("redirect", "check", "removed", "reason", "said"),
    [
        ({}, _verdict(True, "DaemonSet ns/enforcer deleted"), ["enforcer"], "ports_unblocked",
         "DaemonSet ns/enforcer deleted: table inet enforcer removed: exposed port(s) 8001"),
        ({}, _verdict(False, "DaemonSet ns/enforcer present"), [], "ports_blocked",
         "DaemonSet ns/enforcer present: table inet enforcer kept: exposed port(s) 8001"),
        ({}, _failing_check, [], "ports_blocked", "table inet enforcer kept"),  # fail closed
        ({"keepBlockOnStop": False}, _failing_check, ["enforcer"], "ports_unblocked", "table inet enforcer removed"),
    ],
)
async def test_a_stop_removes_the_table_only_when_the_check_says_uninstall(
    tmp_path: Path, redirect: dict[str, object], check: Callable[[], Any], removed: list[str], reason: str,
    said: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """With a stop check the table goes only on an uninstall (the flow record names the DaemonSet); present
    or a failing check keeps it; keepBlockOnStop: false removes it without asking."""
    settings = _settings(tmp_path, None, redirect={"enabled": True, **redirect})
    fake = FakeRedirector()
    host = HostAttachment(settings, listen_socket=make_listen_socket("127.0.0.1", 0), redirector=fake,
                          stop_check=check)
    try:
        await host.apply(_resolved(settings))
        with caplog.at_level(logging.WARNING):
            await host.remove()
        assert fake.removed == removed
        [flow] = _flows(settings)
        assert (flow["method"], flow["decision"], flow["reason"]) == ("STOP", "lifecycle", reason)
        assert said in flow["endpoint"]
    finally:
        host.close()


def _status(code: int, reason: str, name: str | None = "enforcer") -> str:
    details = {} if name is None else {"details": {"name": name, "group": "apps", "kind": "daemonsets"}}
    return json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code,
                       **details})


@pytest.mark.parametrize(
    ("status", "body", "uninstall", "said"),
    [
        (404, _status(404, "NotFound"), True, "deleted"),
        (401, _status(401, "Unauthorized", None), False, "credentials (HTTP 401)"),  # a token expired or rotated
        (401, _status(401, "Unauthorized"), False, "credentials (HTTP 401)"),  # even naming it
        (403, _status(403, "Forbidden"), True, "access revoked"),  # our RBAC removed: only an uninstall does
        (404, "404 page not found", False, "a proxy's answer"),  # not the API server
        (404, _status(404, "NotFound", "other"), False, "a proxy's answer"),  # not our DaemonSet
        (403, _status(403, "Forbidden", "other"), False, "a proxy's answer"),
        (404, _status(410, "NotFound"), False, "a proxy's answer"),  # code and status disagree
        (500, _status(500, "InternalError", None), False, "cannot ask"),
        (503, "", False, "cannot ask"),
        (200, json.dumps({"kind": "DaemonSet", "metadata": {"name": "enforcer"}}), False, "present"),
        (200, json.dumps({"kind": "DaemonSet", "metadata": {"name": "enforcer", "deletionTimestamp": "2026-01-01T00:00:00Z"}}),
         True, "being deleted"),
        (200, json.dumps({"kind": "Pod", "metadata": {"name": "enforcer", "deletionTimestamp": "x"}}), False,
         "not DaemonSet"),
        (200, "not json", False, "cannot ask"),
    ],
)
async def test_only_the_api_servers_own_answer_is_an_uninstall(
    tmp_path: Path, status: int, body: str, uninstall: bool, said: str,
) -> None:
    """A 404 or 403 means an uninstall only as the API server's Status naming our DaemonSet; a 401 and anything else keeps the table and says how to open the ports by hand."""
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(status=status, text=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        kubeconfig = tmp_path / "fake.conf"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "k", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        }))
        verdict = await k8s.stop_verdict("enforcer-system", "enforcer", kubeconfig, 2.0)
    finally:
        await runner.cleanup()
    assert seen == ["/apis/apps/v1/namespaces/enforcer-system/daemonsets/enforcer"]
    assert verdict.uninstall is uninstall, verdict
    assert said in f"{verdict.short} {verdict.why}"
    if not uninstall and "present" not in verdict.short:
        assert "nft delete table inet enforcer" in verdict.why and "--cascade=foreground" in verdict.why, verdict


@given(code=st.sampled_from([200, 401, 403, 404, 410, 500]),
       reason=st.sampled_from(["NotFound", "Unauthorized", "Forbidden", "Gone", "InternalError", None]),
       named=st.sampled_from(["enforcer", "other", None]), status_code=st.sampled_from([None, 0]))
def test_only_a_404_or_403_naming_the_daemonset_is_an_uninstall_refusal(
    code: int, reason: str | None, named: str | None, status_code: int | None
) -> None:
    """refusal() returns a reason exactly for the API server's 404 NotFound or 403 Forbidden Status naming our DaemonSet (its code agreeing with the HTTP status): never for a 401."""
    body: dict[str, object] = {"kind": "Status", "status": "Failure", "code": code if status_code is None else status_code}
    if reason is not None:
        body["reason"] = reason
    if named is not None:
        body["details"] = {"name": named, "kind": "daemonsets"}
    got = k8s.refusal(code, json.dumps(body), "enforcer")
    expected = (status_code is None and named == "enforcer"
                and (code, reason) in ((404, "NotFound"), (403, "Forbidden")))
    assert (got is not None) is expected, (code, reason, named, status_code, got)
    assert got in (None, reason)


def _affinity(*terms: list[dict[str, object]], fields: list[dict[str, object]] | None = None) -> dict[str, object]:
    built: list[dict[str, object]] = [{"matchExpressions": t} for t in terms]
    if fields is not None:
        built.append({"matchFields": fields})
    return {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": built}}}}


NODE_LABELS = {"pool": "web", "cores": "8", ZONE: "a"}


@pytest.mark.parametrize(("spec", "excluded"), [
    ({}, False),
    ({"nodeSelector": {"pool": "web"}}, False),
    ({"nodeSelector": {"pool": "db"}}, True),
    ({"nodeSelector": {"gpu": "yes"}}, True),
    (_affinity([{"key": "pool", "operator": "In", "values": ["web", "db"]}]), False),
    (_affinity([{"key": "pool", "operator": "In", "values": ["db"]}]), True),
    (_affinity([{"key": "pool", "operator": "NotIn", "values": ["web"]}]), True),
    (_affinity([{"key": "gpu", "operator": "NotIn", "values": ["yes"]}]), False),
    (_affinity([{"key": "gpu", "operator": "Exists"}]), True),
    (_affinity([{"key": "gpu", "operator": "DoesNotExist"}]), False),
    (_affinity([{"key": "cores", "operator": "Gt", "values": ["4"]}]), False),
    (_affinity([{"key": "cores", "operator": "Lt", "values": ["4"]}]), True),
    (_affinity([{"key": "cores", "operator": "Gt", "values": ["many"]}]), False),  # cannot be judged: kept
    (_affinity([{"key": "pool", "operator": "Near", "values": ["web"]}]), False),  # unknown operator: kept
    (_affinity([{"key": "pool", "operator": "In", "values": ["db"]}],  # OR of terms: the second selects it
               [{"key": ZONE, "operator": "In", "values": ["a"]}]), False),
    (_affinity([{"key": "pool", "operator": "In", "values": ["db"]}],
               [{"key": ZONE, "operator": "In", "values": ["b"]}]), True),
    (_affinity(fields=[{"key": "metadata.name", "operator": "In", "values": ["node-1"]}]), False),
    (_affinity(fields=[{"key": "metadata.name", "operator": "NotIn", "values": ["node-1"]}]), True),
    (_affinity([]), False),  # an empty term: not judged
])  # fmt: skip
def test_a_daemonset_excludes_a_node_only_when_its_selector_clearly_does(spec: dict[str, object], excluded: bool) -> None:
    """excluded_by says why the pod template no longer runs on the node only for a clear nodeSelector or required node affinity mismatch; anything it cannot judge counts as targeted (the rules are kept)."""
    assert (k8s.excluded_by(spec, "node-1", NODE_LABELS) is not None) is excluded


@given(labels=st.dictionaries(st.sampled_from("abcdef"), st.sampled_from(["1", "2"]), max_size=6),
       selector=st.dictionaries(st.sampled_from("abcdef"), st.sampled_from(["1", "2"]), max_size=3))
def test_a_node_selector_excludes_exactly_the_nodes_missing_one_of_its_labels(
    labels: dict[str, str], selector: dict[str, str]
) -> None:
    """A nodeSelector excludes a node iff one of its key=value pairs is not among the node's labels."""
    excluded = k8s.excluded_by({"nodeSelector": selector}, "n", labels) is not None
    assert excluded is (not selector.items() <= labels.items())


def test_the_daemon_asks_only_when_a_daemonset_is_configured(tmp_path: Path) -> None:
    """Daemon._stop_check is None without kubernetes.daemonSet, and a check with it."""
    assert Daemon(_settings(tmp_path, None))._stop_check() is None
    plain = _settings(tmp_path, {"nodeLabelTags": False})
    assert Daemon(plain)._stop_check() is None
    asking = _settings(tmp_path, {"nodeLabelTags": False, "daemonSet": "enforcer", "namespace": "ns"})
    assert Daemon(asking)._stop_check() is not None


# -- against a real API server (tests/harness/kube.py) ----------------------------------------------

_counter = iter(range(1, 1000))


def _unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_counter)}"


def _daemonset(name: str, ns: str, finalizer: bool = False) -> str:
    meta: dict[str, object] = {"name": name, "namespace": ns}
    if finalizer:
        meta["finalizers"] = ["enforcer.dev/test"]
    labels = {"app.kubernetes.io/name": name}
    return yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta,
        "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
            "containers": [{"name": "c", "image": "localhost/none:0", "imagePullPolicy": "Never"}]}}},
    })


def _node(name: str, labels: Mapping[str, str]) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": dict(labels)}})


@pytest.fixture
def namespace(kube_api: ControlPlane) -> str:
    ns = _unique("knode")
    kube_api.kubectl("create", "namespace", ns)
    return ns


@pytest.mark.root
async def test_the_stop_verdict_against_a_real_api_server(kube_api: ControlPlane, namespace: str,
                                                          tmp_path: Path) -> None:
    """Absent (404) or being deleted is an uninstall, present an update; revoked access (403) an uninstall, but
    refused credentials (401: an expired or rotated token) keep the table, as an unreachable API server does within the time limit."""
    ns, name, admin = namespace, _unique("enforcer"), kube_api.kubeconfig

    async def verdict(kubeconfig: Path = admin, limit: float = 4.0) -> k8s.StopVerdict:
        return await k8s.stop_verdict(ns, name, kubeconfig, limit)

    gone = await verdict()
    assert gone.uninstall and gone.short == f"DaemonSet {ns}/{name} deleted"
    kube_api.kubectl("apply", "-f", "-", input=_daemonset(name, ns, finalizer=True))
    present = await verdict()
    assert not present.uninstall and "present" in present.short
    revoked = await verdict(write_kubeconfig(tmp_path / "bad.conf", server=kube_api.server, ca_file=kube_api.ca_file,
                                             token="not-a-token", user="nobody"))
    assert not revoked.uninstall and "401" in revoked.why and "fail closed" in revoked.why, revoked
    forbidden = await verdict(write_kubeconfig(tmp_path / "kcm.conf", server=kube_api.server,
                                               ca_file=kube_api.ca_file, token=kube_api.tokens["scheduler"],
                                               user="scheduler"))
    assert forbidden.uninstall and "403" in forbidden.why
    kube_api.kubectl("delete", "daemonset", name, "-n", ns, "--wait=false")
    deleting = await verdict()
    assert deleting.uninstall and "being deleted" in deleting.short
    kube_api.kubectl("patch", "daemonset", name, "-n", ns, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    unreachable = tmp_path / "down.conf"
    unreachable.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        # nothing of Kubernetes there: unroutable, or (in some sandboxes) a proxy that answers a bare 404
        "clusters": [{"name": "k", "cluster": {"server": "https://10.255.255.1:6443", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))
    for kubeconfig in (unreachable, _down_kubeconfig(tmp_path / "refused.conf")):
        started = time.monotonic()
        down = await verdict(kubeconfig, limit=1.5)
        assert not down.uninstall and "fail closed" in down.why, down
        assert time.monotonic() - started < 3.0


@pytest.mark.root
async def test_a_daemonset_that_leaves_the_node_is_an_uninstall_there(kube_api: ControlPlane, namespace: str) -> None:
    """Present with a nodeSelector this Node matches is an update; once the Node's label no longer matches (as the API server has it at the stop) it is an uninstall on that node; without a node name it stays an update."""
    ns, name, node = namespace, _unique("enforcer"), _unique("knode")
    kube_api.kubectl("apply", "-f", "-", input=_node(node, {"pool": "web"}))
    ds = yaml.safe_load(_daemonset(name, ns))
    ds["spec"]["template"]["spec"]["nodeSelector"] = {"pool": "web"}
    kube_api.kubectl("apply", "-f", "-", input=yaml.safe_dump(ds))
    try:
        targeted = await k8s.stop_verdict(ns, name, kube_api.kubeconfig, 4.0, node)
        assert not targeted.uninstall and "present" in targeted.short, targeted
        kube_api.kubectl("label", "node", node, "pool=db", "--overwrite")
        left = await k8s.stop_verdict(ns, name, kube_api.kubeconfig, 4.0, node)
        assert left.uninstall and left.short == f"DaemonSet {ns}/{name} left node {node}", left
        assert "nodeSelector pool=web" in left.why
        assert not (await k8s.stop_verdict(ns, name, kube_api.kubeconfig, 4.0)).uninstall
        unknown_node = await k8s.stop_verdict(ns, name, kube_api.kubeconfig, 4.0, _unique("nonode"))
        assert not unknown_node.uninstall  # a Node the API server does not have: kept
    finally:
        kube_api.kubectl("delete", "node", node, "--wait=false", check=False)


def _down_kubeconfig(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:9", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))
    return path


async def _until(what: str, check: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.mark.root
async def test_the_node_labels_are_read_persisted_and_watched(kube_api: ControlPlane, tmp_path: Path) -> None:
    """The Node's labels are read at start and persisted; a label change is handed on and persisted; with the
    API server down the persisted ones are used; with none ever, first() refuses."""
    node = _unique("knode")
    kube_api.kubectl("apply", "-f", "-", input=_node(node, {ZONE: "a"}))
    try:
        labels = k8s.NodeLabels(node, tmp_path / "state", kubeconfig=kube_api.kubeconfig)
        assert await labels.first() == "the API server"
        assert f"{ZONE}=a" in labels.tags
        seen: list[dict[str, str]] = []

        async def on_change(new: Mapping[str, str]) -> None:
            seen.append(dict(new))

        task = asyncio.create_task(labels.watch(on_change))
        try:
            await asyncio.sleep(0.5)
            kube_api.kubectl("label", "node", node, f"{ZONE}=b", "--overwrite")
            await _until("the label change", lambda: any(s.get(ZONE) == "b" for s in seen))
            assert labels.stats.lists == 1  # the watch started from the first read's resourceVersion
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        down = k8s.NodeLabels(node, tmp_path / "state", kubeconfig=_down_kubeconfig(tmp_path / "down.conf"),
                              timeout=1.0)
        assert "read at" in await down.first()
        assert f"{ZONE}=b" in down.tags
        never = k8s.NodeLabels(node, tmp_path / "elsewhere", kubeconfig=tmp_path / "down.conf", timeout=1.0)
        with pytest.raises(k8s.KubernetesError, match="none were ever read here"):
            await never.first()
    finally:
        kube_api.kubectl("delete", "node", node, "--wait=false")


class UnsignalledDaemon(Daemon):
    """The real daemon, minus the signal handlers (they belong to pytest here)."""

    def _install_signals(self, loop: asyncio.AbstractEventLoop, flowlog: FlowLog) -> None:
        return None


def _run(daemon: Daemon) -> tuple[asyncio.Future[None], asyncio.Task[int]]:
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    return ready, asyncio.get_running_loop().create_task(daemon.run(on_ready=ready))


async def _started(ready: asyncio.Future[None], task: asyncio.Task[int], timeout: float) -> None:
    either: set[asyncio.Future[Any]] = {ready, task}
    await asyncio.wait(either, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises why it did not start
    assert ready.done(), "the daemon did not start"


@pytest_asyncio.fixture
async def node_daemon(kube_api: ControlPlane, namespace: str, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Daemon, FakeRedirector, str, str]]:
    """A daemon on a Node labelled zone a, its DaemonSet present, the redirect through a fake redirector."""
    node, ds = _unique("knode"), _unique("enforcer")
    kube_api.kubectl("apply", "-f", "-", input=_node(node, {ZONE: "a"}) + "---\n" + _daemonset(ds, namespace))
    monkeypatch.setenv("NODE_NAME", node)
    monkeypatch.setenv("POD_NAMESPACE", namespace)
    settings = _settings(tmp_path, {"daemonSet": ds, "kubeconfig": str(kube_api.kubeconfig)},
                         redirect={"enabled": True}, admin={"address": "127.0.0.1", "port": 0},
                         sessions={"store": "memory"})
    fake = FakeRedirector()
    daemon = UnsignalledDaemon(settings, listen_socket=make_listen_socket("127.0.0.1", 0),
                               flowlog=FlowLog(settings.flow_log))
    daemon.attachments = [HostAttachment(settings, listen_socket=daemon.listen_socket, redirector=fake,
                                         stop_check=daemon._stop_check())]
    try:
        yield daemon, fake, node, ds
    finally:
        kube_api.kubectl("delete", "node", node, "--wait=false")


@pytest.mark.root
async def test_the_daemon_follows_its_node_labels_and_uninstalls_with_its_daemonset(
    node_daemon: tuple[Daemon, FakeRedirector, str, str], kube_api: ControlPlane, namespace: str,
) -> None:
    """The daemon serves the services its Node's labels select, re-resolves and re-redirects on a label change,
    and at a stop after its DaemonSet was deleted removes the table (PORTS_UNBLOCKED naming the DaemonSet)."""
    daemon, fake, node, ds = node_daemon
    ready, task = _run(daemon)
    await _started(ready, task, 20)
    try:
        assert daemon.manager.current is not None
        assert [s.name for s in daemon.manager.current.services] == ["zone-a"]
        assert "8001" in fake.applied[-1].render_nft() and "8002" not in fake.applied[-1].render_nft()
        kube_api.kubectl("label", "node", node, f"{ZONE}=b", "--overwrite")
        await _until("the zone b service", lambda: daemon.manager.current is not None
                     and [s.name for s in daemon.manager.current.services] == ["zone-b"])
        assert "8002" in fake.applied[-1].render_nft() and "8001" not in fake.applied[-1].render_nft()
        assert f"{ZONE}=b" in daemon.settings.tags
        kube_api.kubectl("delete", "daemonset", ds, "-n", namespace)
    finally:
        daemon.stop()
        code = await asyncio.wait_for(task, 30)
    assert code == 0
    assert fake.removed == ["enforcer"]
    stops = [f for f in _flows(daemon.settings) if f["method"] == "STOP"]
    assert [f["reason"] for f in stops] == ["ports_unblocked"]
    assert f"DaemonSet {namespace}/{ds} deleted" in stops[0]["endpoint"]


async def test_no_labels_ever_means_no_serving_and_no_redirect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """With the API server down and no labels ever read, the daemon does not start serving, installs no
    redirect and says why (in its log, and on /readyz while /healthz stays alive so a liveness probe does
    not restart it); with labels persisted from an earlier start it serves their services."""
    monkeypatch.setenv("NODE_NAME", "node-1")
    settings = _settings(tmp_path, {"kubeconfig": str(_down_kubeconfig(tmp_path / "down.conf")), "timeout": "1s"},
                         redirect={"enabled": True}, admin={"address": "127.0.0.1", "port": 0},
                         sessions={"store": "memory"})
    fake = FakeRedirector()
    daemon = UnsignalledDaemon(settings, listen_socket=make_listen_socket("127.0.0.1", 0),
                               flowlog=FlowLog(None, stream=io.StringIO()))
    daemon.attachments = [HostAttachment(settings, listen_socket=daemon.listen_socket, redirector=fake)]
    ready, task = _run(daemon)
    await asyncio.sleep(4)
    assert not ready.done() and not task.done() and fake.applied == []
    assert "none were ever read here" in caplog.text and "not serving until the labels are known" in caplog.text
    assert daemon.admin_port
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{daemon.admin_port}/healthz") as r:
            assert r.status == 200
        async with http.get(f"http://127.0.0.1:{daemon.admin_port}/readyz") as r:
            assert r.status == 503
            why = (await r.json())["problems"]["start-up"]
            assert why.startswith("waiting for the labels of Node node-1:") and "none were ever read here" in why
        async with http.post(f"http://127.0.0.1:{daemon.admin_port}/reload") as r:
            assert r.status == 503 and (await r.json())["outcome"] == "starting"
    k8s.save_labels(settings.state_dir / k8s.NODE_LABELS_FILE, "node-1", {ZONE: "b"})
    await _started(ready, task, 40)
    try:
        assert daemon.manager.current is not None and [s.name for s in daemon.manager.current.services] == ["zone-b"]
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 30)
