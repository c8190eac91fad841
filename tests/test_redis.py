"""The Redis session store against a real redis-server (Debian's), alone and behind two Gates.

Every test starts its own redis-server on a unix socket (or TLS on loopback) in a temp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from enforcer.config.settings import DaemonModel
from enforcer.errors import Outcome, Reason
from enforcer.http.certs import CertStore
from enforcer.identity import login
from enforcer.identity.redis import PING_INTERVAL, RedisConfig, RedisSessionStore, SessionStoreUnavailable
from enforcer.identity.sessions import LogoutOwed
from enforcer.run import stores
from tests.harness.gate import CLIENT_ID, ISSUER, NOW, Answer, GateRig, sign
from tests.harness.prereq import require
from tests.harness.redis import STALENESS, RedisServer, make_session, until, watched


@pytest.fixture(autouse=True)
def _redis_server_installed() -> None:
    require(shutil.which("redis-server") is not None, "redis-server (scripts/setup)")

@pytest.fixture
def server() -> Iterator[RedisServer]:
    srv = RedisServer()
    srv.start()
    yield srv
    if srv.proc is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(srv.proc.pid, signal.SIGCONT)
    srv.stop()
    shutil.rmtree(srv.dir, ignore_errors=True)


# ------------------------------------------------------------------ the store on its own


async def test_session_round_trip_keyed_by_hash_with_native_ttl(server: RedisServer) -> None:
    """A created session is read back equal (ID token only from pop), stored under the handle's hash with a TTL."""
    async with watched(server.config()) as store:
        s = make_session()
        handle = await store.create(s)
        got = await store.get(handle, "app", time.time())
        assert got == dataclasses.replace(s, id_token="")
        keys = server.cli("--scan", "--pattern", "enforcer:s:*").split()
        assert len(keys) == 1 and handle not in keys[0]
        ttl = int(server.cli("PTTL", keys[0]))
        assert 0 < ttl <= 3600 * 1000  # min(expires, last_seen + idle_timeout)
        assert await store.get(handle, "other", time.time()) is None
        assert await store.count() == 1
        assert await store.pop(handle, "app", time.time()) == s
        assert await store.get(handle, "app", time.time()) is None
        assert await store.count() == 0


async def test_touch_slides_last_seen_and_ttl_but_never_recreates(server: RedisServer) -> None:
    """A due touch writes last_seen and the TTL to Redis; a touch of a deleted session does not bring it back."""
    async with watched(server.config(), touch_interval=10) as store, watched(server.config()) as other:
        s = make_session(last_seen=time.time() - 100)
        handle = await store.create(s)
        touched = await store.get(handle, "app", time.time())
        assert touched is not None and touched.last_seen > s.last_seen
        [key] = server.cli("--scan", "--pattern", "enforcer:s:*").split()
        assert float(server.cli("HGET", key, "l")) == touched.last_seen
        await other.delete(handle)
        assert await store.get(handle, "app", time.time() + 100) is None
        assert server.cli("EXISTS", key) == "0"


async def test_pending_login_is_taken_once_by_any_enforcer(server: RedisServer) -> None:
    """A pending login stored by one enforcer is taken by another exactly once, and not after its TTL."""
    async with watched(server.config()) as a, watched(server.config()) as b:
        await a.put_pending("state-1", "data-1", time.time(), max_pending=10)
        assert await b.take_pending("state-1", time.time(), 600) == "data-1"
        assert await a.take_pending("state-1", time.time(), 600) is None
        await a.put_pending("state-2", "data-2", time.time() - 700, max_pending=10)
        assert await b.take_pending("state-2", time.time(), 600) is None
        assert server.cli("--scan", "--pattern", "enforcer:p:*") == ""


async def test_pending_logins_expire_with_the_login_timeout_and_are_capped_fleet_wide(server: RedisServer) -> None:
    """Pending logins live for the login timeout, not an hour, and beyond max_pending (across enforcers) the oldest go."""
    async with watched(server.config()) as a, watched(server.config()) as b:
        now = time.time()
        for i in range(5):
            await (a, b)[i % 2].put_pending(f"state-{i}", f"data-{i}", now + i, max_pending=3, ttl=600)
        keys = server.cli("--scan", "--pattern", "enforcer:p:*").split()
        assert len(keys) == 3
        assert all(590_000 < int(server.cli("PTTL", k)) <= 600_000 for k in keys)
        assert int(server.cli("ZCARD", "enforcer:pending")) == 3
        assert 590_000 < int(server.cli("PTTL", "enforcer:pending")) <= 600_000
        taken = [await (b, a)[i % 2].take_pending(f"state-{i}", now + 10, 600) for i in range(5)]
        assert taken == [None, None, "data-2", "data-3", "data-4"]
        assert int(server.cli("ZCARD", "enforcer:pending")) == 0  # taken ones leave the index too
        await a.put_pending("ended", "x", now - 700, max_pending=3, ttl=600)
        await a.put_pending("fresh", "y", now, max_pending=3, ttl=600)  # drops the ended one from the index
        assert server.cli("ZRANGE", "enforcer:pending", "0", "-1").count("enforcer:p:") == 1


