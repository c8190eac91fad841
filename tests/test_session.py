"""Tests for enforcer.session: strict cookie handling and both session stores (spec §3)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import re
import sqlite3
import stat
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enforcer.identity import cache as cache_mod
from enforcer.identity import sessions, sqlite
from enforcer.identity.cookies import (
    COOKIE_PREFIX,
    CookieLookup,
    clear_cookie_header,
    find_cookie,
    is_enforcer_cookie,
    session_cookie_name,
    set_cookie_header,
    strip_cookies,
)
from enforcer.identity.sessions import MemorySessionStore, Session, SessionStore, SessionStoreError
from enforcer.identity.sqlite import SQLiteSessionStore

T0 = 1_700_000_000.0
IDLE = 600.0
TOUCH = 60.0
ISSUER = "https://idp.example.com"
OURS = session_cookie_name("app")
HANDLE_RE = re.compile(r"[A-Za-z0-9_-]{43}")


def make_session(**changes: Any) -> Session:
    """A valid session created at T0 for service "app", lasting 8 hours."""
    base = Session(
        service="app",
        issuer=ISSUER,
        sub="user-1",
        email="bob@example.com",
        username="bob",
        tags=frozenset({"email=bob@example.com", "group=admins"}),
        sid="sid-1",
        id_token="eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEifQ.c2ln",
        created=T0,
        last_seen=T0,
        expires=T0 + 8 * 3600,
    )
    return dataclasses.replace(base, **changes)


StoreFactory = Callable[..., SessionStore]


@pytest.fixture(params=["memory", "sqlite"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Factory for the store under test; every store it made is closed afterwards."""
    made: list[SessionStore] = []

    def factory(**kwargs: Any) -> SessionStore:
        kwargs.setdefault("idle_timeout", IDLE)
        kwargs.setdefault("touch_interval", TOUCH)
        store: SessionStore
        if request.param == "memory":
            store = MemorySessionStore(**kwargs)
        else:
            store = SQLiteSessionStore(tmp_path / "sessions.db", **kwargs)
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteSessionStore]:
    """A SQLite store on a fresh file in tmp_path."""
    store = SQLiteSessionStore(tmp_path / "sessions.db", idle_timeout=IDLE, touch_interval=TOUCH)
    yield store
    await store.close()


def state_files(directory: Path, prefix: str = "sessions.db") -> list[Path]:
    """Files in the state dir whose name starts with prefix (sync: tiny, test-only I/O)."""
    return sorted(p for p in directory.iterdir() if p.name.startswith(prefix))


def db_last_seen(path: Path) -> list[float]:
    """last_seen of every row, read with a separate connection."""
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT last_seen FROM sessions")]
    finally:
        conn.close()


# --- cookies ---------------------------------------------------------------------------------


def test_session_cookie_name_uses_host_prefix() -> None:
    """The session cookie is named __Host-enforcer-<service>."""
    assert session_cookie_name("private-app") == "__Host-enforcer-private-app"
    assert session_cookie_name("x").startswith(COOKIE_PREFIX)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param([], (CookieLookup.ABSENT, None), id="no-header"),
        pytest.param(["a=1; b=2"], (CookieLookup.ABSENT, None), id="absent"),
        pytest.param([f"a=1; {OURS}=h1; b=2"], (CookieLookup.FOUND, "h1"), id="found"),
        pytest.param([f"{OURS}=h1"], (CookieLookup.FOUND, "h1"), id="only-ours"),
        pytest.param(["a=1", f"b=2; {OURS}=h1"], (CookieLookup.FOUND, "h1"), id="second-line"),
        pytest.param([f"  {OURS}=h1 ;b=2"], (CookieLookup.FOUND, "h1"), id="ows-trimmed"),
        pytest.param([f"{OURS}=h1; {OURS}=h2"], (CookieLookup.AMBIGUOUS, None), id="two-values"),
        pytest.param([f"{OURS}=h1", f"{OURS}=h1"], (CookieLookup.AMBIGUOUS, None), id="two-lines"),
        pytest.param(["__host-enforcer-app=h1"], (CookieLookup.ABSENT, None), id="lower-case"),
        pytest.param(["__HOST-ENFORCER-APP=h1"], (CookieLookup.ABSENT, None), id="upper-case"),
        pytest.param(["enforcer-app=h1"], (CookieLookup.ABSENT, None), id="no-prefix"),
        pytest.param(
            [f"__host-enforcer-app=evil; {OURS}=h1"],
            (CookieLookup.FOUND, "h1"),
            id="tossed-variant",
        ),
        pytest.param([f"=x; a; {OURS}=h1"], (CookieLookup.FOUND, "h1"), id="malformed-skipped"),
        pytest.param([f"{OURS}=h\x001"], (CookieLookup.ABSENT, None), id="nul-in-value"),
        pytest.param([f"{OURS}\x00=h1"], (CookieLookup.ABSENT, None), id="nul-in-name"),
        pytest.param([f"{OURS}=h1; {OURS}\x00=h2"], (CookieLookup.FOUND, "h1"), id="nul-dup"),
        pytest.param([f"{OURS} x=h1"], (CookieLookup.ABSENT, None), id="space-in-name"),
        pytest.param([OURS], (CookieLookup.ABSENT, None), id="name-without-equals"),
        pytest.param([f"{OURS}="], (CookieLookup.FOUND, ""), id="empty-value"),
        pytest.param([f"a=1;;; ;{OURS}=h1;"], (CookieLookup.FOUND, "h1"), id="empty-pieces"),
    ],
)
def test_find_cookie_table(headers: list[str], expected: tuple[CookieLookup, str | None]) -> None:
    """find_cookie matches the exact name once, and rejects duplicates and malformed pairs."""
    assert find_cookie(headers, OURS) == expected


def test_find_cookie_oversize_header_is_ignored() -> None:
    """A Cookie header over max_total bytes is treated as carrying no cookies."""
    big = f"{OURS}=h1; pad=" + "x" * 9000
    assert find_cookie([big], OURS) == (CookieLookup.ABSENT, None)
    assert find_cookie([f"{OURS}=h1", "p=" + "x" * 8180], OURS) == (CookieLookup.ABSENT, None)
    assert find_cookie([big], OURS, max_total=20_000) == (CookieLookup.FOUND, "h1")


def test_find_cookie_too_many_pairs_is_ignored() -> None:
    """More than max_count pairs means the cookies are ignored, not partially read."""
    many = "; ".join(f"c{i}=v" for i in range(100))
    assert find_cookie([f"{OURS}=h1; {many}"], OURS) == (CookieLookup.ABSENT, None)
    assert find_cookie([f"{OURS}=h1; {many}"], OURS, max_count=101) == (CookieLookup.FOUND, "h1")


