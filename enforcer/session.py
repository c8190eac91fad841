"""Session handle cookie <-> server-side session: the one place that knows who a cookie belongs to.

Two halves:

* **Cookies** (pure): strict parsing of the ``Cookie`` request header (:func:`find_cookie`),
  removal of our cookies before proxying (:func:`strip_cookies`) and the ``Set-Cookie``
  values we emit (:func:`set_cookie_header`, :func:`clear_cookie_header`). The session cookie
  carries only an opaque handle: ``secrets.token_urlsafe(32)``, 256 bits from the CSPRNG.
* **Stores** (I/O): :class:`SessionStore` is the seam; :class:`MemorySessionStore` (tests,
  single process, lost on restart) and :class:`SQLiteSessionStore` (the default, survives a
  daemon restart). Stores key sessions by ``SHA-256(handle)`` and never keep the handle itself,
  so a leaked database file or memory dump does not hand out live cookies.

Lifetime rules shared by both stores (conformance S-LT-01..05): a session dies when
``now - last_seen > idle_timeout`` or ``now >= expires``; ``last_seen`` slides forward at most
once per ``touch_interval`` (reads do not write on every request) and sliding never moves the
end of a session past ``expires``. A session is bound to its service (S-ID-05).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import os
import re
import secrets
import sqlite3
import stat
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypeVar

__all__ = [
    "COOKIE_PREFIX",
    "ENFORCER_COOKIE_PREFIX",
    "CookieLookup",
    "MemorySessionStore",
    "SQLiteSessionStore",
    "Session",
    "SessionStore",
    "SessionStoreError",
    "clear_cookie_header",
    "find_cookie",
    "is_enforcer_cookie",
    "new_handle",
    "session_cookie_name",
    "set_cookie_header",
    "strip_cookies",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# --------------------------------------------------------------------------------------------
# Cookies
# --------------------------------------------------------------------------------------------

COOKIE_PREFIX: Final = "__Host-"
"""Browsers accept a ``__Host-`` cookie only if Secure, Path=/ and without Domain (RFC 6265bis
§4.1.3.2), so a sibling host cannot toss a cookie with this name at us (S-CK-03)."""

ENFORCER_COOKIE_PREFIX: Final = COOKIE_PREFIX + "enforcer-"
"""Every cookie the enforcer sets starts with this; none of them is ever forwarded upstream."""

HANDLE_BYTES: Final = 32
"""Entropy of a session handle: 256 bits (S-ID-01 asks for at least 128)."""

HANDLE_LENGTH: Final = 43
"""``len(secrets.token_urlsafe(32))``: base64url without padding."""

_HANDLE_RE: Final = re.compile(r"[A-Za-z0-9_-]{43}")
"""Exact shape of a handle; checked before hashing so junk is rejected cheaply (S-ID-03)."""

_CTL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")
"""Control characters: a pair containing one is malformed, wherever it appears."""

_OWS: Final = " \t"
"""Optional whitespace around a cookie pair (RFC 6265bis §5.6); nothing else is trimmed."""

_SPACE_RE: Final = re.compile(r"\s")
"""Any character ``str.isspace`` accepts (``\\s`` on str patterns is Py_UNICODE_ISSPACE)."""

_COOKIE_VALUE_RE: Final = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
"""RFC 6265 ``cookie-octet``: what we are willing to put in a value we emit."""

_COOKIE_NAME_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""RFC 9110 ``token``: what we are willing to use as a cookie name we emit."""


def session_cookie_name(service: str) -> str:
    """Name of the session cookie for ``service``: ``__Host-enforcer-<service>``."""
    return f"{ENFORCER_COOKIE_PREFIX}{service}"


def is_enforcer_cookie(name: str) -> bool:
    """True for any case variant of our cookie prefix (what :func:`strip_cookies` drops)."""
    return name[: len(ENFORCER_COOKIE_PREFIX)].lower() == ENFORCER_COOKIE_PREFIX.lower()