async def test_first_use_is_fleet_wide_with_a_native_ttl(server: RedisServer) -> None:
    """A mark made on one enforcer is a replay on another (and was_used says so there); it expires by itself when its token would be refused anyway."""
    async with watched(server.config()) as a, watched(server.config()) as b:
        now = time.time()
        assert not await b.was_used("logout", "iss\x00client\x00j1", now)
        assert await a.first_use("logout", "iss\x00client\x00j1", now, now + 180)
        assert await b.was_used("logout", "iss\x00client\x00j1", now)
        assert not await b.first_use("logout", "iss\x00client\x00j1", now, now + 180)
        assert not await a.first_use("logout", "iss\x00client\x00j1", now, now + 180)
        assert await b.first_use("logout", "iss\x00client\x00j2", now, now + 10**9)
        ttls = sorted(int(server.cli("PTTL", k)) for k in server.cli("--scan", "--pattern", "enforcer:j:*").split())
        assert len(ttls) == 2 and 170_000 < ttls[0] <= 180_000 and ttls[1] <= 86_400_000
        assert "j1" not in server.cli("--scan", "--pattern", "enforcer:j:*")  # stored hashed
        assert await a.first_use("logout", "late", now, now - 5)  # already past: kept 1 ms
        await asyncio.sleep(0.01)
        assert await b.first_use("logout", "late", now, now + 5)
        server.pause(True)
        try:
            with pytest.raises(SessionStoreUnavailable):
                await a.first_use("logout", "iss\x00client\x00j3", now, now + 180)
        finally:
            server.pause(False)


@pytest.mark.parametrize(("selector", "ended"), [({"sid": "sid-1"}, {"a1"}), ({"sub": "alice"}, {"a1", "a2"})])
async def test_delete_matching_ends_exactly_the_named_sessions(
    server: RedisServer, selector: dict[str, str], ended: set[str]
) -> None:
    """Back-channel logout by sid ends that IdP session's sessions, by sub every session of the user, no others."""
    async with watched(server.config()) as store:
        handles = {
            "a1": await store.create(make_session()),
            "a2": await store.create(make_session(sid="sid-2")),
            "b": await store.create(make_session(sub="bob", sid="sid-3")),
        }
        assert await store.delete_matching(issuer=ISSUER, **selector) == len(ended)
        alive = {n for n, h in handles.items() if await store.get(h, "app", time.time()) is not None}
        assert alive == set(handles) - ended


async def test_back_channel_indexes_are_only_ever_extended(server: RedisServer) -> None:
    """A later session ending sooner does not shorten the user's and IdP session's indexes: a back-channel logout still finds the older one."""
    async with watched(server.config()) as store:
        long = await store.create(make_session())  # ends in 8 h
        await store.create(make_session(expires=time.time() + 60))
        indexes = server.cli("--scan", "--pattern", "enforcer:[ui]:*").split()
        assert len(indexes) == 2
        for index in indexes:
            assert int(server.cli("PTTL", index)) > 7 * 3600 * 1000, index
        await store.create(make_session(expires=time.time() + 9 * 3600))
        assert all(int(server.cli("PTTL", i)) > 8.5 * 3600 * 1000 for i in indexes)  # extended
        assert await store.delete_matching(issuer=ISSUER, sid="sid-1") == 3
        assert await store.get(long, "app", time.time()) is None


async def test_max_sessions_evicts_the_session_nearest_its_end(server: RedisServer) -> None:
    """Beyond max_sessions the session closest to its deadline goes, on every enforcer."""
    async with watched(server.config(), max_sessions=2) as store:
        old = await store.create(make_session(last_seen=time.time() - 1000))
        mid = await store.create(make_session())
        new = await store.create(make_session())
        assert await store.get(old, "app", time.time()) is None
        assert await store.get(mid, "app", time.time()) is not None
        assert await store.get(new, "app", time.time()) is not None
        assert await store.count() == 2


async def test_revocation_reaches_the_other_cache_within_the_bound(server: RedisServer) -> None:
    """A logout (pop) and a back-channel logout on one enforcer stop the other's cache hits well within 1 s."""
    async with watched(server.config()) as a, watched(server.config()) as b:
        delays = []
        for how in ("pop", "delete_matching"):
            handle = await a.create(make_session())
            assert await b.get(handle, "app", time.time()) is not None
            assert b.get_cached(handle, "app", time.time()) is not None  # served from b's cache
            if how == "pop":
                await a.pop(handle, "app", time.time())
            else:
                await a.delete_matching(issuer=ISSUER, sid="sid-1")
            delays.append(await until(lambda h=handle: b.get_cached(h, "app", time.time()) is None, 2.0))
            assert await b.get(handle, "app", time.time()) is None
        print(f"revocation delay (pub/sub) pop={delays[0] * 1000:.1f} ms, back-channel={delays[1] * 1000:.1f} ms")
        assert max(delays) < STALENESS