def test_strip_cookies_removes_ours_and_keeps_app_cookies_exact() -> None:
    """strip_cookies drops every case variant of our cookies and copies the app's pairs as-is."""
    headers = [
        f'{OURS}=h1; app_session="q%20v=="; __HOST-enforcer-other=x',
        "theme=dark/blue; __host-ENFORCER-tx=y; empty=",
    ]
    assert strip_cookies(headers, is_enforcer_cookie) == (
        'app_session="q%20v=="; theme=dark/blue; empty='
    )


def test_strip_cookies_returns_none_when_nothing_left() -> None:
    """With only our cookies (or nothing) there is no Cookie header to forward."""
    assert strip_cookies([f"{OURS}=h1"], is_enforcer_cookie) is None
    assert strip_cookies([], is_enforcer_cookie) is None
    assert strip_cookies([" ; ;"], is_enforcer_cookie) is None


def test_strip_cookies_drops_malformed_pieces() -> None:
    """Pieces without a name, without '=' or with control characters never reach the app."""
    headers = [f"=x; {OURS}; a=1; b\x00=2; {OURS}\x0b=h; c=3"]
    assert strip_cookies(headers, is_enforcer_cookie) == "a=1; c=3"


def test_is_enforcer_cookie_is_case_insensitive_prefix() -> None:
    """Any case variant of __Host-enforcer- counts as ours; other names do not."""
    assert is_enforcer_cookie("__Host-enforcer-app")
    assert is_enforcer_cookie("__hOsT-EnFoRcEr-")
    assert not is_enforcer_cookie("__Host-app")
    assert not is_enforcer_cookie("enforcer-app")


def test_set_cookie_header_attributes() -> None:
    """The session Set-Cookie has __Host-, Path=/, Secure, HttpOnly, SameSite=Lax and no Domain."""
    header = set_cookie_header(OURS, "abc", max_age=None)
    assert header == f"{OURS}=abc; Path=/; Secure; HttpOnly; SameSite=Lax"
    attrs = [a.strip().lower() for a in header.split(";")[1:]]
    assert not any(a.startswith(("domain", "expires", "max-age")) for a in attrs)
    with_age = set_cookie_header(OURS, "abc", max_age=3600)
    assert with_age == f"{OURS}=abc; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=3600"


def test_clear_cookie_header_attributes() -> None:
    """Clearing uses the same attributes, an empty value and Max-Age=0."""
    assert (
        clear_cookie_header(OURS) == f"{OURS}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"
    )


@pytest.mark.parametrize(
    ("name", "value", "max_age"),
    [
        ("enforcer-app", "v", None),
        ("__host-enforcer-app", "v", None),
        (f"{OURS};x", "v", None),
        (OURS, "a;b", None),
        (OURS, "a b", None),
        (OURS, "a\r\nSet-Cookie: x=y", None),
        (OURS, "v", -1),
    ],
)
def test_set_cookie_header_rejects_unsafe_input(name: str, value: str, max_age: int | None) -> None:
    """Names without the exact __Host- prefix, unsafe values and negative ages are refused."""
    with pytest.raises(ValueError, match=r"cookie|max_age"):
        set_cookie_header(name, value, max_age=max_age)


_cookie_text = st.text(
    alphabet=st.sampled_from(list('=; \t\x00\x0b\udcff"aA_-H')) | st.characters()
)
_header_lists = st.lists(_cookie_text, max_size=5)


def _lenient_names(header: str) -> list[str]:
    """Cookie names as a lenient parser would read them (split, partition, strip everything)."""
    return [piece.partition("=")[0].strip() for piece in header.split(";")]


@given(headers=_header_lists, name=_cookie_text)
def test_find_cookie_never_raises(headers: list[str], name: str) -> None:
    """find_cookie returns a valid lookup for any text, including surrogates and NUL."""
    lookup, value = find_cookie(headers, name)
    assert (value is not None) == (lookup is CookieLookup.FOUND)


@given(headers=_header_lists)
def test_strip_cookies_never_leaves_a_dropped_name(headers: list[str]) -> None:
    """After strip_cookies no name (even read leniently) is one of ours, for any input text."""
    seeded = [*headers, f"{OURS}=h1; __HOST-enforcer-x=y"]
    result = strip_cookies(seeded, is_enforcer_cookie)
    if result is not None:
        assert result
        assert not any(is_enforcer_cookie(n) for n in _lenient_names(result))
        assert find_cookie([result], OURS, max_total=10**9, max_count=10**9)[0] is (
            CookieLookup.ABSENT
        )


@given(
    pairs=st.lists(
        st.tuples(
            st.from_regex(r"[A-Za-z0-9_.]{1,10}", fullmatch=True),
            st.from_regex(r"[A-Za-z0-9%=/\"]{0,10}", fullmatch=True),
        ),
        max_size=8,
    )
)
def test_strip_cookies_keeps_well_formed_app_pairs(pairs: list[tuple[str, str]]) -> None:
    """Well-formed app pairs come through strip_cookies unchanged and in order."""
    app = [f"{n}={v}" for n, v in pairs if not is_enforcer_cookie(n)]
    header = "; ".join([f"{OURS}=h1", *app])
    assert strip_cookies([header], is_enforcer_cookie) == ("; ".join(app) or None)


# --- handles ---------------------------------------------------------------------------------


async def test_handles_are_unique_random_and_43_urlsafe_chars() -> None:
    """1,000 handles are distinct, 43 URL-safe characters, and decode to 256 bits (S-ID-01)."""
    store = MemorySessionStore(idle_timeout=IDLE, max_sessions=2000)
    handles = [await store.create(make_session()) for _ in range(1000)]
    assert len(set(handles)) == 1000
    for handle in handles:
        assert HANDLE_RE.fullmatch(handle)
        assert len(base64.urlsafe_b64decode(handle + "=")) == 32


def _tampered(handle: str) -> list[str]:
    flipped = chr(ord(handle[0]) ^ 1)
    other = "A" if handle[5] != "A" else "B"
    return [
        flipped + handle[1:],
        handle[:5] + other + handle[6:],
        handle[:-1],
        handle[:20],
        handle + "A",
        handle + "=",
        handle + "\n",
        " " + handle,
        handle[:-1] + "é",
        handle[:-1] + "\x00",
        handle.replace("-", "+").replace("_", "/"),
        handle[:-1] + "\udcff",
        "",
        "A" * 10_000,
    ]


async def test_tampered_handles_are_rejected_quietly(make_store: StoreFactory) -> None:
    """Bit flips, truncation, extra or non-ASCII characters give None without raising (S-ID-03)."""
    store = make_store()
    handle = await store.create(make_session())
    for bad in _tampered(handle):
        if bad == handle:
            continue
        assert await store.get(bad, "app", T0 + 1) is None
        await store.delete(bad)
    assert await store.get(handle, "app", T0 + 1) is not None


