"""Definitions from Kubernetes custom resources: the CR → document mapping, per-CR judging, the
status condition, the source's config, and list/watch against a real API server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from aiohttp import web

from enforcer.config import definitions
from enforcer.config import kubernetes as k8s
from enforcer.config import settings as settings_mod
from enforcer.config.definitions import RawDocument
from enforcer.config.issues import ConfigError, ConfigIssue
from enforcer.config.sources import LKG_NAME, LKG_SOURCE_MARK, DefinitionsManager, WatchingSource, build_sources
from enforcer.flowlog import FlowLog
from enforcer.http.tls import make_listen_socket
from enforcer.run.daemon import Daemon
from tests.harness.kube import ControlPlane, Proc
from tests.harness.seed import SERVICE, SPEC

NS = "default"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def service_cr(name: str = "private-app", ns: str = NS, created: str = "2024-01-01T00:00:00Z", **spec: Any) -> dict[str, Any]:
    """An EnforcerService as the API server returns it: the seed service's fields in spec."""
    base = {k: v for k, v in SERVICE.items() if k not in ("kind", "name")}
    base["OIDCClientSecret"] = {"secretKeyRef": {"name": "oidc", "key": "clientSecret"}}
    base.update(spec)
    return {
        "apiVersion": k8s.API_VERSION, "kind": "EnforcerService",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": created, "generation": 1, "uid": "u-" + name},
        "spec": base,
    }


def spec_cr(name: str = "nginx", ns: str = NS, created: str = "2024-01-01T00:00:00Z", **spec: Any) -> dict[str, Any]:
    """An HTTPResourceSpec as the API server returns it."""
    base = {k: v for k, v in SPEC.items() if k not in ("kind", "name")}
    base.update(spec)
    return {
        "apiVersion": k8s.API_VERSION, "kind": "HTTPResourceSpec",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": created, "generation": 1},
        "spec": base,
    }


SECRETS: dict[tuple[str, str], k8s.SecretState] = {(NS, "oidc"): {"clientSecret": _b64("s3cret\n")}}
SVC, HRS = k8s.KIND_BY_NAME["EnforcerService"], k8s.KIND_BY_NAME["HTTPResourceSpec"]


def _render(*objs: dict[str, Any], secrets: Mapping[tuple[str, str], k8s.SecretState] = SECRETS) -> list[k8s.Rendered]:
    return [k8s.render(k8s.KIND_BY_NAME[o["kind"]], o, secrets) for o in objs]


# -- the mapping ----------------------------------------------------------------------------------


def test_a_service_cr_becomes_a_service_document_named_after_the_cr() -> None:
    """An EnforcerService maps to kind service, name = metadata.name, spec fields, the Secret's value."""
    (r,) = _render(service_cr())
    assert r.problem is None and r.data is not None
    assert r.data["kind"] == "service" and r.data["name"] == "private-app"
    assert r.data["OIDCClientSecret"] == "s3cret"
    assert r.data["hosts"] == ["app.example.com"]
    assert str(r.key) == "EnforcerService default/private-app"
    doc = k8s._doc(r.key, r.data)
    assert doc.where == "EnforcerService default/private-app"


def test_a_spec_cr_becomes_an_httpresourcespec_document() -> None:
    """An HTTPResourceSpec maps to kind httpresourcespec with its endpoints."""
    (r,) = _render(spec_cr())
    assert r.data is not None and r.data["kind"] == "httpresourcespec" and r.data["name"] == "nginx"
    assert r.data["endpoints"] == SPEC["endpoints"]


@pytest.mark.parametrize(
    ("spec", "secrets", "reason", "needle"),
    [
        ({"OIDCClientSecret": "inline"}, SECRETS, k8s.Verdicts.INVALID, "secretKeyRef"),
        ({"OIDCClientSecret": {"secretKeyRef": {"name": "oidc"}}}, SECRETS, k8s.Verdicts.INVALID, "secretKeyRef"),
        ({}, {}, k8s.Verdicts.SECRET_NOT_FOUND, "Secret default/oidc does not exist"),
        ({}, {(NS, "oidc"): {"other": _b64("x")}}, k8s.Verdicts.SECRET_NOT_FOUND, "no key 'clientSecret'"),
        ({}, {(NS, "oidc"): {"clientSecret": _b64(" ")}}, k8s.Verdicts.SECRET_NOT_FOUND, "empty"),
        ({}, k8s.SecretView({}, frozenset({NS})), k8s.Verdicts.SECRET_FORBIDDEN, "may not read Secrets"),
        ({}, k8s.SecretView(SECRETS, frozenset({None})), k8s.Verdicts.SECRET_FORBIDDEN, "may not read Secrets"),
        ({"name": "other"}, SECRETS, k8s.Verdicts.INVALID, "spec.name: not allowed"),
    ],
)
def test_a_cr_whose_secret_cannot_be_had_gets_a_reason_of_its_own(
    spec: dict[str, Any], secrets: Mapping[tuple[str, str], k8s.SecretState], reason: str, needle: str
) -> None:
    """Inline or malformed secrets, a missing Secret or key, and a forbidden namespace each have a reason."""
    obj = service_cr()
    obj["spec"].update(spec)
    (r,) = _render(obj, secrets=secrets)
    assert r.data is None and r.problem is not None
    assert (r.problem.reason, r.problem.accepted) == (reason, False)
    assert needle in r.problem.message


def test_a_cr_without_spec_is_invalid() -> None:
    """A custom resource with no spec is rejected with the key path spec."""
    obj = service_cr()
    del obj["spec"]
    (r,) = _render(obj)
    assert r.problem is not None and r.problem.message.startswith("spec:")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("service[a].hosts", "spec.hosts"),
        ("service[a].endpoints[0].URI", "spec.endpoints[0].URI"),
        ("httpresourcespec[b].endpoints[0].methods", "spec.endpoints[0].methods"),
        ("service[a].name", "metadata.name"),
        ("", "spec"),
        ("kind", "kind"),
    ],
)
def test_issue_paths_are_spelled_as_in_the_custom_resource(path: str, expected: str) -> None:
    """A ConfigIssue's key path is told in the CR's terms (spec.x, metadata.name)."""
    assert k8s.spec_path(ConfigIssue("x", path, "m")) == expected


# -- judging --------------------------------------------------------------------------------------

validate = k8s.validator()


