"""Find a running pod's network namespace from /proc and hold it open: :func:`find_pod_netns`.

After a restart the enforcer must re-find the namespaces of the pods it protects, which a
CNI plugin event no longer tells it. As Istio's node agent does (``podcgroupns_linux.go``), the
scan walks ``/proc/<pid>/ns/net``, maps each process to a pod UID through its cgroup path
(:func:`pod_uid_from_cgroup`; pluggable, because cgroup files cannot be faked in a test),
dedupes namespaces by inode and prefers the one of the pod's oldest process (the sandbox's
pause process). Two guards, each of which refuses a namespace:

* the host's namespace (PID 1's, and our own: with ``hostNetwork`` they are the same) is never
  a pod's: a process of the pod that runs in the host namespace (e.g. a ``hostNetwork`` pod, or
  one in transit) must not make us program the node's firewall;
* the namespace must hold one of the pod's IPs (read inside it over rtnetlink,
  :func:`netns_addresses`): a process of one pod that entered another pod's namespace cannot
  send us into the wrong one.

The result is a :class:`PodNetns`: an ``O_RDONLY`` descriptor on the namespace, which keeps
it pinned (the process it was found through may exit) until :meth:`PodNetns.close`. Its
:attr:`PodNetns.path` (``/proc/self/fd/N``) is what :func:`enforcer.net.netns.run_in_netns`
and ``enforcer.net.nftables`` take as ``netns``. The address dump is pyroute2's, imported only
when a pod is looked for.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from enforcer.net.netns import run_in_netns

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PodUidOf = Callable[[int], "str | None"]
"""Maps a pid to the UID of the pod it belongs to (None: not a pod's process, or gone)."""

AddressesOf = Callable[[str], "frozenset[IPAddress]"]
"""The addresses configured inside the network namespace at a path (``/proc/self/fd/N``)."""

# a pod UID as kubelet writes it in cgroup paths: '-' (cgroupfs) or '_' (systemd) separators
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
# cgroupfs driver (v1 and v2): .../kubepods[/besteffort|/burstable]/pod<uid>/<container id>
_CGROUPFS_POD = re.compile(rf"pod({_UID})")
# systemd driver: .../kubepods-besteffort.slice/kubepods-besteffort-pod<uid_with_underscores>.slice/...
# (under a kubelet cgroup root such as kind's /kubelet.slice: kubelet-kubepods-...-pod<uid>.slice)
_SYSTEMD_POD = re.compile(rf"(?:[a-z0-9]+-)*kubepods(?:-[a-z]+)?-pod({_UID})\.slice")


def pod_uid_from_cgroup(text: str) -> str | None:
    """The pod UID in the contents of a ``/proc/<pid>/cgroup`` file, or None.

    Each line is ``hierarchy:controllers:path`` (cgroup v1: one per hierarchy; v2: ``0::path``).
    A path component ``pod<uid>`` (cgroupfs driver) or ``kubepods[-<qos>]-pod<uid>.slice``
    (systemd driver, ``_`` for ``-``) names the pod; components are matched whole, so a
    container or file name that merely contains ``pod`` does not. Paths may be relative to a
    cgroup namespace (``/../../pod<uid>/...``). The UID comes back lower-case with ``-``.
    """
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for component in parts[2].split("/"):
            match = _CGROUPFS_POD.fullmatch(component) or _SYSTEMD_POD.fullmatch(component)
            if match:
                return match.group(1).replace("_", "-")
    return None


def proc_pod_uid(pid: int) -> str | None:
    """The pod UID of process ``pid`` from ``/proc/<pid>/cgroup`` (None if none or gone)."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            return pod_uid_from_cgroup(f.read())
    except OSError:
        return None


def parse_start_time(stat: str) -> int:
    """Field 22 of a ``/proc/<pid>/stat`` line: the process's start, in clock ticks since boot.

    The command name (field 2) is in parentheses and may itself hold spaces and ``)``, so the
    fields are counted after its *last* ``)``. Raises ValueError for a malformed line.
    """
    _, paren, rest = stat.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 20:
        raise ValueError(f"not a /proc/<pid>/stat line: {stat[:80]!r}")
    return int(fields[19])  # fields[0] is field 3 (state)


# ---------------------------------------------------------------------------------------------
# addresses inside a namespace (pyroute2's RTM_GETADDR dump, from a thread inside it)


def _dump_addresses() -> frozenset[IPAddress]:
    from pyroute2 import IPRoute  # noqa: PLC0415 -- pod mode only: pyroute2 costs ~7 MiB of RSS

    found: set[IPAddress] = set()
    with IPRoute() as ipr:  # its netlink socket is made here, in this thread's namespace
        for msg in ipr.get_addr():
            # IFA_LOCAL is the local end (IFA_ADDRESS is the peer on a point-to-point link)
            raw = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if raw:
                found.add(ipaddress.ip_address(str(raw).split("%", 1)[0]))
    return frozenset(found)


def route_source(address: str) -> str | None:
    """The address this namespace's connections to ``address`` come from: the preferred source
    (``RTA_PREFSRC``) of the kernel's route to it (``ip route get``), or None when there is no
    route or it names no source. Pod mode asks it in the node's namespace for a pod's IP: the
    kubelet's probes of that pod come from this address."""
    from pyroute2 import IPRoute  # noqa: PLC0415 -- pod mode only: pyroute2 costs ~7 MiB of RSS

    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=address)
        except Exception as exc:  # pyroute2's NetlinkError (an OSError subclass) or a bad address
            log.debug("no route to %s: %s", address, exc)
            return None
    for route in routes:
        source = route.get_attr("RTA_PREFSRC")
        if source:
            return str(source)
    return None


