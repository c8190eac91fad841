"""The SQLite store's in-process session cache: a hot tier of Session objects, a compact cold tier.

Memory per cached session is the lever for sites with many live users; see PERFORMANCE.md for
the measured sizes and costs.
"""

from __future__ import annotations

import dataclasses
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from enforcer.identity.sessions import Session, _matches

_Compact = bytes
"""A cold cache entry, one bytes object: :data:`_HEAD` (times, flags, the index of the
(service, issuer) pair in the cache's :class:`TagTable`), then sub, email, username, sid,
refresh token and the tags, NUL-joined UTF-8 (SOH: absent). Tags that repeat a field are a flag
bit; tags the table shares are one last field, STX and a character each. Why: one small object
instead of a Session and its frozenset keeps many cached sessions cheap (sizes in
PERFORMANCE.md)."""

_HEAD: Final = struct.Struct("<ddddBH")
_SEP: Final = "\x00"
_NONE: Final = "\x01"
_REF: Final = "\x02"
_REF_BASE: Final = 0x80
_MAX_SHARED: Final = 4096
"""At most this many shared tags (~0.5 MB at worst); beyond it new ones stay inline."""
_MAX_CANDIDATES: Final = 2048
"""Candidates kept at most; then the set starts afresh (a tag that many users have is seen
twice long before that, one unique to a user -- a name -- never becomes shared)."""
_MAX_PAIRS: Final = 0xFFFF


class TagTable:
    """The strings cold entries refer to instead of repeating them, owned by one cache.

    ``pairs``: (service, issuer) pairs by index (a handful: one per service and IdP).
    ``shared``: tags that more than one user's cold entry has, by index (an entry refers to
    ``chr(_REF_BASE + i)``). A cache makes a fresh table when services are dropped, so nothing
    here outlives the entries that use it.
    """

    __slots__ = ("_candidates", "_pair_index", "_shared_index", "pairs", "shared")

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []
        self._pair_index: dict[tuple[str, str], int] = {}
        self.shared: list[str] = []
        self._shared_index: dict[str, int] = {}
        # tags seen in the cold entries of one user (the value: its sub) since the last reset:
        # a sighting with another user makes one shared
        self._candidates: dict[str, str] = {}

    def is_shared(self, tag: str) -> bool:
        return tag in self._shared_index

    def pair(self, service: str, issuer: str) -> int | None:
        """The index of (service, issuer), added when new; None when the table is full."""
        key = (service, issuer)
        i = self._pair_index.get(key)
        if i is None:
            if len(self.pairs) >= _MAX_PAIRS:
                return None
            i = self._pair_index[key] = len(self.pairs)
            self.pairs.append((sys.intern(service), sys.intern(issuer)))
        return i

    def shared_ref(self, tag: str, sub: str) -> str | None:
        """The reference character of ``tag`` if it is (or has just become) shared, else None.
        ``sub`` is the user the tag was seen with: only a second *user* makes a tag shared (the
        same session is compacted again after every touch)."""
        i = self._shared_index.get(tag)
        if i is None:
            candidates = self._candidates
            first = candidates.get(tag)
            if first is None or first == sub:
                if first is None and len(candidates) >= _MAX_CANDIDATES:
                    candidates.clear()
                candidates[tag] = sub
                return None
            if len(self.shared) >= _MAX_SHARED:
                return None
            del candidates[tag]
            i = self._shared_index[tag] = len(self.shared)
            self.shared.append(sys.intern(tag))
        return chr(_REF_BASE + i)


HOT_SESSIONS: Final = 256
"""Cached sessions kept as ready Session objects (the most recently used ones); the rest of
the cache holds :data:`_Compact` entries, turned back into a Session on their next use.
Why: a hot entry is served without work but costs many times a cold one's memory."""


_HAS_CE: Final = 1
"""Flag: claims_expire is set (else the packed value is a placeholder)."""
_DERIVED: Final = (
    (2, "sub=", 2),  # (flag, tag prefix, index of the field in (service, issuer, sub, email, username))
    (4, "email=", 3),
    (8, "iss=", 1),
    (16, "preferred_username=", 4),
)
"""Tags that are a prefix plus a field of the session, stored as a flag bit instead of text."""


def _derived_tags(flags: int, fields: tuple[str, str, str, str | None, str | None]) -> list[str]:
    return [prefix + str(fields[i]) for bit, prefix, i in _DERIVED if flags & bit]


def _compact(s: Session, table: TagTable) -> _Compact | None:
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
        ref = table.shared_ref(tag, s.sub)
        if ref is None:
            inline.append(tag)
        else:
            refs.append(ref)
    parts = [s.sub, *(_NONE if v is None else v for v in opt), *inline]
    if s.id_token or _NONE in opt or any(_SEP in p for p in parts) or any(t[:1] == _REF for t in inline):
        return None
    if refs:
        parts.append(_REF + "".join(refs))
    pair = table.pair(s.service, s.issuer)
    if pair is None:
        return None
    ce = s.claims_expire
    head = _HEAD.pack(s.created, s.last_seen, s.expires, 0.0 if ce is None else ce, flags, pair)
    return head + _SEP.join(parts).encode("utf-8", "surrogatepass")


