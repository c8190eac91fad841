"""The enforcer's end of its chained CNI plugin: hear of every pod sandbox before its containers start.

The plugin (``deploy/cni/enforcer-cni.c``, installed as the last plugin of the node's primary
CNI conflist) runs while the container runtime creates a pod's sandbox, after the interface
plugin gave the pod its address and before any container of the pod runs. It forwards the CNI
call here over a unix socket; :class:`CniServer` checks it, tells a :class:`PodNetworkHandler`
(pod mode) about the pod's network namespace, and answers what the plugin prints and its exit
code. When the enforcer is unreachable the plugin fails ADD, so no pod of the node starts
unprotected (fail closed), and lets DEL and CHECK pass, so teardown never waits for it.

Wire format (one request and one reply per connection; the C file's header says the same)::

    request = u32 big-endian N, N bytes: 0x01, "NAME=VALUE\\0"..., "\\0", the netconf (plugin's stdin)
    reply   = u32 big-endian N, N bytes: exit code (0 or 1), then the bytes the plugin prints

No JSON is built or read in C: the variables travel as NUL-terminated strings (a value cannot
hold a NUL) and the netconf as the bytes the runtime wrote, so escaping cannot go wrong there.

:func:`install` and :func:`uninstall` put the plugin into a node's CNI directories (the
DaemonSet's hostPath mounts) and take it out again; both write atomically and are idempotent.
The daemon (pod mode) calls :func:`keep_installed` at every start, once its socket listens, and
:func:`uninstall_from_node` only at a stop that its stop check calls an uninstall (the DaemonSet
gone or being deleted). A restart or an upgrade leaves the plugin in place, so pods created
while no enforcer listens fail their sandbox and are retried by kubelet (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import socket
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_REQUEST = 1 + 16 * 1024 + 1 + 256 * 1024  # the plugin's own bounds: variables + netconf
MAX_REPLY = 512 * 1024
DEFAULT_SOCKET = Path("/var/run/enforcer/cni.sock")
PLUGIN_TYPE = "enforcer-cni"
PLUGIN_IN_IMAGE = Path("/opt/enforcer/cni/enforcer-cni")
NODE_CONF_DIR = Path("/host/etc/cni/net.d")
"""Where pod mode's DaemonSet mounts the node's CNI configuration directory (components/pod-mode)."""
NODE_BIN_DIR = Path("/host/opt/cni/bin")
"""Where pod mode's DaemonSet mounts the node's CNI plugin directory (components/pod-mode)."""
NETNS_ROOTS: tuple[Path, ...] = (Path("/proc"), Path("/var/run/netns"), Path("/run/netns"))
"""Where a pod's network namespace may be: runtimes pin it under /var/run/netns, or give /proc/<pid>/ns/net."""
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
COMMANDS = frozenset({"ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS"})
ENV_NAMES = frozenset({"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"})
CONF_SUFFIXES = (".conf", ".conflist", ".json")  # what libcni loads from a conf dir, in name order
CONVERTED_KEY = "enforcerConvertedFrom"
"""Set on our entry when :func:`install` turned a single-plugin ``.conf`` into a conflist (undone on uninstall)."""

# CNI spec error codes (SPEC.md "Error" section)
ERR_ENV = 4  # invalid necessary environment variables
ERR_IO = 5
ERR_DECODE = 6
ERR_CONFIG = 7  # invalid network config
ERR_TRY_AGAIN = 11

_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,255}")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
_POD_UID = re.compile(r"[0-9A-Za-z][0-9A-Za-z-]{0,63}")
_IFNAME = re.compile(r"[^/\s:]{1,15}")
_SOCKET_PATH = re.compile(r"/[A-Za-z0-9/._-]{1,105}")  # what the plugin accepts for "socket"
_HEAD = struct.Struct(">I")


class FrameError(ValueError):
    """A request or reply that does not follow the wire format."""


class CniError(Exception):
    """A CNI error object: what the plugin prints (the runtime shows ``msg``/``details`` in the pod's events)."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code, self.msg, self.details = code, msg, details

    def to_json(self, cni_version: str) -> bytes:
        body = {"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}
        return json.dumps(body).encode() + b"\n"


class InstallError(Exception):
    """The plugin cannot be put into (or taken out of) the node's CNI configuration."""


# ----------------------------------------------------------------------------- wire format