@pytest.mark.parametrize(("subscribed_to", "trusted"), [("the commands' node", True), ("another node", False)])
async def test_cache_is_trusted_only_when_the_subscription_is_on_the_commands_node(
    server: RedisServer, subscribed_to: str, trusted: bool
) -> None:
    """The watcher's subscription on another redis-server than its commands (as after a failover) never makes the cache fresh, and the problem says why; on the same node it does."""
    other = RedisServer()
    other.start()
    node = server if trusted else other
    store = RedisSessionStore(server.config(), idle_timeout=3600, subscriber=node.config().client())
    task = asyncio.create_task(store.watch())
    try:
        took = await until(store.fresh, STALENESS + 3 * PING_INTERVAL)
        print(f"subscribed to {subscribed_to}: fresh after {took * 1000:.0f} ms"
              if took <= STALENESS + 3 * PING_INTERVAL else f"subscribed to {subscribed_to}: never fresh")
        assert (took < STALENESS) is trusted
        if trusted:
            assert store.problem is None
        else:
            assert store.problem is not None and "did not come back through the subscription" in store.problem
            with pytest.raises(SessionStoreUnavailable):  # fails closed, at once
                await store.create(make_session())
    finally:
        await store.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        other.stop()
        shutil.rmtree(other.dir, ignore_errors=True)


async def test_heartbeats_go_to_each_enforcers_own_channel_and_others_are_ignored(server: RedisServer) -> None:
    """Each store publishes its heartbeats on its own channel only (the revocation channel carries none, so a fleet of N costs O(N) deliveries), and a heartbeat that does reach the revocation channel (another version) changes nothing: the cache and the epoch stay as they were."""
    async with watched(server.config()) as a, watched(server.config()) as b:
        handle = await a.create(make_session())
        assert await b.get(handle, "app", time.time()) is not None
        epoch, beats = b._epoch, b._beats
        seen: dict[bytes, list[bytes]] = {a._channel: [], a._hb_channel: []}
        client = server.config().client()
        pubsub = client.pubsub()
        await pubsub.subscribe(a._channel, a._hb_channel)
        try:
            await client.publish(a._channel, b"hb:0123456789abcdef:1")  # an old version's heartbeat
            deadline = time.monotonic() + 4 * PING_INTERVAL
            while time.monotonic() < deadline:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
                if message is not None:
                    seen[message["channel"]].append(message["data"])
        finally:
            await pubsub.aclose()
            await client.aclose()
        assert seen[a._channel] == [b"hb:0123456789abcdef:1"]  # none of a's (or b's) own heartbeats
        assert any(m.startswith(f"hb:{a.ident}:".encode()) for m in seen[a._hb_channel])
        assert b._beats > beats and b._epoch == epoch
        assert b.get_cached(handle, "app", time.time()) is not None


async def test_unresponsive_redis_fails_closed_and_recovers(server: RedisServer) -> None:
    """Redis frozen: an unknown session raises unavailable, a cached one is served at most `staleness` longer; thawed: all resume."""
    async with watched(server.config()) as store, watched(server.config()) as other:
        cached = await store.create(make_session())
        unknown = await other.create(make_session(sub="bob"))  # never in this store's cache
        server.pause(True)
        try:
            paused_at = time.monotonic()
            with pytest.raises(SessionStoreUnavailable) as info:
                await store.get(unknown, "app", time.time())
            assert info.value.reason is Reason.SESSION_STORE_UNAVAILABLE and info.value.status == 503
            await until(lambda: store.get_cached(cached, "app", time.time()) is None, 3.0)
            served_for = time.monotonic() - paused_at
            print(f"cached session served for {served_for * 1000:.0f} ms after Redis froze")
            assert served_for <= STALENESS + 0.1
            with pytest.raises(SessionStoreUnavailable):
                await store.get(cached, "app", time.time())
            with pytest.raises(SessionStoreUnavailable):
                await store.put_pending("s", "d", time.time(), max_pending=10)
            assert store.problem is not None
        finally:
            server.pause(False)
        recovered = await until(store.fresh, 5.0)
        assert recovered < 5.0 and store.problem is None
        assert await store.get(unknown, "app", time.time()) is not None
        assert await store.get(cached, "app", time.time()) is not None


async def test_restarted_redis_is_used_again_without_a_restart(server: RedisServer) -> None:
    """Redis killed: calls fail closed and the metric hook hears it; restarted (empty): new logins work again."""
    states: list[bool] = []
    async with watched(server.config(), on_state=states.append) as store:
        handle = await store.create(make_session())
        server.stop()
        assert await until(lambda: not store.fresh(), 2.0) <= STALENESS
        assert store.get_cached(handle, "app", time.time()) is None
        with pytest.raises(SessionStoreUnavailable):
            await store.create(make_session())
        server.start()
        assert await until(store.fresh, 5.0) < 5.0
        assert await store.get(handle, "app", time.time()) is None  # no persistence: gone, never trusted
        fresh = await store.create(make_session())
        assert await store.get(fresh, "app", time.time()) is not None
        assert states == [True, False, True]


