"""Definitions from Kubernetes custom resources: the CR → document mapping, per-CR judging, the
status condition, the source's config, and list/watch against a real API server."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from enforcer.config import kubernetes as k8s
from enforcer.config import settings as settings_mod
from enforcer.config.issues import ConfigError, ConfigIssue
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


def test_the_client_is_imported_only_when_the_source_connects() -> None:
    """Importing the daemon and the config, even building a kubernetes source, loads no Kubernetes client."""
    code = (
        "import sys, enforcer.run.daemon, enforcer.config.sources, enforcer.config.kubernetes as k;"
        "k.KubernetesSource();"
        "print(any(m.startswith('kubernetes_asyncio') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
