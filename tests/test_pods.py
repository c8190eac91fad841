"""Pods: finding a pod's network namespace from /proc, and serving a pod inside its namespace."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from enforcer.config import definitions
from enforcer.config import settings as settings_mod
from enforcer.config.definitions import parse_documents, resolve_definitions
from enforcer.net import nftables, pods
from enforcer.net.netns import run_in_netns
from enforcer.net.pods import PodNetns, find_pod_netns, parse_start_time, pod_uid_from_cgroup
from enforcer.net.sockopt import SO_MARK, redirected_destination
from enforcer.run.attach import Attachment, PodAttachment, build_pod_redirect
from tests.harness.netns import Hosts, connect, ip, refused, require_root, veth_hosts
from tests.harness.prereq import missing
from tests.harness.redirector import FakeRedirector
from tests.harness.seed import SERVICE, SPEC

UID = "3c6b5c5f-1b7e-4c5a-9d3e-0a1b2c3d4e5f"
UID_ = UID.replace("-", "_")
CID = "8d3f0e1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6"

# /proc/<pid>/cgroup of a container process, as real kubelets and runtimes lay it out
CGROUP_SAMPLES = {
    "cgroup v1, cgroupfs driver, BestEffort": "\n".join(
        f"{n}:{c}:/kubepods/besteffort/pod{UID}/{CID}"
        for n, c in ((12, "pids"), (11, "memory"), (4, "cpu,cpuacct"), (1, "name=systemd"))
    ),
    "cgroup v1, cgroupfs driver, Guaranteed": f"4:memory:/kubepods/pod{UID}/{CID}\n",
    "cgroup v2, cgroupfs driver, Burstable": f"0::/kubepods/burstable/pod{UID}/{CID}\n",
    "cgroup v1, systemd driver, containerd": (
        "12:pids:/kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
        "1:name=systemd:/kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
    ),
    "cgroup v2, systemd driver, Guaranteed, CRI-O": (
        f"0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope\n"
    ),
    "cgroup v2, systemd driver, kind (kubelet cgroup root)": (
        "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
        f"kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
    ),
    "cgroup v2, seen from the enforcer's cgroup namespace": (
        f"0::/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
    ),
    "cgroup v1 hybrid: an empty v2 line first": f"0::/\n7:memory:/kubepods/besteffort/pod{UID}/{CID}\n",
}

NOT_A_POD = {
    "host init": "0::/init.scope\n",
    "a host service": "0::/system.slice/containerd.service\n",
    "podman, whose names hold 'pod'": "0::/machine.slice/libpod-pod1234.scope\n",
    "the pods QoS slice itself": "0::/kubepods.slice/kubepods-besteffort.slice\n",
    "a short id after 'pod'": "4:memory:/kubepods/besteffort/pod1234/abc\n",
    "empty": "",
}


@pytest.mark.parametrize("text", CGROUP_SAMPLES.values(), ids=CGROUP_SAMPLES.keys())
def test_pod_uid_from_real_cgroup_layouts(text: str) -> None:
    """Every kubelet layout (v1/v2, cgroupfs/systemd driver, QoS classes, cgroup namespaces) yields the pod UID with dashes."""
    assert pod_uid_from_cgroup(text) == UID


@pytest.mark.parametrize("text", NOT_A_POD.values(), ids=NOT_A_POD.keys())
def test_no_pod_uid_outside_pods(text: str) -> None:
    """Processes that are not in a pod's cgroup (host services, other tools' pods) have no pod UID."""
    assert pod_uid_from_cgroup(text) is None


_LAYOUTS = (
    "4:memory:/kubepods/{qos}pod{uid}/{cid}",
    "0::/kubepods.slice/kubepods-{qos_}pod{uid_}.slice/cri-containerd-{cid}.scope",
    "0::/../kubepods-{qos_}pod{uid_}.slice/docker-{cid}.scope",
)


@given(
    pod=st.uuids(),
    layout=st.sampled_from(_LAYOUTS),
    qos=st.sampled_from(["", "besteffort", "burstable"]),
    cid=st.text(alphabet="0123456789abcdef", min_size=1, max_size=64),
)
def test_pod_uid_roundtrip(pod: uuid.UUID, layout: str, qos: str, cid: str) -> None:
    """Any pod UID written in any layout is read back exactly."""
    text = layout.format(
        qos=f"{qos}/" if qos else "", qos_=f"{qos}-" if qos else "", uid=pod, uid_=str(pod).replace("-", "_"), cid=cid
    )
    assert pod_uid_from_cgroup(text) == str(pod)


@given(st.text())
def test_pod_uid_never_raises(text: str) -> None:
    """Arbitrary file contents give a UID-shaped string or None, never an exception."""
    found = pod_uid_from_cgroup(text)
    assert found is None or uuid.UUID(found)


@given(
    pid=st.integers(1, 2**22),
    comm=st.text(st.characters(blacklist_characters="\0"), max_size=15),
    start=st.integers(0, 2**63),
)
def test_start_time_survives_any_command_name(pid: int, comm: str, start: int) -> None:
    """Field 22 is found whatever the command name holds (spaces, parentheses, newlines)."""
    fields = ["S", "1", str(pid), str(pid), "0", "-1", "4194560"] + ["0"] * 12 + [str(start), "1234", "56"]
    assert parse_start_time(f"{pid} ({comm}) {' '.join(fields)}\n") == start


@pytest.mark.parametrize("line", ["", "123 (sleep) S 1 2 3", "no parenthesis at all " + "1 " * 30])
def test_start_time_of_a_malformed_line_raises(line: str) -> None:
    """A line too short to hold field 22, or without the command name, is refused."""
    with pytest.raises(ValueError, match="stat"):
        parse_start_time(line)


def test_start_time_of_this_process() -> None:
    """Our own /proc/self/stat parses, and we started after PID 1."""
    ours = parse_start_time(Path("/proc/self/stat").read_text())
    assert ours >= parse_start_time(Path("/proc/1/stat").read_text())


@pytest.mark.root
def test_our_own_namespace_addresses_include_loopback() -> None:
    """The real dump of this namespace (over rtnetlink, from a thread inside it) lists 127.0.0.1."""
    require_root()
    assert ipaddress.ip_address("127.0.0.1") in pods.netns_addresses("/proc/self/ns/net")


def test_pod_netns_refuses_what_is_not_a_network_namespace() -> None:
    """Opening another kind of namespace, or a plain file, as a pod's network namespace fails."""
    for path in ("/proc/self/ns/uts", "/proc/self/stat"):
        with pytest.raises(ValueError, match="not a network namespace"):
            PodNetns.open(path)
    with pytest.raises(FileNotFoundError):
        PodNetns.open("/proc/self/ns/no-such")


