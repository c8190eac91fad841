"""The Redis store through real Sentinels (Debian's redis-server ``--sentinel``): use, failover, a wrong name.

Each test group starts its own master, replica and Sentinels on loopback ports (tests/harness/redis.py
:class:`SentinelGroup`) and stops them by PID.
"""

from __future__ import annotations

import io
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from enforcer.cli import doctor
from enforcer.config.settings import DaemonModel, Settings
from enforcer.errors import Reason
from enforcer.identity.redis import RedisSessionStore, SessionStoreUnavailable
from enforcer.run import stores
from tests.harness.gate import ISSUER
from tests.harness.prereq import require
from tests.harness.redis import STALENESS, SentinelGroup, make_session, until, watched


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
