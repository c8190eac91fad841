"""Real redis-servers for tests: one on a unix socket (or TLS on loopback), or a master, a replica and Sentinels on loopback; an ACL user."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from enforcer.http.certs import CertStore
from enforcer.identity.redis import RedisConfig, RedisSessionStore
from enforcer.identity.sessions import Session
from tests.harness.gate import ISSUER

PASSWORD = "s3cret-redis-password"
STALENESS = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server process of its own: unix socket, or TLS on a loopback port; an ACL user
    ``enforcer`` (password :data:`PASSWORD`, keys and channels ``enforcer:*`` only) and the
    default user off. No persistence: a restart starts empty."""

    def __init__(self, tls: CertStore | None = None, *, netns: str | None = None, bind: str = "127.0.0.1",
                 port: int | None = None, cert_names: tuple[str, ...] | None = None,
                 acl_users: dict[str, str] | None = None) -> None:
        """``netns``/``bind``/``port``: where the TLS port listens (in that network namespace);
        the unix socket is a file, so the tests reach it from any namespace. ``cert_names``: the
        only names of its TLS certificate (default: localhost and the listening addresses).
        ``acl_users``: more ACL users, name -> rules (``~keys &channels +commands``), each with
        the password :data:`PASSWORD`."""
        self.dir = Path(tempfile.mkdtemp(prefix="redis-"))
        self.sock = self.dir / "redis.sock"
        self.password_file = self.dir / "password"
        self.password_file.write_text(PASSWORD + "\n")
        self.tls = tls
        self.netns = netns
        self.bind = bind
        self.port = (port or _free_port()) if tls is not None else 0
        lines = [
            "port 0", f"unixsocket {self.sock}", "unixsocketperm 700", f"dir {self.dir}", 'save ""',
            "appendonly no", "user default off",
            f"user enforcer on >{PASSWORD} ~enforcer:* &enforcer:* +@all -@dangerous",
            *(f"user {name} on >{PASSWORD} {rules}" for name, rules in (acl_users or {}).items()),
        ]
        if tls is not None:
            leaf = (tls.ensure_leaf("redis", ["localhost"], sorted({"127.0.0.1", bind})) if cert_names is None
                    else tls.ensure_leaf("redis-named", list(cert_names)))
            (self.dir / "ca.pem").write_bytes(tls.ca_pem())
            lines += [f"bind {bind}", f"tls-port {self.port}", f"tls-cert-file {leaf.cert}", f"tls-key-file {leaf.key}",
                      f"tls-ca-cert-file {self.dir / 'ca.pem'}", "tls-auth-clients no"]
        (self.dir / "redis.conf").write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self, **changes: Any) -> RedisConfig:
        url = f"rediss://localhost:{self.port}" if self.tls is not None else f"unix://{self.sock}"
        base = RedisConfig(url=url, username="enforcer", password_file=self.password_file, timeout=0.2,
                           staleness=STALENESS, ca_file=self.dir / "ca.pem" if self.tls is not None else None)
        return dataclasses.replace(base, **changes)

    def start(self) -> None:
        argv = ["redis-server", str(self.dir / "redis.conf")]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]  # exec()s: the PID is redis-server's
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.sock))
                return
            time.sleep(0.01)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        self.sock.unlink(missing_ok=True)

    def pause(self, paused: bool) -> None:
        """SIGSTOP / SIGCONT: a Redis that accepts connections and never answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def cli(self, *args: str) -> str:
        out = subprocess.run(["redis-cli", "-s", str(self.sock), "--user", "enforcer", "--pass", PASSWORD,
                              "--no-auth-warning", *args], capture_output=True, text=True, check=True)
        return out.stdout.strip()


@contextlib.asynccontextmanager
async def watched(config: RedisConfig, **kw: Any) -> AsyncIterator[RedisSessionStore]:
    """A store with its watcher running; waits until its cache is fresh (or 2 s)."""
    store = RedisSessionStore(config, idle_timeout=kw.pop("idle_timeout", 3600), **kw)
    task = asyncio.create_task(store.watch())
    await until(store.fresh, 2.0)
    try:
        yield store
    finally:
        await store.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(cond: Callable[[], bool], limit: float) -> float:
    """Poll ``cond`` every ms; the seconds it took (``limit`` + 1 if it never held)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if cond():
            return time.monotonic() - start
        await asyncio.sleep(0.001)
    return limit + 1