def test_pod_netns_path_is_gone_once_closed() -> None:
    """A closed PodNetns gives no path (its fd number may name another file by then)."""
    held = PodNetns.open("/proc/self/ns/net")
    assert held.path == f"/proc/self/fd/{held.fd}" and os.fstat(held.fd).st_ino == held.inode
    held.close()
    held.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        _ = held.path


# ---------------------------------------------------------------------------------------------
# the /proc scan against real namespaces and processes (root)

P = os.getpid()


@contextlib.contextmanager
def namespace(name: str, *addresses: str) -> Iterator[str]:
    """A network namespace holding ``addresses`` on its loopback device (no dummy module needed)."""
    try:
        ip("netns", "add", name)
        ip("-n", name, "link", "set", "lo", "up")
        for address in addresses:
            ip("-n", name, "addr", "add", address, "dev", "lo")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@contextlib.contextmanager
def sleeper(netns: str | None, *, user: int | None = None) -> Iterator[int]:
    """A sleeping process inside ``netns`` (None: ours), as ``user`` (None: root); its pid."""
    argv = ["sleep", "300"]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + 10
        while argv[0] != "sleep" and time.monotonic() < deadline:  # `ip netns exec`, setpriv exec sleep
            if Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep":
                break
            time.sleep(0.01)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.root