def _names(docs: list[k8s.CRDocument]) -> list[str]:
    return [d.source for d in docs]


def test_a_valid_set_is_accepted_whole() -> None:
    """Every CR of a valid set is in force and accepted."""
    docs, verdicts = k8s.judge(_render(service_cr(), spec_cr()), {}, validate)
    assert sorted(_names(docs)) == ["EnforcerService default/private-app", "HTTPResourceSpec default/nginx"]
    assert all(v == k8s.ACCEPTED for v in verdicts.values())


def test_an_invalid_new_cr_is_left_out_and_the_rest_applies() -> None:
    """A new invalid CR is excluded with its key path; the other CRs still apply."""
    bad = service_cr("broken", hosts=["other.example.com"], port=0, OIDCCallbackURL="https://other.example.com")
    docs, verdicts = k8s.judge(_render(service_cr(), spec_cr(), bad), {}, validate)
    assert "EnforcerService default/broken" not in _names(docs)
    assert len(docs) == 2
    v = verdicts[k8s.CRKey("EnforcerService", NS, "broken")]
    assert (v.accepted, v.reason) == (False, "Invalid")
    assert "spec.port" in v.message
    assert verdicts[k8s.CRKey("EnforcerService", NS, "private-app")].accepted


def test_an_invalid_change_keeps_the_last_accepted_version() -> None:
    """A changed CR that is invalid is rejected and its last accepted version stays in force."""
    good = _render(service_cr(), spec_cr())
    docs, _ = k8s.judge(good, {}, validate)
    accepted = {r.key: r.data for r in good if r.data is not None}
    changed = _render(service_cr(OIDCCallbackURL="http://app.example.com"), spec_cr())
    docs, verdicts = k8s.judge(changed, accepted, validate)
    svc = next(d for d in docs if d.source.startswith("EnforcerService"))
    assert isinstance(svc.data, dict) and svc.data["OIDCCallbackURL"] == "https://app.example.com"
    v = verdicts[k8s.CRKey("EnforcerService", NS, "private-app")]
    assert not v.accepted and "spec.OIDCCallbackURL" in v.message


def test_a_secret_problem_keeps_the_last_accepted_version() -> None:
    """A CR whose Secret vanished keeps its accepted version in force and says SecretNotFound."""
    good = _render(service_cr(), spec_cr())
    accepted = {r.key: r.data for r in good if r.data is not None}
    docs, verdicts = k8s.judge(_render(service_cr(), spec_cr(), secrets={}), accepted, validate)
    assert len(docs) == 2
    assert verdicts[k8s.CRKey("EnforcerService", NS, "private-app")].reason == "SecretNotFound"


def test_a_duplicate_name_across_namespaces_is_blamed_on_the_later_cr() -> None:
    """Two EnforcerServices of one name in two namespaces: the later-created one is rejected."""
    first = service_cr(created="2024-01-01T00:00:00Z")
    later = service_cr(ns="team-b", created="2024-02-01T00:00:00Z", hosts=["b.example.com"],
                       OIDCCallbackURL="https://b.example.com")
    secrets = {**SECRETS, ("team-b", "oidc"): {"clientSecret": _b64("b")}}
    docs, verdicts = k8s.judge(_render(later, first, spec_cr(), secrets=secrets), {}, validate)
    assert "EnforcerService default/private-app" in _names(docs)
    v = verdicts[k8s.CRKey("EnforcerService", "team-b", "private-app")]
    assert not v.accepted and "metadata.name" in v.message and "duplicate" in v.message


def test_a_clash_reported_on_an_unchanged_cr_is_blamed_on_the_changed_one() -> None:
    """A changed CR taking an accepted CR's host is rejected although the issue names the other one."""
    a = service_cr("a", created="2024-01-01T00:00:00Z", hosts=["a.example.com"], OIDCCallbackURL="https://a.example.com")
    b = service_cr("b", created="2024-02-01T00:00:00Z", hosts=["b.example.com"], OIDCCallbackURL="https://b.example.com")
    start = _render(a, b, spec_cr())
    accepted = {r.key: r.data for r in start if r.data is not None}
    a2 = service_cr("a", created="2024-01-01T00:00:00Z", hosts=["a.example.com", "b.example.com"],
                    OIDCCallbackURL="https://a.example.com")
    docs, verdicts = k8s.judge(_render(a2, b, spec_cr()), accepted, validate)
    va = verdicts[k8s.CRKey("EnforcerService", NS, "a")]
    assert not va.accepted and "already served" in va.message
    assert verdicts[k8s.CRKey("EnforcerService", NS, "b")].accepted
    in_force = next(d for d in docs if d.source.endswith("/a"))
    assert isinstance(in_force.data, dict) and in_force.data["hosts"] == ["a.example.com"]


def test_a_service_matching_no_spec_is_accepted_with_a_warning_only() -> None:
    """exposedAPIs matching no HTTPResourceSpec is a warning in resolve_definitions, so the CR is accepted."""
    docs, verdicts = k8s.judge(_render(service_cr()), {}, validate)
    assert len(docs) == 1 and all(v.accepted for v in verdicts.values())


def test_hosts_are_judged_in_the_clusters_view_whatever_this_nodes_tags() -> None:
    """Two services on one host with different selectors clash for every enforcer (the verdicts converge)."""
    a = service_cr("a", created="2024-01-01T00:00:00Z", selectors=[["node=one"]])
    b = service_cr("b", created="2024-02-01T00:00:00Z", selectors=[["node=two"]])
    _, verdicts = k8s.judge(_render(a, b, spec_cr()), {}, validate)
    assert verdicts[k8s.CRKey("EnforcerService", NS, "a")].accepted
    assert not verdicts[k8s.CRKey("EnforcerService", NS, "b")].accepted


def test_a_deleted_cr_leaves_the_set() -> None:
    """A CR that is no longer listed is not in force, even with an accepted version."""
    start = _render(service_cr(), spec_cr())
    accepted = {r.key: r.data for r in start if r.data is not None}
    docs, verdicts = k8s.judge(_render(spec_cr()), accepted, validate)
    assert _names(docs) == ["HTTPResourceSpec default/nginx"] and len(verdicts) == 1


# -- status ---------------------------------------------------------------------------------------