def new_handle() -> str:
    """A fresh session handle: 256 bits from the CSPRNG, 43 URL-safe characters."""
    return secrets.token_urlsafe(HANDLE_BYTES)


class CookieLookup(enum.Enum):
    """Outcome of looking up one cookie name in the ``Cookie`` request header(s)."""

    ABSENT = "absent"
    """No well-formed pair with that name, or the header was over our limits."""
    FOUND = "found"
    """Exactly one value."""
    AMBIGUOUS = "ambiguous"
    """Two or more values: the caller treats the request as unauthenticated (S-CK-04)."""


def _pieces(cookie_headers: Iterable[str]) -> Iterable[str]:
    """Non-empty ``;``-separated pieces of every header line, OWS-trimmed, in order."""
    for header in cookie_headers:
        for raw in header.split(";"):
            piece = raw.strip(_OWS)
            if piece:
                yield piece


def _split_pair(piece: str) -> tuple[str, str] | None:
    """``name=value`` from one piece, or None if malformed (no ``=``, empty name, CTL, spaces).

    Malformed pieces are never interpreted: a lenient parser elsewhere must not be able to
    read a name out of something we considered nameless.
    """
    name, eq, value = piece.partition("=")
    name = name.rstrip(_OWS)
    if not eq or not name or _CTL_RE.search(piece) or _SPACE_RE.search(name):
        return None
    return name, value.lstrip(_OWS)


def find_cookie(
    cookie_headers: Sequence[str],
    name: str,
    *,
    max_total: int = 8192,
    max_count: int = 100,
) -> tuple[CookieLookup, str | None]:
    """Find the single value of cookie ``name`` (exact, case-sensitive) across all lines.

    Over ``max_total`` bytes or ``max_count`` pairs the cookies are ignored (ABSENT), so a
    huge header costs nothing more than measuring it. Malformed pairs are skipped. Never raises.
    """
    total = 0
    for header in cookie_headers:
        total += len(header.encode("utf-8", "surrogatepass"))
        if total > max_total:
            return CookieLookup.ABSENT, None
    found: str | None = None
    count = 0
    for piece in _pieces(cookie_headers):
        count += 1
        if count > max_count:
            return CookieLookup.ABSENT, None
        pair = _split_pair(piece)
        if pair is None or pair[0] != name:
            continue
        if found is not None:
            return CookieLookup.AMBIGUOUS, None
        found = pair[1]
    if found is None:
        return CookieLookup.ABSENT, None
    return CookieLookup.FOUND, found


def strip_cookies(cookie_headers: Sequence[str], drop: Callable[[str], bool]) -> str | None:
    """One ``Cookie`` header value without the pairs whose name satisfies ``drop``.

    Kept pairs are copied byte-exact (minus surrounding OWS) and joined with ``"; "``.
    Malformed pieces are dropped too: the app never sees something we did not parse.
    Returns None when nothing is left (the caller then sends no ``Cookie`` header).
    """
    kept = [
        piece
        for piece in _pieces(cookie_headers)
        if (pair := _split_pair(piece)) is not None and not drop(pair[0])
    ]
    return "; ".join(kept) if kept else None


def _cookie_attributes(name: str, value: str) -> str:
    if not name.startswith(COOKIE_PREFIX) or not _COOKIE_NAME_RE.fullmatch(name):
        raise ValueError(f"cookie name must be a token starting with {COOKIE_PREFIX!r}: {name!r}")
    if not _COOKIE_VALUE_RE.fullmatch(value):
        raise ValueError("cookie value contains characters outside RFC 6265 cookie-octet")
    # __Host- requires Secure + Path=/ and forbids Domain; HttpOnly keeps the handle away
    # from scripts; Lax still sends it on the top-level navigation back from the IdP.
    return f"{name}={value}; Path=/; Secure; HttpOnly; SameSite=Lax"


