"""The default session store: SQLite in the state dir, shared by the workers, kept across restarts.

Also holds pending logins and cross-worker revocations; corruption is detected and the file is
recreated rather than trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import sqlite3
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, TypeVar

from enforcer.identity.cache import _Compact, _SessionCache
from enforcer.identity.cookies import new_handle
from enforcer.identity.sessions import (
    RENEWED_COLUMNS,
    USED_KEEP_MAX,
    USED_MAX,
    Session,
    SessionStoreError,
    _check_max_sessions,
    _check_selector,
    _handle_key,
    _Lifetime,
    _used_key,
    _Verdict,
    renewed_fields,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# --------------------------------------------------------------------------------------------
# SQLite
# --------------------------------------------------------------------------------------------

SCHEMA_VERSION: Final = 1

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    key BLOB PRIMARY KEY,          -- SHA-256(handle), never the handle itself
    service TEXT NOT NULL,
    issuer TEXT NOT NULL,
    sub TEXT NOT NULL,
    email TEXT,
    username TEXT,
    tags TEXT NOT NULL,            -- JSON list of strings, sorted
    sid TEXT,
    id_token TEXT NOT NULL,
    created REAL NOT NULL,
    last_seen REAL NOT NULL,
    expires REAL NOT NULL,
    refresh_token TEXT,
    claims_expire REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_issuer_sub ON sessions (issuer, sub);
CREATE INDEX IF NOT EXISTS sessions_issuer_sid ON sessions (issuer, sid);
CREATE INDEX IF NOT EXISTS sessions_last_seen ON sessions (last_seen);
CREATE INDEX IF NOT EXISTS sessions_expires ON sessions (expires);
CREATE TABLE IF NOT EXISTS revocations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key BLOB NOT NULL,             -- a session deleted before its time (logout, eviction)
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_logins (
    state TEXT PRIMARY KEY,
    data TEXT NOT NULL,            -- JSON of the login transaction
    created REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_logins_created ON pending_logins (created);
CREATE TABLE IF NOT EXISTS refresh_leases (
    key BLOB PRIMARY KEY,          -- a session being refreshed (single flight across workers)
    until REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS used_marks (
    key BLOB PRIMARY KEY,          -- SHA-256 of a used one-time value (a logout token's jti)
    until REAL NOT NULL            -- a replay is refused until then
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS used_marks_until ON used_marks (until);
"""

PAGE_CACHE_KIB: Final = 256
"""SQLite's page cache of the store's connection (its default is 2 MiB). Hot sessions are
served from our own cache, so SQLite only sees misses and writes; the B-tree's inner pages
stay cached and a leaf it has to re-read comes from the OS page cache (one ``pread``)."""

PENDING_KEEP: Final = 3600.0
"""Seconds after which an abandoned pending login row is removed (the TTL check is separate)."""

_LEASES_MAX: Final = 10_000
"""Most refresh leases one store remembers holding; beyond, those past their end are forgotten."""

REVOCATION_KEEP: Final = 600.0
"""Seconds a revocation row is kept for other workers to see (they look at least every request)."""

_COLUMNS: Final = (
    "service, issuer, sub, email, username, tags, sid, id_token, "
    "created, last_seen, expires, refresh_token, claims_expire"
)

_LEAN_COLUMNS: Final = _COLUMNS.replace("id_token", "'' AS id_token")
"""What a cache read needs: never the raw ID token (it would be allocated only to be dropped)."""

_INSERT: Final = f"INSERT INTO sessions (key, {_COLUMNS}) VALUES ({', '.join('?' * 14)})"  # noqa: S608 — constants only

_Row = tuple[object, ...]

