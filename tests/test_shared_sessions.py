"""The shared-sessions kustomize Component (deploy/kubernetes/components/shared-sessions), offline:
what it adds to the base, that it combines with pod-mode through the ConfigMap's drop-ins, and
that the daemon reads the result as a Redis session store whose files are in the mounted Secret.
On the real cluster: tests/test_kube_pods.py (the pod-mode module runs with this component)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from enforcer.run import stores
from tests.harness.manifests import BASE, KUBE_VERSIONS, one, overlay, read_configmap, render, validate_strict

MOUNT = Path("/etc/enforcer-sessions")
SECRET_KEYS = {"redis-password", "ca.crt", "refresh-token-keys"}


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(BASE)


@pytest.fixture(scope="module")
def sessions_only(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render(overlay(tmp_path_factory.mktemp("shared") / "overlay", "shared-sessions"))


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render(overlay(tmp_path_factory.mktemp("both") / "overlay", "pod-mode", "shared-sessions"))


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    [c] = one(objects, "DaemonSet", "enforcer")["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def test_the_component_adds_only_the_drop_in_and_the_secret_mount(
    base: list[dict[str, Any]], sessions_only: list[dict[str, Any]]
) -> None:
    """Base plus component equals the base but for the ConfigMap key enforcer.sessions.yaml and the Secret enforcer-sessions mounted read-only, mode 0400."""
    got = {(o["kind"], o["metadata"]["name"]): copy.deepcopy(o) for o in sessions_only}
    assert set(got) == {(o["kind"], o["metadata"]["name"]) for o in base}
    cm = got[("ConfigMap", "enforcer-config")]
    assert yaml.safe_load(cm["data"].pop("enforcer.sessions.yaml"))["sessions"]["store"] == "redis"
    spec = got[("DaemonSet", "enforcer")]["spec"]["template"]["spec"]
    [container] = spec["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "sessions"]
    assert mount == {"name": "sessions", "mountPath": str(MOUNT), "readOnly": True}
    container["volumeMounts"].remove(mount)
    [volume] = [v for v in spec["volumes"] if v["name"] == "sessions"]
    assert volume["secret"] == {"secretName": "enforcer-sessions", "defaultMode": 0o400}  # not optional: fail closed
    spec["volumes"].remove(volume)
    for o in base:
        assert got[(o["kind"], o["metadata"]["name"])] == o, o["kind"]


def test_with_pod_mode_both_drop_ins_apply(
    both: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Base with pod-mode and shared-sessions, read as the pod reads its ConfigMap, has pod mode on, the base's uninstall check, and a Redis store over TLS whose password, CA and refresh-token keys are files of the mounted Secret."""
    settings, issues = read_configmap(both, tmp_path / "etc-enforcer", monkeypatch)
    assert issues == [] and settings is not None
    kube = settings.model.kubernetes
    assert kube is not None and kube.pods.enabled and kube.daemonSet == "enforcer"
    sessions = settings.model.sessions
    assert sessions.store == "redis" and sessions.redis is not None
    assert sessions.redis.url is not None and sessions.redis.url.startswith("rediss://")
    files = {sessions.redis.passwordFile, sessions.redis.caFile, sessions.refreshTokenKeyFile}
    assert {f.name for f in files if f is not None} == SECRET_KEYS
    assert {f.parent for f in files if f is not None} == {MOUNT}
    assert {m["mountPath"] for m in _container(both)["volumeMounts"]} >= {str(MOUNT), "/var/run/enforcer"}


def test_an_overlay_patching_the_drop_in_sets_its_own_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An overlay that patches enforcer.sessions.yaml (as the component's comment says) replaces the URL and keeps the rest of enforcer.yaml."""
    d = overlay(tmp_path / "overlay", "shared-sessions")
    kustomization = yaml.safe_load((d / "kustomization.yaml").read_text())
    kustomization["patches"] = [{"patch": yaml.safe_dump({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "enforcer-config", "namespace": "enforcer-system"},
        "data": {"enforcer.sessions.yaml": "sessions: {store: redis, redis: {url: 'redis://10.0.0.5:6379/2'}}\n"},
    })}]  # fmt: skip
    (d / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    settings, issues = read_configmap(render(d), tmp_path / "etc", monkeypatch)
    assert issues == [] and settings is not None
    assert settings.model.sessions.redis is not None and settings.model.sessions.redis.url == "redis://10.0.0.5:6379/2"
    assert settings.model.listen.port == 8443 and settings.model.kubernetes is not None


async def test_a_db_in_enforcer_yaml_is_the_database_the_client_uses(
    sessions_only: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sessions.redis.db set in enforcer.yaml under the component's drop-in is the database the Redis client selects (the drop-in's URL names none, so nothing overrides or conflicts with it)."""
    objects = copy.deepcopy(sessions_only)
    cm = one(objects, "ConfigMap", "enforcer-config")
    assert "sessions:" not in cm["data"]["enforcer.yaml"]
    cm["data"]["enforcer.yaml"] += "sessions: {redis: {db: 3}}\n"
    settings, issues = read_configmap(objects, tmp_path / "etc", monkeypatch)
    assert issues == [] and settings is not None and settings.model.sessions.redis is not None
    config = dataclasses.replace(stores.redis_config(settings.model.sessions.redis), password_file=None)
    client = config.client()  # (not connected: the Secret's files are not here)
    assert client.connection_pool.connection_kwargs["db"] == 3
    await client.aclose()


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_object_with_both_components_validates_offline(both: list[dict[str, Any]], version: str) -> None:
    """Every object of base plus pod-mode plus shared-sessions passes kubernetes-validate --strict for that Kubernetes version."""
    validate_strict(both, version)
