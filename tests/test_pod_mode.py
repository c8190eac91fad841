"""Pod mode's kustomize Component (deploy/kubernetes/components/pod-mode) and the daemon's CNI
install wiring (``cni.keep_installed`` / ``cni.uninstall_from_node``), offline.

The component, added to an overlay of the base, must render, validate with kubernetes-validate
(strict), and change the base only by what pod mode needs: ``kubernetes.pods.enabled``, hostPID,
CAP_SYS_ADMIN and CAP_SYS_PTRACE, four host mounts, and list/watch of pods.
"""

from __future__ import annotations

import asyncio
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from enforcer.config import settings as settings_mod
from enforcer.http.tls import make_listen_socket
from enforcer.net.pods import PodNetns
from enforcer.run import cni
from enforcer.run.attach import HostAttachment, PodAttachment
from enforcer.run.daemon import Daemon
from tests.harness.manifests import BASE, KUBE_VERSIONS, overlay, read_configmap, render, validate_strict
from tests.harness.redirector import FakeRedirector

POD_MODE_MOUNTS = {
    "/host/etc/cni/net.d": ("cni-conf", "/etc/cni/net.d", "Directory"),
    "/host/opt/cni/bin": ("cni-bin", "/opt/cni/bin", "Directory"),
    "/var/run/enforcer": ("run", "/var/run/enforcer", "DirectoryOrCreate"),
    "/var/run/netns": ("netns", "/run/netns", "DirectoryOrCreate"),
}


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(BASE)


@pytest.fixture(scope="module")
def pod_mode(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render(overlay(tmp_path_factory.mktemp("pod-mode") / "overlay", "pod-mode"))


def key(o: dict[str, Any]) -> tuple[str, str, str]:
    return (o["kind"], o["metadata"].get("namespace") or "", o["metadata"]["name"])


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    [ds] = [o for o in objects if o["kind"] == "DaemonSet"]
    spec: dict[str, Any] = ds["spec"]["template"]["spec"]
    return spec


def test_the_component_changes_only_what_pod_mode_needs(base: list[dict[str, Any]], pod_mode: list[dict[str, Any]]) -> None:
    """Base plus component equals the base but for the DaemonSet's hostPID, capabilities and host mounts, the ConfigMap's drop-in enforcer.pod-mode.yaml, and the pods ClusterRole and its binding."""
    by_key = {key(o): o for o in pod_mode}
    for o in base:
        got = copy.deepcopy(by_key.pop(key(o)))
        if o["kind"] == "DaemonSet":
            spec = got["spec"]["template"]["spec"]
            assert spec.pop("hostPID") is True
            [container] = spec["containers"]
            caps = container["securityContext"]["capabilities"]
            assert caps == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_BIND_SERVICE", "SYS_ADMIN", "SYS_PTRACE"]}
            caps["add"] = ["NET_ADMIN", "NET_BIND_SERVICE"]
            added = {m["mountPath"]: m for m in container["volumeMounts"] if m["mountPath"] in POD_MODE_MOUNTS}
            container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] not in POD_MODE_MOUNTS]
            volumes = {v["name"]: v for v in spec["volumes"]}
            for mount_path, (name, host_path, type_) in POD_MODE_MOUNTS.items():
                assert added[mount_path]["name"] == name
                assert volumes.pop(name)["hostPath"] == {"path": host_path, "type": type_}
            assert added["/var/run/netns"]["mountPropagation"] == "HostToContainer"
            assert added["/var/run/netns"]["readOnly"] is True
            spec["volumes"] = [v for v in spec["volumes"] if v["name"] in volumes]
        if o["kind"] == "ConfigMap":
            drop_in = yaml.safe_load(got["data"].pop("enforcer.pod-mode.yaml"))
            assert drop_in == {"kubernetes": {"pods": {"enabled": True}}}
        assert got == o, key(o)
    assert sorted(by_key) == [("ClusterRole", "", "enforcer-pods"), ("ClusterRoleBinding", "", "enforcer-pods")]
    role = by_key[("ClusterRole", "", "enforcer-pods")]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}]
    binding = by_key[("ClusterRoleBinding", "", "enforcer-pods")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "enforcer", "namespace": "enforcer-system"}]
    assert binding["roleRef"]["name"] == "enforcer-pods"