def test_scan_finds_each_pod_and_applies_both_guards() -> None:
    """The scan holds the namespace of a pod's oldest process that holds a pod IP, never the host's, never a foreign one."""
    require_root()
    uids = {k: str(uuid.uuid4()) for k in ("ok", "host", "foreign", "transit", "oldest", "absent", "noip")}
    ips = {
        uids["ok"]: ["10.99.0.11"], uids["host"]: ["10.99.0.12"], uids["foreign"]: ["10.99.0.13"],
        uids["transit"]: ["fd00:99::14"], uids["oldest"]: ["10.99.0.15"], uids["absent"]: ["10.99.0.16"],
        uids["noip"]: [],
    }
    with contextlib.ExitStack() as stack:
        ns_ok = stack.enter_context(namespace(f"ppod-ok-{P}", "10.99.0.11/32"))
        ns_foreign = stack.enter_context(namespace(f"ppod-fo-{P}", "10.99.0.99/32"))
        ns_transit_wrong = stack.enter_context(namespace(f"ppod-tw-{P}", "fd00:99::99/128"))
        ns_transit_right = stack.enter_context(namespace(f"ppod-tr-{P}", "fd00:99::14/128"))
        ns_old = stack.enter_context(namespace(f"ppod-o1-{P}", "10.99.0.15/32"))
        ns_young = stack.enter_context(namespace(f"ppod-o2-{P}", "10.99.0.15/32"))
        owner: dict[int, str] = {}
        # "transit": its oldest process sits in a namespace without the pod's IP, a younger one in the right one
        for key, ns in (("ok", ns_ok), ("host", None), ("foreign", ns_foreign), ("transit", ns_transit_wrong),
                        ("transit", ns_transit_right), ("oldest", ns_old), ("oldest", ns_young),
                        ("noip", ns_ok)):
            owner[stack.enter_context(sleeper(ns))] = uids[key]
            time.sleep(0.02)  # distinct start times (clock ticks are 10 ms)
        result = find_pod_netns(ips, pod_uid_of=owner.get)
        held = result.found[uids["ok"]]
        for other in result.found.values():
            if other is not held:
                stack.callback(other.close)

        inode = {ns: os.stat(f"/run/netns/{ns}").st_ino for ns in (ns_ok, ns_transit_right, ns_old)}
        assert {uid: h.inode for uid, h in result.found.items()} == {
            uids["ok"]: inode[ns_ok], uids["transit"]: inode[ns_transit_right], uids["oldest"]: inode[ns_old],
        }
        assert set(result.refused) == {uids[k] for k in ("host", "foreign", "absent", "noip")}
        assert "host network namespace" in result.refused[uids["host"]]
        assert "none of the pod's IPs (10.99.0.13)" in result.refused[uids["foreign"]]
        assert "no process" in result.refused[uids["absent"]]
        assert "no IP known" in result.refused[uids["noip"]]
        # each held namespace is pinned: its process may go, the namespace (and its address) stays
        assert held.uid == uids["ok"] and owner[held.pid] == uids["ok"]
    try:
        assert ipaddress.ip_address("10.99.0.11") in pods.netns_addresses(held.path)  # processes gone, netns deleted
    finally:
        held.close()
    assert pods.fds_into(held.inode) == []


@pytest.mark.root
def test_scan_without_ptrace_says_why() -> None:
    """Without CAP_SYS_PTRACE the namespace of another user's process cannot be opened, and the scan says so."""
    require_root()
    if shutil.which("setpriv") is None:
        missing("setpriv (util-linux, part of Debian's base system)")
    uid = str(uuid.uuid4())
    with namespace(f"ppod-np-{P}", "10.99.0.21/32") as ns, sleeper(ns, user=65534) as pid:
        script = (
            "import json; from enforcer.net.pods import find_pod_netns; "
            f"r = find_pod_netns({{{uid!r}: ['10.99.0.21']}}, pod_uid_of={{{pid}: {uid!r}}}.get); "
            "print(json.dumps([sorted(r.found), r.refused]))"
        )
        argv = [sys.executable, "-c", script]
        found = [json.loads(subprocess.run(
            [*prefix, *argv], capture_output=True, text=True, check=True, timeout=60).stdout)
            for prefix in ([], ["setpriv", "--bounding-set=-sys_ptrace", "--"])]
    assert found[0] == [[uid], {}]
    assert found[1][0] == [] and "CAP_SYS_PTRACE" in found[1][1][uid]


# ---------------------------------------------------------------------------------------------
# PodAttachment


def _settings(tmp_path: Path, **redirect: object) -> settings_mod.Settings:
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(yaml.safe_dump({
        "tags": ["node=n1"], "stateDir": "state", "logsDir": "logs", "definitions": [{"file": "d.yaml"}],
        "listen": {"port": 15443}, "redirect": {"enabled": True, **redirect},
    }))
    return settings_mod.load_settings(cfg)


def _definitions(*services: dict[str, object]) -> definitions.Definitions:
    parsed = parse_documents(yaml.safe_dump_all([*services, SPEC]), "d.yaml")
    assert isinstance(parsed, list)
    return resolve_definitions(parsed, ("node=n1",))


FRONTEND = {**SERVICE, "port": 8080, "upstreamHost": "127.0.0.1"}
BACKEND = {**SERVICE, "name": "backend", "port": 9090, "exposedPort": 8443, "hosts": ["api.example.com"],
           "OIDCCallbackURL": "https://api.example.com", "selectors": [["app=backend"]]}


