"""The chained CNI plugin (deploy/cni/enforcer-cni.c) and the enforcer's end of it (enforcer/run/cni.py)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enforcer.run import cni
from enforcer.run.cni import CniError, CniEvent, CniServer, FrameError, InstallError
from tests.harness.kube import Node
from tests.harness.prereq import missing

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "deploy" / "cni" / "enforcer-cni.c"
CID = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
POD_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=x;K8S_POD_UID=1b4e"


def prev_result(netns: str) -> dict[str, Any]:
    """What the bridge plugin hands on: host-side bridge and veth, the pod's eth0, one address on eth0."""
    return {
        "cniVersion": "0.4.0",
        "interfaces": [
            {"name": "cni0", "mac": "aa:bb:cc:00:00:01"},
            {"name": "veth1234", "mac": "aa:bb:cc:00:00:02"},
            {"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": netns},
        ],
        "ips": [
            {"version": "4", "interface": 0, "address": "10.244.0.1/24"},
            {"version": "4", "interface": 2, "address": "10.244.0.7/24", "gateway": "10.244.0.1"},
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }


def netconf(sock: Path | str | None, prev: dict[str, Any] | None, **extra: Any) -> bytes:
    conf: dict[str, Any] = {"cniVersion": "0.4.0", "name": "enf-k8s", "type": "enforcer-cni"}
    if prev is not None:  # a decoy first: the plugin must read only the top-level "socket"
        conf["prevResult"] = {**prev, "socket": "/nonexistent/decoy.sock"}
    if sock is not None:
        conf["socket"] = str(sock)
    conf.update(extra)
    return json.dumps(conf).encode()


def env_for(command: str, netns: str, cid: str = CID, args: str = POD_ARGS) -> dict[str, str]:
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": args,
        "CNI_PATH": "/opt/cni/bin",
    }


# ----------------------------------------------------------------------------- the frame


ENV_NAMES = sorted(cni.ENV_NAMES)
env_values = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=200)


@given(env=st.dictionaries(st.sampled_from(ENV_NAMES), env_values), conf=st.binary(max_size=2000))
def test_request_frame_round_trips(env: dict[str, str], conf: bytes) -> None:
    """Any set of the forwarded variables and any netconf bytes decode to exactly what was encoded."""
    frame = cni.encode_request(env, conf)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert cni.decode_request(frame[4:]) == (env, conf)


@given(body=st.binary(max_size=600))
def test_request_decoder_only_raises_frame_error(body: bytes) -> None:
    """Arbitrary bytes either decode into allowed variables or raise FrameError, nothing else."""
    try:
        env, _ = cni.decode_request(body)
    except FrameError:
        return
    assert set(env) <= cni.ENV_NAMES


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "unknown protocol version none"),
        (b"\x02\0{}", "unknown protocol version 02"),
        (b"\x01CNI_COMMAND=ADD\0", "not terminated"),
        (b"\x01HOME=/root\0\0{}", "unexpected variable 'HOME'"),
        (b"\x01CNI_COMMAND\0\0{}", "unexpected variable"),
        (b"\x01CNI_COMMAND=ADD\0CNI_COMMAND=DEL\0\0{}", "given twice"),
        (b"\x01CNI_ARGS=\xff\0\0{}", "not ASCII NAME=UTF-8 value"),
        (b"\x01" + b"\0" + b"x" * cni.MAX_REQUEST, "more than"),
    ],
)
def test_malformed_requests_are_refused(body: bytes, why: str) -> None:
    """Each way a request body can break the format is a FrameError that says which."""
    with pytest.raises(FrameError, match=why):
        cni.decode_request(body)


@given(code=st.sampled_from([0, 1]), out=st.binary(max_size=3000))
def test_reply_frame_round_trips(code: int, out: bytes) -> None:
    """A reply carries the exit code and the exact bytes to print."""
    assert cni.decode_reply(cni.encode_reply(code, out)) == (code, out)


@pytest.mark.parametrize("frame", [b"", b"\0\0\0\0", b"\0\0\0\x01\x02", b"\0\0\0\x05\x00ab", b"\xff\xff\xff\xff\x00"])
def test_malformed_replies_are_refused(frame: bytes) -> None:
    """A reply with a wrong length, no exit code or an exit code other than 0/1 is a FrameError."""
    with pytest.raises(FrameError):
        cni.decode_reply(frame)


