"""The Kubernetes manifests in deploy/kubernetes render, validate offline and grant exactly the agreed privileges.

`kubectl kustomize` renders the base and the example overlay; every rendered object validates
with kubernetes-validate (strict, against bundled Kubernetes schemas); the sample custom resources
and every example definition of the repository, in custom-resource form, validate against the
CRDs' own openAPIV3Schema; the CRD schemas mirror enforcer/config/definitions.py field by field;
the DaemonSet's privileges, host mounts and RBAC are pinned, so adding one fails a test here.
"""

from __future__ import annotations

import ast
import copy
import re
import shlex
import shutil
import subprocess
import typing
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from enforcer.cli.demo import BROWSER_SERVICE, DEFINITIONS
from enforcer.config.definitions import (
    ANY_SIGNED_IN,
    HTTP_METHODS,
    EndpointModel,
    HTTPResourceSpecModel,
    IdentityHeaders,
    ServiceModel,
    TLSOverride,
)
from enforcer.config.settings import DaemonModel
from enforcer.run.daemon import DRAIN_SECONDS
from tests.harness import seed
from tests.harness.manifests import RUN_ELSEWHERE, readme_commands
from tests.harness.prereq import missing

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "kubernetes"
BASE, OVERLAY = DEPLOY / "base", DEPLOY / "overlays" / "example"
KUBE_VERSIONS = ("1.25.0", "1.32.0")  # the oldest schemas kubernetes-validate bundles, and a current one
CR_KINDS = {"service": "EnforcerService", "httpresourcespec": "HTTPResourceSpec"}


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        missing("kubectl (kubectl kustomize renders the manifests)")
    return found


