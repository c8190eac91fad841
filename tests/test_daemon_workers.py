"""Several worker processes (``enforcer run --workers 2``): one port, shared sessions, pending
logins, revocations and TLS session tickets; a dead worker is replaced; SIGTERM stops them all.

Requests are spread over the workers by the kernel (SO_REUSEPORT hashes each new connection),
so the tests use a new connection per request: a state that was not shared would fail about
every other request, and a dozen requests make that certain to show.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from tests.harness.e2e_stack import HOST, Stack, start_stack, stop_stack
from tests.harness.prereq import require, require_e2e
from tests.harness.redis import RedisServer

pytestmark = pytest.mark.e2e

ROUNDS = 12
COOKIE = "__Host-enforcer-app"


@pytest_asyncio.fixture(scope="module")
async def wstack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """The e2e stack with the enforcer running two workers."""
    require_e2e()
    s = await start_stack(tmp_path_factory.mktemp("workers"), run_args=("--workers", "2"))
    try:
        yield s
    finally:
        await stop_stack(s)


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return sorted(out)


def established_by_pid(pids: list[int], port: int) -> dict[int, int]:
    """How many established TCP connections to local ``port`` each pid holds."""
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "01" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes[parts[9]] = 0
    counts = dict.fromkeys(pids, 0)
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                counts[pid] += 1
    return counts


async def wait_for(predicate, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def fresh_gets(stack: Stack, cookie: str, n: int = ROUNDS) -> list[int]:
    """``n`` GETs, each on its own new TLS connection, with this session cookie."""
    statuses = []
    for _ in range(n):
        connector = aiohttp.TCPConnector(ssl=stack.client_ssl(), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http, http.get(
            f"https://127.0.0.1:{stack.port}/hello", headers={"Host": f"{HOST}:{stack.port}", "Cookie": cookie},
            server_hostname=HOST, allow_redirects=False,
        ) as r:
            statuses.append(r.status)
    return statuses


async def test_both_workers_accept_connections_on_the_one_port(wstack: Stack) -> None:
    """The master runs two workers; 16 connections opened at once land on both of them."""
    assert wstack.process is not None
    workers = children(wstack.process.pid)
    assert len(workers) == 2
    writers = []
    try:
        for _ in range(16):
            _, w = await asyncio.open_connection("127.0.0.1", wstack.port, ssl=wstack.client_ssl(),
                                                 server_hostname=HOST)
            writers.append(w)
        counts = established_by_pid(workers, wstack.port)
    finally:
        for w in writers:
            w.close()
    assert sum(counts.values()) == 16
    assert all(n > 0 for n in counts.values()), counts


async def test_logins_and_sessions_work_whichever_worker_answers(wstack: Stack) -> None:
    """Logins whose redirect and callback may hit different workers all complete, and the session works on every worker."""
    for user in ("alice", "bob", "alice"):
        async with wstack.browser(new_connection_per_request=True) as b:
            page = await wstack.login(b, user, "/hello")
            assert page.status == 200, page.text[:300]
            cookie = b.cookies.get(COOKIE)
            assert cookie is not None
    assert await fresh_gets(wstack, f"{COOKIE}={cookie.value}") == [200] * ROUNDS


async def test_logout_on_one_worker_revokes_the_session_on_all(wstack: Stack) -> None:
    """After logout, the old cookie is refused on every following request, whichever worker gets it."""
    async with wstack.browser(new_connection_per_request=True) as b:
        assert (await wstack.login(b, "bob", "/")).status == 200
        cookie = b.cookies.get(COOKIE)
        assert cookie is not None
        old = f"{COOKIE}={cookie.value}"
        assert await fresh_gets(wstack, old, 4) == [200] * 4  # cached in whichever workers served these
        r = await b.get(wstack.base + "/oauth2/logout", follow=False)
        assert r.status == 302
    assert set(await fresh_gets(wstack, old)) == {302}


def _resumptions(port: int, ca: ssl.SSLContext, n: int) -> list[bool]:
    """One full TLS 1.3 handshake and request, then ``n`` new connections offering its ticket."""

    def connect(session: ssl.SSLSession | None) -> tuple[bool, ssl.SSLSession | None]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ca.wrap_socket(raw, server_hostname=HOST, session=session) as tls:
            tls.sendall(f"GET /public/x HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())
            while tls.recv(65536):
                pass
            return tls.session_reused, tls.session

    _, ticket = connect(None)
    return [connect(ticket)[0] for _ in range(n)]


async def test_tls_sessions_resume_on_every_worker(wstack: Stack) -> None:
    """A TLS session ticket issued by one worker resumes on the other too (the ticket keys are shared)."""
    reused = await asyncio.to_thread(_resumptions, wstack.port, wstack.client_ssl(), ROUNDS)
    assert reused == [True] * ROUNDS


async def test_readiness_covers_every_worker(wstack: Stack) -> None:
    """The master publishes each worker's state; /readyz is 200 only when both workers are ready."""
    import json  # noqa: PLC0415

    assert wstack.process is not None
    state = json.loads((wstack.state / "workers.json").read_text())
    assert state["master"] == wstack.process.pid and state["workers"] == 2
    assert state["ready"] == [0, 1] and sorted(state["pids"].values()) == children(wstack.process.pid)
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{wstack.admin_port}/readyz") as r:
        assert r.status == 200, await r.text()