# --- store behaviour (both stores) -----------------------------------------------------------


async def test_get_returns_the_stored_session(make_store: StoreFactory) -> None:
    """A session comes back unchanged for its own service within its lifetime."""
    store = make_store()
    original = make_session(refresh_token="rt", claims_expire=T0 + 300, email=None)
    handle = await store.create(original)
    got = await store.get(handle, "app", T0 + 1)
    assert got is not None and got.id_token in (original.id_token, "")  # caches may drop the raw token
    assert dataclasses.replace(got, id_token=original.id_token) == original
    assert await store.count() == 1


async def test_pop_returns_the_whole_session_once_and_deletes_it(make_store: StoreFactory) -> None:
    """Logout's pop gives back the session with its raw ID token, deletes it, and a second pop gets nothing."""
    store = make_store()
    original = make_session()
    handle = await store.create(original)
    assert await store.get(handle, "app", T0 + 1) is not None  # now cached
    assert await store.pop(handle, "app", T0 + 2) == original
    assert await store.pop(handle, "app", T0 + 2) is None
    assert await store.get(handle, "app", T0 + 2) is None
    assert await store.count() == 0


async def test_pop_of_another_service_or_expired_session_deletes_but_returns_none(make_store: StoreFactory) -> None:
    """pop deletes whatever the handle names, but returns a session only if it was live for that service."""
    store = make_store()
    other = await store.create(make_session())
    assert await store.pop(other, "elsewhere", T0 + 1) is None
    expired = await store.create(make_session())
    assert await store.pop(expired, "app", T0 + 9 * 3600) is None
    assert await store.count() == 0


async def test_get_for_other_service_is_none(make_store: StoreFactory) -> None:
    """A cookie from service A replayed to service B is not accepted and not destroyed (S-ID-05)."""
    store = make_store()
    handle = await store.create(make_session())
    assert await store.get(handle, "other-app", T0 + 1) is None
    assert await store.get(handle, "app", T0 + 2) is not None


async def test_idle_timeout(make_store: StoreFactory) -> None:
    """A session idle for longer than idle_timeout is gone and deleted (S-LT-01)."""
    store = make_store()
    handle = await store.create(make_session())
    assert await store.get(handle, "app", T0 + IDLE) is not None
    other = await store.create(make_session())
    assert await store.get(other, "app", T0 + IDLE + 0.001) is None
    assert await store.count() == 1
    assert await store.get(other, "app", T0 + 1) is None


async def test_absolute_expiry_despite_activity(make_store: StoreFactory) -> None:
    """Continuous activity cannot keep a session alive at or past expires (S-LT-02)."""
    store = make_store()
    handle = await store.create(make_session(expires=T0 + 1000))
    for t in range(0, 1000, 100):
        assert await store.get(handle, "app", T0 + t) is not None
    assert await store.get(handle, "app", T0 + 1000) is None
    assert await store.count() == 0


async def test_touch_is_rate_limited_and_slides(make_store: StoreFactory) -> None:
    """last_seen moves only once per touch_interval, and that keeps an active user signed in."""
    store = make_store()
    handle = await store.create(make_session())
    got = await store.get(handle, "app", T0 + TOUCH - 1)
    assert got is not None
    assert got.last_seen == T0
    got = await store.get(handle, "app", T0 + TOUCH)
    assert got is not None
    assert got.last_seen == T0 + TOUCH
    got = await store.get(handle, "app", T0 + TOUCH + IDLE)
    assert got is not None
    assert got.last_seen == T0 + TOUCH + IDLE


async def test_touch_never_extends_past_expires(make_store: StoreFactory) -> None:
    """Sliding keeps the absolute end: a touch just before expires does not buy idle time."""
    store = make_store()
    handle = await store.create(make_session(expires=T0 + 700))
    got = await store.get(handle, "app", T0 + 550)
    assert got is not None
    assert got.last_seen == T0 + 550
    assert got.expires == T0 + 700
    assert await store.get(handle, "app", T0 + 699) is not None
    assert await store.get(handle, "app", T0 + 700) is None


async def test_clock_stepping_back_does_not_rewind_last_seen(make_store: StoreFactory) -> None:
    """A clock step backwards neither logs the user out nor moves last_seen back (S-LT-03)."""
    store = make_store()
    handle = await store.create(make_session(last_seen=T0 + 300))
    got = await store.get(handle, "app", T0 - 300)
    assert got is not None
    assert got.last_seen == T0 + 300


async def test_touch_interval_is_capped_below_idle_timeout(make_store: StoreFactory) -> None:
    """A touch interval longer than the idle timeout still lets an active user stay in."""
    store = make_store(idle_timeout=100, touch_interval=1000)
    handle = await store.create(make_session())
    for t in range(50, 1000, 50):
        assert await store.get(handle, "app", T0 + t) is not None


async def test_delete(make_store: StoreFactory) -> None:
    """After delete the handle no longer works (S-ID-07a) and other sessions are untouched."""
    store = make_store()
    handle = await store.create(make_session())
    keep = await store.create(make_session())
    await store.delete(handle)
    await store.delete(handle)
    assert await store.get(handle, "app", T0 + 1) is None
    assert await store.get(keep, "app", T0 + 1) is not None


async def test_delete_matching_by_sub(make_store: StoreFactory) -> None:
    """Back-channel logout by (issuer, sub) removes all of that user's sessions only."""
    store = make_store()
    a1 = await store.create(make_session(sid="s1"))
    a2 = await store.create(make_session(sid="s2", service="other"))
    b = await store.create(make_session(sub="user-2", sid="s3"))
    foreign = await store.create(make_session(issuer="https://other-idp.example"))
    assert await store.delete_matching(issuer=ISSUER, sub="user-1") == 2
    assert await store.get(a1, "app", T0 + 1) is None
    assert await store.get(a2, "other", T0 + 1) is None
    assert await store.get(b, "app", T0 + 1) is not None
    assert await store.get(foreign, "app", T0 + 1) is not None


async def test_delete_matching_by_sid(make_store: StoreFactory) -> None:
    """Back-channel logout by (issuer, sid) removes exactly that IdP session's sessions."""
    store = make_store()
    s1 = await store.create(make_session(sid="s1"))
    s2 = await store.create(make_session(sid="s2"))
    nosid = await store.create(make_session(sid=None))
    assert await store.delete_matching(issuer=ISSUER, sid="s1") == 1
    assert await store.delete_matching(issuer="https://other-idp.example", sid="s2") == 0
    assert await store.delete_matching(issuer=ISSUER, sub="user-1", sid="s9") == 0
    assert await store.get(s1, "app", T0 + 1) is None
    assert await store.get(s2, "app", T0 + 1) is not None
    assert await store.get(nosid, "app", T0 + 1) is not None