def set_cookie_header(name: str, value: str, *, max_age: int | None) -> str:
    """``Set-Cookie`` value for one of our ``__Host-`` cookies (S-CK-01); never a Domain.

    ``max_age=None`` makes a browser-session cookie; otherwise pass at most the remaining
    absolute lifetime of the session.
    """
    header = _cookie_attributes(name, value)
    if max_age is not None:
        if max_age < 0:
            raise ValueError(f"max_age must be >= 0, got {max_age}")
        header += f"; Max-Age={max_age}"
    return header


def clear_cookie_header(name: str) -> str:
    """``Set-Cookie`` value that deletes one of our cookies (same attributes, Max-Age=0)."""
    return _cookie_attributes(name, "") + "; Max-Age=0"


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


class SessionStoreError(Exception):
    """The session store cannot be used as configured (e.g. written by a newer enforcer)."""

    code = "session_store"


class SessionStore(Protocol):
    """Server-side sessions keyed by an opaque handle that only the browser holds."""

    async def create(self, session: Session) -> str:
        """Store ``session`` under a new random handle and return that handle."""
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

    async def close(self) -> None:
        """Release resources; the store is unusable afterwards."""
        ...


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
        self, *, idle_timeout: float, touch_interval: float = 60.0, max_sessions: int = 100_000
    ) -> None:
        _check_max_sessions(max_sessions)
        self._life = _Lifetime.make(idle_timeout, touch_interval)
        self._max = max_sessions
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()

    async def create(self, session: Session) -> str:
        """Store ``session`` under a new random handle and return that handle."""
        handle = new_handle()
        key = _handle_key(handle)
        assert key is not None
        self._sessions[key] = session
        while len(self._sessions) > self._max:
            self._sessions.popitem(last=False)
        return handle

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
        return len(doomed)

    async def close(self) -> None:
        """Drop every session."""
        self._sessions.clear()


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
"""

PAGE_CACHE_KIB: Final = 256
"""SQLite's page cache of the store's connection (its default is 2 MiB). Hot sessions are
served from our own cache, so SQLite only sees misses and writes; the B-tree's inner pages
stay cached and a leaf it has to re-read comes from the OS page cache (one ``pread``)."""

PENDING_KEEP: Final = 3600.0
"""Seconds after which an abandoned pending login row is removed (the TTL check is separate)."""

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


_Compact = bytes
"""A cold cache entry, one bytes object: :data:`_HEAD` (created, last_seen, expires,
claims_expire, flags, and the index of the (service, issuer) pair in :data:`_PAIRS`), then
sub, email, username, sid, refresh token and the tags, joined by NUL and UTF-8 encoded (an
absent optional value is a lone SOH). Tags that repeat a field (``sub=<sub>``,
``email=<email>``, ``iss=<issuer>``, ``preferred_username=<username>``: most users have all
four) are a flag bit each instead of text, and tags that several users have (``groups=staff``,
``aud=<client>``, ``email_verified=true``) are a reference into :data:`_SHARED` instead of
text: one last field, STX followed by one character per shared tag. One object instead of a
Session, its frozenset (~730 bytes for 9 tags) and a dozen small strings and floats: a
typical cold entry is ~180 bytes, not ~3.3 KB (and ~500 as the tuple of a str and four floats
it used to be)."""

_HEAD: Final = struct.Struct("<ddddBH")
_SEP: Final = "\x00"
_NONE: Final = "\x01"
_REF: Final = "\x02"
_REF_BASE: Final = 0x80
_SHARED: list[str] = []
"""Tags that more than one cold entry has, by index (an entry refers to ``chr(_REF_BASE + i)``)."""
_SHARED_INDEX: dict[str, int] = {}
_MAX_SHARED: Final = 4096
"""At most this many shared tags (~0.5 MB at worst); beyond it new ones stay inline."""
_CANDIDATES: dict[str, str] = {}
"""Tags seen in the cold entries of one user (the value: its sub) since the last reset: a
sighting with another user makes one shared."""
_MAX_CANDIDATES: Final = 2048
"""Candidates kept at most; then the set starts afresh (a tag that many users have is seen
twice long before that, one unique to a user -- a name -- never becomes shared)."""
_PAIRS: list[tuple[str, str]] = []
"""(service, issuer) pairs of compact entries, by index (a handful: one per service and IdP)."""
_PAIR_INDEX: dict[tuple[str, str], int] = {}
_MAX_PAIRS: Final = 0xFFFF

HOT_SESSIONS: Final = 256
"""Cached sessions kept as ready Session objects (the most recently used ones); the rest of
the cache holds :data:`_Compact` entries, turned back into a Session on their next use.
A hot session costs ~3.3 KB (its frozenset of tags alone ~1.2 KB), a cold one ~0.3 KB plus
~3 us to expand on its next use: 256 keeps a busy site's active users hot for 0.8 MiB."""