def _fake_pod(tmp_path: Path, tags: set[str], **redirect: object) -> tuple[PodAttachment, FakeRedirector]:
    fake = FakeRedirector()
    return PodAttachment(PodNetns.open("/proc/self/ns/net", uid=UID), _settings(tmp_path, **redirect),
                         tags=frozenset(tags), redirector=fake), fake


async def test_each_pod_gets_only_the_services_its_tags_select(tmp_path: Path) -> None:
    """Handed the whole catalog, a pod's attachment installs only the services its tags select, blocking their app ports."""
    defs = _definitions(FRONTEND, BACKEND)
    front, front_fake = _fake_pod(tmp_path, {"app=frontend"})
    back, back_fake = _fake_pod(tmp_path, {"app=backend"})
    try:
        attachment: Attachment = front
        assert attachment.name == f"pod {UID}" and attachment.listen_port == 0
        await front.apply(defs)
        await back.apply(defs)
        assert [s.name for s in front.services] == ["private-app"]
        assert [s.name for s in back.services] == ["backend"]
        [front_rs], [back_rs] = front_fake.applied, back_fake.applied
        assert front_rs == build_pod_redirect(front.services, front.settings, 15443)
        assert "tcp dport 443 counter redirect to :15443" in front_rs.render_nft()
        assert 'iifname != "lo" tcp dport 8080 counter reject' in front_rs.render_nft()
        assert "tcp dport 8443 counter redirect to :15443" in back_rs.render_nft()
        assert 'tcp dport 9090 counter reject' in back_rs.render_nft()
        assert "8080" not in back_rs.render_nft()
    finally:
        front.close()
        back.close()


async def test_a_label_change_reapplies_and_undo_restores(tmp_path: Path) -> None:
    """New tags select other services on the next apply; undo puts back the previous ruleset and services."""
    defs = _definitions(FRONTEND, BACKEND)
    pod, fake = _fake_pod(tmp_path, {"app=frontend"})
    try:
        await pod.apply(defs)
        await (await pod.apply(defs))()  # unchanged: nothing sent, nothing to undo
        assert len(fake.applied) == 1
        first = pod.ruleset
        pod.tags = frozenset({"app=frontend", "app=backend"})
        undo = await pod.apply(defs)
        assert [s.name for s in pod.services] == ["private-app", "backend"] and len(fake.applied) == 2
        await undo()
        assert pod.ruleset == first and [s.name for s in pod.services] == ["private-app"]
        pod.tags = frozenset()
        await pod.apply(defs)
        assert pod.services == ()  # nothing selects it: the daemon releases it
    finally:
        pod.close()


@pytest.mark.parametrize(("keep", "removed", "reason"), [(True, [], "ports_blocked"),
                                                        (False, ["enforcer"], "ports_unblocked")])
async def test_stop_follows_the_hosts_rule(tmp_path: Path, keep: bool, removed: list[str], reason: str) -> None:
    """A clean stop keeps the pod's table unless keepBlockOnStop is off, and the flow record names the pod."""
    pod, fake = _fake_pod(tmp_path, {"app=frontend"}, keepBlockOnStop=keep)
    try:
        await pod.apply(_definitions(FRONTEND))
        await pod.remove()
        assert fake.removed == removed
        [flow] = [json.loads(line) for line in pod.settings.flow_log.read_text().splitlines()]
        assert (flow["method"], flow["reason"]) == ("STOP", reason)
        assert str(flow["endpoint"]).startswith(f"pod {UID}: table inet enforcer ")
    finally:
        pod.close()


async def test_release_removes_the_table_then_closes_and_retries_when_refused(tmp_path: Path) -> None:
    """release() removes the table and closes the namespace; when the removal is refused it raises and keeps it open."""
    pod, fake = _fake_pod(tmp_path, {"app=frontend"})
    await pod.apply(_definitions(FRONTEND))
    fake.refuse = True
    with pytest.raises(nftables.RedirectError):
        await pod.release()
    assert not pod.netns.closed and pod.ruleset is not None
    fake.refuse = False
    await pod.release()
    assert fake.removed == ["enforcer"] and pod.netns.closed and pod.ruleset is None
    [flow] = [json.loads(line) for line in pod.settings.flow_log.read_text().splitlines()]
    assert (flow["method"], flow["reason"]) == ("RELEASE", "ports_unblocked")
    await pod.release()  # a second release is a no-op
    await pod.remove()  # and so is a stop after it
    assert fake.removed == ["enforcer"]
    with pytest.raises(ValueError, match="closed"):
        pod.socket_factory()((socket.AF_INET, socket.SOCK_STREAM, 0, "", ("127.0.0.1", 1)))