async def test_delete_matching_needs_sub_or_sid(make_store: StoreFactory) -> None:
    """Deleting every session of an issuer by accident is refused."""
    store = make_store()
    await store.create(make_session())
    with pytest.raises(ValueError, match="sub or sid"):
        await store.delete_matching(issuer=ISSUER)
    assert await store.count() == 1


async def test_purge_expired(make_store: StoreFactory) -> None:
    """purge_expired removes idle and absolutely expired sessions and counts them."""
    store = make_store()
    live = await store.create(make_session(last_seen=T0 + 500))
    await store.create(make_session())
    await store.create(make_session(expires=T0 + 100, last_seen=T0 + 90))
    assert await store.purge_expired(T0 + IDLE + 1) == 2
    assert await store.count() == 1
    assert await store.get(live, "app", T0 + IDLE + 2) is not None


async def test_max_sessions_evicts_least_recently_seen(make_store: StoreFactory) -> None:
    """Beyond max_sessions the least recently seen session is evicted (S-LT-05)."""
    store = make_store(max_sessions=3)
    h = [await store.create(make_session(created=T0 + i, last_seen=T0 + i)) for i in range(3)]
    assert await store.get(h[0], "app", T0 + TOUCH + 10) is not None  # touched: now newest
    h.append(await store.create(make_session(created=T0 + 100, last_seen=T0 + 100)))
    assert await store.count() == 3
    assert await store.get(h[1], "app", T0 + 110) is None
    for kept in (h[0], h[2], h[3]):
        assert await store.get(kept, "app", T0 + 110) is not None


async def test_first_use_marks_a_key_once_until_its_end(make_store: StoreFactory) -> None:
    """A key is marked once (a replay is False, and was_used says it is marked) until its end, per kind; at most max_used marks are kept."""
    store = make_store(max_used=2)
    assert not await store.was_used("logout", "iss\x00j1", T0)
    assert await store.first_use("logout", "iss\x00j1", T0, T0 + 120)
    assert await store.was_used("logout", "iss\x00j1", T0 + 119) and not await store.was_used("other", "iss\x00j1", T0)
    assert not await store.was_used("logout", "iss\x00j1", T0 + 120)  # its mark has ended
    assert not await store.first_use("logout", "iss\x00j1", T0 + 119, T0 + 300)  # a replay, even later
    assert await store.first_use("other", "iss\x00j1", T0, T0 + 120)  # another kind
    assert await store.first_use("logout", "iss\x00j1", T0 + 120, T0 + 1000)  # its mark has ended
    assert await store.first_use("logout", "iss\x00j2", T0 + 121, T0 + 2000)
    assert await store.first_use("logout", "iss\x00j3", T0 + 122, T0 + 3000)  # bounded: j1's mark goes
    assert await store.first_use("logout", "iss\x00j1", T0 + 123, T0 + 1000)
    assert not await store.first_use("logout", "iss\x00j3", T0 + 124, T0 + 3000)
    await store.purge_expired(T0 + 3000)
    assert await store.first_use("logout", "iss\x00j3", T0 + 3000, T0 + 3100)


async def test_sqlite_first_use_is_shared_by_workers_and_purged(tmp_path: Path) -> None:
    """A mark made by one worker is a replay for another; purge_expired drops ended marks from the file."""
    a = SQLiteSessionStore(tmp_path / "sessions.db", idle_timeout=IDLE, shared=True)
    b = SQLiteSessionStore(tmp_path / "sessions.db", idle_timeout=IDLE, shared=True)
    try:
        assert await a.first_use("logout", "iss\x00j1", T0, T0 + 120)
        assert not await b.first_use("logout", "iss\x00j1", T0 + 1, T0 + 120)
        assert await b.first_use("logout", "iss\x00j2", T0, T0 + 1e9)  # capped at USED_KEEP_MAX
        await a.purge_expired(T0 + 121)
        with sqlite3.connect(tmp_path / "sessions.db") as conn:
            rows = conn.execute("SELECT until FROM used_marks").fetchall()
        assert rows == [(T0 + sessions.USED_KEEP_MAX,)]
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize(
    "kwargs", [{"idle_timeout": 0}, {"touch_interval": -1}, {"max_sessions": 0}]
)
async def test_invalid_limits_are_rejected(
    make_store: StoreFactory, kwargs: dict[str, Any]
) -> None:
    """Non-positive idle timeout, negative touch interval and zero capacity are refused."""
    with pytest.raises(ValueError, match="must be"):
        make_store(**kwargs)


# --- SQLite specifics ------------------------------------------------------------------------


async def test_sqlite_never_stores_the_raw_handle(tmp_path: Path) -> None:
    """No file in the state dir contains the handle, in text or decoded form."""
    path = tmp_path / "sessions.db"
    store = SQLiteSessionStore(path, idle_timeout=IDLE)
    handles = [await store.create(make_session()) for _ in range(20)]
    assert await store.get(handles[0], "app", T0 + 1) is not None
    files = state_files(tmp_path, "")
    assert path in files
    blobs = [f.read_bytes() for f in files]
    await store.close()
    blobs += [path.read_bytes()]
    for handle in handles:
        raw = base64.urlsafe_b64decode(handle + "=")
        for blob in blobs:
            assert handle.encode() not in blob
            assert raw not in blob


async def test_sqlite_restart_keeps_sessions(tmp_path: Path) -> None:
    """A new store on the same file finds the session, tags and all; deletes persist too."""
    path = tmp_path / "sessions.db"
    first = SQLiteSessionStore(path, idle_timeout=IDLE)
    original = make_session(tags=frozenset({"a=1", "b=ü", "c"}), refresh_token="rt")
    kept = await first.create(original)
    gone = await first.create(make_session())
    await first.delete(gone)
    await first.close()
    second = SQLiteSessionStore(path, idle_timeout=IDLE)
    try:
        assert await second.get(kept, "app", T0 + 1) == dataclasses.replace(original, id_token="")
        assert await second.get(gone, "app", T0 + 1) is None
        assert await second.count() == 1
        assert await second.pop(kept, "app", T0 + 1) == original  # the raw ID token survived too
    finally:
        await second.close()


async def test_sqlite_touch_is_written_through_rate_limited(tmp_path: Path) -> None:
    """last_seen reaches the file once per touch_interval, not on every read (S-LT-04)."""
    path = tmp_path / "sessions.db"
    store = SQLiteSessionStore(path, idle_timeout=IDLE, touch_interval=TOUCH)
    try:
        handle = await store.create(make_session())
        for t in range(1, int(TOUCH)):
            assert await store.get(handle, "app", T0 + t) is not None
        assert db_last_seen(path) == [T0]
        assert await store.get(handle, "app", T0 + TOUCH) is not None
        assert db_last_seen(path) == [T0 + TOUCH]
    finally:
        await store.close()