def _pair(service: str, issuer: str) -> int | None:
    """The index of (service, issuer) in :data:`_PAIRS`, added when new; None when full."""
    key = (service, issuer)
    i = _PAIR_INDEX.get(key)
    if i is None:
        if len(_PAIRS) >= _MAX_PAIRS:
            return None
        i = _PAIR_INDEX[key] = len(_PAIRS)
        _PAIRS.append((sys.intern(service), sys.intern(issuer)))
    return i


_HAS_CE: Final = 1
"""Flag: claims_expire is set (else the packed value is a placeholder)."""
_DERIVED: Final = (
    (2, "sub=", 2),  # (flag, tag prefix, index of the field in (service, issuer, sub, email, username))
    (4, "email=", 3),
    (8, "iss=", 1),
    (16, "preferred_username=", 4),
)
"""Tags that are a prefix plus a field of the session, stored as a flag bit instead of text."""


def _shared_ref(tag: str, sub: str) -> str | None:
    """The reference character of ``tag`` if it is (or has just become) shared, else None.
    ``sub`` is the user the tag was seen with: only a second *user* makes a tag shared (the
    same session is compacted again after every touch)."""
    i = _SHARED_INDEX.get(tag)
    if i is None:
        first = _CANDIDATES.get(tag)
        if first is None or first == sub:
            if first is None and len(_CANDIDATES) >= _MAX_CANDIDATES:
                _CANDIDATES.clear()
            _CANDIDATES[tag] = sub
            return None
        if len(_SHARED) >= _MAX_SHARED:
            return None
        del _CANDIDATES[tag]
        i = _SHARED_INDEX[tag] = len(_SHARED)
        _SHARED.append(sys.intern(tag))
    return chr(_REF_BASE + i)


def _derived_tags(flags: int, fields: tuple[str, str, str, str | None, str | None]) -> list[str]:
    return [prefix + str(fields[i]) for bit, prefix, i in _DERIVED if flags & bit]


def _compact(s: Session) -> _Compact | None:
    """The cold form of a lean session, or None when it cannot be represented exactly."""
    opt = (s.email, s.username, s.sid, s.refresh_token)
    fields = (s.service, s.issuer, s.sub, s.email, s.username)
    flags = 0 if s.claims_expire is None else _HAS_CE
    tags = set(s.tags)
    for bit, prefix, i in _DERIVED:
        value = fields[i]
        if value is not None and (tag := prefix + value) in tags:
            tags.discard(tag)
            flags |= bit
    inline: list[str] = []
    refs: list[str] = []
    for tag in tags:
        ref = _shared_ref(tag, s.sub)
        if ref is None:
            inline.append(tag)
        else:
            refs.append(ref)
    parts = [s.sub, *(_NONE if v is None else v for v in opt), *inline]
    if s.id_token or _NONE in opt or any(_SEP in p for p in parts) or any(t[:1] == _REF for t in inline):
        return None
    if refs:
        parts.append(_REF + "".join(refs))
    pair = _pair(s.service, s.issuer)
    if pair is None:
        return None
    ce = s.claims_expire
    head = _HEAD.pack(s.created, s.last_seen, s.expires, 0.0 if ce is None else ce, flags, pair)
    return head + _SEP.join(parts).encode("utf-8", "surrogatepass")