def render(path: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize PATH` prints."""
    done = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def one(objects: list[dict[str, Any]], kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    found = [
        o for o in objects
        if o["kind"] == kind and o["metadata"]["name"] == name and o["metadata"].get("namespace") == namespace
    ]
    assert len(found) == 1, f"{kind} {namespace}/{name}: {len(found)} found"
    return found[0]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(BASE)


@pytest.fixture(scope="module")
def overlay() -> list[dict[str, Any]]:
    return render(OVERLAY)


# ---------------------------------------------------------------- rendering and offline validation


def test_base_renders_the_product_objects(base: list[dict[str, Any]]) -> None:
    """The base renders the namespace, ServiceAccount, RBAC, both CRDs, the ConfigMap and the DaemonSet, namespaced in enforcer-system."""
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in base)
    assert kinds == sorted([
        ("Namespace", "enforcer-system"),
        ("ServiceAccount", "enforcer"),
        ("ClusterRole", "enforcer"),
        ("ClusterRoleBinding", "enforcer"),
        ("Role", "enforcer"),
        ("RoleBinding", "enforcer"),
        ("Role", "enforcer-secrets"),
        ("RoleBinding", "enforcer-secrets"),
        ("CustomResourceDefinition", "enforcerservices.enforcer.dev"),
        ("CustomResourceDefinition", "httpresourcespecs.enforcer.dev"),
        ("ConfigMap", "enforcer-config"),
        ("DaemonSet", "enforcer"),
    ])
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
    for o in base:
        assert o["metadata"].get("namespace") == (None if o["kind"] in cluster_scoped else "enforcer-system"), o


def test_overlay_changes_only_the_image_and_adds_the_secrets_role(
    base: list[dict[str, Any]], overlay: list[dict[str, Any]]
) -> None:
    """The example overlay keeps every base object as is but the DaemonSet's image, and adds only the Role (and its binding) that reads the demo namespace's Secrets."""
    def key(o: dict[str, Any]) -> tuple[str, str, str]:
        return (o["kind"], o["metadata"].get("namespace") or "", o["metadata"]["name"])

    by_key = {key(o): o for o in overlay}
    for o in base:
        got = copy.deepcopy(by_key.pop(key(o)))
        if o["kind"] == "DaemonSet":
            [container] = got["spec"]["template"]["spec"]["containers"]
            assert container["image"] == "registry.example.com/enforcer:0.1.0"
            container["image"] = o["spec"]["template"]["spec"]["containers"][0]["image"]
        assert got == o
    assert sorted(by_key) == sorted([
        ("Role", "demo", "enforcer-secrets"),
        ("RoleBinding", "demo", "enforcer-secrets"),
    ])


def test_overlay_owns_no_app_namespace_and_no_custom_resource(overlay: list[dict[str, Any]]) -> None:
    """The example overlay applies on a fresh cluster and deletes nothing of an app's: no Namespace but enforcer-system (`kubectl delete -k` would delete an app's namespace with everything in it), no Secret, and no custom resource (kubectl cannot map kind EnforcerService before the CRDs exist, kustomize#3074)."""
    assert [o["metadata"]["name"] for o in overlay if o["kind"] == "Namespace"] == ["enforcer-system"]
    assert [o for o in overlay if o["kind"] == "Secret"] == []
    assert [o["kind"] for o in overlay if o["apiVersion"].startswith("enforcer.dev/")] == []


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_rendered_object_validates_offline(overlay: list[dict[str, Any]], version: str) -> None:
    """Every built-in object of the overlay (which holds the base) passes kubernetes-validate --strict for that Kubernetes version."""
    checked = 0
    for o in overlay:
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{o['kind']} {o['metadata']['name']}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked == len(overlay)


# ---------------------------------------------------------------- the CRDs


def crd_schema(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [crd] = [o for o in objects if o["kind"] == "CustomResourceDefinition" and o["spec"]["names"]["kind"] == kind]
    [version] = crd["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as the API server applies it with strict field validation (what kubectl asks for by
    default): an object's unknown fields are refused. metadata is left open (the server's own)."""
    out = copy.deepcopy(schema)

    def walk(node: dict[str, Any], path: tuple[str, ...]) -> None:
        if node.get("type") == "object" and "properties" in node and path != ("metadata",):
            node["additionalProperties"] = False
        for name, sub in node.get("properties", {}).items():
            walk(sub, (*path, name))
        if "items" in node:
            walk(node["items"], (*path, "items"))

    walk(out, ())
    return out


def cr_problems(objects: list[dict[str, Any]], cr: dict[str, Any]) -> list[str]:
    """Why the CRD of ``cr``'s kind refuses it (empty: accepted)."""
    validator = jsonschema.Draft7Validator(strict(crd_schema(objects, cr["kind"])))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(cr)]


def test_crds_have_the_agreed_names_status_and_columns(base: list[dict[str, Any]]) -> None:
    """Both CRDs: group enforcer.dev, v1alpha1, namespaced, short names esvc/hrs, a status subresource and Accepted/Reason/Age columns."""
    for kind, plural, short in (("EnforcerService", "enforcerservices", "esvc"),
                                ("HTTPResourceSpec", "httpresourcespecs", "hrs")):
        crd = one(base, "CustomResourceDefinition", f"{plural}.enforcer.dev")
        spec = crd["spec"]
        assert (spec["group"], spec["scope"], spec["names"]["kind"], spec["names"]["shortNames"]) == (
            "enforcer.dev", "Namespaced", kind, [short])
        [version] = spec["versions"]
        assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
        assert version["subresources"] == {"status": {}}
        assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Accepted", "Reason", "Age"]
        text = yaml.safe_dump(crd)
        assert "x-kubernetes-preserve-unknown-fields" not in text and "x-kubernetes-validations" not in text


def _field_names(model: type[Any]) -> set[str]:
    return set(model.model_fields) - {"kind", "name"}


def _required(model: type[Any]) -> set[str]:
    return {n for n, f in model.model_fields.items() if f.is_required()} - {"kind", "name"}


@pytest.mark.parametrize(
    ("kind", "path", "model"),
    [
        ("EnforcerService", ("spec",), ServiceModel),
        ("EnforcerService", ("spec", "identityHeaders"), IdentityHeaders),
        ("EnforcerService", ("spec", "TLSCertificate"), TLSOverride),
        ("HTTPResourceSpec", ("spec",), HTTPResourceSpecModel),
        ("HTTPResourceSpec", ("spec", "endpoints", "items"), EndpointModel),
    ],
)
def test_crd_schema_mirrors_the_definitions_model(
    base: list[dict[str, Any]], kind: str, path: tuple[str, ...], model: type[Any]
) -> None:
    """Each object of the CRD schema has exactly the model's fields (minus kind and name) and requires exactly its required ones."""
    node = crd_schema(base, kind)
    for step in path:
        node = node[step] if step == "items" else node["properties"][step]
    assert set(node["properties"]) == _field_names(model)
    assert set(node.get("required", [])) == _required(model)


def test_crd_enums_mirror_the_model(base: list[dict[str, Any]]) -> None:
    """The schema's enums are the model's: the HTTP methods (and *), OIDCUserInfo, type and authorizationType."""
    svc = crd_schema(base, "EnforcerService")["properties"]["spec"]["properties"]
    for name in ("OIDCUserInfo", "type", "authorizationType"):
        literal = ServiceModel.model_fields[name].annotation
        assert set(svc[name]["enum"]) == set(typing.get_args(literal)), name
    endpoint = crd_schema(base, "HTTPResourceSpec")["properties"]["spec"]["properties"]["endpoints"]["items"]
    assert set(endpoint["properties"]["methods"]["items"]["enum"]) == HTTP_METHODS | {"*"}


def to_cr(definition: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    """A definition of a file (``kind: service`` ...) in custom-resource form: name → metadata.name, the
    client secret → a secretKeyRef, ``allowedScopes: any-signed-in-user`` → ``[[]]``."""
    spec = {k: v for k, v in definition.items() if k not in ("kind", "name")}
    if "OIDCClientSecret" in spec:
        spec["OIDCClientSecret"] = {"secretKeyRef": {"name": f"{definition['name']}-oidc", "key": "client-secret"}}
    for endpoint in spec.get("endpoints", []):
        if endpoint.get("allowedScopes") == ANY_SIGNED_IN:
            endpoint["allowedScopes"] = [[]]
    return {
        "apiVersion": "enforcer.dev/v1alpha1",
        "kind": CR_KINDS[definition["kind"]],
        "metadata": {"name": definition["name"], "namespace": namespace},
        "spec": spec,
    }


def _yaml_definitions(text: str) -> list[dict[str, Any]]:
    """The definitions in the ```yaml blocks of a page."""
    out = []
    for body in re.findall(r"^```yaml\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        out.extend(d for d in yaml.safe_load_all(body) if isinstance(d, dict) and d.get("kind") in CR_KINDS)
    return out


def example_definitions() -> list[tuple[str, dict[str, Any]]]:
    """Every example definition of the repository: the README's and docs' YAML, the demo's, the seed objects."""
    found: list[tuple[str, dict[str, Any]]] = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        found += [(page.name, d) for d in _yaml_definitions(page.read_text(encoding="utf-8"))]
    demo = (DEFINITIONS + BROWSER_SERVICE).format(
        secret_file="/s", issuer="https://localhost:9443", origin="https://app.demo", host="app.demo",
        app_port=8080, exposed=443,
    )
    found += [("demo", d) for d in yaml.safe_load_all(demo) if d]
    found += [("seed", dict(seed.SERVICE)), ("seed", dict(seed.SPEC))]
    return found


EXAMPLES = example_definitions()


def test_the_examples_are_found() -> None:
    """The scan finds the README's two objects, the demo's three and the seed's two (it is not vacuous)."""
    where = sorted(w for w, _ in EXAMPLES)
    assert where.count("README.md") >= 2 and where.count("demo") == 3 and where.count("seed") == 2, where


@pytest.mark.parametrize(("where", "definition"), EXAMPLES, ids=[f"{w}:{d['kind']}:{d['name']}" for w, d in EXAMPLES])
def test_crd_accepts_every_example_definition(
    base: list[dict[str, Any]], where: str, definition: dict[str, Any]
) -> None:
    """Each example definition of the repository, in custom-resource form, is accepted by its CRD's schema."""
    assert cr_problems(base, to_cr(definition)) == []


def printed_custom_resources() -> list[dict[str, Any]]:
    """The custom resources the README and docs/ print in ```yaml blocks."""
    out = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for body in re.findall(r"^```yaml\n(.*?)^```", page.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL):
            out += [d for d in yaml.safe_load_all(body) if isinstance(d, dict) and d.get("apiVersion", "").startswith("enforcer.dev/")]
    return out


DEMO = OVERLAY / "demo.yaml"
"""The example's sample custom resources (applied after the overlay: README "Run it on Kubernetes")."""


def test_crd_accepts_the_sample_and_printed_custom_resources(overlay: list[dict[str, Any]]) -> None:
    """The example's sample EnforcerService and HTTPResourceSpec (demo.yaml), and every custom resource the README and docs print, are accepted by the CRDs' schemas."""
    samples = [o for o in yaml.safe_load_all(DEMO.read_text(encoding="utf-8")) if o]
    assert all(o["metadata"]["namespace"] == "demo" for o in samples)
    assert sorted(o["kind"] for o in samples) == ["EnforcerService", "HTTPResourceSpec"]
    printed = printed_custom_resources()
    assert printed, "the README prints an EnforcerService"
    for cr in samples + printed:
        assert cr_problems(overlay, cr) == [], cr["kind"]


SERVICE_CR = to_cr(dict(seed.SERVICE))
SPEC_CR = to_cr(dict(seed.SPEC))


def _changed(cr: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``cr`` with ``path`` (dots; ``-`` deletes) set to ``value``; ``+key`` renames the last key to ``key``."""
    out = copy.deepcopy(cr)
    *parents, last = path.split(".")
    node: Any = out
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if value == "-":
        del node[last]
    elif isinstance(value, str) and value.startswith("+"):
        node[value[1:]] = node.pop(last)
    else:
        node[int(last) if last.isdigit() else last] = value
    return out


REJECTED = [
    ("typo'd required key", SERVICE_CR, "spec.OIDCClientID", "+OIDCClientId"),
    ("typo'd optional key", SERVICE_CR, "spec.exposedPort", "+exposedPorts"),
    ("typo'd endpoint key", SPEC_CR, "spec.endpoints.0.methods", "+method"),
    ("typo'd secretKeyRef key", SERVICE_CR, "spec.OIDCClientSecret.secretKeyRef.key", "+keys"),
    ("inline secret", SERVICE_CR, "spec.OIDCClientSecret", "qcnc1ZFABmwmFwFZD"),
    ("secret from a file", SERVICE_CR, "spec.OIDCClientSecret", {"file": "/etc/enforcer/secrets/x"}),
    ("method typo", SPEC_CR, "spec.endpoints.0.methods", ["PSOT"]),
    ("no methods", SPEC_CR, "spec.endpoints.0.methods", []),
    ("no endpoints", SPEC_CR, "spec.endpoints", []),
    ("URI not a path", SPEC_CR, "spec.endpoints.0.URI", "api/*"),
    ("allowedScopes as a string", SPEC_CR, "spec.endpoints.0.allowedScopes", ANY_SIGNED_IN),
    ("tag without =", SPEC_CR, "spec.associatedTags", ["frontend"]),
    ("port out of range", SERVICE_CR, "spec.port", 70000),
    ("port as a string", SERVICE_CR, "spec.port", "eighty"),
    ("no hosts", SERVICE_CR, "spec.hosts", []),
    ("host with a space", SERVICE_CR, "spec.hosts", ["app example.com"]),
    ("http callback", SERVICE_CR, "spec.OIDCCallbackURL", "http://app.example.com"),
    ("unknown userinfo mode", SERVICE_CR, "spec.OIDCUserInfo", "sometimes"),
    ("type not HTTP", SERVICE_CR, "spec.type", "TCP"),
    ("header name with _", SERVICE_CR, "spec.identityHeaders", {"user": "X_User"}),
    ("service name not a DNS label", SERVICE_CR, "metadata.name", "Private.App"),
    ("no spec", SERVICE_CR, "spec", "-"),
]


@pytest.mark.parametrize(("what", "cr", "path", "value"), REJECTED, ids=[r[0] for r in REJECTED])
def test_crd_rejects_a_bad_custom_resource(
    base: list[dict[str, Any]], what: str, cr: dict[str, Any], path: str, value: Any
) -> None:
    """A custom resource with a typo'd field or a value the model refuses is refused by the CRD schema."""
    assert cr_problems(base, cr) == []
    assert cr_problems(base, _changed(cr, path, value)), what


# ---------------------------------------------------------------- the DaemonSet and its privileges


def pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, "DaemonSet", "enforcer", "enforcer-system")["spec"]["template"]["spec"]
    return spec


AGREED_SECURITY_CONTEXT = {
    "runAsUser": 0,
    "runAsGroup": 0,
    "privileged": False,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_BIND_SERVICE"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def test_container_security_context_is_exactly_the_agreed_one(base: list[dict[str, Any]]) -> None:
    """The enforcer container runs as uid 0 with only NET_ADMIN and NET_BIND_SERVICE, no escalation, a read-only root and RuntimeDefault seccomp: nothing more."""
    spec = pod(base)
    [container] = spec["containers"]
    assert container["securityContext"] == AGREED_SECURITY_CONTEXT
    assert spec["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    assert "initContainers" not in spec and "ephemeralContainers" not in spec
    for shared in ("hostPID", "hostIPC", "shareProcessNamespace"):
        assert not spec.get(shared), shared


def test_pod_runs_on_every_node_in_its_network_namespace(base: list[dict[str, Any]]) -> None:
    """The pod uses the node's network with cluster DNS, system-node-critical priority, tolerates every taint and has the agreed service account."""
    spec = pod(base)
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["serviceAccountName"] == "enforcer"
    strategy = one(base, "DaemonSet", "enforcer", "enforcer-system")["spec"]["updateStrategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}


def test_grace_period_lets_the_daemon_drain(base: list[dict[str, Any]]) -> None:
    """terminationGracePeriodSeconds covers the daemon's drain (DRAIN_SECONDS) with room for the flow log and the deletion check."""
    grace = pod(base)["terminationGracePeriodSeconds"]
    assert DRAIN_SECONDS + 10 <= grace <= DRAIN_SECONDS * 3


def test_host_mounts_are_exactly_state_and_flow_logs(base: list[dict[str, Any]]) -> None:
    """The only hostPath volumes are /var/lib/enforcer and /var/log/enforcer; the config is read-only; the rest is a small memory emptyDir for /tmp."""
    spec = pod(base)
    volumes = {v["name"]: v for v in spec["volumes"]}
    host = {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v}
    assert host == {"/var/lib/enforcer", "/var/log/enforcer"}
    assert volumes["config"]["configMap"] == {"name": "enforcer-config"}
    assert volumes["tmp"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Mi"}
    assert set(volumes) == {"config", "state", "logs", "tmp"}
    mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert set(mounts) == {"/etc/enforcer", "/var/lib/enforcer", "/var/log/enforcer", "/tmp"}
    assert mounts["/etc/enforcer"].get("readOnly") is True


def test_env_names_the_node_and_the_pod(base: list[dict[str, Any]]) -> None:
    """NODE_NAME, POD_NAME and POD_NAMESPACE come from the downward API."""
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in pod(base)["containers"][0]["env"]}
    assert env == {"NODE_NAME": "spec.nodeName", "POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}


def _config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(one(objects, "ConfigMap", "enforcer-config", "enforcer-system")["data"]["enforcer.yaml"])
    return data


def test_configmap_is_the_agreed_daemon_config(base: list[dict[str, Any]]) -> None:
    """enforcer.yaml reads every namespace's custom resources, redirects, keeps state and flows in the mounted host paths and is otherwise a valid daemon config."""
    config = _config(base)
    assert config["definitions"] == [{"kubernetes": {}}]
    assert config["include"] == ["enforcer.*.yaml"]  # the components' drop-ins (tests/test_shared_sessions.py)
    assert config["redirect"] == {"enabled": True}
    assert config["kubernetes"] == {"daemonSet": "enforcer"}  # node label tags (default) and the uninstall check
    assert (config["stateDir"], config["logsDir"]) == ("/var/lib/enforcer", "/var/log/enforcer")
    assert config["admin"] == {"address": "127.0.0.1", "port": 9090, "identityProviders": "reported"}
    # (the kubernetes source is validated by its own model; the rest by the daemon's)
    DaemonModel.model_validate({**config, "definitions": [{"file": "/etc/enforcer/definitions.d"}]})


def test_probes_and_port_match_the_daemon_config(base: list[dict[str, Any]]) -> None:
    """Readiness probes /readyz and liveness /healthz on the admin address and port of enforcer.yaml; the declared port is the listener's."""
    config = _config(base)
    [container] = pod(base)["containers"]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert (get["host"], get["port"], get["path"]) == (config["admin"]["address"], config["admin"]["port"], path)
    assert [p["containerPort"] for p in container["ports"]] == [config["listen"]["port"]]
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert set(requests) == {"cpu", "memory"} and set(limits) == {"memory"}


def _rules(role: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    return {
        (group, resource, verb, ",".join(rule.get("resourceNames", [])))
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_rbac_grants_exactly_the_agreed_verbs(overlay: list[dict[str, Any]]) -> None:
    """The ClusterRole reads the two CRDs, patches their status, writes Events and reads and watches Nodes; the Roles get its DaemonSet, keep the status Lease and read Secrets in enforcer-system (and demo) only."""
    assert _rules(one(overlay, "ClusterRole", "enforcer")) == {
        *{("enforcer.dev", r, v, "") for r in ("enforcerservices", "httpresourcespecs") for v in ("get", "list", "watch")},
        ("enforcer.dev", "enforcerservices/status", "patch", ""),
        ("enforcer.dev", "httpresourcespecs/status", "patch", ""),
        ("", "events", "create", ""),
        ("", "events", "patch", ""),
        *{("", "nodes", v, "") for v in ("get", "list", "watch")},
    }
    assert _rules(one(overlay, "Role", "enforcer", "enforcer-system")) == {
        ("apps", "daemonsets", "get", "enforcer"),
        ("coordination.k8s.io", "leases", "create", ""),
        ("coordination.k8s.io", "leases", "get", "enforcer-status"),
        ("coordination.k8s.io", "leases", "update", "enforcer-status"),
    }
    roles = [o for o in overlay if o["kind"] in ("Role", "ClusterRole")]
    leases = {(o["kind"], o["metadata"].get("namespace")) for o in roles
              if any("leases" in r["resources"] for r in o["rules"])}
    assert leases == {("Role", "enforcer-system")}  # no Lease of any other namespace
    secrets = {o["metadata"].get("namespace") for o in roles if any("secrets" in r["resources"] for r in o["rules"])}
    assert secrets == {"enforcer-system", "demo"}
    for namespace in ("enforcer-system", "demo"):
        assert _rules(one(overlay, "Role", "enforcer-secrets", namespace)) == {
            ("", "secrets", v, "") for v in ("get", "list", "watch")
        }
    for binding in (o for o in overlay if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "enforcer", "namespace": "enforcer-system"}]


# ---------------------------------------------------------------- the README's commands

E2E = REPO / "tests" / "test_kube_daemonset.py"
"""The cluster module: it runs each cluster command the section prints, exactly as printed (its
``Cluster.printed``; only the example overlay's path stands for its own overlay of it, which swaps
the image reference), and its last test fails if one of them did not run."""


def test_readme_kubernetes_commands_are_all_accounted_for() -> None:
    """Every command of the README's Kubernetes section is run as printed by the cluster module (it names it verbatim), or is one of the few listed with what happens to it instead."""
    commands = readme_commands()
    assert any(c.startswith("kubectl kustomize") for c in commands), commands
    e2e = {n.value for n in ast.walk(ast.parse(E2E.read_text(encoding="utf-8")))
           if isinstance(n, ast.Constant) and isinstance(n.value, str)}  # its string literals
    not_run = [c for c in commands if c not in RUN_ELSEWHERE and c not in e2e]
    assert not_run == [], f"printed in the README but run by no test: {not_run}"
    assert set(RUN_ELSEWHERE) <= set(commands), set(RUN_ELSEWHERE) - set(commands)


@pytest.mark.parametrize("command", [c for c in readme_commands() if c.startswith("kubectl kustomize")])
def test_readme_offline_kubectl_commands_run_as_printed(command: str) -> None:
    """Each `kubectl kustomize` command the README prints runs as printed from the repository root and renders the DaemonSet."""
    argv = shlex.split(command)
    done = subprocess.run([kubectl(), *argv[1:]], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "kind: DaemonSet" in done.stdout