async def test_metrics_add_up_every_worker(wstack: Stack) -> None:
    """The admin /metrics counts the requests of all workers, not only the primary's."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{wstack.admin_port}/metrics") as r:
        text = await r.text()
    served = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("enforcer_requests_total{") and 'decision="allow"' in line
    )
    assert served >= ROUNDS * 2  # the tests above made more than that, spread over both workers


async def test_a_killed_worker_is_replaced_and_service_continues(wstack: Stack) -> None:
    """SIGKILL of a worker: the master starts a new one, and requests keep being answered meanwhile."""
    assert wstack.process is not None
    master = wstack.process.pid
    before = children(master)
    victim = before[-1]
    async with wstack.browser() as b:
        assert (await wstack.login(b, "alice", "/")).status == 200
        cookie = b.cookies.get(COOKIE)
        assert cookie is not None
    os.kill(victim, signal.SIGKILL)
    after = await wait_for(lambda: (c := children(master)) and len(c) == 2 and victim not in c and c)
    assert set(after) - set(before)
    assert await fresh_gets(wstack, f"{COOKIE}={cookie.value}") == [200] * ROUNDS
    assert "exited unexpectedly" in wstack.log_tail()

    async def ready() -> bool:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{wstack.admin_port}/readyz") as r:
            return r.status == 200

    deadline = time.monotonic() + 10
    while not await ready():  # the replacement discovers its IdP, then the master says so
        assert time.monotonic() < deadline, (wstack.state / "workers.json").read_text()
        await asyncio.sleep(0.1)


async def test_sigterm_stops_every_worker_and_exits_zero(wstack: Stack) -> None:
    """SIGTERM to the master drains and stops both workers; the master exits 0."""
    assert wstack.process is not None
    master = wstack.process.pid
    workers = children(master)
    assert await wstack.stop_enforcer() == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_a_bad_definition_fails_the_start_of_all_workers(tmp_path: Path) -> None:
    """With two workers, an invalid definitions file stops the start with exit 2 and the error's key path."""
    (tmp_path / "definitions.yaml").write_text("kind: service\nname: x\nport: notaport\n")
    (tmp_path / "enforcer.yaml").write_text(
        f"listen: {{address: 127.0.0.1, port: {_free_port()}}}\nadmin: {{address: 127.0.0.1, port: 0}}\n"
        f"stateDir: {tmp_path}/state\nlogsDir: {tmp_path}/logs\ndefinitions:\n  - file: {tmp_path}/definitions.yaml\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "enforcer", "run", "-c", str(tmp_path / "enforcer.yaml"), "--workers", "2"],
        check=False, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "port" in done.stderr and "notaport" in done.stderr


def test_two_workers_need_the_shared_session_store(tmp_path: Path) -> None:
    """``--workers 2`` with the in-memory session store is a configuration error naming the option."""
    (tmp_path / "enforcer.yaml").write_text(
        f"stateDir: {tmp_path}/state\nsessions: {{store: memory}}\ndefinitions:\n  - file: {tmp_path}/d.yaml\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "enforcer", "run", "-c", str(tmp_path / "enforcer.yaml"), "--workers", "2"],
        check=False, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    assert "--workers" in done.stderr and "sessions.store: sqlite" in done.stderr


async def test_two_workers_share_sessions_through_redis(tmp_path: Path) -> None:
    """With sessions.store: redis two workers are allowed and act as two enforcers of a fleet: logins complete whichever worker answers, the session works on both, and a logout on one is refused by both."""
    require_e2e()
    require(shutil.which("redis-server") is not None, "redis-server (scripts/setup)")
    redis = RedisServer()
    redis.start()
    extra = (f"sessions:\n  store: redis\n  redis: {{url: 'unix://{redis.sock}', username: enforcer, "
             f"passwordFile: {redis.password_file}}}\n")
    stack = await start_stack(tmp_path / "stack", run_args=("--workers", "2"), extra_config=extra)
    try:
        assert stack.process is not None
        pids = children(stack.process.pid)
        assert len(pids) == 2, pids
        async with stack.browser(new_connection_per_request=True) as b:
            assert (await stack.login(b, "alice", "/hello")).status == 200
            cookie = b.cookies.get(COOKIE)
            assert cookie is not None
            old = f"{COOKIE}={cookie.value}"
            assert await fresh_gets(stack, old) == [200] * ROUNDS
            assert redis.cli("--scan", "--pattern", "enforcer:s:*").split()  # the session lives in Redis
            r = await b.get(stack.base + "/oauth2/logout", follow=False)
            assert r.status == 302
        assert set(await fresh_gets(stack, old)) == {302}
    finally:
        await stop_stack(stack)
        redis.stop()
        shutil.rmtree(redis.dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
