"""A real single-node Kubernetes v1.20.2 cluster for tests, started in two stages and torn down completely.

Fixtures (session-scoped; registered for every test file through tests/conftest.py):

``kube_api`` -> :class:`ControlPlane` (etcd + kube-apiserver only; ready in ~10 s):
    ``kubeconfig: Path``      admin kubeconfig for the machine's namespace (where pytest runs)
    ``server: str``           its API URL, ``https://127.0.0.1:<port>`` (a forwarder, see below)
    ``token: str``            the admin bearer token (user ``admin``, group ``system:masters``)
    ``ca_file: Path``         the cluster CA (PEM) that signed the API server's certificate
    ``node_kubeconfig: Path`` / ``node_server: str``: the same admin access for processes *inside*
                              the node or client namespace (``https://10.250.0.1:6443``)
    ``kubectl(*args, input=None, check=True, timeout=120) -> CompletedProcess[str]``
                              /usr/bin/kubectl with ``kubeconfig``; raises with stderr on failure
    ``wait_ready(timeout)``   poll ``/readyz`` until it answers ``ok``
    ``node_ip``, ``node_netns``, ``client_netns``, ``workdir``, ``bin_dir``
``kube_node`` -> :class:`Node` (needs ``kube_api``; adds containerd, kubelet, controller-manager,
    scheduler; node Ready in ~20-40 s): ``api``, ``name``, ``node_ip``, ``client_netns``,
    ``import_image(oci_archive) -> list[str]`` (the image names it loaded), ``ctr(*args)``,
    ``wait_pod_ready(ns, name)``, ``node_ready()``, ``timings``, ``cni_conf_dir`` / ``cni_bin_dir``
    (containerd's CNI directories in the work dir: a test may chain its own plugin there). Pods must use
    ``imagePullPolicy: Never`` (there is no registry); :func:`write_oci_archive` and
    :func:`static_image` build images from layer tars / a static C program.

Fixture setup counts against the first test's pytest-timeout: a cold machine builds the binaries
(6-10 min) and a cluster held by another session is waited for (lock, up to 20 min), so files that
use these fixtures mark themselves ``pytest.mark.timeout(2400)`` (as tests/test_kube_cluster.py).
A missing prerequisite skips locally and fails with ``CI=true`` (tests/harness/prereq.py).

Network layout (names are fixed, so one cluster runs per machine at a time: a lock file
serialises sessions)::

    netns enf-k8s-lan  10.250.0.2/24 -- veth -- 10.250.0.1/24  netns enf-k8s-node
      test clients (curl, NetnsLoop)            etcd (127.0.0.1:2379), kube-apiserver (0.0.0.0:6443),
                                                containerd, kubelet, controller-manager, scheduler,
                                                every hostNetwork pod
    machine's netns (pytest): 127.0.0.1:<port> --- forwarder process (tests/harness/kube/forward.py)
                                                   --> 127.0.0.1:6443 inside enf-k8s-node

Choice for reaching the API from the machine's namespace: a small stdlib TCP forwarder that
listens on the machine's loopback and connects from inside the node namespace, rather than a
veth and route into the machine's namespace: nothing of the machine's network is touched, and the
apiserver's certificate covers 127.0.0.1. In-cluster clients (pods) get ``KUBERNETES_SERVICE_HOST
=10.96.0.1``; with no kube-proxy here, an nft DNAT in the node namespace sends 10.96.0.1:443 to
the apiserver (whose certificate names 10.96.0.1 and kubernetes.default.svc).

Binaries: kube-* from ``scripts/k8s-build`` (cached; a fresh machine builds them for 6-10
minutes, the fixture prints progress), etcd/containerd/runc/CNI plugins from Debian
(scripts/setup). Facts, flags and gotchas: shared notes deploy-testing.md §2. Identities: static
tokens for admin (system:masters), the kubelet (system:node:enf-k8s-node, Node authorizer),
controller-manager (with per-controller service-account credentials) and scheduler, as kubeadm
does with certificates. kubelet and containerd keep their state in the work directory, except
what kubelet 1.20 hard-codes (/var/log/pods, /var/log/containers: removed on teardown if this
harness created them) and the pod cgroups (``kubepods`` in each cgroup v1 hierarchy: removed).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import fcntl
import gzip
import hashlib
import io
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.harness.prereq import missing

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent / "kube"
CACHE = Path(os.environ.get("ENFORCER_TEST_CACHE", "/var/cache/enforcer-test"))
LOCK = Path("/run/lock/enforcer-test-k8s-cluster.lock")

NODE_NETNS = "enf-k8s-node"
CLIENT_NETNS = "enf-k8s-lan"
NODE_IP = "10.250.0.1"
CLIENT_IP = "10.250.0.2"
NODE_NAME = "enf-k8s-node"
API_PORT = 6443
SERVICE_CIDR = "10.96.0.0/24"
SERVICE_IP = "10.96.0.1"  # the `kubernetes` Service: pods' KUBERNETES_SERVICE_HOST
POD_CIDR = "10.244.0.0/24"
PAUSE_IMAGE = "enforcer.test/pause:1"
KUBECTL = "/usr/bin/kubectl"
# Debian package that provides each host tool the cluster needs (scripts/setup installs them)
HOST_TOOLS = {
    "etcd": "etcd-server",
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "gcc": "gcc",
    "nsenter": "util-linux",
    "nft": "nftables",
    "ip": "iproute2",
}
CNI_BIN_DIR = Path("/usr/lib/cni")

BUILD_TIMEOUT = 1800.0  # a cold scripts/k8s-build on a busy 2-core machine
LOCK_TIMEOUT = 1200.0  # another session's cluster tests on this machine
API_READY_TIMEOUT = 120.0
NODE_READY_TIMEOUT = 180.0


def _progress(msg: str) -> None:
    """Progress lines that show even while pytest captures output (a cold start takes minutes)."""
    stream = sys.__stderr__
    if stream is not None:
        stream.write(f"[kube] {msg}\n")
        stream.flush()


# ----------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A long-running process this harness started; stopped by its PID only."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 30) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


def _spawn(name: str, argv: list[str], logdir: Path, *, netns: str | None = NODE_NETNS) -> Proc:
    """Start ``argv`` (inside ``netns`` through ``nsenter --net``, which keeps /sys and cgroups as they are)."""
    log = logdir / f"{name}.log"
    prefix = ["nsenter", f"--net=/run/netns/{netns}", "--"] if netns else []
    with log.open("ab") as out:
        popen = subprocess.Popen(
            [*prefix, *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Proc(name, popen, log)


def _wait_for(what: str, check: Callable[[], bool], timeout: float, procs: list[Proc], interval: float = 0.5) -> float:
    """Poll ``check`` until true; return seconds waited. Fails fast (with its log) if a process dies."""
    start = time.monotonic()
    while True:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited ({p.popen.returncode}) while waiting for {what}:\n{p.tail()}")
        with contextlib.suppress(Exception):
            if check():
                return time.monotonic() - start
        if time.monotonic() - start > timeout:
            logs = "\n".join(f"--- {p.name}:\n{p.tail(15)}" for p in procs)
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")
        time.sleep(interval)


def _run(
    argv: list[str], *, timeout: float = 60.0, check: bool = True, netns: str | None = None
) -> subprocess.CompletedProcess[str]:
    prefix = ["nsenter", f"--net=/run/netns/{netns}", "--"] if netns else []
    done = subprocess.run(
        [*prefix, *argv], capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done


# ----------------------------------------------------------------------------- prerequisites and binaries


def host_tools_missing() -> list[str]:
    """Host tools (with their Debian package) that are absent."""
    absent = [f"{tool} (package {pkg})" for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None]
    if not Path(KUBECTL).exists():
        absent.append(KUBECTL)
    for plugin in ("bridge", "host-local", "loopback"):
        if not (CNI_BIN_DIR / plugin).exists():
            absent.append(f"{CNI_BIN_DIR / plugin} (package containernetworking-plugins)")
    return absent


def require_cluster_prerequisites() -> None:
    """Root and the host tools: skip locally, fail in CI (tests/harness/prereq.py)."""
    if os.geteuid() != 0:
        missing("kubernetes cluster: needs root")
    absent = host_tools_missing()
    if absent:
        missing(f"kubernetes cluster: {', '.join(absent)} (run scripts/setup)")


def k8s_binaries(timeout: float = BUILD_TIMEOUT) -> Path:
    """The directory holding kube-apiserver & co, from ``scripts/k8s-build`` (builds on first use, under its lock).

    The script's progress lines (stderr) are shown as they come: a cold build takes 6-10 minutes.
    """
    start = time.monotonic()
    _progress("scripts/k8s-build (cached: a second; a fresh machine builds for 6-10 minutes)")
    err_lines: list[str] = []
    out_lines: list[str] = []
    with subprocess.Popen(
        [str(REPO / "scripts" / "k8s-build")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:

        def relay() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                err_lines.append(line)
                _progress(line.rstrip())

        def collect() -> None:
            assert proc.stdout is not None
            out_lines.extend(proc.stdout)

        readers = [threading.Thread(target=f, daemon=True) for f in (relay, collect)]
        for t in readers:
            t.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(30)
            raise TimeoutError(f"scripts/k8s-build took more than {timeout:.0f} s") from None
        finally:
            for t in readers:
                t.join(10)
    out = "".join(out_lines)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/k8s-build failed ({proc.returncode}):\n{''.join(err_lines)[-3000:]}")
    bin_dir = Path(out.strip().splitlines()[-1]) / "bin"
    for b in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet"):
        if not (bin_dir / b).is_file():
            raise RuntimeError(f"scripts/k8s-build printed {bin_dir.parent}, but {b} is not in it")
    _progress(f"binaries in {bin_dir} ({time.monotonic() - start:.0f} s)")
    return bin_dir


# ----------------------------------------------------------------------------- PKI


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_pki(d: Path, *, ips: list[str], dns: list[str]) -> dict[str, Path]:
    """CA, API serving certificate (SANs ``ips`` + ``dns``), service-account RSA key pair; returns the file paths."""
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("enforcer-test-k8s-ca"))
        .issuer_name(_name("enforcer-test-k8s-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    srv_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    srv = (
        x509.CertificateBuilder()
        .subject_name(_name("kube-apiserver"))
        .issuer_name(ca.subject)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    files = {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "ca.key": _pem_key(ca_key),
        "apiserver.crt": srv.public_bytes(serialization.Encoding.PEM),
        "apiserver.key": _pem_key(srv_key),
        "sa.key": _pem_key(sa_key),
        "sa.pub": sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }
    paths = {}
    for name, data in files.items():
        p = d / name
        p.write_bytes(data)
        p.chmod(0o600)
        paths[name] = p
    return paths


def write_kubeconfig(path: Path, *, server: str, ca_file: Path, token: str, user: str = "admin") -> Path:
    """A kubeconfig with one cluster/user/context (token auth, CA embedded)."""
    ca_b64 = base64.b64encode(ca_file.read_bytes()).decode()
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "enf-k8s", "cluster": {"server": server, "certificate-authority-data": ca_b64}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "enf-k8s", "context": {"cluster": "enf-k8s", "user": user}}],
        "current-context": "enf-k8s",
    }
    path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
    path.chmod(0o600)
    return path


# ----------------------------------------------------------------------------- OCI images without a registry


def _tar_bytes(files: Mapping[str, tuple[bytes, int]]) -> bytes:
    """A reproducible tar of ``{path: (content, mode)}`` (parent directories added, uid/gid 0, mtime 0)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for path in sorted(files):
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            data, mode = files[path]
            info = tarfile.TarInfo("/".join(parts))
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_oci_archive(
    out: Path,
    *,
    name: str,
    layers: list[bytes],
    entrypoint: list[str],
    cmd: list[str] | None = None,
    env: list[str] | None = None,
    user: str = "0",
) -> Path:
    """Write an OCI image-layout tar (``ctr images import``-able) named ``name`` from uncompressed layer tars."""
    blobs: dict[str, bytes] = {}

    def add(data: bytes) -> dict[str, object]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    layer_descs, diff_ids = [], []
    for raw in layers:
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        gz = gzip.compress(raw, compresslevel=6, mtime=0)
        layer_descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **add(gz)})
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": entrypoint,
            "Cmd": cmd or [],
            "Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "User": user,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_desc = {"mediaType": "application/vnd.oci.image.config.v1+json", **add(json.dumps(config).encode())}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": layer_descs,
    }
    manifest_desc = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **add(json.dumps(manifest).encode()),
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
    }
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [manifest_desc]}
    entries = {
        "oci-layout": (json.dumps({"imageLayoutVersion": "1.0.0"}).encode(), 0o644),
        "index.json": (json.dumps(index).encode(), 0o644),
    }
    for digest, data in blobs.items():
        entries[f"blobs/sha256/{digest.split(':', 1)[1]}"] = (data, 0o644)
    out.write_bytes(_tar_bytes(entries))
    return out