def test_encoder_refuses_what_it_cannot_frame() -> None:
    """A NUL in a value, an exit code of 2 and an oversized reply cannot be framed."""
    with pytest.raises(FrameError):
        cni.encode_request({"CNI_ARGS": "a\0b"}, b"{}")
    with pytest.raises(FrameError):
        cni.encode_reply(2, b"")
    with pytest.raises(FrameError):
        cni.encode_reply(0, b"x" * cni.MAX_REPLY)


# ----------------------------------------------------------------------------- validation


ROOTS = (Path("/run/netns"), Path("/proc"))


def test_a_chained_add_becomes_an_event_with_the_pods_own_addresses() -> None:
    """ADD names the sandbox, the netns, the pod from CNI_ARGS and only the addresses on the sandbox's interface."""
    ns = "/run/netns/cni-42"
    event, conf = cni.parse_event(env_for("ADD", ns), netconf(None, prev_result(ns)), ROOTS)
    assert (event.command, event.container_id, event.netns, event.ifname) == ("ADD", CID, Path(ns), "eth0")
    assert event.pod == cni.PodRef("default", "web-1", "1b4e")
    assert [str(i) for i in event.ips] == ["10.244.0.7/24"]
    assert event.cni_version == conf["cniVersion"] == "0.4.0"


def test_addresses_without_interface_indexes_all_count() -> None:
    """A prevResult whose ips name no interface gives every address to the pod."""
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/16"}, {"address": "fd00::5/64"}]}
    assert [str(i.ip) for i in cni.pod_ips(prev, Path("/run/netns/x"))] == ["10.1.0.5", "fd00::5"]


@pytest.mark.parametrize(
    ("command", "env_change", "conf", "code", "match"),
    [
        ("ADD", {}, b"{not json", 6, "not JSON"),
        ("ADD", {}, b"[]", 6, "not a JSON object"),
        ("ADD", {}, json.dumps({"cniVersion": "9.9.9"}).encode(), 1, "incompatible CNI version"),
        ("ADD", {"CNI_CONTAINERID": "../etc"}, None, 4, "CNI_CONTAINERID"),
        ("ADD", {"CNI_CONTAINERID": ""}, None, 4, "CNI_CONTAINERID"),
        ("ADD", {"CNI_IFNAME": "eth0/../x"}, None, 4, "CNI_IFNAME"),
        ("ADD", {"CNI_NETNS": ""}, None, 4, "CNI_NETNS is missing"),
        ("ADD", {"CNI_NETNS": "netns/x"}, None, 4, "absolute"),
        ("ADD", {"CNI_NETNS": "/run/netns/../../etc/shadow"}, None, 4, "normalised"),
        ("ADD", {"CNI_NETNS": "/run/netns//x"}, None, 4, "normalised"),
        ("ADD", {"CNI_NETNS": "/run/netns"}, None, 4, "not under"),
        ("ADD", {"CNI_NETNS": "/tmp/netns/x"}, None, 4, "not under"),
        ("ADD", {"CNI_ARGS": "K8S_POD_NAMESPACE=default"}, None, 4, "does not name a Kubernetes pod"),
        ("ADD", {"CNI_ARGS": "K8S_POD_NAMESPACE=Default;K8S_POD_NAME=a"}, None, 4, "does not name"),
        ("ADD", {"CNI_ARGS": "K8S_POD_NAMESPACE=a;K8S_POD_NAME=a;K8S_POD_UID=x/y"}, None, 4, "K8S_POD_UID"),
        ("ADD", {"CNI_ARGS": "K8S_POD_NAMESPACE=a;K8S_POD_NAMESPACE=b"}, None, 4, "KEY=VALUE"),
        ("ADD", {"CNI_ARGS": "novalue"}, None, 4, "KEY=VALUE"),
        ("ADD", {"CNI_ARGS": ";".join(f"K{i}=v" for i in range(65))}, None, 4, "too many"),
        ("ADD", {}, json.dumps({"cniVersion": "0.4.0"}).encode(), 7, "must be chained"),
        ("CHECK", {}, json.dumps({"cniVersion": "0.4.0"}).encode(), 7, "must be chained"),
        ("ADD", {}, json.dumps({"cniVersion": "0.4.0", "prevResult": []}).encode(), 7, "not an object"),
        ("ADD", {}, json.dumps({"cniVersion": "0.4.0", "prevResult": {"ips": [{}]}}).encode(), 7, "without an address"),
        (
            "ADD",
            {},
            json.dumps({"cniVersion": "0.4.0", "prevResult": {"ips": [{"address": "x"}]}}).encode(),
            7,
            "invalid",
        ),
    ],
)
def test_calls_that_do_not_check_out_are_cni_errors(
    command: str, env_change: dict[str, str], conf: bytes | None, code: int, match: str
) -> None:
    """Each malformed variable or netconf is a CNI error with the spec's code and a message naming it."""
    ns = "/run/netns/cni-1"
    env = {**env_for(command, ns), **env_change}
    with pytest.raises(CniError, match=match) as err:
        cni.parse_event(env, conf if conf is not None else netconf(None, prev_result(ns)), ROOTS)
    assert err.value.code == code


