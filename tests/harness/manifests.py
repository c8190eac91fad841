"""Render the shipped kustomize manifests (deploy/kubernetes) and read their ConfigMap as the
daemon in the pod reads it: every key a file in one folder, enforcer.yaml with its drop-ins."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from enforcer.config import settings as settings_mod
from enforcer.config.issues import ConfigIssue
from tests.harness.prereq import missing

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
COMPONENTS = KUBERNETES / "components"
KUBE_VERSIONS = ("1.25.0", "1.32.0")
"""The Kubernetes versions whose schemas the rendered objects are validated against (offline)."""
POD_ENV = {"NODE_NAME": "node-1", "POD_NAMESPACE": "enforcer-system"}
"""What the downward API gives the enforcer's container (deploy/kubernetes/base/daemonset.yaml)."""


def render(path: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of a folder: its objects."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        missing("kubectl (kubectl kustomize renders the manifests)")
    done = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def overlay(d: Path, *components: str) -> Path:
    """An overlay of the base with the named components, as docs/kubernetes.md shows."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(BASE, d)],
        "components": [os.path.relpath(COMPONENTS / c, d) for c in components],
    }))  # fmt: skip
    return d


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def read_configmap(
    objects: list[dict[str, Any]], folder: Path, monkeypatch: Any
) -> tuple[settings_mod.Settings | None, list[ConfigIssue]]:
    """The ConfigMap ``enforcer-config`` written out as its volume mounts it (one file per key,
    in ``folder``) and read as the daemon does, with the pod's downward-API environment."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, text in one(objects, "ConfigMap", "enforcer-config")["data"].items():
        (folder / key).write_text(text)
    for name, value in POD_ENV.items():
        monkeypatch.setenv(name, value)
    return settings_mod.read_settings(folder / "enforcer.yaml")


def validate_strict(objects: list[dict[str, Any]], version: str) -> None:
    """Every object passes ``kubernetes-validate --strict`` for that Kubernetes version (else the test fails)."""
    for o in objects:
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{o['kind']} {o['metadata']['name']}: {exc.message} at {list(exc.path)}")


# ---------------------------------------------------------------- the README's commands

README_SECTION = "Run it on Kubernetes"
RUN_ELSEWHERE = {
    "sudo scripts/image --output enforcer-0.1.0.oci.tar":
        "tests/test_image.py runs it as printed (as root, without sudo) in a temporary directory",
    "skopeo copy oci-archive:enforcer-0.1.0.oci.tar docker://registry.example.com/enforcer:0.1.0":
        "tests/test_image.py runs it as printed against a real registry answering as that host",
    "sudo tail -f /var/log/enforcer/flows.jsonl":
        "not run: it follows the node's file forever (tests/test_kube_daemonset.py reads that file)",
}
"""The section's commands the cluster module does not run, and what happens to each instead."""


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n## {README_SECTION}\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for body in re.findall(r"^```sh\n(.*?)^```", section, re.MULTILINE | re.DOTALL):
        for line in body.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command:
                commands.append(command)
    return commands