async def test_tls_and_acl_user(tmp_path: Path) -> None:
    """rediss:// with the CA from enforcer's CertStore and the ACL user works; a wrong password or an untrusted CA does not."""
    srv = RedisServer(tls=CertStore(tmp_path / "state"))
    srv.start()
    try:
        async with watched(srv.config()) as store:
            assert store.fresh()
            handle = await store.create(make_session())
            assert await store.get(handle, "app", time.time()) is not None
            assert await store.check() == "ok"
        (tmp_path / "wrong").write_text("not-the-password\n")
        other_ca = CertStore(tmp_path / "other")
        (tmp_path / "other.pem").write_bytes(other_ca.ca_pem())
        for bad in ({"password_file": tmp_path / "wrong"}, {"ca_file": tmp_path / "other.pem"},
                    {"key_prefix": "other:"}):
            await _check_refused(srv.config(**bad))
    finally:
        srv.stop()
        shutil.rmtree(srv.dir, ignore_errors=True)


async def _check_refused(config: RedisConfig) -> str:
    """What ``check()`` of a store with ``config`` raised (it must raise SessionStoreUnavailable)."""
    store = RedisSessionStore(config, idle_timeout=3600)
    try:
        with pytest.raises(SessionStoreUnavailable) as exc:
            await store.check()
    finally:
        await store.close()
    return str(exc.value)


async def test_tls_refuses_a_certificate_for_another_name(tmp_path: Path) -> None:
    """rediss:// to a real TLS redis-server whose certificate (from the trusted CA) names another host fails the hostname check, by name and by IP."""
    srv = RedisServer(tls=CertStore(tmp_path / "state"), cert_names=("other.example",))
    srv.start()
    try:
        for url in (f"rediss://localhost:{srv.port}", f"rediss://127.0.0.1:{srv.port}"):
            why = await _check_refused(srv.config(url=url))
            assert re.search(r"(?i)hostname mismatch|doesn't match|not valid for", why), why
    finally:
        srv.stop()
        shutil.rmtree(srv.dir, ignore_errors=True)


@pytest.mark.parametrize(
    "config",
    [RedisConfig(url="rediss://localhost:6380"), RedisConfig(sentinels=(("127.0.0.1", 26379),), tls=True)],
)
async def test_tls_clients_ask_for_hostname_verification(config: RedisConfig) -> None:
    """The rediss:// and Sentinel TLS clients pass ssl_check_hostname=True and required certificates to redis-py themselves (its 5.x default is no hostname check)."""
    client = config.client()
    try:
        pools = [client.connection_pool]
        manager = getattr(client.connection_pool, "sentinel_manager", None)  # the Sentinels' own clients
        pools += [s.connection_pool for s in manager.sentinels] if manager is not None else []
        for pool in pools:
            assert pool.connection_kwargs["ssl_check_hostname"] is True
            assert pool.connection_kwargs["ssl_cert_reqs"] == "required"
    finally:
        await client.aclose()
        if manager is not None:
            await manager.aclose()


_FULL = "~enforcer:* &enforcer:* +@all -@dangerous"
_LACKING = {
    "nokeys": ("~other:* &enforcer:* +@all -@dangerous", "use keys enforcer:*", "~enforcer:*"),
    "nozset": (f"{_FULL} -zpopmin", "use keys enforcer:*", "+zpopmin"),
    "nomulti": (f"{_FULL} -multi", "use keys enforcer:*", "+multi"),
    "noscripting": (f"{_FULL} -@scripting", "load and run its Lua scripts", "+script|load"),
    "noevalsha": (f"{_FULL} -evalsha", "load and run its Lua scripts", "+evalsha"),
    "nochannels": ("~enforcer:* resetchannels +@all -@dangerous", "publish on channel enforcer:revoked",
                   "&enforcer:*"),
    "otherchannel": ("~enforcer:* &enforcer:other +@all -@dangerous", "publish on channel enforcer:revoked",
                     "&enforcer:*"),
    "nopublish": (f"{_FULL} -publish", "publish on channel enforcer:revoked", "+publish"),
    "nosubscribe": (f"{_FULL} -subscribe", "subscribe to channel enforcer:revoked", "+subscribe"),
    "nounsubscribe": (f"{_FULL} -unsubscribe", "subscribe to channel enforcer:revoked", "+unsubscribe"),
}


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    srv = RedisServer(acl_users={name: rules for name, (rules, _, _) in _LACKING.items()})
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(srv.dir, ignore_errors=True)