def compile_static(source: Path, out: Path) -> Path:
    """``gcc -static -Os`` a one-file C program (a few hundred KB, no libraries needed at run time)."""
    _run(["gcc", "-static", "-Os", "-s", "-o", str(out), str(source)], timeout=120)
    return out


def static_image(source: Path, out: Path, *, name: str, binary: str, args: list[str] | None = None) -> Path:
    """An OCI archive holding one static binary ``/<binary>`` built from ``source``, run as its entrypoint."""
    exe = compile_static(source, out.with_suffix(".bin"))
    layer = _tar_bytes({binary: (exe.read_bytes(), 0o755), "etc/hostname": (b"pod\n", 0o644)})
    return write_oci_archive(out, name=name, layers=[layer], entrypoint=[f"/{binary}"], cmd=args)


# ----------------------------------------------------------------------------- netns


def _netns_exists(name: str) -> bool:
    return Path(f"/run/netns/{name}").exists()


def _pids_in_netns(name: str) -> list[int]:
    try:
        ino = os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return []
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(d / "ns" / "net").st_ino == ino:
                    pids.append(int(d.name))
    return pids


def _clear_stale_netns() -> None:
    """A netns left by a crashed run (we hold the lock, so no live cluster owns it): delete it if empty."""
    for ns in (NODE_NETNS, CLIENT_NETNS):
        if not _netns_exists(ns):
            continue
        pids = _pids_in_netns(ns)
        if pids:
            raise RuntimeError(
                f"netns {ns} left by an earlier run still holds processes {pids}; end them and delete it"
            )
        _run(["ip", "netns", "del", ns], check=False)