def test_a_del_after_the_netns_is_gone_is_still_an_event() -> None:
    """DEL may come without CNI_NETNS and without prevResult (the sandbox is already gone)."""
    env = {**env_for("DEL", ""), "CNI_NETNS": ""}
    event, _ = cni.parse_event(env, netconf(None, None), ROOTS)
    assert event.netns is None and event.ips == () and event.pod.name == "web-1"


# ----------------------------------------------------------------------------- install / uninstall


BRIDGE = {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.244.0.0/24"}}


@pytest.fixture
def node_dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A node's CNI conf dir and bin dir, and a plugin binary to install."""
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    bin_dir.mkdir()
    binary = tmp_path / "enforcer-cni"
    binary.write_bytes(b"\x7fELF fake plugin")
    return conf_dir, bin_dir, binary


def listing(d: Path) -> dict[str, Any]:
    return {p.name: json.loads(p.read_text()) if p.suffix != "" else p.read_bytes() for p in sorted(d.iterdir())}


def test_install_appends_to_the_first_conflist_only_once(node_dirs: tuple[Path, Path, Path]) -> None:
    """The plugin goes last in the lexically first conflist, with the binary executable; a second install changes nothing."""
    conf_dir, bin_dir, binary = node_dirs
    first = {"cniVersion": "0.4.0", "name": "k8s", "plugins": [BRIDGE, {"type": "portmap"}]}
    (conf_dir / "10-k8s.conflist").write_text(json.dumps(first))
    (conf_dir / "20-other.conflist").write_text(json.dumps({**first, "name": "other"}))
    (conf_dir / "00-notes.txt").write_text("not a CNI file")
    sock = Path("/var/run/enforcer/cni.sock")
    got = cni.install(conf_dir, bin_dir, binary=binary, socket_path=sock)
    assert got == cni.InstallResult(conf_dir / "10-k8s.conflist", True, True)
    conf = json.loads((conf_dir / "10-k8s.conflist").read_text())
    assert conf["plugins"] == [BRIDGE, {"type": "portmap"}, {"type": "enforcer-cni", "socket": str(sock)}]
    assert conf["name"] == "k8s" and conf["cniVersion"] == "0.4.0"
    assert json.loads((conf_dir / "20-other.conflist").read_text())["name"] == "other"
    assert "enforcer-cni" not in (conf_dir / "20-other.conflist").read_text()
    plugin = bin_dir / "enforcer-cni"
    assert plugin.read_bytes() == binary.read_bytes() and stat.S_IMODE(plugin.stat().st_mode) == 0o755
    before = {p.name: p.stat().st_mtime_ns for p in [*conf_dir.iterdir(), *bin_dir.iterdir()]}
    assert cni.install(conf_dir, bin_dir, binary=binary, socket_path=sock) == cni.InstallResult(
        conf_dir / "10-k8s.conflist", False, False
    )
    assert {p.name: p.stat().st_mtime_ns for p in [*conf_dir.iterdir(), *bin_dir.iterdir()]} == before


def test_install_moves_a_stale_entry_last_and_updates_its_socket(node_dirs: tuple[Path, Path, Path]) -> None:
    """An entry of ours in the middle (a plugin was appended after us) or with another socket is replaced at the end."""
    conf_dir, bin_dir, binary = node_dirs
    old = {"type": "enforcer-cni", "socket": "/old.sock"}
    (conf_dir / "10-k8s.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "k8s", "plugins": [BRIDGE, old, {"type": "tuning"}]})
    )
    result = cni.install(conf_dir, bin_dir, binary=binary, socket_path=Path("/run/enforcer/cni.sock"))
    assert result.conf_changed
    plugins = json.loads((conf_dir / "10-k8s.conflist").read_text())["plugins"]
    assert plugins == [BRIDGE, {"type": "tuning"}, {"type": "enforcer-cni", "socket": "/run/enforcer/cni.sock"}]


def test_a_plain_conf_becomes_a_conflist_and_uninstall_restores_it(node_dirs: tuple[Path, Path, Path]) -> None:
    """A single-plugin .conf is turned into <name>.conflist ending with us; uninstall brings back the .conf byte for byte in content."""
    conf_dir, bin_dir, binary = node_dirs
    plain = {"cniVersion": "0.3.1", "name": "k8s", **BRIDGE}
    (conf_dir / "10-k8s.conf").write_text(json.dumps(plain))
    result = cni.install(conf_dir, bin_dir, binary=binary)
    assert result.conf_file == conf_dir / "10-k8s.conflist"
    assert sorted(p.name for p in conf_dir.iterdir()) == ["10-k8s.conflist"]
    conf = json.loads(result.conf_file.read_text())
    assert conf["cniVersion"] == "0.3.1" and conf["name"] == "k8s"
    assert conf["plugins"][0] == plain
    assert conf["plugins"][1]["type"] == "enforcer-cni" and conf["plugins"][1]["socket"] == str(cni.DEFAULT_SOCKET)
    assert not cni.install(conf_dir, bin_dir, binary=binary).conf_changed
    cni.uninstall(conf_dir, bin_dir)
    assert listing(conf_dir) == {"10-k8s.conf": plain}
    assert list(bin_dir.iterdir()) == []


def test_uninstall_takes_out_only_our_plugin_and_is_idempotent(node_dirs: tuple[Path, Path, Path]) -> None:
    """Uninstall leaves the other plugins and files as they were, removes the binary, and a second run changes nothing."""
    conf_dir, bin_dir, binary = node_dirs
    original = {"cniVersion": "0.4.0", "name": "k8s", "plugins": [BRIDGE, {"type": "portmap"}]}
    (conf_dir / "10-k8s.conflist").write_text(json.dumps(original))
    (conf_dir / "05-broken.json").write_text("{not json")
    with pytest.raises(InstallError, match=r"05-broken\.json"):  # the first file is the primary, and it is broken
        cni.install(conf_dir, bin_dir, binary=binary)
    (conf_dir / "05-broken.json").unlink()
    cni.install(conf_dir, bin_dir, binary=binary)
    (conf_dir / "05-broken.json").write_text("{not json")
    changed = cni.uninstall(conf_dir, bin_dir)
    assert changed == [conf_dir / "10-k8s.conflist", bin_dir / "enforcer-cni"]
    assert json.loads((conf_dir / "10-k8s.conflist").read_text()) == original
    assert (conf_dir / "05-broken.json").read_text() == "{not json"
    assert cni.uninstall(conf_dir, bin_dir) == []
    assert not [p for p in conf_dir.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize(
    ("files", "sock", "match"),
    [
        ({}, "/run/enforcer/cni.sock", "no CNI configuration yet"),
        ({"10-x.conf": {"cniVersion": "0.4.0"}}, "/run/enforcer/cni.sock", "neither a conflist"),
        ({"10-x.conflist": {"name": "x", "plugins": ["bridge"]}}, "/run/enforcer/cni.sock", "not an object"),
        ({"10-x.conflist": ["x"]}, "/run/enforcer/cni.sock", "not a JSON object"),
        ({"10-x.conflist": {"name": "x", "plugins": []}}, "/run/enforcer/my sock", "socket"),
        ({"10-x.conflist": {"name": "x", "plugins": []}}, "relative.sock", "socket"),
    ],
)
def test_install_refuses_what_it_cannot_chain_into(
    node_dirs: tuple[Path, Path, Path], files: dict[str, Any], sock: str, match: str
) -> None:
    """No configuration, a configuration that is neither form, or a socket path the plugin would refuse: InstallError."""
    conf_dir, bin_dir, binary = node_dirs
    for name, content in files.items():
        (conf_dir / name).write_text(json.dumps(content))
    with pytest.raises(InstallError, match=match):
        cni.install(conf_dir, bin_dir, binary=binary, socket_path=Path(sock))


# ----------------------------------------------------------------------------- the real plugin, the real server


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin, built from deploy/cni with gcc -static (as scripts/image does), warnings as errors."""
    if shutil.which("gcc") is None:
        missing("gcc (scripts/setup installs it)")
    out = tmp_path_factory.mktemp("cni") / "enforcer-cni"
    subprocess.run(
        ["gcc", "-static", "-Os", "-s", "-Wall", "-Wextra", "-Wconversion", "-Werror", "-o", str(out), str(SOURCE)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return out


@dataclass
class Recorder:
    """A PodNetworkHandler that records each call; ``fail`` makes pod_added raise."""

    added: list[CniEvent] = field(default_factory=list)
    deleted: list[CniEvent] = field(default_factory=list)
    fail: str = ""
    netns_inodes: dict[str, int] = field(default_factory=dict)

    async def pod_added(self, event: CniEvent) -> None:
        if self.fail:
            raise RuntimeError(self.fail)
        self.added.append(event)
        if event.netns is not None and event.netns.exists():
            self.netns_inodes[event.pod.name] = event.netns.stat().st_ino

    async def pod_deleted(self, event: CniEvent) -> None:
        self.deleted.append(event)


async def run_plugin(
    binary: Path, env: Mapping[str, str], stdin: bytes, timeout: float = 30.0
) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        str(binary), env=dict(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    assert proc.returncode is not None
    return proc.returncode, out, err


def test_version_is_answered_by_the_plugin_itself(plugin: Path) -> None:
    """VERSION needs no enforcer and lists the spec versions the plugin speaks."""
    done = subprocess.run([str(plugin)], env={"CNI_COMMAND": "VERSION"}, capture_output=True, check=False, timeout=10)
    assert done.returncode == 0
    assert json.loads(done.stdout)["supportedVersions"] == list(cni.SUPPORTED_VERSIONS)


async def test_add_hands_the_pod_to_the_enforcer_and_prints_prev_result(plugin: Path, tmp_path: Path) -> None:
    """ADD through the real plugin: the handler sees netns, sandbox, pod and its IP; stdout is prevResult; socket is 0600."""
    sock, ns = tmp_path / "cni.sock", str(tmp_path / "netns" / "cni-7")
    handler = Recorder()
    async with CniServer(handler, sock, netns_roots=[tmp_path / "netns"]):
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600 and stat.S_ISSOCK(sock.stat().st_mode)
        code, out, err = await run_plugin(plugin, env_for("ADD", ns), netconf(sock, prev_result(ns)))
        assert (code, err) == (0, b"")
        printed = json.loads(out)
        assert printed.pop("socket") == "/nonexistent/decoy.sock"  # prevResult is passed on untouched
        assert printed == prev_result(ns)
        [event] = handler.added
        assert (event.netns, event.container_id, event.pod) == (Path(ns), CID, cni.PodRef("default", "web-1", "1b4e"))
        assert [str(i.ip) for i in event.ips] == ["10.244.0.7"]
        code, out, _ = await run_plugin(plugin, env_for("DEL", ns), netconf(sock, None))
        assert (code, out) == (0, b"")
        assert [e.container_id for e in handler.deleted] == [CID]
        code, out, _ = await run_plugin(plugin, env_for("CHECK", ns), netconf(sock, prev_result(ns)))
        assert (code, out) == (0, b"")
    assert not sock.exists()


async def test_a_handler_failure_fails_the_add_with_a_cni_error(plugin: Path, tmp_path: Path) -> None:
    """If pod mode cannot take the pod, ADD exits 1 with error 11 naming the pod (the sandbox fails, kubelet retries)."""
    sock, ns = tmp_path / "cni.sock", "/run/netns/cni-8"
    async with CniServer(Recorder(fail="no netns handle"), sock):
        code, out, _ = await run_plugin(plugin, env_for("ADD", ns), netconf(sock, prev_result(ns)))
    error = json.loads(out)
    assert code == 1
    assert (error["cniVersion"], error["code"]) == ("0.4.0", 11)
    assert "default/web-1" in error["msg"] and "no netns handle" in error["details"]


async def test_a_malformed_call_fails_add_but_never_del(plugin: Path, tmp_path: Path) -> None:
    """A netns outside the allowed directories is refused on ADD (code 4) and ignored on DEL (exit 0), handler untouched."""
    sock, ns = tmp_path / "cni.sock", "/etc/netns-ish"
    handler = Recorder()
    async with CniServer(handler, sock):
        add = await run_plugin(plugin, env_for("ADD", ns), netconf(sock, prev_result(ns)))
        delete = await run_plugin(plugin, env_for("DEL", ns), netconf(sock, None))
    assert add[0] == 1 and json.loads(add[1])["code"] == 4 and "CNI_NETNS" in json.loads(add[1])["msg"]
    assert delete[:2] == (0, b"")
    assert handler.added == handler.deleted == []


@pytest.mark.parametrize("command", ["ADD", "STATUS", "DEL", "CHECK", "GC"])
async def test_enforcer_down_fails_add_and_passes_teardown(plugin: Path, tmp_path: Path, command: str) -> None:
    """No socket: ADD and STATUS exit 1 with error 11 naming the socket; DEL, CHECK and GC exit 0 and print nothing."""
    sock, ns = tmp_path / "gone.sock", "/run/netns/cni-9"
    code, out, err = await run_plugin(plugin, env_for(command, ns), netconf(sock, prev_result(ns)))
    if command in ("ADD", "STATUS"):
        error = json.loads(out)
        assert code == 1 and error["code"] == 11 and error["cniVersion"] == "0.4.0"
        assert f"socket {sock}: No such file or directory" == error["details"]
    else:
        assert (code, out) == (0, b"")
    assert str(sock).encode() in err


async def test_an_enforcer_that_never_answers_times_out(plugin: Path, tmp_path: Path) -> None:
    """A listener that accepts and stays silent: ADD fails after the netconf's timeout (1 s), DEL passes after it."""
    sock, ns = tmp_path / "mute.sock", "/run/netns/cni-10"
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(sock))
    mute.listen(8)
    try:
        for command, want in (("ADD", 1), ("DEL", 0)):
            start = time.monotonic()
            code, out, _ = await run_plugin(plugin, env_for(command, ns), netconf(sock, prev_result(ns), timeout=1))
            assert 0.9 < time.monotonic() - start < 5
            assert code == want
            if want:
                assert "no answer before the deadline" in json.loads(out)["details"]
    finally:
        mute.close()


@pytest.mark.parametrize(
    ("conf", "match"),
    [
        (b'{"cniVersion":"0.4.0","socket":"rel/x.sock"}', "socket"),
        (b'{"cniVersion":"0.4.0","socket":"/tmp/a\\"b"}', "socket"),
        (b'{"cniVersion":"0.4.0","timeout":0}', "timeout"),
        (b'{"cniVersion":"0.4.0","timeout":"5"}', "timeout"),
        (b'{"cniVersion":"0.4.0","x":"' + b"a" * (256 * 1024) + b'"}', "too large"),
    ],
)
def test_the_plugin_refuses_a_netconf_it_cannot_trust(plugin: Path, conf: bytes, match: str) -> None:
    """A relative or escaped socket path, a bad timeout or an oversized netconf: error 7 on ADD, exit 0 on DEL."""
    deleted = subprocess.run(
        [str(plugin)], env=env_for("DEL", "/run/netns/x"), input=conf, capture_output=True, timeout=10, check=False
    )
    assert (deleted.returncode, deleted.stdout) == (0, b"") and match.encode() in deleted.stderr
    done = subprocess.run(
        [str(plugin)], env=env_for("ADD", "/run/netns/x"), input=conf, capture_output=True, timeout=10, check=False
    )
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error["code"] == 7 and match in error["msg"]


async def test_server_answers_malformed_frames_and_replaces_a_stale_socket(tmp_path: Path) -> None:
    """A stale socket file is replaced; a request in an unknown protocol version gets a decoding error, not silence."""
    sock = tmp_path / "cni.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    async with CniServer(Recorder(), sock):
        reader, writer = await asyncio.open_unix_connection(str(sock))
        writer.write(b"\0\0\0\x03\x09ab")
        head = await reader.readexactly(4)
        code, out = cni.decode_reply(head + await reader.readexactly(int.from_bytes(head, "big")))
        writer.close()
    assert code == 1 and json.loads(out)["code"] == 6 and "protocol version 09" in json.loads(out)["details"]


# ----------------------------------------------------------------------------- on the real cluster


class ThreadedServer:
    """A CniServer on its own event loop in a thread, so the test can block on kubectl meanwhile."""

    def __init__(self, handler: Recorder, sock: Path, roots: list[Path]) -> None:
        self.handler, self.sock, self.roots = handler, sock, roots
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: CniServer | None = None

    def start(self) -> None:
        self.server = CniServer(self.handler, self.sock, netns_roots=self.roots)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
            self.server = None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def pod_manifest(name: str) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [
            {"name": "main", "image": "enforcer.test/pause:1", "imagePullPolicy": "Never"}]},
    })  # fmt: skip


