"""Sessions: the record of a signed-in user, the store seam, the lifetime rules, the memory store.

:class:`SessionStore` is the seam; :class:`MemorySessionStore` (tests, single process, lost on
restart) implements it here and :class:`enforcer.identity.sqlite.SQLiteSessionStore` (the
default, survives a daemon restart) on disk. Stores key sessions by ``SHA-256(handle)`` and
never keep the handle itself, so a leaked database file or memory dump does not hand out live
cookies.

A refresh (claims renewed with a refresh token) holds a short per-session lease taken with
:meth:`SessionStore.refresh_begin` and writes the renewed session with
:meth:`SessionStore.refresh_end`; :func:`renewed_fields` says what such a write changes.

Lifetime rules shared by both stores (conformance S-LT-01..05): a session dies when
``now - last_seen > idle_timeout`` or ``now >= expires``; ``last_seen`` slides forward at most
once per ``touch_interval`` (reads do not write on every request) and sliding never moves the
end of a session past ``expires``. A session is bound to its service (S-ID-05).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

from enforcer.errors import EnforcerError, Reason
from enforcer.identity.cookies import _HANDLE_RE, HANDLE_LENGTH, new_handle

# --------------------------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in browser user of one service. Times are unix seconds."""

    service: str
    """The service (host) this session was created for; it is valid nowhere else."""
    issuer: str
    sub: str
    email: str | None
    username: str | None
    tags: frozenset[str]
    """Identity tags the policy matches (e.g. ``email=bob@example.com``)."""
    sid: str | None
    """IdP session id, for back-channel logout by ``sid``."""
    id_token: str
    """Raw ID token; needed only as ``id_token_hint`` for RP-initiated logout, so
    :meth:`SessionStore.pop` returns it but the SQLite store's ``get`` may not (``""``):
    its cache keeps sessions without it (about 1 KiB each, half of a cached session)."""
    created: float
    last_seen: float
    """Last recorded activity; moves forward at most once per ``touch_interval``."""
    expires: float
    """Absolute end of the session, whatever the activity (S-LT-02)."""
    refresh_token: str | None = None
    claims_expire: float | None = None