_NEW: Final = object.__new__
_SET: Final = tuple(Session.__dict__[f.name].__set__ for f in dataclasses.fields(Session))
"""The slot setters of Session in field order: :func:`_expand` fills a new Session with
them, twice as fast as its frozen ``__init__`` (one ``object.__setattr__`` call per field)."""


def _expand(c: _Compact) -> Session:
    """The Session a :func:`_compact` entry stands for (equal to the one it was made from)."""
    created, last_seen, expires, ce, flags, pair = _HEAD.unpack_from(c)
    service, issuer = _PAIRS[pair]
    sub, email, username, sid, refresh_token, *tags = c[_HEAD.size :].decode("utf-8", "surrogatepass").split(_SEP)
    email_v = None if email == _NONE else email
    username_v = None if username == _NONE else username
    if tags and tags[-1][:1] == _REF:
        shared = _SHARED
        tags += [shared[ord(c) - _REF_BASE] for c in tags.pop()[1:]]
    if flags > _HAS_CE:
        tags += _derived_tags(flags, (service, issuer, sub, email_v, username_v))
    s: Session = _NEW(Session)
    st = _SET
    st[0](s, service)
    st[1](s, issuer)
    st[2](s, sub)
    st[3](s, email_v)
    st[4](s, username_v)
    st[5](s, frozenset(tags))
    st[6](s, None if sid == _NONE else sid)
    st[7](s, "")
    st[8](s, created)
    st[9](s, last_seen)
    st[10](s, expires)
    st[11](s, None if refresh_token == _NONE else refresh_token)
    st[12](s, ce if flags & _HAS_CE else None)
    return s


def _entry_times(e: Session | _Compact) -> tuple[str, float, float]:
    """(service, last_seen, expires) of a cache entry, without expanding a cold one."""
    if type(e) is bytes:
        _, last_seen, expires, _, _, pair = _HEAD.unpack_from(e)
        return _PAIRS[pair][0], last_seen, expires
    assert isinstance(e, Session)
    return e.service, e.last_seen, e.expires


def _entry_matches(e: Session | _Compact, issuer: str, sub: str | None, sid: str | None) -> bool:
    if type(e) is bytes:
        if _PAIRS[_HEAD.unpack_from(e)[5]][1] != issuer:
            return False
        e = _expand(e)
    assert isinstance(e, Session)
    return _matches(e, issuer, sub, sid)


_REBUILD_AFTER: Final = 1024
"""Evictions after which :class:`_SessionCache` copies its entries dict to drop the holes."""