def _make_netns() -> None:
    _run(["ip", "netns", "add", NODE_NETNS])
    _run(["ip", "netns", "add", CLIENT_NETNS])
    _run(["ip", "-n", NODE_NETNS, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", CLIENT_NETNS])
    for ns, addr in ((NODE_NETNS, NODE_IP), (CLIENT_NETNS, CLIENT_IP)):
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    # no kube-proxy: route the `kubernetes` Service's IP and DNAT it to the apiserver (in-cluster clients)
    _run(["ip", "-n", NODE_NETNS, "route", "add", SERVICE_CIDR, "dev", "eth0"])
    ruleset = (
        "table ip enf-k8s-service {\n"
        "  chain out { type nat hook output priority -100; "
        f"ip daddr {SERVICE_IP} tcp dport 443 dnat to {NODE_IP}:{API_PORT}; }}\n"
        "}\n"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", NODE_NETNS, "nft", "-f", "-"],
        input=ruleset,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"nft (service DNAT) failed: {done.stderr.strip()}")


def _delete_netns() -> None:
    for ns in (CLIENT_NETNS, NODE_NETNS):
        if _netns_exists(ns):
            _run(["ip", "netns", "del", ns], check=False)


# ----------------------------------------------------------------------------- stage 1: control plane


@dataclass
class ControlPlane:
    """etcd + kube-apiserver in the node namespace, with admin access from the machine's namespace."""

    workdir: Path
    bin_dir: Path
    pki: dict[str, Path]
    kubeconfig: Path
    node_kubeconfig: Path
    server: str
    node_server: str
    token: str
    ca_file: Path
    tokens: dict[str, str]
    procs: list[Proc] = field(default_factory=list)
    node_ip: str = NODE_IP
    node_netns: str = NODE_NETNS
    client_netns: str = CLIENT_NETNS
    timings: dict[str, float] = field(default_factory=dict)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``kubectl --kubeconfig <admin> ARGS`` from the machine's namespace; raise with stderr on failure."""
        done = subprocess.run(
            [KUBECTL, "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        """GET ``path`` on the API server as admin; (status, body)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        req = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def wait_ready(self, timeout: float = API_READY_TIMEOUT) -> float:
        """Wait until ``/readyz`` says ok; return the seconds waited."""
        return _wait_for("kube-apiserver /readyz", lambda: self.get("/readyz") == (200, b"ok"), timeout, self.procs)


def _acquire_lock(stack: contextlib.ExitStack) -> None:
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    stack.callback(os.close, fd)
    start = time.monotonic()
    announced = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if not announced:
                _progress(f"another test session runs the cluster ({LOCK}); waiting up to {LOCK_TIMEOUT:.0f} s")
                announced = True
            if time.monotonic() - start > LOCK_TIMEOUT:
                raise TimeoutError(f"{LOCK} held by another session for {LOCK_TIMEOUT:.0f} s") from None
            time.sleep(2)
    stack.callback(fcntl.flock, fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def control_plane() -> Iterator[ControlPlane]:
    """Start etcd + kube-apiserver (stage 1); everything is undone on exit, also after a failed start."""
    t0 = time.monotonic()
    bin_dir = k8s_binaries()
    with contextlib.ExitStack() as stack:
        _acquire_lock(stack)
        _clear_stale_netns()
        workdir = Path(tempfile.mkdtemp(prefix="enf-k8s-"))
        stack.callback(_remove_workdir, workdir)
        logs = workdir / "logs"
        logs.mkdir()
        stack.callback(_delete_netns)
        _make_netns()
        pki = make_pki(
            workdir / "pki",
            ips=["127.0.0.1", NODE_IP, SERVICE_IP],
            dns=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
        )
        tokens = {
            "admin": base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("="),
            "kubelet": base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("="),
            "controller-manager": base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("="),
            "scheduler": base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("="),
        }
        token_file = workdir / "pki" / "tokens.csv"
        token_file.write_text(
            f'{tokens["admin"]},admin,admin,"system:masters"\n'
            f'{tokens["kubelet"]},system:node:{NODE_NAME},kubelet,"system:nodes"\n'
            f"{tokens['controller-manager']},system:kube-controller-manager,kcm\n"
            f"{tokens['scheduler']},system:kube-scheduler,scheduler\n"
        )
        token_file.chmod(0o600)
        procs: list[Proc] = []

        def stop_all() -> None:
            for p in reversed(procs):
                p.stop()

        stack.callback(stop_all)
        procs.append(
            _spawn(
                "etcd",
                [
                    "etcd", "--name", "enf-k8s", "--data-dir", str(workdir / "etcd"),
                    "--listen-client-urls", "http://127.0.0.1:2379", "--advertise-client-urls", "http://127.0.0.1:2379",
                    "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                    "--initial-cluster", "enf-k8s=http://127.0.0.1:2380", "--log-level", "warn",
                ],
                logs,
            )
        )  # fmt: skip
        procs.append(
            _spawn(
                "kube-apiserver",
                [
                    str(bin_dir / "kube-apiserver"),
                    "--etcd-servers=http://127.0.0.1:2379",
                    "--bind-address=0.0.0.0", f"--secure-port={API_PORT}", "--insecure-port=0",
                    f"--advertise-address={NODE_IP}",
                    f"--tls-cert-file={pki['apiserver.crt']}", f"--tls-private-key-file={pki['apiserver.key']}",
                    f"--client-ca-file={pki['ca.crt']}", f"--token-auth-file={token_file}",
                    "--authorization-mode=Node,RBAC",
                    f"--service-account-key-file={pki['sa.pub']}",
                    f"--service-account-signing-key-file={pki['sa.key']}",
                    "--service-account-issuer=https://kubernetes.default.svc",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--allow-privileged=true",
                    "--endpoint-reconciler-type=none",
                    "--kubelet-preferred-address-types=InternalIP",
                    "--enable-priority-and-fairness=false",
                    "--profiling=false",
                    "--v=1",
                ],
                logs,
            )
        )  # fmt: skip
        forward = _spawn(
            "forward",
            [sys.executable, str(HERE / "forward.py"), f"/run/netns/{NODE_NETNS}", "127.0.0.1", str(API_PORT)],
            logs,
            netns=None,
        )
        procs.append(forward)
        _wait_for("the API forwarder's port", lambda: forward.log.read_text().strip().isdigit(), 20, procs, 0.05)
        server = f"https://127.0.0.1:{forward.log.read_text().strip()}"
        node_server = f"https://{NODE_IP}:{API_PORT}"
        cp = ControlPlane(
            workdir=workdir,
            bin_dir=bin_dir,
            pki=pki,
            kubeconfig=write_kubeconfig(
                workdir / "admin.kubeconfig", server=server, ca_file=pki["ca.crt"], token=tokens["admin"]
            ),
            node_kubeconfig=write_kubeconfig(
                workdir / "admin-node.kubeconfig", server=node_server, ca_file=pki["ca.crt"], token=tokens["admin"]
            ),
            server=server,
            node_server=node_server,
            token=tokens["admin"],
            ca_file=pki["ca.crt"],
            tokens=tokens,
            procs=procs,
        )
        waited = cp.wait_ready()
        cp.timings["apiserver_ready_s"] = waited
        cp.timings["control_plane_s"] = time.monotonic() - t0
        _progress(
            f"kube-apiserver ready in {waited:.1f} s (stage 1 total {cp.timings['control_plane_s']:.1f} s) at {server}"
        )
        yield cp


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` (from /proc/self/mountinfo), deepest first."""
    prefix = str(root.resolve())
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def _unmount_under(root: Path) -> None:
    for _ in range(5):
        points = _mounts_under(root)
        if not points:
            return
        for p in points:
            if _run(["umount", p], check=False).returncode != 0:
                _run(["umount", "-l", p], check=False)


def _remove_workdir(workdir: Path) -> None:
    _unmount_under(workdir)
    shutil.rmtree(workdir, ignore_errors=True)


# ----------------------------------------------------------------------------- stage 2: the node

CONTAINERD_CONFIG = """\
version = 2
root = "{w}/containerd/root"
state = "{w}/containerd/state"
[grpc]
  address = "{w}/containerd/containerd.sock"
[ttrpc]
  address = "{w}/containerd/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{w}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # required: without CAP_SYS_RESOURCE (absent from this machine's bounding set) runc cannot lower
  # the sandbox's oom_score_adj and fails "can't get final child's PID from pipe: EOF"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # pod namespaces under /var/run/netns (containerd's default, where a real node has them and where
  # pod mode's DaemonSet mounts them from); _remove_pod_netns removes any a crash leaves there
  netns_mounts_under_state_dir = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{w}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{w}/cni/net.d"
"""

# Paths kubelet 1.20 / containerd use whatever their flags say (pod logs, the device-plugin socket,
# shim sockets): removed on teardown when this harness made them.
HARDCODED_PATHS = (
    Path("/var/log/pods"),
    Path("/var/log/containers"),
    Path("/var/lib/kubelet"),
    Path("/run/containerd"),
    Path("/etc/cni"),
    Path("/opt/containerd"),
    Path("/usr/libexec/kubernetes"),
)


@dataclass
class Node:
    """containerd + kubelet + controller-manager + scheduler: one Ready node named ``enf-k8s-node``."""

    api: ControlPlane
    workdir: Path
    socket: Path
    procs: list[Proc] = field(default_factory=list)
    name: str = NODE_NAME
    node_ip: str = NODE_IP
    client_netns: str = CLIENT_NETNS
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def cni_conf_dir(self) -> Path:
        """containerd's CNI configuration directory (the harness writes ``10-enf-k8s.conflist``; reloaded on change)."""
        return self.workdir / "cni" / "net.d"

    @property
    def cni_bin_dir(self) -> Path:
        """containerd's CNI plugin directory: links to the Debian plugins; a test may add its own plugin here."""
        return self.workdir / "cni" / "bin"

    def ctr(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ctr`` against this node's containerd, namespace ``k8s.io`` (the one kubelet's CRI uses)."""
        return _run(
            ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args], timeout=timeout, check=check
        )

    def import_image(self, oci_archive: Path, timeout: float = 300.0) -> list[str]:
        """Load an OCI image archive into the node (pods then use it with ``imagePullPolicy: Never``); its names."""
        self.ctr("images", "import", str(oci_archive), timeout=timeout)  # unpacks for the CRI's snapshotter
        names = self._names_in(oci_archive)
        listed = set(self.ctr("images", "ls", "-q").stdout.split())
        if not set(names) <= listed:
            raise RuntimeError(f"imported {oci_archive}, but {sorted(set(names) - listed)} not in `ctr images ls`")
        return names

    @staticmethod
    def _names_in(oci_archive: Path) -> list[str]:
        with tarfile.open(oci_archive) as tar:
            member = tar.extractfile("index.json")
            index = json.loads(member.read()) if member else {}
        return [m.get("annotations", {}).get("io.containerd.image.name", "") for m in index.get("manifests", [])]

    def wait_pod_ready(self, namespace: str, name: str, timeout: float = 120.0) -> float:
        """Wait until the pod's Ready condition is True; return the seconds waited."""

        def ready() -> bool:
            status, body = self.api.get(f"/api/v1/namespaces/{namespace}/pods/{name}")
            conds = json.loads(body).get("status", {}).get("conditions", []) if status == 200 else []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

        return _wait_for(f"pod {namespace}/{name} Ready", ready, timeout, self.procs + self.api.procs, 1.0)

    def node_ready(self) -> bool:
        status, body = self.api.get(f"/api/v1/nodes/{self.name}")
        if status != 200:
            return False
        node = json.loads(body)
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))
        return ready and not node["spec"].get("taints")


def _created_by_us(paths: tuple[Path, ...]) -> list[Path]:
    return [p for p in paths if not p.exists()]


def _cgroup_roots() -> list[Path]:
    base = Path("/sys/fs/cgroup")
    return [d for d in base.iterdir() if d.is_dir()] if base.is_dir() else []


def _rmdir_tree(d: Path) -> None:
    """Remove a cgroup directory tree bottom-up (cgroupfs allows only rmdir of empty groups)."""
    for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        d.rmdir()


def _remove_containers(node: Node) -> None:
    """Kill and delete every task and container left in containerd's k8s.io namespace (pod sandboxes too)."""
    tasks = node.ctr("tasks", "ls", "-q", check=False).stdout.split()
    for t in tasks:
        node.ctr("tasks", "kill", "-s", "SIGKILL", t, check=False, timeout=20)
    for t in tasks:
        node.ctr("tasks", "delete", "-f", t, check=False, timeout=30)
    for c in node.ctr("containers", "ls", "-q", check=False).stdout.split():
        node.ctr("containers", "rm", c, check=False, timeout=30)


def _our_shims(socket: Path) -> list[int]:
    """containerd-shim processes started by this node's containerd (their command line names its socket)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (d / "cmdline").read_bytes().split(b"\0")
                if argv and argv[0].endswith(b"containerd-shim-runc-v2") and str(socket).encode() in argv:
                    pids.append(int(d.name))
    return pids


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _remove_pod_netns(before: set[str]) -> None:
    """Pod network namespaces containerd's CNI made (``/run/netns/cni-*``) that were not there before."""
    base = Path("/run/netns")
    for ns in base.glob("cni-*") if base.is_dir() else []:
        if ns.name not in before:
            _run(["umount", str(ns)], check=False)
            with contextlib.suppress(OSError):
                ns.unlink()


@contextlib.contextmanager
def node(api: ControlPlane) -> Iterator[Node]:
    """Start containerd, kubelet, controller-manager and scheduler (stage 2); undone on exit, also after a failed start."""
    t0 = time.monotonic()
    w = api.workdir / "node"
    logs = api.workdir / "logs"
    for d in ("containerd", "cni/net.d", "cni/ipam", "cni/bin", "kubelet/pki", "kubelet/volume-plugins", "images"):
        (w / d).mkdir(parents=True, exist_ok=True)
    for plugin in sorted(CNI_BIN_DIR.iterdir()):  # a plugin dir of our own, so a test can chain its own plugin
        link = w / "cni" / "bin" / plugin.name
        if not link.is_symlink():
            link.symlink_to(plugin)
    with contextlib.ExitStack() as stack:
        ours = _created_by_us(HARDCODED_PATHS)
        cgroups = [root / "kubepods" for root in _cgroup_roots() if not (root / "kubepods").exists()]
        netns_before = {p.name for p in Path("/run/netns").glob("cni-*")}

        def cleanup_host() -> None:
            _remove_pod_netns(netns_before)
            for cg in cgroups:
                _rmdir_tree(cg)
            _unmount_under(w)
            for p in ours:
                _unmount_under(p)
                shutil.rmtree(p, ignore_errors=True)

        stack.callback(cleanup_host)
        socket = w / "containerd" / "containerd.sock"
        procs: list[Proc] = []
        n = Node(api=api, workdir=w, socket=socket, procs=procs)

        (w / "containerd" / "config.toml").write_text(
            CONTAINERD_CONFIG.format(w=w, pause=PAUSE_IMAGE, cni_bin=w / "cni" / "bin")
        )
        cni = {
            "cniVersion": "0.4.0",
            "name": "enf-k8s",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(w / "cni" / "ipam"),
                    },
                }
            ],
        }
        (w / "cni" / "net.d" / "10-enf-k8s.conflist").write_text(json.dumps(cni, indent=2))

        def stop_containerd_side() -> None:
            for p in reversed(procs):
                if p.name != "containerd":
                    p.stop()
            if any(p.name == "containerd" and p.alive() for p in procs):
                _remove_containers(n)
            for p in procs:
                if p.name == "containerd":
                    p.stop()
            _kill_pids(_our_shims(socket))

        stack.callback(stop_containerd_side)
        procs.append(_spawn("containerd", ["containerd", "--config", str(w / "containerd" / "config.toml")], logs))
        _wait_for("containerd", lambda: n.ctr("version", timeout=5, check=False).returncode == 0, 30, procs, 0.2)
        n.timings["containerd_s"] = time.monotonic() - t0

        pause = static_image(HERE / "pause.c", w / "images" / "pause.tar", name=PAUSE_IMAGE, binary="pause")
        n.import_image(pause)
        n.timings["pause_image_s"] = time.monotonic() - t0

        def kubeconfig(user: str) -> Path:
            return write_kubeconfig(
                w / f"{user}.kubeconfig",
                server=f"https://127.0.0.1:{API_PORT}",
                ca_file=api.ca_file,
                token=api.tokens[user],
                user=user,
            )

        procs.append(
            _spawn(
                "kubelet",
                [
                    str(api.bin_dir / "kubelet"),
                    f"--kubeconfig={kubeconfig('kubelet')}",
                    "--container-runtime=remote",
                    f"--container-runtime-endpoint=unix://{socket}",
                    "--runtime-request-timeout=5m",
                    "--cgroup-driver=cgroupfs",
                    "--fail-swap-on=false",
                    f"--node-ip={NODE_IP}",
                    f"--hostname-override={NODE_NAME}",
                    f"--root-dir={w / 'kubelet'}",
                    f"--cert-dir={w / 'kubelet' / 'pki'}",
                    f"--volume-plugin-dir={w / 'kubelet' / 'volume-plugins'}",
                    f"--pod-infra-container-image={PAUSE_IMAGE}",
                    f"--cni-conf-dir={w / 'cni' / 'net.d'}",
                    f"--cni-bin-dir={CNI_BIN_DIR}",
                    "--eviction-hard=",
                    "--image-gc-high-threshold=100",
                    "--read-only-port=0",
                    "--healthz-bind-address=127.0.0.1",
                    "--v=1",
                ],
                logs,
            )
        )  # fmt: skip
        procs.append(
            _spawn(
                "kube-controller-manager",
                [
                    str(api.bin_dir / "kube-controller-manager"),
                    f"--kubeconfig={kubeconfig('controller-manager')}",
                    "--controllers=*,-nodeipam",
                    f"--root-ca-file={api.ca_file}",
                    f"--service-account-private-key-file={api.pki['sa.key']}",
                    "--use-service-account-credentials=true",
                    f"--flex-volume-plugin-dir={w / 'kubelet' / 'volume-plugins'}",
                    f"--cluster-signing-cert-file={api.pki['ca.crt']}",
                    f"--cluster-signing-key-file={api.pki['ca.key']}",
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    "--port=0",
                    "--v=1",
                ],
                logs,
            )
        )  # fmt: skip
        procs.append(
            _spawn(
                "kube-scheduler",
                [
                    str(api.bin_dir / "kube-scheduler"),
                    f"--kubeconfig={kubeconfig('scheduler')}",
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    "--port=0",
                    "--v=1",
                ],
                logs,
            )
        )  # fmt: skip
        everything = procs + api.procs
        t_start = time.monotonic()
        _wait_for(f"node {NODE_NAME} Ready and untainted", n.node_ready, NODE_READY_TIMEOUT, everything, 1.0)
        n.timings["node_ready_s"] = time.monotonic() - t_start

        def default_sa() -> bool:
            return api.get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200

        _wait_for("service account default/default", default_sa, 60, everything, 0.5)
        n.timings["node_stage_s"] = time.monotonic() - t0
        _progress(
            f"node {NODE_NAME} Ready {n.timings['node_ready_s']:.1f} s after kubelet start "
            f"(stage 2 total {n.timings['node_stage_s']:.1f} s)"
        )
        yield n


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def kube_api() -> Iterator[ControlPlane]:
    """A real kube-apiserver v1.20.2 + etcd for the whole session (see the module docstring)."""
    require_cluster_prerequisites()
    with control_plane() as cp:
        yield cp


@pytest.fixture(scope="session")
def kube_node(kube_api: ControlPlane) -> Iterator[Node]:
    """A Ready node (containerd + kubelet + controllers) on ``kube_api`` for the whole session."""
    with node(kube_api) as n:
        yield n
