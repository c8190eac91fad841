"""Network namespaces for root tests: a "client host" and an "app host" joined by a veth.

Test addresses exist only inside the namespaces this module creates (names carry the PID);
everything is deleted in ``finally``. :class:`NetnsLoop` runs an asyncio event loop on a thread
that entered a namespace, so aiohttp clients (the scripted browser) connect from there while
the test itself stays in the host namespace.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from enforcer.net import netns as netns_mod
from enforcer.net import sockopt
from tests.harness.prereq import missing

T = TypeVar("T")


def root_missing() -> str | None:
    """Why privileged namespace tests cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and nftables)"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    return None


def require_root() -> None:
    """Skip locally without root; with CI=true a privileged test that cannot run fails."""
    why = root_missing()
    if why:
        missing(why)


def ip(*args: str) -> None:
    """Run ``ip ARGS``; raise with its stderr on failure."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


def netns_names() -> list[str]:
    """The names ``ip netns list`` shows."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


@dataclasses.dataclass(frozen=True)
class Hosts:
    """A client namespace and an app namespace joined by a veth."""

    cli: str
    app: str


@contextlib.contextmanager
def veth_hosts(
    cli: str,
    app: str,
    *,
    app4: str,
    cli4: str,
    app6: str,
    cli6: str,
    extra_app: tuple[str, ...] = (),
) -> Iterator[Hosts]:
    """Create namespaces ``cli`` and ``app`` with a veth (v4 /24 + v6 /64), delete them after.

    The veth is created inside the app namespace, so host interfaces are never touched.
    ``extra_app``: more addresses (with prefix length) for the app side of the veth.
    """
    h = Hosts(cli=cli, app=app)
    try:
        ip("netns", "add", h.cli)
        ip("netns", "add", h.app)
        ip("-n", h.app, "link", "add", "veth-app", "type", "veth", "peer", "name", "veth-cli",
           "netns", h.cli)  # fmt: skip
        for ns, dev, v4, v6 in ((h.app, "veth-app", app4, app6), (h.cli, "veth-cli", cli4, cli6)):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            ip("-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            ip("-n", ns, "link", "set", dev, "up")
        for extra in extra_app:
            ip("-n", h.app, "addr", "add", extra, "dev", "veth-app", *(("nodad",) if ":" in extra else ()))
        yield h
    finally:
        for ns in (h.cli, h.app):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


class NetnsLoop:
    """An asyncio event loop on a thread inside a network namespace.

    Every socket that loop creates (aiohttp connections, ``open_connection``) lives in that
    namespace. ``await nsloop.run(coro)`` runs ``coro`` there from any other loop; objects
    such as a scripted browser can be kept and reused across calls (create them in a coroutine
    run here). ``close()`` stops the loop and joins the thread.
    """

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._main, name=f"nsloop:{netns}", daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            netns_mod._setns(self._fd)
        except BaseException as e:  # handed to __init__
            self._error = e
            self._started.set()
            return
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.run_forever()
        # drain what is left (closing transports), then close
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    async def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``coro`` on the namespace's loop and await its result here."""
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    def close(self) -> None:
        if self._thread.is_alive() and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        with contextlib.suppress(OSError):
            os.close(self._fd)


def connect(netns: str, host: str, port: int, *, mark: int | None = None, timeout: float = 5.0) -> socket.socket:
    """A TCP connection made from inside ``netns`` (optionally with ``SO_MARK``)."""

    def go() -> socket.socket:
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            if mark is not None:
                sockopt.mark_socket(s, mark)
            s.connect((host, port))
        except BaseException:
            s.close()
            raise
        return s

    return netns_mod.run_in_netns(netns, go)


def refused(netns: str, host: str, port: int) -> bool:
    """True if a TCP connection from ``netns`` to ``host:port`` is refused (RST)."""
    try:
        connect(netns, host, port).close()
    except ConnectionRefusedError:
        return True
    return False


async def no_fds_into(inode: int) -> list[str]:
    """This process's fds into the network namespace ``inode``, once nftables' batch sockets are
    closed (after RCU): waits up to 3 s for none to remain, then says which remain."""
    from enforcer.net.pods import fds_into  # noqa: PLC0415 (pod-mode tests only)

    for _ in range(300):
        left = fds_into(inode)
        if not left:
            return left
        await asyncio.sleep(0.01)
    return fds_into(inode)


async def refused_from_here(address: str, port: int) -> bool:
    """True if a TCP connection from this loop's namespace to ``address:port`` fails (reset,
    unreachable, or no answer in 5 s)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), 5)
    except OSError:
        return True
    writer.close()
    return False