class _SessionCache:
    """The SQLite store's bounded cache of lean sessions (at most ``size``), in two tiers: the
    :data:`HOT_SESSIONS` most recently used as Session objects (a hit costs what a dict
    lookup costs), the others compact (:func:`_compact`; expanded again on their next use,
    ~3 us).

    Eviction is least recently used, approximated the way CLOCK does it: ``_entries`` is a
    plain dict in insertion order, and an entry moves to its young end when it is added or a
    cold one is used again; a hit on a hot entry only reorders the small hot tier. When the
    cache is full the oldest entry goes, unless it is hot (used since it got there): then it
    gets a second chance at the young end. So no hit rewrites the big dict, which therefore
    stays a plain dict: ~30-60 bytes an entry instead of an OrderedDict's ~75-120 (its linked
    list and node index). Each eviction leaves a hole at the dict's old end that finding the
    next oldest walks past, so after :data:`_REBUILD_AFTER` of them the dict is copied afresh
    (~0.3 ms for 10,000 entries: ~0.3 us an eviction, where the walk would grow to ~15 us)."""

    __slots__ = ("_entries", "_holes", "_hot", "_hot_size", "_size")

    def __init__(self, size: int, hot_size: int = HOT_SESSIONS) -> None:
        self._size = size
        self._hot_size = max(1, hot_size)
        self._entries: dict[bytes, Session | _Compact] = {}
        self._holes = 0
        # keys held as Session, LRU order -> their compact form (None: make it when demoted)
        self._hot: OrderedDict[bytes, _Compact | None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def peek(self, key: bytes) -> Session | None:
        """The cached session; a cold one is expanded, made hot and moved to the young end."""
        entries = self._entries
        e = entries.get(key)
        if e is None or type(e) is Session:
            return e
        assert type(e) is bytes
        session = _expand(e)
        self._to_young_end(key, session, e)
        return session

    def refresh(self, key: bytes) -> None:
        """Mark ``key`` as just used (it must be cached)."""
        hot = self._hot
        if key in hot:
            hot.move_to_end(key)
        elif (e := self._entries.get(key)) is not None:
            # a whole Session outside the hot tier (one _compact cannot represent): it has
            # no cold form to come back from, so it moves to the young end here and is hot again
            self._to_young_end(key, e)

    def put(self, key: bytes, session: Session) -> None:
        """Cache ``session`` (a lean copy) as the most recently used entry; evicts when full."""
        self._to_young_end(key, session)
        if len(self._entries) > self._size:
            self._evict(key)

    def _to_young_end(self, key: bytes, value: Session | _Compact, compact: _Compact | None = None) -> None:
        """``value`` under ``key`` at the young end of the entries, and hot (``compact``: its
        cold form, if known)."""
        entries = self._entries
        entries.pop(key, None)
        entries[key] = value
        self._heat(key, compact)

    def _evict(self, newest: bytes) -> None:
        """Drop the oldest entries down to ``size``; a hot one (except ``newest``) is moved to
        the young end instead, once each (at most the hot tier's size of them per call)."""
        entries, hot = self._entries, self._hot
        chances = len(hot)
        while len(entries) > self._size:
            old = next(iter(entries))
            e = entries.pop(old)
            self._holes += 1
            if old == newest:  # (only when every other entry went round once)
                entries[old] = e
                continue
            if chances > 0 and old in hot:
                chances -= 1
                entries[old] = e
                continue
            hot.pop(old, None)
        if self._holes >= _REBUILD_AFTER:
            self._entries = dict(entries)
            self._holes = 0

    def replace(self, key: bytes, session: Session) -> None:
        """Update a cached entry in place (a touch); no-op when ``key`` is not cached."""
        if key in self._entries:
            self._entries[key] = session
            self._heat(key)

    def pop(self, key: bytes) -> None:
        self._entries.pop(key, None)
        self._hot.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
        self._hot.clear()

    def keys_where(self, doomed: Callable[[Session | _Compact], bool]) -> list[bytes]:
        return [k for k, e in self._entries.items() if doomed(e)]

    def _heat(self, key: bytes, compact: _Compact | None = None) -> None:
        hot = self._hot
        hot[key] = compact
        hot.move_to_end(key)
        while len(hot) > self._hot_size:
            cold, c = hot.popitem(last=False)
            e = self._entries.get(cold)
            if type(e) is Session and (c is not None or (c := _compact(e)) is not None):
                self._entries[cold] = c


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
      objects and the others in a compact form (:class:`_SessionCache`): ~0.3 KB a cached
      session instead of ~3.3 KB, for ~3 us more on the first use of a cold entry.
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
        return await self._delete_where(where, params, lambda e: _entry_matches(e, issuer, sub, sid))

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
            lambda e: self._life.expired(*_entry_times(e)[1:], now),
        )

        def prune(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute("DELETE FROM revocations WHERE at < ?", (now - REVOCATION_KEEP,))
                conn.execute("DELETE FROM pending_logins WHERE created < ?", (now - PENDING_KEEP,))

        await self._run(prune)
        return n

    def _revoke(self, conn: sqlite3.Connection, keys: Sequence[bytes]) -> None:
        """Worker thread, inside a transaction: tell the other workers (shared mode only)."""
        if self.shared and keys:
            at = time.time()
            conn.executemany("INSERT INTO revocations (key, at) VALUES (?, ?)", [(k, at) for k in keys])

    async def put_pending(self, state: str, data: str, created: float, *, max_pending: int) -> None:
        """Remember a pending login under its ``state`` (the oldest go beyond ``max_pending``)."""

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
