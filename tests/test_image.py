"""scripts/image builds a valid, small OCI image archive whose tree runs the enforcer and holds no build tools.

The image is built once per session by the command the README prints (without ``sudo``: we
are root), in a temporary directory; its Debian base comes from the cache scripts/image keeps
under /var/cache/enforcer-test (keyed by its recipe), so a second session builds in about a
minute. In CI (``CI=true``) a missing prerequisite fails; elsewhere it skips.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from enforcer import __version__
from tests.harness.prereq import missing

pytestmark = [pytest.mark.root, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[1]
VENV = "/opt/enforcer/venv"
ENTRYPOINT = [f"{VENV}/bin/enforcer", "run", "-c", "/etc/enforcer/enforcer.yaml"]
MAX_COMPRESSED = 70 * 2**20
"""52.0 MiB today (Debian minbase + python3 ~25 MiB, the venv ~27 MiB compressed); the Kubernetes
client the definitions source brings adds about 8 MiB; the rest is margin. A full debootstrap
with systemd is 147 MiB: crossing the bound means something that is not needed got in."""


def readme_image_command() -> list[str]:
    """The `scripts/image` command the README's Kubernetes section prints, as argv (without sudo)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Run it on Kubernetes\n", 1)[1].split("\n## ", 1)[0]
    [line] = [ln for ln in section.splitlines() if re.match(r"^(sudo )?scripts/image\b", ln)]
    argv = shlex.split(re.sub(r"\s+#.*$", "", line))
    return argv[1:] if argv[0] == "sudo" else argv


@dataclass
class Built:
    archive: Path
    blobs: dict[str, bytes]
    index: dict[str, Any]
    manifest: dict[str, Any]
    config: dict[str, Any]
    root: Path
    output: str