def test_the_status_patch_is_written_only_when_it_differs() -> None:
    """A condition equal to the one there (lastTransitionTime aside) yields no patch."""
    obj = service_cr()
    patch = k8s.status_patch(obj, k8s.ACCEPTED, "2024-03-01T00:00:00Z")
    assert patch == {"status": {"conditions": [{
        "type": "Accepted", "status": "True", "reason": "Accepted", "message": "accepted",
        "observedGeneration": 1, "lastTransitionTime": "2024-03-01T00:00:00Z",
    }]}}
    obj["status"] = patch["status"]
    assert k8s.status_patch(obj, k8s.ACCEPTED, "2024-04-01T00:00:00Z") is None


def test_a_rejection_moves_the_transition_time_and_a_new_message_keeps_it() -> None:
    """lastTransitionTime changes with the status only, not with the message or generation."""
    obj = service_cr()
    obj["status"] = {"conditions": [{"type": "Accepted", "status": "False", "reason": "Invalid", "message": "one",
                                     "observedGeneration": 1, "lastTransitionTime": "T0"}]}
    p = k8s.status_patch(obj, k8s.Verdict(False, "Invalid", "two"), "T1")
    assert p is not None and p["status"]["conditions"][0]["lastTransitionTime"] == "T0"  # type: ignore[index]
    p = k8s.status_patch(obj, k8s.ACCEPTED, "T2")
    assert p is not None and p["status"]["conditions"][0]["lastTransitionTime"] == "T2"  # type: ignore[index]


def test_the_event_names_the_cr_and_the_reason() -> None:
    """A rejection Event is a Warning on the CR with the condition's reason and message."""
    key = k8s.CRKey("EnforcerService", NS, "private-app")
    body = k8s.event_body(key, service_cr(), k8s.Verdict(False, "Invalid", "spec.port: bad"), "T", "node1")
    assert body["involvedObject"] == {"apiVersion": "enforcer.dev/v1alpha1", "kind": "EnforcerService",
                                      "name": "private-app", "namespace": NS, "uid": "u-private-app",
                                      "resourceVersion": None}
    assert (body["type"], body["reason"], body["message"]) == ("Warning", "Invalid", "spec.port: bad")


def test_the_backoff_grows_with_jitter_and_is_bounded() -> None:
    """Reconnect delays double from 0.5 s with jitter, never above the cap (no storm, no starvation)."""
    b = k8s.Backoff(base=0.5, cap=30.0)
    delays = [b.next() for _ in range(12)]
    assert 0.25 <= delays[0] <= 0.5 and all(d <= 30.0 for d in delays) and delays[-1] >= 15.0
    b.reset()
    assert b.next() <= 0.5


# -- config ---------------------------------------------------------------------------------------


def _settings(tmp_path: Path, source: dict[str, Any]) -> settings_mod.Settings:
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(yaml.safe_dump({"tags": ["app=frontend"], "stateDir": "state", "definitions": [source]}))
    return settings_mod.load_settings(cfg)


def test_a_kubernetes_source_is_configured_with_namespaces_and_kubeconfig(tmp_path: Path) -> None:
    """``kubernetes: {namespaces, kubeconfig}`` loads, the kubeconfig relative to the config file."""
    s = _settings(tmp_path, {"kubernetes": {"namespaces": ["a", "b"], "kubeconfig": "kube.conf"}, "timeout": "5s"})
    src = s.model.definitions[0]
    assert src.kubernetes is not None and src.kubernetes.namespaces == ["a", "b"]
    assert src.kubernetes.kubeconfig == tmp_path / "kube.conf"
    assert _settings(tmp_path, {"kubernetes": {}}).model.definitions[0].kubernetes is not None


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ({"kubernetes": {}, "file": "x"}, "exactly one of"),
        ({"kubernetes": {"namespaces": ["Bad_NS"]}}, "not a namespace name"),
        ({"kubernetes": {"namespaces": ["a", "a"]}}, "twice"),
        ({"kubernetes": {"namespace": ["a"]}}, "did you mean 'namespaces'"),
    ],
)
def test_a_bad_kubernetes_source_is_a_config_error(tmp_path: Path, source: dict[str, Any], needle: str) -> None:
    """Two kinds at once, a bad or repeated namespace, a typo'd key: each a ConfigIssue."""
    with pytest.raises(ConfigError) as err:
        _settings(tmp_path, source)
    assert needle in str(err.value)


def test_several_workers_with_a_kubernetes_source_are_refused(tmp_path: Path) -> None:
    """listen.workers > 1 (the file's or --workers) with a kubernetes source is a config error naming the fix."""
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(yaml.safe_dump({"tags": ["a=b"], "stateDir": "state", "listen": {"workers": 2},
                                   "definitions": [{"file": "defs.yaml"}, {"kubernetes": {}}]}))
    with pytest.raises(ConfigError) as err:
        settings_mod.load_settings(cfg)
    (issue,) = err.value.issues
    assert (issue.path, issue.value) == ("listen.workers", 2) and "listen.workers: 1" in (issue.fix or "")
    one = _settings(tmp_path, {"kubernetes": {}})
    with pytest.raises(ConfigError, match="kubernetes: definitions source"):
        settings_mod.with_workers(one, 3)
    assert settings_mod.with_workers(one, 1).model.listen.workers == 1