class SessionStoreError(EnforcerError):
    """The session store cannot be used as configured (e.g. written by a newer enforcer)."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.SESSION_STORE_ERROR, 503, message)


class SessionStore(Protocol):
    """Server-side sessions keyed by an opaque handle that only the browser holds."""

    async def create(self, session: Session) -> str:
        """Store ``session`` under a new random handle and return that handle."""
        ...

    def get_cached(self, handle: str, service: str, now: float) -> Session | None:
        """The hot path of :meth:`get` without a coroutine: the session when the store can
        answer at once that it is live for ``service`` and no ``last_seen`` write is due;
        otherwise None, and the caller must ask :meth:`get`."""
        ...

    async def get(self, handle: str, service: str, now: float) -> Session | None:
        """The live session for ``handle`` on ``service``, or None (unknown, malformed,
        other service, idle or absolutely expired). May slide ``last_seen``."""
        ...

    async def delete(self, handle: str) -> None:
        """Forget the session for ``handle`` (logout); unknown handles are ignored."""
        ...

    async def pop(self, handle: str, service: str, now: float) -> Session | None:
        """Logout: delete the session for ``handle`` (whatever its state) and return it whole,
        raw ID token included, if it was live for ``service``."""
        ...

    async def delete_matching(
        self, *, issuer: str, sub: str | None = None, sid: str | None = None
    ) -> int:
        """Back-channel logout: delete sessions of ``issuer`` matching ``sub`` and/or ``sid``."""
        ...

    async def count(self) -> int:
        """Number of stored sessions (including expired ones not yet purged)."""
        ...

    async def purge_expired(self, now: float) -> int:
        """Delete idle and absolutely expired sessions; return how many."""
        ...

    async def refresh_begin(self, handle: str, now: float, lease: float) -> Session | None:
        """Take the refresh lease of the session for ``handle`` for ``lease`` seconds (one
        refresh at a time across every worker and enforcer sharing the store) and return the
        session as stored, sealed refresh token included; None when another holds the lease
        or there is no such session."""
        ...

    async def refresh_end(self, handle: str, expected: str | None, renewed: Session | None) -> bool:
        """Release the refresh lease; first, with ``renewed``, store its claims, ID token,
        refresh token and ``claims_expire`` in one atomic write -- only if the stored refresh
        token is still ``expected`` -- and drop every cached copy. True when written."""
        ...

    async def first_use(self, kind: str, key: str, now: float, until: float) -> bool:
        """Mark ``key`` (of ``kind``: e.g. ``logout`` for a logout token's issuer, client and
        ``jti``) as used until ``until``: True the first time, False while it is marked (a
        replay), across every worker and enforcer sharing the store. The marks are bounded."""
        ...

    async def was_used(self, kind: str, key: str, now: float) -> bool:
        """Whether ``key`` is marked used (:meth:`first_use`) at ``now``; changes nothing."""
        ...

    def retain_services(self, services: frozenset[str]) -> int:
        """After a reload: let go of in-process state kept for services no longer defined;
        return how many cached sessions were dropped (stored ones expire as usual)."""
        ...

    async def close(self) -> None:
        """Release resources; the store is unusable afterwards."""
        ...


@runtime_checkable
class FleetStore(Protocol):
    """A store that several enforcers share (:class:`enforcer.identity.redis.RedisSessionStore`):
    its watcher applies the others' revocations, and it can be unreachable (``problem``)."""

    problem: str | None

    async def watch(self) -> None:
        """Follow the other enforcers' revocations until cancelled."""
        ...

    async def put_pending(
        self, state: str, data: str, created: float, *, max_pending: int, ttl: float | None = None
    ) -> None:
        """Keep a pending login where every enforcer can take it (the callback may land
        elsewhere), for ``ttl`` seconds (the login timeout), at most ``max_pending`` fleet-wide."""
        ...

    async def take_pending(self, state: str, now: float, ttl: float) -> str | None:
        """Take a pending login once, fleet-wide."""
        ...


USED_MAX: Final = 100_000
"""Most replay marks (:meth:`SessionStore.first_use`) the memory and SQLite stores keep;
beyond it those nearest their end go first (Redis keeps each until its own TTL)."""

USED_KEEP_MAX: Final = 86_400.0
"""Longest a replay mark is kept, whatever ``until`` the caller asks for."""


def _used_key(kind: str, key: str) -> bytes:
    """What a replay mark is stored under: SHA-256 of ``kind`` and ``key`` (never the key itself)."""
    return hashlib.sha256(f"{kind}\x00{key}".encode("utf-8", "surrogatepass")).digest()


