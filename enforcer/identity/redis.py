"""The fleet session store: sessions, pending logins and revocations in Redis, shared by many enforcers.

The only module that imports ``redis`` (import-linter checks it). Each enforcer keeps its own
in-process cache in front of Redis (the SQLite store's :class:`_SessionCache`), trusted only
while it is *fresh*: see :class:`RedisSessionStore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoPermissionError, ReadOnlyError, RedisError, ResponseError

from enforcer.errors import EnforcerError, Reason
from enforcer.identity.cache import _SessionCache
from enforcer.identity.cookies import new_handle
from enforcer.identity.sessions import (
    USED_KEEP_MAX,
    LogoutOwed,
    Session,
    _check_max_sessions,
    _check_selector,
    _handle_key,
    _Lifetime,
    _matches,
    _used_key,
    _Verdict,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")

PENDING_KEEP: Final = 3600
"""Seconds a pending login is kept in Redis when the caller names no ``ttl`` (``loginTimeout``)."""

_PUT_PENDING: Final = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5])
if excess > 0 then
  local old = redis.call('ZPOPMIN', KEYS[2], excess)
  for i = 1, #old, 2 do redis.call('DEL', old[i]) end
end
return 1
"""
"""Store a pending login (``KEYS[1]``, TTL ``ARGV[2]`` ms) and index it in ``KEYS[2]`` (a sorted
set of pending keys by creation, ``ARGV[3]``): entries older than ``ARGV[4]`` (ended) leave the
index; beyond ``ARGV[5]`` (``max_pending``, fleet-wide) the oldest pending logins are deleted.
One script: atomic. (The deleted keys are all under the prefix: no Redis Cluster here.)"""

PING_INTERVAL: Final = 0.25
"""How often the watcher sends a heartbeat (a write echoed through its subscription)."""

_HEARTBEAT: Final = b"hb:"
"""The start of a heartbeat message (``hb:<enforcer id>:<seq>``), published on the enforcer's
own heartbeat channel (``<prefix>hb:<enforcer id>``), never on the revocation channel: each
heartbeat reaches one subscriber, so a fleet of N costs Redis O(N) deliveries, not O(N^2). Never
a revocation either (those are hex session keys, ``,`` and ``*``): a heartbeat that reaches the
revocation channel anyway (another version) is told apart by its first bytes and ignored."""

_RECONNECT_MAX: Final = 1.0
"""Longest wait between two attempts to reach Redis again."""

_REPLAY_BATCH: Final = 1000
"""Owed logouts sent to Redis in one ``MULTI`` when it answers again."""

_FLUSH: Final = b"*"
"""A revocation message meaning "forget every cached session" (none sent today; accepted)."""

_TOUCH: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local last = tonumber(redis.call('HGET', KEYS[1], 'l'))
if last ~= nil and last >= tonumber(ARGV[1]) then return 1 end
redis.call('HSET', KEYS[1], 'l', ARGV[1])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', ARGV[3], ARGV[4])
return 1
"""
"""Slide ``last_seen`` (only forward) and the key's TTL; never re-creates a deleted session."""


_INDEX: Final = """
redis.call('SADD', KEYS[1], ARGV[1])
local at = tonumber(ARGV[2])
local pttl = redis.call('PTTL', KEYS[1])
if pttl >= 0 then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + pttl >= at then return 0 end
end
redis.call('PEXPIREAT', KEYS[1], at)
return 1
"""
"""Add a session key to a back-channel index (``u:``/``i:``) and extend the index's TTL to
``ARGV[2]`` (unix ms) -- never shorten it: the index must outlive every session it names.
(Compares ``PTTL`` with Redis' own clock: ``PEXPIREAT ... GT`` needs Redis 7.)"""

_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
"""Release a refresh lease only if this holder still owns it (``ARGV[1]``, its random value):
a holder whose lease expired must not release the next holder's."""

_RENEW: Final = """
local d = redis.call('HGET', KEYS[1], 'd')
if redis.call('GET', KEYS[2]) == ARGV[5] then redis.call('DEL', KEYS[2]) end
if not d then return 0 end
local data = cjson.decode(d)
if data['refresh_token'] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'd', ARGV[2], 't', ARGV[3])
redis.call('PUBLISH', KEYS[3], ARGV[4])
return 1
"""
"""A refresh's write: if the stored refresh token is still the one the refresh used, replace
``d`` (the renewed session, built from the one the lease returned), store the new ID token,
publish the key (every enforcer drops its cached copy) -- and release the lease (``r:<key>``)
in any case if it still holds this holder's value (``ARGV[5]``). One script: atomic."""

_LEASES_MAX: Final = 10_000
"""Most leases one store remembers holding; beyond, those past their end are forgotten."""