def test_the_client_is_imported_only_when_the_source_connects() -> None:
    """Importing the daemon and the config, even building a kubernetes source, loads no Kubernetes client."""
    code = (
        "import sys, enforcer.run.daemon, enforcer.config.sources, enforcer.config.kubernetes as k;"
        "k.KubernetesSource();"
        "print(any(m.startswith('kubernetes_asyncio') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


async def test_the_api_server_down_at_start_means_the_last_known_good_set(tmp_path: Path) -> None:
    """With no API server, load_initial enforces the last-known-good set, or fails clearly without one."""
    kubeconfig = tmp_path / "kube.conf"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:9", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))
    settings = _settings(tmp_path, {"kubernetes": {"kubeconfig": str(kubeconfig)}, "timeout": "2s"})
    async with aiohttp.ClientSession() as http:
        manager = DefinitionsManager(settings, build_sources(settings, http))
        with pytest.raises(ConfigError, match="no last-known-good"):
            await manager.load_initial()
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        (settings.state_dir / LKG_NAME).write_text(yaml.safe_dump_all([{**SERVICE}, {**SPEC}]))
        manager = DefinitionsManager(settings, build_sources(settings, http))
        defs = await manager.load_initial()
        assert manager.using_lkg and [s.name for s in defs.services] == ["private-app"]


def test_the_last_known_good_file_names_each_source_and_stays_plain_yaml(tmp_path: Path) -> None:
    """Each saved document names its source in a comment: plain YAML to every reader, and the
    custom resources' versions (only theirs) read back by their identity."""
    settings = _settings(tmp_path, {"file": "defs.yaml"})
    manager = DefinitionsManager(settings, [])
    (r,) = _render(service_cr())
    assert r.data is not None
    docs = [RawDocument("/etc/enforcer/definitions/specs.yaml", 0, dict(SPEC)), k8s._doc(r.key, r.data)]
    manager._save_lkg(docs)
    text = manager.lkg_path.read_text()
    assert f"{LKG_SOURCE_MARK}EnforcerService default/private-app\n" in text
    parsed = definitions.parse_documents(text, "lkg")
    assert not isinstance(parsed, ConfigIssue) and [d.data for d in parsed] == [d.data for d in docs]
    assert k8s.accepted_from_lkg(manager.lkg_path) == {r.key: r.data}
    assert k8s.accepted_from_lkg(tmp_path / "missing") == {}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump_all([d.data for d in docs]))  # written before the names
    assert k8s.accepted_from_lkg(tmp_path / "old.yaml") == {}


# -- against a real API server (tests/harness/kube.py) ----------------------------------------------

CRDS = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: enforcerservices.enforcer.dev}
spec:
  group: enforcer.dev
  scope: Namespaced
  names: {kind: EnforcerService, plural: enforcerservices, singular: enforcerservice, shortNames: [esvc]}
  versions:
  - name: v1alpha1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Accepted, type: string, jsonPath: '.status.conditions[?(@.type=="Accepted")].status'}
    - {name: Reason, type: string, jsonPath: '.status.conditions[?(@.type=="Accepted")].reason'}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
          status: {type: object, x-kubernetes-preserve-unknown-fields: true}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: httpresourcespecs.enforcer.dev}
spec:
  group: enforcer.dev
  scope: Namespaced
  names: {kind: HTTPResourceSpec, plural: httpresourcespecs, singular: httpresourcespec, shortNames: [hrs]}
  versions:
  - name: v1alpha1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
          status: {type: object, x-kubernetes-preserve-unknown-fields: true}
"""
"""A lenient stand-in for deploy/kubernetes/base/crds.yaml (used until that file exists), so
that the enforcer's own validation is what these tests exercise."""

SHIPPED_CRDS = Path(__file__).resolve().parents[1] / "deploy/kubernetes/base/crds.yaml"


def _manifest(obj: dict[str, Any], ns: str) -> str:
    out = {**obj, "metadata": {"name": obj["metadata"]["name"], "namespace": ns}}
    return yaml.safe_dump(out)


def _secret(ns: str, value: str, name: str = "oidc") -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
                           "type": "Opaque", "stringData": {"clientSecret": value}})


@dataclass
class Watched:
    """A manager fed by a watching KubernetesSource on one fresh namespace of the real API server."""

    api: ControlPlane
    ns: str
    manager: DefinitionsManager
    source: k8s.KubernetesSource
    applied: list[definitions.Definitions]
    settings: settings_mod.Settings
    task: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        """Stop the watch, as when the enforcer stops."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def apply(self, text: str) -> None:
        self.api.kubectl("apply", "-f", "-", input=text)

    def condition(self, kind: str, name: str) -> dict[str, Any]:
        out = json.loads(self.api.kubectl("get", kind, name, "-n", self.ns, "-o", "json").stdout)
        conds = (out.get("status") or {}).get("conditions") or []
        return next((c for c in conds if c.get("type") == "Accepted"), {})

    def service(self, name: str = "private-app") -> definitions.Service | None:
        current = self.manager.current
        return current.get(name) if current is not None else None


async def _until(what: str, check: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


_counter = iter(range(1, 1000))


def _namespace_with_crs(kube_api: ControlPlane) -> str:
    """A fresh namespace holding a Secret, an HTTPResourceSpec and an EnforcerService (the CRDs installed)."""
    crds = SHIPPED_CRDS.read_text() if SHIPPED_CRDS.exists() else CRDS
    kube_api.kubectl("apply", "-f", "-", input=crds)
    kube_api.kubectl("wait", "--for=condition=established", "crd/enforcerservices.enforcer.dev",
                     "crd/httpresourcespecs.enforcer.dev", "--timeout=60s")
    ns = f"ksrc-{os.getpid()}-{next(_counter)}"
    kube_api.kubectl("create", "namespace", ns)
    kube_api.kubectl("apply", "-f", "-", input=_secret(ns, "first-secret") + "---\n" + _manifest(spec_cr(), ns)
                     + "---\n" + _manifest(service_cr(), ns))
    return ns


@pytest_asyncio.fixture
async def watched(kube_api: ControlPlane, tmp_path: Path) -> AsyncIterator[Watched]:
    """A fresh namespace with a Secret, an HTTPResourceSpec and an EnforcerService, and a running watch on it."""
    ns = _namespace_with_crs(kube_api)
    settings = _settings(tmp_path, {"kubernetes": {"namespaces": [ns], "kubeconfig": str(kube_api.kubeconfig)}})
    applied: list[definitions.Definitions] = []

    async def on_change(defs: definitions.Definitions, reason: str) -> None:
        applied.append(defs)

    async with aiohttp.ClientSession() as http:
        (source,) = build_sources(settings, http)
        assert isinstance(source, k8s.KubernetesSource) and isinstance(source, WatchingSource)
        manager = DefinitionsManager(settings, [source], on_change=on_change)
        await manager.load_initial()
        task = asyncio.create_task(source.watch(functools.partial(manager.push, origin=source.name), report=True))
        w = Watched(kube_api, ns, manager, source, applied, settings, task)
        try:
            yield w
        finally:
            await w.stop()


@pytest.mark.root
async def test_applied_crs_configure_the_manager_and_are_marked_accepted(watched: Watched) -> None:
    """CRs applied with kubectl become the manager's definitions (secret from the Secret) and get Accepted=True."""
    svc = watched.service()
    assert svc is not None and svc.client_secret == "first-secret" and svc.specs == ("nginx",)
    await _until("the Accepted condition", lambda: watched.condition("esvc", "private-app").get("status") == "True")
    cond = watched.condition("esvc", "private-app")
    assert (cond["reason"], cond["observedGeneration"]) == ("Accepted", 1)
    assert watched.condition("hrs", "nginx").get("status") == "True"
    printed = watched.api.kubectl("get", "esvc", "-n", watched.ns).stdout
    assert "ACCEPTED" in printed and "True" in printed