def encode_request(env: Mapping[str, str], netconf: bytes) -> bytes:
    """A request frame as the plugin writes it (tests and tools use it; the plugin is the C file)."""
    body = bytes([PROTOCOL_VERSION])
    for name, value in env.items():
        entry = f"{name}={value}".encode()
        if b"\0" in entry or not name or "=" in name:
            raise FrameError(f"variable {name!r} cannot be framed")
        body += entry + b"\0"
    body += b"\0" + netconf
    return _HEAD.pack(len(body)) + body


def decode_request(body: bytes) -> tuple[dict[str, str], bytes]:
    """The variables and the netconf of a request frame's body (after its length); :class:`FrameError` if malformed."""
    if len(body) > MAX_REQUEST:
        raise FrameError(f"request of {len(body)} bytes, more than {MAX_REQUEST}")
    if not body or body[0] != PROTOCOL_VERSION:
        raise FrameError(
            f"unknown protocol version {body[:1].hex() or 'none'} (this enforcer speaks {PROTOCOL_VERSION})"
        )
    env: dict[str, str] = {}
    pos = 1
    while True:
        end = body.find(b"\0", pos)
        if end < 0:
            raise FrameError("the variables are not terminated by an empty entry")
        if end == pos:
            return env, body[end + 1 :]
        raw = body[pos:end]
        pos = end + 1
        name_b, sep, value_b = raw.partition(b"=")
        try:
            name, value = name_b.decode("ascii"), value_b.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("a variable is not ASCII NAME=UTF-8 value") from None
        if not sep or name not in ENV_NAMES:
            raise FrameError(f"unexpected variable {name[:40]!r}")
        if name in env:
            raise FrameError(f"variable {name} given twice")
        env[name] = value


def encode_reply(exit_code: int, stdout: bytes) -> bytes:
    """A reply frame: the plugin prints ``stdout`` and exits with ``exit_code`` (0 or 1)."""
    if exit_code not in (0, 1):
        raise FrameError(f"exit code {exit_code} is not 0 or 1")
    if 1 + len(stdout) > MAX_REPLY:
        raise FrameError(f"reply of {1 + len(stdout)} bytes, more than {MAX_REPLY}")
    return _HEAD.pack(1 + len(stdout)) + bytes([exit_code]) + stdout


def decode_reply(frame: bytes) -> tuple[int, bytes]:
    """The exit code and output of a whole reply frame (length included), as the plugin reads it."""
    if len(frame) < _HEAD.size + 1:
        raise FrameError("reply shorter than its header")
    (n,) = _HEAD.unpack_from(frame)
    if n < 1 or n > MAX_REPLY or len(frame) != _HEAD.size + n or frame[4] > 1:
        raise FrameError("malformed reply")
    return frame[4], frame[5:]


# ----------------------------------------------------------------------------- the event


@dataclass(frozen=True)
class PodRef:
    """The pod a CNI call is for, from ``CNI_ARGS`` (the runtime's ``K8S_POD_*`` values)."""

    namespace: str
    name: str
    uid: str = ""
    """Empty when the runtime does not send ``K8S_POD_UID`` (containerd before 1.6)."""


@dataclass(frozen=True)
class CniEvent:
    """One checked CNI call for a pod sandbox."""

    command: str
    """``ADD``, ``DEL`` or ``CHECK``."""
    container_id: str
    """The sandbox's id (``CNI_CONTAINERID``): ADD and DEL of one sandbox carry the same."""
    netns: Path | None
    """The pod's network namespace (a path under :data:`NETNS_ROOTS`); None only on a DEL after it is gone."""
    ifname: str
    pod: PodRef
    cni_version: str
    ips: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...] = ()
    """The pod's own addresses from ``prevResult`` (the API server does not know them yet on ADD)."""
    prev_result: Mapping[str, Any] | None = field(default=None, compare=False)


class PodNetworkHandler(Protocol):
    """What pod mode does when a pod sandbox gets or loses its network (implemented by pod mode)."""

    async def pod_added(self, event: CniEvent) -> None:
        """The sandbox exists, no container runs yet: enrol the pod or return; raising fails the sandbox."""

    async def pod_deleted(self, event: CniEvent) -> None:
        """The sandbox is being torn down: release every handle into its netns (errors are logged, not returned)."""


class IgnorePods:
    """A :class:`PodNetworkHandler` that lets every pod start untouched (before pod mode exists)."""

    async def pod_added(self, event: CniEvent) -> None:
        log.debug("cni: %s %s/%s: no pod handler", event.command, event.pod.namespace, event.pod.name)

    async def pod_deleted(self, event: CniEvent) -> None:
        return None