@pytest.fixture
def chained(kube_node: Node, plugin: Path, tmp_path: Path) -> Iterator[tuple[Node, ThreadedServer]]:
    """The plugin chained into the cluster's conflist with a server on a tmp socket; both undone afterwards."""
    node = kube_node
    sock = Path(f"/run/enforcer-test-cni-{os.getpid()}.sock")  # short: a unix socket path is at most 107 bytes
    # containerd (netns_mounts_under_state_dir) pins pod namespaces under its state dir in the work dir
    server = ThreadedServer(Recorder(), sock, [node.workdir, *cni.NETNS_ROOTS])
    server.start()
    original = (node.cni_conf_dir / "10-enf-k8s.conflist").read_text()
    try:
        cni.install(node.cni_conf_dir, node.cni_bin_dir, binary=plugin, socket_path=sock)
        time.sleep(3)  # containerd reloads the conf dir on its fsnotify event
        yield node, server
    finally:
        for name in ("cni-a", "cni-b"):
            node.api.kubectl("delete", "pod", name, "-n", "default", "--wait=true", "--timeout=90s", check=False)
        cni.uninstall(node.cni_conf_dir, node.cni_bin_dir)
        time.sleep(2)
        server.close()
        assert json.loads((node.cni_conf_dir / "10-enf-k8s.conflist").read_text()) == json.loads(original)