def netns_addresses(netns: str) -> frozenset[IPAddress]:
    """Every address configured inside the network namespace at ``netns`` (a path or a name
    under /run/netns), read over rtnetlink (pyroute2) from a thread inside it. Needs CAP_SYS_ADMIN."""
    return run_in_netns(netns, _dump_addresses)


# ---------------------------------------------------------------------------------------------
# the held namespace


@dataclass(eq=False)
class PodNetns:
    """An open ``O_RDONLY`` descriptor on a pod's network namespace: it keeps the namespace
    alive (and the same one: a path could be re-used by a new sandbox) until :meth:`close`.

    ``uid``: the pod it belongs to (``""`` when opened from a path without one); ``pid``: the
    process it was found through (0 when opened from a path); ``inode``: the namespace's inode,
    as ``/proc/<pid>/ns/net`` links show it (``net:[inode]``)."""

    fd: int
    inode: int
    uid: str = ""
    pid: int = 0
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, path: str, *, uid: str = "", pid: int = 0) -> PodNetns:
        """Hold the namespace at ``path`` (``/proc/<pid>/ns/net``, ``/var/run/netns/cni-…``:
        what a CNI plugin hands over). Raises OSError if it cannot be opened, ValueError if it
        is not a network namespace (setns would refuse it)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not _is_netns(fd):
                raise ValueError(f"{path} is not a network namespace")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd=fd, inode=st.st_ino, uid=uid, pid=pid)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def path(self) -> str:
        """``/proc/self/fd/N``: the namespace for ``run_in_netns``/``nftables`` (``netns=``).

        Raises ValueError once closed: the descriptor number may then name another file."""
        if self._closed:
            raise ValueError(f"the network namespace net:[{self.inode}] was closed")
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        """Release the namespace (idempotent). It lives on only while something else holds it."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __enter__(self) -> PodNetns:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


_NS_GET_NSTYPE = 0xB703  # ioctl(nsfd, NS_GET_NSTYPE) -> CLONE_NEW* (Linux >= 4.11)
_CLONE_NEWNET = 0x40000000


def _is_netns(fd: int) -> bool:
    try:
        return fcntl.ioctl(fd, _NS_GET_NSTYPE) == _CLONE_NEWNET
    except OSError:
        return False


def netns_inode(path: str) -> int | None:
    """The inode of the namespace at ``path`` (e.g. ``/proc/<pid>/ns/net``), None if gone.
    Raises PermissionError when we may not look (another uid's process, no CAP_SYS_PTRACE)."""
    try:
        return os.stat(path).st_ino
    except PermissionError:
        raise
    except OSError:
        return None


def host_netns_inodes() -> frozenset[int]:
    """The namespaces that are never a pod's: PID 1's (the host's, with ``hostPID``) and ours."""
    inodes = {netns_inode("/proc/self/ns/net")}
    with contextlib.suppress(PermissionError):
        inodes.add(netns_inode("/proc/1/ns/net"))
    return frozenset(i for i in inodes if i)


# ---------------------------------------------------------------------------------------------
# the scan


@dataclass
class ScanResult:
    """What :func:`find_pod_netns` found: ``found`` maps pod UID to its held namespace (close
    them, or hand them on); ``refused`` maps the UIDs it could not serve to why (for a log)."""

    found: dict[str, PodNetns] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Candidate:
    start: int
    pid: int
    inode: int


@dataclass
class _Seen:
    by_uid: dict[str, list[_Candidate]]  # one candidate per namespace (its oldest process), oldest first
    in_host: set[str]  # UIDs with processes in the host namespace
    denied: set[str]  # UIDs with processes whose namespace we may not see


def _candidates(wanted: Iterable[str], pod_uid_of: PodUidOf, host: frozenset[int]) -> _Seen:
    want = set(wanted)
    oldest: dict[str, dict[int, _Candidate]] = {}
    in_host: set[str] = set()
    denied: set[str] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        uid = pod_uid_of(pid)
        if uid is None or uid not in want:
            continue
        try:
            inode = netns_inode(f"/proc/{pid}/ns/net")
        except PermissionError:
            denied.add(uid)
            continue
        if inode is None:
            continue  # gone, or a kernel thread
        if inode in host:
            in_host.add(uid)
            continue
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
                start = parse_start_time(f.read())
        except (OSError, ValueError):
            continue
        have = oldest.setdefault(uid, {}).get(inode)
        if have is None or (start, pid) < (have.start, have.pid):
            oldest[uid][inode] = _Candidate(start, pid, inode)
    by_uid = {uid: sorted(by_inode.values(), key=lambda c: (c.start, c.pid)) for uid, by_inode in oldest.items()}
    return _Seen(by_uid, in_host, denied)