_NEW: Final = object.__new__
_SET: Final = tuple(Session.__dict__[f.name].__set__ for f in dataclasses.fields(Session))
"""The slot setters of Session in field order: :func:`_expand` fills a new Session with
them, twice as fast as its frozen ``__init__`` (one ``object.__setattr__`` call per field)."""


def _expand(c: _Compact, table: TagTable) -> Session:
    """The Session a :func:`_compact` entry stands for (equal to the one it was made from)."""
    created, last_seen, expires, ce, flags, pair = _HEAD.unpack_from(c)
    service, issuer = table.pairs[pair]
    sub, email, username, sid, refresh_token, *tags = c[_HEAD.size :].decode("utf-8", "surrogatepass").split(_SEP)
    email_v = None if email == _NONE else email
    username_v = None if username == _NONE else username
    if tags and tags[-1][:1] == _REF:
        shared = table.shared
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


def _entry_times(e: Session | _Compact, table: TagTable) -> tuple[str, float, float]:
    """(service, last_seen, expires) of a cache entry, without expanding a cold one."""
    if type(e) is bytes:
        _, last_seen, expires, _, _, pair = _HEAD.unpack_from(e)
        return table.pairs[pair][0], last_seen, expires
    assert isinstance(e, Session)
    return e.service, e.last_seen, e.expires


def _entry_matches(e: Session | _Compact, table: TagTable, issuer: str, sub: str | None, sid: str | None) -> bool:
    if type(e) is bytes:
        if table.pairs[_HEAD.unpack_from(e)[5]][1] != issuer:
            return False
        e = _expand(e, table)
    assert isinstance(e, Session)
    return _matches(e, issuer, sub, sid)


_REBUILD_AFTER: Final = 1024
"""Evictions after which :class:`_SessionCache` copies its entries dict to drop the holes."""


class _SessionCache:
    """The SQLite store's bounded cache of lean sessions (at most ``size``), in two tiers: the
    :data:`HOT_SESSIONS` most recently used as Session objects (a hit costs what a dict
    lookup costs), the others compact (:func:`_compact`; expanded again on their next use).

    Eviction is least recently used, approximated the way CLOCK does it: ``_entries`` is a
    plain dict in insertion order, and an entry moves to its young end when it is added or a
    cold one is used again; a hit on a hot entry only reorders the small hot tier. When the
    cache is full the oldest entry goes, unless it is hot (used since it got there): then it
    gets a second chance at the young end. So no hit rewrites the big dict, which therefore
    stays a plain dict, smaller than an OrderedDict (no linked list or node index). Each
    eviction leaves a hole at the dict's old end that finding the next oldest walks past, so
    after :data:`_REBUILD_AFTER` of them the dict is copied afresh (cheaper than the walk)."""

    __slots__ = ("_entries", "_holes", "_hot", "_hot_size", "_size", "tags")

    def __init__(self, size: int, hot_size: int = HOT_SESSIONS) -> None:
        self._size = size
        self._hot_size = max(1, hot_size)
        self._entries: dict[bytes, Session | _Compact] = {}
        self._holes = 0
        self.tags = TagTable()
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
        session = _expand(e, self.tags)
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

    def entry_times(self, e: Session | _Compact) -> tuple[str, float, float]:
        """(service, last_seen, expires) of one of this cache's entries."""
        return _entry_times(e, self.tags)

    def entry_matches(self, e: Session | _Compact, issuer: str, sub: str | None, sid: str | None) -> bool:
        """Whether one of this cache's entries is a session of ``issuer`` matching ``sub``/``sid``."""
        return _entry_matches(e, self.tags, issuer, sub, sid)

    def retain_services(self, services: frozenset[str]) -> int:
        """Drop the entries of services not in ``services`` (a reload removed them) and, if
        any went, rebuild the tag table from the entries that stay, so the dropped services'
        pairs and tags are freed too. Returns how many entries were dropped."""
        doomed = [k for k, e in self._entries.items() if self.entry_times(e)[0] not in services]
        for key in doomed:
            self.pop(key)
        if doomed:
            old, self.tags = self.tags, TagTable()
            for key, e in self._entries.items():
                if type(e) is bytes:
                    self._entries[key] = _compact(_expand(e, old), self.tags) or _expand(e, old)
            self._entries = dict(self._entries)
            self._holes = 0
            for key in self._hot:  # their remembered cold forms refer to the old table
                self._hot[key] = None
        return len(doomed)

    def _heat(self, key: bytes, compact: _Compact | None = None) -> None:
        hot = self._hot
        hot[key] = compact
        hot.move_to_end(key)
        while len(hot) > self._hot_size:
            cold, c = hot.popitem(last=False)
            e = self._entries.get(cold)
            if type(e) is Session and (c is not None or (c := _compact(e, self.tags)) is not None):
                self._entries[cold] = c

