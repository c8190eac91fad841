"""The test cluster of tests/harness/kube.py is a real Kubernetes: CRDs, a Ready node, pods serving the LAN."""

from __future__ import annotations

import json
import ssl
import urllib.request
from pathlib import Path

import pytest

from enforcer.net.netns import run_in_netns
from tests.harness.kube import HERE, SERVICE_IP, ControlPlane, Node, static_image
from tests.harness.netns import connect

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


HELLO_PORT = 18080
HELLO_POD = f"""
apiVersion: v1
kind: Pod
metadata: {{name: hello, namespace: default}}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 2
  containers:
  - name: hello
    image: enforcer.test/hello:1
    imagePullPolicy: Never
    args: ["{HELLO_PORT}", "hello-from-pod"]
    readinessProbe: {{tcpSocket: {{port: {HELLO_PORT}}}, periodSeconds: 1}}
"""


def test_node_is_ready(kube_node: Node) -> None:
    """The kubelet registers the node under its name and IP, Ready and without taints."""
    got = json.loads(kube_node.api.kubectl("get", "node", kube_node.name, "-o", "json").stdout)
    assert {"type": "InternalIP", "address": kube_node.node_ip} in got["status"]["addresses"]
    assert kube_node.node_ready()


def test_host_network_pod_from_local_image_serves_the_lan(kube_node: Node, tmp_path: Path) -> None:
    """A hostNetwork pod from a locally imported image is scheduled, becomes Ready and answers the client netns."""
    archive = static_image(HERE / "hello.c", tmp_path / "hello.tar", name="enforcer.test/hello:1", binary="hello")
    assert kube_node.import_image(archive) == ["enforcer.test/hello:1"]
    api = kube_node.api
    api.kubectl("apply", "-f", "-", input=HELLO_POD)
    try:
        kube_node.wait_pod_ready("default", "hello")
        with connect(kube_node.client_netns, kube_node.node_ip, HELLO_PORT) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: node\r\n\r\n")
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.0 200 OK")
        assert b"\r\n\r\nhello-from-pod " in answer
        assert (
            "listening on :18080"
            in api.kubectl("logs", "hello", "-n", "default").stdout
            + api.kubectl("logs", "hello", "-n", "default").stderr
        )
    finally:
        api.kubectl("delete", "pod", "hello", "-n", "default", "--wait=true", "--timeout=60s", check=False)


def test_pods_reach_the_api_at_the_kubernetes_service_ip(kube_api: ControlPlane) -> None:
    """From the node namespace (hostNetwork pods), https://10.96.0.1:443 is the API server with a valid certificate."""
    svc = json.loads(kube_api.kubectl("get", "service", "kubernetes", "-n", "default", "-o", "json").stdout)
    assert svc["spec"]["clusterIP"] == SERVICE_IP

    def readyz() -> bytes:
        ctx = ssl.create_default_context(cafile=str(kube_api.ca_file))
        req = urllib.request.Request(
            f"https://{SERVICE_IP}/readyz", headers={"Authorization": f"Bearer {kube_api.token}"}
        )
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            body: bytes = resp.read()
            return body

    assert run_in_netns(kube_api.node_netns, readyz) == b"ok"
