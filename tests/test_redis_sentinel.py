"""The Redis store through real Sentinels (Debian's redis-server ``--sentinel``): use, failover, a wrong name.

Each test group starts its own master, replica and Sentinels on loopback ports (tests/harness/redis.py
:class:`SentinelGroup`) and stops them by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml
from redis.exceptions import ResponseError

from enforcer.cli import doctor
from enforcer.config.settings import DaemonModel, Settings, load_settings
from enforcer.errors import Reason
from enforcer.http.certs import CertStore
from enforcer.identity.redis import PING_INTERVAL, RedisSessionStore, SessionStoreUnavailable
from enforcer.run import stores
from tests.harness.gate import ISSUER
from tests.harness.prereq import require
from tests.harness.redis import ADMIN_PASSWORD, STALENESS, SentinelGroup, make_session, until, watched


@pytest.fixture(autouse=True)
def _redis_server_installed() -> None:
    require(shutil.which("redis-server") is not None, "redis-server (scripts/setup)")


@pytest.fixture(scope="module")
def group() -> Iterator[SentinelGroup]:
    """One master, one replica, one Sentinel, shared by the tests that do not break them."""
    g = SentinelGroup(sentinels=1)
    try:
        g.start()
        yield g
    finally:
        g.stop()


def _settings(g: SentinelGroup, tmp_path: Path, **redis: Any) -> Settings:
    r = {"sentinels": [f"127.0.0.1:{p}" for p in g.sentinel_ports], "sentinelMaster": g.name,
         "username": "enforcer", "passwordFile": str(g.password_file), "timeout": "200ms", **redis}
    return Settings(path=tmp_path / "enforcer.yaml", model=DaemonModel.model_validate(
        {"definitions": [{"file": "/x"}], "sessions": {"store": "redis", "redis": r}}))


async def test_sessions_through_the_sentinel(group: SentinelGroup) -> None:
    """Through the Sentinel the store creates, reads, revokes (pop, delete, back-channel) and counts sessions on the master."""
    async with watched(group.config()) as store, watched(group.config()) as other:
        s = make_session()
        handle = await store.create(s)
        assert await other.get(handle, "app", time.time()) is not None
        [key] = group.cli(group.master_port(), "--scan", "--pattern", "enforcer:s:*").split()
        assert handle not in key and int(group.cli(group.master_port(), "PTTL", key)) > 0
        assert await store.count() == 1
        assert await store.pop(handle, "app", time.time()) == s
        assert await store.get(handle, "app", time.time()) is None
        assert await until(lambda: other.get_cached(handle, "app", time.time()) is None, 2.0) < STALENESS
        gone = await store.create(make_session(sid="sid-2"))
        await store.delete(gone)
        assert await other.get(gone, "app", time.time()) is None
        by_sid = await store.create(make_session(sid="sid-3"))
        assert await other.delete_matching(issuer=ISSUER, sid="sid-3") == 1
        assert await until(lambda: store.get_cached(by_sid, "app", time.time()) is None, 2.0) < STALENESS
        assert await store.get(by_sid, "app", time.time()) is None
        await store.put_pending("state-1", "data-1", time.time(), max_pending=10)
        assert await other.take_pending("state-1", time.time(), 600) == "data-1"
        assert await store.count() == 0


async def test_check_and_doctor_through_the_sentinel(group: SentinelGroup, tmp_path: Path) -> None:
    """check/doctor pass through the Sentinel with the ACL user, and fail with a wrong password."""
    settings = _settings(group, tmp_path)
    assert await stores.check_session_store(settings.model) == "ok"
    report = doctor.Report(io.StringIO())
    await doctor._check_sessions(report, settings)
    assert report.failures == 0 and "reachable" in report.lines[0]
    (tmp_path / "bad").write_text("wrong\n")
    denied = await stores.check_session_store(_settings(group, tmp_path, passwordFile=str(tmp_path / "bad")).model)
    assert denied is not None and denied != "ok"


async def test_a_wrong_master_name_names_the_setting(group: SentinelGroup, tmp_path: Path) -> None:
    """A sentinelMaster the Sentinels do not monitor: check/doctor and the store's calls fail naming sessions.redis.sentinelMaster."""
    answer = await stores.check_session_store(_settings(group, tmp_path, sentinelMaster="no-such-master").model)
    print(f"check with a wrong name: {answer}")
    assert answer is not None and "sessions.redis.sentinelMaster 'no-such-master' is not monitored" in answer
    assert group.name in answer  # what they do monitor
    store = RedisSessionStore(group.config(sentinel_master="no-such-master"), idle_timeout=3600)
    try:
        with pytest.raises(SessionStoreUnavailable, match=r"sessions\.redis\.sentinelMaster") as info:
            await store.create(make_session())
        assert info.value.reason is Reason.SESSION_STORE_UNAVAILABLE and info.value.status == 503
        assert store.problem is not None and "sessions.redis.sentinelMaster" in store.problem  # /readyz says it
    finally:
        await store.close()


