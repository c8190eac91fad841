"""The session store ``sessions:`` asks for, built from the settings, and its connection check.

Kept apart from the daemon so ``enforcer check`` and ``doctor`` can test the store's connection
without loading the daemon or the data path. The Redis store is imported only when it is the one
configured: redis-py adds ~5 MiB to the RSS of every daemon that loads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from enforcer.config import settings as settings_mod
from enforcer.identity import sessions, sqlite

if TYPE_CHECKING:
    from enforcer.identity import redis as redis_store


def redis_config(r: settings_mod.RedisModel) -> redis_store.RedisConfig:
    """``sessions.redis`` as the Redis store takes it."""
    from enforcer.identity import redis as redis_store  # noqa: PLC0415  (redis-py: ~5 MiB RSS; only with Redis)

    sentinels = tuple((h.strip("[]"), int(p)) for h, _, p in (e.rpartition(":") for e in r.sentinels))
    own = r.sentinelAuth if isinstance(r.sentinelAuth, settings_mod.SentinelAuthModel) else None
    return redis_store.RedisConfig(
        url=r.url, sentinels=sentinels, sentinel_master=r.sentinelMaster, tls=r.tls, ca_file=r.caFile,
        username=r.username, password_file=r.passwordFile, db=r.db, key_prefix=r.keyPrefix,
        timeout=r.timeout, staleness=r.staleness,
        sentinel_auth="own" if own is not None else str(r.sentinelAuth),
        sentinel_username=own.username if own is not None else None,
        sentinel_password_file=own.passwordFile if own is not None else None,
    )


async def check_session_store(s: settings_mod.DaemonModel) -> str | None:
    """``enforcer check``/``doctor``: with ``store: redis``, connect as the daemon would and use
    every right it needs (:meth:`RedisSessionStore.check`): ``"ok"`` or why not (the missing
    right and the ACL rule granting it). None for the local stores."""
    if s.sessions.store != "redis" or s.sessions.redis is None:
        return None
    from enforcer.identity import redis as redis_store  # noqa: PLC0415  (redis-py: ~5 MiB RSS; only with Redis)

    try:
        store = redis_store.RedisSessionStore(redis_config(s.sessions.redis), idle_timeout=s.sessions.idleTimeout)
    except OSError as exc:  # the password file
        return f"cannot read sessions.redis.passwordFile: {exc}"
    try:
        return await store.check()
    except redis_store.SessionStoreUnavailable as exc:
        return str(exc)
    finally:
        await store.close()


def session_store(
    s: settings_mod.DaemonModel, *, shared: bool, on_state: Callable[[bool], None] | None = None
) -> sessions.SessionStore:
    """The session store ``sessions:`` asks for: SQLite in the state dir (``shared`` when
    several worker processes use it), Redis (a fleet; ``on_state`` hears when it goes away and
    comes back) or in memory."""
    if s.sessions.store == "redis":
        assert s.sessions.redis is not None  # (the model requires it)
        from enforcer.identity import redis as redis_store  # noqa: PLC0415  (redis-py: ~5 MiB RSS; only with Redis)

        try:
            return redis_store.RedisSessionStore(
                redis_config(s.sessions.redis), idle_timeout=s.sessions.idleTimeout,
                max_sessions=s.sessions.maxSessions, cache_size=s.sessions.cacheSize, on_state=on_state,
            )
        except OSError as exc:
            raise sessions.SessionStoreError(f"cannot read sessions.redis.passwordFile: {exc}") from exc
    if s.sessions.store == "sqlite":
        return sqlite.SQLiteSessionStore(
            s.stateDir / "sessions.db", idle_timeout=s.sessions.idleTimeout, max_sessions=s.sessions.maxSessions,
            cache_size=s.sessions.cacheSize, shared=shared,
        )
    return sessions.MemorySessionStore(idle_timeout=s.sessions.idleTimeout, max_sessions=s.sessions.maxSessions)