@pytest.mark.parametrize("user", sorted(_LACKING))
async def test_check_names_each_missing_acl_right(acl_server: RedisServer, user: str) -> None:
    """check() with a real ACL user lacking one right the daemon uses (keys, a data command, MULTI, scripting, EVALSHA, the revocation channel, PUBLISH, SUBSCRIBE, UNSUBSCRIBE) fails naming what it may not do and the ACL rule that grants it."""
    _, what, grant = _LACKING[user]
    why = await _check_refused(acl_server.config(username=user))
    assert f"the ACL user {user!r} may not {what}" in why
    assert f"grant it with {grant} " in why and "user " + user + " on >PASSWORD" in why
    assert acl_server.cli("--scan", "--pattern", "enforcer:probe*") == ""  # the probe keys are gone


async def test_doctor_names_the_missing_channel_right(acl_server: RedisServer, tmp_path: Path) -> None:
    """doctor with an ACL user without channels (Redis 7's resetchannels default) fails the session store line naming the channel and &enforcer:*, where before it said the user may read and write."""
    import io  # noqa: PLC0415

    from enforcer.cli import doctor  # noqa: PLC0415
    from enforcer.config.settings import Settings  # noqa: PLC0415

    r = {"url": f"unix://{acl_server.sock}", "username": "nochannels", "timeout": "200ms",
         "passwordFile": str(acl_server.password_file)}
    settings = Settings(path=tmp_path / "enforcer.yaml", model=DaemonModel.model_validate(
        {"definitions": [{"file": "/x"}], "sessions": {"store": "redis", "redis": r}}))
    report = doctor.Report(io.StringIO())
    await doctor._check_sessions(report, settings)
    assert report.failures == 1
    assert "may not publish on channel enforcer:revoked" in report.lines[0] and "&enforcer:*" in report.lines[0]


async def test_check_passes_with_the_documented_acl_line_and_changes_nothing(server: RedisServer) -> None:
    """check() as the README's ACL user passes, leaves no key behind and drops nothing from a running watcher's cache but the probe."""
    async with watched(server.config()) as store:
        handle = await store.create(make_session())
        before = sorted(server.cli("--scan", "--pattern", "enforcer:*").split())
        checker = RedisSessionStore(server.config(), idle_timeout=3600)
        try:
            assert await checker.check() == "ok"
        finally:
            await checker.close()
        assert sorted(server.cli("--scan", "--pattern", "enforcer:*").split()) == before
        await asyncio.sleep(0.05)  # the probe's revocation message has arrived
        assert store.get_cached(handle, "app", time.time()) is not None


# ------------------------------------------------------------------ config and daemon


def test_settings_need_a_redis_section_and_build_the_store(server: RedisServer) -> None:
    """store: redis without redis: is refused; with it the daemon builds a RedisSessionStore from the settings."""
    with pytest.raises(ValueError, match="redis"):
        DaemonModel.model_validate({"definitions": [{"file": "/x"}], "sessions": {"store": "redis"}})
    with pytest.raises(ValueError, match="exactly one"):
        DaemonModel.model_validate({"definitions": [{"file": "/x"}], "sessions": {
            "store": "redis", "redis": {"url": "redis://h", "sentinels": ["h:26379"]}}})
    model = DaemonModel.model_validate({"definitions": [{"file": "/x"}], "sessions": {"store": "redis", "redis": {
        "url": f"unix://{server.sock}", "username": "enforcer", "passwordFile": str(server.password_file),
        "keyPrefix": "fleet1:", "db": 2, "timeout": "300ms", "staleness": "1s"}}})
    store = stores.session_store(model, shared=False)
    assert isinstance(store, RedisSessionStore)
    assert store.config.key_prefix == "fleet1:" and store.config.db == 2 and store.config.timeout == 0.3
    sentinel = stores.redis_config(DaemonModel.model_validate({"definitions": [{"file": "/x"}], "sessions": {
        "store": "redis", "redis": {"sentinels": ["10.0.0.1:26379", "[::1]:26380"], "sentinelMaster": "m"}}})
        .sessions.redis)  # type: ignore[arg-type]
    assert sentinel.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    asyncio.run(store.close())


# ------------------------------------------------------------------ two Gates, one Redis


class FleetRig(GateRig):
    """A GateRig whose gate uses a Redis store (and pending logins in Redis)."""

    def __init__(self, store: RedisSessionStore, provider: Any = None) -> None:
        super().__init__(provider)
        self.gate.store = store
        self.gate.shared_logins = login.SharedTransactionStore(store, ttl=600)
        self.redis = store


def _session_cookie(answer: Answer) -> str:
    [value] = [c.split(";", 1)[0] for c in answer.set_cookies() if c.startswith("__Host-enforcer-")
               and "enforcertx" not in c]
    return value


async def _sign_in(start: FleetRig, finish: FleetRig) -> str:
    """Log in starting at one enforcer, the IdP sending the browser back to the other: the session cookie."""
    started = await start.begin()
    finish.provider.nonces["the-code"] = started.nonce
    answer = await finish.callback(started)
    assert answer.status == 302, answer.flow.reason
    return _session_cookie(answer)