async def test_sentinels_without_users_are_refused_with_the_reason(tmp_path: Path) -> None:
    """Sentinels without ACL users reject the store's username (it sends them its credentials): check says so, naming the Sentinel and the error."""
    g = SentinelGroup(sentinels=1, sentinel_users=False)
    try:
        g.start()
        answer = await stores.check_session_store(_settings(g, tmp_path).model)
        print(f"check with Sentinels without users: {answer}")
        assert answer is not None and answer.startswith("no Sentinel answered")
        assert f"127.0.0.1:{g.sentinel_ports[0]}: AuthenticationError" in answer
    finally:
        g.stop()


@pytest.mark.parametrize("sentinels", [1, 3])
async def test_failover_fails_closed_then_resumes_by_itself(sentinels: int) -> None:
    """kill -9 of the master: calls fail closed, cached sessions last at most `staleness`; once the replica is promoted the store works again with the replicated sessions, nothing restarted."""
    g = SentinelGroup(sentinels=sentinels)
    try:
        g.start()
        async with watched(g.config()) as store, watched(g.config()) as other:
            cached = await store.create(make_session())  # in store's cache
            unknown = await other.create(make_session(sub="bob", sid="sid-2"))  # never in store's cache
            old = g.master_port()
            assert await asyncio.to_thread(g.cli, old, "WAIT", "1", "2000") == "1"  # both on the replica
            g.kill(old)
            killed = time.monotonic()
            failed_at = promoted_at = last_cached = None
            while (now := time.monotonic()) - killed < 30:
                if promoted_at is None and await asyncio.to_thread(g.master_port) != old:
                    promoted_at = time.monotonic()
                if store.get_cached(cached, "app", time.time()) is not None:
                    last_cached = now
                try:
                    got = await store.get(unknown, "app", time.time())
                except SessionStoreUnavailable as exc:
                    assert exc.reason is Reason.SESSION_STORE_UNAVAILABLE and exc.status == 503
                    failed_at = failed_at or time.monotonic()
                    await asyncio.sleep(0.01)
                    continue
                assert failed_at is not None, "a call succeeded with the master dead"
                assert got is not None and got.sub == "bob"  # replicated before the kill
                break
            recovered_at = time.monotonic()
            assert promoted_at is not None and recovered_at - killed < 30
            assert g.master_port() == g.ports[1] and store.problem is None
            cached_for = 0.0 if last_cached is None else last_cached - killed
            print(f"\nfailover with {sentinels} Sentinel(s): first refusal {(failed_at - killed) * 1000:.0f} ms, "
                  f"cached session served {cached_for * 1000:.0f} ms, replica promoted after "
                  f"{(promoted_at - killed) * 1000:.0f} ms, store available again after "
                  f"{(recovered_at - killed) * 1000:.0f} ms (unavailable {(recovered_at - failed_at) * 1000:.0f} ms)")
            assert cached_for <= STALENESS + 0.1
            assert await until(store.fresh, 5.0) < 5.0 and await until(other.fresh, 5.0) < 5.0
            assert await store.get(cached, "app", time.time()) is not None
            fresh = await other.create(make_session(sub="carol", sid="sid-3"))
            assert await store.get(fresh, "app", time.time()) is not None
            assert await store.pop(fresh, "app", time.time()) is not None
            assert await until(lambda: other.get_cached(fresh, "app", time.time()) is None, 2.0) < STALENESS
            assert await store.count() == 2
    finally:
        g.stop()


@pytest.mark.parametrize("outage", ["sigstop", "sigkill"])
async def test_a_master_cut_off_from_its_replica_stops_the_cache_and_resumes(outage: str) -> None:
    """A master with min-replicas-to-write 1 whose only replica is frozen or killed still answers PING and reads, but refuses the heartbeat's write: the cached session is refused (503) within one heartbeat interval of the first refused write, /readyz's problem names min-replicas-to-write, and with the replica back it is served again by itself."""
    g = SentinelGroup(sentinels=1)
    master, replica = g.ports
    probe = aioredis.Redis(host="127.0.0.1", port=master, username="admin", password=ADMIN_PASSWORD,
                           socket_timeout=0.5)
    try:
        g.start()
        g.cli(master, "CONFIG", "SET", "min-replicas-to-write", "1")
        g.cli(master, "CONFIG", "SET", "min-replicas-max-lag", "1")
        async with watched(g.config()) as store:
            handle = await store.create(make_session())
            assert store.get_cached(handle, "app", time.time()) is not None
            if outage == "sigstop":
                os.kill(g.procs[replica].pid, signal.SIGSTOP)
            else:
                g.kill(replica)
            began = time.monotonic()
            refused_at = stale_at = None
            while time.monotonic() - began < 15 and (refused_at is None or stale_at is None):
                if stale_at is None and store.get_cached(handle, "app", time.time()) is None:
                    stale_at = time.monotonic()
                if refused_at is None:
                    try:
                        await probe.set("enforcer:probe", b"1", px=1000)
                    except ResponseError as exc:
                        assert "NOREPLICAS" in str(exc)
                        refused_at = time.monotonic()
                await asyncio.sleep(0.01)
            assert refused_at is not None and stale_at is not None, "the master kept taking writes, or the cache fresh"
            assert await probe.ping() and await probe.exists("enforcer:nothing") == 0  # it still answers PING and reads
            print(f"\nreplica {outage}: master refuses writes after {(refused_at - began) * 1000:.0f} ms, cached "
                  f"session refused {(stale_at - refused_at) * 1000:.0f} ms after that; problem: {store.problem}")
            assert stale_at - refused_at <= STALENESS + PING_INTERVAL
            with pytest.raises(SessionStoreUnavailable) as info:
                await store.get(handle, "app", time.time())
            assert info.value.reason is Reason.SESSION_STORE_UNAVAILABLE and info.value.status == 503
            assert store.problem is not None and "min-replicas-to-write" in store.problem
            await asyncio.sleep(STALENESS)  # PINGs through the subscription still answer: still refused
            assert not store.fresh() and store.get_cached(handle, "app", time.time()) is None
            if outage == "sigstop":
                os.kill(g.procs[replica].pid, signal.SIGCONT)
            else:
                g.start_node(replica)
            back = await until(store.fresh, 15.0)
            print(f"replica back: store fresh again after {back * 1000:.0f} ms")
            assert back < 15.0 and store.problem is None
            assert await store.get(handle, "app", time.time()) is not None
    finally:
        await probe.aclose()
        g.stop()