def test_the_component_config_turns_pod_mode_on_and_is_a_valid_daemon_config(
    pod_mode: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ConfigMap with the component, read as the pod reads it (enforcer.yaml and its drop-ins), is a valid daemon config with kubernetes.pods.enabled, the base's uninstall check kept, and its CNI socket in the mounted /var/run/enforcer."""
    settings, issues = read_configmap(pod_mode, tmp_path / "etc-enforcer", monkeypatch)
    assert issues == [] and settings is not None
    kube = settings.model.kubernetes
    assert kube is not None and kube.pods.enabled and kube.daemonSet == "enforcer"
    assert kube.pods.cniSocket.parent == Path("/var/run/enforcer") == cni.DEFAULT_SOCKET.parent
    mounts = {m["mountPath"] for m in pod_spec(pod_mode)["containers"][0]["volumeMounts"]}
    assert {str(cni.NODE_CONF_DIR), str(cni.NODE_BIN_DIR)} <= mounts


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_object_with_the_component_validates_offline(pod_mode: list[dict[str, Any]], version: str) -> None:
    """Every built-in object of base plus component passes kubernetes-validate --strict for that Kubernetes version."""
    validate_strict(pod_mode, version)


# ----------------------------------------------------------------------------- the daemon's wiring


def node_dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    conf, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    bin_dir.mkdir()
    binary = tmp_path / "enforcer-cni"
    binary.write_bytes(b"\x7fELF plugin")
    return conf, bin_dir, binary


def test_keep_installed_waits_for_the_nodes_conflist_then_installs(tmp_path: Path) -> None:
    """With no CNI configuration yet it retries; once the node's conflist appears the plugin ends it and its binary is in place."""
    conf, bin_dir, binary = node_dirs(tmp_path)
    primary = {"cniVersion": "0.4.0", "name": "net", "plugins": [{"type": "bridge"}]}

    async def run() -> cni.InstallResult | None:
        task = asyncio.ensure_future(cni.keep_installed(Path("/var/run/enforcer/cni.sock"), conf, bin_dir,
                                                        binary=binary, retry=0.05))  # fmt: skip
        await asyncio.sleep(0.2)
        assert not task.done()
        (conf / "10-net.conflist").write_text(json.dumps(primary))
        return await asyncio.wait_for(task, 5)

    result = asyncio.run(run())
    assert result is not None and result.conf_file == conf / "10-net.conflist"
    plugins = json.loads((conf / "10-net.conflist").read_text())["plugins"]
    assert [p["type"] for p in plugins] == ["bridge", "enforcer-cni"]
    assert (bin_dir / "enforcer-cni").read_bytes() == binary.read_bytes()


def test_keep_installed_skips_when_the_node_dirs_are_not_mounted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Without the node's CNI directories it returns None at once and warns that new pods lack first-packet protection."""
    result = asyncio.run(cni.keep_installed(Path("/var/run/enforcer/cni.sock"), tmp_path / "no-conf",
                                            tmp_path / "no-bin"))  # fmt: skip
    assert result is None
    assert "not mounted" in caplog.text


def test_uninstall_from_node_restores_the_conflist_and_removes_the_binary(tmp_path: Path) -> None:
    """After an install, uninstall_from_node leaves the node's conflist as it was and no plugin binary; without the directory it does nothing."""
    conf, bin_dir, binary = node_dirs(tmp_path)
    primary = {"cniVersion": "0.4.0", "name": "net", "plugins": [{"type": "bridge"}]}
    (conf / "10-net.conflist").write_text(json.dumps(primary))
    cni.install(conf, bin_dir, binary=binary)
    changed = cni.uninstall_from_node(conf, bin_dir)
    assert conf / "10-net.conflist" in changed
    assert json.loads((conf / "10-net.conflist").read_text()) == primary
    assert not (bin_dir / "enforcer-cni").exists()
    assert cni.uninstall_from_node(tmp_path / "gone", bin_dir) == []


@dataclass(frozen=True)
class Verdict:
    """A stop check's answer (as ``enforcer.config.kubernetes.StopVerdict``)."""

    uninstall: bool
    short: str = "DaemonSet enforcer-system/enforcer"
    why: str = "a test"


def _daemon(tmp_path: Path, uninstall: bool, asked: list[int]) -> tuple[Daemon, PodAttachment, FakeRedirector]:
    """A daemon (not started) holding one pod whose rules go through a fake, and a stop check answering ``uninstall``."""
    (tmp_path / "d.yaml").write_text("")
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(yaml.safe_dump({
        "stateDir": str(tmp_path / "state"), "logsDir": str(tmp_path / "logs"), "definitions": [{"file": "d.yaml"}], "allowNoServices": True,
        "sessions": {"store": "memory"}, "redirect": {"enabled": True, "table": "podmodetest"},
    }))  # fmt: skip
    settings = settings_mod.load_settings(cfg)

    async def check() -> Verdict:
        asked.append(1)
        return Verdict(uninstall)

    host = HostAttachment(settings, manages_redirect=False, listen_socket=make_listen_socket("127.0.0.1", 0),
                          stop_check=check)  # fmt: skip
    fake = FakeRedirector()
    pod = PodAttachment(PodNetns.open("/proc/self/ns/net", uid="uid-a"), settings, tags=frozenset({"app=a"}),
                        redirector=fake)  # fmt: skip
    return Daemon(settings, attachments=[host, pod]), pod, fake


@pytest.mark.parametrize("uninstall", [True, False])
def test_a_stop_releases_the_pods_only_at_an_uninstall(tmp_path: Path, uninstall: bool) -> None:
    """At a stop the host's stop check is asked once; an uninstall removes each pod's table, a restart keeps it; the pod's namespace is let go either way."""
    asked: list[int] = []
    daemon, pod, fake = _daemon(tmp_path, uninstall, asked)

    async def stop() -> None:
        daemon._pods[id(pod)] = daemon._pod(pod)
        await daemon._detach_pods()

    try:
        asyncio.run(stop())
    finally:
        daemon.attachments[0].close()
    assert fake.removed == (["podmodetest"] if uninstall else [])
    assert pod.netns.closed
    assert asked == [1]
