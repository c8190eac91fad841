"""A real redis-server for tests: started on a unix socket (or TLS on loopback) in a temp dir, with an ACL user."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
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

    def __init__(self, tls: CertStore | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="redis-"))
        self.sock = self.dir / "redis.sock"
        self.password_file = self.dir / "password"
        self.password_file.write_text(PASSWORD + "\n")
        self.tls = tls
        self.port = _free_port() if tls is not None else 0
        lines = [
            "port 0", f"unixsocket {self.sock}", "unixsocketperm 700", f"dir {self.dir}", 'save ""',
            "appendonly no", "user default off",
            f"user enforcer on >{PASSWORD} ~enforcer:* &enforcer:* +@all -@dangerous",
        ]
        if tls is not None:
            leaf = tls.ensure_leaf("redis", ["localhost"], ["127.0.0.1"])
            (self.dir / "ca.pem").write_bytes(tls.ca_pem())
            lines += [f"tls-port {self.port}", f"tls-cert-file {leaf.cert}", f"tls-key-file {leaf.key}",
                      f"tls-ca-cert-file {self.dir / 'ca.pem'}", "tls-auth-clients no"]
        (self.dir / "redis.conf").write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self, **changes: Any) -> RedisConfig:
        url = f"rediss://localhost:{self.port}" if self.tls is not None else f"unix://{self.sock}"
        base = RedisConfig(url=url, username="enforcer", password_file=self.password_file, timeout=0.2,
                           staleness=STALENESS, ca_file=self.dir / "ca.pem" if self.tls is not None else None)
        return dataclasses.replace(base, **changes)

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", str(self.dir / "redis.conf")], stdout=subprocess.DEVNULL)
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