@pytest.mark.root
async def test_an_invalid_cr_is_rejected_with_an_event_and_the_previous_set_stays(watched: Watched) -> None:
    """A bad change gets Accepted=False with the key path and an Event, the old version stays; a fix is accepted."""
    ns = watched.ns
    await _until("accepted", lambda: watched.condition("esvc", "private-app").get("status") == "True")
    # valid for the CRD schema (https), invalid for the enforcer (not one of the hosts)
    watched.apply(_manifest(service_cr(OIDCCallbackURL="https://elsewhere.example.com"), ns)
                  + "---\n" + _manifest(service_cr("second", hosts=["two.example.com"],
                                                   OIDCCallbackURL="https://two.example.com"), ns))
    await _until("the rejection", lambda: watched.condition("esvc", "private-app").get("status") == "False")
    cond = watched.condition("esvc", "private-app")
    assert cond["reason"] == "Invalid" and "spec.OIDCCallbackURL" in cond["message"]
    assert cond["observedGeneration"] == 2
    await _until("the other CR applied", lambda: watched.service("second") is not None)
    svc = watched.service()
    assert svc is not None and svc.callback_url == "https://app.example.com/oauth2/callback"
    events = json.loads(watched.api.kubectl(
        "get", "events", "-n", ns, "--field-selector", "involvedObject.name=private-app", "-o", "json").stdout)
    assert any(e["reason"] == "Invalid" and "spec.OIDCCallbackURL" in e["message"] and e["type"] == "Warning"
               for e in events["items"])
    watched.apply(_manifest(service_cr(OIDCCallbackURL="https://app.example.com/"), ns))
    await _until("the fix", lambda: watched.condition("esvc", "private-app").get("status") == "True")
    await _until("the fixed version in force", lambda: (s := watched.service()) is not None
                 and s.callback_url == "https://app.example.com/oauth2/callback" and s.origin.endswith("example.com"))


@pytest.mark.root
async def test_deleting_a_cr_removes_its_service(watched: Watched) -> None:
    """kubectl delete of an EnforcerService takes its service out of the definitions."""
    assert watched.service() is not None
    watched.api.kubectl("delete", "esvc", "private-app", "-n", watched.ns)
    await _until("the service gone", lambda: watched.service() is None)


@pytest.mark.root
async def test_a_changed_secret_is_picked_up(watched: Watched) -> None:
    """A new value in the referenced Secret becomes the service's client secret; a vanished one keeps the old."""
    watched.apply(_secret(watched.ns, "second-secret"))
    await _until("the new secret", lambda: (s := watched.service()) is not None and s.client_secret == "second-secret")
    watched.api.kubectl("delete", "secret", "oidc", "-n", watched.ns)
    await _until("SecretNotFound", lambda: watched.condition("esvc", "private-app").get("reason") == "SecretNotFound")
    svc = watched.service()
    assert svc is not None and svc.client_secret == "second-secret"


@pytest.mark.root
async def test_a_restart_keeps_the_last_accepted_version_of_a_cr_invalid_by_then(watched: Watched) -> None:
    """Accepted v1, enforcer stopped, CR made invalid, enforcer started again: v1 is in force, Accepted=False."""
    await _until("accepted", lambda: watched.condition("esvc", "private-app").get("status") == "True")
    await watched.stop()
    watched.apply(_manifest(service_cr(OIDCCallbackURL="https://elsewhere.example.com"), watched.ns))
    async with aiohttp.ClientSession() as http:
        (source,) = build_sources(watched.settings, http)
        manager = DefinitionsManager(watched.settings, [source])
        restarted = Watched(watched.api, watched.ns, manager, source, [], watched.settings)
        await manager.load_initial()
        svc = restarted.service()
        assert svc is not None and svc.callback_url == "https://app.example.com/oauth2/callback"
        assert isinstance(source, WatchingSource)
        restarted.task = asyncio.create_task(source.watch(functools.partial(manager.push, origin=source.name)))
        try:
            await _until("the rejection", lambda: restarted.condition("esvc", "private-app").get("status") == "False")
            assert "spec.OIDCCallbackURL" in restarted.condition("esvc", "private-app")["message"]
            svc = restarted.service()
            assert svc is not None and svc.callback_url == "https://app.example.com/oauth2/callback"
        finally:
            await restarted.stop()


@pytest.mark.root
async def test_a_status_only_change_is_not_judged_again_and_the_reporter_restores_its_verdict(
    watched: Watched,
) -> None:
    """A status written by someone else (generation unchanged) wakes no judgement; the reporter
    puts its verdict back; a spec change is judged (the counter counts)."""
    await _until("accepted", lambda: watched.condition("esvc", "private-app").get("status") == "True")
    await asyncio.sleep(1.0)  # our own status writes' MODIFIED events have come (and judged nothing)
    judged, pushes = watched.source.stats.judgements, watched.source.stats.pushes
    forged = {"type": "Accepted", "status": "False", "reason": "Invalid", "message": "forged", "observedGeneration": 1,
              "lastTransitionTime": "2024-01-01T00:00:00Z"}
    watched.api.kubectl("patch", "esvc", "private-app", "-n", watched.ns, "--subresource=status", "--type=merge",
                        "-p", json.dumps({"status": {"conditions": [forged]}}))
    await _until("the verdict restored", lambda: watched.condition("esvc", "private-app").get("status") == "True")
    await asyncio.sleep(1.0)
    assert (watched.source.stats.judgements, watched.source.stats.pushes) == (judged, pushes)
    watched.apply(_manifest(service_cr(port=8081), watched.ns))
    await _until("a spec change judged", lambda: watched.source.stats.judgements > judged)