# ---------------------------------------------------------------------------------------------
# PodAttachment against a real pod namespace (root)

APP4, CLI4, APP6, CLI6 = "10.99.0.1", "10.99.0.2", "fd00:99::1", "fd00:99::2"


@pytest.fixture
def pod_hosts() -> Iterator[Hosts]:
    """A "pod" namespace and a client namespace joined by a veth."""
    require_root()
    with veth_hosts(f"ppod-c-{P}", f"ppod-p-{P}", app4=APP4, cli4=CLI4, app6=APP6, cli6=CLI6) as h:
        yield h


def _app_socket(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(16)
    return sock


def _accept(listener: socket.socket, timeout: float = 5.0) -> socket.socket:
    ready, _, _ = select.select([listener], [], [], timeout)
    assert ready, "no connection arrived"
    conn, _ = listener.accept()
    return conn


@pytest.mark.root
@pytest.mark.parametrize("app_address", ["127.0.0.1", "0.0.0.0"])
async def test_pod_attachment_serves_inside_the_pods_namespace(
    tmp_path: Path, pod_hosts: Hosts, app_address: str
) -> None:
    """Inside a real pod namespace: the exposed port lands on our listener, the app port is refused from outside, upstream sockets reach the pod's loopback, an old and a new enforcer overlap, release removes the table and close leaves no handle."""
    table = f"ppod{P}"
    settings = _settings(tmp_path, mark=0x2321, table=table)
    defs = _definitions(FRONTEND)
    pod_path = f"/run/netns/{pod_hosts.app}"
    inode = os.stat(pod_path).st_ino
    app = run_in_netns(pod_hosts.app, _app_socket, app_address, 8080)
    loopback_only = app_address == "127.0.0.1"
    assert refused(pod_hosts.cli, APP4, 8080) == loopback_only  # reachable from outside before the rules
    if not loopback_only:
        _accept(app).close()
    old = PodAttachment(PodNetns.open(pod_path, uid=UID), settings, tags=frozenset({"app=frontend"}))
    new = PodAttachment(PodNetns.open(pod_path, uid=UID), settings, tags=frozenset({"app=frontend"}))
    try:
        await old.apply(defs)  # rules first: until the socket exists, 443 refuses
        assert refused(pod_hosts.cli, APP4, 443)
        listener = old.open()
        assert old.listen_port == 15443
        assert listener.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0x2321
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1

        for address in (APP4, APP6):
            with connect(pod_hosts.cli, address, 443), _accept(listener) as conn:
                assert redirected_destination(conn) == (address, 443)
        assert refused(pod_hosts.cli, APP4, 8080)

        make = old.socket_factory()
        with make((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 8080))) as upstream:
            assert upstream.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0x2321
            assert any(fd.split()[1] == str(upstream.fileno()) for fd in pods.fds_into(inode))
            upstream.settimeout(5)
            upstream.connect(("127.0.0.1", 8080))  # the host's 127.0.0.1:8080 has no listener
            with _accept(app) as conn:
                assert conn.getpeername() == upstream.getsockname()
            assert old.open_upstreams() == 1
        assert old.open_upstreams() == 0

        # a new enforcer binds beside the old one (SO_REUSEPORT), applies the same table, and takes over
        new.open()
        await new.apply(defs)
        old.close()
        with connect(pod_hosts.cli, APP4, 443), _accept(new.open()) as conn:
            assert redirected_destination(conn) == (APP4, 443)

        live = await nftables.read_live(table, netns=pod_path)
        assert live.exists and not nftables.diff(build_pod_redirect(new.services, settings, 15443), live)
        assert not (await nftables.read_live(table)).exists  # nothing in the host's namespace
        await new.release()
        assert not (await nftables.read_live(table, netns=pod_path)).exists
        assert refused(pod_hosts.cli, APP4, 8080) == loopback_only  # released: the app answers again
    finally:
        old.close()
        new.close()
        app.close()
    # nftables closes each batch's netlink socket from a thread, after the kernel's RCU grace period
    for _ in range(200):
        if not pods.fds_into(inode):
            break
        await asyncio.sleep(0.01)
    assert pods.fds_into(inode) == []