def _blob(blobs: dict[str, bytes], digest: str) -> bytes:
    algo, _, hexdigest = digest.partition(":")
    assert algo == "sha256"
    return blobs[f"blobs/sha256/{hexdigest}"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The image built as the README says, its archive read and its layer unpacked."""
    if os.geteuid() != 0:
        missing("root (debootstrap and chroot)")
    if shutil.which("debootstrap") is None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap"]):
            subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, check=False)
        if shutil.which("debootstrap") is None:
            missing("debootstrap")
    work = tmp_path_factory.mktemp("image")
    argv = readme_image_command()
    assert argv[0] == "scripts/image"
    done = subprocess.run(
        [str(REPO / argv[0]), *argv[1:]], cwd=work, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        check=False, timeout=1100,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    archive = work / argv[argv.index("--output") + 1]
    with tarfile.open(archive) as tar:
        blobs = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    index = json.loads(blobs["index.json"])
    [descriptor] = index["manifests"]
    manifest = json.loads(_blob(blobs, descriptor["digest"]))
    config = json.loads(_blob(blobs, manifest["config"]["digest"]))
    root = work / "rootfs"
    root.mkdir()
    [layer] = manifest["layers"]
    (work / "layer.tar.gz").write_bytes(_blob(blobs, layer["digest"]))
    subprocess.run(["tar", "-xzf", str(work / "layer.tar.gz"), "-C", str(root)], check=True)
    return Built(archive, blobs, index, manifest, config, root, done.stdout)


def chroot(root: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", str(root), "/usr/bin/env", "-i", "PATH=/opt/enforcer/venv/bin:/usr/bin:/bin", "LANG=C.UTF-8", *cmd],
        capture_output=True, text=True, check=False, timeout=120,
    )


def test_archive_is_a_valid_oci_layout(built: Built) -> None:
    """The archive has oci-layout 1.0.0 and an index naming one manifest; every blob's name is its sha256, every descriptor's size and media type is right, and the config's diff_id is the uncompressed layer's digest."""
    assert json.loads(built.blobs["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in built.blobs.items():
        if name.startswith("blobs/"):
            assert name == f"blobs/sha256/{hashlib.sha256(data).hexdigest()}"
    assert built.index["schemaVersion"] == 2
    [descriptor] = built.index["manifests"]
    assert descriptor["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert descriptor["size"] == len(_blob(built.blobs, descriptor["digest"]))
    assert descriptor["annotations"]["org.opencontainers.image.ref.name"] == f"localhost/enforcer:{__version__}"
    manifest = built.manifest
    assert (manifest["schemaVersion"], manifest["mediaType"]) == (2, "application/vnd.oci.image.manifest.v1+json")
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert manifest["config"]["size"] == len(_blob(built.blobs, manifest["config"]["digest"]))
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    compressed = _blob(built.blobs, layer["digest"])
    assert layer["size"] == len(compressed)
    diff_id = "sha256:" + hashlib.sha256(gzip.decompress(compressed)).hexdigest()
    assert built.config["rootfs"] == {"type": "layers", "diff_ids": [diff_id]}
    assert (built.config["os"], built.config["architecture"]) == ("linux", "amd64")


def test_config_runs_the_daemon_as_uid_0_with_labels(built: Built) -> None:
    """The image config says User 0, the entrypoint `enforcer run -c /etc/enforcer/enforcer.yaml`, and carries the OCI labels with this version."""
    config = built.config["config"]
    assert config["User"] == "0"
    assert config["Entrypoint"] == ENTRYPOINT
    assert "Cmd" not in config
    assert config["Env"][0].startswith(f"PATH={VENV}/bin:")
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.title"] == "enforcer"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", labels["org.opencontainers.image.revision"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", labels["org.opencontainers.image.created"])


FORBIDDEN = [
    "usr/bin/apt", "usr/bin/apt-get", "usr/bin/gcc", "usr/bin/cc", "usr/bin/c++", "usr/bin/make", "usr/bin/ld",
    "usr/bin/as", "usr/bin/strip", "usr/bin/pip", "usr/bin/pip3", f"{VENV[1:]}/bin/pip", f"{VENV[1:]}/bin/pip3",
    "usr/lib/python3/dist-packages/pip", "usr/share/man", "var/lib/apt/lists/partial",
]


@pytest.mark.parametrize("path", FORBIDDEN)
def test_no_build_tools_inside(built: Built, path: str) -> None:
    """The image holds no package manager but dpkg's database, no compiler or linker, no pip and no man pages."""
    assert not (built.root / path).exists() and not (built.root / path).is_symlink()


def test_no_pip_setuptools_docs_or_apt_lists(built: Built) -> None:
    """No pip/setuptools/wheel package anywhere, no apt list or cache file, no documentation but copyright files."""
    installers = [p for p in built.root.rglob("*-packages/*") if p.name.split("-")[0] in ("pip", "setuptools", "wheel")]
    assert installers == []
    assert [p for p in (built.root / "var/lib/apt").rglob("*") if p.is_file()] == []
    assert [p for p in (built.root / "var/cache/apt").rglob("*") if p.is_file()] == []
    docs = [p for p in (built.root / "usr/share/doc").rglob("*") if p.is_file() and p.name != "copyright"]
    assert docs == []
    assert (built.root / "usr/share/doc/python3.11/copyright").exists()


def test_host_files_are_not_baked_in(built: Built) -> None:
    """The build host's hostname and resolver are not in the image (the runtime provides them)."""
    assert (built.root / "etc/hostname").read_text() == ""
    assert (built.root / "etc/resolv.conf").read_text() == ""


def test_enforcer_version_runs_in_the_unpacked_tree(built: Built) -> None:
    """`enforcer --version` runs in the unpacked image tree (chroot) and prints this version."""
    done = chroot(built.root, f"{VENV}/bin/enforcer", "--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"enforcer {__version__}"), done.stderr


def test_daemon_modules_and_trust_store_load(built: Built) -> None:
    """The daemon's modules, uvloop, pyroute2, sqlite3 and ssl import in the tree, with a CA bundle for the IdP's TLS."""
    probe = (
        "import ssl, sqlite3, uvloop, pyroute2, cryptography, enforcer.run.daemon, enforcer.cli;"
        "bundle = open('/etc/ssl/certs/ca-certificates.crt').read();"
        "print(bundle.count('BEGIN CERTIFICATE'), ssl.OPENSSL_VERSION)"
    )
    done = chroot(built.root, f"{VENV}/bin/python", "-c", probe)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[0]) > 100


def test_every_shared_library_resolves(built: Built) -> None:
    """Every extension module of the venv finds all its shared libraries in the image (nothing purged that one needs)."""
    objects = sorted(str(p.relative_to(built.root)) for p in (built.root / VENV[1:]).rglob("*.so"))
    assert len(objects) > 5
    for so in objects:
        done = chroot(built.root, "/usr/bin/ldd", f"/{so}")
        assert done.returncode == 0 and "not found" not in done.stdout, f"{so}: {done.stdout}{done.stderr}"


def test_check_runs_on_definitions_in_the_tree(built: Built) -> None:
    """`enforcer check` in the image validates a config and the seed definitions (pydantic, yaml and the policy load)."""
    where = built.root / "tmp/check"
    where.mkdir(parents=True)
    (where / "enforcer.yaml").write_text(
        "tags: [app=frontend]\nstateDir: /tmp/check/state\nlogsDir: /tmp/check/logs\n"
        "definitions:\n  - file: /tmp/check/definitions.yaml\n"
    )
    (where / "definitions.yaml").write_text(
        "kind: service\nname: private-app\nOIDCClientID: c\nOIDCClientSecret: s\n"
        "OIDCProviderURL: https://idp.example.com\nOIDCCallbackURL: https://app.example.com\n"
        "hosts: [app.example.com]\nport: 80\nselectors: [[app=frontend]]\n"
        "exposedAPIs: [[httpresourcespec:name=private-app]]\n---\n"
        "kind: httpresourcespec\nname: private-app\nendpoints:\n  - {URI: /*, methods: [GET], allowedScopes: [[groups=staff]]}\n"
    )
    done = chroot(built.root, f"{VENV}/bin/enforcer", "check", "-c", "/tmp/check/enforcer.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "service private-app" in done.stdout


def test_image_is_small(built: Built) -> None:
    """The compressed image stays under the bound of MAX_COMPRESSED, and scripts/image reports the size it wrote."""
    size = built.manifest["layers"][0]["size"]
    assert size < MAX_COMPRESSED, f"{size / 2**20:.1f} MiB"
    assert f"{size / 2**20:.1f} MiB compressed" in built.output


def readme_push_command() -> str:
    """The README's `skopeo copy` line (the push to a registry), exactly as printed."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    [line] = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("skopeo copy oci-archive:")]
    return line


def test_the_readme_push_command_pushes_the_archive_to_a_registry(built: Built, tmp_path: Path) -> None:
    """The README's `skopeo copy` line, run as printed beside the built archive, pushes it to a real registry (Debian's docker-registry over TLS, answering as the printed host in a network namespace of ours), which then serves the same manifest."""
    for tool in ("skopeo", "docker-registry", "openssl", "ip"):
        if shutil.which(tool) is None:
            missing(tool)
    command = readme_push_command()
    archive_name = re.search(r"oci-archive:(\S+)", command).group(1)  # type: ignore[union-attr]
    reference = re.search(r"docker://(\S+)", command).group(1)  # type: ignore[union-attr]
    host = reference.split("/", 1)[0]
    assert (built.archive.parent / archive_name) == built.archive, "the README pushes the file it builds"
    netns = f"enf-registry-{os.getpid()}"
    # `ip netns exec` bind-mounts /etc/netns/<name>/<entry> over /etc/<entry> for the command only:
    # the printed host resolves to this namespace's loopback, and skopeo trusts the registry's certificate.
    etc = Path("/etc/netns") / netns
    certs = etc / "containers" / "certs.d" / host
    certs.mkdir(parents=True)
    try:
        shutil.copy("/etc/containers/policy.json", etc / "containers" / "policy.json")
        (etc / "hosts").write_text(f"127.0.0.1 localhost {host}\n")
        cert, key = tmp_path / "registry.crt", tmp_path / "registry.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-subj", f"/CN={host}", "-addext", f"subjectAltName=DNS:{host}", "-days", "1",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        shutil.copy(cert, certs / "ca.crt")
        config = tmp_path / "registry.yml"
        config.write_text(json.dumps({
            "version": 0.1, "log": {"level": "warn"},
            "storage": {"filesystem": {"rootdirectory": str(tmp_path / "storage")}},
            "http": {"addr": "127.0.0.1:443", "tls": {"certificate": str(cert), "key": str(key)}},
        }))
        subprocess.run(["ip", "netns", "add", netns], check=True)
        try:
            subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
            log = (tmp_path / "registry.log").open("wb")
            registry = subprocess.Popen(["ip", "netns", "exec", netns, "docker-registry", "serve", str(config)],
                                        stdout=log, stderr=log)
            log.close()
            try:
                _wait_for_registry(netns, host)
                pushed = subprocess.run(["ip", "netns", "exec", netns, "sh", "-c", command], cwd=built.archive.parent,
                                        capture_output=True, text=True, check=False, timeout=300)
                assert pushed.returncode == 0, pushed.stderr[-3000:]
                inspected = subprocess.run(["ip", "netns", "exec", netns, "skopeo", "inspect", "--raw",
                                            f"docker://{reference}"], capture_output=True, check=True, timeout=60)
            finally:
                registry.terminate()
                registry.wait(timeout=10)
        finally:
            subprocess.run(["ip", "netns", "del", netns], check=False)
    finally:
        shutil.rmtree(etc, ignore_errors=True)
    [descriptor] = built.index["manifests"]
    served = json.loads(inspected.stdout)
    assert served["layers"][0]["digest"] == built.manifest["layers"][0]["digest"]
    assert served["config"]["digest"] == built.manifest["config"]["digest"]
    assert "sha256:" + hashlib.sha256(inspected.stdout).hexdigest() == descriptor["digest"]


def _wait_for_registry(netns: str, host: str) -> None:
    """Until the registry answers its API root over TLS (a few hundred ms)."""
    done = None
    for _ in range(100):
        done = subprocess.run(["ip", "netns", "exec", netns, "skopeo", "list-tags", f"docker://{host}/none"],
                              capture_output=True, text=True, check=False, timeout=30)
        if "connection refused" not in done.stderr:
            return
        time.sleep(0.1)
    raise AssertionError(f"the registry did not start: {done.stderr[-500:] if done else ''}")