async def test_commands_on_a_replica_never_make_the_cache_fresh(group: SentinelGroup) -> None:
    """A store whose URL names the replica (subscription and commands both there) is never fresh: the heartbeat's write is refused, and /readyz's problem says READONLY."""
    replica = next(p for p in group.ports if p != group.master_port())
    config = group.config(sentinels=(), url=f"redis://127.0.0.1:{replica}")
    store = RedisSessionStore(config, idle_timeout=3600)
    task = asyncio.create_task(store.watch())
    try:
        assert await until(store.fresh, STALENESS + 2 * PING_INTERVAL) > STALENESS + 2 * PING_INTERVAL
        print(f"commands on the replica: {store.problem}")
        assert store.problem is not None and "READONLY" in store.problem
    finally:
        await store.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_tls_through_the_sentinel(tmp_path: Path) -> None:
    """With TLS on every link (tls: true, caFile) the store reaches the master through the Sentinel and check passes; an untrusted CA fails."""
    g = SentinelGroup(sentinels=1, tls=CertStore(tmp_path / "state"))
    try:
        g.start()
        async with watched(g.config()) as store:
            assert store.fresh()
            handle = await store.create(make_session())
            assert await store.get(handle, "app", time.time()) is not None
        settings = _settings(g, tmp_path, tls=True, caFile=str(g.dir / "ca.pem"))
        assert await stores.check_session_store(settings.model) == "ok"
        (tmp_path / "other.pem").write_bytes(CertStore(tmp_path / "other").ca_pem())
        untrusted = await stores.check_session_store(
            _settings(g, tmp_path, tls=True, caFile=str(tmp_path / "other.pem")).model)
        assert untrusted is not None and untrusted != "ok"
        print(f"check with an untrusted CA: {untrusted}")
    finally:
        g.stop()


async def test_sentinels_without_users_work_with_sentinel_auth_none(tmp_path: Path) -> None:
    """Sentinels without ACL users (Redis's default) are reached with sentinelAuth: none while Redis itself keeps its ACL user."""
    g = SentinelGroup(sentinels=1, sentinel_users=False)
    try:
        g.start()
        settings = _settings(g, tmp_path, sentinelAuth="none")
        assert await stores.check_session_store(settings.model) == "ok"
        assert settings.model.sessions.redis is not None
        store = RedisSessionStore(stores.redis_config(settings.model.sessions.redis), idle_timeout=3600)
        try:
            handle = await store.create(make_session())
            assert await store.get(handle, "app", time.time()) is not None
        finally:
            await store.close()
    finally:
        g.stop()


@pytest.mark.parametrize(("auth", "expected"), [
    ("same", {"username": "enforcer", "password": "data-pw"}),
    ("none", {}),
    ({"username": "watcher", "passwordFile": "sentinel-pw"}, {"username": "watcher", "password": "sentinel-pw"}),
])
def test_sentinel_auth_decides_what_the_sentinels_are_sent(tmp_path: Path, auth: object, expected: dict[str, str]) -> None:
    """sentinelAuth: same sends the data credentials, none sends nothing, {username, passwordFile} its own (the file relative to enforcer.yaml)."""
    (tmp_path / "data-pw").write_text("data-pw\n")
    (tmp_path / "sentinel-pw").write_text("sentinel-pw\n")
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(yaml.safe_dump({"definitions": [{"file": "d.yaml"}], "sessions": {"store": "redis", "redis": {
        "sentinels": ["127.0.0.1:26379"], "username": "enforcer", "passwordFile": "data-pw", "sentinelAuth": auth}}}))
    redis = load_settings(cfg).model.sessions.redis
    assert redis is not None
    assert stores.redis_config(redis).sentinel_credentials() == expected