class SessionStoreUnavailable(EnforcerError):
    """Redis cannot be reached (or answered too slowly): fail closed with a 503."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.SESSION_STORE_UNAVAILABLE, 503, message)


@dataclasses.dataclass(frozen=True, slots=True)
class RedisConfig:
    """Where Redis is and how to talk to it (``sessions.redis`` of the daemon config)."""

    url: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_master: str = "mymaster"
    tls: bool = False
    ca_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    db: int = 0
    key_prefix: str = "enforcer:"
    timeout: float = 0.5
    staleness: float = 1.0
    sentinel_auth: str = "same"
    """What the Sentinels are sent: ``same`` (``username``/``password_file``), ``none``, or
    ``own`` (``sentinel_username``/``sentinel_password_file``)."""
    sentinel_username: str | None = None
    sentinel_password_file: Path | None = None

    def password(self) -> str | None:
        """The password from ``password_file`` (first line), or None."""
        return _first_line(self.password_file)

    def sentinel_credentials(self) -> dict[str, Any]:
        """The ``username``/``password`` the Sentinels are sent (none for ``sentinel_auth: none``)."""
        if self.sentinel_auth == "none":
            return {}
        if self.sentinel_auth == "own":
            return {"username": self.sentinel_username, "password": _first_line(self.sentinel_password_file)}
        return {"username": self.username, "password": self.password()}

    def client(self) -> aioredis.Redis:
        """A client with bounded timeouts and no retries: a slow Redis is an unavailable one."""
        common: dict[str, Any] = {
            "db": self.db,
            "username": self.username,
            "password": self.password(),
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "retry": Retry(NoBackoff(), 0),
            "decode_responses": False,
        }
        # the certificate must name the host connected to: redis-py 5.x does not check it unless told
        ssl_opts: dict[str, Any] = {"ssl_check_hostname": True, "ssl_cert_reqs": "required"}
        if self.ca_file is not None:
            ssl_opts["ssl_ca_certs"] = str(self.ca_file)
        if self.url is not None:
            if self.url.startswith("rediss://"):
                common.update(ssl_opts)
            return aioredis.Redis.from_url(self.url, **common)
        if self.tls:
            common.update(ssl=True, **ssl_opts)
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            **self.sentinel_credentials(),
        }
        if self.tls:
            sentinel_kwargs.update(ssl=True, **ssl_opts)
        sentinel = Sentinel(list(self.sentinels), sentinel_kwargs=sentinel_kwargs, **common)
        master: aioredis.Redis = sentinel.master_for(self.sentinel_master)
        return master


def _first_line(path: Path | None) -> str | None:
    """The first line of a secret file, or None without one."""
    if path is None:
        return None
    text = path.read_text(encoding="utf-8")
    return text.splitlines()[0] if text else ""


def _refused_write(exc: BaseException) -> str | None:
    """What a write's refusal means, for the problem ``/readyz`` shows; None if ``exc`` is not one."""
    text = str(exc)
    if "NOREPLICAS" in text:
        return ("the master refused the write: fewer good replicas than its min-replicas-to-write, so it may be "
                "cut off from them by a partition and no longer the master the fleet writes to")
    if isinstance(exc, ReadOnlyError) or "READONLY" in text or "previous master is now a" in text:
        return ("READONLY: the node reached is a replica, not the master: a failover in progress, or a "
                "stale master address")
    return None


def _hex(key: bytes) -> str:
    return key.hex()


def _index_id(issuer: str, value: str) -> str:
    return hashlib.sha256(f"{issuer}\x00{value}".encode("utf-8", "surrogatepass")).hexdigest()


def _encode(s: Session) -> dict[str, bytes]:
    """The fields of a session's hash: ``d`` (everything but the two below, JSON), ``t`` (the
    raw ID token: read only by :meth:`RedisSessionStore.pop`), ``l`` (last_seen: touched)."""
    data = {
        "service": s.service, "issuer": s.issuer, "sub": s.sub, "email": s.email, "username": s.username,
        "tags": sorted(s.tags), "sid": s.sid, "created": s.created, "expires": s.expires,
        "refresh_token": s.refresh_token, "claims_expire": s.claims_expire,
    }
    return {
        "d": json.dumps(data, separators=(",", ":")).encode(),
        "t": s.id_token.encode(),
        "l": repr(float(s.last_seen)).encode(),
    }


def _opt_str(v: object) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise TypeError("expected text or null")


def _num(v: object) -> float:
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    raise TypeError("expected a number")


def _decode(d: bytes | None, last_seen: bytes | None, id_token: bytes | None = None) -> Session | None:
    """A Session from the hash fields; None when absent. Raises ValueError/TypeError on junk."""
    if d is None or last_seen is None:
        return None
    data = json.loads(d)
    if not isinstance(data, dict):
        raise TypeError("not an object")
    tags = data["tags"]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise TypeError("tags must be a list of strings")
    service, issuer, sub = data["service"], data["issuer"], data["sub"]
    if not (isinstance(service, str) and isinstance(issuer, str) and isinstance(sub, str)):
        raise TypeError("service, issuer and sub must be text")
    ce = data.get("claims_expire")
    return Session(
        service=service, issuer=issuer, sub=sub, email=_opt_str(data.get("email")),
        username=_opt_str(data.get("username")), tags=frozenset(tags), sid=_opt_str(data.get("sid")),
        id_token=id_token.decode() if id_token is not None else "",
        created=_num(data["created"]), last_seen=float(last_seen), expires=_num(data["expires"]),
        refresh_token=_opt_str(data.get("refresh_token")), claims_expire=None if ce is None else _num(ce),
    )