def _logout_token(**claims: Any) -> str:
    body = {"iss": ISSUER, "aud": CLIENT_ID, "iat": int(NOW), "exp": int(NOW) + 120, "jti": "j1",
            "events": {"http://schemas.openid.net/event/backchannel-logout": {}}, **claims}
    return sign(body, header={"typ": "logout+jwt"})


class _Body:
    """The request body stream Gate reads (``content.read``)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, n: int = -1) -> bytes:
        out, self.data = self.data[:n], self.data[n:]
        return out


async def _backchannel(rig: FleetRig, token: str) -> Answer:
    from aiohttp.test_utils import make_mocked_request  # noqa: PLC0415
    body = urllib.parse.urlencode({"logout_token": token}).encode()
    request = make_mocked_request("POST", "/oauth2/logout/backchannel", headers={
        "Host": "app.example.com", "Content-Type": "application/x-www-form-urlencoded",
        "Content-Length": str(len(body))}, payload=_Body(body))
    response = await rig.gate.handle(request)
    return Answer(response, rig.flowlog.records[-1])


@pytest.mark.parametrize("how", ["logout", "backchannel"])
async def test_logout_on_one_gate_is_refused_on_the_other_within_a_second(server: RedisServer, how: str) -> None:
    """Signed in through A (callback on B); served by both; logout (or back-channel logout) on A: B refuses within 1 s."""
    async with watched(server.config()) as ra, watched(server.config()) as rb:
        a, b = FleetRig(ra), FleetRig(rb)
        b.provider = a.provider
        b.gate.runtime.providers["app"] = a.provider
        cookie = await _sign_in(a, b)
        for rig in (a, b):
            answer = await rig.request("GET", "/private", {"Cookie": cookie, "Accept": "text/html"})
            assert answer.status == 200, answer.flow.reason
        assert rb.get_cached(cookie.split("=", 1)[1], "app", b.now) is not None  # B answers from its cache
        if how == "logout":
            answer = await a.request("POST", "/oauth2/logout", {"Cookie": cookie, "Origin": "https://app.example.com"})
            assert answer.flow.reason == Reason.LOGOUT
        else:
            answer = await _backchannel(a, _logout_token(sid="idp-session"))
            assert answer.status == 200, answer.flow.reason
        t0 = time.monotonic()
        handle = cookie.split("=", 1)[1]
        await until(lambda: rb.get_cached(handle, "app", b.now) is None, 2.0)
        refused = await b.request("GET", "/private", {"Cookie": cookie, "Accept": "text/html"})
        delay = time.monotonic() - t0
        print(f"{how} on A refused on B after {delay * 1000:.1f} ms")
        assert refused.status == 302 and refused.flow.reason != Reason.SESSION_STORE_UNAVAILABLE
        assert delay < 1.0
        assert len(b.upstream.targets) == 1  # only the request before the logout reached the app


async def test_replayed_logout_token_on_another_gate_ends_nothing(server: RedisServer) -> None:
    """A logout token used on A, replayed on B after the user signed in again: 200 no-store, backchannel_replayed, the new session lives."""
    async with watched(server.config()) as ra, watched(server.config()) as rb:
        a, b = FleetRig(ra), FleetRig(rb)
        b.provider = a.provider
        b.gate.runtime.providers["app"] = a.provider
        token = _logout_token(sub="alice")
        await _sign_in(a, b)
        first = await _backchannel(a, token)
        assert first.status == 200 and first.flow.reason == Reason.BACKCHANNEL_LOGOUT
        cookie = await _sign_in(b, a)
        replay = await _backchannel(b, token)
        assert replay.status == 200 and replay.flow.reason == Reason.BACKCHANNEL_REPLAYED
        assert replay.response.headers["Cache-Control"] == "no-store"
        served = await b.request("GET", "/private", {"Cookie": cookie, "Accept": "text/html"})
        assert served.status == 200, served.flow.reason
        other = await _backchannel(b, _logout_token(sub="alice", jti="j2"))  # a new token still acts
        assert other.flow.reason == Reason.BACKCHANNEL_LOGOUT
        gone = await b.request("GET", "/private", {"Cookie": cookie, "Accept": "text/html"})
        assert gone.status == 302


class _DeleteFailsOnce:
    """The real store, whose first ``delete_matching`` fails as if Redis went away mid-request."""

    def __init__(self, store: RedisSessionStore) -> None:
        self._store = store
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def delete_matching(self, **match: Any) -> int:
        if not self.failed:
            self.failed = True
            raise SessionStoreUnavailable("delete_matching: ConnectionError: gone (test)")
        ended: int = await self._store.delete_matching(**match)
        return ended


async def test_a_backchannel_logout_that_fails_midway_stays_usable_for_the_retry(server: RedisServer) -> None:
    """Redis failing between the replay check and the deletion: a 503, the session still alive, and the IdP's retry of the same token ends it (the jti is marked only once its sessions ended); a third delivery is a replay."""
    async with watched(server.config()) as ra, watched(server.config()) as rb:
        a, b = FleetRig(ra), FleetRig(rb)
        b.provider = a.provider
        b.gate.runtime.providers["app"] = a.provider
        cookie = await _sign_in(a, b)
        handle = cookie.split("=", 1)[1]
        a.gate.store = _DeleteFailsOnce(ra)  # type: ignore[assignment]
        token = _logout_token(sub="alice")
        first = await _backchannel(a, token)
        assert first.status == 503 and first.flow.reason == Reason.SESSION_STORE_UNAVAILABLE
        assert (await b.request("GET", "/private", {"Cookie": cookie, "Accept": "text/html"})).status == 200
        retry = await _backchannel(a, token)
        assert retry.status == 200 and retry.flow.reason == Reason.BACKCHANNEL_LOGOUT
        await until(lambda: rb.get_cached(handle, "app", b.now) is None, 2.0)
        assert (await b.request("GET", "/private", {"Cookie": cookie, "Accept": "text/html"})).status == 302
        again = await _backchannel(a, token)
        assert again.status == 200 and again.flow.reason == Reason.BACKCHANNEL_REPLAYED