@dataclass
class Reporter:
    """One enforcer's KubernetesSource (a "node") watching with report=True, and its task."""

    source: k8s.KubernetesSource
    task: asyncio.Task[None]

    @property
    def holds(self) -> bool:
        return self.source.lease is not None and self.source.lease.held

    async def stop(self) -> None:
        """Stop it as a stopping enforcer does (the watch cancelled: it releases the Lease)."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@contextlib.asynccontextmanager
async def _reporters(kube_api: ControlPlane, ns: str, *names: str, duration: float) -> AsyncIterator[list[Reporter]]:
    """One watching, reporting source per name on the real API server, electing in ``ns``."""

    async def push(docs: Sequence[RawDocument]) -> str:
        return "success"

    out = []
    for name in names:
        source = k8s.KubernetesSource(namespaces=(ns,), kubeconfig=kube_api.kubeconfig, lease_namespace=ns,
                                      identity=name, lease_duration=duration)
        out.append(Reporter(source, asyncio.create_task(source.watch(push, report=True))))
    try:
        yield out
    finally:
        for r in out:
            await r.stop()


def _rejections(api: ControlPlane, ns: str, name: str) -> list[dict[str, Any]]:
    events = json.loads(api.kubectl("get", "events", "-n", ns, "--field-selector",
                                    f"involvedObject.name={name}", "-o", "json").stdout)
    return [e for e in events["items"] if e["reason"] == "Invalid"]


def _condition(api: ControlPlane, ns: str, kind: str, name: str) -> dict[str, Any]:
    out = json.loads(api.kubectl("get", kind, name, "-n", ns, "-o", "json").stdout)
    return next((c for c in (out.get("status") or {}).get("conditions") or [] if c.get("type") == "Accepted"), {})


@pytest.mark.root
async def test_two_enforcers_write_one_status_and_one_event_per_rejection(kube_api: ControlPlane) -> None:
    """Two nodes on one API server: one holds the Lease; a rejected CR gets one status patch and
    one Event in all, while both judge it and keep its last accepted version."""
    ns = _namespace_with_crs(kube_api)
    async with _reporters(kube_api, ns, "node-a", "node-b", duration=6.0) as nodes:
        await _until("one holder", lambda: sum(n.holds for n in nodes) == 1)
        await _until("accepted", lambda: _condition(kube_api, ns, "esvc", "private-app").get("status") == "True")
        await _until("both judged", lambda: all(n.source.stats.judgements for n in nodes))
        await asyncio.sleep(1.0)
        before = [(n.source.stats.status_writes, n.source.stats.events_created) for n in nodes]
        kube_api.kubectl("apply", "-f", "-", input=_manifest(
            service_cr(OIDCCallbackURL="https://elsewhere.example.com"), ns))
        await _until("the rejection", lambda: _condition(kube_api, ns, "esvc", "private-app").get("status") == "False")
        key = k8s.CRKey("EnforcerService", ns, "private-app")
        await _until("both judged it", lambda: all(
            key in n.source._verdicts and not n.source._verdicts[key][0].accepted for n in nodes))
        await asyncio.sleep(2.0)  # time for a second writer, if there were one
        writes = [n.source.stats.status_writes - b[0] for n, b in zip(nodes, before, strict=True)]
        events = [n.source.stats.events_created - b[1] for n, b in zip(nodes, before, strict=True)]
        assert sorted(writes) == [0, 1] and sorted(events) == [0, 1]
        assert len(_rejections(kube_api, ns, "private-app")) == 1
        holder = next(n for n in nodes if n.holds)
        assert holder.source.stats.status_writes - before[nodes.index(holder)][0] == 1
        assert sum(n.holds for n in nodes) == 1


@pytest.mark.root
async def test_when_the_holder_stops_the_other_takes_over_and_reports(kube_api: ControlPlane) -> None:
    """The holder stopping releases the Lease: the other node holds it within the lease duration
    and writes the next rejection's status and Event."""
    ns = _namespace_with_crs(kube_api)
    duration = 6.0
    async with _reporters(kube_api, ns, "node-a", "node-b", duration=duration) as nodes:
        await _until("one holder", lambda: sum(n.holds for n in nodes) == 1)
        await _until("accepted", lambda: _condition(kube_api, ns, "esvc", "private-app").get("status") == "True")
        holder, other = sorted(nodes, key=lambda n: not n.holds)
        await holder.stop()
        started = time.monotonic()
        await _until("taken over", lambda: other.holds, timeout=duration)
        took = time.monotonic() - started
        kube_api.kubectl("apply", "-f", "-", input=_manifest(
            service_cr(OIDCCallbackURL="https://elsewhere.example.com"), ns))
        await _until("the rejection", lambda: _condition(kube_api, ns, "esvc", "private-app").get("status") == "False")
        await _until("its Event", lambda: other.source.stats.events_created == 1)
        assert took < duration and len(_rejections(kube_api, ns, "private-app")) == 1


@pytest.mark.root
@pytest.mark.parametrize(
    ("version", "at_once"),
    [("0.0.1", True), (k8s.__version__, False), ("99.0.0", False), ("unknown", False)],
    ids=["older", "same", "newer", "unknown"],
)
async def test_a_lease_left_by_a_crashed_holder_is_taken_after_it_expires_or_at_once_from_an_older_version(
    kube_api: ControlPlane, version: str, at_once: bool,
) -> None:
    """A Lease its holder no longer renews is taken over once it has gone a lease duration
    unrenewed (by the taker's own clock), and at once when the holder runs an older version."""
    ns = f"klease-{os.getpid()}-{next(_counter)}"
    kube_api.kubectl("create", "namespace", ns)
    duration = 3.0
    kube_api.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": k8s.LEASE_NAME, "namespace": ns, "annotations": {k8s.VERSION_ANNOTATION: version}},
        "spec": {"holderIdentity": "crashed-node", "leaseDurationSeconds": int(duration),
                 "renewTime": "2024-01-01T00:00:00.000000Z"},  # its clock is not trusted: ours counts
    }))
    lease = k8s.StatusLease(ns, "node-b", duration=duration)
    api = await k8s.connect(kube_api.kubeconfig)
    started = time.monotonic()
    task = asyncio.create_task(lease.run(api, lambda: None))
    try:
        await _until("taken", lambda: lease.held, timeout=duration * 3)
        took = time.monotonic() - started
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await api.close()
    spec = json.loads(kube_api.kubectl("get", "lease", k8s.LEASE_NAME, "-n", ns, "-o", "json").stdout)["spec"]
    assert spec["holderIdentity"] == "node-b" and spec["leaseTransitions"] == 1
    if at_once:
        assert took < 1.0
    else:
        assert duration <= took <= duration * 4 / 3 + 1.0