_CORRUPTION_CODES: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """Only "the file is damaged" counts; a full disk or a lock is not a reason to discard."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in _CORRUPTION_CODES


def _encode(key: bytes, s: Session) -> _Row:
    tags = json.dumps(sorted(s.tags))
    return (key, s.service, s.issuer, s.sub, s.email, s.username, tags, s.sid, s.id_token,
            s.created, s.last_seen, s.expires, s.refresh_token, s.claims_expire)  # fmt: skip


def _opt_str(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"expected text or NULL, got {type(value).__name__}")


def _req_str(value: object) -> str:
    if isinstance(value, str):
        return value
    raise TypeError(f"expected text, got {type(value).__name__}")


def _req_float(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"expected a number, got {type(value).__name__}")


def _lean(session: Session) -> Session:
    """The copy a cache keeps: no raw ID token, and the strings many sessions repeat (service,
    issuer, tags such as ``groups=staff``) interned, so 10,000 cached sessions stay small."""
    return dataclasses.replace(
        session,
        service=sys.intern(session.service),
        issuer=sys.intern(session.issuer),
        tags=frozenset(sys.intern(t) for t in session.tags),
        id_token="",
    )


def _decode(row: _Row) -> Session:
    """A Session from a row; raises ValueError/TypeError on anything unexpected."""
    tags = json.loads(_req_str(row[5]))
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise TypeError("tags must be a JSON list of strings")
    claims_expire = row[12]
    return Session(
        service=_req_str(row[0]),
        issuer=_req_str(row[1]),
        sub=_req_str(row[2]),
        email=_opt_str(row[3]),
        username=_opt_str(row[4]),
        tags=frozenset(tags),
        sid=_opt_str(row[6]),
        id_token=_req_str(row[7]),
        created=_req_float(row[8]),
        last_seen=_req_float(row[9]),
        expires=_req_float(row[10]),
        refresh_token=_opt_str(row[11]),
        claims_expire=None if claims_expire is None else _req_float(claims_expire),
    )

@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One explicit transaction (the connection is in autocommit mode): all or nothing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):  # keep the original error, not the rollback's
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _create_private_file(path: Path) -> None:
    """Create ``path`` (or tighten an existing one) with mode 0600: it holds ID tokens.

    SQLite gives the ``-wal`` and ``-shm`` files the database file's mode.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class SQLiteSessionStore:
    """Sessions in a SQLite file in the state dir, so a daemon restart keeps users signed in.

    * Layout: one ``sessions`` table keyed by ``SHA-256(handle)``, tags as JSON, a ``meta``
      table holding the schema version (a newer version raises :class:`SessionStoreError`).
      The file is mode 0600 and in WAL mode with ``synchronous=NORMAL``: a power cut may lose
      the last few logins, which only means signing in again.
    * Hot path: a bounded LRU cache (``cache_size`` entries, keyed by handle hash) in front of
      SQLite, write-through on create/delete/touch. A ``get()`` that hits the cache and is not
      due for a touch does no I/O at all; misses read through. Nothing is loaded at startup.
      The cache keeps the :data:`HOT_SESSIONS` most recently used sessions as Session
      objects and the others in a compact form (:class:`_SessionCache`), so many live users
      fit in little memory (figures in PERFORMANCE.md).
    * Threading: every SQLite call runs in one dedicated worker thread
      (``ThreadPoolExecutor(max_workers=1)``) that owns the only connection. Chosen over
      synchronous calls because reads are sub-millisecond but writes are not bounded: a
      commit, a WAL checkpoint or a slow/contended disk can stall for milliseconds to seconds,
      and a stalled event loop stalls every user. Cache hits skip the thread hop entirely,
      so the hop (tens of microseconds) is paid only on misses and rate-limited writes. One
      thread also serialises all writes in submission order, so SQLite never sees contention.
    * Corruption: a damaged file (SQLITE_CORRUPT / SQLITE_NOTADB, at open or on any later
      call) is moved aside to ``<name>.corrupt-<unix time>``, a fresh empty database takes
      its place and a warning is logged; users sign in again, the daemon keeps running.
      No integrity scan at startup: it would read the whole file (lazy loading is the point).
    * Several worker processes (``shared=True``): each has its own cache, so a session deleted
      by one (logout, back-channel logout, eviction) is also written to a ``revocations``
      table. Before a worker serves anything from its cache it asks SQLite whether another
      connection committed since it last looked (``PRAGMA data_version`` on a second,
      read-only connection of the event-loop thread: a shared-memory read, no disk I/O) and
      if so drops the cached copies of newly revoked sessions first, so revocation takes
      effect on the very next request in every worker. A cached copy that looks idle-expired
      is re-read before it is deleted: another worker may have slid ``last_seen`` meanwhile.
      Pending logins live in the same file (:meth:`put_pending` / :meth:`take_pending`), so
      the callback may land on any worker; taking one is a single ``DELETE ... RETURNING``.
    """

    def __init__(
        self,
        path: Path,
        *,
        idle_timeout: float,
        touch_interval: float = 60.0,
        max_sessions: int = 100_000,
        cache_size: int = 10_000,
        shared: bool = False,
        max_used: int = USED_MAX,
    ) -> None:
        """Open (creating if needed) the database at ``path``.

        Blocks briefly on the worker thread so that a bad file or a newer schema is reported
        here, at startup, rather than on some user's first request.
        """
        _check_max_sessions(max_sessions)
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self._life = _Lifetime.make(idle_timeout, touch_interval)
        self._path = path
        self._max = max_sessions
        self._max_used = max(1, max_used)
        self._leases: dict[bytes, float] = {}
        """The refresh leases this worker holds: key -> the ``until`` it wrote (which says the
        row is still its own: a later holder writes a later one)."""
        self._cache = _SessionCache(cache_size)
        # Bumped on every deletion/recovery; a read-through that overlapped one must not
        # re-insert what it read into the cache (it could be a just-deleted session).
        self._epoch = 0
        # Bumped by the worker when it replaced a corrupt file; the loop then drops its cache.
        self._recoveries = 0
        self._seen_recoveries = 0
        self._conn: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enforcer-sessions")
        try:
            self._executor.submit(self._open_or_recover).result()
        except BaseException:
            self._executor.shutdown(wait=True)
            raise
        self.shared = shared
        self._watch: sqlite3.Connection | None = None
        self._data_version = -1
        self._revocation_id = 0
        if shared:
            self._open_watch()

    def _open_watch(self) -> None:
        """The loop thread's read-only connection that notices other workers' commits."""
        watch = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, isolation_level=None,
                                check_same_thread=False)
        watch.execute("PRAGMA busy_timeout=1000")
        (self._data_version,) = watch.execute("PRAGMA data_version").fetchone()
        (self._revocation_id,) = watch.execute("SELECT COALESCE(MAX(id), 0) FROM revocations").fetchone()
        self._watch = watch

    # -- worker thread ------------------------------------------------------------------------

    def _open(self) -> None:
        _create_private_file(self._path)
        # busy timeout first: several workers may open (and switch to WAL) at the same moment
        conn = sqlite3.connect(self._path, isolation_level=None, timeout=5.0)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA cache_size=-{PAGE_CACHE_KIB}")
            conn.execute("BEGIN IMMEDIATE")
            self._migrate(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        has_meta = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if has_meta:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            text = str(row[0]) if row is not None else ""
            version = int(text) if re.fullmatch(r"[0-9]{1,9}", text) else None
            if version is None:
                raise SessionStoreError(f"{self._path}: meta table has no valid schema_version")
            if version > SCHEMA_VERSION:
                raise SessionStoreError(
                    f"{self._path}: session database schema version {version} is newer than "
                    f"this enforcer supports ({SCHEMA_VERSION}); upgrade the enforcer or "
                    f"remove the file (users will sign in again)"
                )
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )

    def _open_or_recover(self) -> None:
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            self._recover(exc)

    def _recover(self, exc: sqlite3.DatabaseError) -> None:
        """Move the damaged file (and its WAL) aside and start an empty database."""
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        aside = self._path.with_name(f"{self._path.name}.corrupt-{int(time.time())}")
        n = 0
        while aside.exists():
            n += 1
            aside = aside.with_name(f"{self._path.name}.corrupt-{int(time.time())}-{n}")
        self._path.replace(aside)
        wal = self._path.with_name(self._path.name + "-wal")
        if wal.exists():
            wal.replace(aside.with_name(aside.name + "-wal"))
        self._path.with_name(self._path.name + "-shm").unlink(missing_ok=True)
        log.warning(
            "session database %s is corrupt (%s); moved it to %s and started empty; "
            "signed-in users will have to sign in again",
            self._path,
            exc,
            aside.name,
        )
        self._recoveries += 1
        self._open()

    def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` on the connection; on corruption recover once and retry on the new file."""
        if self._conn is None:
            raise SessionStoreError("session store is closed")
        try:
            return fn(self._conn)
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            self._recover(exc)
            assert self._conn is not None
            return fn(self._conn)

    # -- event loop side ----------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._call, fn)
        finally:
            if self._recoveries != self._seen_recoveries:
                self._seen_recoveries = self._recoveries
                self._cache.clear()
                self._epoch += 1
                if self._watch is not None:  # it still reads the file that was moved aside
                    self._watch.close()
                    self._open_watch()

    def _sync(self) -> None:
        """Shared mode: drop cached sessions other workers revoked since we last looked.

        Fails closed: if SQLite cannot answer, the whole cache is dropped (every request then
        reads through, and a read that fails is an error, never a stale allow)."""
        watch = self._watch
        if watch is None:
            return
        try:
            (version,) = watch.execute("PRAGMA data_version").fetchone()
            if version == self._data_version:
                return
            rows = watch.execute(
                "SELECT id, key FROM revocations WHERE id > ? ORDER BY id", (self._revocation_id,)
            ).fetchall()
        except sqlite3.Error as exc:
            log.warning("cannot check for revoked sessions (%s): dropping the session cache", exc)
            self._cache.clear()
            self._epoch += 1
            self._data_version = -1
            return
        self._data_version = version
        if rows:
            self._revocation_id = int(rows[-1][0])
            self._forget(bytes(k) for _, k in rows)

    def _cache_put(self, key: bytes, session: Session) -> Session:
        """Cache the lean copy of ``session`` (see :func:`_lean`) and return it."""
        lean = _lean(session)
        self._cache.put(key, lean)
        return lean

    def _forget(self, keys: Iterable[bytes]) -> None:
        self._epoch += 1
        for key in keys:
            self._cache.pop(key)

    async def create(self, session: Session) -> str:
        """Store ``session`` under a new random handle and return that handle."""
        handle = new_handle()
        key = _handle_key(handle)
        assert key is not None
        row = _encode(key, session)
        limit = self._max

        def insert(conn: sqlite3.Connection) -> list[bytes]:
            with _transaction(conn):
                conn.execute(_INSERT, row)
                (total,) = conn.execute("SELECT COUNT(*) FROM sessions").fetchone()
                excess = int(total) - limit
                if excess <= 0:
                    return []
                evicted = [
                    bytes(k)
                    for (k,) in conn.execute(
                        "SELECT key FROM sessions WHERE key != ? "
                        "ORDER BY last_seen ASC, key ASC LIMIT ?",
                        (key, excess),
                    )
                ]
                conn.executemany("DELETE FROM sessions WHERE key = ?", [(k,) for k in evicted])
                self._revoke(conn, evicted)
                return evicted

        evicted = await self._run(insert)
        if evicted:
            self._forget(evicted)
        self._cache_put(key, session)
        return handle

    def _lookup_key(self, handle: str) -> bytes | None:
        """The cache key of a well-formed handle, after dropping what other workers revoked."""
        key = _handle_key(handle)
        if key is not None and self._watch is not None:
            self._sync()
        return key

    def get_cached(self, handle: str, service: str, now: float) -> Session | None:
        """The hot path of :meth:`get` without a coroutine: the session when the cache holds
        it live for ``service`` and no ``last_seen`` write is due; otherwise None, and the
        caller must ask :meth:`get` (which decides expiry, wrong service and the touch)."""
        key = self._lookup_key(handle)
        if key is None:
            return None
        session = self._cache.peek(key)
        if (
            session is None
            or self._life.verdict(session, service, now) is not _Verdict.LIVE
            or self._life.touched(session, now) is not None
        ):
            return None
        self._cache.refresh(key)
        return session

    def retain_services(self, services: frozenset[str]) -> int:
        """After a reload: forget the cached sessions of services that are no longer defined
        (the file keeps them until they expire), with the cache's strings for them."""
        return self._cache.retain_services(services)

    async def get(self, handle: str, service: str, now: float) -> Session | None:
        """The live session for ``handle`` on ``service``, or None; slides ``last_seen``."""
        key = self._lookup_key(handle)
        if key is None:
            return None
        session = self._cache.peek(key)
        if session is not None and self.shared and self._life.verdict(session, service, now) is _Verdict.EXPIRED:
            # another worker may have slid last_seen since we cached it: ask the file
            self._forget([key])
            session = None
        if session is None:
            epoch = self._epoch

            def select(conn: sqlite3.Connection) -> _Row | None:
                row: _Row | None = conn.execute(
                    f"SELECT {_LEAN_COLUMNS} FROM sessions WHERE key = ?",  # noqa: S608 — constant
                    (key,),
                ).fetchone()
                return row

            row = await self._run(select)
            if row is None:
                return None
            try:
                session = _lean(_decode(row))
            except (ValueError, TypeError) as exc:
                log.warning("dropping unreadable session row: %s", exc)
                await self._delete_keys([key])
                return None
            if epoch == self._epoch:
                session = self._cache_put(key, session)
        else:
            self._cache.refresh(key)

        match self._life.verdict(session, service, now):
            case _Verdict.EXPIRED:
                await self._delete_keys([key])
                return None
            case _Verdict.WRONG_SERVICE:
                return None
            case _Verdict.LIVE:
                pass
        touched = self._life.touched(session, now)
        if touched is None:
            return session
        self._cache.replace(key, touched)
        last_seen = touched.last_seen

        def touch(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute(
                    "UPDATE sessions SET last_seen = ? WHERE key = ? AND last_seen < ?",
                    (last_seen, key, last_seen),
                )

        await self._run(touch)
        return touched

    async def _delete_keys(self, keys: Sequence[bytes]) -> int:
        self._forget(keys)

        def delete(conn: sqlite3.Connection) -> int:
            with _transaction(conn):
                cur = conn.executemany("DELETE FROM sessions WHERE key = ?", [(k,) for k in keys])
                self._revoke(conn, keys)
                return cur.rowcount

        return await self._run(delete)

    async def delete(self, handle: str) -> None:
        """Forget the session for ``handle``; unknown or malformed handles are ignored."""
        if (key := _handle_key(handle)) is not None:
            await self._delete_keys([key])

    async def pop(self, handle: str, service: str, now: float) -> Session | None:
        """Delete the session for ``handle``; return it, raw ID token included (read from
        the file, not the cache), if it was live for ``service``."""
        key = _handle_key(handle)
        if key is None:
            return None
        self._forget([key])

        def take(conn: sqlite3.Connection) -> _Row | None:
            with _transaction(conn):
                row: _Row | None = conn.execute(
                    f"DELETE FROM sessions WHERE key = ? RETURNING {_COLUMNS}",  # noqa: S608 — constant
                    (key,),
                ).fetchone()
                self._revoke(conn, [key])
                return row

        row = await self._run(take)
        if row is None:
            return None
        try:
            session = _decode(row)
        except (ValueError, TypeError):
            return None
        return session if self._life.verdict(session, service, now) is _Verdict.LIVE else None

    async def delete_matching(
        self, *, issuer: str, sub: str | None = None, sid: str | None = None
    ) -> int:
        """Delete sessions of ``issuer`` with this ``sub`` and/or ``sid``; return how many."""
        _check_selector(sub, sid)
        where = "issuer = ?"
        params: list[str] = [issuer]
        if sub is not None:
            where += " AND sub = ?"
            params.append(sub)
        if sid is not None:
            where += " AND sid = ?"
            params.append(sid)
        return await self._delete_where(where, params, lambda e: self._cache.entry_matches(e, issuer, sub, sid))

    async def _delete_where(
        self, where: str, params: Sequence[object], doomed: Callable[[Session | _Compact], bool]
    ) -> int:
        # Drop matching cached sessions before the first await, so no request is served
        # from the cache once this call has started.
        self._forget(self._cache.keys_where(doomed))

        def delete(conn: sqlite3.Connection) -> list[bytes]:
            with _transaction(conn):
                keys = [
                    bytes(k)
                    for (k,) in conn.execute(f"SELECT key FROM sessions WHERE {where}", params)  # noqa: S608 — fixed fragments
                ]
                conn.executemany("DELETE FROM sessions WHERE key = ?", [(k,) for k in keys])
                self._revoke(conn, keys)
                return keys

        keys = await self._run(delete)
        self._forget(keys)
        return len(keys)

    async def count(self) -> int:
        """Number of stored sessions (including expired ones not yet purged)."""

        def count(conn: sqlite3.Connection) -> int:
            (n,) = conn.execute("SELECT COUNT(*) FROM sessions").fetchone()
            return int(n)

        return await self._run(count)

    async def purge_expired(self, now: float) -> int:
        """Delete idle and absolutely expired sessions, old revocation rows and abandoned
        pending logins; return how many sessions."""
        n = await self._delete_where(
            "expires <= ? OR last_seen < ?",
            [now, now - self._life.idle_timeout],
            lambda e: self._life.expired(*self._cache.entry_times(e)[1:], now),
        )

        def prune(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute("DELETE FROM revocations WHERE at < ?", (now - REVOCATION_KEEP,))
                conn.execute("DELETE FROM pending_logins WHERE created < ?", (now - PENDING_KEEP,))
                conn.execute("DELETE FROM used_marks WHERE until <= ?", (now,))

        await self._run(prune)
        return n

    async def refresh_begin(self, handle: str, now: float, lease: float) -> Session | None:
        """Take the refresh lease of ``handle``'s session (a ``refresh_leases`` row: single
        flight across the workers sharing the file) and return the session read from the file,
        not the cache (another worker may have refreshed it); None when leased or unknown."""
        key = _handle_key(handle)
        if key is None:
            return None

        def take(conn: sqlite3.Connection) -> _Row | None:
            with _transaction(conn):
                row: _Row | None = conn.execute(
                    f"SELECT {_LEAN_COLUMNS} FROM sessions WHERE key = ?", (key,)  # noqa: S608 — constant
                ).fetchone()
                if row is None:
                    return None
                taken = conn.execute(
                    "INSERT INTO refresh_leases (key, until) VALUES (?, ?) ON CONFLICT (key) "
                    "DO UPDATE SET until = excluded.until WHERE refresh_leases.until <= ?",
                    (key, until, now),
                ).rowcount
                conn.execute("DELETE FROM refresh_leases WHERE until <= ?", (now,))
                return row if taken else None

        until = now + lease
        row = await self._run(take)
        if row is None:
            return None
        if len(self._leases) >= _LEASES_MAX:
            self._leases = {k: u for k, u in self._leases.items() if u > now}
        self._leases[key] = until
        try:
            return _decode(row)
        except (ValueError, TypeError):
            await self.refresh_end(handle, None, None)
            return None

    async def refresh_end(self, handle: str, expected: str | None, renewed: Session | None) -> bool:
        """Release the lease if this worker still holds it (a late end never releases the next
        holder's); with ``renewed``, rewrite the session's renewed fields in the same
        transaction if its refresh token is still ``expected``, and tell the other workers to
        drop their cached copy (a ``revocations`` row: they read the new one through)."""
        key = _handle_key(handle)
        if key is None:
            return False
        assignments = ", ".join(f"{c} = ?" for c in RENEWED_COLUMNS)
        fields = renewed_fields(renewed) if renewed is not None else ()
        until = self._leases.pop(key, None)

        def finish(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                written = 0
                if renewed is not None:
                    written = conn.execute(
                        f"UPDATE sessions SET {assignments} WHERE key = ? AND refresh_token IS ?",  # noqa: S608 — constant names
                        (*fields, key, expected),
                    ).rowcount
                    if written:
                        self._revoke(conn, [key])
                if until is not None:  # only our own lease: its row still holds our end
                    conn.execute("DELETE FROM refresh_leases WHERE key = ? AND until = ?", (key, until))
                return bool(written)

        written = await self._run(finish)
        if written:
            self._forget([key])
        return written

    def _revoke(self, conn: sqlite3.Connection, keys: Sequence[bytes]) -> None:
        """Worker thread, inside a transaction: tell the other workers (shared mode only)."""
        if self.shared and keys:
            at = time.time()
            conn.executemany("INSERT INTO revocations (key, at) VALUES (?, ?)", [(k, at) for k in keys])

    async def put_pending(
        self, state: str, data: str, created: float, *, max_pending: int, ttl: float | None = None
    ) -> None:
        """Remember a pending login under its ``state`` (the oldest go beyond ``max_pending``;
        ``ttl`` is checked when it is taken, and abandoned rows go in :meth:`purge_expired`)."""

        def put(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute(
                    "INSERT OR REPLACE INTO pending_logins (state, data, created) VALUES (?, ?, ?)",
                    (state, data, created),
                )
                (total,) = conn.execute("SELECT COUNT(*) FROM pending_logins").fetchone()
                if int(total) > max_pending:
                    conn.execute(
                        "DELETE FROM pending_logins WHERE state IN "
                        "(SELECT state FROM pending_logins ORDER BY created ASC, state ASC LIMIT ?)",
                        (int(total) - max_pending,),
                    )

        await self._run(put)

    async def take_pending(self, state: str, now: float, ttl: float) -> str | None:
        """Consume the pending login for ``state``: its data once, then never again; None when
        unknown or older than ``ttl`` seconds. Atomic across workers (one ``DELETE ... RETURNING``)."""

        def take(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "DELETE FROM pending_logins WHERE state = ? RETURNING data, created", (state,)
            ).fetchone()
            if row is None or not isinstance(row[0], str) or not isinstance(row[1], int | float):
                return None
            return row[0] if now - float(row[1]) <= ttl else None

        return await self._run(take)

    async def first_use(self, kind: str, key: str, now: float, until: float) -> bool:
        """Mark ``key`` used until ``until`` (a ``used_marks`` row, seen by every worker);
        False when it already is. At most ``max_used`` rows: beyond, those nearest their end go
        (expired ones also go in :meth:`purge_expired`)."""
        mark = _used_key(kind, key)
        keep = min(until, now + USED_KEEP_MAX)
        limit = self._max_used

        def mark_used(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                conn.execute("DELETE FROM used_marks WHERE key = ? AND until <= ?", (mark, now))
                if not conn.execute("INSERT OR IGNORE INTO used_marks (key, until) VALUES (?, ?)",
                                    (mark, keep)).rowcount:
                    return False
                (total,) = conn.execute("SELECT COUNT(*) FROM used_marks").fetchone()
                if int(total) > limit:
                    conn.execute(
                        "DELETE FROM used_marks WHERE key IN (SELECT key FROM used_marks WHERE key != ? "
                        "ORDER BY until ASC, key ASC LIMIT ?)",
                        (mark, int(total) - limit),
                    )
                return True

        return await self._run(mark_used)

    async def was_used(self, kind: str, key: str, now: float) -> bool:
        """Whether ``key`` has a ``used_marks`` row that has not ended at ``now``."""
        mark = _used_key(kind, key)

        def look(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT 1 FROM used_marks WHERE key = ? AND until > ?", (mark, now)).fetchone()
            return row is not None

        return await self._run(look)

    async def close(self) -> None:
        """Close the connection and stop the worker thread."""

        def close(conn: sqlite3.Connection) -> None:
            conn.close()
            self._conn = None

        if self._conn is not None:
            await self._run(close)
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        self._cache.clear()
        self._executor.shutdown(wait=False)