class LogoutOwed(EnforcerError):
    """:meth:`SessionStore.pop` could not reach a shared store: the store already refuses the
    session in this process and sends the deletion when it answers again (fail closed, the
    logout is not lost); the caller clears the cookie and says so."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.SESSION_STORE_UNAVAILABLE, 503, message)


def _handle_key(handle: str) -> bytes | None:
    """SHA-256 of a well-formed handle, or None. Shape first: junk is never hashed."""
    if len(handle) != HANDLE_LENGTH or not _HANDLE_RE.fullmatch(handle):
        return None
    return hashlib.sha256(handle.encode("ascii")).digest()


class _Verdict(enum.Enum):
    LIVE = "live"
    EXPIRED = "expired"
    WRONG_SERVICE = "wrong_service"


@dataclass(frozen=True, slots=True)
class _Lifetime:
    """The timing rules both stores apply, in one place."""

    idle_timeout: float
    touch_interval: float

    @classmethod
    def make(cls, idle_timeout: float, touch_interval: float) -> _Lifetime:
        if idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be > 0, got {idle_timeout}")
        if touch_interval < 0:
            raise ValueError(f"touch_interval must be >= 0, got {touch_interval}")
        # A touch interval near the idle timeout would let active users time out.
        return cls(idle_timeout, min(touch_interval, idle_timeout / 2))

    def expired(self, last_seen: float, expires: float, now: float) -> bool:
        return now >= expires or now - last_seen > self.idle_timeout

    def verdict(self, session: Session, service: str, now: float) -> _Verdict:
        if now >= session.expires or now - session.last_seen > self.idle_timeout:
            return _Verdict.EXPIRED
        if session.service != service:
            return _Verdict.WRONG_SERVICE
        return _Verdict.LIVE

    def touched(self, session: Session, now: float) -> Session | None:
        """The session with ``last_seen`` slid to ``now``, or None if no write is due.

        Only forward (a clock stepping back never rewinds it) and never past ``expires``,
        so the session still ends at ``expires`` however active the user is.
        """
        if now - session.last_seen < self.touch_interval:
            return None
        new_last_seen = min(now, session.expires)
        if new_last_seen <= session.last_seen:
            return None
        return dataclasses.replace(session, last_seen=new_last_seen)


def renewed_fields(session: Session) -> tuple[object, ...]:
    """What a refresh changes of a stored session, in :data:`RENEWED_COLUMNS` order."""
    return (json.dumps(sorted(session.tags)), session.email, session.username, session.id_token,
            session.refresh_token, session.claims_expire)


RENEWED_COLUMNS = ("tags", "email", "username", "id_token", "refresh_token", "claims_expire")
"""The stored fields a refresh rewrites (``sid`` stays: the back-channel logout index keys on it)."""


def _check_max_sessions(max_sessions: int) -> None:
    if max_sessions < 1:
        raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")


def _matches(session: Session, issuer: str, sub: str | None, sid: str | None) -> bool:
    return (
        session.issuer == issuer
        and (sub is None or session.sub == sub)
        and (sid is None or session.sid == sid)
    )


def _check_selector(sub: str | None, sid: str | None) -> None:
    if sub is None and sid is None:
        # Deleting every session of an issuer is never what a logout token asks for.
        raise ValueError("delete_matching needs sub or sid")


class MemorySessionStore:
    """Sessions in a dict: for tests and single-process setups that accept logout on restart.

    Beyond ``max_sessions`` the least-recently-seen session is evicted (entries are kept in
    touch order, so eviction is O(1)).
    """

    def __init__(
        self, *, idle_timeout: float, touch_interval: float = 60.0, max_sessions: int = 100_000,
        max_used: int = USED_MAX,
    ) -> None:
        _check_max_sessions(max_sessions)
        self._max_used = max(1, max_used)
        self._life = _Lifetime.make(idle_timeout, touch_interval)
        self._max = max_sessions
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()
        self._leases: dict[bytes, float] = {}
        self._used: OrderedDict[bytes, float] = OrderedDict()
        """Replay marks -> until, oldest first (:meth:`first_use`)."""

    async def create(self, session: Session) -> str:
        """Store ``session`` under a new random handle and return that handle."""
        handle = new_handle()
        key = _handle_key(handle)
        assert key is not None
        self._sessions[key] = session
        while len(self._sessions) > self._max:
            self._sessions.popitem(last=False)
        return handle

    def get_cached(self, handle: str, service: str, now: float) -> Session | None:
        """The session when it is live for ``service`` and no ``last_seen`` write is due;
        otherwise None (then :meth:`get` decides expiry, wrong service and the touch)."""
        key = _handle_key(handle)
        if key is None or (session := self._sessions.get(key)) is None:
            return None
        life = self._life
        if life.verdict(session, service, now) is not _Verdict.LIVE or life.touched(session, now) is not None:
            return None
        return session

    async def get(self, handle: str, service: str, now: float) -> Session | None:
        """The live session for ``handle`` on ``service``, or None; slides ``last_seen``."""
        key = _handle_key(handle)
        if key is None or (session := self._sessions.get(key)) is None:
            return None
        match self._life.verdict(session, service, now):
            case _Verdict.EXPIRED:
                del self._sessions[key]
                return None
            case _Verdict.WRONG_SERVICE:
                return None
            case _Verdict.LIVE:
                if (touched := self._life.touched(session, now)) is not None:
                    session = touched
                    self._sessions[key] = session
                    self._sessions.move_to_end(key)
                return session

    async def delete(self, handle: str) -> None:
        """Forget the session for ``handle``; unknown or malformed handles are ignored."""
        if (key := _handle_key(handle)) is not None:
            self._sessions.pop(key, None)

    async def pop(self, handle: str, service: str, now: float) -> Session | None:
        """Delete the session for ``handle``; return it if it was live for ``service``."""
        session = await self.get(handle, service, now)
        await self.delete(handle)
        return session

    async def delete_matching(
        self, *, issuer: str, sub: str | None = None, sid: str | None = None
    ) -> int:
        """Delete sessions of ``issuer`` with this ``sub`` and/or ``sid``; return how many."""
        _check_selector(sub, sid)
        doomed = [k for k, s in self._sessions.items() if _matches(s, issuer, sub, sid)]
        for key in doomed:
            del self._sessions[key]
        return len(doomed)

    async def count(self) -> int:
        """Number of stored sessions."""
        return len(self._sessions)

    async def purge_expired(self, now: float) -> int:
        """Delete idle and absolutely expired sessions; return how many."""
        doomed = [
            k
            for k, s in self._sessions.items()
            if self._life.verdict(s, s.service, now) is _Verdict.EXPIRED
        ]
        for key in doomed:
            del self._sessions[key]
        self._used = OrderedDict((k, t) for k, t in self._used.items() if t > now)
        return len(doomed)

    async def refresh_begin(self, handle: str, now: float, lease: float) -> Session | None:
        """Take the refresh lease of ``handle``'s session; the session, or None (leased, unknown)."""
        key = _handle_key(handle)
        if key is None or (session := self._sessions.get(key)) is None:
            return None
        if self._leases.get(key, float("-inf")) > now:
            return None
        if len(self._leases) >= self._max:
            self._leases = {k: t for k, t in self._leases.items() if t > now}
        self._leases[key] = now + lease
        return session

    async def refresh_end(self, handle: str, expected: str | None, renewed: Session | None) -> bool:
        """Release the lease; store ``renewed`` if the stored refresh token is still ``expected``."""
        key = _handle_key(handle)
        if key is None:
            return False
        self._leases.pop(key, None)
        current = self._sessions.get(key)
        if renewed is None or current is None or current.refresh_token != expected:
            return False
        self._sessions[key] = dataclasses.replace(
            current, tags=renewed.tags, email=renewed.email, username=renewed.username,
            id_token=renewed.id_token, refresh_token=renewed.refresh_token, claims_expire=renewed.claims_expire,
        )
        return True

    async def first_use(self, kind: str, key: str, now: float, until: float) -> bool:
        """Mark ``key`` used until ``until`` (at most :data:`USED_KEEP_MAX`); False when it
        already is. At most ``max_used`` marks: beyond, the oldest go."""
        mark = _used_key(kind, key)
        if self._used.get(mark, float("-inf")) > now:
            return False
        self._used.pop(mark, None)
        while len(self._used) >= self._max_used:
            self._used.popitem(last=False)
        self._used[mark] = min(until, now + USED_KEEP_MAX)
        return True

    async def was_used(self, kind: str, key: str, now: float) -> bool:
        """Whether ``key`` is marked used at ``now``."""
        return self._used.get(_used_key(kind, key), float("-inf")) > now

    def retain_services(self, services: frozenset[str]) -> int:
        """Nothing to let go: the memory store interns nothing per service (its sessions are the store)."""
        return 0

    async def close(self) -> None:
        """Drop every session."""
        self._sessions.clear()