@pytest.mark.parametrize(
    ("mine", "theirs", "expected"),
    [("0.2.0", "0.1.9", True), ("0.1.0", "0.1.0", False), ("0.1.0", "0.2.0", False), ("1.0.0rc1", "0.9.9", True),
     ("0.2.0", "", False), ("dev", "0.1.0", False)],
)
def test_only_a_strictly_newer_release_takes_the_lease_at_once(mine: str, theirs: str, expected: bool) -> None:
    """Versions compare by major.minor.patch; an unknown version never counts as older or newer."""
    assert k8s.newer(mine, theirs) is expected


def _restart_apiserver(api: ControlPlane) -> float:
    """Stop kube-apiserver and start it again with the same command line; returns the seconds it was down."""
    old = next(p for p in api.procs if p.name == "kube-apiserver")
    argv = list(old.popen.args)  # type: ignore[arg-type]
    started = time.monotonic()
    old.stop()
    time.sleep(3)
    with old.log.open("ab") as out:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    api.procs[api.procs.index(old)] = Proc("kube-apiserver", popen, old.log)
    api.wait_ready()
    return time.monotonic() - started


@pytest.mark.root
async def test_the_watch_resumes_after_an_api_server_restart_without_a_storm(watched: Watched) -> None:
    """After kube-apiserver restarts, the watch resumes (a change arrives) with a bounded number of reconnects."""
    before = dataclasses.replace(watched.source.stats)
    down = await asyncio.to_thread(_restart_apiserver, watched.api)
    watched.apply(_secret(watched.ns, "after-restart"))
    await _until("a change after the restart",
                 lambda: (s := watched.service()) is not None and s.client_secret == "after-restart", timeout=60)
    s = watched.source.stats
    streams = len(watched.source.streams)
    attempts = (s.watches - before.watches) + (s.lists - before.lists) + (s.errors - before.errors)
    print(f"API down {down:.1f}s: {streams} streams, {s.watches - before.watches} watches, "
          f"{s.lists - before.lists} lists, {s.errors - before.errors} errors")
    # jittered backoff from 0.5 s doubling: about log2(down/0.5)+2 tries per stream while it is down,
    # not one per millisecond (a failed try counts a watch start and an error: count starts only)
    starts = (s.watches - before.watches) + (s.lists - before.lists)
    assert starts <= streams * (math.log2(max(down, 0.5) / 0.5) + 4), attempts
    assert s.lists - before.lists <= streams  # resumed from its resourceVersion, re-listed at most once


class FakeAPI:
    """An in-process API server speaking the real list/watch wire format (JSON list, then
    newline-delimited watch events) for what a real one will not do on demand: 410 Gone, 500s."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bool, str]] = []  # (path, watch, resourceVersion)
        self.gone_once = True
        self.fail_lists = 0
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        watch = request.query.get("watch") in ("true", "True", "1")
        self.requests.append((request.path, watch, request.query.get("resourceVersion", "")))
        if not watch:
            if self.fail_lists > 0:
                self.fail_lists -= 1
                return web.json_response({"kind": "Status", "code": 500, "message": "etcd down"}, status=500)
            items = [service_cr()] if request.path.endswith("/enforcerservices") else []
            if request.path.endswith("/httpresourcespecs"):
                items = [spec_cr()]
            if request.path.endswith("/secrets"):
                items = [{"metadata": {"name": "oidc", "namespace": NS}, "data": {"clientSecret": _b64("fake")}}]
            return web.json_response({"kind": "List", "metadata": {"resourceVersion": "7"}, "items": items})
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        if self.gone_once and request.path.endswith("/enforcerservices"):
            self.gone_once = False
            event = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version"}}
            await resp.write(json.dumps(event).encode() + b"\n")
            return resp
        await resp.write(json.dumps({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "8"}}}).encode()
                         + b"\n")
        await asyncio.sleep(30)
        return resp

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "k", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        }))
        return path


@pytest_asyncio.fixture
async def fake_api() -> AsyncIterator[FakeAPI]:
    """A FakeAPI listening on loopback."""
    fake = FakeAPI()
    app = web.Application()
    app.router.add_get("/{tail:.*}", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.port = runner.addresses[0][1]
    try:
        yield fake
    finally:
        await runner.cleanup()


async def _watch_for(source: k8s.KubernetesSource, check: Callable[[], object], pushed: list[Sequence[RawDocument]],
                     timeout: float = 15.0) -> None:
    async def push(docs: Sequence[RawDocument]) -> str:
        pushed.append(docs)
        return "success"

    task = asyncio.create_task(source.watch(push, report=False))
    try:
        await _until("the watch", check, timeout)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_410_gone_watch_event_makes_the_source_list_again(fake_api: FakeAPI, tmp_path: Path) -> None:
    """An ERROR event with code 410 (resourceVersion too old) leads to a fresh list, then a watch from its version."""
    source = k8s.KubernetesSource(namespaces=(NS,), kubeconfig=fake_api.kubeconfig(tmp_path / "kc"))
    docs = await source.poll()
    assert docs is not None and len(docs) == 2
    pushed: list[Sequence[RawDocument]] = []
    esvc = f"/apis/{k8s.API_VERSION}/namespaces/{NS}/enforcerservices"
    await _watch_for(source, lambda: source.stats.gone == 1 and sum(
        1 for p, w, _ in fake_api.requests if p == esvc and w) >= 2 and pushed, pushed)
    calls = [(w, rv) for p, w, rv in fake_api.requests if p == esvc]
    assert calls[:4] == [(False, ""), (True, "7"), (False, ""), (True, "7")]


async def test_all_namespaces_reads_secrets_only_where_custom_resources_are(fake_api: FakeAPI, tmp_path: Path) -> None:
    """Watching every namespace, Secrets are listed and watched per namespace holding a custom resource, never cluster-wide (the RBAC grants Secrets per namespace with a Role)."""
    source = k8s.KubernetesSource(kubeconfig=fake_api.kubeconfig(tmp_path / "kc"))
    docs = await source.poll()
    assert docs is not None and len(docs) == 2
    assert [d.data.get("OIDCClientSecret") for d in docs if isinstance(d.data, dict) and d.data["kind"] == "service"] \
        == ["fake"]
    secrets_ns = f"/api/v1/namespaces/{NS}/secrets"
    pushed: list[Sequence[RawDocument]] = []
    await _watch_for(source, lambda: pushed and any(p == secrets_ns and w for p, w, _ in fake_api.requests), pushed)
    paths = {p for p, _, _ in fake_api.requests}
    assert secrets_ns in paths and "/api/v1/secrets" not in paths
    assert f"/apis/{k8s.API_VERSION}/enforcerservices" in paths  # the custom resources of every namespace


def test_secret_streams_follow_the_namespaces_holding_custom_resources() -> None:
    """A namespace gets a Secret stream when its first custom resource appears and loses it with its last one."""
    source = k8s.KubernetesSource()
    esvc = next(s for s in source.streams if s.resource == "EnforcerService")
    esvc.items = {("a", "x"): {}, ("b", "y"): {}}
    added, dropped = source._sync_secret_streams()
    assert [s.namespace for s in added] == ["a", "b"] and dropped == []
    assert source._sync_secret_streams() == ([], [])
    del esvc.items[("b", "y")]
    added, dropped = source._sync_secret_streams()
    assert added == [] and [s.namespace for s in dropped] == ["b"]
    assert sorted(str(s.namespace) for s in source.streams if s.resource == "Secret") == ["a"]


async def test_api_errors_back_off_instead_of_storming(fake_api: FakeAPI, tmp_path: Path) -> None:
    """A list answered 500 is retried with a growing, jittered delay: few requests, then it recovers."""
    source = k8s.KubernetesSource(namespaces=(NS,), kubeconfig=fake_api.kubeconfig(tmp_path / "kc"))
    fake_api.fail_lists = 3 * 4  # every stream's first four lists fail
    pushed: list[Sequence[RawDocument]] = []
    started = time.monotonic()
    await _watch_for(source, lambda: pushed, pushed, timeout=30)
    took = time.monotonic() - started
    lists = sum(1 for _, w, _ in fake_api.requests if not w)
    assert source.stats.errors >= 4 and lists <= 3 * 6
    assert took >= 0.25 + 0.5 + 1.0  # at least the jittered 0.5, 1, 2, 4 s backoff's lower bounds


async def test_the_first_push_after_starting_on_last_known_good_ends_that_state(
    fake_api: FakeAPI, tmp_path: Path
) -> None:
    """Started on the last-known-good set (API failing), the watch's first push, even of the same set, ends it."""
    settings = _settings(tmp_path, {"kubernetes": {"namespaces": [NS], "kubeconfig": str(
        fake_api.kubeconfig(tmp_path / "kc"))}, "timeout": "2s"})
    probe = k8s.KubernetesSource(namespaces=(NS,), kubeconfig=tmp_path / "kc")
    same = await probe.poll()
    assert same is not None
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    (settings.state_dir / LKG_NAME).write_text(yaml.safe_dump_all([d.data for d in same], sort_keys=False))
    fake_api.fail_lists = 1
    async with aiohttp.ClientSession() as http:
        (source,) = build_sources(settings, http)
        assert isinstance(source, k8s.KubernetesSource)
        manager = DefinitionsManager(settings, [source])
        await manager.load_initial()
        assert manager.using_lkg
        task = asyncio.create_task(source.watch(functools.partial(manager.push, origin=source.name), report=False))
        try:
            await _until("the last-known-good state ended", lambda: not manager.using_lkg)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Daemon(Daemon):
    """The real daemon, minus the signal handlers (they belong to pytest here)."""

    def _install_signals(self, loop: asyncio.AbstractEventLoop, flowlog: FlowLog) -> None:
        return None