async def test_backchannel_logout_fails_when_redis_cannot_check_the_jti(server: RedisServer) -> None:
    """Redis down: a valid logout token gets a 503 session_store_unavailable, never an unchecked logout."""
    async with watched(server.config()) as store:
        rig = FleetRig(store)
        server.stop()
        answer = await _backchannel(rig, _logout_token(sub="alice"))
        assert answer.status == 503 and answer.flow.reason == Reason.SESSION_STORE_UNAVAILABLE


async def test_gate_with_redis_down_never_forwards_an_unknown_session(server: RedisServer) -> None:
    """Redis down: a new login gets the 503 page, an unknown session is refused with 503; none reaches the app."""
    async with watched(server.config()) as store, watched(server.config()) as other:
        rig = FleetRig(store)
        unknown = await other.create(make_session(expires=NOW + 3600, created=NOW, last_seen=NOW))
        server.stop()
        await until(lambda: not store.fresh(), 2.0)
        new = await rig.request("GET", "/private", {"Accept": "text/html"})
        assert new.status == 503 and new.flow.reason == Reason.SESSION_STORE_UNAVAILABLE
        assert b"Sign-in unavailable" in new.response.body  # type: ignore[attr-defined]
        stale = await rig.request("GET", "/private", {"Cookie": f"__Host-enforcer-app={unknown}"})
        assert stale.status == 503 and stale.flow.reason == Reason.SESSION_STORE_UNAVAILABLE
        assert rig.upstream.targets == []
        server.start()
        await until(store.fresh, 5.0)
        again = await rig.request("GET", "/private", {"Accept": "text/html"})
        assert again.status == 302



def _persist(server: RedisServer) -> None:
    """Restart ``server`` with an RDB snapshot at SIGTERM, so a stop and start keeps its sessions."""
    server.stop()
    conf = server.dir / "redis.conf"
    conf.write_text(conf.read_text().replace('save ""', "save 3600 1"))
    server.start()


def _outage(server: RedisServer, how: str) -> None:
    """Freeze Redis (SIGSTOP: connections hang) or stop it (SIGTERM: it snapshots and exits)."""
    if how == "sigstop":
        server.pause(True)
        return
    assert server.proc is not None
    server.proc.terminate()
    server.proc.wait()
    server.proc = None


def _recover(server: RedisServer, how: str) -> None:
    if how == "sigstop":
        server.pause(False)
    else:
        server.start()


async def test_logout_owed_while_redis_is_frozen_is_refused_here_and_sent_before_up(server: RedisServer) -> None:
    """pop with Redis frozen raises LogoutOwed; this store refuses the session even after Redis is back, and its watcher deletes it before reporting up."""
    states: list[tuple[bool, str]] = []
    store = RedisSessionStore(server.config(), idle_timeout=3600,
                              on_state=lambda up: states.append((up, server.cli("DBSIZE"))))
    try:
        async with watched(server.config()) as other:
            handle = await other.create(make_session())
            kept = await other.create(make_session(sub="bob", sid="sid-2"))
            assert await store.get(handle, "app", time.time()) is not None
            server.pause(True)
            try:
                with pytest.raises(LogoutOwed) as info:
                    await store.pop(handle, "app", time.time())
                assert info.value.reason is Reason.SESSION_STORE_UNAVAILABLE
                assert await store.get(handle, "app", time.time()) is None  # at once, without Redis
                with pytest.raises(LogoutOwed):  # a second logout is owed at once (no Redis wait)
                    async with asyncio.timeout(0.05):
                        await store.pop(handle, "app", time.time())
            finally:
                server.pause(False)
            # Redis is back, the delete not sent yet (no watcher): still refused here, alive in Redis
            assert await until(other.fresh, 5.0) < 5.0
            assert await other.get(handle, "app", time.time()) is not None
            assert await store.get(handle, "app", time.time()) is None
            task = asyncio.create_task(store.watch())
            try:
                assert await until(lambda: store.problem is None, 5.0) < 5.0
                await until(lambda: other.get_cached(handle, "app", time.time()) is None, 2.0)
                assert await other.get(handle, "app", time.time()) is None
                assert await store.get(handle, "app", time.time()) is None
                assert await store.get(kept, "app", time.time()) is not None
            finally:
                await store.close()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        await store.close()
    # reported up only after the delete: Redis then held `kept` and its two indexes (u:, i:) and `all`
    assert states and states[-1][0] is True and states[-1][1] == server.cli("DBSIZE")