def _cni_args(raw: str) -> dict[str, str]:
    """``CNI_ARGS`` (``K=V;K=V``) as a dict; a key given twice or a pair without ``=`` is an error."""
    out: dict[str, str] = {}
    if not raw:
        return out
    pairs = raw.split(";")
    if len(pairs) > 64:
        raise CniError(ERR_ENV, "CNI_ARGS has too many entries", str(len(pairs)))
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or key in out:
            raise CniError(ERR_ENV, "CNI_ARGS is not KEY=VALUE;...", pair[:80])
        out[key] = value
    return out


def netns_path(raw: str, roots: Sequence[Path] = NETNS_ROOTS) -> Path:
    """``CNI_NETNS`` as a path strictly under one of ``roots``, written without ``..``, ``.`` or ``//``."""
    if not raw.startswith("/") or len(raw) > 4096 or "\0" in raw:
        raise CniError(ERR_ENV, "CNI_NETNS must be an absolute path", raw[:200])
    if os.path.normpath(raw) != raw or any(part in (".", "..") for part in raw.split("/")):
        raise CniError(ERR_ENV, "CNI_NETNS must be a normalised path", raw[:200])
    path = Path(raw)
    if not any(path != root and path.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise CniError(
            ERR_ENV, "CNI_NETNS is not under a network namespace directory", f"{raw[:200]} (allowed: {allowed})"
        )
    return path


def pod_ips(
    prev: Mapping[str, Any], netns: Path | None
) -> tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]:
    """The addresses ``prevResult`` gave the pod: those on an interface inside the sandbox (all, if none says)."""
    interfaces = prev.get("interfaces")
    ips = prev.get("ips")
    if not isinstance(ips, list):
        return ()
    inside: set[int] | None = None
    if isinstance(interfaces, list):
        inside = {
            i for i, itf in enumerate(interfaces)
            if isinstance(itf, dict) and itf.get("sandbox") and (netns is None or itf.get("sandbox") == str(netns))
        }  # fmt: skip
    out: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
    for entry in ips:
        if not isinstance(entry, dict) or not isinstance(entry.get("address"), str):
            raise CniError(ERR_CONFIG, "prevResult.ips holds an entry without an address", str(entry)[:200])
        index = entry.get("interface")
        if inside and isinstance(index, int) and index not in inside:
            continue  # an address of a host-side interface (bridge, veth)
        try:
            out.append(ipaddress.ip_interface(entry["address"]))
        except ValueError:
            raise CniError(ERR_CONFIG, "prevResult.ips holds an invalid address", entry["address"][:80]) from None
    return tuple(out)