async def test_sqlite_cache_hit_does_no_io(
    sqlite_store: SQLiteSessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads served from the cache, and not due for a touch, never reach the worker thread."""
    handle = await sqlite_store.create(make_session())
    calls: list[object] = []
    real_run = sqlite_store._run

    async def counting_run(fn: Any) -> Any:
        calls.append(fn)
        return await real_run(fn)

    monkeypatch.setattr(sqlite_store, "_run", counting_run)
    for t in range(1, 60):
        assert await sqlite_store.get(handle, "app", T0 + t) is not None
    assert calls == []
    assert await sqlite_store.get(handle, "app", T0 + TOUCH) is not None
    assert len(calls) == 1


async def test_sqlite_cache_miss_reads_through(tmp_path: Path) -> None:
    """With a cache of one entry, evicted sessions are still found in the file."""
    store = SQLiteSessionStore(tmp_path / "sessions.db", idle_timeout=IDLE, cache_size=1)
    try:
        handles = [await store.create(make_session(sub=f"u{i}")) for i in range(5)]
        for i, handle in enumerate(handles):
            got = await store.get(handle, "app", T0 + 1)
            assert got is not None
            assert got.sub == f"u{i}"
    finally:
        await store.close()


async def test_sqlite_delete_racing_a_read_through_wins(tmp_path: Path) -> None:
    """A delete that overlaps a cache-miss read never leaves the session in the cache."""
    path = tmp_path / "sessions.db"
    first = SQLiteSessionStore(path, idle_timeout=IDLE)
    handle = await first.create(make_session())
    await first.close()
    store = SQLiteSessionStore(path, idle_timeout=IDLE)
    try:
        await asyncio.gather(store.get(handle, "app", T0 + 1), store.delete(handle))
        assert await store.get(handle, "app", T0 + 2) is None
    finally:
        await store.close()


async def test_sqlite_file_mode_is_0600(tmp_path: Path) -> None:
    """The database and its WAL/SHM files are private to the daemon's user."""
    path = tmp_path / "sessions.db"
    old = os.umask(0o022)
    try:
        store = SQLiteSessionStore(path, idle_timeout=IDLE)
    finally:
        os.umask(old)
    try:
        await store.create(make_session())
        files = state_files(tmp_path)
        assert {p.name for p in files} >= {"sessions.db", "sessions.db-wal"}
        for p in files:
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name
    finally:
        await store.close()


async def test_sqlite_existing_loose_file_is_tightened(tmp_path: Path) -> None:
    """An existing database file readable by others is chmod-ed to 0600 on open."""
    path = tmp_path / "sessions.db"
    await SQLiteSessionStore(path, idle_timeout=IDLE).close()
    path.chmod(0o644)
    store = SQLiteSessionStore(path, idle_timeout=IDLE)
    await store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_sqlite_garbage_file_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file that is not a database is renamed .corrupt-<time>, a warning logged, store works."""
    path = tmp_path / "sessions.db"
    path.write_bytes(b"this is not a database" * 500)
    with caplog.at_level(logging.WARNING, logger="enforcer.identity.sqlite"):
        store = SQLiteSessionStore(path, idle_timeout=IDLE)
    try:
        aside = state_files(tmp_path, "sessions.db.corrupt-")
        assert all(re.fullmatch(r"sessions\.db\.corrupt-\d+", p.name) for p in aside)
        assert len(aside) == 1
        assert aside[0].read_bytes().startswith(b"this is not a database")
        assert "corrupt" in caplog.text
        handle = await store.create(make_session())
        assert await store.get(handle, "app", T0 + 1) is not None
    finally:
        await store.close()


async def test_sqlite_damaged_pages_are_recovered(tmp_path: Path) -> None:
    """A database with a valid header but garbage pages is replaced; the store keeps working."""
    path = tmp_path / "sessions.db"
    store = SQLiteSessionStore(path, idle_timeout=IDLE)
    handles = [await store.create(make_session(id_token="x" * 2000)) for _ in range(50)]
    await store.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 16 * 4096
    data[4096:] = b"\xa5" * (len(data) - 4096)
    path.write_bytes(bytes(data))
    store = SQLiteSessionStore(path, idle_timeout=IDLE)
    try:
        assert await store.get(handles[0], "app", T0 + 1) is None
        assert state_files(tmp_path, "sessions.db.corrupt-")
        handle = await store.create(make_session())
        assert await store.get(handle, "app", T0 + 1) is not None
        assert await store.count() == 1
    finally:
        await store.close()


async def test_sqlite_newer_schema_version_is_a_clear_error(tmp_path: Path) -> None:
    """A file written by a newer enforcer is refused with a message naming both versions."""
    path = tmp_path / "sessions.db"
    await SQLiteSessionStore(path, idle_timeout=IDLE).close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(SessionStoreError, match=r"version 99 is newer.*\(1\)"):
        SQLiteSessionStore(path, idle_timeout=IDLE)
    assert path.exists()


async def test_sqlite_schema_version_is_recorded(sqlite_store: SQLiteSessionStore) -> None:
    """The meta table carries the current schema version."""
    conn = sqlite3.connect(sqlite_store._path)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        mode = conn.execute("PRAGMA journal_mode").fetchone()
    finally:
        conn.close()
    assert row == (str(sqlite.SCHEMA_VERSION),)
    assert mode == ("wal",)


async def test_sqlite_unreadable_row_is_dropped(tmp_path: Path) -> None:
    """A row whose tags are not a JSON list of strings reads as no session, without raising."""
    path = tmp_path / "sessions.db"
    first = SQLiteSessionStore(path, idle_timeout=IDLE)
    handle = await first.create(make_session())
    await first.close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE sessions SET tags = '{not json'")
    conn.close()
    store = SQLiteSessionStore(path, idle_timeout=IDLE)
    try:
        assert await store.get(handle, "app", T0 + 1) is None
        assert await store.count() == 0
    finally:
        await store.close()


async def test_sqlite_corruption_found_at_runtime_is_recovered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Damage met by a later query (not at open) also moves the file aside and empties the store."""
    path = tmp_path / "sessions.db"
    store = SQLiteSessionStore(path, idle_timeout=IDLE)
    handles = [await store.create(make_session(id_token="x" * 2000)) for _ in range(50)]
    await store.close()
    conn = sqlite3.connect(path)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    keep = {1} | {
        root for (root,) in conn.execute("SELECT rootpage FROM sqlite_master WHERE tbl_name='meta'")
    }
    conn.close()
    data = bytearray(path.read_bytes())
    for page in range(2, len(data) // page_size + 1):
        if page not in keep:
            start = (page - 1) * page_size
            data[start : start + page_size] = b"\xa5" * page_size
    path.write_bytes(bytes(data))
    store = SQLiteSessionStore(path, idle_timeout=IDLE)
    try:
        assert not state_files(tmp_path, "sessions.db.corrupt-")  # opened fine
        with caplog.at_level(logging.WARNING, logger="enforcer.identity.sqlite"):
            assert await store.get(handles[0], "app", T0 + 1) is None
        assert state_files(tmp_path, "sessions.db.corrupt-")
        assert "corrupt" in caplog.text
        handle = await store.create(make_session())
        assert await store.get(handle, "app", T0 + 1) is not None
        assert await store.count() == 1
    finally:
        await store.close()


async def test_get_cached_is_the_hot_path_of_get_only(sqlite_store: SQLiteSessionStore) -> None:
    """get_cached answers only a live, cached, same-service session with no touch due;
    everything else (touch, expiry, wrong service, junk, unknown) is left to get()."""
    handle = await sqlite_store.create(make_session())
    got = sqlite_store.get_cached(handle, "app", T0 + TOUCH / 2)
    assert got is not None and got.last_seen == T0
    assert got == await sqlite_store.get(handle, "app", T0 + TOUCH / 2)
    assert sqlite_store.get_cached(handle, "other", T0 + 1) is None
    assert sqlite_store.get_cached(handle, "app", T0 + TOUCH + 1) is None  # a touch is due
    assert sqlite_store.get_cached(handle, "app", T0 + 9 * 3600) is None  # expired
    assert sqlite_store.get_cached("x" * 43, "app", T0) is None
    assert sqlite_store.get_cached("not a handle", "app", T0) is None
    touched = await sqlite_store.get(handle, "app", T0 + TOUCH + 1)
    assert touched is not None and sqlite_store.get_cached(handle, "app", T0 + TOUCH + 2) == touched


def test_cookie_names_with_any_unicode_space_are_malformed() -> None:
    for space in (" ", "\u00a0", "\u2003", "\u3000", "\x85"):
        assert find_cookie([f"a{space}b=1; {OURS}=v"], "a" + space + "b") == (CookieLookup.ABSENT, None)
        assert strip_cookies([f"a{space}b=1; k=v"], lambda _: False) == "k=v"


# --- several worker processes: shared=True --------------------------------------------------


@pytest.fixture
async def two_workers(tmp_path: Path) -> AsyncIterator[tuple[SQLiteSessionStore, SQLiteSessionStore]]:
    """Two shared stores on one file, as two worker processes have them."""
    a = SQLiteSessionStore(tmp_path / "sessions.db", idle_timeout=IDLE, touch_interval=TOUCH, shared=True)
    b = SQLiteSessionStore(tmp_path / "sessions.db", idle_timeout=IDLE, touch_interval=TOUCH, shared=True)
    yield a, b
    await a.close()
    await b.close()


async def test_shared_a_session_made_by_one_worker_is_found_by_the_other(
    two_workers: tuple[SQLiteSessionStore, SQLiteSessionStore],
) -> None:
    """A session created in one worker is read through by the other and then served from its cache."""
    a, b = two_workers
    handle = await a.create(make_session())
    assert b.get_cached(handle, "app", T0 + 1) is None  # not cached yet: read through
    lean = make_session(id_token="")  # caches keep no raw ID token (pop returns it)
    assert await b.get(handle, "app", T0 + 1) == lean
    assert b.get_cached(handle, "app", T0 + 1) == lean


async def test_shared_logout_in_one_worker_is_seen_by_the_other_at_once(
    two_workers: tuple[SQLiteSessionStore, SQLiteSessionStore],
) -> None:
    """A deletion in one worker removes the other worker's cached copy before its next lookup."""
    a, b = two_workers
    handle = await a.create(make_session())
    assert await b.get(handle, "app", T0 + 1) is not None
    await a.delete(handle)
    assert b.get_cached(handle, "app", T0 + 2) is None
    assert await b.get(handle, "app", T0 + 2) is None


async def test_shared_backchannel_logout_reaches_the_other_worker(
    two_workers: tuple[SQLiteSessionStore, SQLiteSessionStore],
) -> None:
    """delete_matching (back-channel logout by sid) in one worker revokes the other worker's cached copy."""
    a, b = two_workers
    handle = await a.create(make_session())
    assert await b.get(handle, "app", T0 + 1) is not None
    assert await a.delete_matching(issuer=ISSUER, sid="sid-1") == 1
    assert b.get_cached(handle, "app", T0 + 2) is None
    assert await b.get(handle, "app", T0 + 2) is None


async def test_shared_idle_looking_cached_copy_is_reread_not_deleted(
    two_workers: tuple[SQLiteSessionStore, SQLiteSessionStore],
) -> None:
    """A session kept alive by one worker is not expired by another whose cached copy is older."""
    a, b = two_workers
    handle = await a.create(make_session())
    assert await b.get(handle, "app", T0 + 1) is not None  # b caches last_seen = T0
    for step in range(1, 5):  # a keeps the user active past b's idea of the idle timeout
        assert await a.get(handle, "app", T0 + step * IDLE / 2) is not None
    later = T0 + 2.2 * IDLE
    assert await b.get(handle, "app", later) is not None
    assert await a.get(handle, "app", later) is not None


async def test_shared_evicted_session_is_dropped_by_the_other_worker(tmp_path: Path) -> None:
    """When the session cap evicts the oldest session, other workers stop serving it from their cache too."""
    a = SQLiteSessionStore(tmp_path / "s.db", idle_timeout=IDLE, max_sessions=1, shared=True)
    b = SQLiteSessionStore(tmp_path / "s.db", idle_timeout=IDLE, max_sessions=1, shared=True)
    try:
        first = await a.create(make_session())
        assert await b.get(first, "app", T0 + 1) is not None
        await a.create(make_session(sub="user-2", last_seen=T0 + 2))
        assert await b.get(first, "app", T0 + 3) is None
    finally:
        await a.close()
        await b.close()


async def test_shared_pending_login_is_taken_once_by_any_worker(
    two_workers: tuple[SQLiteSessionStore, SQLiteSessionStore],
) -> None:
    """A pending login stored by one worker is consumed once by another; a second take gets nothing."""
    a, b = two_workers
    await a.put_pending("state-1", '{"x": 1}', T0, max_pending=10)
    assert await b.take_pending("state-1", T0 + 5, ttl=600) == '{"x": 1}'
    assert await a.take_pending("state-1", T0 + 5, ttl=600) is None
    assert await b.take_pending("unknown", T0 + 5, ttl=600) is None


async def test_shared_pending_login_expires_and_is_capped(sqlite_store: SQLiteSessionStore) -> None:
    """A pending login older than the TTL is refused, and beyond the cap the oldest are dropped."""
    await sqlite_store.put_pending("old", "{}", T0, max_pending=2)
    assert await sqlite_store.take_pending("old", T0 + 601, ttl=600) is None
    for i in range(3):
        await sqlite_store.put_pending(f"s{i}", "{}", T0 + i, max_pending=2)
    assert await sqlite_store.take_pending("s0", T0 + 5, ttl=600) is None
    assert await sqlite_store.take_pending("s2", T0 + 5, ttl=600) == "{}"


async def test_shared_cache_is_dropped_when_the_revocation_check_fails(
    two_workers: tuple[SQLiteSessionStore, SQLiteSessionStore],
) -> None:
    """If the file cannot be asked about revocations, the cache is dropped (fail closed), not trusted."""
    a, b = two_workers
    handle = await a.create(make_session())
    assert await b.get(handle, "app", T0 + 1) is not None
    assert b._watch is not None
    b._watch.close()  # every query on it now raises sqlite3.ProgrammingError
    assert b.get_cached(handle, "app", T0 + 2) is None


_opt_text = st.none() | st.text(max_size=12)


@given(
    sub=st.text(max_size=12),
    email=_opt_text,
    username=_opt_text,
    sid=_opt_text,
    refresh_token=_opt_text,
    tags=st.frozensets(st.text(max_size=12), max_size=6),
    claims_expire=st.none() | st.floats(allow_nan=False),
    service=st.text(max_size=8),
    issuer=st.text(max_size=8),
    times=st.tuples(*[st.floats(allow_nan=False)] * 3),
    derived=st.tuples(*[st.booleans()] * 4),
)
def test_compact_cache_entries_expand_to_an_equal_session(
    sub: str, email: str | None, username: str | None, sid: str | None,
    refresh_token: str | None, tags: frozenset[str], claims_expire: float | None,
    service: str, issuer: str, times: tuple[float, float, float], derived: tuple[bool, bool, bool, bool],
) -> None:
    """A cold cache entry expands to a session equal to the lean one it was made from, or the session is kept whole."""
    table = cache_mod.TagTable()
    # tags that repeat a field (stored as flag bits), present or not
    extra = [f"{p}{v}" for want, p, v in zip(derived, ("sub=", "email=", "iss=", "preferred_username="),
                                             (sub, email, issuer, username), strict=True) if want and v is not None]
    tags = tags | frozenset(extra)
    lean = make_session(sub=sub, email=email, username=username, sid=sid, refresh_token=refresh_token,
                        tags=tags, claims_expire=claims_expire, id_token="", service=service, issuer=issuer,
                        created=times[0], last_seen=times[1], expires=times[2])  # fmt: skip
    compact = cache_mod._compact(lean, table)
    if compact is None:  # a NUL in a value, a value that is the lone SOH marker, a tag kept inline starting with STX
        assert any("\x00" in t for t in (sub, *tags, *(v for v in (email, username, sid, refresh_token) if v)))\
            or "\x01" in (email, username, sid, refresh_token) or any(t.startswith("\x02") for t in tags)
    else:
        assert cache_mod._expand(compact, table) == lean
        assert cache_mod._entry_times(compact, table) == (service, times[1], times[2])
        assert cache_mod._entry_matches(compact, table, issuer, sub, None) == sessions._matches(lean, issuer, sub, None)


def test_a_cold_entry_is_one_small_bytes_object() -> None:
    """A cold entry is one bytes object: its fields and the tags that do not repeat a field, plus a 35-byte head."""
    table = cache_mod.TagTable()
    own = f"team={uuid.uuid4()}"  # seen for the first time: kept inline
    tags = frozenset({"sub=user-1", "email=bob@example.com", f"iss={ISSUER}", "preferred_username=bob", own})
    lean = sqlite._lean(make_session(id_token="", username="bob", tags=tags))
    compact = cache_mod._compact(lean, table)
    assert type(compact) is bytes
    text = "\x00".join([lean.sub, "bob@example.com", "bob", "sid-1", "\x01", own])
    assert len(compact) == cache_mod._HEAD.size + len(text)
    assert cache_mod._expand(compact, table) == lean


def test_a_tag_several_users_have_becomes_a_two_byte_reference() -> None:
    """From its second cold entry on, a tag that several users have is stored as a short reference and expands back."""
    table = cache_mod.TagTable()
    shared = f"groups=staff-{uuid.uuid4()}"
    own = [f"name=User {uuid.uuid4()}" for _ in range(3)]
    leans = [sqlite._lean(make_session(sub=f"user-{i}", id_token="", tags=frozenset({shared, own[i]})))
             for i in range(3)]
    first, second, third = (cache_mod._compact(lean, table) for lean in leans)
    assert first is not None and second is not None and third is not None
    assert shared.encode() in first  # the first sighting stays inline
    assert shared.encode() not in second and shared.encode() not in third
    assert len(first) - len(second) >= len(shared) - 3  # NUL + text became STX + a 2- or 3-byte character
    assert [cache_mod._expand(c, table) for c in (first, second, third)] == leans


def test_one_users_tags_do_not_become_shared_by_compacting_the_same_session_again() -> None:
    """Compacting one user's session again (after each touch) does not make its own tags shared."""
    table = cache_mod.TagTable()
    own = f"name=User {uuid.uuid4()}"
    lean = sqlite._lean(make_session(sub=f"user-{uuid.uuid4()}", id_token="", tags=frozenset({own})))
    for _ in range(3):
        compact = cache_mod._compact(lean, table)
        assert compact is not None and own.encode() in compact
    assert not table.is_shared(own)


def test_a_tag_starting_with_the_reference_marker_keeps_the_session_whole() -> None:
    """A tag that starts with STX cannot be told from a reference: such a session is not compacted."""
    table = cache_mod.TagTable()
    lean = sqlite._lean(make_session(id_token="", tags=frozenset({f"\x02{uuid.uuid4()}"})))
    assert cache_mod._compact(lean, table) is None


def _cached(n: int) -> Session:
    return sqlite._lean(make_session(sub=f"user-{n}", sid=f"sid-{n}", id_token=""))


def test_each_cache_owns_its_tag_table() -> None:
    """Two caches share no strings: what one interns is not in the other's table."""
    first, second = cache_mod._SessionCache(10, hot_size=1), cache_mod._SessionCache(10, hot_size=1)
    for n in range(3):
        first.put(bytes([n]), sqlite._lean(make_session(sub=f"user-{n}", id_token="", tags=frozenset({"groups=staff"}))))
    assert first.tags.is_shared("groups=staff") and first.tags.pairs
    assert not second.tags.is_shared("groups=staff") and not second.tags.pairs


def test_retaining_services_drops_the_others_entries_and_their_strings() -> None:
    """After a reload drops a service, its cached sessions and its interned pair and tags are gone; the rest still expand."""
    cache = cache_mod._SessionCache(100, hot_size=1)
    kept = [sqlite._lean(make_session(sub=f"k-{n}", id_token="", service="keep", tags=frozenset({"groups=a"})))
            for n in range(4)]
    gone = [sqlite._lean(make_session(sub=f"g-{n}", id_token="", service="gone", tags=frozenset({"groups=old"})))
            for n in range(4)]
    for n, s in enumerate(kept + gone):
        cache.put(bytes([n]), s)
    assert cache.retain_services(frozenset({"keep"})) == 4
    assert len(cache) == 4
    assert all(service == "keep" for service, _ in cache.tags.pairs)
    assert not cache.tags.is_shared("groups=old")
    assert [cache.peek(bytes([n])) for n in range(4)] == kept
    assert cache.retain_services(frozenset({"keep"})) == 0


def test_full_cache_evicts_the_entry_used_longest_ago() -> None:
    """When the cache is full the oldest entry not used since goes; a cold entry used again moves to the young end."""
    cache = cache_mod._SessionCache(3, hot_size=1)
    for n in range(3):
        cache.put(bytes([n]), _cached(n))
    assert cache.peek(b"\x00") == _cached(0)  # cold, used again: now the youngest (and hot)
    cache.put(b"\x03", _cached(3))
    assert b"\x01" not in cache  # the oldest not used since
    assert {k for k in (b"\x00", b"\x02", b"\x03") if k in cache} == {b"\x00", b"\x02", b"\x03"}


def test_a_hot_entry_at_the_old_end_gets_a_second_chance() -> None:
    """A hot entry (used since it was added) is not evicted when it is the oldest: the next oldest goes."""
    cache = cache_mod._SessionCache(2, hot_size=2)
    cache.put(b"\x00", _cached(0))
    cache.put(b"\x01", _cached(1))
    assert cache.peek(b"\x00") is not None
    cache.refresh(b"\x00")  # hot tier: 1, 0 -- entry 0 stays the oldest in the big dict
    cache.put(b"\x02", _cached(2))  # demotes 1; 0 is the oldest but hot: 1 goes instead
    assert b"\x00" in cache and b"\x02" in cache and b"\x01" not in cache


def test_a_session_that_cannot_be_compacted_survives_while_it_is_used() -> None:
    """A whole Session outside the hot tier (no compact form) moves to the young end when used, so it is not evicted."""
    cache = cache_mod._SessionCache(3, hot_size=1)
    odd = sqlite._lean(make_session(sub="odd", refresh_token="\x01", id_token=""))  # the SOH marker: no cold form
    assert cache_mod._compact(odd, cache.tags) is None
    cache.put(b"odd", odd)
    for n in range(10):
        assert cache.peek(b"odd") == odd
        cache.refresh(b"odd")
        cache.put(bytes([n]), _cached(n))
        assert len(cache) <= 3
    assert b"odd" in cache


def test_evicting_many_keeps_order_and_rebuilds_the_dict() -> None:
    """Thousands of evictions keep exactly the newest entries, and the dict is rebuilt so holes do not pile up."""
    cache = cache_mod._SessionCache(100, hot_size=4)
    lean = _cached(0)
    for n in range(3000):
        cache.put(n.to_bytes(2, "big"), lean)
    assert len(cache) == 100
    assert list(cache._entries) == [n.to_bytes(2, "big") for n in range(2900, 3000)]
    assert cache._holes < cache_mod._REBUILD_AFTER


def test_eviction_ends_when_every_entry_is_hot() -> None:
    """With the hot tier as large as the cache, eviction still ends and keeps the newest entry."""
    cache = cache_mod._SessionCache(2, hot_size=8)
    for n in range(10):
        cache.put(bytes([n]), _cached(n))
        assert len(cache) <= 2
        assert bytes([n]) in cache
    assert cache.peek(b"\x09") == _cached(9)


def test_a_hit_on_a_hot_entry_leaves_the_big_dict_alone() -> None:
    """Serving a hot session reorders only the hot tier: the entries' order (and dict) are untouched."""
    cache = cache_mod._SessionCache(100, hot_size=4)
    for n in range(10):
        cache.put(bytes([n]), _cached(n))
    order = list(cache._entries)
    for _ in range(50):
        assert cache.peek(b"\x09") is not None
        cache.refresh(b"\x09")
    assert list(cache._entries) == order


async def test_sqlite_cache_keeps_cold_sessions_compact_and_serves_them(tmp_path: Path) -> None:
    """Beyond the hot tier, cached sessions are stored compact, still served from the cache without I/O, and revocable."""
    store = SQLiteSessionStore(tmp_path / "sessions.db", idle_timeout=IDLE, touch_interval=TOUCH)
    store._cache = cache_mod._SessionCache(10, hot_size=2)
    try:
        handles = [await store.create(make_session(sub=f"user-{i}", sid=f"sid-{i}")) for i in range(5)]
        entries = store._cache._entries
        assert sum(type(e) is Session for e in entries.values()) == 2  # the two most recent
        assert all(store.get_cached(h, "app", T0 + 1) is not None for h in handles)  # no read-through
        got = store.get_cached(handles[0], "app", T0 + 1)
        assert got == make_session(sub="user-0", sid="sid-0", id_token="")
        assert await store.delete_matching(issuer=ISSUER, sid="sid-3") == 1
        assert store.get_cached(handles[3], "app", T0 + 1) is None
        assert await store.purge_expired(T0 + 9 * 3600) == 4
        assert len(store._cache) == 0
    finally:
        await store.close()


async def test_get_cached_follows_the_store_contract_on_every_store(make_store: StoreFactory) -> None:
    """On every store, get_cached answers a live same-service session with no touch due (the
    one get() returns) and None for a touch due, expiry, another service, junk or unknown."""
    store = make_store()
    handle = await store.create(make_session())
    await store.get(handle, "app", T0)  # the SQLite store caches what it has read
    got = store.get_cached(handle, "app", T0 + TOUCH / 2)
    assert got is not None and got == await store.get(handle, "app", T0 + TOUCH / 2)
    assert store.get_cached(handle, "other", T0 + 1) is None
    assert store.get_cached(handle, "app", T0 + TOUCH + 1) is None  # a touch is due
    assert store.get_cached(handle, "app", T0 + 9 * 3600) is None  # expired
    assert store.get_cached("x" * 43, "app", T0) is None
    assert store.get_cached("not a handle", "app", T0) is None