class RedisSessionStore:
    """Sessions in Redis, so every enforcer of a fleet sees every login and every logout.

    * Keys (all under ``key_prefix``): ``s:<hex SHA-256(handle)>`` a hash per session (``d``
      the session as JSON, ``t`` the raw ID token, ``l`` last_seen) that Redis expires by
      itself at ``min(expires, last_seen + idle_timeout)``; ``u:<id>`` / ``i:<id>`` the keys of
      one user's / one IdP session's sessions (back-channel logout), expiring with the one
      that ends last (a TTL only ever extended);
      ``all`` a sorted set key -> deadline (count, ``max_sessions``); ``p:<hash of state>``
      a pending login, taken once with ``GETDEL``, expiring after the login timeout, and
      ``pending`` a sorted set of them by creation (``max_pending``, fleet-wide); ``j:<hash>``
      a used logout token's mark (:meth:`first_use`), expiring when the token would be
      refused anyway.
    * Revocation: a deletion (logout, back-channel logout, eviction) deletes the key and, in
      the same ``MULTI``, publishes the key on the ``revoked`` channel; every enforcer's
      :meth:`watch` drops its cached copy when the message arrives (a few ms).
    * Staleness bound: the cache answers only while it is *fresh*. Every
      :data:`PING_INTERVAL` :meth:`watch` sends a *heartbeat* on the command connection, one
      ``MULTI``: ``SET hb:<enforcer id> <seq> PX <2 x staleness>`` and ``PUBLISH`` of
      ``hb:<enforcer id>:<seq>`` on its own channel ``hb:<enforcer id>``, which its
      subscription listens to beside the revocation channel. When the subscription receives
      that message, the cache has applied every revocation made before the heartbeat was sent,
      on the node that took the heartbeat's write, and it is trusted until ``staleness`` after
      the send. So freshness proves three things: the node the commands reach accepted a write
      (a replica refuses it: ``READONLY``; a master cut off from its replicas too, with
      ``min-replicas-to-write``: ``NOREPLICAS``), the subscription listens to that same node
      (or to a replica of it, which receives its publications in order), and every revocation
      published there before the send was delivered. A heartbeat refused or not back within
      ``staleness`` ends freshness at once (refused) or at ``staleness`` (lost), and the store
      reports the problem. So a revocation written to the master the fleet writes to is
      enforced everywhere within ``staleness`` (default 1 s), whatever happens to the
      connections or to which node they reach.
    * Fail closed: a Redis call that fails or exceeds ``timeout`` raises
      :class:`SessionStoreUnavailable` (503, ``session_store_unavailable``), and until the
      watcher hears from Redis again calls fail at once; a session not in a fresh cache is
      never served. Once the watcher subscribes again the whole cache is dropped (revocations
      may have been missed), and service resumes by itself.
    * A logout while Redis is away is not lost: :meth:`pop` keeps the key in a local tombstone
      (``_owed``: this enforcer refuses the session at once, even once Redis is back) and
      raises :class:`~enforcer.identity.sessions.LogoutOwed` (the gate clears the cookie); the
      watcher sends the owed delete+publish as soon as a heartbeat comes back, before it reports
      the store up again. At most ``max_sessions`` are owed (beyond: the plain 503); they live
      in this process only (a restart before Redis returns loses them: the cookie is cleared).
    * Per request: a fresh cache hit is a ``time.monotonic()`` comparison plus the SQLite
      store's cache lookup; a miss is one ``HMGET``; a due touch one script call.
    """

    def __init__(
        self,
        config: RedisConfig,
        *,
        idle_timeout: float,
        touch_interval: float = 60.0,
        max_sessions: int = 100_000,
        cache_size: int = 10_000,
        client: aioredis.Redis | None = None,
        subscriber: aioredis.Redis | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        """``client``: the commands' client (default: from ``config``); ``subscriber``: the
        client whose connection the watcher subscribes on (default: ``client``; another one
        only to test that a subscription on another node is never trusted)."""
        _check_max_sessions(max_sessions)
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.config = config
        self._life = _Lifetime.make(idle_timeout, touch_interval)
        self._max = max_sessions
        self._cache = _SessionCache(cache_size)
        # Any: redis-py types pipeline commands as awaitables and replies as unions of
        # everything; replies are checked where they are used.
        self._redis: Any = client if client is not None else config.client()
        self._subscriber: Any = subscriber if subscriber is not None else self._redis
        self.ident = secrets.token_hex(8)
        """This store's id in its heartbeats (random: one per process and store)."""
        p = config.key_prefix
        self._prefix = p
        self._all = f"{p}all"
        self._channel = f"{p}revoked".encode()
        self._hb_key = f"{p}hb:{self.ident}"
        self._hb_channel = self._hb_key.encode()
        """This store's heartbeat channel, to which only its own subscription listens."""
        self._hb_message = _HEARTBEAT + f"{self.ident}:".encode()
        self._beats = 0
        """Heartbeats of this store heard back through its subscription (the watcher's backoff)."""
        self._touch = self._redis.register_script(_TOUCH)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self._index = self._redis.register_script(_INDEX)
        self._put_pending = self._redis.register_script(_PUT_PENDING)
        self._pending = f"{p}pending"
        self._leases: dict[bytes, tuple[bytes, float]] = {}
        """The refresh leases this store holds: key -> (its random value in ``r:<key>``, when
        it ends by the ``clock``). The gate refreshes one session at a time per process."""
        self._clock = clock
        self._on_state = on_state
        self._fresh_until = -1.0
        """Monotonic time until which the cache may answer (see the class docstring)."""
        self._epoch = 0
        """Bumped when cached sessions are dropped: a read that overlapped one is not cached."""
        self.problem: str | None = "not connected to Redis yet"
        """Why Redis is unavailable now, or None (``/readyz``, the metric)."""
        self._down = False
        """A call failed and the watcher has not heard from Redis since: calls fail at once."""
        self._owed: dict[bytes, None] = {}
        """Keys of sessions logged out while Redis was away (oldest first): refused here, and
        deleted in Redis by the watcher before it reports the store up (see the class docstring)."""
        self._closed = False

    # -- state ---------------------------------------------------------------------------------

    def _set_problem(self, problem: str | None) -> None:
        if self._closed:
            return
        was_up = self.problem is None
        self.problem = problem
        self._down = problem is not None
        # (freshness is the watcher's alone: a failed call does not mean a revocation was missed)
        if problem is not None:
            if was_up:
                log.warning("session store (Redis) unavailable: %s; failing closed", problem)
        elif not was_up:
            log.info("session store (Redis) reachable again")
        if self._on_state is not None and was_up != (problem is None):
            self._on_state(problem is None)

    def closed(self) -> bool:
        return self._closed

    def fresh(self) -> bool:
        """Whether the cache may answer now (the watcher heard from Redis recently enough)."""
        return self._clock() < self._fresh_until

    def _forget_all(self) -> None:
        self._epoch += 1
        self._cache.clear()

    def _forget(self, keys: Iterable[bytes]) -> None:
        self._epoch += 1
        for key in keys:
            self._cache.pop(key)

    async def _call(self, what: str, aw: Awaitable[_T], limit: float | None = None) -> _T:
        """Await one Redis call within the timeout (or ``limit``); any failure is
        :class:`SessionStoreUnavailable`."""
        try:
            async with asyncio.timeout(self.config.timeout if limit is None else limit):
                return await aw
        except (RedisError, OSError, TimeoutError) as exc:
            problem = f"{what}: {type(exc).__name__}: {exc}".rstrip(": ")
            if (why := _refused_write(exc)) is not None:
                problem = f"{problem} ({why})"
            if isinstance(exc, MasterNotFoundError):  # (its text holds each Sentinel client's repr)
                problem = (f"{what}: no usable master {self.config.sentinel_master!r} from the Sentinels "
                           "(sessions.redis.sentinelMaster; the master may be down, or the Sentinels "
                           "unreachable: see enforcer doctor)")
            self._set_problem(problem)
            raise SessionStoreUnavailable(problem) from exc

    def _check_up(self) -> None:
        if self._down:
            raise SessionStoreUnavailable(self.problem or "Redis unavailable")

    def _skey(self, key: bytes) -> str:
        return f"{self._prefix}s:{_hex(key)}"

    # -- the watcher ---------------------------------------------------------------------------

    async def watch(self) -> None:
        """Run until :meth:`close`: subscribe to revocations, apply them, keep the cache fresh
        with heartbeats; reconnect (with a short backoff) whenever Redis goes away or a
        heartbeat fails. Never raises."""
        delay = 0.05
        while not self._closed:
            pubsub = self._subscriber.pubsub()
            beats = self._beats
            try:
                await self._call("subscribe", pubsub.subscribe(self._channel, self._hb_channel))
                # revocations may have been missed while we were not subscribed
                self._forget_all()
                await self._listen(pubsub)
            except SessionStoreUnavailable:
                pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug or an odd reply: fail closed, try again
                log.exception("session store watcher failed")
                self._set_problem(f"watcher: {exc}")
            finally:
                self._fresh_until = -1.0
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            if self._beats > beats:  # it worked for a while: try again soon
                delay = 0.05
            if not self.closed():
                await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX)

    async def _heartbeat(self, seq: int) -> bytes:
        """Send heartbeat ``seq`` on the command connection -- ``MULTI; SET hb:<id> <seq> PX
        <2 x staleness>; PUBLISH hb:<id> hb:<id>:<seq>; EXEC`` (its own channel) -- and return the
        message the subscription must receive. The ``SET`` makes it a write: a replica refuses
        it (``READONLY``), and so does a master with fewer good replicas than its
        ``min-replicas-to-write``; refused, nothing is published. Raises SessionStoreUnavailable
        (the problem naming the refusal)."""
        message = self._hb_message + str(seq).encode()
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._hb_key, seq, px=max(1, int(self.config.staleness * 2000)))
        pipe.publish(self._hb_channel, message)
        await self._call("heartbeat", pipe.execute())
        return message

    async def _listen(self, pubsub: Any) -> None:
        """Heartbeat every :data:`PING_INTERVAL` and apply revocations; the cache is fresh until
        ``staleness`` after the send of each heartbeat the subscription receives back.

        Why that proves every earlier revocation applied: Redis runs commands one at a time, and
        a ``PUBLISH`` appends the message to each subscriber connection's output buffer as it
        runs; a connection's buffer is sent in order over one TCP stream, whichever of the
        connection's channels (revocations, our heartbeats) a message is on. A revocation whose
        ``EXEC`` finished before our heartbeat was sent ran on that node before our ``EXEC``, so
        its message is ahead of our heartbeat in our subscription's buffer (on a replica
        subscribed to: in the replication stream, which it applies in order). So when our
        heartbeat arrives, every such revocation arrived before it and :meth:`_revoked` ran."""
        staleness = self.config.staleness
        seq = 0
        while not self._closed:
            seq += 1
            sent = self._clock()
            beat = await self._heartbeat(seq)
            next_beat = sent + PING_INTERVAL
            answered = False
            while True:
                wait = next_beat - self._clock()
                if answered and wait <= 0:
                    break
                if not answered and self._clock() - sent > staleness:
                    raise SessionStoreUnavailable(self._lost(staleness))
                wait = max(wait, 0.01)
                message = await self._call(
                    "listen", pubsub.get_message(ignore_subscribe_messages=True, timeout=wait),
                    limit=wait + self.config.timeout,
                )
                if message is None or message["type"] != "message":
                    continue
                data = message["data"]
                if message["channel"] == self._hb_channel:
                    if data != beat:  # (an earlier heartbeat's echo, late: the next one decides)
                        continue
                    answered = True
                    self._beats += 1
                    if self._owed:
                        await self._replay_owed()
                    self._fresh_until = sent + staleness
                    self._set_problem(None)
                elif not data.startswith(_HEARTBEAT):  # (a heartbeat here comes from another version: ignored)
                    self._revoked(data)

    def _lost(self, staleness: float) -> str:
        """The problem when a heartbeat Redis took did not come back through the subscription."""
        problem = (f"heartbeat: the write was taken but its message did not come back through the subscription "
                   f"within {staleness:g}s (sessions.redis.staleness): Redis too slow, or the subscription is "
                   "on another node than the commands (a failover)")
        self._set_problem(problem)
        return problem

    async def _replay_owed(self) -> None:
        """Send the deletions :meth:`pop` owes (delete + publish, in batches); each batch leaves
        the tombstone only once Redis took it. Raises SessionStoreUnavailable."""
        keys = list(self._owed)
        for i in range(0, len(keys), _REPLAY_BATCH):
            batch = keys[i:i + _REPLAY_BATCH]
            await self._delete_keys(batch)
            for key in batch:
                self._owed.pop(key, None)
        log.warning("sent %d logout(s) owed to the session store (Redis) since it was unavailable", len(keys))

    def _owe(self, key: bytes, why: str) -> NoReturn:
        """A logout Redis did not take: refuse the session here from now on and owe its deletion
        (:class:`LogoutOwed`); beyond ``max_sessions`` owed, the plain SessionStoreUnavailable."""
        if key not in self._owed and len(self._owed) >= self._max:
            log.warning("logout not taken: Redis unavailable and %d logouts already owed to it", len(self._owed))
            raise SessionStoreUnavailable(why)
        self._owed[key] = None
        log.warning("logout while the session store (Redis) is unavailable (%s): the session is refused here at "
                    "once; its deletion is sent when Redis answers (%d owed)", why, len(self._owed))
        raise LogoutOwed(f"logout owed to Redis: {why}")

    def _revoked(self, data: bytes) -> None:
        """Drop the cached sessions a revocation message names (``*``: all of them)."""
        if data == _FLUSH:
            self._forget_all()
            return
        keys = []
        for part in data.split(b","):
            with contextlib.suppress(ValueError):
                keys.append(bytes.fromhex(part.decode("ascii")))
        self._forget(keys)

    def _publish(self, pipe: Any, keys: Sequence[bytes]) -> None:
        if keys:
            pipe.publish(self._channel, ",".join(_hex(k) for k in keys).encode("ascii"))

    # -- SessionStore --------------------------------------------------------------------------

    def _deadline(self, s: Session) -> float:
        return min(s.expires, s.last_seen + self._life.idle_timeout)

    async def create(self, session: Session) -> str:
        """Store ``session`` under a new random handle and return that handle."""
        self._check_up()
        handle = new_handle()
        key = _handle_key(handle)
        assert key is not None
        skey, hexkey = self._skey(key), _hex(key)
        deadline = self._deadline(session)
        at_ms = max(int(deadline * 1000), int(time.time() * 1000) + 1)
        index_ms = int(session.expires * 1000) + 1000
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(skey, mapping=_encode(session))
        pipe.pexpireat(skey, at_ms)
        indexes = [f"{self._prefix}u:{_index_id(session.issuer, session.sub)}"]
        if session.sid is not None:
            indexes.append(f"{self._prefix}i:{_index_id(session.issuer, session.sid)}")
        for index in indexes:
            await self._index(keys=[index], args=[hexkey, index_ms], client=pipe)  # (queued: EVALSHA)
        pipe.zadd(self._all, {hexkey: deadline})
        pipe.zcard(self._all)
        results = await self._call("create", pipe.execute())
        excess = int(results[-1]) - self._max
        if excess > 0:
            await self._evict(excess, hexkey)
        self._cache.put(key, _lean(session))
        return handle

    async def _evict(self, excess: int, keep: str) -> None:
        """Beyond ``max_sessions``: delete the sessions nearest to their end."""
        popped = await self._call("evict", self._redis.zpopmin(self._all, excess + 1))
        others = [(m, s) for m, s in popped if m.decode() != keep]
        doomed = [bytes.fromhex(m.decode()) for m, _ in others[:excess]]
        back = [(m, s) for m, s in popped if m.decode() == keep] + others[excess:]
        pipe = self._redis.pipeline(transaction=True)
        for m, score in back:
            pipe.zadd(self._all, {m: score})
        for k in doomed:
            pipe.delete(self._skey(k))
        self._publish(pipe, doomed)
        self._forget(doomed)
        await self._call("evict", pipe.execute())

    def get_cached(self, handle: str, service: str, now: float) -> Session | None:
        """The hot path of :meth:`get` without a coroutine: the cached session when the cache
        is fresh, the session live for ``service`` and no touch due; otherwise None."""
        if self._clock() >= self._fresh_until:
            return None
        key = _handle_key(handle)
        if key is None:
            return None
        session = self._cache.peek(key)
        life = self._life
        if session is None or life.verdict(session, service, now) is not _Verdict.LIVE or life.touched(session, now):
            return None
        self._cache.refresh(key)
        return session

    async def get(self, handle: str, service: str, now: float) -> Session | None:
        """The live session for ``handle`` on ``service``, or None; slides ``last_seen``.
        Raises :class:`SessionStoreUnavailable` when it would need Redis and Redis is away."""
        key = _handle_key(handle)
        if key is None or (self._owed and key in self._owed):
            return None  # (logged out while Redis was away: refused until Redis confirms the delete)
        session = self._cache.peek(key) if self.fresh() else None
        if session is not None and self._life.verdict(session, service, now) is _Verdict.EXPIRED:
            # another enforcer may have slid last_seen since we cached it: ask Redis
            self._forget([key])
            session = None
        if session is None:
            self._check_up()
            epoch = self._epoch
            d, last = await self._call("get", self._redis.hmget(self._skey(key), ["d", "l"]))
            try:
                read = _decode(d, last)
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("dropping an unreadable session: %s", exc)
                await self.delete(handle)
                return None
            if read is None:
                return None
            session = _lean(read)
            if epoch == self._epoch:
                self._cache.put(key, session)
        else:
            self._cache.refresh(key)
        match self._life.verdict(session, service, now):
            case _Verdict.EXPIRED:
                return None  # Redis expires it by itself
            case _Verdict.WRONG_SERVICE:
                return None
            case _Verdict.LIVE:
                pass
        touched = self._life.touched(session, now)
        if touched is None:
            return session
        self._cache.replace(key, touched)
        deadline = self._deadline(touched)
        hexkey = _hex(key)
        exists = await self._call("touch", self._touch(
            keys=[self._skey(key), self._all],
            args=[repr(touched.last_seen), int(deadline * 1000), deadline, hexkey],
        ))
        if not exists:  # deleted meanwhile by another enforcer (its message is on the way)
            self._forget([key])
            return None
        return touched

    async def _delete_keys(self, keys: Sequence[bytes]) -> int:
        self._forget(keys)
        if not keys:
            return 0
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(*(self._skey(k) for k in keys))
        pipe.zrem(self._all, *(_hex(k) for k in keys))
        self._publish(pipe, keys)
        results = await self._call("delete", pipe.execute())
        return int(results[0])

    async def delete(self, handle: str) -> None:
        """Forget the session for ``handle`` everywhere; unknown or malformed handles are ignored."""
        if (key := _handle_key(handle)) is not None:
            await self._delete_keys([key])

    async def pop(self, handle: str, service: str, now: float) -> Session | None:
        """Delete the session for ``handle`` everywhere; return it, raw ID token included, if
        it was live for ``service``. Redis away: :class:`LogoutOwed` (the deletion is owed)."""
        key = _handle_key(handle)
        if key is None:
            return None
        self._forget([key])
        if self._down:
            self._owe(key, self.problem or "Redis unavailable")
        skey = self._skey(key)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hmget(skey, ["d", "l", "t"])
        pipe.delete(skey)
        pipe.zrem(self._all, _hex(key))
        self._publish(pipe, [key])
        try:
            results = await self._call("pop", pipe.execute())
        except SessionStoreUnavailable as exc:
            self._owe(key, str(exc))
        try:
            session = _decode(*results[0])
        except (ValueError, TypeError, KeyError):
            return None
        if session is None:
            return None
        return session if self._life.verdict(session, service, now) is _Verdict.LIVE else None

    async def delete_matching(
        self, *, issuer: str, sub: str | None = None, sid: str | None = None
    ) -> int:
        """Back-channel logout: delete the sessions of ``issuer`` with this ``sub`` and/or
        ``sid`` on every enforcer; return how many."""
        _check_selector(sub, sid)
        self._forget(self._cache.keys_where(lambda e: self._cache.entry_matches(e, issuer, sub, sid)))
        index = (
            f"{self._prefix}i:{_index_id(issuer, sid)}" if sid is not None
            else f"{self._prefix}u:{_index_id(issuer, sub or '')}"
        )
        members = sorted(await self._call("delete_matching", self._redis.smembers(index)))
        if not members:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        for m in members:
            pipe.hmget(f"{self._prefix}s:{m.decode()}", ["d", "l"])
        rows = await self._call("delete_matching", pipe.execute())
        doomed: list[bytes] = []
        gone: list[bytes] = []
        for m, (d, last) in zip(members, rows, strict=True):
            try:
                s = _decode(d, last)
            except (ValueError, TypeError, KeyError):
                s = None
            if s is None:
                gone.append(m)
            elif _matches(s, issuer, sub, sid):
                doomed.append(bytes.fromhex(m.decode()))
        if gone:
            await self._call("delete_matching", self._redis.srem(index, *gone))
        return await self._delete_keys(doomed) if doomed else 0

    async def count(self) -> int:
        """Number of stored sessions (the ``all`` index, after dropping expired entries)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.zremrangebyscore(self._all, "-inf", time.time())
        pipe.zcard(self._all)
        results = await self._call("count", pipe.execute())
        return int(results[1])

    async def purge_expired(self, now: float) -> int:
        """Redis expires sessions by itself; this drops their entries from the ``all`` index
        and returns how many."""
        return int(await self._call("purge", self._redis.zremrangebyscore(self._all, "-inf", now)))

    async def refresh_begin(self, handle: str, now: float, lease: float) -> Session | None:
        """Take the refresh lease of ``handle``'s session (``SET r:<key> <random> NX PX``: one
        refresh at a time across the fleet; the random value says who holds it) and return the
        session read from Redis; None when leased or unknown."""
        key = _handle_key(handle)
        if key is None:
            return None
        self._check_up()
        rkey = f"{self._prefix}r:{_hex(key)}"
        owner = secrets.token_hex(16).encode()
        taken = await self._call("lease", self._redis.set(rkey, owner, nx=True, px=max(1, int(lease * 1000))))
        if not taken:
            return None
        self._hold(key, owner, lease)
        d, last = await self._call("get", self._redis.hmget(self._skey(key), ["d", "l"]))
        try:
            read = _decode(d, last)
        except (ValueError, TypeError, KeyError):
            read = None
        if read is None:
            await self._call("lease", self._release(keys=[rkey], args=[self._leases.pop(key)[0]]))
        return read

    def _hold(self, key: bytes, owner: bytes, lease: float) -> None:
        """Remember a lease taken (bounded: an end never called is forgotten after the lease)."""
        now = self._clock()
        if len(self._leases) >= _LEASES_MAX:
            self._leases = {k: v for k, v in self._leases.items() if v[1] > now}
        self._leases[key] = (owner, now + lease)

    async def refresh_end(self, handle: str, expected: str | None, renewed: Session | None) -> bool:
        """Release the lease if this store still holds it (its value is still in ``r:<key>``);
        with ``renewed`` (the session :meth:`refresh_begin` returned, with renewed claims),
        replace the stored one atomically if its refresh token is still ``expected``, and
        publish the key to every enforcer."""
        key = _handle_key(handle)
        if key is None:
            return False
        rkey = f"{self._prefix}r:{_hex(key)}"
        held = self._leases.pop(key, None)
        owner = held[0] if held is not None else b""
        if renewed is None:
            if held is not None:
                await self._call("lease", self._release(keys=[rkey], args=[owner]))
            return False
        self._forget([key])
        written = await self._call("renew", self._renew(
            keys=[self._skey(key), rkey, self._channel],
            args=[expected or "", _encode(renewed)["d"], renewed.id_token, _hex(key), owner],
        ))
        return bool(written)

    async def first_use(self, kind: str, key: str, now: float, until: float) -> bool:
        """Mark ``key`` used, fleet-wide: ``SET j:<hash> NX PX`` with a native TTL of ``until
        - now`` (at most :data:`USED_KEEP_MAX`); False when another call (on any enforcer)
        marked it first. Redis unreachable: :class:`SessionStoreUnavailable`, never a guess."""
        self._check_up()
        ttl_ms = max(1, int(min(until - now, USED_KEEP_MAX) * 1000))
        return bool(await self._call("first_use", self._redis.set(self._jkey(kind, key), b"1", nx=True, px=ttl_ms)))

    async def was_used(self, kind: str, key: str, now: float) -> bool:
        """Whether ``key`` is marked used on any enforcer (``EXISTS j:<hash>``; Redis expires the
        mark). Redis unreachable: :class:`SessionStoreUnavailable`."""
        self._check_up()
        return bool(await self._call("was_used", self._redis.exists(self._jkey(kind, key))))

    def _jkey(self, kind: str, key: str) -> str:
        """Where a used-key mark lives: ``j:<hash>`` (:func:`_used_key`: never the key itself)."""
        return f"{self._prefix}j:{_used_key(kind, key).hex()}"

    def retain_services(self, services: frozenset[str]) -> int:
        """After a reload: forget the cached sessions of services no longer defined."""
        return self._cache.retain_services(services)

    # -- pending logins (login.PendingBackend) -------------------------------------------------

    def _pkey(self, state: str) -> str:
        return f"{self._prefix}p:{hashlib.sha256(state.encode('utf-8', 'surrogatepass')).hexdigest()}"

    async def put_pending(
        self, state: str, data: str, created: float, *, max_pending: int, ttl: float | None = None
    ) -> None:
        """Remember a pending login under ``state`` for every enforcer: Redis expires it after
        ``ttl`` (the login timeout) and keeps at most ``max_pending`` fleet-wide (the oldest go)."""
        self._check_up()
        keep = PENDING_KEEP if ttl is None else ttl
        value = json.dumps([created, data], separators=(",", ":"))
        await self._call("put_pending", self._put_pending(
            keys=[self._pkey(state), self._pending],
            args=[value, max(1, int(keep * 1000)), repr(float(created)), repr(float(created - keep)),
                  max(1, max_pending)],
        ))

    async def take_pending(self, state: str, now: float, ttl: float) -> str | None:
        """Consume the pending login for ``state`` once (``GETDEL``, atomic across the fleet);
        None when unknown or older than ``ttl`` seconds."""
        self._check_up()
        pkey = self._pkey(state)
        pipe = self._redis.pipeline(transaction=True)
        pipe.getdel(pkey)
        pipe.zrem(self._pending, pkey)
        raw, _ = await self._call("take_pending", pipe.execute())
        if raw is None:
            return None
        try:
            created, data = json.loads(raw)
            if not isinstance(data, str):
                return None
            return data if now - _num(created) <= ttl else None
        except (ValueError, TypeError):
            return None

    # -- life cycle ----------------------------------------------------------------------------

    async def check(self) -> str:
        """``enforcer check``/``doctor``: use every right the daemon needs, as the daemon does --
        PING; the data commands on probe keys under the prefix (one ``MULTI``); ``SCRIPT LOAD``
        of its scripts and ``EVALSHA`` of each on probe keys; ``PUBLISH``, ``SUBSCRIBE``, a PING
        through the subscription and ``UNSUBSCRIBE`` on the revocation channel. ``"ok"``, or
        SessionStoreUnavailable naming the right the ACL user lacks and the ACL rule granting it."""
        try:
            await self._call("ping", self._redis.ping())
        except SessionStoreUnavailable as exc:
            if isinstance(exc.__cause__, MasterNotFoundError):
                raise SessionStoreUnavailable(await self._why_no_master()) from exc
            raise
        probe = f"{self._prefix}probe:{new_handle()[:16]}"
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            (f"use keys {self._prefix}* (the session commands, in MULTI)", lambda: self._check_data(probe)),
            ("load and run its Lua scripts (SCRIPT LOAD, EVALSHA)", lambda: self._check_scripts(probe)),
            (f"publish on channel {self._channel.decode()}",
             lambda: self._call("publish", self._redis.publish(self._channel, _hex(probe.encode())))),
            (f"subscribe to channel {self._channel.decode()} (and see a heartbeat: SET {self._hb_key} and "
             "PUBLISH in MULTI, come back through it)", self._check_subscribe),
        ]
        for what, step in steps:
            try:
                await step()
            except SessionStoreUnavailable as exc:
                cause = exc.__cause__
                if isinstance(cause, NoPermissionError):
                    raise SessionStoreUnavailable(self._missing_right(what, str(cause))) from exc
                if isinstance(cause, ResponseError) and "EXEC without MULTI" in str(cause):
                    # (redis-py drops MULTI's own refusal; EXEC's error is what is left of it)
                    why = f"{cause}: the user has no permissions to run the 'multi' command"
                    raise SessionStoreUnavailable(self._missing_right(what, why)) from exc
                raise
        return "ok"

    async def _check_data(self, probe: str) -> None:
        """Every data command the store sends, on probe keys (they are gone afterwards)."""
        h, s, z = f"{probe}:h", f"{probe}:s", f"{probe}:z"
        at_ms = int(time.time() * 1000) + 10_000
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(probe, b"1", ex=10, nx=True)
        pipe.getdel(probe)
        pipe.hset(h, mapping={"d": b"1"})
        pipe.hmget(h, ["d"])
        pipe.pexpireat(h, at_ms)
        pipe.sadd(s, b"1")
        pipe.smembers(s)
        pipe.srem(s, b"1")
        pipe.zadd(z, {b"1": 1.0})
        pipe.zadd(z, {b"1": 2.0}, xx=True)
        pipe.zcard(z)
        pipe.zpopmin(z, 1)
        pipe.zrem(z, b"1")
        pipe.zremrangebyscore(z, "-inf", 0)
        pipe.delete(h, s, z)
        results = await self._call("write", pipe.execute())
        if results[1] != b"1" or results[3] != [b"1"]:
            raise SessionStoreUnavailable("Redis did not return the probe keys")

    async def _check_scripts(self, probe: str) -> None:
        """``SCRIPT LOAD`` every script the store registered, then ``EVALSHA`` each the way the
        store calls it, on keys that do not exist (both return at once, changing nothing)."""
        scripts = [v for v in vars(self).values() if isinstance(v, AsyncScript)]
        for script in scripts:
            await self._call("script load", self._redis.script_load(script.script))
        await self._call("evalsha", self._redis.evalsha(
            self._touch.sha, 2, f"{probe}:s", f"{probe}:z", "0", "0", "0", "0"))
        await self._call("evalsha", self._redis.evalsha(
            self._renew.sha, 3, f"{probe}:s", f"{probe}:r", self._channel, "", "", "", ""))

    async def _check_subscribe(self) -> None:
        """Subscribe to the revocation channel as the watcher does, send a heartbeat and see it
        come back through the subscription, delete its key, unsubscribe."""
        pubsub = self._subscriber.pubsub()
        try:
            await self._call("subscribe", pubsub.subscribe(self._channel, self._hb_channel))
            for _ in range(2):
                await self._call("subscribe", self._next_message(pubsub, "subscribe"))
            beat = await self._heartbeat(0)
            await self._call("heartbeat", self._next_message(pubsub, "message", beat))
            await self._call("heartbeat", self._redis.delete(self._hb_key))
            await self._call("unsubscribe", pubsub.unsubscribe(self._channel, self._hb_channel))
            for _ in range(2):
                await self._call("unsubscribe", self._next_message(pubsub, "unsubscribe"))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    @staticmethod
    async def _next_message(pubsub: Any, kind: str, data: bytes | None = None) -> None:
        """Wait for the subscription's next ``kind`` message (with ``data``, that one; a
        refusal raises its error)."""
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] == kind and data in (None, message["data"]):
                return

    def _missing_right(self, what: str, text: str) -> str:
        """What the ACL user may not do (``text``: Redis's refusal, 6 or 7 wording), and the ACL
        rule that grants it."""
        user = self.config.username or "default"
        command = re.search(r"run the '([^']+)' command", text)
        p = self._prefix
        if command is not None:
            grant = f"+{command.group(1)}"
        elif "channel" in text:
            grant = f"&{p}*"
        else:
            grant = f"~{p}*"
        return (f"the ACL user {user!r} may not {what} ({text}); grant it with {grant} -- the ACL line for the "
                f"daemon: user {user} on >PASSWORD ~{p}* &{p}* +@all -@dangerous")

    async def _why_no_master(self) -> str:
        """Why the Sentinels gave no master, asking each: not one answered (and why), none
        monitors ``sentinel_master``, or they do but report it down."""
        pool = self._redis.connection_pool
        name = self.config.sentinel_master
        known: set[str] = set()
        errors: list[str] = []
        answered = False
        for sentinel in pool.sentinel_manager.sentinels:
            kw = sentinel.connection_pool.connection_kwargs
            try:
                async with asyncio.timeout(self.config.timeout):
                    masters = await sentinel.sentinel_masters()
            except (RedisError, OSError, TimeoutError) as exc:
                errors.append(f"{kw.get('host')}:{kw.get('port')}: {type(exc).__name__}: {exc}".rstrip(": "))
                continue
            answered = True
            known |= {m.decode() if isinstance(m, bytes) else str(m) for m in masters}
        if not answered:
            sent = {"same": "sessions.redis.username and passwordFile", "none": "no credentials",
                    "own": "sessions.redis.sentinelAuth's username and passwordFile"}[self.config.sentinel_auth]
            return (f"no Sentinel answered (sessions.redis.sentinels; they are sent {sent}; for Sentinels "
                    f"without ACL users set sessions.redis.sentinelAuth: none): {'; '.join(errors)}")
        if name not in known:
            return (f"sessions.redis.sentinelMaster {name!r} is not monitored by the Sentinels "
                    f"(they monitor: {', '.join(sorted(known)) or 'nothing'})")
        return f"the Sentinels report no usable master {name!r} (down, or a failover in progress)"

    async def close(self) -> None:
        """Stop the watcher (it ends at its next turn) and close the connections (with
        Sentinels, theirs too: closing the master's client leaves them open)."""
        self._closed = True
        self._fresh_until = -1.0
        self._cache.clear()
        if self._owed:
            log.warning("closing with %d logout(s) still owed to the session store (Redis): their cookies were "
                        "cleared, but the sessions stay valid in Redis until they expire", len(self._owed))
        for client in {id(c): c for c in (self._redis, self._subscriber)}.values():
            with contextlib.suppress(Exception):
                await client.aclose()
        pool = getattr(self._redis, "connection_pool", None)
        if isinstance(pool, SentinelConnectionPool):
            with contextlib.suppress(Exception):
                await pool.sentinel_manager.aclose()


def _lean(session: Session) -> Session:
    """The copy the cache keeps, as the SQLite store's: no raw ID token, and the strings many
    sessions repeat (service, issuer, tags) interned."""
    return dataclasses.replace(
        session, service=sys.intern(session.service), issuer=sys.intern(session.issuer),
        tags=frozenset(sys.intern(t) for t in session.tags), id_token="",
    )