def parse_event(
    env: Mapping[str, str], netconf: bytes, roots: Sequence[Path] = NETNS_ROOTS
) -> tuple[CniEvent, dict[str, Any]]:
    """Check an ADD, DEL or CHECK call; the event and the parsed netconf, or :class:`CniError`."""
    command = env.get("CNI_COMMAND", "")
    try:
        conf = json.loads(netconf.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CniError(ERR_DECODE, "the network configuration is not JSON", str(exc)[:200]) from None
    if not isinstance(conf, dict):
        raise CniError(ERR_DECODE, "the network configuration is not a JSON object")
    version = conf.get("cniVersion")
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        raise CniError(1, "incompatible CNI version", f"{version!r} (supported: {', '.join(SUPPORTED_VERSIONS)})")
    container_id = env.get("CNI_CONTAINERID", "")
    if not _CONTAINER_ID.fullmatch(container_id):
        raise CniError(ERR_ENV, "CNI_CONTAINERID is missing or not [A-Za-z0-9][A-Za-z0-9_.-]*", container_id[:80])
    ifname = env.get("CNI_IFNAME", "")
    if ifname and (not _IFNAME.fullmatch(ifname) or ifname in (".", "..")):
        raise CniError(ERR_ENV, "CNI_IFNAME is not an interface name", ifname[:40])
    raw_netns = env.get("CNI_NETNS", "")
    if raw_netns:
        netns: Path | None = netns_path(raw_netns, roots)
    elif command == "DEL":
        netns = None  # the namespace is already gone: DEL must still succeed
    else:
        raise CniError(ERR_ENV, "CNI_NETNS is missing", command)
    args = _cni_args(env.get("CNI_ARGS", ""))
    namespace, name, uid = (args.get(k, "") for k in ("K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_UID"))
    if not _DNS_LABEL.fullmatch(namespace) or not _DNS_SUBDOMAIN.fullmatch(name):
        raise CniError(ERR_ENV, "CNI_ARGS does not name a Kubernetes pod (K8S_POD_NAMESPACE, K8S_POD_NAME)",
                       f"{namespace[:63]!r}/{name[:253]!r}")  # fmt: skip
    if uid and not _POD_UID.fullmatch(uid):
        raise CniError(ERR_ENV, "K8S_POD_UID is not a pod UID", uid[:80])
    prev = conf.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(ERR_CONFIG, "prevResult is not an object")
    if prev is None and command in ("ADD", "CHECK"):
        msg = "no prevResult: enforcer-cni must be chained after the plugin that makes the pod's interface"
        raise CniError(ERR_CONFIG, msg, "put it last in the plugins list of a conflist")
    ips = pod_ips(prev, netns) if prev is not None else ()
    event = CniEvent(command, container_id, netns, ifname, PodRef(namespace, name, uid), version, ips, prev)
    return event, conf


# ----------------------------------------------------------------------------- the server


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    (n,) = _HEAD.unpack(await reader.readexactly(_HEAD.size))
    if n > limit:
        raise FrameError(f"request of {n} bytes, more than {limit}")
    return await reader.readexactly(n)


class CniServer:
    """The unix socket the plugin talks to (mode 0600: only root on the node may announce pods)."""

    def __init__(
        self,
        handler: PodNetworkHandler,
        path: Path = DEFAULT_SOCKET,
        *,
        netns_roots: Sequence[Path] = NETNS_ROOTS,
        handler_timeout: float = 20.0,
        read_timeout: float = 5.0,
    ) -> None:
        """``handler_timeout`` stays below the plugin's deadline (30 s): a slow handler gets an error, not silence."""
        self.handler = handler
        self.path = path
        self.netns_roots = tuple(netns_roots)
        self.handler_timeout = handler_timeout
        self.read_timeout = read_timeout
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None

    async def start(self) -> None:
        """Listen on :attr:`path`: bound under a temporary name, made 0600, then renamed over any old socket.

        The rename is atomic, so during an upgrade the plugin reaches either the old enforcer or
        the new one, never "no such file", and never a socket with a wider mode.
        """
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            sock.bind(str(tmp))
            os.chmod(tmp, 0o600)
            sock.listen(128)
            os.rename(tmp, self.path)
            self._inode = os.stat(self.path).st_ino
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        log.info("cni: listening on %s", self.path)

    async def close(self) -> None:
        """Stop listening; remove the socket file only if it is still ours (a newer enforcer may own the path)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    async def __aenter__(self) -> CniServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(self.read_timeout):
                    body = await _read_frame(reader, MAX_REQUEST)
                exit_code, out = await self.answer(body)
            except FrameError as exc:
                log.warning("cni: malformed request: %s", exc)
                err = CniError(ERR_DECODE, "malformed request from enforcer-cni", str(exc))
                exit_code, out = 1, err.to_json("1.0.0")
            writer.write(encode_reply(exit_code, out))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            log.warning("cni: plugin connection dropped: %r", exc)  # the plugin treats silence as "unreachable"
        except Exception:  # a bug here: no answer, so the plugin fails ADD and lets DEL pass
            log.exception("cni: request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def answer(self, body: bytes) -> tuple[int, bytes]:
        """The exit code and output for one request body: the whole decision, without the socket."""
        env, netconf = decode_request(body)
        command = env.get("CNI_COMMAND", "")
        if command not in COMMANDS:
            return 1, CniError(4, "unknown CNI_COMMAND", command[:40]).to_json("1.0.0")
        if command == "VERSION":
            return 0, json.dumps({"cniVersion": "1.0.0", "supportedVersions": list(SUPPORTED_VERSIONS)}).encode()
        if command in ("GC", "STATUS"):
            return 0, b""  # nothing kept per attachment here; STATUS: we answer, so we are ready
        try:
            event, conf = parse_event(env, netconf, self.netns_roots)
        except CniError as exc:
            if command == "DEL":  # never block a teardown on a call we cannot read
                log.warning("cni: DEL ignored: %s", exc)
                return 0, b""
            log.warning("cni: %s refused: %s", command, exc)
            return 1, exc.to_json(_version_of(netconf))
        if command == "ADD":
            return await self._add(event, conf)
        if command == "DEL":
            await self._delete(event)
            return 0, b""
        return 0, b""  # CHECK: the chain before us was checked; pod mode's state is checked by its own loop

    async def _add(self, event: CniEvent, conf: Mapping[str, Any]) -> tuple[int, bytes]:
        pod = f"{event.pod.namespace}/{event.pod.name}"
        try:
            async with asyncio.timeout(self.handler_timeout):
                await self.handler.pod_added(event)
        except Exception as exc:  # fail closed: any failure keeps the pod from starting; kubelet retries
            log.warning("cni: ADD %s (sandbox %s) failed: %r", pod, event.container_id[:12], exc)
            why = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            err = CniError(ERR_TRY_AGAIN, f"the enforcer could not take pod {pod}", why[:400])
            return 1, err.to_json(event.cni_version)
        log.info("cni: ADD %s netns %s ips %s", pod, event.netns, ",".join(str(i.ip) for i in event.ips))
        result = dict(event.prev_result or {})
        result["cniVersion"] = conf["cniVersion"]  # a chained plugin outputs the result it was given
        return 0, json.dumps(result).encode()

    async def _delete(self, event: CniEvent) -> None:
        try:
            async with asyncio.timeout(self.handler_timeout):
                await self.handler.pod_deleted(event)
        except Exception as exc:  # teardown goes on; pod mode also reconciles against the API
            log.warning("cni: DEL %s/%s: handler failed: %r", event.pod.namespace, event.pod.name, exc)
        else:
            log.info("cni: DEL %s/%s", event.pod.namespace, event.pod.name)


def _version_of(netconf: bytes) -> str:
    with contextlib.suppress(Exception):
        version = json.loads(netconf).get("cniVersion")
        if isinstance(version, str) and version in SUPPORTED_VERSIONS:
            return version
    return "1.0.0"


# ----------------------------------------------------------------------------- install / uninstall


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install` found and changed."""

    conf_file: Path
    """The primary conflist that now ends with our plugin."""
    conf_changed: bool
    binary_changed: bool


def conf_files(conf_dir: Path) -> list[Path]:
    """The CNI configuration files of ``conf_dir`` in the order the runtime (libcni) tries them."""
    if not conf_dir.is_dir():
        return []
    return sorted((p for p in conf_dir.iterdir() if p.suffix in CONF_SUFFIXES and p.is_file()), key=lambda p: p.name)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write to a temporary file beside ``path`` (a name no runtime loads), fsync, rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a crash
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _load_conf(path: Path) -> dict[str, Any]:
    try:
        conf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InstallError(f"{path}: not a readable JSON CNI configuration ({exc})") from None
    if not isinstance(conf, dict):
        raise InstallError(f"{path}: not a JSON object")
    return conf


def _dump(conf: Mapping[str, Any]) -> bytes:
    return (json.dumps(conf, indent=2) + "\n").encode()


def install(
    conf_dir: Path, bin_dir: Path, *, binary: Path = PLUGIN_IN_IMAGE, socket_path: Path = DEFAULT_SOCKET
) -> InstallResult:
    """Copy the plugin into ``bin_dir`` and make it the last plugin of the primary conflist of ``conf_dir``.

    The primary configuration is the first file libcni would load (``*.conf``, ``*.conflist``,
    ``*.json`` by name). A single-plugin ``.conf`` becomes ``<name>.conflist`` holding it and us
    (the ``.conf`` is removed after; :func:`uninstall` restores it). The binary goes in first, so
    the runtime never meets a conflist naming a plugin that is not there. Idempotent.
    """
    if not _SOCKET_PATH.fullmatch(str(socket_path)):
        raise InstallError(
            f"socket {socket_path}: the plugin accepts an absolute path of [A-Za-z0-9/._-], at most 106 bytes"
        )
    data = binary.read_bytes()
    target = bin_dir / PLUGIN_TYPE
    binary_changed = not (target.is_file() and target.read_bytes() == data and os.access(target, os.X_OK))
    if binary_changed:
        _write_atomically(target, data, 0o755)
    files = conf_files(conf_dir)
    if not files:
        raise InstallError(f"{conf_dir}: no CNI configuration yet (the node's network plugin writes one first)")
    primary = files[0]
    conf = _load_conf(primary)
    entry: dict[str, Any] = {"type": PLUGIN_TYPE, "socket": str(socket_path)}
    if isinstance(conf.get("plugins"), list):
        out, converted_from = primary, None
        plugins = conf["plugins"]
    else:
        if not conf.get("type") or not conf.get("name"):
            raise InstallError(f"{primary}: neither a conflist (plugins) nor a plugin configuration (type, name)")
        out, converted_from = primary.with_suffix(".conflist"), primary
        entry[CONVERTED_KEY] = primary.name
        plugins = [conf]
        conf = {"cniVersion": conf.get("cniVersion", "0.4.0"), "name": conf["name"]}
    if not all(isinstance(p, dict) for p in plugins):
        raise InstallError(f"{primary}: a plugins entry is not an object")
    kept = [p for p in plugins if p.get("type") != PLUGIN_TYPE]
    ours = [p for p in plugins if p.get("type") == PLUGIN_TYPE]
    if CONVERTED_KEY in (ours[-1] if ours else {}):
        entry[CONVERTED_KEY] = ours[-1][CONVERTED_KEY]  # keep what a first install converted
    new = {**conf, "plugins": [*kept, entry]}
    changed = converted_from is not None or plugins != new["plugins"]
    if changed:
        _write_atomically(out, _dump(new), 0o644)
        if converted_from is not None and converted_from != out:
            converted_from.unlink()
        log.info("cni: %s now ends with %s (socket %s)", out, PLUGIN_TYPE, socket_path)
    return InstallResult(out, changed, binary_changed)


def uninstall(conf_dir: Path, bin_dir: Path) -> list[Path]:
    """Take our plugin out of every configuration in ``conf_dir``, then remove the binary; the files changed.

    A conflist that :func:`install` made from a ``.conf`` becomes that ``.conf`` again. Files that
    are not ours or not valid JSON are left as they are. Idempotent.
    """
    changed: list[Path] = []
    for path in conf_files(conf_dir):
        try:
            conf = _load_conf(path)
        except InstallError:
            continue
        plugins = conf.get("plugins")
        if not isinstance(plugins, list):
            continue
        ours = [p for p in plugins if isinstance(p, dict) and p.get("type") == PLUGIN_TYPE]
        if not ours:
            continue
        kept = [p for p in plugins if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
        original = ours[-1].get(CONVERTED_KEY)
        if isinstance(original, str) and len(kept) == 1 and re.fullmatch(r"[^/]+\.conf", original):
            restored = conf_dir / original
            _write_atomically(restored, _dump(kept[0]), 0o644)
            path.unlink()
            changed += [restored, path]
        else:
            _write_atomically(path, _dump({**conf, "plugins": kept}), 0o644)
            changed.append(path)
        log.info("cni: removed %s from %s", PLUGIN_TYPE, path)
    with contextlib.suppress(FileNotFoundError):
        (bin_dir / PLUGIN_TYPE).unlink()
        changed.append(bin_dir / PLUGIN_TYPE)
    return changed


async def keep_installed(
    socket_path: Path, conf_dir: Path = NODE_CONF_DIR, bin_dir: Path = NODE_BIN_DIR, *,
    binary: Path = PLUGIN_IN_IMAGE, retry: float = 5.0,
) -> InstallResult | None:
    """Install the plugin on the node (:func:`install`), retrying every ``retry`` seconds while the
    node has no CNI configuration yet; None, with a warning, when the node's directories are not
    mounted (no first-packet protection: pods are then found by the ``/proc`` scan only)."""
    if not os.path.isdir(conf_dir) or not os.path.isdir(bin_dir):  # noqa: ASYNC240 (two stat calls, once)
        log.warning("cni: %s or %s not mounted: the CNI plugin is not installed, so a new pod may answer "
                    "before the enforcer serves it (mount the node's CNI directories: components/pod-mode)",
                    conf_dir, bin_dir)  # fmt: skip
        return None
    while True:
        try:
            result = await asyncio.to_thread(install, conf_dir, bin_dir, binary=binary, socket_path=socket_path)
        except (InstallError, OSError) as exc:
            log.error("cni: cannot install the plugin (retried in %gs): %s", retry, exc)
            await asyncio.sleep(retry)
            continue
        log.info("cni: plugin in %s (%s)", result.conf_file,
                 "installed" if result.conf_changed or result.binary_changed else "already installed")
        return result


def uninstall_from_node(conf_dir: Path = NODE_CONF_DIR, bin_dir: Path = NODE_BIN_DIR) -> list[Path]:
    """The uninstall's half of :func:`keep_installed`: :func:`uninstall` where the directories are mounted."""
    if not conf_dir.is_dir():
        return []
    try:
        return uninstall(conf_dir, bin_dir)
    except OSError as exc:
        log.error("cni: could not remove the plugin from %s: %s", conf_dir, exc)
        return []