@pytest.mark.parametrize("outage", ["sigstop", "sigterm"])
async def test_logout_while_redis_is_down_clears_the_cookie_and_is_replayed(server: RedisServer, outage: str) -> None:
    """Logout on A with Redis frozen or stopped: the cookie is cleared, A refuses the session at once, and B refuses it once Redis is back (A's owed delete) while another session survives."""
    if outage == "sigterm":
        _persist(server)
    async with watched(server.config()) as ra, watched(server.config()) as rb:
        a, b = FleetRig(ra), FleetRig(rb)
        b.provider = a.provider
        b.gate.runtime.providers["app"] = a.provider
        cookie = await _sign_in(a, b)
        control = await _sign_in(b, a)
        for rig in (a, b):
            for c in (cookie, control):
                answer = await rig.request("GET", "/private", {"Cookie": c, "Accept": "text/html"})
                assert answer.status == 200, answer.flow.reason
        handle = cookie.split("=", 1)[1]
        _outage(server, outage)
        try:
            out = await a.request("POST", "/oauth2/logout", {"Cookie": cookie, "Origin": "https://app.example.com"})
            assert out.status == 200
            assert (out.flow.decision, out.flow.reason) == (Outcome.LOGOUT, Reason.SESSION_STORE_UNAVAILABLE)
            assert out.cookie("__Host-enforcer-app") == "" and any("Max-Age=0" in c for c in out.set_cookies())
            assert b"reaches every server as soon as it is back" in out.response.body  # type: ignore[attr-defined]
            assert await ra.get(handle, "app", a.now) is None  # refused here at once
            again = await a.request("GET", "/private", {"Cookie": cookie, "Accept": "text/html"})
            assert again.status != 200 and len(a.upstream.targets) == 2
            assert await until(lambda: not ra.fresh() and not rb.fresh(), 3.0) < 3.0  # both saw the outage
        finally:
            _recover(server, outage)
        assert await until(lambda: ra.fresh() and rb.fresh(), 5.0) < 5.0
        await until(lambda: rb.get_cached(handle, "app", b.now) is None, 2.0)
        refused = await b.request("GET", "/private", {"Cookie": cookie, "Accept": "text/html"})
        assert refused.status == 302 and refused.flow.reason != Reason.SESSION_STORE_UNAVAILABLE
        for rig in (a, b):  # the session not logged out survived the outage (so the delete was replayed)
            answer = await rig.request("GET", "/private", {"Cookie": control, "Accept": "text/html"})
            assert answer.status == 200, answer.flow.reason
        assert len(b.upstream.targets) == 3


async def test_check_and_doctor_test_the_connection(server: RedisServer, tmp_path: Path) -> None:
    """check/doctor: "ok" with a reachable Redis and the ACL user, the reason when not, nothing for SQLite."""
    import io  # noqa: PLC0415

    from enforcer.cli import doctor  # noqa: PLC0415
    from enforcer.config.settings import Settings  # noqa: PLC0415

    def settings(**redis: Any) -> Settings:
        r = {"url": f"unix://{server.sock}", "username": "enforcer", "passwordFile": str(server.password_file),
             "timeout": "200ms", **redis}
        return Settings(path=tmp_path / "enforcer.yaml", model=DaemonModel.model_validate(
            {"definitions": [{"file": "/x"}], "sessions": {"store": "redis", "redis": r}}))

    assert await stores.check_session_store(DaemonModel.model_validate({"definitions": [{"file": "/x"}]})) is None
    assert await stores.check_session_store(settings().model) == "ok"
    (tmp_path / "bad").write_text("wrong\n")
    denied = await stores.check_session_store(settings(passwordFile=str(tmp_path / "bad")).model)
    assert denied is not None and denied != "ok"
    missing = await stores.check_session_store(settings(passwordFile=str(tmp_path / "none")).model)
    assert missing is not None and "passwordFile" in missing
    report = doctor.Report(io.StringIO())
    await doctor._check_sessions(report, settings())
    assert report.failures == 0 and "reachable" in report.lines[0]
    server.stop()
    report = doctor.Report(io.StringIO())
    await doctor._check_sessions(report, settings())
    assert report.failures == 1 and "FAIL" in report.lines[0]