def find_pod_netns(
    pods: Mapping[str, Iterable[str]],
    *,
    pod_uid_of: PodUidOf = proc_pod_uid,
    addresses_of: AddressesOf = netns_addresses,
    host_inodes: frozenset[int] | None = None,
) -> ScanResult:
    """Find and hold the network namespace of each pod in ``pods`` (UID -> the pod's IPs).

    For each pod, its namespaces are tried oldest process first; the first that is not the
    host's and holds one of the pod's IPs is opened and kept (the descriptor is checked to be
    the inode that was scanned, so a pid re-used meanwhile cannot slip in). Blocking (a /proc
    walk, one thread per namespace tried): run it with ``asyncio.to_thread``. Needs
    ``hostPID`` (to see the pods' processes), CAP_SYS_ADMIN (``setns``) and, for processes of
    another uid than ours, CAP_SYS_PTRACE (``/proc/<pid>/ns/net`` is a ptrace-read check; a
    pod reported as such in ``refused`` otherwise). A namespace path handed over by a CNI
    plugin (:meth:`PodNetns.open`) needs no CAP_SYS_PTRACE.
    """
    host = host_netns_inodes() if host_inodes is None else host_inodes
    wanted: dict[str, frozenset[IPAddress]] = {}
    result = ScanResult()
    for uid, ips in pods.items():
        parsed: set[IPAddress] = set()
        for text in ips:
            try:
                parsed.add(ipaddress.ip_address(text))
            except ValueError:
                continue
        if not parsed:
            result.refused[uid] = "no IP known for the pod: cannot check its network namespace"
            continue
        wanted[uid] = frozenset(parsed)
    seen = _candidates(wanted, pod_uid_of, host)
    for uid, pod_ips in wanted.items():
        tried: list[str] = []
        for cand in seen.by_uid.get(uid, ()):
            held = _hold(cand, uid)
            if held is None:
                continue  # exited (or its pid re-used) since the scan
            try:
                addresses = addresses_of(held.path)
            except OSError as exc:
                held.close()
                tried.append(f"net:[{cand.inode}] (pid {cand.pid}): cannot read its addresses: {exc}")
                continue
            if addresses & pod_ips:
                result.found[uid] = held
                break
            held.close()
            tried.append(
                f"net:[{cand.inode}] (pid {cand.pid}) holds none of the pod's IPs "
                f"({', '.join(sorted(map(str, pod_ips)))})"
            )
        else:
            if tried:
                result.refused[uid] = "refused " + "; ".join(tried)
            elif uid in seen.denied:
                result.refused[uid] = (
                    "permission denied reading /proc/<pid>/ns/net of its processes "
                    "(they run as another user: the enforcer needs CAP_SYS_PTRACE)"
                )
            elif uid in seen.in_host:
                result.refused[uid] = "its processes run only in the host network namespace (hostNetwork?)"
            else:
                result.refused[uid] = "no process of the pod found in /proc (not on this node, or not started)"
    for uid, why in result.refused.items():
        log.info("pod %s: no network namespace: %s", uid, why)
    return result


def _hold(cand: _Candidate, uid: str) -> PodNetns | None:
    try:
        held = PodNetns.open(f"/proc/{cand.pid}/ns/net", uid=uid, pid=cand.pid)
    except (OSError, ValueError):
        return None
    if held.inode != cand.inode:
        held.close()
        return None
    return held


def fds_into(inode: int) -> list[str]:
    """This process's descriptors that lead into the network namespace ``inode``: namespace
    descriptors (however opened: ``/proc/<pid>/ns/net``, ``/run/netns/x``) and sockets created
    in it (``SIOCGSKNS``), each as ``fd N (what it links to)``.

    What "no handle into the pod's namespace remains" is checked with (tests, ``doctor``)."""
    nsfs = os.stat("/proc/self/ns/net").st_dev
    out: list[str] = []
    for name in os.listdir("/proc/self/fd"):
        path = f"/proc/self/fd/{name}"
        try:
            target = os.readlink(path)
            st = os.stat(path)  # follows the magic link to the open file itself
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if st.st_dev == nsfs and st.st_ino == inode:
            out.append(f"fd {name} ({target}: net:[{inode}])")
        elif stat.S_ISSOCK(st.st_mode):
            try:
                ns_fd = fcntl.ioctl(int(name), _SIOCGSKNS)
            except OSError:
                continue  # a socket of another kind
            try:
                if os.fstat(ns_fd).st_ino == inode:
                    out.append(f"fd {name} ({target} in net:[{inode}])")
            finally:
                with contextlib.suppress(OSError):
                    os.close(ns_fd)
    return out


_SIOCGSKNS = 0x894C  # ioctl(socket, SIOCGSKNS) -> a descriptor on the socket's netns (Linux >= 4.9)
