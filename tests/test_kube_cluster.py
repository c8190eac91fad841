"""The test cluster of tests/harness/kube.py is a real Kubernetes: CRDs, a Ready node, pods serving the LAN."""

from __future__ import annotations

import json

import pytest

from tests.harness.kube import ControlPlane

pytestmark = [pytest.mark.root, pytest.mark.timeout(2400)]

CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.harness.enforcer.dev}
spec:
  group: harness.enforcer.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1, maximum: 10}
              tags: {type: array, items: {type: string}}
"""


def test_api_server_stores_a_custom_resource(kube_api: ControlPlane) -> None:
    """A v1 CRD is established and a custom resource round-trips (the reflect2 patch: no crash on CR writes)."""
    kube_api.kubectl("apply", "-f", "-", input=CRD)
    kube_api.kubectl("wait", "--for=condition=established", "--timeout=60s", "crd/widgets.harness.enforcer.dev")
    cr = {"apiVersion": "harness.enforcer.dev/v1", "kind": "Widget", "metadata": {"name": "w1", "namespace": "default"},
          "spec": {"size": 3, "tags": ["a", "b"]}}  # fmt: skip
    kube_api.kubectl("apply", "-f", "-", input=json.dumps(cr))
    got = json.loads(kube_api.kubectl("get", "widget", "w1", "-n", "default", "-o", "json").stdout)
    assert got["spec"] == {"size": 3, "tags": ["a", "b"]}
    kube_api.kubectl("delete", "widget", "w1", "-n", "default")
    assert all(p.alive() for p in kube_api.procs)


def test_api_server_rejects_a_custom_resource_outside_its_schema(kube_api: ControlPlane) -> None:
    """The structural schema is enforced by the server: an out-of-range field is refused with the field path."""
    kube_api.kubectl("apply", "-f", "-", input=CRD)
    kube_api.kubectl("wait", "--for=condition=established", "--timeout=60s", "crd/widgets.harness.enforcer.dev")
    cr = {"apiVersion": "harness.enforcer.dev/v1", "kind": "Widget", "metadata": {"name": "w2", "namespace": "default"},
          "spec": {"size": 99}}  # fmt: skip
    done = kube_api.kubectl("apply", "-f", "-", input=json.dumps(cr), check=False)
    assert done.returncode != 0
    assert "spec.size" in done.stderr


def test_admin_token_is_cluster_admin(kube_api: ControlPlane) -> None:
    """The admin token authenticates as a member of system:masters (may do anything)."""
    assert kube_api.kubectl("auth", "can-i", "*", "*", "--all-namespaces").stdout.strip() == "yes"
    status, body = kube_api.get("/version")
    assert status == 200 and json.loads(body)["gitVersion"] == "v1.20.2"