def pod_phase(node: Node, name: str) -> dict[str, Any]:
    got: dict[str, Any] = json.loads(node.api.kubectl("get", "pod", name, "-n", "default", "-o", "json").stdout)
    return got


def sandbox_failures(node: Node, name: str) -> list[str]:
    events = json.loads(
        node.api.kubectl(
            "get", "events", "-n", "default", "--field-selector", f"involvedObject.name={name}", "-o", "json"
        ).stdout
    )["items"]
    return [e["message"] for e in events if e["reason"] == "FailedCreatePodSandBox"]


@pytest.mark.root
@pytest.mark.timeout(2400)
def test_on_a_real_node_new_pods_wait_for_the_enforcer(chained: tuple[Node, ThreadedServer]) -> None:
    """Chained into containerd: a pod's netns and IP reach the handler; with the server down a pod stays
    sandbox-less (events show the plugin's error) until the server is back."""
    node, server = chained
    node.api.kubectl("apply", "-f", "-", input=pod_manifest("cni-a"))
    node.wait_pod_ready("default", "cni-a", timeout=120)
    pod = pod_phase(node, "cni-a")
    [event] = [e for e in server.handler.added if e.pod.name == "cni-a"]
    assert (event.pod.namespace, event.pod.name) == ("default", "cni-a")
    assert event.pod.uid in (pod["metadata"]["uid"], "")  # containerd 1.6 sends K8S_POD_UID
    assert [str(i.ip) for i in event.ips] == [pod["status"]["podIP"]]
    assert server.handler.netns_inodes["cni-a"] != os.stat("/proc/self/ns/net").st_ino  # a namespace of its own

    server.stop()
    t_down = time.monotonic()
    node.api.kubectl("apply", "-f", "-", input=pod_manifest("cni-b"))
    deadline = time.monotonic() + 90
    while not sandbox_failures(node, "cni-b"):
        assert time.monotonic() < deadline, "no FailedCreatePodSandBox event for cni-b while the enforcer is down"
        time.sleep(2)
    time.sleep(max(0.0, 20 - (time.monotonic() - t_down)))
    pod = pod_phase(node, "cni-b")
    assert pod["status"]["phase"] == "Pending" and not pod["status"].get("podIP")
    assert not [e for e in server.handler.added if e.pod.name == "cni-b"]
    failures = sandbox_failures(node, "cni-b")
    assert any("enforcer unreachable" in m and str(server.sock) in m for m in failures), failures

    server.start()
    waited = node.wait_pod_ready("default", "cni-b", timeout=240)
    [event] = [e for e in server.handler.added if e.pod.name == "cni-b"]
    assert [str(i.ip) for i in event.ips] == [pod_phase(node, "cni-b")["status"]["podIP"]]
    print(f"cni-b Ready {waited:.0f} s after the enforcer's socket came back")