def make_session(**changes: Any) -> Session:
    """A live session of "app" starting now (real time: Redis expires keys by the real clock)."""
    now = time.time()
    base = Session(service="app", issuer=ISSUER, sub="alice", email="alice@example.com", username="alice",
                   tags=frozenset({"email=alice@example.com", "groups=staff"}), sid="sid-1",
                   id_token="header.payload.signature", created=now, last_seen=now, expires=now + 8 * 3600)
    return dataclasses.replace(base, **changes)




# ------------------------------------------------------------------ Sentinel: a master, a replica, N Sentinels

ADMIN_PASSWORD = "s3cret-admin-password"
"""The ``admin`` ACL user's: replication (``masteruser``) and the Sentinels (``sentinel auth-user``)."""


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.01)
    raise RuntimeError(f"{what} did not start")


def _listen(port: int, tls: bool) -> list[str]:
    return ["port 0", f"tls-port {port}"] if tls else [f"port {port}"]


class SentinelGroup:
    """A monitored pair -- a master and a replica (``replicaof`` it), two redis-servers on
    loopback ports with :class:`RedisServer`'s ACL user ``enforcer`` and an ``admin`` user for
    replication and the Sentinels -- and ``sentinels`` Sentinels (``redis-server --sentinel``)
    monitoring it as ``name`` with short timeouts. The Sentinels have the same ``enforcer``
    user (the store sends its credentials to them too) and need it: ``user default off`` --
    or, with ``sentinel_users=False``, no users at all (Sentinels open to anyone on loopback).
    No persistence. Processes are stopped by PID."""

    def __init__(self, *, sentinels: int = 1, name: str = "enforcer-master", down_after_ms: int = 1000,
                 failover_timeout_ms: int = 2000, sentinel_users: bool = True,
                 tls: CertStore | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="redis-sentinel-"))
        self.name = name
        self.password_file = self.dir / "password"
        self.password_file.write_text(PASSWORD + "\n")
        self.ports = [_free_port(), _free_port()]
        """The two data nodes' ports: [0] starts as the master, [1] as its replica."""
        self.sentinel_ports = [_free_port() for _ in range(sentinels)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._users = sentinel_users
        self.tls = tls
        tls_lines: list[str] = []
        if tls is not None:  # every link TLS: clients, replication, Sentinels to nodes and to each other
            leaf = tls.ensure_leaf("redis", ["localhost"], ["127.0.0.1"])
            (self.dir / "ca.pem").write_bytes(tls.ca_pem())
            tls_lines = [f"tls-cert-file {leaf.cert}", f"tls-key-file {leaf.key}",
                         f"tls-ca-cert-file {self.dir / 'ca.pem'}", "tls-auth-clients no", "tls-replication yes"]
        users = [
            "user default off",
            f"user enforcer on >{PASSWORD} ~enforcer:* &enforcer:* +@all -@dangerous",
            f"user admin on >{ADMIN_PASSWORD} ~* &* +@all",
        ]
        for i, port in enumerate(self.ports):
            node = self.dir / f"node{port}"
            node.mkdir()
            lines = [*_listen(port, tls is not None), "bind 127.0.0.1", f"dir {node}", 'save ""', "appendonly no",
                     *users, *tls_lines,
                     "masteruser admin", f"masterauth {ADMIN_PASSWORD}"]
            if i == 1:
                lines.append(f"replicaof 127.0.0.1 {self.ports[0]}")
            (node / "redis.conf").write_text("\n".join(lines) + "\n")
        quorum = sentinels // 2 + 1
        for port in self.sentinel_ports:
            node = self.dir / f"sentinel{port}"
            node.mkdir()
            auth = [
                "user default off", f"user enforcer on >{PASSWORD} +@all",
                f"user admin on >{ADMIN_PASSWORD} ~* &* +@all",
                "sentinel sentinel-user admin", f"sentinel sentinel-pass {ADMIN_PASSWORD}",
            ] if sentinel_users else []
            lines = [
                *_listen(port, tls is not None), "bind 127.0.0.1", f"dir {node}", *auth, *tls_lines,
                f"sentinel monitor {name} 127.0.0.1 {self.ports[0]} {quorum}",
                f"sentinel auth-user {name} admin", f"sentinel auth-pass {name} {ADMIN_PASSWORD}",
                f"sentinel down-after-milliseconds {name} {down_after_ms}",
                f"sentinel failover-timeout {name} {failover_timeout_ms}",
                f"sentinel parallel-syncs {name} 1",
            ]
            (node / "sentinel.conf").write_text("\n".join(lines) + "\n")

    def config(self, **changes: Any) -> RedisConfig:
        """The store's config through the Sentinels (as ``sessions.redis.sentinels`` builds it)."""
        base = RedisConfig(sentinels=tuple(("127.0.0.1", p) for p in self.sentinel_ports),
                           sentinel_master=self.name, username="enforcer", password_file=self.password_file,
                           timeout=0.2, staleness=STALENESS, tls=self.tls is not None,
                           ca_file=self.dir / "ca.pem" if self.tls is not None else None)
        return dataclasses.replace(base, **changes)

    def start_node(self, port: int) -> None:
        """Start (or restart) the data node on ``port``."""
        self.procs[port] = proc = subprocess.Popen(
            ["redis-server", str(self.dir / f"node{port}" / "redis.conf")], stdout=subprocess.DEVNULL)
        _wait_port(port, proc, f"redis-server :{port}")

    def start(self) -> None:
        """Master, replica (until it is in sync), then the Sentinels (until they see the replica)."""
        for port in self.ports:
            self.start_node(port)
        self._wait(lambda: "master_link_status:up" in self.cli(self.ports[1], "INFO", "replication"),
                   "replica in sync")
        for port in self.sentinel_ports:
            self.procs[port] = proc = subprocess.Popen(
                ["redis-server", str(self.dir / f"sentinel{port}" / "sentinel.conf"), "--sentinel"],
                stdout=subprocess.DEVNULL)
            _wait_port(port, proc, f"sentinel :{port}")
        others = str(len(self.sentinel_ports) - 1)

        def ready() -> bool:
            for port in self.sentinel_ports:
                state = self.sentinel_state(port)
                if state.get("num-slaves") != "1" or state.get("num-other-sentinels") != others:
                    return False
            return True
        self._wait(ready, "Sentinels see the replica and each other")

    @staticmethod
    def _wait(cond: Callable[[], bool], what: str, limit: float = 15.0) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.CalledProcessError):
                if cond():
                    return
            time.sleep(0.02)
        raise RuntimeError(f"timed out waiting for: {what}")

    def kill(self, port: int) -> None:
        """``kill -9`` the process on ``port`` (by its PID)."""
        proc = self.procs.pop(port)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        """Kill every process still running (by PID) and remove the directory."""
        for port in list(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.procs[port].pid, signal.SIGCONT)
            self.kill(port)
        shutil.rmtree(self.dir, ignore_errors=True)

    def cli(self, port: int, *args: str, user: str = "admin") -> str:
        """redis-cli on ``port`` (a data node or a Sentinel) as ``user`` (no user: a Sentinel
        without users)."""
        password = ADMIN_PASSWORD if user == "admin" else PASSWORD
        auth = ["--user", user, "--pass", password] if self._users or port not in self.sentinel_ports else []
        if self.tls is not None:
            auth += ["--tls", "--cacert", str(self.dir / "ca.pem")]
        out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *auth, "--no-auth-warning", *args],
                             capture_output=True, text=True, check=True, timeout=5)
        return out.stdout.strip()

    def sentinel_state(self, port: int) -> dict[str, str]:
        """``SENTINEL MASTER <name>`` of the Sentinel on ``port``, as a dict."""
        fields = self.cli(port, "SENTINEL", "MASTER", self.name).splitlines()
        return dict(zip(fields[::2], fields[1::2], strict=False))

    def master_port(self) -> int:
        """The master's port as the first Sentinel reports it."""
        host_port = self.cli(self.sentinel_ports[0], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name).split()
        return int(host_port[1])