async def test_readyz_fails_until_the_source_is_read_and_the_watch_is_in_the_metrics(
    fake_api: FakeAPI, tmp_path: Path
) -> None:
    """Started on last-known-good (API failing), /readyz is 503 naming the source until the watch has
    listed; /metrics counts the source's lists, watch starts, errors, verdicts and last sync time."""
    kubeconfig = fake_api.kubeconfig(tmp_path / "kc")
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(yaml.safe_dump({
        "tags": ["app=frontend"], "stateDir": str(tmp_path / "state"), "admin": {"address": "127.0.0.1", "port": 0},
        "sessions": {"store": "memory"}, "definitions": [{"kubernetes": {"namespaces": [NS], "kubeconfig": str(
            kubeconfig)}, "timeout": "2s"}],
    }))
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / LKG_NAME).write_text(yaml.safe_dump_all([SERVICE, SPEC]))
    fake_api.fail_lists = 1  # the start-up list
    daemon = _Daemon(settings_mod.load_settings(cfg), listen_socket=make_listen_socket("127.0.0.1", 0),
                     flowlog=FlowLog(None, stream=io.StringIO()))
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(daemon.run(on_ready=ready))
    await asyncio.wait({ready, task}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    assert ready.done() and daemon.manager.using_lkg
    source = daemon.manager.sources[0]
    admin = f"http://127.0.0.1:{daemon.admin_port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(admin + "/readyz") as r:
                before = r.status, (await r.json())["problems"]
            await _until("the watch has pushed", lambda: not daemon.manager.using_lkg)
            await _until("a 410 Gone handled", lambda: isinstance(source, k8s.KubernetesSource)
                         and source.stats.gone == 1 and source.stats.watches >= 4)
            async with http.get(admin + "/readyz") as r:
                after = (await r.json())["problems"]
            async with http.get(admin + "/metrics") as r:
                metrics = await r.text()
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 10)
    assert before[0] == 503
    assert "not read since start-up: kubernetes (default)" in before[1]["definitions"]
    assert "definitions" not in after
    name = 'source="kubernetes (default)"'
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in metrics.splitlines() if line.startswith("enforcer_kubernetes_")}
    assert values[f"enforcer_kubernetes_lists_total{{{name}}}"] >= 1 + 3 + 1  # start-up, 3 streams, after 410
    assert values[f"enforcer_kubernetes_watch_starts_total{{{name}}}"] >= 4
    assert values[f'enforcer_kubernetes_errors_total{{kind="api",{name}}}'] == 1
    assert values[f'enforcer_kubernetes_errors_total{{kind="gone",{name}}}'] == 1
    assert values[f'enforcer_kubernetes_custom_resources{{{name},verdict="accepted"}}'] == 2
    assert values[f'enforcer_kubernetes_custom_resources{{{name},verdict="rejected"}}'] == 0
    assert time.time() - 30 < values[f"enforcer_kubernetes_last_sync_timestamp_seconds{{{name}}}"] <= time.time()

